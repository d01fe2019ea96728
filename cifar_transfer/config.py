"""The one typed configuration of a run, validated at the edge, and the fingerprints.

`PipelineConfig` holds every option a user can set. `FeatureSpec` is the part
that changes the features (plus the archive checksum and weights identity); its
fingerprint names the feature folder and is written into every Parquet file, so
runs with different settings never mix.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cifar_transfer.backbones import backbone_option_help
from cifar_transfer.errors import ConfigError
from cifar_transfer.heads import HEAD_CHOICES, HEADS, head_option_help, vector_heads
from cifar_transfer.redact import refuse_secrets
from cifar_transfer.sources.detect import is_archive
from cifar_transfer.sources.files import MAX_FILE_MB
from cifar_transfer.storage import file_md5

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
OFFICIAL_ARCHIVES = {CIFAR10_URL: ("cifar10", CIFAR10_MD5), CIFAR100_URL: ("cifar100", CIFAR100_MD5)}

SourceFormat = Literal["auto", "cifar10", "cifar100", "folder", "parquet"]

# The options that take a URL or a path: each goes through `redact.refuse_secrets`.
URL_OPTIONS = ("source", "storage", "classes", "weights", "dask_address", "ray_address")

HeadKind = Literal[HEAD_CHOICES]  # type: ignore[valid-type]  # the head registry's names, "auto" and "all"

# Named bundles of settings; options given explicitly still win over a preset's.
PRESETS = {
    # The 2017 post: InceptionV3 at 139px, its 3x3x2048 maps, a shallow conv head,
    # RMSprop, batch 50, 50 epochs, 20% of train for validation.
    "blog-2017": {
        "backbone": "InceptionV3",
        "input_size": 139,
        "pooling": "none",
        "head": "conv",
        "head_batch_size": 50,
        "epochs": 50,
        "patience": 50,
        "validation_split": 0.2,
    },
}


def stable_hash(payload: dict, length: int = 16) -> str:
    """Short sha256 of a JSON-able dict, independent of key order."""
    encoded = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:length]


BATCH_PIXELS = 64 * 160 * 160  # the default batch: 64 images up to 160 px, then as many as hold this many pixels


def batch_size_for(input_size: int) -> int:
    """The default images per forward pass at `input_size`: the activations in flight grow with the pixels of a batch
    (MobileNetV2 at 224 px: 2.0 GiB at 64 images, 1.2 GiB at 16), the speed barely with its length."""
    return max(8, min(64, BATCH_PIXELS // input_size**2))


class StageSettings(BaseModel):
    """The part of the configuration one stage reads; built from `PipelineConfig`, never by hand."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSettings(StageSettings):
    source: str
    md5: str | None
    source_format: str
    label_mode: str


class CollectionSettings(StageSettings):
    """How to read a collection (an image folder or a Parquet table): everything its listing depends on."""

    source: str
    source_format: str
    test_fraction: float
    image_column: str
    label_column: str
    classes: str | None
    seed: int
    max_file_mb: float = MAX_FILE_MB  # records made before the option read as its default


class ExtractionSettings(StageSettings):
    """What decides which features are extracted and how they are cut into shards."""

    backbone: str
    weights: str
    input_size: int | None
    pooling: str
    engine: str
    precision: str
    flip: bool
    shard_size: int
    batch_size: int | None
    seed: int


class RunnerSettings(StageSettings):
    task_runner: str
    workers: int
    dask_address: str | None
    ray_address: str | None


class TsneSettings(StageSettings):
    """The map's settings; their hash (with the features' fingerprint) names the map's folder."""

    sample: int
    perplexity: float
    seed: int
    test: bool


class HeadSettings(StageSettings):
    """The head stage's settings; their hash (with the features' fingerprint) names the head's folder."""

    head: str
    epochs: int
    batch_size: int
    learning_rate: float
    validation_split: float
    patience: int
    seed: int
    flip: bool
    refit: bool


# The options of `cifar-transfer extract`: everything that decides the features, and where they go.
EXTRACTION_STAGES = (SourceSettings, CollectionSettings, ExtractionSettings, RunnerSettings)


class PipelineConfig(BaseModel):
    """Every option of a run. Defaults reproduce the 2017 post's extraction on CPU."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: Literal["blog-2017"] | None = Field(
        None, description="a named bundle of settings: 'blog-2017' reproduces the post (InceptionV3 139px maps, conv head, 50 epochs)"
    )
    source: str = Field(
        CIFAR10_URL,
        description="labelled images: a CIFAR-10/100 python archive, an image folder tree (ROOT/train/<class>/*, ROOT/test/<class>/* "
        "or ROOT/<class>/*) or a Parquet table of encoded images (file, folder or glob); URL, local path or any fsspec URL",
    )
    source_format: SourceFormat = Field(
        "auto", description="what --source is; 'auto': an archive by its name (.tar.gz), a table by .parquet files, else a folder tree"
    )
    label_mode: Literal["fine", "coarse"] = Field("fine", description="CIFAR-100 labels: 'fine' (100 classes) or 'coarse' (20)")
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="share of a collection's images held out for test when it does not name its splits (seeded, stable)"
    )
    image_column: str = Field("image", description="Parquet sources: the column of encoded images (a struct with 'bytes', or binary)")
    label_column: str = Field("label", description="Parquet sources: the integer label column")
    classes: str | None = Field(None, description="Parquet sources: a file of class names (one per line) when the table names none")
    max_file_mb: float = Field(
        MAX_FILE_MB,
        gt=0,
        description="collections and predict: a file (or table cell) larger than this many MiB is skipped and listed, never read",
    )
    md5: str | None = Field(
        None,
        description="expected MD5 of the archive, or 'none' to skip the check "
        "(default: the official MD5 for the official URL; required for any other source)",
    )
    storage: str = Field("storage", description="output root: local path or fsspec URL")
    backbone: str = Field("InceptionV3", description=backbone_option_help())
    weights: str = Field("imagenet", description="'imagenet' (Keras download), 'none' (seeded random init) or a weights file path")
    input_size: int | None = Field(
        None, le=1024, description="square input side in pixels (default: 139 for InceptionV3 as in the post, else the model's native size)"
    )
    pooling: Literal["stages", "avg", "none"] = Field(
        "stages",
        description="'stages': the average-pooled end of the stage before the last, widest point of the last stage and final "
        "features, concatenated (MobileNetV2: block_13_expand_relu, block_16_expand_relu, out_relu): +5.6 points of head "
        "accuracy at the same extraction cost; 'avg': the pooled final features only (the default of feature sets made "
        "before); 'none': the spatial map, flattened",
    )
    engine: Literal["auto", "tensorflow", "openvino"] = Field(
        "auto", description="inference engine; 'auto': TensorFlow on a GPU, OpenVINO on a CPU when installed"
    )
    precision: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="backbone compute precision; 'auto': mixed precision on a GPU, bfloat16 on a CPU with native bf16 "
        "when its features stay at cosine >= 0.9999 to float32, else float32",
    )
    flip: bool = Field(
        False,
        description="also extract left-right mirrored images (stored as train-flipped/test-flipped beside the originals); "
        "heads then train on both and average both at validation and test",
    )
    shard_size: int = Field(1000, ge=1, le=100_000, description="images per Parquet shard")
    batch_size: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="images per backbone forward pass (default: 64 up to 160 px inputs, fewer above so a batch keeps the "
        "same number of pixels: 32 at 224 px; the features do not depend on it)",
    )
    task_runner: Literal["thread", "dask", "ray"] = Field(
        "thread",
        description="where shards run: 'thread' (this process), 'dask' (a local Dask cluster, or --dask-address) "
        "or 'ray' (a local Ray, or --ray-address)",
    )
    workers: int = Field(2, ge=1, le=1024, description="worker processes of the local Dask cluster or CPUs of the local Ray")
    dask_address: str | None = Field(None, description="address of an existing Dask scheduler, e.g. tcp://10.0.0.5:8786")
    ray_address: str | None = Field(None, description="address of an existing Ray cluster, e.g. ray://10.0.0.5:10001 (task_runner ray)")
    tsne_sample: int = Field(25_000, ge=0, description="train images in the t-SNE map (0 skips t-SNE; more than the split uses all)")
    tsne_perplexity: float = Field(30.0, gt=0, le=500, description="t-SNE perplexity")
    tsne_test: bool = Field(False, description="also place the test images into the map (openTSNE transform)")
    head: HeadKind = Field("auto", description=head_option_help())
    epochs: int = Field(50, ge=1, le=10_000, description="maximum head training epochs; the best epoch on validation is kept")
    head_batch_size: int = Field(512, ge=1, le=65_536, description="head training batch size")
    learning_rate: float = Field(1e-3, gt=0, lt=10, description="head optimizer learning rate")
    validation_split: float = Field(0.1, gt=0, lt=0.9, description="fraction of train images held out to pick the best epoch")
    patience: int = Field(10, ge=1, description="epochs without validation improvement before head training stops")
    refit: bool = Field(
        True,
        description="after choosing on validation, train the chosen head again on all train images (validation part included) "
        "with the chosen strength / epochs (free for ridge: one more solve; one more training for network heads)",
    )
    seed: int = Field(0, ge=0, lt=2**31, description="seed for random weights, t-SNE sampling and the head")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, options):
        if isinstance(options, dict) and options.get("preset") in PRESETS:
            given = {name: value for name, value in options.items() if value is not None}
            return {**PRESETS[options["preset"]], **given}
        return options

    @field_validator(*URL_OPTIONS)
    @classmethod
    def _no_credentials_in_urls(cls, url: str | None, info) -> str | None:
        """Secrets in a URL would end up in logs, artifacts and metadata; refuse them (a presigned URL too: its
        signature is a credential, and the config is stored with every run)."""
        refuse_secrets(f"--{info.field_name.replace('_', '-')}", url)
        return url

    @field_validator("weights")
    @classmethod
    def _absolute_weights_path(cls, weights: str) -> str:
        """A weights file is remembered by absolute path, so workers in other folders find it."""
        if weights in ("imagenet", "none") or not Path(weights).is_file():
            return weights
        return str(Path(weights).resolve())

    @model_validator(mode="after")
    def _check(self) -> "PipelineConfig":
        from cifar_transfer.backbones import get_backbone

        if self.md5 is not None and self.md5 != "none" and not re.fullmatch(r"[0-9a-fA-F]{32}", self.md5):
            raise ValueError(f"md5 {self.md5!r} is not 32 hex digits: pass the archive's MD5 or 'none'")
        if self.is_archive and self.source not in OFFICIAL_ARCHIVES and self.md5 is None:
            raise ValueError(f"source {self.source!r} is not the official URL: pass its MD5 (--md5 HEX) or --md5 none to skip the check")
        backbone = get_backbone(self.backbone)
        if self.input_size is not None and self.input_size < backbone.min_input_size:
            raise ValueError(
                f"input_size {self.input_size} is below {backbone.name}'s minimum of "
                f"{backbone.min_input_size}: pass --input-size {backbone.min_input_size} or more"
            )
        if self.weights not in ("imagenet", "none") and not Path(self.weights).is_file():
            raise ValueError(f"weights file {self.weights!r} does not exist: pass 'imagenet', 'none' or a readable .weights.h5 path")
        if self.head in HEADS and HEADS[self.head].spatial_only and self.pooling != "none":
            raise ValueError(f"head {self.head!r} needs spatial features: pass --pooling none, or choose --head {'/'.join(vector_heads())}")
        _check_storage_scheme(self.storage)
        return self

    @property
    def expected_md5(self) -> str | None:
        """The checksum to verify, or None when the caller chose to skip it."""
        if self.md5 == "none":
            return None
        return (self.md5 or OFFICIAL_ARCHIVES.get(self.source, (None, CIFAR10_MD5))[1]).lower()

    @property
    def is_archive(self) -> bool:
        """A CIFAR python archive (decoded once), as opposed to a collection read image by image."""
        return is_archive(self.source, self.source_format, set(OFFICIAL_ARCHIVES))

    @property
    def archive_format(self) -> str:
        """ "cifar10", "cifar100", or "auto" (read from the archive's members)."""
        return self.source_format if self.source_format in ("cifar10", "cifar100") else OFFICIAL_ARCHIVES.get(self.source, ("auto",))[0]

    @property
    def collection_settings(self) -> CollectionSettings:
        return self.stage(CollectionSettings)

    @property
    def backbone_name(self) -> str:
        from cifar_transfer.backbones import get_backbone

        return get_backbone(self.backbone).name

    @property
    def resolved_input_size(self) -> int:
        from cifar_transfer.backbones import get_backbone

        return self.input_size or get_backbone(self.backbone).default_input_size

    @property
    def resolved_batch_size(self) -> int:
        return self.batch_size or batch_size_for(self.resolved_input_size)

    def feature_spec(self, dataset_md5: str, engine: str | None = None, precision: str | None = None) -> "FeatureSpec":
        """The spec of these features; `engine`/`precision` resolve 'auto' (see `tasks.engines.choose_engine`)."""
        engine, precision = engine or self.engine, precision or self.precision
        if "auto" in (engine, precision):
            raise ValueError("engine and precision must be resolved before the features are named: use tasks.engines.choose_engine")
        if self.weights in ("imagenet", "none"):
            weights_id = "imagenet" if self.weights == "imagenet" else f"random-init-seed{self.seed}"
        else:
            weights_id = f"file-md5-{file_md5(self.weights)}"
        return FeatureSpec(
            dataset_md5=dataset_md5,
            backbone=self.backbone_name,
            weights_id=weights_id,
            weights=self.weights,
            seed=self.seed,
            input_size=self.resolved_input_size,
            pooling=self.pooling,
            engine=engine,
            precision=precision,
        )

    def stage(self, settings: type[StageSettings]) -> StageSettings:
        """This configuration's settings of one stage, as that stage's own typed model."""
        return settings(**self.model_dump(include=set(settings.model_fields)))

    @property
    def source_settings(self) -> SourceSettings:
        return self.stage(SourceSettings)

    @property
    def runner_settings(self) -> RunnerSettings:
        return self.stage(RunnerSettings)

    @property
    def tsne_settings(self) -> TsneSettings:
        return TsneSettings(sample=self.tsne_sample, perplexity=self.tsne_perplexity, seed=self.seed, test=self.tsne_test)

    @property
    def head_settings(self) -> HeadSettings:
        return HeadSettings(**self.model_dump(include=set(HeadSettings.model_fields) - {"batch_size"}), batch_size=self.head_batch_size)

    def tsne_key(self, fingerprint: str, content_version: str | None = None) -> str:
        """Names the t-SNE output of these features (a collection's: of this version of them) and settings."""
        return stable_hash({"features": fingerprint, **_content(content_version), **self.tsne_settings.model_dump()}, 12)

    def head_key(self, fingerprint: str, content_version: str | None = None) -> str:
        """Names the head output of these features (a collection's: of this version of them) and settings."""
        return stable_hash({"features": fingerprint, **_content(content_version), **self.head_settings.model_dump()}, 12)


def _content(content_version: str | None) -> dict:
    """An archive's features never change under one fingerprint (no version: the keys stay what they were)."""
    return {} if content_version is None else {"content": content_version}


def _check_storage_scheme(storage: str) -> None:
    import fsspec

    protocol = storage.split("://", 1)[0] if "://" in storage else "file"
    try:
        fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError) as exc:
        raise ValueError(
            f"storage {storage!r} uses scheme {protocol!r}, which fsspec cannot open here ({exc}): "
            "use a local path or an installed fsspec scheme such as file://, s3://, gs://"
        ) from None


class FeatureSpec(BaseModel):
    """Everything that changes the features; its fingerprint names their folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset_md5: str
    backbone: str
    weights_id: str
    weights: str = Field(exclude=True)  # where the weights come from; their identity is weights_id
    seed: int = Field(exclude=True)  # only matters through weights_id for random weights
    input_size: int
    pooling: Literal["stages", "avg", "none"]
    resize: Literal["bilinear"] = "bilinear"
    engine: str
    precision: str

    @property
    def fingerprint(self) -> str:
        return stable_hash(self.model_dump())

    @property
    def folder_name(self) -> str:
        """Readable for people, unique by fingerprint: inceptionv3-139px-avg-<fingerprint>."""
        return f"{self.backbone.lower()}-{self.input_size}px-{self.pooling}-{self.fingerprint}"


def load_config(**options) -> PipelineConfig:
    """Validate options into a config, turning pydantic's report into one actionable line."""
    try:
        return PipelineConfig(**options)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{location}: {message}" if location else message)
    return "invalid configuration: " + "; ".join(parts)

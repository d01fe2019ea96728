"""The one typed configuration of a run, validated at the edge, and the fingerprints.

`PipelineConfig` holds every option a user can set, each declared once: type, default, bounds, description, and
(its `Stage` annotation) the stages that read it. Each stage's settings (`TsneSettings`, `HeadSettings`, ...) are
derived from those declarations, so a task gets just what its stage reads, typed as the option is. `FeatureSpec`
is the part that changes the features (plus the archive checksum and weights identity); its fingerprint names
the feature folder and is written into every Parquet file, so runs with different settings never mix.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from cifar_transfer import layout
from cifar_transfer.backbones import backbone_option_help
from cifar_transfer.cifar import ARCHIVE_FORMATS
from cifar_transfer.errors import ConfigError
from cifar_transfer.heads import HEAD_CHOICES, HEADS, head_option_help, vector_heads
from cifar_transfer.redact import refuse_secrets
from cifar_transfer.sources.files import MAX_FILE_MB
from cifar_transfer.sources.kinds import SourceKind, kind_for

CIFAR10_URL, CIFAR10_MD5 = ARCHIVE_FORMATS["cifar10"].official_url, ARCHIVE_FORMATS["cifar10"].official_md5
CIFAR100_URL, CIFAR100_MD5 = ARCHIVE_FORMATS["cifar100"].official_url, ARCHIVE_FORMATS["cifar100"].official_md5
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


StageName = Literal["run", "source", "collection", "extraction", "runner", "tsne", "head"]

# The stages the `cifar-transfer extract` subcommand runs: it takes only the options these read.
EXTRACTION_STAGES: tuple[StageName, ...] = ("run", "source", "collection", "extraction", "runner")


class Stage:
    """Where an option of `PipelineConfig` is read (its `Annotated` metadata): the stages whose settings hold it, as
    `name` there when that differs from the flat option's (`tsne_sample` is `TsneSettings.sample`). A stage's settings
    require every field, as the records stored with a map or head hold them all; `old_records_default` lets records
    made before the option existed read as its default. "run" marks what every stage shares (storage, preset)."""

    def __init__(self, *stages: StageName, name: str | None = None, old_records_default: bool = False):
        self.stages, self.name, self.old_records_default = stages, name, old_records_default

    def __repr__(self) -> str:
        keywords = [f"name={self.name!r}"] * bool(self.name) + ["old_records_default=True"] * self.old_records_default
        return f"Stage({', '.join([*map(repr, self.stages), *keywords])})"


class StageSettings(BaseModel):
    """The part of the configuration one stage reads; derived from `PipelineConfig`'s declarations, built by `stage()`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    options: ClassVar[dict[str, str]] = {}  # each field's flat option in `PipelineConfig`


Settings = TypeVar("Settings", bound=StageSettings)


class PipelineConfig(BaseModel):
    """Every option of a run. Defaults reproduce the 2017 post's extraction on CPU."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: Annotated[Literal["blog-2017"] | None, Stage("run")] = Field(
        None, description="a named bundle of settings: 'blog-2017' reproduces the post (InceptionV3 139px maps, conv head, 50 epochs)"
    )
    source: Annotated[str, Stage("source", "collection")] = Field(
        CIFAR10_URL,
        description="labelled images: a CIFAR-10/100 python archive, an image folder tree (ROOT/train/<class>/*, ROOT/test/<class>/* "
        "or ROOT/<class>/*) or a Parquet table of encoded images (file, folder or glob); URL, local path or any fsspec URL",
    )
    source_format: Annotated[SourceFormat, Stage("source", "collection")] = Field(
        "auto", description="what --source is; 'auto': an archive by its name (.tar.gz), a table by .parquet files, else a folder tree"
    )
    label_mode: Annotated[Literal["fine", "coarse"], Stage("source")] = Field(
        "fine", description="CIFAR-100 labels: 'fine' (100 classes) or 'coarse' (20)"
    )
    test_fraction: Annotated[float, Stage("collection")] = Field(
        0.2, gt=0, lt=1, description="share of a collection's images held out for test when it does not name its splits (seeded, stable)"
    )
    image_column: Annotated[str, Stage("collection")] = Field(
        "image", description="Parquet sources: the column of encoded images (a struct with 'bytes', or binary)"
    )
    label_column: Annotated[str, Stage("collection")] = Field("label", description="Parquet sources: the integer label column")
    classes: Annotated[str | None, Stage("collection")] = Field(
        None, description="Parquet sources: a file of class names (one per line) when the table names none"
    )
    max_file_mb: Annotated[float, Stage("collection", old_records_default=True)] = Field(
        MAX_FILE_MB,
        gt=0,
        description="collections and predict: a file (or table cell) larger than this many MiB is skipped and listed, never read",
    )
    md5: Annotated[str | None, Stage("source")] = Field(
        None,
        description="expected MD5 of the archive, or 'none' to skip the check "
        "(default: the official MD5 for the official URL; required for any other source)",
    )
    storage: Annotated[str, Stage("run")] = Field("storage", description="output root: local path or fsspec URL")
    backbone: Annotated[str, Stage("extraction")] = Field("InceptionV3", description=backbone_option_help())
    weights: Annotated[str, Stage("extraction")] = Field(
        "imagenet",
        description="'imagenet': the backbone's pretrained weights (keras.applications: Keras' ImageNet download; hub:<preset>: "
        "the preset's own), 'none' (random init seeded by --seed, for tests and timing) or a no-top weights file path",
    )
    input_size: Annotated[int | None, Stage("extraction")] = Field(
        None,
        le=1024,
        description="square input side in pixels (default: 139 for InceptionV3 as in the post, else the model's native size; "
        "a Keras Hub vision transformer takes multiples of its patch size where its position embeddings interpolate "
        "(DINOv2), else its native size only)",
    )
    pooling: Annotated[Literal["stages", "avg", "cls", "none"], Stage("extraction")] = Field(
        "stages",
        description="'stages': the average-pooled end of the stage before the last, widest point of the last stage and final "
        "features, concatenated (MobileNetV2: block_13_expand_relu, block_16_expand_relu, out_relu): more accurate heads "
        "at the same extraction cost (docs/benchmarks.md); 'avg': the pooled final features only (the default of feature sets made "
        "before); 'none': the spatial map, flattened. Vision transformers (hub:<preset>): 'avg' the mean patch token, 'cls' the "
        "class token (SigLIP: its attention-pooled embedding), 'stages' the class token and mean patch token of the blocks at half, "
        "three quarters and all of the depth, 'none' the patch tokens as their grid",
    )
    engine: Annotated[Literal["auto", "tensorflow", "openvino"], Stage("extraction")] = Field(
        "auto", description="inference engine; 'auto': TensorFlow on a GPU, OpenVINO on a CPU when installed"
    )
    precision: Annotated[Literal["auto", "float32", "bfloat16", "float16", "int8"], Stage("extraction")] = Field(
        "auto",
        description="backbone compute precision; 'int8': OpenVINO only, quantized with NNCF on 300 of the run's training "
        "images; 'auto': mixed precision on a GPU; on a CPU int8 where it has VNNI/AMX-INT8, else bfloat16 where it has "
        "native bf16, each only when its features pass the checks in docs/guide.md, else float32",
    )
    flip: Annotated[bool, Stage("extraction", "head")] = Field(
        False,
        description="also extract left-right mirrored images (stored as train-flipped/test-flipped beside the originals); "
        "heads then train on both and average both at validation and test",
    )
    shard_size: Annotated[int, Stage("extraction")] = Field(1000, ge=1, le=100_000, description="images per Parquet shard")
    batch_size: Annotated[int | None, Stage("extraction")] = Field(
        None,
        ge=1,
        le=4096,
        description="images per backbone forward pass (default: 64 up to 160 px inputs, fewer above so a batch keeps the "
        "same number of pixels: 32 at 224 px; the features do not depend on it)",
    )
    task_runner: Annotated[Literal["thread", "dask", "ray"], Stage("runner")] = Field(
        "thread",
        description="where shards run: 'thread' (this process), 'dask' (a local Dask cluster, or --dask-address) "
        "or 'ray' (a local Ray, or --ray-address)",
    )
    workers: Annotated[int, Stage("runner")] = Field(
        2, ge=1, le=1024, description="worker processes of the local Dask cluster or CPUs of the local Ray (at least one per GPU)"
    )
    dask_address: Annotated[str | None, Stage("runner")] = Field(
        None, description="address of an existing Dask scheduler, e.g. tcp://10.0.0.5:8786"
    )
    ray_address: Annotated[str | None, Stage("runner")] = Field(
        None, description="address of an existing Ray cluster, e.g. ray://10.0.0.5:10001 (task_runner ray)"
    )
    tsne_sample: Annotated[int, Stage("tsne", name="sample")] = Field(
        25_000, ge=0, description="train images in the t-SNE map (0 skips t-SNE; more than the split uses all)"
    )
    tsne_perplexity: Annotated[float, Stage("tsne", name="perplexity")] = Field(30.0, gt=0, le=500, description="t-SNE perplexity")
    tsne_test: Annotated[bool, Stage("tsne", name="test")] = Field(
        False, description="also place the test images into the map (openTSNE transform)"
    )
    head: Annotated[HeadKind, Stage("head")] = Field("auto", description=head_option_help())
    epochs: Annotated[int, Stage("head")] = Field(
        50, ge=1, le=10_000, description="maximum head training epochs; the best epoch on validation is kept"
    )
    head_batch_size: Annotated[int, Stage("head", name="batch_size")] = Field(512, ge=1, le=65_536, description="head training batch size")
    learning_rate: Annotated[float, Stage("head")] = Field(1e-3, gt=0, lt=10, description="head optimizer learning rate")
    validation_split: Annotated[float, Stage("head")] = Field(
        0.1, gt=0, lt=0.9, description="share of the train images held out to choose the head, its strength and its epoch"
    )
    patience: Annotated[int, Stage("head")] = Field(
        10, ge=1, description="epochs without validation improvement before head training stops"
    )
    refit: Annotated[bool, Stage("head")] = Field(
        True,
        description="after choosing on validation, train the chosen head again on all train images (validation part included) "
        "with the chosen strength / epochs (free for ridge: one more solve; one more training for network heads)",
    )
    seed: Annotated[int, Stage("collection", "extraction", "tsne", "head")] = Field(
        0,
        ge=0,
        lt=2**31,
        description="seed for random weights, the t-SNE sample and map, the validation split, the head, "
        "and a collection's train/test split",
    )

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
        self.source_kind.check(self.source, self.md5)
        backbone = get_backbone(self.backbone)
        problem = backbone.input_size_problem(self.input_size) if self.input_size is not None else None
        if problem:
            raise ValueError(problem)
        if self.pooling not in backbone.poolings:
            raise ValueError(f"pooling {self.pooling!r} does not fit {backbone.name}: use {', '.join(backbone.poolings)}")
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
    def source_kind(self) -> SourceKind:
        """How the source's images are read: an archive decoded once, or a collection read image by image."""
        return kind_for(self.source, self.source_format)

    @property
    def archive_format(self) -> str:
        """ "cifar10", "cifar100", or "auto" (read from the archive's members)."""
        return self.source_format if self.source_format in ("cifar10", "cifar100") else OFFICIAL_ARCHIVES.get(self.source, ("auto",))[0]

    def stage(self, settings: type[Settings]) -> Settings:
        """This configuration's settings of one stage, as that stage's own typed model."""
        return settings(**{name: getattr(self, option) for name, option in settings.options.items()})

    @property
    def collection_settings(self) -> CollectionSettings:
        return self.stage(CollectionSettings)

    @property
    def extraction_settings(self) -> ExtractionSettings:
        return self.stage(ExtractionSettings)

    @property
    def runner_settings(self) -> RunnerSettings:
        return self.stage(RunnerSettings)

    @property
    def tsne_settings(self) -> TsneSettings:
        return self.stage(TsneSettings)

    @property
    def head_settings(self) -> HeadSettings:
        return self.stage(HeadSettings)

    def feature_spec(self, dataset_id: str, engine: str | None = None, precision: str | None = None) -> FeatureSpec:
        return self.extraction_settings.feature_spec(dataset_id, engine, precision)

    def tsne_key(self, fingerprint: str, content_version: str | None = None) -> str:
        """Names the t-SNE output of these features (a collection's: of this version of them) and settings."""
        return stable_hash({"features": fingerprint, **_content(content_version), **self.tsne_settings.model_dump()}, 12)

    def head_key(self, fingerprint: str, content_version: str | None = None) -> str:
        """Names the head output of these features (a collection's: of this version of them) and settings."""
        return stable_hash({"features": fingerprint, **_content(content_version), **self.head_settings.model_dump()}, 12)


def option_stage(name: str) -> Stage:
    """The `Stage` annotation of the option `name`: which stages read it."""
    found = next((entry for entry in PipelineConfig.model_fields[name].metadata if isinstance(entry, Stage)), None)
    if found is None:
        raise TypeError(f"option {name!r} declares no stage: annotate it with the stages that read it, Annotated[type, Stage(...)]")
    return found


def settings_of(stage: StageName) -> type[StageSettings]:
    """The fields of `stage`'s settings, from the options that stage reads: same types (Literals, bounds), descriptions."""
    fields: dict[str, Any] = {}
    options: dict[str, str] = {}
    for option, field in PipelineConfig.model_fields.items():
        where = option_stage(option)
        if stage not in where.stages:
            continue
        name = where.name or option
        if name in fields:
            raise TypeError(f"options {options[name]!r} and {option!r} are both {name!r} in stage {stage!r}: give one Stage(name=...)")
        bounds = [entry for entry in field.metadata if not isinstance(entry, Stage)]
        annotation = Annotated[(field.annotation, *bounds)] if bounds else field.annotation
        fields[name] = (annotation, Field(field.default if where.old_records_default else ..., description=field.description))
        options[name] = option
    settings = create_model(f"{stage}-options", __base__=StageSettings, **fields)
    settings.options = options
    return settings


class CollectionSettings(settings_of("collection")):  # type: ignore[misc]  # base made by create_model
    """How to read a collection (an image folder or a Parquet table): everything its listing depends on."""


class ExtractionSettings(settings_of("extraction")):  # type: ignore[misc]  # base made by create_model
    """What decides which features are extracted and how they are cut into shards."""

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

    def feature_spec(self, dataset_id: str, engine: str | None = None, precision: str | None = None) -> FeatureSpec:
        """The spec of these features; `engine`/`precision` resolve 'auto' (see `engines.choose_engine`)."""
        engine, precision = engine or self.engine, precision or self.precision
        if "auto" in (engine, precision):
            raise ValueError("engine and precision must be resolved before the features are named: use engines.choose_engine")
        from cifar_transfer.backbones import get_backbone

        backbone = get_backbone(self.backbone)
        return FeatureSpec(
            dataset_id=dataset_id,
            backbone=backbone.name,
            weights_id=backbone.weights_id(self.weights, self.seed),
            weights=self.weights,
            seed=self.seed,
            input_size=self.resolved_input_size,
            pooling=self.pooling,
            resize=backbone.resize,
            engine=engine,
            precision=precision,
        )


class RunnerSettings(settings_of("runner")):  # type: ignore[misc]  # base made by create_model
    """Where the shard tasks run."""


class TsneSettings(settings_of("tsne")):  # type: ignore[misc]  # base made by create_model
    """The map's settings; their hash (with the features' fingerprint) names the map's folder."""


class HeadSettings(settings_of("head")):  # type: ignore[misc]  # base made by create_model
    """The head stage's settings; their hash (with the features' fingerprint) names the head's folder."""


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

    model_config = ConfigDict(extra="forbid", frozen=True, serialize_by_alias=True, validate_by_name=True, validate_by_alias=True)

    # What the images are: an archive's `dataset.dataset_id`, a collection's listing identity. Stored (and
    # fingerprinted) under its first name, so every feature set keeps its fingerprint.
    dataset_id: str = Field(alias="dataset_md5")
    backbone: str
    weights_id: str
    weights: str = Field(exclude=True)  # where the weights come from; their identity is weights_id
    seed: int = Field(exclude=True)  # only matters through weights_id for random weights
    input_size: int
    pooling: Literal["stages", "avg", "cls", "none"]
    resize: str = "bilinear"  # `Backbone.resize`: how images of another size reach the input size
    engine: str
    precision: str

    @property
    def fingerprint(self) -> str:
        return stable_hash(self.model_dump())

    @property
    def folder_name(self) -> str:
        """Readable for people, unique by fingerprint: inceptionv3-139px-avg-<fingerprint> (see `layout.feature_set_name`)."""
        return layout.feature_set_name(self.backbone, self.input_size, self.pooling, self.fingerprint)


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

"""The typed configuration: defaults, one-line errors, and what the fingerprint covers."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cifar_transfer.config import (
    CIFAR10_MD5,
    CIFAR10_URL,
    CollectionSettings,
    ExtractionSettings,
    FeatureSpec,
    HeadSettings,
    PipelineConfig,
    RunnerSettings,
    TsneSettings,
    batch_size_for,
    load_config,
    option_stage,
)
from cifar_transfer.errors import ConfigError
from cifar_transfer.sources.files import MAX_FILE_MB
from conftest import MOBILENET_WEIGHTS

LOCAL = {"source": "/data/cifar-10-python.tar.gz", "md5": "none", "engine": "tensorflow", "precision": "float32"}


def test_defaults_follow_the_post():
    config = load_config()
    assert (config.source, config.expected_md5) == (CIFAR10_URL, CIFAR10_MD5)
    assert (config.extraction_settings.backbone_name, config.extraction_settings.resolved_input_size, config.pooling) == (
        "InceptionV3",
        139,
        "stages",
    )
    assert load_config(backbone="mobilenetv2", **LOCAL).extraction_settings.resolved_input_size == 224


@pytest.mark.parametrize(
    "options, message",
    [
        ({"backbone": "InceptionV9"}, r"unknown backbone 'InceptionV9': use a keras.applications model name, one of .*InceptionV3"),
        ({"input_size": 60}, "input_size 60 is below InceptionV3's minimum of 75: pass --input-size 75 or more"),
        ({"shard_size": 0}, "shard_size: Input should be greater than or equal to 1"),
        ({"source": "/elsewhere/c.tar.gz"}, r"pass its MD5 \(--md5 HEX\) or --md5 none"),
        ({"md5": "xyz"}, "md5 'xyz' is not 32 hex digits"),
        ({"weights": "/no/such/file.h5"}, "weights file '/no/such/file.h5' does not exist"),
        ({"storage": "nosuchscheme://bucket/x"}, "scheme 'nosuchscheme'"),
        ({"head": "conv"}, "head 'conv' needs spatial features: pass --pooling none"),
        ({"pooling": "max"}, "pooling: Input should be 'stages', 'avg', 'cls' or 'none'"),
        ({"validation_split": 0}, "validation_split: Input should be greater than 0"),
    ],
)
def test_bad_options_fail_at_the_edge_with_one_line(options, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(**options)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("field", ["storage", "source", "dask_address", "ray_address"])
@pytest.mark.parametrize(
    "url, kind",
    [
        ("s3://AKIAEXAMPLE:s3cr3t-value@bucket/prefix", "credentials in the URL"),
        ("simplecache::https://AKIAEXAMPLE:s3cr3t-value@host/cifar.tar.gz", "credentials in the URL"),
        ("filecache::s3://AKIAEXAMPLE:s3cr3t-value@bucket/prefix", "credentials in the URL"),
        ("tcp://AKIAEXAMPLE:s3cr3t-value@10.0.0.5:8786", "credentials in the URL"),
        (
            "https://b.s3.amazonaws.com/c.tar.gz?X-Amz-Credential=AKIAEXAMPLE%2F20240101&X-Amz-Expires=60&X-Amz-Signature=s3cr3t-value",
            "query parameter X-Amz-Credential, query parameter X-Amz-Signature",
        ),
        (
            "simplecache::https://acct.blob.core.windows.net/c/cifar.tar.gz?sv=2022-11-02&sp=r&sig=s3cr3t-valueAKIAEXAMPLE",
            "query parameter sig",
        ),
        (
            "https://storage.googleapis.com/b/c.tar.gz?X-Goog-Credential=AKIAEXAMPLE&X-Goog-Signature=s3cr3t-value",
            "query parameter X-Goog-Credential, query parameter X-Goog-Signature",
        ),
    ],
)
def test_credentials_in_urls_are_refused_without_echoing_them(field, url, kind):
    with pytest.raises(ConfigError, match=f"--{field.replace('_', '-')} embeds credentials") as error:
        load_config(**{**LOCAL, field: url})
    message = str(error.value)
    assert f"({kind})" in message and "AWS_PROFILE" in message and "download the file first" in message
    assert "s3cr3t" not in message and "AKIAEXAMPLE" not in message and "\n" not in message


def test_addresses_without_secrets_pass():
    config = load_config(dask_address="tcp://10.0.0.5:8786", ray_address="ray://10.0.0.5:10001", **LOCAL)
    assert (config.dask_address, config.ray_address) == ("tcp://10.0.0.5:8786", "ray://10.0.0.5:10001")
    assert load_config(**LOCAL).dask_address is None


def test_fingerprint_covers_what_changes_features_and_nothing_else():
    base = load_config(weights="none", **LOCAL)
    fingerprint = base.feature_spec("a" * 32).fingerprint

    def changed(**options):
        return load_config(**{"weights": "none", **LOCAL, **options}).feature_spec("a" * 32).fingerprint

    assert base.feature_spec("b" * 32).fingerprint != fingerprint
    for options in (
        {"backbone": "ResNet50"},
        {"input_size": 299},
        {"pooling": "none"},
        {"seed": 1},
        {"weights": "imagenet"},
        {"precision": "bfloat16"},
    ):
        assert changed(**options) != fingerprint, options
    for options in ({"epochs": 3}, {"head": "logistic"}, {"tsne_sample": 10}, {"shard_size": 10}, {"batch_size": 8}, {"storage": "/x"}):
        assert changed(**options) == fingerprint, options
    # With real weights the seed does not change the network, so it does not change the fingerprint.
    assert load_config(weights="imagenet", seed=1, **LOCAL).feature_spec("a" * 32).fingerprint == changed(weights="imagenet")


def test_the_default_batch_keeps_its_pixels_as_inputs_grow_and_an_explicit_one_wins():
    assert [batch_size_for(size) for size in (32, 139, 160, 224, 299, 512, 1024)] == [64, 64, 64, 32, 18, 8, 8]
    assert load_config(weights="none", backbone="MobileNetV2", **LOCAL).extraction_settings.resolved_batch_size == 32  # its native 224 px
    assert load_config(weights="none", **LOCAL).extraction_settings.resolved_batch_size == 64  # InceptionV3 at the post's 139 px
    assert load_config(weights="none", backbone="MobileNetV2", batch_size=100, **LOCAL).extraction_settings.resolved_batch_size == 100


@pytest.mark.skipif(not MOBILENET_WEIGHTS.exists(), reason="../shared/data weights not present")
def test_weights_file_identity_is_its_content():
    spec = load_config(backbone="MobileNetV2", weights=str(MOBILENET_WEIGHTS), **LOCAL).feature_spec("a" * 32)
    assert spec.weights_id == "file-md5-e6d0f334d090be243a48361e11223f9c"
    assert spec.folder_name == f"mobilenetv2-224px-stages-{spec.fingerprint}"


def test_head_and_tsne_keys_follow_their_settings():
    config = load_config(**LOCAL)
    assert config.head_key("f") != load_config(epochs=3, **LOCAL).head_key("f")
    assert config.head_key("f") != config.head_key("g")
    assert config.tsne_key("f") != load_config(tsne_perplexity=5, **LOCAL).tsne_key("f")
    assert config.tsne_key("f") == load_config(epochs=3, **LOCAL).tsne_key("f")


def test_head_choices_help_and_checks_come_from_the_head_registry():
    from cifar_transfer.flows.cli import build_parser
    from cifar_transfer.heads import HEADS

    run = next(action for action in build_parser()._subparsers._group_actions[0].choices["run"]._actions if action.dest == "head")
    assert run.choices == ["auto", "all", *HEADS] and all(f"'{name}' ({head.summary})" in run.help for name, head in HEADS.items())
    for name, head in HEADS.items():
        assert load_config(head=name, pooling="none", **LOCAL).head == name
        if head.spatial_only:
            with pytest.raises(ConfigError, match=f"head '{name}' needs spatial features: pass --pooling none, or choose --head ridge/"):
                load_config(head=name, **LOCAL)
    with pytest.raises(ConfigError, match="head: Input should be 'auto', 'all', 'conv', 'ridge', 'softmax', 'logistic' or 'mlp'"):
        load_config(head="knn", **LOCAL)


# Computed on commit 8ac3e8e, before heads and backbones moved into registries: stored feature sets, maps and heads
# are found by these names, so they must never change for the same options.
@pytest.mark.parametrize(
    "options, fingerprint, head_key, tsne_key, versioned_head_key, versioned_tsne_key",
    [
        ({}, "f266133442754e52", "633372e351c9", "9b126186a465", "adf904f22574", "b4a300cc165f"),
        (
            {"backbone": "mobilenetv2", "weights": "none", "seed": 3, "pooling": "avg"},
            "e8332eacd39b3ac3",
            "c6d97d0350dd",
            "304106240738",
            "597400d6f81e",
            "4b9da5731ee7",
        ),
        ({"preset": "blog-2017"}, "97a1aa28c79792d2", "8e86e129d46d", "ec7a773f1a2d", "a65cf020453b", "ed1121ad75fe"),
        (
            {"head": "all", "epochs": 7, "flip": True, "refit": False, "tsne_perplexity": 12.5, "tsne_test": True},
            "f266133442754e52",
            "592f4a76dad0",
            "49554d5ce0e4",
            "ead97839971e",
            "43e1a7d602d1",
        ),
        (
            {"backbone": "efficientnetb3", "head": "mlp", "pooling": "none", "input_size": 96},
            "5932da658dc4d6fb",
            "2ec008b23d7b",
            "98617413fdfa",
            "86c497ac911b",
            "155a3591b09a",
        ),
    ],
)
def test_fingerprints_and_keys_are_those_stored_sets_were_named_by(
    options, fingerprint, head_key, tsne_key, versioned_head_key, versioned_tsne_key
):
    config = load_config(**{**LOCAL, **options})
    spec = config.feature_spec("a" * 32)
    assert spec.fingerprint == fingerprint
    assert (config.head_key(fingerprint), config.tsne_key(fingerprint)) == (head_key, tsne_key)
    assert (config.head_key(fingerprint, "v1"), config.tsne_key(fingerprint, "v1")) == (versioned_head_key, versioned_tsne_key)


def test_blog_2017_preset_reproduces_the_post_and_explicit_options_win():
    config = load_config(preset="blog-2017", **LOCAL)
    assert (config.extraction_settings.backbone_name, config.extraction_settings.resolved_input_size, config.pooling, config.head) == (
        "InceptionV3",
        139,
        "none",
        "conv",
    )
    assert (config.head_batch_size, config.epochs, config.patience, config.validation_split) == (50, 50, 50, 0.2)
    assert load_config(preset="blog-2017", epochs=5, **LOCAL).epochs == 5
    with pytest.raises(ConfigError, match="preset"):
        load_config(preset="blog-2018", **LOCAL)


# Pinned on the code before options were declared once (8ac3e8e): stored feature sets, maps and heads are found
# by these values, so a refactor of the configuration must leave every one of them as it is.
PINNED_OPTIONS = {
    "defaults": {},
    "blog-2017": {"preset": "blog-2017"},
    "collection": {
        "source": "/data/photos",
        "source_format": "folder",
        "test_fraction": 0.3,
        "seed": 7,
        "backbone": "MobileNetV2",
        "weights": "none",
    },
    "flip": {"flip": True, "pooling": "avg", "input_size": 160},
    "head and t-SNE options": {
        "head": "mlp",
        "epochs": 7,
        "head_batch_size": 64,
        "learning_rate": 0.01,
        "validation_split": 0.25,
        "patience": 3,
        "refit": False,
        "seed": 5,
        "tsne_sample": 100,
        "tsne_perplexity": 12.5,
        "tsne_test": True,
        "batch_size": 16,
    },
}
PINNED_KEYS = {  # (FeatureSpec.fingerprint, tsne_key, head_key)
    "defaults": ("25de6171c10cf44d", "b48bbd3c92c8", "cbbca23d8584"),
    "blog-2017": ("557eadc75364d01b", "b376793f56e8", "5b5bda206d3c"),
    "collection": ("62ea27fdc14d11a9", "51fd6e8d269c", "c4942858d563"),
    "flip": ("747da2dfab5a4ad2", "e63573af4aed", "468a271190c5"),
    "head and t-SNE options": ("25de6171c10cf44d", "a185cf2c4ed8", "314e4b763cdb"),
}


@pytest.mark.parametrize("case", PINNED_OPTIONS)
def test_fingerprints_and_keys_stay_what_stored_outputs_are_named_by(case):
    config = load_config(**PINNED_OPTIONS[case])
    content_version = "v3" if case == "collection" else None  # a collection's keys cover its content version
    fingerprint = config.feature_spec(CIFAR10_MD5, "tensorflow", "float32").fingerprint
    assert (fingerprint, config.tsne_key(fingerprint, content_version), config.head_key(fingerprint, content_version)) == PINNED_KEYS[case]


def test_stage_settings_dump_as_stored_records_hold_them():
    config = load_config(**PINNED_OPTIONS["collection"])
    assert config.collection_settings.model_dump() == {
        "source": "/data/photos",
        "source_format": "folder",
        "test_fraction": 0.3,
        "image_column": "image",
        "label_column": "label",
        "classes": None,
        "seed": 7,
        "max_file_mb": 256.0,
    }
    assert config.tsne_settings.model_dump() == {"sample": 25000, "perplexity": 30.0, "seed": 7, "test": False}
    assert config.head_settings.model_dump() == {
        "head": "auto",
        "epochs": 50,
        "batch_size": 512,
        "learning_rate": 0.001,
        "validation_split": 0.1,
        "patience": 10,
        "seed": 7,
        "flip": False,
        "refit": True,
    }


def test_stage_settings_are_derived_from_the_option_declarations():
    assert {name for name in PipelineConfig.model_fields if option_stage(name)} == set(PipelineConfig.model_fields)
    assert TsneSettings.options == {"sample": "tsne_sample", "perplexity": "tsne_perplexity", "test": "tsne_test", "seed": "seed"}
    assert HeadSettings.options["batch_size"] == "head_batch_size" and ExtractionSettings.options["batch_size"] == "batch_size"
    for settings in (CollectionSettings, ExtractionSettings, RunnerSettings, TsneSettings, HeadSettings):
        for name, option in settings.options.items():  # the option's own type (Literals kept) and description
            field, declared = settings.model_fields[name], PipelineConfig.model_fields[option]
            assert (field.annotation, field.description) == (declared.annotation, declared.description), (settings, name)
    head = load_config(**LOCAL).head_settings.model_dump()
    with pytest.raises(ValidationError, match="head\n  Input should be 'auto', 'all'"):
        HeadSettings(**{**head, "head": "forest"})
    with pytest.raises(ValidationError, match="batch_size\n  Input should be greater than or equal to 1"):
        HeadSettings(**{**head, "batch_size": 0})


def test_stored_settings_read_as_before():
    """A stored record missing a field fails (a map or head is not rebuilt from guessed settings), except an option
    that records made before it existed read as its default."""
    head = load_config(**LOCAL).head_settings.model_dump()
    with pytest.raises(ValidationError, match="refit\n  Field required"):
        HeadSettings(**{name: value for name, value in head.items() if name != "refit"})
    collection = load_config(source="/data/photos", source_format="folder").collection_settings.model_dump()
    del collection["max_file_mb"]
    assert CollectionSettings(**collection).max_file_mb == MAX_FILE_MB


def test_the_committed_options_reference_is_what_the_declarations_say():
    from cifar_transfer.flows import options_reference

    page = Path(__file__).resolve().parents[1] / "docs" / "options.md"
    assert page.read_text() == options_reference.markdown(), (
        "docs/options.md is out of date: run .venv/bin/python -m cifar_transfer.flows.options_reference"
    )
    assert "| `--tsne-sample`<br>`tsne_sample` | tsne (as `sample`) | integer, >= 0 | `25000` |" in page.read_text()


def test_a_feature_sets_fingerprint_and_stored_names_stay_what_they_were():
    """Every stored feature set is found by its fingerprint: renaming a field in code must not change either."""
    config = load_config(source="x.tar.gz", md5="none", backbone="MobileNetV2", weights="none", input_size=32)
    spec = config.feature_spec("ab" * 16, "openvino", "float32")
    assert spec.fingerprint == "d3ceefb79f540d2e"  # computed before `dataset_md5` was read as `dataset_id`
    stored = spec.model_dump()
    assert stored["dataset_md5"] == "ab" * 16 and "dataset_id" not in stored
    assert FeatureSpec(**stored, weights="none", seed=0) == spec

"""The dataset card (`README.md`) of a feature set, so any reader opens it without knowing our layout.

Without a card, Hugging Face `datasets` infers splits from folder names and accepts `-` as a separator, so it
reads `train-flipped/` into `train` (and `datasets.load_dataset("parquet", data_dir=...)` tries to read
`_manifest.json` as Parquet). The card's YAML front matter names each split's files explicitly: the `default`
config is the original `train` and `test` views, the `mirrored` config (only when the set has the mirrored
views) their left-right mirrors under the same split names (`datasets` allows no `-` in a split name). The
files are listed one by one, as the manifest lists them, because a collection's view may still hold the shards
its previous version retired. `dataset_info` gives the column types, so `label` is a `ClassLabel` with the
class names (`sequence` with a `length`, not `list`, is the spelling every `datasets` since 2.x reads as a
fixed-size list). Every string is written as JSON, which YAML reads as the same string.
"""

from __future__ import annotations

import json
import math
import posixpath
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from cifar_transfer import layout
from cifar_transfer.redact import redact
from cifar_transfer.shards import FLIPPED, SPLITS
from cifar_transfer.sources.kinds import kind_of

if TYPE_CHECKING:
    from cifar_transfer.feature_records import FeatureSetDescription, ShardRecord
    from cifar_transfer.storage import Storage

DEFAULT_CONFIG = "default"
MIRRORED_CONFIG = "mirrored"


def write_card(storage: Storage, folder: str, description: FeatureSetDescription, views: dict[str, list[ShardRecord]]) -> str:
    """Write the card of the set being committed (`views`: each view's shards once the commit is done), before its
    manifests: whoever sees a view complete finds its card."""
    path = layout.card(folder)
    storage.write_atomic(path, card_text(redact(storage.uri(folder)), description, views).encode())
    return path


def configs(views: dict[str, list[ShardRecord]]) -> dict[str, dict[str, str]]:
    """Config name -> split name -> view: the originals by default, the mirrors when the set has them."""
    found = {
        DEFAULT_CONFIG: {split: split for split in SPLITS if split in views},
        MIRRORED_CONFIG: {split: split + FLIPPED for split in SPLITS if split + FLIPPED in views},
    }
    return {name: splits for name, splits in found.items() if splits}


def card_text(folder_uri: str, description: FeatureSetDescription, views: dict[str, list[ShardRecord]]) -> str:
    """The whole card: YAML front matter for `datasets`, then a description for people."""
    written = datetime.now(timezone.utc).isoformat(timespec="seconds")
    front = [
        "---",
        f"pretty_name: {_quoted(description.spec['backbone'] + ' features ' + description.fingerprint)}",
        "tags:",
        "- image-features",
        "- cifar-transfer",
        *_dataset_info_yaml(description, configs(views)),
        *_configs_yaml(configs(views), views),
        "---",
    ]
    return "\n".join([*front, "", *_body(folder_uri, description, views, written)]) + "\n"


def _quoted(value: str) -> str:
    return json.dumps(value)


def _configs_yaml(found: dict[str, dict[str, str]], views: dict[str, list[ShardRecord]]) -> list[str]:
    lines = ["configs:"]
    for name, splits in found.items():
        lines += [f"- config_name: {name}", *(["  default: true"] if name == DEFAULT_CONFIG else []), "  data_files:"]
        for split, view in splits.items():
            lines += [f"  - split: {split}", "    path:"]
            lines += [f"    - {_quoted(posixpath.join(view, record.file))}" for record in views[view]]
    return lines


def _columns(description: FeatureSetDescription) -> list[tuple[str, str]]:
    """(name, Arrow type) of every column a shard holds, in order."""
    columns = [("index", "int64"), ("label", "int64"), ("features", f"fixed_size_list<float32>[{math.prod(description.feature_shape)}]")]
    return columns + list(kind_of(description.rebuild.collection).item_columns)


def _dataset_info_yaml(description: FeatureSetDescription, found: dict[str, dict[str, str]]) -> list[str]:
    features = ["  features:"]
    for name, arrow_type in _columns(description):
        features.append(f"  - name: {name}")
        if name == "label":
            features += ["    dtype:", "      class_label:", "        names:"]
            features += [f"          {_quoted(str(number))}: {_quoted(label)}" for number, label in enumerate(description.classes)]
        elif name == "features":
            features += ["    sequence: float32", f"    length: {math.prod(description.feature_shape)}"]
        else:
            features.append(f"    dtype: {arrow_type}")
    return ["dataset_info:", *(line for name in found for line in (f"- config_name: {name}", *features))]


def _body(folder_uri: str, description: FeatureSetDescription, views: dict[str, list[ShardRecord]], written: str) -> list[str]:
    spec, rebuild, made_by = description.spec, description.rebuild, description.made_by
    kind = kind_of(rebuild.collection)
    source = kind.title(spec["dataset_md5"], rebuild.collection)  # stored names
    weights = {"imagenet": "ImageNet weights", "none": f"random weights, seed {rebuild.seed}"}.get(
        rebuild.weights, f"the weights `{redact(rebuild.weights)}`"
    )
    pooled = {
        "avg": "average-pooled to one vector per image",
        "stages": "the average-pooled end of the stage before the last, widest point of the last stage and final features, "
        "concatenated into one vector per image",
    }.get(spec["pooling"], "spatial maps, flattened")
    rows = ", ".join(f"{view} {sum(record.rows for record in records)}" for view, records in views.items())
    shape = description.feature_shape
    lines = [
        f"# {posixpath.basename(folder_uri)}",
        "",
        f"Image features of {source}, computed by cifar-transfer with **{spec['backbone']}** ({weights}) "
        f"on images resized ({spec['resize']}) to {spec['input_size']}x{spec['input_size']} px, {pooled}, "
        f"run with {spec['engine']} in {spec['precision']}.",
        "",
        "| | |",
        "|---|---|",
        f"| fingerprint | `{description.fingerprint}` (of every setting that changes the features) |",
        f"| feature shape | {shape} ({math.prod(shape)} float32 values per row) |",
        f"| classes | {len(description.classes)}: {', '.join(description.classes)} |",
        f"| rows | {rows} |",
        f"| written | {written} |",
        *([f"| flow run | `{made_by.flow_run_id}` {redact(made_by.flow_run_url or '')} |"] if made_by and made_by.flow_run_id else []),
        "",
        "## Reading it",
        "",
        "```python",
        f"folder = {_quoted(folder_uri)}",
        "",
        "import pandas as pd",
        'train = pd.read_parquet(f"{folder}/train")  # skips the _manifest.json and hidden files',
        "",
        "import duckdb",
        "duckdb.sql(f\"SELECT label, count(*) FROM read_parquet('{folder}/train/*.parquet') GROUP BY label\")",
        "",
        "import polars as pl",
        'train = pl.read_parquet(f"{folder}/train/*.parquet")',
        "",
        "import datasets",
        "features = datasets.load_dataset(folder)  # the splits train and test, label as a ClassLabel",
    ]
    if MIRRORED_CONFIG in configs(views):
        lines.append(f'mirrored = datasets.load_dataset(folder, "{MIRRORED_CONFIG}")  # the same images mirrored left-right')
    lines += ["```", ""]
    if kind.incremental:
        lines += [
            "A view of a collection may also hold the shards its previous version retired, which a glob reads too: "
            "read the files its `_manifest.json` lists (as `datasets`, by this card, and `cifar_transfer.load_features` do).",
            "",
        ]
    lines += [
        "## Columns",
        "",
        f"- `index` (int64): {kind.index_meaning}.",
        "- `label` (int64): the class, numbered as listed above.",
        f"- `features` ({_columns(description)[2][1]}): the backbone's output"
        + (f", a {shape} map flattened in (height, width, channels) order." if len(shape) > 1 else "."),
        *kind.item_columns_note,
        "",
        "Views: `train`, `test`"
        + (", and their mirrors `train-flipped`, `test-flipped` (same `index` and `label`)" if MIRRORED_CONFIG in configs(views) else "")
        + ". "
        "A view is complete once its `_manifest.json` lists every shard with rows, bytes and SHA-256. Each file's Parquet "
        "schema metadata `cifar_transfer` holds the fingerprint, shape, row range and library versions. Files whose name "
        "starts with `.` are writes in progress or claims, never data; `feature_set.json` records how to rebuild the set.",
    ]
    return lines

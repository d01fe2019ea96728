"""The options reference, `docs/options.md`, generated from the declarations in `cifar_transfer/config.py`.

`python -m cifar_transfer.flows.options_reference` writes it; `tests/test_config.py` fails while the committed page
differs from what the declarations say.
"""

from __future__ import annotations

from pathlib import Path

from cifar_transfer.config import EXTRACTION_STAGES, PRESETS, PipelineConfig, option_stage
from cifar_transfer.flows.cli import option_flag, option_kind

PAGE = Path(__file__).resolve().parents[1] / "docs" / "options.md"

STAGES = {  # what each stage is, and the settings model its tasks get
    "run": "every stage: where outputs go, and the preset",
    "source": "downloading and checking an archive, decoding it (`fetch_archive_task`, `decode_archive_task`)",
    "collection": "listing and reading an image folder or a Parquet table (`CollectionSettings`)",
    "extraction": "engine choice and feature extraction (`ExtractionSettings`; the features' fingerprint)",
    "runner": "where the shard tasks run (`RunnerSettings`)",
    "tsne": "the t-SNE map (`TsneSettings`; with the fingerprint, its hash names the map)",
    "head": "the classifier head (`HeadSettings`; with the fingerprint, its hash names the head)",
    "audit": "the audit of a feature set: neighbours, duplicates, label issues, outliers (`AuditSettings`, recorded in `audit.json`)",
}
TYPE_NAMES = {int: "integer", float: "number", str: "text"}
BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}  # pydantic keeps a Field's bounds as metadata with these attributes


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _type(name: str) -> str:
    kind, choices = option_kind(name)
    if kind is bool:
        return "on/off"
    if choices:
        return "one of " + ", ".join(f"`{choice}`" for choice in choices)
    field = PipelineConfig.model_fields[name]
    bounds = [f"{sign} {getattr(entry, bound)}" for entry in field.metadata for bound, sign in BOUNDS.items() if hasattr(entry, bound)]
    return ", ".join([TYPE_NAMES[kind], *bounds])


def _default(name: str) -> str:
    default = PipelineConfig.model_fields[name].default
    if isinstance(default, bool):
        return "on" if default else "off"
    return "none" if default is None else f"`{default}`"


def _option(name: str) -> str:
    flag = option_flag(name)
    flags = f"`{flag}` / `--no-{flag[2:]}`" if option_kind(name)[0] is bool else f"`{flag}`"
    return f"{flags}<br>`{name}`"


def _stages(name: str) -> str:
    where = option_stage(name)
    return ", ".join(where.stages) + (f" (as `{where.name}`)" if where.name else "")


def markdown() -> str:
    """The page: every option (flag and config key, stages, type, default, description), the stages, the presets."""
    lines = [
        "# Options",
        "",
        "<!-- Generated from cifar_transfer/config.py by `python -m cifar_transfer.flows.options_reference`: do not edit. -->",
        "",
        "Every option of `cifar-transfer run` (the flag) is also a key of the flat configuration a deployment's `config`",
        "parameter and `load_config(...)` take. Each is declared once, in `PipelineConfig`, with the stages that read it;",
        "each stage's settings are derived from those declarations. `cifar-transfer extract` takes the options of the",
        f"stages it runs: {', '.join(EXTRACTION_STAGES)}.",
        "",
        "| option | stage | type | default | description |",
        "|---|---|---|---|---|",
    ]
    for name, field in PipelineConfig.model_fields.items():
        cells = (_option(name), _stages(name), _type(name), _default(name), field.description or "")
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    lines += ["", "## Stages", "", "| stage | what reads it |", "|---|---|"]
    lines += [f"| {stage} | {_cell(meaning)} |" for stage, meaning in STAGES.items()]
    lines += ["", "## Presets", "", "Options given explicitly win over a preset's.", "", "| preset | options |", "|---|---|"]
    for preset, options in PRESETS.items():
        lines.append(f"| `{preset}` | " + ", ".join(f"`{option_flag(name)} {value}`" for name, value in options.items()) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    PAGE.write_text(markdown())


if __name__ == "__main__":
    main()

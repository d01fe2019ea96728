"""`cifar-transfer`: the command line for people.

Options are generated from `PipelineConfig`, so `--help` always documents
every field with its default, and the CLI cannot drift from the flow.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing

# The ephemeral API's first start on a fresh PREFECT_HOME migrates its database, which takes a 2-core
# machine longer than Prefect's 20 s default; set before Prefect reads its settings on import.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from tasks.config import PipelineConfig, load_config
from tasks.errors import PermanentError

# The options that decide which features get extracted (the `extract` subcommand takes only these).
EXTRACTION_OPTIONS = [
    "preset", "source", "md5", "storage", "backbone", "weights", "input_size", "pooling",
    "engine", "precision", "flip", "shard_size", "batch_size", "seed", "task_runner", "workers", "dask_address", "ray_address",
]


def _add_config_options(parser: argparse.ArgumentParser, names: list[str]) -> None:
    for name in names:
        field = PipelineConfig.model_fields[name]
        annotation = field.annotation
        arguments = typing.get_args(annotation)
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} (default: {field.default})"
        if annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kind = next((candidate for candidate in (int, float) if candidate in (annotation, *arguments)), str)
        choices = list(arguments) if typing.get_origin(annotation) is typing.Literal else None
        parser.add_argument(flag, dest=name, type=kind, choices=choices, default=None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cifar-transfer",
        description="Transfer learning on CIFAR-10: backbone features to Parquet, t-SNE map, classifier head (a Prefect flow).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="the whole job: download, extract, t-SNE, head, report")
    _add_config_options(run, list(PipelineConfig.model_fields))
    extract = commands.add_parser("extract", help="download and extract features only (the Parquet shards)")
    _add_config_options(extract, EXTRACTION_OPTIONS)
    storage_default = PipelineConfig.model_fields["storage"].default
    listing = commands.add_parser("list", help="list the feature sets under a storage root")
    listing.add_argument("--storage", default=storage_default, help=f"output root (default: {storage_default})")
    verify = commands.add_parser("verify", help="check feature sets by content (sizes, SHA-256, fingerprints); --repair recomputes what is wrong")
    verify.add_argument("--storage", default=storage_default, help=f"output root (default: {storage_default})")
    verify.add_argument("--fingerprint", default=None, help="check only this feature set (default: all)")
    verify.add_argument("--repair", action="store_true", help="delete damaged shards and recompute them")
    return parser


def verify_command(storage_url: str, fingerprint: str | None, repair: bool) -> int:
    """Print each feature set's problems; with `repair`, fix them and check again. 0 when all is well."""
    from tasks.store import list_feature_sets
    from tasks.verify import remove_damaged, repair_config, verify_feature_set

    feature_sets = [info for info in list_feature_sets(storage_url) if fingerprint in (None, info.fingerprint)]
    if not feature_sets:
        print(f"no feature set{' ' + fingerprint if fingerprint else 's'} under {storage_url}")
        return 1
    healthy = True
    for info in feature_sets:
        problems = verify_feature_set(storage_url, info.folder)
        if problems and repair:
            from flows.cifar_transfer import extract_features

            remove_damaged(storage_url, info.folder, problems)
            extract_features(repair_config(storage_url, info.folder))
            problems = verify_feature_set(storage_url, info.folder)
        for relative, found in problems.items():
            print(f"{info.folder}/{relative}: {'; '.join(found)}")
        if not problems:
            print(f"OK {info.folder}")
        healthy = healthy and not problems
    return 0 if healthy else 1


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    options = {name: value for name, value in vars(arguments).items() if name != "command" and value is not None}
    try:
        if arguments.command == "list":
            from tasks.store import list_feature_sets

            print(json.dumps([info.model_dump() for info in list_feature_sets(options["storage"])], indent=2))
            return 0
        if arguments.command == "verify":
            return verify_command(options["storage"], options.get("fingerprint"), options.get("repair", False))
        config = load_config(**options)
        from flows.cifar_transfer import cifar_transfer, extract_features

        if arguments.command == "extract":
            features, _ = extract_features(config)
            print(f"features: {features.folder}")
            return 0
        summary = cifar_transfer(config)
    except PermanentError as error:
        print(f"cifar-transfer: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # anything else still ends in one line a user can act on
        print(f"cifar-transfer: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(f"features: {summary['features']}")
    if summary["tsne"]:
        print(f"t-SNE map: {summary['tsne']['picture']}")
    print(f"head: {summary['head']['folder']}")
    print(f"confusion matrix: {summary['head']['confusion_picture']}")
    print(f"test accuracy: {summary['test_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

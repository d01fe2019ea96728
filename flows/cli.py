"""`cifar-transfer`: the command line for people.

Options are generated from `PipelineConfig`, so `--help` always documents
every field with its default, and the CLI cannot drift from the flow.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing

from tasks.config import PipelineConfig, load_config
from tasks.errors import PermanentError

# The options that decide which features get extracted (the `extract` subcommand takes only these).
EXTRACTION_OPTIONS = [
    "source", "md5", "storage", "backbone", "weights", "input_size", "pooling",
    "engine", "precision", "shard_size", "batch_size", "seed",
]


def _add_config_options(parser: argparse.ArgumentParser, names: list[str]) -> None:
    for name in names:
        field = PipelineConfig.model_fields[name]
        annotation = field.annotation
        arguments = typing.get_args(annotation)
        kind = next((candidate for candidate in (int, float) if candidate in (annotation, *arguments)), str)
        choices = list(arguments) if typing.get_origin(annotation) is typing.Literal else None
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=kind,
            choices=choices,
            default=None,
            help=f"{field.description} (default: {field.default})",
        )


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
    listing = commands.add_parser("list", help="list the feature sets under a storage root")
    listing.add_argument("--storage", default=PipelineConfig.model_fields["storage"].default, help="output root")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    options = {name: value for name, value in vars(arguments).items() if name != "command" and value is not None}
    try:
        if arguments.command == "list":
            from tasks.store import list_feature_sets

            print(json.dumps([info.model_dump() for info in list_feature_sets(options["storage"])], indent=2))
            return 0
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

"""`cifar-transfer`: the command line for people.

Options are generated from `PipelineConfig`, so `--help` always documents
every field with its default, and the CLI cannot drift from the flow
(`docs/options.md` is generated from the same declarations: `flows/options_reference.py`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import posixpath
import sys
import typing

from cifar_transfer.config import EXTRACTION_STAGES, URL_OPTIONS, PipelineConfig, load_config, option_stage
from cifar_transfer.errors import PermanentError
from cifar_transfer.export import FORMATS
from cifar_transfer.flows import console, temporary_api  # before Prefect: temporary_api sets its server settings
from cifar_transfer.predict import CHUNK
from cifar_transfer.redact import printable, redact, refuse_secrets
from cifar_transfer.sources.files import MAX_FILE_MB

# The options that decide which features get extracted (the `extract` subcommand takes only these): those the
# extraction stages read, where the output goes and the preset that may set them.
EXTRACTION_OPTIONS = [name for name in PipelineConfig.model_fields if set(option_stage(name).stages) & set(EXTRACTION_STAGES)]
AUDIT_OPTIONS = [name for name in PipelineConfig.model_fields if "audit" in option_stage(name).stages]  # `audit` takes these


def option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def option_kind(name: str) -> tuple[type, list | None]:
    """What the flag of the config option `name` parses to (bool: an on/off flag), and its choices when it has a fixed set."""
    annotation = PipelineConfig.model_fields[name].annotation
    arguments = typing.get_args(annotation)
    if annotation is bool:
        return bool, None
    kind = next((candidate for candidate in (int, float) if candidate in (annotation, *arguments)), str)
    return kind, list(arguments) if typing.get_origin(annotation) is typing.Literal else None


def _add_config_options(parser: argparse.ArgumentParser, names: list[str]) -> None:
    for name in names:
        field = PipelineConfig.model_fields[name]
        help_text = f"{field.description} (default: {field.default})"
        kind, choices = option_kind(name)
        if kind is bool:
            parser.add_argument(option_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(option_flag(name), dest=name, type=kind, choices=choices, default=None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cifar-transfer",
        description="Transfer learning on labelled images (CIFAR-10/100, image folders, Parquet tables): backbone features to "
        "Parquet, t-SNE map, classifier head, predictions (Prefect flows).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="the whole job: download, extract, t-SNE, head, report")
    _add_config_options(run, list(PipelineConfig.model_fields))
    extract = commands.add_parser("extract", help="download and extract features only (the Parquet shards)")
    _add_config_options(extract, EXTRACTION_OPTIONS)
    storage_default = PipelineConfig.model_fields["storage"].default
    listing = commands.add_parser("list", help="list the feature sets under a storage root")
    listing.add_argument("--storage", default=storage_default, help=f"output root (default: {storage_default})")
    listing.add_argument("--json", action="store_true", help="every set's full description as JSON, for scripts (default: a table)")
    from cifar_transfer.evict import GRACE_SECONDS

    remove = commands.add_parser("rm", help="delete feature sets with their maps and heads (a dry run unless --yes)")
    remove.add_argument("fingerprints", nargs="+", metavar="FINGERPRINT", help="a set's fingerprint (or folder name)")
    collect = commands.add_parser("gc", help="delete all but the N newest feature sets (a dry run unless --yes)")
    collect.add_argument("--keep", type=int, required=True, metavar="N", help="how many of the newest sets to keep")
    for command in (remove, collect):
        command.add_argument("--storage", default=storage_default, help=f"output root (default: {storage_default})")
        command.add_argument("--yes", action="store_true", help="delete (default: print what would be deleted, and the space freed)")
        command.add_argument(
            "--grace-minutes",
            type=float,
            default=GRACE_SECONDS / 60,
            help="keep a set any file of which is younger than this: a flow run may be using it (default: %(default)g)",
        )
        command.add_argument(
            "--force",
            action="store_true",
            help="delete sets within the grace period too; a set a live writer holds a claim in is always kept",
        )
    verify = commands.add_parser(
        "verify", help="check feature sets by content (sizes, SHA-256, fingerprints); --repair recomputes what is wrong"
    )
    verify.add_argument("--storage", default=storage_default, help=f"output root (default: {storage_default})")
    verify.add_argument("--fingerprint", default=None, help="check only this feature set (default: all)")
    verify.add_argument("--repair", action="store_true", help="delete damaged shards and recompute them")
    predict = commands.add_parser("predict", help="classify images (files, a folder, a glob, a Parquet table) with a finished run's head")
    add_predict_arguments(predict)
    export = commands.add_parser(
        "export",
        help="write one self-contained model (uint8 images in, class probabilities out): .keras, TensorFlow SavedModel, OpenVINO IR",
    )
    add_export_arguments(export)
    similar = commands.add_parser("similar", help="the images of a feature set most like an image file or one of its own rows")
    add_similar_arguments(similar)
    audit = commands.add_parser(
        "audit", help="audit a feature set: near-duplicates and train/test leakage, likely label errors, outliers (audit/*.parquet)"
    )
    _add_config_options(audit, ["storage", *AUDIT_OPTIONS])
    audit.add_argument("--fingerprint", default=None, help="audit this feature set (default: the one of the newest finished head)")
    audit.add_argument("--head-key", default=None, help="take the head family from this head (default: the newest finished head)")
    for command in (run, extract, verify, predict, export, similar, audit):
        command.add_argument(
            "--verbose", action="store_true", help="show tracebacks and debug lines on the console (always in the log file)"
        )
    return parser


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `cifar-transfer predict`."""
    storage_default = PipelineConfig.model_fields["storage"].default
    parser.add_argument(
        "source", metavar="SOURCE", help="an image file, a folder, a glob, an fsspec URL of these, or a Parquet table of images"
    )
    parser.add_argument("--storage", default=storage_default, help=f"the runs' output root (default: {storage_default})")
    parser.add_argument("--fingerprint", default=None, help="use a head of this feature set (default: the newest head of any)")
    parser.add_argument("--head-key", default=None, help="use this head (a folder name under heads/; default: the newest)")
    parser.add_argument("--top-k", type=int, default=1, help="also give the K most probable classes with their probabilities (default: 1)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per backbone batch (default: 64)")
    parser.add_argument("--chunk", type=int, default=CHUNK, help=f"images decoded and held in memory at once (default: {CHUNK})")
    parser.add_argument(
        "--image-column", default=None, help="a table's column of encoded images (default: 'image', or its only such column)"
    )
    parser.add_argument("--output", default=None, help="write FILE.json or FILE.parquet (local or fsspec URL) instead of printing a table")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists (default: refuse)")
    parser.add_argument(
        "--max-file-mb",
        type=float,
        default=MAX_FILE_MB,
        help=f"skip (and report) image files larger than this many MiB, never reading them (default: {MAX_FILE_MB:g})",
    )


def add_similar_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `cifar-transfer similar`."""
    storage_default = PipelineConfig.model_fields["storage"].default
    parser.add_argument(
        "query", metavar="QUERY", help="an image file (or fsspec URL), a row of the set ('train:12', 'test:7') or a collection image's name"
    )
    parser.add_argument("--k", type=int, default=10, help="how many neighbours (default: 10)")
    parser.add_argument("--storage", default=storage_default, help=f"the runs' output root (default: {storage_default})")
    parser.add_argument("--fingerprint", default=None, help="search this feature set (default: the newest complete one)")
    parser.add_argument("--output", default=None, help="write FILE.json or FILE.parquet (local or fsspec URL) instead of printing a table")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists (default: refuse)")


def similar_command(arguments: argparse.Namespace) -> int:
    from cifar_transfer.audit.similar import similar, write_neighbours
    from cifar_transfer.predict import check_output

    refuse_secrets("QUERY", arguments.query)
    if arguments.output:
        check_output(arguments.output, arguments.overwrite)
    neighbours = similar(arguments.storage, arguments.query, arguments.k, arguments.fingerprint)
    if arguments.output:
        write_neighbours(neighbours, arguments.output, arguments.query)
        print(printable(f"neighbours: {len(neighbours)} images -> {arguments.output}"))
        return 0
    key_width = max([len("key"), *(len(printable(neighbour.key)) for neighbour in neighbours)])
    label_width = max([len("label"), *(len(printable(neighbour.label)) for neighbour in neighbours)])
    print(f"{'rank':>4}  {'key':<{key_width}}  {'label':<{label_width}}  similarity  distance")
    for neighbour in neighbours:
        print(
            f"{neighbour.rank:>4}  {printable(neighbour.key):<{key_width}}  {printable(neighbour.label):<{label_width}}  "
            f"{neighbour.similarity:>10.4f}  {neighbour.distance:>8.4f}"
        )
    return 0


def predict_command(arguments: argparse.Namespace) -> int:
    from cifar_transfer.predict import Predictor, check_output, write_predictions
    from cifar_transfer.sources.unlabelled import UnlabelledImages
    from cifar_transfer.trained import find_head

    """Print a table (path, class, confidence[, top K]) or write --output; undecodable images are rows with their reason."""
    if arguments.output:
        check_output(arguments.output, arguments.overwrite)  # before the backbone is built
    images = UnlabelledImages(arguments.source, arguments.image_column, arguments.max_file_mb)
    predictor = Predictor(find_head(arguments.storage, arguments.fingerprint, arguments.head_key), arguments.storage)
    rows = predictor.predict(images, arguments.top_k, arguments.batch_size, arguments.chunk)
    if arguments.output:
        metadata = {"head": predictor.head.key, "fingerprint": predictor.head.features.fingerprint, "source": redact(arguments.source)}
        count = write_predictions(rows, arguments.output, metadata)
        print(printable(f"predictions: {count} images -> {arguments.output}"))
        return 0
    width = max(images.path_width, len("path"))
    class_width = max(len("class"), *(len(printable(name)) for name in predictor.classes))
    print(f"{'path':<{width}}  {'class':<{class_width}}  confidence" + ("  top" if arguments.top_k > 1 else ""), flush=True)
    for row in rows:
        path = printable(row.path)
        if row.error is not None:
            print(f"{path:<{width}}  {'-':<{class_width}}  {'-':>10}  undecodable: {printable(row.error)}")
            continue
        top = "  " + ", ".join(f"{printable(name)} {probability:.3f}" for name, probability in row.top) if arguments.top_k > 1 else ""
        print(f"{path:<{width}}  {printable(row.class_name or ''):<{class_width}}  {row.confidence:>10.4f}{top}")
    sys.stdout.flush()
    return 0


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The `cifar-transfer export` options."""
    storage_default = PipelineConfig.model_fields["storage"].default
    parser.add_argument("--storage", default=storage_default, help=f"output root of the run (default: {storage_default})")
    parser.add_argument("--fingerprint", default=None, help="feature set to export from (default: the newest with a finished head)")
    parser.add_argument("--head-key", dest="head_key", default=None, help="head to export (default: the newest finished head)")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to write the model into (local path or fsspec URL)")
    parser.add_argument(
        "--format",
        dest="formats",
        action="append",
        choices=FORMATS,
        default=None,
        help="keras, savedmodel or openvino; repeat for several (default: every one installed here)",
    )


def export_command(arguments: argparse.Namespace) -> int:
    """Export as `arguments` ask and print where each format went and how many class names came with it."""
    from cifar_transfer.export import export_model

    result = export_model(arguments.storage, arguments.output, arguments.formats, arguments.fingerprint, arguments.head_key)
    for fmt in result.files:
        print(printable(f"{fmt}: {result.location(fmt)}"))
    print(printable(f"classes: {len(result.classes)} names in {result.description}"))
    return 0


def verify_command(storage_url: str, fingerprint: str | None, repair: bool) -> int:
    """Print each feature set's problems (and its decoded dataset's); with `repair`, fix them and check again.

    0 when all is well."""
    from cifar_transfer.catalogue import list_feature_sets
    from cifar_transfer.stored import stored_source
    from cifar_transfer.verify import rebuild_derived, remove_damaged, repair_config, verify_feature_set

    feature_sets = [info for info in list_feature_sets(storage_url) if fingerprint in (None, info.fingerprint)]
    if not feature_sets:
        print(printable(f"no feature set{' ' + fingerprint if fingerprint else 's'} under {storage_url}"))
        return 1
    healthy = True
    for info in feature_sets:
        source = stored_source(info.collection)
        problems = verify_feature_set(storage_url, info.folder)
        dataset_problems = source.problems(storage_url, info.spec.dataset_id)
        not_rebuilt = []
        if (problems or dataset_problems) and repair:
            from cifar_transfer.flows.pipeline import extract_features

            remove_damaged(storage_url, info.folder, problems)
            source.remove_damaged(storage_url, info.spec.dataset_id, dataset_problems)
            extract_features(repair_config(storage_url, info.folder))
            not_rebuilt = rebuild_derived(storage_url, info.folder)
            problems = verify_feature_set(storage_url, info.folder)
            dataset_problems = source.problems(storage_url, info.spec.dataset_id)
        for relative, found in problems.items():
            print(printable(f"{info.folder}/{relative}: {'; '.join(found)}"))
        for relative, found in dataset_problems.items():
            print(printable(f"{relative}: {'; '.join(found)}"))
        for line in not_rebuilt:
            print(printable(f"{info.folder}/{line}"))
        if not problems and not dataset_problems:
            print(printable(f"OK {info.folder}"))
        healthy = healthy and not problems and not dataset_problems
    return 0 if healthy else 1


def list_command(storage_url: str, as_json: bool) -> int:
    """Print the feature sets, newest first: a table for people, or their full descriptions as JSON."""
    from cifar_transfer.catalogue import list_feature_sets

    found = list_feature_sets(storage_url)
    if as_json:
        print(json.dumps([info.model_dump(mode="json") for info in found], indent=2))
        return 0
    if not found:
        print(printable(f"no feature sets under {storage_url}"))
        return 0
    rows = [("FOLDER", "BACKBONE", "ROWS TRAIN/TEST", "SIZE MB", "CREATED (UTC)", "FLOW RUN")]
    for info in found:
        flip = " +flip" if any(split.endswith("-flipped") for split in info.splits) else ""
        rows.append(
            (
                posixpath.basename(info.folder),
                f"{info.spec.backbone}/{info.spec.input_size}px/{info.spec.pooling}",
                "/".join(str(info.splits.get(split, "-")) for split in ("train", "test")) + flip,
                "-" if info.bytes is None else f"{info.bytes / 1e6:.1f}",
                info.created_at[:19].replace("T", " "),
                info.made_by.flow_run_id if info.made_by and info.made_by.flow_run_id else "-",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for cells in rows:
        row = [printable(cell) for cell in cells]
        print(
            "  ".join(
                cell.rjust(width) if column == 3 else cell.ljust(width)
                for column, (cell, width) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
    return 0


def evict_command(arguments: argparse.Namespace) -> int:
    """`rm` and `gc`: print what goes (and the space freed) and what stays and why; delete only with --yes.

    1 when `rm` keeps or finds no set it was asked to delete."""
    from cifar_transfer.evict import evict, plan_gc, plan_removal

    grace = arguments.grace_minutes * 60
    if arguments.command == "rm":
        plan = plan_removal(arguments.storage, arguments.fingerprints, grace, arguments.force)
    else:
        plan = plan_gc(arguments.storage, arguments.keep, grace, arguments.force)
    if arguments.yes:
        plan = evict(plan)
    for name in plan.unknown:
        print(printable(f"no feature set {name} under {arguments.storage}"))
    for entry in plan.keep:
        print(printable(f"keep {posixpath.basename(entry.folder)}: {entry.kept_because}"))
    for entry in plan.evict:
        print(
            printable(
                f"{'deleted' if arguments.yes else 'would delete'} {posixpath.basename(entry.folder)} "
                f"({entry.bytes / 1e6:.1f} MB, created {entry.created_at})"
            )
        )
    if arguments.yes:
        print(f"freed {plan.bytes_freed / 1e6:.1f} MB")
    else:
        print(f"would free {plan.bytes_freed / 1e6:.1f} MB" + ("; pass --yes to delete" if plan.evict else ""))
    return 1 if arguments.command == "rm" and (plan.keep or plan.unknown) else 0


def main(argv: list[str] | None = None) -> int:
    """Run one command; a failure ends with one line `cifar-transfer: error: ...`, nothing after it (exit 2: bad input)."""
    arguments = build_parser().parse_args(argv)
    verbose = getattr(arguments, "verbose", False)
    options = {name: value for name, value in vars(arguments).items() if name not in ("command", "verbose") and value is not None}
    try:  # before anything is logged or stored: a URL option with credentials goes no further than this line
        for name in (*URL_OPTIONS, "output"):
            refuse_secrets(
                "SOURCE" if name == "source" and arguments.command == "predict" else f"--{name.replace('_', '-')}", options.get(name)
            )
        log_file = console.start_console(verbose) if arguments.command not in ("list", "rm", "gc") else None
    except PermanentError as error:
        return fail(error, None)
    try:
        if arguments.command == "list":
            return list_command(options["storage"], options["json"])
        if arguments.command in ("rm", "gc"):
            return evict_command(arguments)
        if arguments.command == "verify":
            if options.get("repair"):
                temporary_api.start()
            return verify_command(options["storage"], options.get("fingerprint"), options.get("repair", False))
        if arguments.command == "predict":
            return predict_command(arguments)
        if arguments.command == "export":
            return export_command(arguments)
        if arguments.command == "similar":
            return similar_command(arguments)
        if arguments.command == "audit":
            return audit_command(options)
        config = load_config(**options)
        temporary_api.start(meanwhile=functools.partial(load_run_modules, keras=arguments.command == "run"))
        from cifar_transfer.flows.pipeline import cifar_transfer, extract_features

        if arguments.command == "extract":
            features, _ = extract_features(config)
            print(printable(f"features: {features.folder}"))
            return 0
        summary = cifar_transfer(config)
    except Exception as error:  # every failure ends in one line a user can act on
        return fail(error, log_file)
    print(printable(f"features: {summary.features.folder}"))
    if summary.tsne:
        print(printable(f"t-SNE map: {summary.tsne.picture}"))
    print(printable(f"head: {summary.head.files.folder}"))
    print(printable(f"confusion matrix: {summary.head.files.confusion_picture}"))
    print(printable(f"HTML report: {summary.html_report_url}"))
    print(f"test accuracy: {summary.test_accuracy:.4f}")
    return 0


def load_run_modules(keras: bool = True) -> None:
    """Import what a command's flows need anyway while the temporary Prefect API starts: the flows (0.7 s), and with
    `keras` TensorFlow (3.5 s), which the heads of `run` and `audit` and a first extraction load, but a rerun of
    `extract` does not.
    A failure here is left to the import that needs the module to report."""
    try:
        import cifar_transfer.flows.pipeline  # noqa: F401 (imported for its load time)
        from cifar_transfer.native import load_keras

        if keras:
            load_keras()
    except Exception as error:  # reported again, as the command's failure, by the import that needs the module
        console.record_detail("loading ahead of the run failed", error)


def audit_command(options: dict) -> int:
    """The `audit-features` flow on a finished head's feature set; prints the summary line and the tables."""
    fingerprint, head_key = options.pop("fingerprint", None), options.pop("head_key", None)
    config = load_config(**options)
    temporary_api.start(meanwhile=load_run_modules)  # its folds' heads are Keras models
    from cifar_transfer.flows.pipeline import audit_features

    result = audit_features(config, fingerprint, head_key)
    print(printable(result.summary.line()))
    for path in (result.files.duplicates, result.files.label_issues, result.files.outliers):
        print(printable(f"table: {path}"))
    return 0


def fail(error: Exception, log_file) -> int:
    """Print the one-line reason last (the traceback is in the log file) and return the exit code.

    Out of memory, the process ends here (exit 1): its threads may never finish, and the temporary Prefect server
    stops with it (it is tied to this process), so nothing is left to wait for."""
    permanent = isinstance(error, PermanentError)
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    reason = reason if permanent else f"{type(error).__name__}: {reason}"
    if isinstance(error, MemoryError):
        reason = (
            "out of memory: lower --batch-size or --shard-size (or --max-file-mb, for huge images), or give the command "
            "more memory; finished shards are kept"
        )
    if log_file is not None:
        console.record_failure(error)
        if not isinstance(error, MemoryError):
            console.stop_prefect_quietly()
        reason += f" (details: {log_file})"
    print(f"cifar-transfer: error: {printable(reason)}", file=sys.stderr, flush=True)
    if isinstance(error, MemoryError):
        sys.stdout.flush()
        os._exit(1)
    return 2 if permanent else 1


if __name__ == "__main__":
    sys.exit(main())

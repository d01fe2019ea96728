"""Benchmark: the stages after extraction (the head, the t-SNE map), before and after, against the set's extraction.

    git worktree add /tmp/stages-before <commit>
    .venv/bin/python bench/stages.py storage/features/<set> --baseline-checkout /tmp/stages-before \
        [--stages head,tsne,together,sequence]

For one complete feature set, each stage runs in a fresh process per checkout, alternating (baseline, then this
checkout), with that checkout's default settings: the head by `train_head` on a fresh hard-linked copy of the set
(`bench/heads.py`; nothing reused), the map by `tsne_map` into a folder of its own; `together` runs the two side by
side as `analyze-features` does (the map in a thread, the head in the main one), `sequence` the map after the head in
one process (whether side by side pays depends on the machine: give the same checkout twice to compare the two on
it). Each row of
bench/results/stages.jsonl holds one stage of one checkout: its seconds, those over the set's own extraction time
(`feature_set.json`), and its quality (the head's validation and test accuracy, the map's 10-NN class accuracy in
2-D and in PCA space, as the report shows them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.heads import REPO, run_child, run_head, subset  # noqa: E402
from bench.results_log import record  # noqa: E402

# Runs in the child: the checkout's own default t-SNE settings, into a key of its own.
TSNE_CHILD = """
import json, resource, sys, time
from cifar_transfer.config import PipelineConfig
from cifar_transfer.tsne import tsne_map
storage, folder, key = sys.argv[1], sys.argv[2], sys.argv[3]
settings = PipelineConfig().tsne_settings
started = time.perf_counter()
result = tsne_map(storage, folder, key, settings, [str(n) for n in range(10)])
print("RESULT " + json.dumps({"seconds": time.perf_counter() - started, "points": result.points,
      "map_knn_accuracy": result.map_knn_accuracy, "feature_knn_accuracy": result.feature_knn_accuracy,
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

# Runs in the child: the map and the head, each into a key of its own, either at once as a run's analysis runs them
# (`beside`: the map in a thread, the head in the main one) or one after the other (`after`: the map once the head is
# done), with the process's CPU time, so the two arrangements compare on one machine. TensorFlow is loaded first, as
# a run has loaded it by then (`cli.load_run_modules`): its import (3.5 s on one core) would otherwise favour `beside`.
ANALYSIS_CHILD = """
import json, resource, sys, threading, time
from cifar_transfer.config import PipelineConfig
from cifar_transfer.head import train_head
from cifar_transfer.native import load_keras
from cifar_transfer.tsne import tsne_map
load_keras()
storage, folder, key, arrangement = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
config, classes, seconds, results = PipelineConfig(), [str(n) for n in range(10)], {}, {}
def tsne():
    started = time.perf_counter()
    results["tsne"] = tsne_map(storage, folder, key, config.tsne_settings, classes)
    seconds["tsne"] = time.perf_counter() - started
def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
started, cpu_before = time.perf_counter(), cpu_seconds()
beside = threading.Thread(target=tsne)
if arrangement == "beside":
    beside.start()
results["head"] = train_head(storage, folder, key, config.head_settings, classes)
seconds["head"] = time.perf_counter() - started
if arrangement == "beside":
    beside.join()
else:
    tsne()
print("RESULT " + json.dumps({"seconds": time.perf_counter() - started, "tsne_seconds": seconds["tsne"],
      "head_seconds": seconds["head"], "cpu_seconds": cpu_seconds() - cpu_before,
      "test_accuracy": results["head"].test_accuracy, "map_knn_accuracy": results["tsne"].map_knn_accuracy,
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


# The stages whose child writes under a key it is given, with the child's further arguments.
CHILDREN = {"tsne": (TSNE_CHILD, ()), "together": (ANALYSIS_CHILD, ("beside",)), "sequence": (ANALYSIS_CHILD, ("after",))}


def run_keyed(checkout: Path, stage: str, folder: str, key: str) -> dict:
    code, arguments = CHILDREN[stage]
    return run_child(checkout, code, str(Path(folder).parents[1]), folder, key, *arguments)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("features", help="a complete feature set folder")
    parser.add_argument("--baseline-checkout", required=True, help="the checkout before (git worktree add DIR COMMIT)")
    parser.add_argument("--stages", default="head,tsne", help="head, tsne, together, sequence; comma-separated (default: head,tsne)")
    arguments = parser.parse_args()
    extraction = json.loads((Path(arguments.features) / "feature_set.json").read_text())["extraction"]["seconds"]
    checkouts = {"before": Path(arguments.baseline_checkout), "after": REPO}
    base = {"features": os.path.basename(arguments.features), "extraction_seconds": round(extraction, 1)}
    with tempfile.TemporaryDirectory(dir=Path(arguments.features).parents[2]) as scratch:
        folder = subset(arguments.features, 10**9, scratch, flip=False)  # every row, hard-linked: nothing stored is reused
        for round_number, stage in enumerate(arguments.stages.split(",")):
            for name, checkout in checkouts.items():
                if stage == "head":
                    result = run_head(checkout, folder, {})
                elif stage in CHILDREN:  # a key per round: a stage named twice is made twice, not found done
                    result = run_keyed(checkout, stage, folder, f"bench-{stage}-{name}-{round_number}")
                else:
                    raise SystemExit(f"unknown stage {stage!r}: give head, tsne, together or sequence")
                row = base | {"stage": stage, "checkout": name, **result, "per_extraction": result["seconds"] / extraction}
                record("stages", json.loads(json.dumps(row), parse_float=lambda text: round(float(text), 4)))


if __name__ == "__main__":
    main()

"""Benchmark: the audit's nearest-neighbour index (`cifar_transfer/audit/index.py`) from 100,000 to 1,000,000 vectors.

    nice -n 19 .venv/bin/python bench/audit_index.py [--sizes 100000 300000 1000000] [--deadline 18:10] [--storage DIR]

Synthetic features of MobileNetV2's pooled width (1,280) are written as a real feature set (Parquet shards of 10,000
rows, a manifest) and indexed as the audit indexes them: `update_index` with `exact_limit=0` (the usearch HNSW graph,
f16, cosine, at every size). They are drawn from a mixture of 1,000 Gaussian clusters of unequal sizes around a shared
positive mean (as pooled activations have), each cluster spread along 16 directions of its own plus isotropic noise:
a point's nearest neighbours are the points of its cluster closest along those directions, so recall@10 measures
the graph, not ties among equidistant noise.

Per size, each step runs in a fresh process, whose peak RSS and CPU time the parent reads (`os.wait4`):
- build: `update_index` over the whole set;
- add: the set grows by 1% (one new shard, its manifest rewritten) and `update_index` adds only that shard's rows;
- query: a `Searcher` (what `cifar-transfer similar` uses) on 1,000 new vectors from the same mixture: latency of
  single queries (one per call, k=10: p50 and p95), throughput of all of them in one call, recall@10 against
  `exact_search` (blocked matrix products streaming the shards) and exact search's own throughput.

A size whose predicted time would end past `--deadline` (UTC, HH:MM) is not run: it is extrapolated from the largest
size measured (build and add time per vector growing with ln n, latency with ln n, file size and memory linearly) and
marked `"extrapolated"`; recall is not extrapolated. Wall times on a shared machine vary with its load: CPU seconds
(user + system of the step's process, all its threads) say more. Results: bench/results/audit_index.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench.results_log import record  # noqa: E402

DIMENSION = 1280
CLUSTERS = 1000
DIRECTIONS = 16
SHARD_ROWS = 10_000
QUERIES = 1000
K = 10
SEED = 0


class Mixture:
    """The synthetic features' distribution: fixed by the seed, drawn a shard at a time (reproducibly by shard number)."""

    def __init__(self, seed: int = SEED):
        rng = np.random.default_rng(seed)
        self.seed = seed
        self.mean = rng.gamma(2.0, 0.5, DIMENSION).astype(np.float32)
        self.centres = (0.8 * rng.standard_normal((CLUSTERS, DIMENSION))).astype(np.float32)
        spread = 20.0 / np.sqrt(np.sum(1.0 / np.arange(1, DIRECTIONS + 1)))  # the spread along the directions: norm ~20
        self.scales = (spread / np.sqrt(np.arange(1, DIRECTIONS + 1))).astype(np.float32)
        directions = rng.standard_normal((CLUSTERS, DIRECTIONS, DIMENSION)).astype(np.float32)
        self.directions = directions / np.linalg.norm(directions, axis=2, keepdims=True)
        self.weights = rng.dirichlet(np.full(CLUSTERS, 2.0))

    def draw(self, rows: int, stream: int, number: int) -> tuple[np.ndarray, np.ndarray]:
        """(features, cluster of each row) of `rows` points; `stream` 0 for the set's shards, 1 for queries."""
        rng = np.random.default_rng([self.seed, stream, number])
        clusters = rng.choice(CLUSTERS, rows, p=self.weights)
        coefficients = rng.standard_normal((rows, DIRECTIONS)).astype(np.float32) * self.scales
        features = self.mean + self.centres[clusters] + 0.3 * rng.standard_normal((rows, DIMENSION)).astype(np.float32)
        order = np.argsort(clusters, kind="stable")
        groups = np.split(order, np.flatnonzero(np.diff(clusters[order])) + 1)
        for group in groups:
            features[group] += coefficients[group] @ self.directions[clusters[group[0]]]
        return features, clusters


def write_shards(root: str, mixture: Mixture, first: int, rows: int, records: list) -> str:
    """Append shards holding train rows [first, first + rows) to the set under `root` and commit it with `records`
    (those already written, extended in place); returns the set's folder."""
    from test_head import CLASSES, synthetic_spec

    from cifar_transfer.commit import commit_feature_set
    from cifar_transfer.shard_files import features_folder, shard_path, shard_table, write_shard
    from cifar_transfer.shards import Shard, ShardRows
    from cifar_transfer.storage import Storage

    spec, storage = synthetic_spec(), Storage(root)
    for start in range(first, first + rows, SHARD_ROWS):
        stop = min(start + SHARD_ROWS, first + rows)
        shard = Shard(split="train", number=len(records), start=start, stop=stop)
        features, clusters = mixture.draw(stop - start, 0, shard.number)
        table = shard_table(spec, shard, ShardRows(labels=clusters % len(CLASSES), ids=np.arange(start, stop)), features)
        records.append(write_shard(storage, shard_path(storage, spec, shard), shard, table))
    commit_feature_set(root, spec, records, CLASSES)
    return features_folder(storage, spec)


def step(arguments: argparse.Namespace) -> dict:
    """One measured step, run in its own process: 'build', 'add' or 'query'."""
    from cifar_transfer import layout
    from cifar_transfer.audit.index import Searcher, exact_search, read_index_record, update_index
    from cifar_transfer.audit.vectors import normalized
    from cifar_transfer.storage import Storage

    storage = Storage(arguments.root)
    if arguments.step in ("build", "add"):
        started = time.perf_counter()
        update = update_index(storage, arguments.folder, "bench", exact_limit=0)
        seconds = time.perf_counter() - started
        size = os.path.getsize(os.path.join(arguments.root, layout.index_files(arguments.folder).vectors))
        return {"seconds": seconds, "change": update.change, "added": update.added, "rows": update.record.rows, "file_bytes": size}
    index_record = read_index_record(storage, arguments.folder)
    assert index_record is not None and index_record.kind == "usearch"
    queries = normalized(Mixture().draw(QUERIES, 1, 0)[0])
    started = time.perf_counter()
    searcher = Searcher(storage, arguments.folder, index_record)
    searcher.positions()
    opened = time.perf_counter() - started
    try:
        latencies = []
        for query in queries:
            started = time.perf_counter()
            searcher.search(query[None, :], K)
            latencies.append(time.perf_counter() - started)
        started = time.perf_counter()
        approximate = searcher.search(queries, K)[0]
        batch = time.perf_counter() - started
    finally:
        searcher.close()
    started = time.perf_counter()
    exact = exact_search(searcher.rows, queries, K)[0]
    exact_seconds = time.perf_counter() - started
    recall = np.mean([len(set(found) & set(truth)) / K for found, truth in zip(approximate, exact, strict=True)])
    return {
        "open_seconds": opened,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p95_ms": 1000 * float(np.percentile(latencies, 95)),
        "queries_per_second": QUERIES / batch,
        "exact_queries_per_second": QUERIES / exact_seconds,
        "recall_at_10": float(recall),
    }


def run_step(name: str, root: str, folder: str) -> dict:
    """Run a step in a fresh process; its result with the process's peak RSS and CPU seconds."""
    command = [sys.executable, __file__, "--step", name, "--root", root, "--folder", folder]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"the {name} step failed (exit {process.returncode}): see its error above")
    result = json.loads(output.strip().splitlines()[-1])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    return result


def measure(size: int, storage: str) -> dict:
    """Write a set of `size` rows, then build, grow by 1% and query its index, each step in a fresh process."""
    root = os.path.join(storage, str(size))
    shutil.rmtree(root, ignore_errors=True)
    mixture, records = Mixture(), []
    started = time.perf_counter()
    folder = write_shards(root, mixture, 0, size, records)
    written = time.perf_counter() - started
    log(f"{size:,} rows written in {written:.0f} s; building the index")
    build = run_step("build", root, folder)
    assert (build["change"], build["added"]) == ("rebuilt", size), build
    log(f"built in {build['seconds']:.0f} s; adding 1%")
    grow = math.ceil(size / 100)
    write_shards(root, mixture, size, grow, records)
    add = run_step("add", root, folder)
    assert (add["change"], add["added"]) == ("added", grow), add
    log(f"added in {add['seconds']:.0f} s; querying")
    query = run_step("query", root, folder)
    shutil.rmtree(root, ignore_errors=True)
    return {
        "vectors": size,
        "write_seconds": round(written, 1),
        "build_seconds": round(build["seconds"], 1),
        "build_cpu_seconds": round(build["cpu_seconds"], 1),
        "build_peak_rss_mib": round(build["peak_rss_mib"]),
        "added": grow,
        "add_seconds": round(add["seconds"], 1),
        "add_cpu_seconds": round(add["cpu_seconds"], 1),
        "add_peak_rss_mib": round(add["peak_rss_mib"]),
        "file_mib": round(add["file_bytes"] / 2**20),
        "open_seconds": round(query["open_seconds"], 2),
        "p50_ms": round(query["p50_ms"], 2),
        "p95_ms": round(query["p95_ms"], 2),
        "queries_per_second": round(query["queries_per_second"]),
        "exact_queries_per_second": round(query["exact_queries_per_second"], 1),
        "recall_at_10": round(query["recall_at_10"], 4),
        "query_peak_rss_mib": round(query["peak_rss_mib"]),
        "wall_seconds": round(time.perf_counter() - started),
    }


def extrapolate(measured: dict, size: int) -> dict:
    """`size`'s figures from a measured size's: time per vector and latency grow with ln n, bytes linearly."""
    n = measured["vectors"]
    linear, logarithmic = size / n, math.log(size) / math.log(n)
    grow = math.ceil(size / 100)

    def memory(key: str) -> int:
        return round(measured[key] + (linear - 1) * measured["file_mib"])

    return {
        "vectors": size,
        "extrapolated": f"from {n:,} measured vectors: time per vector and latency x ln n, file and memory linear",
        "build_seconds": round(measured["build_seconds"] * linear * logarithmic, 1),
        "build_cpu_seconds": round(measured["build_cpu_seconds"] * linear * logarithmic, 1),
        "build_peak_rss_mib": memory("build_peak_rss_mib"),
        "added": grow,
        "add_seconds": round(measured["add_seconds"] * grow / measured["added"] * logarithmic, 1),
        "add_cpu_seconds": round(measured["add_cpu_seconds"] * grow / measured["added"] * logarithmic, 1),
        "add_peak_rss_mib": memory("add_peak_rss_mib"),
        "file_mib": round(measured["file_mib"] * linear),
        "p50_ms": round(measured["p50_ms"] * logarithmic, 2),
        "p95_ms": round(measured["p95_ms"] * logarithmic, 2),
        "queries_per_second": round(measured["queries_per_second"] / logarithmic),
        "recall_at_10": None,
        "query_peak_rss_mib": memory("query_peak_rss_mib"),
    }


def log(message: str) -> None:
    print(f"{datetime.now(timezone.utc):%H:%M:%S} {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--deadline", help="UTC HH:MM: sizes that would end later are extrapolated, not run")
    parser.add_argument("--storage", default=os.path.join(tempfile.gettempdir(), "audit-index-bench"))
    parser.add_argument("--step", choices=["build", "add", "query"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.step:
        print(json.dumps(step(arguments)))
        return
    deadline = None
    if arguments.deadline:
        hours, minutes = (int(part) for part in arguments.deadline.split(":"))
        deadline = datetime.now(timezone.utc).replace(hour=hours, minute=minutes, second=0).timestamp()
    last: dict | None = None
    for size in sorted(arguments.sizes):
        if last is not None and deadline is not None:
            expected = last["wall_seconds"] * size / last["vectors"] * math.log(size) / math.log(last["vectors"])
            if time.time() + expected > deadline:
                log(f"{size:,} rows would take about {expected / 60:.0f} min, past the deadline: extrapolated")
                result = extrapolate(last, size)
                record("audit_index", {"benchmark": "audit index (usearch HNSW, f16, cosine)", "dimension": DIMENSION} | result)
                continue
        last = measure(size, arguments.storage)
        record("audit_index", {"benchmark": "audit index (usearch HNSW, f16, cosine)", "dimension": DIMENSION} | last)
    log(f"parent peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()

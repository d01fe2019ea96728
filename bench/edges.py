"""Benchmark: peak memory of hostile-but-admitted inputs, each read in a fresh process.

    .venv/bin/python bench/edges.py [--baseline-checkout /tmp/old] [--work /tmp/edges]

Writes three inputs once (under --work): a 10,000 x 10,000 16-bit grayscale PNG and an RGBA PNG of the same size
(both just under the 100-megapixel cap, a few hundred KB on disk), and Parquet tables whose one row group holds
300 MB of images (over the 256 MiB cap) and 200 MB (under it). Each checkout then decodes each PNG to 224 px
(`decode_image`) and reads one row of the table
(`ParquetSource.read_items`) in its own process; the peak resident memory above the process's size after its
imports is recorded in bench/results/edges.jsonl. `--baseline-checkout` runs an older checkout of this repository
(e.g. `git worktree add /tmp/old <commit>`) on the same files in the same run, so before and after are one run.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_log import record  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
from cifar_transfer.sources.images import decode_image, UndecodableImage
from cifar_transfer.sources.parquet import ParquetSource
from cifar_transfer.sources.base import Item
def peak_kib():  # VmHWM: this process's own peak (ru_maxrss carries the forking parent's peak across exec)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
kind, path = sys.argv[1], sys.argv[2]
base = peak_kib()
started = time.perf_counter()
outcome = "ok"
if kind == "png":
    with open(path, "rb") as stream:
        data = stream.read()
    try:
        decode_image(data, 224)
    except UndecodableImage as error:
        outcome = "refused: " + error.reason
else:
    source = ParquetSource(path, test_fraction=0.5)
    listing = source.list_items()
    item = (listing.splits["train"] + listing.splits["test"])[0]
    (_, data, reason), = source.read_items([item])
    outcome = "ok" if data is not None else "refused: " + reason
peak = peak_kib()
print("RESULT " + json.dumps({"peak_above_imports_mib": round((peak - base) / 1024, 1), "peak_rss_mib": round(peak / 1024, 1),
                              "seconds": round(time.perf_counter() - started, 2), "outcome": outcome}))
"""


def write_inputs(work: Path) -> dict[str, Path]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    work.mkdir(parents=True, exist_ok=True)
    inputs = {
        "png-16bit-100mp": work / "gray16.png",
        "png-rgba-100mp": work / "rgba.png",
        "parquet-300mb-row-group": work / "big.parquet",
        "parquet-200mb-row-group": work / "under-cap.parquet",
    }
    side = 10_000 - 1  # 99,980,001 pixels: within the 100-megapixel cap
    if not inputs["png-16bit-100mp"].exists():
        gradient = (np.arange(side, dtype=np.uint32) * 6 % 65536).astype(np.uint16)
        Image.fromarray(np.broadcast_to(gradient, (side, side)).copy()).save(inputs["png-16bit-100mp"])
    if not inputs["png-rgba-100mp"].exists():
        Image.new("RGBA", (side, side), (40, 120, 200, 128)).save(inputs["png-rgba-100mp"])
    for rows, name in ((300, "parquet-300mb-row-group"), (200, "parquet-200mb-row-group")):
        if inputs[name].exists():
            continue
        rng = np.random.default_rng(0)
        small = io.BytesIO()
        Image.new("RGB", (32, 32), (1, 2, 3)).save(small, format="PNG")
        padded = [small.getvalue() + rng.bytes(1_000_000) for _ in range(rows)]  # a PNG with 1 MB of trailing bytes each
        table = pa.table(
            {"image": pa.array([{"bytes": cell, "path": None} for cell in padded]), "label": pa.array([i % 2 for i in range(rows)])}
        )
        pq.write_table(table, inputs[name], row_group_size=rows, compression="none")  # one row group
    return inputs


def measure(checkout: Path, kind: str, path: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(path)],
        cwd=checkout,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(checkout), "PATH": "/usr/bin:/bin"},
    )
    line = next((line for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
    if line is None:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-checkout", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cifar-transfer-edges"))
    arguments = parser.parse_args()
    inputs = write_inputs(arguments.work)
    checkouts = {"now": REPO} | ({"before": arguments.baseline_checkout} if arguments.baseline_checkout else {})
    results = {}
    for name, path in inputs.items():
        kind = "png" if name.startswith("png") else "parquet"
        results[name] = {label: measure(checkout, kind, path) for label, checkout in checkouts.items()}
        results[name]["file_mb"] = round(path.stat().st_size / 1e6, 2)
    record("edges", {"inputs": results})


if __name__ == "__main__":
    main()

"""Where benchmarks write: one JSON line per run under bench/results/, also printed."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# The CPU features the engine choice and the matrix kernels depend on, as /proc/cpuinfo names them.
CPU_FEATURES = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def record(name: str, result: dict) -> None:
    """Append `result`, stamped with the time and the machine, to bench/results/<name>.jsonl and print it. The machine
    names its CPU and the OpenBLAS kernels in use: sessions run on different machines (an AMX Xeon, a Zen 5 EPYC whose
    environment pins OpenBLAS to its Haswell kernels), and their rows share these files."""
    from cifar_transfer.hardware import blas_kernels, cpu_flags, cpu_model

    stamped = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "cpu": cpu_model(),
        "cpu_features": sorted(cpu_flags() & set(CPU_FEATURES)),
        "blas_kernels": blas_kernels(),
    }
    stamped |= result
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / f"{name}.jsonl").open("a") as stream:
        stream.write(json.dumps(stamped) + "\n")
    print(json.dumps(stamped, indent=2))

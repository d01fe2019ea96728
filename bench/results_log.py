"""Where benchmarks write: one JSON line per run under bench/results/, also printed."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def record(name: str, result: dict) -> None:
    """Append `result`, stamped with the time and the machine, to bench/results/<name>.jsonl and print it."""
    stamped = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    stamped |= result
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / f"{name}.jsonl").open("a") as stream:
        stream.write(json.dumps(stamped) + "\n")
    print(json.dumps(stamped, indent=2))

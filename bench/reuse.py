"""Check: what an older checkout stored (feature sets, t-SNE maps, heads) is reused by this one, nothing recomputed.

    git worktree add /tmp/old 8ca91ae
    .venv/bin/python bench/reuse.py --old /tmp/old

Gives the old checkout a virtual environment that shares this one's packages (only the project's code differs),
writes two small sources from ../shared/data (an archive of 600 CIFAR-10 images in the official layout, and a
folder of 300 PNG files, one folder per class), and runs `cifar-transfer run` on each: first with the old code,
then with this code on the same storage. Every stored file's bytes and modification time are compared before and
after the second run. Records per source: the files the old run wrote, the ones the new run rewrote or added, and
the new run's own account of its extraction plan, map and head, to bench/results/reuse.jsonl (and prints it).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import pickle
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_log import record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_1.00_224_imagenet_no_top.weights.h5"
OPTIONS = ["--backbone", "MobileNetV2", "--weights", str(WEIGHTS), "--input-size", "32", "--shard-size", "100"]
OPTIONS += ["--tsne-sample", "200", "--engine", "openvino", "--precision", "float32"]


def checkout_python(checkout: Path) -> str:
    """A Python for `checkout`: its own environment, sharing this one's installed packages."""
    venv = checkout / ".venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        site = next((venv / "lib").glob("python3*/site-packages"))
        (site / "shared-packages.pth").write_text(next(p for p in sys.path if p.endswith("site-packages")) + "\n")
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", str(checkout), "--no-deps", "--no-build-isolation"], check=True)
    return str(python)


@functools.cache
def _batch(member: str) -> dict:
    with tarfile.open(SHARED / "cifar-10-python.tar.gz") as archive:
        return pickle.load(archive.extractfile(f"cifar-10-batches-py/{member}"), encoding="bytes")


def cifar_rows(member: str, count: int) -> tuple[np.ndarray, list[int]]:
    batch = _batch(member)
    return batch[b"data"][:count], list(batch[b"labels"][:count])


def write_archive(path: Path) -> None:
    """600 images in the official layout: 100 in each training batch, 100 in the test batch."""
    with tarfile.open(SHARED / "cifar-10-python.tar.gz") as archive:
        members = {"batches.meta": archive.extractfile("cifar-10-batches-py/batches.meta").read()}
    data, labels = cifar_rows("data_batch_1", 500)
    for number in range(5):
        rows = slice(100 * number, 100 * (number + 1))
        members[f"data_batch_{number + 1}"] = pickle.dumps({b"data": data[rows], b"labels": labels[rows]}, protocol=2)
    data, labels = cifar_rows("test_batch", 100)
    members["test_batch"] = pickle.dumps({b"data": data, b"labels": labels}, protocol=2)
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))


def write_folder(root: Path) -> None:
    from PIL import Image

    data, labels = cifar_rows("test_batch", 300)
    for number, (row, label) in enumerate(zip(data, labels, strict=True)):
        folder = root / f"class-{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(row.reshape(3, 32, 32).transpose(1, 2, 0)).save(folder / f"{number:04d}.png")


def stored_files(storage: Path) -> dict[str, tuple[str, int]]:
    """Every file under the storage root (the Prefect and claim bookkeeping aside): its SHA-256 and mtime."""
    found = {}
    for path in storage.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            found[str(path.relative_to(storage))] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return found


def run(python: str, source_options: list[str], storage: Path) -> str:
    command = [python, "-m", "cifar_transfer.flows.cli", "run", *source_options, "--storage", str(storage), *OPTIONS]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="a checkout of the older code (git worktree add ...)")
    parser.add_argument("--work", type=Path, default=None, help="where the sources and storage go (default: a temporary folder)")
    arguments = parser.parse_args()
    old_python, new_python = checkout_python(arguments.old.resolve()), sys.executable
    old_commit = subprocess.run(["git", "-C", str(arguments.old), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    new_commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    work = arguments.work or Path(tempfile.mkdtemp(prefix="cifar-transfer-reuse-"))
    work.mkdir(parents=True, exist_ok=True)
    write_archive(work / "small.tar.gz")
    write_folder(work / "folder")
    sources = {"archive": ["--source", str(work / "small.tar.gz"), "--md5", "none"], "folder": ["--source", str(work / "folder")]}
    results = {}
    for name, source_options in sources.items():
        storage = work / f"storage-{name}"
        run(old_python, source_options, storage)
        before = stored_files(storage)
        log = run(new_python, source_options, storage)
        after = stored_files(storage)
        plan = re.search(r"extraction plan: (\d+) of (\d+) shards already done.*?(\d+) to compute", log)
        results[name] = {
            "files_written_by_old": len(before),
            "rewritten": sorted(path for path in before if path in after and after[path] != before[path]),
            "added": sorted(path for path in after if path not in before),
            "removed": sorted(path for path in before if path not in after),
            "shards_reused": f"{plan.group(1)} of {plan.group(2)}" if plan else None,
            "shards_computed": int(plan.group(3)) if plan else None,
        }
    record("reuse", {"old": old_commit.strip(), "new": new_commit.strip(), "sources": results})


if __name__ == "__main__":
    main()

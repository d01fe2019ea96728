"""Huge-page advice: numpy stops advising huge pages where the kernel would compact memory while the thread waits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cifar_transfer.hardware import STALLING_DEFRAG, THP_DEFRAG

# A fresh interpreter: the call, then what numpy and a process started after it see.
PROBE = """
import json, os, subprocess, sys
from numpy._core.multiarray import _get_madvise_hugepage
from cifar_transfer.hardware import avoid_huge_page_stalls
changed = avoid_huge_page_stalls(sys.argv[1])
child = subprocess.run(
    [sys.executable, "-c", "from numpy._core.multiarray import _get_madvise_hugepage as g; print(g())"],
    capture_output=True, text=True, check=True,
).stdout.strip()
print(json.dumps({"changed": changed, "advised": _get_madvise_hugepage(), "child_advised": child == "True"}))
"""


def probe(defrag: Path, **environment: str) -> dict:
    env = {name: value for name, value in os.environ.items() if name != "NUMPY_MADVISE_HUGEPAGE"} | environment
    done = subprocess.run([sys.executable, "-c", PROBE, str(defrag)], capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("chosen", ["madvise", "defer+madvise", "always"])
def test_numpy_stops_advising_huge_pages_where_the_kernel_compacts_for_them(tmp_path, chosen):
    defrag = tmp_path / "defrag"
    settings = ("always", "defer", "defer+madvise", "madvise", "never")
    defrag.write_text(" ".join(f"[{name}]" if name == chosen else name for name in settings))
    assert probe(defrag) == {"changed": True, "advised": False, "child_advised": False}


@pytest.mark.parametrize("setting", ["always defer defer+madvise madvise [never]", "always [defer] defer+madvise madvise never", None])
def test_numpy_keeps_its_advice_where_faults_do_not_wait(tmp_path, setting):
    defrag = tmp_path / "defrag"  # None: no such setting (not Linux, or a kernel without transparent huge pages)
    if setting is not None:
        defrag.write_text(setting)
    assert probe(defrag) == {"changed": False, "advised": True, "child_advised": True}


def test_a_users_own_setting_is_left_to_numpy(tmp_path):
    defrag = tmp_path / "defrag"
    defrag.write_text("always defer defer+madvise [madvise] never")
    assert probe(defrag, NUMPY_MADVISE_HUGEPAGE="1") == {"changed": False, "advised": True, "child_advised": True}


@pytest.mark.parametrize("entry", ["cifar_transfer.flows.cli", "cifar_transfer.flows.pipeline"])
def test_the_command_line_and_a_flow_run_process_follow_this_machines_setting(entry):
    """What the command line and a deployment's flow-run process do once they import their module, by this machine's
    own kernel setting."""
    try:
        chosen = Path(THP_DEFRAG).read_text().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        chosen = None
    env = {name: value for name, value in os.environ.items() if name != "NUMPY_MADVISE_HUGEPAGE"}
    code = f"import {entry}; from numpy._core.multiarray import _get_madvise_hugepage as g; print(g())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip().splitlines()[-1] == str(chosen not in STALLING_DEFRAG)

"""Helpers of the adversarial suite: attack submissions, their reports, evaluators run as separate
processes, and the traces a run can leave on the host (processes, cgroups, mounts)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from conftest import leftovers, mount_points_under, processes_with, write_submission  # noqa: F401 (shared with the suite)

from evaluator.paths import HOME

SUBMISSIONS = Path(__file__).parent / "submissions"
ATTACK_KIT = SUBMISSIONS / "attack_kit.py"
TRACKS_DIR = HOME / "spec" / "tracks"
# Interpreter start and `import torch` before the clock, plus scoring and teardown, on a busy 2-core box.
STARTUP_SLACK_S = 25


def attack_submission(parent: Path, name: str, body: str, config: dict | None = None) -> Path:
    """A submission whose train.py is TINY_MODEL plus submissions/<body>.py, with attack_kit.py beside it.

    Every attack gets `tracks_dir` in its config: the path that must not exist inside the jail.
    """
    source = (SUBMISSIONS / f"{body}.py").read_text()
    folder = write_submission(parent, name, source, {"tracks_dir": str(TRACKS_DIR), **(config or {})})
    shutil.copyfile(ATTACK_KIT, folder / ATTACK_KIT.name)
    return folder


def probe_report(run_dir: Path) -> dict:
    """The findings an attack raised as "PROBE {...}", read back from the run's captured log."""
    log = (run_dir / "train.log").read_text(errors="replace")
    reports = re.findall(r"^RuntimeError: PROBE (\{.*\})$", log, re.MULTILINE)
    assert reports, f"the attack reported nothing; end of its log:\n{log[-3000:]}"
    return json.loads(reports[-1])


def start_evaluator(folder: Path, out: Path, *extra: str, **popen_options) -> subprocess.Popen:
    """`evaluator run --json` with the real nsjail, as a process of its own (to kill it, or run two)."""
    argv = [
        sys.executable,
        "-m",
        "evaluator.cli",
        "run",
        str(folder),
        "--out",
        str(out),
        "--json",
        "--sandbox",
        "nsjail",
        *extra,
    ]
    return subprocess.Popen(argv, cwd=HOME, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen_options)


def finish(evaluator: subprocess.Popen, timeout: float) -> dict:
    """Waits for an evaluator from start_evaluator and returns the record it printed."""
    out, err = evaluator.communicate(timeout=timeout)
    try:
        return json.loads(out)
    except ValueError:
        raise AssertionError(f"no record (exit {evaluator.returncode}):\n{out.decode()}\n{err.decode()}") from None


def wait_for(condition: Callable[[], object], timeout: float, what: str):
    """Polls until condition() is truthy and returns its value; fails the test after timeout."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(0.05)
    return value


def only_run_dir(runs_dir: Path) -> Path | None:
    entries = list(runs_dir.iterdir()) if runs_dir.exists() else []
    return entries[0] if len(entries) == 1 else None

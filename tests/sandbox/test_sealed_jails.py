"""Sealed jails: a memory image (Sandbox.memory_image, evaluator/sandbox/mounts.py) instead of the
host's files, its mount's life and its reaping."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import pytest
from sandbox_support import SHELL_PATH, make_spec, run_to_end

from evaluator.sandbox import mounts, reap_stale
from evaluator.sandbox.nsjail import _DEVICE_NODES

# The slow tier (`make test-fast` leaves it out): every test here builds a memory image.
pytestmark = pytest.mark.slow


SEALED_PROBE = r'''
import ctypes, errno, json, mmap, os, socket, sys

import numpy
import torch

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.syscall.argtypes = [ctypes.c_long] * 7  # the number and six arguments, all whole registers
results = {"torch": float(torch.ones(4, 4).sum()), "numpy": int(numpy.arange(5).sum())}


def outcome(function):
    """'ok', or the errno name of an OSError or of a -1 return."""
    ctypes.set_errno(0)
    try:
        value = function()
    except OSError as error:
        return errno.errorcode.get(error.errno, str(error.errno))
    if value == -1:
        return errno.errorcode.get(ctypes.get_errno(), "?")
    return "ok"


mounts = []
for line in open("/proc/self/mountinfo"):
    fields, _, tail = line.partition(" - ")
    mounts.append([fields.split()[4], tail.split()[0]])
results["mounts"] = mounts

for directory in ["/", "/tmp", "/dev/shm", "/dev", "/work", os.getcwd()]:
    results["create " + directory] = outcome(lambda: open(os.path.join(directory, "new-file"), "x"))
writable = []
for top, dirs, _ in os.walk("/"):
    if top == "/":
        dirs[:] = [d for d in dirs if d not in ("proc", "sys")]
    if os.access(top, os.W_OK):
        writable.append(top)
results["writable dirs"] = writable

fd = os.open(__file__, os.O_RDONLY)
results["fadvise"] = outcome(lambda: os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED))
results["preadv"] = outcome(lambda: os.preadv(fd, [bytearray(16)], 0))
results["preadv2 nowait"] = outcome(lambda: os.preadv(fd, [bytearray(16)], 0, os.RWF_NOWAIT))
results["readahead"] = outcome(lambda: libc.readahead(fd, ctypes.c_long(0), ctypes.c_size_t(4096)))
results["cachestat"] = outcome(lambda: libc.syscall(451, fd, 0, 0, 0, 0, 0))
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
page = mmap.PAGESIZE
file_mapping = libc.mmap(None, page, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)  # of the probe itself
vector = ctypes.create_string_buffer(1)
results["mincore"] = outcome(lambda: libc.mincore(file_mapping, page, vector))
results["madvise pageout"] = outcome(lambda: libc.madvise(file_mapping, page, 21))  # MADV_PAGEOUT
results["madvise cold"] = outcome(lambda: libc.madvise(file_mapping, page, 20))  # MADV_COLD
# The kernel reads advice as an int: bits above 32 must not slip past the filter.
results["madvise pageout high bits"] = outcome(lambda: libc.syscall(28, file_mapping, page, (1 << 32) | 21, 0, 0, 0))
results["madvise willneed"] = outcome(lambda: libc.madvise(file_mapping, page, mmap.MADV_WILLNEED))
results["io_uring_setup"] = outcome(lambda: libc.syscall(425, 1, 0, 0, 0, 0, 0))
results["shmget"] = outcome(lambda: libc.shmget(0, 4096, 0o1000 | 0o600))
results["semget"] = outcome(lambda: libc.semget(0, 1, 0o1000 | 0o600))
results["msgget"] = outcome(lambda: libc.msgget(0, 0o1000 | 0o600))
results["socket"] = outcome(lambda: socket.socket())
results["socketpair"] = outcome(lambda: socket.socketpair())

# A non-dumpable parent, as the model server's pre-forked one: its child must not find it.
libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
parent = os.getpid()
read_end, write_end = os.pipe()
child = os.fork()
if child == 0:
    seen = {
        "listed": str(parent) in os.listdir("/proc"),
        "exists": os.path.exists(f"/proc/{parent}"),
        "mem": outcome(lambda: open(f"/proc/{parent}/mem", "rb")),
        "self": os.path.exists("/proc/self/status"),
    }
    os.write(write_end, json.dumps(seen).encode())
    os._exit(0)
os.close(write_end)
results["child"] = json.loads(os.read(read_end, 1 << 16))
os.waitpid(child, 0)
print(json.dumps(results))
'''


def test_a_sealed_jail_sees_only_its_memory_image(nsjail, tmp_path):
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    (probe_dir / "probe.py").write_text(SEALED_PROBE)
    with nsjail.memory_image([probe_dir], gpu=False) as image:
        spec = make_spec(
            tmp_path,
            [sys.executable, "-P", "-B", str(probe_dir / "probe.py")],
            cwd=probe_dir,
            env={**SHELL_PATH, "OMP_NUM_THREADS": "1", "HOME": "/tmp"},
            memory_bytes=2 << 30,
            time_limit_s=120,
            sealed_image=image,
        )
        output, outcome = run_to_end(nsjail, spec)
    assert outcome.reason == "exited" and outcome.returncode == 0, spec.log_path.read_text()
    results = json.loads(output)
    assert results["torch"] == 16.0 and results["numpy"] == 10
    device_nodes = set(_DEVICE_NODES)
    others = [(point, fstype) for point, fstype in results["mounts"] if point not in device_nodes]
    assert {fstype for _, fstype in others} == {"tmpfs", "proc"}, results["mounts"]
    assert {point for point, _ in results["mounts"]} >= device_nodes
    for directory in ["/", "/tmp", "/dev/shm", "/dev", "/work", str(probe_dir)]:
        assert results[f"create {directory}"] in ("EROFS", "ENOENT", "EACCES"), directory
    assert results["writable dirs"] == []
    assert results["preadv"] == results["madvise willneed"] == "ok"
    for denied in (
        "fadvise",
        "preadv2 nowait",
        "readahead",
        "cachestat",
        "mincore",
        "madvise pageout",
        "madvise cold",
        "madvise pageout high bits",
        "io_uring_setup",
        "shmget",
        "semget",
        "msgget",
        "socket",
        "socketpair",
    ):
        assert results[denied] == "EPERM", (denied, results[denied])
    assert results["child"] == {"listed": False, "exists": False, "mem": "ENOENT", "self": True}
    assert not image.exists()  # detached and removed at the end of the block


def test_the_image_is_detached_and_removed_even_when_the_block_fails(nsjail, tmp_path):
    (tmp_path / "extra.txt").write_text("x")
    with pytest.raises(RuntimeError, match="inside"):
        with nsjail.memory_image([tmp_path / "extra.txt"], gpu=False, parent=tmp_path) as image:
            assert (image / str(tmp_path / "extra.txt").lstrip("/")).read_text() == "x"
            assert str(image) in [point for point, _ in mounts._image_mounts()]
            with pytest.raises(OSError):
                (image / "new").write_text("the image is read-only, even for root")
            raise RuntimeError("inside")
    assert not image.exists() and str(image) not in [point for point, _ in mounts._image_mounts()]


def test_unsandboxed_memory_image_is_none(unsandboxed):
    with unsandboxed.memory_image([], gpu=False) as image:
        assert image is None


def test_reap_stale_detaches_an_image_whose_evaluator_is_gone(nsjail, tmp_path):
    gone = subprocess.Popen(["/bin/true"])
    gone.wait()
    dead_point, live_point = tmp_path / "dead-image", tmp_path / "live-image"
    dead_point.mkdir()
    live_point.mkdir()
    mounts._libc_call(
        "mount",
        f"{mounts._IMAGE_MOUNT_SOURCE}@{gone.pid}.1".encode(),
        str(dead_point).encode(),
        b"tmpfs",
        ctypes.c_ulong(0),
        b"size=1m",
    )
    mounts.mount_image_tmpfs(live_point, 1 << 20, 16)
    try:
        reaped = reap_stale()
        assert str(dead_point) in reaped and str(live_point) not in reaped
        assert not dead_point.exists()  # the mount point of an image is its own: removed too
        points = {point for point, _ in mounts._image_mounts()}
        assert str(live_point) in points and str(dead_point) not in points
    finally:
        for point in (dead_point, live_point):
            if point in {Path(p) for p, _ in mounts._image_mounts()}:
                mounts.detach(point)

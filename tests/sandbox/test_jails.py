"""Running jails (evaluator/sandbox/jailed.py) with the real nsjail (skipped where it cannot run)
and in `--sandbox none` mode: pipes, environment, identity, filesystem, seccomp, limits, kills."""

from __future__ import annotations

import gc
import json
import signal
import socket
import time
import uuid
from pathlib import Path

import pytest
from conftest import processes_with
from sandbox_support import (
    SHELL_PATH,
    cgroup_dirs,
    make_spec,
    python,
    run_to_end,
    sleeper,
    wait_for_members,
)

from evaluator import paths
from evaluator.sandbox import JAIL_HOSTNAME, backends
from evaluator.sandbox.nsjail import nsjail_config


def test_pipes_round_trip_and_stderr_goes_to_the_log(nsjail, tmp_path):
    code = "import sys; sys.stdout.write(sys.stdin.read().upper()); sys.stderr.write('oops\\n')"
    spec = make_spec(tmp_path, python(code))
    output, outcome = run_to_end(nsjail, spec, stdin=b"hello jail\n")
    assert output == b"HELLO JAIL\n"
    assert (outcome.reason, outcome.returncode) == ("exited", 0)
    # Only the child's stderr: the dynamic loader's warnings about nsjail's libnl are dropped.
    assert spec.log_path.read_text() == "oops\n"


@pytest.mark.parametrize("box_name", ["nsjail", "unsandboxed"])
def test_environment_is_exactly_spec_env(box_name, request, tmp_path):
    box = request.getfixturevalue(box_name)
    env = {"PATH": "/usr/bin:/bin", "MARKER": "two words"}
    # The environment the process was started with (Python's locale coercion adds LC_CTYPE later).
    code = "import sys; sys.stdout.buffer.write(open('/proc/self/environ', 'rb').read())"
    output, outcome = run_to_end(box, make_spec(tmp_path, python(code), env=env))
    assert outcome.reason == "exited"
    assert dict(entry.split("=", 1) for entry in output.decode().split("\0") if entry) == env


def test_runs_as_nobody_with_its_own_hostname_and_few_devices(nsjail, tmp_path):
    code = "import os, socket; print(os.getuid(), os.getgid(), socket.gethostname(), *os.listdir('/dev'))"
    output, _ = run_to_end(nsjail, make_spec(tmp_path, python(code)))
    uid, gid, hostname, *devices = output.decode().split()
    assert (uid, gid, hostname) == ("65534", "65534", JAIL_HOSTNAME)
    assert set(devices) == {"null", "zero", "urandom", "random", "shm"}


def test_no_network(nsjail, tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        code = (
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=3); print('connected')\n"
            "except OSError as error:\n"
            "    print(type(error).__name__)\n"
        )
        output, _ = run_to_end(nsjail, make_spec(tmp_path, python(code)))
        refusals = ("ConnectionRefusedError", "OSError", "TimeoutError")
        assert output.decode().strip() in refusals, output
        with pytest.raises(socket.timeout):
            listener.accept()


def test_filesystem_is_only_what_the_spec_mounts(nsjail, tmp_path):
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    canary = hidden / "canary.txt"
    canary.write_text("secret")
    read_only, writable = tmp_path / "ro", tmp_path / "rw"
    read_only.mkdir()
    writable.mkdir()
    (read_only / "data.txt").write_text("visible")
    checks = {
        "canary": f"open({str(canary)!r}).read()",
        "spec_dir": f"os.listdir({str(paths.SPEC_DIR)!r})",
        "read_ro": f"open({str(read_only / 'data.txt')!r}).read()",
        "write_ro": f"open({str(read_only / 'new.txt')!r}, 'w').write('x')",
        "write_usr": "open('/usr/new.txt', 'w').write('x')",
        "write_root": "open('/new.txt', 'w').write('x')",
        "write_rw": f"open({str(writable / 'out.txt')!r}, 'w').write('written')",
        "write_tmp": "open('/tmp/scratch.txt', 'w').write('x')",
    }
    code = (
        "import errno, json, os\nresults = {}\n"
        + "".join(
            f"try:\n    results[{name!r}] = repr({expression})\n"
            f"except OSError as error:\n    results[{name!r}] = errno.errorcode[error.errno]\n"
            for name, expression in checks.items()
        )
        + "print(json.dumps(results))\n"
    )
    spec = make_spec(tmp_path, python(code), ro_paths=[read_only], rw_paths=[writable])
    output, outcome = run_to_end(nsjail, spec)
    assert outcome.reason == "exited", spec.log_path.read_text()
    results = json.loads(output)
    assert results["canary"] == results["spec_dir"] == "ENOENT"
    assert results["read_ro"] == "'visible'"
    for refused in ("write_ro", "write_usr", "write_root"):
        assert results[refused] in ("EROFS", "EACCES")
    assert results["write_rw"] == "7" and (writable / "out.txt").read_text() == "written"
    assert results["write_tmp"] == "1"


def test_a_hidden_path_inside_a_bound_dir_is_an_empty_read_only_mount(nsjail, tmp_path):
    # Inside a directory the jail binds whole (a distribution's package, where an installed package
    # keeps its data), reached once through a symlink: a nested hidden path and the link both land
    # on the one outermost mount. A path no mount shows needs none.
    site = Path(sysconfig_purelib())
    hidden = site / "torch" / "utils" / "benchmark"
    link = tmp_path / "benchmark-link"
    link.symlink_to(hidden)
    spec = make_spec(
        tmp_path,
        python(
            f"import os, sys; print(os.listdir({str(hidden)!r}), "
            f"len(os.listdir({str(site / 'torch' / 'utils')!r})) > 10); "
            f"open({str(hidden / 'planted')!r}, 'w')"
        ),
        hidden_paths=[link, hidden / "__init__.py", site / "rich", tmp_path / "not-bound"],
    )
    config = nsjail_config(spec, tmp_path / "log")
    covers = [m.dst for m in config.mount if m.fstype == "tmpfs" and not m.rw]
    assert [c for c in covers if c.startswith((str(site), str(tmp_path)))] == [str(hidden)]
    output, outcome = run_to_end(nsjail, spec)
    assert output.decode().strip() == "[] True"  # empty, and the rest of the package is there
    assert outcome.returncode == 1 and "Read-only file system" in spec.log_path.read_text()
    with pytest.raises(ValueError, match="holds paths the jail is given"):
        nsjail.start(make_spec(tmp_path, ["/bin/true"], ro_paths=[hidden / "__init__.py"], hidden_paths=[hidden]))


def sysconfig_purelib() -> str:
    import sysconfig

    return sysconfig.get_paths()["purelib"]


SYSFS_PROBE = """
import json, os
seen = {"entries": sorted(os.listdir("/sys")) if os.path.isdir("/sys") else []}
if seen["entries"]:
    seen["cgroupfs"] = os.listdir("/sys/fs/cgroup")
    seen["net"] = sorted(os.listdir("/sys/class/net"))
    seen["numa"] = os.path.isdir("/sys/devices/system/node")
    try:
        open("/sys/kernel/mm/transparent_hugepage/enabled", "w").write("never")
        seen["write"] = "written"
    except OSError as error:
        seen["write"] = error.strerror
print(json.dumps(seen))
"""


def test_a_gpu_jail_gets_a_fresh_read_only_sysfs_and_a_cpu_jail_none(nsjail, tmp_path):
    cpu_output, _ = run_to_end(nsjail, make_spec(tmp_path, python(SYSFS_PROBE)))
    assert json.loads(cpu_output) == {"entries": []}

    # This host has no GPU: the GPU jail's configuration, less its /dev/nvidia* binds.
    spec = make_spec(tmp_path, python(SYSFS_PROBE), gpu_index=0, gpu_device_nodes=False)
    output, outcome = run_to_end(nsjail, spec)
    assert outcome.reason == "exited", spec.log_path.read_text()
    seen = json.loads(output)
    assert {"bus", "devices", "module"} <= set(seen["entries"]) and seen["numa"]
    assert seen["cgroupfs"] == []  # the host's cgroup mounts stay out of sight
    assert seen["net"] == ["lo"]  # the jail's own network namespace
    assert seen["write"] == "Read-only file system"


def test_seccomp_policy_is_loaded(nsjail, tmp_path):
    code = (
        "import ctypes, errno, threading\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "def errno_of(result):\n"
        "    return errno.errorcode.get(ctypes.get_errno(), '?') if result == -1 else 'allowed'\n"
        "print('unshare', errno_of(libc.unshare(0x10000000)))\n"
        "print('clone3', errno_of(libc.syscall(435, 0, 0)))\n"
        "print('clone_newuser', errno_of(libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)))\n"
        "print('ptrace', errno_of(libc.ptrace(16, 1, 0, 0)))\n"
        "print('mount', errno_of(libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)))\n"
        "worker = threading.Thread(target=print, args=('thread', 'allowed'))\n"
        "worker.start(); worker.join()\n"
    )
    output, outcome = run_to_end(nsjail, make_spec(tmp_path, python(code)))
    assert outcome.reason == "exited", (tmp_path / "stderr.log").read_text()
    assert dict(line.split() for line in output.decode().splitlines()) == {
        "unshare": "EPERM",
        "clone3": "ENOSYS",
        "clone_newuser": "EPERM",
        "ptrace": "EPERM",
        "mount": "EPERM",
        "thread": "allowed",
    }


def test_time_limit(nsjail, tmp_path):
    spec = make_spec(tmp_path, sleeper(30), time_limit_s=1)
    started = time.monotonic()
    _, outcome = run_to_end(nsjail, spec)
    assert outcome.reason == "time_limit", outcome
    assert time.monotonic() - started < 1 + 2


def test_out_of_memory(nsjail, tmp_path):
    spec = make_spec(tmp_path, python("hog = 'x' * (200 << 20)"), memory_bytes=64 << 20)
    _, outcome = run_to_end(nsjail, spec)
    assert outcome.reason == "oom", outcome
    assert outcome.signal == signal.SIGKILL


def test_fork_bomb_is_contained(nsjail, tmp_path):
    marker = f"bomb-{uuid.uuid4().hex}"
    code = (
        f"# {marker}\n"
        "import os, sys, time\n"
        "for _ in range(64):\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        sys.exit(3)\n"
        "time.sleep(30)\n"
    )
    spec = make_spec(tmp_path, python(code), pids=16, time_limit_s=10)
    with nsjail.start(spec) as jail:
        jail.wait(timeout=15)
        outcome = jail.outcome()
    assert outcome.reason == "pids_limit", outcome
    assert processes_with(marker) == []


def test_stderr_is_capped_without_blocking_the_child(nsjail, tmp_path):
    code = "import sys\nfor _ in range(5000): sys.stderr.write('x' * 1000)\nsys.stderr.write('THE END\\n')"
    spec = make_spec(tmp_path, python(code), log_cap_bytes=64 << 10)
    with nsjail.start(spec) as jail:
        assert jail.wait(timeout=20) is not None, "the child blocked on a full stderr pipe"
        jail.close()
        assert jail.outcome().reason == "exited"
        assert jail.log_tail(100).endswith("THE END\n")
    assert 0 < spec.log_path.stat().st_size <= 64 << 10


def test_kill_leaves_no_process_and_no_cgroup(nsjail, tmp_path):
    code = (
        "import os, time\nfor _ in range(2):\n    if os.fork() == 0:\n        time.sleep(60)\n        os._exit(0)\n"
        "os.wait()"
    )
    jail = nsjail.start(make_spec(tmp_path, python(code)))
    try:
        members = wait_for_members(jail, 4)  # nsjail, the parent, two sleeping children
        jail.kill()
        assert jail.wait(timeout=1) is not None
    finally:
        jail.close()
    assert [pid for pid in members if Path(f"/proc/{pid}").exists()] == []
    assert not any(directory.exists() for directory in cgroup_dirs(jail))
    outcome = jail.outcome()
    assert outcome.reason == "signaled" and "evaluator" in outcome.detail


def test_setup_failure_is_a_sandbox_error(nsjail, tmp_path):
    spec = make_spec(tmp_path, ["/bin/true"], cwd=tmp_path / "not-in-the-jail")
    _, outcome = run_to_end(nsjail, spec)
    assert outcome.reason == "sandbox_error" and "chdir" in outcome.detail


@pytest.mark.slow
def test_torch_runs_in_the_jail(nsjail, tmp_path):
    code = "import torch\na = torch.ones(64, 64)\nprint(float((a @ a).sum()))"
    env = {**SHELL_PATH, "OMP_NUM_THREADS": "1", "HOME": "/tmp"}
    spec = make_spec(tmp_path, python(code), env=env, memory_bytes=2 << 30, time_limit_s=120)
    output, outcome = run_to_end(nsjail, spec)
    assert outcome.reason == "exited", spec.log_path.read_text()
    assert output.decode().strip() == str(64.0**3)


def test_a_dropped_jail_is_killed_and_cleaned(nsjail, tmp_path):
    jail = nsjail.start(make_spec(tmp_path, sleeper(60)))
    members = wait_for_members(jail, 2)
    directories = cgroup_dirs(jail)
    del jail
    gc.collect()
    assert [pid for pid in members if Path(f"/proc/{pid}").exists()] == []
    assert not any(directory.exists() for directory in directories)


FADVISE_PROBE = (
    "import errno, mmap, os, sys\n"
    "fd = os.open(sys.executable, os.O_RDONLY)\n"
    "try:\n"
    "    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); print('fadvise ok')\n"
    "except OSError as error:\n"
    "    print('fadvise', errno.errorcode[error.errno])\n"
    "mapped = mmap.mmap(-1, 1 << 20)\n"
    "mapped.madvise(mmap.MADV_DONTNEED)\n"  # what allocators do all the time: still allowed
    "import socket; socket.socket().close(); print('socket ok')\n"
)


def test_a_training_style_jail_works_as_before_but_cannot_fadvise(nsjail, tmp_path):
    output, outcome = run_to_end(nsjail, make_spec(tmp_path, python(FADVISE_PROBE)))
    assert outcome.reason == "exited" and outcome.returncode == 0, (tmp_path / "stderr.log").read_text()
    assert output.decode().split("\n")[:2] == ["fadvise EPERM", "socket ok"]


# --- --sandbox none ------------------------------------------------------------------------------


def test_unsandboxed_round_trip(unsandboxed, tmp_path):
    assert (unsandboxed.kind, unsandboxed.version) == ("none", "subprocess")
    spec = make_spec(tmp_path, python("import sys; sys.stdout.write(sys.stdin.read()[::-1])"))
    output, outcome = run_to_end(unsandboxed, spec, stdin=b"abc")
    assert (output, outcome.reason, outcome.returncode) == (b"cba", "exited", 0)


def test_unsandboxed_time_limit(unsandboxed, tmp_path):
    spec = make_spec(tmp_path, ["/bin/sleep", "30"], time_limit_s=0.5)
    started = time.monotonic()
    _, outcome = run_to_end(unsandboxed, spec)
    assert outcome.reason == "time_limit"
    assert time.monotonic() - started < 0.5 + 2


@pytest.mark.parametrize("with_cgroup", [True, False])
def test_unsandboxed_kill_takes_children_too(unsandboxed, tmp_path, monkeypatch, with_cgroup):
    if not with_cgroup:
        # As on a laptop: kill() has only the process group to go by.
        monkeypatch.setattr(backends, "cgroups_usable", lambda: False)
    marker = f"orphan-{uuid.uuid4().hex}"
    sleeper = f"import time; time.sleep(60)  # {marker}"
    code = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {sleeper!r}]); exec({sleeper!r})"
    with unsandboxed.start(make_spec(tmp_path, python(code))) as jail:
        deadline = time.monotonic() + 10
        while len(processes_with(marker)) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        jail.kill()
        assert jail.outcome().reason == "signaled"
    assert processes_with(marker) == []

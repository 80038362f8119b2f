"""A jail's cgroups (evaluator/sandbox/cgroups.py): which hierarchy, on a made-up cgroup root; then
real jails on the host's: the CPU quota, one cgroup per jail, reaping a dead evaluator's."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from sandbox_support import make_spec, python, sleeper

from evaluator.sandbox import cgroups, reap_stale


def make_cgroup_root(root: Path, v1_controllers: tuple[str, ...], unified_controllers: str | None) -> None:
    for controller in v1_controllers:
        (root / controller).mkdir()
        (root / controller / "cgroup.procs").touch()
    for limit in ("memory/memory.limit_in_bytes", "cpu/cpu.cfs_quota_us", "cpuacct/cpuacct.usage"):
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
        (("memory", "pids", "cpu"), None, None),  # v1 without cpuacct: a jail's CPU time goes unmeasured
    ],
)
def test_cgroup_version_is_the_hierarchy_that_offers_memory_pids_and_cpu(
    tmp_path, monkeypatch, v1_controllers, unified_controllers, version
):
    make_cgroup_root(tmp_path, v1_controllers, unified_controllers)
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(cgroups.os, "geteuid", lambda: 0)
    assert cgroups.cgroup_version() == version


def test_a_delegated_v2_cgroup_holds_the_jails_and_the_evaluator_moves_into_a_leaf(tmp_path, monkeypatch):
    # As `systemd-run --scope -p Delegate=yes` leaves it: the scope offers the controllers, enables
    # none for its children yet, and holds the evaluator. Nothing outside the scope is touched.
    make_cgroup_root(tmp_path, (), "cpuset cpu io memory hugetlb pids")
    scope = tmp_path / "system.slice" / "speedrun-evaluation.scope"
    scope.mkdir(parents=True)
    (scope / "cgroup.controllers").write_text("cpu io memory pids\n")
    (scope / "cgroup.subtree_control").write_text("\n")
    (scope / "cgroup.procs").write_text(f"{os.getpid()}\n")
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(cgroups.os, "geteuid", lambda: 0)
    monkeypatch.setenv(cgroups.CGROUP_MODE_ENV, "delegated")
    own = [scope]
    monkeypatch.setattr(cgroups, "own_v2_cgroup", lambda: own[0])

    jail = cgroups.Cgroup.create("jail", 64 << 20, 16, 2)
    assert jail.dirs == (scope / jail.leaf,)
    assert (scope / "evaluator" / "cgroup.procs").read_text() == str(os.getpid())
    assert (scope / "cgroup.subtree_control").read_text().split() == ["+memory", "+pids", "+cpu"]
    assert (jail.memory_dir / "memory.max").read_text() == str(64 << 20)
    assert (jail.cpu_dir / "cpu.max").read_text() == "200000 100000"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cgroup.controllers", "system.slice"]

    (scope / "cgroup.controllers").write_text("cpu io memory\n")  # a scope without Delegate=yes's pids
    with pytest.raises(OSError, match="offers cpu, io, memory, not all of memory, pids, cpu"):
        cgroups.Cgroup.create("jail", 64 << 20, 16, 2)

    own[0] = scope / "evaluator"  # a second evaluator, started by the first, begins in its leaf
    assert cgroups.cgroup_parent_dirs() == [scope]
    monkeypatch.delenv(cgroups.CGROUP_MODE_ENV)
    assert cgroups.cgroup_parent_dirs() == [tmp_path / "speedrun-evaluator"]


def test_a_v2_jail_has_one_cgroup_with_the_v2_limits(tmp_path, monkeypatch):
    # The jails themselves are tested on whichever hierarchy the host has (v2: the lent GPU machine).
    make_cgroup_root(tmp_path, (), "cpu memory pids")
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(cgroups.os, "geteuid", lambda: 0)
    cgroup = cgroups.Cgroup("train.1@123.456")
    leaf = tmp_path / "speedrun-evaluator" / "train.1@123.456"
    assert cgroup.dirs == (leaf,) and cgroups.cgroup_parent_dirs() == [leaf.parent]
    leaf.mkdir(parents=True)
    (leaf / "memory.swap.max").touch()  # present where the kernel accounts swap
    limits = {path.name: value for path, value in cgroup._limits(512 << 20, 64, cpus=2).items()}
    assert limits == {
        "memory.max": str(512 << 20),
        "cpu.max": "200000 100000",
        "memory.swap.max": "0",
        "pids.max": "64",
    }


# --- the host's cgroups ---------------------------------------------------------------------------


@pytest.mark.slow
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


def test_reap_stale_removes_what_a_dead_evaluator_left(nsjail, tmp_path):
    gone = subprocess.Popen(["/bin/true"])
    gone.wait()
    dead_owner = f"{gone.pid}.1"  # and no live process started 1 tick after boot
    orphan = cgroups.Cgroup(f"left-behind.1@{dead_owner}")
    for directory in orphan.dirs:
        directory.mkdir(parents=True)
    host_sleeper = subprocess.Popen(["/bin/sleep", "60"])
    for procs in orphan.procs_files:
        Path(procs).write_text(str(host_sleeper.pid))
    with nsjail.start(make_spec(tmp_path, sleeper(60))) as live:
        reaped = reap_stale()
        assert live._cgroup.leaf not in reaped
        assert live.wait(timeout=0) is None
    assert orphan.leaf in reaped
    assert host_sleeper.wait(timeout=5) == -signal.SIGKILL
    assert not any(directory.exists() for directory in orphan.dirs)


@pytest.mark.slow
def test_two_jails_of_the_same_name_get_their_own_cgroups(nsjail, tmp_path):
    first = make_spec(tmp_path / "first", sleeper(60), name="same-name")
    second = make_spec(tmp_path / "second", sleeper(60), name="same-name")
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    with nsjail.start(first) as one, nsjail.start(second) as other:
        assert one._cgroup.leaf != other._cgroup.leaf
        assert one.wait(timeout=0) is None and other.wait(timeout=0) is None

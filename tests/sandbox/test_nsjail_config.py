"""The nsjail configuration a jail is started with (evaluator/sandbox/nsjail.py): no jail needed."""

from __future__ import annotations

import _ctypes
import os
import sys
from pathlib import Path

import pytest
from sandbox_support import make_spec

from evaluator.sandbox import NOBODY
from evaluator.sandbox.nsjail import _DEVICE_NODES, SEALED_SECCOMP_POLICY, SECCOMP_POLICY, nsjail_config
from evaluator.sandbox.spec import jail_environment, validate


def test_mounts_are_identity_paths_and_only_what_is_needed(tmp_path):
    spec = make_spec(
        tmp_path,
        ["/bin/true"],
        ro_paths=[tmp_path / "submission"],
        rw_paths=[tmp_path / "out"],
        tmpfs={tmp_path / "out" / "scratch": 1 << 20},
    )
    config = nsjail_config(spec, tmp_path / "nsjail.log")
    binds = {m.dst: m for m in config.mount if m.is_bind}
    assert all(m.src == m.dst for m in binds.values())
    # The host's system dirs are never bound whole: the jail sees an allow-list (host_view.py).
    assert not binds.keys() & {"/", "/dev", "/etc", "/usr", "/usr/lib", "/usr/share", "/bin", "/lib", sys.prefix}
    assert not binds[str(tmp_path / "submission")].rw and binds[str(tmp_path / "out")].rw
    assert os.path.realpath(sys.executable) in binds
    assert [d for d, m in binds.items() if m.rw] == [*_DEVICE_NODES, str(tmp_path / "out")]
    assert {d for d in binds if d.startswith("/dev/")} == set(_DEVICE_NODES)
    destinations = [m.dst for m in config.mount]
    # The scratch tmpfs sits inside the rw output dir, so it must be mounted after it.
    output_dir, scratch = str(tmp_path / "out"), str(tmp_path / "out" / "scratch")
    assert destinations.index(output_dir) < destinations.index(scratch)
    proc = next(m for m in config.mount if m.fstype == "proc")
    assert proc.rw
    assert config.clone_newuser is False and config.uidmap[0].inside_id == str(NOBODY)
    assert config.nice_level == 0 and config.time_limit == 20 and config.rlimit_nofile >= 1024


def test_gpu_jail_binds_only_the_assigned_gpu(tmp_path):
    spec = make_spec(tmp_path, ["/bin/true"], gpu_index=2)
    config = nsjail_config(spec, tmp_path / "log")
    nvidia = {m.dst: m for m in config.mount if "nvidia" in m.dst}
    expected = {"/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia2"}
    assert set(nvidia) == expected
    assert all(m.is_bind and m.rw for m in nvidia.values())
    assert not nvidia["/dev/nvidia-uvm-tools"].mandatory and nvidia["/dev/nvidia2"].mandatory
    cpu_config = nsjail_config(make_spec(tmp_path, ["/bin/true"]), tmp_path / "log")
    assert not [m for m in cpu_config.mount if "nvidia" in m.dst]


def test_gpu_jail_gets_the_hosts_library_path_and_its_driver_libraries_only(tmp_path, monkeypatch):
    # No GPU here: a real shared library under the driver's name stands in for libcuda.
    driver_libs = tmp_path / "nvidia" / "lib64"
    driver_libs.mkdir(parents=True)
    (driver_libs / "libcuda.so.1").write_bytes(Path(_ctypes.__file__).read_bytes())
    (driver_libs / "libcuda.so").symlink_to("libcuda.so.1")
    (driver_libs / "notes.txt").write_text("not a library")
    monkeypatch.setenv("LD_LIBRARY_PATH", f"{driver_libs}:relative/lib:{tmp_path / 'missing'}:/usr/lib")
    gpu_config = nsjail_config(make_spec(tmp_path, ["/bin/true"], gpu_index=0), tmp_path / "log")
    assert f"LD_LIBRARY_PATH={driver_libs}:/usr/lib" in gpu_config.envar
    binds = {m.dst: m for m in gpu_config.mount if m.is_bind}
    links = {m.dst: m.src for m in gpu_config.mount if m.is_symlink}
    assert not binds[str(driver_libs / "libcuda.so.1")].rw and links[str(driver_libs / "libcuda.so")] == "libcuda.so.1"
    assert str(driver_libs) not in binds and str(driver_libs / "notes.txt") not in binds  # the driver's, not the dir
    assert "/usr/lib" not in binds
    cpu_spec = make_spec(tmp_path, ["/bin/true"])
    cpu_config = nsjail_config(cpu_spec, tmp_path / "log")
    assert not [v for v in cpu_config.envar if v.startswith("LD_LIBRARY_PATH")]
    assert not [m for m in cpu_config.mount if m.dst.startswith(str(driver_libs))]
    assert jail_environment(cpu_spec) == cpu_spec.env


def test_workdir_must_stay_outside_the_jail(tmp_path):
    spec = make_spec(tmp_path, ["/bin/true"], rw_paths=[tmp_path], workdir=tmp_path / "work")
    with pytest.raises(ValueError, match="visible in the jail"):
        nsjail_config(spec, tmp_path / "log")


def test_a_gpu_jail_can_go_without_its_device_nodes_or_its_sysfs_and_keeps_the_rest(tmp_path):
    def gpu_config(**fields):
        return nsjail_config(make_spec(tmp_path, ["/bin/true"], gpu_index=1, **fields), tmp_path / "log")

    nodes = {"/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia1"}
    full = gpu_config().mount
    assert {m.dst for m in full if m.dst.startswith("/dev/nvidia") or m.dst == "/sys"} == nodes | {"/sys"}
    assert gpu_config(gpu_device_nodes=False).mount == [m for m in full if m.dst not in nodes]
    assert gpu_config(gpu_sysfs=False).mount == [m for m in full if m.dst != "/sys"]
    assert gpu_config(gpu_device_nodes=False, gpu_sysfs=False).mount == [
        m for m in full if m.dst not in nodes | {"/sys"}
    ]
    for field in ("gpu_device_nodes", "gpu_sysfs"):  # a CPU jail has neither to leave out
        with pytest.raises(ValueError, match="GPU jail only"):
            validate(make_spec(tmp_path, ["/bin/true"], **{field: False}))
    validate(make_spec(tmp_path, ["/bin/true"]))


def test_a_sealed_config_binds_only_the_image_and_device_nodes(tmp_path):
    image = tmp_path / "image"
    (image / "usr" / "lib").mkdir(parents=True)
    (image / "work").mkdir()
    (image / "lib").symlink_to("usr/lib")
    spec = make_spec(tmp_path, ["/bin/true"], sealed_image=image)
    config = nsjail_config(spec, tmp_path / "log")
    binds = {m.dst: m.src for m in config.mount if m.is_bind}
    assert binds == {"/usr": str(image / "usr"), "/work": str(image / "work"), **{node: node for node in _DEVICE_NODES}}
    assert not any(m.rw for m in config.mount if m.is_bind and m.dst not in _DEVICE_NODES)
    assert [(m.src, m.dst) for m in config.mount if m.is_symlink] == [("usr/lib", "/lib")]
    assert not [m for m in config.mount if m.fstype == "tmpfs"]
    proc = next(m for m in config.mount if m.fstype == "proc")
    assert proc.options == "hidepid=2"
    assert config.seccomp_string == [SEALED_SECCOMP_POLICY]
    assert "socket" in SEALED_SECCOMP_POLICY and "socket" not in SECCOMP_POLICY
    normal = nsjail_config(make_spec(tmp_path, ["/bin/true"]), tmp_path / "log")
    assert normal.seccomp_string == [SECCOMP_POLICY]

    (image / "proc").mkdir()
    with pytest.raises(ValueError, match="must not hold /proc"):
        nsjail_config(spec, tmp_path / "log")
    (image / "proc").rmdir()
    (image / str(spec.workdir).lstrip("/")).mkdir(parents=True)
    with pytest.raises(ValueError, match="visible in the jail"):
        nsjail_config(spec, tmp_path / "log")

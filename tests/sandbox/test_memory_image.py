"""What goes into a sealed jail's memory image (evaluator/sandbox/memory_image.py): no mounts needed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from evaluator.sandbox import memory_image


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
def test_a_requirement_is_followed_where_its_environment_marker_holds(marker, expected):
    environment = {
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "sys_platform": "linux",
        "python_version": "3.11",
        "python_full_version": "3.11.7",
    }
    selected = memory_image._selected_requirement(f"nvidia-cublas==13.1; {marker}", environment)
    assert selected == ("nvidia-cublas" if expected else None)


def test_a_requirement_without_a_marker_is_followed_and_a_malformed_one_is_refused():
    assert memory_image._selected_requirement("numpy>=1.24") == "numpy"
    with pytest.raises(memory_image.ImageError, match="cannot parse the requirement"):
        memory_image._selected_requirement("numpy; python_version >>> '3'")


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


def test_the_image_takes_the_path_files_of_the_evaluator_package_itself():
    # The .pth and editable-finder files that put `evaluator` on sys.path (this checkout's editable
    # install): without them a sealed jail could not import the model server.
    site_dirs = [path for path in sys.path if path.endswith("site-packages")]
    names = {Path(path).name for path in memory_image._evaluator_path_files(site_dirs)}
    assert any(name.startswith("__editable__") and name.endswith(".pth") for name in names), names
    assert any(name.startswith("__editable__") and name.endswith("_finder.py") for name in names), names

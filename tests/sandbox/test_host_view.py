"""What a jail that is not sealed sees of the host (evaluator/sandbox/host_view.py): no jail needed."""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from evaluator.sandbox import host_view as view_module
from evaluator.sandbox.host_view import compiler_paths, host_view
from evaluator.sandbox.memory_image import ETC_FILES, ImagePlan


def _plan(allowed_files: list[Path], links: dict[Path, str]) -> ImagePlan:
    """A plan of these files and symlinks, with every directory on their way (as the collector
    records them)."""
    dirs: set[str] = set()
    for path in [*allowed_files, *links]:
        dirs.update(str(parent) for parent in Path(path).parents if str(parent) != "/")
    return ImagePlan(
        frozenset(dirs),
        tuple(sorted((str(path), target) for path, target in links.items())),
        tuple(sorted((str(path), path.stat().st_size) for path in allowed_files)),
    )


def test_a_directory_is_bound_whole_covered_or_entered_as_its_entries_allow(tmp_path):
    def files(*names: str) -> list[Path]:
        for name in names:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(name)
        return [tmp_path / name for name in names]

    whole = files("whole/a.py", "whole/sub/b.py")
    covered = files("covered/a.py", "covered/b.py", "covered/c.py")
    files("covered/tests/secret.txt", "entered/secret.txt", "entered/also-secret.txt")
    entered = files("entered/a.py")
    (tmp_path / "entered" / "link").symlink_to("a.py")
    (tmp_path / "empty").mkdir()  # allowed, empty: a compiler's include dir may be
    plan = _plan([*whole, *covered, *entered], {tmp_path / "entered" / "link": "a.py"})
    plan = ImagePlan(plan.dirs | {f"{tmp_path}/empty"}, plan.symlinks, plan.files)
    mounts = [mount for mount in view_module._mounts(plan).mounts if mount[1].startswith(f"{tmp_path}/")]
    assert mounts == [
        ("dir", f"{tmp_path}/covered"),
        ("cover", f"{tmp_path}/covered/tests"),  # one mount hides the disallowed dir...
        ("dir", f"{tmp_path}/empty"),
        ("file", f"{tmp_path}/entered/a.py"),  # ...but a disallowed file can only be left out
        ("symlink", f"{tmp_path}/entered/link", "a.py"),
        ("dir", f"{tmp_path}/whole"),
    ]


def test_the_training_view_holds_python_torch_pyarrow_and_the_compiler_and_nothing_secret():
    view = host_view(False, (), ("pyarrow",))
    shown = {mount[1]: mount[0] for mount in view.mounts}
    site = sysconfig.get_paths()["purelib"]
    assert shown[f"{site}/torch"] == shown[f"{site}/pyarrow"] == "dir"
    assert os.path.realpath(sys.executable) in shown
    assert all(os.path.exists(path) or kind == "symlink" for path, kind in shown.items())
    if shutil.which("g++", path=view_module.SYSTEM_PATH):  # torch.compile's inductor runs it
        assert {"/usr/include", os.path.realpath(shutil.which("g++"))} <= shown.keys()
        assert sysconfig.get_paths()["include"] in compiler_paths()

    def shows(path: str) -> bool:  # a mount at the path, or one above it that is not a cover
        above = [mount for mount in view.mounts if path == mount[1] or path.startswith(mount[1] + "/")]
        return bool(above) and above[-1][0] != "cover"

    for secret in ("/usr/share/doc/python3.11", "/usr/share", "/opt", "/srv", "/home", "/var", "/etc/shadow"):
        assert not shows(secret), secret
    stdlib = Path(os.__file__).parent
    assert shows(str(stdlib / "os.py")) and not shows(str(stdlib / "pydoc_data" / "topics.py"))
    assert not [
        path for path in shown if path.startswith("/etc/") and not path.startswith((*ETC_FILES, "/etc/alternatives/"))
    ]
    assert [path for path in shown if path.startswith("/root/")] == [
        path for path in shown if path.startswith(sys.base_prefix + "/")
    ]
    assert 0 < len(view.mounts) < 400 and view.files > 1000


def test_a_view_without_extra_distributions_leaves_them_out():
    site = sysconfig.get_paths()["purelib"]
    shown = {mount[1] for mount in host_view(False, (), ()).mounts}
    assert f"{site}/torch" in shown and f"{site}/pyarrow" not in shown

"""The modules that run inside a jail import nothing of the evaluator beyond their own jail's list."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evaluator import in_jail

JAILS = {"training": in_jail.TRAINING, "scoring": in_jail.SCORING}

PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
import evaluator
print(json.dumps({"package": evaluator.__file__,
                  "loaded": sorted(name for name in sys.modules if name.split(".")[0] == "evaluator")}))
"""


def module_name(path: str) -> str:
    parts = Path(path).with_suffix("").parts
    return ".".join(("evaluator", *parts[:-1]) if parts[-1] == "__init__" else ("evaluator", *parts))


def probe(module: str, pythonpath: Path | None = None) -> dict:
    """Import `module` in a fresh interpreter: which evaluator package it found, what it loaded."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run([sys.executable, "-c", PROBE, module], capture_output=True, text=True, env=env, cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def copy_modules(paths: tuple[str, ...], into: Path) -> Path:
    """The files a jail gets, laid out as the run lays them out."""
    for path, source in zip(paths, in_jail.sources(paths), strict=True):
        (into / "evaluator" / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, into / "evaluator" / path)
    return into


@pytest.mark.parametrize("jail, path", [(jail, path) for jail, paths in JAILS.items() for path in paths])
def test_an_in_jail_module_loads_only_its_jails_modules(jail, path, tmp_path):
    allowed = {module_name(p) for p in JAILS[jail]}
    assert set(probe(module_name(path))["loaded"]) <= allowed  # the installed package
    seen = probe(module_name(path), copy_modules(JAILS[jail], tmp_path))  # the jail's copies
    assert Path(seen["package"]).is_relative_to(tmp_path) and set(seen["loaded"]) <= allowed


def test_the_check_catches_a_host_module_imported_in_a_jail(tmp_path):
    copy = copy_modules(in_jail.TRAINING, tmp_path)
    (copy / "evaluator" / "leaky.py").write_text("import evaluator.paths\n")
    loaded = set(probe("evaluator.leaky", copy)["loaded"])
    assert "evaluator.paths" in loaded - {module_name(p) for p in in_jail.TRAINING}


def test_evaluate_is_one_import_away_and_loaded_only_when_asked_for():
    # `import evaluator` (which every jail does) must not pull in the host side; notebooks still
    # get `from evaluator import evaluate`.
    code = (
        "import sys, evaluator; print('evaluator.runner' in sys.modules); from evaluator import evaluate; "
        "print(evaluate.__module__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "evaluator.runner"]

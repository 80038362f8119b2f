"""Attacks on the validation split's text from inside the training jail, each run through `evaluator
run` with the real nsjail on the CPU track. A jail sees an allow-list of the host
(evaluator/sandbox/host_view.py), never a system folder wholesale: the dataset's sources
(`python3.11-doc` under /usr/share/doc) and the documentation text the standard library carries
(pydoc_data) stay out of sight, and so does what an operator keeps in /opt, /srv or /home.

The jail's paths are the host's (identity binds), so the host can search every file the jail
listed for the validation split's text.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import uuid
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from adversarial_support import attack_submission, probe_report
from conftest import missing, run_cli

from evaluator.cli import main
from evaluator.dataset.source_pydoc import DEFAULT_SOURCE_DIR
from evaluator.dataset.store import resolve_data_file
from evaluator.tracks import load_track

# The slow tier (`make test-fast` leaves it out): every test here runs an evaluation.
pytestmark = pytest.mark.slow

TRACK = load_track("cpu-1min")
BUDGET_S = 10  # the attacks report within a second or two of the clock's start
# Where an operator's files or a dataset's sources may lie, each out of every jail's sight.
SECRET_DIRS = (Path("/usr/share/doc"), Path("/opt"), Path("/srv"), Path("/home"))
# Byte windows of the validation text that the host searches the jail's files for. 48 bytes is
# specific to a passage; windows that span a line break of the text are left out (a source wraps
# its lines elsewhere, and grep matches within a line).
WINDOW_BYTES = 48
WINDOW_STRIDE = 6
# The standard library's docstrings repeat a few sentences of the documentation (typing, difflib,
# unittest.mock): a floor that no allow-list can remove, since Python needs its standard library.
# The dataset's sources hold many times more of the text; the bound is well below what they hold.
VISIBLE_WINDOWS_MAX = 0.01


@pytest.fixture(scope="module")
def canaries():
    """A file of unique text in each secret dir (the dir created for the test where it is missing),
    removed afterwards."""
    token = uuid.uuid4().hex
    planted: dict[str, str] = {}
    created: list[Path] = []
    try:
        for directory in SECRET_DIRS:
            if not directory.exists():
                directory.mkdir(parents=True)
                created.append(directory)
            path = directory / f"speedrun-canary-{token}.txt"
            path.write_text(f"canary {token} {directory}\n")
            planted[str(path)] = path.read_text()
        yield planted
    finally:
        for path in planted:
            Path(path).unlink(missing_ok=True)
        for directory in reversed(created):
            directory.rmdir()


def _attack(nsjail, tmp_path, capsys, body: str, config: dict) -> dict:
    folder = attack_submission(tmp_path, body.replace("_", "-"), body, config)
    code, record = run_cli(folder, tmp_path / "runs", "--budget", str(BUDGET_S), "--sandbox", "nsjail", capsys=capsys)
    assert (code, record["status"]) == (1, "crashed"), record["message"]
    assert record["environment"]["sandbox"]["kind"] == "nsjail"
    return probe_report(tmp_path / "runs" / record["run_id"])


@pytest.fixture(scope="module")
def walk(nsjail, canaries, tmp_path_factory):
    """One run of the walking submission: what it listed (path -> size) and what it could read."""
    tmp_path = tmp_path_factory.mktemp("walk")
    config = {
        "canaries": sorted(canaries),
        "dataset_sources": str(DEFAULT_SOURCE_DIR),
        "secret_dirs": [str(directory) for directory in SECRET_DIRS],
    }
    folder = attack_submission(tmp_path, "walk-filesystem", "walk_filesystem", config)
    runs = tmp_path / "runs"
    assert main(["run", str(folder), "--out", str(runs), "--budget", str(BUDGET_S), "--sandbox", "nsjail"]) == 1
    (run_dir,) = runs.iterdir()
    assert json.loads((run_dir / "result.json").read_text())["status"] == "crashed"
    report = probe_report(run_dir)
    listing = zlib.decompress(base64.b64decode(report.pop("listing"))).decode().splitlines()
    report["listing"] = {path: int(size) for path, size in (line.rsplit("\t", 1) for line in listing)}
    return report


def test_the_jail_sees_no_secret_dir_no_canary_and_no_dataset_source(walk, canaries):
    assert walk["dataset_sources_exist"] is False
    assert set(walk["canaries"].values()) == {"ENOENT"}, walk["canaries"]
    assert set(walk["dirs_listed"].values()) == {"ENOENT"}, walk["dirs_listed"]
    listed = walk["listing"]
    assert len(listed) == walk["files"] > 1000  # Python, torch and their libraries are there
    out_of_sight = ("/usr/share/", "/opt/", "/srv/", "/home/", "/var/")
    assert [path for path in listed if path.startswith(out_of_sight)] == []
    assert [path for path in listed if "/pydoc_data/" in path or "python3.11-doc" in path] == []
    assert not [
        path
        for path in listed
        if path.startswith("/etc/")
        and path
        not in (
            "/etc/ld.so.cache",
            "/etc/ld.so.conf",
            "/etc/passwd",
            "/etc/group",
            "/etc/nsswitch.conf",
            "/etc/hosts",
        )
        and not path.startswith("/etc/ld.so.conf.d/")
    ]


def _validation_windows(tmp_path: Path) -> tuple[Path, int]:
    texts = pq.read_table(resolve_data_file(TRACK, "val"), columns=["text"]).column("text").to_pylist()
    windows: set[bytes] = set()
    for text in texts:
        data = text.encode()
        for start in range(0, len(data) - WINDOW_BYTES + 1, WINDOW_STRIDE):
            window = data[start : start + WINDOW_BYTES]
            if b"\n" not in window:
                windows.add(window)
    needles = tmp_path / "needles.txt"
    needles.write_bytes(b"\n".join(sorted(windows)) + b"\n")
    return needles, len(windows)


def _windows_found(needles: Path, paths: list[str]) -> set[bytes]:
    """The distinct needles that occur in any of `paths` (grep's fixed-string multi-needle search,
    bytes as they are: LC_ALL=C, binary files read as text)."""
    found: set[bytes] = set()
    for start in range(0, len(paths), 2000):
        result = subprocess.run(
            ["grep", "-ohF", "-a", "-f", str(needles), "--", *paths[start : start + 2000]],
            capture_output=True,
            env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"},
            check=False,
        )
        assert result.returncode in (0, 1), result.stderr.decode()
        found.update(result.stdout.splitlines())
    return found


def test_no_file_the_jail_can_read_holds_the_validation_text(walk, tmp_path):
    needles, total = _validation_windows(tmp_path)
    listed = sorted(path for path in walk["listing"] if os.path.isfile(path))
    visible = _windows_found(needles, listed)
    assert len(visible) <= VISIBLE_WINDOWS_MAX * total, sorted(visible)
    if not DEFAULT_SOURCE_DIR.is_dir():
        missing(f"the dataset's sources ({DEFAULT_SOURCE_DIR}) are not installed: no control for the search")
    # The control: the same search finds the text in the sources the jail no longer sees.
    sources = sorted(str(path) for path in DEFAULT_SOURCE_DIR.rglob("*.rst.txt"))
    assert len(_windows_found(needles, sources)) > 5 * max(len(visible), VISIBLE_WINDOWS_MAX * total)


def test_rebuilding_the_validation_split_from_its_sources_finds_nothing(nsjail, tmp_path, capsys):
    report = _attack(nsjail, tmp_path, capsys, "rebuild_validation_split", {"dataset_sources": str(DEFAULT_SOURCE_DIR)})
    assert report == {
        "source_dir_exists": False,
        "source_files": 0,
        "source_bytes": 0,
        "pydoc_topics": "ModuleNotFoundError",
    }

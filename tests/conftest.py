"""Shared helpers: tiny real submissions written into tmp folders and run through the real CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from evaluator.cli import main
from evaluator.paths import HOME
from evaluator.sandbox import Sandbox, SandboxUnavailable, cgroup_parent_dirs, open_sandbox

# The leaderboard tests' fixtures (`board`, `timed_board`): published boards, built once per module.
pytest_plugins = ["leaderboard_support"]

# A tiny causal model most test submissions return: cheap to train, save and score.
TINY_MODEL = '''
import torch
import torch.nn as nn

from evaluator.api import RecomputeDecoder


class TinyCausal(nn.Module):
    """Logits at t depend only on token t; a zero head gives uniform logits, so val_loss = ln(vocab)."""

    def __init__(self, vocab_size, width=8):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        nn.init.zeros_(self.head.weight)

    def forward(self, tokens):
        return self.head(self.embed(tokens))

    def decoder(self, rows):
        # Its logits need only the newest token, so a step is one position. A subclass that changes
        # forward (the attacks) is scored as a model without a decoder: its forward sees every prefix.
        if type(self).forward is not TinyCausal.forward:
            return RecomputeDecoder(self, rows)
        return _NewestTokenDecoder(self)


class _NewestTokenDecoder:
    def __init__(self, model):
        self.model = model

    def step(self, tokens):
        return self.model(tokens.reshape(-1, 1))[:, -1]

    def keep(self, rows):
        pass
'''


def write_submission(parent: Path, name: str, body: str, config: dict | None = None, track: str = "cpu-1min") -> Path:
    """A submission folder whose train.py is TINY_MODEL plus `body` (which defines train(ctx))."""
    folder = parent / name
    folder.mkdir(parents=True)
    config_lines = "\n".join(f"{key} = {json.dumps(value)}" for key, value in (config or {}).items())
    (folder / "manifest.toml").write_text(
        f'schema = 1\n[submission]\nname = "{name}"\ntrack = "{track}"\nauthors = ["Test <t@example.org>"]\n'
        f'description = "test submission"\n[config]\n{config_lines}\n'
    )
    (folder / "train.py").write_text(TINY_MODEL + "\n" + textwrap.dedent(body))
    return folder


def run_cli(folder: Path, out: Path, *extra: str, capsys) -> tuple[int, dict]:
    """`evaluator run DIR --out OUT --json ...`; returns the exit code and the printed record, after
    checking that what the run wrote can be published: every kind of run the suite makes."""
    code = main(["run", str(folder), "--out", str(out), "--json", *extra])
    captured = capsys.readouterr()
    try:
        record = json.loads(captured.out)
    except ValueError:
        pytest.fail(f"--json printed no record (exit {code}):\nstdout: {captured.out}\nstderr: {captured.err}")
    assert_publishable(record, Path(out) / record["run_id"])
    return code, record


def assert_publishable(record: dict, run_dir: Path) -> None:
    """The run's result passes the one validator, and a run of a published status is signed and
    verified as `publish` and `verify` would (smoke runs are never published)."""
    from evaluator.publish import publish, verify_paths
    from evaluator.results import PUBLISHED_STATUSES, result_problems
    from evaluator.signing import generate_key_pair, load_private_key, load_trusted_keys

    assert result_problems(record) == [], record
    if record["status"] not in PUBLISHED_STATUSES or record["smoke"]:
        return
    with tempfile.TemporaryDirectory(prefix="publishable-") as scratch:
        private, _, _ = generate_key_pair(Path(scratch, "keys"), "suite")
        envelope, _, _ = publish(run_dir, load_private_key(private), Path(scratch, "results"), allow_unofficial=True)
        verified, rejected = verify_paths([envelope], load_trusted_keys(Path(scratch, "keys")))
    assert rejected == [] and len(verified) == 1, rejected


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs"


@pytest.fixture
def cpu_track_variant(tmp_path, monkeypatch):
    """Installs variants of cpu-1min as extra tracks for this test: `variant(track_id, edit)` writes
    `edit(cpu-1min's text with the new id)` as spec/tracks/<track_id>.toml and returns the id."""
    tracks = tmp_path / "tracks"
    tracks.mkdir()
    for path in (HOME / "spec" / "tracks").glob("*.toml"):
        (tracks / path.name).write_text(path.read_text())
    monkeypatch.setattr("evaluator.tracks.TRACKS_DIR", tracks)

    def variant(track_id: str, edit) -> str:
        text = (HOME / "spec" / "tracks" / "cpu-1min.toml").read_text().replace('id = "cpu-1min"', f'id = "{track_id}"')
        (tracks / f"{track_id}.toml").write_text(edit(text))
        return track_id

    return variant


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def mount_points_under(directory: Path) -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # Field 5 is the mount point, with space, tab, newline and backslash written as \ooo.
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
        if point == str(directory) or point.startswith(f"{directory}/"):
            points.append(point)
    return points


def leftovers(run_id: str, run_dir: Path) -> list[str]:
    """What a run still holds on the host: processes and cgroups named by its id, mounts in its directory."""
    found = [f"process {pid}" for pid in processes_with(run_id)]
    for parent in cgroup_parent_dirs():
        if parent.exists():
            found += [f"cgroup {path}" for path in parent.iterdir() if run_id in path.name]
    return found + [f"mount {point}" for point in mount_points_under(run_dir)]


def missing(what: str) -> None:
    """Skip for a missing prerequisite on a developer's machine; fail in CI, which has everything."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must have it: see `make setup`)")
    pytest.skip(what)


@pytest.fixture(scope="module")
def unsandboxed() -> Sandbox:
    return open_sandbox("none")


@pytest.fixture
def disk_dir() -> Iterator[Path]:
    """A scratch directory on the host's disk, not under /tmp.

    Production runs live under results/runs/, which the jail cannot see or write; pytest's tmp_path
    lies under /tmp, and the jail has a private tmpfs there, in which nsjail makes the mount points
    of paths under /tmp: a write to a host path under /tmp then lands in the jail's own tmpfs. Paths
    here are absent from the jail, as in production.
    """
    path = Path(tempfile.mkdtemp(prefix="speedrun-adversarial-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def nsjail() -> Sandbox:
    """The real nsjail sandbox, probed once per session."""
    try:
        return open_sandbox("nsjail")
    except SandboxUnavailable as error:
        missing(f"nsjail cannot run here: {error}")

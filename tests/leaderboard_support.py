"""Boards of published results for the leaderboard's tests, and the key that signs them.

It sits at the top of tests/, next to conftest.py and publish_support.py, so that a test in any
folder imports it: tests/leaderboard/ for the boards, test_calibration.py for `_signer`.
"""

from __future__ import annotations

import base64
import json
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from publish_support import T0, _sign_with_unknown_key, _tamper_payload, make_run, published, run_cli

from evaluator.leaderboard.rules import RecordRule
from evaluator.publish import publish
from evaluator.signing import generate_key_pair, load_private_key

# --- a results folder with several submissions ---------------------------------------------------

# submission -> (days after T0 of its first run, val_losses by seed, official)
SUBMISSIONS = {
    "alpha": (0, [4.00, 4.02, 3.98], True),
    "beta": (30, [3.80, 3.82, 3.79], True),  # clearly beats alpha: the record
    "gamma": (60, [3.70, 3.95, 3.60], True),  # better mean than beta, but too noisy to claim it
    "delta": (90, [3.50, 3.52], True),  # best mean, two seeds only
    "epsilon": (100, [3.00, 3.01, 3.02], False),  # unofficial: listed, never ranked or a record
}
RANKED = ["delta", "gamma", "beta", "alpha", "epsilon"]
EVIL_AUTHOR = "<script>alert(1)</script> | Eve"


def _signer(root: Path):
    """A fresh key pair under root: (private key file, loaded key, a trusted-keys folder with its public half)."""
    private, public, _ = generate_key_pair(root / "private", "tester")
    trusted = root / "trusted"
    trusted.mkdir()
    shutil.copy(public, trusted / public.name)
    return private, load_private_key(private), trusted


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """Published envelopes for SUBMISSIONS, plus three that must be rejected. Returns (results, trusted)."""
    root = tmp_path_factory.mktemp("board")
    private, key, trusted = _signer(root)
    results = root / "results"
    for name, (days, losses, official) in SUBMISSIONS.items():
        authors = [EVIL_AUTHOR] if name == "gamma" else None
        for seed, loss in enumerate(losses):
            run_dir = make_run(
                root,
                f"{name}-s{seed}",
                submission=name,
                seed=seed,
                val_loss=loss,
                official=official,
                started_at=T0 + timedelta(days=days, hours=seed),
                authors=authors,
            )
            publish(run_dir, key, results, allow_unofficial=not official)
    publish(make_run(root, "alpha-t4", submission="alpha", track="t4-5min", val_loss=3.3), key, results, False)

    tampered = make_run(root, "zeta-s0", submission="zeta", val_loss=1.0)
    unknown = make_run(root, "eta-s0", submission="eta", val_loss=1.0)
    for run_dir in (tampered, unknown):
        publish(run_dir, key, results, False)
    _tamper_payload(published(root, tampered), private, root)
    _sign_with_unknown_key(published(root, unknown), private, root)
    shutil.copy(published(root, root / "runs" / "alpha-s0"), results / "cpu-1min" / "alpha" / "copy-of-s0.json")
    return results, trusted


def leaderboard(monkeypatch, capsys, board, *args):
    """`evaluator leaderboard` on a board; on `board`, which holds envelopes that must be rejected,
    every call exits 1 after it has shown the rest."""
    results, trusted = board
    return run_cli(monkeypatch, capsys, "leaderboard", "--results", results, "--trusted-keys", trusted, *args)


# spec/record-rules.toml's rule for cpu-1min (test_record_rules.py holds the shipped file to it).
DEFAULT_RULE = RecordRule(
    min_seeds=3, p_below=0.01, min_improvement_nats=0.005, min_improvement_s=1.0, drawn_seeds_only=False
)


# --- time-to-target tracks ------------------------------------------------------------------------

TARGET = 4.1
# submission -> (days after T0 of its first run, time to target by seed (None: not reached), official)
TIMED = {
    "steady": (0, [30.0, 30.5, 29.8], True),  # the first record
    "swift": (30, [20.0, 20.02, 20.01], True),  # ten seconds faster: the record
    "close": (60, [29.0, 29.2, 29.1], True),  # slower than swift: not significant
    "tiny": (90, [19.5, 19.51, 19.52], True),  # faster than swift, significantly, but by 0.5 s only
    "partial": (100, [15.0, None, 16.0], True),  # fastest when it gets there, which it does not always
    "hasty": (110, [10.0, 11.0, 12.0], False),  # unofficial: listed, never ranked
}
TIMED_ORDER = ["tiny", "swift", "close", "steady", "partial", "hasty"]
# What steady-s0 logged through ctx.log under the key the evaluator's own curve uses: never drawn as such.
FORGED_VAL_LOSS = 0.4242
TIMED_RULES = (
    "schema = 1\n[default]\nmin_seeds = 3\np_below = 0.01\nmin_improvement_nats = {nats}\n"
    "min_improvement_s = {s}\ndrawn_seeds_only = false\n"
)


@pytest.fixture(scope="module")
def timed_board(tmp_path_factory):
    """Published runs of a time-to-target track that is not defined here (toy-target). Returns (results, trusted)."""
    root = tmp_path_factory.mktemp("timed")
    _, key, trusted = _signer(root)
    results = root / "results"
    for name, (days, times, official) in TIMED.items():
        for seed, time_s in enumerate(times):
            forged = (
                [(0.5 + i, i, "val_loss", FORGED_VAL_LOSS) for i in range(30)] if name == "steady" and seed == 0 else []
            )
            run_dir = make_run(
                root,
                f"{name}-s{seed}",
                submission=name,
                seed=seed,
                track="toy-target",
                target=TARGET,
                provisional=True,
                time_to_target=time_s,
                val_loss=4.3 if time_s is None else 4.05,
                official=official,
                started_at=T0 + timedelta(days=days, hours=seed),
                snapshot_every_s=10.0,
                logged_rows=forged,
            )
            publish(run_dir, key, results, allow_unofficial=not official)
    return results, trusted


def _timed_rules(tmp_path: Path, nats: float = 0.005, seconds: float = 1.0) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(TIMED_RULES.format(nats=nats, s=seconds))
    return path


def _published_results(results: Path) -> dict[str, dict]:
    """run_id -> the result in its envelope."""
    out = {}
    for path in results.glob("*/*/*.json"):
        result = json.loads(base64.b64decode(json.loads(path.read_text())["payload"]))["predicate"]["result"]
        out[result["run_id"]] = result
    return out

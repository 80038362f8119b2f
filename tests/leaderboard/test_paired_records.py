"""Records from pairs (`paired = true` in spec/record-rules.toml): on such a track a row becomes the
record only through an `evaluator compare` of the holder (side a) against it (side b), whatever
its own runs say; on every other track nothing changes.

The boards are signed results read by the real `evaluator leaderboard`."""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta
from pathlib import Path

import pytest
from leaderboard_support import DEFAULT_RULE, _signer, leaderboard
from publish_support import T0, make_run

from evaluator.leaderboard.board import (
    NOT_SIGNIFICANT,
    RECORD,
    TOO_FEW_PAIRS,
    TOO_FEW_SEEDS,
    Row,
    Run,
    TrackTarget,
    _mark_records,
    paired_differences,
)
from evaluator.publish import publish

RULES = (
    "schema = 1\n[default]\nmin_seeds = 3\np_below = 0.01\nmin_improvement_nats = 0.005\n"
    "min_improvement_s = 1.0\ndrawn_seeds_only = false\npaired = {paired}\n"
)


def _publish_board(root: Path, runs: list[dict]) -> tuple[Path, Path]:
    """Signed envelopes of `runs` (make_run's keywords, plus `day` and `hour` after T0). Returns (results, trusted)."""
    _, key, trusted = _signer(root)
    results = root / "results"
    for index, spec in enumerate(runs):
        spec = dict(spec)
        started = T0 + timedelta(days=spec.pop("day"), hours=spec.pop("hour", 0))
        run_dir = make_run(root, f"{spec['submission']}-{index}", started_at=started, **spec)
        publish(run_dir, key, results, allow_unofficial=not spec.get("official", True))
    return results, trusted


def _own_runs(name: str, day: int, losses: list[float]) -> list[dict]:
    return [
        {"submission": name, "day": day, "hour": seed, "seed": seed, "val_loss": loss}
        for seed, loss in enumerate(losses)
    ]


def _comparison(
    cid: str, holder: str, challenger: str, day: int, pairs: list[tuple[float, float]], first_seed: int = 10, **extra
) -> list[dict]:
    """The runs of one comparison, in ABBA order: pair i's holder and challenger runs with one seed."""
    runs, hour = [], 0
    for pair, (holder_loss, challenger_loss) in enumerate(pairs, start=1):
        sides = [("a", holder, holder_loss), ("b", challenger, challenger_loss)]
        for side, name, loss in sides if pair % 2 else reversed(sides):
            runs.append(
                {
                    "submission": name,
                    "day": day,
                    "hour": hour,
                    "seed": first_seed + pair - 1,
                    "val_loss": loss,
                    "comparison": {"id": cid, "pair": pair, "side": side},
                    **extra,
                }
            )
            hour += 1
    return runs


def _rows(monkeypatch, capsys, board, tmp_path, paired: bool) -> dict[str, dict]:
    rules = tmp_path / f"rules-{paired}.toml"
    rules.write_text(RULES.format(paired=str(paired).lower()))
    code, stdout, stderr = leaderboard(monkeypatch, capsys, board, "--format", "json", "--rules", rules)
    assert code == 0, stderr
    return {row["submission"]: row for row in json.loads(stdout)["rows"] if row["official"]}


def _page(monkeypatch, capsys, board, tmp_path, fmt: str) -> str:
    rules = tmp_path / "rules-paired.toml"
    rules.write_text(RULES.format(paired="true"))
    code, stdout, _ = leaderboard(monkeypatch, capsys, board, "--format", fmt, "--rules", rules)
    assert code == 0
    return stdout


@pytest.fixture(scope="module")
def lucky_board(tmp_path_factory):
    """beta's own runs beat alpha's by far (made on a faster day, say), but run beside alpha, pair by
    pair with the same seeds, it is no better."""
    root = tmp_path_factory.mktemp("lucky")
    return _publish_board(
        root,
        [
            *_own_runs("alpha", 0, [4.00, 4.02, 3.98]),
            *_own_runs("beta", 30, [3.70, 3.71, 3.69, 3.70, 3.72, 3.68]),
            *_comparison("cmp-ab", "alpha", "beta", 40, [(3.96, 3.97), (3.98, 3.97), (4.00, 4.01)]),
        ],
    )


@pytest.fixture(scope="module")
def paired_board(tmp_path_factory):
    """gamma's runs spread as widely as alpha's, so that two sets of runs cannot tell them apart; pair
    by pair it is 0.02 nats better every time. delta's runs are better still, but it has no comparison
    with the holder of its time (one against alpha is unofficial)."""
    root = tmp_path_factory.mktemp("paired")
    return _publish_board(
        root,
        [
            *_own_runs("alpha", 0, [4.00, 4.10, 3.90]),
            *_comparison("cmp-ag", "alpha", "gamma", 30, [(3.60, 3.58), (4.00, 3.979), (4.40, 4.381)]),
            # The wrong way round: gamma as the baseline. It must not count for gamma.
            *_comparison("cmp-ga", "gamma", "alpha", 35, [(3.9, 3.0), (3.9, 3.0), (3.9, 3.0)], first_seed=20),
            *_own_runs("delta", 60, [3.00, 3.01, 3.02]),
            *_comparison(
                "cmp-ad", "alpha", "delta", 61, [(4.0, 3.0), (4.0, 3.0), (4.0, 3.0)], first_seed=30, official=False
            ),
        ],
    )


def test_a_row_that_wins_on_its_own_runs_but_not_in_pairs_is_no_record_on_a_paired_track(
    lucky_board, monkeypatch, capsys, tmp_path
):
    unpaired = _rows(monkeypatch, capsys, lucky_board, tmp_path, paired=False)
    assert unpaired["beta"]["record_status"] == RECORD and unpaired["beta"]["record_pairs"] is None
    assert unpaired["beta"]["record_p_value"] < 0.01 and unpaired["beta"]["record_improvement"] > 0.005

    paired = _rows(monkeypatch, capsys, lucky_board, tmp_path, paired=True)
    assert paired["alpha"]["record_status"] == RECORD
    beta = paired["beta"]
    assert beta["record_status"] == NOT_SIGNIFICANT and beta["record_baseline"] == "alpha"
    assert beta["record_pairs"] == 3 and beta["record_paired_difference"] == pytest.approx(0.01 / 3)
    assert beta["record_p_value"] > 0.5
    # The comparison's runs are ordinary runs of their rows too.
    assert (paired["alpha"]["runs"], beta["runs"]) == (6, 9)


def test_a_row_that_loses_on_its_own_runs_but_wins_in_pairs_is_the_record_on_a_paired_track(
    paired_board, monkeypatch, capsys, tmp_path
):
    unpaired = _rows(monkeypatch, capsys, paired_board, tmp_path, paired=False)
    assert unpaired["gamma"]["record_status"] == NOT_SIGNIFICANT and unpaired["gamma"]["record_p_value"] > 0.1

    paired = _rows(monkeypatch, capsys, paired_board, tmp_path, paired=True)
    gamma = paired["gamma"]
    assert gamma["record_status"] == RECORD and gamma["record_baseline"] == "alpha"
    # Only cmp-ag counts: in cmp-ga gamma is the baseline.
    assert gamma["record_pairs"] == 3
    assert gamma["record_paired_difference"] == pytest.approx(-0.02)
    assert gamma["record_paired_standard_error"] == pytest.approx(0.001 / 3**0.5)
    assert gamma["record_improvement"] == pytest.approx(0.02) and gamma["record_p_value"] < 0.001
    assert paired["alpha"]["record_status"] == "former record"
    # delta's own runs are far better, but its only comparison is unofficial and against a former holder.
    delta = paired["delta"]
    assert delta["record_status"] == TOO_FEW_PAIRS and delta["record_baseline"] == "gamma"
    assert delta["record_pairs"] == 0 and delta["record_p_value"] is None


def test_the_paired_evidence_is_shown_beside_the_record_in_every_format(paired_board, monkeypatch, capsys, tmp_path):
    evidence = "paired vs alpha: -0.0200 ± 0.0006 over 3 pairs, p="
    markdown = _page(monkeypatch, capsys, paired_board, tmp_path, "markdown")
    assert f"★ record ({evidence}" in markdown
    assert "not a record: needs ≥3 scored pairs of a comparison vs gamma, has 0" in markdown
    assert "a one-sided paired t-test at p &lt; 0.01" in markdown  # the rule says what it asks
    assert f"★ record ({evidence}" in _page(monkeypatch, capsys, paired_board, tmp_path, "html")
    assert f"★ record ({evidence}" in _page(monkeypatch, capsys, paired_board, tmp_path, "table")


def test_an_unpaired_track_shows_what_it_showed_before(paired_board, monkeypatch, capsys, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES.replace("paired = {paired}\n", ""))  # a rules file from before the option
    outputs = []
    for path in (rules, tmp_path / "rules-false.toml"):
        if path != rules:
            path.write_text(RULES.format(paired="false"))
        code, stdout, _ = leaderboard(monkeypatch, capsys, paired_board, "--format", "markdown", "--rules", path)
        outputs.append(stdout)
    assert outputs[0] == outputs[1] and "paired" not in outputs[0]


# --- which pairs count ----------------------------------------------------------------------------


def _run(
    name: str, seed: int, loss: float, comparison: tuple[str, int, str] | None, *, hour: int = 0, drawn: bool = False
) -> Run:
    cid, pair, side = comparison if comparison else (None, None, None)
    return Run(
        run_id=f"{name}-{seed}-{hour}",
        seed=seed,
        seed_drawn=drawn,
        val_loss=loss,
        val_bpb=loss / 2.3,
        train_seconds=55.0,
        budget_s=60.0,
        started_at=T0 + timedelta(hours=hour),
        ended_at=T0 + timedelta(hours=hour),
        signer="tester",
        authors=["A"],
        description="",
        loss_curve={},
        val_curve=[],
        target=None,
        throttled_s=None,
        throttle_reasons=(),
        gpu=None,
        calibration_factor=None,
        dev_val_loss=None,
        contaminated=False,
        comparison=None if comparison is None else {"id": cid, "pair": pair, "side": side},
    )


def test_pairs_count_once_with_one_seed_and_drawn_seeds_where_the_rule_says_so():
    holder = Row(
        "cpu-1min",
        "alpha",
        True,
        False,
        runs=[
            _run("alpha", 1, 4.0, ("c1", 1, "a"), hour=1),
            _run("alpha", 1, 3.0, ("c1", 1, "a"), hour=9),  # the same slot again: a re-roll, not counted
            _run("alpha", 2, 4.0, ("c1", 2, "a"), hour=2, drawn=True),
            _run("alpha", 3, 4.0, ("c1", 3, "a"), hour=3, drawn=True),
            _run("alpha", 4, 4.0, ("c2", 1, "a"), hour=4),
            _run("alpha", 5, 4.0, ("c2", 2, "b"), hour=5),  # alpha as the challenger: not the holder's side
            _run("alpha", 0, 4.0, None),
        ],
    )
    challenger = Row(
        "cpu-1min",
        "beta",
        True,
        False,
        runs=[
            _run("beta", 1, 3.9, ("c1", 1, "b"), hour=1),
            _run("beta", 2, 3.8, ("c1", 2, "b"), hour=2, drawn=True),
            _run("beta", 3, 3.7, ("c1", 3, "b"), hour=3),  # its holder's run was drawn, this one not
            _run("beta", 7, 3.0, ("c2", 1, "b"), hour=4),  # another seed than its pair's holder run
            _run("beta", 5, 3.0, ("c2", 2, "a"), hour=5),
        ],
    )
    assert paired_differences(holder, challenger, DEFAULT_RULE) == pytest.approx([-0.1, -0.2, -0.3])
    drawn_only = dataclasses.replace(DEFAULT_RULE, drawn_seeds_only=True)
    assert paired_differences(holder, challenger, drawn_only) == pytest.approx([-0.2])


def test_on_a_time_to_target_track_pairs_compare_times_and_need_both_to_reach_it():
    def timed(run: Run, time_s: float | None) -> Run:
        return dataclasses.replace(
            run, target={"val_loss": 4.1, "provisional": False, "reached": time_s is not None, "time_s": time_s}
        )

    holder = Row(
        "toy-target",
        "alpha",
        True,
        False,
        target=TrackTarget(4.1, False),
        runs=[timed(_run("alpha", s, 4.0, ("c", s, "a"), hour=s), t) for s, t in ((1, 30.0), (2, 31.0), (3, 29.0))],
    )
    challenger = Row(
        "toy-target",
        "beta",
        True,
        False,
        target=TrackTarget(4.1, False),
        runs=[timed(_run("beta", s, 4.0, ("c", s, "b"), hour=s), t) for s, t in ((1, 20.0), (2, None), (3, 24.0))],
    )
    assert paired_differences(holder, challenger, DEFAULT_RULE) == [-10.0, -5.0]


def test_a_paired_track_still_needs_the_rows_own_seeds():
    rule = dataclasses.replace(DEFAULT_RULE, paired=True)
    holder = Row("cpu-1min", "alpha", True, False, runs=[_run("alpha", s, 4.0, None, hour=s) for s in range(3)])
    challenger = Row("cpu-1min", "beta", True, False, runs=[_run("beta", 1, 3.0, ("c", 1, "a"), hour=5)])
    _mark_records([holder, challenger], rule)
    assert (holder.record_status, challenger.record_status) == (RECORD, TOO_FEW_SEEDS)

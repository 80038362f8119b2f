"""Pooling verified runs into rows, ranking them, and each track's record (evaluator/leaderboard/board.py)."""

from __future__ import annotations

import dataclasses
import json
import statistics
from datetime import timedelta
from pathlib import Path

import pytest
from leaderboard_support import (
    DEFAULT_RULE,
    RANKED,
    SUBMISSIONS,
    TARGET,
    TIMED,
    TIMED_ORDER,
    _signer,
    _timed_rules,
    leaderboard,
)
from publish_support import T0, make_run, run_cli

from evaluator.leaderboard.board import (
    FORMER_RECORD,
    NOT_ELIGIBLE,
    NOT_REACHED,
    NOT_SIGNIFICANT,
    RECORD,
    TOO_FEW_SEEDS,
    TOO_SMALL,
    Row,
    Run,
    TrackTarget,
    _mark_records,
)
from evaluator.leaderboard.rules import RecordRule
from evaluator.leaderboard.stats import welch_one_sided_p
from evaluator.publish import publish


def test_rows_are_ranked_with_statistics_and_records(board, monkeypatch, capsys):
    code, stdout, stderr = leaderboard(monkeypatch, capsys, board, "--track", "cpu-1min", "--format", "json")
    assert code == 1
    document = json.loads(stdout)
    rows = document["rows"]
    assert [row["submission"] for row in rows] == RANKED
    assert [row["rank"] for row in rows] == [1, 2, 3, 4, None]
    by_name = {row["submission"]: row for row in rows}
    for name, (_, losses, official) in SUBMISSIONS.items():
        row = by_name[name]
        assert row["runs"] == row["seeds"] == len(losses)
        assert row["val_loss_mean"] == pytest.approx(statistics.mean(losses))
        assert row["val_loss_std"] == pytest.approx(statistics.stdev(losses))
        assert row["best_val_loss"] == min(losses)
        assert row["official"] is official

    assert by_name["alpha"]["record_status"] == FORMER_RECORD
    assert by_name["alpha"]["record_p_value"] is None  # the first record is not tested against anyone
    assert by_name["beta"]["record_status"] == RECORD
    assert by_name["beta"]["record_baseline"] == "alpha"
    assert by_name["beta"]["record_p_value"] == pytest.approx(
        welch_one_sided_p(SUBMISSIONS["alpha"][1], SUBMISSIONS["beta"][1])
    )
    assert by_name["beta"]["record_p_value"] < 0.05
    assert by_name["gamma"]["record_status"] == NOT_SIGNIFICANT
    assert by_name["gamma"]["record_baseline"] == "beta" and by_name["gamma"]["record_p_value"] >= 0.05
    assert by_name["delta"]["record_status"] == TOO_FEW_SEEDS
    assert by_name["epsilon"]["record_status"] == NOT_ELIGIBLE

    # Tampered, unknown key and a copied envelope never count, and each is reported with why.
    assert "zeta" not in by_name and "eta" not in by_name
    reasons = {Path(item["path"]).name: item["reason"] for item in document["rejected"]}
    assert "does not match the payload" in reasons["zeta-s0.json"]
    assert "unknown key" in reasons["eta-s0.json"]
    assert "duplicate of run alpha-s0" in reasons["copy-of-s0.json"]
    assert "3 envelope(s) rejected" in stderr


def test_every_track_gets_its_own_ranking(board, monkeypatch, capsys):
    code, stdout, _ = leaderboard(monkeypatch, capsys, board, "--format", "json")
    rows = json.loads(stdout)["rows"]
    t4 = [row for row in rows if row["track"] == "t4-5min"]
    assert code == 1 and len(rows) == len(SUBMISSIONS) + 1
    assert [(row["submission"], row["rank"], row["runs"]) for row in t4] == [("alpha", 1, 1)]


# --- the record rule of each track ------------------------------------------------------------


def _runs(
    losses: list[float], *, drawn: bool = False, first_seed: int = 0, seeds: list[int] | None = None
) -> list[Run]:
    seeds = seeds or list(range(first_seed, first_seed + len(losses)))
    return [
        Run(
            run_id=f"r{seed}-{index}",
            seed=seed,
            seed_drawn=drawn,
            val_loss=loss,
            val_bpb=loss / 2.3,
            train_seconds=55.0,
            budget_s=60.0,
            started_at=T0,
            ended_at=T0,
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
            dev_val_loss=loss - 0.05,
            contaminated=False,
            comparison=None,
        )
        for index, (seed, loss) in enumerate(zip(seeds, losses, strict=True))
    ]


def _timed_runs(times: list[float | None], **kwargs) -> list[Run]:
    """Runs of a time-to-target track; None: that run did not reach the target."""
    return [
        dataclasses.replace(
            run, target={"val_loss": 4.1, "provisional": False, "reached": time_s is not None, "time_s": time_s}
        )
        for run, time_s in zip(_runs([4.0] * len(times), **kwargs), times, strict=True)
    ]


def _statuses(
    rule: RecordRule, target: TrackTarget | None = None, **rows: list[Run]
) -> dict[str, tuple[str, float | None]]:
    board = [Row("cpu-1min", name, True, False, runs, target=target) for name, runs in rows.items()]
    for order, row in enumerate(board):  # first runs in the order given
        row.runs = [dataclasses.replace(run, started_at=T0 + timedelta(days=order)) for run in row.runs]
    _mark_records(board, rule)
    return {row.submission: (row.record_status, row.record_improvement) for row in board}


def test_a_record_needs_both_significance_and_the_minimum_improvement():
    steady = [4.000, 4.0005, 3.9995]
    statuses = _statuses(
        DEFAULT_RULE,
        holder=_runs(steady),
        tiny_gain=_runs([3.997, 3.9975, 3.9965]),  # p far below 0.01, but only 0.003 nats better
        noisy_gain=_runs([3.90, 4.05, 3.80]),  # 0.08 nats better on average, p about 0.2
        clear_gain=_runs([3.990, 3.9905, 3.9895]),  # 0.010 nats better, p tiny
    )
    assert statuses["tiny_gain"][0] == TOO_SMALL and statuses["tiny_gain"][1] == pytest.approx(0.003)
    assert statuses["noisy_gain"][0] == NOT_SIGNIFICANT
    assert statuses["clear_gain"] == (RECORD, pytest.approx(0.010))
    assert statuses["holder"][0] == FORMER_RECORD
    # Exactly the minimum improvement is enough, whatever the float subtraction of the means gives.
    # (Unrounded, these means differ by 0.004999999999999893.)
    exact = _statuses(DEFAULT_RULE, holder=_runs([3.999, 3.9995, 3.9985]), exact=_runs([3.994, 3.9945, 3.9935]))
    assert exact["exact"] == (RECORD, 0.005)
    # The same runs under a looser rule: the tiny gain takes the record first, and the clear gain is
    # then tested against it (0.007 better, still a record).
    loose = dataclasses.replace(DEFAULT_RULE, min_improvement_nats=0.0)
    statuses = _statuses(
        loose, holder=_runs(steady), tiny_gain=_runs([3.997, 3.9975, 3.9965]), clear_gain=_runs([3.990, 3.9905, 3.9895])
    )
    assert statuses == {
        "holder": (FORMER_RECORD, None),
        "tiny_gain": (FORMER_RECORD, pytest.approx(0.003)),
        "clear_gain": (RECORD, pytest.approx(0.007)),
    }


def test_only_drawn_seeds_count_where_the_rule_says_so():
    drawn_only = dataclasses.replace(DEFAULT_RULE, drawn_seeds_only=True)
    holder = _runs([4.0, 4.001, 3.999], drawn=True)
    # Clearly better on its drawn seeds, far worse on two public ones.
    challenger = _runs([3.9, 3.901, 3.899], drawn=True, first_seed=10) + _runs([5.0, 5.0], first_seed=20)
    public = _runs([3.0, 3.01, 3.02], first_seed=30)  # far better, but on seeds the competitor knew
    statuses = _statuses(drawn_only, holder=holder, challenger=challenger, public=public)
    assert statuses["challenger"] == (RECORD, pytest.approx(0.1))
    assert statuses["public"] == (TOO_FEW_SEEDS, None)
    statuses = _statuses(DEFAULT_RULE, holder=holder, challenger=challenger, public=public)
    assert statuses["challenger"][0] == NOT_SIGNIFICANT  # with the public runs counted
    assert statuses["public"][0] == RECORD


def test_a_seed_run_again_is_one_sample_of_the_record_test():
    row = Row("cpu-1min", "repeats", True, False, _runs([3.0, 3.2, 3.1, 3.3, 4.0, 5.0], seeds=[0, 0, 0, 0, 1, 2]))
    assert row.counted_scores(DEFAULT_RULE) == [pytest.approx(3.15), 4.0, 5.0]
    assert row.counted_seeds(DEFAULT_RULE) == 3


def test_drawn_seeds_and_throttled_runs_are_marked(tmp_path, monkeypatch, capsys):
    _, key, trusted = _signer(tmp_path)
    results = tmp_path / "results"
    summary = {
        "samples": 50,
        "interval_s": 1.0,
        "unavailable": None,
        "sm_clock_mhz": {"min": 300, "median": 1590, "max": 1590},
        "memory_clock_mhz": {"min": 5000, "median": 5000, "max": 5000},
        "temperature_c": {"min": 40, "median": 70, "max": 84},
        "power_w": {"min": 20.0, "median": 69.5, "max": 70.1},
        "throttle_reasons": ["sw_power_cap"],
    }
    for seed, throttled in enumerate([0.0, 12.0, 0.0]):
        # Two boards of one host: the same model, told apart by bus id and UUID.
        gpu = {
            "name": "Tesla T4",
            "driver": "535.183.01",
            "cuda": "12.6",
            "memory_gib": 15.0,
            "index": seed % 2,
            "minor": seed % 2,
            "pci_bus_id": f"00000000:{0x3B + seed % 2:02X}:00.0",
            "uuid": f"GPU-{seed % 2}",
        }
        run_dir = make_run(
            tmp_path,
            f"hot-s{seed}",
            submission="hot",
            seed=1000 + seed,
            seed_drawn=True,
            started_at=T0 + timedelta(hours=seed),
            gpu_telemetry=summary | {"throttled_s": throttled},
            gpu=gpu,
        )
        publish(run_dir, key, results, False)
    code, stdout, _ = run_cli(
        monkeypatch, capsys, "leaderboard", "--results", results, "--trusted-keys", trusted, "--format", "json"
    )
    row = json.loads(stdout)["rows"][0]
    assert code == 0 and row["drawn_seeds"] == 3 and row["throttled_runs"] == 1
    assert [run["seed_drawn"] for run in row["run_details"]] == [True] * 3
    assert [run["throttled_s"] for run in row["run_details"]] == [0.0, 12.0, 0.0]
    assert [(run["gpu"]["pci_bus_id"], run["gpu"]["uuid"]) for run in row["run_details"]] == [
        ("00000000:3B:00.0", "GPU-0"),
        ("00000000:3C:00.0", "GPU-1"),
        ("00000000:3B:00.0", "GPU-0"),
    ]
    code, stdout, _ = run_cli(
        monkeypatch, capsys, "leaderboard", "--results", results, "--trusted-keys", trusted, "--format", "markdown"
    )
    assert "| 3 (3 drawn) |" in stdout and "| throttled in 1/3: power cap |" in stdout


def test_a_target_track_ranks_by_mean_time_and_lists_rows_that_missed_after(timed_board, monkeypatch, capsys, tmp_path):
    code, stdout, _ = leaderboard(
        monkeypatch, capsys, timed_board, "--format", "json", "--rules", _timed_rules(tmp_path)
    )
    assert code == 0
    document = json.loads(stdout)
    rows = document["rows"]
    assert [row["submission"] for row in rows] == TIMED_ORDER
    assert [row["rank"] for row in rows] == [1, 2, 3, 4, None, None]
    by_name = {row["submission"]: row for row in rows}
    for name, (_, times, _) in TIMED.items():
        row = by_name[name]
        reached = [t for t in times if t is not None]
        assert row["target_val_loss"] == TARGET and row["target_provisional"] is True
        assert row["reached_runs"] == len(reached) and row["best_time_to_target"] == min(reached)
        assert row["best_time_run_id"] == f"{name}-s{times.index(min(reached))}"
        if len(reached) == len(times):
            assert row["time_to_target_mean"] == pytest.approx(statistics.mean(times))
            assert row["time_to_target_std"] == pytest.approx(statistics.stdev(times))
        else:  # no mean of the lucky runs alone
            assert row["time_to_target_mean"] is None and row["time_to_target_std"] is None
    assert by_name["steady"]["record_status"] == FORMER_RECORD
    assert by_name["swift"]["record_status"] == RECORD and by_name["swift"]["record_baseline"] == "steady"
    assert by_name["swift"]["record_improvement"] == pytest.approx(30.1 - 20.01)  # seconds, not nats
    assert by_name["close"]["record_status"] == NOT_SIGNIFICANT
    assert by_name["tiny"]["record_status"] == TOO_SMALL and by_name["tiny"]["record_improvement"] == pytest.approx(0.5)
    assert by_name["tiny"]["record_p_value"] < 0.01
    assert by_name["partial"]["record_status"] == NOT_REACHED and by_name["partial"]["record_p_value"] is None
    assert by_name["hasty"]["record_status"] == NOT_ELIGIBLE
    # Each run's measured curve and target travel with the row.
    run = by_name["partial"]["run_details"][1]
    assert run["target"] == {"val_loss": TARGET, "provisional": True, "reached": False, "time_s": None}
    assert [point["scored"] for point in run["val_curve"]] == ["ok"] * 6
    assert document["tracks"]["toy-target"]["kind"] == "time_to_target"
    assert document["record_rules"]["toy-target"]["text"].startswith(
        "Track toy-target: a record needs runs on at least 3 distinct seeds, every run of the row reaching the target"
    )
    assert "a mean time to target shorter by at least 1 s" in document["record_rules"]["toy-target"]["text"]


def test_the_record_rule_on_a_target_track_counts_seconds(timed_board, monkeypatch, capsys, tmp_path):
    # min_improvement_nats is not what a time is held to: a huge one changes nothing here.
    rules = _timed_rules(tmp_path, nats=100.0, seconds=0.4)
    code, stdout, _ = leaderboard(monkeypatch, capsys, timed_board, "--format", "json", "--rules", rules)
    by_name = {row["submission"]: row for row in json.loads(stdout)["rows"]}
    assert (
        code == 0 and by_name["tiny"]["record_status"] == RECORD and by_name["swift"]["record_status"] == FORMER_RECORD
    )
    code, stdout, _ = leaderboard(
        monkeypatch, capsys, timed_board, "--format", "json", "--rules", _timed_rules(tmp_path, seconds=20.0)
    )
    by_name = {row["submission"]: row for row in json.loads(stdout)["rows"]}
    assert by_name["swift"]["record_status"] == TOO_SMALL and by_name["steady"]["record_status"] == RECORD


def test_record_statuses_of_timed_rows():
    target = TrackTarget(4.1, False)
    statuses = _statuses(
        DEFAULT_RULE,
        target,
        holder=_timed_runs([30.0, 30.02, 29.98]),
        missed=_timed_runs([10.0, None, 10.0]),
        small=_timed_runs([29.5, 29.52, 29.48]),
        clear=_timed_runs([28.0, 28.02, 27.98]),
    )
    assert statuses == {
        "holder": (FORMER_RECORD, None),
        "missed": (NOT_REACHED, None),
        "small": (TOO_SMALL, pytest.approx(0.5)),
        "clear": (RECORD, pytest.approx(2.0)),
    }
    # A fixed-time rule's nats do not apply to seconds, nor seconds to nats.
    assert (
        _statuses(
            dataclasses.replace(DEFAULT_RULE, min_improvement_s=0.0),
            target,
            holder=_timed_runs([30.0, 30.02, 29.98]),
            small=_timed_runs([29.5, 29.52, 29.48]),
        )["small"][0]
        == RECORD
    )
    fixed = _statuses(
        dataclasses.replace(DEFAULT_RULE, min_improvement_s=1e9),
        holder=_runs([4.0, 4.0005, 3.9995]),
        clear=_runs([3.990, 3.9905, 3.9895]),
    )
    assert fixed["clear"] == (RECORD, pytest.approx(0.010))


def test_a_run_made_for_another_goal_is_set_aside(tmp_path, monkeypatch, capsys):
    _, key, trusted = _signer(tmp_path)
    results = tmp_path / "results"
    for seed in range(3):
        publish(
            make_run(
                tmp_path,
                f"new-s{seed}",
                submission="new",
                track="toy-target",
                seed=seed,
                target=4.1,
                time_to_target=30.0 + seed,
                started_at=T0 + timedelta(days=2, hours=seed),
            ),
            key,
            results,
            False,
        )
    publish(
        make_run(tmp_path, "old-s0", submission="old", track="toy-target", target=4.2, time_to_target=20.0),
        key,
        results,
        False,
    )
    publish(
        make_run(tmp_path, "older-s0", submission="older", track="toy-target", started_at=T0 - timedelta(days=1)),
        key,
        results,
        False,
    )
    code, stdout, stderr = run_cli(
        monkeypatch, capsys, "leaderboard", "--results", results, "--trusted-keys", trusted, "--format", "json"
    )
    document = json.loads(stdout)
    assert code == 1 and [row["submission"] for row in document["rows"]] == ["new"]
    reasons = {Path(item["path"]).name: item["reason"] for item in document["rejected"]}
    assert reasons["old-s0.json"] == (
        "run old-s0 was made for the target val_loss 4.2, the track's newest run (new-s2) for "
        "the target val_loss 4.1: their scores are not comparable"
    )
    assert "run older-s0 was made for a fixed time" in reasons["older-s0.json"]
    assert "2 envelope(s) rejected" in stderr


def test_development_runs_form_a_table_of_their_own_and_contaminated_runs_are_marked(tmp_path, monkeypatch, capsys):
    """Runs scored on the public split are ranked among themselves and never hold a record, however
    good; an official row shows its public-split score and how many runs the contamination check flagged."""
    _, key, trusted = _signer(tmp_path)
    results = tmp_path / "results"
    for seed, loss in enumerate([4.00, 4.01, 3.99]):
        publish(
            make_run(
                tmp_path,
                f"honest-s{seed}",
                submission="honest",
                seed=seed,
                val_loss=loss,
                started_at=T0 + timedelta(hours=seed),
            ),
            key,
            results,
            False,
        )
        publish(
            make_run(
                tmp_path,
                f"cheat-s{seed}",
                submission="cheat",
                seed=seed,
                val_loss=loss + 0.3,
                dev_val_loss=0.05 if seed else loss,
                started_at=T0 + timedelta(days=1, hours=seed),
            ),
            key,
            results,
            False,
        )
        publish(
            make_run(
                tmp_path,
                f"dev-s{seed}",
                submission="dev",
                seed=seed,
                val_loss=1.0 + seed / 100,
                scored_on="public",
                started_at=T0 + timedelta(days=2, hours=seed),
            ),
            key,
            results,
            True,
        )
    # A failed official run is published too, and counted beside the scored ones: no free re-roll.
    publish(
        make_run(
            tmp_path, "honest-s3", submission="honest", seed=3, status="crashed", started_at=T0 + timedelta(hours=3)
        ),
        key,
        results,
        False,
    )
    code, stdout, _ = run_cli(
        monkeypatch, capsys, "leaderboard", "--results", results, "--trusted-keys", trusted, "--format", "json"
    )
    assert code == 0
    rows = {row["submission"]: row for row in json.loads(stdout)["rows"]}
    assert rows["honest"]["rank"] == 1 and rows["honest"]["record_status"] == "record"
    assert rows["honest"]["public_val_loss_mean"] == pytest.approx(3.95) and rows["honest"]["contaminated_runs"] == 0
    assert (rows["honest"]["runs"], rows["honest"]["failed_statuses"]) == (3, ["crashed"])
    assert rows["cheat"]["contaminated_runs"] == 2 and rows["cheat"]["official"] is True
    assert rows["dev"]["development"] is True and rows["dev"]["official"] is False
    assert rows["dev"]["rank"] == 1 and rows["dev"]["record_status"] == "development"  # first of its own table
    assert rows["dev"]["public_val_loss_mean"] is None

    code, stdout, _ = run_cli(
        monkeypatch, capsys, "leaderboard", "--results", results, "--trusted-keys", trusted, "--format", "markdown"
    )
    assert code == 0
    headings = [line for line in stdout.splitlines() if line.startswith("## ")]
    assert headings == ["## Track `cpu-1min`", "## Track `cpu-1min` · development (public split)"]
    official, development = stdout.split(headings[1])
    assert "| public val_loss |" in official and "official, contaminated in 2/3" in official
    assert "| 1 | **honest** | 4.0000 ± 0.0100 | 3 + 1 failed |" in official
    assert (
        "public val_loss" not in development
        and "Development table: these runs were scored on the public split" in development
    )
    assert "| 1 | dev |" in development and "| development | never a record (public split) |" in development


def test_a_name_belongs_to_the_folder_that_published_under_it_first(tmp_path, monkeypatch, capsys):
    """A second folder that takes a published name (its own folder called the same, elsewhere) cannot
    pool its runs into the first one's row: they are set aside with the reason."""
    _, key, trusted = _signer(tmp_path)
    results = tmp_path / "results"
    for seed, loss in enumerate([4.00, 4.01, 3.99]):
        publish(
            make_run(
                tmp_path / "first",
                f"alpha-s{seed}",
                submission="alpha",
                seed=seed,
                val_loss=loss,
                started_at=T0 + timedelta(hours=seed),
            ),
            key,
            results,
            False,
        )
    squatter = make_run(
        tmp_path / "second", "squat-s0", submission="alpha", val_loss=6.0, started_at=T0 + timedelta(days=1)
    )
    publish(squatter, key, results, False)
    code, stdout, stderr = run_cli(
        monkeypatch, capsys, "leaderboard", "--results", results, "--trusted-keys", trusted, "--format", "json"
    )
    assert code == 1  # something was set aside
    [row] = json.loads(stdout)["rows"]
    assert row["submission"] == "alpha" and row["runs"] == 3 and row["val_loss_mean"] == pytest.approx(4.0)
    assert "run squat-s0 ran" in stderr and "but the name 'alpha' belongs to" in stderr

"""The leaderboard: statistics, ranking, the record rule, rejected envelopes, every output format."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import re
import shutil
import statistics
import sys
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import evaluator.leaderboard as leaderboard_module
from evaluator.leaderboard import (
    COLUMNS,
    FORMER_RECORD,
    NOT_ELIGIBLE,
    NOT_REACHED,
    NOT_SIGNIFICANT,
    RECORD,
    TARGET_COLUMNS,
    TOO_FEW_SEEDS,
    TOO_SMALL,
    Row,
    Run,
    TrackTarget,
    _mark_records,
    regularized_incomplete_beta,
    student_t_cdf,
    welch_one_sided_p,
)
from evaluator.paths import RECORD_RULES_FILE
from evaluator.record_rules import RecordRule, load_record_rules
from evaluator.signing import generate_key_pair, load_private_key, publish
from test_signing import T0, _sign_with_unknown_key, _tamper_payload, make_run, published, run_cli

# --- statistics against closed forms and published values ---------------------------------------


@pytest.mark.parametrize("x", [0.0, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0])
def test_incomplete_beta_closed_forms(x):
    assert regularized_incomplete_beta(1, 1, x) == pytest.approx(x, abs=1e-14)
    assert regularized_incomplete_beta(3.5, 1, x) == pytest.approx(x**3.5, abs=1e-13)
    assert regularized_incomplete_beta(1, 4, x) == pytest.approx(1 - (1 - x) ** 4, abs=1e-13)
    assert regularized_incomplete_beta(2.5, 7.0, x) == pytest.approx(
        1 - regularized_incomplete_beta(7.0, 2.5, 1 - x), abs=1e-13
    )


@pytest.mark.parametrize("t", [-30.0, -2.5, -0.4, 0.0, 0.7, 1.9, 12.0])
def test_student_t_cdf_matches_closed_forms_for_one_two_and_four_degrees(t):
    assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)
    assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)
    x = t / math.sqrt(4 + t * t)
    assert student_t_cdf(t, 4) == pytest.approx(0.5 + 0.75 * x - x**3 / 4, abs=1e-13)


@pytest.mark.parametrize(
    "t, df, probability",
    [
        (2.228138851986274, 10, 0.975),
        (2.0150483733330233, 5, 0.95),
        (4.060711359300081, 3.5, 0.99),  # fractional df, as Welch's test produces
        (2.580754698065951, 1000, 0.995),
        (-2.228138851986274, 10, 0.025),
    ],
)
def test_student_t_cdf_at_tabulated_quantiles(t, df, probability):
    assert student_t_cdf(t, df) == pytest.approx(probability, abs=1e-12)


def test_welch_one_sided_p_values():
    # Means 5 and 2, unit variances, n=3 each: t = 3/sqrt(2/3), df = 4 exactly.
    t = 3 / math.sqrt(2 / 3)
    x = t / math.sqrt(4 + t * t)
    assert welch_one_sided_p([4, 5, 6], [1, 2, 3]) == pytest.approx(1 - (0.5 + 0.75 * x - x**3 / 4), abs=1e-13)
    # Unequal variances and a fractional df (value from an independent implementation).
    assert welch_one_sided_p([3.1, 3.2, 3.15], [3.0, 3.05, 3.02]) == pytest.approx(0.0152043639770726, abs=1e-12)
    # One-sided: a worse challenger gets a large p.
    assert welch_one_sided_p([1, 2, 3], [4, 5, 6]) == pytest.approx(1 - welch_one_sided_p([4, 5, 6], [1, 2, 3]))
    assert welch_one_sided_p([2.0, 2.0, 2.0], [1.0, 1.0, 1.0]) == 0.0
    assert welch_one_sided_p([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]) == 1.0


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
                root, f"{name}-s{seed}", submission=name, seed=seed, val_loss=loss, official=official,
                started_at=T0 + timedelta(days=days, hours=seed), authors=authors,
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


def _runs(losses: list[float], *, drawn: bool = False, first_seed: int = 0, seeds: list[int] | None = None) -> list[Run]:
    seeds = seeds or list(range(first_seed, first_seed + len(losses)))
    return [
        Run(run_id=f"r{seed}-{index}", seed=seed, seed_drawn=drawn, val_loss=loss, val_bpb=loss / 2.3,
            train_seconds=55.0, budget_s=60.0, started_at=T0, ended_at=T0, signer="tester", authors=["A"],
            description="", loss_curve={}, val_curve=[], target=None, throttled_s=None, throttle_reasons=(), gpu=None,
            calibration_factor=None)
        for index, (seed, loss) in enumerate(zip(seeds, losses))
    ]


def _timed_runs(times: list[float | None], **kwargs) -> list[Run]:
    """Runs of a time-to-target track; None: that run did not reach the target."""
    return [dataclasses.replace(run, target={"val_loss": 4.1, "provisional": False, "reached": time_s is not None,
                                             "time_s": time_s})
            for run, time_s in zip(_runs([4.0] * len(times), **kwargs), times)]


def _statuses(rule: RecordRule, target: TrackTarget | None = None, **rows: list[Run]) -> dict[str, tuple[str, float | None]]:
    board = [Row("cpu-1min", name, True, False, runs, target=target) for name, runs in rows.items()]
    for order, row in enumerate(board):  # first runs in the order given
        row.runs = [dataclasses.replace(run, started_at=T0 + timedelta(days=order)) for run in row.runs]
    _mark_records(board, rule)
    return {row.submission: (row.record_status, row.record_improvement) for row in board}


DEFAULT_RULE = RecordRule(min_seeds=3, p_below=0.01, min_improvement_nats=0.005, min_improvement_s=1.0,
                          drawn_seeds_only=False)


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
    statuses = _statuses(loose, holder=_runs(steady), tiny_gain=_runs([3.997, 3.9975, 3.9965]),
                         clear_gain=_runs([3.990, 3.9905, 3.9895]))
    assert statuses == {"holder": (FORMER_RECORD, None), "tiny_gain": (FORMER_RECORD, pytest.approx(0.003)),
                        "clear_gain": (RECORD, pytest.approx(0.007))}


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


def _write_rules(path: Path, text: str) -> Path:
    path.write_text("schema = 1\n[default]\nmin_seeds = 3\np_below = 0.01\nmin_improvement_nats = 0.005\n"
                    "min_improvement_s = 1.0\ndrawn_seeds_only = false\n" + text)
    return path


def test_the_rules_file_sets_each_tracks_rule_and_the_page_states_it(board, monkeypatch, capsys, tmp_path):
    rules = _write_rules(tmp_path / "rules.toml", "[track.cpu-1min]\nmin_seeds = 4\np_below = 0.2\n")
    code, stdout, _ = leaderboard(monkeypatch, capsys, board, "--format", "json", "--rules", rules)
    document = json.loads(stdout)
    assert code == 1
    cpu_rule = document["record_rules"]["cpu-1min"]
    assert cpu_rule.pop("text").startswith("Track cpu-1min: a record needs runs on at least 4 distinct seeds")
    assert cpu_rule == {"min_seeds": 4, "p_below": 0.2, "min_improvement_nats": 0.005, "min_improvement_s": 1.0,
                        "drawn_seeds_only": False}
    assert document["record_rules"]["t4-5min"]["min_seeds"] == 3  # [default] where a track has no section
    assert {row["record_status"] for row in document["rows"] if row["track"] == "cpu-1min" and row["official"]} == {TOO_FEW_SEEDS}
    code, stdout, _ = leaderboard(monkeypatch, capsys, board, "--format", "markdown", "--rules", rules)
    assert "Track cpu-1min: a record needs runs on at least 4 distinct seeds" in stdout
    assert "p &lt; 0.2 with a mean val\\_loss lower by at least 0.005 nats" in stdout


@pytest.mark.parametrize("text, problem", [
    ("[track.cpu-1min]\np_below = 2\n", "track.cpu-1min.p_below"),
    ("[track.cpu-1min]\nmin_seeds = 1\n", "track.cpu-1min.min_seeds"),
    ("[track.cpu-1min]\nseeds = 3\n", "Additional properties"),
    ("[default\n", "cannot read the record rules"),
    ("[track.t4-5mn]\ndrawn_seeds_only = true\n", "[track.t4-5mn] names no track"),
])
def test_a_broken_rules_file_is_one_line_naming_the_field(board, monkeypatch, capsys, tmp_path, text, problem):
    rules = _write_rules(tmp_path / "rules.toml", text)
    code, stdout, stderr = leaderboard(monkeypatch, capsys, board, "--rules", rules)
    assert code == 2 and stdout == "" and problem in stderr and len(stderr.strip().splitlines()) == 1


def test_the_shipped_rules_are_valid_and_strict_on_the_t4_track():
    rules = load_record_rules(RECORD_RULES_FILE)
    assert rules.for_track("cpu-1min") == DEFAULT_RULE
    assert rules.for_track("t4-5min") == dataclasses.replace(DEFAULT_RULE, drawn_seeds_only=True)


def test_drawn_seeds_and_throttled_runs_are_marked(tmp_path, monkeypatch, capsys):
    _, key, trusted = _signer(tmp_path)
    results = tmp_path / "results"
    summary = {"samples": 50, "interval_s": 1.0, "unavailable": None, "sm_clock_mhz": {"min": 300, "median": 1590, "max": 1590},
               "memory_clock_mhz": {"min": 5000, "median": 5000, "max": 5000}, "temperature_c": {"min": 40, "median": 70, "max": 84},
               "power_w": {"min": 20.0, "median": 69.5, "max": 70.1}, "throttle_reasons": ["sw_power_cap"]}
    for seed, throttled in enumerate([0.0, 12.0, 0.0]):
        # Two boards of one host: the same model, told apart by bus id and UUID.
        gpu = {"name": "Tesla T4", "driver": "535.183.01", "cuda": "12.6", "memory_gib": 15.0, "index": seed % 2,
               "minor": seed % 2, "pci_bus_id": f"00000000:{0x3B + seed % 2:02X}:00.0", "uuid": f"GPU-{seed % 2}"}
        run_dir = make_run(tmp_path, f"hot-s{seed}", submission="hot", seed=1000 + seed, seed_drawn=True,
                           started_at=T0 + timedelta(hours=seed), gpu_telemetry=summary | {"throttled_s": throttled},
                           gpu=gpu)
        publish(run_dir, key, results, False)
    code, stdout, _ = run_cli(monkeypatch, capsys, "leaderboard", "--results", results, "--trusted-keys", trusted,
                              "--format", "json")
    row = json.loads(stdout)["rows"][0]
    assert code == 0 and row["drawn_seeds"] == 3 and row["throttled_runs"] == 1
    assert [run["seed_drawn"] for run in row["run_details"]] == [True] * 3
    assert [run["throttled_s"] for run in row["run_details"]] == [0.0, 12.0, 0.0]
    assert [(run["gpu"]["pci_bus_id"], run["gpu"]["uuid"]) for run in row["run_details"]] == [
        ("00000000:3B:00.0", "GPU-0"), ("00000000:3C:00.0", "GPU-1"), ("00000000:3B:00.0", "GPU-0")]
    code, stdout, _ = run_cli(monkeypatch, capsys, "leaderboard", "--results", results, "--trusted-keys", trusted,
                              "--format", "markdown")
    assert "| 3 (3 drawn) |" in stdout and "| throttled in 1/3: power cap |" in stdout

class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href") and value and not value.startswith("#"):
                self.external.append(value)


@pytest.mark.parametrize("fmt", ["table", "markdown", "html", "json", "parquet"])
def test_every_format_writes_a_parseable_file(board, monkeypatch, capsys, tmp_path, fmt):
    out = tmp_path / f"leaderboard.{fmt}"
    code, _, stderr = leaderboard(monkeypatch, capsys, board, "--track", "cpu-1min", "--format", fmt, "--out", out)
    assert code == 1, stderr
    data = out.read_bytes()
    assert data
    if fmt == "parquet":
        table = pq.read_table(out)
        assert table.column("submission").to_pylist() == RANKED
        assert table.column("val_losses").to_pylist()[2] == SUBMISSIONS["beta"][1]
        return
    text = data.decode("utf-8")
    if fmt == "json":
        assert len(json.loads(text)["rows"]) == len(RANKED)
    elif fmt == "table":
        assert all(name in text for name in RANKED) and "record" in text
    elif fmt == "markdown":
        table_lines = [line for line in text.splitlines() if line.startswith("|")]
        assert len(table_lines) == 2 + len(RANKED)
        assert all(line.count(" | ") == table_lines[0].count(" | ") for line in table_lines[2:])
        assert "**beta**" in text and "p=" in text
    else:
        parser = _Tags()
        parser.feed(text)
        assert "svg" in parser.tags and "table" in parser.tags
        assert "script" not in parser.tags and parser.external == []
        assert "&lt;script&gt;" in text
        # per run: its training loss, its measured validation curve and one final-val_loss marker
        assert text.count("<polyline") == text.count('class="final"') == 14
        assert text.count('class="val"') == 11 and text.count('class="val unofficial"') == 3
        assert text.count('class="val-point"') == 2 * 14  # the snapshots at 20 s and 40 s; ◆ marks the final model
        assert 'class="target"' not in text  # a fixed-time track has no target line


def test_text_formats_go_to_stdout(board, monkeypatch, capsys):
    code, stdout, _ = leaderboard(monkeypatch, capsys, board, "--format", "markdown")
    assert code == 1 and stdout.startswith("# Leaderboard")
    code, stdout, _ = leaderboard(monkeypatch, capsys, board, "--track", "cpu-1min")
    assert code == 1 and "beta" in stdout and "★ record" in stdout


def test_parquet_needs_an_output_file(board, monkeypatch, capsys):
    code, _, stderr = leaderboard(monkeypatch, capsys, board, "--format", "parquet")
    assert code == 2 and "--out" in stderr


def test_an_empty_results_folder_gives_an_empty_board(tmp_path, monkeypatch, capsys):
    (tmp_path / "results").mkdir()
    (tmp_path / "keys").mkdir()
    code, stdout, _ = run_cli(
        monkeypatch, capsys, "leaderboard", "--results", tmp_path / "results", "--trusted-keys", tmp_path / "keys",
        "--format", "markdown",
    )
    assert code == 0 and "No verified results" in stdout


def test_with_nothing_to_rank_the_table_says_why_and_rejections_exit_1(tmp_path, monkeypatch, capsys):
    keys = tmp_path / "keys"
    keys.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(leaderboard_module, "RESULTS_DIR", tmp_path / "results")  # as a process started here has it
    code, stdout, _ = run_cli(monkeypatch, capsys, "leaderboard", "--trusted-keys", keys)
    assert code == 0 and stdout.startswith("nothing to rank: ") and "results/ does not exist here" in stdout
    (tmp_path / "results").mkdir()
    code, stdout, _ = run_cli(monkeypatch, capsys, "leaderboard", "--results", tmp_path / "results", "--trusted-keys", keys)
    assert code == 0 and "holds no published results" in stdout
    (tmp_path / "results" / "cpu-1min" / "alpha").mkdir(parents=True)
    (tmp_path / "results" / "cpu-1min" / "alpha" / "forged.json").write_text("{}")
    code, stdout, stderr = run_cli(monkeypatch, capsys, "leaderboard", "--results", tmp_path / "results", "--trusted-keys", keys)
    assert code == 1 and "none of the 1 envelope(s)" in stdout and "forged.json" in stderr
    code, _, _ = run_cli(monkeypatch, capsys, "leaderboard", "--results", tmp_path / "missing", "--trusted-keys", keys)
    assert code == 2


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
TIMED_RULES = "schema = 1\n[default]\nmin_seeds = 3\np_below = 0.01\nmin_improvement_nats = {nats}\nmin_improvement_s = {s}\ndrawn_seeds_only = false\n"


@pytest.fixture(scope="module")
def timed_board(tmp_path_factory):
    """Published runs of a time-to-target track that is not defined here (toy-target). Returns (results, trusted)."""
    root = tmp_path_factory.mktemp("timed")
    _, key, trusted = _signer(root)
    results = root / "results"
    for name, (days, times, official) in TIMED.items():
        for seed, time_s in enumerate(times):
            forged = [(0.5 + i, i, "val_loss", FORGED_VAL_LOSS) for i in range(30)] if name == "steady" and seed == 0 else []
            run_dir = make_run(
                root, f"{name}-s{seed}", submission=name, seed=seed, track="toy-target", target=TARGET, provisional=True,
                time_to_target=time_s, val_loss=4.3 if time_s is None else 4.05, official=official,
                started_at=T0 + timedelta(days=days, hours=seed), snapshot_every_s=10.0, logged_rows=forged,
            )
            publish(run_dir, key, results, allow_unofficial=not official)
    return results, trusted


def _timed_rules(tmp_path: Path, nats: float = 0.005, seconds: float = 1.0) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(TIMED_RULES.format(nats=nats, s=seconds))
    return path


def test_a_target_track_ranks_by_mean_time_and_lists_rows_that_missed_after(timed_board, monkeypatch, capsys, tmp_path):
    code, stdout, _ = leaderboard(monkeypatch, capsys, timed_board, "--format", "json", "--rules", _timed_rules(tmp_path))
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
        "Track toy-target: a record needs runs on at least 3 distinct seeds, every run of the row reaching the target")
    assert "a mean time to target shorter by at least 1 s" in document["record_rules"]["toy-target"]["text"]


def test_the_record_rule_on_a_target_track_counts_seconds(timed_board, monkeypatch, capsys, tmp_path):
    # min_improvement_nats is not what a time is held to: a huge one changes nothing here.
    rules = _timed_rules(tmp_path, nats=100.0, seconds=0.4)
    code, stdout, _ = leaderboard(monkeypatch, capsys, timed_board, "--format", "json", "--rules", rules)
    by_name = {row["submission"]: row for row in json.loads(stdout)["rows"]}
    assert code == 0 and by_name["tiny"]["record_status"] == RECORD and by_name["swift"]["record_status"] == FORMER_RECORD
    code, stdout, _ = leaderboard(monkeypatch, capsys, timed_board, "--format", "json", "--rules", _timed_rules(tmp_path, seconds=20.0))
    by_name = {row["submission"]: row for row in json.loads(stdout)["rows"]}
    assert by_name["swift"]["record_status"] == TOO_SMALL and by_name["steady"]["record_status"] == RECORD


def test_record_statuses_of_timed_rows():
    target = TrackTarget(4.1, False)
    statuses = _statuses(DEFAULT_RULE, target, holder=_timed_runs([30.0, 30.02, 29.98]),
                         missed=_timed_runs([10.0, None, 10.0]), small=_timed_runs([29.5, 29.52, 29.48]),
                         clear=_timed_runs([28.0, 28.02, 27.98]))
    assert statuses == {"holder": (FORMER_RECORD, None), "missed": (NOT_REACHED, None),
                        "small": (TOO_SMALL, pytest.approx(0.5)), "clear": (RECORD, pytest.approx(2.0))}
    # A fixed-time rule's nats do not apply to seconds, nor seconds to nats.
    assert _statuses(dataclasses.replace(DEFAULT_RULE, min_improvement_s=0.0), target, holder=_timed_runs([30.0, 30.02, 29.98]),
                     small=_timed_runs([29.5, 29.52, 29.48]))["small"][0] == RECORD
    fixed = _statuses(dataclasses.replace(DEFAULT_RULE, min_improvement_s=1e9), holder=_runs([4.0, 4.0005, 3.9995]),
                      clear=_runs([3.990, 3.9905, 3.9895]))
    assert fixed["clear"] == (RECORD, pytest.approx(0.010))


def test_text_formats_state_the_target_and_rank_on_times(timed_board, monkeypatch, capsys, tmp_path):
    rules = _timed_rules(tmp_path)
    code, stdout, _ = leaderboard(monkeypatch, capsys, timed_board, "--format", "markdown", "--rules", rules)
    assert code == 0
    assert "## Track `toy-target` · time to target val\\_loss 4.1 (provisional)" in stdout
    assert "The target is provisional" in stdout
    table = [line for line in stdout.splitlines() if line.startswith("|")]
    assert table[0] == "| " + " | ".join(header for header, _ in TARGET_COLUMNS) + " |"
    assert len(table) == 2 + len(TIMED) and all(line.count(" | ") == table[0].count(" | ") for line in table[2:])
    assert table[2].startswith("| 1 | tiny | 19.51 ± 0.01 s | 3 | 19.50 s | 56.0 | - |")
    assert table[3].startswith("| 2 | **swift** | 20.01 ± 0.01 s | 3 | 20.00 s |")
    assert "| - | partial | reached in 2 of 3 runs | 3 | 15.00 s |" in stdout
    assert "needs every run to reach the target" in stdout
    assert "p&lt;0.0001, +0.50 s vs swift, an improvement under 1 s" in stdout
    assert "shorter by at least 1 s" in stdout and "nats" not in stdout.split("## Track")[1]
    code, stdout, _ = leaderboard(monkeypatch, capsys, timed_board, "--rules", rules)
    assert "Track toy-target · time to target val_loss 4.1 (provisional)" in stdout
    assert "reached in 2 of 3 runs" in stdout and "19.51 ± 0.01 s" in stdout
    out = tmp_path / "board.parquet"
    assert leaderboard(monkeypatch, capsys, timed_board, "--format", "parquet", "--out", out, "--rules", rules)[0] == 0
    table = pq.read_table(out)
    assert table.column("submission").to_pylist() == TIMED_ORDER
    assert table.column("times_to_target").to_pylist()[4] == [15.0, None, 16.0]
    assert table.column("reached_runs").to_pylist() == [3, 3, 3, 3, 2, 3]
    assert table.column("time_to_target_mean").to_pylist()[4] is None


class _Svg(HTMLParser):
    """Every element of a page, with its attributes and the text of its <title>."""

    def __init__(self):
        super().__init__()
        self.elements: list[dict] = []
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self._in_title = True
            return
        self.elements.append({"tag": tag, **dict(attrs), "title": ""})

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._in_title and self.elements:
            self.elements[-1]["title"] += data

    def having(self, tag: str, css: str) -> list[dict]:
        return [e for e in self.elements if e["tag"] == tag and e.get("class") == css]


def _published_results(results: Path) -> dict[str, dict]:
    """run_id -> the result in its envelope."""
    out = {}
    for path in results.glob("*/*/*.json"):
        result = json.loads(base64.b64decode(json.loads(path.read_text())["payload"]))["predicate"]["result"]
        out[result["run_id"]] = result
    return out


def test_the_plot_draws_the_measured_curve_solid_and_the_reported_loss_faint(timed_board, monkeypatch, capsys, tmp_path):
    code, page, _ = leaderboard(monkeypatch, capsys, timed_board, "--format", "html", "--rules", _timed_rules(tmp_path))
    assert code == 0
    svg = _Svg()
    svg.feed(page)
    results = _published_results(timed_board[0])
    paths = svg.having("path", "val") + svg.having("path", "val unofficial")
    points = svg.having("circle", "val-point")
    assert len(svg.having("polyline", "train") + svg.having("polyline", "train unofficial")) == len(results)
    for run_id, result in results.items():
        measured = [p for p in result["val_curve"] if p["scored"] == "ok"]
        path = [p for p in paths if f" · {run_id} (seed" in p["title"]]
        if run_id == "hasty-s0":  # it reached the target with its first snapshot: a point, not a line
            assert len(measured) == 1 and path == []
        else:
            assert len(path) == 1 and path[0]["title"].endswith("validation loss measured by the evaluator")
            assert path[0]["d"].count("L") == len(measured) - 1
        dots = [p["title"] for p in points if f" · {run_id} (seed" in p["title"]]
        # One dot per measured model but the one that gave the score: the ◆ marks it.
        deciding = result["target"]["time_s"] if result["target"]["reached"] else measured[-1]["time_s"]
        assert dots == [f"{result['submission']['name']} · {run_id} (seed {result['seed']}): val_loss {p['val_loss']:.4f} at "
                        f"{p['time_s']:.2f} s ({p['model']}), measured by the evaluator" for p in measured if p["time_s"] != deciding]
        diamond = [p["title"] for p in svg.having("path", "final") if f" · {run_id} (seed" in p["title"]]
        assert len(diamond) == 1 and (
            f"reached the target at {deciding:.2f} s" in diamond[0] if result["target"]["reached"] else "did not reach" in diamond[0])
    assert "0.4242" not in page  # steady-s0's forged "val_loss" rows are no point of any curve
    line = svg.having("line", "target")
    assert len(line) == 1 and line[0]["stroke-dasharray"] and line[0]["y1"] == line[0]["y2"]
    assert [e for e in svg.elements if e.get("class") == "target-label"]
    assert "target val_loss 4.1 (provisional)</text>" in page
    caption = page.split("<figcaption>", 1)[1].split("</figcaption>", 1)[0]
    assert "Solid lines and dots: validation loss measured by the evaluator on its snapshots" in caption
    assert "Faint lines: training loss the submission reported through <code>ctx.log</code>, not verified" in caption
    assert "dark dashed line is the target val_loss 4.1 (provisional)" in caption
    assert "<h2>Track <code>toy-target</code> · time to target val_loss 4.1 (provisional)</h2>" in page
    assert "reached in 2 of 3 runs" in page


def test_a_forged_val_loss_in_metrics_reaches_no_output(timed_board, monkeypatch, capsys, tmp_path):
    rules = _timed_rules(tmp_path)
    for fmt in ("json", "markdown", "table"):
        code, stdout, _ = leaderboard(monkeypatch, capsys, timed_board, "--format", fmt, "--rules", rules)
        assert code == 0 and str(FORGED_VAL_LOSS) not in stdout
    steady = [row for row in json.loads(leaderboard(monkeypatch, capsys, timed_board, "--format", "json", "--rules", rules)[1])["rows"]
              if row["submission"] == "steady"][0]
    curve = steady["run_details"][0]["val_curve"]
    assert curve == _published_results(timed_board[0])["steady-s0"]["val_curve"] and len(curve) == 6


def test_a_run_scored_on_its_final_model_only_shows_one_marker(tmp_path, monkeypatch, capsys):
    _, key, trusted = _signer(tmp_path)
    publish(make_run(tmp_path, "lone-s0", submission="lone", snapshot_every_s=None), key, tmp_path / "results", False)
    code, page, _ = run_cli(monkeypatch, capsys, "leaderboard", "--results", tmp_path / "results", "--trusted-keys", trusted,
                            "--format", "html")
    svg = _Svg()
    svg.feed(page)
    assert code == 0 and len(svg.having("path", "final")) == 1
    assert svg.having("path", "val") == [] and svg.having("circle", "val-point") == []
    assert len(svg.having("polyline", "train")) == 1


def test_a_run_made_for_another_goal_is_set_aside(tmp_path, monkeypatch, capsys):
    _, key, trusted = _signer(tmp_path)
    results = tmp_path / "results"
    for seed in range(3):
        publish(make_run(tmp_path, f"new-s{seed}", submission="new", track="toy-target", seed=seed, target=4.1,
                         time_to_target=30.0 + seed, started_at=T0 + timedelta(days=2, hours=seed)), key, results, False)
    publish(make_run(tmp_path, "old-s0", submission="old", track="toy-target", target=4.2, time_to_target=20.0), key, results, False)
    publish(make_run(tmp_path, "older-s0", submission="older", track="toy-target", started_at=T0 - timedelta(days=1)),
            key, results, False)
    code, stdout, stderr = run_cli(monkeypatch, capsys, "leaderboard", "--results", results, "--trusted-keys", trusted,
                                   "--format", "json")
    document = json.loads(stdout)
    assert code == 1 and [row["submission"] for row in document["rows"]] == ["new"]
    reasons = {Path(item["path"]).name: item["reason"] for item in document["rejected"]}
    assert reasons["old-s0.json"] == ("run old-s0 was made for the target val_loss 4.2, the track's newest run (new-s2) for "
                                      "the target val_loss 4.1: their scores are not comparable")
    assert "run older-s0 was made for a fixed time" in reasons["older-s0.json"]
    assert "2 envelope(s) rejected" in stderr


# --- what a competitor writes never becomes markup or a terminal escape ---------------------------

# Authors as a result signed before `evaluator check` refused control characters could hold them:
# Markdown specials, a leading #, a newline that would end the table row, terminal escape sequences
# (OSC title, clear screen, C1 CSI) and a bell.
HOSTILE_AUTHORS = [
    "# Mallory *bold* _it_ `code` [link](https://example.org/x) ~~gone~~ back\\slash",
    "Eve\n| forged | row |\n# Heading",
    "\x1b]0;owned\x07\x1b[2J\x9b31mred",
]
_RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")


@pytest.fixture(scope="module")
def hostile_board(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    private, public, _ = generate_key_pair(root / "private", "tester")
    trusted = root / "trusted"
    trusted.mkdir()
    shutil.copy(public, trusted / public.name)
    results = root / "results"
    publish(make_run(root, "mallory-s0", submission="mallory", authors=HOSTILE_AUTHORS), load_private_key(private), results, False)
    return results, trusted


class _Cells(HTMLParser):
    """The text of every <td>, and every tag, of rendered Markdown."""

    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "td":
            self._in_cell = True
            self.cells.append("")

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells[-1] += data


def test_markdown_shows_hostile_authors_as_text_in_their_own_row(hostile_board, monkeypatch, capsys):
    from markdown_it import MarkdownIt

    code, stdout, _ = leaderboard(monkeypatch, capsys, hostile_board, "--format", "markdown")
    assert code == 0
    assert not _RAW_CONTROL.search(stdout)
    table_lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert len(table_lines) == 3  # header, separator, the one row: the newline did not end it
    assert not any("forged" in line or "Heading" in line for line in stdout.splitlines() if not line.startswith("|"))
    # Rendered as GitHub would (tables, strikethrough): one row of plain text, no markup from the authors.
    markdown = MarkdownIt("commonmark").enable("table").enable("strikethrough")
    page = _Cells()
    page.feed(markdown.render(stdout))
    assert page.tags.count("h1") == page.tags.count("h2") == 1 and page.tags.count("tr") == 2
    rendered = _Cells()
    rendered.feed(markdown.render("\n".join(table_lines)))
    assert set(rendered.tags) == {"table", "thead", "tbody", "tr", "th", "td"}
    assert len(rendered.cells) == len(COLUMNS)
    authors_cell = rendered.cells[[header for header, _ in COLUMNS].index("authors")]
    assert authors_cell == ", ".join(HOSTILE_AUTHORS).replace("\n", "\\x0a").replace("\x1b", "\\x1b").replace(
        "\x07", "\\x07").replace("\x9b", "\\x9b")


@pytest.mark.parametrize("fmt", ["table", "html", "json"])
def test_no_format_passes_a_control_character_from_a_result(hostile_board, monkeypatch, capsys, fmt):
    code, stdout, _ = leaderboard(monkeypatch, capsys, hostile_board, "--format", fmt)
    assert code == 0
    assert not _RAW_CONTROL.search(stdout), repr(stdout)
    if fmt == "json":  # the data itself is kept, escaped as JSON
        assert json.loads(stdout)["rows"][0]["authors"] == HOSTILE_AUTHORS
    elif fmt == "html":
        assert "\\x1b]0;owned\\x07\\x1b[2J\\x9b31mred" in stdout and "Eve\\x0a| forged" in stdout
    else:  # the plain-text table may fold the authors column: the characters are shown, not sent
        assert "\\x1b" in stdout and "\\x07" in stdout


def test_the_terminal_table_sends_no_escape_sequence_from_a_result(hostile_board, monkeypatch, capsys):
    # The interactive path: rich writes its own styling, but nothing a result holds reaches the terminal raw.
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("TERM", "xterm-256color")
    code, stdout, _ = leaderboard(monkeypatch, capsys, hostile_board)
    assert code == 0 and "mallory" in stdout
    for sequence in ("\x1b]0;", "\x1b[2J", "\x07", "\x9b", "Eve\n"):
        assert sequence not in stdout


def test_the_committed_example_results_verify_and_their_pages_are_fresh(capsys):
    """The developers' guide: at every commit the example results verify and the committed
    leaderboards equal a fresh render (`make results` re-runs and re-publishes them)."""
    from evaluator.cli import main
    from evaluator.paths import RESULTS_DIR

    assert main(["verify"]) == 0, capsys.readouterr().out
    capsys.readouterr()
    for fmt, committed in (("markdown", "LEADERBOARD.md"), ("html", "leaderboard.html")):
        assert main(["leaderboard", "--format", fmt]) == 0
        assert capsys.readouterr().out == (RESULTS_DIR / committed).read_text(), f"{committed} is stale: run make results"


def test_the_reference_and_the_template_offer_snapshots_in_the_committed_results():
    """Their committed runs (cpu-1min, a snapshot every 20 s) carry the curve the evaluator measured:
    two snapshots and the final model, every one scored; seed-moe offers none, so its curve is the
    final model alone."""
    from evaluator.paths import KEYS_DIR, RESULTS_DIR
    from evaluator.signing import envelope_paths, load_trusted_keys, verify_paths

    verified, rejected = verify_paths(envelope_paths(RESULTS_DIR), load_trusted_keys(KEYS_DIR))
    assert rejected == []
    by_submission: dict[str, list[list[dict]]] = {}
    for item in verified:
        by_submission.setdefault(item.result["submission"]["name"], []).append(item.result["val_curve"])
    assert sorted(by_submission) == ["reference", "seed-moe", "template"]
    for name, curves in by_submission.items():
        assert len(curves) == 3
        for curve in curves:
            models = [point["model"] for point in curve]
            assert models == (["final"] if name == "seed-moe" else ["snapshot", "snapshot", "final"]), name
            assert all(point["scored"] == "ok" for point in curve)
            times = [point["time_s"] for point in curve]
            assert times == sorted(times) and (name == "seed-moe" or 20 <= times[0] < 25 and 40 <= times[1] < 45)

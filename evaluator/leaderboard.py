"""`evaluator leaderboard`: rankings built only from signed results that verify.

One row per submission, track and kind of run: a submission's official runs, its unofficial runs
(unsandboxed, budget overridden, ...) and its runs at a calibrated budget are never pooled.
Official rows are ranked by mean val_loss; the others are listed after them, unranked.

A time-to-target track (its results carry a `target`; the track need not be defined here) ranks
by mean time to target instead: the evaluator-clock time of the first model, snapshot or final,
at or below the target. A row any of whose runs did not reach it is listed after the ranked rows.
A track's kind and target are those of its newest run; a run made for another goal is set aside,
as its score is not comparable.

Records: official submissions are walked in the order of their first run, and each track's rule
(`spec/record-rules.toml`, read through evaluator.record_rules) decides whether a row takes the record
from the holder of its time: enough distinct seeds among the runs it counts, a one-sided Welch p
below the rule's threshold and a large enough improvement (in nats, or in seconds on a time-to-target
track). The p-value of each test is shown.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import math
import re
import sys
import unicodedata
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from evaluator.errors import UserError
from evaluator.fsutil import atomic_write_bytes
from evaluator.paths import KEYS_DIR, RECORD_RULES_FILE, RESULTS_DIR, shown
from evaluator.record_rules import RecordRule, RecordRules, load_record_rules
from evaluator.results import parse_utc
from evaluator.signing import VerifiedResult, envelope_paths, load_trusted_keys, verify_paths

# Record statuses, as they appear in JSON and Parquet.
RECORD = "record"
FORMER_RECORD = "former record"
NOT_SIGNIFICANT = "not significant"
TOO_SMALL = "improvement too small"
TOO_FEW_SEEDS = "too few seeds"
NOT_ELIGIBLE = "unofficial"
NOT_REACHED = "target not always reached"  # time-to-target tracks: an unranked row holds no record


# --- statistics -------------------------------------------------------------------------------


def mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def sample_variance(values: list[float]) -> float:
    centre = mean(values)
    return math.fsum((v - centre) ** 2 for v in values) / (len(values) - 1)


def _continued_fraction(terms: Callable[[int], tuple[float, float]], b0: float) -> float:
    """b0 + a1/(b1 + a2/(b2 + ...)) by the modified Lentz method; terms(j) gives (a_j, b_j)."""
    tiny = 1e-300
    value = b0 if b0 != 0 else tiny
    c, d = value, 0.0
    for j in range(1, 10_000):
        a_j, b_j = terms(j)
        d = b_j + a_j * d
        d = 1.0 / (d if d != 0 else tiny)
        c = b_j + a_j / c
        c = c if c != 0 else tiny
        step = c * d
        value *= step
        if abs(step - 1.0) < 1e-15:
            return value
    raise ArithmeticError("continued fraction did not converge")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x = {x} is outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    # The fraction converges fast only left of the distribution's bulk; use the symmetry
    # I_x(a, b) = 1 - I_{1-x}(b, a) on the other side.
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - regularized_incomplete_beta(b, a, 1.0 - x)
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )

    def terms(j: int) -> tuple[float, float]:
        if j % 2:  # odd: j = 2m + 1
            m = (j - 1) // 2
            return -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)), 1.0
        m = j // 2
        return m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)), 1.0

    return math.exp(log_front) / (a * _continued_fraction(terms, 1.0))


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom (df may be fractional, as in Welch's test)."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def welch_one_sided_p(baseline: list[float], challenger: list[float]) -> float:
    """p-value of Welch's t-test for "the challenger's mean is lower than the baseline's"."""
    if len(baseline) < 2 or len(challenger) < 2:
        raise ValueError("Welch's t-test needs at least two values on each side")
    var_base = sample_variance(baseline) / len(baseline)
    var_chal = sample_variance(challenger) / len(challenger)
    difference = mean(baseline) - mean(challenger)
    if var_base + var_chal == 0.0:
        # Both sides are constant: the difference is certain, either way.
        return 0.0 if difference > 0 else 1.0
    t = difference / math.sqrt(var_base + var_chal)
    df = (var_base + var_chal) ** 2 / (
        var_base**2 / (len(baseline) - 1) + var_chal**2 / (len(challenger) - 1)
    )
    return 1.0 - student_t_cdf(t, df)


# --- rows -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrackTarget:
    """A time-to-target track's goal, as its results state it (the track file may not be here)."""

    val_loss: float
    provisional: bool


def _target_of(result: dict[str, Any]) -> TrackTarget | None:
    target = result["target"]
    return None if target is None else TrackTarget(float(target["val_loss"]), bool(target["provisional"]))


@dataclass(frozen=True)
class Run:
    run_id: str
    seed: int
    seed_drawn: bool
    val_loss: float
    val_bpb: float
    train_seconds: float | None
    budget_s: float
    started_at: datetime
    ended_at: datetime
    signer: str
    authors: list[str]
    description: str
    loss_curve: dict[str, Any]  # the submission's word: what it logged as `loss`, never checked
    val_curve: list[dict[str, Any]]  # the evaluator's: what it measured on the models it took
    target: dict[str, Any] | None  # time-to-target tracks: the result's target, reached and time_s
    throttled_s: float | None  # None: no GPU telemetry (a CPU track, or NVML absent)
    throttle_reasons: tuple[str, ...]
    gpu: dict[str, Any] | None  # the board: name, PCI bus id and UUID tell two of one host apart
    calibration_factor: float | None  # --budget calibrated: what the track's budget was multiplied by

    @classmethod
    def from_verified(cls, verified: VerifiedResult) -> Run:
        result = verified.result
        return cls(
            run_id=result["run_id"],
            seed=result["seed"],
            seed_drawn=result["seed_drawn"],
            val_loss=float(result["metrics"]["val_loss"]),
            val_bpb=float(result["metrics"]["val_bpb"]),
            train_seconds=result["train"]["train_seconds"],
            budget_s=float(result["budget_s"]),
            started_at=parse_utc(result["started_at"]),
            ended_at=parse_utc(result["ended_at"]),
            signer=verified.signer,
            authors=result["submission"]["authors"],
            description=result["submission"]["description"],
            loss_curve=verified.loss_curve,
            val_curve=result["val_curve"] or [],
            target=result["target"],
            throttled_s=_throttled_seconds(result["gpu_telemetry"]),
            throttle_reasons=tuple(result["gpu_telemetry"]["throttle_reasons"]) if result["gpu_telemetry"] else (),
            calibration_factor=None if result["calibration"] is None else result["calibration"]["factor"],
            gpu=None if result["environment"]["gpu"] is None else {
                key: result["environment"]["gpu"][key] for key in ("name", "pci_bus_id", "uuid")
            },
        )

    @property
    def time_to_target(self) -> float | None:
        """The run's score on a time-to-target track; None when it did not reach the target (or has none)."""
        return float(self.target["time_s"]) if self.target is not None and self.target["reached"] else None

    @property
    def val_points(self) -> list[tuple[float, float, str]]:
        """(time_s, val_loss, model) of every model the evaluator scored, in time order; models it could
        not score, or did not need to, are gaps."""
        points = [(float(p["time_s"]), float(p["val_loss"]), p["model"]) for p in self.val_curve
                  if p["scored"] == "ok" and p["val_loss"] is not None]
        return sorted(points, key=lambda point: point[0])

    @property
    def score_time(self) -> float | None:
        """When the model whose metrics are the run's score was taken: the one that reached the
        target, else the final model (None if the curve does not say)."""
        if self.time_to_target is not None:
            return self.time_to_target
        return next((float(p["time_s"]) for p in self.val_curve if p["model"] == "final"), self.train_seconds)


def _throttled_seconds(telemetry: dict[str, Any] | None) -> float | None:
    return None if telemetry is None or not telemetry["samples"] else float(telemetry["throttled_s"])


@dataclass
class Row:
    track: str
    submission: str
    official: bool
    calibrated: bool  # runs at a calibrated budget: always unofficial, and never pooled with other runs
    runs: list[Run]  # in the order they started
    rank: int | None = None
    record_status: str = ""
    # The test that decided record_status: its p-value, the improvement in mean val_loss over the
    # record holder it was tested against, and that holder.
    record_p_value: float | None = None
    record_improvement: float | None = None
    record_baseline: str | None = None
    record_rule: RecordRule | None = None
    target: TrackTarget | None = None  # set: a time-to-target track, whose rows rank on times

    @property
    def timed(self) -> bool:
        return self.target is not None

    @property
    def authors(self) -> list[str]:
        return list(dict.fromkeys(author for run in self.runs for author in run.authors))

    @property
    def description(self) -> str:
        return self.runs[-1].description

    @property
    def val_losses(self) -> list[float]:
        return [run.val_loss for run in self.runs]

    @property
    def mean_val_loss(self) -> float:
        return mean(self.val_losses)

    @property
    def std_val_loss(self) -> float | None:
        return math.sqrt(sample_variance(self.val_losses)) if len(self.runs) > 1 else None

    @property
    def best_run(self) -> Run:
        return min(self.runs, key=lambda run: run.val_loss)

    @property
    def times_to_target(self) -> list[float | None]:
        return [run.time_to_target for run in self.runs]

    @property
    def reached_runs(self) -> int:
        return sum(1 for time_s in self.times_to_target if time_s is not None)

    @property
    def all_reached(self) -> bool:
        return self.reached_runs == len(self.runs)

    @property
    def mean_time_to_target(self) -> float | None:
        """None unless every run reached the target: a mean of the lucky runs alone would flatter the row."""
        return mean(self.times_to_target) if self.all_reached else None

    @property
    def std_time_to_target(self) -> float | None:
        return math.sqrt(sample_variance(self.times_to_target)) if self.all_reached and len(self.runs) > 1 else None

    @property
    def fastest_run(self) -> Run | None:
        reached = [run for run in self.runs if run.time_to_target is not None]
        return min(reached, key=lambda run: run.time_to_target) if reached else None

    def score(self, run: Run) -> float | None:
        """What ranks the row, lower is better: the time to target (None where the run did not reach
        it: such a row is never tested), or the val_loss on a fixed-time track."""
        return run.time_to_target if self.timed else run.val_loss

    @property
    def mean_val_bpb(self) -> float:
        return mean([run.val_bpb for run in self.runs])

    @property
    def mean_train_seconds(self) -> float | None:
        seconds = [run.train_seconds for run in self.runs if run.train_seconds is not None]
        return mean(seconds) if seconds else None

    @property
    def seeds(self) -> int:
        return len({run.seed for run in self.runs})

    @property
    def drawn_seeds(self) -> int:
        return len({run.seed for run in self.runs if run.seed_drawn})

    def counted_scores(self, rule: RecordRule) -> list[float]:
        """What the record test compares: one score (val_loss, or time to target) per distinct seed (the
        mean of that seed's runs, so repeating a seed adds no sample), of every seed, or of drawn seeds
        only if the rule says so."""
        by_seed: dict[int, list[float]] = {}
        for run in self.runs:
            if run.seed_drawn or not rule.drawn_seeds_only:
                by_seed.setdefault(run.seed, []).append(self.score(run))
        return [mean(scores) for scores in by_seed.values()]

    def counted_seeds(self, rule: RecordRule) -> int:
        return self.drawn_seeds if rule.drawn_seeds_only else self.seeds

    @property
    def throttled_runs(self) -> tuple[int, int] | None:
        """(runs the driver slowed, runs with GPU telemetry), or None when no run has telemetry."""
        sampled = [run.throttled_s for run in self.runs if run.throttled_s is not None]
        return (sum(1 for seconds in sampled if seconds > 0), len(sampled)) if sampled else None

    @property
    def throttle_reasons(self) -> list[str]:
        """Why the driver slowed the runs it slowed."""
        return sorted({reason for run in self.runs if run.throttled_s for reason in run.throttle_reasons})

    @property
    def first_run_at(self) -> datetime:
        return min(run.started_at for run in self.runs)

    @property
    def latest_run_at(self) -> datetime:
        return max(run.ended_at for run in self.runs)

    @property
    def signers(self) -> list[str]:
        return sorted({run.signer for run in self.runs})


def build_rows(
    verified: list[VerifiedResult], rules: RecordRules, track: str | None = None
) -> tuple[list[Row], list[tuple[Path, str]]]:
    """Group verified runs into rows, rank them and mark records. Also returns the envelopes it set
    aside: duplicates, and runs made for another goal than their track's newest run."""
    duplicates: list[tuple[Path, str]] = []
    seen: dict[str, Path] = {}
    by_track: dict[str, list[VerifiedResult]] = {}
    for item in sorted(verified, key=lambda v: str(v.path)):
        result = item.result
        if track is not None and result["track"]["id"] != track:
            continue
        if result["run_id"] in seen:
            # The same signed run copied to a second file must not count twice.
            first = shown(seen[result["run_id"]])
            duplicates.append((item.path, f"duplicate of run {result['run_id']} already counted from {first}"))
            continue
        seen[result["run_id"]] = item.path
        by_track.setdefault(result["track"]["id"], []).append(item)
    ordered: list[Row] = []
    for track_id in sorted(by_track):
        items, target = _comparable_runs(by_track[track_id], duplicates)
        rows: dict[tuple[str, str, bool, bool], Row] = {}
        for item in items:
            result = item.result
            calibrated = result["calibration"] is not None  # never official: the schema says so, and so does this
            key = (track_id, result["submission"]["name"], result["official"] and not calibrated, calibrated)
            rows.setdefault(key, Row(*key, runs=[], target=target)).runs.append(Run.from_verified(item))
        in_track = list(rows.values())
        for row in in_track:
            row.runs.sort(key=lambda run: (run.started_at, run.run_id))
        _mark_records(in_track, rules.for_track(track_id))
        official = sorted((r for r in in_track if r.official), key=_rank_key)
        unofficial = sorted((r for r in in_track if not r.official), key=lambda r: (r.calibrated, *_rank_key(r)))
        for rank, row in enumerate((r for r in official if _rankable(r)), start=1):
            row.rank = rank
        ordered.extend(official + unofficial)
    return ordered, duplicates


def _rankable(row: Row) -> bool:
    """Every row of a fixed-time track; on a time-to-target track, a row whose runs all reached the target."""
    return not row.timed or row.all_reached


def _rank_key(row: Row) -> tuple:
    if not row.timed:
        return (row.mean_val_loss, row.submission)
    # Rows that did not always reach the target come after the others: the more often they reached
    # it the earlier, then by the mean time of the runs that did.
    reached = [time_s for time_s in row.times_to_target if time_s is not None]
    return (not row.all_reached, -row.reached_runs / len(row.runs), mean(reached) if reached else math.inf,
            row.submission)


def _goal_text(target: TrackTarget | None) -> str:
    return "a fixed time" if target is None else f"the target val_loss {target.val_loss:g}"


def _comparable_runs(
    items: list[VerifiedResult], set_aside: list[tuple[Path, str]]
) -> tuple[list[VerifiedResult], TrackTarget | None]:
    """The runs of one track that were made for the goal of its newest run, and that goal.

    The track file may not be here, so its kind is read from the results; a run made for another
    target (or none: an older, fixed-time version of the track) has a score that means something
    else, and ranking it with the others would be wrong. It is set aside with the reason."""
    newest = max(items, key=lambda v: (parse_utc(v.result["started_at"]), v.result["run_id"]))
    target = _target_of(newest.result)
    kept = []
    for item in items:
        theirs = _target_of(item.result)
        if (theirs is None) == (target is None) and (theirs is None or theirs.val_loss == target.val_loss):
            kept.append(item)
            continue
        set_aside.append((item.path, (
            f"run {item.result['run_id']} was made for {_goal_text(theirs)}, the track's newest run "
            f"({newest.result['run_id']}) for {_goal_text(target)}: their scores are not comparable")))
    return kept, target


def _mark_records(rows: list[Row], rule: RecordRule) -> None:
    holder: Row | None = None
    for row in sorted(rows, key=lambda r: (r.first_run_at, r.submission)):
        row.record_rule = rule
        if not row.official:
            row.record_status = NOT_ELIGIBLE
        elif not _rankable(row):
            row.record_status = NOT_REACHED
        elif row.counted_seeds(rule) < rule.min_seeds:
            row.record_status = TOO_FEW_SEEDS
        elif holder is None:
            row.record_status = RECORD
            holder = row
        else:
            baseline, challenger = holder.counted_scores(rule), row.counted_scores(rule)
            row.record_p_value = welch_one_sided_p(baseline, challenger)
            # Rounded: val_losses are multiples of 1e-4 (times of 0.01 s), and their float difference
            # must not fall a hair below a threshold it meets exactly.
            row.record_improvement = round(mean(baseline) - mean(challenger), 9)
            row.record_baseline = holder.submission
            if row.record_p_value >= rule.p_below:
                row.record_status = NOT_SIGNIFICANT
            elif row.record_improvement < rule.min_improvement(row.timed):
                row.record_status = TOO_SMALL
            else:
                holder.record_status = FORMER_RECORD
                row.record_status = RECORD
                holder = row


# --- text helpers -----------------------------------------------------------------------------


def _visible(text: str) -> str:
    """Text from a result with every control character (C0, DEL, C1: newline, tab and ESC included)
    written out as \\xNN, so that no result can break a table row or send a terminal an escape
    sequence. `evaluator check` refuses them in a manifest's free text; results signed before it did,
    or by another evaluator, are shown this way."""
    return "".join(f"\\x{ord(char):02x}" if unicodedata.category(char) == "Cc" else char for char in text)


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _p_value(p: float) -> str:
    return "p<0.0001" if p < 1e-4 else f"p={p:.2g}"


def _mean_std(row: Row) -> str:
    return _loss(row.mean_val_loss) + ("" if row.std_val_loss is None else f" ± {row.std_val_loss:.4f}")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _time(value: float | None) -> str:
    """A time to target: the evaluator stamps models to 0.01 s."""
    return "-" if value is None else f"{value:.2f} s"


def _mean_std_time(row: Row) -> str:
    if not row.all_reached:
        return f"reached in {row.reached_runs} of {len(row.runs)} runs"
    std = row.std_time_to_target
    return f"{row.mean_time_to_target:.2f}" + ("" if std is None else f" ± {std:.2f}") + " s"


def _improvement(row: Row) -> str:
    return f"{row.record_improvement:+.2f} s" if row.timed else f"{row.record_improvement:+.4f}"


def _record_text(row: Row) -> str:
    test = ""
    if row.record_p_value is not None:
        test = f"{_p_value(row.record_p_value)}, {_improvement(row)} vs {row.record_baseline}"
    if row.record_status == RECORD:
        return f"★ record ({test or 'the first'})"
    if row.record_status == FORMER_RECORD:
        return f"former record ({test or 'the first'})"
    if row.record_status == NOT_SIGNIFICANT:
        return f"not a record: {test}"
    if row.record_status == TOO_SMALL:
        unit = " s" if row.timed else ""
        return f"not a record: {test}, an improvement under {row.record_rule.min_improvement(row.timed):g}{unit}"
    if row.record_status == NOT_REACHED:
        return "needs every run to reach the target"
    if row.record_status == TOO_FEW_SEEDS:
        drawn = "drawn " if row.record_rule.drawn_seeds_only else ""
        return f"needs ≥{row.record_rule.min_seeds} {drawn}seeds"
    return "not eligible"


def _calibrated_text(row: Row) -> str:
    factors = sorted(run.calibration_factor for run in row.runs if run.calibration_factor is not None)
    span = f"x{factors[0]:g}" if factors[0] == factors[-1] else f"x{factors[0]:g}-{factors[-1]:g}"
    return f"calibrated {span}, unofficial"


def _runs_text(row: Row) -> str:
    text = str(len(row.runs))
    details = [f"{row.seeds} seeds"] if row.seeds != len(row.runs) else []
    if row.drawn_seeds:
        details.append(f"{row.drawn_seeds} drawn")
    return text + (f" ({', '.join(details)})" if details else "")


# A T4 sits at its 70 W cap under load by design; thermal and hardware slowdowns are the ones that
# say a board ran worse than its kind. The column names which it was.
_REASON_WORDS = {"sw_power_cap": "power cap", "hw_slowdown": "hardware", "sw_thermal_slowdown": "thermal",
                 "hw_thermal_slowdown": "thermal", "hw_power_brake_slowdown": "power brake"}


def _gpu_text(row: Row) -> str:
    throttled = row.throttled_runs
    if throttled is None:
        return "-"
    slowed, sampled = throttled
    if slowed == 0:
        return "steady"
    words = ", ".join(dict.fromkeys(_REASON_WORDS.get(reason, reason) for reason in row.throttle_reasons))
    return f"throttled in {slowed}/{sampled}" + (f": {words}" if words else "")


# (header, numeric): numeric columns are right-aligned and never wrapped.
COLUMNS = [
    ("#", True), ("submission", False), ("val_loss mean ± std", True), ("runs", True), ("best val_loss", True),
    ("val_bpb", True), ("train s", True), ("GPU clocks", False), ("authors", False), ("latest run", False),
    ("status", False), ("record", False),
]
# A time-to-target track's: its score is a time, so the time columns take the val_loss ones' place.
TARGET_COLUMNS = [
    ("#", True), ("submission", False), ("time to target mean ± std", True), ("runs", True), ("best time", True),
    ("train s", True), ("GPU clocks", False), ("authors", False), ("latest run", False), ("status", False),
    ("record", False),
]
# Short text columns that read badly when broken across lines.
UNBROKEN = {"submission", "GPU clocks", "latest run", "status"}


def columns_of(rows: list[Row]) -> list[tuple[str, bool]]:
    """The columns of one track's table."""
    return TARGET_COLUMNS if rows and rows[0].timed else COLUMNS


def _author_name(author: str) -> str:
    """'Name <email>' without the address, for the narrow terminal table."""
    name = author.split("<", 1)[0].strip()
    return name or author


def _cells(row: Row, names_only: bool = False) -> list[str]:
    """The row's cells as every format shows them (with control characters made visible)."""
    authors = [_author_name(a) for a in row.authors] if names_only else row.authors
    if row.timed:
        fastest = row.fastest_run
        scores = [_mean_std_time(row), _runs_text(row), _time(None if fastest is None else fastest.time_to_target)]
    else:
        scores = [_mean_std(row), _runs_text(row), _loss(row.best_run.val_loss), _loss(row.mean_val_bpb)]
    cells = [
        str(row.rank) if row.rank is not None else "-",
        row.submission,
        *scores,
        _seconds(row.mean_train_seconds),
        _gpu_text(row),
        ", ".join(authors),
        row.latest_run_at.date().isoformat(),
        "official" if row.official else _calibrated_text(row) if row.calibrated else "unofficial",
        _record_text(row),
    ]
    return [_visible(cell) for cell in cells]


def _by_track(rows: list[Row]) -> dict[str, list[Row]]:
    grouped: dict[str, list[Row]] = {}
    for row in rows:
        grouped.setdefault(row.track, []).append(row)
    return grouped


RANKING_TEXT = (
    "Ranked by mean validation loss (nats/token, lower is better); ± is the sample standard deviation "
    "over runs; \"drawn\" counts seeds the evaluator drew, which nobody could choose. Submissions are "
    "considered for the record in the order of their first run; unofficial runs are listed apart and "
    "never hold a record. GPU clocks: \"throttled in k/n\" when the driver reported a power or thermal "
    "slowdown during training in k of the n runs it was sampled in."
)


def rule_text(track_id: str, rule: RecordRule, timed: bool = False) -> str:
    return f"Track {track_id}: {rule.text(timed)}."


def _track_rule_text(track_id: str, rows: list[Row]) -> str:
    return rule_text(track_id, rows[0].record_rule, rows[0].timed)


def heading_suffix(target: TrackTarget | None) -> str:
    """What a time-to-target track's heading adds to "Track <id>": its target; nothing on a fixed-time track."""
    if target is None:
        return ""
    return f" · time to target val_loss {target.val_loss:g}" + (" (provisional)" if target.provisional else "")


def target_ranking_text(target: TrackTarget) -> str:
    """How a time-to-target track ranks; printed with its table, since RANKING_TEXT is about val_loss."""
    text = (
        f"Time to target: a run's score is the time, on the evaluator's clock, at which it took the first model "
        f"(a snapshot or the final model) whose val_loss the evaluator measured at or below {target.val_loss:g}. "
        "Rows are ranked by the mean time over their runs (seconds, lower is better; ± is the sample standard "
        "deviation); a row any of whose runs did not reach the target is listed after the ranked rows, unranked, "
        "with how many of its runs reached it."
    )
    if target.provisional:
        text += " The target is provisional: it may still change, and times against another target are not comparable."
    return text


# --- renderers --------------------------------------------------------------------------------


# Shorter headers where a terminal is narrow.
TERMINAL_HEADERS = {"val_loss mean ± std": "val_loss ± std", "best val_loss": "best",
                    "time to target mean ± std": "time to target ± std", "best time": "best"}


def _rich_table(track_id: str, rows: list[Row]) -> Table:
    # A Text title: a str title would be read as rich markup.
    title = Text(f"Track {_visible(track_id)}{heading_suffix(rows[0].target)}")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for header, numeric in columns_of(rows):
        if numeric or header in UNBROKEN:
            table.add_column(TERMINAL_HEADERS.get(header, header), justify="right" if numeric else "left", no_wrap=True)
        else:
            table.add_column(TERMINAL_HEADERS.get(header, header), overflow="fold")
    for row in rows:
        table.add_row(*map(Text, _cells(row, names_only=True)), style="bold" if row.record_status == RECORD else None)
    return table


def _row_cards(track_id: str, rows: list[Row]) -> Text:
    """Two lines per row: what a terminal too narrow for the table still shows legibly."""
    text = Text(f"Track {_visible(track_id)}{heading_suffix(rows[0].target)}\n", style="italic")
    for row in rows:
        cells = dict(zip((header for header, _ in columns_of(rows)), _cells(row, names_only=True)))
        style = "bold" if row.record_status == RECORD else ""
        text.append(f"{cells['#']:>3}  {cells['submission']}\n", style="bold")
        count = len(row.runs)
        runs = f"{count} run{'' if count == 1 else 's'}{cells['runs'][len(str(count)):]}"  # "3 runs (3 drawn)"
        if row.timed:
            scores = (f"time to target {cells['time to target mean ± std']} · {runs} · best {cells['best time']}"
                      f" · trained {cells['train s']} s")
        else:
            scores = (f"val_loss {cells['val_loss mean ± std']} · {runs} · best {cells['best val_loss']}"
                      f" · bpb {cells['val_bpb']} · {cells['train s']} s")
        text.append(f"     {scores} · GPU {cells['GPU clocks']}\n", style=style)
        details = [cells["authors"], f"latest {cells['latest run']}", cells["status"], cells["record"]]
        text.append(f"     {' · '.join(details)}\n")
    return text


def print_table(console: Console, rows: list[Row], verified_count: int) -> None:
    if not rows:
        console.print("No verified results.")
    for track_id, track_rows in _by_track(rows).items():
        table = _rich_table(track_id, track_rows)
        natural_width = Measurement.get(console, console.options.update_width(10_000), table).maximum
        if natural_width <= console.width:
            console.print(table)
        else:
            console.print(_row_cards(track_id, track_rows))
        if track_rows[0].timed:
            console.print(target_ranking_text(track_rows[0].target), markup=False, highlight=False)
        console.print(_visible(_track_rule_text(track_id, track_rows)), markup=False, highlight=False)
    console.print(f"{verified_count} verified result(s). {RANKING_TEXT}", markup=False, highlight=False)


def render_table(rows: list[Row], verified_count: int) -> str:
    """The terminal table as plain text, wide enough that no column folds."""
    buffer = io.StringIO()
    print_table(Console(file=buffer, width=200, color_system=None), rows, verified_count)
    return buffer.getvalue()


# What Markdown (GitHub's included) would read as markup inside a table cell: emphasis, code,
# links and images, strikethrough, the cell separator, and the backslash that escapes them.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]~|])")


def _markdown_cell(text: str) -> str:
    """A cell's text as Markdown that renders as exactly that text: &, < and > as entities (no HTML,
    no <...> autolinks), the other special characters backslash-escaped, a leading # too."""
    escaped = _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(text, quote=False))
    return "\\" + escaped if escaped.startswith("#") else escaped


def _markdown_code(text: str) -> str:
    """A code span, unless the text holds a backtick (which would end it): then escaped text."""
    return f"`{text}`" if "`" not in text and text.strip() == text and text else _markdown_cell(text)


def render_markdown(rows: list[Row], verified_count: int) -> str:
    lines = [
        "# Leaderboard",
        "",
        f"Generated by `evaluator leaderboard` from {verified_count} signed result(s) that verify. {RANKING_TEXT}",
        "",
    ]
    if not rows:
        lines += ["No verified results yet.", ""]
    for track_id, track_rows in _by_track(rows).items():
        target = track_rows[0].target
        lines += [f"## Track {_markdown_code(_visible(track_id))}{_markdown_cell(heading_suffix(target))}", ""]
        if target is not None:
            lines += [_markdown_cell(target_ranking_text(target)), ""]
        lines += [_markdown_cell(_visible(_track_rule_text(track_id, track_rows))), ""]
        columns = columns_of(track_rows)
        lines.append("| " + " | ".join(header for header, _ in columns) + " |")
        lines.append("|" + "|".join("---:" if numeric else "---" for _, numeric in columns) + "|")
        for row in track_rows:
            cells = [_markdown_cell(cell) for cell in _cells(row)]
            if row.record_status == RECORD:
                cells[1] = f"**{cells[1]}**"
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _row_json(row: Row) -> dict[str, Any]:
    return {
        "track": row.track,
        "rank": row.rank,
        "submission": row.submission,
        "official": row.official,
        "calibrated": row.calibrated,
        "authors": row.authors,
        "description": row.description,
        "runs": len(row.runs),
        "seeds": row.seeds,
        "drawn_seeds": row.drawn_seeds,
        "throttled_runs": None if row.throttled_runs is None else row.throttled_runs[0],
        "sampled_runs": None if row.throttled_runs is None else row.throttled_runs[1],
        "throttle_reasons": row.throttle_reasons,
        "val_loss_mean": row.mean_val_loss,
        "val_loss_std": row.std_val_loss,
        "best_val_loss": row.best_run.val_loss,
        "best_run_id": row.best_run.run_id,
        "val_bpb_mean": row.mean_val_bpb,
        "train_seconds_mean": row.mean_train_seconds,
        "first_run_at": row.first_run_at.isoformat(),
        "latest_run_at": row.latest_run_at.isoformat(),
        "record_status": row.record_status,
        "record_p_value": row.record_p_value,
        "record_improvement": row.record_improvement,
        "record_baseline": row.record_baseline,
        "signers": row.signers,
        # Time-to-target tracks; null on a fixed-time track. The mean and std need every run to
        # have reached the target, the best time only one.
        "target_val_loss": row.target.val_loss if row.timed else None,
        "target_provisional": row.target.provisional if row.timed else None,
        "reached_runs": row.reached_runs if row.timed else None,
        "time_to_target_mean": row.mean_time_to_target if row.timed else None,
        "time_to_target_std": row.std_time_to_target if row.timed else None,
        "best_time_to_target": _fastest(row, lambda run: run.time_to_target),
        "best_time_run_id": _fastest(row, lambda run: run.run_id),
        "run_details": [
            {
                "run_id": run.run_id,
                "seed": run.seed,
                "seed_drawn": run.seed_drawn,
                "calibration_factor": run.calibration_factor,
                "val_loss": run.val_loss,
                "val_bpb": run.val_bpb,
                "train_seconds": run.train_seconds,
                "throttled_s": run.throttled_s,
                "gpu": run.gpu,
                "started_at": run.started_at.isoformat(),
                "signer": run.signer,
                "target": run.target,
                "val_curve": run.val_curve,
            }
            for run in row.runs
        ],
    }


def _fastest(row: Row, field: Callable[[Run], Any]) -> Any:
    fastest = row.fastest_run if row.timed else None
    return None if fastest is None else field(fastest)


def _track_json(target: TrackTarget | None) -> dict[str, Any]:
    if target is None:
        return {"kind": "fixed_time", "target_val_loss": None, "target_provisional": None, "ranking": None}
    return {"kind": "time_to_target", "target_val_loss": target.val_loss, "target_provisional": target.provisional,
            "ranking": target_ranking_text(target)}


# ensure_ascii=False keeps names readable but leaves DEL and C1 (CSI among them) raw; JSON's \u
# escapes are valid wherever they occur, which is only inside strings.
_JSON_RAW_CONTROLS = {code: f"\\u{code:04x}" for code in range(0x7F, 0xA0)}


def render_json(rows: list[Row], verified_count: int, rejected: list[tuple[Path, str]]) -> str:
    document = {
        "verified": verified_count,
        "rejected": [{"path": shown(path), "reason": reason} for path, reason in rejected],
        "ranking": RANKING_TEXT,
        "record_rules": {track_id: {**asdict(track_rows[0].record_rule), "text": _track_rule_text(track_id, track_rows)}
                         for track_id, track_rows in _by_track(rows).items()},
        "tracks": {track_id: _track_json(track_rows[0].target) for track_id, track_rows in _by_track(rows).items()},
        "rows": [_row_json(row) for row in rows],
    }
    return json.dumps(document, indent=2, ensure_ascii=False).translate(_JSON_RAW_CONTROLS) + "\n"


PARQUET_SCHEMA = pa.schema(
    [
        ("track", pa.string()),
        ("rank", pa.int32()),
        ("submission", pa.string()),
        ("official", pa.bool_()),
        ("calibrated", pa.bool_()),
        ("authors", pa.list_(pa.string())),
        ("description", pa.string()),
        ("runs", pa.int32()),
        ("seeds", pa.int32()),
        ("drawn_seeds", pa.int32()),
        ("throttled_runs", pa.int32()),
        ("sampled_runs", pa.int32()),
        ("throttle_reasons", pa.list_(pa.string())),
        ("val_loss_mean", pa.float64()),
        ("val_loss_std", pa.float64()),
        ("best_val_loss", pa.float64()),
        ("best_run_id", pa.string()),
        ("val_bpb_mean", pa.float64()),
        ("train_seconds_mean", pa.float64()),
        ("first_run_at", pa.timestamp("us", tz="UTC")),
        ("latest_run_at", pa.timestamp("us", tz="UTC")),
        ("record_status", pa.string()),
        ("record_p_value", pa.float64()),
        ("record_improvement", pa.float64()),
        ("record_baseline", pa.string()),
        ("signers", pa.list_(pa.string())),
        ("run_ids", pa.list_(pa.string())),
        ("val_losses", pa.list_(pa.float64())),
        # Time-to-target tracks (null on a fixed-time track); times_to_target is null where a run did not reach it.
        ("target_val_loss", pa.float64()),
        ("target_provisional", pa.bool_()),
        ("reached_runs", pa.int32()),
        ("time_to_target_mean", pa.float64()),
        ("time_to_target_std", pa.float64()),
        ("best_time_to_target", pa.float64()),
        ("best_time_run_id", pa.string()),
        ("times_to_target", pa.list_(pa.float64())),
    ]
)


def render_parquet(rows: list[Row]) -> bytes:
    records = []
    for row in rows:
        record = _row_json(row)
        del record["run_details"]
        record["first_run_at"] = row.first_run_at
        record["latest_run_at"] = row.latest_run_at
        record["run_ids"] = [run.run_id for run in row.runs]
        record["val_losses"] = row.val_losses
        record["times_to_target"] = row.times_to_target if row.timed else None
        records.append(record)
    table = pa.Table.from_pylist(records, schema=PARQUET_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


# --- HTML -------------------------------------------------------------------------------------

PALETTE = ["#1c64b0", "#d9480f", "#2b8a3e", "#862e9c", "#c2255c", "#0b7285", "#e67700", "#4263eb",
           "#5c5f66", "#8f5c00"]

PLOT_WIDTH, PLOT_HEIGHT = 960, 420
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 20, 16, 48


def _nice_ticks(low: float, high: float, target: int = 6) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw_step = (high - low) / target
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw_step)
    first = math.ceil(low / step - 1e-9)
    ticks = []
    index = first
    while index * step <= high + 1e-9 * step:
        ticks.append(round(index * step, 10))
        index += 1
    return ticks


def _run_label(row: Row, run: Run) -> str:
    return f"{row.submission} · {run.run_id} (seed {run.seed})"


def _score_label(row: Row, run: Run) -> str:
    """The ◆'s tooltip: which model gave the run its score."""
    if not row.timed:
        return f"final val_loss {run.val_loss:.4f}"
    if run.time_to_target is not None:
        return f"reached the target at {run.time_to_target:.2f} s, val_loss {run.val_loss:.4f}"
    return f"did not reach the target; final val_loss {run.val_loss:.4f}"


def render_svg(track_id: str, rows: list[Row]) -> tuple[str, bool]:
    """The loss plot for one track's rows; returns (svg, whether early high losses were cut off).

    Per run, in its row's colour: the validation curve the evaluator measured (solid, a dot for each
    model it scored, ◆ for the model that gave the run its score) and the training loss the
    submission reported (faint). The solid curve is drawn from the result's val_curve alone: what a
    submission logs through ctx.log, whatever its key, never becomes a validation point."""
    target = rows[0].target
    runs = [(index, run) for index, row in enumerate(rows) for run in row.runs]
    curves = [(index, run, list(zip(run.loss_curve["time_s"], run.loss_curve["value"]))) for index, run in runs]
    measured = [(index, run, [(t, v) for t, v, _ in run.val_points]) for index, run in runs]
    x_max = max([run.budget_s for _, run in runs]
                + [t for _, _, points in curves + measured for t, _ in points]
                + [run.train_seconds or 0.0 for _, run in runs])
    finals = [run.val_loss for _, run in runs] + ([target.val_loss] if target is not None else [])
    values = [v for _, _, points in curves + measured for _, v in points] + finals
    y_low = min(values)
    # The first seconds of training sit far above everything that decides the ranking; the axis
    # starts at the highest loss logged or measured after the first tenth of the budget, so the
    # tails are legible.
    late = [v for _, _, points in curves + measured for t, v in points if t >= 0.1 * x_max] + finals
    y_high = max(late)
    pad = 0.05 * (y_high - y_low or 1.0)
    y_low, y_high = y_low - pad, y_high + pad
    clipped = max(values) > y_high
    x_ticks = _nice_ticks(0.0, x_max)
    y_ticks = [tick for tick in _nice_ticks(y_low, y_high) if y_low <= tick <= y_high]

    clip_id = "".join(ch if ch.isalnum() else "-" for ch in track_id)
    inner_w = PLOT_WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    inner_h = PLOT_HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    x_span = max(x_ticks[-1], x_max)

    def px(t: float) -> float:
        return MARGIN_LEFT + inner_w * t / x_span

    def py(v: float) -> float:
        return MARGIN_TOP + inner_h * (y_high - v) / (y_high - y_low)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {PLOT_WIDTH} {PLOT_HEIGHT}" role="img" '
        f'aria-label="Validation loss measured by the evaluator and training loss reported by each run, by training time">',
        f'<defs><clipPath id="plot-area-{clip_id}"><rect x="{MARGIN_LEFT}" y="{MARGIN_TOP}" '
        f'width="{inner_w}" height="{inner_h}"/></clipPath></defs>',
        f'<rect x="{MARGIN_LEFT}" y="{MARGIN_TOP}" width="{inner_w}" height="{inner_h}" class="frame"/>',
    ]
    for tick in x_ticks:
        x = px(tick)
        parts.append(f'<line x1="{x:.1f}" y1="{MARGIN_TOP}" x2="{x:.1f}" y2="{MARGIN_TOP + inner_h}" class="grid"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{MARGIN_TOP + inner_h + 18}" class="tick" text-anchor="middle">{tick:g}</text>'
        )
    for tick in y_ticks:
        y = py(tick)
        parts.append(f'<line x1="{MARGIN_LEFT}" y1="{y:.1f}" x2="{MARGIN_LEFT + inner_w}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{MARGIN_LEFT - 8}" y="{y + 4:.1f}" class="tick" text-anchor="end">{tick:g}</text>')
    parts.append(
        f'<text x="{MARGIN_LEFT + inner_w / 2}" y="{PLOT_HEIGHT - 8}" class="axis" text-anchor="middle">'
        "training time (s, evaluator clock)</text>"
    )
    parts.append(
        f'<text transform="translate(16 {MARGIN_TOP + inner_h / 2}) rotate(-90)" class="axis" '
        'text-anchor="middle">loss (nats/token)</text>'
    )
    if target is not None:  # under the curves; its label goes over them, below
        parts.append(
            f'<line x1="{MARGIN_LEFT}" y1="{py(target.val_loss):.1f}" x2="{MARGIN_LEFT + inner_w}" '
            f'y2="{py(target.val_loss):.1f}" class="target" stroke-dasharray="7 4">'
            f"<title>{html.escape(_target_label(target))}</title></line>"
        )
    parts.append(f'<g clip-path="url(#plot-area-{clip_id})">')
    # Training loss first, faint, so that the measured curves are drawn over it.
    for index, run, points in curves:
        if not points:
            continue
        colour = PALETTE[index % len(PALETTE)]
        coordinates = " ".join(f"{px(t):.1f},{py(v):.1f}" for t, v in points)
        label = html.escape(f"{_run_label(rows[index], run)}: training loss it reported, not verified")
        kind = "train" if rows[index].official else "train unofficial"
        parts.append(
            f'<polyline points="{coordinates}" stroke="{colour}" class="{kind}"><title>{label}</title></polyline>'
        )
    for index, run, points in measured:
        if len(points) < 2:  # a lone point is a marker, not a line
            continue
        colour = PALETTE[index % len(PALETTE)]
        path = " L".join(f"{px(t):.1f} {py(v):.1f}" for t, v in points)
        label = html.escape(f"{_run_label(rows[index], run)}: validation loss measured by the evaluator")
        kind = "val" if rows[index].official else "val unofficial"
        parts.append(f'<path d="M{path}" stroke="{colour}" class="{kind}"><title>{label}</title></path>')
    for index, run in runs:
        colour = PALETTE[index % len(PALETTE)]
        skipped = False
        for t, v, model in run.val_points:
            if not skipped and t == run.score_time:
                skipped = True  # the ◆ marks this model
                continue
            label = html.escape(
                f"{_run_label(rows[index], run)}: val_loss {v:.4f} at {t:.2f} s ({model}), measured by the evaluator"
            )
            parts.append(
                f'<circle cx="{px(t):.1f}" cy="{py(v):.1f}" r="3.2" fill="{colour}" class="val-point">'
                f"<title>{label}</title></circle>"
            )
    parts.append("</g>")
    if target is not None:
        parts.append(
            f'<text x="{MARGIN_LEFT + inner_w - 6}" y="{py(target.val_loss) - 6:.1f}" class="target-label" '
            f'text-anchor="end">{html.escape(_target_label(target))}</text>'
        )
    for index, run in runs:
        colour = PALETTE[index % len(PALETTE)]
        x = px(run.score_time if run.score_time is not None else x_max)
        y = py(run.val_loss)
        label = html.escape(f"{_run_label(rows[index], run)}: {_score_label(rows[index], run)}")
        parts.append(
            f'<path d="M{x:.1f} {y - 6:.1f} L{x + 6:.1f} {y:.1f} L{x:.1f} {y + 6:.1f} L{x - 6:.1f} {y:.1f} Z" '
            f'fill="{colour}" class="final"><title>{label}</title></path>'
        )
    parts.append("</svg>")
    return "\n".join(parts), clipped


def _target_label(target: TrackTarget) -> str:
    return f"target val_loss {target.val_loss:g}" + (" (provisional)" if target.provisional else "")


def plot_caption(target: TrackTarget | None, clipped: bool) -> str:
    """What the plot shows, as HTML: which curve is the evaluator's measurement and which the submission's word."""
    scored = ("the first model at or below the target, or the final model of a run that did not reach it"
              if target is not None else "the final model, at the moment it was saved")
    caption = (
        "Solid lines and dots: validation loss measured by the evaluator on its snapshots of each run's model "
        f"and on the final model; ◆ marks the model that gave the run its score ({scored}). Faint lines: training "
        "loss the submission reported through <code>ctx.log</code>, not verified. One colour per row, by "
        "submission (coloured dashes: unofficial), against the evaluator's clock."
    )
    if target is not None:
        caption += f" The dark dashed line is the {html.escape(_target_label(target))}."
    if clipped:
        caption += " The first seconds of training, where the loss is above the plotted range, are cut off."
    return caption


HTML_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #1d2125; line-height: 1.45; }
h1 { margin-bottom: .25rem; }
p.rule { color: #495057; max-width: 75ch; }
table { border-collapse: collapse; width: 100%; font-size: .9rem; margin: 1rem 0; }
th, td { padding: .35rem .55rem; border-bottom: 1px solid #dee2e6; text-align: left; vertical-align: top; }
th { background: #f1f3f5; font-weight: 600; white-space: nowrap; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.unbroken { white-space: nowrap; }
tr.record td { background: #fff4d6; font-weight: 600; }
tr.unofficial td { color: #6c757d; }
.swatch { display: inline-block; width: .8rem; height: .8rem; border-radius: 2px; margin-right: .4rem;
          vertical-align: -1px; }
figure { margin: 1rem 0 2.5rem; }
figcaption { color: #495057; font-size: .85rem; max-width: 90ch; }
svg { width: 100%; height: auto; font-family: inherit; }
svg .frame { fill: #fcfcfd; stroke: #adb5bd; }
svg .grid { stroke: #e9ecef; }
svg .tick { font-size: 12px; fill: #495057; }
svg .axis { font-size: 13px; fill: #1d2125; }
svg .train { fill: none; stroke-width: 1.2; stroke-opacity: .3; stroke-linejoin: round; }
svg .val { fill: none; stroke-width: 2; stroke-linejoin: round; }
svg .unofficial { stroke-dasharray: 5 3; }
svg .val-point { stroke: #fff; stroke-width: 1; }
svg .target { stroke: #1d2125; stroke-width: 1.3; }
svg .target-label { font-size: 12px; fill: #1d2125; }
svg .final { stroke: #fff; stroke-width: 1.5; }
"""


def _html_class(header: str, numeric: bool) -> str:
    return "num" if numeric else "unbroken" if header in UNBROKEN else "text"


def render_html(rows: list[Row], verified_count: int) -> str:
    body = [
        "<h1>Speedrun leaderboard</h1>",
        f'<p class="rule">Built by <code>evaluator leaderboard</code> from {verified_count} signed result(s) that '
        f"verify. {html.escape(RANKING_TEXT)}</p>",
    ]
    if not rows:
        body.append("<p>No verified results yet.</p>")
    for track_id, track_rows in _by_track(rows).items():
        target = track_rows[0].target
        body.append(f"<h2>Track <code>{html.escape(track_id)}</code>{html.escape(heading_suffix(target))}</h2>")
        if target is not None:
            body.append(f'<p class="rule">{html.escape(target_ranking_text(target))}</p>')
        body.append(f'<p class="rule">{html.escape(_track_rule_text(track_id, track_rows))}</p>')
        columns = columns_of(track_rows)
        headers = "".join(f'<th class="{_html_class(h, numeric)}">{html.escape(h)}</th>' for h, numeric in columns)
        body.append(f"<table><thead><tr>{headers}</tr></thead><tbody>")
        for index, row in enumerate(track_rows):
            classes = ["record"] if row.record_status == RECORD else []
            classes += [] if row.official else ["unofficial"]
            cells = [html.escape(cell) for cell in _cells(row)]
            cells[1] = f'<span class="swatch" style="background:{PALETTE[index % len(PALETTE)]}"></span>{cells[1]}'
            tds = "".join(
                f'<td class="{_html_class(header, numeric)}">{cell}</td>' for cell, (header, numeric) in zip(cells, columns)
            )
            body.append(f'<tr class="{" ".join(classes)}">{tds}</tr>')
        body.append("</tbody></table>")
        svg, clipped = render_svg(track_id, track_rows)
        body.append(f"<figure>{svg}<figcaption>{plot_caption(target, clipped)}</figcaption></figure>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>Speedrun leaderboard</title>\n<style>{HTML_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


# --- command line -----------------------------------------------------------------------------

FORMATS = ("table", "markdown", "html", "json", "parquet")


def render(fmt: str, rows: list[Row], verified_count: int, rejected: list[tuple[Path, str]]) -> bytes:
    if fmt == "table":
        return render_table(rows, verified_count).encode("utf-8")
    if fmt == "markdown":
        return render_markdown(rows, verified_count).encode("utf-8")
    if fmt == "html":
        return render_html(rows, verified_count).encode("utf-8")
    if fmt == "json":
        return render_json(rows, verified_count, rejected).encode("utf-8")
    return render_parquet(rows)


def _run_leaderboard(args: argparse.Namespace) -> int:
    if args.format == "parquet" and args.out is None:
        raise UserError("--format parquet writes a binary file: give it --out PATH")
    results_dir = Path(args.results) if args.results is not None else RESULTS_DIR
    if args.results is not None and not results_dir.is_dir():
        raise UserError(f"results directory {results_dir} does not exist")
    trusted_dir = Path(args.trusted_keys)
    trusted = load_trusted_keys(trusted_dir)
    envelopes = envelope_paths(results_dir) if results_dir.is_dir() else []
    verified, rejected = verify_paths(envelopes, trusted)
    rules = load_record_rules(Path(args.rules))
    rows, duplicates = build_rows(verified, rules, args.track)
    rejected += duplicates
    exit_code = 1 if rejected else 0  # whatever is shown: a rejected envelope is something to look at
    counted = sum(len(row.runs) for row in rows)
    if rejected:
        sys.stderr.write(f"leaderboard: {len(rejected)} envelope(s) rejected, not shown:\n")
        for path, reason in rejected:
            sys.stderr.write(f"  {_visible(shown(path))}: {_visible(reason)}\n")
    to_terminal = args.format == "table" and args.out is None
    if not rows:
        why = _why_nothing_is_shown(results_dir, len(envelopes), len(verified), trusted_dir, args.track)
        if to_terminal:  # where stdout is the table a person reads; elsewhere it would corrupt the document
            print(why)
            return exit_code
        sys.stderr.write(f"leaderboard: {why}\n")
    if to_terminal and sys.stdout.isatty():
        print_table(Console(), rows, counted)
        return exit_code
    output = render(args.format, rows, counted, rejected)
    if args.out is None:
        sys.stdout.write(output.decode("utf-8"))
    else:
        atomic_write_bytes(Path(args.out), output)
        sys.stderr.write(f"leaderboard: wrote {args.out} ({len(rows)} row(s) from {counted} run(s))\n")
    return exit_code


def _why_nothing_is_shown(results_dir: Path, envelopes: int, verified: int, trusted_dir: Path, track: str | None) -> str:
    where = shown(results_dir) + "/"
    if not results_dir.is_dir():
        return f"nothing to rank: {where} does not exist here; publish a run (evaluator publish RUN_DIR) or give --results DIR"
    if envelopes == 0:
        return f"nothing to rank: {where} holds no published results (*.json); evaluator publish RUN_DIR adds one"
    if verified == 0:
        return (f"nothing to rank: none of the {envelopes} envelope(s) in {where} verified against the trusted keys in "
                f"{shown(trusted_dir)}/ (the reasons are on stderr); a key of your own goes in a folder given with --trusted-keys DIR")
    return f"nothing to rank for track {track!r}: {verified} verified result(s) in {where}, none on that track"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "leaderboard",
        help="rank submissions from verified results",
        description=(
            "Build the leaderboard from the signed results that verify (rejected envelopes are listed on "
            "stderr and never shown; the exit status is then 1). With nothing to rank it says why. One row per submission and track: mean ± std of val_loss over its runs, "
            "best run, val_bpb, train seconds, whether the GPU throttled, authors, latest run, official or not, "
            "and the record test of the track's rule in --rules (distinct seeds, one-sided Welch t-test, minimum "
            "improvement), which each table's header states. On a time-to-target track (one whose results have a "
            "target) rows rank by mean time to target instead, and a row whose runs did not all reach it is "
            "listed after the ranked ones."
        ),
    )
    parser.add_argument("--track", metavar="ID", help="only this track (default: every track, one table each)")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    parser.add_argument(
        "--out", metavar="PATH", help="write here (atomically) instead of stdout; required for parquet"
    )
    parser.add_argument(
        "--results", metavar="DIR", help="published envelopes (default: results/ in the current folder)"
    )
    parser.add_argument(
        "--trusted-keys", default=str(KEYS_DIR), metavar="DIR", help="trusted *.pub keys (default: spec/keys/ in the evaluator's home; a folder of your own for keys you trust)"
    )
    parser.add_argument(
        "--rules", default=str(RECORD_RULES_FILE), metavar="FILE",
        help="record rules per track (default: spec/record-rules.toml); they re-rank, they never invalidate a result",
    )
    parser.set_defaults(handler=_run_leaderboard)

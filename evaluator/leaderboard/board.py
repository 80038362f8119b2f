"""The board: verified runs pooled into rows, ranked, and each track's world record decided.

Each track has two tables: the official one, of runs scored on the hidden test split, and the
development one, of runs scored on the public split, which anyone can memorise. One row per
submission, table and kind of run: a submission's official runs, its unofficial runs (unsandboxed,
budget overridden, ...) and its runs at a calibrated budget are never pooled. Official rows are
ranked by mean val_loss (the hidden split's); in a development table the runs that would be official
but for the split are ranked the same way, and never hold a record. The others are listed after
them, unranked. An official row shows its runs' public-split score beside the hidden one, and how
many of them the contamination check flagged (a model much better on the public split than on the
hidden one has memorised it; much better on the hidden one, the hidden split has leaked).

A time-to-target track (its results carry a `target`; the track need not be defined here) ranks
by mean time to target instead: the evaluator-clock time of the first model, snapshot or final,
at or below the target. A row any of whose runs did not reach it is listed after the ranked rows.
A track's kind and target are those of its newest run; a run made for another goal is set aside,
as its score is not comparable.

Records: official submissions are walked in the order of their first run, and each track's rule
(`spec/record-rules.toml`, read through evaluator.leaderboard.rules) decides whether a row takes
the record from the holder of its time: enough distinct seeds among the runs it counts, a one-sided
Welch p below the rule's threshold and a large enough improvement (in nats, or in seconds on a
time-to-target track). The p-value of each test is kept on the row, for every format to show.

On a track whose rule is `paired`, the test is on paired evidence instead: the runs of every
`evaluator compare` with the holder as side a and the row as side b (their results carry a
`comparison`), matched pair by pair, each pair's difference B - A in a one-sided paired t-test.
Those runs are also ordinary runs of their submissions, pooled into their rows like any other: a
comparison is two sets of honest runs, and leaving them out would hide scores from the board.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from evaluator.leaderboard.rules import RecordRule, RecordRules
from evaluator.leaderboard.stats import mean, paired_one_sided_p, sample_variance, welch_one_sided_p
from evaluator.paths import shown
from evaluator.publish import VerifiedResult
from evaluator.results import FAILED_STATUSES, parse_utc

# Record statuses, as they appear in JSON and Parquet.
RECORD = "record"
FORMER_RECORD = "former record"
NOT_SIGNIFICANT = "not significant"
TOO_SMALL = "improvement too small"
TOO_FEW_SEEDS = "too few seeds"
TOO_FEW_PAIRS = "too few pairs"  # a paired track: no comparison against the holder, or too few of its pairs
NOT_ELIGIBLE = "unofficial"
NOT_REACHED = "target not always reached"  # time-to-target tracks: an unranked row holds no record
DEVELOPMENT = "development"  # scored on the public split: never a record


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
    dev_val_loss: float | None  # scored on the hidden split: the same model on the public split
    contaminated: bool  # the contamination check flagged it
    comparison: dict[str, Any] | None  # a run of evaluator compare: {"id", "pair", "side"}

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
            dev_val_loss=None if result["dev_metrics"] is None else float(result["dev_metrics"]["val_loss"]),
            contaminated=result["contamination"] is not None and result["contamination"]["flagged"],
            comparison=result["comparison"],
            gpu=None
            if result["environment"]["gpu"] is None
            else {key: result["environment"]["gpu"][key] for key in ("name", "pci_bus_id", "uuid")},
        )

    @property
    def time_to_target(self) -> float | None:
        """The run's score on a time-to-target track; None when it did not reach the target (or has none)."""
        return float(self.target["time_s"]) if self.target is not None and self.target["reached"] else None

    @property
    def val_points(self) -> list[tuple[float, float, str]]:
        """(time_s, val_loss, model) of every model the evaluator scored, in time order; models it could
        not score, or did not need to, are gaps."""
        points = [
            (float(p["time_s"]), float(p["val_loss"]), p["model"])
            for p in self.val_curve
            if p["scored"] == "ok" and p["val_loss"] is not None
        ]
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


@dataclass(frozen=True)
class PairedTest:
    """Paired evidence against the record holder: how many pairs counted, and their differences
    (the row's score minus the holder's, lower is better)."""

    pairs: int
    mean_difference: float | None  # None without a pair
    standard_error: float | None  # None under two pairs


@dataclass
class Row:
    track: str
    submission: str
    official: bool
    calibrated: bool  # runs at a calibrated budget: always unofficial, and never pooled with other runs
    runs: list[Run]  # in the order they started
    development: bool = False  # a development table's row: scored on the public split
    clean_development: bool = False  # in a development table, official but for the split: ranked
    failed_statuses: list[str] = field(default_factory=list)  # its kind's published runs that failed, not scored
    rank: int | None = None
    record_status: str = ""
    # The test that decided record_status: its p-value, the improvement in mean val_loss over the
    # record holder it was tested against, and that holder.
    record_p_value: float | None = None
    record_improvement: float | None = None
    record_baseline: str | None = None
    record_rule: RecordRule | None = None
    record_paired: PairedTest | None = None  # a paired track's evidence against record_baseline
    target: TrackTarget | None = None  # set: a time-to-target track, whose rows rank on times

    @property
    def timed(self) -> bool:
        return self.target is not None

    @property
    def rule(self) -> RecordRule:
        """record_rule, which _mark_records sets on every row the board builds."""
        assert self.record_rule is not None
        return self.record_rule

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
    def _reached_times(self) -> list[float]:
        """The times of the runs that reached the target; all of them where all_reached."""
        return [time_s for time_s in self.times_to_target if time_s is not None]

    @property
    def mean_time_to_target(self) -> float | None:
        """None unless every run reached the target: a mean of the lucky runs alone would flatter the row."""
        return mean(self._reached_times) if self.all_reached else None

    @property
    def std_time_to_target(self) -> float | None:
        return math.sqrt(sample_variance(self._reached_times)) if self.all_reached and len(self.runs) > 1 else None

    @property
    def fastest_run(self) -> Run | None:
        reached = [(run, run.time_to_target) for run in self.runs if run.time_to_target is not None]
        return min(reached, key=lambda pair: pair[1])[0] if reached else None

    def score(self, run: Run) -> float | None:
        """What ranks the row, lower is better: the time to target (None where the run did not reach
        it: such a row is never tested), or the val_loss on a fixed-time track."""
        return run.time_to_target if self.timed else run.val_loss

    @property
    def ranked(self) -> bool:
        """Ranked in its table: official, or official but for the public split in a development table."""
        return self.official or self.clean_development

    @property
    def mean_dev_val_loss(self) -> float | None:
        """The runs' mean public-split val_loss, where the hidden split scored them."""
        losses = [run.dev_val_loss for run in self.runs if run.dev_val_loss is not None]
        return mean(losses) if losses else None

    @property
    def contaminated_runs(self) -> int:
        return sum(1 for run in self.runs if run.contaminated)

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
                score = self.score(run)
                # Only rankable rows are tested: on a time-to-target track, their runs all reached it.
                assert score is not None
                by_seed.setdefault(run.seed, []).append(score)
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
    owners = _name_owners(verified)
    for item in sorted(verified, key=lambda v: str(v.path)):
        result = item.result
        if track is not None and result["track"]["id"] != track:
            continue
        if result["run_id"] in seen:
            # The same signed run copied to a second file must not count twice.
            first = shown(seen[result["run_id"]])
            duplicates.append((item.path, f"duplicate of run {result['run_id']} already counted from {first}"))
            continue
        name, folder = result["submission"]["name"], result["submission"]["path"]
        if PurePosixPath(folder).name != name:
            duplicates.append(
                (
                    item.path,
                    f"run {result['run_id']} names submission {name!r} but ran the folder "
                    f"{folder!r}: a submission's name is its folder's",
                )
            )
            continue
        if owners[name] != folder:
            duplicates.append(
                (
                    item.path,
                    f"run {result['run_id']} ran {folder!r}, but the name {name!r} belongs to "
                    f"{owners[name]!r}, which published under it first",
                )
            )
            continue
        seen[result["run_id"]] = item.path
        by_track.setdefault(result["track"]["id"], []).append(item)
    ordered: list[Row] = []
    for track_id in sorted(by_track):
        items, target = _comparable_runs(by_track[track_id], duplicates)
        rows: dict[tuple[str, bool, bool, bool, bool], Row] = {}
        failed: dict[tuple[str, bool, bool, bool, bool], list[str]] = {}
        for item in items:
            result = item.result
            key = _row_key(result)
            if result["status"] in FAILED_STATUSES:
                failed.setdefault(key, []).append(result["status"])
                continue
            name, official, calibrated, development, clean = key
            rows.setdefault(
                key,
                Row(
                    track_id,
                    name,
                    official,
                    calibrated,
                    runs=[],
                    target=target,
                    development=development,
                    clean_development=clean,
                ),
            ).runs.append(Run.from_verified(item))
        for key, statuses in failed.items():
            if key in rows:  # a submission none of whose runs of this kind was scored has no row to count them on
                rows[key].failed_statuses = sorted(statuses)
        for development in (False, True):
            in_table = [row for row in rows.values() if row.development == development]
            for row in in_table:
                row.runs.sort(key=lambda run: (run.started_at, run.run_id))
            _mark_records(in_table, rules.for_track(track_id))
            ranked = sorted((r for r in in_table if r.ranked), key=_rank_key)
            unranked = sorted((r for r in in_table if not r.ranked), key=lambda r: (r.calibrated, *_rank_key(r)))
            for rank, row in enumerate((r for r in ranked if _rankable(r)), start=1):
                row.rank = rank
            ordered.extend(ranked + unranked)
    return ordered, duplicates


def _name_owners(verified: list[VerifiedResult]) -> dict[str, str]:
    """Each submission name's folder: the one whose run under that name started first. A second folder
    that takes the name cannot pool its runs into the first one's row."""
    owners: dict[str, str] = {}
    for item in sorted(verified, key=lambda v: (parse_utc(v.result["started_at"]), v.result["run_id"])):
        owners.setdefault(item.result["submission"]["name"], item.result["submission"]["path"])
    return owners


def _row_key(result: dict[str, Any]) -> tuple[str, bool, bool, bool, bool]:
    """(submission, official, calibrated, development, official but for the split): the runs one row pools."""
    calibrated = result["calibration"] is not None  # never official: the schema says so, and so does this
    development = result["data"]["scored_on"] == "public"
    official = result["official"] and not calibrated and not development
    clean = development and len(result["unofficial_reasons"]) == 1 and not calibrated
    return result["submission"]["name"], official, calibrated, development, clean


def _rankable(row: Row) -> bool:
    """Every row of a fixed-time track; on a time-to-target track, a row whose runs all reached the target."""
    return not row.timed or row.all_reached


def _rank_key(row: Row) -> tuple:
    if not row.timed:
        return (row.mean_val_loss, row.submission)
    # Rows that did not always reach the target come after the others: the more often they reached
    # it the earlier, then by the mean time of the runs that did.
    reached = [time_s for time_s in row.times_to_target if time_s is not None]
    return (
        not row.all_reached,
        -row.reached_runs / len(row.runs),
        mean(reached) if reached else math.inf,
        row.submission,
    )


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
        if (theirs is None and target is None) or (
            theirs is not None and target is not None and theirs.val_loss == target.val_loss
        ):
            kept.append(item)
            continue
        set_aside.append(
            (
                item.path,
                (
                    f"run {item.result['run_id']} was made for {_goal_text(theirs)}, the track's newest run "
                    f"({newest.result['run_id']}) for {_goal_text(target)}: their scores are not comparable"
                ),
            )
        )
    return kept, target


def _mark_records(rows: list[Row], rule: RecordRule) -> None:
    holder: Row | None = None
    for row in sorted(rows, key=lambda r: (r.first_run_at, r.submission)):
        row.record_rule = rule
        if row.development:
            row.record_status = DEVELOPMENT
        elif not row.official:
            row.record_status = NOT_ELIGIBLE
        elif not _rankable(row):
            row.record_status = NOT_REACHED
        elif row.counted_seeds(rule) < rule.min_seeds:
            row.record_status = TOO_FEW_SEEDS
        elif holder is None:
            row.record_status = RECORD
            holder = row
        else:
            row.record_baseline = holder.submission
            if rule.paired:
                differences = paired_differences(holder, row, rule)
                row.record_paired = _paired_test(differences)
                if len(differences) < rule.min_seeds:
                    row.record_status = TOO_FEW_PAIRS
                    continue
                row.record_p_value = paired_one_sided_p(differences)
                improvement = -mean(differences)
            else:
                baseline, challenger = holder.counted_scores(rule), row.counted_scores(rule)
                row.record_p_value = welch_one_sided_p(baseline, challenger)
                improvement = mean(baseline) - mean(challenger)
            # Rounded: val_losses are multiples of 1e-4 (times of 0.01 s), and their float difference
            # must not fall a hair below a threshold it meets exactly.
            row.record_improvement = round(improvement, 9)
            if row.record_p_value >= rule.p_below:
                row.record_status = NOT_SIGNIFICANT
            elif row.record_improvement < rule.min_improvement(row.timed):
                row.record_status = TOO_SMALL
            else:
                holder.record_status = FORMER_RECORD
                row.record_status = RECORD
                holder = row


def paired_differences(holder: Row, challenger: Row, rule: RecordRule) -> list[float]:
    """One difference (the challenger's score minus the holder's) per pair of every comparison that
    ran the holder as side a and the challenger as side b, in the order of the comparisons and pairs.

    A pair counts when both its runs are in the rows (official and scored: a run that failed is on
    its row's failed count, as in the unpaired test), have one seed, drawn if the rule counts only
    drawn seeds, and on a time-to-target track both reached the target. Two runs in one slot (the
    same comparison, pair and side) would be a re-roll: the one that started first counts."""

    def slots(row: Row, side: str) -> dict[tuple[str, int], Run]:
        found: dict[tuple[str, int], Run] = {}
        for run in row.runs:  # in the order they started
            if run.comparison is not None and run.comparison["side"] == side:
                found.setdefault((run.comparison["id"], run.comparison["pair"]), run)
        return found

    baseline_runs, challenger_runs = slots(holder, "a"), slots(challenger, "b")
    differences = []
    for key in sorted(baseline_runs.keys() & challenger_runs.keys()):
        a, b = baseline_runs[key], challenger_runs[key]
        if a.seed != b.seed or (rule.drawn_seeds_only and not (a.seed_drawn and b.seed_drawn)):
            continue
        score_a, score_b = holder.score(a), challenger.score(b)
        if score_a is not None and score_b is not None:
            differences.append(score_b - score_a)
    return differences


def _paired_test(differences: list[float]) -> PairedTest:
    count = len(differences)
    return PairedTest(
        pairs=count,
        mean_difference=mean(differences) if count else None,
        standard_error=math.sqrt(sample_variance(differences) / count) if count > 1 else None,
    )

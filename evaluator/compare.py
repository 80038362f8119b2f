"""`evaluator compare A B`: two submissions run interleaved on this host, pair by pair, each pair
with one seed, and a one-sided paired t-test on the pairs' differences (B - A, lower is better).

Why pairs: two submissions' runs made on different days, hosts or seeds differ by the host's drift
and the seed's luck as much as by the code. Both runs of a pair share the seed and run back to back
in ABBA order (pair 1: A then B, pair 2: B then A, ...), so a drift over the comparison falls on
both sides alike, and the difference of a pair is the code's alone plus noise.

Each run is an ordinary `evaluate()` with its own result.json, whose `comparison` names the
comparison, the pair and the side. The state lives in the output folder: `comparison.json` (the
plan, written before any run; a drawn seed is added to it before its pair runs) and `runs/`. The
same command with the same --out resumes: a pair's run that has a verdict is never run again; one
whose result says the sandbox or the evaluator failed (no verdict) runs again with the pair's seed.
The number of pairs is fixed when the comparison begins: adding pairs until p is small would make
the p-value meaningless.
"""

from __future__ import annotations

import argparse
import fcntl
import html
import io
import json
import math
import re
import secrets
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console

from evaluator.check import check_submission
from evaluator.errors import UserError
from evaluator.fsutil import atomic_write_text, tree_sha256
from evaluator.leaderboard.board import Row, Run, TrackTarget
from evaluator.leaderboard.html import HTML_STYLE, PALETTE, plot_caption, render_svg
from evaluator.leaderboard.stats import mean, paired_one_sided_p, sample_variance
from evaluator.leaderboard.text import visible
from evaluator.metrics import METRICS_FILE, empty_loss_curve, read_loss_curve
from evaluator.paths import RUNS_DIR, shown
from evaluator.plan import check_budget, draw_seed
from evaluator.publish import VerifiedResult
from evaluator.results import EXIT_CODES, RESULT_FILE, SCORED_STATUSES, parse_utc, result_problems, strict_json_loads
from evaluator.runner import evaluate
from evaluator.sandbox import SANDBOX_CHOICES
from evaluator.tracks import Track, load_track

PLAN_FILE = "comparison.json"
HTML_FILE = "comparison.html"
LOCK_FILE = ".comparison.lock"
PLAN_SCHEMA = 1
COMPARISON_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")  # result.schema.json's comparison.id
# result.schema.json's bound on comparison.pair.
MAX_PAIRS = 1000
# A result with one of these has no verdict on the code: its run is made again, with the pair's seed.
NO_VERDICT_STATUSES = ("sandbox_error", "evaluator_error")
# Comparisons go beside the unsigned run directories, never into results/<track>/<name>/, the
# published layout that `verify` and `leaderboard` read.
DEFAULT_PARENT = RUNS_DIR / "compare"


def run_order(pair: int) -> tuple[str, str]:
    """ABBA: odd pairs run A first, even pairs B first, so a steady drift favours neither side."""
    return ("a", "b") if pair % 2 else ("b", "a")


@dataclass(frozen=True)
class Side:
    folder: str  # as shown(): relative to the current folder when inside it
    name: str
    tree_sha256: str


@dataclass
class ComparisonPlan:
    """comparison.json: what the comparison is, fixed when it begins, and the seeds drawn so far."""

    id: str
    track: str
    track_sha256: str
    budget_s: float  # the track's unless --budget
    pairs: int
    secret_seeds: bool
    sandbox: str
    a: Side
    b: Side
    seeds: list[int] = field(default_factory=list)  # one per pair; with secret seeds, drawn pair by pair

    def to_json(self) -> str:
        return json.dumps({"schema": PLAN_SCHEMA, **asdict(self)}, indent=2) + "\n"

    @classmethod
    def read(cls, path: Path) -> ComparisonPlan:
        """The plan in `path`, every field checked: the folder is the user's, and so is what is in it."""
        try:
            raw = strict_json_loads(path.read_bytes())
            if raw.pop("schema") != PLAN_SCHEMA:
                raise ValueError("another schema")
            plan = cls(**{**raw, "a": Side(**raw["a"]), "b": Side(**raw["b"])})
            problem = plan._problem()
            if problem:
                raise ValueError(problem)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise UserError(
                f"{shown(path)} is not a comparison plan this evaluator wrote ({exc}); give a new --out"
            ) from None
        return plan

    def _problem(self) -> str | None:
        strings = (
            self.id,
            self.track,
            self.track_sha256,
            self.sandbox,
            *asdict(self.a).values(),
            *asdict(self.b).values(),
        )
        if not all(isinstance(value, str) for value in strings) or not COMPARISON_ID.fullmatch(self.id):
            return "a malformed id, track or submission"
        if type(self.pairs) is not int or not 1 <= self.pairs <= MAX_PAIRS or type(self.secret_seeds) is not bool:
            return "a malformed number of pairs"
        if not isinstance(self.budget_s, float) or not (self.budget_s > 0 and math.isfinite(self.budget_s)):
            return "a malformed budget"
        if (
            not isinstance(self.seeds, list)
            or len(self.seeds) > self.pairs
            or any(type(seed) is not int for seed in self.seeds)
        ):
            return "malformed seeds"
        return None


@dataclass
class PairRun:
    """One side of one pair: its result (None until it has one that can be read) and run directory."""

    result: dict[str, Any] | None = None
    run_dir: Path | None = None

    @property
    def status(self) -> str:
        return "no result" if self.result is None else self.result["status"]


def score_of(result: dict[str, Any] | None, timed: bool) -> float | None:
    """What the comparison compares, lower is better: the time to target on a time-to-target track,
    else the val_loss; None where the run has none (it failed, or did not reach the target)."""
    if result is None or result["status"] not in SCORED_STATUSES:
        return None
    if timed:
        target = result["target"]
        return float(target["time_s"]) if target is not None and target["reached"] else None
    return float(result["metrics"]["val_loss"])


@dataclass
class Summary:
    """The paired statistics of the pairs both of whose runs were scored."""

    differences: list[float]
    mean_difference: float | None
    std_difference: float | None
    standard_error: float | None
    p_value: float | None  # one-sided, H1: B's scores are lower than A's


def summarise(differences: list[float]) -> Summary:
    count = len(differences)
    std = math.sqrt(sample_variance(differences)) if count > 1 else None
    return Summary(
        differences=differences,
        mean_difference=mean(differences) if count else None,
        std_difference=std,
        standard_error=None if std is None else std / math.sqrt(count),
        p_value=paired_one_sided_p(differences) if count > 1 else None,
    )


@dataclass
class Comparison:
    plan: ComparisonPlan
    out: Path
    timed: bool
    runs: dict[tuple[int, str], PairRun]  # (pair, side)

    def difference(self, pair: int) -> float | None:
        a, b = (score_of(self.runs[pair, side].result, self.timed) for side in ("a", "b"))
        return None if a is None or b is None else b - a

    def left_out(self, pair: int) -> str | None:
        """Why a pair is not in the test: which side has no score, and its status."""
        if self.difference(pair) is not None:
            return None
        missing = [
            f"{side.upper()} {self.runs[pair, side].status}"
            for side in ("a", "b")
            if score_of(self.runs[pair, side].result, self.timed) is None
        ]
        return ", ".join(missing)

    @property
    def summary(self) -> Summary:
        return summarise([d for pair in range(1, self.plan.pairs + 1) if (d := self.difference(pair)) is not None])

    @property
    def exit_code(self) -> int:
        """As `evaluator run --seeds`: the worst run's (a run without a readable result is the evaluator's failure)."""
        return max(
            EXIT_CODES[run.status] if run.result is not None else EXIT_CODES["evaluator_error"]
            for run in self.runs.values()
        )


def _new_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dt%H%M%Sz") + "-" + secrets.token_hex(3)


def _side(folder: Path) -> tuple[Side, str]:
    """The submission's identity, and its manifest's track; an invalid one is refused with its findings."""
    report = check_submission(folder)
    if not report.ok:
        details = "; ".join(str(finding) for finding in report.findings[:3])
        raise UserError(
            f"{folder}: the submission is invalid ({len(report.findings)} problem(s): {details}); "
            f"evaluator check {folder} lists them"
        )
    assert report.manifest is not None  # parse_manifest gives findings whenever it gives no manifest
    return Side(
        folder=shown(folder.resolve()), name=report.manifest.name, tree_sha256=tree_sha256(folder)
    ), report.manifest.track


def _requested_plan(
    a: Path, b: Path, track_id: str | None, pairs: int, secret_seeds: bool, budget_s: float | None, sandbox: str
) -> tuple[ComparisonPlan, Track]:
    """The plan the command line asks for (its id and seeds are set when it begins)."""
    if not 1 <= pairs <= MAX_PAIRS:
        raise UserError(f"--seeds is the number of pairs: 1 to {MAX_PAIRS}, not {pairs}")
    if budget_s is not None:
        check_budget(budget_s)
    if a.resolve() == b.resolve():
        raise UserError(f"A and B are the same folder ({a}): a comparison needs two submissions")
    side_a, track_a = _side(a)
    side_b, track_b = _side(b)
    if track_id is None and track_a != track_b:
        raise UserError(f"A is for track {track_a} and B for {track_b}: choose one with --track")
    track = load_track(track_id or track_a)
    plan = ComparisonPlan(
        id="",
        track=track.id,
        track_sha256=track.sha256,
        budget_s=float(track.budget_s if budget_s is None else budget_s),
        pairs=pairs,
        secret_seeds=secret_seeds,
        sandbox=sandbox,
        a=side_a,
        b=side_b,
    )
    return plan, track


def _differences_from(plan: ComparisonPlan, requested: ComparisonPlan) -> list[str]:
    """What the command line asks for that the comparison under way is not."""
    found = []
    for side in ("a", "b"):
        theirs, ours = getattr(plan, side), getattr(requested, side)
        if theirs.folder != ours.folder:
            found.append(f"{side.upper()} is {theirs.folder}, not {ours.folder}")
        elif theirs.tree_sha256 != ours.tree_sha256:
            found.append(f"{theirs.folder} has changed since the comparison began (its runs are of other code)")
    if plan.track != requested.track:
        found.append(f"the track is {plan.track}, not {requested.track}")
    elif plan.track_sha256 != requested.track_sha256:
        found.append(f"spec/tracks/{plan.track}.toml has changed since the comparison began")
    options = (("budget_s", "--budget", "{:g}"), ("pairs", "--seeds", "{}"), ("sandbox", "--sandbox", "{}"))
    for name, flag, form in options:
        if getattr(plan, name) != getattr(requested, name):
            found.append(f"{flag} {form.format(getattr(plan, name))} (asked: {form.format(getattr(requested, name))})")
    if plan.secret_seeds != requested.secret_seeds:
        found.append("--secret-seeds" + (" (asked without)" if plan.secret_seeds else " was not given (asked with)"))
    return found


def _begin_or_resume(out: Path, requested: ComparisonPlan, track: Track) -> ComparisonPlan:
    plan_path = out / PLAN_FILE
    if plan_path.exists():
        plan = ComparisonPlan.read(plan_path)
        differences = _differences_from(plan, requested)
        if differences:
            raise UserError(
                f"{shown(out)} holds comparison {plan.id}, which the command must repeat to resume: "
                + "; ".join(differences)
            )
        return plan
    if any(path.name != LOCK_FILE for path in out.iterdir()):
        raise UserError(f"{shown(out)} holds other files and no {PLAN_FILE}: give a new or empty --out")
    plan = requested
    plan.id = _new_id()
    if not plan.secret_seeds:
        plan.seeds = [track.default_seed + index for index in range(plan.pairs)]
    atomic_write_text(plan_path, plan.to_json())
    return plan


def _read_result(run_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """A run directory's result.json through the strict reader: (result, "") or (None, why not)."""
    try:
        result = strict_json_loads((run_dir / RESULT_FILE).read_bytes())
    except FileNotFoundError:
        return None, "no result.json"
    except (OSError, ValueError) as exc:
        return None, f"unreadable result.json ({exc})"
    problems = result_problems(result)
    return (None, f"invalid result.json ({problems[0]})") if problems else (result, "")


def _belongs(result: dict[str, Any], plan: ComparisonPlan) -> tuple[int, str] | None:
    """(pair, side) of a result that is a run of this plan: its comparison, its side's tree, the
    pair's seed, the plan's track and budget; None for anything else."""
    comparison = result["comparison"]
    if comparison is None or comparison["id"] != plan.id or comparison["pair"] > len(plan.seeds):
        return None
    pair, side = comparison["pair"], comparison["side"]
    if (
        result["submission"]["tree_sha256"] != getattr(plan, side).tree_sha256
        or result["seed"] != plan.seeds[pair - 1]
        or result["seed_drawn"] != plan.secret_seeds
        or result["track"]["sha256"] != plan.track_sha256
        or float(result["budget_s"]) != plan.budget_s
    ):
        return None
    return pair, side


def _earlier_runs(plan: ComparisonPlan, runs_dir: Path, say: Callable[[str], None]) -> dict[tuple[int, str], PairRun]:
    """The runs of this comparison already in runs_dir that have a verdict; for a slot with several
    (only a second process could make them), the one that ended first: a later one is no re-roll."""
    found: dict[tuple[int, str], PairRun] = {}
    for run_dir in sorted(path for path in runs_dir.glob("*") if path.is_dir() and not path.name.startswith(".")):
        result, problem = _read_result(run_dir)
        if result is None:
            say(f"{visible(shown(run_dir))}: {visible(problem)}; its pair's run is made again if it has no other")
            continue
        slot = _belongs(result, plan)
        if slot is None or result["status"] in NO_VERDICT_STATUSES:
            continue
        earlier = found.get(slot)
        if (
            earlier is None
            or earlier.result is None
            or parse_utc(result["ended_at"]) < parse_utc(earlier.result["ended_at"])
        ):
            found[slot] = PairRun(result=result, run_dir=run_dir)
    return found


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One process per comparison: two would run the same pair twice."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another evaluator compare is running the comparison in {shown(out)}") from None
        yield


def _run_line(plan: ComparisonPlan, pair: int, side: str) -> str:
    return f"pair {pair}/{plan.pairs} {side.upper()} ({getattr(plan, side).name}, seed {plan.seeds[pair - 1]})"


def _finished_text(run: PairRun, timed: bool) -> str:
    if run.result is None:
        return "no result"
    result, score = run.result, score_of(run.result, timed)
    text = result["status"]
    if score is not None:
        text += f", {'time to target' if timed else 'val_loss'} {_score_text(score, timed)}"
    received = result["train"]["received"]
    if received is not None:
        text += f", got {received['share']:.0%} of the CPU it asked for"
    return text


def run_comparison(
    a: Path,
    b: Path,
    *,
    track_id: str | None = None,
    pairs: int = 3,
    secret_seeds: bool = False,
    budget_s: float | None = None,
    out: Path | None = None,
    sandbox_choice: str = "auto",
    say: Callable[[str], None] = lambda line: None,
    evaluate_run: Callable[..., tuple[dict[str, Any], Path]] = evaluate,
) -> Comparison:
    """Begin or resume the comparison of A (the baseline) and B (the candidate) in `out` (default: a
    new folder under results/runs/compare/) and run every pair's runs that have no verdict yet.
    `evaluate_run` is `evaluate` (a test hands in its own)."""
    requested, track = _requested_plan(Path(a), Path(b), track_id, pairs, secret_seeds, budget_s, sandbox_choice)
    if out is None:
        out = DEFAULT_PARENT / _new_id()
    out = Path(out)
    with _locked(out):
        plan = _begin_or_resume(out, requested, track)
        runs_dir = out / "runs"
        runs = _earlier_runs(plan, runs_dir, say)
        say(
            f"comparison {plan.id}: A = {plan.a.name}, B = {plan.b.name} on {plan.track}, {plan.pairs} pair(s), "
            f"{len(runs)} run(s) already made; in {visible(shown(out))} "
            f"(the same command with --out {visible(shown(out))} resumes it)"
        )
        comparison = Comparison(plan=plan, out=out, timed=track.target is not None, runs=runs)
        for pair in range(1, plan.pairs + 1):
            if pair > len(plan.seeds):  # drawn and written down before the pair runs: a resumed comparison keeps it
                plan.seeds.append(draw_seed())
                atomic_write_text(out / PLAN_FILE, plan.to_json())
            for side in run_order(pair):
                if (pair, side) in runs:
                    continue
                say(f"{_run_line(plan, pair, side)}: started")
                _, run_dir = evaluate_run(
                    Path(getattr(plan, side).folder),
                    track_id=plan.track,
                    seed=plan.seeds[pair - 1],
                    secret_seed=plan.secret_seeds,
                    budget_s=plan.budget_s,
                    sandbox_choice=plan.sandbox,
                    runs_dir=runs_dir,
                    comparison={"id": plan.id, "pair": pair, "side": side},
                    # The run's own progress would bury the comparison's; its logs are in its run directory.
                    console=Console(file=io.StringIO()),
                )
                result, problem = _read_result(run_dir)
                if result is not None and _belongs(result, plan) != (pair, side):
                    result, problem = None, "its result is not of the run that was asked for"
                runs[pair, side] = PairRun(result=result, run_dir=run_dir)
                say(
                    f"{_run_line(plan, pair, side)}: {_finished_text(runs[pair, side], comparison.timed)}"
                    + (f" ({visible(problem)})" if problem else "")
                    + f"  {visible(shown(run_dir))}"
                )
        atomic_write_text(out / HTML_FILE, render_comparison_html(comparison))
    return comparison


# --- what the comparison shows ----------------------------------------------------------------------


def _score_text(score: float | None, timed: bool, signed: bool = False) -> str:
    if score is None:
        return "-"
    sign = "+" if signed else ""
    return f"{score:{sign}.2f} s" if timed else f"{score:{sign}.4f}"


def _received_text(run: PairRun) -> str:
    received = None if run.result is None else run.result["train"]["received"]
    return "-" if received is None else f"{received['share']:.0%}"


def _cell(run: PairRun, timed: bool) -> str:
    score = score_of(run.result, timed)
    return run.status if score is None else _score_text(score, timed)


def _p_text(summary: Summary) -> str:
    if summary.p_value is None:
        return "p undefined: the t-test needs at least 2 pairs with both runs scored"
    return f"p = {summary.p_value:.4g}"


def summary_lines(comparison: Comparison) -> list[str]:
    """The sentences under the table (and on the page): the mean difference, its spread, the test."""
    summary, timed, counted = comparison.summary, comparison.timed, len(comparison.summary.differences)
    what = "time to target" if timed else "val_loss"
    if not counted:
        return ["no pair has both runs scored: nothing to compare"]
    spread = (
        ""
        if summary.std_difference is None
        else f" (std {_score_text(summary.std_difference, timed)}, "
        f"standard error {_score_text(summary.standard_error, timed)})"
    )
    return [
        f"mean difference B - A: {_score_text(summary.mean_difference, timed, signed=True)} over {counted} of "
        f"{comparison.plan.pairs} pairs{spread}",
        f"one-sided paired t-test, H1: B is better than A (lower {what}): {_p_text(summary)}",
    ]


def render_text(comparison: Comparison) -> str:
    plan, timed = comparison.plan, comparison.timed
    what = "time to target" if timed else "val_loss"
    lines = [
        f"comparison {plan.id}: A = {plan.a.name} ({visible(plan.a.folder)}), "
        f"B = {plan.b.name} ({visible(plan.b.folder)})",
        f"track {plan.track}, budget {plan.budget_s:g} s, {'drawn' if plan.secret_seeds else 'public'} seeds; "
        f"{what}, lower is better; "
        "received: the share of the CPU time its threads asked for that the training jail got",
        "",
        f"{'pair':>4}  {'seed':>10}  order  {'A ' + what:>16}  {'B ' + what:>16}  {'B - A':>10}  "
        f"{'A received':>10}  {'B received':>10}",
    ]
    for pair in range(1, plan.pairs + 1):
        a, b = comparison.runs[pair, "a"], comparison.runs[pair, "b"]
        left_out = comparison.left_out(pair)
        line = (
            f"{pair:>4}  {plan.seeds[pair - 1]:>10}  {' '.join(run_order(pair)).upper():<5}  {_cell(a, timed):>16}  "
            f"{_cell(b, timed):>16}  {_score_text(comparison.difference(pair), timed, signed=True):>10}  "
            f"{_received_text(a):>10}  {_received_text(b):>10}"
        )
        lines.append(line + (f"  left out: {left_out}" if left_out else ""))
    return "\n".join(lines + [""] + summary_lines(comparison)) + "\n"


def _run_json(run: PairRun, timed: bool) -> dict[str, Any]:
    result = run.result
    return {
        "run_id": None if result is None else result["run_id"],
        "run_dir": None if run.run_dir is None else shown(run.run_dir),
        "status": run.status,
        "score": score_of(result, timed),
        "val_loss": None if result is None or result["metrics"] is None else result["metrics"]["val_loss"],
        "official": None if result is None else result["official"],
        "received": None if result is None else result["train"]["received"],
    }


def render_json(comparison: Comparison) -> str:
    plan, timed, summary = comparison.plan, comparison.timed, comparison.summary
    document = {
        "id": plan.id,
        "track": plan.track,
        "budget_s": plan.budget_s,
        "seeds_drawn": plan.secret_seeds,
        "out": shown(comparison.out),
        "a": asdict(plan.a),
        "b": asdict(plan.b),
        "score": "time_to_target_s" if timed else "val_loss",
        "pairs": [
            {
                "pair": pair,
                "seed": plan.seeds[pair - 1],
                "order": list(run_order(pair)),
                "a": _run_json(comparison.runs[pair, "a"], timed),
                "b": _run_json(comparison.runs[pair, "b"], timed),
                "difference": comparison.difference(pair),
                "left_out": comparison.left_out(pair),
            }
            for pair in range(1, plan.pairs + 1)
        ],
        "counted_pairs": len(summary.differences),
        "mean_difference": summary.mean_difference,
        "std_difference": summary.std_difference,
        "standard_error": summary.standard_error,
        "p_value": summary.p_value,
        "html": shown(comparison.out / HTML_FILE),
    }
    return json.dumps(document, indent=2) + "\n"


def _plot_rows(comparison: Comparison) -> list[Row]:
    """A and B as the leaderboard's rows of their scored runs, A first (the first colour), for its plot."""
    plan, rows = comparison.plan, []
    for side in ("a", "b"):
        scored = [
            (run.run_dir, run.result)
            for pair in range(1, plan.pairs + 1)
            if (run := comparison.runs[pair, side]).result is not None and run.result["status"] in SCORED_STATUSES
        ]
        runs = []
        for run_dir, result in scored:
            assert run_dir is not None  # a run with a result has its directory
            try:
                loss_curve = read_loss_curve(run_dir / METRICS_FILE)
            except UserError:  # no metrics.parquet, or a broken one: no training loss to draw for it
                loss_curve = empty_loss_curve()
            runs.append(Run.from_verified(VerifiedResult(run_dir / RESULT_FILE, result, loss_curve, signer="")))
        # Official rows are drawn solid, the others dashed, as on the leaderboard.
        official = bool(scored) and all(result["official"] for _, result in scored)
        rows.append(
            Row(
                track=plan.track,
                submission=f"{side.upper()} {getattr(plan, side).name}",
                official=official,
                calibrated=False,
                runs=runs,
            )
        )
    targets = [
        run.result["target"]
        for row_side in ("a", "b")
        for pair in range(1, plan.pairs + 1)
        if (run := comparison.runs[pair, row_side]).result is not None and run.result["target"] is not None
    ]
    for row in rows:
        row.target = (
            None if not targets else TrackTarget(float(targets[0]["val_loss"]), bool(targets[0]["provisional"]))
        )
    return rows


def render_comparison_html(comparison: Comparison) -> str:
    """comparison.html: the pairs, the test, and both submissions' validation curves drawn by the
    leaderboard's plot (A in its first colour, B in its second)."""
    plan, timed = comparison.plan, comparison.timed
    what = "time to target" if timed else "val_loss"

    def escaped(text: str) -> str:
        return html.escape(visible(text))

    header = "".join(
        f"<th>{html.escape(h)}</th>"
        for h in ("pair", "seed", "order", f"A {what}", f"B {what}", "B - A", "A received", "B received", "left out")
    )
    body_rows = []
    for pair in range(1, plan.pairs + 1):
        a, b = comparison.runs[pair, "a"], comparison.runs[pair, "b"]
        cells = [
            str(pair),
            str(plan.seeds[pair - 1]),
            " ".join(run_order(pair)).upper(),
            _cell(a, timed),
            _cell(b, timed),
            _score_text(comparison.difference(pair), timed, signed=True),
            _received_text(a),
            _received_text(b),
            comparison.left_out(pair) or "",
        ]
        body_rows.append("<tr>" + "".join(f'<td class="num">{escaped(cell)}</td>' for cell in cells) + "</tr>")
    sides = "".join(
        f'<li><span class="swatch" style="background:{PALETTE[index]}"></span>{side.upper()}: '
        f"<code>{escaped(getattr(plan, side).name)}</code> ({escaped(getattr(plan, side).folder)})</li>"
        for index, side in enumerate(("a", "b"))
    )
    parts = [
        f"<h1>Comparison <code>{escaped(plan.id)}</code></h1>",
        f"<ul>{sides}</ul>",
        f'<p class="rule">Track <code>{escaped(plan.track)}</code>, budget {plan.budget_s:g} s, '
        f"{'seeds drawn by the evaluator' if plan.secret_seeds else 'public seeds'}. Both runs of a pair ran on this "
        f"host with the pair's seed, in ABBA order; B - A is the difference of their {what} (lower is better). "
        "Received: the share of the CPU time its threads asked for that the training jail got while the clock ran.</p>",
        f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(body_rows)}</tbody></table>",
        "".join(f'<p class="rule">{escaped(line)}</p>' for line in summary_lines(comparison)),
    ]
    rows = _plot_rows(comparison)
    if any(row.runs for row in rows):
        svg, clipped = render_svg(plan.track, rows)
        parts.append(f"<figure>{svg}<figcaption>{plot_caption(rows[0].target, clipped)}</figcaption></figure>")
    else:
        parts.append("<p>No run was scored: there are no curves to draw.</p>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>Comparison {escaped(plan.id)}</title>\n<style>{HTML_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(parts)
        + "\n</body>\n</html>\n"
    )


# --- the command ------------------------------------------------------------------------------------


def _compare(args: argparse.Namespace) -> int:
    def say(line: str) -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    comparison = run_comparison(
        Path(args.a),
        Path(args.b),
        track_id=args.track,
        pairs=args.seeds,
        secret_seeds=args.secret_seeds,
        budget_s=args.budget,
        out=None if args.out is None else Path(args.out),
        sandbox_choice=args.sandbox,
        say=say,
        evaluate_run=evaluate,
    )
    if args.json:
        sys.stdout.write(render_json(comparison))
    else:
        sys.stdout.write(render_text(comparison))
        say(f"wrote {shown(comparison.out / HTML_FILE)}")
    return comparison.exit_code


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="run two submissions in interleaved pairs on this host and test whether B beats A",
        description=(
            "Run A (the baseline) and B (the candidate) on this host in pairs, each pair with one seed, in ABBA "
            "order (pair 1: A then B, pair 2: B then A, ...) so that a drift of the host over the comparison "
            "falls on both alike. Each run is an ordinary `evaluator run` with its own result.json, which records "
            "the comparison, the pair and the side. Prints each pair's scores, their difference B - A and the share "
            "of the CPU time it asked for that each run got, the mean difference with its standard deviation "
            "and standard error, and a "
            "one-sided paired t-test (H1: B is better, a lower val_loss; on a time-to-target track a shorter time "
            "to target); a pair either of whose runs has no score is left out, and said so. With one pair the "
            "p-value is undefined. Writes comparison.html (both validation curves) in the output folder. Killed, "
            "the same command with the same --out resumes: runs with a verdict are kept, one whose sandbox or "
            "evaluator failed runs again with its pair's seed. Exit codes as `evaluator run --seeds`: the worst "
            "run's (0 every run ok, 1 a run failed through its submission, 2 bad input, 3 a sandbox failure, 4 an "
            "evaluator failure)."
        ),
    )
    parser.add_argument("a", metavar="A", help="the baseline submission folder (e.g. the record holder)")
    parser.add_argument("b", metavar="B", help="the candidate submission folder")
    parser.add_argument(
        "--track", metavar="ID", help="track id (default: the manifests' track, which must be the same)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=3,
        metavar="N",
        help="number of pairs, fixed when the comparison begins (default 3; 1 gives no p-value)",
    )
    parser.add_argument(
        "--secret-seeds",
        action="store_true",
        help="draw each pair's seed from os.urandom (written to comparison.json before the pair runs); "
        "default: the track's default seed, +1, ...",
    )
    parser.add_argument(
        "--budget",
        type=float,
        metavar="S",
        help="training budget in seconds; any value other than the track's makes the runs unofficial",
    )
    parser.add_argument("--sandbox", choices=SANDBOX_CHOICES, default="auto", help="as evaluator run's (default auto)")
    parser.add_argument(
        "--out",
        metavar="DIR",
        help=f"the comparison's folder: comparison.json, comparison.html, runs/; the same DIR resumes it "
        f"(default: a new folder under {shown(DEFAULT_PARENT)}/)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the comparison as JSON on stdout and nothing else there"
    )
    parser.set_defaults(handler=_compare)

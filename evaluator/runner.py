"""`evaluator run`: plan, train in a sandbox under the evaluator's clock, score, write the result.

`evaluate()` is the pipeline of one run (also `from evaluator import evaluate`): evaluator/plan.py
decides and lays out the run, evaluator/training.py runs the training jail and takes the models,
evaluator/curve.py scores them, and the result is written here (its format: evaluator/results.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import textwrap
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from evaluator.curve import ScoredRun, score_run
from evaluator.errors import InvalidModel, UserError
from evaluator.fsutil import atomic_write_text
from evaluator.manifest import merge_overrides, parse_manifest, parse_override
from evaluator.paths import RUNS_DIR, shown
from evaluator.plan import SMOKE_BUDGET_S, SMOKE_DOCUMENTS, RunPlan, RunRequest, check_seed_count, make_plan, stage_run
from evaluator.results import (
    EVALUATOR_ERROR_LOG,
    EVALUATOR_ERROR_MESSAGE,
    EXIT_CODES,
    Verdict,
    build_result,
    decide_status,
    environment,
    utc_now,
    write_result,
)
from evaluator.sandbox import SANDBOX_CHOICES, SandboxUnavailable, open_sandbox
from evaluator.tracks import load_track
from evaluator.training import SNAPSHOTS_DIR, TrainingOutcome, train_in_jail


def _handle_sigterm(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While a run is under way, SIGTERM unwinds like Ctrl-C, so every jail is killed and its cgroup
    removed; without it SIGTERM would end the process at once and leave the jail running. Only the
    main thread may set handlers: elsewhere the caller's own handling stays."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _handle_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def evaluate(
    folder: Path,
    *,
    track_id: str | None = None,
    seed: int | None = None,
    secret_seed: bool = False,
    budget_s: float | None = None,
    calibrated_budget: bool = False,
    gpu: int | None = None,
    overrides: dict[str, Any] | None = None,
    smoke: bool = False,
    sandbox_choice: str = "auto",
    runs_dir: Path = RUNS_DIR,
    debug_scoring: bool = False,
    comparison: dict[str, Any] | None = None,
    console: Console | None = None,
) -> tuple[dict[str, Any], Path]:
    """One evaluation run: returns the result (also written as result.json) and the run directory.
    `secret_seed` has the evaluator draw the seed (recorded as `seed_drawn`); with `seed` too, that seed
    was drawn by the caller (evaluator batch draws once, so that a retried run keeps its seed).
    `calibrated_budget` times this host first and scales the track's budget and scoring deadlines by
    how much slower it is than the track's hardware (unofficial; docs/CALIBRATION.md).
    `gpu`: CUDA's index of the GPU to hold (default: the first no other run holds).
    `overrides`: merged into the manifest's [config] (`{"d_model": 512}`, tables merged); recorded,
    and the run is unofficial. `smoke`: 10 s of training (unless `budget_s`) and the first 8
    validation documents, to catch a broken contract early; unofficial and never publishable.
    `comparison`: the run's place in an `evaluator compare` ({"id", "pair", "side"}), recorded."""
    with _sigterm_unwinds(), ExitStack() as held:
        console = console or Console(stderr=True)
        began = time.monotonic()
        request = RunRequest(
            folder=Path(folder),
            track_id=track_id,
            seed=seed,
            secret_seed=secret_seed,
            budget_s=budget_s,
            calibrated_budget=calibrated_budget,
            gpu=gpu,
            runs_dir=runs_dir,
            debug_scoring=debug_scoring,
            overrides=dict(overrides or {}),
            smoke=smoke,
            sandbox_choice=sandbox_choice,
            comparison=comparison,
        )
        plan = make_plan(request, console, held)
        run = _Run(plan, started=utc_now())
        try:
            _train_and_score(run, sandbox_choice, console, began)
            assert run.outcome is not None and run.env is not None  # _sandboxed_run sets both or raises
            verdict = decide_status(run.outcome, run.scored, run.scoring_failure, plan.track.target)
            result = build_result(
                plan, verdict, run.outcome, run.scored, run.scoring_seconds, run.env, run.started, scorings=run.scorings
            )
            atomic_write_text(plan.run_dir / "timings.json", json.dumps(run.timings, indent=2) + "\n")
            write_result(plan.run_dir, result)
        except Exception:  # the evaluator's own failure: the run still ends in a result, with its seed
            result = _evaluator_error(run, console)
        return result, plan.run_dir


@dataclass
class _Run:
    """What one run has found so far: what an evaluator_error result keeps of it."""

    plan: RunPlan
    started: str  # when the sandbox was opened (utc_now())
    outcome: TrainingOutcome | None = None
    scored: ScoredRun | None = None
    scoring_failure: Verdict | None = None  # why the models could not be scored
    scoring_seconds: int | None = None
    scorings: list[dict[str, Any]] = field(default_factory=list)  # every model's scoring (model_scorings)
    env: dict[str, Any] | None = None
    staged: bool = False
    timings: dict[str, Any] = field(default_factory=dict)


def _train_and_score(run: _Run, sandbox_choice: str, console: Console, began: float) -> None:
    plan = run.plan
    try:
        stage_run(plan)
        run.staged = True
        _sandboxed_run(run, sandbox_choice, console, began)
    finally:
        # What the jails used or left, whatever happened: the run directory keeps its record, the
        # logs and the model. Scored, the snapshots' work is done; kept, ten snapshots of a large
        # model would fill a disk.
        for folder in (plan.jail_out, plan.scratch, plan.jail_input, plan.run_dir / SNAPSHOTS_DIR):
            shutil.rmtree(folder, ignore_errors=True)


def _sandboxed_run(run: _Run, sandbox_choice: str, console: Console, began: float) -> None:
    plan, timings = run.plan, run.timings
    try:
        # With the hidden split here, nsjail or nothing: `auto` never falls back to running unsandboxed.
        sandbox = open_sandbox("nsjail" if plan.hidden_path is not None else sandbox_choice)
    except SandboxUnavailable as exc:
        run.env = environment("nsjail", "unavailable", plan.gpu, (f"nsjail: {exc}",))
        run.outcome = TrainingOutcome(status="sandbox_error", message=f"nsjail cannot run here: {exc}")
        return
    run.env = environment(sandbox.kind, sandbox.version, plan.gpu, sandbox.unavailable)
    label = "nsjail" if sandbox.isolated else "NONE — unsandboxed, unofficial"
    seed_label = f"{plan.seed} (drawn)" if plan.seed_drawn else str(plan.seed)
    console.print(
        f"[bold]{plan.manifest.name}[/] on [bold]{plan.track.id}[/], seed {seed_label}, "
        f"budget {plan.budget_s:g} s, sandbox: {label}"
    )
    console.print(f"sandbox: {sandbox.reason}", markup=False, highlight=False)
    for missing in sandbox.unavailable:
        console.print(f"sandbox: could not use {missing}", markup=False, highlight=False)
    timings["prepare_s"] = time.monotonic() - began
    try:
        run.outcome = train_in_jail(plan, sandbox, console, timings)
    except SandboxUnavailable as exc:
        run.outcome = TrainingOutcome(status="sandbox_error", message=f"the training sandbox failed to start: {exc}")
    if run.outcome.final_model is not None:
        scoring_started = time.monotonic()
        try:
            run.scored = score_run(plan, sandbox, console, run.outcome, run.scorings)
        except InvalidModel as exc:
            run.scoring_failure = Verdict("invalid_model", str(exc))
        except SandboxUnavailable as exc:
            run.scoring_failure = Verdict("sandbox_error", f"the scoring sandbox failed: {exc}")
        # Whole seconds: how long scoring takes is the model's to choose.
        run.scoring_seconds = timings["scoring_s"] = round(time.monotonic() - scoring_started)


def _environment_or_less(plan: RunPlan) -> dict[str, Any]:
    """The environment block of a run that failed before it opened a sandbox; without the GPU's
    details where reading them is what failed."""
    unavailable = ("sandbox: the evaluator failed before it opened one",)
    try:
        return environment("none", "not opened", plan.gpu, unavailable)
    except Exception:  # NVML, torch's CUDA query: whatever failed may fail again
        return environment("none", "not opened", None, unavailable)


def _evaluator_error(run: _Run, console: Console) -> dict[str, Any]:
    """The result of a run in which the evaluator itself failed: status evaluator_error, the fixed
    sentence, the run's seed and what training measured (no scores: what failed may have been
    scoring). The traceback goes to the run directory's log, never to the result or the console."""
    plan = run.plan
    log = plan.run_dir / EVALUATOR_ERROR_LOG
    atomic_write_text(log, traceback.format_exc())
    verdict = decide_status(run.outcome, None, None, plan.track.target, evaluator_failed=True)
    env = run.env or _environment_or_less(plan)
    result = build_result(
        plan, verdict, run.outcome, None, None, env, run.started, staged=run.staged, scorings=run.scorings
    )
    write_result(plan.run_dir, result)
    console.print(f"evaluator error: {EVALUATOR_ERROR_MESSAGE} ({shown(log)})", markup=False, highlight=False)
    return result


SUMMARY_WIDTH = 80


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The run's closing summary, in lines that fit an 80-column terminal: the score, what training
    did and received, then why the run is unofficial."""
    seed = f"{result['seed']} (drawn)" if result["seed_drawn"] else str(result["seed"])
    head = [f"{result['submission']['name']} seed {seed}: {result['status']}"]
    metrics, target = result["metrics"], result["target"]
    if target and target["reached"]:
        head.append(f"reached val_loss {target['val_loss']:g} at {target['time_s']:.1f} s")
    if metrics:
        head.append(f"val_loss {metrics['val_loss']:.4f}  val_bpb {metrics['val_bpb']:.4f}")
    train, facts = result["train"], []
    if train["train_seconds"] is not None:
        facts.append(f"trained {train['train_seconds']:.1f} s")
    if train["tokens"]:
        facts.append(f"{train['tokens']:,.0f} tokens")
    if train["received"] is not None:
        facts.append(f"got {train['received']['share']:.0%} of the CPU it asked for")
    if result["scoring_seconds"] is not None:
        facts.append(f"scored in {result['scoring_seconds']} s")
    lines = _wrapped("  ".join(head)) + _wrapped(", ".join(facts))
    if not result["official"]:
        lines.append("unofficial:")
        for reason in result["unofficial_reasons"]:
            lines += _wrapped(reason, first="  - ", rest="    ")
    return lines


def _wrapped(text: str, first: str = "", rest: str = "  ") -> list[str]:
    return (
        textwrap.wrap(text, SUMMARY_WIDTH, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False)
        if text
        else []
    )


def _base_seed(args: argparse.Namespace) -> int | None:
    """--seed, else the track's default seed; None when the manifest is too broken to tell (evaluate reports it)."""
    if args.seed is not None:
        return args.seed
    track_id = args.track
    if track_id is None:
        manifest, _ = parse_manifest(Path(args.folder))
        if manifest is None:
            return None
        track_id = manifest.track
    return load_track(track_id).default_seed


def _run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    check_seed_count(args.seeds)
    if args.secret_seeds and args.seed is not None:
        raise UserError("--secret-seeds draws every seed: drop --seed")
    if args.drawn_seed is not None and (args.secret_seeds or args.seed is not None or args.seeds != 1):
        raise UserError("--drawn-seed is the one seed of the run: drop --seed, --seeds and --secret-seeds")
    if args.drawn_seed is not None:
        seeds = [args.drawn_seed]
    elif args.secret_seeds:
        seeds = [None] * args.seeds
    else:
        base_seed = _base_seed(args)
        seeds = [None] if base_seed is None else [base_seed + i for i in range(args.seeds)]
    overrides: dict[str, Any] = {}
    for item in args.set:
        overrides = merge_overrides(overrides, parse_override(item))
    results = []
    for seed in seeds:
        result, run_dir = evaluate(
            Path(args.folder),
            track_id=args.track,
            seed=seed,
            secret_seed=args.secret_seeds or args.drawn_seed is not None,
            budget_s=None if args.budget == CALIBRATED else args.budget,
            calibrated_budget=args.budget == CALIBRATED,
            gpu=args.gpu,
            overrides=overrides,
            smoke=args.smoke,
            sandbox_choice=args.sandbox,
            runs_dir=Path(args.out) if args.out else RUNS_DIR,
            debug_scoring=args.debug_scoring,
            console=console,
        )
        results.append(result)
        for line in summary_lines(result):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        if result["status"] != "ok" and result["message"]:
            console.print(result["message"], markup=False, highlight=False)
        console.print(f"run directory: {run_dir}", markup=False, highlight=False)
    if len(results) > 1:
        losses = [r["metrics"]["val_loss"] for r in results if r["metrics"]]
        if losses:
            spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
            console.print(
                f"val_loss over {len(losses)} of {len(results)} seeds: "
                f"{statistics.mean(losses):.4f} ± {spread:.4f} (std)"
            )
        times = [r["target"]["time_s"] for r in results if r["target"] and r["target"]["reached"]]
        if results[0]["target"]:
            spread = f" ± {statistics.stdev(times):.1f} (std)" if len(times) > 1 else ""
            mean_time = f": {statistics.mean(times):.1f} s{spread}" if times else ""
            console.print(f"time to target reached by {len(times)} of {len(results)} seeds{mean_time}")
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    return max(EXIT_CODES[r["status"]] for r in results)


CALIBRATED = "calibrated"


def _drawn_seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= seed < 2**31:  # draw_seed's 31 bits
        raise argparse.ArgumentTypeError(f"{seed} is not a seed draw_seed could have drawn (0 to 2**31 - 1)")
    return seed


def _budget(text: str) -> float | str:
    if text == CALIBRATED:
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of seconds nor 'calibrated'") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser(
        "run",
        help="train a submission in the sandbox under the budget and score it",
        description=(
            "Check the submission, train it inside nsjail under the track's budget (the evaluator's own "
            "clock, from just before the submission is imported until the model is saved), score the "
            "saved model on the validation split in a second sandbox, and write results/runs/<run-id>/. "
            "On a track that takes snapshots, the evaluator asks for the model every snapshot_every_s and "
            "scores each snapshot too (the validation curve); on a time-to-target track the score is when "
            "the first model reached the target. Exit codes: 0 ok; 1 the run failed through the submission's "
            "fault, or reached no target (not_reached); 2 bad input or an invalid submission; 3 the sandbox "
            "failed; 4 the evaluator itself failed (evaluator_error: the result keeps the seed, the traceback is "
            "in the run directory's evaluator-error.log). Scores come from the track's hidden test split where "
            "this host holds it ($EVALUATOR_PRIVATE_DATA); elsewhere from the public split, a development result."
        ),
    )
    run.add_argument("folder", metavar="DIR", help="the submission folder")
    run.add_argument("--track", metavar="ID", help="track id (default: the manifest's track)")
    run.add_argument("--seed", type=int, metavar="N", help="seed handed to the submission (default: the track's)")
    run.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="run N seeds in sequence (seed, seed+1, ...) and print mean ± std",
    )
    run.add_argument(
        "--secret-seeds",
        action="store_true",
        help="draw each seed from os.urandom instead of the track's public ones; the result records "
        "it as drawn, and only drawn seeds count for a record on tracks whose record rule says so",
    )
    run.add_argument(
        "--drawn-seed",
        type=_drawn_seed,
        metavar="N",
        help="run seed N, drawn from os.urandom by the caller, and record it as drawn: evaluator batch "
        "draws each run's seed once, so that a run retried after an evaluator or sandbox failure "
        "keeps its seed instead of getting a new draw",
    )
    run.add_argument(
        "--gpu",
        type=int,
        metavar="N",
        help="on a GPU track, the GPU to use, as CUDA numbers them here (after CUDA_VISIBLE_DEVICES); "
        "default: the first that no other run of this evaluator holds",
    )
    run.add_argument(
        "--budget",
        type=_budget,
        metavar="S|calibrated",
        help="training budget in seconds, or 'calibrated': the track's scaled by this host's speed "
        "against the track's hardware (evaluator calibrate); any value other than the track's "
        "makes the run unofficial",
    )
    run.add_argument(
        "--sandbox",
        choices=SANDBOX_CHOICES,
        default="auto",
        help=(
            "auto: nsjail when it works here, else none (says which); nsjail: never falls back; "
            "none: plain subprocess, unofficial"
        ),
    )
    run.add_argument(
        "--out", metavar="DIR", help=f"where run directories go (default: {shown(RUNS_DIR)}/ in the current folder)"
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a [config] value for this run (repeatable): a TOML value or a bare word, a dotted "
        "key reaches into a table, e.g. --set d_model=512 --set optimizer.lr=3e-4; recorded in "
        "result.json, and the run is unofficial",
    )
    run.add_argument(
        "--smoke",
        action="store_true",
        help=f"a quick check of the contract: {SMOKE_BUDGET_S:g} s of training (unless --budget) and "
        f"{SMOKE_DOCUMENTS} validation documents; unofficial, never publishable",
    )
    run.add_argument(
        "--debug-scoring",
        action="store_true",
        help="keep what the model server prints (its stderr) as scoring-pass-N.log in the run directory, "
        "to debug a model that fails scoring; makes the run unofficial; refused for a hidden split",
    )
    run.add_argument(
        "--json",
        action="store_true",
        help="print the result, as in result.json (a list with --seeds), on stdout and nothing else there",
    )
    run.set_defaults(handler=_run)

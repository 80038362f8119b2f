"""`evaluator batch` on the machine that starts it (the driver): check every submission, plan one
run per (submission, seed) and leave out those that earlier results already settle, hand the rest
to Ray, each under a watchdog and retried once after an infrastructure failure, and sum them up.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from rich.console import Console

from evaluator.batch.archive import SUBMISSION_ARCHIVE_CAP_BYTES, pack_folder
from evaluator.batch.cluster import (
    INSTALL_HINT,
    RayInstance,
    describe_ray_error,
    import_ray,
    ray_options,
    task_resources,
)
from evaluator.batch.node import evaluate_on_node
from evaluator.batch.receive import receive
from evaluator.batch.report import BatchProgress, batch_console, outcome_text, say, summary
from evaluator.batch.runs import RETRIED_STATUSES, Run, Submission
from evaluator.check import check_submission
from evaluator.errors import UserError
from evaluator.fsutil import tree_sha256
from evaluator.paths import HOME, RESULTS_DIR, shown
from evaluator.plan import check_budget, check_seed_count, draw_seed
from evaluator.results import RESULT_FILE, SCORED_STATUSES, strict_json_loads
from evaluator.sandbox import SandboxUnavailable, open_sandbox
from evaluator.tracks import Track, load_track
from evaluator.training import STARTUP_ALLOWANCE_S

# `evaluator run` enforces every limit itself; this watchdog only catches a run that hangs outside
# them (interpreter start, imports and the scoring sandbox's start-up are not in the track's limits).
RUN_WATCHDOG_SLACK_S = 300.0
ATTEMPTS = 2
# The sandboxes a batch may use: `evaluator run`'s, less auto (_sandbox_choice says why).
BATCH_SANDBOXES = ("nsjail", "none")


def _scorings(track: Track, budget_s: float) -> int:
    """How many scorings one run may need, each within the track's scoring limit: the final model, a
    snapshot per interval, and the deciding model once more on the public split where a hidden split
    ranks (a model that takes every limit must not outlast the watchdog)."""
    every_s = track.snapshot_every_s
    return 1 + (0 if every_s is None else math.floor(budget_s / every_s)) + (track.dataset.hidden is not None)


def _watchdog_s(track: Track, budget_s: float) -> float:
    """How long the node lets one `evaluator run` take before it stops it."""
    scoring_s = _scorings(track, budget_s) * track.eval.wall_limit_s(track.device.kind)
    return STARTUP_ALLOWANCE_S + budget_s + track.sandbox.grace_s + scoring_s + RUN_WATCHDOG_SLACK_S


def _check_all(
    folders: list[Path], track_id: str | None, console: Console
) -> tuple[list[Submission], list[tuple[Path, int]]]:
    """Static checks of every folder, before anything runs. Invalid ones are reported and left out."""
    forced_track = load_track(track_id) if track_id else None
    valid, invalid = [], []
    seen = set()
    for folder in folders:
        if folder.resolve() in seen:
            continue
        seen.add(folder.resolve())
        report = check_submission(folder)
        if not report.ok:
            say(console, f"{folder}: invalid, skipped ({len(report.findings)} problem(s)):")
            for finding in report.findings:
                say(console, f"  {folder}/{finding}")
            invalid.append((folder, len(report.findings)))
            continue
        manifest = report.manifest
        assert manifest is not None  # parse_manifest gives no manifest only with a finding
        track = forced_track or load_track(manifest.track)
        valid.append(Submission(folder=folder, name=manifest.name, track=track, tree_sha256=tree_sha256(folder)))
    return valid, invalid


def _earlier_results(
    runs_dir: Path, sandbox_choice: str
) -> tuple[dict[tuple, list[tuple[dict[str, Any], Path]]], dict[tuple, list[int]]]:
    """Results under runs_dir that already settle a (tree, track file, seed, budget) run: any verdict but
    the sandbox's or the evaluator's own failure; with --sandbox nsjail, only sandboxed ones. Best first:
    `ok`, then the newest. Runs whose seed was drawn are filed under seed None: each of them settles one
    drawn run. Also, under the same keys, the drawn seeds whose runs failed without a verdict: a resumed
    batch runs them again with those seeds, never with new draws."""
    found: dict[tuple, list[tuple[dict[str, Any], Path]]] = {}
    failed_draws: dict[tuple, list[int]] = {}
    if not runs_dir.is_dir():
        return found, failed_draws
    for path in runs_dir.glob(f"*/{RESULT_FILE}"):
        if path.parent.name.startswith("."):
            continue
        try:
            # These results may come from other machines (batch/receive.py): read them as strictly as it does.
            result = strict_json_loads(path.read_text(encoding="utf-8"))
            seed = None if result.get("seed_drawn") else result["seed"]
            key = (result["submission"]["tree_sha256"], result["track"]["sha256"], seed, float(result["budget_s"]))
            status, sandbox_kind = result["status"], result["environment"]["sandbox"]["kind"]
        except (OSError, ValueError, TypeError, KeyError):
            continue
        if "ended_at" not in result:  # malformed like those above, and the sort below needs it
            continue
        if result.get("calibration") is not None:  # its budget is this host's, whatever number it came to
            continue
        if status in RETRIED_STATUSES:
            if seed is None:
                failed_draws.setdefault(key, []).append(result["seed"])
            continue
        if sandbox_choice == "nsjail" and sandbox_kind != "nsjail":
            continue
        found.setdefault(key, []).append((result, path.parent))
    for settling in found.values():
        settling.sort(
            key=lambda item: (item[0]["status"] in SCORED_STATUSES, item[0]["ended_at"]), reverse=True
        )  # scored first
    for key, seeds in failed_draws.items():
        settled = {result["seed"] for result, _ in found.get(key, [])}
        failed_draws[key] = sorted(set(seeds) - settled)
    return found, failed_draws


DRAWN_SEEDS_FILE = "drawn-seeds.jsonl"


class _DrawLedger:
    """Every seed `batch --secret-seeds` drew, written down (and synced) before its run is handed to
    a node: a run that leaves no result (a node that died, a watchdog's stop, a refused archive)
    keeps its seed when the batch is resumed, so its failure is never a fresh draw."""

    def __init__(self, path: Path):
        self.path = path
        self._drawn: dict[tuple, list[int]] = {}
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                entry = json.loads(line)
                key = (entry["tree_sha256"], entry["track_sha256"], None, float(entry["budget_s"]))
                self._drawn.setdefault(key, []).append(int(entry["seed"]))
            except (ValueError, TypeError, KeyError):
                continue  # a line cut short by a crash mid-append: its run was never handed out

    def seeds(self, key: tuple) -> list[int]:
        return list(self._drawn.get(key, []))

    def draw(self, key: tuple) -> int:
        seed = draw_seed()
        tree, track, _, budget_s = key
        line = json.dumps({"tree_sha256": tree, "track_sha256": track, "budget_s": budget_s, "seed": seed}) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as ledger:
            ledger.write(line)
            ledger.flush()
            os.fsync(ledger.fileno())
        self._drawn.setdefault(key, []).append(seed)
        return seed


def _schedule(
    ray, runs: list[Run], runs_dir: Path, sandbox_choice: str, budget_override: float | None, console: Console
) -> None:
    """Run everything, each infrastructure failure retried once, until every run is finished."""
    task = ray.remote(num_returns="streaming", max_retries=0)(evaluate_on_node)

    def submit(run: Run):
        track = run.submission.track
        run.state, run.attempts = "queued", run.attempts + 1
        request = {
            "name": run.submission.name,
            "track": track.id,
            "seed": run.seed,
            "seed_drawn": run.seed_drawn,
            "budget_s": budget_override,
            "sandbox": sandbox_choice,
            "home": str(HOME),
            "timeout_s": _watchdog_s(track, run.budget_s),
        }
        return task.options(**ray_options(task_resources(track))).remote(run.submission.archive_ref, request)

    in_flight = {submit(run): run for run in runs}
    try:
        with BatchProgress(console, runs) as progress:
            while in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
                progress.refresh()
                for generator in ready:
                    run = in_flight[generator]
                    try:
                        message = ray.get(next(generator))
                    except StopIteration:
                        message = None
                        run.failure = "the Ray task ended without reporting an outcome"
                    except ray.exceptions.RayError as exc:  # a worker or node died, or our task raised
                        message = None
                        run.failure = f"Ray: {describe_ray_error(exc)}"
                    if message is not None and message["event"] == "started":
                        run.state, run.node = "running", message["node"]
                        progress.refresh()
                        continue
                    del in_flight[generator]
                    if message is not None:
                        receive(run, message, runs_dir)
                    if run.needs_retry and run.attempts < ATTEMPTS:
                        progress.say(outcome_text(run, f"; retrying once with the same seed, {run.seed}"))
                        run.result, run.run_dir, run.failure = None, None, ""
                        in_flight[submit(run)] = run
                        continue
                    run.state = "finished"
                    progress.say(outcome_text(run, f"  {run.run_dir}" if run.run_dir else ""))
    finally:
        for generator in in_flight:
            ray.cancel(generator)


def _sandbox_choice(value: str) -> str:
    """--sandbox: nsjail or an explicit none. `evaluator run`'s auto is not offered: on a cluster it
    would run submissions unsandboxed, as root, on every node where nsjail fails, next to the Ray
    token and the other runs."""
    if value in BATCH_SANDBOXES:
        return value
    if value == "auto":
        raise argparse.ArgumentTypeError(
            "auto is not offered by batch: it would run submissions unsandboxed, as root, wherever nsjail "
            "fails on a node; use nsjail (the default), or --sandbox none for an unofficial batch"
        )
    raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(BATCH_SANDBOXES)})")


def _refuse_without_nsjail(sandbox_choice: str, ray_address: str | None) -> None:
    """With a local Ray instance every run is on this machine: no nsjail here, no batch. (On a cluster
    each node's `evaluator run --sandbox nsjail` refuses by itself, as sandbox_error.)"""
    if sandbox_choice != "nsjail" or ray_address is not None:
        return
    try:
        open_sandbox("nsjail")
    except SandboxUnavailable as exc:
        raise UserError(
            f"nsjail cannot run on this machine ({exc}), and evaluator batch never runs submissions "
            "unsandboxed by itself: fix nsjail, or pass --sandbox none for an unofficial batch"
        ) from None


def _batch(args: argparse.Namespace) -> int:
    console = batch_console()
    ray = import_ray()
    check_seed_count(args.seeds)
    if args.budget is not None:
        check_budget(args.budget)
    runs_dir = Path(args.results) / "runs"
    submissions, invalid = _check_all([Path(p) for p in args.submissions], args.track, console)

    earlier, failed_draws = _earlier_results(runs_dir, args.sandbox)
    ledger = _DrawLedger(runs_dir / DRAWN_SEEDS_FILE)
    runs: list[Run] = []
    for submission in submissions:
        track = submission.track
        budget_s = track.budget_s if args.budget is None else float(args.budget)
        drawn_key = (submission.tree_sha256, track.sha256, None, budget_s)
        drawn_before = list(earlier.get(drawn_key, []))
        # Every seed this batch ever drew for the run and that has no verdict yet, whether its run
        # failed, was stopped or left no result at all: run again before any new draw.
        settled = {result["seed"] for result, _ in drawn_before}
        to_retry = [
            seed
            for seed in dict.fromkeys([*ledger.seeds(drawn_key), *failed_draws.get(drawn_key, [])])
            if seed not in settled
        ]
        for offset in range(args.seeds):
            if not args.secret_seeds:
                run = Run(submission=submission, seed=track.default_seed + offset, seed_drawn=False, budget_s=budget_s)
                settling = earlier.get((submission.tree_sha256, track.sha256, run.seed, budget_s), [])
                if settling:
                    run.result, run.run_dir = settling[0]
                    run.state, run.reused = "finished", True
            elif drawn_before:
                result, run_dir = drawn_before.pop(0)
                run = Run(
                    submission=submission,
                    seed=result["seed"],
                    seed_drawn=True,
                    budget_s=budget_s,
                    result=result,
                    run_dir=run_dir,
                    state="finished",
                    reused=True,
                )
            else:
                # A seed drawn before, whose run failed without a verdict, is run again before any new draw.
                seed = to_retry.pop(0) if to_retry else ledger.draw(drawn_key)
                run = Run(submission=submission, seed=seed, seed_drawn=True, budget_s=budget_s)
            runs.append(run)
    to_run = [run for run in runs if not run.reused]
    if to_run:
        _refuse_without_nsjail(args.sandbox, args.ray)
    say(
        console,
        f"{len(submissions)} submission(s) to evaluate, {len(invalid)} invalid; {len(runs)} run(s): "
        f"{len(runs) - len(to_run)} already in {runs_dir}, {len(to_run)} to run",
    )

    if to_run:
        runs_dir.mkdir(parents=True, exist_ok=True)
        with RayInstance(ray, args.ray) as instance:
            for track in {run.submission.track.id: run.submission.track for run in to_run}.values():
                resources = task_resources(track)
                if instance.fits_somewhere(resources):
                    continue
                wanted = ", ".join(f"{name} {amount:g}" for name, amount in resources.items())
                if instance.temp_dir:
                    raise UserError(
                        f"no Ray node on this machine offers what a {track.id} run needs ({wanted}); "
                        "use --track cpu-1min, or --ray ADDRESS"
                    )
                say(
                    console,
                    f"no live Ray node offers what a {track.id} run needs ({wanted}) yet: "
                    "those runs wait until one joins",
                )
            for submission in {id(run.submission): run.submission for run in to_run}.values():
                submission.archive_ref = ray.put(pack_folder(submission.folder, SUBMISSION_ARCHIVE_CAP_BYTES))
            _schedule(ray, to_run, runs_dir, args.sandbox, args.budget, console)
            instance.keep_logs = any(run.exit_code == 3 for run in to_run)

    summary(console, runs, invalid)
    codes = [run.exit_code for run in runs]
    ok, broken = codes.count(0), codes.count(3)
    say(
        console,
        f"{ok} ok, {len(codes) - ok - broken} failed through the submission, "
        f"{broken} evaluator failure(s), {len(invalid)} invalid submission(s)",
    )
    return 3 if broken else (1 if invalid or ok < len(codes) else 0)


def register(subparsers: argparse._SubParsersAction) -> None:
    batch = subparsers.add_parser(
        "batch",
        help="evaluate many submissions x seeds on a Ray cluster (or a local Ray instance)",
        description=(
            "Check every submission (invalid ones are reported and skipped), then run each (submission, seed) "
            "as the ordinary `evaluator run` in nsjail on a Ray node: one GPU of the track's type per run on a "
            "GPU track, the track's threads in CPUs on a CPU track. Run directories come back into "
            "RESULTS/runs/ on this machine. Runs that already have a verdict there for the same submission "
            "tree, track, seed and budget are not repeated. A run whose worker or sandbox fails is retried "
            "once. Never falls back to running unsandboxed: a node without working nsjail fails its runs as "
            "sandbox_error, and with a local Ray instance the batch refuses to start; only --sandbox none runs "
            f"unsandboxed (unofficial). Needs Ray ({INSTALL_HINT}). Exit codes: 0 every run ok; "
            "1 some run failed, or a "
            "submission was invalid, through the submission's fault; 2 bad input; 3 a sandbox or worker "
            "failure remains."
        ),
    )
    batch.add_argument("submissions", nargs="+", metavar="SUBMISSION", help="submission folders")
    batch.add_argument("--track", metavar="ID", help="track id for every submission (default: each manifest's track)")
    batch.add_argument(
        "--budget",
        type=float,
        metavar="S",
        help="training budget in seconds; any value other than the track's makes the runs unofficial",
    )
    batch.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="seeds per submission: the track's default seed, +1, ... (default 1)",
    )
    batch.add_argument(
        "--secret-seeds",
        action="store_true",
        help="each run's evaluator draws its seed from os.urandom (evaluator run --secret-seeds); "
        "drawn runs already in the results count towards --seeds",
    )
    batch.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="address of a running Ray cluster (e.g. auto, or HEAD:6379); default: start a local Ray instance",
    )
    batch.add_argument(
        "--results",
        metavar="DIR",
        default=str(RESULTS_DIR),
        help=(
            f"results directory; run directories go to DIR/runs/ (default: {shown(RESULTS_DIR)}/ in the current folder)"
        ),
    )
    batch.add_argument(
        "--sandbox",
        type=_sandbox_choice,
        default="nsjail",
        metavar="{nsjail,none}",
        help="handed to each `evaluator run` (default nsjail); none runs every submission "
        "unsandboxed and makes the results unofficial",
    )
    batch.set_defaults(handler=_batch)

"""Scoring every model a run produced, with the same code: the validation curve and time to target.

Each model (the snapshots the evaluator took, then the final one) is scored by
evaluator/scoring.py under the track's `[eval]` limits, on the split that ranks: the hidden split
where this host holds it, else the public one. This module decides which are scored, in which order,
and what the run's score is. Where the hidden split ranks, the deciding model is also scored on the
public split (the development score, and the contamination check: a model much better on the public
split than on the hidden one has memorised it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from evaluator.dataset.loader import read_documents
from evaluator.errors import InvalidModel
from evaluator.plan import SMOKE_DOCUMENTS, RunPlan
from evaluator.sandbox import Sandbox
from evaluator.training import TakenModel, TrainingOutcome

if TYPE_CHECKING:  # scoring imports torch, which every other command should start without
    from evaluator.scoring import ScoreReport


@dataclass(frozen=True)
class ScoredRun:
    """What scoring found: the score of the run and its validation curve."""

    score: ScoreReport  # the final model's; on a time-to-target track, the deciding model's
    curve: list[dict[str, Any]]  # one point per model taken, in time order, on `curve_split`
    curve_split: str  # "hidden" or "public": where the curve's models were scored
    reached_at_s: float | None  # time-to-target tracks: when the target was first reached
    dev_score: ScoreReport | None  # the deciding model's on the public split, where the hidden split ranks


# A model chooses how long its scoring takes: on the hidden split, its time is recorded this coarsely.
HIDDEN_TIME_RESOLUTION_S = 10


def score_run(
    plan: RunPlan, sandbox: Sandbox, console: Console, outcome: TrainingOutcome, scorings: list[dict[str, Any]]
) -> ScoredRun:
    """Score the final model and every snapshot with the same code, limits and guarantees.

    Fixed-time track: the final model is the score (scored first; its failure fails the run), a
    snapshot that cannot be scored is a gap in the curve. Time-to-target track: the models in time
    order until one reaches the target; its time is the score, and what comes after it is not
    scored. Each model gets the track's scoring limits; after the first snapshot that cannot be
    scored the other snapshots are skipped, so a model that spends every limit costs the evaluator
    two scorings' time, not one per snapshot.

    Where this host holds the hidden split, it scores only what ranks: the final model on a
    fixed-time track (its snapshots are scored on the public split: they rank nothing, and each of
    their numbers would tell the competitor a little more about the hidden text), every model on a
    time-to-target track (the crossing is the score). The deciding model is also scored on the public
    split, and a model that cannot be scored there fails the run like one that cannot be scored at
    all (else a model that recognised public text could refuse it and escape the contamination
    check). Raises InvalidModel (the deciding model cannot be scored; the message says which model)
    and SandboxUnavailable. Every scoring started is appended to `scorings`, failed ones included
    (the result's model_scorings).
    """
    where = "sealed sandboxes" if sandbox.isolated else "unsandboxed processes"
    hidden = plan.hidden_path is not None
    split = "the hidden test split" if hidden else "the public development split"
    console.print(f"scoring on {split}, streamed, in two passes in {where} ...")
    final = outcome.final_model
    assert final is not None  # only a run whose final model was taken is scored
    models = [*outcome.snapshots, final]
    target = plan.track.target
    curve_path = plan.val_path if hidden and target is None else plan.score_path
    # Imported here: scoring needs torch, and every other command should start fast.
    from evaluator.scoring import ScoringSession, ScoringUsage

    documents: dict[Path, list] = {}
    with ScoringSession(sandbox, _setup(plan), models=len(models) + hidden) as session:
        scores: dict[Path, Any] = {}
        problems: dict[Path, str] = {}

        def score(model: TakenModel, number: int | str, split_path: Path):
            label = "the final model" if model.final else f"snapshot {number} of {len(models) - 1}"
            split = "public" if split_path == plan.val_path else "hidden"
            console.print(
                f"scoring {label}, taken at {model.time_s:.1f} s, on the {split} split", markup=False, highlight=False
            )
            usage, began, ended = ScoringUsage(), time.monotonic(), "sandbox_error"
            try:
                if split_path not in documents:
                    documents[split_path] = read_documents(split_path)[: SMOKE_DOCUMENTS if plan.smoke else None]
                report = session.score(model.path, documents[split_path], usage=usage)
                ended = "ok"
                return report
            except InvalidModel as exc:
                ended = "invalid_model"
                raise InvalidModel(f"{label} (taken at {model.time_s:.1f} s, on the {split} split): {exc}") from None
            finally:
                scorings.append(_scoring_record(model, split, ended, time.monotonic() - began, usage.cpu_s))

        def score_snapshot(snapshot: TakenModel, number: int) -> None:
            if problems:
                problems[snapshot.path] = "skipped"
                return
            try:
                scores[snapshot.path] = score(snapshot, number, curve_path)
            except InvalidModel:
                problems[snapshot.path] = "invalid_model"

        reached = None
        dev_score = None
        if target is None:
            ranking = score(final, len(models), plan.score_path)
            if hidden:
                dev_score = score(final, "dev", plan.val_path)
            scores[final.path] = dev_score if hidden else ranking
            for number, snapshot in enumerate(outcome.snapshots, 1):
                score_snapshot(snapshot, number)
        else:
            for number, model in enumerate(models, 1):
                if model.final:
                    scores[final.path] = score(final, number, curve_path)
                else:
                    score_snapshot(model, number)
                if model.path in scores and scores[model.path].val_loss <= target.val_loss:
                    reached = model
                    break
            ranking = scores[(final if reached is None else reached).path]
            if hidden:
                dev_score = score(final if reached is None else reached, "dev", plan.val_path)
    curve = []
    for model in models:
        if model.path in scores:
            report = scores[model.path]
            point = {"val_loss": report.val_loss, "val_bpb": report.val_bpb, "scored": "ok"}
        else:
            point = {"val_loss": None, "val_bpb": None, "scored": problems.get(model.path, "not_needed")}
        curve.append({"time_s": round(model.time_s, 2), "model": "final" if model.final else "snapshot", **point})
    return ScoredRun(
        score=ranking,
        curve=curve,
        curve_split="public" if curve_path == plan.val_path else "hidden",
        reached_at_s=None if reached is None else round(reached.time_s, 2),
        dev_score=dev_score,
    )


def _scoring_record(model: TakenModel, split: str, ended: str, wall_s: float, cpu_s: float | None) -> dict[str, Any]:
    """One model's scoring as the result's model_scorings shows it."""

    def shown(seconds: float) -> float:
        if split == "hidden":
            return float(HIDDEN_TIME_RESOLUTION_S * round(seconds / HIDDEN_TIME_RESOLUTION_S))
        return round(seconds, 1)

    return {
        "model": "final" if model.final else "snapshot",
        "time_s": round(model.time_s, 2),
        "split": split,
        "outcome": ended,
        "wall_s": shown(wall_s),
        "cpu_s": None if cpu_s is None else shown(cpu_s),
    }


def _setup(plan: RunPlan):
    """What every model of the run is scored with: the track's scoring rules and limits."""
    from evaluator.scoring import ScoringLimits, ScoringSetup

    limits, protocol = plan.track.sandbox, plan.track.eval
    return ScoringSetup(
        name=f"{plan.run_id}-score",
        submission_dir=plan.staged,
        vocab_size=plan.vocab_size,
        eos_id=plan.eos_id,
        seq_len=protocol.seq_len,
        batch_size=protocol.batch_size,
        device=plan.device,
        gpu=None if plan.gpu is None else plan.gpu.board,
        threads=plan.track.device.threads,
        limits=ScoringLimits(
            load_s=protocol.load_s * plan.deadline_factor,
            step_s=protocol.step_s * plan.deadline_factor,
            total_s=protocol.time_limit_s * plan.deadline_factor,
            consistency_nats=protocol.consistency_nats,
        ),
        memory_bytes=limits.memory_mib * 2**20,
        pids=limits.pids,
        model_cap_bytes=limits.model_mib * 2**20,
        debug_log_dir=plan.run_dir if plan.debug_scoring else None,
    )

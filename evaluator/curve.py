"""Scoring every model a run produced, with the same code: the validation curve and time to target.

Each model (the snapshots the evaluator took, then the final one) is scored by
evaluator/scoring.py under the track's `[eval]` limits. This module decides which are scored, in
which order, and what the run's score is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from evaluator.dataset.loader import read_documents
from evaluator.errors import InvalidModel
from evaluator.harness import MODEL_FILE
from evaluator.plan import SMOKE_DOCUMENTS, RunPlan
from evaluator.training import Snapshot, TrainingOutcome


@dataclass(frozen=True)
class ScoredRun:
    """What scoring found: the score of the run and its validation curve."""

    score: Any  # the ScoreReport of the final model; on a time-to-target track, of the deciding model
    curve: list[dict[str, Any]]  # one point per model taken, in time order
    reached_at_s: float | None  # time-to-target tracks: when the target was first reached


def score_run(plan: RunPlan, sandbox, console: Console, outcome: TrainingOutcome) -> ScoredRun:
    """Score the final model and every snapshot with the same code, limits and guarantees.

    Fixed-time track: the final model is the score (scored first; its failure fails the run), a
    snapshot that cannot be scored is a gap in the curve. Time-to-target track: the models in time
    order until one reaches the target; its time is the score, and what comes after it is not
    scored. Each model gets the track's scoring limits; after the first snapshot that cannot be
    scored the other snapshots are skipped, so a model that spends every limit costs the evaluator
    two scorings' time, not one per snapshot. Raises InvalidModel (the deciding model cannot be
    scored) and SandboxUnavailable.
    """
    where = "sealed sandboxes" if sandbox.kind == "nsjail" else "unsandboxed processes"
    console.print(f"scoring on the validation split, streamed, in two passes in {where} ...")
    final = Snapshot(time_s=outcome.train_seconds, path=plan.run_dir / MODEL_FILE)  # taken by training.train_in_jail
    models = [*outcome.snapshots, final]
    scores: dict[Path, Any] = {}
    problems: dict[Path, str] = {}

    def score(model: Snapshot, number: int) -> None:
        if model is not final and problems:
            problems[model.path] = "skipped"
            return
        label = "the final model" if model is final else f"snapshot {number} of {len(models) - 1}"
        console.print(f"scoring {label}, taken at {model.time_s:.1f} s", markup=False, highlight=False)
        try:
            scores[model.path] = _score_model(plan, sandbox, model.path, f"{plan.run_id}-score-{number}")
        except InvalidModel:
            if model is final:
                raise
            problems[model.path] = "invalid_model"

    target = plan.track.target
    reached = None
    if target is None:
        score(final, len(models))
        for number, snapshot in enumerate(outcome.snapshots, 1):
            score(snapshot, number)
    else:
        for number, model in enumerate(models, 1):
            score(model, number)
            if model.path in scores and scores[model.path].val_loss <= target.val_loss:
                reached = model
                break
    curve = []
    for model in models:
        if model.path in scores:
            report = scores[model.path]
            point = {"val_loss": report.val_loss, "val_bpb": report.val_bpb, "scored": "ok"}
        else:
            point = {"val_loss": None, "val_bpb": None, "scored": problems.get(model.path, "not_needed")}
        curve.append({"time_s": round(model.time_s, 2), "model": "final" if model is final else "snapshot", **point})
    deciding = final if reached is None else reached
    return ScoredRun(score=scores[deciding.path], curve=curve, reached_at_s=None if reached is None else round(reached.time_s, 2))


def _score_model(plan: RunPlan, sandbox, model_path: Path, name: str):
    """Score one saved model in sealed sandboxes; raises InvalidModel."""
    # Imported here: scoring needs torch, and every other command should start fast.
    from evaluator.scoring import ScoringLimits, score_model

    limits, protocol = plan.track.sandbox, plan.track.eval
    return score_model(
        sandbox=sandbox,
        name=name,
        model_path=model_path,
        submission_dir=plan.staged,
        documents=read_documents(plan.val_path)[:SMOKE_DOCUMENTS] if plan.smoke else read_documents(plan.val_path),
        vocab_size=plan.vocab_size,
        eos_id=plan.eos_id,
        seq_len=protocol.seq_len,
        batch_size=protocol.batch_size,
        device=plan.device,
        gpu=None if plan.gpu is None else plan.gpu.board,
        threads=plan.track.device.threads,
        limits=ScoringLimits(load_s=protocol.load_s * plan.deadline_factor,
                             step_s=protocol.step_s * plan.deadline_factor,
                             total_s=protocol.time_limit_s * plan.deadline_factor,
                             consistency_nats=protocol.consistency_nats),
        memory_bytes=limits.memory_mib * 2**20,
        pids=limits.pids,
        debug_log_dir=plan.run_dir if plan.debug_scoring else None,
    )


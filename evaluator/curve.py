"""Scoring every model a run produced, with the same code: the validation curve and time to target.

Each model (the snapshots the evaluator took, then the final one) is scored by
evaluator/scoring.py under the track's `[eval]` limits, on the split that ranks: the hidden split
where this host holds it, else the public one. This module decides which are scored, in which order,
and what the run's score is. Where the hidden split ranks, the deciding model is also scored on the
public split (the development score, and the contamination check: a model much better on the public
split than on the hidden one has memorised it).
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
    curve: list[dict[str, Any]]  # one point per model taken, in time order, on `curve_split`
    curve_split: str  # "hidden" or "public": where the curve's models were scored
    reached_at_s: float | None  # time-to-target tracks: when the target was first reached
    dev_score: Any  # the deciding model's ScoreReport on the public split, where the hidden split ranks; else None


def score_run(plan: RunPlan, sandbox, console: Console, outcome: TrainingOutcome) -> ScoredRun:
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
    check). Raises InvalidModel (the deciding model cannot be scored) and SandboxUnavailable.
    """
    where = "sealed sandboxes" if sandbox.kind == "nsjail" else "unsandboxed processes"
    hidden = plan.hidden_path is not None
    split = "the hidden test split" if hidden else "the public development split"
    console.print(f"scoring on {split}, streamed, in two passes in {where} ...")
    final = Snapshot(time_s=outcome.train_seconds, path=plan.run_dir / MODEL_FILE)  # taken by training.train_in_jail
    models = [*outcome.snapshots, final]
    target = plan.track.target
    curve_path = plan.val_path if hidden and target is None else plan.score_path
    scores: dict[Path, Any] = {}
    problems: dict[Path, str] = {}

    def score(model: Snapshot, number: int | str, split_path: Path):
        label = "the final model" if model is final else f"snapshot {number} of {len(models) - 1}"
        on = "the public split" if split_path == plan.val_path else "the hidden split"
        console.print(f"scoring {label}, taken at {model.time_s:.1f} s, on {on}", markup=False, highlight=False)
        return _score_model(plan, sandbox, model.path, split_path, f"{plan.run_id}-score-{number}")

    def score_snapshot(snapshot: Snapshot, number: int) -> None:
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
            if model is final:
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
        curve.append({"time_s": round(model.time_s, 2), "model": "final" if model is final else "snapshot", **point})
    return ScoredRun(score=ranking, curve=curve, curve_split="public" if curve_path == plan.val_path else "hidden",
                     reached_at_s=None if reached is None else round(reached.time_s, 2), dev_score=dev_score)


def _score_model(plan: RunPlan, sandbox, model_path: Path, split_path: Path, name: str):
    """Score one saved model on one split in sealed sandboxes; raises InvalidModel."""
    # Imported here: scoring needs torch, and every other command should start fast.
    from evaluator.scoring import ScoringLimits, score_model

    limits, protocol = plan.track.sandbox, plan.track.eval
    return score_model(
        sandbox=sandbox,
        name=name,
        model_path=model_path,
        submission_dir=plan.staged,
        documents=read_documents(split_path)[:SMOKE_DOCUMENTS] if plan.smoke else read_documents(split_path),
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


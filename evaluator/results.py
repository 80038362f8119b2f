"""`result.json`: assembled from a run's facts, validated, written atomically.

`result_problems` is the one validator of a result: the run writes only what it passes, `evaluator
batch` accepts only what it passes from a node, and `publish` and `verify` refuse what it refuses.
"""

from __future__ import annotations

import json
import math
import platform
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema

from evaluator import __version__
from evaluator.fsutil import atomic_write_text, sha256_file, tree_sha256
from evaluator.gpus import Placement
from evaluator.manifest import MANIFEST_NAME
from evaluator.metrics import last_logged
from evaluator.paths import SPEC_DIR, shown

if TYPE_CHECKING:
    from evaluator.curve import ScoredRun
    from evaluator.plan import RunPlan
    from evaluator.tracks import Target
    from evaluator.training import TrainingOutcome

RESULT_FILE = "result.json"
STATUSES = (
    "ok",
    "invalid_submission",
    "crashed",
    "over_budget",
    "out_of_memory",
    "killed",
    "invalid_model",
    "sandbox_error",
    "not_reached",
    "evaluator_error",
)
# Exit codes of `evaluator run` (DESIGN.md): 0 ok, 1 the submission's fault (not_reached included: it
# trained and was scored, and no model reached a time-to-target track's target), 2 bad input, 3 the
# sandbox failed, 4 the evaluator itself failed (a bug: the result says so, the traceback is logged).
EXIT_CODES = {status: 1 for status in STATUSES} | {
    "ok": 0,
    "invalid_submission": 2,
    "sandbox_error": 3,
    "evaluator_error": 4,
}
# The message of every evaluator_error: the same sentence whatever failed, since what failed may
# have been handed something a submission chose.
EVALUATOR_ERROR_MESSAGE = (
    "the evaluator itself failed during the run (a bug, not the submission's fault); "
    "its traceback is in the run directory's evaluator-error.log"
)
EVALUATOR_ERROR_LOG = "evaluator-error.log"
# The runs whose models were scored: their result carries metrics and a val_curve.
SCORED_STATUSES = ("ok", "not_reached")
# Runs that failed through the submission's fault: published too, so that the leaderboard counts a
# submission's failed official runs beside its scored ones (a failure is no free re-roll).
FAILED_STATUSES = ("crashed", "over_budget", "out_of_memory", "killed", "invalid_model")
PUBLISHED_STATUSES = SCORED_STATUSES + FAILED_STATUSES


@dataclass(frozen=True)
class Verdict:
    """A run's status and its message."""

    status: str
    message: str


def decide_status(
    training: TrainingOutcome | None,
    scored: ScoredRun | None,
    scoring_failure: Verdict | None,
    target: Target | None,
    evaluator_failed: bool = False,
) -> Verdict:
    """The one place a run's status is decided, from what each stage found: the evaluator's own
    failure first (`evaluator_failed`, or no training outcome at all), then how training ended, a
    final model that could not be taken, why its models could not be scored, and on a time-to-target
    track whether one reached the target."""
    if evaluator_failed or training is None:
        return Verdict("evaluator_error", EVALUATOR_ERROR_MESSAGE)
    if training.status != "ok":
        return Verdict(training.status, training.message)
    if training.model_refused is not None:
        return Verdict("invalid_model", training.model_refused)
    if scoring_failure is not None:
        return scoring_failure
    if scored is None:
        raise ValueError("a model saved in time was neither scored nor refused")
    if target is not None and scored.reached_at_s is None:
        return Verdict(
            "not_reached",
            f"no model reached the target val_loss {target.val_loss:g}; the final model's is "
            f"{scored.score.val_loss:.4f}",
        )
    return Verdict("ok", training.message)


@cache
def result_schema() -> dict:
    return json.loads((SPEC_DIR / "result.schema.json").read_text())


def result_problems(result: Any) -> list[str]:
    """Why `result` is not a valid result.json, or [] if it is: every schema error, or else the
    first problem of what the schema cannot say (each of those checks reads fields the schema
    guarantees, so it runs only once the schema holds)."""
    validator = jsonschema.Draft202012Validator(result_schema(), format_checker=jsonschema.FormatChecker())
    problems = [
        f"{'.'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}"
        for e in sorted(validator.iter_errors(result), key=lambda e: list(map(str, e.absolute_path)))
    ]
    if problems:
        return problems
    problem = _strict_json_problem(result) or _time_problem(result) or _consistency_problem(result)
    return [problem] if problem else []


def _reject_non_finite(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 is valid JSON and overflows to infinity
        raise ValueError(f"{text[:40]} does not fit a 64-bit float")
    return value


def _int64(text: str) -> int:
    if len(text) > 20 or not -(2**63) <= int(text) < 2**63:  # the length test first: int() of 10**6 digits is slow
        raise ValueError(f"{text[:40]} does not fit a 64-bit integer")
    return int(text)


def strict_json_loads(data: bytes | str) -> Any:
    """JSON as the standard defines it: Python's NaN/Infinity extensions are refused, and so are
    numbers no 64-bit float or integer holds (1e999 would become an infinity, and 10**400 cannot
    become a float at all)."""
    return json.loads(data, parse_constant=_reject_non_finite, parse_float=_finite_float, parse_int=_int64)


def _strict_json_problem(result: dict[str, Any]) -> str | None:
    """What strict JSON cannot hold, and so `publish`, `verify` and another machine's reader refuse:
    a non-finite number, or a string that is not Unicode text (a lone surrogate)."""
    try:
        json.dumps(result, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except ValueError as error:  # UnicodeEncodeError is a ValueError too
        kind = (
            "a string that is not valid UTF-8 (a lone surrogate)"
            if isinstance(error, UnicodeError)
            else "a number that is not finite (NaN or infinity)"
        )
        return f"the result holds {kind}: strict JSON cannot carry it"
    return None


def _time_problem(result: dict[str, Any]) -> str | None:
    """The schema's date-time format is not enforced by jsonschema without extra packages; the
    leaderboard compares these times, so they must parse and carry a UTC offset."""
    for field in ("started_at", "ended_at"):
        try:
            moment = parse_utc(result[field])
        except ValueError:
            return f"{field}: {result[field]!r} is not an RFC 3339 date-time"
        if moment.tzinfo is None:
            return f"{field}: {result[field]!r} has no UTC offset"
    return None


def _consistency_problem(result: dict[str, Any]) -> str | None:
    """What the schema cannot say: which fields a status implies. The leaderboard ranks on metrics,
    draws val_curve and, on a time-to-target track, ranks on target.time_s; each must be there, and
    agree with the status, whenever the status says the run was scored."""
    status, target, data = result["status"], result["target"], result["data"]
    if status in SCORED_STATUSES:
        for field in ("metrics", "val_curve"):
            if result[field] is None:
                return f"status is {status} but {field} is null"
    problem = _split_problem(result, data)
    if problem:
        return problem
    if status == "not_reached":
        if target is None:
            return "status is not_reached but target is null: only a time-to-target track has a target to miss"
        if target["reached"] is not False:
            return f"status is not_reached but target.reached is {json.dumps(target['reached'])}, not false"
        if target["time_s"] is not None:
            return "status is not_reached but target.time_s is set: a target not reached has no time"
    if status == "ok" and target is not None:
        if target["reached"] is not True:
            return (
                "status is ok on a time-to-target track but target.reached is "
                f"{json.dumps(target['reached'])}, not true"
            )
        if target["time_s"] is None:
            return "status is ok on a time-to-target track but target.time_s is null: the time is its score"
        first = next(
            (
                point
                for point in result["val_curve"]
                if point["scored"] == "ok" and point["val_loss"] <= target["val_loss"]
            ),
            None,
        )
        if first is None or first["time_s"] != target["time_s"]:
            return "target.time_s is not the time of the val_curve's first model at or below the target"
    return _official_problem(result) or _curve_problem(result)


def _rate(tokens: float | None, seconds: float | None) -> float | None:
    """Tokens per second, where both are known and the quotient is a finite number."""
    if not tokens or not seconds:
        return None
    rate = tokens / seconds
    return rate if math.isfinite(rate) else None


def _metrics(score: Any) -> dict[str, Any] | None:
    """A ScoreReport as the result shows it."""
    if score is None:
        return None
    return {
        "val_loss": score.val_loss,
        "val_bpb": score.val_bpb,
        "val_tokens": score.val_tokens,
        "val_bytes": score.val_bytes,
        "val_documents": score.val_documents,
    }


def contamination(hidden_loss: float, public_loss: float, max_gap_nats: float) -> dict[str, Any]:
    """The contamination check of a model scored on both splits: how much worse it does on the
    hidden split than on the public one, flagged where that is further from zero than honest models
    go, either way: far worse on the hidden split, it memorised the public one; far better, the
    hidden split has leaked."""
    gap = round(hidden_loss - public_loss, 4)
    return {"gap_nats": gap, "max_gap_nats": max_gap_nats, "flagged": abs(gap) > max_gap_nats}


def _official_problem(result: dict[str, Any]) -> str | None:
    """`official` must follow from the facts the result states: a result that claims it while it ran
    unsandboxed, off the track's budget, overridden, as a smoke run, calibrated or on the public split
    (or that lists a reason and claims it anyway) is not one the evaluator wrote."""
    reasons = result["unofficial_reasons"]
    if not result["official"]:
        return None if reasons else "official is false but unofficial_reasons is empty"
    facts = {
        "unofficial_reasons lists reasons": bool(reasons),
        "it ran without nsjail": result["environment"]["sandbox"]["kind"] != "nsjail",
        "its budget is not the track's": result["budget_s"] != result["track"]["budget_s"],
        "its config was overridden": bool(result["overrides"]),
        "it is a smoke run": result["smoke"],
        "its budget was calibrated": result["calibration"] is not None,
        "it was scored on the public split": result["data"]["scored_on"] != "hidden",
        "its training jail received less than the track's share of its CPUs": _busy(
            result["train"]["received"], result["track"]["device"]
        ),
    }
    contradiction = next((fact for fact, holds in facts.items() if holds), None)
    return None if contradiction is None else f"official is true but {contradiction}"


def _busy(received: dict[str, Any] | None, device: str) -> bool:
    """On a CPU track, the official rule of plan.busy_host_reasons: a measured share at its minimum."""
    if device != "cpu" or received is None:  # without a measure, plan.busy_host_reasons has said why
        return False
    return received["share"] < received["min_share"]


def _curve_problem(result: dict[str, Any]) -> str | None:
    """The scores must be the deciding model's point of the validation curve, where the curve was
    scored on the same split (else, on a fixed-time track with a hidden split, the public scores are
    the final model's point)."""
    curve, metrics = result["val_curve"], result["metrics"]
    if curve is None or metrics is None:
        return None
    target = result["target"]
    if target is not None and target["reached"]:
        point = next((p for p in curve if p["scored"] == "ok" and p["time_s"] == target["time_s"]), None)
    else:
        point = next((p for p in curve if p["model"] == "final"), None)
    same_split = result["data"]["curve_scored_on"] == result["data"]["scored_on"]
    scores = metrics if same_split else result["dev_metrics"]
    if (
        point is None
        or scores is None
        or (point["val_loss"], point["val_bpb"]) != (scores["val_loss"], scores["val_bpb"])
    ):
        which = "metrics" if same_split else "dev_metrics"
        return f"{which} are not the deciding model's point of val_curve"
    return None


def _split_problem(result: dict[str, Any], data: dict[str, Any]) -> str | None:
    """Which split scored the run, and what follows: a hidden score comes with the public one and the
    contamination check, in agreement with each other; a public score comes with neither."""
    hidden = data["scored_on"] == "hidden"
    if hidden and data["hidden_sha256"] is None:
        return "data.scored_on is hidden but data.hidden_sha256 is null"
    if not hidden and data["embedding_bound"] is not None:
        return "data.embedding_bound is set but the run was scored on the public split"
    if (data["curve_scored_on"] is None) != (result["val_curve"] is None):
        return "data.curve_scored_on must be set exactly when there is a val_curve"
    if data["curve_scored_on"] == "hidden" and not hidden:
        return "data.curve_scored_on is hidden but the run was scored on the public split"
    scored = result["metrics"] is not None
    for field in ("dev_metrics", "contamination"):
        if (result[field] is not None) != (hidden and scored):
            return (
                f"{field} must be set exactly when the hidden split was scored "
                f"(scored_on {data['scored_on']}, metrics {'set' if scored else 'null'})"
            )
    check = result["contamination"]
    if check is not None:
        expected = contamination(
            result["metrics"]["val_loss"], result["dev_metrics"]["val_loss"], check["max_gap_nats"]
        )
        if check != expected:
            return "contamination does not follow from metrics, dev_metrics and max_gap_nats"
    return None


def write_result(run_dir: Path, result: dict[str, Any]) -> Path:
    """Validate, then write atomically: a result that `result_problems` refuses is never written."""
    problems = result_problems(result)
    if problems:
        raise ValueError("result is not valid, so it is not written: " + "; ".join(problems))
    path = Path(run_dir) / RESULT_FILE
    atomic_write_text(path, json.dumps(result, indent=2, sort_keys=True) + "\n")
    return path


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# RFC 3339's date-time: what every Python's fromisoformat reads alike (3.11 also takes ISO 8601's
# week dates and basic format, 3.10 not even the "Z"), so a result verifies the same on each.
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})")


def parse_utc(moment: str) -> datetime:
    """A result's time, as utc_now() writes it ("...Z") or with another offset; ValueError otherwise."""
    if not _RFC3339.fullmatch(moment):
        raise ValueError(f"{moment!r} is not an RFC 3339 date-time")
    return datetime.fromisoformat(moment[:-1] + "+00:00" if moment.endswith("Z") else moment)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_info(gpu: Placement | None) -> dict[str, Any] | None:
    if gpu is None:
        return None
    import torch

    board = gpu.board
    return {
        "name": board.name,
        "driver": gpu.driver,
        "cuda": torch.version.cuda or "unknown",
        "memory_gib": round(board.memory_mib / 1024, 2),
        "index": gpu.cuda_index,
        "minor": board.minor,
        "pci_bus_id": board.pci_bus_id,
        "uuid": board.uuid,
    }


def environment(
    sandbox_kind: str, sandbox_version: str, gpu: Placement | None, sandbox_unavailable: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The host a run ran on, the GPU it held (None on a CPU track), and what of the sandbox this
    host could not give ("nsjail: why", "cgroups: why")."""
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "evaluator_version": __version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "gpu": _gpu_info(gpu),
        "sandbox": {"kind": sandbox_kind, "version": sandbox_version, "unavailable": list(sandbox_unavailable)},
    }


def build_result(
    plan: RunPlan,
    verdict: Verdict,
    outcome: TrainingOutcome | None,
    scored: ScoredRun | None,
    scoring_seconds: int | None,
    env: dict[str, Any],
    started: str,
    staged: bool = True,
    scorings: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The result of a run, from what its plan decided, its verdict (decide_status), what training
    (None: nothing it measured is kept) and scoring found, and the environment (`environment()`);
    `started` is when the sandbox was opened (utc_now()). `staged`
    false: the evaluator failed before the submission was staged, so its folder is what is hashed.
    `scorings`: every model's scoring that started (curve.score_run), failed ones included."""
    rows = [] if outcome is None else outcome.metrics_rows
    train_seconds = None if outcome is None else outcome.train_seconds
    received = None if outcome is None else outcome.received
    tokens = last_logged(rows, "tokens")
    reasons = plan.unofficial_reasons(env["sandbox"], env["gpu"], received)
    track = plan.track
    scored = scored if verdict.status in SCORED_STATUSES else None
    score = None if scored is None else scored.score
    dev_score = None if scored is None else scored.dev_score
    return {
        "schema_version": 8,
        "run_id": plan.run_id,
        "status": verdict.status,
        "message": verdict.message,
        "official": not reasons,
        "unofficial_reasons": reasons,
        "submission": {
            "name": plan.manifest.name,
            "authors": plan.manifest.authors,
            "description": plan.manifest.description,
            "path": shown(plan.folder.resolve()),
            "manifest_sha256": sha256_file((plan.staged if staged else plan.folder) / MANIFEST_NAME),
            "tree_sha256": tree_sha256(plan.staged if staged else plan.folder),
        },
        "track": {
            "id": track.id,
            "sha256": track.sha256,
            "budget_s": track.budget_s,
            "device": track.device.kind,
            "snapshot_every_s": track.snapshot_every_s,
        },
        "budget_s": plan.budget_s,
        "data": {
            "dataset_id": track.dataset.id,
            "train_sha256": track.dataset.train.sha256,
            "val_sha256": track.dataset.val.sha256,
            "tokenizer_sha256": track.dataset.tokenizer.sha256,
            "hidden_sha256": None if track.dataset.hidden is None else track.dataset.hidden.sha256,
            "scored_on": "public" if plan.hidden_path is None else "hidden",
            "curve_scored_on": None if scored is None else scored.curve_split,
            "embedding_bound": plan.hidden_bound,
        },
        "seed": plan.seed,
        "seed_drawn": plan.seed_drawn,
        "comparison": plan.comparison,
        "calibration": None if plan.calibration is None else plan.calibration.as_dict(),
        "overrides": plan.overrides,
        "smoke": plan.smoke,
        "metrics": _metrics(score),
        "dev_metrics": _metrics(dev_score),
        "contamination": None
        if score is None or dev_score is None
        else contamination(score.val_loss, dev_score.val_loss, track.contamination.max_gap_nats),
        "scoring": None
        if score is None
        else {
            "protocol": "streamed",
            "passes": score.passes,
            "consistency_nats": track.eval.consistency_nats,
        },
        "train": {
            "train_seconds": train_seconds,
            "steps": max((row[1] for row in rows), default=None),
            "tokens": tokens,
            "tokens_per_s": _rate(tokens, train_seconds),
            "refused_lines": 0 if outcome is None else outcome.refused_lines,
            "received": received,
        },
        "val_curve": None if scored is None else scored.curve,
        "target": None
        if track.target is None
        else {
            "val_loss": track.target.val_loss,
            "provisional": track.target.provisional,
            "reached": None if scored is None else scored.reached_at_s is not None,
            "time_s": None if scored is None else scored.reached_at_s,
        },
        "scoring_seconds": None if scored is None else scoring_seconds,
        "model_scorings": scorings or None,
        "environment": env,
        "gpu_telemetry": None if outcome is None else outcome.gpu_telemetry,
        "started_at": started,
        "ended_at": utc_now(),
    }

"""Made-up run directories and signed envelopes of them, for the tests of publish and verify and of
what reads published results (the leaderboard, calibrated runs).

It sits at the top of tests/, next to conftest.py, so that a test in any folder imports it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from evaluator import cli
from evaluator.fsutil import sha256_file, tree_sha256
from evaluator.signing import envelope_bytes, generate_key_pair, load_private_key, sign_statement
from evaluator.tracks import track_path

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


def run_cli(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    """The real `evaluator` entry point, with only the commands of keys, publishing and the leaderboard registered."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["evaluator.signing", "evaluator.publish", "evaluator.leaderboard.cli"])
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def make_submission(root: Path, name: str, authors: list[str] | None = None) -> Path:
    folder = root / "submissions" / name
    if not folder.is_dir():
        folder.mkdir(parents=True)
        (folder / "manifest.toml").write_text(f'schema = 1\n[submission]\nname = "{name}"\n')
        (folder / "train.py").write_text("def train(ctx):\n    raise NotImplementedError\n")
    return folder


def _track_sha256(track_id: str) -> str:
    """The hash of the track file a run would record; a made-up one for a track not defined here."""
    path = track_path(track_id)
    return sha256_file(path) if path.is_file() else "ab" * 32


def make_val_curve(
    train_seconds: float,
    val_loss: float,
    snapshot_every_s: float | None,
    target: float | None = None,
    time_to_target: float | None = None,
) -> list[dict]:
    """The curve the evaluator would measure: a snapshot every snapshot_every_s and the final model.

    The deciding model (the final one, or on a target track the one taken at time_to_target) scores
    val_loss, the models before it 0.1 apart above it (above the target on a target track), and on a
    target track those after it are not scored."""
    if time_to_target is not None and time_to_target > train_seconds:
        raise ValueError("a run reaches its target while it trains")
    times = []
    while snapshot_every_s and (len(times) + 1) * snapshot_every_s < train_seconds:
        times.append(round((len(times) + 1) * snapshot_every_s, 2))
    if time_to_target is not None and time_to_target < train_seconds and time_to_target not in times:
        times = sorted(times + [time_to_target])
    models = [(time_s, "snapshot") for time_s in times] + [(round(train_seconds, 2), "final")]
    deciding = len(models) - 1 if time_to_target is None else [t for t, _ in models].index(time_to_target)
    above = val_loss if time_to_target is None else target
    curve = []
    for index, (time_s, model) in enumerate(models):
        if index > deciding:
            curve.append({"time_s": time_s, "model": model, "val_loss": None, "val_bpb": None, "scored": "not_needed"})
            continue
        loss = val_loss if index == deciding else round(above + 0.1 * (deciding - index), 4)
        curve.append(
            {"time_s": time_s, "model": model, "val_loss": loss, "val_bpb": round(loss / 2.3, 4), "scored": "ok"}
        )
    return curve


def make_run(
    root: Path,
    run_id: str,
    *,
    submission: str = "tiny-gpt",
    seed: int = 0,
    seed_drawn: bool = False,
    val_loss: float = 4.0,
    started_at: datetime = T0,
    track: str = "cpu-1min",
    status: str | None = None,
    official: bool = True,
    authors: list[str] | None = None,
    loss_points: int = 40,
    extra_metric_rows: int = 0,
    logged_rows: list[tuple[float, int, str, float]] = (),
    gpu_telemetry: dict | None = None,
    gpu: dict | None = None,
    calibration: dict | None = None,
    snapshot_every_s: float | None = 20.0,
    target: float | None = None,
    provisional: bool = False,
    time_to_target: float | None = None,
    val_curve: list[dict] | None = None,
    scored_on: str = "hidden",
    dev_val_loss: float | None = None,
    max_gap_nats: float = 0.5,
    comparison: dict | None = None,
) -> Path:
    """A run directory whose result.json validates against the schema, with a small metrics.parquet.

    A time-to-target run: `target` is the track's target val_loss and `time_to_target` when the run
    reached it (val_loss is then the deciding model's); without a time the run is not_reached (val_loss
    is the final model's, above the target). `status` defaults to what these make of the run;
    `logged_rows` are more (time_s, step, key, value) rows for metrics.parquet. `scored_on` "hidden":
    scored on the hidden split, with `dev_val_loss` (default val_loss - 0.05) on the public one;
    "public": a development result."""
    if status is None:
        status = "not_reached" if target is not None and time_to_target is None else "ok"
    scored = status in ("ok", "not_reached")
    folder = make_submission(root, submission)
    run_dir = root / "runs" / run_id
    run_dir.mkdir(parents=True)
    train_seconds = 55.0 + seed
    hidden = scored_on == "hidden"
    dev_val_loss = round(val_loss - 0.05, 4) if dev_val_loss is None else dev_val_loss
    # A fixed-time track's curve is scored on the public split, where the hidden split ranks the final model.
    curve_loss = dev_val_loss if hidden and target is None else val_loss
    if val_curve is None and scored:
        val_curve = make_val_curve(train_seconds, curve_loss, snapshot_every_s, target, time_to_target)
    reasons = [] if official else ["--sandbox none: the run was not sandboxed"]
    if not hidden:
        reasons.insert(0, "development result: scored on the public split, which anyone can memorise (test)")
    result = {
        "schema_version": 8,
        "run_id": run_id,
        "status": status,
        "message": {"ok": "", "not_reached": "no model reached the target"}.get(status, "the train function raised"),
        "official": not reasons,
        "unofficial_reasons": reasons,
        "submission": {
            "name": submission,
            "authors": authors or ["Ada Example <ada@example.org>"],
            "description": f"{submission} for tests",
            "manifest_sha256": hashlib.sha256((folder / "manifest.toml").read_bytes()).hexdigest(),
            "tree_sha256": tree_sha256(folder),
            "path": str(folder),
        },
        "track": {
            "id": track,
            "sha256": _track_sha256(track),
            "budget_s": 60,
            "device": "cpu",
            "snapshot_every_s": snapshot_every_s,
        },
        "budget_s": 60,
        "data": {
            "dataset_id": "pydoc-100k",
            "train_sha256": "01" * 32,
            "val_sha256": "02" * 32,
            "tokenizer_sha256": "03" * 32,
            "hidden_sha256": "04" * 32,
            "scored_on": scored_on,
            "curve_scored_on": (scored_on if target is not None else "public") if scored else None,
            "embedding_bound": None,
        },
        "seed": seed,
        "seed_drawn": seed_drawn,
        "comparison": comparison,
        "calibration": calibration,
        "overrides": {},
        "smoke": False,
        "metrics": (
            {
                "val_loss": val_loss,
                "val_bpb": round(val_loss / 2.3, 4),
                "val_tokens": 10000,
                "val_bytes": 40000,
                "val_documents": 100,
            }
            if scored
            else None
        ),
        "dev_metrics": (
            {
                "val_loss": dev_val_loss,
                "val_bpb": round(dev_val_loss / 2.3, 4),
                "val_tokens": 10400,
                "val_bytes": 41000,
                "val_documents": 100,
            }
            if scored and hidden
            else None
        ),
        "contamination": (
            {
                "gap_nats": round(val_loss - dev_val_loss, 4),
                "max_gap_nats": max_gap_nats,
                "flagged": round(val_loss - dev_val_loss, 4) > max_gap_nats,
            }
            if scored and hidden
            else None
        ),
        "scoring": {"protocol": "streamed", "passes": 2, "consistency_nats": 1e-3} if scored else None,
        "train": {
            "train_seconds": train_seconds,
            "steps": loss_points,
            "tokens": 1e6,
            "tokens_per_s": 1e6 / train_seconds,
            "refused_lines": 0,
            "received": {
                "cpu_s": round(2 * 0.97 * train_seconds, 2),
                "wall_s": train_seconds,
                "cpus": 2,
                "demand_s": round(2 * train_seconds, 2),
                "share": 0.97,
                "min_share": 0.9,
            },
        },
        "val_curve": val_curve if scored else None,
        "target": None
        if target is None
        else {
            "val_loss": target,
            "provisional": provisional,
            "reached": (time_to_target is not None) if scored else None,
            "time_s": time_to_target if scored else None,
        },
        "scoring_seconds": 4,
        "model_scorings": [
            {
                "model": point["model"],
                "time_s": point["time_s"],
                "split": "public",
                "outcome": point["scored"],
                "wall_s": 2.0,
                "cpu_s": 3.5,
            }
            for point in val_curve
            if point["scored"] != "skipped" and point["scored"] != "not_needed"
        ]
        if scored
        else None,
        "environment": {
            "python": "3.11.2",
            "torch": "2.13.0",
            "evaluator_version": "0.1.0",
            "platform": "Linux",
            "cpu": "test cpu",
            "gpu": gpu,
            "sandbox": {"kind": "nsjail" if official else "none", "version": "3.4"},
        },
        "gpu_telemetry": gpu_telemetry,
        "started_at": started_at.isoformat(),
        "ended_at": (started_at + timedelta(seconds=70)).isoformat(),
    }
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    rows = []
    for step in range(loss_points):
        time_s = train_seconds * (step + 1) / loss_points
        rows.append((time_s, step, "loss", val_loss - 0.2 + 5.0 * 0.9**step))
    rows += [(0.5 * i, i, "lr", 1e-3) for i in range(extra_metric_rows)]
    rows += list(logged_rows)
    table = pa.table(
        {
            "time_s": pa.array([r[0] for r in rows], pa.float64()),
            "step": pa.array([r[1] for r in rows], pa.int64()),
            "key": pa.array([r[2] for r in rows], pa.string()),
            "value": pa.array([r[3] for r in rows], pa.float64()),
        }
    )
    pq.write_table(table, run_dir / "metrics.parquet")
    return run_dir


def published(tmp_path: Path, run_dir: Path) -> Path:
    result = json.loads((run_dir / "result.json").read_text())
    return tmp_path / "results" / result["track"]["id"] / result["submission"]["name"] / f"{result['run_id']}.json"


def decode_statement(envelope_path: Path) -> dict:
    envelope = json.loads(envelope_path.read_text())
    return json.loads(base64.b64decode(envelope["payload"]))


def _sign_with(private: Path, statement: dict) -> bytes:
    return envelope_bytes(sign_statement(statement, load_private_key(private)))


def _tamper_payload(envelope_path: Path, private: Path, tmp_path: Path) -> None:
    envelope = json.loads(envelope_path.read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    statement["predicate"]["result"]["metrics"]["val_loss"] = 0.5
    envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    envelope_path.write_text(json.dumps(envelope))


def _sign_with_unknown_key(envelope_path: Path, private: Path, tmp_path: Path) -> None:
    stranger, _, _ = generate_key_pair(tmp_path / "stranger", "stranger")
    envelope_path.write_bytes(_sign_with(stranger, decode_statement(envelope_path)))


def _set(path: str, value):
    """An edit of result.json: `value` at the dotted `path`."""

    def edit(result: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            result = result[key]
        result[last] = value

    return edit


def _both(first, second):
    def edit(result: dict) -> None:
        first(result)
        second(result)

    return edit


# (what the run is, the edit that makes it inconsistent, the reason given)
INCONSISTENT = {
    "ok-without-curve": ({}, _set("val_curve", None), "status is ok but val_curve is null"),
    "not-reached-without-metrics": (
        {"target": 4.1},
        _set("metrics", None),
        "status is not_reached but metrics is null",
    ),
    "not-reached-without-curve": (
        {"target": 4.1},
        _set("val_curve", None),
        "status is not_reached but val_curve is null",
    ),
    "not-reached-on-a-fixed-time-track": (
        {},
        _set("status", "not_reached"),
        "status is not_reached but target is null",
    ),
    "not-reached-but-reached": (
        {"target": 4.1},
        _set("target.reached", True),
        "status is not_reached but target.reached is true, not false",
    ),
    "not-reached-with-a-time": (
        {"target": 4.1},
        _set("target.time_s", 12.0),
        "status is not_reached but target.time_s is set",
    ),
    "ok-but-not-reached": (
        {"target": 4.1, "time_to_target": 20.0},
        _set("target.reached", False),
        "status is ok on a time-to-target track but target.reached is false, not true",
    ),
    "ok-reached-unknown": (
        {"target": 4.1, "time_to_target": 20.0},
        _set("target.reached", None),
        "status is ok on a time-to-target track but target.reached is null, not true",
    ),
    "ok-without-a-time": (
        {"target": 4.1, "time_to_target": 20.0},
        _set("target.time_s", None),
        "status is ok on a time-to-target track but target.time_s is null",
    ),
    "ok-with-a-time-the-curve-does-not-show": (
        {"target": 4.1, "time_to_target": 20.0},
        _set("target.time_s", 10.0),
        "target.time_s is not the time of the val_curve's first model at or below the target",
    ),
    # What a batch node claimed of a run: official, yet unsandboxed, on another budget, or with scores
    # the curve does not show (the driver accepted it, publish signed it and verify printed OK).
    "official-but-unsandboxed": (
        {},
        _set("environment.sandbox.kind", "none"),
        "official is true but it ran without nsjail",
    ),
    "official-on-another-budget": ({}, _set("budget_s", 600), "official is true but its budget is not the track's"),
    "official-on-the-public-split": (
        {"scored_on": "public", "official": False},
        _both(_set("official", True), _set("unofficial_reasons", [])),
        "data.scored_on: 'hidden' was expected",
    ),  # the schema's own rule
    "official-with-a-reason": (
        {},
        _set("unofficial_reasons", ["not sandboxed"]),
        "official is true but unofficial_reasons lists reasons",
    ),
    "unofficial-without-a-reason": ({}, _set("official", False), "official is false but unofficial_reasons is empty"),
    "scores-the-curve-does-not-show": (
        {"scored_on": "public", "official": False},
        _set("metrics.val_loss", 3.0001),
        "metrics are not the deciding model's point of val_curve",
    ),
    "public-scores-the-curve-does-not-show": (
        {},
        _set("dev_metrics.val_bpb", 1.0),
        "dev_metrics are not the deciding model's point of val_curve",
    ),
    "contamination-not-from-the-scores": (
        {},
        _set("contamination.flagged", True),
        "contamination does not follow from metrics, dev_metrics and max_gap_nats",
    ),
}

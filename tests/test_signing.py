"""keygen, publish and verify with real Ed25519 keys, real signatures and real Parquet metrics."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cryptography.hazmat.primitives import serialization

from evaluator import cli
from evaluator.fsutil import sha256_file, tree_sha256
from evaluator.results import parse_utc
from evaluator.paths import HOME
from evaluator.signing import (
    LOSS_CURVE_MAX_POINTS,
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    build_statement,
    empty_loss_curve,
    envelope_bytes,
    generate_key_pair,
    keyid_of,
    load_private_key,
    pae,
    sign_statement,
)
from evaluator.tracks import track_path

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


def run_cli(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    """The real `evaluator` entry point, with only this issue's commands registered."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["evaluator.signing", "evaluator.leaderboard"])
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


@pytest.fixture
def editable_tracks(tmp_path, monkeypatch) -> Path:
    """A copy of spec/tracks that the test may edit, in place of the real one."""
    tracks = tmp_path / "tracks"
    shutil.copytree(HOME / "spec" / "tracks", tracks)
    monkeypatch.setattr("evaluator.tracks.TRACKS_DIR", tracks)
    return tracks


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
        curve.append({"time_s": time_s, "model": model, "val_loss": loss, "val_bpb": round(loss / 2.3, 4), "scored": "ok"})
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
) -> Path:
    """A run directory whose result.json validates against the schema, with a small metrics.parquet.

    A time-to-target run: `target` is the track's target val_loss and `time_to_target` when the run
    reached it (val_loss is then the deciding model's); without a time the run is not_reached (val_loss
    is the final model's, above the target). `status` defaults to what these make of the run;
    `logged_rows` are more (time_s, step, key, value) rows for metrics.parquet."""
    if status is None:
        status = "not_reached" if target is not None and time_to_target is None else "ok"
    scored = status in ("ok", "not_reached")
    folder = make_submission(root, submission)
    run_dir = root / "runs" / run_id
    run_dir.mkdir(parents=True)
    train_seconds = 55.0 + seed
    if val_curve is None and scored:
        val_curve = make_val_curve(train_seconds, val_loss, snapshot_every_s, target, time_to_target)
    result = {
        "schema_version": 6,
        "run_id": run_id,
        "status": status,
        "message": {"ok": "", "not_reached": "no model reached the target"}.get(status, "the train function raised"),
        "official": official,
        "unofficial_reasons": [] if official else ["--sandbox none: the run was not sandboxed"],
        "submission": {
            "name": submission,
            "authors": authors or ["Ada Example <ada@example.org>"],
            "description": f"{submission} for tests",
            "manifest_sha256": hashlib.sha256((folder / "manifest.toml").read_bytes()).hexdigest(),
            "tree_sha256": tree_sha256(folder),
            "path": str(folder),
        },
        "track": {"id": track, "sha256": _track_sha256(track), "budget_s": 60, "device": "cpu",
                  "snapshot_every_s": snapshot_every_s},
        "budget_s": 60,
        "data": {
            "dataset_id": "pydoc-100k",
            "train_sha256": "01" * 32,
            "val_sha256": "02" * 32,
            "tokenizer_sha256": "03" * 32,
        },
        "seed": seed,
        "seed_drawn": seed_drawn,
        "calibration": calibration,
        "overrides": {},
        "smoke": False,
        "metrics": (
            {"val_loss": val_loss, "val_bpb": val_loss / 2.3, "val_tokens": 10000, "val_bytes": 40000, "val_documents": 100}
            if scored
            else None
        ),
        "scoring": {"protocol": "streamed", "passes": 2, "consistency_nats": 1e-3} if scored else None,
        "train": {"train_seconds": train_seconds, "steps": loss_points, "tokens": 1e6, "tokens_per_s": 1e6 / train_seconds},
        "val_curve": val_curve if scored else None,
        "target": None if target is None else {
            "val_loss": target,
            "provisional": provisional,
            "reached": (time_to_target is not None) if scored else None,
            "time_s": time_to_target if scored else None,
        },
        "scoring_seconds": 4,
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
        rows.append((time_s, step, "loss", val_loss - 0.2 + 5.0 * 0.9 ** step))
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


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    """(private key path, trusted-keys dir holding its public key)."""
    private, public, _ = generate_key_pair(tmp_path / "private", "tester")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(public, trusted / public.name)
    return private, trusted


def published(tmp_path: Path, run_dir: Path) -> Path:
    result = json.loads((run_dir / "result.json").read_text())
    return tmp_path / "results" / result["track"]["id"] / result["submission"]["name"] / f"{result['run_id']}.json"


def decode_statement(envelope_path: Path) -> dict:
    envelope = json.loads(envelope_path.read_text())
    return json.loads(base64.b64decode(envelope["payload"]))


# --- keygen ---------------------------------------------------------------------------------------


def test_keygen_writes_private_key_0600_and_never_overwrites(tmp_path, monkeypatch, capsys):
    out = tmp_path / "keys"
    code, stdout, _ = run_cli(monkeypatch, capsys, "keygen", "--out", out, "--name", "alice")
    assert code == 0
    private, public = out / "alice.key", out / "alice.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = load_private_key(private)
    assert keyid_of(key.public_key()) in stdout
    before = private.read_bytes(), public.read_bytes()

    code, _, stderr = run_cli(monkeypatch, capsys, "keygen", "--out", out, "--name", "alice")
    assert code == 2
    assert "refusing to overwrite" in stderr and "alice.key" in stderr
    assert (private.read_bytes(), public.read_bytes()) == before


def test_keygen_refuses_when_only_the_public_half_exists(tmp_path, monkeypatch, capsys):
    (tmp_path / "bob.pub").write_text("someone else's key\n")
    code, _, stderr = run_cli(monkeypatch, capsys, "keygen", "--out", tmp_path, "--name", "bob")
    assert code == 2 and "bob.pub" in stderr
    assert not (tmp_path / "bob.key").exists()


def test_keyid_is_sha256_of_the_raw_public_key(tmp_path):
    private, public, keyid = generate_key_pair(tmp_path, "carol")
    loaded = serialization.load_pem_public_key(public.read_bytes())
    raw = loaded.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert keyid == hashlib.sha256(raw).hexdigest() == keyid_of(load_private_key(private).public_key())


def test_pae_is_dsse_v1_encoding():
    # The example from the DSSE protocol description.
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


# --- publish ---------------------------------------------------------------------------------------


def test_publish_then_verify_round_trip(tmp_path, keys, monkeypatch, capsys):
    private, trusted = keys
    run_dir = make_run(tmp_path, "run-1", extra_metric_rows=5)
    code, stdout, _ = run_cli(monkeypatch, capsys, "publish", run_dir, "--key", private, "--results", tmp_path / "results")
    assert code == 0, stdout
    target = published(tmp_path, run_dir)
    assert target.is_file()

    envelope = json.loads(target.read_text())
    assert envelope["payloadType"] == PAYLOAD_TYPE
    assert envelope["signatures"][0]["keyid"] == keyid_of(load_private_key(private).public_key())
    statement = decode_statement(target)
    result = json.loads((run_dir / "result.json").read_text())
    assert statement["_type"] == STATEMENT_TYPE
    assert statement["predicateType"] == PREDICATE_TYPE
    assert statement["subject"] == [{"name": "tiny-gpt", "digest": {"sha256": result["submission"]["tree_sha256"]}}]
    assert statement["predicate"]["result"] == result
    assert statement["predicate"]["official"] is True
    curve = statement["predicate"]["loss_curve"]
    assert len(curve["value"]) == curve["logged_points"] == 40  # the 5 "lr" rows are not loss
    assert curve["time_s"] == sorted(curve["time_s"])

    code, stdout, _ = run_cli(monkeypatch, capsys, "verify", target, "--trusted-keys", trusted)
    assert code == 0
    assert stdout.startswith("OK") and "run-1" in stdout and "signed by tester" in stdout

    # Ed25519 is deterministic, so publishing the same run again is a no-op, not a conflict.
    code, stdout, _ = run_cli(monkeypatch, capsys, "publish", run_dir, "--key", private, "--results", tmp_path / "results")
    assert code == 0 and "already published" in stdout


def test_publish_thins_a_long_loss_curve_keeping_both_ends(tmp_path, keys, monkeypatch, capsys):
    private, _ = keys
    run_dir = make_run(tmp_path, "long", loss_points=3 * LOSS_CURVE_MAX_POINTS + 7)
    assert run_cli(monkeypatch, capsys, "publish", run_dir, "--key", private, "--results", tmp_path / "results")[0] == 0
    curve = decode_statement(published(tmp_path, run_dir))["predicate"]["loss_curve"]
    assert len(curve["step"]) == LOSS_CURVE_MAX_POINTS
    assert curve["logged_points"] == 3 * LOSS_CURVE_MAX_POINTS + 7
    assert curve["step"][0] == 0 and curve["step"][-1] == 3 * LOSS_CURVE_MAX_POINTS + 6


def test_publish_refuses_a_run_that_is_not_ok(tmp_path, keys, monkeypatch, capsys):
    run_dir = make_run(tmp_path, "crashed-run", status="crashed")
    code, _, stderr = run_cli(monkeypatch, capsys, "publish", run_dir, "--key", keys[0], "--results", tmp_path / "results")
    assert code == 2 and "status is crashed" in stderr
    assert not (tmp_path / "results").exists()


# --- time-to-target runs: reached, not reached, and records whose fields disagree with their status ---


def test_a_run_that_did_not_reach_its_target_is_published_and_verifies(tmp_path, keys, monkeypatch, capsys):
    private, trusted = keys
    run_dir = make_run(tmp_path, "missed", track="cpu-target", target=4.1, provisional=True, val_loss=4.3)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "not_reached" and result["target"] == {
        "val_loss": 4.1, "provisional": True, "reached": False, "time_s": None}
    code, stdout, stderr = run_cli(monkeypatch, capsys, "publish", run_dir, "--key", private, "--results", tmp_path / "results")
    assert code == 0, stderr
    target = published(tmp_path, run_dir)
    assert decode_statement(target)["predicate"]["result"] == result
    code, stdout, _ = run_cli(monkeypatch, capsys, "verify", target, "--trusted-keys", trusted)
    assert code == 0 and stdout.startswith("OK") and "did not reach val_loss 4.1 (final model's val_loss 4.3000)" in stdout


def test_a_run_that_reached_its_target_verifies_with_its_time(tmp_path, keys, monkeypatch, capsys):
    private, trusted = keys
    run_dir = make_run(tmp_path, "quick", track="cpu-target", target=4.1, time_to_target=27.5, val_loss=4.08)
    result = json.loads((run_dir / "result.json").read_text())
    scored = [point for point in result["val_curve"] if point["scored"] == "ok"]
    assert result["status"] == "ok" and scored[-1] == {
        "time_s": 27.5, "model": "snapshot", "val_loss": 4.08, "val_bpb": round(4.08 / 2.3, 4), "scored": "ok"}
    assert {point["scored"] for point in result["val_curve"][len(scored):]} == {"not_needed"}
    assert run_cli(monkeypatch, capsys, "publish", run_dir, "--key", private, "--results", tmp_path / "results")[0] == 0
    code, stdout, _ = run_cli(monkeypatch, capsys, "verify", published(tmp_path, run_dir), "--trusted-keys", trusted)
    assert code == 0 and "reached val_loss 4.1 at 27.50 s (val_loss 4.0800)" in stdout


def test_publish_still_refuses_unscored_and_smoke_runs_of_a_target_track(tmp_path, keys, monkeypatch, capsys):
    crashed = make_run(tmp_path, "crashed", track="cpu-target", target=4.1, status="crashed")
    assert json.loads((crashed / "result.json").read_text())["target"]["reached"] is None
    code, _, stderr = run_cli(monkeypatch, capsys, "publish", crashed, "--key", keys[0], "--results", tmp_path / "results")
    assert code == 2 and "status is crashed" in stderr and "not_reached" in stderr
    smoke = make_run(tmp_path, "smoke", track="cpu-target", target=4.1, official=False, val_loss=4.5)
    result_path = smoke / "result.json"
    result_path.write_text(result_path.read_text().replace('"smoke": false', '"smoke": true'))
    code, _, stderr = run_cli(monkeypatch, capsys, "publish", smoke, "--key", keys[0], "--results", tmp_path / "results",
                              "--unofficial")
    assert code == 2 and "smoke run" in stderr
    assert not (tmp_path / "results").exists()


def _set(path: str, value):
    """An edit of result.json: `value` at the dotted `path`."""
    def edit(result: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            result = result[key]
        result[last] = value
    return edit


# (what the run is, the edit that makes it inconsistent, the reason given)
INCONSISTENT = {
    "ok-without-curve": ({}, _set("val_curve", None), "status is ok but val_curve is null"),
    "not-reached-without-metrics": ({"target": 4.1}, _set("metrics", None), "status is not_reached but metrics is null"),
    "not-reached-without-curve": ({"target": 4.1}, _set("val_curve", None), "status is not_reached but val_curve is null"),
    "not-reached-on-a-fixed-time-track": ({}, _set("status", "not_reached"), "status is not_reached but target is null"),
    "not-reached-but-reached": ({"target": 4.1}, _set("target.reached", True), "status is not_reached but target.reached is true, not false"),
    "not-reached-with-a-time": ({"target": 4.1}, _set("target.time_s", 12.0), "status is not_reached but target.time_s is set"),
    "ok-but-not-reached": ({"target": 4.1, "time_to_target": 20.0}, _set("target.reached", False),
                           "status is ok on a time-to-target track but target.reached is false, not true"),
    "ok-reached-unknown": ({"target": 4.1, "time_to_target": 20.0}, _set("target.reached", None),
                           "status is ok on a time-to-target track but target.reached is null, not true"),
    "ok-without-a-time": ({"target": 4.1, "time_to_target": 20.0}, _set("target.time_s", None),
                          "status is ok on a time-to-target track but target.time_s is null"),
    "ok-with-a-time-the-curve-does-not-show": ({"target": 4.1, "time_to_target": 20.0}, _set("target.time_s", 10.0),
                                               "target.time_s is not the time of the val_curve's first model at or below the target"),
}


@pytest.mark.parametrize("kind, edit, reason", INCONSISTENT.values(), ids=INCONSISTENT.keys())
def test_publish_refuses_a_record_whose_fields_disagree_with_its_status(tmp_path, keys, monkeypatch, capsys, kind, edit, reason):
    run_dir = make_run(tmp_path, "odd", track="cpu-target" if kind else "cpu-1min", val_loss=4.08, **kind)
    result_path = run_dir / "result.json"
    result = json.loads(result_path.read_text())
    edit(result)
    result_path.write_text(json.dumps(result))
    code, _, stderr = run_cli(monkeypatch, capsys, "publish", run_dir, "--key", keys[0], "--results", tmp_path / "results")
    assert code == 2 and "is not a valid result: " + reason in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("kind, edit, reason", INCONSISTENT.values(), ids=INCONSISTENT.keys())
def test_verify_refuses_a_signed_record_whose_fields_disagree_with_its_status(tmp_path, keys, monkeypatch, capsys, kind, edit, reason):
    # Signed by a trusted key, as an evaluator with a bug (or another evaluator) could have signed it.
    private, trusted = keys
    run_dir = make_run(tmp_path, "odd", track="cpu-target" if kind else "cpu-1min", val_loss=4.08, **kind)
    result = json.loads((run_dir / "result.json").read_text())
    edit(result)
    target = tmp_path / "envelope.json"
    target.write_bytes(_sign_with(private, build_statement(result, empty_loss_curve())))
    code, stdout, _ = run_cli(monkeypatch, capsys, "verify", target, "--trusted-keys", trusted)
    assert code == 1 and stdout.startswith("FAIL") and "payload is not a valid result: " + reason in stdout


def test_publish_refuses_unofficial_unless_asked_and_then_marks_it(tmp_path, keys, monkeypatch, capsys):
    private, trusted = keys
    run_dir = make_run(tmp_path, "laptop", official=False)
    args = ("publish", run_dir, "--key", private, "--results", tmp_path / "results")
    code, _, stderr = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and "unofficial" in stderr and "--unofficial" in stderr and "not sandboxed" in stderr

    assert run_cli(monkeypatch, capsys, *args, "--unofficial")[0] == 0
    target = published(tmp_path, run_dir)
    assert decode_statement(target)["predicate"]["official"] is False
    code, stdout, _ = run_cli(monkeypatch, capsys, "verify", target, "--trusted-keys", trusted)
    assert code == 0 and "unofficial" in stdout


def test_publish_refuses_when_the_submission_changed_since_the_run(tmp_path, keys, monkeypatch, capsys):
    run_dir = make_run(tmp_path, "edited")
    (tmp_path / "submissions" / "tiny-gpt" / "train.py").write_text("def train(ctx):\n    return None\n")
    code, _, stderr = run_cli(monkeypatch, capsys, "publish", run_dir, "--key", keys[0], "--results", tmp_path / "results")
    assert code == 2 and "changed since the run" in stderr and "tree hash" in stderr


def test_publish_refuses_when_the_track_changed_since_the_run(tmp_path, keys, monkeypatch, capsys, editable_tracks):
    run_dir = make_run(tmp_path, "older-track")
    track = editable_tracks / "cpu-1min.toml"
    track.write_text(track.read_text().replace("budget_s = 60", "budget_s = 90"))
    code, _, stderr = run_cli(monkeypatch, capsys, "publish", run_dir, "--key", keys[0], "--results", tmp_path / "results")
    assert code == 2 and "cpu-1min.toml changed since the run" in stderr and "rerun it" in stderr
    assert not (tmp_path / "results").exists()


def test_publish_without_the_submission_folder_warns_and_publishes(tmp_path, keys, monkeypatch, capsys):
    run_dir = make_run(tmp_path, "elsewhere")
    shutil.rmtree(tmp_path / "submissions" / "tiny-gpt")
    code, _, stderr = run_cli(monkeypatch, capsys, "publish", run_dir, "--key", keys[0], "--results", tmp_path / "results")
    assert code == 0 and "not re-checked" in stderr


def test_publish_refuses_to_replace_a_different_envelope(tmp_path, keys, monkeypatch, capsys):
    run_dir = make_run(tmp_path, "twice")
    results = tmp_path / "results"
    assert run_cli(monkeypatch, capsys, "publish", run_dir, "--key", keys[0], "--results", results)[0] == 0
    target = published(tmp_path, run_dir)
    first = target.read_bytes()
    other, _, _ = generate_key_pair(tmp_path / "other", "mallory")
    code, _, stderr = run_cli(monkeypatch, capsys, "publish", run_dir, "--key", other, "--results", results)
    assert code == 2 and "refusing to overwrite" in stderr
    assert target.read_bytes() == first


def _drop_metrics(text: str) -> str:
    data = json.loads(text)
    del data["metrics"]
    return json.dumps(data)


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (_drop_metrics, "not a valid result"),
        (lambda text: text.replace('"val_loss": 4.0', '"val_loss": NaN'), "not valid JSON"),
        (lambda text: text[: len(text) // 2], "not valid JSON"),
    ],
    ids=["metrics-dropped", "nan", "truncated"],
)
def test_publish_refuses_a_bad_result_json(tmp_path, keys, monkeypatch, capsys, corrupt, expected):
    run_dir = make_run(tmp_path, "bad")
    result_path = run_dir / "result.json"
    result_path.write_text(corrupt(result_path.read_text()))
    code, _, stderr = run_cli(monkeypatch, capsys, "publish", run_dir, "--key", keys[0], "--results", tmp_path / "results")
    assert code == 2 and expected in stderr and "Traceback" not in stderr


def test_publish_refuses_a_key_that_is_not_an_ed25519_private_key(tmp_path, keys, monkeypatch, capsys):
    run_dir = make_run(tmp_path, "r")
    public = keys[1] / "tester.pub"
    code, _, stderr = run_cli(monkeypatch, capsys, "publish", run_dir, "--key", public, "--results", tmp_path / "results")
    assert code == 2 and "private key" in stderr


# --- verify: every kind of bad envelope is named, with its reason ----------------------------------


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


def _truncate(envelope_path: Path, private: Path, tmp_path: Path) -> None:
    data = envelope_path.read_bytes()
    envelope_path.write_bytes(data[: len(data) // 2])


def _sign_an_invalid_result(envelope_path: Path, private: Path, tmp_path: Path) -> None:
    statement = decode_statement(envelope_path)
    del statement["predicate"]["result"]["seed"]
    envelope_path.write_bytes(_sign_with(private, statement))


def _sign_a_number_beyond_float64(envelope_path: Path, private: Path, tmp_path: Path) -> None:
    # Valid JSON that Python would read as an infinity: by a trusted key, it must still be refused.
    statement = decode_statement(envelope_path)
    statement["predicate"]["result"]["metrics"]["val_loss"] = 12345.5
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).replace("12345.5", "-1e999").encode()
    key = load_private_key(private)
    envelope = {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [{"keyid": keyid_of(key.public_key()), "sig": base64.b64encode(key.sign(pae(PAYLOAD_TYPE, payload))).decode()}],
    }
    envelope_path.write_bytes(envelope_bytes(envelope))


def _sign_an_integer_beyond_int64(envelope_path: Path, private: Path, tmp_path: Path) -> None:
    statement = decode_statement(envelope_path)
    statement["predicate"]["result"]["metrics"]["val_loss"] = 10**400  # float() of it raises OverflowError
    envelope_path.write_bytes(_sign_with(private, statement))


def _sign_a_mismatched_subject(envelope_path: Path, private: Path, tmp_path: Path) -> None:
    statement = decode_statement(envelope_path)
    statement["subject"][0]["digest"]["sha256"] = "f" * 64
    envelope_path.write_bytes(_sign_with(private, statement))


def _sign_a_non_statement(envelope_path: Path, private: Path, tmp_path: Path) -> None:
    envelope_path.write_bytes(_sign_with(private, {"hello": "world"}))


def _edit_the_submission(envelope_path: Path, private: Path, tmp_path: Path) -> None:
    (tmp_path / "submissions" / "tiny-gpt" / "train.py").write_text("# edited after publishing\n")


def _edit_the_track(envelope_path: Path, private: Path, tmp_path: Path) -> None:
    track = tmp_path / "tracks" / "cpu-1min.toml"
    track.write_text(track.read_text().replace("memory_mib = ", "memory_mib = 1"))


def _change_payload_type(envelope_path: Path, private: Path, tmp_path: Path) -> None:
    envelope = json.loads(envelope_path.read_text())
    envelope["payloadType"] = "application/json"
    envelope_path.write_text(json.dumps(envelope))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_tamper_payload, "does not match the payload"),
        (_sign_with_unknown_key, "unknown key"),
        (_truncate, "not valid JSON"),
        (_sign_an_invalid_result, "not a valid result"),
        (_sign_a_number_beyond_float64, "-1e999 does not fit a 64-bit float"),
        (_sign_an_integer_beyond_int64, "does not fit a 64-bit integer"),
        (_sign_a_mismatched_subject, "subject does not match"),
        (_sign_a_non_statement, "not an in-toto Statement"),
        (_edit_the_submission, "no longer matches the signed tree hash"),
        (_edit_the_track, "cpu-1min.toml changed since the run"),
        (_change_payload_type, "payloadType"),
    ],
    ids=lambda value: value.__name__.strip("_") if callable(value) else None,
)
def test_verify_names_each_bad_envelope_and_its_reason(tmp_path, keys, monkeypatch, capsys, damage, reason, editable_tracks):
    private, trusted = keys
    good_run = make_run(tmp_path, "good", submission="other-sub", track="t4-5min")
    bad_run = make_run(tmp_path, "bad")
    for run_dir in (good_run, bad_run):
        assert run_cli(monkeypatch, capsys, "publish", run_dir, "--key", private, "--results", tmp_path / "results")[0] == 0
    bad = published(tmp_path, bad_run)
    damage(bad, private, tmp_path)

    code, stdout, stderr = run_cli(monkeypatch, capsys, "verify", tmp_path / "results", "--trusted-keys", trusted)
    assert code == 1
    lines = dict(line.split("  ", 1) for line in stdout.splitlines())
    assert set(lines) == {"OK", "FAIL"}
    assert lines["FAIL"].startswith(str(bad)) or bad.name in lines["FAIL"]
    assert reason in lines["FAIL"]
    assert "good" in lines["OK"]
    assert "Traceback" not in stderr and "1 verified, 1 failed" in stderr


def test_verify_of_a_missing_file_fails_cleanly(tmp_path, keys, monkeypatch, capsys):
    code, stdout, stderr = run_cli(monkeypatch, capsys, "verify", tmp_path / "nope.json", "--trusted-keys", keys[1])
    assert code == 1 and stdout.startswith("FAIL") and "cannot read" in stdout and "Traceback" not in stderr


def test_verify_refuses_a_trusted_key_that_does_not_load(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken.pub").write_text("not a key\n")
    code, _, stderr = run_cli(monkeypatch, capsys, "verify", tmp_path / "x.json", "--trusted-keys", tmp_path)
    assert code == 2 and "broken.pub" in stderr


def test_statement_without_metrics_curve_still_verifies(tmp_path, keys, monkeypatch, capsys):
    private, trusted = keys
    run_dir = make_run(tmp_path, "no-curve")
    result = json.loads((run_dir / "result.json").read_text())
    target = tmp_path / "envelope.json"
    target.write_bytes(_sign_with(private, build_statement(result, empty_loss_curve())))
    code, stdout, _ = run_cli(monkeypatch, capsys, "verify", target, "--trusted-keys", trusted)
    assert code == 0, stdout


@pytest.mark.parametrize("moment", ["2026-12-01T20:55:34Z", "2026-12-01T20:55:34.25+01:00"])
def test_record_times_are_rfc_3339_on_every_python(moment):
    assert parse_utc(moment).utcoffset() is not None


@pytest.mark.parametrize("moment", ["20261201T205534Z", "2026-W48-2T20:55:34Z", "2026-12-01T20:55:34", "2026-12-01 20:55:34Z"])
def test_iso_forms_that_only_some_pythons_read_are_refused(moment):
    # Python 3.11's fromisoformat reads the first two and 3.10's does not: a record must verify alike on both.
    with pytest.raises(ValueError):
        parse_utc(moment)


def test_a_refused_file_access_is_one_line_and_anything_else_stays_a_traceback(capsys):
    def refused():
        raise PermissionError(13, "Permission denied", "/srv/results/cpu-1min")

    assert cli.run_guarded("evaluator", refused) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot access /srv/results/cpu-1min: Permission denied" in err and "--out" in err

    def bug():
        raise PermissionError(1, "Operation not permitted")  # no file: not the user's folder, a real failure

    with pytest.raises(PermissionError):
        cli.run_guarded("evaluator", bug)

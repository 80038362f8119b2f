"""publish and verify with real Ed25519 keys, real signatures and real Parquet metrics."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
from publish_support import (
    INCONSISTENT,
    _sign_with,
    _sign_with_unknown_key,
    _tamper_payload,
    decode_statement,
    make_run,
    published,
    run_cli,
)

from evaluator import cli
from evaluator.metrics import LOSS_CURVE_MAX_POINTS, empty_loss_curve
from evaluator.paths import HOME
from evaluator.publish import PREDICATE_TYPE, STATEMENT_TYPE, build_statement
from evaluator.signing import PAYLOAD_TYPE, envelope_bytes, generate_key_pair, keyid_of, load_private_key, pae


@pytest.fixture
def editable_tracks(tmp_path, monkeypatch) -> Path:
    """A copy of spec/tracks that the test may edit, in place of the real one."""
    tracks = tmp_path / "tracks"
    shutil.copytree(HOME / "spec" / "tracks", tracks)
    monkeypatch.setattr("evaluator.tracks.TRACKS_DIR", tracks)
    return tracks


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    """(private key path, trusted-keys dir holding its public key)."""
    private, public, _ = generate_key_pair(tmp_path / "private", "tester")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(public, trusted / public.name)
    return private, trusted


# --- publish ---------------------------------------------------------------------------------------


def test_publish_then_verify_round_trip(tmp_path, keys, monkeypatch, capsys):
    private, trusted = keys
    run_dir = make_run(tmp_path, "run-1", extra_metric_rows=5)
    code, stdout, _ = run_cli(
        monkeypatch, capsys, "publish", run_dir, "--key", private, "--results", tmp_path / "results"
    )
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
    code, stdout, _ = run_cli(
        monkeypatch, capsys, "publish", run_dir, "--key", private, "--results", tmp_path / "results"
    )
    assert code == 0 and "already published" in stdout


def test_publish_thins_a_long_loss_curve_keeping_both_ends(tmp_path, keys, monkeypatch, capsys):
    private, _ = keys
    run_dir = make_run(tmp_path, "long", loss_points=3 * LOSS_CURVE_MAX_POINTS + 7)
    assert run_cli(monkeypatch, capsys, "publish", run_dir, "--key", private, "--results", tmp_path / "results")[0] == 0
    curve = decode_statement(published(tmp_path, run_dir))["predicate"]["loss_curve"]
    assert len(curve["step"]) == LOSS_CURVE_MAX_POINTS
    assert curve["logged_points"] == 3 * LOSS_CURVE_MAX_POINTS + 7
    assert curve["step"][0] == 0 and curve["step"][-1] == 3 * LOSS_CURVE_MAX_POINTS + 6


def test_publish_signs_a_failed_run_but_refuses_the_evaluators_own_failure(tmp_path, keys, monkeypatch, capsys):
    # A crash is the submission's: it is published, and the leaderboard counts it beside the scored runs.
    private, trusted = keys
    crashed = make_run(tmp_path, "crashed-run", status="crashed")
    code, _, stderr = run_cli(
        monkeypatch, capsys, "publish", crashed, "--key", private, "--results", tmp_path / "results"
    )
    assert code == 0, stderr
    code, stdout, _ = run_cli(monkeypatch, capsys, "verify", tmp_path / "results", "--trusted-keys", trusted)
    assert code == 0 and "OK" in stdout
    # The evaluator's own failure is no verdict on the submission: it is run again with the same seed.
    broken = make_run(tmp_path, "broken-run", status="evaluator_error")
    code, _, stderr = run_cli(monkeypatch, capsys, "publish", broken, "--key", private, "--results", tmp_path / "other")
    assert code == 2 and "status is evaluator_error" in stderr and "--drawn-seed" in stderr
    assert not (tmp_path / "other").exists()


# --- time-to-target runs: reached, not reached, and results whose fields disagree with their status ---


def test_a_run_that_did_not_reach_its_target_is_published_and_verifies(tmp_path, keys, monkeypatch, capsys):
    private, trusted = keys
    run_dir = make_run(tmp_path, "missed", track="cpu-target", target=4.1, provisional=True, val_loss=4.3)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "not_reached" and result["target"] == {
        "val_loss": 4.1,
        "provisional": True,
        "reached": False,
        "time_s": None,
    }
    code, stdout, stderr = run_cli(
        monkeypatch, capsys, "publish", run_dir, "--key", private, "--results", tmp_path / "results"
    )
    assert code == 0, stderr
    target = published(tmp_path, run_dir)
    assert decode_statement(target)["predicate"]["result"] == result
    code, stdout, _ = run_cli(monkeypatch, capsys, "verify", target, "--trusted-keys", trusted)
    assert (
        code == 0 and stdout.startswith("OK") and "did not reach val_loss 4.1 (final model's val_loss 4.3000)" in stdout
    )


def test_a_run_that_reached_its_target_verifies_with_its_time(tmp_path, keys, monkeypatch, capsys):
    private, trusted = keys
    run_dir = make_run(tmp_path, "quick", track="cpu-target", target=4.1, time_to_target=27.5, val_loss=4.08)
    result = json.loads((run_dir / "result.json").read_text())
    scored = [point for point in result["val_curve"] if point["scored"] == "ok"]
    assert result["status"] == "ok" and scored[-1] == {
        "time_s": 27.5,
        "model": "snapshot",
        "val_loss": 4.08,
        "val_bpb": round(4.08 / 2.3, 4),
        "scored": "ok",
    }
    assert {point["scored"] for point in result["val_curve"][len(scored) :]} == {"not_needed"}
    assert run_cli(monkeypatch, capsys, "publish", run_dir, "--key", private, "--results", tmp_path / "results")[0] == 0
    code, stdout, _ = run_cli(monkeypatch, capsys, "verify", published(tmp_path, run_dir), "--trusted-keys", trusted)
    assert code == 0 and "reached val_loss 4.1 at 27.50 s (val_loss 4.0800)" in stdout


def test_publish_still_refuses_sandbox_failures_and_smoke_runs_of_a_target_track(tmp_path, keys, monkeypatch, capsys):
    broken = make_run(tmp_path, "broken", track="cpu-target", target=4.1, status="sandbox_error")
    assert json.loads((broken / "result.json").read_text())["target"]["reached"] is None
    code, _, stderr = run_cli(
        monkeypatch, capsys, "publish", broken, "--key", keys[0], "--results", tmp_path / "results"
    )
    assert code == 2 and "status is sandbox_error" in stderr
    smoke = make_run(tmp_path, "smoke", track="cpu-target", target=4.1, official=False, val_loss=4.5)
    result_path = smoke / "result.json"
    result_path.write_text(result_path.read_text().replace('"smoke": false', '"smoke": true'))
    code, _, stderr = run_cli(
        monkeypatch, capsys, "publish", smoke, "--key", keys[0], "--results", tmp_path / "results", "--unofficial"
    )
    assert code == 2 and "smoke run" in stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("kind, edit, reason", INCONSISTENT.values(), ids=INCONSISTENT.keys())
def test_publish_refuses_a_result_whose_fields_disagree_with_its_status(
    tmp_path, keys, monkeypatch, capsys, kind, edit, reason
):
    run_dir = make_run(tmp_path, "odd", track="cpu-target" if kind else "cpu-1min", val_loss=4.08, **kind)
    result_path = run_dir / "result.json"
    result = json.loads(result_path.read_text())
    edit(result)
    result_path.write_text(json.dumps(result))
    code, _, stderr = run_cli(
        monkeypatch, capsys, "publish", run_dir, "--key", keys[0], "--results", tmp_path / "results"
    )
    assert code == 2 and "is not a valid result: " + reason in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("kind, edit, reason", INCONSISTENT.values(), ids=INCONSISTENT.keys())
def test_verify_refuses_a_signed_result_whose_fields_disagree_with_its_status(
    tmp_path, keys, monkeypatch, capsys, kind, edit, reason
):
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
    code, _, stderr = run_cli(
        monkeypatch, capsys, "publish", run_dir, "--key", keys[0], "--results", tmp_path / "results"
    )
    assert code == 2 and "changed since the run" in stderr and "tree hash" in stderr


def test_publish_refuses_when_the_track_changed_since_the_run(tmp_path, keys, monkeypatch, capsys, editable_tracks):
    run_dir = make_run(tmp_path, "older-track")
    track = editable_tracks / "cpu-1min.toml"
    track.write_text(track.read_text().replace("budget_s = 60", "budget_s = 90"))
    code, _, stderr = run_cli(
        monkeypatch, capsys, "publish", run_dir, "--key", keys[0], "--results", tmp_path / "results"
    )
    assert code == 2 and "cpu-1min.toml changed since the run" in stderr and "rerun it" in stderr
    assert not (tmp_path / "results").exists()


def test_publish_without_the_submission_folder_warns_and_publishes(tmp_path, keys, monkeypatch, capsys):
    run_dir = make_run(tmp_path, "elsewhere")
    shutil.rmtree(tmp_path / "submissions" / "tiny-gpt")
    code, _, stderr = run_cli(
        monkeypatch, capsys, "publish", run_dir, "--key", keys[0], "--results", tmp_path / "results"
    )
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
    code, _, stderr = run_cli(
        monkeypatch, capsys, "publish", run_dir, "--key", keys[0], "--results", tmp_path / "results"
    )
    assert code == 2 and expected in stderr and "Traceback" not in stderr


def test_publish_refuses_a_key_that_is_not_an_ed25519_private_key(tmp_path, keys, monkeypatch, capsys):
    run_dir = make_run(tmp_path, "r")
    public = keys[1] / "tester.pub"
    code, _, stderr = run_cli(
        monkeypatch, capsys, "publish", run_dir, "--key", public, "--results", tmp_path / "results"
    )
    assert code == 2 and "private key" in stderr


# --- verify: every kind of bad envelope is named, with its reason ----------------------------------


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
        "signatures": [
            {
                "keyid": keyid_of(key.public_key()),
                "sig": base64.b64encode(key.sign(pae(PAYLOAD_TYPE, payload))).decode(),
            }
        ],
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
def test_verify_names_each_bad_envelope_and_its_reason(
    tmp_path, keys, monkeypatch, capsys, damage, reason, editable_tracks
):
    private, trusted = keys
    good_run = make_run(tmp_path, "good", submission="other-sub", track="t4-5min")
    bad_run = make_run(tmp_path, "bad")
    for run_dir in (good_run, bad_run):
        assert (
            run_cli(monkeypatch, capsys, "publish", run_dir, "--key", private, "--results", tmp_path / "results")[0]
            == 0
        )
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

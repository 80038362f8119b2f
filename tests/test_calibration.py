"""evaluator calibrate and --budget calibrated, on the CPU track with the real workload."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli, write_submission
from leaderboard_support import _signer
from publish_support import make_run

from evaluator import calibration, curve, scoring
from evaluator.cli import main
from evaluator.errors import InvalidModel
from evaluator.paths import HOME
from evaluator.publish import publish
from evaluator.results import result_problems
from evaluator.runner import evaluate
from evaluator.tracks import load_track

RETURN_UNIFORM = """
def train(ctx):
    return TinyCausal(ctx.vocab_size)
"""


@pytest.mark.slow
def test_calibrate_times_the_workload_and_compares_it_with_the_tracks_figure(capsys):
    assert main(["calibrate", "--track", "cpu-1min", "--repeats", "2", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    track = load_track("cpu-1min")
    assert figures["workload"] == calibration.WORKLOAD == track.calibration.workload
    assert len(figures["host_repeats"]) == 2 and all(seconds > 0 for seconds in figures["host_repeats"])
    assert figures["host_device"] == "cpu" and figures["host_threads"] == track.device.threads
    assert figures["track_seconds"] == track.calibration.seconds
    assert figures["factor"] == pytest.approx(figures["host_seconds"] / figures["track_seconds"], rel=1e-3)
    assert figures["calibrated_budget_s"] == pytest.approx(track.budget_s * figures["factor"])
    assert figures["track_provenance"].startswith("measured on ") and track.calibration.basis == "measured"


def test_bad_calibration_requests_are_one_line(capsys, tmp_path, monkeypatch):
    assert main(["calibrate", "--track", "cpu-1min", "--repeats", "0"]) == 2
    with pytest.raises(SystemExit) as usage:
        main(["run", str(tmp_path), "--budget", "fast"])
    assert usage.value.code == 2
    err = capsys.readouterr().err
    assert "--repeats must be at least 1" in err and "'fast' is neither a number of seconds nor 'calibrated'" in err
    # A track whose figure is for another workload: the factor would compare two different things.
    tracks = tmp_path / "tracks"
    tracks.mkdir()
    text = (HOME / "spec" / "tracks" / "cpu-1min.toml").read_text()
    (tracks / "cpu-1min.toml").write_text(
        text.replace('workload = "dense-transformer-v1"', 'workload = "dense-transformer-v0"')
    )
    monkeypatch.setattr("evaluator.tracks.TRACKS_DIR", tracks)
    assert main(["calibrate", "--track", "cpu-1min"]) == 2
    err = capsys.readouterr().err
    assert "states a time for workload 'dense-transformer-v0'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_calibrated_run_scales_the_budget_is_unofficial_and_says_why(tmp_path, capsys, monkeypatch):
    limits_seen = []
    real_setup = curve._setup

    def setup(plan):
        limits_seen.append(real_setup(plan).limits)
        return real_setup(plan)

    monkeypatch.setattr(curve, "_setup", setup)
    # A host 3x slower than the track: three times the budget, and the scoring deadlines with it.
    monkeypatch.setattr(
        calibration, "time_workload", lambda *args: calibration.HostTiming("cpu", 2, [2.1, 2.1], [4.2, 4.2])
    )
    folder = write_submission(tmp_path, "calibrated", RETURN_UNIFORM)
    code, record = run_cli(folder, tmp_path / "runs", "--budget", "calibrated", "--sandbox", "none", capsys=capsys)
    assert code == 0 and record["status"] == "ok", record["message"]
    factor = record["calibration"]["factor"]
    assert factor == 3.0 and record["budget_s"] == pytest.approx(180)
    eval_section = load_track("cpu-1min").eval
    assert limits_seen == [
        scoring.ScoringLimits(
            load_s=3 * eval_section.load_s,
            step_s=3 * eval_section.step_s,
            total_s=3 * eval_section.time_limit_s,
            consistency_nats=eval_section.consistency_nats,
        )
    ]
    assert record["calibration"]["workload"] == calibration.WORKLOAD
    assert record["official"] is False
    assert (
        "budget calibrated: x3 (180.0 s instead of the track's 60 s; the track's figure is measured)"
        in record["unofficial_reasons"]
    )
    assert not any(reason.startswith("budget overridden") for reason in record["unofficial_reasons"])
    with pytest.raises(calibration.UserError, match="give a budget or ask for a calibrated one, not both"):
        evaluate(folder, budget_s=5, calibrated_budget=True, runs_dir=tmp_path / "runs")


@pytest.mark.slow
def test_a_faster_host_gets_a_shorter_budget_but_never_shorter_scoring_deadlines(tmp_path, capsys, monkeypatch):
    # Loading a model and starting processes take what they take: only the training budget shrinks.
    monkeypatch.setattr(calibration, "time_workload", lambda *args: calibration.HostTiming("cpu", 2, [0.07], [0.14]))
    seen = []

    def setup(plan):  # the limits are all this test needs: stop before scoring
        seen.append(real_setup(plan).limits)
        raise InvalidModel("not scored by this test")

    real_setup = curve._setup
    monkeypatch.setattr(curve, "_setup", setup)
    folder = write_submission(tmp_path, "fast-host", RETURN_UNIFORM)
    code, record = run_cli(folder, tmp_path / "runs", "--budget", "calibrated", "--sandbox", "none", capsys=capsys)
    assert record["calibration"]["factor"] == 0.1 and record["budget_s"] == pytest.approx(6)
    assert seen[0].load_s == load_track("cpu-1min").eval.load_s


def test_a_factor_too_far_from_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(
        calibration, "time_workload", lambda *args: calibration.HostTiming("cpu", 2, [1010.0], [2000.0])
    )
    with pytest.raises(calibration.UserError, match="factor of 1.44e\\+03, outside 0.02-50"):
        calibration.calibrate(load_track("cpu-1min"))


def test_a_calibrated_result_can_never_be_official(tmp_path):
    result = json.loads((make_run(tmp_path, "official") / "result.json").read_text())
    assert result["official"] is True and result_problems(result) == []
    result["calibration"] = {
        "workload": calibration.WORKLOAD,
        "factor": 2.0,
        "host_seconds": 2.0,
        "host_repeats": [2.0],
        "host_spread": 0.0,
        "host_device": "cpu",
        "host_threads": 2,
        "host_cpu_share": 0.99,
        "track_seconds": 1.01,
        "track_provenance": "measured on a test",
    }
    assert any("official" in problem and "False was expected" in problem for problem in result_problems(result))


def test_the_leaderboard_keeps_calibrated_runs_in_rows_of_their_own(tmp_path, monkeypatch, capsys):
    _, key, trusted = _signer(tmp_path)
    results = tmp_path / "results"
    figures = {
        "workload": calibration.WORKLOAD,
        "factor": 1.8,
        "host_seconds": 0.49,
        "host_repeats": [0.49],
        "host_spread": 0.0,
        "host_device": "NVIDIA GeForce RTX 3060",
        "host_threads": 2,
        "host_cpu_share": None,
        "track_seconds": 0.27,
        "track_provenance": "estimated from a test",
    }
    publish(make_run(tmp_path, "plain", submission="mine", official=False), key, results, True)
    publish(make_run(tmp_path, "scaled", submission="mine", official=False, calibration=figures), key, results, True)
    publish(make_run(tmp_path, "official", submission="mine"), key, results, False)
    code = main(["leaderboard", "--results", str(results), "--trusted-keys", str(trusted), "--format", "json"])
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert code == 0
    assert [(row["official"], row["calibrated"], row["runs"]) for row in rows] == [
        (True, False, 1),
        (False, False, 1),
        (False, True, 1),
    ]
    assert rows[2]["run_details"][0]["calibration_factor"] == 1.8 and rows[0]["rank"] == 1 and rows[2]["rank"] is None


@pytest.mark.parametrize("change", [{"overrides": {"d_model": 512}}, {"smoke": True}])
def test_a_result_with_overrides_or_from_a_smoke_run_can_never_be_official(tmp_path, change):
    result = json.loads((make_run(tmp_path, "official") / "result.json").read_text())
    assert result_problems(result | change)  # official: true with either
    assert result_problems(result | change | {"official": False, "unofficial_reasons": ["overridden"]}) == []


def test_the_factor_is_the_fastest_repeat_and_a_busy_host_is_measured_again(monkeypatch, capsys):
    """Load only adds time: the fastest repeat is the estimate. A measurement whose repeats got too
    little of their CPUs, or lie far apart, is taken again."""
    measurements = iter(
        [
            calibration.HostTiming("cpu", 2, [2.0, 2.1, 2.2], [1.2, 1.3, 1.3]),  # ~30 % of 2 CPUs: busy
            calibration.HostTiming("cpu", 2, [0.7, 1.4, 0.72], [1.4, 2.8, 1.44]),  # 2 x apart: busy
            calibration.HostTiming("cpu", 2, [0.75, 0.7, 0.8], [1.5, 1.4, 1.58]),
        ]
    )
    monkeypatch.setattr(calibration, "time_workload", lambda *args: next(measurements))
    figures = calibration.calibrate(load_track("cpu-1min"))
    assert figures.host_seconds == 0.7 and figures.factor == round(0.7 / load_track("cpu-1min").calibration.seconds, 3)
    assert figures.host_cpu_share == 0.988
    said = capsys.readouterr().err
    assert "received 30% of its 2 CPUs' time" in said and "(2 of 3)" in said and "(3 of 3)" in said


def test_a_host_busy_in_every_measurement_is_refused(monkeypatch):
    busy = calibration.HostTiming("cpu", 2, [2.0, 2.1, 2.2], [1.2, 1.3, 1.3])
    monkeypatch.setattr(calibration, "time_workload", lambda *args: busy)
    with pytest.raises(
        calibration.UserError,
        match=f"this host is busy: .* in each of {calibration.ATTEMPTS} "
        "measurements; calibrate when nothing else runs here",
    ):
        calibration.calibrate(load_track("cpu-1min"))

"""Every run that starts ends in a result: a failure of the evaluator itself, at any stage after the
plan, leaves a valid `evaluator_error` result with the run's seed, the traceback in a log that is not
published, exit status 4, and nothing of the run on the host. Real runs in nsjail, one fault each."""

from __future__ import annotations

import json

import pytest
from conftest import leftovers, write_submission

from evaluator.cli import main
from evaluator.results import EVALUATOR_ERROR_LOG, EVALUATOR_ERROR_MESSAGE, EXIT_CODES, result_problems

# Trains nothing, takes one snapshot, logs, and returns the tiny model: every stage has work to do.
BODY = """
import time


def train(ctx):
    model = TinyCausal(ctx.vocab_size)
    ctx.log(0, loss=9.0, tokens=100)
    while not ctx.snapshot_due():
        time.sleep(0.05)
    ctx.snapshot(model)
    ctx.log(1, loss=8.0, tokens=200)
    return model
"""


class _Injected(RuntimeError):
    """The fault a test plants."""


def _fail_once(original):
    """`original`, except that its first call raises."""
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise _Injected("injected fault")
        return original(*args, **kwargs)

    return failing


# stage -> (the name monkeypatch replaces: its first call fails, whether the result has a training time)
STAGES = {
    "staging": ("evaluator.plan.stage_tree", False),
    "protocol reader": ("evaluator.training.parse_line", False),
    "snapshot copy": ("evaluator.training._take_file", False),
    "metrics": ("evaluator.training.write_metrics", False),
    "scoring": ("evaluator.scoring._read_model", True),
    "result building": ("evaluator.runner.build_result", True),
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_a_fault_at_any_stage_ends_in_an_evaluator_error_result(
    stage, cpu_track_variant, tmp_path, runs_dir, capsys, monkeypatch, nsjail
):
    target, trained = STAGES[stage]
    module_name, attribute = target.rsplit(".", 1)
    module = __import__(module_name, fromlist=[attribute])
    monkeypatch.setattr(target, _fail_once(getattr(module, attribute)))
    track = cpu_track_variant(
        "fast-snapshots", lambda text: text.replace("snapshot_every_s = 20", "snapshot_every_s = 1")
    )
    folder = write_submission(tmp_path, "faulty", BODY)

    code = main(
        [
            "run",
            str(folder),
            "--track",
            track,
            "--budget",
            "4",
            "--secret-seeds",
            "--sandbox",
            "nsjail",
            "--out",
            str(runs_dir),
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert code == EXIT_CODES["evaluator_error"] == 4
    assert "Traceback" not in captured.err and "injected fault" not in captured.err + captured.out
    result = json.loads(captured.out)
    assert result["status"] == "evaluator_error" and result["message"] == EVALUATOR_ERROR_MESSAGE
    assert result["seed_drawn"] is True and isinstance(result["seed"], int)
    assert result_problems(result) == []
    assert result["metrics"] is None and result["val_curve"] is None
    assert (result["train"]["train_seconds"] is not None) == trained
    (run_dir,) = runs_dir.iterdir()
    assert json.loads((run_dir / "result.json").read_text()) == result
    log = (run_dir / EVALUATOR_ERROR_LOG).read_text()
    assert "_Injected: injected fault" in log and "Traceback" in log
    assert leftovers(result["run_id"], run_dir) == []
    assert not (run_dir / "snapshots").exists() and not (run_dir / "jail-out").exists()


def test_a_fault_while_signing_leaves_the_result_valid_and_no_envelope(tmp_path, monkeypatch):
    """Signing is the last stage: a failure there writes nothing, and the run can be published later."""
    from publish_support import make_run

    from evaluator.publish import publish
    from evaluator.signing import generate_key_pair, load_private_key

    run_dir = make_run(tmp_path, "signed-later")
    before = (run_dir / "result.json").read_bytes()
    private, _, _ = generate_key_pair(tmp_path / "keys", "tester")
    key, results = load_private_key(private), tmp_path / "results"
    monkeypatch.setattr("evaluator.publish.sign_statement", _fail_once(lambda *args: None))
    with pytest.raises(_Injected):
        publish(run_dir, key, results, False)
    assert not results.exists() or not any(results.rglob("*.json"))
    assert (run_dir / "result.json").read_bytes() == before
    assert result_problems(json.loads(before)) == []
    monkeypatch.undo()
    path, written, _ = publish(run_dir, key, results, False)
    assert written and path.is_file()

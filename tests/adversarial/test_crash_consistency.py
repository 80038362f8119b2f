"""The evaluator killed or stopped mid-run, and evaluators running side by side: no half-written
result, nothing of a run left behind once the next run has started, no interference, and the same
val_loss from the same submission and seed."""

from __future__ import annotations

import signal
import time
import uuid

import pytest
from adversarial_support import (
    STARTUP_SLACK_S,
    attack_submission,
    finish,
    leftovers,
    mount_points_under,
    only_run_dir,
    processes_with,
    start_evaluator,
    wait_for,
)
from conftest import run_cli, write_submission

from evaluator.sandbox import cgroup_parent_dirs

# The submission starts a child with a marker in its command line, so the test can see from outside
# that train() is running, then sleeps: a run that is mid-training when the evaluator is stopped.
SLEEPER = """
import subprocess
import sys
import time


def train(ctx):
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", ctx.config["marker"]])
    time.sleep(600)
"""


# Every test here needs a working nsjail (the fixture is in conftest.py).
pytestmark = [pytest.mark.usefixtures("nsjail"), pytest.mark.slow]  # and the slow tier (`make test-fast` leaves it out)


def _start_mid_training(tmp_path):
    """An evaluator process whose jail is running the sleeper's train(); returns it, the run dir and the marker."""
    marker = f"mid-training-{uuid.uuid4().hex}"
    folder = write_submission(tmp_path, "sleeper", SLEEPER, {"marker": marker})
    runs = tmp_path / "runs"
    evaluator = start_evaluator(folder, runs, "--budget", "60")
    wait_for(lambda: processes_with(marker), STARTUP_SLACK_S, "the submission's train() to run")
    return evaluator, only_run_dir(runs), marker


def test_kill_9_of_the_evaluator_takes_the_jail_and_the_next_run_reaps_the_rest(tmp_path, runs_dir, capsys):
    evaluator, run_dir, marker = _start_mid_training(tmp_path)
    evaluator.kill()
    evaluator.communicate(timeout=10)
    # The jail dies with its evaluator (parent-death signal on nsjail); its cgroups and the tmpfs on
    # its output directory stay until any evaluator starting on this machine reaps them.
    wait_for(lambda: not processes_with(marker), 5, "the jail to die with its evaluator")
    assert mount_points_under(run_dir) == [str(run_dir / "jail-out")]
    assert leftovers(run_dir.name, run_dir), "nothing left behind to reap: the rest of the test proves nothing"

    quick = write_submission(tmp_path, "next-run", "def train(ctx):\n    return TinyCausal(ctx.vocab_size)\n")
    code, record = run_cli(quick, runs_dir, "--budget", "5", "--sandbox", "nsjail", capsys=capsys)

    assert (code, record["status"]) == (0, "ok"), record["message"]
    assert processes_with(marker) == []
    assert leftovers(run_dir.name, run_dir) == []
    assert not (run_dir / "result.json").exists()
    assert not list(run_dir.glob(".result.json.*"))


def test_sigterm_stops_the_evaluator_promptly_and_removes_the_run(tmp_path):
    evaluator, run_dir, marker = _start_mid_training(tmp_path)
    stopped_at = time.monotonic()
    evaluator.send_signal(signal.SIGTERM)
    _, err = evaluator.communicate(timeout=30)
    assert time.monotonic() - stopped_at < 10
    assert evaluator.returncode == 130, err.decode()
    assert b"interrupted" in err
    assert processes_with(marker) == []
    assert leftovers(run_dir.name, run_dir) == []
    assert not (run_dir / "result.json").exists()


def test_two_evaluations_at_once_do_not_interfere_and_agree_to_the_bit(tmp_path):
    names = ("fixed-a", "fixed-b")
    evaluators = [
        start_evaluator(
            attack_submission(tmp_path, name, "fixed_steps"), tmp_path / f"runs-{name}", "--budget", "40", "--smoke"
        )
        for name in names
    ]

    # Both jails must exist at one moment, each in cgroups of its own.
    def both_jailed():
        leaves = {path.name for parent in cgroup_parent_dirs() if parent.exists() for path in parent.iterdir()}
        return all(any(f"-{name}-" in leaf for leaf in leaves) for name in names)

    wait_for(both_jailed, 40 + STARTUP_SLACK_S, "both runs to be in their jails at once")
    records = [finish(evaluator, timeout=40 + 2 * STARTUP_SLACK_S) for evaluator in evaluators]

    for evaluator, record in zip(evaluators, records, strict=True):
        assert (evaluator.returncode, record["status"]) == (0, "ok"), record["message"]
        assert record["train"]["steps"] == 39
        run_dir = tmp_path / f"runs-{record['submission']['name']}" / record["run_id"]
        assert leftovers(record["run_id"], run_dir) == []
    first, second = (record["metrics"]["val_loss"] for record in records)
    assert first == second, f"the same submission and seed gave {first!r} and {second!r}"
    assert records[0]["run_id"] != records[1]["run_id"]

"""A busy host: the CPU share the jail got of what it asked for is measured, an honest run under load is unofficial and
says why, and scoring deadlines count CPU time, so the load never makes a model invalid."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import run_cli, write_submission
from publish_support import make_run

from evaluator.runner import summary_lines

# Trains on both of the track's threads until `seconds` have passed, then returns the tiny model,
# whose every scoring step computes for STEP_CPU_S of CPU time: scoring that costs about as much
# CPU time on a busy host as on a quiet one, and takes longer there.
COMPUTES = """
import time

STEP_CPU_S = 0.005


class Computes(TinyCausal):
    def decoder(self, rows):
        return _ComputingDecoder(self)


class _ComputingDecoder(_NewestTokenDecoder):
    def step(self, tokens):
        end = time.process_time() + STEP_CPU_S
        while time.process_time() < end:
            pass
        return super().step(tokens)


def train(ctx):
    torch.set_num_threads({threads})
    a = torch.randn(256, 256)
    end = time.monotonic() + {seconds}
    steps = 0
    while time.monotonic() < end:
        a = torch.tanh(a @ a)
        steps += 1
    ctx.log(steps, loss=1.0, tokens=1000 * steps)
    return Computes(ctx.vocab_size)
"""
# One scoring of that model on cpu-1min's split, measured here on 2026-12-06: ~1,300 steps, 6.7 s of
# CPU time (3.4 s charged over the track's 2 threads) in 4.0 s of wall time quiet, 6.5 s of CPU time
# in 7.6 s beside the burners. A total deadline between the two: on the wall clock, it would fail.
TIGHT_SCORING_S = 5


@pytest.fixture
def burners():
    """Three times as many spinning processes as the host has CPUs: a jail gets about a quarter of its share."""
    spinning = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3 * os.cpu_count())]
    yield
    for process in spinning:
        process.kill()
        process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("threads", [2, 1])
def test_a_quiet_run_gets_what_it_asks_for_whatever_threads_it_uses(tmp_path, runs_dir, capsys, nsjail, threads):
    """A submission that trains on one of its two threads asks for one CPU and gets it: it is not
    taken for a run on a busy host."""
    folder = write_submission(tmp_path, "computes", COMPUTES.format(seconds=4, threads=threads))
    code, record = run_cli(folder, runs_dir, "--budget", "8", "--sandbox", "nsjail", capsys=capsys)
    assert code == 0, record["message"]
    received = record["train"]["received"]
    assert received["cpus"] == 2 and received["min_share"] == 0.9
    assert received["wall_s"] == pytest.approx(record["train"]["train_seconds"], abs=0.01)
    assert received["cpu_s"] / (received["wall_s"] * 2) == pytest.approx(threads / 2, abs=0.15)
    assert received["demand_s"] == pytest.approx(threads * received["wall_s"], rel=0.15)
    assert received["share"] >= 0.9
    assert not [reason for reason in record["unofficial_reasons"] if "busy" in reason]
    assert [scoring["model"] for scoring in record["model_scorings"]] == ["final"]
    assert record["model_scorings"][0]["outcome"] == "ok" and record["model_scorings"][0]["cpu_s"] > 0


@pytest.mark.slow
def test_a_busy_host_makes_an_honest_run_unofficial_never_invalid(
    tmp_path, runs_dir, capsys, nsjail, burners, cpu_track_variant
):
    track = cpu_track_variant(
        "tight-scoring", lambda text: text.replace("time_limit_s = 90", f"time_limit_s = {TIGHT_SCORING_S}")
    )
    folder = write_submission(tmp_path, "computes", COMPUTES.format(seconds=4, threads=2))
    code, record = run_cli(folder, runs_dir, "--track", track, "--budget", "8", "--sandbox", "nsjail", capsys=capsys)
    assert (code, record["status"]) == (0, "ok"), record["message"]
    received = record["train"]["received"]
    assert received["share"] < 0.9
    busy = [reason for reason in record["unofficial_reasons"] if reason.startswith("the host was busy")]
    assert busy == [
        f"the host was busy: the training jail got {received['share']:.0%} of the CPU time its "
        "threads asked for (the track asks for at least 90%)"
    ]
    # Scoring took longer on the wall clock than the deadline allows, and the deadline held.
    (scoring,) = record["model_scorings"]
    assert scoring["wall_s"] > TIGHT_SCORING_S and scoring["cpu_s"] / 2 < TIGHT_SCORING_S


RENAMES_ITSELF = """
import ctypes
import time


def train(ctx):
    # PR_SET_NAME: a thread name of bytes that are not UTF-8, with a parenthesis and a state letter
    # in it, read by the evaluator as it counts the jail's runnable threads.
    ctypes.CDLL(None).prctl(15, ctypes.c_char_p(b"\\xff\\xfe) R (x"), 0, 0, 0)
    end = time.monotonic() + 2
    while time.monotonic() < end:
        pass
    ctx.log(1, loss=1.0, tokens=1000)
    return TinyCausal(ctx.vocab_size)
"""


@pytest.mark.slow
def test_a_thread_named_with_any_bytes_is_counted_and_fails_nothing(tmp_path, runs_dir, capsys, nsjail):
    folder = write_submission(tmp_path, "renames-itself", RENAMES_ITSELF)
    code, record = run_cli(folder, runs_dir, "--budget", "6", "--sandbox", "nsjail", capsys=capsys)
    assert (code, record["status"]) == (0, "ok"), record["message"]
    received = record["train"]["received"]
    assert received["demand_s"] >= 1.5 and received["share"] >= 0.5


SLEEPS = """
import time


class Sleeps(TinyCausal):
    def decoder(self, rows):
        return _SleepingDecoder(self)


class _SleepingDecoder(_NewestTokenDecoder):
    def step(self, tokens):
        time.sleep(3600)


def train(ctx):
    ctx.log(1, loss=1.0, tokens=1000)
    return Sleeps(ctx.vocab_size)
"""


@pytest.mark.slow
def test_on_a_busy_host_a_model_that_waits_still_meets_the_wall_clock_backstop(
    tmp_path, runs_dir, capsys, nsjail, burners, cpu_track_variant
):
    """The backstop does not count time the host kept the jail from a CPU; a sleeping thread asks for
    none, so a model cannot hide its waiting behind the host's load."""
    track = cpu_track_variant("short-steps", lambda text: text.replace("step_s = 5 ", "step_s = 1 "))
    folder = write_submission(tmp_path, "sleeps", SLEEPS)
    code, record = run_cli(folder, runs_dir, "--track", track, "--budget", "3", "--sandbox", "nsjail", capsys=capsys)
    assert (code, record["status"]) == (1, "invalid_model")
    assert record["message"].startswith("the final model (taken at ")
    assert (
        "a scoring step took longer than the track's 1 s of wall time x 4, not counting the host's" in record["message"]
    )
    (scoring,) = record["model_scorings"]
    assert 4 <= scoring["wall_s"] < 16


def test_the_closing_summary_fits_an_80_column_terminal(tmp_path):
    run_dir = make_run(tmp_path, "run-1", submission="a-submission-with-a-rather-long-name", official=False)
    result = json.loads((run_dir / "result.json").read_text())
    result["unofficial_reasons"] += [
        "the host was busy: the training jail got 41% of the CPU time its threads asked for "
        "(the track asks for at least 90%)",
        "development result: " + "a very long reason " * 12,
    ]
    lines = summary_lines(result)
    assert all(len(line) <= 80 for line in lines), lines
    text = " ".join(line.strip() for line in lines)
    assert "got 97% of the CPU it asked for" in text and "1,000,000 tokens" in text and "got 41% of the" in text
    assert lines[0].startswith("a-submission-with-a-rather-long-name seed 0: ok  val_loss ")


PINS_ITSELF = """
import os

def train(ctx):
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        pinned = True
    except PermissionError:
        pinned = False
    ctx.log(1, loss=1.0, tokens=2000 if pinned else 1000)
    return TinyCausal(ctx.vocab_size)
"""


@pytest.mark.slow
def test_a_training_jail_cannot_pin_its_threads_to_pass_for_a_busy_host(tmp_path, runs_dir, capsys, nsjail):
    """Pinned to one CPU, two threads would ask for two and get one: a run that looks as if the host
    were busy, unofficial by the submission's choice (a re-roll). seccomp refuses sched_setaffinity."""
    folder = write_submission(tmp_path, "pins-itself", PINS_ITSELF)
    code, record = run_cli(folder, runs_dir, "--budget", "5", "--sandbox", "nsjail", capsys=capsys)
    assert code == 0, record["message"]
    assert record["train"]["tokens"] == 1000

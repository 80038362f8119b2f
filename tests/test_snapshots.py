"""Snapshots on the evaluator's clock, the validation curve and time-to-target tracks, end to end with
the real nsjail: what a submission that controls everything in its jail can and cannot do to them."""

from __future__ import annotations

import json
import math
import re

import pyarrow.parquet as pq
import pytest
from conftest import leftovers, run_cli, write_submission

from evaluator.cli import main

# The slow tier (`make test-fast` leaves it out): every test here runs an evaluation.
pytestmark = pytest.mark.slow

UNIFORM_LOSS = round(math.log(8192), 4)  # a zero head: uniform logits over the 8,192-token vocabulary

# Helpers every submission below uses: the harness's own protocol channel (a submission can always
# reach it: it runs in the same process) and where the harness saves snapshots.
JAIL_TOOLS = """
import gc
import json
import sys
import time

import torch


def harness_channel():
    return next(o for o in gc.get_objects() if type(o).__name__ == "_Channel")


def jail_out():
    return json.load(open(sys.argv[sys.argv.index("--job") + 1]))["out_dir"]


def make_worse(model):
    with torch.no_grad():
        torch.nn.init.normal_(model.head.weight, std=4.0)
"""


@pytest.fixture
def snapshot_track(cpu_track_variant):
    """cpu-1min with a snapshot every 2 s and, when asked, a target: an extra track for this test."""

    def make(track_id: str, target: float | None = None) -> str:
        def edit(text: str) -> str:
            text, count = re.subn(r"(?m)^snapshot_every_s = .*$", "snapshot_every_s = 2", text)
            assert count == 1
            if target is not None:
                text += f'\n[target]\nval_loss = {target}\nprovisional = true\nprovenance = "a test"\n'
            return text

        return cpu_track_variant(track_id, edit)

    return make


def _logged(runs_dir, record: dict) -> dict[str, float]:
    """What the submission logged, by key (the last value of each)."""
    rows = pq.read_table(runs_dir / record["run_id"] / "metrics.parquet").to_pylist()
    return {row["key"]: row["value"] for row in rows}


def _points(record: dict, model: str = "snapshot") -> list[dict]:
    return [point for point in record["val_curve"] if point["model"] == model]


def test_snapshots_are_stamped_on_the_evaluators_clock_frozen_and_scored_like_the_final_model(
    tmp_path, runs_dir, capsys, snapshot_track
):
    """The first snapshot is the uniform model; right after it the submission makes its model worse,
    writes that over the snapshot file, forges an early snapshot and a val_loss of its own. None of it
    reaches the curve: the evaluator's copy is the uniform model, stamped by its clock. The second
    snapshot cannot be scored: a gap in the curve, and no later snapshot is scored."""
    body = (
        JAIL_TOOLS
        + """
class Breakable(TinyCausal):
    def decoder(self, rows):
        if getattr(self, "broken", False):
            raise RuntimeError("this snapshot cannot be scored")
        return super().decoder(rows)


def train(ctx):
    model = Breakable(ctx.vocab_size)
    assert ctx.snapshot_every_s == 2 and not ctx.snapshot_due()
    assert ctx.snapshot(model) is False  # not due: nothing is sent
    channel = harness_channel()
    torch.save(model, jail_out() + "/snapshot.pt")
    channel.send("snapshot", bytes=1, save_s=0.0)  # forged: nothing is due yet
    early = channel.answer()
    taken = []
    while ctx.time_left() > 1.5:
        if ctx.snapshot_due():
            model.broken = len(taken) == 1
            taken.append(ctx.snapshot(model))
            model.broken = False
            if len(taken) == 1:
                make_worse(model)
                torch.save(model, jail_out() + "/snapshot.pt")  # too late: the copy is taken
                again_at = 8.5 - ctx.time_left()
                channel.send("snapshot", bytes=1, save_s=0.0)  # forged again, in the same interval
                again = channel.answer()
        time.sleep(0.01)
    ctx.log(1, val_loss=0.0, early_taken=float(early["taken"]), again_taken=float(again["taken"]), again_at=again_at,
            taken=float(sum(taken)), offered=float(len(taken)))
    return model
"""
    )
    folder = write_submission(tmp_path, "snapshots", body)
    track = snapshot_track("cpu-snapshots")
    code, record = run_cli(
        folder, runs_dir, "--track", track, "--smoke", "--budget", "8.5", "--sandbox", "nsjail", capsys=capsys
    )
    assert (code, record["status"]) == (0, "ok"), record["message"]
    logged = _logged(runs_dir, record)
    assert logged["early_taken"] == 0.0
    # Forged in the first snapshot's interval, it is refused; a machine stalled past the next due
    # time (4 s) would make it the next interval's, rightly taken.
    assert logged["again_taken"] == 0.0 or logged["again_at"] >= 3.9, logged
    assert logged["taken"] == logged["offered"] == 3

    snapshots = _points(record)
    assert len(snapshots) == logged["taken"]
    for number, point in enumerate(snapshots, 1):  # one per interval, stamped no earlier than its window's end
        assert 2 * number + 0.5 <= point["time_s"] < 2 * number + 1.5
    assert [point["scored"] for point in record["val_curve"]] == ["ok", "invalid_model", "skipped", "ok"]
    assert snapshots[0]["val_loss"] == UNIFORM_LOSS  # the model as it was when it was taken
    assert [point["val_loss"] for point in snapshots[1:]] == [None, None]
    (final,) = _points(record, "final")
    assert final["val_loss"] == record["metrics"]["val_loss"] > UNIFORM_LOSS + 1  # the score: the final model
    assert final["time_s"] == round(record["train"]["train_seconds"], 2)
    assert record["track"]["snapshot_every_s"] == 2 and record["target"] is None
    assert all(point["val_loss"] != 0.0 for point in record["val_curve"])  # ctx.log cannot write the curve
    run_dir = runs_dir / record["run_id"]
    assert not (run_dir / "snapshots").exists()  # scored, then removed; the final model.pt stays
    timings = json.loads((run_dir / "timings.json").read_text())
    assert len(timings["snapshot_take_s"]) == len(snapshots)
    assert leftovers(record["run_id"], run_dir) == []


def test_a_submission_cannot_choose_the_moment_of_its_snapshots(tmp_path, runs_dir, capsys, snapshot_track):
    """Past its window (a quarter of the interval after it fell due) an interval's snapshot is refused
    and the interval has none; inside it, the stamp is the window's end wherever the offer came: a
    submission that waits for its crossing of a target gains nothing by it."""
    body = (
        JAIL_TOOLS
        + """
def offer_at(ctx, channel, model, at_s):
    while ctx.elapsed() < at_s:
        time.sleep(0.005)
    torch.save(model, jail_out() + "/snapshot.pt")
    channel.send("snapshot", bytes=1, save_s=0.0)  # straight to the evaluator, whatever snapshot_due() says
    return channel.answer()


def train(ctx):
    model, channel = TinyCausal(ctx.vocab_size), harness_channel()
    late = offer_at(ctx, channel, model, 2.9)  # due at 2 s, its window ended at 2.5 s
    chosen = offer_at(ctx, channel, model, 4.1)  # due at 4 s, inside the window
    again = offer_at(ctx, channel, model, 4.3)  # the same interval once more
    ctx.log(1, late=float(late["taken"]), late_next=late["next_due_s"], chosen=float(chosen["taken"]),
            again=float(again["taken"]))
    while ctx.elapsed() < 5.5:  # past the window's end: a snapshot is never later than the final model
        time.sleep(0.01)
    return model
"""
    )
    folder = write_submission(tmp_path, "chooser", body)
    track = snapshot_track("cpu-snapshots")
    code, record = run_cli(
        folder, runs_dir, "--track", track, "--smoke", "--budget", "8", "--sandbox", "nsjail", capsys=capsys
    )
    assert (code, record["status"]) == (0, "ok"), record["message"]
    logged = _logged(runs_dir, record)
    assert (logged["late"], logged["late_next"], logged["chosen"], logged["again"]) == (0.0, 4.0, 1.0, 0.0)
    [snapshot] = _points(record)
    assert 4.5 <= snapshot["time_s"] < 5.0  # the window's end, not 4.1 s plus the copy


def test_a_snapshot_file_that_is_a_directory_or_sparse_is_refused_and_the_run_goes_on(
    tmp_path, runs_dir, capsys, snapshot_track
):
    """What the jail leaves as snapshot.pt when it sends the line itself: a directory (which the
    host cannot remove), then a sparse 100 MiB file (free for the jail, a real 100 MiB for the
    host's disk). Both are refused, neither ends the run, and a real snapshot is taken after them."""
    body = (
        JAIL_TOOLS
        + """
import os


def train(ctx):
    model = TinyCausal(ctx.vocab_size)
    channel = harness_channel()
    path = jail_out() + "/snapshot.pt"
    while not ctx.snapshot_due():
        time.sleep(0.01)
    os.mkdir(path)
    channel.send("snapshot", bytes=1, save_s=0.0)
    directory = channel.answer()
    os.rmdir(path)
    with open(path, "wb") as sparse:
        sparse.truncate(100 * 2**20)
    channel.send("snapshot", bytes=1, save_s=0.0)
    hollow = channel.answer()
    taken = ctx.snapshot(model)
    ctx.log(1, directory=float(directory["taken"]), sparse=float(hollow["taken"]), taken=float(taken))
    while ctx.elapsed() < 3.0:  # past the snapshot's window: a snapshot later than the final model is left out
        time.sleep(0.01)
    return model
"""
    )
    folder = write_submission(tmp_path, "odd-snapshot-files", body)
    track = snapshot_track("cpu-snapshots")
    code, record = run_cli(
        folder, runs_dir, "--track", track, "--smoke", "--budget", "5", "--sandbox", "nsjail", capsys=capsys
    )
    assert (code, record["status"]) == (0, "ok"), record["message"]
    logged = _logged(runs_dir, record)
    assert (logged["directory"], logged["sparse"], logged["taken"]) == (0.0, 0.0, 1.0)
    (snapshot,) = _points(record)
    assert 2 <= snapshot["time_s"] < 4 and (snapshot["scored"], snapshot["val_loss"]) == ("ok", UNIFORM_LOSS)


def test_a_refused_snapshot_leaves_room_for_the_next_save_in_a_tmpfs_of_one_model(
    tmp_path, runs_dir, capsys, cpu_track_variant
):
    """The output dir holds one model (4 MiB here). A snapshot the evaluator refused, as one sent a
    moment before it was due on its clock is, stays there; the next snapshot and the final model
    must still fit. A 2.6 MB model, refused once, then taken, then returned."""
    body = (
        JAIL_TOOLS
        + """
def train(ctx):
    model = TinyCausal(ctx.vocab_size, width=40)
    torch.save(model, jail_out() + "/snapshot.pt")
    channel = harness_channel()
    channel.send("snapshot", bytes=1, save_s=0.0)
    refused = channel.answer()
    while not ctx.snapshot_due():
        time.sleep(0.01)
    ctx.log(1, refused_taken=float(refused["taken"]), taken=float(ctx.snapshot(model)))
    while ctx.elapsed() < 3.0:  # past the snapshot's window: a snapshot later than the final model is left out
        time.sleep(0.01)
    return model
"""
    )
    folder = write_submission(tmp_path, "refused-then-taken", body)
    track = cpu_track_variant(
        "cpu-one-small-model",
        lambda text: re.sub(
            r"(?m)^snapshot_every_s = .*$",
            "snapshot_every_s = 2",
            re.sub(r"(?m)^model_mib = \d+", "model_mib = 4", text),
        ),
    )
    code, record = run_cli(
        folder, runs_dir, "--track", track, "--smoke", "--budget", "5", "--sandbox", "nsjail", capsys=capsys
    )
    assert (code, record["status"]) == (0, "ok"), record["message"]
    assert (_logged(runs_dir, record)["refused_taken"], _logged(runs_dir, record)["taken"]) == (0.0, 1.0)
    assert [point["model"] for point in record["val_curve"]] == ["snapshot", "final"]


TARGET_BODY = (
    JAIL_TOOLS
    + """
def train(ctx):
    model = TinyCausal(ctx.vocab_size)
    make_worse(model)
    snapshots = 0
    while ctx.time_left() > 1.5:
        if ctx.snapshot_due() and ctx.snapshot(model):
            snapshots += 1
            if snapshots == 1 and ctx.config["reach"]:
                torch.nn.init.zeros_(model.head.weight)  # from the second snapshot on: at the target
        time.sleep(0.01)
    return model
"""
)


def test_time_to_target_is_the_time_of_the_first_model_at_the_target(tmp_path, runs_dir, capsys, snapshot_track):
    folder = write_submission(tmp_path, "reaches", TARGET_BODY, config={"reach": True})
    track = snapshot_track("cpu-snapshot-target", target=UNIFORM_LOSS + 0.5)
    code, record = run_cli(
        folder, runs_dir, "--track", track, "--smoke", "--budget", "7.5", "--sandbox", "nsjail", capsys=capsys
    )
    assert (code, record["status"]) == (0, "ok"), record["message"]
    first, second, *rest = record["val_curve"]
    assert first["scored"] == "ok" and first["val_loss"] > UNIFORM_LOSS + 1
    assert (second["model"], second["scored"], second["val_loss"]) == ("snapshot", "ok", UNIFORM_LOSS)
    assert record["target"] == {
        "val_loss": UNIFORM_LOSS + 0.5,
        "provisional": True,
        "reached": True,
        "time_s": second["time_s"],
    }
    # Scoring stops at the first model that reaches the target; its scores are the run's.
    assert rest and all((point["scored"], point["val_loss"]) == ("not_needed", None) for point in rest)
    assert rest[-1]["model"] == "final"
    assert record["metrics"]["val_loss"] == UNIFORM_LOSS


def test_a_run_that_never_reaches_the_target_is_not_reached_and_cannot_stall_the_clock(
    tmp_path, runs_dir, capsys, snapshot_track
):
    """It also floods the evaluator with forged snapshots and never reads an answer: the answers
    are dropped, the clock goes on, and the run ends as not_reached, exit 1."""
    body = TARGET_BODY.replace(
        "    snapshots = 0\n",
        """    snapshots = 0
    channel = harness_channel()
    for _ in range(20_000):
        channel.send("snapshot", bytes=1, save_s=0.0)
""",
    )
    folder = write_submission(tmp_path, "never-reaches", body, config={"reach": False})
    track = snapshot_track("cpu-snapshot-target", target=UNIFORM_LOSS + 0.5)
    code, record = run_cli(
        folder, runs_dir, "--track", track, "--smoke", "--budget", "5", "--sandbox", "nsjail", capsys=capsys
    )
    assert (code, record["status"]) == (1, "not_reached"), record["message"]
    assert record["target"] == {"val_loss": UNIFORM_LOSS + 0.5, "provisional": True, "reached": False, "time_s": None}
    assert record["message"].startswith(f"no model reached the target val_loss {UNIFORM_LOSS + 0.5:g}")
    assert record["val_curve"][-1]["model"] == "final"
    assert all(point["scored"] == "ok" and point["val_loss"] > UNIFORM_LOSS + 1 for point in record["val_curve"])
    assert record["metrics"]["val_loss"] == record["val_curve"][-1]["val_loss"]
    assert record["train"]["train_seconds"] <= 5


def test_the_not_reached_exit_code_is_documented(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "1 the run failed through the submission's fault, or reached no target (not_reached)" in " ".join(
        capsys.readouterr().out.split()
    )

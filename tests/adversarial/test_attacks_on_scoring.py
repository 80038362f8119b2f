"""Attacks by the returned model on the evaluator's scoring, through `evaluator run` with the real
nsjail: code run by unpickling and by forward() stays in the scoring jail, a model that reads later
tokens gains nothing from it, nothing the model prints or raises leaves the jail, and a model that
trains while it is loaded is stopped by the deadlines. tests/test_scoring.py covers the model
server's protocol and each kind of broken model directly.
"""

from __future__ import annotations

import json
import math
import re
import socket
import time
import uuid

import pytest
from adversarial_support import STARTUP_SLACK_S, attack_submission, leftovers
from conftest import run_cli

from evaluator.dataset.loader import read_documents
from evaluator.dataset.store import resolve_data_file
from evaluator.sandbox import JAIL_HOSTNAME, NOBODY
from evaluator.scoring import Refusal
from evaluator.tracks import load_track

TRACK = load_track("cpu-1min")
UNIFORM = round(math.log(8192), 4)


# Every test here needs a working nsjail (the fixture is in conftest.py).
pytestmark = [pytest.mark.usefixtures("nsjail"), pytest.mark.slow]  # and the slow tier (`make test-fast` leaves it out)


def test_code_in_the_pickle_and_in_forward_runs_only_in_the_scoring_jail(disk_dir, capsys):
    runs_dir = disk_dir / "runs"
    marker = disk_dir / f"ran-on-the-host-{uuid.uuid4().hex}"
    canary = disk_dir / "canary.txt"
    canary.write_text("secret")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        config = {
            "marker": str(marker),
            "val_path": str(resolve_data_file(TRACK, "val")),
            "train_path": str(resolve_data_file(TRACK, "train")),
            "canary": str(canary),
            "tcp_port": listener.getsockname()[1],
        }
        folder = attack_submission(disk_dir, "snooping-model", "snooping_model", config)
        code, record = run_cli(
            folder, runs_dir, "--budget", "10", "--smoke", "--sandbox", "nsjail", "--debug-scoring", capsys=capsys
        )
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert (code, record["status"]) == (0, "ok"), record["message"]
    assert record["metrics"]["val_loss"] == UNIFORM
    assert not marker.exists() and not marker.with_name(marker.name + ".shell").exists()
    run_dir = runs_dir / record["run_id"]
    logs = "".join(path.read_text() for path in sorted(run_dir.glob("scoring-pass-*.log")))
    snooped = [json.loads(line) for line in re.findall(r"^SNOOPED (.*)$", logs, re.MULTILINE)]
    stages = [found.pop("stage") for found in snooped]
    # Every batch process of both passes unpickled the model and ran a forward.
    batches = 2 * math.ceil(record["metrics"]["val_documents"] / TRACK.eval.batch_size)
    assert stages.count("unpickle") == stages.count("forward") == batches
    for found in snooped:
        assert found.pop("uid") == NOBODY and found.pop("hostname") == JAIL_HOSTNAME
        assert found.pop("pid") > 1  # a batch process, never the server
        assert found.pop("shell_host_marker") != 0
        assert "allowed" not in found.values() and not any(str(v).startswith("read") for v in found.values()), found
    assert "the model server's output was kept (--debug-scoring)" in record["unofficial_reasons"]
    assert leftovers(record["run_id"], run_dir) == []


@pytest.mark.parametrize("body", ["peeking_model", "two_faced_model"])
def test_a_model_that_reads_later_tokens_finds_none(tmp_path, runs_dir, capsys, body):
    """Both would read tokens after the position they predict if they were there: streamed, they
    see only the prefix, so what they do is causal and scored as such."""
    folder = attack_submission(tmp_path, body.replace("_", "-"), body)
    code, record = run_cli(folder, runs_dir, "--budget", "5", "--smoke", "--sandbox", "nsjail", capsys=capsys)
    assert (code, record["status"]) == (0, "ok"), record["message"]
    if body == "peeking_model":  # its extra counts land only where a later token exists: never
        assert record["metrics"]["val_loss"] == UNIFORM
    assert leftovers(record["run_id"], runs_dir / record["run_id"]) == []


def test_nothing_the_model_prints_or_raises_leaves_the_scoring_jail(disk_dir, capsys):
    runs_dir = disk_dir / "runs"
    folder = attack_submission(disk_dir, "leaky-model", "leaky_model")
    code, record = run_cli(folder, runs_dir, "--budget", "5", "--sandbox", "nsjail", capsys=capsys)
    assert (code, record["status"]) == (1, "invalid_model")
    assert re.fullmatch(
        r"the final model \(taken at [\d.]+ s, on the public split\): " + re.escape(Refusal.STEP_FAILED),
        record["message"],
    ), record["message"]
    run_dir = runs_dir / record["run_id"]
    # What the model printed: the marker, then the token ids it was given, e.g. "0 417 23 ...".
    openings = [
        " ".join(map(str, [0, *document.tokens[:5]])) for document in read_documents(resolve_data_file(TRACK, "val"))
    ]
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    assert files
    for path in files:
        content = path.read_bytes()
        assert b"LEAK" not in content and not [o for o in openings if o.encode() in content], path
    printed = capsys.readouterr()
    shown = printed.out + printed.err + json.dumps(record)
    assert "LEAK" not in shown and not [opening for opening in openings if opening in shown]
    assert leftovers(record["run_id"], run_dir) == []


def test_a_model_that_trains_while_it_is_loaded_is_stopped(tmp_path, runs_dir, capsys):
    folder = attack_submission(tmp_path, "trains-after-the-clock", "trains_after_the_clock")
    began = time.monotonic()
    code, record = run_cli(folder, runs_dir, "--budget", "5", "--sandbox", "nsjail", capsys=capsys)
    # The deadline counts CPU time over the jail's threads: one busy thread runs out of it in
    # load_s x threads seconds, having computed no more than all the threads could in load_s.
    assert time.monotonic() - began < 5 + TRACK.eval.load_s * TRACK.device.threads + STARTUP_SLACK_S
    assert (code, record["status"]) == (1, "invalid_model")
    # It names the model, the stage and what it used of the deadline, counted in CPU time.
    assert re.fullmatch(
        r"the final model \(taken at [\d.]+ s, on the public split\): "
        + re.escape(Refusal.LOAD_TIMEOUT.format(seconds=TRACK.eval.load_s))
        + r" of CPU time per thread \(it used \d+ s\)",
        record["message"],
    ), record["message"]
    assert record["train"]["train_seconds"] < 5
    assert leftovers(record["run_id"], runs_dir / record["run_id"]) == []

"""Attacks by the returned model on the evaluator's scoring, through `evaluator run` with the real
nsjail: code run by unpickling and by forward() must stay in the scoring jail, and models that read
later tokens, even at a few positions or only after their first batch, are `invalid_model`.
tests/test_scoring.py covers the model server's protocol and each kind of broken model directly.
"""

from __future__ import annotations

import json
import math
import re
import socket
import time
import uuid

import pytest

from adversarial_support import STARTUP_SLACK_S, attack_submission, disk_dir, leftovers  # noqa: F401 (disk_dir: a fixture)
from conftest import run_cli
from evaluator.dataset.store import resolve_data_file
from evaluator.sandbox import JAIL_HOSTNAME, NOBODY
from evaluator.tracks import load_track

TRACK = load_track("cpu-1min")


# Every test here needs a working nsjail (the fixture is in conftest.py).
pytestmark = pytest.mark.usefixtures("nsjail")


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
        code, record = run_cli(folder, runs_dir, "--budget", "10", "--sandbox", "nsjail", capsys=capsys)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert (code, record["status"]) == (0, "ok"), record["message"]
    assert record["metrics"]["val_loss"] == pytest.approx(math.log(8192), abs=1e-5)
    assert not marker.exists() and not marker.with_name(marker.name + ".shell").exists()
    run_dir = runs_dir / record["run_id"]
    logs = "".join(path.read_text() for path in sorted((run_dir / "sandbox").rglob("server.log")))
    snooped = [json.loads(line) for line in re.findall(r"^SNOOPED (.*)$", logs, re.MULTILINE)]
    # Each of the two model servers (main pass, audit) unpickled the model and ran a forward.
    assert sorted(found.pop("stage") for found in snooped) == ["forward", "forward", "unpickle", "unpickle"]
    for found in snooped:
        assert (found.pop("uid"), found.pop("pid"), found.pop("hostname")) == (NOBODY, 1, JAIL_HOSTNAME)
        assert found.pop("shell_host_marker") != 0
        assert "allowed" not in found.values() and not any(str(v).startswith("read") for v in found.values()), found
    assert leftovers(record["run_id"], run_dir) == []


@pytest.mark.parametrize("body", ["peeking_model", "two_faced_model"])
def test_a_model_that_reads_later_tokens_only_sometimes_is_invalid(tmp_path, runs_dir, capsys, body):
    folder = attack_submission(tmp_path, body.replace("_", "-"), body)
    began = time.monotonic()
    code, record = run_cli(folder, runs_dir, "--budget", "10", "--sandbox", "nsjail", capsys=capsys)
    assert time.monotonic() - began < 10 + STARTUP_SLACK_S
    assert (code, record["status"]) == (1, "invalid_model"), record["message"]
    assert record["message"].startswith("causality audit failed"), record["message"]
    assert record["metrics"] is None
    assert leftovers(record["run_id"], runs_dir / record["run_id"]) == []

"""Attacks from inside the training jail, each run through `evaluator run` with the real nsjail on the
CPU track: each must fail, end the run with the right status in bounded time, and leave the host as
it was. tests/test_run.py already covers the clock (busy loops, patched clocks, slow imports), the
memory and fork bombs and a first isolation probe; these go further.

Safety: the destructive attacks (kill(-1), bombs, writes to system paths) run only after the harmless
`snoop` probe has shown that `--sandbox nsjail` really jails (pid 1, its hostname, nobody, no repo);
otherwise they fail. Each destructive submission checks the same itself before acting.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from adversarial_support import (
    STARTUP_SLACK_S,
    attack_submission,
    finish,
    leftovers,
    probe_report,
    processes_with,
    start_evaluator,
)
from conftest import missing, run_cli, write_submission

from evaluator.dataset.store import resolve_data_file
from evaluator.fsutil import sha256_file, tree_sha256
from evaluator.paths import HOME
from evaluator.results import result_problems
from evaluator.sandbox import JAIL_HOSTNAME, NOBODY, SHM_BYTES, TMP_BYTES, JailSpec, SandboxUnavailable, open_sandbox
from evaluator.tracks import load_track

# The slow tier (`make test-fast` leaves it out): every test here runs an evaluation.
pytestmark = pytest.mark.slow

TRACK = load_track("cpu-1min")
SIGNING_KEY = HOME / "results" / "demo-key" / "demo-not-secret.key"
REFUSED = {"EACCES", "ENOENT", "EPERM", "EROFS"}


def _mib(key: str) -> int:
    return getattr(TRACK.sandbox, key) << 20


@pytest.fixture(scope="module")
def snoop(nsjail, tmp_path_factory):
    """One harmless probe run: it reads, connects and lists everything it can, then reports.

    The evaluator runs as its own process with a marker in its environment and a canary file open
    on an inheritable descriptor, as an operator's shell might leave them.
    """
    tmp_path = tmp_path_factory.mktemp("snoop")
    token = uuid.uuid4().hex
    canary_text = f"canary-text-{token}"
    repo_canary = HOME / f"canary-{token}.txt"
    tmp_canary = Path("/tmp") / f"canary-{token}.txt"
    unix_path = tmp_path / "host.sock"
    with (
        socket.socket() as tcp,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
        socket.socket(socket.AF_UNIX) as unix,
    ):
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        tcp.setblocking(False)
        udp.bind(("127.0.0.1", 0))
        udp.setblocking(False)
        unix.bind(str(unix_path))
        unix.listen()
        unix.setblocking(False)
        config = {
            "tcp_port": tcp.getsockname()[1],
            "udp_port": udp.getsockname()[1],
            "unix_socket": str(unix_path),
            "val_path": str(resolve_data_file(TRACK, "val")),
            "tokenizer_path": str(resolve_data_file(TRACK, "tokenizer")),
            "repo_canary": str(repo_canary),
            "tmp_canary": str(tmp_canary),
            "signing_key": str(SIGNING_KEY),
            "host_pid": os.getpid(),
            "env_marker": f"marker-{token}",
            "canary_text": canary_text,
            "canary_token": token,
            "repo_root": str(HOME),
        }
        folder = attack_submission(tmp_path, "snoop", "snoop", config)
        for canary in (repo_canary, tmp_canary):
            canary.write_text(canary_text)
        leaked_fd = os.open(tmp_canary, os.O_RDONLY)
        try:
            env = {**os.environ, "SPEEDRUN_ADVERSARIAL_MARKER": config["env_marker"]}
            evaluator = start_evaluator(folder, tmp_path / "runs", "--budget", "30", env=env, pass_fds=(leaked_fd,))
            record = finish(evaluator, timeout=30 + STARTUP_SLACK_S)
        finally:
            os.close(leaked_fd)
            repo_canary.unlink()
            tmp_canary.unlink()
        received = []
        for name, receive in (("tcp", tcp.accept), ("unix", unix.accept), ("udp", lambda: udp.recv(64))):
            try:
                receive()
                received.append(name)
            except BlockingIOError:
                pass
    assert record["status"] == "crashed", record["message"]
    return {"record": record, "report": probe_report(tmp_path / "runs" / record["run_id"]), "received": received}


@pytest.fixture(scope="module")
def confirmed_jail(snoop):
    """Fails (never skips) every destructive test unless the harmless probe ran inside nsjail's jail."""
    identity = snoop["report"]["identity"]
    expected = {"pid": 1, "hostname": JAIL_HOSTNAME, "uid": NOBODY, "tracks_dir_visible": False}
    seen = {key: identity[key] for key in expected}
    if seen != expected or snoop["record"]["environment"]["sandbox"]["kind"] != "nsjail":
        pytest.fail(f"runs are not jailed ({seen}): refusing to run destructive attacks on this machine")


def test_a_snooping_submission_reaches_no_network_no_secrets_and_no_host_process(snoop):
    report = snoop["report"]
    assert snoop["received"] == [], "a host socket received something from the jail"
    network = report["network"]
    assert network.pop("udp_host_socket") == "allowed"  # into the jail's own loopback: nobody listens
    assert network["dns"] == "gaierror"
    assert "allowed" not in network.values(), network
    assert {name: result for name, result in report["reads"].items() if result not in REFUSED} == {}
    assert report["environment_has_marker"] is False
    assert "SPEEDRUN_ADVERSARIAL_MARKER" not in report["environment_keys"]
    processes = report["processes"]
    assert len(processes) <= 2 and all("evaluator.harness" in p["cmdline"] for p in processes.values()), processes
    assert not any(p["environ_has_marker"] for p in processes.values())
    assert not any(fd["holds_canary"] or "canary" in fd["target"] for fd in report["fds"].values()), report["fds"]
    assert report["stdin"]["isatty"] is False and report["stdin"]["read"] in ("EAGAIN", "read 0 bytes")


def test_searching_the_filesystem_finds_no_data_keys_sockets_or_canaries(snoop):
    found = snoop["report"]["filesystem"]
    val_sha256 = TRACK.dataset.val.sha256
    assert str(resolve_data_file(TRACK, "val")) not in found["parquet"]
    assert val_sha256 not in found["parquet"].values()
    assert sha256_file(SIGNING_KEY) not in found["key"].values()
    assert found["sockets"] == [] and found["canaries"] == []
    # Nothing of the repository but the venv: not spec/, not the evaluator package (the jail runs
    # copies of its in-jail modules), not the training split (the jail reads a copy of it).
    assert found["repo"] == [], found["repo"]
    report = snoop["report"]
    assert report["evaluator_modules"] == [
        "evaluator",
        "evaluator.api",
        "evaluator.dataset",
        "evaluator.dataset.loader",
        "evaluator.errors",
        "evaluator.job",
    ]
    assert report["host_module_import"].startswith("ModuleNotFoundError"), report["host_module_import"]


def test_writes_outside_the_output_and_escapes_fail(confirmed_jail, disk_dir, capsys):
    token = f"escape-{uuid.uuid4().hex}"
    runs_dir = disk_dir / "runs"
    # Outside the jail's pid namespace, owned by the jail's own uid: what kill(-1) would reach.
    sentinel = subprocess.Popen(["/bin/sleep", "300"], user=NOBODY, group=NOBODY)
    try:
        config = {
            "token": token,
            "repo_root": str(HOME),
            "sentinel_pid": sentinel.pid,
        }
        folder = attack_submission(
            disk_dir, "escape", "escape", {**config, "submission_folder": str(disk_dir / "escape")}
        )
        folder_hash = tree_sha256(folder)
        began = time.monotonic()
        code, record = run_cli(folder, runs_dir, "--budget", "20", "--sandbox", "nsjail", capsys=capsys)
        assert time.monotonic() - began < 20 + STARTUP_SLACK_S
        assert sentinel.poll() is None, "kill(-1) in the jail reached a host process"
    finally:
        sentinel.kill()
        sentinel.wait()
    assert (code, record["status"]) == (1, "crashed"), record["message"]
    run_dir = runs_dir / record["run_id"]
    report = probe_report(run_dir)
    writes = report["writes"]
    assert writes.pop("hard_link_into_output") == "EXDEV"
    if HOME.is_relative_to("/tmp"):
        # A checkout under /tmp lies inside the jail's private /tmp: a write to its path lands in
        # that tmpfs, never on the host, which the check of `written` below proves.
        writes.pop("repo")
    assert {name: result for name, result in writes.items() if result not in REFUSED} == {}
    assert report["jail_tmp"] == report["jail_shm"] == "allowed"  # the jail's own tmpfs
    escapes = report["escapes"]
    assert escapes.pop("signal_host_sentinel") == "ESRCH"
    assert {name: result for name, result in escapes.items() if result not in REFUSED} == {}
    assert report["kill_minus_one"] == "ESRCH"  # in its pid namespace, no process but itself
    written = [HOME, HOME / "results", Path("/usr"), Path("/tmp"), Path("/dev/shm"), run_dir, runs_dir, folder]
    assert [str(place / token) for place in written if (place / token).exists()] == []
    assert "escaped" not in (run_dir / "sandbox" / "nsjail.cfg").read_text()
    assert json.loads((run_dir / "result.json").read_text())["status"] == "crashed"
    assert tree_sha256(folder) == folder_hash
    assert leftovers(record["run_id"], run_dir) == []


def test_filling_every_writable_place_and_a_thread_bomb_hit_their_limits(confirmed_jail, tmp_path, runs_dir, capsys):
    folder = attack_submission(tmp_path, "fill", "fill")
    began = time.monotonic()
    code, record = run_cli(folder, runs_dir, "--budget", "30", "--sandbox", "nsjail", capsys=capsys)
    assert time.monotonic() - began < 30 + STARTUP_SLACK_S
    assert record["status"] == "crashed", record["message"]
    run_dir = runs_dir / record["run_id"]
    report = probe_report(run_dir)
    for place, cap in (("tmp", TMP_BYTES), ("shm", SHM_BYTES), ("scratch", _mib("scratch_mib"))):
        assert cap - (1 << 20) < report[place]["bytes"] <= cap and report[place]["stopped_by"] == "ENOSPC", place
    # The output directory holds at most one model of the track's size, in few files.
    first, second = report["output_two_files"]
    assert first["bytes"] <= _mib("model_mib") and first["stopped_by"] in ("ENOSPC", "EFBIG"), first
    assert first["bytes"] + second["bytes"] <= _mib("model_mib") and second["stopped_by"] == "ENOSPC", second
    assert report["output_sparse_8_gib"] == "EFBIG"
    assert report["output_many_files"]["files"] < 100 and report["output_many_files"]["stopped_by"] == "ENOSPC"
    assert report["threads"]["threads"] < TRACK.sandbox.pids and report["threads"]["stopped_by"] == "RuntimeError"
    assert not (run_dir / "jail-out").exists()
    assert sum(path.stat().st_size for path in run_dir.rglob("*") if path.is_file()) < 16 << 20
    assert leftovers(record["run_id"], run_dir) == []


def test_floods_of_output_are_capped_and_a_daemon_dies_with_the_run(confirmed_jail, tmp_path, runs_dir, capsys):
    marker = f"daemon-{uuid.uuid4().hex}"
    folder = attack_submission(tmp_path, "flood", "flood", {"daemon_marker": marker})
    began = time.monotonic()
    code, record = run_cli(folder, runs_dir, "--budget", "40", "--sandbox", "nsjail", capsys=capsys)
    assert time.monotonic() - began < 40 + STARTUP_SLACK_S
    assert (code, record["status"]) == (0, "ok"), record["message"]
    assert record["metrics"]["val_loss"] == round(math.log(8192), 4)
    run_dir = runs_dir / record["run_id"]
    log = run_dir / "train.log"
    assert log.read_bytes().startswith(b"DAEMON STARTED\n")
    assert log.stat().st_size <= _mib("log_mib")
    rows = pq.read_metadata(run_dir / "metrics.parquet").num_rows
    assert 0 < rows <= 200_000, rows
    assert processes_with(marker) == []
    assert leftovers(record["run_id"], run_dir) == []


def _peak_rss_growth(action) -> tuple[object, int]:
    """(what action() returned, how far this process's resident memory rose above where it started
    while it ran, in bytes), sampled every 20 ms from /proc/self/status."""

    def rss() -> int:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    baseline, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss() - baseline)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        returned = action()
    finally:
        done.set()
        sampler.join()
    return returned, peak[0]


# The evaluator's own memory may grow this much, whatever a jail sends (docs/THREAT_MODEL.md).
HOST_GROWTH_BOUND_BYTES = 256 * 2**20


def test_a_fuzzed_protocol_is_refused_line_by_line_and_the_host_stays_bounded(
    confirmed_jail, tmp_path, runs_dir, capsys
):
    # An honest run first, unmeasured: what every run costs this process once (torch's import, the
    # sandbox's plans) is not what a jail's flood adds.
    honest = write_submission(tmp_path, "honest", "def train(ctx):\n    return TinyCausal(ctx.vocab_size)\n")
    assert run_cli(honest, runs_dir, "--budget", "5", "--smoke", "--sandbox", "nsjail", capsys=capsys)[0] == 0
    folder = attack_submission(tmp_path, "fuzz", "fuzz_protocol")
    (code, record), growth = _peak_rss_growth(
        lambda: run_cli(folder, runs_dir, "--budget", "40", "--sandbox", "nsjail", capsys=capsys)
    )
    assert (code, record["status"]) == (0, "ok"), record["message"]
    run_dir = runs_dir / record["run_id"]
    sent = int(re.search(r"FUZZ SENT (\d+)", (run_dir / "train.log").read_text()).group(1))
    assert record["train"]["refused_lines"] >= sent - 200  # the random lines may happen to be valid
    assert record["train"]["tokens"] == 1000 and record["train"]["tokens_per_s"] is not None
    assert pq.read_metadata(run_dir / "metrics.parquet").num_rows == 200_000
    assert result_problems(record) == []  # publishable: nothing non-finite, no lone surrogate
    print(f"host resident memory grew by {growth / 2**20:.0f} MiB at most")
    assert growth < HOST_GROWTH_BOUND_BYTES, growth


def test_ignoring_signals_and_leaving_a_daemon_still_ends_at_the_budget(confirmed_jail, tmp_path, runs_dir, capsys):
    marker = f"daemon-{uuid.uuid4().hex}"
    folder = attack_submission(tmp_path, "linger", "linger", {"daemon_marker": marker})
    began = time.monotonic()
    code, record = run_cli(folder, runs_dir, "--budget", "3", "--sandbox", "nsjail", capsys=capsys)
    assert time.monotonic() - began < 3 + STARTUP_SLACK_S
    assert (code, record["status"]) == (1, "over_budget"), record["message"]
    run_dir = runs_dir / record["run_id"]
    assert "DAEMON STARTED" in (run_dir / "train.log").read_text()
    assert processes_with(marker) == []
    assert leftovers(record["run_id"], run_dir) == []


@pytest.mark.parametrize("plant", ["symlink", "fifo"])
def test_a_link_or_fifo_in_place_of_the_model_is_invalid(nsjail, tmp_path, runs_dir, capsys, plant):
    config = {"plant": plant, "symlink_target": str(resolve_data_file(TRACK, "val"))}
    folder = attack_submission(tmp_path, f"plant-{plant}", "plant_model", config)
    began = time.monotonic()
    code, record = run_cli(folder, runs_dir, "--budget", "10", "--sandbox", "nsjail", capsys=capsys)
    assert time.monotonic() - began < 10 + STARTUP_SLACK_S
    assert (code, record["status"]) == (1, "invalid_model"), record["message"]
    assert "not a regular file" in record["message"]
    run_dir = runs_dir / record["run_id"]
    assert not (run_dir / "model.pt").exists()
    assert leftovers(record["run_id"], run_dir) == []


@pytest.mark.parametrize("box", ["nsjail", "none"])
def test_one_file_cannot_outgrow_the_jails_file_size_limit(tmp_path, box):
    # Without nsjail this limit (RLIMIT_FSIZE) is what holds on a single output file.
    try:
        sandbox = open_sandbox(box)
    except SandboxUnavailable as error:
        missing(f"nsjail cannot run here: {error}")
    writable = tmp_path / "out"
    writable.mkdir()
    target = writable / "big"
    code = (
        "import errno, os\n"
        f"fd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\n"
        "try:\n"
        "    while True:\n"
        "        os.write(fd, b'x' * (1 << 16))\n"
        "except OSError as error:\n"
        "    print(errno.errorcode[error.errno])\n"
    )
    spec = JailSpec(
        name=f"fsize-{uuid.uuid4().hex[:8]}",
        argv=[sys.executable, "-c", code],
        workdir=tmp_path / "work",
        cwd=Path("/tmp"),
        env={},
        ro_paths=[],
        rw_paths=[writable],
        tmpfs={},
        memory_bytes=256 << 20,
        pids=16,
        time_limit_s=20,
        log_path=tmp_path / "stderr.log",
        log_cap_bytes=1 << 16,
        max_file_bytes=1 << 20,
    )
    with sandbox.start(spec) as jail:
        jail.stdin.close()
        output = jail.stdout.read()
        jail.wait(timeout=20)
    assert output.decode().strip() == "EFBIG", (tmp_path / "stderr.log").read_text()
    assert target.stat().st_size == 1 << 20

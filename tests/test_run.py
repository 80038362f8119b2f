"""`evaluator run` end to end with the real nsjail on the CPU track: statuses, the clock, isolation."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import leftovers, run_cli, write_submission

from evaluator import plan, runner, training
from evaluator.cli import main
from evaluator.paths import HOME
from evaluator.results import result_problems
from evaluator.sandbox import SandboxUnavailable

# The slow tier (`make test-fast` leaves it out): every test here runs an evaluation.
pytestmark = pytest.mark.slow

# Interpreter start and `import torch` before the clock, plus teardown: generous on a busy 2-core box.
STARTUP_SLACK_S = 25

RETURN_UNIFORM = """
def train(ctx):
    ctx.log(1, loss=9.0, tokens=100)
    return TinyCausal(ctx.vocab_size)
"""


def _assert_nothing_left(record: dict, runs_dir: Path) -> None:
    assert leftovers(record["run_id"], runs_dir / record["run_id"]) == []


def test_ok_run_is_scored_recorded_and_cleaned_up(tmp_path, runs_dir, capsys):
    folder = write_submission(tmp_path, "uniform", RETURN_UNIFORM)
    code, record = run_cli(folder, runs_dir, "--budget", "5", "--sandbox", "nsjail", capsys=capsys)
    assert code == 0, record["message"]
    assert record["status"] == "ok"
    # Zero head: uniform logits, so the evaluator's own scoring must give exactly ln(vocab).
    assert record["metrics"]["val_loss"] == round(math.log(8192), 4)
    assert record["scoring"] == {"protocol": "streamed", "passes": 2, "consistency_nats": 1e-3}
    assert isinstance(record["scoring_seconds"], int)
    assert 0 < record["train"]["train_seconds"] <= 5
    # No snapshot within 5 s of a track that takes one every 20 s: the curve is the final model alone.
    assert record["val_curve"] == [
        {
            "time_s": round(record["train"]["train_seconds"], 2),
            "model": "final",
            "val_loss": record["metrics"]["val_loss"],
            "val_bpb": record["metrics"]["val_bpb"],
            "scored": "ok",
        }
    ]
    assert record["target"] is None
    assert record["environment"]["sandbox"]["kind"] == "nsjail"
    assert record["official"] is False
    assert record["unofficial_reasons"][0].startswith("development result: scored on the public split")
    assert "budget overridden" in record["unofficial_reasons"][1]
    assert record["data"]["scored_on"] == record["data"]["curve_scored_on"] == "public"
    assert record["dev_metrics"] is None and record["contamination"] is None and record["train"]["refused_lines"] == 0
    assert (record["seed"], record["seed_drawn"]) == (0, False)  # the track's public default seed
    assert record["gpu_telemetry"] is None  # a CPU track samples no GPU
    run_dir = runs_dir / record["run_id"]
    assert result_problems(json.loads((run_dir / "result.json").read_text())) == []
    metrics = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    assert {(m["step"], m["key"], m["value"]) for m in metrics} == {(1, "loss", 9.0), (1, "tokens", 100.0)}
    assert all(0 <= m["time_s"] <= 5 for m in metrics)
    assert (run_dir / "model.pt").is_file() and not (run_dir / "jail-out").exists()
    _assert_nothing_left(record, runs_dir)


@pytest.mark.parametrize(
    "name,body",
    [
        ("busy-loop", "def train(ctx):\n    while True:\n        pass\n"),
        (
            "patched-clock",
            "import time\n\ndef train(ctx):\n    time.monotonic = lambda: 0.0\n    time.time = lambda: 0.0\n"
            "    ctx.time_left = lambda: 1e9\n    time.sleep(600)\n",
        ),
        (
            "ignores-polite-stop",
            "def train(ctx):\n    while True:\n        try:\n            while True:\n                pass\n"
            "        except BaseException:\n            pass\n",
        ),
        ("slow-import", "import time\ntime.sleep(600)\n\ndef train(ctx):\n    return TinyCausal(ctx.vocab_size)\n"),
    ],
)
def test_the_clock_cannot_be_escaped(tmp_path, runs_dir, capsys, name, body):
    folder = write_submission(tmp_path, name, body)
    began = time.monotonic()
    code, record = run_cli(folder, runs_dir, "--budget", "3", "--sandbox", "nsjail", capsys=capsys)
    assert record["status"] == "over_budget", record["message"]
    assert code == 1
    assert record["metrics"] is None
    assert time.monotonic() - began < 3 + STARTUP_SLACK_S
    _assert_nothing_left(record, runs_dir)


# Buries an early "saved" behind a flood of lines, then goes on replacing model.pt with models that
# carry the (advisory) time they were made at, until the jail is killed.
SAVED_BEHIND_A_FLOOD = """
import gc, json, os, sys, time
import torch

def train(ctx):
    out = json.load(open(sys.argv[sys.argv.index("--job") + 1]))["out_dir"]
    channel = next(o for o in gc.get_objects() if type(o).__name__ == "_Channel")
    model = TinyCausal(ctx.vocab_size)
    model.register_buffer("made_at", torch.tensor(ctx.elapsed()))
    torch.save(model, out + "/model.pt")
    for _ in range(100_000):
        channel.send("snapshot", bytes=1, save_s=0.0)
    channel.send("saved", bytes=1)
    while True:
        model.made_at.fill_(ctx.elapsed())
        torch.save(model, out + "/next.pt")
        os.replace(out + "/next.pt", out + "/model.pt")
"""


def test_an_early_saved_behind_a_backlog_stops_the_clock_only_when_the_jail_is_dead(tmp_path, runs_dir, capsys):
    """The clock stops when the jail is dead, not when "saved" was read: whatever the model file
    holds was written before the recorded time, however many lines the jail queued before it."""
    folder = write_submission(tmp_path, "saved-behind-a-flood", SAVED_BEHIND_A_FLOOD)
    code, record = run_cli(folder, runs_dir, "--budget", "20", "--smoke", "--sandbox", "nsjail", capsys=capsys)
    assert (code, record["status"]) == (0, "ok"), record["message"]
    made_at = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, torch; sys.path.insert(0, sys.argv[1]); "
            "print(float(torch.load(sys.argv[2], weights_only=False).made_at))",
            str(folder),
            str(runs_dir / record["run_id"] / "model.pt"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # The jail's advisory clock starts a moment after the evaluator's: allow it 50 ms.
    assert float(made_at) <= record["train"]["train_seconds"] + 0.05
    _assert_nothing_left(record, runs_dir)


def test_work_at_import_time_counts(tmp_path, runs_dir, capsys):
    body = "import time\ntime.sleep(2.5)\n" + RETURN_UNIFORM
    folder = write_submission(tmp_path, "import-work", body)
    code, record = run_cli(folder, runs_dir, "--budget", "6", "--smoke", "--sandbox", "nsjail", capsys=capsys)
    assert record["status"] == "ok", record["message"]
    assert record["train"]["train_seconds"] >= 2.5


def test_crash_reports_the_traceback_tail(tmp_path, runs_dir, capsys):
    body = "def train(ctx):\n    print('about to fail')\n    raise ValueError('boom-marker-42')\n"
    folder = write_submission(tmp_path, "crasher", body)
    code, record = run_cli(folder, runs_dir, "--budget", "5", "--sandbox", "nsjail", capsys=capsys)
    assert (code, record["status"]) == (1, "crashed")
    assert "ValueError: boom-marker-42" in record["message"] and "train.py" in record["message"]
    log = (runs_dir / record["run_id"] / "train.log").read_text()
    assert "about to fail" in log  # the submission's stdout is captured in the log


def test_returning_something_else_than_a_module_is_a_crash(tmp_path, runs_dir, capsys):
    folder = write_submission(tmp_path, "returns-dict", "def train(ctx):\n    return {'weights': 1}\n")
    code, record = run_cli(folder, runs_dir, "--budget", "5", "--sandbox", "nsjail", capsys=capsys)
    assert record["status"] == "crashed"
    assert "returned dict, not a torch.nn.Module" in record["message"]


# Writes hostile lines straight into the harness's protocol pipe (a write-only pipe other than
# stdout and stderr), then returns a model as usual: the evaluator must shrug them off.
FORGES_PROTOCOL_LINES = """
import fcntl, json, os, stat

def train(ctx):
    lines = [
        "[" * 30000 + "]" * 30000,
        json.dumps({"event": "log", "step": 2**64, "metrics": {"loss": 1.0}}),
        '{"event": "log", "step": 3, "metrics": {"loss": 1' + "0" * 5000 + '}}',
        '{"event": "start", "phases": {"import_s": 1' + "0" * 5000 + '}}',
        json.dumps({"event": "log", "step": 4, "metrics": {"loss": 2.0}}),
    ]
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:  # the listing includes the descriptor listdir itself used, closed by now
            is_pipe = fd > 2 and stat.S_ISFIFO(os.fstat(fd).st_mode)
        except OSError:
            continue
        if is_pipe and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
            os.write(fd, ("\\n".join(lines) + "\\n").encode())
    ctx.log(5, loss=3.0)
    return TinyCausal(ctx.vocab_size)
"""


def test_hostile_protocol_lines_are_ignored(tmp_path, runs_dir, capsys):
    folder = write_submission(tmp_path, "forges-protocol", FORGES_PROTOCOL_LINES)
    code, record = run_cli(folder, runs_dir, "--budget", "5", "--smoke", "--sandbox", "nsjail", capsys=capsys)
    assert (code, record["status"]) == (0, "ok"), record["message"]
    metrics = pq.read_table(runs_dir / record["run_id"] / "metrics.parquet").to_pylist()
    assert [(m["step"], m["value"]) for m in metrics] == [(4, 2.0), (5, 3.0)]


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        ("ctx.log(2**64, loss=1.0)", "ctx.log: step 18446744073709551616 does not fit in int64"),
        ("ctx.log(1, loss=10**400)", "ctx.log: loss must be a number that fits in float64"),
        ("ctx.log(1.5, loss=1.0)", "ctx.log: step must be an integer, not float"),
    ],
    ids=["step-beyond-int64", "value-beyond-float64", "float-step"],
)
def test_ctx_log_refuses_what_metrics_parquet_cannot_hold(tmp_path, runs_dir, capsys, call, expected):
    folder = write_submission(
        tmp_path, "logs-badly", f"def train(ctx):\n    {call}\n    return TinyCausal(ctx.vocab_size)\n"
    )
    code, record = run_cli(folder, runs_dir, "--budget", "5", "--sandbox", "nsjail", capsys=capsys)
    assert (code, record["status"]) == (1, "crashed")
    assert f"ValueError: {expected}" in record["message"]
    assert (runs_dir / record["run_id"] / "result.json").is_file()


@pytest.fixture
def make_track(cpu_track_variant):
    """Installs a variant of cpu-1min with other sandbox limits as an extra track for this test."""

    def make(track_id: str, **limits: int) -> str:
        def edit(text: str) -> str:
            for key, value in limits.items():
                text, count = re.subn(rf"(?m)^{key} = \d+", f"{key} = {value}", text)
                assert count == 1, key
            return text

        return cpu_track_variant(track_id, edit)

    return make


def test_memory_bomb_is_out_of_memory(tmp_path, runs_dir, capsys, make_track):
    small_track = make_track("cpu-small-memory", memory_mib=1024)
    body = (
        "import torch\n\ndef train(ctx):\n    hoard = [torch.ones(2**28) for _ in range(8)]\n"
        "    return TinyCausal(ctx.vocab_size)\n"
    )
    folder = write_submission(tmp_path, "memory-bomb", body)
    code, record = run_cli(
        folder, runs_dir, "--track", small_track, "--budget", "20", "--sandbox", "nsjail", capsys=capsys
    )
    assert (code, record["status"]) == (1, "out_of_memory"), record["message"]
    _assert_nothing_left(record, runs_dir)


def test_fork_bomb_is_contained(tmp_path, runs_dir, capsys, make_track):
    small_track = make_track("cpu-few-pids", pids=48)
    body = "import os\n\ndef train(ctx):\n    while True:\n        os.fork()\n"
    folder = write_submission(tmp_path, "fork-bomb", body)
    began = time.monotonic()
    code, record = run_cli(
        folder, runs_dir, "--track", small_track, "--budget", "5", "--sandbox", "nsjail", capsys=capsys
    )
    assert record["status"] in ("crashed", "over_budget"), record["message"]
    assert time.monotonic() - began < 5 + STARTUP_SLACK_S
    _assert_nothing_left(record, runs_dir)


PROBE = """
import json
import os
import socket


def _try(action):
    try:
        action()
        return "allowed"
    except Exception as exc:
        return type(exc).__name__


def _read(path):
    with open(path, "rb") as handle:
        handle.read(1)


def _write(path):
    with open(path, "w") as handle:
        handle.write("escaped")


def _connect(port):
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def train(ctx):
    c = ctx.config
    report = {
        "tcp_to_host_listener": _try(lambda: _connect(c["port"])),
        "read_val_split": _try(lambda: _read(c["val_path"])),
        "read_canary": _try(lambda: _read(c["canary"])),
        "read_tokenizer": _try(lambda: _read(c["tokenizer_path"])),
        "write_submission": _try(lambda: _write(os.path.join(os.path.dirname(__file__), "evil.txt"))),
        "write_usr": _try(lambda: _write("/usr/evil.txt")),
        "write_repo": _try(lambda: _write(c["repo_file"])),
        "write_scratch": _try(lambda: _write(os.path.join(str(ctx.scratch), "fine.txt"))),
    }
    raise RuntimeError("PROBE " + json.dumps(report))
"""


def test_the_jail_has_no_network_no_data_and_a_read_only_filesystem(tmp_path, runs_dir, capsys):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    canary = tmp_path / "canary.txt"
    canary.write_text("secret")
    repo_file = HOME / "results" / f"escape-{os.getpid()}.txt"
    config = {
        "port": listener.getsockname()[1],
        "val_path": str(HOME / "spec" / "datasets" / "pydoc-100k" / "val.parquet"),
        "tokenizer_path": str(HOME / "spec" / "datasets" / "pydoc-100k" / "tokenizer.json"),
        "canary": str(canary),
        "repo_file": str(repo_file),
    }
    folder = write_submission(tmp_path, "probe", PROBE, config)
    code, record = run_cli(folder, runs_dir, "--budget", "8", "--sandbox", "nsjail", capsys=capsys)
    assert record["status"] == "crashed"
    report = json.loads(record["message"].split("RuntimeError: PROBE ", 1)[1].splitlines()[0])
    assert report.pop("write_scratch") == "allowed"
    assert {key: value for key, value in report.items() if value == "allowed"} == {}
    with pytest.raises(socket.timeout):
        listener.accept()
    assert not repo_file.exists() and not (folder / "evil.txt").exists()
    listener.close()


def test_sandbox_none_is_labelled_unofficial(tmp_path, runs_dir, capsys):
    folder = write_submission(tmp_path, "unsandboxed", RETURN_UNIFORM)
    code, record = run_cli(folder, runs_dir, "--budget", "5", "--smoke", "--sandbox", "none", capsys=capsys)
    assert record["status"] == "ok", record["message"]
    assert record["environment"]["sandbox"]["kind"] == "none"
    assert "not sandboxed (--sandbox none)" in record["unofficial_reasons"]
    assert record["environment"]["sandbox"]["unavailable"] == []  # asked for: nothing was missing


def test_explicit_nsjail_never_falls_back(tmp_path, runs_dir, capsys, monkeypatch):
    def unavailable(choice):
        raise SandboxUnavailable("nsjail: cannot create cgroups (test)")

    monkeypatch.setattr(runner, "open_sandbox", unavailable)
    folder = write_submission(tmp_path, "no-jail", RETURN_UNIFORM)
    code, record = run_cli(folder, runs_dir, "--budget", "5", "--sandbox", "nsjail", capsys=capsys)
    assert (code, record["status"]) == (3, "sandbox_error")
    assert "cannot create cgroups (test)" in record["message"]


LOG_THE_SEED = """
def train(ctx):
    ctx.log(1, loss=9.0, seed=ctx.seed)
    return TinyCausal(ctx.vocab_size)
"""


def test_secret_seeds_are_drawn_recorded_and_handed_to_the_submission(tmp_path, runs_dir, capsys):
    folder = write_submission(tmp_path, "drawn", LOG_THE_SEED)
    code = main(
        [
            "run",
            str(folder),
            "--out",
            str(runs_dir),
            "--json",
            "--budget",
            "5",
            "--smoke",
            "--sandbox",
            "none",
            "--seeds",
            "2",
            "--secret-seeds",
        ]
    )
    records = json.loads(capsys.readouterr().out)
    assert code == 0 and [r["status"] for r in records] == ["ok", "ok"], records
    seeds = [record["seed"] for record in records]
    assert all(record["seed_drawn"] for record in records) and len(set(seeds)) == 2
    assert all(0 <= seed < 2**31 for seed in seeds) and seeds != [0, 1]
    for record in records:
        logged = pq.read_table(runs_dir / record["run_id"] / "metrics.parquet").to_pylist()
        assert [m["value"] for m in logged if m["key"] == "seed"] == [record["seed"]]


def test_bad_input_exits_2_without_a_traceback(tmp_path, capsys):
    folder = write_submission(tmp_path, "fine", RETURN_UNIFORM)
    assert main(["run", str(folder), "--budget", "-1"]) == 2
    assert main(["run", str(folder), "--track", "nope"]) == 2
    (folder / "weights.pt").write_bytes(b"x")
    assert main(["run", str(folder)]) == 2
    assert main(["run", str(folder), "--seed", "3", "--secret-seeds"]) == 2
    err = capsys.readouterr().err
    assert "positive number" in err and "unknown track 'nope'" in err and "weights.pt" in err
    assert "--secret-seeds draws every seed: drop --seed" in err
    assert "Traceback" not in err


def test_the_training_jail_covers_the_package_its_checkout_and_every_installed_home(tmp_path, monkeypatch):
    # A second installed copy (in the base interpreter the jail binds, beside the venv) carries a
    # validation split of its own.
    other_home = tmp_path / "lib" / "python3.11" / "site-packages" / "evaluator" / "_home"
    other_home.mkdir(parents=True)
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path))
    val = HOME / "spec" / "datasets" / "pydoc-100k" / "val.parquet"
    hidden = set(training.hidden_from_training(val, None))
    assert {HOME / "evaluator", HOME / "spec", HOME / ".git", val.parent, other_home} <= hidden


def test_without_torch_run_says_how_to_install_it_before_making_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    folder = write_submission(tmp_path, "no-torch", RETURN_UNIFORM)
    assert main(["run", str(folder), "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "needs PyTorch, which is not installed here" in err and "pip install torch" in err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def test_progress_is_plain_lines_off_a_terminal_and_in_a_notebooks_shell(tmp_path, runs_dir, capsys, monkeypatch):
    from rich.console import Console

    from evaluator.progress import live

    assert live(Console(force_terminal=True))
    monkeypatch.setenv("JPY_PARENT_PID", "1")  # what a Jupyter kernel leaves to its `!evaluator run`
    assert not live(Console(force_terminal=True))
    folder = write_submission(tmp_path, "plain", RETURN_UNIFORM)
    assert main(["run", str(folder), "--out", str(runs_dir), "--budget", "5", "--smoke", "--sandbox", "none"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"plain:\s+\d+\.\d/5 s", err) and "scoring: " in err and "\x1b[" not in err


LOG_THE_CONFIG = """
def train(ctx):
    ctx.log(1, width=ctx.config["width"], lr=ctx.config["opt"]["lr"], momentum=ctx.config["opt"]["momentum"],
            relu=float(ctx.config["act"] == "relu"))
    return TinyCausal(ctx.vocab_size)
"""


def test_set_overrides_reach_the_submission_are_recorded_and_unofficial(tmp_path, runs_dir, capsys):
    folder = write_submission(tmp_path, "overridden", LOG_THE_CONFIG, config={"width": 8, "act": "gelu"})
    with open(folder / "manifest.toml", "a") as manifest:  # [config] is the manifest's last table
        manifest.write("opt = { lr = 0.1, momentum = 0.9 }\n")
    code, record = run_cli(
        folder,
        runs_dir,
        "--budget",
        "5",
        "--smoke",
        "--sandbox",
        "none",
        "--set",
        "width=16",
        "--set",
        "opt.lr=3e-4",
        "--set",
        "act=relu",
        capsys=capsys,
    )
    assert code == 0, record["message"]
    assert record["overrides"] == {"width": 16, "opt": {"lr": 3e-4}, "act": "relu"}
    assert any("--set" in reason for reason in record["unofficial_reasons"])
    logged = {m["key"]: m["value"] for m in pq.read_table(runs_dir / record["run_id"] / "metrics.parquet").to_pylist()}
    assert logged == {"width": 16.0, "lr": 3e-4, "momentum": 0.9, "relu": 1.0}  # tables merged, not replaced
    assert main(["run", str(folder), "--set", "width=2**70"]) == 2
    assert main(["run", str(folder), "--set", "width=99999999999999999999"]) == 2
    err = capsys.readouterr().err
    assert "'2**70' is not a TOML value" in err and "config.width: 99999999999999999999 is greater than" in err


RETURN_A_TUPLE = """
class TupleOut(TinyCausal):
    def forward(self, tokens):
        return super().forward(tokens), None


def train(ctx):
    return TupleOut(ctx.vocab_size)
"""


def test_smoke_finds_a_broken_contract_in_seconds_and_is_never_published(tmp_path, runs_dir, capsys):
    folder = write_submission(tmp_path, "smoky", RETURN_UNIFORM)
    code, record = run_cli(folder, runs_dir, "--smoke", "--sandbox", "none", capsys=capsys)
    assert code == 0 and record["smoke"] is True and record["budget_s"] == plan.SMOKE_BUDGET_S
    assert record["metrics"]["val_documents"] == plan.SMOKE_DOCUMENTS
    assert any(reason.startswith("smoke run") for reason in record["unofficial_reasons"])
    key = HOME / "results" / "demo-key" / "demo-not-secret.key"
    run_dir = runs_dir / record["run_id"]
    assert (
        main(["publish", str(run_dir), "--key", str(key), "--results", str(tmp_path / "results"), "--unofficial"]) == 2
    )
    assert "it is a smoke run" in capsys.readouterr().err
    broken = write_submission(tmp_path, "tuple-forward", RETURN_A_TUPLE)
    started = time.monotonic()
    code, record = run_cli(broken, runs_dir, "--smoke", "--sandbox", "none", capsys=capsys)
    assert record["status"] == "invalid_model" and time.monotonic() - started < 60

"""`evaluator run`: check, train in a sandbox under the evaluator's own clock, score, record.

The clock (DESIGN.md): it starts when the harness's "start" message arrives, immediately before the
submission's module is imported, and stops when "saved" has been read and the jail killed for it,
so nothing runs after the clock stops. At the budget the jail is killed and the run is
`over_budget`. On a track with snapshots the evaluator takes the model while the clock runs and
scores every model it took (the validation curve; on a time-to-target track, the score). Nothing
the jail says is trusted beyond being a signal.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import secrets
import shutil
import signal
import stat
import statistics
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

import evaluator
from evaluator.calibration import WORKLOAD, Calibration, calibrate
from evaluator.check import check_submission
from evaluator.dataset.loader import read_documents
from evaluator.dataset.store import resolve_data_file, tokenizer_info
from evaluator.errors import DataError, InvalidModel, UserError
from evaluator.fsutil import atomic_write_bytes, atomic_write_text, sha256_file, stage_tree, tree_sha256
from evaluator.gpus import Placement, hold_gpu, hold_host
from evaluator.harness import MODEL_FILE, SNAPSHOT_FILE
from evaluator.manifest import MANIFEST_NAME, Manifest, merge_overrides, parse_manifest, parse_override
from evaluator.nvml import TelemetrySampler
from evaluator.progress import PlainLines, live
from evaluator.paths import DATASETS_DIR, RUNS_DIR, SPEC_DIR, shown
from evaluator.results import EXIT_CODES, environment, utc_now, write_result
from evaluator.sandbox import JailSpec, SandboxUnavailable, open_sandbox
from evaluator.tracks import Track, load_track

# Interpreter start, `import torch`, device initialisation and data loading happen before the clock;
# they get this long before the run is declared broken.
STARTUP_ALLOWANCE_S = 120.0
_PROTOCOL_LINE_MAX = 64 * 1024
_PROTOCOL_BACKLOG_MAX = 10_000  # lines read but not yet handled
_LOG_TAIL_BYTES = 3000
# --smoke: enough to catch a broken contract (a forward that returns a tuple, wrong logits) in
# seconds instead of after a full run.
SMOKE_BUDGET_S = 10.0
SMOKE_DOCUMENTS = 8
# Rows of ctx.log metrics one run may record: a T4 run logging five metrics at every step stays far
# below. The evaluator holds the rows until the run ends, so without a cap a submission flooding the
# protocol with log lines could exhaust the evaluator's memory (outside every jail) and bloat
# metrics.parquet. Rows past the cap are dropped.
_METRICS_ROWS_MAX = 200_000
_COPY_CHUNK = 2**20
SNAPSHOTS_DIR = "snapshots"  # in the run directory: the snapshots taken, until they are scored
# Disk the snapshots of one run may take, in model caps: beyond it, snapshots are refused.
SNAPSHOTS_MAX_MODELS = 4
_PACKAGE_DIR = Path(evaluator.__file__).resolve().parent
# What the training jail runs of the evaluator: the harness, the API it hands the submission and the
# training split's loader. They are copied into the run with the training split, and the jail sees
# those copies and none of the package or its home: an installed package carries the validation
# split (evaluator/_home/spec/datasets/), and the Python install the jail binds holds the package.
TRAINING_JAIL_MODULES = (
    "__init__.py", "api.py", "errors.py", "harness.py", "dataset/__init__.py", "dataset/loader.py",
)


@dataclass(frozen=True)
class Snapshot:
    """A model the evaluator took while the clock ran, frozen outside the jail's reach."""

    time_s: float  # on the evaluator's clock, when its copy was complete: nothing newer is in it
    path: Path


@dataclass
class TrainingOutcome:
    status: str
    message: str = ""
    train_seconds: float | None = None
    metrics_rows: list[tuple[float, int, str, float]] = field(default_factory=list)
    timings: dict[str, Any] = field(default_factory=dict)
    gpu_telemetry: dict[str, Any] | None = None
    snapshots: list[Snapshot] = field(default_factory=list)


def draw_seed() -> int:
    """A seed from the kernel's random source, drawn after the submission is fixed: nobody can have
    tuned for it. 31 bits, so every seeding API a submission might pass it to accepts it."""
    return int.from_bytes(os.urandom(4), "little") & 0x7FFF_FFFF


def _new_run_id(name: str, seed: int) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{name}-s{seed}-{secrets.token_hex(3)}"


def _fits_int64(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def _fits_float64(value) -> bool:
    """A number a float64 column holds (JSON integers can have any number of digits)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, float) or abs(value) <= sys.float_info.max


def _read_protocol(stream, events: queue.Queue, stop_clock: Callable[[], float], stop: threading.Event) -> None:
    """Reader thread: every complete JSON line from the jail becomes (arrival time, event).

    "saved" kills the jail here, the moment it is read, and arrives stamped when the jail is dead:
    the clock stops there, and the model file can no longer change. A jail that floods lines to
    build a backlog before the main loop therefore gains nothing; and the queue is bounded, so a
    flood slows the jail's writes instead of filling the host's memory."""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                events.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    while True:
        line = stream.readline(_PROTOCOL_LINE_MAX + 1)
        if not line:
            break
        if len(line) > _PROTOCOL_LINE_MAX or not line.endswith(b"\n"):
            # An oversized line is noise from a misbehaving submission: skip to its end.
            while line and not line.endswith(b"\n"):
                line = stream.readline(_PROTOCOL_LINE_MAX)
            continue
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):  # e.g. 30,000 nested brackets
            continue
        if isinstance(event, dict) and isinstance(event.get("event"), str):
            arrived = stop_clock() if event["event"] == "saved" else time.monotonic()
            if not put((arrived, event)):
                return
    put((time.monotonic(), None))


class _LiveDisplay:
    """The budget's progress with the last step, loss and tokens/s the submission logged: a bar where
    the console redraws in place, else a plain line every tenth of the budget (at least 5 s apart)."""

    def __init__(self, console: Console, label: str, budget_s: float):
        self.budget_s = budget_s
        self.label = label
        self.lines = None if live(console) else PlainLines(console, every_s=max(5.0, budget_s / 10))
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:>5.1f}/{task.total:g} s"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
            disable=self.lines is not None,
        )
        self.task = self.progress.add_task(label, total=budget_s, status="starting sandbox")
        self._last_line = ""

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)
        if self.lines is not None and self._last_line:
            self.lines.say(self._last_line, final=True)

    def update(self, elapsed: float | None, status: str) -> None:
        completed = min(elapsed, self.budget_s) if elapsed is not None else 0.0
        self.progress.update(self.task, completed=completed, status=status)
        if self.lines is not None and elapsed is not None:
            self._last_line = f"{self.label}: {completed:5.1f}/{self.budget_s:g} s  {status}"
            self.lines.say(self._last_line)


def _status_text(step: int | None, metrics: dict[str, float], tokens_per_s: float | None) -> str:
    parts = []
    if step is not None:
        parts.append(f"step {step}")
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}")
    if tokens_per_s:
        parts.append(f"{tokens_per_s:,.0f} tok/s")
    return "  ".join(parts) or "training"


class _SnapshotTaker:
    """The evaluator's side of ctx.snapshot(): takes a due snapshot out of the jail and answers.

    Whatever the jail says, a snapshot is taken only when one is due on this clock (one per
    interval), from a plain, dense file under the model cap, while the run's snapshots stay under
    SNAPSHOTS_MAX_MODELS model caps of disk; the copy goes where the jail cannot reach, the jail's
    file is removed, and the snapshot is stamped when the copy is complete (or when the jail died,
    if that was earlier), so it holds nothing trained after its time. A line when none is due
    costs a refusal and nothing else. Answers are written without blocking: a jail that does not
    read them cannot stall the clock.
    """

    def __init__(self, every_s: float | None, jail_out: Path, into: Path, cap_bytes: int, answers_fd: int):
        self.every_s = every_s
        self.next_due_s = every_s
        self.jail_out, self.into, self.cap_bytes = jail_out, into, cap_bytes
        self.bytes_left = SNAPSHOTS_MAX_MODELS * cap_bytes
        self.answers_fd = answers_fd
        os.set_blocking(answers_fd, False)
        self.jail_dead_at: float | None = None  # set by the protocol's reader when it kills the jail
        self.taken: list[Snapshot] = []
        self.take_s: list[float] = []  # how long each copy took here
        self.save_s: list[float] = []  # the harness's account of saving it (advisory)

    def handle(self, event: dict[str, Any], started_at: float, arrived: float) -> str | None:
        """Answers the jail; returns a line for the progress display when a snapshot was taken."""
        taken = None
        if self.next_due_s is not None and arrived - started_at >= self.next_due_s:
            taken = self._take(started_at)
            if taken is not None:
                self.take_s.append(time.monotonic() - arrived)
                save_s = event.get("save_s")
                if _fits_float64(save_s) and 0 <= save_s <= taken.time_s:
                    self.save_s.append(float(save_s))
                self.next_due_s = (math.floor(taken.time_s / self.every_s) + 1) * self.every_s
        answer = json.dumps({"taken": taken is not None, "next_due_s": self.next_due_s}) + "\n"
        try:
            os.write(self.answers_fd, answer.encode())  # < PIPE_BUF: written whole or not at all
        except OSError:  # a full pipe (a jail that does not read) or a closed one
            pass
        return None if taken is None else f"snapshot {len(self.taken)} taken at {taken.time_s:.1f} s"

    def _take(self, started_at: float) -> Snapshot | None:
        source = self.jail_out / SNAPSHOT_FILE
        target = self.into / f"snapshot-{len(self.taken) + 1:03d}.pt"
        try:
            self.into.mkdir(exist_ok=True)
            _take_file(source, target, min(self.cap_bytes, self.bytes_left))
        except (InvalidModel, OSError):  # the submission's loss (or a full disk): nothing to score at this time
            _remove(target)
            return None
        finally:
            _remove(source)
        # A copy that ends after the jail's death holds nothing newer than the death: stamped then,
        # it is never later than the final model.
        stamp = time.monotonic() if self.jail_dead_at is None else min(time.monotonic(), self.jail_dead_at)
        taken = Snapshot(time_s=stamp - started_at, path=target)
        self.bytes_left -= target.stat().st_size
        self.taken.append(taken)
        return taken


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # e.g. a directory of that name, which only the submission can have made
        pass


def _train(jailed, budget_s: float, display: _LiveDisplay, launched_at: float,
           snapshots: _SnapshotTaker) -> TrainingOutcome:
    events: queue.Queue = queue.Queue(maxsize=_PROTOCOL_BACKLOG_MAX)
    stop = threading.Event()

    def stop_clock() -> float:
        jailed.kill()
        snapshots.jail_dead_at = time.monotonic()
        return snapshots.jail_dead_at

    reader = threading.Thread(target=_read_protocol, args=(jailed.stdout, events, stop_clock, stop), daemon=True)
    reader.start()
    try:
        return _follow_protocol(events, jailed, budget_s, display, launched_at, snapshots)
    finally:
        stop.set()


def _follow_protocol(events: queue.Queue, jailed, budget_s: float, display: _LiveDisplay, launched_at: float,
                     snapshots: _SnapshotTaker) -> TrainingOutcome:
    outcome = TrainingOutcome(status="sandbox_error")

    # Phase 1: until "start", the harness is doing the evaluator's own work.
    started_at = None
    startup_deadline = launched_at + STARTUP_ALLOWANCE_S
    while started_at is None:
        try:
            arrived, event = events.get(timeout=max(0.0, startup_deadline - time.monotonic()))
        except queue.Empty:
            outcome.message = f"the harness did not start within {STARTUP_ALLOWANCE_S:g} s"
            return outcome
        if event is None:
            outcome.message = "the harness ended before the submission was started"
            return outcome
        if event["event"] == "start":
            started_at = arrived
            outcome.timings["launch_to_start_s"] = arrived - launched_at
            phases = event.get("phases")
            if isinstance(phases, dict):
                outcome.timings.update({f"harness_{k}": float(v) for k, v in phases.items() if _fits_float64(v)})
            display.update(0.0, "importing submission")

    # Phase 2: the clock runs.
    deadline = started_at + budget_s
    last_step, last_metrics, tokens_per_s = None, {}, None
    error_event = None
    while True:
        now = time.monotonic()
        if now >= deadline:
            jailed.kill()
            outcome.status = "over_budget"
            outcome.message = f"did not save a model within the {budget_s:g} s budget; stopped at the budget"
            return outcome
        try:
            arrived, event = events.get(timeout=min(0.25, deadline - now))
        except queue.Empty:
            display.update(time.monotonic() - started_at, _status_text(last_step, last_metrics, tokens_per_s))
            continue
        if event is None:
            break
        elapsed = arrived - started_at
        kind = event["event"]
        if kind == "saved":  # the reader has killed the jail: nothing runs after the clock stops
            outcome.train_seconds = elapsed
            if elapsed > budget_s:
                outcome.status = "over_budget"
                outcome.message = f"saved after {elapsed:.2f} s, over the {budget_s:g} s budget"
            else:
                outcome.status = "ok"
            display.update(elapsed, f"saved after {elapsed:.1f} s")
            return outcome
        if kind == "log":
            step, metrics = event.get("step"), event.get("metrics")
            if not _fits_int64(step) or not isinstance(metrics, dict):
                continue
            clean = {k: float(v) for k, v in metrics.items() if isinstance(k, str) and _fits_float64(v)}
            rows = [(elapsed, step, key, value) for key, value in clean.items()]
            outcome.metrics_rows.extend(rows[: max(0, _METRICS_ROWS_MAX - len(outcome.metrics_rows))])
            last_step, last_metrics = step, clean
            if "tokens" in clean and elapsed > 0:
                tokens_per_s = clean["tokens"] / elapsed
            display.update(elapsed, _status_text(last_step, last_metrics, tokens_per_s))
        elif kind == "snapshot":
            said = snapshots.handle(event, started_at, arrived)
            if said:
                display.update(time.monotonic() - started_at, said)
        elif kind == "error":
            error_event = event

    # The jail ended without "saved": find out why, trusting the sandbox's account first.
    jailed.wait(timeout=10)
    ended = jailed.outcome()
    if ended.reason == "oom":
        outcome.status, outcome.message = "out_of_memory", "exceeded the track's memory limit and was killed"
    elif ended.reason == "time_limit":
        outcome.status, outcome.message = "killed", "killed by the sandbox's hard time limit"
    elif ended.reason == "sandbox_error":
        outcome.status, outcome.message = "sandbox_error", ended.detail
    elif error_event is not None and error_event.get("kind") == "over_budget":
        outcome.status, outcome.message = "over_budget", str(error_event.get("message", ""))[:4000]
    elif ended.reason == "pids_limit":
        outcome.status, outcome.message = "crashed", "hit the track's limit on processes and threads"
    elif error_event is not None:
        outcome.status, outcome.message = "crashed", str(error_event.get("message", ""))[-4000:]
    elif ended.reason == "signaled":
        outcome.status, outcome.message = "crashed", f"killed by signal {ended.signal}: {ended.detail}"
    else:
        outcome.status = "crashed"
        outcome.message = f"exited with code {ended.returncode} without saving a model"
    return outcome


def _take_file(source: Path, target: Path, cap_bytes: int) -> None:
    """Copy a model the jail saved to `target`, out of its reach, after checking it is a plain,
    capped file. A copy, not a rename: under nsjail the output dir is a tmpfs of its own
    (Sandbox.capped_output_dir). Reads no more than the cap, however the file grows meanwhile; a
    sparse file is refused, since its copy would cost the host's disk what it never cost the jail."""
    not_a_file = f"{source.name} in the output directory is not a regular file (a symlink, FIFO or device)"
    try:
        # O_NOFOLLOW refuses a symlink instead of following it; O_NONBLOCK opens a FIFO without waiting.
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise InvalidModel(f"no {source.name} was saved") from None
    except OSError:
        raise InvalidModel(not_a_file) from None
    with open(fd, "rb") as saved:
        info = os.fstat(saved.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise InvalidModel(not_a_file)
        if info.st_size > cap_bytes:
            raise InvalidModel(f"{source.name} is {info.st_size} bytes; the track allows {cap_bytes}")
        if info.st_blocks * 512 < info.st_size:
            raise InvalidModel(f"{source.name} is a sparse file: torch.save never writes one")
        try:
            copy = open(target, "xb")  # never through a link someone planted
        except FileExistsError:  # only an unsandboxed jail reaches the run directory
            raise InvalidModel(f"{target.name} was already in the run directory: a jail wrote there") from None
        with copy:
            copied = 0
            while chunk := saved.read(min(_COPY_CHUNK, cap_bytes + 1 - copied)):
                copy.write(chunk)
                copied += len(chunk)
                if copied > cap_bytes:
                    break
    if copied > cap_bytes:  # written to while it was copied
        target.unlink()
        raise InvalidModel(f"{source.name} grew past the track's {cap_bytes} bytes while it was copied")


def _write_metrics(run_dir: Path, rows: list[tuple[float, int, str, float]]) -> None:
    table = pa.table(
        {
            "time_s": pa.array([r[0] for r in rows], pa.float64()),
            "step": pa.array([r[1] for r in rows], pa.int64()),
            "key": pa.array([r[2] for r in rows], pa.string()),
            "value": pa.array([r[3] for r in rows], pa.float64()),
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(run_dir / "metrics.parquet", sink.getvalue().to_pybytes())


def _last_logged(rows, key: str) -> float | None:
    values = [value for _, _, k, value in rows if k == key]
    return values[-1] if values else None


def _unofficial_reasons(plan: _RunPlan, sandbox: dict, gpu: dict | None) -> list[str]:
    track, budget_s = plan.track, plan.budget_s
    reasons = []
    if plan.overrides:
        reasons.append("config overridden on the command line (--set): the submission's files do not describe what ran")
    if plan.smoke:  # its budget is part of what a smoke run is
        reasons.append(f"smoke run (--smoke): {budget_s:g} s of training, {SMOKE_DOCUMENTS} validation documents")
    elif plan.calibration is not None:
        reasons.append(f"budget calibrated: x{plan.calibration.factor:g} ({budget_s:.1f} s instead of the track's "
                       f"{track.budget_s:g} s; the track's figure is {plan.calibration.track_provenance.split(' ', 1)[0]})")
    elif budget_s != track.budget_s:
        reasons.append(f"budget overridden: {budget_s:g} s instead of the track's {track.budget_s:g} s")
    if sandbox["kind"] != "nsjail":
        nsjail_missing = [what for what in sandbox["unavailable"] if what.startswith("nsjail: ")]
        reasons.append(f"not sandboxed ({nsjail_missing[0]})" if nsjail_missing else "not sandboxed (--sandbox none)")
    if plan.debug_scoring:
        reasons.append("the model server's output was kept (--debug-scoring)")
    wanted = track.raw["device"].get("gpu_name_contains")
    if wanted and (gpu is None or wanted not in gpu["name"]):
        reasons.append(f"GPU is {gpu['name'] if gpu else 'absent'}; the track requires one whose name contains {wanted!r}")
    return reasons


def _require_torch() -> None:
    """Before anything is made: a run without torch would fail halfway, leaving a run directory."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UserError(
            "evaluator run needs PyTorch, which is not installed here. On a CPU machine: pip install torch "
            "--index-url https://download.pytorch.org/whl/cpu ; on a GPU host or a notebook, the CUDA build "
            "it already has (README: running on a GPU)"
        ) from None


def _check_device(track: Track) -> str:
    if track.device_kind == "cpu":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise UserError(
            f"track {track.id} needs a CUDA GPU and this machine (or this torch, {torch.__version__}) has none; "
            "use --track cpu-1min, or install a CUDA build of torch on a GPU host (see README)"
        )
    return "cuda:0"


@dataclass(frozen=True)
class _RunPlan:
    """Everything decided before the sandbox starts."""

    folder: Path
    manifest: Manifest
    track: Track
    device: str
    seed: int
    seed_drawn: bool
    budget_s: float
    calibration: Calibration | None  # --budget calibrated: budget and scoring deadlines x its factor
    overrides: dict[str, Any]  # --set: merged into the manifest's [config] for this run
    smoke: bool
    gpu: Placement | None  # the GPU this run holds; None on a CPU track
    train_path: Path
    val_path: Path
    vocab_size: int
    eos_id: int
    run_id: str
    run_dir: Path
    staged: Path
    jail_input: Path  # the in-jail modules (as a package under it) and the training split's copy
    jail_out: Path
    scratch: Path
    job_path: Path
    debug_scoring: bool

    @property
    def deadline_factor(self) -> float:
        """What the scoring deadlines are multiplied by: a calibration's factor, but never below 1,
        because what they mostly wait for (process start, imports, a CUDA context) is no faster on
        a faster GPU."""
        return 1.0 if self.calibration is None else max(1.0, self.calibration.factor)

    @property
    def gpu_minor(self) -> int | None:
        """The board the jails are given, /dev/nvidia<minor>."""
        return None if self.gpu is None else self.gpu.board.minor


@dataclass(frozen=True)
class RunRequest:
    """What the caller of `evaluate` asks for; see its docstring."""

    folder: Path
    track_id: str | None
    seed: int | None
    secret_seed: bool
    budget_s: float | None
    calibrated_budget: bool
    gpu: int | None
    runs_dir: Path
    debug_scoring: bool
    overrides: dict[str, Any]
    smoke: bool


def _plan(request: RunRequest, console: Console, held: ExitStack) -> _RunPlan:
    """Check the submission, resolve track and data, take the host's locks (into `held`, for the whole
    run), calibrate if asked, lay out the run directory and the job file."""
    folder, seed, budget_s, gpu = Path(request.folder), request.seed, request.budget_s, request.gpu
    _require_torch()
    report = check_submission(folder, request.overrides, request.track_id)
    if not report.ok:
        for finding in report.findings:
            console.print(f"{folder}/{finding}", markup=False, highlight=False)
        raise UserError(f"{folder}: the submission is invalid ({len(report.findings)} problem(s)); fix them and run again")
    manifest = report.manifest
    track = load_track(request.track_id or manifest.track)
    device = _check_device(track)
    if request.secret_seed and seed is not None:
        raise UserError("a secret seed is drawn by the evaluator: give a seed or ask for a secret one, not both")
    if request.calibrated_budget and budget_s is not None:
        raise UserError("a calibrated budget is the track's scaled by this host's speed: give a budget or ask for a calibrated one, not both")
    if request.calibrated_budget and request.smoke:
        raise UserError("a smoke run has a budget of its own: drop --smoke or --budget calibrated")
    config = merge_overrides(manifest.config_for(track.id), request.overrides)  # check_submission has validated it
    if request.smoke and budget_s is None:
        budget_s = min(SMOKE_BUDGET_S, track.budget_s)
    seed = draw_seed() if request.secret_seed else track.seeds["default"] if seed is None else seed
    budget_s = track.budget_s if budget_s is None else budget_s
    if not (budget_s > 0 and math.isfinite(budget_s)):
        raise UserError(f"--budget must be a positive number of seconds, not {budget_s}")
    train_path = resolve_data_file(track, "train").resolve()
    val_path = resolve_data_file(track, "val").resolve()
    vocab_size, eos_id = tokenizer_info(resolve_data_file(track, "tokenizer"))
    if request.debug_scoring and not val_path.is_relative_to(DATASETS_DIR.resolve()):
        # What a model prints while scoring can be the validation text itself.
        raise UserError(
            f"--debug-scoring keeps what the model prints while it sees the validation split; track "
            f"{track.id} scores a private split ({val_path}), so that output must never be kept"
        )

    run_id = _new_run_id(manifest.name, seed)
    holder = f"pid {os.getpid()}, run {run_id}"
    # Scoring a private split: nothing else may train on this host meanwhile (THREAT_MODEL.md).
    held.enter_context(hold_host(exclusive=not val_path.is_relative_to(DATASETS_DIR.resolve()), holder=holder))
    if device.startswith("cuda"):
        placement = held.enter_context(hold_gpu(gpu, holder))
    elif gpu is not None:
        raise UserError(f"--gpu applies to GPU tracks; track {track.id} runs on the CPU")
    else:
        placement = None
    calibration = None
    if request.calibrated_budget:
        console.print(f"calibrating: timing {WORKLOAD} here against track {track.id}'s figure ...")
        calibration = calibrate(track, cuda_index=0 if placement is None else placement.cuda_index)
        budget_s = track.budget_s * calibration.factor
        console.print(f"calibrated: x{calibration.factor:g} (here {calibration.host_seconds:.3f} s, track "
                      f"{calibration.track_seconds:g} s, {calibration.track_provenance.split(',', 1)[0]}): budget "
                      f"{budget_s:.1f} s, unofficial", markup=False, highlight=False)
    run_dir = (Path(request.runs_dir) / run_id).resolve()
    plan = _RunPlan(
        folder=folder, manifest=manifest, track=track, device=device, seed=seed, seed_drawn=request.secret_seed,
        budget_s=budget_s, calibration=calibration, overrides=request.overrides, smoke=request.smoke, gpu=placement,
        train_path=train_path, val_path=val_path, vocab_size=vocab_size, eos_id=eos_id,
        run_id=run_id, run_dir=run_dir, staged=run_dir / "submission", jail_input=run_dir / "jail-input", jail_out=run_dir / "jail-out",
        scratch=run_dir / "scratch", job_path=run_dir / "job.json", debug_scoring=request.debug_scoring,
    )
    try:
        for directory in (plan.jail_out, plan.scratch, run_dir / "sandbox"):
            directory.mkdir(parents=True)
    except OSError as error:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise UserError(f"cannot make the run directory {shown(run_dir)}: {error.strerror}; run from a folder "
                        "you can write (runs go to ./results/runs/) or give --out DIR") from error
    try:
        # The run uses a snapshot: edits to the folder during the run change nothing, and the hash
        # recorded is the hash of exactly what ran.
        stage_tree(folder, plan.staged)
        jail_train_path = _stage_jail_input(plan)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    job = {
        "submission_dir": str(plan.staged),
        "module": manifest.entry_module_name,
        "function": manifest.entry_function,
        "train_path": str(jail_train_path),
        "out_dir": str(plan.jail_out),
        "scratch": str(plan.scratch),
        "device": device,
        "threads": track.threads,
        "seed": seed,
        "budget_s": budget_s,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "eval_seq_len": track.eval["seq_len"],
        "snapshot_every_s": track.snapshot_every_s,
        "config": config,
    }
    atomic_write_text(plan.job_path, json.dumps(job, indent=2))
    return plan


def _hidden_from_training(val_path: Path) -> list[Path]:
    """What holds the validation split, or could: the package, the home's spec/, the split's folder,
    what a checkout the package runs from holds besides (its git objects, build and dist output),
    and the home of every other installed copy in the Python installs a jail binds. The sandbox
    covers those a bound directory holds."""
    hidden = [_PACKAGE_DIR, SPEC_DIR.resolve(), val_path.parent]
    checkout = _PACKAGE_DIR.parent
    if (checkout / "pyproject.toml").is_file():
        hidden += [checkout / name for name in ("spec", ".git", "build", "dist")]
    prefixes = dict.fromkeys([Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parent.parent,
                              Path("/usr"), Path("/usr/local")])
    for prefix in prefixes:
        for pattern in ("lib/python3*/*-packages/evaluator/_home", "local/lib/python3*/*-packages/evaluator/_home"):
            hidden += prefix.glob(pattern)
    return hidden


def _stage_jail_input(plan: _RunPlan) -> Path:
    """Copy the in-jail modules and the training split into plan.jail_input; return the split's
    copy, checked again against the track's hash (the copy is what the jail reads)."""
    for module in TRAINING_JAIL_MODULES:
        target = plan.jail_input / "evaluator" / module
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_PACKAGE_DIR / module, target)
    train_copy = plan.jail_input / "train.parquet"
    shutil.copyfile(plan.train_path, train_copy)
    if sha256_file(train_copy) != plan.track.dataset["train"]["sha256"]:
        raise DataError(f"{plan.train_path} changed while it was copied for the run; run again")
    return train_copy


def _train_in_jail(plan: _RunPlan, sandbox, console: Console, timings: dict[str, float]) -> TrainingOutcome:
    limits = plan.track.sandbox
    model_cap = limits["model_mib"] * 2**20
    spec = JailSpec(
        name=f"{plan.run_id}-train",
        argv=[sys.executable, "-m", "evaluator.harness", "--job", str(plan.job_path)],
        workdir=plan.run_dir / "sandbox",
        cwd=plan.scratch,
        env=_jail_env(plan.track.threads, plan.scratch) | {"PYTHONPATH": str(plan.jail_input)},
        ro_paths=[plan.staged, plan.jail_input, plan.job_path],
        hidden_paths=_hidden_from_training(plan.val_path),
        rw_paths=[plan.jail_out],
        tmpfs={plan.scratch: limits["scratch_mib"] * 2**20},
        memory_bytes=limits["memory_mib"] * 2**20,
        pids=limits["pids"],
        time_limit_s=STARTUP_ALLOWANCE_S + plan.budget_s + limits["grace_s"],
        log_path=plan.run_dir / "train.log",
        log_cap_bytes=limits["log_mib"] * 2**20,
        gpu_index=plan.gpu_minor,
        gpu_uuid=None if plan.gpu is None else plan.gpu.board.uuid,
        max_file_bytes=model_cap,  # no file in the jail needs to outgrow the model
        cpus=plan.track.threads,  # the track's thread count is CPU time, not a request the code may ignore
    )
    launched = time.monotonic()
    # The output dir is a size-capped tmpfs while the jail runs (a bind of a disk directory would let
    # the jail fill the host's disk); the model leaves it before the block ends.
    with (
        sandbox.capped_output_dir(plan.jail_out, model_cap),
        _LiveDisplay(console, plan.manifest.name, plan.budget_s) as display,
        _gpu_telemetry(plan.gpu_minor) as telemetry,
        sandbox.start(spec) as jailed,
    ):
        snapshots = _SnapshotTaker(plan.track.snapshot_every_s, plan.jail_out, plan.run_dir / SNAPSHOTS_DIR,
                                   model_cap, jailed.stdin.fileno())
        outcome = _train(jailed, plan.budget_s, display, launched, snapshots)
        train_returned = time.monotonic()
        if outcome.status not in ("ok", "over_budget"):
            tail = jailed.log_tail(_LOG_TAIL_BYTES)
            if tail.strip() and tail.strip() not in outcome.message:
                outcome.message += "\n--- log tail ---\n" + tail
        if outcome.status == "ok":  # "saved" has killed the jail: nothing writes there any more
            try:
                _take_file(plan.jail_out / MODEL_FILE, plan.run_dir / MODEL_FILE, model_cap)
            except InvalidModel as exc:
                outcome.status, outcome.message = "invalid_model", str(exc)
    outcome.snapshots = snapshots.taken
    if snapshots.taken:
        outcome.timings.update(snapshot_take_s=snapshots.take_s, snapshot_save_s=snapshots.save_s)
    timings.update(outcome.timings, teardown_s=time.monotonic() - train_returned, jail_total_s=time.monotonic() - launched)
    shutil.rmtree(plan.scratch, ignore_errors=True)
    shutil.rmtree(plan.jail_input, ignore_errors=True)
    _write_metrics(plan.run_dir, outcome.metrics_rows)
    if telemetry is not None:
        telemetry.write(plan.run_dir)
        outcome.gpu_telemetry = telemetry.summary()
    return outcome


@contextmanager
def _gpu_telemetry(gpu_minor: int | None) -> Iterator[TelemetrySampler | None]:
    """NVML samples of the jail's GPU while it trains, taken here, outside the jail."""
    if gpu_minor is None:
        yield None
        return
    with TelemetrySampler(gpu_minor) as sampler:
        yield sampler


@dataclass(frozen=True)
class ScoredRun:
    """What scoring found: the score of the run and its validation curve."""

    score: Any  # the ScoreReport of the final model; on a time-to-target track, of the deciding model
    curve: list[dict[str, Any]]  # one point per model taken, in time order
    reached_at_s: float | None  # time-to-target tracks: when the target was first reached


def _score_run(plan: _RunPlan, sandbox, console: Console, outcome: TrainingOutcome) -> ScoredRun:
    """Score the final model and every snapshot with the same code, limits and guarantees.

    Fixed-time track: the final model is the score (scored first; its failure fails the run), a
    snapshot that cannot be scored is a gap in the curve. Time-to-target track: the models in time
    order until one reaches the target; its time is the score, and what comes after it is not
    scored. Each model gets the track's scoring limits; after the first snapshot that cannot be
    scored the other snapshots are skipped, so a model that spends every limit costs the evaluator
    two scorings' time, not one per snapshot. Raises InvalidModel (the deciding model cannot be
    scored) and SandboxUnavailable.
    """
    where = "sealed sandboxes" if sandbox.kind == "nsjail" else "unsandboxed processes"
    console.print(f"scoring on the validation split, streamed, in two passes in {where} ...")
    final = Snapshot(time_s=outcome.train_seconds, path=plan.run_dir / MODEL_FILE)  # taken by _train_in_jail
    models = [*outcome.snapshots, final]
    scores: dict[Path, Any] = {}
    problems: dict[Path, str] = {}

    def score(model: Snapshot, number: int) -> None:
        if model is not final and problems:
            problems[model.path] = "skipped"
            return
        label = "the final model" if model is final else f"snapshot {number} of {len(models) - 1}"
        console.print(f"scoring {label}, taken at {model.time_s:.1f} s", markup=False, highlight=False)
        try:
            scores[model.path] = _score(plan, sandbox, model.path, f"{plan.run_id}-score-{number}")
        except InvalidModel:
            if model is final:
                raise
            problems[model.path] = "invalid_model"

    target = plan.track.target
    reached = None
    if target is None:
        score(final, len(models))
        for number, snapshot in enumerate(outcome.snapshots, 1):
            score(snapshot, number)
    else:
        for number, model in enumerate(models, 1):
            score(model, number)
            if model.path in scores and scores[model.path].val_loss <= target.val_loss:
                reached = model
                break
    curve = []
    for model in models:
        if model.path in scores:
            report = scores[model.path]
            point = {"val_loss": report.val_loss, "val_bpb": report.val_bpb, "scored": "ok"}
        else:
            point = {"val_loss": None, "val_bpb": None, "scored": problems.get(model.path, "not_needed")}
        curve.append({"time_s": round(model.time_s, 2), "model": "final" if model is final else "snapshot", **point})
    deciding = final if reached is None else reached
    return ScoredRun(score=scores[deciding.path], curve=curve, reached_at_s=None if reached is None else round(reached.time_s, 2))


def _score(plan: _RunPlan, sandbox, model_path: Path, name: str):
    """Score one saved model in sealed sandboxes; raises InvalidModel."""
    # Imported here: scoring needs torch, and every other command should start fast.
    from evaluator.scoring import ScoringLimits, score_model

    limits, protocol = plan.track.sandbox, plan.track.eval
    return score_model(
        sandbox=sandbox,
        name=name,
        model_path=model_path,
        submission_dir=plan.staged,
        documents=read_documents(plan.val_path)[:SMOKE_DOCUMENTS] if plan.smoke else read_documents(plan.val_path),
        vocab_size=plan.vocab_size,
        eos_id=plan.eos_id,
        seq_len=protocol["seq_len"],
        batch_size=protocol["batch_size"],
        device=plan.device,
        gpu=None if plan.gpu is None else plan.gpu.board,
        threads=plan.track.threads,
        limits=ScoringLimits(load_s=protocol["load_s"] * plan.deadline_factor,
                             step_s=protocol["step_s"] * plan.deadline_factor,
                             total_s=protocol["time_limit_s"] * plan.deadline_factor,
                             consistency_nats=protocol["consistency_nats"]),
        memory_bytes=limits["memory_mib"] * 2**20,
        pids=limits["pids"],
        debug_log_dir=plan.run_dir if plan.debug_scoring else None,
    )


def _record(plan: _RunPlan, outcome: TrainingOutcome, scored: ScoredRun | None, scoring_seconds: int | None,
            env: dict[str, Any], started: str) -> dict[str, Any]:
    rows = outcome.metrics_rows
    tokens = _last_logged(rows, "tokens")
    reasons = _unofficial_reasons(plan, env["sandbox"], env["gpu"])
    if plan.gpu is not None and plan.gpu.busy_pids:
        pids = ", ".join(map(str, plan.gpu.busy_pids))
        reasons.append(f"GPU {plan.gpu.board.pci_bus_id} had work of other processes when the run started (pids {pids})")
    track = plan.track
    scored = scored if outcome.status in ("ok", "not_reached") else None
    score = None if scored is None else scored.score
    return {
        "schema_version": 6,
        "run_id": plan.run_id,
        "status": outcome.status,
        "message": outcome.message,
        "official": not reasons,
        "unofficial_reasons": reasons,
        "submission": {
            "name": plan.manifest.name,
            "authors": plan.manifest.authors,
            "description": plan.manifest.description,
            "path": shown(plan.folder.resolve()),
            "manifest_sha256": sha256_file(plan.staged / MANIFEST_NAME),
            "tree_sha256": tree_sha256(plan.staged),
        },
        "track": {"id": track.id, "sha256": track.sha256, "budget_s": track.budget_s, "device": track.device_kind,
                  "snapshot_every_s": track.snapshot_every_s},
        "budget_s": plan.budget_s,
        "data": {
            "dataset_id": track.dataset["id"],
            "train_sha256": track.dataset["train"]["sha256"],
            "val_sha256": track.dataset["val"]["sha256"],
            "tokenizer_sha256": track.dataset["tokenizer"]["sha256"],
        },
        "seed": plan.seed,
        "seed_drawn": plan.seed_drawn,
        "calibration": None if plan.calibration is None else plan.calibration.as_dict(),
        "overrides": plan.overrides,
        "smoke": plan.smoke,
        "metrics": None if score is None else {
            "val_loss": score.val_loss,
            "val_bpb": score.val_bpb,
            "val_tokens": score.val_tokens,
            "val_bytes": score.val_bytes,
            "val_documents": score.val_documents,
        },
        "scoring": None if score is None else {
            "protocol": "streamed",
            "passes": score.passes,
            "consistency_nats": track.eval["consistency_nats"],
        },
        "train": {
            "train_seconds": outcome.train_seconds,
            "steps": max((row[1] for row in rows), default=None),
            "tokens": tokens,
            "tokens_per_s": tokens / outcome.train_seconds if tokens and outcome.train_seconds else None,
        },
        "val_curve": None if scored is None else scored.curve,
        "target": None if track.target is None else {
            "val_loss": track.target.val_loss,
            "provisional": track.target.provisional,
            "reached": None if scored is None else scored.reached_at_s is not None,
            "time_s": None if scored is None else scored.reached_at_s,
        },
        "scoring_seconds": None if scored is None else scoring_seconds,
        "environment": env,
        "gpu_telemetry": outcome.gpu_telemetry,
        "started_at": started,
        "ended_at": utc_now(),
    }


def _handle_sigterm(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While a run is under way, SIGTERM unwinds like Ctrl-C, so every jail is killed and its cgroup
    removed; without it SIGTERM would end the process at once and leave the jail running. Only the
    main thread may set handlers: elsewhere the caller's own handling stays."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _handle_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def last_logged_metric(run_dir: Path, key: str) -> float | None:
    """The last value a run logged under `key` (from its metrics.parquet), or None."""
    path = Path(run_dir) / "metrics.parquet"
    if not path.is_file():
        return None
    values = [row["value"] for row in pq.read_table(path).to_pylist() if row["key"] == key]
    return values[-1] if values else None


def evaluate(
    folder: Path,
    *,
    track_id: str | None = None,
    seed: int | None = None,
    secret_seed: bool = False,
    budget_s: float | None = None,
    calibrated_budget: bool = False,
    gpu: int | None = None,
    overrides: dict[str, Any] | None = None,
    smoke: bool = False,
    sandbox_choice: str = "auto",
    runs_dir: Path = RUNS_DIR,
    debug_scoring: bool = False,
    console: Console | None = None,
) -> tuple[dict[str, Any], Path]:
    """One evaluation run: returns the result record (also written as result.json) and the run directory.
    `secret_seed` has the evaluator draw the seed (recorded as `seed_drawn`) instead of taking `seed`.
    `calibrated_budget` times this host first and scales the track's budget and scoring deadlines by
    how much slower it is than the track's hardware (unofficial; docs/CALIBRATION.md).
    `gpu`: CUDA's index of the GPU to hold (default: the first no other run holds).
    `overrides`: merged into the manifest's [config] (`{"d_model": 512}`, tables merged); recorded,
    and the run is unofficial. `smoke`: 10 s of training (unless `budget_s`) and the first 8
    validation documents, to catch a broken contract early; unofficial and never publishable."""
    with _sigterm_unwinds(), ExitStack() as held:
        console = console or Console(stderr=True)
        began = time.monotonic()
        request = RunRequest(folder=Path(folder), track_id=track_id, seed=seed, secret_seed=secret_seed,
                             budget_s=budget_s, calibrated_budget=calibrated_budget, gpu=gpu, runs_dir=runs_dir,
                             debug_scoring=debug_scoring, overrides=dict(overrides or {}), smoke=smoke)
        plan = _plan(request, console, held)
        started = utc_now()
        timings: dict[str, Any] = {}
        scored, scoring_seconds = None, None
        try:
            sandbox = open_sandbox(sandbox_choice)
        except SandboxUnavailable as exc:
            env = environment("nsjail", "unavailable", plan.gpu, (f"nsjail: {exc}",))
            outcome = TrainingOutcome(status="sandbox_error", message=f"nsjail cannot run here: {exc}")
        else:
            env = environment(sandbox.kind, sandbox.version, plan.gpu, sandbox.unavailable)
            label = "nsjail" if sandbox.kind == "nsjail" else "NONE — unsandboxed, unofficial"
            seed_label = f"{plan.seed} (drawn)" if plan.seed_drawn else str(plan.seed)
            console.print(f"[bold]{plan.manifest.name}[/] on [bold]{plan.track.id}[/], seed {seed_label}, budget {plan.budget_s:g} s, sandbox: {label}")
            console.print(f"sandbox: {sandbox.reason}", markup=False, highlight=False)
            for missing in sandbox.unavailable:
                console.print(f"sandbox: could not use {missing}", markup=False, highlight=False)
            timings["prepare_s"] = time.monotonic() - began
            try:
                outcome = _train_in_jail(plan, sandbox, console, timings)
            except SandboxUnavailable as exc:
                outcome = TrainingOutcome(status="sandbox_error", message=f"the training sandbox failed to start: {exc}")
            if outcome.status == "ok":
                scoring_started = time.monotonic()
                try:
                    scored = _score_run(plan, sandbox, console, outcome)
                except InvalidModel as exc:
                    outcome.status, outcome.message = "invalid_model", str(exc)
                except SandboxUnavailable as exc:
                    outcome.status, outcome.message = "sandbox_error", f"the scoring sandbox failed: {exc}"
                else:
                    target = plan.track.target
                    if target is not None and scored.reached_at_s is None:
                        outcome.status = "not_reached"
                        outcome.message = (f"no model reached the target val_loss {target.val_loss:g}; the final "
                                           f"model's is {scored.score.val_loss:.4f}")
                # Whole seconds: how long scoring takes is the model's to choose.
                scoring_seconds = timings["scoring_s"] = round(time.monotonic() - scoring_started)
            shutil.rmtree(plan.jail_out, ignore_errors=True)
            # Scored, their work is done; kept, ten snapshots of a large model would fill a disk.
            shutil.rmtree(plan.run_dir / SNAPSHOTS_DIR, ignore_errors=True)
        record = _record(plan, outcome, scored, scoring_seconds, env, started)
        atomic_write_text(plan.run_dir / "timings.json", json.dumps(timings, indent=2) + "\n")
        write_result(plan.run_dir, record)
        return record, plan.run_dir


def _jail_env(threads: int, home: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONHASHSEED": "0",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }


def summary_line(record: dict[str, Any]) -> str:
    seed = f"{record['seed']} (drawn)" if record["seed_drawn"] else str(record["seed"])
    parts = [f"{record['submission']['name']} seed {seed}: {record['status']}"]
    metrics, target = record["metrics"], record["target"]
    if target and target["reached"]:
        parts.append(f"reached val_loss {target['val_loss']:g} at {target['time_s']:.1f} s")
    if metrics:
        parts.append(f"val_loss {metrics['val_loss']:.4f}  val_bpb {metrics['val_bpb']:.4f}")
    train = record["train"]
    if train["train_seconds"] is not None:
        parts.append(f"train {train['train_seconds']:.1f} s")
    if train["tokens"]:
        parts.append(f"{train['tokens']:,.0f} tokens")
    if not record["official"]:
        parts.append("(unofficial: " + "; ".join(record["unofficial_reasons"]) + ")")
    return "  ".join(parts)


def _base_seed(args: argparse.Namespace) -> int | None:
    """--seed, else the track's default seed; None when the manifest is too broken to tell (evaluate reports it)."""
    if args.seed is not None:
        return args.seed
    track_id = args.track
    if track_id is None:
        manifest, _ = parse_manifest(Path(args.folder))
        if manifest is None:
            return None
        track_id = manifest.track
    return load_track(track_id).seeds["default"]


def _run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    if args.seeds < 1:
        raise UserError("--seeds must be at least 1")
    if args.secret_seeds and args.seed is not None:
        raise UserError("--secret-seeds draws every seed: drop --seed")
    if args.secret_seeds:
        seeds = [None] * args.seeds
    else:
        base_seed = _base_seed(args)
        seeds = [None] if base_seed is None else [base_seed + i for i in range(args.seeds)]
    overrides: dict[str, Any] = {}
    for item in args.set:
        overrides = merge_overrides(overrides, parse_override(item))
    records = []
    for seed in seeds:
        record, run_dir = evaluate(
            Path(args.folder),
            track_id=args.track,
            seed=seed,
            secret_seed=args.secret_seeds,
            budget_s=None if args.budget == CALIBRATED else args.budget,
            calibrated_budget=args.budget == CALIBRATED,
            gpu=args.gpu,
            overrides=overrides,
            smoke=args.smoke,
            sandbox_choice=args.sandbox,
            runs_dir=Path(args.out) if args.out else RUNS_DIR,
            debug_scoring=args.debug_scoring,
            console=console,
        )
        records.append(record)
        console.print(summary_line(record), markup=False, highlight=False)
        if record["status"] != "ok" and record["message"]:
            console.print(record["message"], markup=False, highlight=False)
        console.print(f"run directory: {run_dir}", markup=False, highlight=False)
    if len(records) > 1:
        losses = [r["metrics"]["val_loss"] for r in records if r["metrics"]]
        if losses:
            spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
            console.print(f"val_loss over {len(losses)} of {len(records)} seeds: {statistics.mean(losses):.4f} ± {spread:.4f} (std)")
        times = [r["target"]["time_s"] for r in records if r["target"] and r["target"]["reached"]]
        if records[0]["target"]:
            spread = f" ± {statistics.stdev(times):.1f} (std)" if len(times) > 1 else ""
            mean_time = f": {statistics.mean(times):.1f} s{spread}" if times else ""
            console.print(f"time to target reached by {len(times)} of {len(records)} seeds{mean_time}")
    if args.json:
        print(json.dumps(records[0] if len(records) == 1 else records, indent=2))
    return max(EXIT_CODES[r["status"]] for r in records)


CALIBRATED = "calibrated"


def _budget(text: str) -> float | str:
    if text == CALIBRATED:
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of seconds nor 'calibrated'") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser(
        "run",
        help="train a submission in the sandbox under the budget and score it",
        description=(
            "Check the submission, train it inside nsjail under the track's budget (the evaluator's own "
            "clock, from just before the submission is imported until the model is saved), score the "
            "saved model on the validation split in a second sandbox, and write results/runs/<run-id>/. "
            "On a track that takes snapshots, the evaluator asks for the model every snapshot_every_s and "
            "scores each snapshot too (the validation curve); on a time-to-target track the score is when "
            "the first model reached the target. Exit codes: 0 ok; 1 the run failed through the submission's "
            "fault, or reached no target (not_reached); 2 bad input or an invalid submission; 3 the sandbox "
            "failed (the evaluator's fault)."
        ),
    )
    run.add_argument("folder", metavar="DIR", help="the submission folder")
    run.add_argument("--track", metavar="ID", help="track id (default: the manifest's track)")
    run.add_argument("--seed", type=int, metavar="N", help="seed handed to the submission (default: the track's)")
    run.add_argument("--seeds", type=int, default=1, metavar="N", help="run N seeds in sequence (seed, seed+1, ...) and print mean ± std")
    run.add_argument("--secret-seeds", action="store_true",
                     help="draw each seed from os.urandom instead of the track's public ones; the result records "
                          "it as drawn, and only drawn seeds count for a record on tracks whose record rule says so")
    run.add_argument("--gpu", type=int, metavar="N",
                     help="on a GPU track, the GPU to use, as CUDA numbers them here (after CUDA_VISIBLE_DEVICES); "
                          "default: the first that no other run of this evaluator holds")
    run.add_argument("--budget", type=_budget, metavar="S|calibrated",
                     help="training budget in seconds, or 'calibrated': the track's scaled by this host's speed "
                          "against the track's hardware (evaluator calibrate); any value other than the track's "
                          "makes the run unofficial")
    run.add_argument("--sandbox", choices=["auto", "nsjail", "none"], default="auto",
                     help="auto: nsjail when it works here, else none (says which); nsjail: never falls back; none: plain subprocess, unofficial")
    run.add_argument("--out", metavar="DIR", help=f"where run directories go (default: {shown(RUNS_DIR)}/ in the current folder)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a [config] value for this run (repeatable): a TOML value or a bare word, a dotted "
                          "key reaches into a table, e.g. --set d_model=512 --set optimizer.lr=3e-4; recorded in "
                          "result.json, and the run is unofficial")
    run.add_argument("--smoke", action="store_true",
                     help=f"a quick check of the contract: {SMOKE_BUDGET_S:g} s of training (unless --budget) and "
                          f"{SMOKE_DOCUMENTS} validation documents; unofficial, never publishable")
    run.add_argument("--debug-scoring", action="store_true",
                     help="keep what the model server prints (its stderr) as scoring-pass-N.log in the run directory, "
                          "to debug a model that fails scoring; makes the run unofficial; refused for a private split")
    run.add_argument("--json", action="store_true", help="print the result record (a list with --seeds) on stdout and nothing else there")
    run.set_defaults(handler=_run)

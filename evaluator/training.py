"""The host side of the training jail: the harness's protocol, the clock, progress, taking the models.

The clock (DESIGN.md): it starts when the harness's "start" message arrives, immediately before the
submission's module is imported, and stops when "saved" has been read and the jail killed for it,
so nothing runs after the clock stops. At the budget the jail is killed and the run is
`over_budget`. On a track with snapshots the evaluator takes the model while the clock runs
(`ctx.snapshot`). Nothing the jail says is trusted beyond being a signal.
"""

from __future__ import annotations

import collections
import json
import math
import os
import queue
import shutil
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

from evaluator import in_jail
from evaluator.errors import InvalidModel
from evaluator.harness import MODEL_FILE, SNAPSHOT_FILE
from evaluator.metrics import write_metrics
from evaluator.nvml import TelemetrySampler
from evaluator.paths import PACKAGE_DIR, SPEC_DIR
from evaluator.plan import RunPlan
from evaluator.progress import PlainLines, bar, live
from evaluator.protocol import LINE_MAX_BYTES, Tally, parse_line
from evaluator.sandbox import Jailed, JailSpec, Sandbox

# Interpreter start, `import torch`, device initialisation and data loading happen before the clock;
# they get this long before the run is declared broken.
STARTUP_ALLOWANCE_S = 120.0
# Events read but not yet handled: each is a checked event of at most METRICS_PER_LINE_MAX numbers.
_PROTOCOL_BACKLOG_MAX = 1_000
_LOG_TAIL_BYTES = 3000

# Rows of ctx.log metrics one run may record: a T4 run logging five metrics at every step stays far
# below. The evaluator holds the rows until the run ends, so without a cap a submission flooding the
# protocol with log lines could exhaust the evaluator's memory (outside every jail) and bloat
# metrics.parquet. Rows past the cap are dropped.
_METRICS_ROWS_MAX = 200_000
_COPY_CHUNK = 2**20
SNAPSHOTS_DIR = "snapshots"  # in the run directory: the snapshots taken, until they are scored

# Disk the snapshots of one run may take, in model caps: beyond it, snapshots are refused.
SNAPSHOTS_MAX_MODELS = 4


@dataclass(frozen=True)
class TakenModel:
    """A model the evaluator took out of the jail's reach: a snapshot while the clock ran, or the
    final model the submission saved."""

    time_s: float  # on the evaluator's clock, when its copy was complete: nothing newer is in it
    path: Path
    final: bool = False


@dataclass
class TrainingOutcome:
    """What the training jail did, as facts set while it ran and never rewritten afterwards; the
    run's status is decided from them (and from scoring) by results.decide_status."""

    status: str  # how training ended: "ok" (a model saved within the budget) or the run status it causes
    message: str = ""
    train_seconds: float | None = None
    metrics_rows: list[tuple[float, int, str, float]] = field(default_factory=list)
    timings: dict[str, Any] = field(default_factory=dict)
    gpu_telemetry: dict[str, Any] | None = None
    snapshots: list[TakenModel] = field(default_factory=list)
    final_model: TakenModel | None = None  # the model saved in time, once taken out of the jail's reach
    model_refused: str | None = None  # why the model saved in time could not be taken (InvalidModel)
    refused_lines: int = 0  # protocol lines outside the grammar (evaluator/protocol.py), dropped
    received: dict[str, Any] | None = None  # the CPU time the jail received while the clock ran (_ReceivedCpu)


class _ReaderFailed:
    """What the reader thread hands the main loop when it fails: the evaluator's own error, which the
    main loop raises (evaluate() then writes an evaluator_error result)."""

    def __init__(self, error: BaseException):
        self.error = error


def _read_protocol(
    stream, events: queue.Queue, stop_clock: Callable[[], float], stop: threading.Event, tally: Tally
) -> None:
    """Reader thread: every line from the jail that the grammar (evaluator/protocol.py) accepts
    becomes (arrival time, event); the rest are counted in `tally` and dropped.

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

    try:
        while True:
            line = stream.readline(LINE_MAX_BYTES + 1)
            if not line:
                break
            if len(line) > LINE_MAX_BYTES or not line.endswith(b"\n"):
                # An oversized line is refused whole: skip to its end, holding at most a line's worth.
                while line and not line.endswith(b"\n"):
                    line = stream.readline(LINE_MAX_BYTES)
                tally.lines += 1
                tally.refused += 1
                continue
            event = parse_line(line, tally)
            if event is not None:
                arrived = stop_clock() if event["event"] == "saved" else time.monotonic()
                if not put((arrived, event)):
                    return
        put((time.monotonic(), None))
    except Exception as error:  # the evaluator's own failure, never the jail's: its lines cannot raise here
        put((time.monotonic(), _ReaderFailed(error)))


class _LiveDisplay:
    """The budget's progress with the last step, loss and tokens/s the submission logged: a bar where
    the console redraws in place, else a plain line every tenth of the budget (at least 5 s apart)."""

    def __init__(self, console: Console, label: str, budget_s: float):
        self.budget_s = budget_s
        self.label = label
        self.lines = None if live(console) else PlainLines(console, every_s=max(5.0, budget_s / 10))
        self.progress = bar(
            console,
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:>5.1f}/{task.total:g} s"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
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


class _ReceivedCpu:
    """The compute the training jail received while the clock ran, against what it asked for: its
    cgroup's CPU time over the CPU time its threads wanted (how many were running or waiting for a
    CPU, sampled ten times a second, at most its CPUs at once). A busy host shows as a jail that
    wants CPUs and gets less; a submission that leaves its threads idle asks for less, and is not
    taken for one. Sampled as the run goes, so that progress says so while it happens."""

    SAMPLE_EVERY_S = 0.1
    WINDOW_S = 5.0  # the live figure covers about this much of the latest wall time

    def __init__(self, jailed: Jailed, cpus: int, min_share: float | None):
        self.jailed, self.cpus, self.min_share = jailed, cpus, min_share
        self.started: tuple[float, float] | None = None  # (monotonic time, CPU seconds) when the clock started
        self.stopped_at: float | None = None
        self.demand_s = 0.0
        self._window: collections.deque[tuple[float, float, float]] = collections.deque()  # (time, CPU, demand)
        self._note = ""

    def start(self, at: float) -> None:
        cpu = self.jailed.cpu_seconds() if self.min_share is not None else None
        if cpu is not None:
            self.started = (at, cpu)
            self._window.append((at, cpu, 0.0))

    def stop(self, at: float) -> None:
        if self.stopped_at is None:
            self.stopped_at = at

    def sample(self) -> None:
        """Count the jail's runnable threads, at most every SAMPLE_EVERY_S."""
        now = time.monotonic()
        if self.started is None or self.stopped_at is not None or now - self._window[-1][0] < self.SAMPLE_EVERY_S:
            return
        runnable, cpu = self.jailed.runnable_threads(), self.jailed.cpu_seconds()
        if runnable is None or cpu is None:
            return
        self.demand_s += min(runnable, self.cpus) * (now - self._window[-1][0])
        self._window.append((now, cpu, self.demand_s))
        while len(self._window) > 2 and now - self._window[1][0] >= self.WINDOW_S:
            self._window.popleft()

    def live_note(self) -> str:
        """ "host busy: got 41% of the CPU it asked for" while the latest seconds' share is below the
        track's, else ""."""
        self.sample()
        if self.min_share is None or len(self._window) < 2:
            return self._note
        (then, cpu_then, demand_then), (now, cpu, demand) = self._window[0], self._window[-1]
        if now - then < self.WINDOW_S / 2 or demand <= demand_then:
            return self._note
        share = (cpu - cpu_then) / (demand - demand_then)
        self._note = f"host busy: got {share:.0%} of the CPU it asked for" if share < self.min_share else ""
        return self._note

    def received(self, train_seconds: float | None) -> dict[str, Any] | None:
        """The figures for the result, once the jail is dead (so its CPU time is final)."""
        if self.started is None:
            return None
        wall_s = train_seconds if train_seconds is not None else (self.stopped_at or time.monotonic()) - self.started[0]
        cpu = self.jailed.cpu_seconds()
        if cpu is None or wall_s <= 0:
            return None
        used = max(0.0, cpu - self.started[1])
        # Nothing asked for, nothing withheld; sampling can put what was received a little above it.
        share = 1.0 if self.demand_s <= 0 else min(1.0, used / self.demand_s)
        return {
            "cpu_s": round(used, 2),
            "wall_s": round(wall_s, 2),
            "cpus": self.cpus,
            "demand_s": round(self.demand_s, 2),
            "share": round(share, 3),
            "min_share": self.min_share,
        }


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

    Whatever the jail says, a snapshot is taken only when one is due on this clock and within the
    window after its due time (one per interval: an interval whose window passed has none), from a
    plain, dense file under the model cap, while the run's snapshots stay under
    SNAPSHOTS_MAX_MODELS model caps of disk; the copy goes where the jail cannot reach, the jail's
    file is removed, and the snapshot is stamped when the copy is complete (or when the jail died,
    if that was earlier), so it holds nothing trained after its time, and never before the window's
    end, so a submission gains nothing by choosing its moment in the window. A line when none is
    due costs a refusal and nothing else. Answers are written without blocking: a jail that does
    not read them cannot stall the clock.
    """

    def __init__(
        self, every_s: float | None, window_s: float | None, jail_out: Path, into: Path, cap_bytes: int, answers_fd: int
    ):
        self.every_s, self.window_s = every_s, window_s
        self.next_due_s = every_s
        self.jail_out, self.into, self.cap_bytes = jail_out, into, cap_bytes
        self.bytes_left = SNAPSHOTS_MAX_MODELS * cap_bytes
        self.answers_fd = answers_fd
        os.set_blocking(answers_fd, False)
        self.jail_dead_at: float | None = None  # set by the protocol's reader when it kills the jail
        self.taken: list[TakenModel] = []
        self.take_s: list[float] = []  # how long each copy took here
        self.save_s: list[float] = []  # the harness's account of saving it (advisory)

    def handle(self, event: dict[str, Any], started_at: float, arrived: float) -> str | None:
        """Answers the jail; returns a line for the progress display when a snapshot was taken."""
        taken = None
        elapsed = arrived - started_at
        if self.next_due_s is not None and elapsed >= self.next_due_s:
            # A due time comes from every_s, and the plan sets window_s whenever it sets every_s.
            assert self.every_s is not None and self.window_s is not None
            interval = math.floor(elapsed / self.every_s)
            window_end = interval * self.every_s + self.window_s
            if elapsed <= window_end:
                taken = self._take(started_at, not_before_s=window_end)
            if taken is not None or elapsed > window_end:  # taken, or too late: the next interval's turn
                self.next_due_s = (interval + 1) * self.every_s
            if taken is not None:
                self.take_s.append(time.monotonic() - arrived)
                if event["save_s"] <= taken.time_s:
                    self.save_s.append(event["save_s"])
        answer = json.dumps({"taken": taken is not None, "next_due_s": self.next_due_s}) + "\n"
        try:
            os.write(self.answers_fd, answer.encode())  # < PIPE_BUF: written whole or not at all
        except OSError:  # a full pipe (a jail that does not read) or a closed one
            pass
        return None if taken is None else f"snapshot {len(self.taken)} taken at {taken.time_s:.1f} s"

    def _take(self, started_at: float, not_before_s: float) -> TakenModel | None:
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
        # A copy that ends after the jail's death holds nothing newer than the death. Stamped no
        # earlier than the window's end; train_in_jail leaves out a snapshot stamped at or after the
        # final model's time (the final model holds more training at that time).
        stamp = time.monotonic() if self.jail_dead_at is None else min(time.monotonic(), self.jail_dead_at)
        taken = TakenModel(time_s=max(stamp - started_at, not_before_s), path=target)
        self.bytes_left -= target.stat().st_size
        self.taken.append(taken)
        return taken


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # e.g. a directory of that name, which only the submission can have made
        pass


@dataclass(frozen=True)
class _Watch:
    """What the host holds while a training jail runs: the jail, its budget, and what follows it."""

    jailed: Jailed
    budget_s: float
    display: _LiveDisplay
    launched_at: float  # when the jail was started: the harness's startup allowance counts from here
    snapshots: _SnapshotTaker
    meter: _ReceivedCpu


def _train(watch: _Watch) -> TrainingOutcome:
    jailed, snapshots, meter = watch.jailed, watch.snapshots, watch.meter
    events: queue.Queue = queue.Queue(maxsize=_PROTOCOL_BACKLOG_MAX)
    stop = threading.Event()

    def stop_clock() -> float:
        jailed.kill()
        snapshots.jail_dead_at = time.monotonic()
        return snapshots.jail_dead_at

    tally = Tally()
    reader = threading.Thread(target=_read_protocol, args=(jailed.stdout, events, stop_clock, stop, tally), daemon=True)
    reader.start()
    try:
        outcome = _follow_protocol(events, watch)
        outcome.refused_lines = tally.refused
        outcome.received = meter.received(outcome.train_seconds)
        return outcome
    finally:
        stop.set()


def _follow_protocol(events: queue.Queue, watch: _Watch) -> TrainingOutcome:
    jailed, budget_s, display, snapshots, meter = (
        watch.jailed,
        watch.budget_s,
        watch.display,
        watch.snapshots,
        watch.meter,
    )
    launched_at = watch.launched_at
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
        if isinstance(event, _ReaderFailed):
            raise RuntimeError("the protocol's reader failed") from event.error
        if event is None:
            outcome.message = "the harness ended before the submission was started"
            return outcome
        if event["event"] == "start":
            started_at = arrived
            meter.start(arrived)
            outcome.timings["launch_to_start_s"] = arrived - launched_at
            outcome.timings.update({f"harness_{k}": v for k, v in event["phases"].items()})
            display.update(0.0, "importing submission")

    # Phase 2: the clock runs.
    deadline = started_at + budget_s
    last_step: int | None = None
    last_metrics: dict[str, float] = {}
    tokens_per_s: float | None = None
    error_event = None

    def status() -> str:
        return "  ".join(filter(None, (_status_text(last_step, last_metrics, tokens_per_s), meter.live_note())))

    while True:
        meter.sample()
        now = time.monotonic()
        if now >= deadline:
            jailed.kill()
            meter.stop(deadline)
            outcome.status = "over_budget"
            outcome.message = f"did not save a model within the {budget_s:g} s budget; stopped at the budget"
            return outcome
        try:
            arrived, event = events.get(timeout=min(_ReceivedCpu.SAMPLE_EVERY_S, deadline - now))
        except queue.Empty:
            display.update(time.monotonic() - started_at, status())
            continue
        if isinstance(event, _ReaderFailed):
            raise RuntimeError("the protocol's reader failed") from event.error
        if event is None:
            meter.stop(arrived)
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
            step, clean = event["step"], event["metrics"]
            rows = [(elapsed, step, key, value) for key, value in clean.items()]
            outcome.metrics_rows.extend(rows[: max(0, _METRICS_ROWS_MAX - len(outcome.metrics_rows))])
            last_step, last_metrics = step, clean
            if "tokens" in clean and elapsed > 0:
                tokens_per_s = clean["tokens"] / elapsed
            display.update(elapsed, status())
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
    elif error_event is not None and error_event["kind"] == "over_budget":
        outcome.status, outcome.message = "over_budget", error_event["message"][:4000]
    elif ended.reason == "pids_limit":
        outcome.status, outcome.message = "crashed", "hit the track's limit on processes and threads"
    elif error_event is not None:
        outcome.status, outcome.message = "crashed", error_event["message"][-4000:]
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


def hidden_from_training(val_path: Path, hidden_split: Path | None) -> list[Path]:
    """What holds a validation split, or could: the package, the home's spec/, the splits' folders,
    what a checkout the package runs from holds besides (its git objects, build and dist output),
    and the home of every other installed copy in the Python installs a jail binds. The sandbox
    covers those a bound directory holds."""
    hidden = [
        PACKAGE_DIR,
        SPEC_DIR.resolve(),
        val_path.parent,
        *([] if hidden_split is None else [hidden_split.parent]),
    ]
    checkout = PACKAGE_DIR.parent
    if (checkout / "pyproject.toml").is_file():
        hidden += [checkout / name for name in ("spec", ".git", "build", "dist")]
    prefixes = dict.fromkeys(
        [
            Path(sys.prefix),
            Path(sys.base_prefix),
            Path(sys.executable).resolve().parent.parent,
            Path("/usr"),
            Path("/usr/local"),
        ]
    )
    for prefix in prefixes:
        for pattern in ("lib/python3*/*-packages/evaluator/_home", "local/lib/python3*/*-packages/evaluator/_home"):
            hidden += prefix.glob(pattern)
    return hidden


def train_in_jail(plan: RunPlan, sandbox: Sandbox, console: Console, timings: dict[str, float]) -> TrainingOutcome:
    limits = plan.track.sandbox
    model_cap = limits.model_mib * 2**20
    spec = JailSpec(
        name=f"{plan.run_id}-train",
        argv=[sys.executable, "-m", "evaluator.harness", "--job", str(plan.job_path)],
        workdir=plan.run_dir / "sandbox",
        cwd=plan.scratch,
        env=in_jail.environment(
            plan.track.device.threads,
            home=str(plan.scratch),
            python_path=plan.jail_input,
            TMPDIR="/tmp",
            LANG="C.UTF-8",
            PYTHONDONTWRITEBYTECODE="1",
            PYTHONUNBUFFERED="1",
            PYTHONHASHSEED="0",
        ),
        ro_paths=[plan.staged, plan.jail_input, plan.job_path],
        hidden_paths=hidden_from_training(plan.val_path, plan.hidden_path),
        distributions=("pyarrow",),  # the training split's reader (evaluator/dataset/loader.py)
        rw_paths=[plan.jail_out],
        tmpfs={plan.scratch: limits.scratch_mib * 2**20},
        memory_bytes=limits.memory_mib * 2**20,
        pids=limits.pids,
        time_limit_s=STARTUP_ALLOWANCE_S + plan.budget_s + limits.grace_s,
        log_path=plan.run_dir / "train.log",
        log_cap_bytes=limits.log_mib * 2**20,
        gpu_index=plan.gpu_minor,
        gpu_uuid=None if plan.gpu is None else plan.gpu.board.uuid,
        max_file_bytes=model_cap,  # no file in the jail needs to outgrow the model
        cpus=plan.track.device.threads,  # the track's thread count is CPU time, not a request the code may ignore
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
        snapshots = _SnapshotTaker(
            plan.track.snapshot_every_s,
            plan.snapshot_window_s,
            plan.jail_out,
            plan.run_dir / SNAPSHOTS_DIR,
            model_cap,
            jailed.stdin.fileno(),
        )
        meter = _ReceivedCpu(jailed, plan.track.device.threads, plan.track.device.min_cpu_share)
        outcome = _train(_Watch(jailed, plan.budget_s, display, launched, snapshots, meter))
        train_returned = time.monotonic()
        if outcome.status not in ("ok", "over_budget"):
            tail = jailed.log_tail(_LOG_TAIL_BYTES)
            if tail.strip() and tail.strip() not in outcome.message:
                outcome.message += "\n--- log tail ---\n" + tail
        if outcome.status == "ok":  # "saved" has killed the jail: nothing writes there any more
            assert outcome.train_seconds is not None  # set with "ok", from the "saved" event
            try:
                _take_file(plan.jail_out / MODEL_FILE, plan.run_dir / MODEL_FILE, model_cap)
            except InvalidModel as exc:
                outcome.model_refused = str(exc)
            else:
                outcome.final_model = TakenModel(outcome.train_seconds, plan.run_dir / MODEL_FILE, final=True)
    # A snapshot stamped at or after the final model's time holds less training than it at no earlier
    # time: it is left out (the final model is scored in any case).
    outcome.snapshots = [
        snapshot
        for snapshot in snapshots.taken
        if outcome.train_seconds is None or snapshot.time_s < outcome.train_seconds
    ]
    if snapshots.taken:
        outcome.timings.update(snapshot_take_s=snapshots.take_s, snapshot_save_s=snapshots.save_s)
    timings.update(
        outcome.timings, teardown_s=time.monotonic() - train_returned, jail_total_s=time.monotonic() - launched
    )
    shutil.rmtree(plan.scratch, ignore_errors=True)
    shutil.rmtree(plan.jail_input, ignore_errors=True)
    write_metrics(plan.run_dir, outcome.metrics_rows)
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

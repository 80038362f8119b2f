"""Host side of scoring: streams the validation split through sealed model servers, twice, and
computes val_loss and val_bpb. Honest by construction, not by audit.

The saved model is never unpickled here: `evaluator.model_server` loads it inside a jail whose whole
filesystem is a memory-backed image of what it needs (the Python install, torch, the evaluator's
in-jail modules and the submission; no model file, no data, no network, nothing writable), one fresh
batch process per batch, from a sealed memfd copy of the model the host sent (ScoringSession: one
image and one server per pass for every model of a run). Everything coming back is untrusted: the
reply header's kind and sizes, the exact [rows, vocab] shape, a float dtype that never changes, the
byte count, and finite logits once cast to float32.

Windows. Each document is scored on its own: inputs `[eos] + tokens[:-1]`, targets `tokens`. A
document longer than `seq_len` is cut into consecutive non-overlapping windows of `seq_len`
positions (the last one shorter); each window is one row, so a token's context is everything from
the start of its window.

Streaming. A batch's rows advance in lockstep, one position per step: the evaluator sends each
live row's input token at position t, receives the logits for position t, and only then sends the
token at t+1 (which is the target just scored). Nothing announces the future: no lengths, no
padding; a row is dropped (KEEP) only after its last prediction has been received. So no model
can read a token before its prediction for it is recorded, whatever its code does.

No state between documents. A batch process has seen no other batch (see model_server). Rows of
one batch share a process, so the whole split is scored twice, in two independent compositions
(which windows share a batch, the order of rows and of batches, drawn from a secret seed that is
never recorded) in two separate jails; two windows of one document never share a batch. Each
document's log-likelihood must agree between the passes within the track's
`consistency_nats` (an absolute number of nats per document, measured on honest models; nothing
the model returns can move it), and the mean difference per token within a hundredth of that.
The score is the mean of the two passes.

Deadlines (the track's `[eval]`): `load_s` from asking for a batch process to its READY (the model's
unpickling and `decoder()`), `step_s` for each step's reply, `time_limit_s` for all of a model's
scoring, both passes (the session's image and servers are the evaluator's work, not the model's; a
server that replaces one a model failed in starts before the next model's clock). They leave no room
to train after the clock: whatever a model computes in scoring starts again from the model file for
every batch. On the CPU they count the scoring jails' CPU time over their threads (their cgroups'
account), not the wall clock: a busy host makes scoring slower, never a model invalid. A model that
waits instead of computing uses no CPU time, so the wall clock stays as a backstop,
WALL_BACKSTOP_FACTOR times each deadline, not counting the host's time: what it kept the jails from
a CPU they asked for, and the evaluator's own turns (a host so busy that a stage passes
BUSY_HOST_WALL_FACTOR times its deadline fails the run as the evaluator's, `sandbox_error`). On a
GPU they count wall time: the work is the GPU's, which CPU time does not measure (a GPU run's host
load shows in its NVML telemetry instead).

Sealed output. Nothing the model writes reaches anyone: the servers' stderr is discarded (kept in
a file only when the operator asks for it, which makes the run unofficial), and every failure is
one of the fixed sentences below, with no position, shape, size or text the model chose.
"""

from __future__ import annotations

import fcntl
import math
import os
import random
import secrets
import select
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from evaluator import in_jail
from evaluator.dataset.loader import Document
from evaluator.errors import InvalidModel
from evaluator.model_server import (
    CLOSE,
    CLOSED,
    ENDED,
    ERROR,
    KEEP,
    LOAD_ERROR,
    LOGIT_DTYPES,
    LOGITS,
    MODEL,
    OPEN,
    OUTPUT_ERROR,
    PIDS_PER_BATCH,
    PROCESSES_ERROR,
    READY,
    REPLY_HEADER,
    REQUEST_HEADER,
    STARTED,
    STEP,
    TAMPERED_ERROR,
)
from evaluator.nvml import Board
from evaluator.sandbox import Jailed, JailSpec, Sandbox, SandboxUnavailable
from evaluator.tracks import BUSY_HOST_WALL_FACTOR, WALL_BACKSTOP_FACTOR

TORCH_DTYPES = {name: getattr(torch, name) for name in LOGIT_DTYPES}
# The server's own start (interpreter, `import torch`) is the evaluator's work, not the model's.
SERVER_START_S = 120.0
# How long the server may take to kill and reap a batch; the model can slow it only by its own
# processes, which the kill ends.
CLOSE_S = 10.0
# The sandbox's own hard limit fires this long after the evaluator's deadline, so that a stall is
# reported by the evaluator rather than seen as a killed server.
SANDBOX_BACKSTOP_S = 5.0
# Past a deadline's wall time, a CPU-time deadline is looked at again at least this often.
RECHECK_S = 0.05
PASSES = 2
OMP_SPIN_COUNT = 30_000
PIPE_BYTES = 1 << 20
# The mean per-token difference between the passes may be at most this share of the per-document
# tolerance (with tolerance ~1e-3 nats that is 1e-5 nats/token, far below a record's 0.005).
MEAN_SHARE_OF_TOLERANCE = 0.01
SCORE_DECIMALS = 4  # val_loss and val_bpb are published to 1e-4: a model's score is a channel too


class Refusal:
    """The fixed sentences a failing model gets: no text, number or position of its choosing."""

    LOAD_FAILED = "the saved model could not be loaded in the scoring sandbox, or its decoder() failed"
    STEP_FAILED = (
        "the model raised an exception while scoring (a forward that returns a tuple fails this way; "
        "`evaluator run --debug-scoring` keeps the traceback)"
    )
    BAD_OUTPUT = "the model returned something other than logits of shape [rows, vocab_size] in a float dtype"
    BAD_SHAPE = "the model returned logits of the wrong shape (expected one row of vocab_size logits per live row)"
    DTYPE_CHANGED = "the model changed the dtype of its logits while scoring"
    NON_FINITE = "the model returned logits that are not finite in float32 (NaN, inf, or out of float32's range)"
    PROTOCOL = "the model's batch process broke the scoring protocol"
    ENDED = "the model's batch process ended while scoring"
    PROCESSES = f"the model used more than {PIDS_PER_BATCH} process and thread ids in one batch"
    TAMPERED = (
        "the model changed what the next batch process would inherit from the scoring server (its "
        "resource limits, CPU affinity, priority or pipes)"
    )
    OUT_OF_MEMORY = "the model ran out of memory while scoring (the track's limit is {memory_mib:g} MiB)"
    PIDS_LIMIT = "the model exceeded the track's limit on processes and threads while scoring"
    LOAD_TIMEOUT = "loading the model took longer than the track's {seconds:g} s"
    STEP_TIMEOUT = "a scoring step took longer than the track's {seconds:g} s"
    TOTAL_TIMEOUT = "scoring took longer than the track's {seconds:g} s in all"
    # Appended to a timeout: what the deadline counted, and how much was used.
    OF_CPU_TIME = " of CPU time per thread (it used {used:.0f} s)"
    OF_WALL_TIME = " (it used {used:.0f} s)"
    BACKSTOP = (
        " of wall time x {factor}, not counting the host's (the backstop of a CPU-time deadline: it "
        "used {used:.0f} s of CPU time per thread)"
    )
    # Not the model's failure (SandboxUnavailable): the host gave the scoring jails too little CPU.
    BUSY_HOST = (
        " of wall time x {factor}, most of it waiting for a CPU the host was busy with (it used "
        "{used:.0f} s of CPU time per thread): the host is too busy to score on"
    )
    INCONSISTENT = (
        "the model's scores depend on which other documents it is scored with: two independent "
        "scoring passes disagree by more than the track's tolerance of {tolerance:g} nats"
    )


@dataclass(frozen=True)
class ScoringLimits:
    """The track's scoring deadlines and consistency tolerance."""

    load_s: float
    step_s: float
    total_s: float
    consistency_nats: float


@dataclass(frozen=True)
class ScoreReport:
    val_loss: float
    val_bpb: float
    val_tokens: int
    val_bytes: int
    val_documents: int
    passes: int
    seconds: float


@dataclass
class ScoringUsage:
    """What one model's scoring used, filled in as it goes (so that a failed scoring has it too)."""

    cpu_s: float | None = None  # the scoring jails' CPU time, where the deadlines counted it; else None


@dataclass(frozen=True)
class _Window:
    doc_id: str
    inputs: list[int]
    targets: list[int]


class _Clock:
    """The time a deadline charges to the model: what the scoring jails' CPU time grew by since the
    model's scoring began, where `cpu` (the CPU device, jails with cgroups); else the wall clock. A
    stage is charged its own jail's time over that jail's threads, all of scoring every jail's over
    the track's threads (a budget of CPU work, however the passes share them).

    On the CPU it also counts how long the jails' threads waited for a CPU they asked for (runnable
    threads, at most a jail's quota, sampled at random moments about ten times a second, less the CPU
    time they got): wall time a busy host withheld, which the wall-clock backstop does not count,
    nor the evaluator's own turns (scoring each step's logits), which a busy host stretches too. A
    thread that waits for a CPU the host gives it at once is running, and charged: only contention
    from outside the jail shows as withheld."""

    SAMPLE_EVERY_S = (0.05, 0.15)  # random, so that a model cannot be runnable exactly when looked at

    def __init__(self, threads: int, jail_threads: int, jails: list[Jailed], cpu: bool, side_by_side: bool):
        self.threads, self.jail_threads, self.jails = threads, jail_threads, jails
        self.at_once = len(jails) if side_by_side else 1  # passes that run, and wait for the evaluator, at once
        readings = [jailed.cpu_seconds() for jailed in jails]
        self.cpu = cpu and None not in readings  # no cgroup (--sandbox none without root): nothing to count
        self._began = {id(jailed): reading or 0.0 for jailed, reading in zip(jails, readings, strict=True)}
        self._demand = {id(jailed): 0.0 for jailed in jails}  # CPU seconds asked for since the model began
        self._evaluators_s = 0.0  # the evaluator's turns, per pass
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._sampler = threading.Thread(target=self._sample, name="scoring-demand", daemon=True)

    def start(self) -> None:
        """Start sampling (on the CPU); close() stops it."""
        if self.cpu:
            self._sampler.start()

    def close(self) -> None:
        self._stopped.set()
        if self._sampler.is_alive():
            self._sampler.join()

    def _sample(self) -> None:
        last = time.monotonic()
        while not self._stopped.wait(random.uniform(*self.SAMPLE_EVERY_S)):
            now = time.monotonic()
            for jailed in self.jails:
                try:
                    runnable = jailed.runnable_threads() or 0
                except Exception:  # whatever a jail's threads make of their names: never the evaluator's failure
                    runnable = 0
                self._demand[id(jailed)] += min(runnable, self.jail_threads) * (now - last)
            last = now

    def cpu_seconds(self, jailed: Jailed | None = None) -> float:
        """CPU time `jailed` (default: every jail) used since the model's scoring began (a closed
        jail's account is final)."""
        counted = self.jails if jailed is None else [jailed]
        return sum((each.cpu_seconds() or 0.0) - self._began[id(each)] for each in counted)

    def charged(self, jailed: Jailed | None = None) -> float:
        """A stage's jail's CPU time over that jail's threads; all of scoring's over the track's."""
        if not self.cpu:
            return time.monotonic()
        return self.cpu_seconds(jailed) / (self.threads if jailed is None else self.jail_threads)

    def evaluators_turn(self, seconds: float) -> None:
        """A pass's stream spent `seconds` on its own work (no pipe: the model cannot stretch it)
        while its batch process waited for it."""
        with self._lock:
            self._evaluators_s += seconds / self.at_once

    def not_the_models(self, jailed: Jailed | None = None) -> float:
        """Wall time since the model's scoring began that was not the model's: what the host withheld
        from `jailed`'s threads (what they asked for and did not get); for all of scoring (`jailed`
        None), every jail's over the quotas of the passes that run at once, and the evaluator's turns."""
        if jailed is not None:
            return max(0.0, self._demand[id(jailed)] - self.cpu_seconds(jailed)) / self.jail_threads
        withheld = sum(max(0.0, self._demand[id(each)] - self.cpu_seconds(each)) for each in self.jails)
        return withheld / (self.jail_threads * self.at_once) + self._evaluators_s


@dataclass(frozen=True)
class _Limit:
    seconds: float
    wall_start: float
    charged_start: float | None  # None: a wall-clock limit (the evaluator's own work, or no CPU clock)
    excused_start: float  # the clock's not_the_models() when the limit began
    sentence: str
    jailed: Jailed | None = None  # the jail whose time a stage's limit charges; None: every jail's (all of scoring)


class _Deadlines:
    def __init__(self, limits: ScoringLimits, clock: _Clock):
        self.limits, self.clock = limits, clock
        self._total = self._limit(limits.total_s, Refusal.TOTAL_TIMEOUT.format(seconds=limits.total_s), None)

    def _limit(self, seconds: float, sentence: str, jailed: Jailed | None) -> _Limit:
        charged, excused = (
            (self.clock.charged(jailed), self.clock.not_the_models(jailed)) if self.clock.cpu else (None, 0.0)
        )
        return _Limit(seconds, time.monotonic(), charged, excused, sentence, jailed)

    @staticmethod
    def wall(seconds: float, sentence: str) -> tuple[_Limit, ...]:
        """A limit on the evaluator's own work (a server's start), on the wall clock."""
        return (_Limit(seconds, time.monotonic(), None, 0.0, sentence),)

    def until(self, seconds: float | None, sentence: str, jailed: Jailed | None = None) -> tuple[_Limit, ...]:
        """The limits a wait starts under: `seconds` of `jailed`'s time (missing it is `sentence`) and
        all of scoring's."""
        return (self._total,) if seconds is None else (self._limit(seconds, sentence, jailed), self._total)


def _wait_s(deadlines: _Deadlines | None, limits: tuple[_Limit, ...]) -> float:
    """How long to wait before looking again; InvalidModel for a limit used up. The jails' CPU time
    over the track's threads cannot outrun the wall clock (their quotas add up to at most the track's
    threads), so a limit's CPU time is read only once its seconds have passed on the wall clock.
    The backstop of a CPU-time limit counts the wall time that was the model's (_Clock.not_the_models);
    a host that withholds so much that even the whole wall clock's cap passes fails the evaluator
    (SandboxUnavailable), not the model. Outside a model's scoring (`deadlines` None) every limit is
    a wall-clock one."""
    now, wait = time.monotonic(), math.inf
    for limit in limits:
        waited = now - limit.wall_start
        if limit.charged_start is None:
            if waited >= limit.seconds:
                raise InvalidModel(limit.sentence + Refusal.OF_WALL_TIME.format(used=waited))
            wait = min(wait, limit.seconds - waited)
            continue
        if waited < limit.seconds:
            wait = min(wait, limit.seconds - waited)
            continue
        # A limit on charged time comes from the model's _Deadlines, which the stream holds by then.
        assert deadlines is not None
        clock = deadlines.clock
        used = clock.charged(limit.jailed) - limit.charged_start
        if used >= limit.seconds:
            raise InvalidModel(limit.sentence + Refusal.OF_CPU_TIME.format(used=used))
        if waited >= limit.seconds * BUSY_HOST_WALL_FACTOR:
            raise SandboxUnavailable(limit.sentence + Refusal.BUSY_HOST.format(factor=BUSY_HOST_WALL_FACTOR, used=used))
        idle = waited - (clock.not_the_models(limit.jailed) - limit.excused_start)
        backstop = limit.seconds * WALL_BACKSTOP_FACTOR
        if idle >= backstop:
            raise InvalidModel(limit.sentence + Refusal.BACKSTOP.format(factor=WALL_BACKSTOP_FACTOR, used=used))
        wait = min(wait, max(min(limit.seconds - used, backstop - idle), RECHECK_S))
    return wait


class _Stream:
    """One model server: requests out, checked replies back, every read and write under a deadline."""

    def __init__(self, jailed: Jailed, vocab_size: int, memory_bytes: int):
        self.jailed = jailed
        self.deadlines: _Deadlines | None = None  # the model's, set before each model
        self._vocab_size = vocab_size
        self._memory_bytes = memory_bytes
        self._requests = jailed.stdin.fileno()
        self._replies = jailed.stdout.fileno()
        os.set_blocking(self._requests, False)
        # One step's logits (rows x vocab x 4 bytes, 512 KiB on the CPU track) in as few pipe
        # round trips as the host allows: each 64 KiB default buffer costs two context switches.
        for fd in (self._requests, self._replies):
            try:
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            except OSError:  # above /proc/sys/fs/pipe-max-size for an unprivileged evaluator
                pass
        self.dtype_name: str | None = None  # the current model's, from its first logits
        self._payload = bytearray()

    def send(self, op: int, values: Sequence[int], deadline: tuple[_Limit, ...]) -> None:
        self._write(REQUEST_HEADER.pack(op, len(values)) + struct.pack(f"<{len(values)}q", *values), deadline)

    def send_bytes(self, op: int, data: bytes, deadline: tuple[_Limit, ...]) -> None:
        """A request whose n counts bytes, not int64 values (MODEL)."""
        self._write(REQUEST_HEADER.pack(op, len(data)), deadline)
        self._write(data, deadline)

    def _write(self, data, deadline: tuple[_Limit, ...]) -> None:
        view = memoryview(data)
        while view:
            _, writable, _ = select.select([], [self._requests], [], self._left(deadline))
            if not writable:
                continue
            try:
                view = view[os.write(self._requests, view) :]
            except BlockingIOError:
                continue
            except BrokenPipeError:
                raise self._ended() from None

    def expect(self, kind: int, deadline: tuple[_Limit, ...], code: int = 0, rows: int = 0) -> None:
        """The next reply is `kind`; for CLOSED, with the nonce the host sent (`code`, `rows`), which
        a batch process forging one on the shared reply pipe has never seen."""
        got, got_code, got_rows, _ = self._header(deadline)
        if got != kind:
            raise self._unexpected(got, got_code)
        if kind == CLOSED and (got_code, got_rows) != (code, rows):
            raise InvalidModel(Refusal.PROTOCOL)

    def logits(self, rows: int, deadline: tuple[_Limit, ...]) -> torch.Tensor:
        """The next reply as float32 logits [rows, vocab], checked."""
        got, code, got_rows, vocab = self._header(deadline)
        if got != LOGITS:
            raise self._unexpected(got, code)
        if code >= len(LOGIT_DTYPES):
            raise InvalidModel(Refusal.BAD_OUTPUT)
        if (got_rows, vocab) != (rows, self._vocab_size):
            raise InvalidModel(Refusal.BAD_SHAPE)
        dtype_name = LOGIT_DTYPES[code]
        if self.dtype_name is None:
            self.dtype_name = dtype_name
        elif dtype_name != self.dtype_name:
            raise InvalidModel(Refusal.DTYPE_CHANGED)
        dtype = TORCH_DTYPES[dtype_name]
        size = rows * vocab * dtype.itemsize
        if len(self._payload) < size:
            self._payload = bytearray(size)
        # One buffer for every step, not a fresh megabyte each: the logits are used up before the next read.
        payload = memoryview(self._payload)[:size]
        self._read_into(payload, deadline)
        logits = torch.frombuffer(payload, dtype=dtype).view(rows, vocab).float()
        if not torch.isfinite(logits).all():
            raise InvalidModel(Refusal.NON_FINITE)
        return logits

    def _header(self, deadline) -> tuple[int, int, int, int]:
        raw = bytearray(REPLY_HEADER.size)
        self._read_into(memoryview(raw), deadline)
        return REPLY_HEADER.unpack(raw)

    def _read_into(self, view: memoryview, deadline) -> None:
        filled = 0
        while filled < len(view):
            readable, _, _ = select.select([self._replies], [], [], self._left(deadline))
            if not readable:
                continue
            count = os.readv(self._replies, [view[filled:]])
            if count == 0:
                raise self._ended()
            filled += count

    def _left(self, deadline: tuple[_Limit, ...]) -> float:
        return _wait_s(self.deadlines, deadline)

    def _unexpected(self, kind: int, code: int) -> Exception:
        if kind == ERROR:
            sentence = {
                LOAD_ERROR: Refusal.LOAD_FAILED,
                OUTPUT_ERROR: Refusal.BAD_OUTPUT,
                PROCESSES_ERROR: Refusal.PROCESSES,
                TAMPERED_ERROR: Refusal.TAMPERED,
            }.get(code, Refusal.STEP_FAILED)
            return InvalidModel(sentence)
        if kind == ENDED:
            return self._ended()
        return InvalidModel(Refusal.PROTOCOL)

    def _ended(self) -> Exception:
        """Why the batch process or the server stopped answering: the sandbox's account first."""
        self.jailed.close()
        outcome = self.jailed.outcome()
        if outcome.reason == "sandbox_error":
            return SandboxUnavailable(f"the scoring sandbox failed: {outcome.detail}")
        if outcome.reason == "oom":
            return InvalidModel(Refusal.OUT_OF_MEMORY.format(memory_mib=self._memory_bytes / 2**20))
        if outcome.reason == "pids_limit":
            return InvalidModel(Refusal.PIDS_LIMIT)
        return InvalidModel(Refusal.ENDED)


def document_windows(document: Document, eos_id: int, seq_len: int) -> list[_Window]:
    tokens = list(document.tokens)
    inputs = [eos_id] + tokens[:-1]
    return [
        _Window(document.doc_id, inputs[start : start + seq_len], tokens[start : start + seq_len])
        for start in range(0, len(tokens), seq_len)
    ]


def _check_documents(documents: Sequence[Document], vocab_size: int, eos_id: int) -> None:
    if not documents:
        raise ValueError("no validation documents to score")
    if not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary of {vocab_size}")
    seen: set[str] = set()
    for document in documents:
        if document.doc_id in seen:
            raise ValueError(f"validation document {document.doc_id!r} appears twice")
        seen.add(document.doc_id)
        if document.tokens and not (0 <= min(document.tokens) and max(document.tokens) < vocab_size):
            raise ValueError(
                f"validation document {document.doc_id!r} has token ids outside the vocabulary of {vocab_size}"
            )
    if not any(document.tokens for document in documents):
        raise ValueError("the validation documents have no tokens")


def compose(windows: list[_Window], batch_size: int, rng: random.Random) -> list[list[_Window]]:
    """A secret composition: which windows share a batch, in what order, and the batches' order.

    Documents are shuffled and their windows dealt round-robin over the batches, so two windows of
    one document never share a batch (there are at least as many batches as a document has windows).
    """
    by_document: dict[str, list[_Window]] = {}
    for window in windows:
        by_document.setdefault(window.doc_id, []).append(window)
    order = list(by_document)
    rng.shuffle(order)
    count = max(math.ceil(len(windows) / batch_size), max(len(ws) for ws in by_document.values()))
    batches: list[list[_Window]] = [[] for _ in range(count)]
    dealt = [window for doc_id in order for window in by_document[doc_id]]
    for index, window in enumerate(dealt):
        batches[index % count].append(window)
    for batch in batches:
        rng.shuffle(batch)
    rng.shuffle(batches)
    return [batch for batch in batches if batch]


SIDE_BY_SIDE_ATTEMPTS = 8


def compose_side_by_side(first: list[list[_Window]], batch_size: int, rng: random.Random) -> list[list[_Window]] | None:
    """A second secret composition whose j-th batch holds no window of a document that `first`'s
    j-th batch holds, so that the two can be scored at the same time: no two batch processes that
    run side by side ever hold one document, and none can pass the other a token it has not been
    scored on yet. Two windows of one document still never share a batch. None where no such
    composition is found in SIDE_BY_SIDE_ATTEMPTS secret orders (documents of many windows, batches
    near full): the passes then run one after the other.
    """
    for _ in range(SIDE_BY_SIDE_ATTEMPTS):
        second = _deal_side_by_side(first, batch_size, rng)
        if second is not None:
            return second
    return None


def _deal_side_by_side(first: list[list[_Window]], batch_size: int, rng: random.Random) -> list[list[_Window]] | None:
    in_first: dict[str, set[int]] = {}
    by_document: dict[str, list[_Window]] = {}
    for index, batch in enumerate(first):
        for window in batch:
            in_first.setdefault(window.doc_id, set()).add(index)
            by_document.setdefault(window.doc_id, []).append(window)
    order = list(by_document)
    rng.shuffle(order)
    order.sort(key=lambda doc_id: -len(by_document[doc_id]))  # the longest first: they have the fewest places
    second: list[list[_Window]] = [[] for _ in first]
    for doc_id in order:
        allowed = [
            index for index in range(len(first)) if index not in in_first[doc_id] and len(second[index]) < batch_size
        ]
        if len(allowed) < len(by_document[doc_id]):
            return None
        rng.shuffle(allowed)
        allowed.sort(key=lambda index: len(second[index]))  # the emptiest first, ties in secret order
        for window, index in zip(by_document[doc_id], allowed, strict=False):
            second[index].append(window)
    for batch in second:
        rng.shuffle(batch)
    return second


def _stream_batch(
    stream: _Stream,
    batch: list[_Window],
    deadlines: _Deadlines,
    advance: Callable[[int], None],
    stages: dict[str, float],
) -> list[list[float]]:
    """Per-row token losses (nats) of one batch, streamed position by position. `stages` gets the
    seconds spent waiting for the batch process's load and for its logits."""
    limits = deadlines.limits
    began = time.monotonic()
    stream.send(OPEN, [len(batch)], deadlines.until(None, ""))
    stream.expect(
        READY, deadlines.until(limits.load_s, Refusal.LOAD_TIMEOUT.format(seconds=limits.load_s), stream.jailed)
    )
    stages["batch_load_s"] = stages.get("batch_load_s", 0.0) + time.monotonic() - began
    step_timeout = Refusal.STEP_TIMEOUT.format(seconds=limits.step_s)
    nats: list[list[float]] = [[] for _ in batch]
    live = list(range(len(batch)))
    position = 0
    while live:
        asked = time.monotonic()
        stream.send(STEP, [batch[row].inputs[position] for row in live], deadlines.until(None, ""))
        logits = stream.logits(len(live), deadlines.until(limits.step_s, step_timeout, stream.jailed))
        replied = time.monotonic()
        stages["step_wait_s"] = stages.get("step_wait_s", 0.0) + replied - asked
        stages["steps"] = stages.get("steps", 0) + 1
        targets = torch.tensor([batch[row].targets[position] for row in live])
        token_nats = -torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
        for row, value in zip(live, token_nats.tolist(), strict=True):
            nats[row].append(value)
        advance(len(live))
        position += 1
        going_on = [index for index, row in enumerate(live) if position < len(batch[row].inputs)]
        deadlines.clock.evaluators_turn(time.monotonic() - replied)
        if len(going_on) < len(live):
            live = [live[index] for index in going_on]
            if live:
                stream.send(KEEP, going_on, deadlines.until(None, ""))
    nonce = secrets.randbits(63)
    stream.send(CLOSE, [nonce], deadlines.until(None, ""))
    stream.expect(CLOSED, deadlines.wall(CLOSE_S, Refusal.PROTOCOL), code=nonce & 0xFFFFFFFF, rows=nonce >> 32)
    return nats


@contextmanager
def _progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A transient progress bar on stderr where it redraws in place; else a line every 10 s. Both
    passes' threads advance it."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from evaluator.progress import PlainLines, bar, live

    console = Console(stderr=True)
    if not live(console):
        lines, done, lock = PlainLines(console, every_s=10.0), [0], threading.Lock()

        def advance(count: int) -> None:
            with lock:
                done[0] += count
                lines.say(f"{description}: {done[0]:,}/{total:,} predictions", final=done[0] >= total)

        yield advance
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with bar(console, *columns, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda advance: progress.advance(task, advance)


def _server_spec(
    setup: ScoringSetup, *, name: str, workdir: Path, image: Path | None, time_limit_s: float, log_path: Path | None
) -> JailSpec:
    threads, gpu = setup.pass_threads, setup.gpu
    argv = [
        # -P: the working directory (the submission) must not shadow `evaluator` on sys.path.
        sys.executable,
        "-P",
        "-B",
        "-m",
        "evaluator.model_server",
        "--submission",
        str(setup.submission_dir),
        "--model-cap",
        str(setup.model_cap_bytes),
        "--device",
        setup.device,
        "--threads",
        str(threads),
    ]
    env = in_jail.environment(
        threads,
        home="/nonexistent",
        python_path=in_jail.PACKAGE_DIR.parent,
        # OpenMP's idle threads spin about as long as the gaps within a step, then sleep: spinning
        # through the host's share of each step would charge the host's slowness to the model's
        # CPU-time deadlines (libgomp's default spins ten times as long), and sleeping at once costs
        # a wake-up per parallel region (measured: 0.55 ms a step against 0.23 ms, reference-sized
        # logits on 2 threads; benchmarks/SCORING-cpu-1min.md).
        GOMP_SPINCOUNT=str(OMP_SPIN_COUNT),
        # Nothing is writable in a sealed jail: CUDA must not try to keep a JIT cache there.
        CUDA_CACHE_DISABLE="1",
    )
    return JailSpec(
        name=name,
        argv=argv,
        workdir=workdir,
        cwd=setup.submission_dir,
        env=env,
        # Without an image (--sandbox none) nothing is mounted anyway: the paths are the host's.
        ro_paths=[],
        rw_paths=[],
        tmpfs={},
        memory_bytes=setup.memory_bytes,
        pids=setup.pids,
        time_limit_s=time_limit_s,
        log_path=log_path or workdir / "server.log",
        log_cap_bytes=1 << 20 if log_path else 0,
        gpu_index=None if gpu is None else gpu.minor,
        gpu_uuid=None if gpu is None else gpu.uuid,
        cpus=threads,  # a model can only slow its own scoring down, never the host's other jails
        sealed_image=image,
    )


def _document_nats(composition: list[list[_Window]], per_row: list[list[list[float]]]) -> dict[str, float]:
    """Each document's total nats (math.fsum: exactly rounded, so independent of order)."""
    tokens: dict[str, list[float]] = {}
    for batch, rows in zip(composition, per_row, strict=True):
        for window, nats in zip(batch, rows, strict=True):
            tokens.setdefault(window.doc_id, []).extend(nats)
    return {doc_id: math.fsum(values) for doc_id, values in tokens.items()}


def check_consistency(passes: list[dict[str, float]], val_tokens: int, tolerance: float) -> None:
    """Raises InvalidModel when two passes' per-document nats disagree beyond the tolerance."""
    first, second = passes
    differences = [first[doc_id] - second[doc_id] for doc_id in first]
    # `not <=`, so that a NaN fails too.
    worst_ok = all(abs(difference) <= tolerance for difference in differences)
    mean_ok = abs(math.fsum(differences)) / val_tokens <= tolerance * MEAN_SHARE_OF_TOLERANCE
    if not (worst_ok and mean_ok):
        raise InvalidModel(Refusal.INCONSISTENT.format(tolerance=tolerance))


@dataclass(frozen=True)
class ScoringSetup:
    """What every model of a run is scored with: one ScoringSession's servers and rules."""

    name: str  # names the servers' jails
    submission_dir: Path  # put on each batch process's sys.path (the model's classes)
    vocab_size: int
    eos_id: int
    seq_len: int
    batch_size: int
    device: str  # the model's device as the jail sees it: "cpu" or "cuda:0"
    gpu: Board | None  # the host's board the jails are given (its node /dev/nvidia<minor> only); None on the CPU
    threads: int  # the track's: the passes share them where they run side by side
    limits: ScoringLimits
    memory_bytes: int
    pids: int
    model_cap_bytes: int  # the largest model file the servers take
    debug_log_dir: Path | None = None  # keep the servers' stderr there (for the operator; never for a hidden split)

    @property
    def parallel(self) -> bool:
        """The passes run side by side (compose_side_by_side) where the track's threads can be shared
        out among them, on the CPU: two CUDA contexts on one T4 are not measured yet."""
        return self.gpu is None and self.threads >= PASSES

    @property
    def pass_threads(self) -> int:
        """Each pass's jail: its torch threads and its CPU quota."""
        return self.threads // PASSES if self.parallel else self.threads


class _Server:
    """One pass's model server: a sealed jail that takes model after model and scores each batch of
    each in a fresh batch process. After a model failed in it, it is closed, never reused: the
    model's batch process may have left anything in its pipes."""

    def __init__(self, sandbox: Sandbox, setup: ScoringSetup, spec: JailSpec):
        self.jailed = sandbox.start(spec)
        self.stream = _Stream(self.jailed, setup.vocab_size, setup.memory_bytes)
        self.closed = False
        self.batches = 0  # opened so far: each takes PIDS_PER_BATCH of the jail's process ids

    def wait_started(self) -> None:
        try:
            self.stream.expect(STARTED, _Deadlines.wall(SERVER_START_S, "the model server did not start"))
        except InvalidModel as exc:  # nothing of a model has run yet: this is ours
            raise SandboxUnavailable(f"the scoring server did not start: {exc}") from None

    def take_model(self, model: bytes) -> None:
        try:
            self.stream.send_bytes(
                MODEL, model, _Deadlines.wall(SERVER_START_S, "the model server did not take the model")
            )
            self.stream.dtype_name = None  # a new model may use another dtype; it may not change it
        except InvalidModel as exc:  # the server is ours, and every process of the last model is gone
            raise SandboxUnavailable(f"the scoring server failed: {exc}") from None

    def close(self) -> None:
        self.closed = True
        self.jailed.close()


class ScoringSession:
    """The sealed model servers of one run, used for every model it scores, on every split: one
    memory image (the Python install, torch, the in-jail modules and the submission; no model and
    no data) and one server per pass, started once. Each model reaches a server as bytes (MODEL),
    and each of its batch processes gets a private, sealed copy: no batch process can read another
    model, or leave anything for another batch.

    `models`: how many scorings the session may run (the servers' hard time limit covers them all).
    """

    def __init__(self, sandbox: Sandbox, setup: ScoringSetup, models: int = 1):
        self.sandbox, self.setup = sandbox, setup
        per_model_s = setup.limits.total_s * (BUSY_HOST_WALL_FACTOR if setup.gpu is None else 1)
        self._time_limit_s = SERVER_START_S + models * (per_model_s + SERVER_START_S) + SANDBOX_BACKSTOP_S
        self._servers: list[_Server | None] = [None] * PASSES
        self._started = 0
        self.stages: dict[str, float] = {}  # where the session's time went, for benchmarks/scoring_cost.py

    def __enter__(self) -> ScoringSession:
        began = time.monotonic()
        self._stack = ExitStack()
        try:
            # The servers' nsjail config and log never enter the run directory: the log holds their
            # exit status, a number the model chooses.
            self._scratch = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="speedrun-scoring-")))
            image_paths = [*in_jail.sources(in_jail.SCORING), self.setup.submission_dir]
            self._image = self._stack.enter_context(
                self.sandbox.memory_image(image_paths, gpu=self.setup.gpu is not None)
            )
        except BaseException:
            self._stack.close()
            raise
        self._add_stage("image_s", began)
        try:
            self._ready_servers()  # now, so that their start is the session's, not the first model's
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        for server in self._servers:
            if server is not None:
                server.close()
        self._stack.close()

    @property
    def servers_started(self) -> int:
        return self._started

    def _add_stage(self, stage: str, began: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + time.monotonic() - began

    def _ready_servers(self) -> list[_Server]:
        """A running server per pass; those missing are started together, so their starts overlap."""
        began = time.monotonic()
        setup, fresh = self.setup, []
        servers: list[_Server] = []
        for number, server in enumerate(self._servers, 1):
            if server is None or server.closed:
                self._started += 1
                # A server that replaces one (after a failed model) gets a name and log of its own.
                suffix = "" if self._started <= PASSES else f"-{self._started}"
                name = f"{setup.name}-{number}{suffix}"
                log_path = setup.debug_log_dir / f"scoring-pass-{number}{suffix}.log" if setup.debug_log_dir else None
                spec = _server_spec(
                    setup,
                    name=name,
                    workdir=self._scratch / f"server-{self._started}",
                    image=self._image,
                    time_limit_s=self._time_limit_s,
                    log_path=log_path,
                )
                self._servers[number - 1] = server = _Server(self.sandbox, setup, spec)
                fresh.append(server)
            servers.append(server)
        for server in fresh:
            server.wait_started()
        self._add_stage("server_start_s", began)
        return servers

    def score(
        self,
        model_path: Path,
        documents: Sequence[Document],
        *,
        secret_seed: int | None = None,
        usage: ScoringUsage | None = None,
        label: str = "scoring",
    ) -> ScoreReport:
        """Scores the saved model at `model_path` on `documents` (see the module docstring for the rules).

        Raises InvalidModel (with one of the Refusal sentences) when the model cannot be scored, and
        SandboxUnavailable when the sandbox itself fails (the evaluator's fault, not the model's).
        `usage` gets what the scoring used, also when it fails.
        """
        started = time.monotonic()
        passes = self.document_nats(model_path, documents, secret_seed=secret_seed, usage=usage, label=label)
        ordered = sorted(documents, key=lambda document: document.doc_id)
        val_tokens = sum(len(document.tokens) for document in ordered)
        check_consistency(passes, val_tokens, self.setup.limits.consistency_nats)
        total_nats = math.fsum(math.fsum(p.get(document.doc_id, 0.0) for p in passes) / PASSES for document in ordered)
        val_bytes = sum(document.n_bytes for document in ordered)
        return ScoreReport(
            val_loss=round(total_nats / val_tokens, SCORE_DECIMALS),
            val_bpb=round(total_nats / math.log(2) / val_bytes, SCORE_DECIMALS),
            val_tokens=val_tokens,
            val_bytes=val_bytes,
            val_documents=len(ordered),
            passes=PASSES,
            seconds=round(time.monotonic() - started),
        )

    def document_nats(
        self,
        model_path: Path,
        documents: Sequence[Document],
        *,
        secret_seed: int | None = None,
        usage: ScoringUsage | None = None,
        label: str = "scoring",
    ) -> list[dict[str, float]]:
        """Each pass's total nats per document, before the passes are compared (score() compares them;
        benchmarks/consistency.py measures how far honest models' passes differ)."""
        setup, usage = self.setup, usage if usage is not None else ScoringUsage()
        _check_documents(documents, setup.vocab_size, setup.eos_id)
        ordered = sorted(documents, key=lambda document: document.doc_id)
        windows = [window for document in ordered for window in document_windows(document, setup.eos_id, setup.seq_len)]
        rng = random.Random(secret_seed if secret_seed is not None else int.from_bytes(os.urandom(32), "big"))
        first = compose(windows, setup.batch_size, rng)
        second = compose_side_by_side(first, setup.batch_size, rng) if setup.parallel else None
        side_by_side = second is not None
        compositions = [first, second if second is not None else compose(windows, setup.batch_size, rng)]
        model = _read_model(Path(model_path), setup.model_cap_bytes)
        for server, composition in zip(self._servers, compositions, strict=True):
            if server is not None and server.batches + len(composition) > _batches_per_server():
                server.close()  # its pid namespace would run out of process ids: a fresh one takes over
        servers = self._ready_servers()
        # From here: the model's time. The image and the servers' start were the evaluator's.
        clock = _Clock(
            setup.threads,
            setup.pass_threads,
            [server.jailed for server in servers],
            cpu=setup.gpu is None,
            side_by_side=side_by_side,
        )
        deadlines = _Deadlines(setup.limits, clock)
        total_tokens = sum(len(window.targets) for window in windows)
        previous_threads = torch.get_num_threads()
        # The host's share of a step is a few small tensor operations: more threads would only spin
        # against the server's threads for the same cores.
        torch.set_num_threads(1)
        scoring_began = time.monotonic()
        try:
            clock.start()
            with _progress(label, PASSES * total_tokens) as advance:
                passes = _run_passes(servers, compositions, model, deadlines, advance, self.stages, side_by_side)
        except BaseException:
            for server in servers:
                server.close()
            raise
        finally:
            torch.set_num_threads(previous_threads)
            clock.close()
            usage.cpu_s = clock.cpu_seconds() if clock.cpu else None
            self._add_stage("models_s", scoring_began)
        return passes


def _run_passes(
    servers: list[_Server],
    compositions: list[list[list[_Window]]],
    model: bytes,
    deadlines: _Deadlines,
    advance: Callable[[int], None],
    stages: dict[str, float],
    side_by_side: bool,
) -> list[dict[str, float]]:
    """Each composition streamed by its own server; per pass, each document's total nats.

    `side_by_side` (compositions from compose_side_by_side): the passes' j-th batches run at the same
    time, each pass on its share of the track's threads, and both end before either pass's next
    batch begins, so that no two batch processes alive at once hold one document. While one waits
    for its batch process or for the host, the other computes. Else one pass after the other. The
    first failure is raised; the other pass is stopped by killing its jail's processes (its thread
    then reads the end of its pipe) and by breaking the barrier it may wait at."""
    results: list[dict[str, float] | None] = [None] * len(servers)
    failures: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(servers))
    own_stages: list[dict[str, float]] = [{} for _ in servers]  # one per thread, summed at the end

    def run(index: int) -> None:
        server, composition, began = servers[index], compositions[index], time.monotonic()
        try:
            server.take_model(model)
            server.stream.deadlines = deadlines
            server.batches += len(composition)
            per_row = []
            for batch in composition:
                per_row.append(
                    _stream_batch(server.stream, batch, deadlines, advance, own_stages[index]) if batch else []
                )
                if side_by_side:
                    barrier.wait()
            results[index] = _document_nats(composition, per_row)
            own_stages[index]["pass_s"] = time.monotonic() - began
        except threading.BrokenBarrierError:
            pass  # the other pass failed: its failure is the one raised
        except BaseException as exc:  # handed to the caller's thread, which raises the first
            with lock:
                failures.append(exc)
                first = len(failures) == 1
            if first:
                barrier.abort()
                for other in servers:
                    if other is not server:
                        other.jailed.kill()

    if side_by_side:
        threads = [
            threading.Thread(target=run, args=(index,), name=f"scoring-pass-{index + 1}")
            for index in range(len(servers))
        ]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                thread.join()
        except BaseException:  # interrupted (SIGTERM, Ctrl-C): stop both passes before their pipes close
            barrier.abort()
            for server in servers:
                server.jailed.kill()
            for thread in threads:
                thread.join()
            raise
    else:
        for index in range(len(servers)):
            if not failures:
                run(index)
    for measured in own_stages:
        for stage, seconds in measured.items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    if failures:
        raise failures[0]
    finished = [result for result in results if result is not None]
    assert len(finished) == len(results)  # a pass that did not finish failed, or broke the barrier for a failure
    return finished


def _batches_per_server() -> int:
    """How many batches one server can open: the model server starts each batch process at the next
    multiple of PIDS_PER_BATCH, and a pid namespace's ids end at the kernel's pid_max (32,768 by
    default: 128 batches, less the server's own start)."""
    with open("/proc/sys/kernel/pid_max") as handle:
        return int(handle.read()) // PIDS_PER_BATCH - 2


def _read_model(path: Path, cap_bytes: int) -> bytes:
    """The model file's bytes for the servers: a copy the evaluator took, read without following a link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with open(fd, "rb") as saved:
        model = saved.read(cap_bytes + 1)
    if len(model) > cap_bytes:
        raise InvalidModel(f"{path.name} is over the track's {cap_bytes} bytes")
    return model

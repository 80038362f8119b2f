"""Host side of scoring: streams the validation split through sealed model servers, twice, and
computes val_loss and val_bpb. Honest by construction, not by audit.

The saved model is never unpickled here: `evaluator.model_server` loads it inside a jail whose
whole filesystem is a memory-backed image of what it needs (the Python install, torch, the
evaluator's in-jail modules, the submission and the model file; no data, no network, nothing
writable), one fresh batch process per batch. Everything coming back is untrusted: the reply
header's kind and sizes, the exact [rows, vocab] shape, a float dtype that never changes, the byte
count, and finite logits once cast to float32.

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

Deadlines (the track's `[eval]`): `load_s` from asking for a batch process to its READY (the
model's unpickling and `decoder()`), `step_s` for each step's reply, `time_limit_s` for all of
scoring, both passes and the jails' start included (copying the image is not). They leave no
room to train after the clock: whatever a model computes in scoring starts again from the model
file for every batch.

Sealed output. Nothing the model writes reaches anyone: the servers' stderr is discarded (kept in
a file only when the operator asks for it, which makes the run unofficial), and every failure is
one of the fixed sentences below, with no position, shape, size or text the model chose.
"""

from __future__ import annotations

import fcntl
import math
import os
import random
import select
import struct
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from evaluator import in_jail
from evaluator.dataset.loader import Document
from evaluator.errors import InvalidModel
from evaluator.model_server import (
    CLOSE, CLOSED, ENDED, ERROR, KEEP, LOAD_ERROR, LOGIT_DTYPES, LOGITS, OPEN, OUTPUT_ERROR,
    PIDS_PER_BATCH, PROCESSES_ERROR, READY, REPLY_HEADER, REQUEST_HEADER, STARTED, STEP, TAMPERED_ERROR,
)
from evaluator.nvml import Board
from evaluator.sandbox import JailSpec, SandboxUnavailable

TORCH_DTYPES = {name: getattr(torch, name) for name in LOGIT_DTYPES}
# The server's own start (interpreter, `import torch`) is the evaluator's work, not the model's.
SERVER_START_S = 120.0
# How long the server may take to kill and reap a batch; the model can slow it only by its own
# processes, which the kill ends.
CLOSE_S = 10.0
# The sandbox's own hard limit fires this long after the evaluator's deadline, so that a stall is
# reported by the evaluator rather than seen as a killed server.
SANDBOX_BACKSTOP_S = 5.0
PASSES = 2
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


@dataclass(frozen=True)
class _Window:
    doc_id: str
    inputs: list[int]
    targets: list[int]


class _Deadlines:
    def __init__(self, limits: ScoringLimits):
        self.limits = limits
        self._end = time.monotonic() + limits.total_s

    def remaining(self) -> float:
        return self._end - time.monotonic()

    def until(self, seconds: float | None, sentence: str) -> tuple[float, str]:
        """(absolute deadline, the sentence for missing it): the sooner of `seconds` and the total."""
        total = (self._end, Refusal.TOTAL_TIMEOUT.format(seconds=self.limits.total_s))
        if seconds is None:
            return total
        own = time.monotonic() + seconds
        return (own, sentence) if own < self._end else total


class _Stream:
    """One model server: requests out, checked replies back, every read and write under a deadline."""

    def __init__(self, jailed, vocab_size: int, memory_bytes: int):
        self._jailed = jailed
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
        self.dtype_name: str | None = None

    def send(self, op: int, values: Sequence[int], deadline: tuple[float, str]) -> None:
        data = REQUEST_HEADER.pack(op, len(values)) + struct.pack(f"<{len(values)}q", *values)
        view = memoryview(data)
        while view:
            _, writable, _ = select.select([], [self._requests], [], self._left(deadline))
            if not writable:
                continue
            try:
                view = view[os.write(self._requests, view):]
            except BlockingIOError:
                continue
            except BrokenPipeError:
                raise self._ended() from None

    def expect(self, kind: int, deadline: tuple[float, str]) -> None:
        got, code, _, _ = self._header(deadline)
        if got != kind:
            raise self._unexpected(got, code)

    def logits(self, rows: int, deadline: tuple[float, str]) -> torch.Tensor:
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
        payload = bytearray(rows * vocab * dtype.itemsize)
        self._read_into(memoryview(payload), deadline)
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

    @staticmethod
    def _left(deadline: tuple[float, str]) -> float:
        left = deadline[0] - time.monotonic()
        if left <= 0:
            raise InvalidModel(deadline[1])
        return left

    def _unexpected(self, kind: int, code: int) -> Exception:
        if kind == ERROR:
            sentence = {
                LOAD_ERROR: Refusal.LOAD_FAILED, OUTPUT_ERROR: Refusal.BAD_OUTPUT, PROCESSES_ERROR: Refusal.PROCESSES,
                TAMPERED_ERROR: Refusal.TAMPERED,
            }.get(code, Refusal.STEP_FAILED)
            return InvalidModel(sentence)
        if kind == ENDED:
            return self._ended()
        return InvalidModel(Refusal.PROTOCOL)

    def _ended(self) -> Exception:
        """Why the batch process or the server stopped answering: the sandbox's account first."""
        self._jailed.close()
        outcome = self._jailed.outcome()
        if outcome.reason == "sandbox_error":
            return SandboxUnavailable(f"the scoring sandbox failed: {outcome.detail}")
        if outcome.reason == "oom":
            return InvalidModel(Refusal.OUT_OF_MEMORY.format(memory_mib=self._memory_bytes / 2**20))
        if outcome.reason == "pids_limit":
            return InvalidModel(Refusal.PIDS_LIMIT)
        return InvalidModel(Refusal.ENDED)


def _windows(document: Document, eos_id: int, seq_len: int) -> list[_Window]:
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


def _stream_batch(stream: _Stream, batch: list[_Window], deadlines: _Deadlines,
                  advance: Callable[[int], None]) -> list[list[float]]:
    """Per-row token losses (nats) of one batch, streamed position by position."""
    limits = deadlines.limits
    stream.send(OPEN, [len(batch)], deadlines.until(None, ""))
    stream.expect(READY, deadlines.until(limits.load_s, Refusal.LOAD_TIMEOUT.format(seconds=limits.load_s)))
    step_timeout = Refusal.STEP_TIMEOUT.format(seconds=limits.step_s)
    nats: list[list[float]] = [[] for _ in batch]
    live = list(range(len(batch)))
    position = 0
    while live:
        stream.send(STEP, [batch[row].inputs[position] for row in live], deadlines.until(None, ""))
        logits = stream.logits(len(live), deadlines.until(limits.step_s, step_timeout))
        targets = torch.tensor([batch[row].targets[position] for row in live])
        token_nats = -torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
        for row, value in zip(live, token_nats.tolist()):
            nats[row].append(value)
        advance(len(live))
        position += 1
        going_on = [index for index, row in enumerate(live) if position < len(batch[row].inputs)]
        if len(going_on) < len(live):
            live = [live[index] for index in going_on]
            if live:
                stream.send(KEEP, going_on, deadlines.until(None, ""))
    stream.send(CLOSE, [], deadlines.until(None, ""))
    stream.expect(CLOSED, deadlines.until(CLOSE_S, Refusal.PROTOCOL))
    return nats


@contextmanager
def _progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A transient progress bar on stderr where it redraws in place; else a line every 10 s."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from evaluator.progress import PlainLines, live

    console = Console(stderr=True)
    if not live(console):
        lines, done = PlainLines(console, every_s=10.0), [0]

        def advance(count: int) -> None:
            done[0] += count
            lines.say(f"{description}: {done[0]:,}/{total:,} predictions", final=done[0] >= total)

        yield advance
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda advance: progress.advance(task, advance)


def _server_spec(*, name: str, workdir: Path, image: Path | None, model_path: Path, submission_dir: Path,
                 device: str, gpu: Board | None, threads: int, time_limit_s: float, memory_bytes: int,
                 pids: int, log_path: Path | None) -> JailSpec:
    argv = [
        # -P: the working directory (the submission) must not shadow `evaluator` on sys.path.
        sys.executable, "-P", "-B", "-m", "evaluator.model_server",
        "--model", str(model_path), "--submission", str(submission_dir),
        "--device", device, "--threads", str(threads),
    ]
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/nonexistent",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONPATH": str(in_jail.PACKAGE_DIR.parent),
        # Nothing is writable in a sealed jail: CUDA must not try to keep a JIT cache there.
        "CUDA_CACHE_DISABLE": "1",
    }
    return JailSpec(
        name=name,
        argv=argv,
        workdir=workdir,
        cwd=submission_dir,
        env=env,
        # Without an image (--sandbox none) nothing is mounted anyway: the paths are the host's.
        ro_paths=[],
        rw_paths=[],
        tmpfs={},
        memory_bytes=memory_bytes,
        pids=pids,
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
    for batch, rows in zip(composition, per_row):
        for window, nats in zip(batch, rows):
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


def _score_passes(sandbox, compositions: list[list[list[_Window]]], limits: ScoringLimits, *, name: str,
                  model_path: Path, submission_dir: Path, vocab_size: int, device: str, gpu: Board | None,
                  threads: int, memory_bytes: int, pids: int, debug_log_dir: Path | None) -> list[dict[str, float]]:
    """Each composition streamed in a jail of its own: per pass, each document's total nats."""
    image_paths = [*in_jail.sources(in_jail.SCORING), submission_dir, model_path]
    passes: list[dict[str, float]] = []
    total_tokens = sum(len(window.targets) for batch in compositions[0] for window in batch)
    # The servers' nsjail config and log never enter the run directory: the log holds their exit
    # status, a number the model chooses.
    with (
        tempfile.TemporaryDirectory(prefix="speedrun-scoring-") as scratch,
        sandbox.memory_image(image_paths, gpu=gpu is not None) as image,
        _progress("scoring", len(compositions) * total_tokens) as advance,
    ):
        # From here: copying the image is the evaluator's work, not the model's time.
        deadlines = _Deadlines(limits)
        for number, composition in enumerate(compositions, 1):
            workdir = Path(scratch) / f"pass-{number}"
            spec = _server_spec(
                name=f"{name}-{number}", workdir=workdir, image=image, model_path=model_path,
                submission_dir=submission_dir, device=device, gpu=gpu, threads=threads,
                time_limit_s=SERVER_START_S + max(deadlines.remaining(), 0) + SANDBOX_BACKSTOP_S,
                memory_bytes=memory_bytes, pids=pids,
                log_path=debug_log_dir / f"scoring-pass-{number}.log" if debug_log_dir else None,
            )
            with sandbox.start(spec) as jailed:
                stream = _Stream(jailed, vocab_size, memory_bytes)
                try:
                    stream.expect(STARTED, (time.monotonic() + SERVER_START_S, "the model server did not start"))
                except InvalidModel as exc:  # nothing of the model has run yet: this is ours
                    raise SandboxUnavailable(f"the scoring server did not start: {exc}") from None
                per_row = [_stream_batch(stream, batch, deadlines, advance) for batch in composition]
            passes.append(_document_nats(composition, per_row))
    return passes


def score_model(*, sandbox, name: str, model_path: Path, submission_dir: Path, documents: Sequence[Document],
                vocab_size: int, eos_id: int, seq_len: int, batch_size: int, device: str,
                gpu: Board | None, threads: int, limits: ScoringLimits, memory_bytes: int, pids: int, debug_log_dir: Path | None = None,
                secret_seed: int | None = None) -> ScoreReport:
    """Scores the saved model at `model_path` on `documents` (see the module docstring for the rules).

    Raises InvalidModel (with one of the Refusal sentences) when the model cannot be scored, and
    SandboxUnavailable when the sandbox itself fails (the evaluator's fault, not the model's).
    `debug_log_dir`: keep the servers' stderr there (for the operator; never for a hidden split).
    `device` is the model's device as the jail sees it; `gpu` is the host's board the jails are given
    (its node /dev/nvidia<minor> only), None on the CPU.
    """
    started = time.monotonic()
    _check_documents(documents, vocab_size, eos_id)
    ordered = sorted(documents, key=lambda document: document.doc_id)
    windows = [window for document in ordered for window in _windows(document, eos_id, seq_len)]
    rng = random.Random(secret_seed if secret_seed is not None else int.from_bytes(os.urandom(32), "big"))
    compositions = [compose(windows, batch_size, rng) for _ in range(PASSES)]
    model_path, submission_dir = Path(model_path), Path(submission_dir)

    previous_threads = torch.get_num_threads()
    # The host's share of a step is a few small tensor operations: more threads would only spin
    # against the server's threads for the same cores.
    torch.set_num_threads(1)
    try:
        passes = _score_passes(
            sandbox, compositions, limits, name=name, model_path=model_path, submission_dir=submission_dir,
            vocab_size=vocab_size, device=device, gpu=gpu, threads=threads,
            memory_bytes=memory_bytes, pids=pids, debug_log_dir=debug_log_dir,
        )
    finally:
        torch.set_num_threads(previous_threads)

    val_tokens = sum(len(document.tokens) for document in ordered)
    check_consistency(passes, val_tokens, limits.consistency_nats)
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

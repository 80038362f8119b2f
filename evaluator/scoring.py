"""Host side of scoring: drives a model server in a fresh sandbox, computes val_loss and val_bpb,
then audits causality in a second fresh server.

The saved model is never unpickled here: `evaluator.model_server` loads it inside a jail that sees
the model file, the submission folder and the `evaluator` package, nothing else (no data, no
network). Everything it sends back is untrusted and checked: header size and fields, the exact
shape asked for, a float dtype, the exact byte count, finite logits.

Windows. Each document is scored on its own: inputs `[eos] + tokens[:-1]`, targets `tokens`. A
document longer than `seq_len` is cut into consecutive non-overlapping windows of `seq_len`
positions (the last one shorter); each window is one row, so a token's context is everything from
the start of its window. The rows depend only on the documents, never on batching.

Batching. Windows are sorted by (length descending, doc_id, start) and cut into batches of
`batch_size` rows, right-padded with `eos_id` to the batch's longest row; padded positions are
ignored. The evaluator applies `log_softmax` in float32 to the returned logits, and sums each
document's per-token losses with `math.fsum` (exactly rounded, so independent of summation order);
the totals are sums of per-document sums in doc_id order. The same documents in any order give
the same requests, and the evaluator's arithmetic does not depend on `batch_size`.

Causality audit. Before the main pass, `audit_cuts` (window, cut) pairs are drawn with
`random.Random(secret_seed)` (a fresh seed from `os.urandom` when none is given). The main pass
keeps, for each cut, only its window's logits up to and including the cut. A second, fresh server
then receives each cut window with every token after the cut replaced by tokens of another
document (cycled from a random offset, the first replaced token differing from the original where
possible), and its logits up to the cut must equal the kept ones. Tolerance: an absolute bound of
`AUDIT_RELATIVE_TOLERANCE[dtype] * max(1, largest |logit| among the kept ones)`, by the dtype the
model returned (which must not change between replies): 1e-4 for float32 and float64 (~800 float32
ulps; a 4-layer float32 transformer measured ~1e-6), 1e-2 for float16 (~10 ulps), 5e-2 for
bfloat16 (~6 ulps). Kernels whose rounding depends on the batch's shape pass; a model whose
logits move with later tokens does not, and whatever it could gain within the bound is at most
twice the bound in nats per token. A model that computes in lower precision than it returns
should return its own dtype. The seed is not recorded: a model must not learn where the cuts are.

Time limit. `time_limit_s` covers the whole of scoring, both servers and model loading included.
It is enforced here on every read and write, and by the sandbox a few seconds later as a backstop.
"""

from __future__ import annotations

import json
import math
import os
import random
import select
import sys
import time
from array import array
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from evaluator.dataset.loader import Document
from evaluator.errors import InvalidModel
from evaluator.model_server import REQUEST_HEADER
from evaluator.sandbox import JailSpec, SandboxUnavailable

LOGIT_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
AUDIT_RELATIVE_TOLERANCE = {"float64": 1e-4, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
REPLY_HEADER_CAP_BYTES = 4096
SERVER_LOG_CAP_BYTES = 1 << 20
MESSAGE_CAP_CHARS = 500
# The sandbox's own hard limit fires this long after the evaluator's deadline, so that a stall is
# reported by the evaluator (with its phase) rather than seen as a killed server.
SANDBOX_BACKSTOP_S = 5.0
# How long to let a server that closed its output finish exiting, to learn why it ended.
EXIT_GRACE_S = 2.0
DONOR_ATTEMPTS = 8
EVALUATOR_PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class AuditReport:
    cuts: int
    passed: bool
    max_abs_diff: float
    tolerance: float


@dataclass(frozen=True)
class ScoreReport:
    val_loss: float
    val_bpb: float
    val_tokens: int
    val_bytes: int
    val_documents: int
    audit: AuditReport
    seconds: float


@dataclass(frozen=True)
class _Window:
    doc_id: str
    start: int  # position in the document of the window's first target
    inputs: list[int]
    targets: list[int]


@dataclass(frozen=True)
class _Cut:
    window: _Window
    cut: int  # offset in the window of the last position that keeps its original tokens
    suffix: list[int]  # replaces window.inputs[cut + 1:]

    @property
    def inputs(self) -> list[int]:
        return self.window.inputs[: self.cut + 1] + self.suffix

    @property
    def order(self) -> tuple[str, int]:
        return self.window.doc_id, self.window.start + self.cut


class _Deadline:
    def __init__(self, limit_s: float):
        self.limit_s = limit_s
        self._end = time.monotonic() + limit_s

    def remaining(self) -> float:
        return self._end - time.monotonic()

    def exceeded(self, phase: str) -> InvalidModel:
        return InvalidModel(f"the model exceeded the scoring time limit of {self.limit_s:g} s ({phase})")


def _printable(text: str) -> str:
    """Untrusted text from the jail, made safe for a terminal and a one-line message."""
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text).strip()
    return cleaned if len(cleaned) <= MESSAGE_CAP_CHARS else cleaned[:MESSAGE_CAP_CHARS] + "..."


def _last_line(log: str) -> str:
    lines = [line for line in log.splitlines() if line.strip()]
    return _printable(lines[-1]) if lines else "(no output)"


class _ModelServer:
    """One running model server: token batches out, validated logits back, under the deadline."""

    def __init__(self, jailed, *, role: str, vocab_size: int, deadline: _Deadline, memory_bytes: int,
                 dtype_name: str | None):
        self._jailed = jailed
        self._role = role
        self._vocab_size = vocab_size
        self._deadline = deadline
        self._memory_bytes = memory_bytes
        self._requests = jailed.stdin.fileno()
        self._replies = jailed.stdout.fileno()
        os.set_blocking(self._requests, False)
        self._pending = bytearray()
        self.dtype_name = dtype_name

    def wait_ready(self) -> None:
        phase = f"loading the model for the {self._role}"
        header = self._read_header(phase)
        if header["event"] == "error":
            raise InvalidModel(f"the model server could not load the model: {_printable(str(header.get('message')))}")
        if header["event"] != "ready":
            raise InvalidModel(f"the model server sent {header['event']!r} ({phase}), expected 'ready'")

    def forward(self, rows: Sequence[list[int]], pad_id: int, phase: str) -> torch.Tensor:
        """Logits [B, T, vocab] in the model's dtype for `rows` right-padded to T = the longest."""
        batch, length = len(rows), max(len(row) for row in rows)
        tokens = array("q")
        for row in rows:
            tokens.extend(row)
            tokens.extend([pad_id] * (length - len(row)))
        self._write(REQUEST_HEADER.pack(batch, length) + tokens.tobytes(), phase)

        header = self._read_header(phase)
        if header["event"] == "error":
            raise InvalidModel(f"the model's forward raised {_printable(str(header.get('message')))} ({phase})")
        if header["event"] != "logits":
            raise InvalidModel(f"the model server sent {header['event']!r} ({phase}), expected 'logits'")
        expected = [batch, length, self._vocab_size]
        shape, dtype_name, nbytes = header.get("shape"), header.get("dtype"), header.get("nbytes")
        if not (isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in shape)):
            raise InvalidModel(f"the model server sent a malformed shape {_printable(repr(shape))} ({phase})")
        if shape != expected:
            problem = "wrong shape"
            if len(shape) == 3 and shape[:2] == expected[:2]:
                problem = f"wrong vocabulary size {shape[2]}, the tokenizer's is {self._vocab_size}"
            raise InvalidModel(
                f"the model returned logits of shape {_printable(str(tuple(shape)))} for tokens of shape "
                f"{(batch, length)}: "
                f"{problem}, expected {tuple(expected)} ({phase})"
            )
        if dtype_name not in LOGIT_DTYPES:
            raise InvalidModel(
                f"the model returned logits of dtype {_printable(str(dtype_name))}, expected one of "
                f"{', '.join(LOGIT_DTYPES)} ({phase})"
            )
        if self.dtype_name is None:
            self.dtype_name = dtype_name
        elif dtype_name != self.dtype_name:
            raise InvalidModel(
                f"the model returned {dtype_name} logits after {self.dtype_name} ones: the dtype must not "
                f"change ({phase})"
            )
        dtype = LOGIT_DTYPES[dtype_name]
        expected_bytes = batch * length * self._vocab_size * dtype.itemsize
        if nbytes != expected_bytes:
            raise InvalidModel(
                f"the model server announced {_printable(repr(nbytes))} bytes for {dtype_name} logits of shape "
                f"{tuple(shape)}, expected {expected_bytes} ({phase})"
            )
        payload = bytearray(expected_bytes)
        self._read_into(memoryview(payload), phase)
        return torch.frombuffer(payload, dtype=dtype).view(batch, length, self._vocab_size)

    def _write(self, data: bytes, phase: str) -> None:
        view = memoryview(data)
        while view:
            remaining = self._deadline.remaining()
            if remaining <= 0:
                raise self._deadline.exceeded(phase)
            _, writable, _ = select.select([], [self._requests], [], remaining)
            if not writable:
                continue
            try:
                written = os.write(self._requests, view)
            except BlockingIOError:
                continue
            except BrokenPipeError:
                raise self._gone(phase) from None
            view = view[written:]

    def _wait_readable(self, phase: str) -> None:
        while True:
            remaining = self._deadline.remaining()
            if remaining <= 0:
                raise self._deadline.exceeded(phase)
            readable, _, _ = select.select([self._replies], [], [], remaining)
            if readable:
                return

    def _read_header(self, phase: str) -> dict:
        while b"\n" not in self._pending[:REPLY_HEADER_CAP_BYTES]:
            if len(self._pending) >= REPLY_HEADER_CAP_BYTES:
                raise InvalidModel(
                    f"the model server sent a reply header over {REPLY_HEADER_CAP_BYTES} bytes ({phase})"
                )
            self._wait_readable(phase)
            chunk = os.read(self._replies, REPLY_HEADER_CAP_BYTES)
            if not chunk:
                raise self._gone(phase)
            self._pending += chunk
        line, _, rest = bytes(self._pending).partition(b"\n")
        self._pending = bytearray(rest)
        try:
            header = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            header = None
        if not isinstance(header, dict) or header.get("event") not in ("ready", "logits", "error"):
            raise InvalidModel(
                f"the model server sent a malformed reply header {_printable(repr(line[:200]))} ({phase})"
            )
        return header

    def _read_into(self, view: memoryview, phase: str) -> None:
        from_pending = min(len(self._pending), len(view))
        view[:from_pending] = self._pending[:from_pending]
        del self._pending[:from_pending]
        filled = from_pending
        while filled < len(view):
            self._wait_readable(phase)
            count = os.readv(self._replies, [view[filled:]])
            if count == 0:
                raise self._gone(phase)
            filled += count

    def _gone(self, phase: str) -> InvalidModel:
        """Why the server stopped answering, as an InvalidModel (the sandbox's own failure raises)."""
        ended = self._jailed.wait(timeout=max(0.0, min(EXIT_GRACE_S, self._deadline.remaining()))) is not None
        self._jailed.close()  # reaps whatever is left and collects the rest of its stderr
        last_message = _last_line(self._jailed.log_tail())
        if not ended:
            return InvalidModel(f"the model server closed its output ({phase}); last message: {last_message}")
        outcome = self._jailed.outcome()
        if outcome.reason == "time_limit":
            return self._deadline.exceeded(phase)
        if outcome.reason == "sandbox_error":
            raise SandboxUnavailable(f"the scoring sandbox failed ({phase}): {outcome.detail}")
        how = {
            "oom": f"ran out of memory (limit {self._memory_bytes / 2**20:g} MiB)",
            "pids_limit": "hit the sandbox's process and thread limit",
            "signaled": f"was killed by signal {outcome.signal}",
            "exited": f"exited with code {outcome.returncode}",
        }[outcome.reason]
        return InvalidModel(f"the model server {how} ({phase}); last message: {last_message}")


def _windows(document: Document, eos_id: int, seq_len: int) -> list[_Window]:
    tokens = list(document.tokens)
    inputs = [eos_id] + tokens[:-1]
    return [
        _Window(document.doc_id, start, inputs[start : start + seq_len], tokens[start : start + seq_len])
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


def _draw_cuts(windows: list[_Window], documents: list[Document], eos_id: int, count: int,
               rng: random.Random) -> list[_Cut]:
    """`count` cut points, each with a suffix from another document; `windows` and `documents` sorted."""
    if count == 0:
        return []
    eligible = [window for window in windows if len(window.inputs) >= 2]
    if len(documents) < 2 or not eligible:
        raise ValueError("the causality audit needs two validation documents and one of at least two tokens")
    cuts = []
    for _ in range(count):
        window = rng.choice(eligible)
        cut = rng.randrange(len(window.inputs) - 1)
        length = len(window.inputs) - cut - 1
        others = [document for document in documents if document.doc_id != window.doc_id]
        for _ in range(DONOR_ATTEMPTS):
            stream = [eos_id] + list(rng.choice(others).tokens)
            offset = rng.randrange(len(stream))
            suffix = [stream[(offset + i) % len(stream)] for i in range(length)]
            # A model that reads only the next token is caught only if that token changes.
            if suffix[0] != window.inputs[cut + 1]:
                break
        cuts.append(_Cut(window, cut, suffix))
    return sorted(cuts, key=lambda cut: cut.order)


def _server_spec(*, name: str, workdir: Path, model_path: Path, submission_dir: Path, device: str,
                 threads: int, time_limit_s: float, memory_bytes: int, pids: int) -> JailSpec:
    argv = [
        # -P: the working directory (the submission) must not shadow `evaluator` on sys.path.
        sys.executable, "-P", "-B", "-m", "evaluator.model_server",
        "--model", str(model_path), "--submission", str(submission_dir),
        "--device", device, "--threads", str(threads),
    ]
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONPATH": str(EVALUATOR_PACKAGE_DIR.parent),
    }
    return JailSpec(
        name=name,
        argv=argv,
        workdir=workdir,
        cwd=submission_dir,
        env=env,
        ro_paths=[model_path, submission_dir, EVALUATOR_PACKAGE_DIR],
        rw_paths=[],
        tmpfs={},
        memory_bytes=memory_bytes,
        pids=pids,
        time_limit_s=time_limit_s,
        log_path=workdir / "server.log",
        log_cap_bytes=SERVER_LOG_CAP_BYTES,
        gpu_index=int(device.partition(":")[2] or 0) if device.startswith("cuda") else None,
        cpus=threads,  # a model can only slow its own scoring down, never the host's other jails
    )


@contextmanager
def _progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A transient progress bar on stderr when it is a terminal; otherwise nothing."""
    if not sys.stderr.isatty():
        yield lambda advance: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda advance: progress.advance(task, advance)


def _first_non_finite(logits: torch.Tensor, batch: list[_Window]) -> tuple[_Window, int] | None:
    bad = ~torch.isfinite(logits).all(dim=-1)
    for row, window in enumerate(batch):
        positions = bad[row, : len(window.targets)].nonzero()
        if len(positions):
            return window, int(positions[0])
    return None


def _main_pass(server: _ModelServer, windows: list[_Window], cuts: list[_Cut], batch_size: int, eos_id: int,
               ) -> tuple[dict[str, list[float]], list[torch.Tensor]]:
    """Per-document token losses, and the main pass's logits up to each cut (aligned with `cuts`)."""
    token_nats: dict[str, list[float]] = {}
    kept: list[torch.Tensor | None] = [None] * len(cuts)
    cuts_by_window: dict[tuple[str, int], list[int]] = {}
    for index, cut in enumerate(cuts):
        cuts_by_window.setdefault((cut.window.doc_id, cut.window.start), []).append(index)
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    with _progress("scoring", sum(len(window.targets) for window in windows)) as advance:
        for number, batch in enumerate(batches, 1):
            phase = f"main pass, batch {number}/{len(batches)}"
            logits = server.forward([window.inputs for window in batch], eos_id, phase)
            non_finite = _first_non_finite(logits, batch)
            if non_finite:
                window, offset = non_finite
                raise InvalidModel(
                    f"non-finite logits for document {window.doc_id!r} at position {window.start + offset}"
                )
            targets = torch.full(logits.shape[:2], eos_id, dtype=torch.int64)
            for row, window in enumerate(batch):
                targets[row, : len(window.targets)] = torch.tensor(window.targets, dtype=torch.int64)
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            nats = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            for row, window in enumerate(batch):
                token_nats.setdefault(window.doc_id, []).extend(nats[row, : len(window.targets)].tolist())
                for index in cuts_by_window.get((window.doc_id, window.start), []):
                    kept[index] = logits[row, : cuts[index].cut + 1].clone()
                advance(len(window.targets))
    return token_nats, kept


def _audit(server: _ModelServer, cuts: list[_Cut], kept: list[torch.Tensor], batch_size: int,
           eos_id: int) -> AuditReport:
    scale = max(1.0, max(float(logits.double().abs().max()) for logits in kept))
    tolerance = AUDIT_RELATIVE_TOLERANCE[server.dtype_name] * scale
    max_abs_diff = 0.0
    failures: list[tuple[_Cut, int, float]] = []
    starts = range(0, len(cuts), batch_size)
    for number, first in enumerate(starts, 1):
        batch = cuts[first : first + batch_size]
        logits = server.forward([cut.inputs for cut in batch], eos_id, f"causality audit, batch {number}/{len(starts)}")
        for row, cut in enumerate(batch):
            diff = (logits[row, : cut.cut + 1].double() - kept[first + row].double()).abs().amax(dim=-1)
            # `not <=` so that a NaN difference fails too.
            offending = (~(diff <= tolerance)).nonzero()
            if len(offending):
                position = int(offending[0])
                failures.append((cut, position, float(diff[position])))
            else:
                max_abs_diff = max(max_abs_diff, float(diff.max()))
    if failures:
        cut, position, difference = failures[0]
        raise InvalidModel(
            f"causality audit failed: document {cut.window.doc_id!r}, position {cut.window.start + position}: "
            f"its logits changed by {difference:.3g} (tolerance {tolerance:.3g}) when the tokens after position "
            f"{cut.window.start + cut.cut} were replaced, so the model reads later tokens "
            f"({len(failures)} of {len(cuts)} cuts failed)"
        )
    return AuditReport(cuts=len(cuts), passed=True, max_abs_diff=max_abs_diff, tolerance=tolerance)


@contextmanager
def _serving(sandbox, spec: JailSpec, **server_options) -> Iterator[_ModelServer]:
    with sandbox.start(spec) as jailed:
        server = _ModelServer(jailed, **server_options)
        server.wait_ready()
        yield server


def score_model(*, sandbox, workdir: Path, name: str, model_path: Path, submission_dir: Path,
                documents: Sequence[Document], vocab_size: int, eos_id: int, seq_len: int, batch_size: int,
                device: str, threads: int, time_limit_s: float, memory_bytes: int, pids: int,
                audit_cuts: int, secret_seed: int | None = None) -> ScoreReport:
    """Scores the saved model at `model_path` on `documents` (see the module docstring for the rules).

    Raises InvalidModel when the model cannot be scored or fails the causality audit, and
    SandboxUnavailable when the sandbox itself fails (the evaluator's fault, not the model's).
    """
    started = time.monotonic()
    _check_documents(documents, vocab_size, eos_id)
    ordered = sorted(documents, key=lambda document: document.doc_id)
    windows = sorted(
        (window for document in ordered for window in _windows(document, eos_id, seq_len)),
        key=lambda window: (-len(window.inputs), window.doc_id, window.start),
    )
    seed = secret_seed if secret_seed is not None else int.from_bytes(os.urandom(32), "big")
    cuts = _draw_cuts(sorted(windows, key=lambda window: (window.doc_id, window.start)), ordered, eos_id,
                      audit_cuts, random.Random(seed))

    deadline = _Deadline(time_limit_s)
    options = dict(vocab_size=vocab_size, deadline=deadline, memory_bytes=memory_bytes)
    spec_options = dict(model_path=Path(model_path), submission_dir=Path(submission_dir), device=device,
                        threads=threads, memory_bytes=memory_bytes, pids=pids)

    main_spec = _server_spec(name=f"{name}-main", workdir=Path(workdir) / "main",
                             time_limit_s=deadline.remaining() + SANDBOX_BACKSTOP_S, **spec_options)
    with _serving(sandbox, main_spec, role="main pass", dtype_name=None, **options) as server:
        token_nats, kept = _main_pass(server, windows, cuts, batch_size, eos_id)
        dtype_name = server.dtype_name

    if cuts:
        audit_spec = _server_spec(name=f"{name}-audit", workdir=Path(workdir) / "audit",
                                  time_limit_s=max(deadline.remaining(), 0) + SANDBOX_BACKSTOP_S, **spec_options)
        with _serving(sandbox, audit_spec, role="causality audit", dtype_name=dtype_name, **options) as server:
            audit = _audit(server, cuts, kept, batch_size, eos_id)
    else:
        audit = AuditReport(cuts=0, passed=True, max_abs_diff=0.0, tolerance=0.0)

    document_nats = [math.fsum(token_nats.get(document.doc_id, [])) for document in ordered]
    total_nats = math.fsum(document_nats)
    val_tokens = sum(len(document.tokens) for document in ordered)
    val_bytes = sum(document.n_bytes for document in ordered)
    return ScoreReport(
        val_loss=total_nats / val_tokens,
        val_bpb=total_nats / math.log(2) / val_bytes,
        val_tokens=val_tokens,
        val_bytes=val_bytes,
        val_documents=len(ordered),
        audit=audit,
        seconds=time.monotonic() - started,
    )

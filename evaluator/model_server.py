"""The model server: runs inside a scoring sandbox and streams one batch of rows at a time.

    python -P -B -m evaluator.model_server --submission DIR --model-cap BYTES --device cpu|cuda:0 --threads N

This is the only place a saved model is ever unpickled. It imports nothing from the host side of
the evaluator (stdlib, torch and `evaluator.api`); `evaluator.scoring` checks everything it sends
and trusts none of it.

Two kinds of process. The *server* is the jail's first process (pid 1 of its pid namespace). It
imports torch but never runs a tensor operation, never touches CUDA or OpenMP and never loads the
model; it makes itself non-dumpable (so no process of the jail can read or write its memory
through /proc, and with /proc mounted hidepid=2 none can even see it) and ignores every signal it
can. It serves model after model of one run: the host sends each model's bytes (MODEL), which the
kernel moves into a sealed memfd (splice); no model file is in the jail. For each batch it kills
and reaps every other process of the jail, copies the current model into a fresh sealed memfd,
then forks a fresh *batch process* that loads the model from that memfd and answers that batch's
steps. Tokens and models pass the server by splice, never through its memory: a batch process is
a fork of the server and inherits all of that memory, so nothing of an earlier batch, model or
split may be in it. A batch
process has seen no other batch and no other model, inherits no descriptor of the server's but the
reply pipe and its own memfd, and is gone, with everything it started, before the next one exists.
The batch process runs the model, so everything it writes is the model's to choose; the host gives
it no more trust than that.

Even the pid of the next batch process carries nothing: a batch may use at most PIDS_PER_BATCH
process and thread ids, and the server advances the pid namespace's counter to the next multiple
of that stride before it forks, so every batch process of a jail starts at a pid fixed in advance.
What a batch process could change of the server for its successor to inherit (resource limits,
CPU affinity, priorities, the shared pipes' flags, size and signal owner) is compared before every
fork with what it was before the first: a change ends scoring (ERROR "tampered").

Without a jail (`--sandbox none`) the server is not a pid namespace's init: it then kills each
batch process's process group only, and pids follow the host's counter. Nothing is sealed there.

Requests (host -> server), repeated until EOF; a header struct "<II" (op, n), then n int64 values:
    MODEL n=B   (B bytes follow, not int64 values) the model file for the batches that follow, at
                most --model-cap bytes
    OPEN  n=1   the number of rows R: kill and reap everything, fork a batch process for R rows;
                it replies READY (or ERROR)
    STEP  n=R   the next token of each of the R live rows; the batch process replies LOGITS [R, V]
    KEEP  n=K   row indices (ascending, into the live rows): only those rows go on; no reply
    CLOSE n=1   a nonce: kill and reap the batch; the server replies CLOSED with the nonce

Replies (server or batch process -> host): a header struct "<IIII" (kind, code, rows, vocab):
    STARTED (the server, once, after importing torch)   READY (the batch process loaded the model)
    LOGITS  code = dtype index in LOGIT_DTYPES, then rows*vocab logits, C order, native byte order
    ERROR   code = the stage that failed (ERROR_STAGES)
    CLOSED  (the server, after a CLOSE) code, rows = the nonce's low and high 32 bits
    ENDED   (the server: the batch process ended before CLOSE; everything of it has been reaped)
"""

from __future__ import annotations

import _thread
import argparse
import ctypes
import fcntl
import os
import resource
import select
import signal
import stat
import struct
import sys
import traceback
from dataclasses import dataclass

import torch

REQUEST_HEADER = struct.Struct("<II")
REPLY_HEADER = struct.Struct("<IIII")
OPEN, STEP, KEEP, CLOSE, MODEL = 1, 2, 3, 4, 5
STARTED, READY, LOGITS, ERROR, CLOSED, ENDED = 1, 2, 3, 4, 5, 6
LOGIT_DTYPES = ("float16", "bfloat16", "float32", "float64")
ERROR_STAGES = ("load", "step", "output", "processes", "tampered")
LOAD_ERROR, STEP_ERROR, OUTPUT_ERROR, PROCESSES_ERROR, TAMPERED_ERROR = range(len(ERROR_STAGES))
PIDS_PER_BATCH = 256
TOKEN = struct.Struct("<q")
_PR_SET_DUMPABLE = 4


def _read_exactly(fd: int, count: int) -> bytes | None:
    """`count` bytes from fd, or None at EOF before the first byte; EOFError for a cut message."""
    chunks, remaining = [], count
    while remaining:
        chunk = os.read(fd, remaining)
        if not chunk:
            if remaining == count:
                return None
            raise EOFError("the request stream ended inside a message")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_request(fd: int) -> tuple[int, bytes] | None:
    """(op, payload of n int64 values), or None at EOF between requests: what a batch process reads."""
    header = _read_exactly(fd, REQUEST_HEADER.size)
    if header is None:
        return None
    op, count = REQUEST_HEADER.unpack(header)
    size = count * TOKEN.size
    payload = _read_exactly(fd, size) if size else b""
    if payload is None:
        raise EOFError("the request stream ended inside a message")
    return op, payload


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def send_reply(fd: int, kind: int, code: int = 0, rows: int = 0, vocab: int = 0, payload=None) -> None:
    _write_all(fd, REPLY_HEADER.pack(kind, code, rows, vocab))
    if payload is not None:
        _write_all(fd, payload)


# --- the batch process (runs the model) ----------------------------------------------------------


def _as_logits(output, rows: int) -> torch.Tensor:
    """The decoder's output as a dense, contiguous CPU tensor [rows, vocab] of a float dtype we send."""
    if not isinstance(output, torch.Tensor) or output.layout != torch.strided:
        raise TypeError("the decoder returned something other than a dense tensor")
    if output.dim() != 2 or output.shape[0] != rows:
        raise ValueError("the decoder returned logits of the wrong shape")
    if str(output.dtype).removeprefix("torch.") not in LOGIT_DTYPES:
        raise TypeError("the decoder returned logits of a dtype the evaluator does not take")
    return output.detach().to("cpu").contiguous()


def _serve_batch(
    requests: int, replies: int, model_fd: int, rows: int, submission_dir: str, device: str, threads: int
) -> None:
    from evaluator.api import decoder_for

    torch.set_num_threads(threads)
    # First on sys.path so that pickled classes resolve to the submission's modules, as in training.
    sys.path.insert(0, submission_dir)
    try:
        # Left open: the batch process's own sealed copy, which holds nothing it may not read.
        model_file = os.fdopen(model_fd, "rb", closefd=False)
        model = torch.load(model_file, map_location=device, weights_only=False)
        if not isinstance(model, torch.nn.Module):
            raise TypeError("the saved object is not a torch.nn.Module")
        model.eval()
        with torch.no_grad():
            decoder = decoder_for(model, rows)
    except BaseException:  # anything the unpickled code raises, SystemExit included
        traceback.print_exc()
        send_reply(replies, ERROR, LOAD_ERROR)
        return
    send_reply(replies, READY)

    while (request := read_request(requests)) is not None:
        op, payload = request
        try:
            if not payload:  # the host never sends an empty request
                raise ValueError("an empty request")
            values = torch.frombuffer(bytearray(payload), dtype=torch.int64)
            with torch.no_grad():
                if op == KEEP:
                    decoder.keep(values.to(device))
                    rows = len(values)
                    continue
                output = decoder.step(values.to(device))
        except Exception:
            traceback.print_exc()
            send_reply(replies, ERROR, STEP_ERROR)
            return
        try:
            logits = _as_logits(output, rows)
        except (TypeError, ValueError):
            traceback.print_exc()
            send_reply(replies, ERROR, OUTPUT_ERROR)
            return
        # A view of the tensor's memory, not a copy; `logits` outlives it.
        nbytes = logits.numel() * logits.element_size()
        logits_view = (ctypes.c_char * nbytes).from_address(logits.data_ptr()) if nbytes else b""
        code = LOGIT_DTYPES.index(str(logits.dtype).removeprefix("torch."))
        send_reply(replies, LOGITS, code, logits.shape[0], logits.shape[1], logits_view)


_PROTOCOL_FD, _MODEL_FD = 3, 4


def _batch_process(requests: int, replies: int, model: int, rows: int, options: dict) -> None:
    """The child's side of a fork: private descriptors, default signals, then the batch."""
    for number in range(1, signal.NSIG):
        try:
            signal.signal(number, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a closed pipe is an error to report, not death
    # Above every descriptor in use, so that the dup2s below clobber none of them.
    kept = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1 << 10) for fd in (replies, model)]
    os.dup2(requests, 0)
    # Model code that prints writes to the log, never into the protocol.
    os.dup2(2, 1)
    os.dup2(kept[0], _PROTOCOL_FD)
    os.dup2(kept[1], _MODEL_FD)
    os.closerange(_MODEL_FD + 1, 1 << 16)
    sys.stdout = sys.stderr
    _serve_batch(0, _PROTOCOL_FD, _MODEL_FD, rows, **options)


# --- the server (never runs the model) -----------------------------------------------------------


def _kill_everything_else() -> None:
    """SIGKILL every other process of the jail and reap them all. From a pid namespace's init,
    kill(-1) reaches every process of the namespace but the caller, and orphans come to us."""
    while True:
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            while True:
                os.waitpid(-1, 0)
        except ChildProcessError:
            pass
        try:
            os.kill(-1, 0)
        except ProcessLookupError:
            return


def _last_pid() -> int:
    with open("/proc/sys/kernel/ns_last_pid") as handle:
        return int(handle.read())


def _use_one_id() -> None:
    """Start and finish a thread: it takes one id. Through `_thread`, not `threading`, whose counter
    of threads started would tell the next batch process how many ids its predecessor left."""
    finished = _thread.allocate_lock()
    finished.acquire()
    _thread.start_new_thread(finished.release, ())
    finished.acquire()


def _advance_pids_to(next_pid: int) -> bool:
    """Make `next_pid` the pid the next fork gets, by using up the ids before it (threads are the
    cheapest ids); False when the last batch already used ids past it, or the ids run out."""
    with open("/proc/sys/kernel/pid_max") as handle:
        if next_pid >= int(handle.read()):
            return False
    while (last := _last_pid()) < next_pid - 1:
        for _ in range(next_pid - 1 - last):
            _use_one_id()
    return _last_pid() == next_pid - 1


_RLIMITS = sorted(getattr(resource, name) for name in dir(resource) if name.startswith("RLIMIT_"))
_F_GETOWN, _F_GETSIG = 9, 11


def _inherited_state(pipes: tuple[int, ...]) -> tuple:
    """What a batch process inherits from the server that another process of the jail can change:
    any process of the same uid may prlimit, sched_setaffinity or setpriority pid 1, and the reply
    and log pipes' flags, size and signal owner are shared by every process that holds them. Were
    one changed, the next batch process would read it. (ioprio_set is refused by seccomp instead:
    the I/O priority a process reports changes by itself once it has done I/O.)"""
    shared = tuple(
        (
            fcntl.fcntl(fd, fcntl.F_GETFL),
            fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ),
            fcntl.fcntl(fd, _F_GETOWN),
            fcntl.fcntl(fd, _F_GETSIG),
        )
        for fd in pipes
        if stat.S_ISFIFO(os.fstat(fd).st_mode)
    )
    scheduling = (
        tuple(sorted(os.sched_getaffinity(0))),
        os.getpriority(os.PRIO_PROCESS, 0),
        os.sched_getscheduler(0),
        os.sched_getparam(0).sched_priority,
    )
    return tuple(resource.getrlimit(limit) for limit in _RLIMITS), scheduling, shared


@dataclass(frozen=True)
class _Child:
    pid: int
    requests: int  # the write end of its request pipe
    exited: int  # a pidfd: readable once it has ended


class _Server:
    def __init__(self, options: dict, model_cap: int) -> None:
        self.options = options
        self.model_cap = model_cap
        self.requests = os.dup(0)
        self.replies = os.dup(1)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(2, 1)
        os.close(devnull)
        self.child: _Child | None = None
        self.model: int | None = None  # a sealed memfd: the current model's bytes (MODEL)
        self.model_size = 0
        self.devnull = os.open(os.devnull, os.O_WRONLY)
        # As a pid namespace's init, every other process of the jail is ours to kill (see module doc).
        self.isolated = os.getpid() == 1
        self.batches = 0
        self.state: tuple | None = None
        self.first_pid = _last_pid() + PIDS_PER_BATCH if self.isolated else 0

    def open_batch(self, rows: int) -> None:
        self.end_batch()
        # Taken before the first fork, once the host has set up the pipes.
        state = _inherited_state((self.replies, 2))
        self.state = self.state or state
        if state != self.state:
            send_reply(self.replies, ERROR, TAMPERED_ERROR)
            return
        if self.isolated:
            next_pid = self.first_pid + self.batches * PIDS_PER_BATCH
            self.batches += 1
            if not _advance_pids_to(next_pid):
                send_reply(self.replies, ERROR, PROCESSES_ERROR)
                return
        if self.model is None:
            send_reply(self.replies, ERROR, LOAD_ERROR)
            return
        model = _sealed_copy(self.model, self.model_size)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.setpgid(0, 0)
                os.close(write_end)
                os.close(self.requests)
                _batch_process(read_end, self.replies, model, rows, self.options)
            finally:
                os._exit(0)
        os.close(read_end)
        os.close(model)
        self.child = _Child(pid, write_end, os.pidfd_open(pid))

    def end_batch(self) -> None:
        if self.child is not None:
            os.close(self.child.requests)
            os.close(self.child.exited)
            if not self.isolated:
                try:
                    os.killpg(self.child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                os.waitpid(self.child.pid, 0)
            self.child = None
        if self.isolated:
            _kill_everything_else()

    def forward(self, op: int, count: int) -> None:
        """A STEP or KEEP: its header, then its values moved from the host's pipe into the batch
        process's by the kernel (splice), never through the server's memory, which every later batch
        process inherits: no token of this batch stays there for them."""
        size = count * TOKEN.size
        if self.child is None:  # the batch already ended, and the host was told
            _splice_exactly(self.requests, self.devnull, size)
            return
        try:
            _write_all(self.child.requests, REQUEST_HEADER.pack(op, count))
            moved = _splice_exactly(self.requests, self.child.requests, size)
        except BrokenPipeError:
            moved = None
        if moved is None:
            self.batch_ended()

    def take_model(self, size: int) -> bool:
        """MODEL: the model's bytes, moved by the kernel into a memfd sealed against every change, never
        through the server's memory; False when the host sent more than the cap."""
        self.end_batch()
        if size > self.model_cap:
            return False
        if self.model is not None:
            os.close(self.model)
        self.model = os.memfd_create("model", os.MFD_ALLOW_SEALING)
        self.model_size = size
        _splice_exactly(self.requests, self.model, size)
        fcntl.fcntl(self.model, fcntl.F_ADD_SEALS, _ALL_SEALS)
        return True

    def batch_ended(self) -> None:
        self.end_batch()
        send_reply(self.replies, ENDED)

    def run(self) -> int:
        send_reply(self.replies, STARTED)
        while True:
            watched = [self.requests] + ([self.child.exited] if self.child else [])
            ready, _, _ = select.select(watched, [], [])
            if self.child is not None and self.child.exited in ready:
                self.batch_ended()
                continue
            header = _read_exactly(self.requests, REQUEST_HEADER.size)
            if header is None:
                break
            op, count = REQUEST_HEADER.unpack(header)
            if op in (STEP, KEEP):
                self.forward(op, count)
            elif op == MODEL:
                if not self.take_model(count):
                    return 1  # the host never sends more: it is not the host we serve
            elif op in (OPEN, CLOSE) and count == 1:
                value = TOKEN.unpack(_read_exactly(self.requests, TOKEN.size) or bytes(TOKEN.size))[0]
                if op == OPEN:
                    self.open_batch(value)
                else:
                    self.close_batch(value)
            else:
                _splice_exactly(self.requests, self.devnull, count * TOKEN.size)
        self.end_batch()
        return 0

    def close_batch(self, nonce: int) -> None:
        """CLOSE: kill and reap the batch, then check what the next batch process would inherit (a
        batch process that changed it in a model's last batch is caught here, not in the next
        model's), and answer CLOSED with the host's nonce, which no batch process has seen: a
        CLOSED a batch process forged on the shared reply pipe cannot carry it."""
        self.end_batch()
        if self.state is not None and _inherited_state((self.replies, 2)) != self.state:
            send_reply(self.replies, ERROR, TAMPERED_ERROR)
            return
        send_reply(self.replies, CLOSED, nonce & 0xFFFFFFFF, nonce >> 32)


_ALL_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL


def _splice_exactly(source: int, target: int, size: int) -> int | None:
    """Move `size` bytes from the pipe `source` to `target` in the kernel; EOFError at a cut request.
    A target pipe that breaks is drained into nothing, so the request stream stays whole: None then."""
    moved = 0
    while moved < size:
        try:
            count = os.splice(source, target, size - moved)
        except BrokenPipeError:
            with open(os.devnull, "wb") as sink:
                _splice_exactly(source, sink.fileno(), size - moved)
            return None
        if count == 0:
            raise EOFError("the request stream ended inside a message")
        moved += count
    return moved


def _sealed_copy(model: int, size: int) -> int:
    """A fresh memfd holding the model, copied in the kernel, read from its start, sealed against
    every change: the one batch process that inherits it can read its model and nothing else, and
    leave nothing in it for the next (which gets a copy of its own)."""
    fd = os.memfd_create("model", os.MFD_ALLOW_SEALING)
    copied = 0
    while copied < size:
        copied += os.sendfile(fd, model, copied, size - copied)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _ALL_SEALS)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def serve(submission_dir: str, model_cap: int, device: str, threads: int) -> int:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    for number in range(1, signal.NSIG):
        if number not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD):
            try:
                signal.signal(number, signal.SIG_IGN)
            except (OSError, ValueError):
                pass
    options = dict(submission_dir=submission_dir, device=device, threads=threads)
    return _Server(options, model_cap).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluator.model_server", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--submission", required=True, help="the submission folder, put on sys.path of each batch process"
    )
    parser.add_argument(
        "--model-cap", type=int, required=True, help="the largest model (MODEL request) taken, in bytes"
    )
    parser.add_argument("--device", required=True, help="cpu or cuda:0")
    parser.add_argument("--threads", type=int, required=True, help="torch intra-op threads of each batch process")
    args = parser.parse_args(argv)
    return serve(args.submission, args.model_cap, args.device, args.threads)


if __name__ == "__main__":
    sys.exit(main())

"""The training harness: runs INSIDE the sandbox, between the evaluator and the submission.

Order matters for the clock (DESIGN.md, "The clock"): everything before the "start" message is the
evaluator's own work and the same for everyone (interpreter start, `import torch`, device
initialisation, reading the training split); everything from the submission's import to the saved
model counts. Nothing measured here is trusted by the evaluator: its clock runs outside the jail,
from receiving "start" to receiving "saved", and it kills the jail as soon as "saved" arrives.

Protocol: JSON lines on the original stdout; the submission's own stdout goes to stderr (the
captured log). The evaluator answers a "snapshot" (SNAPSHOT_FILE is saved) with one JSON line on
stdin: whether it took the snapshot, and when the next one is due. Imports only the job file, the
submission API, the data loader and torch (evaluator/in_jail.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from evaluator.job import Job

MODEL_FILE = "model.pt"
SNAPSHOT_FILE = "snapshot.pt"
_TRACEBACK_TAIL_LINES = 30


class _Channel:
    def __init__(self) -> None:
        # Keep the real stdout for the protocol, then point fd 1 at stderr so that prints by the
        # submission land in the captured log and cannot forge protocol lines by accident.
        self._stream = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        # Likewise the evaluator's answers: a submission reading stdin gets nothing, not an answer.
        self._answers = os.fdopen(os.dup(0), "rb")
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)

    def send(self, event: str, **fields) -> None:
        self._stream.write(json.dumps({"event": event, **fields}) + "\n")
        self._stream.flush()

    def answer(self) -> dict:
        """The evaluator's next answer; {} once it has stopped answering."""
        line = self._answers.readline(4096)
        try:
            answer = json.loads(line)
        except ValueError:
            return {}
        return answer if isinstance(answer, dict) else {}


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Training harness (run by `evaluator run`, inside the sandbox).")
    parser.add_argument("--job", required=True, type=Path, help="JSON file describing the run")
    return parser.parse_args(argv)


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(threads)


def _init_device(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.init()
        torch.zeros(1, device=device).add_(1)
        torch.cuda.synchronize()


def _clear_snapshot(out_dir: Path) -> None:
    """The output dir is a tmpfs the size of one model: a snapshot the evaluator refused (one sent
    a moment before it was due on its clock) must not leave too little room for the next save."""
    (out_dir / SNAPSHOT_FILE).unlink(missing_ok=True)


def _save(model, path: Path) -> int:
    import torch

    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        torch.save(model, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    return path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    channel = _Channel()
    job = Job.read(args.job)
    # Phase times before the clock, reported for the overhead benchmark only (advisory, untrusted).
    phases = {}
    mark = time.monotonic()

    import torch

    from evaluator.api import BudgetExceeded, Context
    from evaluator.dataset.loader import read_train_tokens

    phases["import_s"] = time.monotonic() - mark
    mark = time.monotonic()
    _set_threads(job.threads)
    _init_device(job.device)
    torch.manual_seed(job.seed)
    phases["device_init_s"] = time.monotonic() - mark
    mark = time.monotonic()
    train_tokens = read_train_tokens(job.train_path, job.eos_id)
    phases["data_load_s"] = time.monotonic() - mark

    def emit(step: int, metrics: dict[str, float]) -> None:
        channel.send("log", step=step, metrics=metrics)

    def take_snapshot(model) -> tuple[bool, float | None]:
        started = time.monotonic()
        _clear_snapshot(job.out_dir)
        size = _save(model, job.out_dir / SNAPSHOT_FILE)
        channel.send("snapshot", bytes=size, save_s=time.monotonic() - started)
        answer = channel.answer()
        next_due = answer.get("next_due_s")
        return answer.get("taken") is True, float(next_due) if isinstance(next_due, (int, float)) else None

    def out_of_time(signum, frame):
        raise BudgetExceeded(f"training budget of {job.budget_s:g} s is spent")

    channel.send("start", phases=phases)
    # Made now, so that its own clock (advisory: the evaluator's is the one that counts) starts with
    # the evaluator's.
    ctx = Context(
        train_tokens=train_tokens,
        vocab_size=job.vocab_size,
        eos_id=job.eos_id,
        device=job.device,
        config=job.config,
        seed=job.seed,
        budget_s=job.budget_s,
        scratch=job.scratch,
        eval_seq_len=job.eval_seq_len,
        snapshot_every_s=job.snapshot_every_s,
        snapshot_window_s=job.snapshot_window_s,
        _emit=emit,
        _take_snapshot=take_snapshot,
    )
    # A polite stop for code that never asks for time_left(); the evaluator's kill is the real one.
    signal.signal(signal.SIGALRM, out_of_time)
    signal.setitimer(signal.ITIMER_REAL, job.budget_s)
    try:
        sys.path.insert(0, str(job.submission_dir))
        module = importlib.import_module(job.module)
        model = getattr(module, job.function)(ctx)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{job.function}() returned {type(model).__name__}, not a torch.nn.Module")
        if job.device.startswith("cuda"):
            torch.cuda.synchronize()
        signal.setitimer(signal.ITIMER_REAL, 0)
        _clear_snapshot(job.out_dir)
        size = _save(model, job.out_dir / MODEL_FILE)
    except BudgetExceeded as exc:
        channel.send("error", kind="over_budget", message=str(exc))
        return 1
    except BaseException as exc:  # the submission's failure, whatever it is, is reported, not raised
        signal.setitimer(signal.ITIMER_REAL, 0)
        tail = "".join(traceback.format_exception(exc)[-_TRACEBACK_TAIL_LINES:])
        sys.stderr.write(tail)
        channel.send("error", kind="crashed", message=tail[-4000:])
        return 1
    channel.send("saved", bytes=size)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`evaluator calibrate` and `--budget calibrated`: how fast this host is against a track's hardware.

A fixed workload (a few training steps of a small dense transformer: float32 on the CPU, fp16
autocast on CUDA) is timed here and compared with the same workload's time on the track's hardware,
which the track file states with its provenance (`[calibration]`: measured on that hardware, or
estimated and how). The host's time is the fastest repeat's: other work on the host can only add
time. A measurement that shows other work (on the CPU, the workload received less than MIN_CPU_SHARE
of its threads' time; anywhere, repeats further apart than MAX_REPEAT_RATIO) is taken again, and
after ATTEMPTS refused: a busy host gives no factor worth scaling a budget by. The ratio scales a
track's budget and scoring deadlines for a development run on other hardware; such a run is always
unofficial. docs/CALIBRATION.md says where the ratio misleads.

The workload is our code, not a submission's: it runs unsandboxed, in a child process of the
evaluator so that the CUDA context it makes (hundreds of MiB of the GPU's memory) ends with it
instead of staying beside the run's jail.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from evaluator.errors import UserError
from evaluator.gpus import hold_gpu, hold_host
from evaluator.tracks import Track, load_track

WORKLOAD = "dense-transformer-v1"
# The workload. Changing any of these makes it another workload: rename WORKLOAD and re-measure
# every track's [calibration] figure.
LAYERS, D_MODEL, HEADS, FFN = 4, 256, 4, 1024
VOCAB, SEQ_LEN, BATCH = 8192, 256, 4
WARMUP_STEPS, TIMED_STEPS = 2, 4
DEFAULT_REPEATS = 3
CHILD_TIMEOUT_S = 600  # a CPU far slower than any track's would still finish well inside this
# Factors beyond these say the comparison is meaningless (a figure for other hardware, a broken
# host), not that a budget of seconds or of days is right.
FACTOR_RANGE = (0.02, 50.0)
# A quiet 2-core host gives the CPU workload ~0.97 of its threads' time and repeats within a few %.
MIN_CPU_SHARE = 0.8
MAX_REPEAT_RATIO = 1.25  # slowest repeat / fastest
ATTEMPTS = 3


@dataclass(frozen=True)
class HostTiming:
    device: str  # "cpu" or the CUDA device's name
    threads: int
    seconds: list[float]  # one per repeat: TIMED_STEPS steps, after warm-up
    cpu_seconds: list[float]  # the process's CPU time in each repeat (all its threads)

    @property
    def best_s(self) -> float:
        return min(self.seconds)

    @property
    def spread(self) -> float:
        """Coefficient of variation over the repeats (0 with a single repeat)."""
        return statistics.stdev(self.seconds) / statistics.mean(self.seconds) if len(self.seconds) > 1 else 0.0

    @property
    def cpu_share(self) -> float | None:
        """On the CPU: the least share of its threads' time a repeat received; None on a GPU."""
        if self.device != "cpu":
            return None
        return min(cpu / (wall * self.threads) for cpu, wall in zip(self.cpu_seconds, self.seconds, strict=True))

    def busy_reason(self) -> str | None:
        """Why these figures show a busy host, or None."""
        share = self.cpu_share
        if share is not None and share < MIN_CPU_SHARE:
            return (
                f"the workload received {share:.0%} of its {self.threads} CPUs' time (a quiet host gives at least "
                f"{MIN_CPU_SHARE:.0%})"
            )
        ratio = max(self.seconds) / min(self.seconds)
        if ratio > MAX_REPEAT_RATIO:
            return (
                f"its repeats took {min(self.seconds):.3f}-{max(self.seconds):.3f} s "
                f"(at most {MAX_REPEAT_RATIO:g} x apart on a quiet host)"
            )
        return None


@dataclass(frozen=True)
class Calibration:
    """What a calibrated run records: the factor its budget and deadlines were multiplied by."""

    workload: str
    factor: float
    host_seconds: float  # the fastest of host_repeats
    host_repeats: list[float]
    host_spread: float
    host_device: str
    host_threads: int
    host_cpu_share: float | None  # on the CPU: the least share of its threads' time a repeat received
    track_seconds: float
    track_provenance: str

    def as_dict(self) -> dict:
        return asdict(self)


def _model(torch):
    layer = torch.nn.TransformerEncoderLayer(D_MODEL, HEADS, FFN, dropout=0.0, batch_first=True, norm_first=True)
    return torch.nn.ModuleDict(
        {
            "embed": torch.nn.Embedding(VOCAB, D_MODEL),
            "blocks": torch.nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False),
            "head": torch.nn.Linear(D_MODEL, VOCAB),
        }
    )


def _time_here(device_name: str, threads: int, repeats: int) -> HostTiming:
    """The measurement itself, in the child process: `device_name` is "cpu" or "cuda:N"."""
    import torch

    device = torch.device(device_name)
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    model = _model(torch).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ_LEN + 1), generator=generator).to(device)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(SEQ_LEN, device=device)
    use_fp16 = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_fp16)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_fp16):
            hidden = model["blocks"](model["embed"](tokens[:, :-1]), mask=mask, is_causal=True)
            logits = model["head"](hidden)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def synchronize() -> None:
        if use_fp16:
            torch.cuda.synchronize(device)

    for _ in range(WARMUP_STEPS):
        step()
    seconds, cpu_seconds = [], []
    for _ in range(repeats):
        synchronize()
        began, began_cpu = time.perf_counter(), time.process_time()
        for _ in range(TIMED_STEPS):
            step()
        synchronize()
        seconds.append(time.perf_counter() - began)
        cpu_seconds.append(time.process_time() - began_cpu)
    name = torch.cuda.get_device_name(device) if use_fp16 else "cpu"
    return HostTiming(device=name, threads=threads, seconds=seconds, cpu_seconds=cpu_seconds)


def time_workload(device_kind: str, threads: int, repeats: int = DEFAULT_REPEATS, cuda_index: int = 0) -> HostTiming:
    """Time the workload on CUDA's GPU `cuda_index` (device_kind "cuda") or the CPU with `threads`,
    in a child process."""
    import torch

    if repeats < 1:
        raise UserError("--repeats must be at least 1")
    if device_kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"the track runs on CUDA and this torch ({torch.__version__}) sees no GPU here")
    device_name = f"cuda:{cuda_index}" if device_kind == "cuda" else "cpu"
    # -P and a neutral folder: run from inside a submission, `python -m` would otherwise put that
    # folder first on sys.path, and a json.py there would run here, outside every sandbox.
    with tempfile.TemporaryDirectory(prefix="evaluator-calibrate-") as neutral:
        try:
            child = subprocess.run(
                [sys.executable, "-P", "-m", "evaluator.calibration", device_name, str(threads), str(repeats)],
                capture_output=True,
                text=True,
                timeout=CHILD_TIMEOUT_S,
                cwd=neutral,
                # Found where this process found it: an installed package, or a checkout that is not.
                env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
            )
        except subprocess.TimeoutExpired:
            raise UserError(f"the calibration workload took over {CHILD_TIMEOUT_S} s on {device_name}") from None
    if child.returncode != 0:
        tail = child.stderr.strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"the calibration workload failed on {device_name}: {tail[0]}")
    try:  # the last line: a library may have printed before it
        return HostTiming(**json.loads(child.stdout.strip().splitlines()[-1]))
    except (IndexError, ValueError, TypeError):
        raise UserError(f"the calibration workload on {device_name} printed no figures") from None


def calibrate(track: Track, repeats: int = DEFAULT_REPEATS, cuda_index: int = 0) -> Calibration:
    """Time this host and compare it with the track's figure: factor > 1 means this host is slower."""
    reference = track.calibration
    if reference.workload != WORKLOAD:
        raise UserError(
            f"track {track.id} states a time for workload {reference.workload!r}; this evaluator "
            f"runs {WORKLOAD!r}: the track file needs a new [calibration] figure"
        )
    for attempt in range(1, ATTEMPTS + 1):
        timing = time_workload(track.device.kind, track.device.threads, repeats, cuda_index)
        busy = timing.busy_reason()
        if busy is None:
            break
        if attempt < ATTEMPTS:
            print(
                f"calibration: the host looks busy ({busy}); measuring again ({attempt + 1} of {ATTEMPTS})",
                file=sys.stderr,
            )
    else:
        raise UserError(
            f"this host is busy: {busy}, in each of {ATTEMPTS} measurements; calibrate when nothing else runs here"
        )
    factor = timing.best_s / reference.seconds
    low, high = FACTOR_RANGE
    if not low <= factor <= high:
        raise UserError(
            f"this host took {timing.best_s:.4g} s against track {track.id}'s {reference.seconds:g} s: a "
            f"factor of {factor:.3g}, outside {low:g}-{high:g}, compares things too unlike to scale a budget by"
        )
    share = timing.cpu_share
    return Calibration(
        workload=WORKLOAD,
        factor=round(factor, 3),
        host_seconds=round(timing.best_s, 4),
        host_repeats=[round(seconds, 4) for seconds in timing.seconds],
        host_spread=round(timing.spread, 4),
        host_device=timing.device,
        host_threads=timing.threads,
        host_cpu_share=None if share is None else round(share, 3),
        track_seconds=reference.seconds,
        track_provenance=reference.provenance,
    )


def _run_calibrate(args: argparse.Namespace) -> int:
    track = load_track(args.track)
    if track.device.kind == "cuda":
        # Held like a run's GPU: timing a GPU another run trains on would slow that run and time both.
        with (
            hold_host(exclusive=False, holder=f"pid {os.getpid()}, evaluator calibrate"),
            hold_gpu(args.gpu, f"pid {os.getpid()}, evaluator calibrate") as placement,
        ):
            calibration = calibrate(track, args.repeats, placement.cuda_index)
    elif args.gpu is not None:
        raise UserError(f"--gpu applies to GPU tracks; track {track.id} runs on the CPU")
    else:
        calibration = calibrate(track, args.repeats)
    budget_s = track.budget_s * calibration.factor
    if args.json:
        print(json.dumps(calibration.as_dict() | {"track": track.id, "calibrated_budget_s": budget_s}, indent=2))
        return 0
    repeats = ", ".join(f"{seconds:.3f}" for seconds in calibration.host_repeats)
    received = (
        "" if calibration.host_cpu_share is None else f", received {calibration.host_cpu_share:.0%} of its CPUs' time"
    )
    print(
        f"workload {WORKLOAD} on {calibration.host_device} ({calibration.host_threads} thread(s)): fastest "
        f"{calibration.host_seconds:.3f} s of {len(calibration.host_repeats)} repeat(s) [{repeats}], "
        f"spread {100 * calibration.host_spread:.1f}%{received}"
    )
    print(f"track {track.id}: {calibration.track_seconds:g} s, {calibration.track_provenance}")
    print(
        f"factor {calibration.factor:.3f}: this host is {'slower' if calibration.factor > 1 else 'faster'} than the "
        f"track's hardware; a calibrated budget is {budget_s:.1f} s instead of {track.budget_s:g} s"
    )
    print(
        "evaluator run DIR --budget calibrated measures again and scales the budget and the scoring deadlines by it; "
        "such runs are unofficial (docs/CALIBRATION.md: what the factor cannot capture)"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="time this host against a track's hardware (for --budget calibrated)",
        description=(
            f"Time a fixed workload ({WORKLOAD}: {TIMED_STEPS} training steps "
            f"of a {LAYERS}-layer d{D_MODEL} transformer "
            f"at batch {BATCH} x {SEQ_LEN}; float32 on the CPU with the track's threads, fp16 autocast on CUDA) and "
            "compare it with the workload's time on the track's hardware, which the track file states with its "
            "provenance. The factor (this host / the track) is what `evaluator run --budget calibrated` scales the "
            "budget and the scoring deadlines by; such runs are always unofficial."
        ),
    )
    parser.add_argument("--track", default="t4-5min", metavar="ID", help="the track to compare with (default: t4-5min)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=DEFAULT_REPEATS,
        metavar="N",
        help=f"timed repeats of the workload (default {DEFAULT_REPEATS}); the spread over them is reported",
    )
    parser.add_argument(
        "--gpu",
        type=int,
        metavar="N",
        help="on a GPU track, the GPU to time, as CUDA numbers them "
        "(default: the first that no run of this evaluator holds)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    parser.set_defaults(handler=_run_calibrate)


if __name__ == "__main__":  # the child process of time_workload: DEVICE THREADS REPEATS -> JSON
    device_arg, threads_arg, repeats_arg = sys.argv[1:]
    print(json.dumps(asdict(_time_here(device_arg, int(threads_arg), int(repeats_arg)))))

"""How steady the calibration workload is on this host's CPU, and its factor against cpu-1min.

    .venv/bin/python benchmarks/calibration.py [--repeats 10] [--rounds 3]

Each round is one `evaluator calibrate` measurement (a fresh child process, warm-up, then
`--repeats` timed repeats); several rounds show how much the fastest repeat (the estimate
`evaluator calibrate` uses) moves between calls, which is what a calibrated budget inherits, and
what share of its threads' time the workload received. Prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluator.calibration import (
    BATCH,
    D_MODEL,
    FFN,
    LAYERS,
    SEQ_LEN,
    TIMED_STEPS,
    VOCAB,
    WORKLOAD,
    time_workload,
)
from evaluator.tracks import load_track


def _matmul_flops_per_token() -> float:
    """6 x the parameters a token passes through in matmuls, plus attention's two T x d products."""
    per_layer = 4 * D_MODEL * D_MODEL + 2 * D_MODEL * FFN
    parameters = LAYERS * per_layer + D_MODEL * VOCAB  # the embedding is a lookup, the head a matmul
    attention = (
        LAYERS * 2 * 2 * SEQ_LEN * D_MODEL
    )  # QK^T and AV forward, over all T keys: the masked kernels compute them all
    return 6 * parameters + 3 * attention  # backward costs twice the forward


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    track = load_track("cpu-1min")
    fastest = []
    for number in range(1, args.rounds + 1):
        timing = time_workload("cpu", track.device.threads, args.repeats)
        fastest.append(timing.best_s)
        print(
            f"round {number}: fastest {timing.best_s:.3f} s, median {statistics.median(timing.seconds):.3f}, "
            f"slowest {max(timing.seconds):.3f}, spread {100 * timing.spread:.1f}% over {args.repeats} repeats, "
            f"received {timing.cpu_share:.0%} of the CPUs' time at least; busy: {timing.busy_reason() or 'no'}"
        )
    tokens = TIMED_STEPS * BATCH * SEQ_LEN
    flops = tokens * _matmul_flops_per_token()
    median = statistics.median(fastest)
    print(
        f"{WORKLOAD} on the CPU, {track.device.threads} threads: median of the rounds' fastest repeats {median:.3f} s "
        f"(rounds {min(fastest):.3f}-{max(fastest):.3f}); {tokens} tokens, {flops / 1e9:.0f} GFLOP by count, "
        f"{flops / median / 1e9:.1f} GFLOP/s achieved"
    )
    reference = track.calibration
    print(
        f"against cpu-1min's figure ({reference.seconds:g} s, {reference.provenance.split(',')[0]}): "
        f"factor {median / reference.seconds:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

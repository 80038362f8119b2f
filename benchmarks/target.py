"""How a time-to-target track's target is set, and how soon the reference reaches it, end to end.

    .venv/bin/python benchmarks/target.py [--track cpu-target --from cpu-1min] [--seeds 3]

The target is set as AlgoPerf sets its targets, from the reference's median over seeds: the median
val_loss of the reference's published, verified results on the fixed-time track `--from`
(`results/cpu-1min/reference/`: drawn seeds, the track's full budget, `make results`). Then the
reference runs on the time-to-target track itself (the real sandbox, drawn seeds) and this prints
each run's time to that target, their median, and whether the track file's target is the median
it computes. Write what it prints into the track's `[target]` (value and provenance). On a T4:
`--track t4-target --from t4-5min`, after the reference's t4-5min results are published.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from evaluator.cli import run_guarded
from evaluator.paths import HOME, KEYS_DIR, RESULTS_DIR
from evaluator.publish import envelope_paths, verify_paths
from evaluator.runner import evaluate
from evaluator.signing import load_trusted_keys
from evaluator.tracks import load_track

REFERENCE = HOME / "reference"


def reference_median(results_dir: Path, track_id: str) -> tuple[float, list[float]]:
    """The median val_loss of the reference's verified official results on a track, and the losses."""
    paths = [path for path in envelope_paths(results_dir) if path.parent == results_dir / track_id / "reference"]
    verified, rejected = verify_paths(paths, load_trusted_keys(KEYS_DIR))
    if rejected:
        raise SystemExit(f"{len(rejected)} of the reference's {track_id} results do not verify: {rejected[0][1]}")
    losses = sorted(
        v.result["metrics"]["val_loss"] for v in verified if v.result["official"] and v.result["seed_drawn"]
    )
    if len(losses) < 3:
        raise SystemExit(f"the reference has {len(losses)} official {track_id} results with drawn seeds; it needs 3")
    return statistics.median(losses), losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--track", default="cpu-target", help="the time-to-target track (default: cpu-target)")
    parser.add_argument(
        "--from", dest="source", default="cpu-1min", help="the fixed-time track whose results set the target"
    )
    parser.add_argument("--seeds", type=int, default=3, help="runs of the reference on the track, drawn seeds")
    args = parser.parse_args()
    console = Console(stderr=True)
    median, losses = reference_median(RESULTS_DIR, args.source)
    track = load_track(args.track)
    if track.target is None:
        raise SystemExit(f"track {track.id} has no [target]")
    print(
        f"the reference's {args.source} val_loss over {len(losses)} drawn seeds: "
        f"{', '.join(f'{x:.4f}' for x in losses)}; "
        f"median {median:.4f}"
    )
    print(
        f"{track.id}'s target: {track.target.val_loss:g} "
        f"({'the median' if track.target.val_loss == median else 'NOT the median'})"
    )
    times, unreached = [], 0
    with tempfile.TemporaryDirectory(prefix="speedrun-target-") as scratch:
        for number in range(args.seeds):
            console.print(f"[bold]run {number + 1}/{args.seeds}[/]: the reference on {track.id}")
            record, _ = evaluate(
                REFERENCE,
                track_id=track.id,
                secret_seed=True,
                sandbox_choice="nsjail",
                runs_dir=Path(scratch),
                console=console,
            )
            if record["status"] == "ok":
                times.append(record["target"]["time_s"])
            elif record["status"] == "not_reached":
                unreached += 1
            else:
                raise SystemExit(f"the reference's run ended {record['status']}: {record['message']}")
            curve = ", ".join(
                f"{p['time_s']:.1f} s {p['val_loss']:.4f}" for p in record["val_curve"] if p["scored"] == "ok"
            )
            print(
                f"seed {record['seed']} (drawn): {record['status']}, time to target "
                f"{record['target']['time_s']} s; scored: {curve}; scoring {record['scoring_seconds']} s"
            )
    summary = f"median {statistics.median(times):.2f} s" if times else "no time"
    print(
        f"the reference reached {track.target.val_loss:g} in {len(times)} of {args.seeds} runs ({summary}; "
        f"times: {', '.join(f'{t:.2f}' for t in times) or 'none'}); {unreached} not_reached"
    )


if __name__ == "__main__":
    sys.exit(run_guarded("target.py", main))

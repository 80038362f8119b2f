"""Side-by-side evaluation of several submissions: same track, same machine, same seeds, one invocation.

    .venv/bin/python benchmarks/compare.py [SUBMISSION ...] [--track cpu-1min] [--seeds 0 1] [--budget S]

Defaults: reference, submissions/seed-moe and submissions/template on cpu-1min at the full budget,
seeds 0 and 1. Runs are interleaved by seed (every submission's seed 0, then every seed 1) so that
drift in machine load touches all submissions alike. Prints a table and writes it as Markdown to
`<out>/compare.md` next to the run directories. Also measures this machine's float32 matmul peak
and reports each submission's achieved FLOP/s as a fraction of it, for submissions that log a
cumulative `flops` metric through ctx.log.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

from evaluator.cli import run_guarded
from evaluator.metrics import last_logged_metric
from evaluator.paths import HOME
from evaluator.runner import evaluate
from evaluator.sandbox import SANDBOX_CHOICES
from evaluator.tracks import load_track

DEFAULT_SUBMISSIONS = ["reference", "submissions/seed-moe", "submissions/template"]


def matmul_peak_flops(threads: int, size: int = 2048, seconds: float = 3.0) -> float:
    """Best float32 matmul throughput over repeated size x size products on `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = 0.0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        began = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - began))
    return best


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def _mean(values: list[float], fmt: str) -> str:
    return format(statistics.mean(values), fmt) if values else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "submissions", nargs="*", default=DEFAULT_SUBMISSIONS, help="submission folders (default: %(default)s)"
    )
    parser.add_argument("--track", default="cpu-1min")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--budget", type=float, help="override the track's budget (makes runs unofficial)")
    parser.add_argument("--sandbox", default="auto", choices=SANDBOX_CHOICES)
    parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/out/<timestamp>)")
    args = parser.parse_args()

    console = Console(stderr=True)
    out = args.out or HOME / "benchmarks" / "out" / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    track = load_track(args.track)
    peak = matmul_peak_flops(track.device.threads)
    console.print(f"float32 matmul peak on {track.device.threads} thread(s): {peak / 1e9:.1f} GFLOP/s")

    runs: dict[str, list[tuple[dict, Path]]] = {s: [] for s in args.submissions}
    for seed in args.seeds:
        for submission in args.submissions:
            record, run_dir = evaluate(
                HOME / submission,
                track_id=args.track,
                seed=seed,
                budget_s=args.budget,
                sandbox_choice=args.sandbox,
                runs_dir=out / "runs",
                console=console,
            )
            console.print(
                f"{submission} seed {seed}: {record['status']} "
                + (f"val_loss {record['metrics']['val_loss']:.4f}" if record["metrics"] else record["message"][:200])
            )
            runs[submission].append((record, run_dir))

    reference_losses = [r["metrics"]["val_loss"] for r, _ in runs.get("reference", []) if r["metrics"]]
    reference_mean = statistics.mean(reference_losses) if reference_losses else None
    headers = [
        "submission",
        "ok runs",
        "val_loss (mean ± std)",
        "val_bpb",
        "train s",
        "steps",
        "tokens/s",
        "vs reference",
        "FLOP/s of peak",
    ]
    rows = []
    for submission, results in runs.items():
        ok = [(r, d) for r, d in results if r["status"] == "ok"]
        losses = [r["metrics"]["val_loss"] for r, _ in ok]
        flops = [
            last_logged_metric(d, "flops") / r["train"]["train_seconds"]
            for r, d in ok
            if last_logged_metric(d, "flops")
        ]
        relative = (
            f"{(statistics.mean(losses) / reference_mean - 1) * 100:+.1f} %" if losses and reference_mean else "-"
        )
        statuses = sorted({r["status"] for r, _ in results} - {"ok"})
        rows.append(
            [
                submission,
                f"{len(ok)}/{len(results)}" + (f" ({', '.join(statuses)})" if statuses else ""),
                _mean_std(losses),
                _mean([r["metrics"]["val_bpb"] for r, _ in ok], ".4f"),
                _mean([r["train"]["train_seconds"] for r, _ in ok], ".1f"),
                _mean([r["train"]["steps"] for r, _ in ok if r["train"]["steps"] is not None], ".0f"),
                _mean([r["train"]["tokens_per_s"] for r, _ in ok if r["train"]["tokens_per_s"]], ",.0f"),
                relative,
                f"{statistics.mean(flops) / peak * 100:.1f} %" if flops else "-",
            ]
        )

    table = Table(
        title=f"{args.track}, seeds {', '.join(map(str, args.seeds))}, budget {args.budget or track.budget_s:g} s"
    )
    for header in headers:
        table.add_column(header)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    markdown = [
        f"# Side-by-side: {args.track}, seeds {', '.join(map(str, args.seeds))}, "
        f"budget {args.budget or track.budget_s:g} s",
        "",
        f"float32 matmul peak on {track.device.threads} thread(s): {peak / 1e9:.1f} GFLOP/s. "
        f"Command: `{' '.join(sys.argv)}`",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text("\n".join(markdown))
    console.print(f"written: {out / 'compare.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded("compare.py", main))

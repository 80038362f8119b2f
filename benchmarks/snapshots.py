"""What a snapshot costs on the clock: the reference on cpu-1min, in the real sandbox.

    .venv/bin/python benchmarks/snapshots.py [--repeats 2] [--steps 70]

Runs the reference for a fixed number of steps (`--set max_steps=N`: the same work in every run)
through the real `evaluate()`, alternating the track as it is (a snapshot every 20 s) with the same
track without snapshots, and prints:
- per snapshot: the harness's time to save it (its own account) and the evaluator's time to take
  its copy and answer; their sum is what one snapshot adds to the submission's clock;
- train seconds of the same work with and without snapshots (medians), and their difference per
  snapshot: the same cost seen side by side, within the run-to-run noise of a shared machine;
- scoring seconds with and without snapshots: the evaluator's cost of the curve (off the clock).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from unittest import mock

from rich.console import Console
from rich.table import Table

from evaluator.cli import run_guarded
from evaluator.paths import HOME, TRACKS_DIR
from evaluator.runner import evaluate

REFERENCE = HOME / "reference"


def _without_snapshots(into: Path) -> Path:
    """The track folder with cpu-1min's snapshot_every_s removed, everything else unchanged."""
    for path in TRACKS_DIR.glob("*.toml"):
        text = path.read_text()
        if path.stem == "cpu-1min":
            text = "\n".join(line for line in text.splitlines() if not line.startswith("snapshot_every_s")) + "\n"
        (into / path.name).write_text(text)
    return into


def _run(steps: int, runs_dir: Path, console: Console) -> dict:
    record, run_dir = evaluate(
        REFERENCE,
        track_id="cpu-1min",
        overrides={"max_steps": steps},
        sandbox_choice="nsjail",
        runs_dir=runs_dir,
        console=console,
    )
    if record["status"] != "ok":
        raise SystemExit(f"the reference's run ended {record['status']}: {record['message']}")
    timings = json.loads((run_dir / "timings.json").read_text())
    return {
        "train_s": record["train"]["train_seconds"],
        "scoring_s": record["scoring_seconds"],
        "snapshots": sum(point["model"] == "snapshot" for point in record["val_curve"]),
        "save_s": timings.get("snapshot_save_s", []),
        "take_s": timings.get("snapshot_take_s", []),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each kind, alternated")
    parser.add_argument("--steps", type=int, default=70, help="training steps of every run (the reference's max_steps)")
    args = parser.parse_args()
    console = Console(stderr=True)
    with_snapshots, without = [], []
    with tempfile.TemporaryDirectory(prefix="speedrun-bench-") as scratch:
        runs_dir, tracks = Path(scratch) / "runs", Path(scratch) / "tracks"
        tracks.mkdir()
        _without_snapshots(tracks)
        for repeat in range(args.repeats):
            console.print(f"[bold]repeat {repeat + 1}/{args.repeats}[/]: with snapshots, then without")
            with_snapshots.append(_run(args.steps, runs_dir, console))
            with mock.patch("evaluator.tracks.TRACKS_DIR", tracks):
                without.append(_run(args.steps, runs_dir, console))

    saves = [s for run in with_snapshots for s in run["save_s"]]
    takes = [s for run in with_snapshots for s in run["take_s"]]
    table = Table(title=f"one snapshot of the reference on cpu-1min ({len(takes)} snapshots)")
    for column in ("seconds", "median", "max"):
        table.add_column(column, justify="right")
    for label, values in (
        ("harness: save (its own account)", saves),
        ("evaluator: copy and answer", takes),
        ("on the clock: save + copy", [a + b for a, b in zip(saves, takes, strict=True)]),
    ):
        table.add_row(label, f"{statistics.median(values):.4f}", f"{max(values):.4f}")
    Console().print(table)

    train_with = statistics.median(run["train_s"] for run in with_snapshots)
    train_without = statistics.median(run["train_s"] for run in without)
    per_run = statistics.median(run["snapshots"] for run in with_snapshots)
    print(
        f"train seconds of {args.steps} steps, medians of {args.repeats}: {train_with:.2f} with "
        f"{per_run:g} snapshots per run, {train_without:.2f} without; difference "
        f"{train_with - train_without:+.2f} s = {(train_with - train_without) / max(per_run, 1):+.3f} s per snapshot "
        f"(spread of the runs: {min(r['train_s'] for r in with_snapshots + without):.2f}-"
        f"{max(r['train_s'] for r in with_snapshots + without):.2f} s)"
    )
    scoring_with = statistics.median(run["scoring_s"] for run in with_snapshots)
    scoring_without = statistics.median(run["scoring_s"] for run in without)
    print(
        f"scoring seconds (off the clock), medians: {scoring_with:g} with the snapshots, "
        f"{scoring_without:g} for the final model alone"
    )


if __name__ == "__main__":
    sys.exit(run_guarded("snapshots.py", main))

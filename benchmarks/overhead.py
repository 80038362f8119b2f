"""The evaluator's overhead and the sandbox tax, measured side by side in one invocation.

    .venv/bin/python benchmarks/overhead.py [--repeats 2]

Runs `benchmarks/fixed-work` (a fixed number of training steps) through the real `evaluate()` on
the CPU track, alternating `--sandbox nsjail` and `--sandbox none`, and prints:
- overhead: wall time of the run minus train and scoring time, split into preparation (check,
  hashing), sandbox + interpreter start, `import torch`, data load, and teardown;
- the sandbox tax: train seconds of the same fixed work inside nsjail vs unsandboxed.
Targets (issue 4): training-side overhead <= 6 s (2 % of the 300 s budget); tax <= 1 %.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from evaluator.cli import run_guarded
from evaluator.paths import REPO_ROOT
from evaluator.runner import evaluate

FIXED_WORK = REPO_ROOT / "benchmarks" / "fixed-work"


def measure(sandbox: str, runs_dir: Path, console: Console) -> dict[str, float]:
    began = time.monotonic()
    record, run_dir = evaluate(FIXED_WORK, track_id="cpu-1min", budget_s=60, sandbox_choice=sandbox, runs_dir=runs_dir, console=console)
    wall = time.monotonic() - began
    if record["status"] != "ok":
        sys.exit(f"{sandbox}: run ended {record['status']}: {record['message']}")
    timings = json.loads((run_dir / "timings.json").read_text())
    harness = timings.get("harness_import_s", 0) + timings.get("harness_device_init_s", 0) + timings.get("harness_data_load_s", 0)
    train = record["train"]["train_seconds"]
    scoring = timings.get("scoring_s", 0.0)
    return {
        "wall_s": wall,
        "train_s": train,
        "scoring_s": scoring,
        "overhead_s": wall - train - scoring,
        "prepare_s": timings["prepare_s"],
        "sandbox_start_s": timings["launch_to_start_s"] - harness,
        "import_torch_s": timings.get("harness_import_s", float("nan")),
        "data_load_s": timings.get("harness_data_load_s", float("nan")),
        "teardown_s": timings["teardown_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="runs per sandbox kind, alternated")
    args = parser.parse_args()
    console = Console(stderr=True)
    results: dict[str, list[dict[str, float]]] = {"nsjail": [], "none": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for sandbox in results:
                results[sandbox].append(measure(sandbox, Path(tmp), console))

    table = Table(title=f"evaluator overhead, fixed work, median of {args.repeats}")
    table.add_column("seconds")
    for sandbox in results:
        table.add_column(sandbox, justify="right")
    for key in results["nsjail"][0]:
        table.add_row(key, *(f"{statistics.median(r[key] for r in results[s]):.3f}" for s in results))
    Console().print(table)
    jailed = statistics.median(r["train_s"] for r in results["nsjail"])
    bare = statistics.median(r["train_s"] for r in results["none"])
    overhead = statistics.median(r["overhead_s"] for r in results["nsjail"])
    print(f"training-side overhead (nsjail): {overhead:.2f} s = {overhead / 300 * 100:.2f} % of the 300 s budget (target <= 2 %)")
    print(f"sandbox tax on the same training work: {jailed:.2f} s vs {bare:.2f} s = {(jailed / bare - 1) * 100:+.2f} % (target <= 1 %)")


if __name__ == "__main__":
    sys.exit(run_guarded("overhead.py", main))

"""The evaluator's overhead, the sandbox tax and the cost of scoring, measured in one invocation.

    .venv/bin/python benchmarks/overhead.py [--repeats 2] [--scoring-only]

Runs `benchmarks/fixed-work` (a fixed number of training steps) through the real `evaluate()` on
the CPU track, alternating `--sandbox nsjail` and `--sandbox none`, and prints:
- overhead: wall time of the run minus train and scoring time, split into preparation (check,
  hashing), sandbox + interpreter start, `import torch`, data load, and teardown;
- the sandbox tax: train seconds of the same fixed work inside nsjail vs unsandboxed.
Targets (issue 4): training-side overhead <= 6 s (2 % of the 300 s budget); tax <= 1 %.

Then it scores the cpu-1min models of the reference, the template and seed-moe (their classes and
cpu-1min configs, untrained: scoring's cost does not depend on the weights), and the reference's
model without its incremental decoder (the recompute fallback), on the track's validation split
with the real sealed nsjail servers, each alone: wall seconds of all of scoring (image, servers'
start, both passes side by side). Targets (issues 16, 17): the reference within 15 s, on 2 CPU
threads; a whole run's scoring is benchmarks/scoring_cost.py's.
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
from evaluator.dataset.loader import read_documents
from evaluator.dataset.store import resolve_data_file, tokenizer_info
from evaluator.manifest import parse_manifest
from evaluator.paths import HOME, SUBMISSIONS_DIR
from evaluator.runner import evaluate
from evaluator.sandbox import open_sandbox
from evaluator.tracks import Track, load_track

FIXED_WORK = HOME / "benchmarks" / "fixed-work"
SCORED = {
    "reference": HOME / "reference",
    "template": SUBMISSIONS_DIR / "template",
    "seed-moe": SUBMISSIONS_DIR / "seed-moe",
}
# Long enough for the recompute fallback to finish, so that its cost can be reported.
BENCHMARK_SCORING_S = 900


def measure(sandbox: str, runs_dir: Path, console: Console) -> dict[str, float]:
    began = time.monotonic()
    record, run_dir = evaluate(
        FIXED_WORK, track_id="cpu-1min", budget_s=60, sandbox_choice=sandbox, runs_dir=runs_dir, console=console
    )
    wall = time.monotonic() - began
    if record["status"] != "ok":
        sys.exit(f"{sandbox}: run ended {record['status']}: {record['message']}")
    timings = json.loads((run_dir / "timings.json").read_text())
    harness = (
        timings.get("harness_import_s", 0)
        + timings.get("harness_device_init_s", 0)
        + timings.get("harness_data_load_s", 0)
    )
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


def untrained_model(folder: Path, vocab_size: int, eos_id: int):
    """The submission's cpu-1min model class with its cpu-1min config, pickled as `train.<Class>`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train", folder / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train"] = module  # torch.save records the class as train.<Class>, as in a run
    spec.loader.exec_module(module)
    manifest, _ = parse_manifest(folder)
    config = manifest.config_for("cpu-1min")
    if folder.name == "reference":
        return module.GPT({**module.DEFAULTS, **config}, vocab_size, eos_id)
    if folder.name == "template":
        return module.TinyGPT(vocab_size, config["d_model"], config["n_layers"], config["n_heads"], 512)
    return module.MoEMinimalLLM(config, vocab_size)


def scoring_setup(track: Track, name: str, folder: Path, vocab_size: int, eos_id: int, limits, model_cap_bytes: int):
    """The ScoringSetup a run of `track` scores with (curve._setup), for a benchmark's own model and limits."""
    from evaluator.scoring import ScoringSetup

    return ScoringSetup(
        name=name,
        submission_dir=folder,
        vocab_size=vocab_size,
        eos_id=eos_id,
        seq_len=track.eval.seq_len,
        batch_size=track.eval.batch_size,
        device="cpu",
        gpu=None,
        threads=track.device.threads,
        limits=limits,
        memory_bytes=track.sandbox.memory_mib * 2**20,
        pids=track.sandbox.pids,
        model_cap_bytes=model_cap_bytes,
    )


def measure_scoring(console: Console) -> list[tuple[str, float]]:
    """(model, wall s of all of scoring) for each model scored alone, on cpu-1min."""
    import torch

    from evaluator.scoring import ScoringLimits, ScoringSession

    track = load_track("cpu-1min")
    vocab_size, eos_id = tokenizer_info(resolve_data_file(track, "tokenizer"))
    documents = read_documents(resolve_data_file(track, "val"))
    sandbox = open_sandbox("nsjail")
    cases = [(name, folder, True) for name, folder in SCORED.items()] + [
        ("reference, no decoder", SCORED["reference"], False)
    ]
    figures = []
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        for name, folder, incremental in cases:
            torch.manual_seed(0)
            model = untrained_model(folder, vocab_size, eos_id)
            if not incremental:
                model.decoder = None  # an instance attribute hides the method: the server recomputes
            model_path = Path(tmp) / f"{len(figures)}.pt"
            torch.save(model, model_path)
            console.print(f"scoring {name} ...")
            began = time.monotonic()
            limits = ScoringLimits(
                load_s=track.eval.load_s,
                step_s=track.eval.step_s,
                total_s=BENCHMARK_SCORING_S,
                consistency_nats=track.eval.consistency_nats,
            )
            name = f"bench-scoring-{len(figures)}"
            setup = scoring_setup(track, name, folder, vocab_size, eos_id, limits, model_path.stat().st_size)
            with ScoringSession(sandbox, setup) as session:
                session.score(model_path, documents)
            figures.append((name, time.monotonic() - began))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="runs per sandbox kind, alternated")
    parser.add_argument("--scoring-only", action="store_true", help="only the scoring figures")
    args = parser.parse_args()
    console = Console(stderr=True)
    if not args.scoring_only:
        training_overhead(args.repeats, console)
    limit = load_track("cpu-1min").eval.time_limit_s
    table = Table(title="scoring on cpu-1min: 100 validation documents, 2 passes, sealed nsjail, 2 threads")
    for column in ("model", "all of scoring, s", f"within the track's {limit:g} s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, wall in measure_scoring(console):
        table.add_row(name, f"{wall:.1f}", "yes" if wall <= limit else "NO")
    Console().print(table)


def training_overhead(repeats: int, console: Console) -> None:
    results: dict[str, list[dict[str, float]]] = {"nsjail": [], "none": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for sandbox in results:
                results[sandbox].append(measure(sandbox, Path(tmp), console))

    table = Table(title=f"evaluator overhead, fixed work, median of {repeats}")
    table.add_column("seconds")
    for sandbox in results:
        table.add_column(sandbox, justify="right")
    for key in results["nsjail"][0]:
        table.add_row(key, *(f"{statistics.median(r[key] for r in results[s]):.3f}" for s in results))
    Console().print(table)
    jailed = statistics.median(r["train_s"] for r in results["nsjail"])
    bare = statistics.median(r["train_s"] for r in results["none"])
    overhead = statistics.median(r["overhead_s"] for r in results["nsjail"])
    print(
        f"training-side overhead (nsjail): {overhead:.2f} s = {overhead / 300 * 100:.2f} % of the 300 s budget "
        "(target <= 2 %)"
    )
    print(
        f"sandbox tax on the same training work: {jailed:.2f} s vs {bare:.2f} s = "
        f"{(jailed / bare - 1) * 100:+.2f} % (target <= 1 %)"
    )


if __name__ == "__main__":
    sys.exit(run_guarded("overhead.py", main))

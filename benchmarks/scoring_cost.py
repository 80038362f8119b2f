"""What scoring a whole run costs: the old code (a memory image and two servers per model) beside
this checkout's (one image and two servers for every model of the run), in one invocation.

    .venv/bin/python benchmarks/scoring_cost.py --old COMMIT [--run-dirs DIR ...] [--repeats 2]

The models are those of a full cpu-1min run of the reference: its final model and two snapshots.
Scoring's cost does not depend on the weights, so three trained reference models stand in for one
run's three (default: the reference runs of the newest `results/runs/examples-*`, which `make
results` keeps). Each side scores all three on the public split with the real sealed nsjail
servers, the same secret seed, the track's limits; the old side runs in a `git worktree` of
COMMIT, in a child process, exactly as its curve.py called it (one `score_model` per model). The
sides alternate `--repeats` times, so that a drift of the host falls on both.

Prints each side's wall seconds and scores (which must be equal), then where the new side's time
goes: the image, the servers' start, the batch processes' start and load (OPEN to READY), waiting
for logits (the batch process's compute, the pipe and the wake-ups), the host's share of each step,
and the models' own compute, timed here without a jail, step by step as the servers run them.
Prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from evaluator.dataset.loader import read_documents
from evaluator.dataset.store import resolve_data_file, tokenizer_info
from evaluator.paths import HOME
from evaluator.sandbox import open_sandbox
from evaluator.scoring import (
    PASSES,
    ScoringLimits,
    ScoringSession,
    ScoringSetup,
    compose,
    compose_side_by_side,
    document_windows,
)
from evaluator.tracks import load_track

SECRET_SEED = 20261206
# The old side: its curve.py scored each model with its own score_model call.
OLD_SIDE = """
import json, sys, time
from pathlib import Path
from evaluator.dataset.loader import read_documents
from evaluator.sandbox import open_sandbox
from evaluator.scoring import ScoringLimits, score_model
options = json.loads(sys.argv[1])
documents = read_documents(Path(options["val"]))
sandbox = open_sandbox("nsjail")
began, losses = time.monotonic(), []
for number, (model, submission) in enumerate(options["models"]):
    report = score_model(sandbox=sandbox, name=f"bench-old-{number}", model_path=Path(model),
                         submission_dir=Path(submission), documents=documents, vocab_size=options["vocab"],
                         eos_id=options["eos"], seq_len=options["seq_len"], batch_size=options["batch_size"],
                         device="cpu", gpu=None, threads=options["threads"], limits=ScoringLimits(**options["limits"]),
                         memory_bytes=options["memory"], pids=options["pids"], secret_seed=options["seed"])
    losses.append(report.val_loss)
print(json.dumps({"wall_s": time.monotonic() - began, "val_loss": losses}))
"""


def _default_run_dirs() -> list[Path]:
    batches = sorted((HOME / "results" / "runs").glob("examples-*"))
    for batch in reversed(batches):
        runs = sorted(batch.glob("*-reference-*"))
        if len(runs) >= 3 and all((run / "model.pt").is_file() for run in runs[:3]):
            return runs[:3]
    sys.exit(
        "no three reference runs with a model.pt under results/runs/examples-*: run `make results`, or give --run-dirs"
    )


def _old_side(worktree: Path, options: dict) -> dict:
    child = subprocess.run(
        [sys.executable, "-c", OLD_SIDE, json.dumps(options)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(worktree), "PATH": "/usr/bin:/bin"},
        cwd=worktree,
    )
    if child.returncode != 0:
        sys.exit(f"the old side failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def _new_side(sandbox, setup: ScoringSetup, models: list[Path], documents) -> tuple[dict, dict[str, float]]:
    began = time.monotonic()
    with ScoringSession(sandbox, setup, models=len(models)) as session:
        losses = [session.score(model, documents, secret_seed=SECRET_SEED).val_loss for model in models]
    return {"wall_s": time.monotonic() - began, "val_loss": losses}, session.stages


def _own_compute_s(models: list[Path], submission: Path, documents, setup: ScoringSetup) -> float:
    """The models' forward work alone: each pass's batches through the decoder, in this process, one
    batch at a time on one pass's threads, as the batch processes run them (the host's work, the
    pipes and the other pass left out)."""
    from evaluator.api import decoder_for

    sys.path.insert(0, str(submission))
    torch.set_num_threads(setup.pass_threads)
    ordered = sorted(documents, key=lambda document: document.doc_id)
    windows = [window for document in ordered for window in document_windows(document, setup.eos_id, setup.seq_len)]
    import random

    rng = random.Random(SECRET_SEED)
    first = compose(windows, setup.batch_size, rng)
    compositions = [
        first,
        compose_side_by_side(first, setup.batch_size, rng) or compose(windows, setup.batch_size, rng),
    ]
    seconds = 0.0
    for path in models:
        model = torch.load(path, weights_only=False).eval()
        for composition in compositions:
            for batch in filter(None, composition):  # a side-by-side composition may leave a batch empty
                with torch.no_grad():
                    began = time.monotonic()
                    decoder = decoder_for(model, len(batch))
                    live = list(range(len(batch)))
                    position = 0
                    while live:
                        decoder.step(torch.tensor([batch[row].inputs[position] for row in live]))
                        position += 1
                        going_on = [index for index, row in enumerate(live) if position < len(batch[row].inputs)]
                        if len(going_on) < len(live):
                            live = [live[index] for index in going_on]
                            if live:
                                decoder.keep(torch.tensor(going_on))
                    seconds += time.monotonic() - began
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, metavar="COMMIT", help="the commit whose scoring is the old side")
    parser.add_argument(
        "--run-dirs", nargs="+", type=Path, help="three reference run directories (model.pt, submission/)"
    )
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    run_dirs = args.run_dirs or _default_run_dirs()
    models = [run / "model.pt" for run in run_dirs]
    submission = run_dirs[0] / "submission"
    track = load_track("cpu-1min")
    vocab_size, eos_id = tokenizer_info(resolve_data_file(track, "tokenizer"))
    val = resolve_data_file(track, "val")
    documents = read_documents(val)
    protocol, limits = track.eval, track.sandbox
    scoring_limits = ScoringLimits(
        load_s=protocol.load_s,
        step_s=protocol.step_s,
        total_s=protocol.time_limit_s,
        consistency_nats=protocol.consistency_nats,
    )
    setup = ScoringSetup(
        name="bench-new",
        submission_dir=submission,
        vocab_size=vocab_size,
        eos_id=eos_id,
        seq_len=protocol.seq_len,
        batch_size=protocol.batch_size,
        device="cpu",
        gpu=None,
        threads=track.device.threads,
        limits=scoring_limits,
        memory_bytes=limits.memory_mib * 2**20,
        pids=limits.pids,
        model_cap_bytes=limits.model_mib * 2**20,
    )
    old_options = {
        "val": str(val),
        "models": [[str(model), str(submission)] for model in models],
        "vocab": vocab_size,
        "eos": eos_id,
        "seq_len": protocol.seq_len,
        "batch_size": protocol.batch_size,
        "threads": track.device.threads,
        "limits": scoring_limits.__dict__,
        "memory": limits.memory_mib * 2**20,
        "pids": limits.pids,
        "seed": SECRET_SEED,
    }
    sandbox = open_sandbox("nsjail")
    old_walls, new_walls, stages_seen = [], [], []
    with tempfile.TemporaryDirectory(prefix="scoring-cost-") as scratch:
        worktree = Path(scratch) / "old"
        subprocess.run(
            ["git", "-C", str(HOME), "worktree", "add", "--detach", str(worktree), args.old],
            check=True,
            capture_output=True,
        )
        try:
            for repeat in range(1, args.repeats + 1):
                old = _old_side(worktree, old_options)
                new, stages = _new_side(sandbox, setup, models, documents)
                old_walls.append(old["wall_s"])
                new_walls.append(new["wall_s"])
                stages_seen.append(stages)
                print(
                    f"repeat {repeat}: old {old['wall_s']:.1f} s {old['val_loss']}, new {new['wall_s']:.1f} s "
                    f"{new['val_loss']}; equal scores: {old['val_loss'] == new['val_loss']}",
                    flush=True,
                )
        finally:
            subprocess.run(
                ["git", "-C", str(HOME), "worktree", "remove", "--force", str(worktree)], capture_output=True
            )
    old_s, new_s = statistics.median(old_walls), statistics.median(new_walls)
    print(
        f"\nthree models of a cpu-1min reference run, both passes, public split ({len(documents)} documents), "
        f"median of {args.repeats}: old {old_s:.1f} s, new {new_s:.1f} s ({old_s / new_s:.2f}x)"
    )
    stages = {key: statistics.median(seen.get(key, 0.0) for seen in stages_seen) for key in stages_seen[0]}
    own = _own_compute_s(models, submission, documents, setup)
    host = stages["pass_s"] - stages["batch_load_s"] - stages["step_wait_s"]
    print(
        "where the new side's time goes (median; the two passes run side by side, so their threads' times add up "
        "to more than the wall time):"
    )
    rows = [
        ("memory image (once a run)", stages["image_s"]),
        ("both servers' start (once a run, side by side)", stages["server_start_s"]),
        ("the three models' scoring, wall", stages["models_s"]),
        ("  the passes' threads in all", stages["pass_s"]),
        (f"    batch processes' start and load ({len(models) * PASSES} passes)", stages["batch_load_s"]),
        (f"    waiting for logits ({stages['steps']:.0f} steps)", stages["step_wait_s"]),
        ("      of which the models' own compute (no jail, one batch at a time)", own),
        ("    the host's share of the steps, and waiting for the other pass", host),
    ]
    for label, seconds in rows:
        print(f"  {label:<66} {seconds:6.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

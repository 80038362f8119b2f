"""How far an honest model's per-document log-likelihoods move between two scoring compositions.

    .venv/bin/python benchmarks/consistency.py [--train-s 20] [--seeds 3]

The track's `consistency_nats` must sit far above what honest models show (float rounding that
depends on which rows share a batch, and top-k routing that a rounding difference can flip) and far
below what a record is worth. This scores, with the real sealed servers of cpu-1min and several
secret seeds, the reference and the template after `--train-s` seconds of their own training (in
this process, on the training split) and seed-moe with its zero-initialised expert and attention
outputs replaced by small random weights (at its cpu-1min budget it never leaves its
initialisation, where routing cannot matter), and prints per model the largest per-document
difference and the mean difference per token over all seeds, beside the track's tolerance.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch
from overhead import SCORED, scoring_setup, untrained_model
from rich.console import Console
from rich.table import Table

from evaluator.api import Context
from evaluator.cli import run_guarded
from evaluator.dataset.loader import read_documents, read_train_tokens
from evaluator.dataset.store import resolve_data_file, tokenizer_info
from evaluator.manifest import parse_manifest
from evaluator.sandbox import open_sandbox
from evaluator.scoring import ScoringLimits, ScoringSession
from evaluator.tracks import load_track


def _trained(name: str, folder: Path, seconds: float, vocab_size: int, eos_id: int, track) -> torch.nn.Module:
    model = untrained_model(folder, vocab_size, eos_id)  # also imports the folder as `train`
    if name == "seed-moe":
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.ndim == 2 and not parameter.any():
                    parameter.normal_(0.0, 0.02, generator=generator)
        return model.eval()
    manifest, _ = parse_manifest(folder)
    torch.set_num_threads(track.device.threads)
    ctx = Context(
        train_tokens=read_train_tokens(resolve_data_file(track, "train"), eos_id),
        vocab_size=vocab_size,
        eos_id=eos_id,
        device="cpu",
        config=manifest.config_for(track.id),
        seed=0,
        budget_s=seconds,
        scratch=Path(tempfile.gettempdir()),
        eval_seq_len=track.eval.seq_len,
    )
    return sys.modules["train"].train(ctx).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--train-s", type=float, default=20.0, help="training seconds for the reference and the template"
    )
    parser.add_argument("--seeds", type=int, default=3, help="secret seeds (pairs of compositions) per model")
    args = parser.parse_args()
    console = Console(stderr=True)
    track = load_track("cpu-1min")
    vocab_size, eos_id = tokenizer_info(resolve_data_file(track, "tokenizer"))
    documents = read_documents(resolve_data_file(track, "val"))
    val_tokens = sum(len(d.tokens) for d in documents)
    sandbox = open_sandbox("nsjail")
    limits = ScoringLimits(
        load_s=track.eval.load_s, step_s=track.eval.step_s, total_s=900, consistency_nats=track.eval.consistency_nats
    )
    table = Table(title=f"per-document log-likelihood, pass A - pass B, cpu-1min, {args.seeds} secret seeds")
    for column in (
        "model",
        "val_loss",
        "max |diff| per document, nats",
        "mean diff per token, nats",
        "track tolerance",
    ):
        table.add_column(column, justify="left" if column == "model" else "right")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        for name, folder in SCORED.items():
            console.print(f"{name}: preparing the model ...")
            model = _trained(name, folder, args.train_s, vocab_size, eos_id, track)
            model_path = Path(tmp) / f"{name}.pt"
            torch.save(model, model_path)
            worst, means, losses = 0.0, [], []
            model_cap = track.sandbox.model_mib * 2**20
            setup = scoring_setup(track, f"bench-consistency-{name}", folder, vocab_size, eos_id, limits, model_cap)
            with ScoringSession(sandbox, setup, models=args.seeds) as session:
                for seed in range(args.seeds):
                    console.print(f"{name}: scoring, seed {seed} ...")
                    first, second = session.document_nats(model_path, documents, secret_seed=seed)
                    differences = [first[doc] - second[doc] for doc in first]
                    worst = max(worst, max(abs(d) for d in differences))
                    means.append(math.fsum(differences) / val_tokens)
                    losses.append(math.fsum(first.values()) / val_tokens)
            table.add_row(
                name,
                f"{sum(losses) / len(losses):.4f}",
                f"{worst:.2e}",
                f"{max(means, key=abs):+.2e}",
                f"{track.eval.consistency_nats:g}",
            )
    Console().print(table)


if __name__ == "__main__":
    sys.exit(run_guarded("consistency.py", main))

"""Ablation driver for the reference submission (and seed-moe): train in-process, score like the evaluator.

No sandbox, no harness: it builds an `evaluator.api.Context` itself, calls the submission's
`train(ctx)`, then computes val_loss the way the evaluator does: each validation document alone,
input [eos] + doc[:-1], targets doc, in windows of eval_seq_len, mean nats/token from float32
log_softmax.

CPU tuning on a shared machine is noisy in wall-clock terms, so ablations run a FIXED NUMBER OF
STEPS (`--steps`, passed as config `max_steps`), which makes the loss independent of contention;
throughput is measured separately (`--time-steps N` times N steps after a warm-up). `--budget S`
instead runs on the clock, exactly as the evaluator would (config max_steps = 0).

Examples:
    python benchmarks/tune_reference.py --steps 300 --set d_model=192 --seeds 0 1
    python benchmarks/tune_reference.py --time-steps 20 --set d_model=192
    python benchmarks/tune_reference.py --budget 60 --seeds 0 1
    python benchmarks/tune_reference.py --submission submissions/seed-moe --budget 60
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import tomllib
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evaluator.api import Context

TRACK_EVAL_SEQ = {"cpu-1min": 512, "t4-5min": 1024}
TRACK_BUDGET = {"cpu-1min": 60.0, "t4-5min": 300.0}


def load_split(data_dir: Path, name: str) -> list[list[int]]:
    import pyarrow.parquet as pq

    return [
        list(x) for x in pq.read_table(data_dir / f"{name}.parquet", columns=["tokens"]).column("tokens").to_pylist()
    ]


def join_docs(docs: list[list[int]], eos: int) -> torch.Tensor:
    out: list[int] = []
    for d in docs:
        out.append(eos)
        out.extend(d)
    return torch.tensor(out, dtype=torch.long)


@torch.no_grad()
def val_loss(model, docs: list[list[int]], eos: int, seq_len: int, vocab: int, device: str, batch: int = 8) -> float:
    """Mean nats/token over all validation tokens; each document scored alone after the separator."""
    model.eval()
    pieces = []  # (input, target) windows
    for d in docs:
        seq = [eos] + d
        for s in range(0, len(d), seq_len):
            pieces.append((seq[s : s + seq_len], d[s : s + seq_len]))
    pieces.sort(key=lambda p: len(p[0]))
    total, count = 0.0, 0
    for i in range(0, len(pieces), batch):
        group = pieces[i : i + batch]
        T = max(len(p[0]) for p in group)
        x = torch.full((len(group), T), eos, dtype=torch.long)  # right padding: causal, ignored
        y = torch.full((len(group), T), -100, dtype=torch.long)
        for j, (inp, tgt) in enumerate(group):
            x[j, : len(inp)] = torch.tensor(inp)
            y[j, : len(tgt)] = torch.tensor(tgt)
        logits = model(x.to(device)).float()
        assert logits.shape == (len(group), T, vocab), logits.shape
        lp = F.log_softmax(logits, dim=-1)
        total += F.nll_loss(lp.reshape(-1, vocab), y.to(device).reshape(-1), ignore_index=-100, reduction="sum").item()
        count += int((y != -100).sum())
    return total / count


def load_submission(folder: Path, track: str):
    manifest = tomllib.loads((folder / "manifest.toml").read_text())
    cfg = dict(manifest.get("config", {}))
    cfg.update(manifest.get("tracks", {}).get(track, {}).get("config", {}))
    entry = manifest.get("entry", {})
    name = f"sub_{folder.name.replace('-', '_')}"
    spec = importlib.util.spec_from_file_location(name, folder / entry.get("module", "train.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return getattr(mod, entry.get("function", "train")), cfg


def parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--submission", default=str(ROOT / "reference"))
    ap.add_argument("--track", default="cpu-1min")
    ap.add_argument("--data", default=str(ROOT / "spec/datasets/pydoc-100k"))
    ap.add_argument("--steps", type=int, default=0, help="fixed number of training steps (config max_steps)")
    ap.add_argument("--budget", type=float, default=0.0, help="run on the clock for this many seconds")
    ap.add_argument("--time-steps", type=int, default=0, help="only time this many steps (after 3 warm-up steps)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value (JSON values)")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default="", help="append JSON lines here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    if not (data / "train.parquet").exists():
        sys.exit(f"no dataset at {data}")
    train_docs, val_docs = load_split(data, "train"), load_split(data, "val")
    eos, vocab = 0, 8192
    train_tokens = join_docs(train_docs, eos)
    overrides = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}

    for seed in args.seeds:
        train_fn, cfg = load_submission(Path(args.submission), args.track)
        cfg.update(overrides)
        steps_logged = []
        if args.time_steps:
            cfg["max_steps"] = args.time_steps + 3
        elif args.steps:
            cfg["max_steps"] = args.steps  # (seed-moe: its own max_steps, counted in micro-batches)
        fixed = bool(args.time_steps or args.steps)
        budget = args.budget or (1e9 if fixed else TRACK_BUDGET[args.track])
        stamps: list[float] = []
        cpu_stamps: list[float] = []

        def emit(step, metrics, stamps=stamps, cpu_stamps=cpu_stamps, steps_logged=steps_logged):
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())
            steps_logged.append((step, metrics))

        with tempfile.TemporaryDirectory() as scratch:
            ctx = Context(
                train_tokens=train_tokens,
                vocab_size=vocab,
                eos_id=eos,
                device="cpu",
                config=cfg,
                seed=seed,
                budget_s=budget,
                scratch=Path(scratch),
                eval_seq_len=TRACK_EVAL_SEQ[args.track],
                _emit=emit,
            )
            if args.time_steps:
                cfg["log_every"] = 1
            t = time.perf_counter()
            model = train_fn(ctx)
            train_s = time.perf_counter() - t
            if args.time_steps:
                # steps/s over the timed steps only (log stamps at step 3 and at the last step)
                i3 = [i for i, (st, _) in enumerate(steps_logged) if st == 3][0]
                rate = args.time_steps / (stamps[-1] - stamps[i3])
                cpu_per_step = (cpu_stamps[-1] - cpu_stamps[i3]) / args.time_steps
                # cpu_s_per_step: process CPU seconds per step, robust to other load on the machine;
                # with --threads 1 it is the single-core cost of a step
                rec = dict(
                    label=args.label,
                    seed=seed,
                    steps_per_s=round(rate, 3),
                    cpu_s_per_step=round(cpu_per_step, 3),
                    threads=args.threads,
                    set=overrides,
                )
                print(json.dumps(rec), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                continue
            # save + load round trip, like the evaluator
            with tempfile.TemporaryDirectory() as d:
                torch.save(model, Path(d) / "m.pt")
                model = torch.load(Path(d) / "m.pt", weights_only=False)
        vl = val_loss(model, val_docs, eos, TRACK_EVAL_SEQ[args.track], vocab, "cpu")
        last_step = steps_logged[-1][0] if steps_logged else 0
        last_loss = steps_logged[-1][1].get("loss", float("nan")) if steps_logged else float("nan")
        rec = dict(
            label=args.label,
            seed=seed,
            val_loss=round(vl, 4),
            train_loss=round(last_loss, 4),
            steps=last_step,
            train_s=round(train_s, 1),
            set=overrides,
            budget=args.budget or None,
            fixed_steps=args.steps or None,
        )
        print(json.dumps(rec), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()

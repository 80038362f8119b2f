"""Shared helpers: tiny real submissions written into tmp folders and run through the real CLI."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from evaluator.cli import main

# A tiny causal model most test submissions return: cheap to train, save and score.
TINY_MODEL = '''
import torch
import torch.nn as nn


class TinyCausal(nn.Module):
    """Logits at t depend only on token t; a zero head gives uniform logits, so val_loss = ln(vocab)."""

    def __init__(self, vocab_size, width=8):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        nn.init.zeros_(self.head.weight)

    def forward(self, tokens):
        return self.head(self.embed(tokens))
'''


def write_submission(parent: Path, name: str, body: str, config: dict | None = None, track: str = "cpu-1min") -> Path:
    """A submission folder whose train.py is TINY_MODEL plus `body` (which defines train(ctx))."""
    folder = parent / name
    folder.mkdir(parents=True)
    config_lines = "\n".join(f"{key} = {json.dumps(value)}" for key, value in (config or {}).items())
    (folder / "manifest.toml").write_text(
        f'schema = 1\n[submission]\nname = "{name}"\ntrack = "{track}"\nauthors = ["Test <t@example.org>"]\n'
        f'description = "test submission"\n[config]\n{config_lines}\n'
    )
    (folder / "train.py").write_text(TINY_MODEL + "\n" + textwrap.dedent(body))
    return folder


def run_cli(folder: Path, out: Path, *extra: str, capsys) -> tuple[int, dict]:
    """`evaluator run DIR --out OUT --json ...`; returns the exit code and the printed record."""
    code = main(["run", str(folder), "--out", str(out), "--json", *extra])
    captured = capsys.readouterr()
    try:
        record = json.loads(captured.out)
    except ValueError:
        pytest.fail(f"--json printed no record (exit {code}):\nstdout: {captured.out}\nstderr: {captured.err}")
    return code, record


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs"

"""The submission API: the only evaluator module a submission imports.

A submission's entry function receives a `Context` and returns a trained `torch.nn.Module`:

    def train(ctx: Context) -> torch.nn.Module:
        ...

The returned model maps token ids `LongTensor[B, T]` (T <= ctx.eval_seq_len) to logits
`[B, T, ctx.vocab_size]` in any float dtype, and must be causal: position t may depend only on
tokens 0..t. The evaluator scores it itself, in a separate sandbox, on data the submission never
sees.

Timing: the evaluator's clock, outside the sandbox, runs from just before your module is imported
until the harness has saved the returned model. `elapsed()` and `time_left()` are this process's
advisory view of that clock; leave a margin for saving. Once `budget_s` is spent, `time_left()`
and `log()` raise `BudgetExceeded`, the harness also raises it inside `train()` wherever the code
is at that moment, and the evaluator ends the run as `over_budget`: no score.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class BudgetExceeded(RuntimeError):
    """Raised inside `train()` once the budget is spent: stop and return nothing more."""


@dataclass
class Context:
    """Everything a submission gets from the evaluator.

    Attributes:
        train_tokens: 1-D int64 tensor of the training split: each document preceded by `eos_id`.
        vocab_size: size of the tokenizer's vocabulary; logits must have this last dimension.
        eos_id: the document separator token id (0).
        device: "cpu" or "cuda:0"; the only device the sandbox exposes.
        config: the manifest's `[config]` merged with the track's overrides.
        seed: the run's seed; seed your RNGs with it for reproducible runs.
        budget_s: the training budget in seconds (the track's, or a `--budget` override).
        scratch: a writable, size-limited directory, empty at start, gone after the run.
        eval_seq_len: the longest context the model must accept when scored.
    """

    train_tokens: Any
    vocab_size: int
    eos_id: int
    device: str
    config: dict[str, Any]
    seed: int
    budget_s: float
    scratch: Path
    eval_seq_len: int
    _started_at: float = field(default_factory=time.monotonic, repr=False)
    _emit: Callable[[int, dict[str, float]], None] | None = field(default=None, repr=False)

    def elapsed(self) -> float:
        """Seconds since the clock started (advisory: the evaluator's own clock is authoritative)."""
        return time.monotonic() - self._started_at

    def time_left(self) -> float:
        """Seconds of budget left; raises BudgetExceeded once it is spent."""
        left = self.budget_s - self.elapsed()
        if left <= 0:
            raise BudgetExceeded(f"training budget of {self.budget_s:g} s is spent")
        return left

    def log(self, step: int, **metrics: float) -> None:
        """Report metrics (e.g. `loss=2.3, tokens=123456`) for the progress display and metrics.parquet.

        Values must be numbers. `loss` is shown live and plotted on the leaderboard; `tokens`
        (cumulative training tokens seen) gives tokens/s.
        """
        values = {}
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                value = float(value)  # accepts 0-d tensors and numpy scalars
            values[key] = float(value)
        if self._emit is not None:
            self._emit(int(step), values)
        self.time_left()

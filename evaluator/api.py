"""The submission API: the only evaluator module a submission imports.

A submission's entry function receives a `Context` and returns a trained `torch.nn.Module`:

    def train(ctx: Context) -> torch.nn.Module:
        ...

The returned model maps token ids `LongTensor[B, T]` (T <= ctx.eval_seq_len) to logits
`[B, T, ctx.vocab_size]` in any float dtype. The evaluator scores it itself, in a separate sandbox,
on data the submission never sees, and streams the tokens: a model receives the token at position
t+1 only after its prediction for it has been recorded, so it cannot look ahead.

Scoring calls the model once per position. Without more, each call recomputes the whole prefix
(`RecomputeDecoder` below), which costs tens of full passes. A model makes streaming as cheap as
one pass by offering incremental decoding: a method `decoder(rows)` that returns a `Decoder`, an
object with `step(tokens)` and `keep(rows)`, typically backed by a KV cache:

    class GPT(nn.Module):
        def decoder(self, rows: int) -> "MyKVCacheDecoder": ...

    class MyKVCacheDecoder:
        def step(self, tokens):   # LongTensor[R] (the next token of each live row) -> logits [R, vocab]
            ...                   # append to the cache, attend over it, return the newest position
        def keep(self, rows):     # LongTensor of indices into the current rows: only these go on
            ...                   # e.g. self.k = self.k[:, rows]

`stream_logits(model, tokens)` runs a model's decoder over whole sequences; compare it with
`model(tokens)` to test a decoder before submitting.

Timing: the evaluator's clock, outside the sandbox, runs from just before your module is imported
until the harness has saved the returned model. `elapsed()` and `time_left()` are this process's
advisory view of that clock; leave a margin for saving. Once `budget_s` is spent, `time_left()`
and `log()` raise `BudgetExceeded`, the harness also raises it inside `train()` wherever the code
is at that moment, and the evaluator ends the run as `over_budget`: no score.

Snapshots: on a track with `snapshot_every_s`, the evaluator wants the model at those times on its
clock, to score each one after training (the validation curve; on a time-to-target track, the time
the target was first reached). Offer them from the training loop:

    if ctx.snapshot_due():
        ctx.snapshot(model)

`snapshot(model)` saves the model as the final one is saved and returns once the evaluator has taken
its copy, out of the jail's reach; that time counts on the clock like any other work. A snapshot is
taken only within `snapshot_window_s` (a quarter of the interval) after it falls due: an interval
whose window passes without one has none. The evaluator stamps it with its own clock when the copy
is complete, and never earlier than the window's end, so its time is the same wherever in the window
it was offered; it refuses one that is not due. A submission that never offers snapshots still runs:
its curve is the final model alone. On a fixed-time track the final model alone is the score,
whatever the snapshots score.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class Decoder(Protocol):
    """Incremental decoding of `rows` sequences in lockstep, one position per `step`.

    The scoring server calls `model.decoder(rows)` once per batch, inside `torch.no_grad()` with the
    model in eval mode, then `step` once per position. Rows end at different positions: after a
    row's last prediction, `keep` is called with the indices (ascending, into the rows alive before
    the call) of the rows that go on, before the next `step`. Each step's logits must be those
    `model(prefix)[:, -1]` would give for the row's prefix so far, up to float rounding.
    """

    def step(self, tokens: Any) -> Any:
        """tokens: LongTensor[R] on the model's device -> logits [R, vocab_size], any float dtype."""

    def keep(self, rows: Any) -> None:
        """rows: LongTensor[R'] of indices into the current rows; drop every other row."""


class RecomputeDecoder:
    """The fallback for a model without `decoder()`: each step runs the model on the whole prefix
    and keeps the last position. Correct for any causal model, and quadratic in the length."""

    def __init__(self, model: Any, rows: int):
        self._model = model
        self._prefix: Any = None

    def step(self, tokens: Any) -> Any:
        import torch

        column = tokens.reshape(-1, 1)
        self._prefix = column if self._prefix is None else torch.cat([self._prefix, column], dim=1)
        return self._model(self._prefix)[:, -1]

    def keep(self, rows: Any) -> None:
        self._prefix = self._prefix[rows]


def decoder_for(model: Any, rows: int) -> Decoder:
    """`model.decoder(rows)` when the model offers one, else a RecomputeDecoder."""
    make = getattr(model, "decoder", None)
    return make(rows) if callable(make) else RecomputeDecoder(model, rows)


def stream_logits(model: Any, tokens: Any) -> Any:
    """Logits [B, T, V] of `tokens` [B, T] computed position by position through the model's
    decoder, as scoring does (all rows live to the end). Compare with `model(tokens)`."""
    import torch

    with torch.no_grad():
        decoder = decoder_for(model, tokens.shape[0])
        return torch.stack([decoder.step(tokens[:, t]) for t in range(tokens.shape[1])], dim=1)


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
        snapshot_every_s: how often the evaluator wants a snapshot; None when the track takes none.
        snapshot_window_s: how long after it falls due a snapshot is still taken.
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
    snapshot_every_s: float | None = None
    snapshot_window_s: float | None = None
    _started_at: float = field(default_factory=time.monotonic, repr=False)
    _emit: Callable[[int, dict[str, float]], None] | None = field(default=None, repr=False)
    # Saves the model and waits for the evaluator's answer: (taken, when the next one is due).
    _take_snapshot: Callable[[Any], tuple[bool, float | None]] | None = field(default=None, repr=False)
    _next_snapshot_s: float | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self._next_snapshot_s is None:
            self._next_snapshot_s = self.snapshot_every_s

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

        `step` must fit in int64 and values must be numbers a float64 holds. The evaluator keeps a
        line of at most 32 metrics whose names are short identifiers (letters, digits, `_` and `.`,
        up to 64 characters) and whose values are finite: it drops any other line whole, NaN and
        infinity included, and counts it (result.json's `train.refused_lines`). `loss` is shown
        live and plotted on the leaderboard; `tokens` (cumulative training tokens seen) gives tokens/s.
        """
        try:
            step = operator.index(step)  # numpy and 0-d tensor integers too
        except TypeError:
            raise ValueError(f"ctx.log: step must be an integer, not {type(step).__name__}") from None
        if not -(2**63) <= step < 2**63:
            raise ValueError(f"ctx.log: step {step} does not fit in int64")
        values = {}
        for key, value in metrics.items():
            try:
                values[key] = float(value)  # accepts 0-d tensors and numpy scalars
            except (TypeError, ValueError, OverflowError):
                raise ValueError(f"ctx.log: {key} must be a number that fits in float64") from None
        if self._emit is not None:
            self._emit(step, values)
        self.time_left()

    def snapshot_due(self) -> bool:
        """True when the evaluator wants a snapshot now (see the module docstring); cheap to call every step."""
        due_at = self._next_snapshot_s
        if due_at is None or self._take_snapshot is None:
            return False
        elapsed = self.elapsed()
        if self.snapshot_every_s and self.snapshot_window_s is not None:
            while elapsed > due_at + self.snapshot_window_s:  # that interval's window has passed: it has none
                due_at += self.snapshot_every_s
            self._next_snapshot_s = due_at
        return elapsed >= due_at

    def snapshot(self, model: Any) -> bool:
        """Hand the evaluator the model as it is now, if a snapshot is due; returns whether one was taken.

        Saving and the evaluator's copy count on the clock. Put the model in the state it should be
        scored in first (e.g. averaged weights): the evaluator calls `.eval()` on it when scoring.
        """
        if not self.snapshot_due():
            return False
        assert self._take_snapshot is not None  # snapshot_due is False without one
        taken, self._next_snapshot_s = self._take_snapshot(model)
        self.time_left()
        return taken

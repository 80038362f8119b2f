"""How long-running work shows its progress: a live bar on a terminal, plain lines everywhere else.
Every progress display of the evaluator is a `bar`, and says its progress in `PlainLines` where the
bar is off.

A notebook's `!evaluator run` runs in a pseudo-terminal whose output the notebook appends instead of
redrawing, so a live bar there becomes thousands of lines of escape sequences. Jupyter, Colab and
Kaggle mark their kernels' environment; a command started from one gets plain lines. Inside the
kernel itself (the Python API), rich draws its own notebook widget.
"""

from __future__ import annotations

import os
import time

from rich.console import Console
from rich.progress import Progress, ProgressColumn

# Set in the environment of a Jupyter kernel (and so of every `!command` it starts), Colab's, Kaggle's.
_NOTEBOOK_MARKERS = ("JPY_PARENT_PID", "COLAB_RELEASE_TAG", "KAGGLE_KERNEL_RUN_TYPE")


def live(console: Console) -> bool:
    """Whether `console` can redraw a bar in place."""
    if console.is_jupyter:
        return True
    return console.is_terminal and not any(marker in os.environ for marker in _NOTEBOOK_MARKERS)


def bar(console: Console, *columns: str | ProgressColumn, transient: bool = False) -> Progress:
    """A rich progress bar on `console`, off where the console cannot redraw it in place (live())."""
    return Progress(*columns, console=console, transient=transient, disable=not live(console))


class PlainLines:
    """Progress as a line now and then: at most one per `every_s`, and always the first and the last."""

    def __init__(self, console: Console, every_s: float):
        self.console = console
        self.every_s = every_s
        self._last: float | None = None

    def say(self, text: str, final: bool = False) -> None:
        now = time.monotonic()
        if final or self._last is None or now - self._last >= self.every_s:
            self._last = now
            self.console.print(text, markup=False, highlight=False)

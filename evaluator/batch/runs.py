"""What the driver knows of each run of a batch: its submission, where it stands (queued, running,
finished) and, once it has one, its result or why the evaluator could not produce one.

Apart because the scheduling, the node's reply and the console all read and write the same runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluator.results import EXIT_CODES
from evaluator.tracks import Track

# Statuses that say nothing about the submission: a run that ends in one is retried with its seed.
RETRIED_STATUSES = ("sandbox_error", "evaluator_error")


@dataclass
class Submission:
    folder: Path
    name: str
    track: Track
    tree_sha256: str
    archive_ref: Any = None  # the folder's tar in Ray's object store, shared by all its seeds


@dataclass
class Run:
    submission: Submission
    seed: int  # the track's public seed + offset, or one the driver drew (kept by every retry of the run)
    seed_drawn: bool
    budget_s: float
    state: str = "queued"  # queued | running | finished
    attempts: int = 0
    node: str | None = None
    seconds: float | None = None
    result: dict[str, Any] | None = None
    run_dir: Path | None = None
    failure: str = ""  # why the evaluator could not produce a verdict (its fault): a line, then any log tail
    reused: bool = False
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.submission.name} seed {self.seed}" + (" (drawn)" if self.seed_drawn else "")

    @property
    def needs_retry(self) -> bool:
        """No verdict on the submission: the node, the sandbox or the evaluator failed. The retry keeps
        the seed: a new draw would be a re-roll for a submission that can make the host fail."""
        return self.result is None or self.result["status"] in RETRIED_STATUSES

    @property
    def exit_code(self) -> int:
        return 3 if self.result is None else min(3, EXIT_CODES[self.result["status"]])

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
    seed: int | None  # None: the node's evaluator draws it (--secret-seeds); the result then says which
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
        if self.seed is not None:
            return f"{self.submission.name} seed {self.seed}"
        return f"{self.submission.name} seed {self.result['seed']} (drawn)" if self.result else f"{self.submission.name} drawn seed"

    @property
    def needs_retry(self) -> bool:
        return self.result is None or self.result["status"] == "sandbox_error"

    @property
    def exit_code(self) -> int:
        return 3 if self.result is None else EXIT_CODES[self.result["status"]]

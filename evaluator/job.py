"""The job file: what `evaluator run` tells the harness, written by the host, read in the jail.

One dataclass for both sides, so a field cannot be written under one name and read under another.
Runs inside the training jail: standard library only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

_PATH_FIELDS = ("submission_dir", "train_path", "out_dir", "scratch")


@dataclass(frozen=True)
class Job:
    submission_dir: Path  # the staged copy of the submission (read-only in the jail)
    module: str  # the entry module, imported from submission_dir
    function: str  # train(ctx) -> torch.nn.Module
    train_path: Path  # the run's copy of the training split
    out_dir: Path  # where model.pt and snapshot.pt are saved
    scratch: Path  # the submission's writable tmpfs, also $HOME
    device: str  # "cpu" or "cuda:0"
    threads: int
    seed: int
    budget_s: float
    vocab_size: int
    eos_id: int
    eval_seq_len: int
    snapshot_every_s: float | None  # None: the track takes no snapshots
    snapshot_window_s: float | None  # how long after each due time a snapshot is still taken
    config: dict[str, Any]  # the manifest's [config] for the track, with the run's --set overrides

    def to_json(self) -> str:
        data = asdict(self)
        for name in _PATH_FIELDS:
            data[name] = str(data[name])
        return json.dumps(data, indent=2)

    @classmethod
    def read(cls, path: Path) -> Job:
        data = json.loads(Path(path).read_text())
        expected = {f.name for f in fields(cls)}
        if set(data) != expected:
            raise ValueError(f"{path}: a job file has the fields {sorted(expected)}, not {sorted(data)}")
        values: dict[str, Any] = {name: Path(value) if name in _PATH_FIELDS else value for name, value in data.items()}
        return cls(**values)

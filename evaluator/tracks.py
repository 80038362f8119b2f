"""Track files (`spec/tracks/*.toml`): loaded, validated against `spec/track.schema.json`, typed.

Each table of a track file is one frozen dataclass, so a misspelt field fails where it is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jsonschema

from evaluator.errors import UserError
from evaluator.fsutil import sha256_file
from evaluator.paths import SPEC_DIR, TRACKS_DIR
from evaluator.tomlreader import tomllib


class TrackError(UserError):
    pass


@cache
def _track_schema() -> dict:
    return json.loads((SPEC_DIR / "track.schema.json").read_text())


@dataclass(frozen=True)
class Target:
    """A time-to-target track's goal: the first model at or below `val_loss` ends the race."""

    val_loss: float
    provisional: bool
    provenance: str


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" or "cuda"
    threads: int  # CPU threads, enforced as CPU time (a cgroup quota)
    gpu_name_contains: str | None = None  # a run on another GPU is unofficial
    gpu_memory_gib: float | None = None  # what the track's GPU reports
    min_cpu_share: float | None = None  # CPU tracks: an official run's jail received at least this share of its threads


@dataclass(frozen=True)
class SandboxLimits:
    """The training jail's limits (the scoring jails share memory and pids)."""

    memory_mib: int
    pids: int
    scratch_mib: int
    model_mib: int  # the cap on model.pt and on each snapshot
    log_mib: int
    grace_s: float  # the sandbox's hard limit, this long after startup allowance plus budget


@dataclass(frozen=True)
class DataFile:
    sha256: str
    path: str | None = None  # relative to the home, or absolute; None: the hidden split, found by its hash


@dataclass(frozen=True)
class Dataset:
    id: str
    train: DataFile
    val: DataFile  # the public development split
    tokenizer: DataFile
    hidden: DataFile | None = None  # the hidden test split, on the scoring host only (docs/DATASET.md)

    def file(self, which: str) -> DataFile:
        """`which` is "train", "val", "tokenizer" or "hidden" (KeyError where the track names none)."""
        entry = {"train": self.train, "val": self.val, "tokenizer": self.tokenizer, "hidden": self.hidden}[which]
        if entry is None:
            raise KeyError(which)
        return entry


@dataclass(frozen=True)
class Contamination:
    """When a model has memorised the public split: its hidden-split val_loss exceeds its public one by
    more than `max_gap_nats`, a figure measured on honest models (`provenance` says whose)."""

    max_gap_nats: float
    provenance: str


# How many times its deadline a stage of scoring may take on the wall clock where the deadline counts
# CPU time (a model that waits instead of computing uses none), not counting the time a busy host
# kept the jail's threads from a CPU they asked for; and the wall clock's cap however busy the host
# (past it the host, not the model, fails the run).
WALL_BACKSTOP_FACTOR = 4
BUSY_HOST_WALL_FACTOR = 16


@dataclass(frozen=True)
class EvalProtocol:
    """How a model is scored (evaluator/scoring.py). On a CPU track the deadlines count the scoring
    jails' CPU time over their threads, and the wall clock ends a stage at WALL_BACKSTOP_FACTOR times
    its deadline (time a busy host withheld not counted); on a GPU track they count wall time."""

    seq_len: int
    batch_size: int
    load_s: float
    step_s: float
    time_limit_s: float
    consistency_nats: float

    def wall_limit_s(self, device_kind: str) -> float:
        """The longest all of one model's scoring takes on the wall clock on a host that gives the
        scoring jails the CPU time they ask for."""
        return self.time_limit_s * (WALL_BACKSTOP_FACTOR if device_kind == "cpu" else 1)


@dataclass(frozen=True)
class CalibrationFigure:
    """The calibration workload's time on the track's hardware (docs/CALIBRATION.md)."""

    workload: str
    seconds: float
    basis: str  # "measured" on the track's hardware, or "estimated" from another source
    provenance: str  # how: the hardware and the method, or the source


@dataclass(frozen=True)
class Track:
    id: str
    path: Path
    sha256: str
    budget_s: float
    snapshot_every_s: float | None  # how often the evaluator asks for the model; None: the final model alone
    target: Target | None  # time-to-target tracks only
    device: Device
    sandbox: SandboxLimits
    dataset: Dataset
    eval: EvalProtocol
    calibration: CalibrationFigure
    contamination: Contamination
    default_seed: int  # the public seed of development runs


def available_tracks() -> list[str]:
    return sorted(p.stem for p in TRACKS_DIR.glob("*.toml"))


def track_path(track_id: str) -> Path:
    return TRACKS_DIR / f"{track_id}.toml"


def load_track(track_id: str) -> Track:
    """Load a track by id; every problem becomes a TrackError naming the file and the field."""
    path = track_path(track_id)
    if not path.is_file():
        raise TrackError(
            f"unknown track {track_id!r}: no {path.relative_to(SPEC_DIR.parent)}; "
            f"available tracks: {', '.join(available_tracks()) or 'none'}"
        )
    return load_track_file(path)


def load_track_file(path: Path) -> Track:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise TrackError(f"{path}: cannot read track file: {exc}") from None
    errors = sorted(
        jsonschema.Draft202012Validator(_track_schema()).iter_errors(raw),
        key=lambda e: list(map(str, e.absolute_path)),
    )
    if errors:
        details = "; ".join(f"{'.'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}" for e in errors)
        raise TrackError(f"{path}: invalid track file: {details}")
    if raw["id"] != path.stem:
        raise TrackError(f"{path}: id {raw['id']!r} must equal the file name {path.stem!r}")
    return Track(
        id=raw["id"],
        path=path,
        sha256=sha256_file(path),
        budget_s=float(raw["budget_s"]),
        snapshot_every_s=None if raw.get("snapshot_every_s") is None else float(raw["snapshot_every_s"]),
        target=None
        if "target" not in raw
        else Target(
            val_loss=float(raw["target"]["val_loss"]),
            provisional=raw["target"]["provisional"],
            provenance=raw["target"]["provenance"],
        ),
        device=Device(**raw["device"]),
        sandbox=SandboxLimits(**raw["sandbox"]),
        dataset=Dataset(
            id=raw["dataset"]["id"],
            **{
                which: DataFile(**raw["dataset"][which])
                for which in ("train", "val", "tokenizer", "hidden")
                if which in raw["dataset"]
            },
        ),
        eval=EvalProtocol(**raw["eval"]),
        calibration=CalibrationFigure(**raw["calibration"]),
        contamination=Contamination(
            max_gap_nats=float(raw["contamination"]["max_gap_nats"]), provenance=raw["contamination"]["provenance"]
        ),
        default_seed=raw["seeds"]["default"],
    )

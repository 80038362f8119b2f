"""Track files (`spec/tracks/*.toml`): loaded, validated against `spec/track.schema.json`, typed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

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
class Track:
    id: str
    path: Path
    sha256: str
    raw: dict[str, Any]

    @property
    def budget_s(self) -> float:
        return float(self.raw["budget_s"])

    @property
    def snapshot_every_s(self) -> float | None:
        """How often the evaluator asks for the model; None: the curve is the final model alone."""
        value = self.raw.get("snapshot_every_s")
        return None if value is None else float(value)

    @property
    def target(self) -> Target | None:
        """The target of a time-to-target track; None on a fixed-time track."""
        section = self.raw.get("target")
        if section is None:
            return None
        return Target(val_loss=float(section["val_loss"]), provisional=section["provisional"], provenance=section["provenance"])

    @property
    def device_kind(self) -> str:
        return self.raw["device"]["kind"]

    @property
    def threads(self) -> int:
        return self.raw["device"]["threads"]

    @property
    def sandbox(self) -> dict[str, Any]:
        return self.raw["sandbox"]

    @property
    def dataset(self) -> dict[str, Any]:
        return self.raw["dataset"]

    @property
    def eval(self) -> dict[str, Any]:
        return self.raw["eval"]

    @property
    def seeds(self) -> dict[str, Any]:
        return self.raw["seeds"]

    @property
    def calibration(self) -> dict[str, Any]:
        return self.raw["calibration"]


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
        details = "; ".join(
            f"{'.'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}" for e in errors
        )
        raise TrackError(f"{path}: invalid track file: {details}")
    if raw["id"] != path.stem:
        raise TrackError(f"{path}: id {raw['id']!r} must equal the file name {path.stem!r}")
    return Track(id=raw["id"], path=path, sha256=sha256_file(path), raw=raw)

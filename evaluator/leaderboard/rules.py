"""Record rules (`spec/record-rules.toml`): when an official leaderboard row is its track's record.

The rule for a track is [default] with the track's own section laid over it. A row is tested
against the record holder of its time on the runs the rule counts (with `drawn_seeds_only`, only
runs whose seed the evaluator drew): it needs `min_seeds` distinct seeds, a one-sided Welch p below
`p_below`, and a mean val_loss lower by at least `min_improvement_nats`. Two conditions, because
with a tight enough spread a p-value certifies differences too small to matter. On a time-to-target
track the test is on times to target instead, and the minimum is `min_improvement_s` seconds: one
rule file serves both kinds of track, and each kind reads the minimum in its own unit.

With `paired`, the test is not on the two rows' own runs but on an `evaluator compare` of the
holder (side a) against the challenger (side b): both run on the same host, interleaved, each pair
with one seed, so that the host's drift and the seed's luck cancel in each pair's difference. The
same three conditions hold for the pairs: `min_seeds` pairs, a one-sided paired t-test below
`p_below`, and a mean difference of at least the minimum improvement.

The rules are a file of their own, validated against `spec/record-rules.schema.json`: they re-rank
the board (evaluator.leaderboard.board applies them), they never make a result invalid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jsonschema

from evaluator.errors import UserError
from evaluator.paths import SPEC_DIR
from evaluator.tomlreader import tomllib
from evaluator.tracks import available_tracks


@dataclass(frozen=True)
class RecordRule:
    min_seeds: int
    p_below: float
    min_improvement_nats: float  # fixed-time tracks: mean val_loss, nats per token
    min_improvement_s: float  # time-to-target tracks: mean time to target, seconds of the evaluator's clock
    drawn_seeds_only: bool
    # Decided by paired evidence (a comparison against the holder) instead of the rows' own runs.
    # A default, so that a rules file written before it keeps its meaning.
    paired: bool = False

    def min_improvement(self, timed: bool) -> float:
        """The minimum improvement in the unit of the track's score (`timed`: a time-to-target track)."""
        return self.min_improvement_s if timed else self.min_improvement_nats

    def text(self, timed: bool = False) -> str:
        seeds = f"{self.min_seeds} distinct {'drawn ' if self.drawn_seeds_only else ''}seeds"
        drawn = " (only runs whose seed the evaluator drew count)" if self.drawn_seeds_only else ""
        if self.paired:
            return self._paired_text(timed, seeds, drawn)
        if timed:
            return (
                f"a record needs runs on at least {seeds}{drawn}, every run of the row reaching the target, and "
                f"must beat the record holder of its time in a one-sided Welch t-test at p < {self.p_below:g} with "
                f"a mean time to target shorter by at least {self.min_improvement_s:g} s (one time per seed: the "
                "mean of its runs)"
            )
        return (
            f"a record needs runs on at least {seeds}{drawn} and must beat the record holder of its time "
            f"in a one-sided Welch t-test at p < {self.p_below:g} with a mean val_loss lower by at least "
            f"{self.min_improvement_nats:g} nats (one val_loss per seed: the mean of its runs)"
        )

    def _paired_text(self, timed: bool, seeds: str, drawn: str) -> str:
        score, unit = ("time to target", "s") if timed else ("val_loss", "nats")
        reached = ", every run of the row reaching the target," if timed else ""
        pairs_drawn = "drawn " if self.drawn_seeds_only else ""
        return (
            f"a record needs runs on at least {seeds}{drawn}{reached} and paired evidence against the record "
            f"holder of its time: an evaluator compare with the holder as A and the challenger as B, both runs of a "
            f"pair on one host with one seed, of at least {self.min_seeds} scored pairs with {pairs_drawn}seeds, "
            f"whose {score} differences (B - A) pass a one-sided paired t-test at p < {self.p_below:g} with a "
            f"mean difference of at most -{self.min_improvement(timed):g} {unit} (shown as mean ± standard error)"
        )


@dataclass(frozen=True)
class RecordRules:
    path: Path
    default: dict
    tracks: dict[str, dict]

    def for_track(self, track_id: str) -> RecordRule:
        return RecordRule(**(self.default | self.tracks.get(track_id, {})))


@cache
def _schema() -> dict:
    return json.loads((SPEC_DIR / "record-rules.schema.json").read_text())


def load_record_rules(path: Path) -> RecordRules:
    """Read and validate a rules file; every problem is a UserError naming the file and the field."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"{path}: cannot read the record rules: {exc}") from None
    errors = sorted(
        jsonschema.Draft202012Validator(_schema()).iter_errors(raw), key=lambda e: list(map(str, e.absolute_path))
    )
    if errors:
        details = "; ".join(f"{'.'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}" for e in errors)
        raise UserError(f"{path}: invalid record rules: {details}")
    tracks = raw.get("track", {})
    unknown = sorted(set(tracks) - set(available_tracks()))
    if unknown:  # a misspelt section would silently leave its track on the defaults
        raise UserError(
            f"{path}: [track.{unknown[0]}] names no track in spec/tracks/ (available: {', '.join(available_tracks())})"
        )
    return RecordRules(path=Path(path), default=raw["default"], tracks=tracks)

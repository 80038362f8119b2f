"""The leaderboard as text, the same in every format: a row's cells, each track's columns, and the
sentences that say how a track ranks and what its record rule asks.

Every renderer (terminal, Markdown, HTML, JSON) takes its words from here, so that they cannot
drift apart; and whatever a result holds passes through `visible` on its way into a cell.
"""

from __future__ import annotations

import unicodedata

from evaluator.leaderboard.board import (
    DEVELOPMENT,
    FORMER_RECORD,
    NOT_REACHED,
    NOT_SIGNIFICANT,
    RECORD,
    TOO_FEW_PAIRS,
    TOO_FEW_SEEDS,
    TOO_SMALL,
    Row,
    TrackTarget,
)
from evaluator.leaderboard.rules import RecordRule

# Control characters (C0, DEL, C1), format characters (bidi overrides and isolates, zero-width
# characters, soft hyphens) and line and paragraph separators: what breaks a row, drives a terminal,
# or makes a page show other text than it holds.
_HIDDEN_CATEGORIES = {"Cc", "Cf", "Zl", "Zp"}


def visible(text: str) -> str:
    """Text from a result with every control, format and separator character written out as \\xNN
    or \\uNNNN, so that no result can break a table row, send a terminal an escape sequence or
    reorder what a reader sees. `evaluator check` refuses them in a manifest's free text; results
    signed before it did, or by another evaluator, are shown this way."""
    return "".join(_escaped(char) if unicodedata.category(char) in _HIDDEN_CATEGORIES else char for char in text)


def _escaped(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _p_value(p: float) -> str:
    return "p<0.0001" if p < 1e-4 else f"p={p:.2g}"


def _mean_std(row: Row) -> str:
    return _loss(row.mean_val_loss) + ("" if row.std_val_loss is None else f" ± {row.std_val_loss:.4f}")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _time(value: float | None) -> str:
    """A time to target: the evaluator stamps models to 0.01 s."""
    return "-" if value is None else f"{value:.2f} s"


def _mean_std_time(row: Row) -> str:
    if not row.all_reached:
        return f"reached in {row.reached_runs} of {len(row.runs)} runs"
    std = row.std_time_to_target
    return f"{row.mean_time_to_target:.2f}" + ("" if std is None else f" ± {std:.2f}") + " s"


def _improvement(row: Row) -> str:
    return f"{row.record_improvement:+.2f} s" if row.timed else f"{row.record_improvement:+.4f}"


def _difference(row: Row, value: float) -> str:
    return f"{value:+.2f} s" if row.timed else f"{value:+.4f}"


def _paired_text(row: Row) -> str:
    """The paired test: 'paired vs HOLDER: mean difference ± its standard error over n pairs, p'."""
    paired, p_value = row.record_paired, row.record_p_value
    # Only for a paired test that gave a p-value, which took at least two pairs: both figures exist.
    assert paired is not None and p_value is not None
    assert paired.mean_difference is not None and paired.standard_error is not None
    return (
        f"paired vs {row.record_baseline}: {_difference(row, paired.mean_difference)} ± "
        f"{_difference(row, paired.standard_error)[1:]} over {paired.pairs} pairs, {_p_value(p_value)}"
    )


def _record_text(row: Row) -> str:
    test = ""
    if row.record_p_value is not None and row.record_paired is not None:
        test = _paired_text(row)
    elif row.record_p_value is not None:
        test = f"{_p_value(row.record_p_value)}, {_improvement(row)} vs {row.record_baseline}"
    if row.record_status == RECORD:
        return f"★ record ({test or 'the first'})"
    if row.record_status == FORMER_RECORD:
        return f"former record ({test or 'the first'})"
    if row.record_status == NOT_SIGNIFICANT:
        return f"not a record: {test}"
    if row.record_status == TOO_SMALL:
        unit = " s" if row.timed else ""
        return f"not a record: {test}, an improvement under {row.rule.min_improvement(row.timed):g}{unit}"
    if row.record_status == TOO_FEW_PAIRS:
        paired = row.record_paired
        assert paired is not None  # _mark_records counts the pairs before it finds them too few
        return (
            f"not a record: needs ≥{row.rule.min_seeds} scored pairs of a comparison vs "
            f"{row.record_baseline}, has {paired.pairs}"
        )
    if row.record_status == NOT_REACHED:
        return "needs every run to reach the target"
    if row.record_status == DEVELOPMENT:
        return "never a record (public split)"
    if row.record_status == TOO_FEW_SEEDS:
        drawn = "drawn " if row.rule.drawn_seeds_only else ""
        return f"needs ≥{row.rule.min_seeds} {drawn}seeds"
    return "not eligible"


def _calibrated_text(row: Row) -> str:
    factors = sorted(run.calibration_factor for run in row.runs if run.calibration_factor is not None)
    span = f"x{factors[0]:g}" if factors[0] == factors[-1] else f"x{factors[0]:g}-{factors[-1]:g}"
    return f"calibrated {span}, unofficial"


def _runs_text(row: Row) -> str:
    text = str(len(row.runs))
    details = [f"{row.seeds} seeds"] if row.seeds != len(row.runs) else []
    if row.drawn_seeds:
        details.append(f"{row.drawn_seeds} drawn")
    failed = f" + {len(row.failed_statuses)} failed" if row.failed_statuses else ""
    return text + (f" ({', '.join(details)})" if details else "") + failed


# A T4 sits at its 70 W cap under load by design; thermal and hardware slowdowns are the ones that
# say a board ran worse than its kind. The column names which it was.
_REASON_WORDS = {
    "sw_power_cap": "power cap",
    "hw_slowdown": "hardware",
    "sw_thermal_slowdown": "thermal",
    "hw_thermal_slowdown": "thermal",
    "hw_power_brake_slowdown": "power brake",
}


def _gpu_text(row: Row) -> str:
    throttled = row.throttled_runs
    if throttled is None:
        return "-"
    slowed, sampled = throttled
    if slowed == 0:
        return "steady"
    words = ", ".join(dict.fromkeys(_REASON_WORDS.get(reason, reason) for reason in row.throttle_reasons))
    return f"throttled in {slowed}/{sampled}" + (f": {words}" if words else "")


# (header, numeric): numeric columns are right-aligned and never wrapped.
COLUMNS = [
    ("#", True),
    ("submission", False),
    ("val_loss mean ± std", True),
    ("runs", True),
    ("best val_loss", True),
    ("val_bpb", True),
    ("train s", True),
    ("GPU clocks", False),
    ("authors", False),
    ("latest run", False),
    ("status", False),
    ("record", False),
]
# A time-to-target track's: its score is a time, so the time columns take the val_loss ones' place.
TARGET_COLUMNS = [
    ("#", True),
    ("submission", False),
    ("time to target mean ± std", True),
    ("runs", True),
    ("best time", True),
    ("train s", True),
    ("GPU clocks", False),
    ("authors", False),
    ("latest run", False),
    ("status", False),
    ("record", False),
]
# Short text columns that read badly when broken across lines.
UNBROKEN = {"submission", "GPU clocks", "latest run", "status"}


# An official table's rows were scored on the hidden split; this column shows the same models on the
# public one (after the score columns).
PUBLIC_COLUMN = ("public val_loss", True)


def columns_of(rows: list[Row]) -> list[tuple[str, bool]]:
    """The columns of one table."""
    columns = TARGET_COLUMNS if rows and rows[0].timed else COLUMNS
    if rows and not rows[0].development:
        at = columns.index(("train s", True))
        columns = [*columns[:at], PUBLIC_COLUMN, *columns[at:]]
    return columns


def _status_text(row: Row) -> str:
    if row.official:
        status = "official"
    elif row.calibrated:
        status = _calibrated_text(row)
    else:
        status = "development" if row.clean_development else "unofficial"
    if row.contaminated_runs:
        status += f", contaminated in {row.contaminated_runs}/{len(row.runs)}"
    return status


def _author_name(author: str) -> str:
    """'Name <email>' without the address, for the narrow terminal table."""
    name = author.split("<", 1)[0].strip()
    return name or author


def row_cells(row: Row, names_only: bool = False) -> list[str]:
    """The row's cells as every format shows them (with control characters made visible)."""
    authors = [_author_name(a) for a in row.authors] if names_only else row.authors
    if row.timed:
        fastest = row.fastest_run
        scores = [_mean_std_time(row), _runs_text(row), _time(None if fastest is None else fastest.time_to_target)]
    else:
        scores = [_mean_std(row), _runs_text(row), _loss(row.best_run.val_loss), _loss(row.mean_val_bpb)]
    if not row.development:
        scores.append(_loss(row.mean_dev_val_loss))
    cells = [
        str(row.rank) if row.rank is not None else "-",
        row.submission,
        *scores,
        _seconds(row.mean_train_seconds),
        _gpu_text(row),
        ", ".join(authors),
        row.latest_run_at.date().isoformat(),
        _status_text(row),
        _record_text(row),
    ]
    return [visible(cell) for cell in cells]


def by_track(rows: list[Row]) -> dict[str, list[Row]]:
    grouped: dict[str, list[Row]] = {}
    for row in rows:
        grouped.setdefault(row.track, []).append(row)
    return grouped


def by_table(rows: list[Row]) -> dict[tuple[str, bool], list[Row]]:
    """Each track's tables: (track id, development) -> its rows, the official table first."""
    grouped: dict[tuple[str, bool], list[Row]] = {}
    for row in rows:
        grouped.setdefault((row.track, row.development), []).append(row)
    return grouped


def table_heading_suffix(rows: list[Row]) -> str:
    """What a table's heading adds to "Track <id>": its target, and whether it is a development table."""
    return heading_suffix(rows[0].target) + (" · development (public split)" if rows[0].development else "")


DEVELOPMENT_TEXT = (
    "Development table: these runs were scored on the public split, which anyone can memorise, so none is "
    "official and none holds a record; a row is ranked here when its runs would be official but for the split."
)


def table_rule_text(track_id: str, rows: list[Row]) -> str:
    """The sentence under a table's heading: the track's record rule, or what a development table is."""
    return DEVELOPMENT_TEXT if rows[0].development else track_rule_text(track_id, rows)


RANKING_TEXT = (
    "Ranked by mean validation loss (nats/token, lower is better); ± is the sample standard deviation "
    'over runs; "drawn" counts seeds the evaluator drew, which nobody could choose. Official tables are '
    "scored on the hidden test split, with the same models' public-split val_loss beside it; \"contaminated "
    'in k/n" when k runs scored further apart on the two splits than honest models do (they memorised the '
    "public split, or the hidden one leaked). "
    "Submissions are considered for the record in the order of their first run; unofficial runs are listed "
    'apart and never hold a record. GPU clocks: "throttled in k/n" when the driver reported a power or '
    "thermal slowdown during training in k of the n runs it was sampled in."
)


def rule_text(track_id: str, rule: RecordRule, timed: bool = False) -> str:
    return f"Track {track_id}: {rule.text(timed)}."


def track_rule_text(track_id: str, rows: list[Row]) -> str:
    return rule_text(track_id, rows[0].rule, rows[0].timed)


def heading_suffix(target: TrackTarget | None) -> str:
    """What a time-to-target track's heading adds to "Track <id>": its target; nothing on a fixed-time track."""
    if target is None:
        return ""
    return f" · time to target val_loss {target.val_loss:g}" + (" (provisional)" if target.provisional else "")


def target_ranking_text(target: TrackTarget) -> str:
    """How a time-to-target track ranks; printed with its table, since RANKING_TEXT is about val_loss."""
    text = (
        f"Time to target: a run's score is the time, on the evaluator's clock, at which it took the first model "
        f"(a snapshot or the final model) whose val_loss the evaluator measured at or below {target.val_loss:g}. "
        "Rows are ranked by the mean time over their runs (seconds, lower is better; ± is the sample standard "
        "deviation); a row any of whose runs did not reach the target is listed after the ranked rows, unranked, "
        "with how many of its runs reached it."
    )
    if target.provisional:
        text += " The target is provisional: it may still change, and times against another target are not comparable."
    return text

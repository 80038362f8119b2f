"""The leaderboard rendered as a terminal table, Markdown, JSON and Parquet.

The HTML page, with its plots, is evaluator.leaderboard.html's. Each renderer takes rows already
ranked (evaluator.leaderboard.board) and the words of evaluator.leaderboard.text, and adds its
format's layout and escaping, so that no result becomes markup or a terminal escape sequence.
"""

from __future__ import annotations

import html
import io
import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from evaluator.leaderboard.board import RECORD, Row, Run, TrackTarget
from evaluator.leaderboard.text import (
    RANKING_TEXT,
    UNBROKEN,
    by_table,
    by_track,
    columns_of,
    row_cells,
    table_heading_suffix,
    table_rule_text,
    target_ranking_text,
    track_rule_text,
    visible,
)
from evaluator.paths import shown

# Shorter headers where a terminal is narrow.
TERMINAL_HEADERS = {
    "val_loss mean ± std": "val_loss ± std",
    "best val_loss": "best",
    "time to target mean ± std": "time to target ± std",
    "best time": "best",
}


def _rich_table(track_id: str, rows: list[Row]) -> Table:
    # A Text title: a str title would be read as rich markup.
    title = Text(f"Track {visible(track_id)}{table_heading_suffix(rows)}")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for header, numeric in columns_of(rows):
        if numeric or header in UNBROKEN:
            table.add_column(TERMINAL_HEADERS.get(header, header), justify="right" if numeric else "left", no_wrap=True)
        else:
            table.add_column(TERMINAL_HEADERS.get(header, header), overflow="fold")
    for row in rows:
        table.add_row(
            *map(Text, row_cells(row, names_only=True)), style="bold" if row.record_status == RECORD else None
        )
    return table


def _row_cards(track_id: str, rows: list[Row]) -> Text:
    """Two lines per row: what a terminal too narrow for the table still shows legibly."""
    text = Text(f"Track {visible(track_id)}{table_heading_suffix(rows)}\n", style="italic")
    for row in rows:
        cells = dict(zip((header for header, _ in columns_of(rows)), row_cells(row, names_only=True), strict=True))
        style = "bold" if row.record_status == RECORD else ""
        text.append(f"{cells['#']:>3}  {cells['submission']}\n", style="bold")
        count = len(row.runs)
        runs = f"{count} run{'' if count == 1 else 's'}{cells['runs'][len(str(count)) :]}"  # "3 runs (3 drawn)"
        if row.timed:
            scores = (
                f"time to target {cells['time to target mean ± std']} · {runs} · best {cells['best time']}"
                f" · trained {cells['train s']} s"
            )
        else:
            scores = (
                f"val_loss {cells['val_loss mean ± std']} · {runs} · best {cells['best val_loss']}"
                f" · bpb {cells['val_bpb']} · {cells['train s']} s"
            )
        if "public val_loss" in cells:
            scores += f" · public split {cells['public val_loss']}"
        text.append(f"     {scores} · GPU {cells['GPU clocks']}\n", style=style)
        details = [cells["authors"], f"latest {cells['latest run']}", cells["status"], cells["record"]]
        text.append(f"     {' · '.join(details)}\n")
    return text


def print_table(console: Console, rows: list[Row], verified_count: int) -> None:
    if not rows:
        console.print("No verified results.")
    for (track_id, _), track_rows in by_table(rows).items():
        table = _rich_table(track_id, track_rows)
        natural_width = Measurement.get(console, console.options.update_width(10_000), table).maximum
        if natural_width <= console.width:
            console.print(table)
        else:
            console.print(_row_cards(track_id, track_rows))
        target = track_rows[0].target
        if target is not None:
            console.print(target_ranking_text(target), markup=False, highlight=False)
        console.print(visible(table_rule_text(track_id, track_rows)), markup=False, highlight=False)
    console.print(f"{verified_count} verified result(s). {RANKING_TEXT}", markup=False, highlight=False)


def render_table(rows: list[Row], verified_count: int) -> str:
    """The terminal table as plain text, wide enough that no column folds."""
    buffer = io.StringIO()
    print_table(Console(file=buffer, width=200, color_system=None), rows, verified_count)
    return buffer.getvalue()


# What Markdown (GitHub's included) would read as markup inside a table cell: emphasis, code,
# links and images, strikethrough, the cell separator, and the backslash that escapes them.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]~|])")


def _markdown_cell(text: str) -> str:
    """A cell's text as Markdown that renders as exactly that text: &, < and > as entities (no HTML,
    no <...> autolinks), the other special characters backslash-escaped, a leading # too."""
    escaped = _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(text, quote=False))
    return "\\" + escaped if escaped.startswith("#") else escaped


def _markdown_code(text: str) -> str:
    """A code span, unless the text holds a backtick (which would end it): then escaped text."""
    return f"`{text}`" if "`" not in text and text.strip() == text and text else _markdown_cell(text)


def render_markdown(rows: list[Row], verified_count: int) -> str:
    lines = [
        "# Leaderboard",
        "",
        f"Generated by `evaluator leaderboard` from {verified_count} signed result(s) that verify. {RANKING_TEXT}",
        "",
    ]
    if not rows:
        lines += ["No verified results yet.", ""]
    for (track_id, _), track_rows in by_table(rows).items():
        target = track_rows[0].target
        lines += [f"## Track {_markdown_code(visible(track_id))}{_markdown_cell(table_heading_suffix(track_rows))}", ""]
        if target is not None:
            lines += [_markdown_cell(target_ranking_text(target)), ""]
        lines += [_markdown_cell(visible(table_rule_text(track_id, track_rows))), ""]
        columns = columns_of(track_rows)
        lines.append("| " + " | ".join(header for header, _ in columns) + " |")
        lines.append("|" + "|".join("---:" if numeric else "---" for _, numeric in columns) + "|")
        for row in track_rows:
            cells = [_markdown_cell(cell) for cell in row_cells(row)]
            if row.record_status == RECORD:
                cells[1] = f"**{cells[1]}**"
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _row_json(row: Row) -> dict[str, Any]:
    return {
        "track": row.track,
        "rank": row.rank,
        "submission": row.submission,
        "official": row.official,
        "development": row.development,
        "calibrated": row.calibrated,
        "authors": row.authors,
        "description": row.description,
        "runs": len(row.runs),
        "failed_runs": len(row.failed_statuses),
        "failed_statuses": row.failed_statuses,
        "seeds": row.seeds,
        "drawn_seeds": row.drawn_seeds,
        "throttled_runs": None if row.throttled_runs is None else row.throttled_runs[0],
        "sampled_runs": None if row.throttled_runs is None else row.throttled_runs[1],
        "throttle_reasons": row.throttle_reasons,
        "val_loss_mean": row.mean_val_loss,
        "val_loss_std": row.std_val_loss,
        "best_val_loss": row.best_run.val_loss,
        "best_run_id": row.best_run.run_id,
        "val_bpb_mean": row.mean_val_bpb,
        "public_val_loss_mean": row.mean_dev_val_loss,
        "contaminated_runs": row.contaminated_runs,
        "train_seconds_mean": row.mean_train_seconds,
        "first_run_at": row.first_run_at.isoformat(),
        "latest_run_at": row.latest_run_at.isoformat(),
        "record_status": row.record_status,
        "record_p_value": row.record_p_value,
        "record_improvement": row.record_improvement,
        "record_baseline": row.record_baseline,
        # A paired track's evidence against record_baseline: its comparisons' pairs, and the mean and
        # standard error of their differences (this row's score minus the baseline's); null elsewhere.
        "record_pairs": None if row.record_paired is None else row.record_paired.pairs,
        "record_paired_difference": None if row.record_paired is None else row.record_paired.mean_difference,
        "record_paired_standard_error": None if row.record_paired is None else row.record_paired.standard_error,
        "signers": row.signers,
        # Time-to-target tracks; null on a fixed-time track. The mean and std need every run to
        # have reached the target, the best time only one.
        "target_val_loss": row.target.val_loss if row.target is not None else None,
        "target_provisional": row.target.provisional if row.target is not None else None,
        "reached_runs": row.reached_runs if row.timed else None,
        "time_to_target_mean": row.mean_time_to_target if row.timed else None,
        "time_to_target_std": row.std_time_to_target if row.timed else None,
        "best_time_to_target": _fastest(row, lambda run: run.time_to_target),
        "best_time_run_id": _fastest(row, lambda run: run.run_id),
        "run_details": [
            {
                "run_id": run.run_id,
                "seed": run.seed,
                "seed_drawn": run.seed_drawn,
                "calibration_factor": run.calibration_factor,
                "val_loss": run.val_loss,
                "val_bpb": run.val_bpb,
                "public_val_loss": run.dev_val_loss,
                "contaminated": run.contaminated,
                "train_seconds": run.train_seconds,
                "throttled_s": run.throttled_s,
                "gpu": run.gpu,
                "started_at": run.started_at.isoformat(),
                "signer": run.signer,
                "comparison": run.comparison,
                "target": run.target,
                "val_curve": run.val_curve,
            }
            for run in row.runs
        ],
    }


def _fastest(row: Row, field: Callable[[Run], Any]) -> Any:
    fastest = row.fastest_run if row.timed else None
    return None if fastest is None else field(fastest)


def _track_json(target: TrackTarget | None) -> dict[str, Any]:
    if target is None:
        return {"kind": "fixed_time", "target_val_loss": None, "target_provisional": None, "ranking": None}
    return {
        "kind": "time_to_target",
        "target_val_loss": target.val_loss,
        "target_provisional": target.provisional,
        "ranking": target_ranking_text(target),
    }


# ensure_ascii=False keeps names readable but leaves DEL, C1 (CSI among them), format characters
# (bidi overrides, zero-width spaces) and line separators raw; JSON's \u escapes are valid wherever
# they occur, which is only inside strings. Astral format characters (tags) are left: JSON would need
# a surrogate pair, and they show as nothing rather than reorder a line.
_JSON_RAW_CONTROLS = {
    code: f"\\u{code:04x}"
    for code in range(0x10000)
    if 0x7F <= code < 0xA0 or unicodedata.category(chr(code)) in ("Cf", "Zl", "Zp")
}


def render_json(rows: list[Row], verified_count: int, rejected: list[tuple[Path, str]]) -> str:
    document = {
        "verified": verified_count,
        "rejected": [{"path": shown(path), "reason": reason} for path, reason in rejected],
        "ranking": RANKING_TEXT,
        "record_rules": {
            track_id: {**asdict(track_rows[0].rule), "text": track_rule_text(track_id, track_rows)}
            for track_id, track_rows in by_track(rows).items()
        },
        "tracks": {track_id: _track_json(track_rows[0].target) for track_id, track_rows in by_track(rows).items()},
        "rows": [_row_json(row) for row in rows],
    }
    return json.dumps(document, indent=2, ensure_ascii=False).translate(_JSON_RAW_CONTROLS) + "\n"


PARQUET_SCHEMA = pa.schema(
    [
        ("track", pa.string()),
        ("rank", pa.int32()),
        ("submission", pa.string()),
        ("official", pa.bool_()),
        ("development", pa.bool_()),
        ("calibrated", pa.bool_()),
        ("authors", pa.list_(pa.string())),
        ("description", pa.string()),
        ("runs", pa.int32()),
        ("failed_runs", pa.int32()),
        ("failed_statuses", pa.list_(pa.string())),
        ("seeds", pa.int32()),
        ("drawn_seeds", pa.int32()),
        ("throttled_runs", pa.int32()),
        ("sampled_runs", pa.int32()),
        ("throttle_reasons", pa.list_(pa.string())),
        ("val_loss_mean", pa.float64()),
        ("val_loss_std", pa.float64()),
        ("best_val_loss", pa.float64()),
        ("best_run_id", pa.string()),
        ("val_bpb_mean", pa.float64()),
        ("public_val_loss_mean", pa.float64()),
        ("contaminated_runs", pa.int32()),
        ("train_seconds_mean", pa.float64()),
        ("first_run_at", pa.timestamp("us", tz="UTC")),
        ("latest_run_at", pa.timestamp("us", tz="UTC")),
        ("record_status", pa.string()),
        ("record_p_value", pa.float64()),
        ("record_improvement", pa.float64()),
        ("record_baseline", pa.string()),
        ("record_pairs", pa.int32()),
        ("record_paired_difference", pa.float64()),
        ("record_paired_standard_error", pa.float64()),
        ("signers", pa.list_(pa.string())),
        ("run_ids", pa.list_(pa.string())),
        ("val_losses", pa.list_(pa.float64())),
        # Time-to-target tracks (null on a fixed-time track); times_to_target is null where a run did not reach it.
        ("target_val_loss", pa.float64()),
        ("target_provisional", pa.bool_()),
        ("reached_runs", pa.int32()),
        ("time_to_target_mean", pa.float64()),
        ("time_to_target_std", pa.float64()),
        ("best_time_to_target", pa.float64()),
        ("best_time_run_id", pa.string()),
        ("times_to_target", pa.list_(pa.float64())),
    ]
)


def render_parquet(rows: list[Row]) -> bytes:
    table_rows = []
    for row in rows:
        columns = _row_json(row)
        del columns["run_details"]
        columns["first_run_at"] = row.first_run_at
        columns["latest_run_at"] = row.latest_run_at
        columns["run_ids"] = [run.run_id for run in row.runs]
        columns["val_losses"] = row.val_losses
        columns["times_to_target"] = row.times_to_target if row.timed else None
        table_rows.append(columns)
    table = pa.Table.from_pylist(table_rows, schema=PARQUET_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()

"""The leaderboard: rankings built only from signed results that verify.

One row per submission, track and kind of run, ranked by mean val_loss (by mean time to target on a
time-to-target track); each track's record rule decides which row holds its world record. The
modules, each depending only on those above it:

- `stats`: Welch's one-sided t-test, the one-sided paired t-test and Student's t, from the standard library
- `rules`: `spec/record-rules.toml`, each track's record rule
- `board`: verified runs pooled into rows, ranked, and the record decided
- `text`: a row's cells and the sentences every format shows
- `render`: the terminal table, Markdown, JSON and Parquet
- `html`: the HTML page and its SVG loss plots
- `cli`: the `evaluator leaderboard` command (evaluator/cli.py registers it)
"""

from evaluator.leaderboard.board import Row, Run, TrackTarget, build_rows
from evaluator.leaderboard.html import render_html
from evaluator.leaderboard.render import print_table, render_json, render_markdown, render_parquet, render_table
from evaluator.leaderboard.rules import RecordRule, RecordRules, load_record_rules

__all__ = [
    "RecordRule",
    "RecordRules",
    "Row",
    "Run",
    "TrackTarget",
    "build_rows",
    "load_record_rules",
    "print_table",
    "render_html",
    "render_json",
    "render_markdown",
    "render_parquet",
    "render_table",
]

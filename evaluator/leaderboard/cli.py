"""`evaluator leaderboard`: verify the published envelopes, build the board, write it in one format.

Rejected envelopes are listed on stderr and make the exit status 1, whatever is shown; with nothing
to rank, the command says why.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from evaluator.errors import UserError
from evaluator.fsutil import atomic_write_bytes
from evaluator.leaderboard.board import Row, build_rows
from evaluator.leaderboard.html import render_html
from evaluator.leaderboard.render import print_table, render_json, render_markdown, render_parquet, render_table
from evaluator.leaderboard.rules import load_record_rules
from evaluator.leaderboard.text import visible
from evaluator.paths import KEYS_DIR, RECORD_RULES_FILE, RESULTS_DIR, shown
from evaluator.publish import envelope_paths, verify_paths
from evaluator.signing import load_trusted_keys

FORMATS = ("table", "markdown", "html", "json", "parquet")


def render(fmt: str, rows: list[Row], verified_count: int, rejected: list[tuple[Path, str]]) -> bytes:
    if fmt == "table":
        return render_table(rows, verified_count).encode("utf-8")
    if fmt == "markdown":
        return render_markdown(rows, verified_count).encode("utf-8")
    if fmt == "html":
        return render_html(rows, verified_count).encode("utf-8")
    if fmt == "json":
        return render_json(rows, verified_count, rejected).encode("utf-8")
    return render_parquet(rows)


def _run_leaderboard(args: argparse.Namespace) -> int:
    if args.format == "parquet" and args.out is None:
        raise UserError("--format parquet writes a binary file: give it --out PATH")
    results_dir = Path(args.results) if args.results is not None else RESULTS_DIR
    if args.results is not None and not results_dir.is_dir():
        raise UserError(f"results directory {results_dir} does not exist")
    trusted_dir = Path(args.trusted_keys)
    trusted = load_trusted_keys(trusted_dir)
    envelopes = envelope_paths(results_dir) if results_dir.is_dir() else []
    verified, rejected = verify_paths(envelopes, trusted)
    rules = load_record_rules(Path(args.rules))
    rows, duplicates = build_rows(verified, rules, args.track)
    rejected += duplicates
    exit_code = 1 if rejected else 0  # whatever is shown: a rejected envelope is something to look at
    counted = sum(len(row.runs) + len(row.failed_statuses) for row in rows)
    if rejected:
        sys.stderr.write(f"leaderboard: {len(rejected)} envelope(s) rejected, not shown:\n")
        for path, reason in rejected:
            sys.stderr.write(f"  {visible(shown(path))}: {visible(reason)}\n")
    to_terminal = args.format == "table" and args.out is None
    if not rows:
        why = _why_nothing_is_shown(results_dir, len(envelopes), len(verified), trusted_dir, args.track)
        if to_terminal:  # where stdout is the table a person reads; elsewhere it would corrupt the document
            print(why)
            return exit_code
        sys.stderr.write(f"leaderboard: {why}\n")
    if to_terminal and sys.stdout.isatty():
        print_table(Console(), rows, counted)
        return exit_code
    output = render(args.format, rows, counted, rejected)
    if args.out is None:
        sys.stdout.write(output.decode("utf-8"))
    else:
        atomic_write_bytes(Path(args.out), output)
        sys.stderr.write(f"leaderboard: wrote {args.out} ({len(rows)} row(s) from {counted} run(s))\n")
    return exit_code


def _why_nothing_is_shown(
    results_dir: Path, envelopes: int, verified: int, trusted_dir: Path, track: str | None
) -> str:
    where = shown(results_dir) + "/"
    if not results_dir.is_dir():
        return (
            f"nothing to rank: {where} does not exist here; publish a run (evaluator publish RUN_DIR) "
            "or give --results DIR"
        )
    if envelopes == 0:
        return f"nothing to rank: {where} holds no published results (*.json); evaluator publish RUN_DIR adds one"
    if verified == 0:
        return (
            f"nothing to rank: none of the {envelopes} envelope(s) in {where} verified against the trusted keys in "
            f"{shown(trusted_dir)}/ (the reasons are on stderr); a key of your own goes in a folder given with "
            "--trusted-keys DIR"
        )
    return f"nothing to rank for track {track!r}: {verified} verified result(s) in {where}, none on that track"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "leaderboard",
        help="rank submissions from verified results",
        description=(
            "Build the leaderboard from the signed results that verify (rejected envelopes are listed on "
            "stderr and never shown; the exit status is then 1). With nothing to rank it says why. "
            "One row per submission and track: mean ± std of val_loss over its runs, "
            "best run, val_bpb, train seconds, whether the GPU throttled, authors, latest run, official or not, "
            "and the record test of the track's rule in --rules (distinct seeds, one-sided Welch t-test, minimum "
            "improvement), which each table's header states. On a time-to-target track (one whose results have a "
            "target) rows rank by mean time to target instead, and a row whose runs did not all reach it is "
            "listed after the ranked ones."
        ),
    )
    parser.add_argument("--track", metavar="ID", help="only this track (default: every track, one table each)")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    parser.add_argument("--out", metavar="PATH", help="write here (atomically) instead of stdout; required for parquet")
    parser.add_argument(
        "--results", metavar="DIR", help="published envelopes (default: results/ in the current folder)"
    )
    parser.add_argument(
        "--trusted-keys",
        default=str(KEYS_DIR),
        metavar="DIR",
        help=(
            "trusted *.pub keys (default: spec/keys/ in the evaluator's home; a folder of your own for keys you trust)"
        ),
    )
    parser.add_argument(
        "--rules",
        default=str(RECORD_RULES_FILE),
        metavar="FILE",
        help="record rules per track (default: spec/record-rules.toml); they re-rank, they never invalidate a result",
    )
    parser.set_defaults(handler=_run_leaderboard)

"""Every output format, and what a competitor writes never becoming markup or a terminal escape
(evaluator/leaderboard/render.py and text.py; the HTML page's plots are test_html.py's)."""

from __future__ import annotations

import json
import re
import shutil
import sys
from html.parser import HTMLParser

import pyarrow.parquet as pq
import pytest
from leaderboard_support import (
    FORGED_VAL_LOSS,
    RANKED,
    SUBMISSIONS,
    TIMED,
    TIMED_ORDER,
    _published_results,
    _timed_rules,
    leaderboard,
)
from publish_support import make_run

from evaluator.leaderboard.text import COLUMNS, PUBLIC_COLUMN, TARGET_COLUMNS
from evaluator.publish import publish
from evaluator.signing import generate_key_pair, load_private_key


def _official(columns):
    """An official table's columns: the public split's score after the score columns."""
    at = columns.index(("train s", True))
    return [*columns[:at], PUBLIC_COLUMN, *columns[at:]]


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href") and value and not value.startswith("#"):
                self.external.append(value)


@pytest.mark.parametrize("fmt", ["table", "markdown", "html", "json", "parquet"])
def test_every_format_writes_a_parseable_file(board, monkeypatch, capsys, tmp_path, fmt):
    out = tmp_path / f"leaderboard.{fmt}"
    code, _, stderr = leaderboard(monkeypatch, capsys, board, "--track", "cpu-1min", "--format", fmt, "--out", out)
    assert code == 1, stderr
    data = out.read_bytes()
    assert data
    if fmt == "parquet":
        table = pq.read_table(out)
        assert table.column("submission").to_pylist() == RANKED
        assert table.column("val_losses").to_pylist()[2] == SUBMISSIONS["beta"][1]
        return
    text = data.decode("utf-8")
    if fmt == "json":
        assert len(json.loads(text)["rows"]) == len(RANKED)
    elif fmt == "table":
        assert all(name in text for name in RANKED) and "record" in text
    elif fmt == "markdown":
        table_lines = [line for line in text.splitlines() if line.startswith("|")]
        assert len(table_lines) == 2 + len(RANKED)
        assert all(line.count(" | ") == table_lines[0].count(" | ") for line in table_lines[2:])
        assert "**beta**" in text and "p=" in text
    else:
        parser = _Tags()
        parser.feed(text)
        assert "svg" in parser.tags and "table" in parser.tags
        assert "script" not in parser.tags and parser.external == []
        assert "&lt;script&gt;" in text
        # per run: its training loss, its measured validation curve and one final-val_loss marker
        assert text.count("<polyline") == text.count('class="final"') == 14
        assert text.count('class="val"') == 11 and text.count('class="val unofficial"') == 3
        assert text.count('class="val-point"') == 2 * 14  # the snapshots at 20 s and 40 s; ◆ marks the final model
        assert 'class="target"' not in text  # a fixed-time track has no target line


def test_text_formats_state_the_target_and_rank_on_times(timed_board, monkeypatch, capsys, tmp_path):
    rules = _timed_rules(tmp_path)
    code, stdout, _ = leaderboard(monkeypatch, capsys, timed_board, "--format", "markdown", "--rules", rules)
    assert code == 0
    assert "## Track `toy-target` · time to target val\\_loss 4.1 (provisional)" in stdout
    assert "The target is provisional" in stdout
    table = [line for line in stdout.splitlines() if line.startswith("|")]
    assert table[0] == "| " + " | ".join(header for header, _ in _official(TARGET_COLUMNS)) + " |"
    assert len(table) == 2 + len(TIMED) and all(line.count(" | ") == table[0].count(" | ") for line in table[2:])
    assert table[2].startswith("| 1 | tiny | 19.51 ± 0.01 s | 3 | 19.50 s | 4.0000 | 56.0 | - |")
    assert table[3].startswith("| 2 | **swift** | 20.01 ± 0.01 s | 3 | 20.00 s |")
    assert "| - | partial | reached in 2 of 3 runs | 3 | 15.00 s |" in stdout
    assert "needs every run to reach the target" in stdout
    assert "p&lt;0.0001, +0.50 s vs swift, an improvement under 1 s" in stdout
    assert "shorter by at least 1 s" in stdout and "nats" not in stdout.split("## Track")[1]
    code, stdout, _ = leaderboard(monkeypatch, capsys, timed_board, "--rules", rules)
    assert "Track toy-target · time to target val_loss 4.1 (provisional)" in stdout
    assert "reached in 2 of 3 runs" in stdout and "19.51 ± 0.01 s" in stdout
    out = tmp_path / "board.parquet"
    assert leaderboard(monkeypatch, capsys, timed_board, "--format", "parquet", "--out", out, "--rules", rules)[0] == 0
    table = pq.read_table(out)
    assert table.column("submission").to_pylist() == TIMED_ORDER
    assert table.column("times_to_target").to_pylist()[4] == [15.0, None, 16.0]
    assert table.column("reached_runs").to_pylist() == [3, 3, 3, 3, 2, 3]
    assert table.column("time_to_target_mean").to_pylist()[4] is None


def test_a_forged_val_loss_in_metrics_reaches_no_output(timed_board, monkeypatch, capsys, tmp_path):
    rules = _timed_rules(tmp_path)
    for fmt in ("json", "markdown", "table"):
        code, stdout, _ = leaderboard(monkeypatch, capsys, timed_board, "--format", fmt, "--rules", rules)
        assert code == 0 and str(FORGED_VAL_LOSS) not in stdout
    steady = [
        row
        for row in json.loads(leaderboard(monkeypatch, capsys, timed_board, "--format", "json", "--rules", rules)[1])[
            "rows"
        ]
        if row["submission"] == "steady"
    ][0]
    curve = steady["run_details"][0]["val_curve"]
    assert curve == _published_results(timed_board[0])["steady-s0"]["val_curve"] and len(curve) == 6


# --- what a competitor writes never becomes markup or a terminal escape ---------------------------

# Authors as a result signed before `evaluator check` refused control characters could hold them:
# Markdown specials, a leading #, a newline that would end the table row, terminal escape sequences
# (OSC title, clear screen, C1 CSI), a bell, and what makes a page show other text than it holds:
# a right-to-left override, a zero-width space, a line separator.
HOSTILE_AUTHORS = [
    "# Mallory *bold* _it_ `code` [link](https://example.org/x) ~~gone~~ back\\slash",
    "Eve\n| forged | row |\n# Heading",
    "\x1b]0;owned\x07\x1b[2J\x9b31mred",
    "Trudy \u202eeciovni\u200b\u2028line",
]
_RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u200b\u202e\u2028]")


@pytest.fixture(scope="module")
def hostile_board(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    private, public, _ = generate_key_pair(root / "private", "tester")
    trusted = root / "trusted"
    trusted.mkdir()
    shutil.copy(public, trusted / public.name)
    results = root / "results"
    publish(
        make_run(root, "mallory-s0", submission="mallory", authors=HOSTILE_AUTHORS),
        load_private_key(private),
        results,
        False,
    )
    return results, trusted


class _Cells(HTMLParser):
    """The text of every <td>, and every tag, of rendered Markdown."""

    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "td":
            self._in_cell = True
            self.cells.append("")

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells[-1] += data


def test_markdown_shows_hostile_authors_as_text_in_their_own_row(hostile_board, monkeypatch, capsys):
    from markdown_it import MarkdownIt

    code, stdout, _ = leaderboard(monkeypatch, capsys, hostile_board, "--format", "markdown")
    assert code == 0
    assert not _RAW_CONTROL.search(stdout)
    table_lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert len(table_lines) == 3  # header, separator, the one row: the newline did not end it
    assert not any("forged" in line or "Heading" in line for line in stdout.splitlines() if not line.startswith("|"))
    # Rendered as GitHub would (tables, strikethrough): one row of plain text, no markup from the authors.
    markdown = MarkdownIt("commonmark").enable("table").enable("strikethrough")
    page = _Cells()
    page.feed(markdown.render(stdout))
    assert page.tags.count("h1") == page.tags.count("h2") == 1 and page.tags.count("tr") == 2
    rendered = _Cells()
    rendered.feed(markdown.render("\n".join(table_lines)))
    assert set(rendered.tags) == {"table", "thead", "tbody", "tr", "th", "td"}
    assert len(rendered.cells) == len(_official(COLUMNS))
    authors_cell = rendered.cells[[header for header, _ in _official(COLUMNS)].index("authors")]
    assert authors_cell == ", ".join(HOSTILE_AUTHORS).replace("\n", "\\x0a").replace("\x1b", "\\x1b").replace(
        "\x07", "\\x07"
    ).replace("\x9b", "\\x9b").replace("\u202e", "\\u202e").replace("\u200b", "\\u200b").replace("\u2028", "\\u2028")


@pytest.mark.parametrize("fmt", ["table", "html", "json"])
def test_no_format_passes_a_control_character_from_a_result(hostile_board, monkeypatch, capsys, fmt):
    code, stdout, _ = leaderboard(monkeypatch, capsys, hostile_board, "--format", fmt)
    assert code == 0
    assert not _RAW_CONTROL.search(stdout), repr(stdout)
    if fmt == "json":  # the data itself is kept, escaped as JSON
        assert json.loads(stdout)["rows"][0]["authors"] == HOSTILE_AUTHORS
    elif fmt == "html":
        assert "\\x1b]0;owned\\x07\\x1b[2J\\x9b31mred" in stdout and "Eve\\x0a| forged" in stdout
        assert "Trudy \\u202eeciovni\\u200b\\u2028line" in stdout
    else:  # the plain-text table may fold the authors column: the characters are shown, not sent
        assert "\\x1b" in stdout and "\\x07" in stdout


def test_the_terminal_table_sends_no_escape_sequence_from_a_result(hostile_board, monkeypatch, capsys):
    # The interactive path: rich writes its own styling, but nothing a result holds reaches the terminal raw.
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("TERM", "xterm-256color")
    code, stdout, _ = leaderboard(monkeypatch, capsys, hostile_board)
    assert code == 0 and "mallory" in stdout
    for sequence in ("\x1b]0;", "\x1b[2J", "\x07", "\x9b", "Eve\n"):
        assert sequence not in stdout

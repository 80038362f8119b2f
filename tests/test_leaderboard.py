"""The leaderboard: statistics, ranking, the record rule, rejected envelopes, every output format."""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
import sys
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from evaluator.leaderboard import (
    COLUMNS,
    FORMER_RECORD,
    NOT_ELIGIBLE,
    NOT_SIGNIFICANT,
    RECORD,
    TOO_FEW_SEEDS,
    regularized_incomplete_beta,
    student_t_cdf,
    welch_one_sided_p,
)
from evaluator.signing import generate_key_pair, load_private_key, publish
from test_signing import T0, _sign_with_unknown_key, _tamper_payload, make_run, published, run_cli

# --- statistics against closed forms and published values ---------------------------------------


@pytest.mark.parametrize("x", [0.0, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0])
def test_incomplete_beta_closed_forms(x):
    assert regularized_incomplete_beta(1, 1, x) == pytest.approx(x, abs=1e-14)
    assert regularized_incomplete_beta(3.5, 1, x) == pytest.approx(x**3.5, abs=1e-13)
    assert regularized_incomplete_beta(1, 4, x) == pytest.approx(1 - (1 - x) ** 4, abs=1e-13)
    assert regularized_incomplete_beta(2.5, 7.0, x) == pytest.approx(
        1 - regularized_incomplete_beta(7.0, 2.5, 1 - x), abs=1e-13
    )


@pytest.mark.parametrize("t", [-30.0, -2.5, -0.4, 0.0, 0.7, 1.9, 12.0])
def test_student_t_cdf_matches_closed_forms_for_one_two_and_four_degrees(t):
    assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)
    assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)
    x = t / math.sqrt(4 + t * t)
    assert student_t_cdf(t, 4) == pytest.approx(0.5 + 0.75 * x - x**3 / 4, abs=1e-13)


@pytest.mark.parametrize(
    "t, df, probability",
    [
        (2.228138851986274, 10, 0.975),
        (2.0150483733330233, 5, 0.95),
        (4.060711359300081, 3.5, 0.99),  # fractional df, as Welch's test produces
        (2.580754698065951, 1000, 0.995),
        (-2.228138851986274, 10, 0.025),
    ],
)
def test_student_t_cdf_at_tabulated_quantiles(t, df, probability):
    assert student_t_cdf(t, df) == pytest.approx(probability, abs=1e-12)


def test_welch_one_sided_p_values():
    # Means 5 and 2, unit variances, n=3 each: t = 3/sqrt(2/3), df = 4 exactly.
    t = 3 / math.sqrt(2 / 3)
    x = t / math.sqrt(4 + t * t)
    assert welch_one_sided_p([4, 5, 6], [1, 2, 3]) == pytest.approx(1 - (0.5 + 0.75 * x - x**3 / 4), abs=1e-13)
    # Unequal variances and a fractional df (value from an independent implementation).
    assert welch_one_sided_p([3.1, 3.2, 3.15], [3.0, 3.05, 3.02]) == pytest.approx(0.0152043639770726, abs=1e-12)
    # One-sided: a worse challenger gets a large p.
    assert welch_one_sided_p([1, 2, 3], [4, 5, 6]) == pytest.approx(1 - welch_one_sided_p([4, 5, 6], [1, 2, 3]))
    assert welch_one_sided_p([2.0, 2.0, 2.0], [1.0, 1.0, 1.0]) == 0.0
    assert welch_one_sided_p([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]) == 1.0


# --- a results folder with several submissions ---------------------------------------------------

# submission -> (days after T0 of its first run, val_losses by seed, official)
SUBMISSIONS = {
    "alpha": (0, [4.00, 4.02, 3.98], True),
    "beta": (30, [3.80, 3.82, 3.79], True),  # clearly beats alpha: the record
    "gamma": (60, [3.70, 3.95, 3.60], True),  # better mean than beta, but too noisy to claim it
    "delta": (90, [3.50, 3.52], True),  # best mean, two seeds only
    "epsilon": (100, [3.00, 3.01, 3.02], False),  # unofficial: listed, never ranked or a record
}
RANKED = ["delta", "gamma", "beta", "alpha", "epsilon"]
EVIL_AUTHOR = "<script>alert(1)</script> | Eve"


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """Published envelopes for SUBMISSIONS, plus three that must be rejected. Returns (results, trusted)."""
    root = tmp_path_factory.mktemp("board")
    private, public, _ = generate_key_pair(root / "private", "tester")
    key = load_private_key(private)
    trusted = root / "trusted"
    trusted.mkdir()
    shutil.copy(public, trusted / public.name)
    results = root / "results"
    for name, (days, losses, official) in SUBMISSIONS.items():
        authors = [EVIL_AUTHOR] if name == "gamma" else None
        for seed, loss in enumerate(losses):
            run_dir = make_run(
                root, f"{name}-s{seed}", submission=name, seed=seed, val_loss=loss, official=official,
                started_at=T0 + timedelta(days=days, hours=seed), authors=authors,
            )
            publish(run_dir, key, results, allow_unofficial=not official)
    publish(make_run(root, "alpha-t4", submission="alpha", track="t4-5min", val_loss=3.3), key, results, False)

    tampered = make_run(root, "zeta-s0", submission="zeta", val_loss=1.0)
    unknown = make_run(root, "eta-s0", submission="eta", val_loss=1.0)
    for run_dir in (tampered, unknown):
        publish(run_dir, key, results, False)
    _tamper_payload(published(root, tampered), private, root)
    _sign_with_unknown_key(published(root, unknown), private, root)
    shutil.copy(published(root, root / "runs" / "alpha-s0"), results / "cpu-1min" / "alpha" / "copy-of-s0.json")
    return results, trusted


def leaderboard(monkeypatch, capsys, board, *args):
    results, trusted = board
    return run_cli(monkeypatch, capsys, "leaderboard", "--results", results, "--trusted-keys", trusted, *args)


def test_rows_are_ranked_with_statistics_and_records(board, monkeypatch, capsys):
    code, stdout, stderr = leaderboard(monkeypatch, capsys, board, "--track", "cpu-1min", "--format", "json")
    assert code == 0
    document = json.loads(stdout)
    rows = document["rows"]
    assert [row["submission"] for row in rows] == RANKED
    assert [row["rank"] for row in rows] == [1, 2, 3, 4, None]
    by_name = {row["submission"]: row for row in rows}
    for name, (_, losses, official) in SUBMISSIONS.items():
        row = by_name[name]
        assert row["runs"] == row["seeds"] == len(losses)
        assert row["val_loss_mean"] == pytest.approx(statistics.mean(losses))
        assert row["val_loss_std"] == pytest.approx(statistics.stdev(losses))
        assert row["best_val_loss"] == min(losses)
        assert row["official"] is official

    assert by_name["alpha"]["record_status"] == FORMER_RECORD
    assert by_name["alpha"]["record_p_value"] is None  # the first record is not tested against anyone
    assert by_name["beta"]["record_status"] == RECORD
    assert by_name["beta"]["record_baseline"] == "alpha"
    assert by_name["beta"]["record_p_value"] == pytest.approx(
        welch_one_sided_p(SUBMISSIONS["alpha"][1], SUBMISSIONS["beta"][1])
    )
    assert by_name["beta"]["record_p_value"] < 0.05
    assert by_name["gamma"]["record_status"] == NOT_SIGNIFICANT
    assert by_name["gamma"]["record_baseline"] == "beta" and by_name["gamma"]["record_p_value"] >= 0.05
    assert by_name["delta"]["record_status"] == TOO_FEW_SEEDS
    assert by_name["epsilon"]["record_status"] == NOT_ELIGIBLE

    # Tampered, unknown key and a copied envelope never count, and each is reported with why.
    assert "zeta" not in by_name and "eta" not in by_name
    reasons = {Path(item["path"]).name: item["reason"] for item in document["rejected"]}
    assert "does not match the payload" in reasons["zeta-s0.json"]
    assert "unknown key" in reasons["eta-s0.json"]
    assert "duplicate of run alpha-s0" in reasons["copy-of-s0.json"]
    assert "3 envelope(s) rejected" in stderr


def test_every_track_gets_its_own_ranking(board, monkeypatch, capsys):
    code, stdout, _ = leaderboard(monkeypatch, capsys, board, "--format", "json")
    rows = json.loads(stdout)["rows"]
    t4 = [row for row in rows if row["track"] == "t4-5min"]
    assert code == 0 and len(rows) == len(SUBMISSIONS) + 1
    assert [(row["submission"], row["rank"], row["runs"]) for row in t4] == [("alpha", 1, 1)]


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
    assert code == 0, stderr
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
        # one curve per run and one final-val_loss marker per run
        assert text.count("<polyline") == text.count('class="final"') == 14


def test_text_formats_go_to_stdout(board, monkeypatch, capsys):
    code, stdout, _ = leaderboard(monkeypatch, capsys, board, "--format", "markdown")
    assert code == 0 and stdout.startswith("# Leaderboard")
    code, stdout, _ = leaderboard(monkeypatch, capsys, board, "--track", "cpu-1min")
    assert code == 0 and "beta" in stdout and "★ record" in stdout


def test_parquet_needs_an_output_file(board, monkeypatch, capsys):
    code, _, stderr = leaderboard(monkeypatch, capsys, board, "--format", "parquet")
    assert code == 2 and "--out" in stderr


def test_an_empty_results_folder_gives_an_empty_board(tmp_path, monkeypatch, capsys):
    (tmp_path / "results").mkdir()
    (tmp_path / "keys").mkdir()
    code, stdout, _ = run_cli(
        monkeypatch, capsys, "leaderboard", "--results", tmp_path / "results", "--trusted-keys", tmp_path / "keys",
        "--format", "markdown",
    )
    assert code == 0 and "No verified results" in stdout


# --- what a competitor writes never becomes markup or a terminal escape ---------------------------

# Authors as a result signed before `evaluator check` refused control characters could hold them:
# Markdown specials, a leading #, a newline that would end the table row, terminal escape sequences
# (OSC title, clear screen, C1 CSI) and a bell.
HOSTILE_AUTHORS = [
    "# Mallory *bold* _it_ `code` [link](https://example.org/x) ~~gone~~ back\\slash",
    "Eve\n| forged | row |\n# Heading",
    "\x1b]0;owned\x07\x1b[2J\x9b31mred",
]
_RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")


@pytest.fixture(scope="module")
def hostile_board(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    private, public, _ = generate_key_pair(root / "private", "tester")
    trusted = root / "trusted"
    trusted.mkdir()
    shutil.copy(public, trusted / public.name)
    results = root / "results"
    publish(make_run(root, "mallory-s0", submission="mallory", authors=HOSTILE_AUTHORS), load_private_key(private), results, False)
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
    assert len(rendered.cells) == 11
    authors_cell = rendered.cells[[header for header, _ in COLUMNS].index("authors")]
    assert authors_cell == ", ".join(HOSTILE_AUTHORS).replace("\n", "\\x0a").replace("\x1b", "\\x1b").replace(
        "\x07", "\\x07").replace("\x9b", "\\x9b")


@pytest.mark.parametrize("fmt", ["table", "html", "json"])
def test_no_format_passes_a_control_character_from_a_result(hostile_board, monkeypatch, capsys, fmt):
    code, stdout, _ = leaderboard(monkeypatch, capsys, hostile_board, "--format", fmt)
    assert code == 0
    assert not _RAW_CONTROL.search(stdout), repr(stdout)
    if fmt == "json":  # the data itself is kept, escaped as JSON
        assert json.loads(stdout)["rows"][0]["authors"] == HOSTILE_AUTHORS
    elif fmt == "html":
        assert "\\x1b]0;owned\\x07\\x1b[2J\\x9b31mred" in stdout and "Eve\\x0a| forged" in stdout
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


def test_the_committed_example_results_verify_and_their_pages_are_fresh(capsys):
    """The developers' guide: at every commit the example results verify and the committed
    leaderboards equal a fresh render (`make results` re-runs and re-publishes them)."""
    from evaluator.cli import main
    from evaluator.paths import RESULTS_DIR

    assert main(["verify"]) == 0, capsys.readouterr().out
    capsys.readouterr()
    for fmt, committed in (("markdown", "LEADERBOARD.md"), ("html", "leaderboard.html")):
        assert main(["leaderboard", "--format", fmt]) == 0
        assert capsys.readouterr().out == (RESULTS_DIR / committed).read_text(), f"{committed} is stale: run make results"

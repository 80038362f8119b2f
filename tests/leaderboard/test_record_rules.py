"""Each track's record rule, from spec/record-rules.toml (evaluator/leaderboard/rules.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from leaderboard_support import DEFAULT_RULE, leaderboard

from evaluator.leaderboard.board import TOO_FEW_SEEDS
from evaluator.leaderboard.rules import load_record_rules
from evaluator.paths import RECORD_RULES_FILE


def _write_rules(path: Path, text: str) -> Path:
    path.write_text(
        "schema = 1\n[default]\nmin_seeds = 3\np_below = 0.01\nmin_improvement_nats = 0.005\n"
        "min_improvement_s = 1.0\ndrawn_seeds_only = false\n" + text
    )
    return path


def test_the_rules_file_sets_each_tracks_rule_and_the_page_states_it(board, monkeypatch, capsys, tmp_path):
    rules = _write_rules(tmp_path / "rules.toml", "[track.cpu-1min]\nmin_seeds = 4\np_below = 0.2\n")
    code, stdout, _ = leaderboard(monkeypatch, capsys, board, "--format", "json", "--rules", rules)
    document = json.loads(stdout)
    assert code == 1
    cpu_rule = document["record_rules"]["cpu-1min"]
    assert cpu_rule.pop("text").startswith("Track cpu-1min: a record needs runs on at least 4 distinct seeds")
    # `paired` is left out of the file: false, as before the option existed.
    assert cpu_rule == {
        "min_seeds": 4,
        "p_below": 0.2,
        "min_improvement_nats": 0.005,
        "min_improvement_s": 1.0,
        "drawn_seeds_only": False,
        "paired": False,
    }
    assert document["record_rules"]["t4-5min"]["min_seeds"] == 3  # [default] where a track has no section
    assert {row["record_status"] for row in document["rows"] if row["track"] == "cpu-1min" and row["official"]} == {
        TOO_FEW_SEEDS
    }
    code, stdout, _ = leaderboard(monkeypatch, capsys, board, "--format", "markdown", "--rules", rules)
    assert "Track cpu-1min: a record needs runs on at least 4 distinct seeds" in stdout
    assert "p &lt; 0.2 with a mean val\\_loss lower by at least 0.005 nats" in stdout


@pytest.mark.parametrize(
    "text, problem",
    [
        ("[track.cpu-1min]\np_below = 2\n", "track.cpu-1min.p_below"),
        ("[track.cpu-1min]\nmin_seeds = 1\n", "track.cpu-1min.min_seeds"),
        ("[track.cpu-1min]\nseeds = 3\n", "Additional properties"),
        ("[track.cpu-1min]\npaired = 1\n", "track.cpu-1min.paired"),
        ("[default\n", "cannot read the record rules"),
        ("[track.t4-5mn]\ndrawn_seeds_only = true\n", "[track.t4-5mn] names no track"),
    ],
)
def test_a_broken_rules_file_is_one_line_naming_the_field(board, monkeypatch, capsys, tmp_path, text, problem):
    rules = _write_rules(tmp_path / "rules.toml", text)
    code, stdout, stderr = leaderboard(monkeypatch, capsys, board, "--rules", rules)
    assert code == 2 and stdout == "" and problem in stderr and len(stderr.strip().splitlines()) == 1


def test_the_shipped_rules_are_valid_and_strict_on_the_t4_track():
    rules = load_record_rules(RECORD_RULES_FILE)
    assert rules.for_track("cpu-1min") == DEFAULT_RULE
    assert rules.for_track("t4-5min") == dataclasses.replace(DEFAULT_RULE, drawn_seeds_only=True)
    assert rules.default["paired"] is False  # stated in the file, where the organiser reads it

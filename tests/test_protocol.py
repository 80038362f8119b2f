"""The harness protocol's grammar (evaluator/protocol.py): what it accepts, and that whatever else a
jail sends is refused whole and counted, never a crash."""

from __future__ import annotations

import json

import pytest

from evaluator.protocol import LINE_MAX_BYTES, RUN_LOG_BYTES_MAX, Tally, parse_line


def _line(event: dict) -> bytes:
    return json.dumps(event).encode() + b"\n"


def test_every_event_of_the_protocol_is_accepted_as_it_is_written():
    tally = Tally()
    assert parse_line(_line({"event": "start", "phases": {"import_s": 1.5}}), tally) == {
        "event": "start",
        "phases": {"import_s": 1.5},
    }
    assert parse_line(_line({"event": "log", "step": 3, "metrics": {"loss": 2, "lr.head": 1e-3}}), tally) == {
        "event": "log",
        "step": 3,
        "metrics": {"loss": 2.0, "lr.head": 1e-3},
    }
    assert parse_line(_line({"event": "snapshot", "bytes": 10, "save_s": 0.25}), tally)["save_s"] == 0.25
    assert parse_line(_line({"event": "saved", "bytes": 10}), tally) == {"event": "saved", "bytes": 10}
    assert parse_line(_line({"event": "error", "kind": "crashed", "message": "Traceback ... naïve"}), tally)[
        "message"
    ].endswith("naïve")
    assert (tally.lines, tally.refused) == (5, 0)


HOSTILE = {
    "not utf-8": b"\xff\xfe\n",
    "not json": b"{nope\n",
    "not an object": b"[1, 2]\n",
    "no event": _line({"step": 1}),
    "unknown event": _line({"event": "shell"}),
    "deep": b"[" * 20_000 + b"]" * 20_000 + b"\n",
    "too long": b'{"event": "log", "x": "' + b"a" * LINE_MAX_BYTES + b'"}\n',
    "huge integer": b'{"event": "log", "step": ' + b"9" * 5000 + b', "metrics": {"loss": 1}}\n',
    "huge float": b'{"event": "log", "step": 1, "metrics": {"loss": 1e999}}\n',
    "nan": b'{"event": "log", "step": 1, "metrics": {"loss": NaN}}\n',
    "infinity": b'{"event": "log", "step": 1, "metrics": {"loss": -Infinity}}\n',
    "step beyond int64": _line({"event": "log", "step": 2**63, "metrics": {"loss": 1}}),
    "step a float": _line({"event": "log", "step": 1.5, "metrics": {"loss": 1}}),
    "step a bool": _line({"event": "log", "step": True, "metrics": {"loss": 1}}),
    "no metrics": _line({"event": "log", "step": 1, "metrics": {}}),
    "too many metrics": _line({"event": "log", "step": 1, "metrics": {f"m{i}": 1 for i in range(33)}}),
    "a long name": _line({"event": "log", "step": 1, "metrics": {"n" * 65: 1}}),
    "a name with spaces": _line({"event": "log", "step": 1, "metrics": {"my loss": 1}}),
    "a lone surrogate in a name": b'{"event": "log", "step": 1, "metrics": {"loss\\ud800": 1}}\n',
    "a lone surrogate in a message": b'{"event": "error", "kind": "crashed", "message": "\\udfff"}\n',
    "an unknown error kind": _line({"event": "error", "kind": "ok", "message": ""}),
    "a value that is text": _line({"event": "log", "step": 1, "metrics": {"loss": "1.0"}}),
    "negative seconds": _line({"event": "start", "phases": {"import_s": -1}}),
    "a negative size": _line({"event": "saved", "bytes": -1}),
    "a size that is text": _line({"event": "snapshot", "bytes": "1", "save_s": 0}),
}


@pytest.mark.parametrize("line", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_line_outside_the_grammar_is_refused_and_counted(line):
    tally = Tally()
    assert parse_line(line, tally) is None
    assert (tally.lines, tally.refused) == (1, 1)


def test_log_lines_past_the_runs_cap_are_refused_and_the_other_events_still_read():
    tally = Tally(log_bytes=RUN_LOG_BYTES_MAX - 10)
    assert parse_line(_line({"event": "log", "step": 1, "metrics": {"loss": 1.0}}), tally) is None
    assert parse_line(_line({"event": "saved", "bytes": 1}), tally) == {"event": "saved", "bytes": 1}
    assert tally.refused == 1

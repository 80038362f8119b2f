"""The harness protocol's grammar: what a line from the training jail may say, checked where it enters
the host.

The training jail runs the competitor's code, which can write anything to the harness's pipe. Each
line is one JSON object, at most LINE_MAX_BYTES, strict UTF-8 (no lone surrogates, not even as
`\\ud800` escapes), nested at most a few levels, and one of:

    {"event": "start", "phases": {NAME: SECONDS, ...}}
    {"event": "log", "step": INT64, "metrics": {NAME: FLOAT, ...}}      1 to METRICS_PER_LINE_MAX entries
    {"event": "snapshot", "bytes": INT, "save_s": SECONDS}
    {"event": "saved", "bytes": INT}
    {"event": "error", "kind": "crashed" | "over_budget", "message": TEXT}

NAME is a short identifier (METRIC_NAME), every number a finite float64 (SECONDS also at least 0),
INT64 an integer that fits in 64 bits. A line that breaks any of this is refused whole and counted,
never half-used; the result records the count. Past RUN_LOG_BYTES_MAX of log lines in one run,
further log lines are refused too, so the rows the host keeps stay bounded whatever the jail sends;
the other events are still read (the clock needs them).
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from typing import Any

LINE_MAX_BYTES = 64 * 1024
METRICS_PER_LINE_MAX = 32
METRIC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,63}")
# The log lines one run may send: a T4 run logging five metrics every step for 300 s sends a few MB.
RUN_LOG_BYTES_MAX = 64 * 2**20
ERROR_KINDS = ("crashed", "over_budget")
# JSON numbers are parsed only after a length test: int() of a million digits takes seconds.
_NUMBER_MAX_CHARS = 40


class Refused(ValueError):
    """A line outside the grammar."""


@dataclass
class Tally:
    """What one run's jail sent: lines read, lines refused, and the bytes of log lines kept."""

    lines: int = 0
    refused: int = 0
    log_bytes: int = 0


def parse_line(line: bytes, tally: Tally) -> dict[str, Any] | None:
    """The event a complete line says, checked against the grammar; None (and counted) if refused."""
    tally.lines += 1
    try:
        event = _event(line)
        if event["event"] == "log":
            if tally.log_bytes + len(line) > RUN_LOG_BYTES_MAX:
                raise Refused("the run's log lines are over their cap")
            tally.log_bytes += len(line)
        return event
    except Refused:
        tally.refused += 1
        return None


def _event(line: bytes) -> dict[str, Any]:
    if len(line) > LINE_MAX_BYTES:
        raise Refused("line too long")
    try:
        text = line.decode("utf-8")
        raw = json.loads(text, parse_constant=_refuse_constant, parse_int=_int, parse_float=_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise Refused("not a JSON line") from error
    if not isinstance(raw, dict) or not isinstance(raw.get("event"), str):
        raise Refused("not an event")
    kind = raw["event"]
    if kind == "start":
        return {"event": kind, "phases": _named_numbers(raw.get("phases", {}), non_negative=True)}
    if kind == "log":
        step, metrics = raw.get("step"), _named_numbers(raw.get("metrics"))
        if not _is_int64(step) or not metrics:
            raise Refused("a log line needs an int64 step and at least one metric")
        return {"event": kind, "step": step, "metrics": metrics}
    if kind == "snapshot":
        return {"event": kind, "bytes": _size(raw.get("bytes")), "save_s": _seconds(raw.get("save_s"))}
    if kind == "saved":
        return {"event": kind, "bytes": _size(raw.get("bytes"))}
    if kind == "error":
        message = raw.get("message")
        if raw.get("kind") not in ERROR_KINDS or not isinstance(message, str):
            raise Refused("an error line needs a kind and a message")
        return {"event": kind, "kind": raw["kind"], "message": _text(message)}
    raise Refused("an unknown event")


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a finite number")


def _int(text: str) -> int:
    if len(text) > _NUMBER_MAX_CHARS:
        raise ValueError("an integer too long")
    return int(text)


def _float(text: str) -> float:
    if len(text) > _NUMBER_MAX_CHARS:
        raise ValueError("a number too long")
    value = float(text)
    if not math.isfinite(value):  # 1e999
        raise ValueError("a number out of float64's range")
    return value


def _is_int64(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Refused("not a number")
    number = float(value)  # an int64-sized integer always fits; longer ones were refused
    if not math.isfinite(number):
        raise Refused("not a finite number")
    return number


def _seconds(value: Any) -> float:
    seconds = _number(value)
    if seconds < 0:
        raise Refused("negative seconds")
    return seconds


def _size(value: Any) -> int:
    if not _is_int64(value) or value < 0:
        raise Refused("not a size in bytes")
    return value


def _text(value: str) -> str:
    try:
        value.encode("utf-8")  # a "\ud800" escape decodes to a lone surrogate, which no UTF-8 holds
    except UnicodeEncodeError as error:
        raise Refused("not Unicode text") from error
    return value


def _named_numbers(value: Any, non_negative: bool = False) -> dict[str, float]:
    if not isinstance(value, dict) or len(value) > METRICS_PER_LINE_MAX:
        raise Refused("not a table of at most METRICS_PER_LINE_MAX numbers")
    numbers = {}
    for name, number in value.items():
        if not METRIC_NAME.fullmatch(name):
            raise Refused("a name that is not a short identifier")
        numbers[sys.intern(name)] = _seconds(number) if non_negative else _number(number)
    return numbers

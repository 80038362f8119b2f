"""`manifest.toml`: parsed with tomllib, validated against `spec/manifest.schema.json`.

Every problem is a `Finding` that names the file and, where the TOML text allows, the line and
column, and says what to do. tomllib keeps no positions, so `_KeyLocator` re-reads the text to map
a key path such as ("submission", "name") back to the line that sets it. Nothing a manifest holds
ends `evaluator check` in a traceback: whatever tomllib raises becomes a finding too.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import jsonschema.validators

from evaluator.errors import UserError
from evaluator.paths import SPEC_DIR
from evaluator.tomlreader import tomllib

MANIFEST_NAME = "manifest.toml"
MANIFEST_MAX_BYTES = 64 * 1024
DEFAULT_ENTRY_MODULE = "train.py"
DEFAULT_ENTRY_FUNCTION = "train"


@dataclass(frozen=True)
class Finding:
    """One problem with a submission: where it is and what to do about it."""

    file: str
    message: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "column": self.column, "message": self.message}


@dataclass(frozen=True)
class Manifest:
    name: str
    track: str
    authors: list[str]
    description: str
    licence: str | None
    entry_module: str
    entry_function: str
    config: dict[str, Any]
    track_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Where the text defines each key path: (line, column), for findings made after parsing.
    key_positions: dict[tuple[str, ...], tuple[int, int]] = field(default_factory=dict, compare=False, repr=False)

    def position_of(self, *path: str) -> tuple[int | None, int | None]:
        """(line, column) of the header or assignment that defines the key path, or (None, None)."""
        return _find_position(self.key_positions, path)

    def config_for(self, track_id: str) -> dict[str, Any]:
        """The `[config]` table with the track's overrides replacing top-level keys."""
        return {**self.config, **self.track_overrides.get(track_id, {})}

    @property
    def entry_module_name(self) -> str:
        """The importable dotted name of the entry module (`src/train.py` -> `src.train`)."""
        return self.entry_module[: -len(".py")].replace("/", ".")


@cache
def manifest_schema() -> dict:
    return json.loads((SPEC_DIR / "manifest.schema.json").read_text())


def config_max_depth() -> int:
    """How many arrays and tables may enclose a [config] value: the schema's deepest configValueN."""
    return max(
        int(name.removeprefix("configValue")) for name in manifest_schema()["$defs"] if name.startswith("configValue")
    )


def _one_line_pattern() -> str:
    return manifest_schema()["$defs"]["oneLineText"]["pattern"]


def _is_toml_integer(checker, instance: Any) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


# TOML tells integers from floats; JSON Schema's "integer" would also take a float such as 1e20, which
# the 64-bit range of [config] integers must not refuse.
_ManifestValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_toml_integer),
)


_BARE_KEY = r"[A-Za-z0-9_-]+"
_KEY_PART = rf'(?:{_BARE_KEY}|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_DOTTED_KEY = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_TABLE_RE = re.compile(rf"^\s*\[\[?\s*({_DOTTED_KEY})\s*\]\]?")
_ASSIGN_RE = re.compile(rf"^(\s*)({_DOTTED_KEY})\s*=")


def _split_key(dotted: str) -> tuple[str, ...]:
    parts = re.findall(_KEY_PART, dotted)
    return tuple(p[1:-1] if p[:1] in "\"'" else p for p in parts)


def _find_position(
    positions: dict[tuple[str, ...], tuple[int, int]], path: tuple[str, ...]
) -> tuple[int | None, int | None]:
    """Position of the path; else of the first line that defines something below it (the header
    `[tracks.x.config]` defines tracks.x); else of its nearest ancestor that the text defines."""
    if path in positions:
        return positions[path]
    below = [position for key, position in positions.items() if key[: len(path)] == path]
    if path and below:
        return min(below)
    while path:
        if path in positions:
            return positions[path]
        path = path[:-1]
    return None, None


class _KeyLocator:
    """Maps key paths to (line, column) of the header or assignment that defines them."""

    def __init__(self, text: str):
        self.positions: dict[tuple[str, ...], tuple[int, int]] = {}
        table: tuple[str, ...] = ()
        # Lines as TOML and tomllib count them: str.splitlines() would also break at \x1c, \x85 or
        # U+2028, which TOML allows inside strings and comments.
        for number, line in enumerate(text.split("\n"), start=1):
            if header := _TABLE_RE.match(line):
                table = _split_key(header.group(1))
                self.positions.setdefault(table, (number, line.index("[") + 1))
            elif assign := _ASSIGN_RE.match(line):
                path = table + _split_key(assign.group(2))
                self.positions.setdefault(path, (number, len(assign.group(1)) + 1))

    def find(self, path: tuple[str, ...]) -> tuple[int | None, int | None]:
        return _find_position(self.positions, path)


_SHOWN_MAX_CHARS = 80


def _shown(value: Any) -> str:
    """A value as a finding quotes it: JSON (control characters escaped), on one line, cut short."""
    try:
        text = json.dumps(value, default=str)
    except (ValueError, RecursionError):
        text = f"(a {type(value).__name__})"
    return text if len(text) <= _SHOWN_MAX_CHARS else text[: _SHOWN_MAX_CHARS - 1] + "…"


def _dotted(path: Any) -> str:
    """A key path as a finding names it: submission.authors[0], config."odd key"."""
    shown = ""
    for part in path:
        if isinstance(part, int):
            shown += f"[{part}]"
        else:
            shown += ("." if shown else "") + (part if re.fullmatch(_BARE_KEY, part) else _shown(part))
    return shown


_CONTROL_NAMES = {
    "\n": "a newline",
    "\r": "a carriage return",
    "\t": "a tab",
    "\x1b": "ESC, which starts terminal escape sequences",
}


def _control_character_message(dotted: str, value: str) -> str:
    index, char = next((i, c) for i, c in enumerate(value) if re.fullmatch(_one_line_pattern(), c) is None)
    if unicodedata.category(char) == "Cc":
        kind, name = "a control character", _CONTROL_NAMES.get(char, f"U+{ord(char):04X}")
    else:  # Cf, Zl, Zp: invisible, or they reorder or break the text around them on a page
        kind, name = "a format character", f"U+{ord(char):04X} {unicodedata.name(char, 'unnamed')}"
    return f"{dotted} holds {kind} at position {index + 1} ({name}): it must be one line of plain text; remove it"


def _in_config(path: tuple[Any, ...]) -> bool:
    """Whether the path is a value inside a [config] or [tracks.<id>.config] table."""
    return (len(path) > 1 and path[0] == "config") or (len(path) > 3 and path[0] == "tracks" and path[2] == "config")


def _config_message(error: jsonschema.ValidationError, dotted: str) -> str | None:
    value = error.instance
    if error.validator == "type" and isinstance(value, (list, dict)):
        return f"{dotted} nests arrays and tables more than {config_max_depth()} deep below [config]: flatten it"
    if error.validator == "type" and isinstance(value, (datetime.date, datetime.time)):
        kind = (
            "date-time"
            if isinstance(value, datetime.datetime)
            else "date"
            if isinstance(value, datetime.date)
            else "time"
        )
        return (
            f"{dotted} is a TOML {kind}, which the job file (JSON) that carries [config] to train() cannot hold: "
            f'write it as a string, e.g. "{value.isoformat()}"'
        )
    if error.validator in ("minimum", "maximum"):
        return f"{dotted} is outside the range of a TOML integer (64-bit signed): use a float or a string"
    return None


def _schema_message(error: jsonschema.ValidationError) -> tuple[tuple[str, ...], str]:
    """A key path and a sentence that says what is wrong and what to do."""
    path = tuple(str(p) for p in error.absolute_path if not isinstance(p, int))
    dotted = _dotted(error.absolute_path) or "the manifest"
    value = error.instance
    if _in_config(tuple(error.absolute_path)) and (message := _config_message(error, dotted)):
        return path, message
    match error.validator:
        case "pattern" if path == ("entry", "module") and (".." in value or value.startswith("/")):
            return (
                path,
                f'entry.module {_shown(value)} escapes the submission folder: give a path inside it, e.g. "train.py"',
            )
        case "pattern" if error.validator_value == _one_line_pattern():
            return path, _control_character_message(dotted, value)
        case "pattern":
            return path, f"{dotted} {_shown(value)} must match {error.validator_value}"
        case "required":
            missing = error.message.split("'")[1]
            where = f"[{dotted}]" if error.absolute_path else "the top level"
            return path, f"missing required key {missing!r} in {where}: add it"
        case "type":
            return path, f"{dotted} must be of type {error.validator_value}, not {type(value).__name__}"
        case "const":
            return path, f"{dotted} must be {json.dumps(error.validator_value)}, not {_shown(value)}"
        case "minItems":
            return path, f"{dotted} must list at least {error.validator_value} item(s)"
        case "maxLength":
            return path, f"{dotted} is {len(value)} characters long; the limit is {error.validator_value}"
        case "minLength":
            return path, f"{dotted} must not be empty"
    message = (
        error.message if len(error.message) <= 2 * _SHOWN_MAX_CHARS else error.message[: 2 * _SHOWN_MAX_CHARS - 1] + "…"
    )
    return path, f"{dotted}: {message}"


def _unknown_key_findings(error: jsonschema.ValidationError, locator: _KeyLocator, file: str) -> list[Finding]:
    known = set(error.schema.get("properties", {}))
    parent = tuple(str(p) for p in error.absolute_path)
    findings = []
    for key in sorted(set(error.instance) - known):
        line, column = locator.find(parent + (key,))
        where = f"[{'.'.join(parent)}]" if parent else "the top level"
        allowed = ", ".join(sorted(known))
        findings.append(
            Finding(file, f"unknown key {key!r} in {where} (a typo?); allowed keys: {allowed}", line, column)
        )
    return findings


def parse_manifest(folder: Path) -> tuple[Manifest | None, list[Finding]]:
    """Read and validate `folder/manifest.toml`; returns the manifest only when there are no findings."""
    path = folder / MANIFEST_NAME
    if path.is_symlink() or not path.is_file():
        return None, [
            Finding(
                MANIFEST_NAME, f"no {MANIFEST_NAME} in {folder}: every submission needs one (see submissions/template/)"
            )
        ]
    size = path.stat().st_size
    if size > MANIFEST_MAX_BYTES:
        return None, [
            Finding(
                MANIFEST_NAME,
                f"is {size} bytes; the limit is {MANIFEST_MAX_BYTES} (64 KiB): move data out of the manifest",
            )
        ]
    raw_bytes = path.read_bytes()
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_byte_line = raw_bytes[: exc.start].count(b"\n") + 1
        return None, [
            Finding(
                MANIFEST_NAME,
                f"is not valid UTF-8 (byte 0x{raw_bytes[exc.start]:02x}): save it as UTF-8",
                bad_byte_line,
            )
        ]
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return None, [_toml_syntax_finding(exc)]
    except Exception as exc:  # tomllib's own limits (RecursionError, ValueError for a huge integer) or a bug
        return None, [_toml_failure_finding(exc, text)]

    locator = _KeyLocator(text)
    findings: list[Finding] = []
    validator = _ManifestValidator(manifest_schema())
    for error in sorted(validator.iter_errors(raw), key=lambda e: [str(p) for p in e.absolute_path]):
        if error.validator == "additionalProperties":
            findings.extend(_unknown_key_findings(error, locator, MANIFEST_NAME))
            continue
        key_path, message = _schema_message(error)
        line, column = locator.find(key_path)
        findings.append(Finding(MANIFEST_NAME, message, line, column))
    if findings:
        return None, sorted(findings, key=lambda f: (f.line or 0, f.column or 0))

    submission = raw["submission"]
    entry = raw.get("entry", {})
    manifest = Manifest(
        name=submission["name"],
        track=submission["track"],
        authors=list(submission["authors"]),
        description=submission["description"],
        licence=submission.get("licence"),
        entry_module=entry.get("module", DEFAULT_ENTRY_MODULE),
        entry_function=entry.get("function", DEFAULT_ENTRY_FUNCTION),
        config=dict(raw.get("config", {})),
        track_overrides={track: dict(table["config"]) for track, table in raw.get("tracks", {}).items()},
        key_positions=locator.positions,
    )
    return manifest, []


def _toml_syntax_finding(exc: tomllib.TOMLDecodeError) -> Finding:
    # tomllib puts the position into the message as "(at line L, column C)"; newer versions also
    # expose it as attributes.
    message = str(exc)
    line = getattr(exc, "lineno", None)
    column = getattr(exc, "colno", None)
    if position := re.search(r"\(at line (\d+), column (\d+)\)", message):
        line, column = int(position.group(1)), int(position.group(2))
        message = message[: position.start()].strip()
    elif position := re.search(r"\(at end of document\)", message):
        message = message[: position.start()].strip()
    return Finding(
        MANIFEST_NAME,
        f"TOML syntax error: {message}: fix the syntax (see submissions/template/manifest.toml)",
        line,
        column,
    )


_TOMLLIB_DIR = os.path.dirname(tomllib.__file__) + os.sep


def _failure_position(exc: BaseException, text: str) -> tuple[int | None, int | None]:
    """Where tomllib was reading when it raised something other than TOMLDecodeError, which carries no
    position: its parser functions hold the offset they read at as `pos`, so the innermost of its
    frames in the traceback that has one says where. (None, None) if none does."""
    offset = None
    frame_link = exc.__traceback__
    while frame_link is not None:
        frame = frame_link.tb_frame
        if frame.f_code.co_filename.startswith(_TOMLLIB_DIR) and isinstance(frame.f_locals.get("pos"), int):
            offset = frame.f_locals["pos"]
        frame_link = frame_link.tb_next
    if offset is None:
        return None, None
    offset = min(offset, len(text))
    line_start = text.rfind("\n", 0, offset) + 1
    return text.count("\n", 0, offset) + 1, offset - line_start + 1


def _toml_failure_finding(exc: Exception, text: str) -> Finding:
    line, column = _failure_position(exc, text)
    if isinstance(exc, RecursionError):
        message = (
            "nests arrays or inline tables too deeply for the TOML parser: "
            f"a [config] value may nest at most {config_max_depth()} deep"
        )
    elif isinstance(exc, ValueError) and "integer string conversion" in str(exc):
        message = (
            f"holds an integer of more than {sys.get_int_max_str_digits()} digits, which the TOML parser refuses: "
            "TOML integers are 64-bit; use a float or a string"
        )
    else:
        lines = str(exc).strip().splitlines()
        detail = "".join(c if c.isprintable() else repr(c)[1:-1] for c in lines[0][:_SHOWN_MAX_CHARS]) if lines else ""
        message = (
            f"cannot be read by the TOML parser ({type(exc).__name__}{': ' + detail if detail else ''}): "
            "fix it (see submissions/template/manifest.toml)"
        )
    return Finding(MANIFEST_NAME, message, line, column)


# --- command-line overrides of [config] (evaluator run/check --set KEY=VALUE) ------------------

_OVERRIDE_KEY = re.compile(rf"^{_BARE_KEY}(?:\.{_BARE_KEY})*$")
_BARE_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def parse_override(text: str) -> dict[str, Any]:
    """`KEY=VALUE` as a nested dict: the value is TOML (512, 3e-4, true, [1, 2], "x"), or a bare word
    (relu) taken as a string; a dotted key (optimizer.lr=0.01) reaches into a table. UserError else."""
    key, equals, value = text.partition("=")
    key = key.strip()
    if not equals or not _OVERRIDE_KEY.match(key):
        raise UserError(f"--set {text!r}: expected KEY=VALUE with a bare or dotted key, e.g. --set d_model=512")
    try:
        parsed = tomllib.loads(f"value = {value.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        if not _BARE_WORD.match(value.strip()):
            raise UserError(
                f"--set {text!r}: {value.strip()!r} is not a TOML value; quote a string: "
                f"--set {key}='\"{value.strip()}\"'"
            ) from None
        parsed = value.strip()
    nested: dict[str, Any] = {}
    *tables, leaf = key.split(".")
    target = nested
    for table in tables:
        target = target.setdefault(table, {})
    target[leaf] = parsed
    return nested


def merge_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`config` with each override's leaves replacing (or adding to) the same keys, tables merged."""
    merged = dict(config)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_overrides(merged[key], value)
        else:
            merged[key] = value
    return merged


def override_findings(config: dict[str, Any]) -> list[Finding]:
    """What is wrong with a [config] after overrides, by the manifest schema's own rules for it."""
    schema = manifest_schema()
    validator = _ManifestValidator({"$defs": schema["$defs"], "$ref": "#/$defs/config"})
    findings = []
    for error in sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path]):
        dotted = ".".join(["config", *map(str, error.absolute_path)])
        findings.append(Finding(MANIFEST_NAME, f"with --set, {dotted}: {error.message}"))
    return findings

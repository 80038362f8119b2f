"""`manifest.toml`: parsed with tomllib, validated against `spec/manifest.schema.json`.

Every problem is a `Finding` that names the file and, where the TOML text allows, the line and
column, and says what to do. tomllib keeps no positions, so `_KeyLocator` re-reads the text to map
a key path such as ("submission", "name") back to the line that sets it.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from evaluator.paths import SPEC_DIR

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


_BARE_KEY = r"[A-Za-z0-9_-]+"
_KEY_PART = rf'(?:{_BARE_KEY}|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_DOTTED_KEY = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_TABLE_RE = re.compile(rf"^\s*\[\[?\s*({_DOTTED_KEY})\s*\]\]?")
_ASSIGN_RE = re.compile(rf"^(\s*)({_DOTTED_KEY})\s*=")


def _split_key(dotted: str) -> tuple[str, ...]:
    parts = re.findall(_KEY_PART, dotted)
    return tuple(p[1:-1] if p[:1] in "\"'" else p for p in parts)


class _KeyLocator:
    """Maps key paths to (line, column) of the header or assignment that defines them."""

    def __init__(self, text: str):
        self.positions: dict[tuple[str, ...], tuple[int, int]] = {}
        table: tuple[str, ...] = ()
        for number, line in enumerate(text.splitlines(), start=1):
            if header := _TABLE_RE.match(line):
                table = _split_key(header.group(1))
                self.positions.setdefault(table, (number, line.index("[") + 1))
            elif assign := _ASSIGN_RE.match(line):
                path = table + _split_key(assign.group(2))
                self.positions.setdefault(path, (number, len(assign.group(1)) + 1))

    def find(self, path: tuple[str, ...]) -> tuple[int | None, int | None]:
        """Position of the path, or of its nearest ancestor that the text defines."""
        while path:
            if path in self.positions:
                return self.positions[path]
            path = path[:-1]
        return None, None


def _schema_message(error: jsonschema.ValidationError) -> tuple[tuple[str, ...], str]:
    """A key path and a sentence that says what is wrong and what to do."""
    path = tuple(str(p) for p in error.absolute_path if not isinstance(p, int))
    dotted = ".".join(map(str, error.absolute_path)) or "the manifest"
    value = error.instance
    match error.validator:
        case "pattern" if path == ("entry", "module") and (".." in value or value.startswith("/")):
            return path, f"entry.module {json.dumps(value)} escapes the submission folder: give a path inside it, e.g. \"train.py\""
        case "pattern":
            return path, f"{dotted} {json.dumps(value)} must match {error.validator_value}"
        case "required":
            missing = error.message.split("'")[1]
            where = f"[{dotted}]" if error.absolute_path else "the top level"
            return path, f"missing required key {missing!r} in {where}: add it"
        case "type":
            return path, f"{dotted} must be of type {error.validator_value}, not {type(value).__name__}"
        case "const":
            return path, f"{dotted} must be {json.dumps(error.validator_value)}, not {json.dumps(value)}"
        case "minItems":
            return path, f"{dotted} must list at least {error.validator_value} item(s)"
        case "maxLength":
            return path, f"{dotted} is {len(value)} characters long; the limit is {error.validator_value}"
        case "minLength":
            return path, f"{dotted} must not be empty"
    return path, f"{dotted}: {error.message}"


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
        return None, [Finding(MANIFEST_NAME, f"no {MANIFEST_NAME} in {folder}: every submission needs one (see submissions/template/)")]
    size = path.stat().st_size
    if size > MANIFEST_MAX_BYTES:
        return None, [Finding(MANIFEST_NAME, f"is {size} bytes; the limit is {MANIFEST_MAX_BYTES} (64 KiB): move data out of the manifest")]
    raw_bytes = path.read_bytes()
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw_bytes[: exc.start].count(b"\n") + 1
        return None, [Finding(MANIFEST_NAME, f"is not valid UTF-8 (byte 0x{raw_bytes[exc.start]:02x}): save it as UTF-8", line)]
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return None, [_toml_syntax_finding(exc)]

    locator = _KeyLocator(text)
    findings: list[Finding] = []
    validator = jsonschema.Draft202012Validator(manifest_schema())
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
    return Finding(MANIFEST_NAME, f"TOML syntax error: {message}: fix the syntax (see submissions/template/manifest.toml)", line, column)

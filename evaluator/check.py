"""`evaluator check` and `evaluator new`: static checks of a submission folder, or of every
submission folder a git change touches (`check --changed BASE`, what a pull request is held to).

Nothing in the folder is run or imported here: Python files are only parsed with `ast` and
`tokenize`, other files only read as text.

Besides the contract (manifest, entry point, file types and sizes), `check` reports data carried in
the folder: a submission that brings the public validation split, or extra training text, in its
code buys a score it did not train for. It reports long or encoded-looking literals and comments
(base64, base85, hex, lists of numbers), large collections of constants, calls of decoders and
decompressors, non-ASCII text, oversized [config] values, and more text or information (the folder's
xz-compressed size) than honest training code needs; see "data carried in code" below.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from evaluator.errors import UserError
from evaluator.fsutil import stage_tree, submission_paths
from evaluator.manifest import (
    MANIFEST_NAME,
    Finding,
    Manifest,
    merge_overrides,
    override_findings,
    parse_manifest,
    parse_override,
)
from evaluator.paths import SUBMISSIONS_DIR, TEMPLATE_DIR, WORKSPACE, shown
from evaluator.tracks import TrackError, available_tracks, load_track_file, track_path

# Honest submissions are a few to tens of KB: the largest folder, reference/, is 27,595 bytes, its
# train.py 25,583. Room for several times that; no room for data (which the checks below bound too).
FOLDER_MAX_BYTES = 256 * 1024
FILE_MAX_BYTES = 128 * 1024
# Weights, arrays, pickles and archives: a submission may not bring pretrained weights or data.
FORBIDDEN_SUFFIXES = {
    ".pt",
    ".pth",
    ".bin",
    ".safetensors",
    ".ckpt",
    ".onnx",
    ".npy",
    ".npz",
    ".pkl",
    ".pickle",
    ".h5",
    ".hdf5",
    ".parquet",
    ".arrow",
    ".pyc",
    ".so",
    ".zip",
    ".tar",
    ".gz",
    ".tgz",
    ".bz2",
    ".xz",
    ".zst",
    ".7z",
    ".rar",
}
_BINARY_PROBE_BYTES = 8192
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")


@dataclass(frozen=True)
class CheckReport:
    folder: Path
    manifest: Manifest | None
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        return not self.findings

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "folder": str(self.folder),
            "submission": self.manifest.name if self.manifest else None,
            "track": self.manifest.track if self.manifest else None,
            "findings": [f.as_dict() for f in self.findings],
        }


def check_submission(folder: Path, overrides: dict | None = None, track_id: str | None = None) -> CheckReport:
    """Every static problem with the folder, all at once; with `overrides` (--set), also what they
    would make of the manifest's [config] on `track_id` (default: the manifest's track)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such submission folder")
    manifest, findings = parse_manifest(folder)
    findings += _check_tree(folder)
    findings += payload_findings(scan_folder(folder))
    if manifest is not None:
        findings += _check_name(folder, manifest)
        findings += _check_track(manifest)
        findings += _check_entry(folder, manifest)
        if overrides:
            findings += override_findings(merge_overrides(manifest.config_for(track_id or manifest.track), overrides))
    return CheckReport(folder=folder, manifest=manifest, findings=findings)


def _check_tree(folder: Path) -> list[Finding]:
    findings = []
    total = 0
    for path in submission_paths(folder):
        rel = _shown_path(path.relative_to(folder).as_posix())
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            findings.append(
                Finding(
                    rel, f"is a symlink (to {os.readlink(path)!r}): symlinks are not allowed; copy the file in instead"
                )
            )
        elif stat.S_ISDIR(info.st_mode):
            continue
        elif not stat.S_ISREG(info.st_mode):
            findings.append(Finding(rel, "is a device file, FIFO or socket: only regular files are allowed"))
        else:
            total += info.st_size
            findings += _check_file(path, rel, info.st_size)
    if total > FOLDER_MAX_BYTES:
        findings.append(
            Finding(
                ".",
                f"the folder holds {total} bytes; the limit is {FOLDER_MAX_BYTES} ({FOLDER_MAX_BYTES // 1024} KiB): "
                "remove generated or data files",
            )
        )
    return findings


def _shown_path(rel: str) -> str:
    """A file name as findings show it: a name with control characters (an escape sequence for the
    terminal that prints the findings) is shown escaped."""
    return rel if rel.isprintable() else ascii(rel)[1:-1]


def _check_file(path: Path, rel: str, size: int) -> list[Finding]:
    suffixes = {s.lower() for s in path.suffixes}
    if banned := suffixes & FORBIDDEN_SUFFIXES:
        return [
            Finding(
                rel,
                f"{'/'.join(sorted(banned))} files are not allowed: a submission may not bring weights, data or "
                "archives; train from ctx.train_tokens",
            )
        ]
    if size > FILE_MAX_BYTES:
        return [Finding(rel, f"is {size} bytes; the limit per file is {FILE_MAX_BYTES} ({FILE_MAX_BYTES // 1024} KiB)")]
    with open(path, "rb") as handle:
        head = handle.read(_BINARY_PROBE_BYTES)
    if b"\0" in head:
        return [Finding(rel, "is a binary file: only source and text files are allowed")]
    return []


# --- data carried in code ---------------------------------------------------------------------
#
# A folder that holds code can hold data: the public validation split (10,451 tokens) fits in a 19 KB
# .py file as one base85 string and scores 0.045 nats after no training; a quarter of it, 4.3 KB in
# seven 700-character strings, scores like the reference. No check proves that code carries no data,
# so these refuse the usual ways of carrying it and bound how much any other way can carry. Each limit
# is set from the honest submissions in the repository (reference/, submissions/template/,
# submissions/seed-moe/, tests/fixtures/submissions/nanogpt-style/), measured with
#   python -c 'import sys; from evaluator.check import scan_folder; print(scan_folder(sys.argv[1]).figures())' DIR
# and the figure in each comment is the largest of theirs.

# A string or bytes literal outside a docstring, in characters. Honest: 44 (nanogpt-style); the
# adversarial suite's attack_kit.py has one of 175.
LITERAL_MAX_CHARS = 512
# Comments, docstrings, string literals, the manifest and every other text file, in UTF-8 bytes, for the
# whole folder. Honest: 9,323 (reference). Raw text cannot be told from documentation: this bounds it.
TEXT_MAX_BYTES = 24 * 1024
# Characters of text that reads like encoded data rather than words (see _looks_encoded), for the whole
# folder. Honest: 189 (nanogpt-style: mostly the table and headings of its README.md, judged together).
# At base85's 6.4 bits a character this is ~800 bytes of data.
ENCODED_TEXT_MAX_CHARS = 1024
# Characters of number literals (digits, points, exponents, signs of exponents) in the whole folder.
# Honest: 279 (seed-moe). Token ids written out cost ~5 characters each: this is ~200 tokens.
NUMBER_TEXT_MAX_CHARS = 1024
# Constants listed in one list, tuple, set or dict display, or in one [config] array. Honest: 3
# (reference, seed-moe); the adversarial suite's escape.py has 12.
COLLECTION_MAX_ITEMS = 64
# Characters outside ASCII in the whole folder (comments, strings, names, whitespace alike): a large
# alphabet carries more bits a character than ASCII, and some characters are invisible. Honest: 0 in all
# four; the largest count in any one file of the evaluator's own code is 15.
NON_ASCII_MAX_CHARS = 256
# Values in [config] and its per-track overrides together, an array's items each counted (key names
# carry data too). Honest: 42 (reference).
CONFIG_MAX_VALUES = 256
# One [config] string, in characters. Honest: 40 (nanogpt-style's betas_note); most are a word.
CONFIG_STRING_MAX_CHARS = 256
# The folder's files compressed together with xz: what they can hold, however it is written. Honest:
# 8,564 bytes (reference). The public validation split's tokens compress to 12,876 bytes.
INFORMATION_MAX_BYTES = 16 * 1024
# Functions that decode, decompress or deserialise bytes: how data hidden in code is unpacked, and of
# no use to training code. Calling one, or importing one by name, is a finding; encoding (a compressed
# report of what a run saw, say) is not. Honest: none called.
DECODER_FUNCTIONS = frozenset(
    {
        "decompress",
        "decompressobj",
        "LZMADecompressor",
        "BZ2Decompressor",
        "b64decode",
        "standard_b64decode",
        "urlsafe_b64decode",
        "b32decode",
        "b32hexdecode",
        "b16decode",
        "b85decode",
        "a85decode",
        "decodebytes",
        "unhexlify",
        "a2b_base64",
        "a2b_hex",
        "a2b_uu",
        "a2b_qp",
        "fromhex",
    }
)
# Functions whose names are too common to refuse alone (json.loads, bytes.decode), refused from these modules.
DECODER_FUNCTIONS_OF = {
    "codecs": {"decode", "getdecoder", "iterdecode"},
    "pickle": {"load", "loads", "Unpickler"},
    "marshal": {"load", "loads"},
}

# _looks_encoded judges a piece of text on its own from this many characters (whitespace aside); the
# shorter pieces of a file are judged together, so that a payload split into small literals is judged whole.
_ENCODED_PIECE_MIN_CHARS = 16
# The share of neighbouring characters that change class (lower case, upper case, digit, other):
# base85 0.71, escaped bytes 0.71, base64 0.64, comma-separated token ids 0.48, hex 0.47; English prose
# ~0.11, and 99 % of the literals and comments of 16 characters or more in PyTorch's nn and optim
# packages and in this evaluator are below 0.43 (the rest are short regular expressions and formulas).
_ENCODED_CLASS_CHANGE_SHARE = 0.4
# Base32 and other one-case alphabets seldom change class but lack vowels: random letters are a fifth
# vowels, English ~38 % and code ~30 %. Judged from this many letters, where short names and URLs
# (few vowels) no longer dominate.
_VOWEL_SHARE_MIN = 0.25
_VOWEL_JUDGED_MIN_LETTERS = 48
_LITERAL_KINDS = ("string literal", "bytes literal")
# The start of a manifest line that is a table header or a bare (possibly dotted) key's assignment.
_TOML_KEY_OR_HEADER = re.compile(r"^\s*(?:\[\[?[^\]#]*\]\]?|[A-Za-z0-9_.-]+\s*=)")


@dataclass(frozen=True)
class _Text:
    """A piece of free text: a literal, docstring or comment of a Python file, or a line of another file."""

    file: str
    line: int
    column: int | None
    kind: str
    text: str

    @property
    def visible(self) -> str:
        return "".join(self.text.split())


@dataclass
class FolderScan:
    """What `scan_folder` measured in a folder, and the findings that name one place in it (a long
    literal, a large collection, a decoder, a long [config] value)."""

    texts: list[_Text] = field(default_factory=list)
    numbers: list[tuple[str, int, int]] = field(default_factory=list)  # (file, line, characters)
    non_ascii: list[tuple[str, int, str]] = field(default_factory=list)  # (file, line, character)
    config_values: int = 0
    config_position: tuple[int | None, int | None] = (None, None)  # of the [config] table
    information_bytes: int = 0
    findings: list[Finding] = field(default_factory=list)

    def encoded(self) -> list[_Text]:
        """The texts that read like encoded data: each long one judged alone, a file's short ones together."""
        found = []
        for file in dict.fromkeys(text.file for text in self.texts):
            texts = [text for text in self.texts if text.file == file]
            short = [text for text in texts if len(text.visible) < _ENCODED_PIECE_MIN_CHARS]
            found += [
                text for text in texts if len(text.visible) >= _ENCODED_PIECE_MIN_CHARS and _looks_encoded(text.visible)
            ]
            pooled = "".join(text.visible for text in short)
            # Not the manifest's: its short `key = value` lines are structure, and its values are bounded
            # by the [config] limits instead.
            if file != MANIFEST_NAME and len(pooled) >= _ENCODED_PIECE_MIN_CHARS and _looks_encoded(pooled):
                # Named: the pieces that look encoded on their own too, where some do (not the honest ones).
                found += [text for text in short if _looks_encoded(text.visible)] or short
        return sorted(found, key=lambda text: (text.file, text.line))

    def figures(self) -> dict[str, int]:
        """Each measured figure, named by the limit it is held to."""
        return {
            "LITERAL_MAX_CHARS": max((len(t.text) for t in self.texts if t.kind in _LITERAL_KINDS), default=0),
            "TEXT_MAX_BYTES": sum(_utf8_size(text.text) for text in self.texts),
            "ENCODED_TEXT_MAX_CHARS": sum(len(text.visible) for text in self.encoded()),
            "NUMBER_TEXT_MAX_CHARS": sum(chars for _, _, chars in self.numbers),
            "NON_ASCII_MAX_CHARS": len(self.non_ascii),
            "CONFIG_MAX_VALUES": self.config_values,
            "INFORMATION_MAX_BYTES": self.information_bytes,
        }


def _utf8_size(text: str) -> int:
    # surrogatepass: a str literal may hold a lone surrogate ("\ud800"), which strict UTF-8 refuses.
    return len(text.encode("utf-8", "surrogatepass"))


def _char_class(char: str) -> int:
    return 0 if char.islower() else 1 if char.isupper() else 2 if char.isdigit() else 3


def _looks_encoded(visible: str) -> bool:
    """Whether text without its whitespace reads like base64/base85/base32/hex or written-out numbers
    rather than words, names and code."""
    if len(visible) < 2:
        return False
    classes = [_char_class(char) for char in visible]
    changes = sum(a != b for a, b in zip(classes, classes[1:], strict=False))
    if changes >= _ENCODED_CLASS_CHANGE_SHARE * (len(visible) - 1):
        return True
    letters = [char for char in visible if char.isascii() and char.isalpha()]
    vowels = sum(char in "aeiouAEIOU" for char in letters)
    return len(letters) >= _VOWEL_JUDGED_MIN_LETTERS and vowels < _VOWEL_SHARE_MIN * len(letters)


def scan_folder(folder: Path | str) -> FolderScan:
    """Measure the free text, numbers, non-ASCII characters and information in the folder's files that
    `_check_tree` accepts (the others are refused already), and the manifest's [config] if it is valid."""
    folder = Path(folder)
    manifest, _ = parse_manifest(folder)
    scan = FolderScan()
    contents = []
    for path in submission_paths(folder):
        info = path.lstat()
        rel = _shown_path(path.relative_to(folder).as_posix())
        if not stat.S_ISREG(info.st_mode) or _check_file(path, rel, info.st_size):
            continue
        data = path.read_bytes()
        contents.append(data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            # The manifest's parser and the entry module's check report it already.
            if rel != MANIFEST_NAME and (manifest is None or rel != manifest.entry_module):
                scan.findings.append(
                    Finding(
                        rel,
                        f"holds bytes that are not UTF-8 text (at byte {error.start}): only source and text files "
                        "are allowed",
                    )
                )
            continue
        scan.non_ascii += [
            (rel, number, char)
            for number, line in enumerate(text.split("\n"), 1)
            for char in line
            if not char.isascii()
        ]
        if rel.endswith(".py"):
            _scan_python(rel, text, scan)
        else:
            _scan_lines(rel, text, scan)
    scan.information_bytes = len(lzma.compress(b"".join(contents)))
    if manifest is not None:
        _scan_config(manifest, scan)
    return scan


def _scan_lines(rel: str, text: str, scan: FolderScan) -> None:
    if rel == MANIFEST_NAME:
        # What a manifest line says beyond its key or table header: a value, a comment. Keys and values
        # are held to the [config] limits as well.
        lines = [_TOML_KEY_OR_HEADER.sub("", line, count=1) for line in text.split("\n")]
    else:
        lines = text.split("\n")
    scan.texts += [_Text(rel, number, None, "line", line) for number, line in enumerate(lines, 1) if line.strip()]


def _scan_python(rel: str, source: str, scan: FolderScan) -> None:
    try:
        tree = ast.parse(source, filename=rel)
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (SyntaxError, ValueError, MemoryError, RecursionError, tokenize.TokenError):
        # It cannot be imported, so all it can be is text to read: judged line by line, as other files are.
        _scan_lines(rel, source, scan)
        return
    for token in tokens:
        if token.type == tokenize.COMMENT:
            scan.texts.append(_Text(rel, token.start[0], token.start[1] + 1, "comment", token.string[1:]))
        elif token.type == tokenize.NUMBER:
            scan.numbers.append((rel, token.start[0], len(token.string)))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
        and isinstance(node.body[0].value.value, str)
    }
    for node in ast.walk(tree):
        problem = None
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
            kind = "docstring" if id(node) in docstrings else _LITERAL_KINDS[isinstance(node.value, bytes)]
            text = node.value if isinstance(node.value, str) else node.value.decode("latin-1")
            scan.texts.append(_Text(rel, node.lineno, node.col_offset + 1, kind, text))
            if kind != "docstring" and len(text) > LITERAL_MAX_CHARS:
                problem = (
                    f"a {kind} of {len(text):,} characters; the limit outside docstrings is {LITERAL_MAX_CHARS}: "
                    "a submission may not carry data in its code"
                )
        elif isinstance(node, (ast.List, ast.Tuple, ast.Set, ast.Dict)):
            constants = sum(_is_constant(item) for item in (node.values if isinstance(node, ast.Dict) else node.elts))
            if constants > COLLECTION_MAX_ITEMS:
                problem = (
                    f"lists {constants:,} constants in one {type(node).__name__.lower()}; "
                    f"the limit is {COLLECTION_MAX_ITEMS}: "
                    "a submission may not carry data (token ids, weights) in its code"
                )
        elif decoder := _decoder_named(node):
            problem = (
                f"uses {decoder}(), which decodes, decompresses or deserialises: training code has no use for it, "
                "and it is how data hidden in code is unpacked; remove it"
            )
        if problem:
            # only literals, collections, calls and imports get a problem, and all of them have a position
            assert isinstance(node, (ast.expr, ast.stmt))
            scan.findings.append(Finding(rel, problem, node.lineno, node.col_offset + 1))


def _is_constant(node: ast.expr) -> bool:
    """A literal, or a signed one (-1 is a unary minus applied to 1 in the syntax tree)."""
    return isinstance(node, ast.Constant) or (isinstance(node, ast.UnaryOp) and isinstance(node.operand, ast.Constant))


def _decoder_named(node: ast.AST) -> str | None:
    """The decoder that a call (`zlib.decompress(...)`, `b85decode(...)`) or a `from m import f` names."""
    if isinstance(node, ast.ImportFrom) and node.module:
        module = node.module.split(".")[0]
        names = [alias.name for alias in node.names]
        return next(
            (name for name in names if name in DECODER_FUNCTIONS or name in DECODER_FUNCTIONS_OF.get(module, ())), None
        )
    if not isinstance(node, ast.Call):
        return None
    function = node.func
    if isinstance(function, ast.Name) and function.id in DECODER_FUNCTIONS:
        return function.id
    if isinstance(function, ast.Attribute):
        owner_decoders = DECODER_FUNCTIONS_OF.get(function.value.id, ()) if isinstance(function.value, ast.Name) else ()
        if function.attr in DECODER_FUNCTIONS or function.attr in owner_decoders:
            return function.attr
    return None


def _scan_config(manifest: Manifest, scan: FolderScan) -> None:
    scan.config_position = manifest.position_of("config")
    tables = [(("config",), manifest.config)] + [
        (("tracks", track, "config"), table) for track, table in manifest.track_overrides.items()
    ]
    for prefix, table in tables:
        for key, value in table.items():
            line, column = manifest.position_of(*prefix, key)
            scan.config_values += _count_values(value)
            for problem in _config_value_problems(value):
                scan.findings.append(
                    Finding(
                        MANIFEST_NAME,
                        f"a [config] value here {problem}: a submission may not carry data in its manifest",
                        line,
                        column,
                    )
                )


def _count_values(value) -> int:
    """A value counts one, an array its items, a table each key and its value: keys carry data too."""
    if isinstance(value, dict):
        return sum(1 + _count_values(item) for item in value.values())
    if isinstance(value, list):
        return sum(_count_values(item) for item in value)
    return 1


def _config_value_problems(value) -> Iterator[str]:
    if isinstance(value, str) and len(value) > CONFIG_STRING_MAX_CHARS:
        yield f"is a string of {len(value):,} characters; the limit is {CONFIG_STRING_MAX_CHARS}"
    elif isinstance(value, list) and len(value) > COLLECTION_MAX_ITEMS:
        yield f"is an array of {len(value):,} items; the limit is {COLLECTION_MAX_ITEMS}"
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for item in items:
        yield from _config_value_problems(item)


def payload_findings(scan: FolderScan) -> list[Finding]:
    """The scan's own findings, then one for each folder-wide limit the scan exceeds, at the file (and
    line) that contributes most."""
    findings = list(scan.findings)
    figures = scan.figures()
    text_bytes = figures["TEXT_MAX_BYTES"]
    if text_bytes > TEXT_MAX_BYTES:
        running = 0
        for crossing in sorted(scan.texts, key=lambda text: (text.file, text.line)):
            running += _utf8_size(crossing.text)
            if running > TEXT_MAX_BYTES:
                break
        findings.append(
            Finding(
                crossing.file,
                f"the folder holds {text_bytes:,} bytes of comments, docstrings, string literals and other text, "
                f"and passes the limit of {TEXT_MAX_BYTES:,} here: "
                "a submission may not carry text to train or score on",
                crossing.line,
                crossing.column,
            )
        )
    if figures["ENCODED_TEXT_MAX_CHARS"] > ENCODED_TEXT_MAX_CHARS:
        encoded = scan.encoded()
        for file in dict.fromkeys(text.file for text in encoded):
            pieces = [text for text in encoded if text.file == file]
            kinds = ", ".join(sorted({text.kind for text in pieces}))
            findings.append(
                Finding(
                    file,
                    f"{len(pieces):,} piece(s) of text ({kinds}; {sum(len(t.visible) for t in pieces):,} "
                    f"characters, lines {pieces[0].line}-{pieces[-1].line}) read like encoded data "
                    "(base64, base85, hex, written-out numbers), not words; "
                    f"the limit is {ENCODED_TEXT_MAX_CHARS:,} characters in the folder: "
                    "a submission may not carry data",
                    pieces[0].line,
                    pieces[0].column,
                )
            )
    if figures["NUMBER_TEXT_MAX_CHARS"] > NUMBER_TEXT_MAX_CHARS:
        per_line: dict[tuple[str, int], int] = {}
        for file, line, chars in scan.numbers:
            per_line[file, line] = per_line.get((file, line), 0) + chars
        file = max(
            dict.fromkeys(f for f, _ in per_line), key=lambda f: sum(c for (g, _), c in per_line.items() if g == f)
        )
        line = max((entry for entry in per_line.items() if entry[0][0] == file), key=lambda entry: entry[1])[0][1]
        findings.append(
            Finding(
                file,
                f"the folder's number literals take {figures['NUMBER_TEXT_MAX_CHARS']:,} characters, most of them "
                "in this file (the most on this line); "
                f"the limit is {NUMBER_TEXT_MAX_CHARS:,}: a submission may not carry data (token ids, weights) in "
                "its code",
                line,
            )
        )
    if figures["NON_ASCII_MAX_CHARS"] > NON_ASCII_MAX_CHARS:
        file = max(
            dict.fromkeys(f for f, _, _ in scan.non_ascii), key=lambda f: sum(g == f for g, _, _ in scan.non_ascii)
        )
        _, line, char = next(entry for entry in scan.non_ascii if entry[0] == file)
        findings.append(
            Finding(
                file,
                f"the folder holds {figures['NON_ASCII_MAX_CHARS']:,} characters outside ASCII, most of them in "
                f"this file (the first: U+{ord(char):04X}); the limit is {NON_ASCII_MAX_CHARS}: "
                "large alphabets and invisible "
                "characters can carry data; write comments and names in ASCII",
                line,
            )
        )
    if figures["CONFIG_MAX_VALUES"] > CONFIG_MAX_VALUES:
        findings.append(
            Finding(
                MANIFEST_NAME,
                f"[config] and its overrides hold {figures['CONFIG_MAX_VALUES']:,} keys and values; the limit is "
                f"{CONFIG_MAX_VALUES}: a submission may not carry data in its manifest",
                *scan.config_position,
            )
        )
    if figures["INFORMATION_MAX_BYTES"] > INFORMATION_MAX_BYTES:
        findings.append(
            Finding(
                ".",
                f"the folder's files compress (xz) to {figures['INFORMATION_MAX_BYTES']:,} bytes; "
                f"the limit is {INFORMATION_MAX_BYTES:,} "
                "(the reference compresses to ~8,600): a submission may not carry data; remove it, or generated code",
            )
        )
    return findings


def _check_name(folder: Path, manifest: Manifest) -> list[Finding]:
    """A submission's name is its folder's name: results are filed, pooled and shown by name, so a
    folder that took another's name would pool its runs into that submission's row."""
    folder_name = folder.resolve().name
    if manifest.name == folder_name:
        return []
    return [
        Finding(
            MANIFEST_NAME,
            f"submission.name {json.dumps(manifest.name)} must be the folder's name "
            f'"{_shown_path(folder_name)}": rename the folder or the submission',
        )
    ]


def _check_track(manifest: Manifest) -> list[Finding]:
    findings = []
    for track_id in [manifest.track, *manifest.track_overrides]:
        key_path = ("submission", "track") if track_id == manifest.track else ("tracks", track_id)
        line, column = manifest.position_of(*key_path)
        path = track_path(track_id)
        if not path.is_file():
            key = ".".join(key_path)
            findings.append(
                Finding(
                    MANIFEST_NAME,
                    f"{key}: unknown track {track_id!r}; available tracks: {', '.join(available_tracks())}",
                    line,
                    column,
                )
            )
            continue
        try:
            load_track_file(path)
        except TrackError as exc:
            findings.append(Finding(MANIFEST_NAME, f"track {track_id!r} cannot be used: {exc}", line, column))
    return findings


def _check_entry(folder: Path, manifest: Manifest) -> list[Finding]:
    rel = manifest.entry_module
    path = folder / rel
    if path.is_symlink() or not path.is_file():
        return [
            Finding(
                MANIFEST_NAME,
                f"entry.module {rel!r} does not exist in the submission folder: create it or fix [entry] module",
            )
        ]
    try:
        source = path.read_bytes().decode("utf-8")
        tree = ast.parse(source, filename=rel)
    except UnicodeDecodeError:
        return [Finding(rel, "is not valid UTF-8: save it as UTF-8")]
    except SyntaxError as exc:
        return [Finding(rel, f"syntax error: {exc.msg}", exc.lineno, exc.offset)]
    except (MemoryError, RecursionError):
        # Python's parser gives up on some deeply nested expressions (e.g. thousands of unary minuses).
        return [Finding(rel, "nests expressions too deeply for Python's parser: simplify it")]
    except ValueError as exc:  # what some Python versions raise for a null byte
        return [Finding(rel, f"cannot be parsed: {exc}")]
    functions = [
        node
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == manifest.entry_function
    ]
    if not functions:
        return [
            Finding(
                rel,
                f"defines no top-level function {manifest.entry_function!r}: "
                f"add `def {manifest.entry_function}(ctx):` or fix [entry] function",
            )
        ]
    function = functions[-1]
    if isinstance(function, ast.AsyncFunctionDef):
        return [
            Finding(
                rel,
                f"{manifest.entry_function} is async; it must be a plain function",
                function.lineno,
                function.col_offset + 1,
            )
        ]
    args = function.args
    positional = args.posonlyargs + args.args
    required = len(positional) - len(args.defaults)
    required_keywords = [a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is None]
    if required != 1 or required_keywords:
        return [
            Finding(
                rel,
                f"{manifest.entry_function}() must take exactly one positional parameter (the Context), "
                f"like `def {manifest.entry_function}(ctx):`; it requires {required} positional"
                + (f" and keyword-only {', '.join(required_keywords)}" if required_keywords else ""),
                function.lineno,
                function.col_offset + 1,
            )
        ]
    return []


def _run_check(args: argparse.Namespace) -> int:
    if args.changed is not None:
        if args.set:
            raise UserError("--set checks overrides of one folder's [config]: give DIR, not --changed")
        return _run_check_changed(args)
    overrides: dict = {}
    for item in args.set:
        overrides = merge_overrides(overrides, parse_override(item))
    report = check_submission(Path(args.folder), overrides)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0 if report.ok else 2
    folder = shown(report.folder.resolve())
    if report.ok:
        assert report.manifest is not None  # parse_manifest gives findings whenever it gives no manifest
        print(f"{folder}: ok ({report.manifest.name}, track {report.manifest.track})")
        return 0
    for finding in report.findings:
        print(f"{folder}/{finding}", file=sys.stderr)
    print(f"{folder}: {len(report.findings)} problem(s); the submission is invalid", file=sys.stderr)
    return 2


# The top-level folder of a repository that holds the submissions, as git names paths.
SUBMISSIONS_FOLDER = "submissions"


@dataclass(frozen=True)
class ChangeReport:
    """What `check --changed` found: the touched submission folders that HEAD still has (checked),
    those it no longer has (deleted), and every changed path outside a submission folder.
    Paths are relative to the repository's top, as git gives them."""

    base: str
    head: str
    submissions: list[CheckReport]
    deleted: list[str]
    outside: list[str]
    edited: list[str]  # folders the base already has: a new version of a submission is a new folder
    merge_bases: list[str]  # more than one: a criss-cross history, whose merge no single base describes
    taken: list[str]  # new folders under a name another folder has published results under

    @property
    def folder_count(self) -> int:
        return len(self.submissions) + len(self.deleted)

    @property
    def ok(self) -> bool:
        return (
            self.folder_count == 1
            and not self.deleted
            and not self.outside
            and not self.edited
            and not self.taken
            and len(self.merge_bases) == 1
            and all(r.ok for r in self.submissions)
        )

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "base": self.base,
            "head": self.head,
            "submissions": [report.as_dict() for report in self.submissions],
            "deleted": self.deleted,
            "outside": self.outside,
            "edited": self.edited,
            "taken": self.taken,
            "merge_bases": self.merge_bases,
        }


def check_changed(base: str, cwd: Path, allow_edit: frozenset[str] = frozenset()) -> ChangeReport:
    """Check what HEAD changes since its merge base with `base`, in the git repository holding `cwd`.
    A folder the merge base already has may be changed only if `allow_edit` names it (the organiser's
    word): published results name a folder's tree, and a competitor may not rewrite another's."""
    if base.startswith("-"):
        raise UserError(f"--changed {_shown_path(base)}: BASE must name a commit, not look like an option")
    top = Path(
        _git(
            cwd,
            ["rev-parse", "--show-toplevel"],
            f"{_shown_path(str(cwd))} is not in a git repository: --changed compares two of its commits",
        )
        .decode()
        .rstrip("\n")
    )
    base_commit = _commit(top, base)
    head_commit = _commit(top, "HEAD")
    diff = _git(
        top,
        ["diff", "--name-status", "-z", "--no-renames", f"{base_commit}...{head_commit}", "--"],
        f"cannot compare {_shown_path(base)} with HEAD",
    )
    # -z output: a status field, then the path, each NUL-terminated; with --no-renames a rename
    # is a deletion plus an addition, so both of its paths are seen.
    fields = diff.split(b"\0")[:-1]
    changed_paths = sorted({os.fsdecode(path) for path in fields[1::2]})

    touched_folders: set[str] = set()
    outside = []
    for path in changed_paths:
        parts = path.split("/")
        if len(parts) >= 3 and parts[0] == SUBMISSIONS_FOLDER:
            touched_folders.add(parts[1])
        else:
            outside.append(path)
    folders_in_head = _folders_in_head(top, head_commit)
    present = sorted(touched_folders & folders_in_head)
    deleted = [f"{SUBMISSIONS_FOLDER}/{name}" for name in sorted(touched_folders - folders_in_head)]
    # Two merge bases (a branch that merged the base and kept an old file) let the diff against one
    # of them hide what merging would revert: judged only where there is exactly one.
    merge_bases = (
        _git(top, ["merge-base", "--all", base_commit, head_commit], f"{_shown_path(base)} and HEAD share no history")
        .decode()
        .split()
    )
    in_base = _folders_in_head(top, merge_bases[0]) if len(merge_bases) == 1 else set()
    edited = [f"{SUBMISSIONS_FOLDER}/{name}" for name in present if name in in_base and name not in allow_edit]
    # A new folder under a name that has published results (another folder's: the reference lives at
    # the top, for one) would have its runs filed and pooled under that name.
    published = _published_names(top, merge_bases[0]) if len(merge_bases) == 1 else set()
    taken = [f"{SUBMISSIONS_FOLDER}/{name}" for name in present if name in published and name not in in_base]
    return ChangeReport(
        base=base,
        head=head_commit,
        submissions=_check_as_committed(top, head_commit, present),
        deleted=deleted,
        outside=outside,
        edited=edited,
        merge_bases=merge_bases,
        taken=taken,
    )


def _published_names(top: Path, commit: str) -> set[str]:
    """The submission names that have published results in `commit` (results/<track>/<name>/)."""
    listing = _git(
        top, ["ls-tree", "-r", "-z", "--name-only", commit, "--", "results/"], "cannot list the published results"
    )
    names = set()
    for path in listing.split(b"\0")[:-1]:
        parts = os.fsdecode(path).split("/")
        if len(parts) == 4 and parts[1] != "runs" and parts[3].endswith(".json"):
            names.add(parts[2])
    return names


def _git(where: Path, args: list[str], failure: str, env: dict[str, str] | None = None) -> bytes:
    """git's stdout, run in `where`; a failure is a UserError: our sentence, then git's own first line, escaped."""
    # Literal pathspecs: a folder named `*` or `:(glob)x` names only itself.
    command = ["git", "-C", str(where), "--literal-pathspecs", *args]
    try:
        done = subprocess.run(command, capture_output=True, env={**os.environ, **(env or {})})
    except FileNotFoundError:
        raise UserError("git is not installed here: --changed needs it") from None
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise UserError(f"{failure}" + (f" (git: {_shown_path(lines[0])})" if lines else ""))
    return done.stdout


def _commit(top: Path, revision: str) -> str:
    return (
        _git(
            top,
            ["rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"],
            f"{_shown_path(revision)}: no such commit in {_shown_path(str(top))}",
        )
        .decode()
        .strip()
    )


def _folders_in_head(top: Path, commit: str) -> set[str]:
    """The submission folders `commit` holds."""
    listing = _git(top, ["ls-tree", "-z", commit, "--", f"{SUBMISSIONS_FOLDER}/"], "cannot list the submission folders")
    folders = set()
    for entry in listing.split(b"\0")[:-1]:
        info, _, path = entry.partition(b"\t")
        if info.split(b" ")[1] == b"tree":
            folders.add(os.fsdecode(path).rsplit("/", 1)[-1])
    return folders


def _check_as_committed(top: Path, head_commit: str, names: list[str]) -> list[CheckReport]:
    """check_submission on each folder exactly as HEAD holds it: checked out into a temporary tree
    through a temporary index, so neither uncommitted edits nor untracked files count, and the
    repository's own index and working tree are left alone."""
    if not names:
        return []
    with tempfile.TemporaryDirectory(prefix="evaluator-check-") as temporary:
        tree = Path(temporary, "tree")
        tree.mkdir()
        folders = [f"{SUBMISSIONS_FOLDER}/{name}" for name in names]
        _git(
            top,
            # No hooks: a path checkout would run post-checkout, which has no business here.
            ["-c", "core.hooksPath=/dev/null", f"--work-tree={tree}", "checkout", head_commit, "--", *folders],
            "cannot check out HEAD's submission folders",
            env={"GIT_INDEX_FILE": str(Path(temporary, "index"))},
        )
        # Relative paths inside the temporary tree, so that findings name `submissions/NAME`.
        with _working_directory(tree):
            return [check_submission(Path(folder)) for folder in folders]


@contextlib.contextmanager
def _working_directory(folder: Path) -> Iterator[None]:
    """contextlib.chdir, which Python 3.10 does not have."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def _run_check_changed(args: argparse.Namespace) -> int:
    change = check_changed(args.changed, Path.cwd(), frozenset(args.allow_edit))
    if args.json:
        print(json.dumps(change.as_dict(), indent=2))
        return 0 if change.ok else 2
    span = f"{_shown_path(change.base)}...HEAD"
    problems = 0
    for report in change.submissions:
        where = _shown_path(str(report.folder))
        if report.ok:
            assert report.manifest is not None  # parse_manifest gives findings whenever it gives no manifest
            print(f"{where}: ok ({report.manifest.name}, track {report.manifest.track})")
            continue
        for finding in report.findings:
            print(f"{where}/{_shown_path(str(finding))}", file=sys.stderr)
        print(f"{where}: {len(report.findings)} problem(s); the submission is invalid", file=sys.stderr)
        problems += len(report.findings)
    for folder in change.deleted:
        print(f"{_shown_path(folder)}: deleted by {span}: a pull request may not remove a submission", file=sys.stderr)
        problems += 1
    for path in change.outside:
        print(
            f"{_shown_path(path)}: changed outside {SUBMISSIONS_FOLDER}/<name>/: a submission's pull request "
            "changes nothing else",
            file=sys.stderr,
        )
        problems += 1
    for folder in change.edited:
        print(
            f"{_shown_path(folder)}: already in {_shown_path(change.base)}: a pull request adds a new folder "
            "(a new version of a submission is a new folder, and no one edits another's); "
            "only the organiser may allow it (--allow-edit)",
            file=sys.stderr,
        )
        problems += 1
    for folder in change.taken:
        name = folder.rsplit("/", 1)[-1]
        print(
            f"{_shown_path(folder)}: the name {_shown_path(name)} has published results of another folder "
            "(results/<track>/<name>/): a name belongs to the folder that first published under it",
            file=sys.stderr,
        )
        problems += 1
    if len(change.merge_bases) > 1:
        print(
            f"{span}: {len(change.merge_bases)} merge bases (a criss-cross history): what merging would change is not "
            f"what HEAD changes since any one of them; rebase the branch onto {_shown_path(change.base)}",
            file=sys.stderr,
        )
        problems += 1
    if change.folder_count == 0:
        print(
            f"{span} changes nothing under {SUBMISSIONS_FOLDER}/<name>/: a submission's pull request adds its "
            "folder there",
            file=sys.stderr,
        )
        problems += 1
    elif change.folder_count > 1:
        names = ", ".join(
            _shown_path(folder) for folder in sorted([str(r.folder) for r in change.submissions] + change.deleted)
        )
        print(
            f"{span} changes {change.folder_count} submission folders ({names}): one submission per pull request",
            file=sys.stderr,
        )
        problems += 1
    if change.ok:
        print(f"{span}: ok, one submission and nothing else")
        return 0
    print(f"{span}: {problems} problem(s); the change is refused", file=sys.stderr)
    return 2


def _run_new(args: argparse.Namespace) -> int:
    if not NAME_PATTERN.match(args.name):
        raise UserError(f"name {args.name!r} must match {NAME_PATTERN.pattern} (lower-case letters, digits, dashes)")
    source = Path(args.source) if args.source else TEMPLATE_DIR
    if not (source / MANIFEST_NAME).is_file():
        raise UserError(f"{source}: not a submission folder (no {MANIFEST_NAME})")
    target = Path(args.dir) / args.name if args.dir else new_submission_parent() / args.name
    if target.exists() or target.is_symlink():
        raise UserError(f"{shown(target)} already exists; pick another name or remove it first")
    text = (source / MANIFEST_NAME).read_text(encoding="utf-8")
    text, count = re.subn(r'(?m)^(\s*name\s*=\s*)"[^"]*"', rf'\g<1>"{args.name}"', text, count=1)
    if count != 1:
        raise UserError(f'{source / MANIFEST_NAME}: has no `name = "..."` line to fill in')
    try:
        target.mkdir(parents=True)
    except OSError as error:
        raise UserError(
            f"cannot create {shown(target)}: {error.strerror}; "
            "run evaluator new from a folder you can write, or give one with --dir DIR"
        ) from error
    try:
        # Files and folders made anew, not copied with their modes: the template may be read-only (an
        # installed package, a read-only checkout), and the copy is the user's to edit.
        stage_tree(source, target)
        (target / MANIFEST_NAME).write_text(text, encoding="utf-8")
    except OSError as error:
        shutil.rmtree(target, ignore_errors=True)
        raise UserError(f"cannot create {shown(target)}: {error.strerror}") from error
    where = shown(target)
    print(
        f"created {where} from {shown(source)}; edit {where}/{MANIFEST_NAME} and {where}/train.py, then run: "
        f"evaluator check {where}"
    )
    return 0


def new_submission_parent() -> Path:
    """submissions/ in a competition repository (a folder that has one: pull requests add folders
    there), else the current folder."""
    return SUBMISSIONS_DIR if SUBMISSIONS_DIR.is_dir() else WORKSPACE


def register(subparsers: argparse._SubParsersAction) -> None:
    check = subparsers.add_parser(
        "check",
        help="validate a submission folder without running it",
        description=(
            "Validate manifest.toml against spec/manifest.schema.json and check the folder statically: "
            "entry module and function, track, no symlinks or special files, no weights or archives, "
            "size limits (folder 256 KiB, file 128 KiB, manifest 64 KiB). Nothing in the folder is run. "
            "It also reports data carried in the folder, since a submission that brings the public validation split or "
            "extra training text in its code buys a score it did not train for: string and bytes literals over 512 "
            "characters outside docstrings; comments, literals and lines of other files that read like encoded data "
            "(base64, base85, hex, written-out numbers: over 1,024 characters in the folder); "
            "more than 64 constants in "
            "one list, tuple, set, dict or [config] array; over 1,024 characters of number literals; calls of "
            "decoders and decompressors (zlib.decompress, b85decode, bytes.fromhex, pickle.loads, ...); "
            "over 256 non-ASCII characters; over "
            "24 KiB of comments, docstrings, literals and other text; [config] strings over 256 characters or over 256 "
            "keys and values; and a folder that compresses (xz) to over 16 KiB. The limits are set from the honest "
            "submissions' figures, with room to spare; each finding names its file and line. "
            "Exit 0 when valid, 2 when not. "
            "With --changed BASE instead of DIR, check what a pull request changes: in the git repository of "
            "the current folder, every path that `git diff BASE...HEAD` (since the merge base) adds, modifies "
            "or deletes. Exit 0 only when that is exactly one submissions/NAME/ folder, still in HEAD and "
            "valid as HEAD holds it (checked out into a temporary folder, so uncommitted files do not count); "
            "exit 2 for a folder that is invalid or deleted, for more than one folder (one submission per pull "
            "request), for no folder at all, and for any changed path outside submissions/NAME/, each named. "
            "The command cannot tell a maintainer's pull request from a competitor's: the workflow skips it "
            "for those (a label, or the author's association)."
        ),
    )
    target = check.add_mutually_exclusive_group(required=True)
    target.add_argument("folder", metavar="DIR", nargs="?", help="the submission folder (holds manifest.toml)")
    target.add_argument(
        "--changed",
        metavar="BASE",
        help=(
            "check every submission folder HEAD changes since its merge base with BASE, and refuse anything else "
            "it changes"
        ),
    )
    check.add_argument(
        "--allow-edit",
        action="append",
        default=[],
        metavar="NAME",
        help="with --changed: let the change edit submissions/NAME, which the base already has (the "
        "organiser's decision; a published submission's new version is otherwise a new folder)",
    )
    check.add_argument(
        "--json",
        action="store_true",
        help=(
            "print the findings as JSON on stdout (with --changed: ok, base, head, submissions, deleted, "
            "outside, edited, taken, merge_bases)"
        ),
    )
    check.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also check what these overrides (as evaluator run --set takes them) make of the manifest's [config]",
    )
    check.set_defaults(handler=_run_check)

    new = subparsers.add_parser(
        "new",
        help="start a submission from the template",
        description=(
            "Copy a submission folder (the template by default) with the name filled in: to submissions/NAME when "
            "the current folder has submissions/ (a competition repository), else to ./NAME, "
            "or to DIR/NAME with --dir. Never overwrites."
        ),
    )
    new.add_argument("name", metavar="NAME", help="the new submission's name: lower-case letters, digits, dashes")
    new.add_argument(
        "--from", dest="source", metavar="DIR", help="folder to copy (default: the template from the evaluator's home)"
    )
    new.add_argument(
        "--dir", metavar="DIR", help="the folder to create it in (default: ./submissions/ if there is one, else .)"
    )
    new.set_defaults(handler=_run_new)

"""`evaluator check` and `evaluator new`: static checks of a submission folder.

Nothing in the folder is run or imported here: the entry module is only parsed with `ast`.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from evaluator.errors import UserError
from evaluator.fsutil import submission_paths
from evaluator.manifest import MANIFEST_NAME, Finding, Manifest, parse_manifest
from evaluator.paths import REPO_ROOT, SUBMISSIONS_DIR
from evaluator.tracks import TrackError, available_tracks, load_track_file, track_path

FOLDER_MAX_BYTES = 1024 * 1024
FILE_MAX_BYTES = 256 * 1024
# Weights, arrays, pickles and archives: a submission may not bring pretrained weights or data.
FORBIDDEN_SUFFIXES = {
    ".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".onnx", ".npy", ".npz", ".pkl", ".pickle",
    ".h5", ".hdf5", ".parquet", ".arrow", ".pyc", ".so",
    ".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".rar",
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


def check_submission(folder: Path) -> CheckReport:
    """Every static problem with the folder, all at once."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such submission folder")
    manifest, findings = parse_manifest(folder)
    findings += _check_tree(folder)
    if manifest is not None:
        findings += _check_track(manifest)
        findings += _check_entry(folder, manifest)
    return CheckReport(folder=folder, manifest=manifest, findings=findings)


def _check_tree(folder: Path) -> list[Finding]:
    findings = []
    total = 0
    for path in submission_paths(folder):
        rel = _shown_path(path.relative_to(folder).as_posix())
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            findings.append(Finding(rel, f"is a symlink (to {os.readlink(path)!r}): symlinks are not allowed; copy the file in instead"))
        elif stat.S_ISDIR(info.st_mode):
            continue
        elif not stat.S_ISREG(info.st_mode):
            findings.append(Finding(rel, "is a device file, FIFO or socket: only regular files are allowed"))
        else:
            total += info.st_size
            findings += _check_file(path, rel, info.st_size)
    if total > FOLDER_MAX_BYTES:
        findings.append(Finding(".", f"the folder holds {total} bytes; the limit is {FOLDER_MAX_BYTES} (1 MiB): remove generated or data files"))
    return findings


def _shown_path(rel: str) -> str:
    """A file name as findings show it: a name with control characters (an escape sequence for the
    terminal that prints the findings) is shown escaped."""
    return rel if rel.isprintable() else ascii(rel)[1:-1]


def _check_file(path: Path, rel: str, size: int) -> list[Finding]:
    suffixes = {s.lower() for s in path.suffixes}
    if banned := suffixes & FORBIDDEN_SUFFIXES:
        return [Finding(rel, f"{'/'.join(sorted(banned))} files are not allowed: a submission may not bring weights, data or archives; train from ctx.train_tokens")]
    if size > FILE_MAX_BYTES:
        return [Finding(rel, f"is {size} bytes; the limit per file is {FILE_MAX_BYTES} (256 KiB)")]
    with open(path, "rb") as handle:
        head = handle.read(_BINARY_PROBE_BYTES)
    if b"\0" in head:
        return [Finding(rel, "is a binary file: only source and text files are allowed")]
    return []


def _check_track(manifest: Manifest) -> list[Finding]:
    findings = []
    for track_id in [manifest.track, *manifest.track_overrides]:
        key_path = ("submission", "track") if track_id == manifest.track else ("tracks", track_id)
        line, column = manifest.position_of(*key_path)
        path = track_path(track_id)
        if not path.is_file():
            key = ".".join(key_path)
            findings.append(Finding(MANIFEST_NAME, f"{key}: unknown track {track_id!r}; available tracks: {', '.join(available_tracks())}", line, column))
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
        return [Finding(MANIFEST_NAME, f"entry.module {rel!r} does not exist in the submission folder: create it or fix [entry] module")]
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
        node for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == manifest.entry_function
    ]
    if not functions:
        return [Finding(rel, f"defines no top-level function {manifest.entry_function!r}: add `def {manifest.entry_function}(ctx):` or fix [entry] function")]
    function = functions[-1]
    if isinstance(function, ast.AsyncFunctionDef):
        return [Finding(rel, f"{manifest.entry_function} is async; it must be a plain function", function.lineno, function.col_offset + 1)]
    args = function.args
    positional = args.posonlyargs + args.args
    required = len(positional) - len(args.defaults)
    required_keywords = [a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is None]
    if required != 1 or required_keywords:
        return [Finding(
            rel,
            f"{manifest.entry_function}() must take exactly one positional parameter (the Context), "
            f"like `def {manifest.entry_function}(ctx):`; it requires {required} positional"
            + (f" and keyword-only {', '.join(required_keywords)}" if required_keywords else ""),
            function.lineno,
            function.col_offset + 1,
        )]
    return []


def _display_path(folder: Path) -> str:
    try:
        return str(folder.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(folder)


def _run_check(args: argparse.Namespace) -> int:
    report = check_submission(Path(args.folder))
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0 if report.ok else 2
    shown = _display_path(report.folder)
    if report.ok:
        print(f"{shown}: ok ({report.manifest.name}, track {report.manifest.track})")
        return 0
    for finding in report.findings:
        print(f"{shown}/{finding}", file=sys.stderr)
    print(f"{shown}: {len(report.findings)} problem(s); the submission is invalid", file=sys.stderr)
    return 2


def _run_new(args: argparse.Namespace) -> int:
    if not NAME_PATTERN.match(args.name):
        raise UserError(f"name {args.name!r} must match {NAME_PATTERN.pattern} (lower-case letters, digits, dashes)")
    source = Path(args.source) if args.source else SUBMISSIONS_DIR / "template"
    if not (source / MANIFEST_NAME).is_file():
        raise UserError(f"{source}: not a submission folder (no {MANIFEST_NAME})")
    target = Path(args.dir) / args.name if args.dir else SUBMISSIONS_DIR / args.name
    if target.exists() or target.is_symlink():
        raise UserError(f"{target} already exists; pick another name or remove it first")
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"), symlinks=True)
    manifest_path = target / MANIFEST_NAME
    text = manifest_path.read_text(encoding="utf-8")
    text, count = re.subn(r'(?m)^(\s*name\s*=\s*)"[^"]*"', rf'\g<1>"{args.name}"', text, count=1)
    if count != 1:
        shutil.rmtree(target)
        raise UserError(f"{source / MANIFEST_NAME}: has no `name = \"...\"` line to fill in")
    manifest_path.write_text(text, encoding="utf-8")
    print(f"created {target} from {source}; edit {target / MANIFEST_NAME} and {target / 'train.py'}, then run: evaluator check {target}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    check = subparsers.add_parser(
        "check",
        help="validate a submission folder without running it",
        description=(
            "Validate manifest.toml against spec/manifest.schema.json and check the folder statically: "
            "entry module and function, track, no symlinks or special files, no weights or archives, "
            "size limits (folder 1 MiB, file 256 KiB, manifest 64 KiB). Nothing in the folder is run. "
            "Exit 0 when valid, 2 when not."
        ),
    )
    check.add_argument("folder", metavar="DIR", help="the submission folder (holds manifest.toml)")
    check.add_argument("--json", action="store_true", help="print the findings as JSON on stdout")
    check.set_defaults(handler=_run_check)

    new = subparsers.add_parser(
        "new",
        help="start a submission from the template",
        description="Copy a submission folder (the template by default) to submissions/NAME with the name filled in. Never overwrites.",
    )
    new.add_argument("name", metavar="NAME", help="the new submission's name: lower-case letters, digits, dashes")
    new.add_argument("--from", dest="source", metavar="DIR", help="folder to copy (default: submissions/template)")
    new.add_argument("--dir", metavar="DIR", help=f"where to create it (default: {SUBMISSIONS_DIR.relative_to(REPO_ROOT)}/)")
    new.set_defaults(handler=_run_new)

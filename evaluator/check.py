"""`evaluator check` and `evaluator new`: static checks of a submission folder, or of every
submission folder a git change touches (`check --changed BASE`, what a pull request is held to).

Nothing in the folder is run or imported here: the entry module is only parsed with `ast`.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from evaluator.errors import UserError
from evaluator.fsutil import stage_tree, submission_paths
from evaluator.manifest import (
    MANIFEST_NAME, Finding, Manifest, merge_overrides, override_findings, parse_manifest, parse_override,
)
from evaluator.paths import SUBMISSIONS_DIR, TEMPLATE_DIR, WORKSPACE, shown
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


def check_submission(folder: Path, overrides: dict | None = None, track_id: str | None = None) -> CheckReport:
    """Every static problem with the folder, all at once; with `overrides` (--set), also what they
    would make of the manifest's [config] on `track_id` (default: the manifest's track)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such submission folder")
    manifest, findings = parse_manifest(folder)
    findings += _check_tree(folder)
    if manifest is not None:
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

    @property
    def folder_count(self) -> int:
        return len(self.submissions) + len(self.deleted)

    @property
    def ok(self) -> bool:
        return self.folder_count == 1 and not self.deleted and not self.outside and all(r.ok for r in self.submissions)

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "base": self.base,
            "head": self.head,
            "submissions": [report.as_dict() for report in self.submissions],
            "deleted": self.deleted,
            "outside": self.outside,
        }


def check_changed(base: str, cwd: Path) -> ChangeReport:
    """Check what HEAD changes since its merge base with `base`, in the git repository holding `cwd`."""
    if base.startswith("-"):
        raise UserError(f"--changed {_shown_path(base)}: BASE must name a commit, not look like an option")
    top = Path(_git(cwd, ["rev-parse", "--show-toplevel"], f"{_shown_path(str(cwd))} is not in a git repository: --changed compares two of its commits").decode().rstrip("\n"))
    base_commit = _commit(top, base)
    head_commit = _commit(top, "HEAD")
    diff = _git(top, ["diff", "--name-status", "-z", "--no-renames", f"{base_commit}...{head_commit}", "--"], f"cannot compare {_shown_path(base)} with HEAD")
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
    return ChangeReport(
        base=base, head=head_commit, submissions=_check_as_committed(top, head_commit, present), deleted=deleted, outside=outside,
    )


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
    return _git(
        top, ["rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"], f"{_shown_path(revision)}: no such commit in {_shown_path(str(top))}",
    ).decode().strip()


def _folders_in_head(top: Path, head_commit: str) -> set[str]:
    listing = _git(top, ["ls-tree", "-z", head_commit, "--", f"{SUBMISSIONS_FOLDER}/"], "cannot list HEAD's submission folders")
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
    change = check_changed(args.changed, Path.cwd())
    if args.json:
        print(json.dumps(change.as_dict(), indent=2))
        return 0 if change.ok else 2
    span = f"{_shown_path(change.base)}...HEAD"
    problems = 0
    for report in change.submissions:
        where = _shown_path(str(report.folder))
        if report.ok:
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
        print(f"{_shown_path(path)}: changed outside {SUBMISSIONS_FOLDER}/<name>/: a submission's pull request changes nothing else", file=sys.stderr)
        problems += 1
    if change.folder_count == 0:
        print(f"{span} changes nothing under {SUBMISSIONS_FOLDER}/<name>/: a submission's pull request adds its folder there", file=sys.stderr)
        problems += 1
    elif change.folder_count > 1:
        names = ", ".join(_shown_path(folder) for folder in sorted([str(r.folder) for r in change.submissions] + change.deleted))
        print(f"{span} changes {change.folder_count} submission folders ({names}): one submission per pull request", file=sys.stderr)
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
        raise UserError(f"{source / MANIFEST_NAME}: has no `name = \"...\"` line to fill in")
    try:
        target.mkdir(parents=True)
    except OSError as error:
        raise UserError(f"cannot create {shown(target)}: {error.strerror}; "
                        "run evaluator new from a folder you can write, or give one with --dir DIR") from error
    try:
        # Files and folders made anew, not copied with their modes: the template may be read-only (an
        # installed package, a read-only checkout), and the copy is the user's to edit.
        stage_tree(source, target)
        (target / MANIFEST_NAME).write_text(text, encoding="utf-8")
    except OSError as error:
        shutil.rmtree(target, ignore_errors=True)
        raise UserError(f"cannot create {shown(target)}: {error.strerror}") from error
    where = shown(target)
    print(f"created {where} from {shown(source)}; edit {where}/{MANIFEST_NAME} and {where}/train.py, then run: evaluator check {where}")
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
            "size limits (folder 1 MiB, file 256 KiB, manifest 64 KiB). Nothing in the folder is run. "
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
    target.add_argument("--changed", metavar="BASE", help="check every submission folder HEAD changes since its merge base with BASE, and refuse anything else it changes")
    check.add_argument("--json", action="store_true", help="print the findings as JSON on stdout (with --changed: ok, base, head, submissions, deleted, outside)")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="also check what these overrides (as evaluator run --set takes them) make of the manifest's [config]")
    check.set_defaults(handler=_run_check)

    new = subparsers.add_parser(
        "new",
        help="start a submission from the template",
        description=("Copy a submission folder (the template by default) with the name filled in: to submissions/NAME when the current folder has submissions/ (a competition repository), else to ./NAME, or to DIR/NAME with --dir. Never overwrites."),
    )
    new.add_argument("name", metavar="NAME", help="the new submission's name: lower-case letters, digits, dashes")
    new.add_argument("--from", dest="source", metavar="DIR", help="folder to copy (default: the template from the evaluator's home)")
    new.add_argument("--dir", metavar="DIR", help="the folder to create it in (default: ./submissions/ if there is one, else .)")
    new.set_defaults(handler=_run_new)

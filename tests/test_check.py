"""`evaluator check` and `evaluator new` on real folders: each malformed case names its problem."""

import json
import os
import shutil
from pathlib import Path

import pytest

from evaluator.cli import main
from evaluator.paths import REPO_ROOT

TEMPLATE = REPO_ROOT / "submissions" / "template"


@pytest.fixture
def submission(tmp_path: Path) -> Path:
    folder = tmp_path / "sub"
    shutil.copytree(TEMPLATE, folder, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def _replace(folder: Path, old: str, new: str, file: str = "manifest.toml") -> None:
    path = folder / file
    text = path.read_text()
    assert old in text, f"{old!r} not in {file}"
    path.write_text(text.replace(old, new, 1))


def _write(folder: Path, rel: str, content: bytes | str) -> None:
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)


def _check(folder: Path, capsys) -> tuple[int, str]:
    code = main(["check", str(folder)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# Each case: (id, mutation, substrings expected in the output). Every case must exit 2.
CASES = [
    ("toml-syntax", lambda f: _replace(f, 'schema = 1', 'schema = = 1'), ["manifest.toml:2:", "TOML syntax error"]),
    ("unclosed-string", lambda f: _replace(f, '"template"', '"template'), ["manifest.toml:5", "TOML syntax error"]),
    ("wrong-schema-version", lambda f: _replace(f, "schema = 1", "schema = 2"), ["manifest.toml:2:1", "schema must be 1"]),
    ("schema-as-string", lambda f: _replace(f, "schema = 1", 'schema = "1"'), ["schema must be 1"]),
    ("bad-name-uppercase", lambda f: _replace(f, '"template"', '"MyRun"'), ['manifest.toml:5:1: submission.name "MyRun" must match ^[a-z0-9][a-z0-9-]{1,62}$']),
    ("bad-name-one-char", lambda f: _replace(f, '"template"', '"a"'), ['submission.name "a" must match']),
    ("name-wrong-type", lambda f: _replace(f, 'name = "template"', "name = 7"), ["manifest.toml:5:1", "submission.name must be of type string, not int"]),
    ("missing-submission-table", lambda f: _write(f, "manifest.toml", "schema = 1\n"), ["missing required key 'submission'"]),
    ("missing-name", lambda f: _replace(f, 'name = "template"', ""), ["manifest.toml:4:1", "missing required key 'name' in [submission]"]),
    ("missing-authors", lambda f: _replace(f, 'authors = ["Your Name <you@example.org>"]', ""), ["missing required key 'authors'"]),
    ("empty-authors", lambda f: _replace(f, '["Your Name <you@example.org>"]', "[]"), ["submission.authors must list at least 1"]),
    ("authors-not-list", lambda f: _replace(f, '["Your Name <you@example.org>"]', '"Me"'), ["submission.authors must be of type array"]),
    ("long-description", lambda f: _replace(f, 'description = "', 'description = "' + "x" * 600), ["submission.description is", "the limit is 500"]),
    ("bad-licence", lambda f: _replace(f, 'licence = "MIT"', 'licence = "not a licence!"'), ["submission.licence"]),
    ("unknown-top-level-key", lambda f: _replace(f, "schema = 1", "schema = 1\nshcema = 1"), ["manifest.toml:3:1", "unknown key 'shcema' in the top level"]),
    ("unknown-submission-key", lambda f: _replace(f, 'track = "t4-5min"', 'track = "t4-5min"\ntrak = "x"'), ["unknown key 'trak' in [submission]"]),
    ("unknown-entry-key", lambda f: _replace(f, 'function = "train"', 'function = "train"\nfunc = "x"'), ["unknown key 'func' in [entry]"]),
    ("unknown-track", lambda f: _replace(f, 'track = "t4-5min"', 'track = "a100-1min"'), ["unknown track 'a100-1min'", "available tracks: cpu-1min, t4-5min"]),
    ("unknown-override-track", lambda f: _replace(f, "[tracks.cpu-1min.config]", "[tracks.cpu-2min.config]"), ["tracks.cpu-2min: unknown track"]),
    ("non-utf8-manifest", lambda f: _write(f, "manifest.toml", (TEMPLATE / "manifest.toml").read_bytes() + b"\n# \xff\xfe\n"), ["not valid UTF-8"]),
    ("oversized-manifest", lambda f: _write(f, "manifest.toml", (TEMPLATE / "manifest.toml").read_text() + "#" * 70000 + "\n"), ["the limit is 65536"]),
    ("missing-manifest", lambda f: (f / "manifest.toml").unlink(), ["no manifest.toml"]),
    ("entry-module-missing", lambda f: (f / "train.py").unlink(), ["entry.module 'train.py' does not exist"]),
    ("entry-path-dotdot", lambda f: _replace(f, 'module = "train.py"', 'module = "../train.py"'), ["escapes the submission folder"]),
    ("entry-path-absolute", lambda f: _replace(f, 'module = "train.py"', 'module = "/etc/train.py"'), ["escapes the submission folder"]),
    ("entry-function-missing", lambda f: _replace(f, 'function = "train"', 'function = "fit"'), ["defines no top-level function 'fit'"]),
    ("entry-function-no-params", lambda f: _replace(f, "def train(ctx):", "def train():", "train.py"), ["train.py:", "exactly one positional parameter", "it requires 0"]),
    ("entry-function-two-params", lambda f: _replace(f, "def train(ctx):", "def train(ctx, extra):", "train.py"), ["it requires 2"]),
    ("entry-function-required-kwonly", lambda f: _replace(f, "def train(ctx):", "def train(ctx, *, mode):", "train.py"), ["keyword-only mode"]),
    ("entry-syntax-error", lambda f: _replace(f, "def train(ctx):", "def train(ctx)", "train.py"), ["train.py:", "syntax error"]),
    ("symlink-inside", lambda f: os.symlink("/etc/passwd", f / "passwd"), ["passwd: is a symlink", "not allowed"]),
    ("fifo-inside", lambda f: os.mkfifo(f / "pipe"), ["pipe: is a device file, FIFO or socket"]),
    ("weight-file", lambda f: _write(f, "weights.pt", b"not really weights"), ["weights.pt: .pt files are not allowed"]),
    ("nested-safetensors", lambda f: _write(f, "ckpt/model.safetensors", b"x"), ["ckpt/model.safetensors: .safetensors files are not allowed"]),
    ("archive", lambda f: _write(f, "data.tar.gz", b"x"), [".gz/.tar files are not allowed"]),
    ("oversized-file", lambda f: _write(f, "notes.txt", "x" * (300 * 1024)), ["notes.txt: is 307200 bytes; the limit per file is 262144"]),
    ("oversized-folder", lambda f: [_write(f, f"part{i}.txt", "y" * (200 * 1024)) for i in range(6)], ["the limit is 1048576"]),
    ("binary-blob", lambda f: _write(f, "blob.dat", b"\x00\x01\x02" * 100), ["blob.dat: is a binary file"]),
]


@pytest.mark.parametrize("mutate,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_submission_is_rejected_with_a_precise_message(submission, capsys, mutate, expected):
    mutate(submission)
    code, output = _check(submission, capsys)
    assert code == 2, output
    for fragment in expected:
        assert fragment in output, f"{fragment!r} not in:\n{output}"
    assert "Traceback" not in output


def test_all_problems_are_reported_at_once(submission, capsys):
    _replace(submission, '"template"', '"Bad_Name"')
    _replace(submission, "schema = 1", "schema = 1\nextra = true")
    _write(submission, "model.pth", b"x")
    code, output = _check(submission, capsys)
    assert code == 2
    assert "submission.name" in output and "unknown key 'extra'" in output and "model.pth" in output
    assert "3 problem(s)" in output


@pytest.mark.parametrize("folder", ["submissions/template"])
def test_shipped_submissions_are_valid(folder, capsys):
    assert main(["check", str(REPO_ROOT / folder)]) == 0, capsys.readouterr()


def test_valid_variants_pass(submission, capsys):
    # Entry in a subfolder, extra defaulted parameters, and no [entry] table at all are all fine.
    (submission / "src").mkdir()
    (submission / "train.py").rename(submission / "src" / "train.py")
    _replace(submission, 'module = "train.py"', 'module = "src/train.py"')
    _replace(submission, "def train(ctx):", "def train(ctx, verbose=False, *args):", "src/train.py")
    assert _check(submission, capsys)[0] == 0
    _replace(submission, '[entry]                                  # optional; these are the defaults\nmodule = "src/train.py"\nfunction = "train"\n', "")
    (submission / "src" / "train.py").rename(submission / "train.py")
    code, output = _check(submission, capsys)
    assert code == 0, output


def test_json_output(submission, capsys):
    _replace(submission, '"template"', '"MyRun"')
    code = main(["check", "--json", str(submission)])
    report = json.loads(capsys.readouterr().out)
    assert code == 2 and report["ok"] is False
    assert report["findings"][0] == {
        "file": "manifest.toml", "line": 5, "column": 1,
        "message": 'submission.name "MyRun" must match ^[a-z0-9][a-z0-9-]{1,62}$',
    }


def test_missing_folder_is_one_clear_line(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "no such submission folder" in err and "Traceback" not in err


def test_new_copies_template_with_name_and_refuses_overwrite(tmp_path, capsys):
    assert main(["new", "alice-fast", "--dir", str(tmp_path)]) == 0
    created = tmp_path / "alice-fast"
    assert 'name = "alice-fast"' in (created / "manifest.toml").read_text()
    assert main(["check", str(created)]) == 0
    capsys.readouterr()
    assert main(["new", "alice-fast", "--dir", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["new", "Alice", "--dir", str(tmp_path)]) == 2
    assert "must match" in capsys.readouterr().err


def test_pycache_is_ignored_by_check_and_tree_hash(submission, capsys):
    from evaluator.fsutil import stage_tree, tree_sha256

    before = tree_sha256(submission)
    _write(submission, "__pycache__/train.cpython-311.pyc", b"\x00compiled")
    assert _check(submission, capsys)[0] == 0
    assert tree_sha256(submission) == before
    staged = submission.parent / "staged"
    stage_tree(submission, staged)
    assert not (staged / "__pycache__").exists()
    assert tree_sha256(staged) == before
    _write(submission, "notes.md", "changed")
    assert tree_sha256(submission) != before

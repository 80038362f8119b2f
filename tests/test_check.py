"""`evaluator check` and `evaluator new` on real folders: each malformed case names its problem."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from evaluator.cli import main
from evaluator.paths import HOME

TEMPLATE = HOME / "submissions" / "template"


@pytest.fixture
def submission(tmp_path: Path) -> Path:
    folder = tmp_path / "template"  # a submission's name is its folder's
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


def _append(folder: Path, text: str) -> None:
    """Add lines at the end of the manifest (inside its last table, [tracks.cpu-1min.config])."""
    path = folder / "manifest.toml"
    path.write_text(path.read_text() + text)


TEMPLATE_TEXT = (TEMPLATE / "manifest.toml").read_text()
# The line number of the first line `_append` adds, and of the template's override table.
APPENDED_LINE = TEMPLATE_TEXT.count("\n") + 1
OVERRIDE_LINE = (
    TEMPLATE_TEXT.split("\n").index(
        "[tracks.cpu-1min.config]                 # per-track overrides of top-level [config] keys"
    )
    + 1
)


def _check(folder: Path, capsys) -> tuple[int, str]:
    code = main(["check", str(folder)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# Each case: (id, mutation, substrings expected in the output). Every case must exit 2.
CASES = [
    ("toml-syntax", lambda f: _replace(f, "schema = 1", "schema = = 1"), ["manifest.toml:2:", "TOML syntax error"]),
    ("unclosed-string", lambda f: _replace(f, '"template"', '"template'), ["manifest.toml:5", "TOML syntax error"]),
    (
        "wrong-schema-version",
        lambda f: _replace(f, "schema = 1", "schema = 2"),
        ["manifest.toml:2:1", "schema must be 1"],
    ),
    ("schema-as-string", lambda f: _replace(f, "schema = 1", 'schema = "1"'), ["schema must be 1"]),
    (
        "bad-name-uppercase",
        lambda f: _replace(f, '"template"', '"MyRun"'),
        ['manifest.toml:5:1: submission.name "MyRun" must match ^[a-z0-9][a-z0-9-]{1,62}$'],
    ),
    ("bad-name-one-char", lambda f: _replace(f, '"template"', '"a"'), ['submission.name "a" must match']),
    (
        "name-wrong-type",
        lambda f: _replace(f, 'name = "template"', "name = 7"),
        ["manifest.toml:5:1", "submission.name must be of type string, not int"],
    ),
    (
        "missing-submission-table",
        lambda f: _write(f, "manifest.toml", "schema = 1\n"),
        ["missing required key 'submission'"],
    ),
    (
        "missing-name",
        lambda f: _replace(f, 'name = "template"', ""),
        ["manifest.toml:4:1", "missing required key 'name' in [submission]"],
    ),
    (
        "missing-authors",
        lambda f: _replace(f, 'authors = ["Your Name <you@example.org>"]', ""),
        ["missing required key 'authors'"],
    ),
    (
        "empty-authors",
        lambda f: _replace(f, '["Your Name <you@example.org>"]', "[]"),
        ["submission.authors must list at least 1"],
    ),
    (
        "authors-not-list",
        lambda f: _replace(f, '["Your Name <you@example.org>"]', '"Me"'),
        ["submission.authors must be of type array"],
    ),
    (
        "long-description",
        lambda f: _replace(f, 'description = "', 'description = "' + "x" * 600),
        ["submission.description is", "the limit is 500"],
    ),
    ("bad-licence", lambda f: _replace(f, 'licence = "MIT"', 'licence = "not a licence!"'), ["submission.licence"]),
    (
        "unknown-top-level-key",
        lambda f: _replace(f, "schema = 1", "schema = 1\nshcema = 1"),
        ["manifest.toml:3:1", "unknown key 'shcema' in the top level"],
    ),
    (
        "unknown-submission-key",
        lambda f: _replace(f, 'track = "t4-5min"', 'track = "t4-5min"\ntrak = "x"'),
        ["unknown key 'trak' in [submission]"],
    ),
    (
        "unknown-entry-key",
        lambda f: _replace(f, 'function = "train"', 'function = "train"\nfunc = "x"'),
        ["unknown key 'func' in [entry]"],
    ),
    (
        "unknown-track",
        lambda f: _replace(f, 'track = "t4-5min"', 'track = "a100-1min"'),
        [
            "manifest.toml:6:1: submission.track: unknown track 'a100-1min'",
            "available tracks: cpu-1min, cpu-target, t4-5min, t4-target",
        ],
    ),
    (
        "unknown-override-track",
        lambda f: _replace(f, "[tracks.cpu-1min.config]", "[tracks.cpu-2min.config]"),
        [f"manifest.toml:{OVERRIDE_LINE}:1: tracks.cpu-2min: unknown track"],
    ),
    (
        "unknown-override-track-dotted-key",
        lambda f: _append(f, "\n[tracks]\ncpu-3min.config.d_model = 8\n"),
        [f"manifest.toml:{APPENDED_LINE + 2}:1: tracks.cpu-3min: unknown track"],
    ),
    # What tomllib itself gives up on becomes a finding with its line, never a traceback.
    (
        "config-3000-nested-arrays",
        lambda f: _append(f, "deep = " + "[" * 3000 + "]" * 3000 + "\n"),
        [
            f"manifest.toml:{APPENDED_LINE}:",
            "nests arrays or inline tables too deeply for the TOML parser",
            "at most 8 deep",
        ],
    ),
    (
        "config-3000-nested-inline-tables",
        lambda f: _append(f, "deep = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n"),
        [f"manifest.toml:{APPENDED_LINE}:", "too deeply for the TOML parser"],
    ),
    (
        "config-5000-digit-integer",
        lambda f: _append(f, "big = " + "7" * 5000 + "\n"),
        [f"manifest.toml:{APPENDED_LINE}:7: holds an integer of more than 4300 digits", "TOML integers are 64-bit"],
    ),
    # What the job file (JSON) cannot carry to train() is refused by check, not by a crash at run time.
    (
        "config-integer-beyond-64-bits",
        lambda f: _append(f, f"big = {2**63}\n"),
        [f"manifest.toml:{APPENDED_LINE}:1: tracks.cpu-target.config.big is outside the range of a TOML integer"],
    ),
    (
        "config-negative-integer-beyond-64-bits",
        lambda f: _replace(f, "d_model = 128", f"d_model = {-(2**63) - 1}"),
        ["config.d_model is outside the range of a TOML integer"],
    ),
    (
        "config-datetime",
        lambda f: _replace(f, "d_model = 128", "d_model = 1979-05-27T07:32:00Z"),
        [
            "manifest.toml:16:1: config.d_model is a TOML date-time, which the job file (JSON)",
            '"1979-05-27T07:32:00+00:00"',
        ],
    ),
    (
        "config-date-in-array",
        lambda f: _replace(f, "d_model = 128", "d_model = [1, 1979-05-27]"),
        ["config.d_model[1] is a TOML date,"],
    ),
    (
        "override-local-time",
        lambda f: _append(f, "start = 07:32:00\n"),
        [f"manifest.toml:{APPENDED_LINE}:1: tracks.cpu-target.config.start is a TOML time"],
    ),
    (
        "config-9-deep",
        lambda f: _append(f, "deep = " + "[" * 9 + "1" + "]" * 9 + "\n"),
        [
            "tracks.cpu-target.config.deep[0][0][0][0][0][0][0][0] nests arrays and tables more than 8 deep "
            "below [config]"
        ],
    ),
    (
        "config-odd-key-named-escaped",
        lambda f: _append(f, '"odd\\u001b[2J key" = 1979-05-27\n'),
        ['tracks.cpu-target.config."odd\\u001b[2J key" is a TOML date'],
    ),
    # Free text reaches the leaderboard: one line, no control characters.
    (
        "newline-in-author",
        lambda f: _replace(f, '["Your Name <you@example.org>"]', '["Eve", "Mallory\\n| forged | row |"]'),
        [
            "manifest.toml:7:1: submission.authors[1] holds a control character at position 8 (a newline): "
            "it must be one line of plain text"
        ],
    ),
    (
        "tab-in-author",
        lambda f: _replace(f, "Your Name", "Your\\tName"),
        ["submission.authors[0] holds a control character at position 5 (a tab)"],
    ),
    (
        "escape-sequence-in-description",
        lambda f: _replace(f, 'description = "A', 'description = "\\u001b]0;owned\\u0007A'),
        ["manifest.toml:8:1: submission.description holds a control character at position 1 (ESC"],
    ),
    (
        "c1-csi-in-description",
        lambda f: _replace(f, 'description = "A', 'description = "\\u009b2JA'),
        ["submission.description holds a control character at position 1 (U+009B)"],
    ),
    # And nothing that makes a page show other text than it holds: bidi overrides, zero-width and separator characters.
    (
        "bidi-override-in-author",
        lambda f: _replace(f, "Your Name", "Your \\u202eemaN"),
        ["submission.authors[0] holds a format character at position 6 (U+202E RIGHT-TO-LEFT OVERRIDE)"],
    ),
    (
        "zero-width-space-in-description",
        lambda f: _replace(f, 'description = "A', 'description = "\\u200bA'),
        ["submission.description holds a format character at position 1 (U+200B ZERO WIDTH SPACE)"],
    ),
    (
        "line-separator-in-description",
        lambda f: _replace(f, 'description = "A', 'description = "\\u2028A'),
        ["submission.description holds a format character at position 1 (U+2028 LINE SEPARATOR)"],
    ),
    (
        "multiline-description",
        lambda f: (
            _replace(f, 'description = "A small ', 'description = """A small\n'),
            _replace(f, 'to copy."', 'to copy."""'),
        ),
        ["submission.description holds a control character at position 8 (a newline)"],
    ),
    (
        "non-utf8-manifest",
        lambda f: _write(f, "manifest.toml", (TEMPLATE / "manifest.toml").read_bytes() + b"\n# \xff\xfe\n"),
        ["not valid UTF-8"],
    ),
    (
        "oversized-manifest",
        lambda f: _write(f, "manifest.toml", (TEMPLATE / "manifest.toml").read_text() + "#" * 70000 + "\n"),
        ["the limit is 65536"],
    ),
    ("missing-manifest", lambda f: (f / "manifest.toml").unlink(), ["no manifest.toml"]),
    ("entry-module-missing", lambda f: (f / "train.py").unlink(), ["entry.module 'train.py' does not exist"]),
    (
        "entry-path-dotdot",
        lambda f: _replace(f, 'module = "train.py"', 'module = "../train.py"'),
        ["escapes the submission folder"],
    ),
    (
        "entry-path-absolute",
        lambda f: _replace(f, 'module = "train.py"', 'module = "/etc/train.py"'),
        ["escapes the submission folder"],
    ),
    (
        "entry-function-missing",
        lambda f: _replace(f, 'function = "train"', 'function = "fit"'),
        ["defines no top-level function 'fit'"],
    ),
    (
        "entry-function-no-params",
        lambda f: _replace(f, "def train(ctx):", "def train():", "train.py"),
        ["train.py:", "exactly one positional parameter", "it requires 0"],
    ),
    (
        "entry-function-two-params",
        lambda f: _replace(f, "def train(ctx):", "def train(ctx, extra):", "train.py"),
        ["it requires 2"],
    ),
    (
        "entry-function-required-kwonly",
        lambda f: _replace(f, "def train(ctx):", "def train(ctx, *, mode):", "train.py"),
        ["keyword-only mode"],
    ),
    (
        "entry-syntax-error",
        lambda f: _replace(f, "def train(ctx):", "def train(ctx)", "train.py"),
        ["train.py:", "syntax error"],
    ),
    (
        "entry-too-deep-for-the-parser",
        lambda f: _write(f, "train.py", "x = " + "-" * 200_000 + "1\ndef train(ctx):\n    pass\n"),
        ["train.py: nests expressions too deeply for Python's parser"],
    ),
    ("symlink-inside", lambda f: os.symlink("/etc/passwd", f / "passwd"), ["passwd: is a symlink", "not allowed"]),
    ("fifo-inside", lambda f: os.mkfifo(f / "pipe"), ["pipe: is a device file, FIFO or socket"]),
    (
        "weight-file",
        lambda f: _write(f, "weights.pt", b"not really weights"),
        ["weights.pt: .pt files are not allowed"],
    ),
    (
        "nested-safetensors",
        lambda f: _write(f, "ckpt/model.safetensors", b"x"),
        ["ckpt/model.safetensors: .safetensors files are not allowed"],
    ),
    ("archive", lambda f: _write(f, "data.tar.gz", b"x"), [".gz/.tar files are not allowed"]),
    (
        "oversized-file",
        lambda f: _write(f, "notes.txt", "x" * (150 * 1024)),
        ["notes.txt: is 153600 bytes; the limit per file is 131072 (128 KiB)"],
    ),
    (
        "oversized-folder",
        lambda f: [_write(f, f"part{i}.txt", "y" * (100 * 1024)) for i in range(3)],
        ["the limit is 262144 (256 KiB)"],
    ),
    ("binary-blob", lambda f: _write(f, "blob.dat", b"\x00\x01\x02" * 100), ["blob.dat: is a binary file"]),
    (
        "escape-sequence-in-a-file-name",
        lambda f: _write(f, "evil\x1b]0;owned\x07.pt", b"x"),
        ["evil\\x1b]0;owned\\x07.pt: .pt files are not allowed"],
    ),
]


@pytest.mark.parametrize("mutate,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_submission_is_rejected_with_a_precise_message(submission, capsys, mutate, expected):
    mutate(submission)
    code, output = _check(submission, capsys)
    assert code == 2, output
    for fragment in expected:
        assert fragment in output, f"{fragment!r} not in:\n{output}"
    assert "Traceback" not in output
    # What the folder holds is quoted escaped: nothing reaches the terminal as a control character.
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", output), repr(output)


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
    assert main(["check", str(HOME / folder)]) == 0, capsys.readouterr()


def test_valid_variants_pass(submission, capsys):
    # Entry in a subfolder, extra defaulted parameters, and no [entry] table at all are all fine.
    (submission / "src").mkdir()
    (submission / "train.py").rename(submission / "src" / "train.py")
    _replace(submission, 'module = "train.py"', 'module = "src/train.py"')
    _replace(submission, "def train(ctx):", "def train(ctx, verbose=False, *args):", "src/train.py")
    assert _check(submission, capsys)[0] == 0
    _replace(
        submission,
        "[entry]                                  # optional; these are the defaults\n"
        'module = "src/train.py"\nfunction = "train"\n',
        "",
    )
    (submission / "src" / "train.py").rename(submission / "train.py")
    code, output = _check(submission, capsys)
    assert code == 0, output


def test_json_output(submission, capsys):
    _replace(submission, '"template"', '"MyRun"')
    code = main(["check", "--json", str(submission)])
    report = json.loads(capsys.readouterr().out)
    assert code == 2 and report["ok"] is False
    assert report["findings"][0] == {
        "file": "manifest.toml",
        "line": 5,
        "column": 1,
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


def test_config_within_the_limits_passes(submission, capsys):
    # The limits refuse only what cannot travel: 8 levels deep, the 64-bit bounds, floats of any size.
    _append(submission, "deep = " + "[" * 8 + "1" + "]" * 8 + "\n")
    _replace(
        submission,
        "d_model = 128",
        f'd_model = {2**63 - 1}\nlow = {-(2**63)}\nhuge = 1e300\nrange = {{a = [1, 2.5, true, "x"]}}',
    )
    code, output = _check(submission, capsys)
    assert code == 0, output
    from evaluator.manifest import parse_manifest

    manifest, _ = parse_manifest(submission)
    assert manifest.config["d_model"] == 2**63 - 1 and manifest.config["huge"] == 1e300
    assert json.loads(json.dumps(manifest.config_for("cpu-1min"))) == manifest.config_for("cpu-1min")


def test_a_datetime_in_config_stops_run_before_it_makes_a_run_directory(submission, tmp_path, capsys):
    _replace(submission, "d_model = 128", "d_model = 1979-05-27T07:32:00Z")
    runs = tmp_path / "runs"
    code = main(["run", str(submission), "--track", "cpu-1min", "--out", str(runs), "--sandbox", "none"])
    output = "".join(capsys.readouterr())
    assert code == 2, output
    assert "config.d_model is a TOML date-time" in output and "the submission is invalid" in output
    assert not runs.exists() or not any(runs.iterdir())


def test_json_findings_of_a_parser_failure_carry_the_line(submission, capsys):
    _append(submission, "deep = " + "[" * 3000 + "]" * 3000 + "\n")
    code = main(["check", "--json", str(submission)])
    report = json.loads(capsys.readouterr().out)
    assert code == 2 and report["ok"] is False
    assert [(f["file"], f["line"]) for f in report["findings"]] == [("manifest.toml", APPENDED_LINE)]


def test_line_numbers_count_only_newlines(submission, capsys):
    # U+2028 and U+0085 inside a comment are not line breaks in TOML: findings below keep their lines.
    _replace(submission, "# A submission:", "# A\u2028submission\u0085:")
    _replace(submission, '"template"', '"Bad_Name"')
    code, output = _check(submission, capsys)
    assert code == 2 and "manifest.toml:5:1: submission.name" in output, output


def test_empty_and_ignored_only_folders_are_neither_hashed_nor_staged(submission):
    """The same tree hash means the same importable tree: a folder that holds no file the hash covers
    (empty, or only __pycache__) would be a namespace package in the jail, so it is not staged."""
    import importlib.util
    import sys

    from evaluator.fsutil import stage_tree, tree_sha256

    before = tree_sha256(submission)
    (submission / "empty_pkg").mkdir()
    (submission / "nested" / "deeper").mkdir(parents=True)
    _write(submission, "compiled_only/__pycache__/mod.cpython-311.pyc", b"\x00compiled")
    _write(submission, "real_pkg/__init__.py", "VALUE = 1\n")
    assert tree_sha256(submission) != before  # a file changes the hash ...
    with_files = tree_sha256(submission)
    (submission / "real_pkg" / "empty_sub").mkdir()
    assert tree_sha256(submission) == with_files  # ... a folder without one does not
    staged = submission.parent / "staged"
    stage_tree(submission, staged)
    assert tree_sha256(staged) == tree_sha256(submission)
    staged_dirs = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_dir())
    assert staged_dirs == ["real_pkg"]
    sys.path.insert(0, str(staged))
    try:
        assert importlib.util.find_spec("empty_pkg") is None and importlib.util.find_spec("compiled_only") is None
        assert importlib.util.find_spec("real_pkg") is not None
    finally:
        sys.path.remove(str(staged))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("d_model=512", {"d_model": 512}),
        ("lr=3e-4", {"lr": 3e-4}),
        ("use_ema=true", {"use_ema": True}),
        ("act=relu", {"act": "relu"}),  # a bare word is a string
        ('name="two words"', {"name": "two words"}),
        ("layers=[1, 2]", {"layers": [1, 2]}),
        ("optimizer.lr=0.01", {"optimizer": {"lr": 0.01}}),
    ],
)
def test_set_takes_toml_values_and_dotted_keys(text, expected):
    from evaluator.manifest import parse_override

    assert parse_override(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("d_model", "expected KEY=VALUE"),
        ("=3", "expected KEY=VALUE"),
        ("a b=3", "expected KEY=VALUE"),
        ("lr=1e-3x", "'1e-3x' is not a TOML value; quote a string"),
    ],
)
def test_set_refuses_what_is_not_key_equals_toml(text, message):
    from evaluator.errors import UserError
    from evaluator.manifest import parse_override

    with pytest.raises(UserError, match=re.escape(message)):
        parse_override(text)


def test_check_validates_overrides_against_the_config_rules(capsys):
    template = str(HOME / "submissions" / "template")
    assert main(["check", template, "--set", "d_model=320", "--set", "optimizer.lr=0.01"]) == 0
    assert main(["check", template, "--set", "d_model=99999999999999999999"]) == 2
    err = capsys.readouterr().err
    assert "manifest.toml: with --set, config.d_model: 99999999999999999999 is greater than the maximum" in err

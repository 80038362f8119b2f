"""Where the evaluator finds its fixed parts, and where it writes.

The fixed parts are `spec/` (schemas, tracks, datasets, trusted keys, record rules) and the
submission template, `submissions/template/`. They come from one folder, the *home*, the first of:

1. the folder named by the environment variable SPEEDRUN_EVALUATOR_HOME;
2. the current folder, when it holds `spec/tracks/` (this repository, or a competition repository
   made from it);
3. the installed package: the copy a wheel carries in `evaluator/_home/`, or, for an editable
   install, the checkout the package lives in.

Everything the evaluator writes goes under the current folder (`results/`, `results/runs/`, a new
submission) or where a command-line flag says, never into the home: an installed package is often
read-only, and a checkout may be. Paths recorded in a result are relative to the current folder
when they lie inside it. "The current folder" is the one the process started in.
"""

import os
from pathlib import Path

HOME_ENV = "SPEEDRUN_EVALUATOR_HOME"
PACKAGE_DIR = Path(__file__).resolve().parent


def _find_home() -> tuple[Path, str]:
    named = os.environ.get(HOME_ENV)
    if named:
        return Path(named).resolve(), f"${HOME_ENV}"
    here = Path.cwd()
    if (here / "spec" / "tracks").is_dir():
        return here, "the current folder"
    bundled = PACKAGE_DIR / "_home"
    if bundled.is_dir():
        return bundled, "the installed package"
    return PACKAGE_DIR.parent, "the checkout the package is installed from"


HOME, HOME_SOURCE = _find_home()
SPEC_DIR = HOME / "spec"
TRACKS_DIR = SPEC_DIR / "tracks"
DATASETS_DIR = SPEC_DIR / "datasets"
KEYS_DIR = SPEC_DIR / "keys"
RECORD_RULES_FILE = SPEC_DIR / "record-rules.toml"
TEMPLATE_DIR = HOME / "submissions" / "template"

WORKSPACE = Path.cwd()
SUBMISSIONS_DIR = WORKSPACE / "submissions"
RESULTS_DIR = WORKSPACE / "results"
RUNS_DIR = RESULTS_DIR / "runs"


def shown(path: Path) -> str:
    """A path as the user should read it: relative to the current folder when inside it."""
    path = Path(os.path.abspath(path))
    return path.relative_to(WORKSPACE).as_posix() if path.is_relative_to(WORKSPACE) else str(path)

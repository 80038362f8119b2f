"""Where the repository's fixed parts live. The package is installed editable from the repo."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SPEC_DIR = REPO_ROOT / "spec"
TRACKS_DIR = SPEC_DIR / "tracks"
DATASETS_DIR = SPEC_DIR / "datasets"
KEYS_DIR = SPEC_DIR / "keys"
SUBMISSIONS_DIR = REPO_ROOT / "submissions"
RESULTS_DIR = REPO_ROOT / "results"
RUNS_DIR = RESULTS_DIR / "runs"
RECORD_RULES_FILE = SPEC_DIR / "record-rules.toml"

"""Which of the evaluator's own modules run inside a jail, and so must import no host-side module;
and the environment every such jail starts with.

A jail never sees the package: each run copies these files into the jail's input (training) or
memory image (scoring), so an installed package, which carries the validation split, stays out of
reach. A module listed here may import only the standard library, torch, pyarrow and the other
modules of its own list (tests/test_in_jail.py checks it in a fresh interpreter).
"""

from __future__ import annotations

from pathlib import Path

from evaluator.paths import PACKAGE_DIR

# The training jail: the harness, the job file it reads, the API it hands the submission and the
# training split's loader.
TRAINING = (
    "__init__.py",
    "api.py",
    "errors.py",
    "job.py",
    "harness.py",
    "dataset/__init__.py",
    "dataset/loader.py",
)
# The scoring jails: the model server and the API that builds a model's decoder.
SCORING = ("__init__.py", "api.py", "model_server.py")


def sources(modules: tuple[str, ...]) -> list[Path]:
    """The package's files of `modules`, to be copied into a jail."""
    return [PACKAGE_DIR / module for module in modules]


def environment(threads: int, *, home: str, python_path: Path, **jail_specific: str) -> dict[str, str]:
    """The whole environment of a jail that runs these modules (nothing of the host's reaches a
    jail): the system's PATH, `python_path` where its copy of them lies, and OpenMP and MKL on the
    track's `threads`, plus what only that jail needs."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONPATH": str(python_path),
        **jail_specific,
    }

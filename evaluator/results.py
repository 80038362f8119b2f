"""`result.json`: assembled from a run's facts, validated against `spec/result.schema.json`, written atomically."""

from __future__ import annotations

import json
import platform
import subprocess
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from evaluator import __version__
from evaluator.fsutil import atomic_write_text
from evaluator.paths import SPEC_DIR

RESULT_FILE = "result.json"
STATUSES = ("ok", "invalid_submission", "crashed", "over_budget", "out_of_memory", "killed", "invalid_model", "sandbox_error")
# Exit codes of `evaluator run` (DESIGN.md): 0 ok, 1 the submission's fault, 2 bad input, 3 ours.
EXIT_CODES = {status: 1 for status in STATUSES} | {"ok": 0, "invalid_submission": 2, "sandbox_error": 3}


@cache
def result_schema() -> dict:
    return json.loads((SPEC_DIR / "result.schema.json").read_text())


def result_problems(record: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(result_schema(), format_checker=jsonschema.FormatChecker())
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}"
        for e in sorted(validator.iter_errors(record), key=lambda e: list(map(str, e.absolute_path)))
    ]


def write_result(run_dir: Path, record: dict[str, Any]) -> Path:
    """Validate, then write atomically: a result that does not match the schema is never written."""
    problems = result_problems(record)
    if problems:
        raise ValueError("result record does not match spec/result.schema.json: " + "; ".join(problems))
    path = Path(run_dir) / RESULT_FILE
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_info(device_kind: str) -> dict[str, Any] | None:
    if device_kind != "cuda":
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    return {"name": props.name, "driver": driver, "cuda": torch.version.cuda or "unknown", "memory_gib": round(props.total_memory / 2**30, 2)}


def environment(device_kind: str, sandbox_kind: str, sandbox_version: str) -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "evaluator_version": __version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "gpu": _gpu_info(device_kind),
        "sandbox": {"kind": sandbox_kind, "version": sandbox_version},
    }

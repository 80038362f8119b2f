"""`result.json`: assembled from a run's facts, validated against `spec/result.schema.json`, written atomically."""

from __future__ import annotations

import json
import platform
import re
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from evaluator import __version__
from evaluator.fsutil import atomic_write_text
from evaluator.gpus import Placement
from evaluator.paths import SPEC_DIR

RESULT_FILE = "result.json"
STATUSES = ("ok", "invalid_submission", "crashed", "over_budget", "out_of_memory", "killed", "invalid_model",
            "sandbox_error", "not_reached")
# Exit codes of `evaluator run` (DESIGN.md): 0 ok, 1 the submission's fault (not_reached included: it
# trained and was scored, and no model reached a time-to-target track's target), 2 bad input, 3 ours.
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


# RFC 3339's date-time: what every Python's fromisoformat reads alike (3.11 also takes ISO 8601's
# week dates and basic format, 3.10 not even the "Z"), so a record verifies the same on each.
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})")


def parse_utc(moment: str) -> datetime:
    """A record's time, as utc_now() writes it ("...Z") or with another offset; ValueError otherwise."""
    if not _RFC3339.fullmatch(moment):
        raise ValueError(f"{moment!r} is not an RFC 3339 date-time")
    return datetime.fromisoformat(moment[:-1] + "+00:00" if moment.endswith("Z") else moment)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_info(gpu: Placement | None) -> dict[str, Any] | None:
    if gpu is None:
        return None
    import torch

    board = gpu.board
    return {"name": board.name, "driver": gpu.driver, "cuda": torch.version.cuda or "unknown",
            "memory_gib": round(board.memory_mib / 1024, 2), "index": gpu.cuda_index, "minor": board.minor,
            "pci_bus_id": board.pci_bus_id, "uuid": board.uuid}


def environment(
    sandbox_kind: str, sandbox_version: str, gpu: Placement | None, sandbox_unavailable: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The host a run ran on, the GPU it held (None on a CPU track), and what of the sandbox this
    host could not give ("nsjail: why", "cgroups: why")."""
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "evaluator_version": __version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "gpu": _gpu_info(gpu),
        "sandbox": {"kind": sandbox_kind, "version": sandbox_version, "unavailable": list(sandbox_unavailable)},
    }

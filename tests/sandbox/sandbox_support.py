"""Helpers of the sandbox tests: a jail's spec with test defaults, running a jail to its end (the
`unsandboxed` and `nsjail` fixtures are tests/conftest.py's)."""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

from evaluator.sandbox import Jailed, JailOutcome, JailSpec, Sandbox

SHELL_PATH = {"PATH": "/usr/bin:/bin"}


def make_spec(tmp_path: Path, argv: list[str], **overrides) -> JailSpec:
    fields = dict(
        name=f"test-{uuid.uuid4().hex[:12]}",
        argv=argv,
        workdir=tmp_path / "jail-work",
        cwd=Path("/tmp"),
        env=dict(SHELL_PATH),
        ro_paths=[],
        rw_paths=[],
        tmpfs={},
        memory_bytes=512 << 20,
        pids=64,
        time_limit_s=20,
        log_path=tmp_path / "stderr.log",
        log_cap_bytes=1 << 20,
    )
    fields.update(overrides)
    return JailSpec(**fields)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def sleeper(seconds: float) -> list[str]:
    """A process that sleeps: in Python, because a jail sees the interpreter, not the host's /bin."""
    return python(f"import time; time.sleep({seconds})")


def run_to_end(box: Sandbox, spec: JailSpec, stdin: bytes = b"") -> tuple[bytes, JailOutcome]:
    with box.start(spec) as jail:
        jail.stdin.write(stdin)
        jail.stdin.close()
        output = jail.stdout.read()
        assert jail.wait(timeout=spec.time_limit_s + 10) is not None
        return output, jail.outcome()


def cgroup_dirs(jail: Jailed) -> list[Path]:
    return list(jail._cgroup.dirs)


def wait_for_members(jail: Jailed, count: int) -> set[int]:
    deadline = time.monotonic() + 10
    while len(members := jail._cgroup.members()) < count:
        assert time.monotonic() < deadline, f"only {members} in the jail's cgroup"
        time.sleep(0.02)
    return members

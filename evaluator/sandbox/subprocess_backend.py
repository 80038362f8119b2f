"""The sandbox of `--sandbox none`: each jail is a plain subprocess that sees the host.

Unsandboxed and unofficial. What holds: the wall-clock limit, the rlimits (JailSpec.max_file_bytes
file by file) and, where this host has usable cgroups, the memory, pids and CPU limits.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from evaluator.sandbox.cgroups import cgroups_usable
from evaluator.sandbox.interface import Sandbox, create_jail_cgroup
from evaluator.sandbox.jailed import Jailed
from evaluator.sandbox.spec import JailSpec, jail_environment, jail_rlimits


@dataclass(frozen=True)
class SubprocessSandbox(Sandbox):
    kind: ClassVar[str] = "none"
    isolated: ClassVar[bool] = False

    def _start(self, spec: JailSpec) -> Jailed:
        """Paths, uid and gpu_index have no effect: the command sees the host, and only gpu_uuid
        (as CUDA_VISIBLE_DEVICES) keeps CUDA on the run's GPU. A cgroup only where cgroups are usable.
        """
        cgroup = create_jail_cgroup(spec, pids=spec.pids) if cgroups_usable() else None
        return Jailed(
            spec,
            argv=list(spec.argv),
            env=jail_environment(spec) | ({"CUDA_VISIBLE_DEVICES": spec.gpu_uuid} if spec.gpu_uuid else {}),
            cwd=Path(spec.cwd),
            cgroup=cgroup,
            rlimits={limit: (value, value) for limit, value in jail_rlimits(spec.max_file_bytes).items()},
            nsjail_log=None,
            leading_noise=None,
        )

    @contextmanager
    def capped_output_dir(self, path: Path, size_bytes: int) -> Iterator[None]:
        """No mount: the command can write wherever the evaluator can, so a mount would cap
        nothing; only JailSpec.max_file_bytes holds, file by file."""
        yield

    @contextmanager
    def memory_image(
        self, extra_paths: Iterable[Path], *, gpu: bool, parent: Path | None = None
    ) -> Iterator[Path | None]:
        """Without a jail there is nothing to seal: the block gets None."""
        yield None

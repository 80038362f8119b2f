"""The interface every sandbox backend implements (Sandbox), and what the backends share.

A backend is one kind of sandbox: nsjail (nsjail_backend.py) or a plain subprocess for `--sandbox
none` (subprocess_backend.py); backends.py picks one. Callers hold a Sandbox and never ask which
backend it is, beyond `kind` (recorded in the result) and `isolated`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from evaluator.sandbox.cgroups import Cgroup
from evaluator.sandbox.jailed import Jailed
from evaluator.sandbox.spec import JailSpec, SandboxUnavailable, validate


@dataclass(frozen=True)
class Sandbox(ABC):
    """Where jails run. Made by open_sandbox; immutable; one serves every jail of a run."""

    kind: ClassVar[str]  # "nsjail" | "none": the result's environment.sandbox.kind
    # True when a jail sees only what its JailSpec gives it (nsjail); False when it is a plain
    # process that sees the host (an unsandboxed, unofficial run).
    isolated: ClassVar[bool]

    version: str
    reason: str  # why open_sandbox picked this kind, and what it enforces
    # What this host could not give the jails, one "what: why" each (recorded in the result).
    unavailable: tuple[str, ...] = ()

    def start(self, spec: JailSpec) -> Jailed:
        """Start spec.argv in a new jail. Raises SandboxUnavailable when the jail cannot be set
        up (cgroups, launching nsjail); a failure inside nsjail is outcome() "sandbox_error".
        How much of the spec a backend enforces is the backend's to say (see its `_start`).
        """
        validate(spec)
        Path(spec.workdir).mkdir(parents=True, exist_ok=True)
        return self._start(spec)

    @abstractmethod
    def _start(self, spec: JailSpec) -> Jailed:
        """start() for a valid spec whose workdir exists."""

    @abstractmethod
    def capped_output_dir(self, path: Path, size_bytes: int) -> AbstractContextManager[None]:
        """While the block runs, the existing empty directory `path` is a tmpfs of `size_bytes`
        with at most OUTPUT_DIR_INODES inodes, so that a jail given it as an rw path cannot
        fill the host's disk (a bind of a disk directory could). Take what you need out of it
        before the block ends: it is then detached with whatever is left in it. A mount left by a
        killed evaluator is detached by reap_stale().

        Where the backend cannot cap anything (a process that writes wherever the evaluator can),
        the block runs on `path` as it is.
        """

    @abstractmethod
    def memory_image(
        self, extra_paths: Iterable[Path], *, gpu: bool, parent: Path | None = None
    ) -> AbstractContextManager[Path | None]:
        """While the block runs, a read-only tmpfs that holds everything a sealed Python jail
        needs (see evaluator/sandbox/memory_image.py) plus `extra_paths` (files or directories, copied
        whole, e.g. the in-jail evaluator modules, the staged submission and the model file), each
        at its host path below the yielded directory: pass it as JailSpec.sealed_image. `gpu`
        adds the NVIDIA driver's user-space libraries.

        The tmpfs is mounted on a new empty directory (under `parent`, else the system's temp
        dir; never inside a directory a jail sees) before anything is copied, so that every page of
        the image is tmpfs; then remounted read-only. At the end it is detached (lazily: a jail
        still running keeps its view) and the directory removed; a mount left by a killed
        evaluator is reaped by reap_stale(). Its pages count against the evaluator's memory, not
        the jail's. One image may serve several jails in turn.

        A backend without jails has nothing to seal: the block gets None. Raises
        memory_image.ImageError for an extra path that cannot be copied (missing, or not a regular
        file, directory or symlink), SandboxUnavailable when the tmpfs cannot be set up.
        """


def create_jail_cgroup(spec: JailSpec, pids: int) -> Cgroup:
    """The cgroups of the jail `spec` with a pids limit of `pids`; SandboxUnavailable if they cannot be made."""
    try:
        return Cgroup.create(spec.name, spec.memory_bytes, pids, spec.cpus)
    except OSError as error:
        reason = f"could not create the cgroups for jail {spec.name}: {error}"
        raise SandboxUnavailable(reason) from error

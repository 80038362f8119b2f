"""The nsjail sandbox: each jail is nsjail (config from nsjail.py) under cgroup limits, and the
evaluator, root, mounts the tmpfs a jail needs on the host (capped output dirs, sealed jails'
memory images)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from evaluator.sandbox import memory_image
from evaluator.sandbox.interface import Sandbox, create_jail_cgroup
from evaluator.sandbox.jailed import Jailed
from evaluator.sandbox.mounts import detach, mount_image_tmpfs, mount_output_tmpfs, remount_read_only
from evaluator.sandbox.nsjail import nsjail_binary, nsjail_config
from evaluator.sandbox.spec import NOBODY, JailSpec, SandboxUnavailable, host_library_dirs


@dataclass(frozen=True)
class NsjailSandbox(Sandbox):
    kind: ClassVar[str] = "nsjail"
    isolated: ClassVar[bool] = True

    def _start(self, spec: JailSpec) -> Jailed:
        """Each rw path itself (not its contents) is given to the jail's user, nobody, so that the
        jail can write there, and the time limit is rounded up to whole seconds."""
        from nsjail.serializers import to_textproto

        workdir = Path(spec.workdir)
        config_file, log_file = workdir / "nsjail.cfg", workdir / "nsjail.log"
        config_file.write_text(to_textproto(nsjail_config(spec, log_file)) + "\n")
        for path in spec.rw_paths:
            if os.path.lexists(path):
                os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
        log_file.unlink(missing_ok=True)  # outcome() must read this run's lines only
        binary = str(nsjail_binary())
        cgroup = create_jail_cgroup(spec, pids=spec.pids + 1)  # +1: the nsjail supervisor itself
        return Jailed(
            spec,
            argv=[binary, "--config", str(config_file)],
            env={},
            cwd=workdir,
            cgroup=cgroup,
            rlimits={},
            nsjail_log=log_file,
            leading_noise=f"(required by {binary})".encode(),
        )

    @contextmanager
    def capped_output_dir(self, path: Path, size_bytes: int) -> Iterator[None]:
        try:
            mount_output_tmpfs(Path(path), size_bytes)
        except OSError as error:
            raise SandboxUnavailable(f"could not mount a tmpfs on the output dir {path}: {error}") from error
        try:
            yield
        finally:
            detach(path)

    @contextmanager
    def memory_image(
        self, extra_paths: Iterable[Path], *, gpu: bool, parent: Path | None = None
    ) -> Iterator[Path | None]:
        library_dirs = host_library_dirs() if gpu else []
        plan = memory_image.plan(extra_paths, gpu=gpu, library_dirs=library_dirs)
        directory = Path(os.path.abspath(tempfile.mkdtemp(prefix="speedrun-image-", dir=parent)))
        try:
            try:
                mount_image_tmpfs(directory, plan.bytes_needed, plan.inodes_needed)
            except OSError as error:
                raise SandboxUnavailable(
                    f"could not mount a tmpfs for a memory image on {directory}: {error}"
                ) from error
            try:
                try:
                    memory_image.build(directory, plan)
                    remount_read_only(directory)
                except OSError as error:
                    raise SandboxUnavailable(f"could not build the memory image in {directory}: {error}") from error
                yield directory
            finally:
                detach(directory)
        finally:
            directory.rmdir()

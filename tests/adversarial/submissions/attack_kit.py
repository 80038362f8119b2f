"""Copied next to every attack's train.py: what the attacks share.

`require_jail` is the destructive attacks' own refusal to run outside nsjail's jail. The test module
confirms the jail with a harmless probe first; this is the second safety line. As root on the host,
kill(-1) would end every process of the machine and the writes would land in /usr.
"""

import errno
import fcntl
import json
import os
import socket
import stat
import sys

JAIL_HOSTNAME = "speedrun"
NOBODY = 65534
# A process that ignores every catchable signal and sleeps: what a daemon left behind would be.
_SLEEPER = (
    "import signal, sys, time\n"
    "for number in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGALRM):\n"
    "    signal.signal(number, signal.SIG_IGN)\n"
    "while True:\n"
    "    time.sleep(1)\n"
)


def require_jail(tracks_dir: str) -> None:
    """Return only inside the jail: pid 1 of its own namespace, its hostname, nobody, no spec/tracks."""
    import socket

    jailed = (
        os.getpid() == 1
        and socket.gethostname() == JAIL_HOSTNAME
        and os.getuid() == NOBODY
        and not os.path.exists(tracks_dir)
    )
    if not jailed:
        raise SystemExit("NOT IN THE JAIL: this attack refuses to run on the host")


def error_name(exc: BaseException) -> str:
    """EROFS, EPERM, ... for a system call's error; the exception's type otherwise."""
    if isinstance(exc, OSError) and exc.errno in errno.errorcode:
        return errno.errorcode[exc.errno]
    return type(exc).__name__


def outcome(action):
    """ "allowed" (or what the action returned), else the name of the error that stopped it."""
    try:
        result = action()
    except Exception as exc:
        return error_name(exc)
    return "allowed" if result is None else result


def report(findings: dict) -> None:
    """Ends the run: the test reads this line back from train.log."""
    raise RuntimeError("PROBE " + json.dumps(findings))


def job() -> dict:
    """The harness's job file (its path is the harness's --job argument): out_dir, scratch, ..."""
    with open(sys.argv[sys.argv.index("--job") + 1]) as handle:
        return json.load(handle)


def protocol_fd() -> int:
    """The harness's private pipe to the evaluator: a write-only pipe that is not stderr."""
    stderr_pipe = os.fstat(2).st_ino
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            info = os.fstat(fd)
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError:
            continue
        if (
            fd > 2
            and stat.S_ISFIFO(info.st_mode)
            and info.st_ino != stderr_pipe
            and flags & os.O_ACCMODE == os.O_WRONLY
        ):
            return fd
    raise RuntimeError("the protocol pipe was not found")


def daemonize(marker: str) -> None:
    """Double fork and setsid: a grandchild that outlives its parents, with `marker` in its argv."""
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, "-c", _SLEEPER, marker])
        os._exit(0)
    os.wait()


def read_start(path) -> str:
    """Reads up to 1 MiB of a file the jail must not see; the outcome tells whether it could."""
    with open(path, "rb") as handle:
        return f"read {len(handle.read(1 << 20))} bytes"


def connect_tcp(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass

# Appended to TINY_MODEL (tests/conftest.py). Harmless wherever it runs: it only reads, connects and
# lists, then reports what it found as one JSON line ("PROBE {...}") in the exception it raises.
# Its identity section is what the destructive attacks wait for: proof that runs are really jailed.
import hashlib
import os
import socket
import stat
import sys

from attack_kit import connect_tcp, outcome, read_start, report


def _send_udp(host, port):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.sendto(b"escaped", (host, port))


def _connect_unix(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        unix.settimeout(2)
        unix.connect(path)


def _sha256(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def _walk_visible_filesystem(canary_token, repo_root):
    """Everything the jail can see, minus /proc, /sys and /dev: what a thief would search."""
    found = {"parquet": {}, "key": {}, "sockets": [], "canaries": [], "repo": []}
    for top, dirs, files in os.walk("/"):
        if top == "/":
            dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev")]
        for name in dirs + files:
            path = os.path.join(top, name)
            if path.startswith(repo_root + "/") and not path.startswith(repo_root + "/.venv"):
                found["repo"].append(os.path.relpath(path, repo_root))
            if canary_token in name:
                found["canaries"].append(path)
        for name in files:
            path = os.path.join(top, name)
            try:
                mode = os.lstat(path).st_mode
            except OSError:
                continue
            if stat.S_ISSOCK(mode):
                found["sockets"].append(path)
            elif stat.S_ISREG(mode) and name.endswith((".parquet", ".key")):
                found["parquet" if name.endswith(".parquet") else "key"][path] = outcome(
                    lambda path=path: _sha256(path)
                )
    return found


def _processes(host_marker):
    seen = {}
    for pid in (name for name in os.listdir("/proc") if name.isdigit()):
        cmdline = outcome(lambda pid=pid: open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode())
        environ = outcome(lambda pid=pid: open(f"/proc/{pid}/environ", "rb").read())
        seen[pid] = {
            "cmdline": cmdline,
            "environ_has_marker": isinstance(environ, bytes) and host_marker.encode() in environ,
        }
    return seen


def _inherited_fds(canary_text):
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        target = outcome(lambda fd=fd: os.readlink(f"/proc/self/fd/{fd}"))
        holds_canary = False
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                holds_canary = canary_text.encode() in os.pread(fd, 1 << 16, 0)
        except OSError:
            pass
        fds[name] = {"target": target, "holds_canary": holds_canary}
    return fds


def _stdin():
    os.set_blocking(0, False)
    return {
        "isatty": os.isatty(0),
        "is_pipe": stat.S_ISFIFO(os.fstat(0).st_mode),
        "read": outcome(lambda: f"read {len(os.read(0, 4096))} bytes"),
    }


def train(ctx):
    c = ctx.config
    findings = {
        "identity": {
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "uid": os.getuid(),
            "tracks_dir_visible": os.path.exists(c["tracks_dir"]),
            "executable": sys.executable,
        },
        "network": {
            "tcp_host_listener": outcome(lambda: connect_tcp(c["tcp_port"])),
            "udp_host_socket": outcome(lambda: _send_udp("127.0.0.1", c["udp_port"])),
            "udp_outside": outcome(lambda: _send_udp("192.0.2.1", 53)),
            "dns": outcome(lambda: socket.getaddrinfo("example.com", 80) and "resolved"),
            "unix_host_socket": outcome(lambda: _connect_unix(c["unix_socket"])),
        },
        "reads": {
            "val_split": outcome(lambda: read_start(c["val_path"])),
            "tokenizer": outcome(lambda: read_start(c["tokenizer_path"])),
            "canary_in_repo": outcome(lambda: read_start(c["repo_canary"])),
            "canary_in_tmp": outcome(lambda: read_start(c["tmp_canary"])),
            "signing_key": outcome(lambda: read_start(c["signing_key"])),
            "host_process_cmdline": outcome(lambda: read_start(f"/proc/{c['host_pid']}/cmdline")),
            "host_process_environ": outcome(lambda: read_start(f"/proc/{c['host_pid']}/environ")),
            "tty": outcome(lambda: read_start("/dev/tty")),
        },
        "environment_has_marker": any(c["env_marker"] in value for value in os.environ.values()),
        "environment_keys": sorted(os.environ),
        "processes": _processes(c["env_marker"]),
        "fds": _inherited_fds(c["canary_text"]),
        "stdin": _stdin(),
        "filesystem": _walk_visible_filesystem(c["canary_token"], c["repo_root"]),
        "evaluator_modules": sorted(name for name in sys.modules if name.startswith("evaluator")),
        "host_module_import": outcome(lambda: __import__("evaluator.runner") and "imported"),
    }
    report(findings)

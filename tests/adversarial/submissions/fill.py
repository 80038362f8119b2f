# Appended to TINY_MODEL (tests/conftest.py). DESTRUCTIVE outside a jail: fills every writable
# place and starts threads until something refuses. It acts only after require_jail().
import os
import threading

from attack_kit import error_name, job, outcome, report, require_jail

CHUNK = b"\xff" * (1 << 20)
# Safety stops, far above every limit the jail should enforce: the test fails if one is reached.
MOST_BYTES = 2 << 30
MOST_FILES = 20_000
MOST_THREADS = 5_000


def _fill(path, keep=False):
    """Append 1 MiB chunks to one file until refused; the file is removed again unless `keep`."""
    written, stopped_by = 0, "safety stop"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while written < MOST_BYTES:
            written += os.write(fd, CHUNK)
    except OSError as exc:
        stopped_by = error_name(exc)
    finally:
        os.close(fd)
        if not keep:
            os.unlink(path)
    return {"bytes": written, "stopped_by": stopped_by}


def _fill_output(out_dir):
    """Two files, one after the other: the first meets the limit on a file, the second the limit on
    the directory."""
    first = os.path.join(out_dir, "model.pt")
    filled = [_fill(first, keep=True), _fill(os.path.join(out_dir, "second"))]
    os.unlink(first)
    return filled


def _many_files(directory):
    made, stopped_by = 0, "safety stop"
    try:
        while made < MOST_FILES:
            open(os.path.join(directory, f"empty-{made}"), "xb").close()
            made += 1
    except OSError as exc:
        stopped_by = error_name(exc)
    return {"files": made, "stopped_by": stopped_by}


def _sparse(path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        return outcome(lambda: os.ftruncate(fd, 8 << 30))
    finally:
        os.close(fd)


def _thread_bomb():
    release = threading.Event()
    started, stopped_by = 0, "safety stop"
    try:
        while started < MOST_THREADS:
            threading.Thread(target=release.wait, daemon=True).start()
            started += 1
    except RuntimeError as exc:
        stopped_by = type(exc).__name__
    release.set()
    return {"threads": started, "stopped_by": stopped_by}


def train(ctx):
    require_jail(ctx.config["tracks_dir"])
    out_dir = job()["out_dir"]
    findings = {
        "tmp": _fill("/tmp/fill"),
        "shm": _fill("/dev/shm/fill"),
        "scratch": _fill(os.path.join(str(ctx.scratch), "fill")),
        "output_two_files": _fill_output(out_dir),
        "output_sparse_8_gib": _sparse(os.path.join(out_dir, "sparse")),
        "output_many_files": _many_files(out_dir),
        "threads": _thread_bomb(),
    }
    report(findings)

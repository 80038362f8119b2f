# Appended to TINY_MODEL (tests/conftest.py). Harmless wherever it runs: it only lists and reads.
# It walks the whole tree the training jail shows (symlinks not followed; /proc, /sys and /dev left
# out), lists every regular file it can open with its size (zlib + base64, for the host to search
# for the validation split's text), and tries the canaries planted where no jail may look.
import base64
import os
import stat
import zlib

from attack_kit import outcome, report


def _openable_files():
    found = []
    for top, dirs, files in os.walk("/"):
        if top == "/":
            dirs[:] = [name for name in dirs if name not in ("proc", "sys", "dev")]
        for name in files:
            path = os.path.join(top, name)
            try:
                info = os.lstat(path)
                if stat.S_ISREG(info.st_mode):
                    os.close(os.open(path, os.O_RDONLY))
                    found.append(f"{path}\t{info.st_size}")
            except OSError:
                continue
    return found


def _read(path):
    with open(path) as file:
        return file.read()


def train(ctx):
    c = ctx.config
    files = _openable_files()
    report(
        {
            "files": len(files),
            "listing": base64.b64encode(zlib.compress("\n".join(files).encode(), 9)).decode(),
            "canaries": {path: outcome(lambda path=path: _read(path)) for path in c["canaries"]},
            "dataset_sources_exist": os.path.exists(c["dataset_sources"]),
            "dirs_listed": {path: outcome(lambda path=path: os.listdir(path)) for path in c["secret_dirs"]},
        }
    )

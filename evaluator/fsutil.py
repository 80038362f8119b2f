"""File helpers shared by every stage: hashing and crash-safe writes."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write via a temp file in the same directory, fsync, rename: a crash leaves old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


# Python writes these when a submission is imported in place; they are never part of a submission:
# `check` and the hash ignore them, and the jail only ever sees a staged copy without them.
IGNORED_DIRS = {"__pycache__"}


def submission_paths(root: Path) -> list[Path]:
    """Every path under root (files, dirs, links, specials) except ignored dirs, without following links."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_DIRS)
        found.extend(Path(dirpath) / name for name in sorted(dirnames + filenames))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def tree_members(root: Path) -> list[Path]:
    """What a submission tree is made of, for its hash and its staged copy alike: the regular files and
    symlinks under root outside ignored dirs, sorted by relative path.

    Folders are not members: one exists in a tree only as the parent of a member. An empty folder, or
    one that holds only ignored things, is neither hashed nor staged; were it staged, Python would
    import it as a namespace package, and two trees with the same hash could run differently. Special
    files are not members either (`evaluator check` refuses them and symlinks).
    """
    return [path for path in submission_paths(root) if path.is_symlink() or path.is_file()]


def tree_sha256(root: Path) -> str:
    """Hash of a folder: relative paths and contents of its members (`tree_members`), in sorted order.

    Symlinks are refused by `evaluator check` before anything is hashed; here they are hashed by their
    target so that a changed tree never hashes the same.
    """
    root = Path(root)
    digest = hashlib.sha256()
    for path in tree_members(root):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            digest.update(f"L {rel}\0{os.readlink(path)}\0".encode())
        else:
            digest.update(f"F {rel}\0{sha256_file(path)}\0".encode())
    return digest.hexdigest()


def stage_tree(root: Path, destination: Path) -> None:
    """Copy a checked submission's members to destination: the snapshot a run uses, whose hash is the
    source's. Only the folders that lead to a copied file are made; a symlink is never copied (a tree
    that holds one fails `evaluator check`, so it is never staged for a run)."""
    destination.mkdir(parents=True, exist_ok=True)
    for path in tree_members(root):
        if path.is_symlink():
            continue
        target = destination / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)

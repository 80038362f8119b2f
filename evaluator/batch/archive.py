"""The tar trip between machines: packing a folder, and unpacking an archive from another machine
so that nothing but plain files and folders, within a size cap, ever lands on this one.

Apart from the batch's scheduling because it is the trust boundary of the trip: the driver
unpacks what a node sends back, and a node unpacks the submission the driver sent.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
from pathlib import Path

from evaluator.check import FOLDER_MAX_BYTES

# A run directory travels through Ray's object store in one piece. A model larger than what is left
# of this stays on the node (it has been scored there already); the result, logs and metrics travel.
RUN_ARCHIVE_CAP_BYTES = 512 * 2**20
# `evaluator check` caps a submission at FOLDER_MAX_BYTES; tar adds a 512-byte header per file.
SUBMISSION_ARCHIVE_CAP_BYTES = 16 * FOLDER_MAX_BYTES


class UnsafeArchive(Exception):
    """An archive from another machine that is too large or holds more than plain files and folders."""


class ArchiveTooLarge(Exception):
    """A folder on this machine that packs to more than the cap it is to travel under."""


def pack_folder(root: Path, cap_bytes: int, leave_out: frozenset[str] = frozenset()) -> bytes:
    """The regular files under `root` as an uncompressed tar with relative names; links never travel."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for dirpath, dirnames, filenames in os.walk(root):  # never descends into linked folders
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                rel = path.relative_to(root).as_posix()
                if rel in leave_out:
                    continue
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                except OSError:  # a symlink (ELOOP) or a file that vanished: neither travels
                    continue
                with os.fdopen(fd, "rb") as handle:
                    info = os.fstat(handle.fileno())
                    if not stat.S_ISREG(info.st_mode):
                        continue
                    if buffer.tell() + info.st_size + 2048 > cap_bytes:
                        raise ArchiveTooLarge(f"{root} holds more than {cap_bytes} bytes (at {rel})")
                    member = tarfile.TarInfo(rel)
                    member.size = info.st_size
                    member.mode = 0o644
                    member.mtime = int(info.st_mtime)
                    archive.addfile(member, handle)
    if buffer.tell() > cap_bytes:  # closing pads the archive to a whole tar record
        raise ArchiveTooLarge(f"{root} packs to more than {cap_bytes} bytes")
    return buffer.getvalue()


def _member_parts(name: str) -> list[str]:
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if name.startswith("/") or not parts or ".." in parts:
        raise UnsafeArchive(f"member {name!r} is not a plain relative path")
    return parts


def extract_archive(data: bytes, dest: Path, cap_bytes: int) -> None:
    """Unpack `data` into the empty folder `dest`, refusing the whole archive at the first member that
    is a link, a device, a FIFO, an absolute path or one with `..`, or when it unpacks to more than
    `cap_bytes`. Only folders and regular files are ever created in `dest`, so no path followed while
    unpacking can be a link; a member named twice is refused rather than overwritten."""
    if len(data) > cap_bytes:
        raise UnsafeArchive(f"the archive is {len(data)} bytes; the cap is {cap_bytes}")
    if any(dest.iterdir()):
        raise ValueError(f"{dest} is not empty")
    unpacked = 0
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    except tarfile.TarError as exc:
        raise UnsafeArchive(f"not a tar archive: {exc}") from None
    with archive:
        for member in archive:
            target = dest.joinpath(*_member_parts(member.name))
            if member.isdir():
                target.mkdir(mode=0o755, parents=True, exist_ok=True)
            elif member.isfile():
                unpacked += member.size
                if unpacked > cap_bytes:
                    raise UnsafeArchive(f"the archive unpacks to more than {cap_bytes} bytes")
                target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                try:
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                except FileExistsError:
                    raise UnsafeArchive(f"member {member.name!r} appears twice") from None
                with os.fdopen(fd, "wb") as handle:
                    source = archive.extractfile(member)
                    assert source is not None  # tarfile gives every regular-file member a file object
                    with source:
                        shutil.copyfileobj(source, handle)
            else:
                kind = "link" if member.issym() or member.islnk() else "special file"
                raise UnsafeArchive(f"member {member.name!r} is a {kind}: only regular files and folders are accepted")

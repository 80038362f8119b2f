"""Which GPU a run gets, and the host locks that keep two runs off one GPU.

A GPU is named the way CUDA names it to the evaluator's process: an index in CUDA's enumeration,
which `CUDA_VISIBLE_DEVICES` (and Ray, which sets it per task) renumbers and CUDA orders fastest
first. The jail needs the board's device node, `/dev/nvidia<minor>`, whose minor number is the
driver's and follows neither order. The two meet at the PCI address: CUDA reports it for its index,
NVML reports it with the minor number. Inside the jail only that node exists, so CUDA there sees one
GPU, device 0.

Locks are `flock`s on files under LOCK_DIR, which live as long as the evaluator's process does (the
kernel drops them when it dies, however it dies): one per board, held exclusively by the run on it
from planning until its result is written, training and scoring both; and one for the host, held
shared by every run and exclusively by a run that scores a hidden split, so that nothing else
trains on the host while one does (THREAT_MODEL.md).
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from evaluator.errors import UserError
from evaluator.nvml import Board, NvmlUnavailable, busy_pids, driver_and_boards

# /run/lock is world-writable with the sticky bit on Debian, Ubuntu and Fedora, and a tmpfs: no
# lock file outlives a reboot. Where it is absent, the temporary directory serves.
LOCK_DIR = (Path("/run/lock") if Path("/run/lock").is_dir() else Path(tempfile.gettempdir())) / "speedrun-evaluator"
_HOLDER_MAX_CHARS = 200
_PCI_ADDRESS = re.compile(r"^([0-9a-fA-F]+):([0-9a-fA-F]+):([0-9a-fA-F]+)(?:\.[0-7])?$")


class GpuUnavailable(UserError):
    """No GPU of this host can take the run now: every one is held, or the one asked for is."""


@dataclass(frozen=True)
class Placement:
    """The GPU a run holds: CUDA's index for it in the evaluator's process, the board, the driver's
    version, and the other processes (host pids, as NVML gives them) that had work on it at the start."""

    cuda_index: int
    board: Board
    driver: str
    busy_pids: tuple[int, ...]


def pci_address(text: str) -> tuple[int, int, int]:
    """(domain, bus, device) of 'DDDDDDDD:BB:DD.F', the form NVML prints (4 or 8 domain digits)."""
    match = _PCI_ADDRESS.match(text.strip())
    if not match:
        raise ValueError(f"not a PCI address: {text!r}")
    domain, bus, device = (int(part, 16) for part in match.groups())
    return domain, bus, device


def cuda_pci_addresses() -> list[tuple[int, int, int]]:
    """(domain, bus, device) of each GPU in CUDA's order, as this process sees them."""
    import torch

    addresses: list[tuple[int, int, int]] = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        addresses.append((props.pci_domain_id, props.pci_bus_id, props.pci_device_id))  # type: ignore[attr-defined]  # torch's stub lacks pci_*
    return addresses


def cuda_boards() -> tuple[str, list[Board]]:
    """The driver's version and the board behind each CUDA index, in CUDA's order."""
    try:
        driver, boards = driver_and_boards()
    except NvmlUnavailable as exc:
        raise UserError(f"cannot tell which device node each GPU has without NVML: {exc}") from None
    by_address = {pci_address(board.pci_bus_id): board for board in boards}
    mapped = []
    for index, address in enumerate(cuda_pci_addresses()):
        if address not in by_address:
            raise UserError(
                f"CUDA's GPU {index} (PCI {address[0]:08x}:{address[1]:02x}:{address[2]:02x}) is not among "
                f"the {len(boards)} GPU(s) NVML lists; is the driver's library the one CUDA uses?"
            )
        mapped.append(by_address[address])
    return driver, mapped


def _open_lock_dir() -> int:
    """A descriptor of LOCK_DIR, made if missing. Refused: a symlink (a planted link would have us
    open, or chmod, whatever it points to) and a directory neither root nor this user owns (its owner
    could delete the locks of everyone else)."""
    try:
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOCK_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise UserError(
            f"cannot use the lock directory {LOCK_DIR}: {exc.strerror} (it must be a directory, not a link)"
        ) from None
    owner = os.fstat(fd).st_uid
    if owner not in (0, os.geteuid()):
        os.close(fd)
        raise UserError(
            f"the lock directory {LOCK_DIR} belongs to user {owner}, who could remove other runs' locks; "
            "have root remove it (it is made again)"
        )
    if owner == os.geteuid():
        os.fchmod(fd, 0o1777)  # every user's evaluator creates its locks here; the sticky bit keeps them theirs
    return fd


def _open_lock_file(name: str) -> int:
    directory = _open_lock_dir()
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # O_NONBLOCK: a FIFO planted here must not hang us
    try:
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | flags, 0o644, dir_fd=directory)
        except PermissionError:  # another user's lock file: flock works on a read-only descriptor too
            fd = os.open(name, os.O_RDONLY | flags, dir_fd=directory)
    except OSError as exc:
        raise UserError(f"cannot open the lock {LOCK_DIR / name}: {exc.strerror}") from None
    finally:
        os.close(directory)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"the lock {LOCK_DIR / name} is not a plain file; have root remove it")
    return fd


def _holder(fd: int) -> str:
    """What the run holding a lock wrote into it (its pid and run), shown as printable text."""
    try:
        text = os.pread(fd, _HOLDER_MAX_CHARS, 0).decode("utf-8", "replace")
    except OSError:
        return "another run"
    text = "".join(char if char.isprintable() else "?" for char in text.strip())
    return text or "another run"


@contextmanager
def _flock(name: str, exclusive: bool, holder: str) -> Iterator[str | None]:
    """Yields None while the lock is ours; when another run has it, holds nothing and yields what
    that run wrote into the lock file (its pid and run id)."""
    fd = _open_lock_file(name)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            yield _holder(fd)
            return
        if exclusive:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, holder.encode()[:_HOLDER_MAX_CHARS], 0)
            except OSError:
                pass  # another user's file, open read-only: the lock holds, only the note is missing
        yield None
    finally:
        os.close(fd)


@contextmanager
def hold_host(exclusive: bool, holder: str) -> Iterator[None]:
    """The host lock: shared by every run, exclusive for a run that scores a hidden split."""
    with _flock("host.lock", exclusive, holder) as other:
        if other is not None and exclusive:
            raise GpuUnavailable(
                "this run scores a hidden split, and nothing else may run on the host meanwhile; "
                "other runs of this evaluator are under way: wait for them to finish"
            )
        if other is not None:
            raise GpuUnavailable(f"a run that scores a hidden split holds this host ({other}); wait for it to finish")
        yield


def _board_lock_name(board: Board) -> str:
    domain, bus, device = pci_address(board.pci_bus_id)
    return f"gpu-{domain:08x}-{bus:02x}-{device:02x}.lock"


@contextmanager
def hold_gpu(requested: int | None, holder: str) -> Iterator[Placement]:
    """Lock the GPU with CUDA index `requested`, or else the first one no other run holds."""
    driver, boards = cuda_boards()
    if not boards:
        raise UserError("CUDA lists no GPU here")
    if requested is not None and not 0 <= requested < len(boards):
        raise UserError(f"--gpu {requested}: CUDA sees {len(boards)} GPU(s) here, numbered 0 to {len(boards) - 1}")
    with ExitStack() as stack:
        holders = []
        for index in [requested] if requested is not None else range(len(boards)):
            board = boards[index]
            other = stack.enter_context(_flock(_board_lock_name(board), True, holder))
            if other is None:
                busy = tuple(pid for pid in _other_pids(board) if pid != os.getpid())
                yield Placement(cuda_index=index, board=board, driver=driver, busy_pids=busy)
                return
            holders.append(other)
        if requested is not None:
            raise GpuUnavailable(
                f"GPU {requested} ({boards[requested].pci_bus_id}) is held by {holders[0]}; "
                "wait for it, or choose another with --gpu N"
            )
        raise GpuUnavailable(
            f"every GPU of this host ({len(boards)}) is held by another run of this evaluator "
            f"({'; '.join(holders)}); wait for one to finish"
        )


def _other_pids(board: Board) -> list[int]:
    try:
        return busy_pids(board.minor)
    except NvmlUnavailable:
        return []

"""What a jail that is not sealed (the training jail) sees of the host: an allow-list, never a
system folder wholesale.

The allow-list is the trusted plan of a sealed image (memory_image.trusted_plan: the interpreter,
the standard library less its tests and pydoc_data, the distributions asked for with their
requirements, the closure of their shared libraries, the few /etc files, the NVIDIA driver's
libraries for a GPU jail), kept whole instead of slim, plus the C/C++ compiler that torch.compile's
inductor runs (the compiler drivers and the programs they run, their install directory, the
include directories they search, the start files and libraries they link with, the Python headers).
Everything else of the host, /usr/share (a dataset's sources: python3.11-doc) included, is absent.

It is bound read-only at host paths with as few mounts as the tree allows: a directory whose every
entry is allowed is bound whole; one whose only disallowed entries are directories is bound whole
with an empty read-only tmpfs over each of those (where that takes fewer mounts); any other is
entered and its allowed entries placed one by one (files bound, symlinks recreated as symlinks).

Host side only, standard library only. Computed once per process for each (gpu, library dirs,
distributions): a run's jail gets it before the clock starts.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass

from evaluator.sandbox.memory_image import DISTRIBUTIONS, ImagePlan, trusted_plan

# Where a jail's PATH looks for programs (training's jail environment sets this PATH).
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
# The compiler drivers torch.compile and friends call: inductor `g++` (or $CXX), triton `cc`/`gcc`
# (or $CC), torch.utils.cpp_extension `c++`.
_COMPILERS = ("g++", "c++", "gcc", "cc")
# What a compiler driver runs (-print-prog-name answers a bare name for those it finds on PATH).
_COMPILER_PROGRAMS = ("cc1plus", "cc1", "collect2", "lto-wrapper", "as", "ld")
# What a link of a shared object or program reads besides the compiler's install directory: the C
# runtime's start files and the libraries g++ links by default (-lstdc++ -lm -lc -lgcc_s) or
# inductor asks for (-lgomp -lpthread); -print-file-name finds each as the linker would.
_LINK_INPUTS = (
    "crt1.o",
    "Scrt1.o",
    "crti.o",
    "crtn.o",
    "libc.so",
    "libc.a",
    "libc_nonshared.a",
    "libm.so",
    "libmvec.so",
    "libpthread.so",
    "libpthread.a",
    "libdl.so",
    "libdl.a",
    "librt.so",
    "librt.a",
    "libgcc_s.so",
    "libgcc.a",
    "libgomp.so",
    "libstdc++.so",
)
# Programs the compile path runs besides the compiler: inductor hashes a precompiled header with
# `openssl sha512`; triton (GPU) finds libcuda with `ldconfig -p`.
_HELPER_PROGRAMS = ("openssl", "ldconfig")
_HELPER_PATH = SYSTEM_PATH + ":/usr/sbin:/sbin"
# A linker script's inputs: absolute paths, bare library names and -l options.
_LINKER_SCRIPT_INPUT = re.compile(r"(?<![\w./+-])(-l[\w.+-]+|[\w./+-]+\.(?:so(?:\.[\d.]+)?|a|o))(?![\w./+-])")
_INCLUDE_LIST = re.compile(r"#include <\.\.\.> search starts here:\n(.*?)\nEnd of search list\.", re.DOTALL)


@dataclass(frozen=True)
class HostView:
    """The read-only mounts that show the allow-list at host paths, in the order nsjail must make
    them (a directory before what covers it): ("dir", path) and ("file", path), bound at the same
    path; ("cover", path), an empty read-only tmpfs; ("symlink", path, target)."""

    mounts: tuple[tuple[str, ...], ...]
    files: int  # regular files a jail can read through them: the plan's, no more
    file_bytes: int


@functools.cache
def host_view(gpu: bool, library_dirs: tuple[str, ...], distributions: tuple[str, ...]) -> HostView:
    """The training jail's view: `distributions` (installed distribution names) besides torch and
    numpy, with gpu=True the driver's libraries as found in `library_dirs` and by ldconfig."""
    wanted = tuple(dict.fromkeys(DISTRIBUTIONS + distributions))
    plan = trusted_plan(gpu, library_dirs, wanted, compiler_paths(), slim=False)
    return _mounts(plan)


# --- the compiler --------------------------------------------------------------------------------


@functools.cache
def compiler_paths() -> tuple[str, ...]:
    """The host files and directories a C/C++ compile and link needs, as the installed compilers
    report them; none where no compiler is installed (torch.compile then fails as on such a host)."""
    paths: list[str] = []
    for name in _COMPILERS:
        compiler = shutil.which(name, path=SYSTEM_PATH)
        if compiler is None:
            continue
        paths.append(compiler)
        for program in _COMPILER_PROGRAMS:
            named = _ask(compiler, f"-print-prog-name={program}")
            found = named if os.path.isabs(named) else shutil.which(named, path=SYSTEM_PATH)
            if found and os.path.exists(found):
                paths.append(found)
        for line in _ask(compiler, "-print-search-dirs").splitlines():
            if line.startswith("install: "):
                paths.append(line.removeprefix("install: "))
        language = "c++" if name in ("g++", "c++") else "c"
        listing = _ask(compiler, "-E", "-v", "-x", language, os.devnull, stream="stderr")
        if match := _INCLUDE_LIST.search(listing):
            paths += [line.strip() for line in match.group(1).splitlines()]
        paths += _link_inputs(compiler, _LINK_INPUTS)
    paths += [path for key in ("include", "platinclude") if (path := sysconfig.get_paths()[key])]
    paths += [found for name in _HELPER_PROGRAMS if (found := shutil.which(name, path=_HELPER_PATH))]
    return tuple(path for path in dict.fromkeys(os.path.normpath(p) for p in paths) if os.path.exists(path))


def _link_inputs(compiler: str, names: Iterable[str]) -> list[str]:
    """The files `names` as the compiler's linker finds them, and the inputs of those that are
    linker scripts (libc.so names libc.so.6 and libc_nonshared.a), transitively."""
    found: list[str] = []
    pending = list(names)
    asked: set[str] = set()
    while pending:
        name = pending.pop()
        if name in asked:
            continue
        asked.add(name)
        path = name if os.path.isabs(name) else _ask(compiler, f"-print-file-name={name}")
        if not os.path.isabs(path) or not os.path.isfile(path):
            continue
        found.append(path)
        for token in _LINKER_SCRIPT_INPUT.findall(_linker_script(path)):
            if token.startswith("-l"):
                pending += [f"lib{token[2:]}.so", f"lib{token[2:]}.a"]
            else:
                pending.append(token)
    return found


def _linker_script(path: str) -> str:
    """The text of a GNU ld script without its comments, or "" for any other file."""
    try:
        with open(path, "rb") as file:
            head = file.read(4096)
    except OSError:
        return ""
    if head.startswith(b"\x7fELF") or b"\0" in head:
        return ""
    return re.sub(r"/\*.*?\*/", " ", head.decode("utf-8", "replace"), flags=re.DOTALL)


def _ask(compiler: str, *arguments: str, stream: str = "stdout") -> str:
    try:
        result = subprocess.run(
            [compiler, *arguments],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
            env={"PATH": SYSTEM_PATH, "LC_ALL": "C"},
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return getattr(result, stream).strip()


# --- mounts --------------------------------------------------------------------------------------


def _mounts(plan: ImagePlan) -> HostView:
    files = dict(plan.files)
    links = dict(plan.symlinks)
    children: dict[str, list[str]] = {}
    for path in [*plan.dirs, *files, *links]:
        children.setdefault(os.path.dirname(path), []).append(path)

    # Per allowed directory: the disallowed directories that covers would hide, or None where it
    # holds a disallowed entry that is not a directory (or an allowed directory that does), which
    # only placing its allowed entries one by one keeps out.
    covers: dict[str, list[str] | None] = {}
    for directory in sorted(plan.dirs, key=lambda path: path.count("/"), reverse=True):
        hidden: list[str] | None = []
        try:
            entries = list(os.scandir(directory))
        except OSError:
            entries = []
        for entry in entries:
            if entry.path in plan.dirs:
                below = covers[entry.path]
                hidden = None if hidden is None or below is None else hidden + below
            elif entry.path in files or entry.path in links:
                continue
            elif hidden is not None and entry.is_dir(follow_symlinks=False):
                hidden.append(entry.path)
            else:
                hidden = None
        covers[directory] = hidden

    mounts: list[tuple[str, ...]] = []

    def place(directory: str) -> None:
        entries = sorted(children.get(directory, []))
        one_by_one = sum(_mount_count(entry, children, covers) for entry in entries)
        hidden = covers[directory] if directory != "/" else None
        if hidden is not None and 1 + len(hidden) <= max(one_by_one, 1):  # an empty one needs its mount
            mounts.append(("dir", directory))
            mounts.extend(("cover", path) for path in sorted(hidden))
            return
        for entry in entries:
            if entry in links:
                mounts.append(("symlink", entry, links[entry]))
            elif entry in files:
                mounts.append(("file", entry))
            else:
                place(entry)

    place("/")
    return HostView(tuple(mounts), len(plan.files), plan.file_bytes)


def _mount_count(path: str, children: dict[str, list[str]], covers: dict[str, list[str] | None]) -> int:
    """The mounts `path` takes when its parent is placed entry by entry (an upper bound for a
    directory: itself whole with covers, if that is allowed, else its entries)."""
    if path not in covers:
        return 1
    hidden = covers[path]
    if hidden is not None:
        return 1 + len(hidden)
    return sum(_mount_count(entry, children, covers) for entry in children.get(path, []))

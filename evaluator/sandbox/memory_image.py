"""The file tree of a sealed jail: a copy of what a jailed Python needs, for a memory-backed image.

A sealed jail (JailSpec.sealed_image) sees no host file at all, only this copy, which
`Sandbox.memory_image` builds into a tmpfs of its own. tmpfs pages are always resident (they can
only go to swap, which the image's mount refuses where the kernel offers `noswap`), so what a jail
does to them says nothing to any other process, and nothing it does touches the host's page cache
of real files, which other jails share (mincore, RWF_NOWAIT reads or plain read timings would tell
them which pages were touched or evicted).

Every path keeps its host path: `root/work/main/.venv/bin/python` is the host's
`/work/main/.venv/bin/python`. Symlinks on the way (merged-/usr's `/lib -> usr/lib`, the venv's
`bin/python -> /root/.pyenv/...`) are recreated as symlinks and what they point at is copied too.

The image holds:
- the interpreter (sys.executable and what it resolves to), libpython, the standard library of
  sys.base_prefix without site-packages, tests, IDLE, Tk, turtledemo, ensurepip, lib2to3,
  pydoc_data (the documentation's text) and the static-build `config-*` dir, and the venv's
  pyvenv.cfg;
- from the venv's site-packages: the distributions in DISTRIBUTIONS and the closure of their
  requirements (environment markers evaluated, extras skipped; on a CUDA host the nvidia-* wheels),
  each by its RECORD (`dist.files`) less C headers, static archives and type stubs (there is no
  compiler in the image to use them), plus its whole .dist-info; and the `.pth` and editable-finder
  files that put the `evaluator` package on sys.path;
- the caller's extra paths, files or directories copied whole;
- the dynamic loader and the closure of the shared libraries the trusted ELF objects above need,
  from one `ldd` run over all of them, plus /etc/ld.so.cache and the few /etc files a jail reads;
- with gpu=True, the NVIDIA driver's user-space libraries and their closure.

The same trusted plan, less slim and with more distributions and the compiler's files, is what a
jail that is not sealed sees of the host (host_view.py binds it instead of copying it).

The trusted part of a plan is computed once per process (cached); a build then only copies.
Host side only: standard library imports (and evaluator.paths, itself standard library only);
nothing here imports torch.
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib.metadata
import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass

from packaging.markers import UndefinedEnvironmentName
from packaging.requirements import InvalidRequirement, Requirement

from evaluator.paths import PACKAGE_DIR

# The installed distributions a scoring jail imports; their requirements come with them.
DISTRIBUTIONS = ("torch", "numpy")
# What the dynamic loader, Python and torch read from /etc. Not /etc/localtime: it points into
# /usr/share, which no jail sees, and without it a jail's local time is UTC.
ETC_FILES = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/hosts",
)
# Top-level entries of the standard library that no jail imports. pydoc_data holds the Python
# documentation as text (topics.py): a dataset built from that documentation must not be in a jail.
_STDLIB_SKIPPED = {
    "site-packages",
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "__phello__",
    "pydoc_data",
}
# Test packages nested in the standard library (ctypes/test, unittest/test, distutils/tests, ...).
_STDLIB_NESTED_SKIPPED = {"test", "tests", "idle_test"}
_STDLIB_DYNLOAD_SKIPPED = re.compile(r"(_tkinter|_test|_ctypes_test|_xxtestfuzz|xxlimited)\b")
# Files of a distribution's RECORD that nothing in a jail without a compiler reads (a slim plan's
# saving: a sealed image is copied into memory).
_DIST_SKIPPED_SUFFIXES = (".h", ".hh", ".hpp", ".hxx", ".cuh", ".inl", ".pyi", ".a")
_DRIVER_LIBRARY = re.compile(r"lib(cuda|nvidia-[A-Za-z0-9_.+-]+?)\.so(\.[0-9.]+)?$")
_SHARED_OBJECT = re.compile(r"\.so($|\.)")
_LDD_PATH = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-fA-F]+\)$")
_PAGE = 4096
_MAX_SYMLINK_HOPS = 40
# Per-file work is a few system calls; threads overlap them (sendfile releases the GIL).
_COPY_THREADS = min(8, os.cpu_count() or 1)


class ImageError(ValueError):
    """A path cannot go into an image (a caller's special file, a missing path, a broken link)."""


@dataclass(frozen=True)
class ImagePlan:
    """What an image holds, by absolute host path: real directories, symlinks (path -> target as
    written on the host) and regular files (path -> size when planned)."""

    dirs: frozenset[str]
    symlinks: tuple[tuple[str, str], ...]
    files: tuple[tuple[str, int], ...]

    @property
    def file_bytes(self) -> int:
        return sum(size for _, size in self.files)

    @property
    def bytes_needed(self) -> int:
        """tmpfs blocks: every file rounded up to whole pages, a page per symlink (long targets
        take one), and slack for files that grew since they were planned."""
        pages = sum(-(-size // _PAGE) for _, size in self.files) + len(self.symlinks)
        used = pages * _PAGE
        return used + used // 64 + (16 << 20)

    @property
    def inodes_needed(self) -> int:
        return len(self.dirs) + len(self.symlinks) + len(self.files) + 1024


@dataclass(frozen=True)
class BuildStats:
    files: int
    file_bytes: int
    seconds: float


class _Collector:
    """Gathers paths into a plan, resolving each one component by component as the kernel would,
    so that every symlink on the way is recorded and every directory is the real one."""

    def __init__(self, base: ImagePlan | None = None):
        self.dirs: set[str] = set(base.dirs) if base else set()
        self.symlinks: dict[str, str] = dict(base.symlinks) if base else {}
        self.files: dict[str, int] = dict(base.files) if base else {}
        self._walked: set[str] = set()  # directories whose contents are in (a link may loop back)
        self._resolved: dict[str, str] = {}  # directory as given -> its real path

    def freeze(self) -> ImagePlan:
        return ImagePlan(frozenset(self.dirs), tuple(sorted(self.symlinks.items())), tuple(sorted(self.files.items())))

    def resolve(self, path: str) -> str:
        """The symlink-free path that `path` names (which must exist), recording the symlinks
        passed and the directories entered; the last component is left unrecorded."""
        if not os.path.isabs(path):
            raise ImageError(f"image paths must be absolute: {path!r}")
        head, tail = os.path.split(path)
        if tail in ("", ".", ".."):
            return self._walk("/", path, path)
        real_head = self._resolved.get(head)
        if real_head is None:  # each directory is resolved once: plans hold tens of thousands of files
            real_head = self._walk("/", head, path)
            if real_head != "/":
                if not os.path.isdir(real_head):
                    raise ImageError(f"cannot add {path} to the image: {real_head} is not a directory")
                self.dirs.add(real_head)
            self._resolved[head] = real_head
        return self._walk(real_head, tail, path)

    def _walk(self, real: str, relative: str, path: str) -> str:
        pending = [part for part in relative.split("/") if part]
        hops = 0
        while pending:
            name = pending.pop(0)
            if name == ".":
                continue
            if name == "..":
                real = os.path.dirname(real)
                continue
            candidate = os.path.join(real, name)
            try:
                info = os.lstat(candidate)
            except OSError as error:
                raise ImageError(f"cannot add {path} to the image: {candidate}: {error.strerror}") from None
            if stat.S_ISLNK(info.st_mode):
                hops += 1
                if hops > _MAX_SYMLINK_HOPS:
                    raise ImageError(f"cannot add {path} to the image: too many levels of symlinks")
                target = os.readlink(candidate)
                self.symlinks[candidate] = target
                if target.startswith("/"):
                    real = "/"
                pending[:0] = [part for part in target.split("/") if part]
                continue
            if pending:
                if not stat.S_ISDIR(info.st_mode):
                    raise ImageError(f"cannot add {path} to the image: {candidate} is not a directory")
                self.dirs.add(candidate)
            real = candidate
        return real

    def add(self, path: str | os.PathLike, *, caller: bool = False, skip=None) -> None:
        """A file, or a directory with everything in it. The path itself may pass through symlinks
        (they are followed); inside a directory, a symlink of a trusted tree is followed too, one
        of a caller's tree is recreated as it is and never followed (a caller's tree may be a
        submission's). A socket, FIFO or device is skipped in a trusted tree and refused in a
        caller's. `skip(real_path, is_dir)` prunes a trusted tree."""
        real = self.resolve(os.fspath(path))
        info = os.lstat(real)
        if stat.S_ISREG(info.st_mode):
            self.files[real] = info.st_size
        elif stat.S_ISDIR(info.st_mode):
            self.dirs.add(real)
            if real not in self._walked:
                self._walked.add(real)
                self._add_tree(real, caller, skip)
        elif caller:
            raise ImageError(f"{path} is not a regular file, directory or symlink")

    def add_if_present(self, path: str | os.PathLike, **options) -> None:
        if os.path.lexists(path):
            try:
                self.add(path, **options)
            except ImageError:
                if options.get("caller"):
                    raise

    def _add_tree(self, top: str, caller: bool, skip) -> None:
        stack = [top]
        while stack:
            directory = stack.pop()
            with os.scandir(directory) as entries:
                for entry in entries:
                    info = entry.stat(follow_symlinks=False)
                    is_dir = stat.S_ISDIR(info.st_mode)
                    if skip is not None and skip(entry.path, is_dir):
                        continue
                    if is_dir:
                        self.dirs.add(entry.path)
                        if entry.path not in self._walked:
                            self._walked.add(entry.path)
                            stack.append(entry.path)
                    elif stat.S_ISREG(info.st_mode):
                        self.files[entry.path] = info.st_size
                    elif stat.S_ISLNK(info.st_mode):
                        if caller:
                            self.symlinks[entry.path] = os.readlink(entry.path)
                        else:
                            self.add_if_present(entry.path, skip=skip)
                            self.symlinks[entry.path] = os.readlink(entry.path)
                    elif caller:
                        raise ImageError(f"{entry.path} is not a regular file, directory or symlink")


# --- planning ------------------------------------------------------------------------------------


def plan(
    extra_paths: Iterable[str | os.PathLike], *, gpu: bool, library_dirs: Iterable[str | os.PathLike] = ()
) -> ImagePlan:
    """The image for this interpreter plus `extra_paths` (each a file or a directory, copied whole).

    `library_dirs` are the directories a GPU jail's LD_LIBRARY_PATH names (the host's, in order);
    with gpu=True the driver's libraries are looked for there too and the library closure is
    resolved with that search path, as the jail's loader will. Raises ImageError for an extra path
    that is missing or is not a regular file, directory or symlink (or holds such a thing).
    """
    dirs = tuple(os.fspath(d) for d in library_dirs) if gpu else ()
    collector = _Collector(trusted_plan(gpu, dirs))
    for path in extra_paths:
        # Never run ldd on these: it may execute code of the object it inspects, and a caller's
        # tree may hold a submission's. Their libraries must come from the trusted closure.
        collector.add(path, caller=True)
    return collector.freeze()


@functools.cache
def trusted_plan(
    gpu: bool,
    library_dirs: tuple[str, ...],
    distributions: tuple[str, ...] = DISTRIBUTIONS,
    trusted_paths: tuple[str, ...] = (),
    slim: bool = True,
) -> ImagePlan:
    """What a jail's Python needs of the host: the interpreter and its standard library, the
    installed `distributions` with their requirements, `trusted_paths` (host files and directories,
    such as a compiler's; an ELF file named there is inspected by ldd with the rest), the closure of
    their shared libraries, the /etc files, and with gpu=True the NVIDIA driver's libraries.

    slim=True (a sealed image, copied into memory) leaves out what only saves bytes: the
    distributions' C headers, static archives and type stubs, the standard library's -O caches and
    its C test modules. A plan that is bound, not copied, keeps them (slim=False): a compiler reads
    the headers, and directories that stay whole need fewer mounts."""
    collector = _Collector()
    objects: list[str] = []  # ELF objects whose libraries the jail's loader will need

    collector.add(sys.executable)
    objects.append(os.path.realpath(sys.executable))
    libpython = _libpython()
    for path in libpython:
        collector.add(path)
    objects += [os.path.realpath(path) for path in libpython]
    if sys.prefix != sys.base_prefix:
        collector.add_if_present(os.path.join(sys.prefix, "pyvenv.cfg"))
    for stdlib in dict.fromkeys(_stdlib_dirs()):
        collector.add(stdlib, skip=_stdlib_skip(stdlib, slim))

    site_dirs = _site_dirs()
    for dist in _distribution_closure(distributions, site_dirs):
        _add_distribution(collector, dist, slim)
    for path in _evaluator_path_files(site_dirs):
        collector.add(path)
    for path in trusted_paths:
        collector.add(path)
        if os.path.isfile(path) and _is_elf(path):
            objects.append(os.path.realpath(path))

    if gpu:
        # Not testable without a GPU host: the driver's user-space half (libcuda, libnvidia-ml,
        # libnvidia-ptxjitcompiler, ...) as ldconfig and the jail's LD_LIBRARY_PATH find it.
        machine = _elf_machine(os.path.realpath(sys.executable))
        for path in _driver_libraries(library_dirs):
            if _elf_machine(path) == machine:  # not the 32-bit copies ldconfig also lists
                collector.add_if_present(path)
                objects.append(os.path.realpath(path))

    objects += [path for path in collector.files if _SHARED_OBJECT.search(path) and _is_elf(path)]
    for library in _library_closure(tuple(dict.fromkeys(objects)), ":".join(library_dirs)):
        collector.add_if_present(library)
    for path in ETC_FILES:
        collector.add_if_present(path)
    return collector.freeze()


def _libpython() -> list[str]:
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return []
    libdir = sysconfig.get_config_var("LIBDIR") or os.path.join(sys.base_prefix, "lib")
    names = (sysconfig.get_config_var("LDLIBRARY"), sysconfig.get_config_var("INSTSONAME"))
    return [
        os.path.join(libdir, name)
        for name in dict.fromkeys(filter(None, names))
        if os.path.exists(os.path.join(libdir, name))
    ]


def _stdlib_dirs() -> list[str]:
    base = {
        "base": sys.base_prefix,
        "platbase": sys.base_prefix,
        "installed_base": sys.base_prefix,
        "installed_platbase": sys.base_prefix,
    }
    paths = sysconfig.get_paths(vars=base)
    return [os.path.realpath(paths[key]) for key in ("stdlib", "platstdlib") if os.path.isdir(paths[key])]


def _stdlib_skip(stdlib: str, slim: bool):
    top = stdlib.rstrip("/") + "/"
    dynload = top + "lib-dynload/"

    def skip(path: str, is_dir: bool) -> bool:
        relative = path[len(top) :]
        name = os.path.basename(path)
        if "/" not in relative:  # a top-level entry
            return name in _STDLIB_SKIPPED or (is_dir and name.startswith("config-"))
        if is_dir:
            return name in _STDLIB_NESTED_SKIPPED
        if not slim:
            return False
        if path.startswith(dynload):
            return bool(_STDLIB_DYNLOAD_SKIPPED.match(name))
        return ".opt-1.pyc" in name or ".opt-2.pyc" in name  # only -O and -OO read these

    return skip


def _site_dirs() -> list[str]:
    paths = sysconfig.get_paths()  # this interpreter's scheme: the venv's site-packages
    return [path for path in dict.fromkeys((paths["purelib"], paths["platlib"])) if os.path.isdir(path)]


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _distribution_closure(names: Iterable[str], site_dirs: list[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions `names` and, transitively, the requirements their environment
    markers select (extras never), in the order found. A requirement not installed is skipped."""
    found: dict[str, importlib.metadata.Distribution] = {}
    pending = list(names)
    while pending:
        key = _normalized(pending.pop(0))
        if key in found:
            continue
        dist = next(iter(importlib.metadata.distributions(name=key, path=site_dirs)), None)
        if dist is None:
            continue
        found[key] = dist
        for requirement in dist.requires or []:
            name = _selected_requirement(requirement)
            if name is not None:
                pending.append(name)
    return list(found.values())


def _add_distribution(collector: _Collector, dist: importlib.metadata.Distribution, slim: bool) -> None:
    files = dist.files
    name = dist.metadata["Name"]
    if files is None:
        raise ImageError(f"the installed distribution {name} lists no files (no RECORD)")
    for file in files:
        if slim and (file.suffix in _DIST_SKIPPED_SUFFIXES or file.name.endswith((".opt-1.pyc", ".opt-2.pyc"))):
            continue
        path = str(dist.locate_file(file))  # may hold "..": resolve() walks it as the kernel does
        collector.add_if_present(path)
        if file.suffix == ".py":  # the compiled module, should the RECORD not list it
            collector.add_if_present(importlib.util.cache_from_source(path))
    info_dir = getattr(dist, "_path", None)
    if info_dir is not None and os.path.isdir(info_dir):
        collector.add(info_dir)


def _evaluator_path_files(site_dirs: list[str]) -> list[str]:
    """The site-packages files that put the (editable) `evaluator` package on sys.path: setuptools'
    `__editable__*finder.py` mapping it to its folder, and the `.pth` files that name that folder,
    its parent or such a finder."""
    package, repository = str(PACKAGE_DIR), str(PACKAGE_DIR.parent)
    chosen: list[str] = []
    finders: list[str] = []
    for site_dir in site_dirs:
        for entry in sorted(os.scandir(site_dir), key=lambda e: e.name):
            if entry.name.startswith("__editable__") and entry.name.endswith(".py") and entry.is_file():
                if repr(package) in _read_text(entry.path):
                    chosen.append(entry.path)
                    finders.append(entry.name[:-3])
                    cached = importlib.util.cache_from_source(entry.path)
                    if os.path.isfile(cached):
                        chosen.append(cached)
    for site_dir in site_dirs:
        for entry in sorted(os.scandir(site_dir), key=lambda e: e.name):
            if entry.name.endswith(".pth") and entry.is_file():
                lines = [line.strip() for line in _read_text(entry.path).splitlines()]
                if any(line in (package, repository) for line in lines) or any(
                    re.search(rf"\bimport\s+{re.escape(finder)}\b", line) for line in lines for finder in finders
                ):
                    chosen.append(entry.path)
    return chosen


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return file.read(1 << 20)
    except OSError:
        return ""


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(4) == b"\x7fELF"
    except OSError:
        return False


def _elf_machine(path: str) -> bytes | None:
    """An ELF file's class, byte order and machine (header bytes 4, 5 and 18-19), or None."""
    try:
        with open(path, "rb") as file:
            header = file.read(20)
    except OSError:
        return None
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    return header[4:6] + header[18:20]


def _driver_libraries(library_dirs: tuple[str, ...]) -> list[str]:
    """libcuda.so* and libnvidia-*.so* as `ldconfig -p` lists them and in `library_dirs`."""
    found: list[str] = []
    ldconfig = shutil.which("ldconfig", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if ldconfig is not None:
        try:
            listing = subprocess.run(
                [ldconfig, "-p"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin", "LC_ALL": "C"},
            ).stdout
        except (OSError, subprocess.SubprocessError):
            listing = ""
        for line in listing.splitlines():
            name, arrow, path = line.strip().partition(" => ")
            if arrow and _DRIVER_LIBRARY.match(name.split()[0]) and os.path.isabs(path):
                found.append(path.strip())
    for directory in library_dirs:
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        found += [os.path.join(directory, name) for name in names if _DRIVER_LIBRARY.match(name)]
    return list(dict.fromkeys(found))


def _library_closure(objects: tuple[str, ...], library_path: str) -> list[str]:
    """Every library (and the dynamic loader) that the loader maps for any of `objects`, as ldd
    reports it: one ldd run over all of them (in chunks that fit an argument list), whose output is
    already the transitive closure. The search path is the jail's: LD_LIBRARY_PATH = library_path
    (a GPU jail's) or none."""
    ldd = shutil.which("ldd", path="/usr/bin:/bin")
    if ldd is None:
        raise ImageError("ldd is not installed: cannot find the shared libraries a sealed jail needs")
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
    if library_path:
        env["LD_LIBRARY_PATH"] = library_path
    libraries: dict[str, None] = {}
    chunk: list[str] = []
    chunks: list[list[str]] = []
    length = 0
    for path in objects:
        if chunk and length + len(path) > 100_000:
            chunks.append(chunk)
            chunk, length = [], 0
        chunk.append(path)
        length += len(path) + 1
    if chunk:
        chunks.append(chunk)
    for paths in chunks:
        try:
            result = subprocess.run([ldd, *paths], capture_output=True, text=True, timeout=300, check=False, env=env)
        except (OSError, subprocess.SubprocessError) as error:
            raise ImageError(f"ldd failed: {error}") from error
        # ldd exits 1 when one of many is not dynamic; the others' lines are still there.
        for line in result.stdout.splitlines():
            if line.startswith("\t") and (match := _LDD_PATH.search(line.strip())):
                libraries[match.group(1)] = None
    return list(libraries)


# --- requirements and their environment markers (PEP 508), by `packaging` ---------------------------


def _selected_requirement(requirement: str, environment: dict[str, str] | None = None) -> str | None:
    """The name of a distribution's requirement (`nvidia-cublas==13.1; platform_system == "Linux"`)
    where its environment marker holds for this interpreter (or `environment`, over this
    interpreter's), else None. Extras are never selected."""
    try:
        parsed = Requirement(requirement)
    except InvalidRequirement:
        raise ImageError(f"cannot parse the requirement {requirement!r}") from None
    if parsed.marker is None:
        return parsed.name
    try:
        selected = parsed.marker.evaluate({**(environment or {}), "extra": ""})
    except UndefinedEnvironmentName:
        raise ImageError(f"unknown environment marker variable in {requirement!r}") from None
    return parsed.name if selected else None


# --- building ------------------------------------------------------------------------------------


def build(root: str | os.PathLike, image: ImagePlan) -> BuildStats:
    """Copy the plan into the existing empty directory `root` (the tmpfs): directories mode 0755,
    symlinks as they are, files with their mode less write and set-id bits (plus read for all) and
    their timestamps (the standard library's and packages' __pycache__ stay valid)."""
    import time

    started = time.monotonic()
    root = os.fspath(root)

    def inside(path: str) -> str:
        return root + path

    for directory in sorted(image.dirs):
        os.mkdir(inside(directory), 0o755)
        os.chmod(inside(directory), 0o755)  # whatever the umask
    for path, target in image.symlinks:
        os.symlink(target, inside(path))

    def copy(path: str) -> int:
        return _copy_file(path, inside(path))

    with concurrent.futures.ThreadPoolExecutor(_COPY_THREADS) as pool:
        copied = sum(pool.map(copy, [path for path, _ in image.files]))
    return BuildStats(len(image.files), copied, time.monotonic() - started)


def _copy_file(source: str, destination: str) -> int:
    # O_NOFOLLOW|O_NONBLOCK and fstat: a path swapped for a link or a FIFO since it was planned is
    # refused, never followed or waited on.
    source_fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(source_fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"{source} is no longer a regular file")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        destination_fd = os.open(destination, flags, 0o600)
        try:
            copied = 0
            while sent := os.sendfile(destination_fd, source_fd, None, 1 << 30):
                copied += sent
            os.fchmod(destination_fd, (info.st_mode & 0o555) | 0o444)
            os.utime(destination_fd, ns=(info.st_atime_ns, info.st_mtime_ns))
        finally:
            os.close(destination_fd)
    finally:
        os.close(source_fd)
    return copied

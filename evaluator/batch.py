"""`evaluator batch`: every (submission, seed) run of a competition, scheduled on Ray.

Each run is the ordinary `evaluator run` in a subprocess on whichever node Ray picks, so the sandbox,
the clock and the scoring are exactly those of a single run. The machine that starts the batch (the
driver) sends each submission to the node as a tar archive; the node sends the run directory back
the same way, and the driver unpacks it into `<results>/runs/`, accepting nothing but plain files
and folders. Ray is an optional extra, imported only when this command runs.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from evaluator.check import FOLDER_MAX_BYTES, check_submission
from evaluator.errors import UserError
from evaluator.fsutil import tree_sha256
from evaluator.harness import MODEL_FILE
from evaluator.paths import HOME, HOME_ENV, RESULTS_DIR, shown
from evaluator.results import EXIT_CODES, RESULT_FILE, result_problems, write_result
from evaluator.sandbox import SandboxUnavailable, open_sandbox
from evaluator.tracks import Track, load_track

INSTALL_HINT = "pip install -e '.[cluster]'"
# A run directory travels through Ray's object store in one piece. A model larger than what is left
# of this stays on the node (it has been scored there already); the record, logs and metrics travel.
RUN_ARCHIVE_CAP_BYTES = 512 * 2**20
# `evaluator check` caps a submission at FOLDER_MAX_BYTES; tar adds a 512-byte header per file.
SUBMISSION_ARCHIVE_CAP_BYTES = 16 * FOLDER_MAX_BYTES
# Ray's share of /dev/shm on a laptop: archives pass through it one at a time.
LOCAL_OBJECT_STORE_BYTES = 200 * 2**20
# `evaluator run` enforces every limit itself; this watchdog only catches a run that hangs outside
# them (interpreter start, imports and the scoring sandbox's start-up are not in the track's limits).
RUN_WATCHDOG_SLACK_S = 300.0


def _scorings(track: Track, budget_s: float) -> int:
    """How many models one run may have scored, each within the track's scoring limit: the final
    model and a snapshot per interval (a model that takes every limit must not outlast the watchdog)."""
    every_s = track.snapshot_every_s
    return 1 + (0 if every_s is None else math.floor(budget_s / every_s))
# After SIGTERM, `evaluator run` kills its jails and removes their cgroups; this long, then SIGKILL.
RUN_STOP_GRACE_S = 30.0
# Ray's accelerator-type resources are markers: every GPU node has 1 of its type; tasks ask a sliver.
ACCELERATOR_SHARE = 0.001
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ATTEMPTS = 2
LOG_WIDTH = 160
_TAIL_CHARS = 2000
_FAILURE_TAIL_LINES = 6

# Runs `evaluator run` with SIGTERM as its parent-death signal, so a Ray worker that is killed
# takes its run (and, through the run's SIGTERM handler, the run's jails) with it.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "PR_SET_PDEATHSIG = 1\n"
    "ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(3)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class UnsafeArchive(Exception):
    """An archive from another machine that is too large or holds more than plain files and folders."""


class ArchiveTooLarge(Exception):
    pass


# ---------------------------------------------------------------------------------------- archives


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
                with os.fdopen(fd, "wb") as handle, archive.extractfile(member) as source:
                    shutil.copyfileobj(source, handle)
            else:
                kind = "link" if member.issym() or member.islnk() else "special file"
                raise UnsafeArchive(f"member {member.name!r} is a {kind}: only regular files and folders are accepted")


# ------------------------------------------------------------------------------- on the Ray node


def _tail(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")[-_TAIL_CHARS:].strip()


def assigned_gpu_environment() -> dict[str, str]:
    """The GPUs Ray assigned to this task, as the `evaluator run` it starts must see them: Ray sets
    CUDA_VISIBLE_DEVICES for the task's own process, but not where RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES
    is set, and an unset one would let the run take any free GPU of the node instead of Ray's."""
    import ray

    ids = [str(gpu_id) for gpu_id in ray.get_gpu_ids()]
    return {"CUDA_VISIBLE_DEVICES": ",".join(ids)} if ids else {}


def _supervise(argv: list[str], cwd: Path, timeout_s: float, env: dict[str, str]) -> tuple[int | None, bytes, bytes]:
    """Run argv to completion, with `env` added to this process's environment; None for the exit
    code when the watchdog had to stop it."""
    if sys.platform == "linux":
        argv = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]
    process = subprocess.Popen(
        argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True, env=os.environ | env,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
        return process.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        stdout, stderr = _stop(process)
        return None, stdout, stderr
    except BaseException:  # Ray cancelled the task (KeyboardInterrupt) or the worker is exiting
        _stop(process)
        raise


def _stop(process: subprocess.Popen) -> tuple[bytes, bytes]:
    process.terminate()
    try:
        return process.communicate(timeout=RUN_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.communicate()


def _run_on_node(submission_archive: bytes, request: dict[str, Any]) -> dict[str, Any]:
    node = platform.node()
    workdir = Path(tempfile.mkdtemp(prefix="evaluator-batch-"))
    try:
        os.chmod(workdir, 0o755)  # under nsjail the run is user nobody: it must reach the submission
        submission = workdir / "submission"
        submission.mkdir()
        extract_archive(submission_archive, submission, SUBMISSION_ARCHIVE_CAP_BYTES)
        out = workdir / "runs"
        argv = [
            sys.executable, "-m", "evaluator.cli", "run", str(submission),
            "--track", request["track"],
            *(["--secret-seeds"] if request["seed"] is None else ["--seed", str(request["seed"])]),
            "--sandbox", request["sandbox"], "--out", str(out), "--json",
        ]
        if request["budget_s"] is not None:
            argv += ["--budget", repr(request["budget_s"])]
        gpu_environment = assigned_gpu_environment()
        if gpu_environment:
            argv += ["--gpu", "0"]  # CUDA's first: Ray's GPU, the only one the run sees
        # The run starts in a temporary folder: give it the driver's home (its tracks, its dataset)
        # where this node has that folder too, as a node of a local cluster does.
        home = {HOME_ENV: request["home"]} if Path(request["home"], "spec", "tracks").is_dir() else {}
        started = time.monotonic()
        exit_code, stdout, stderr = _supervise(argv, workdir, request["timeout_s"], gpu_environment | home)
        reply = {
            "event": "finished", "node": node, "exit_code": exit_code, "seconds": time.monotonic() - started,
            "run_id": None, "archive": None, "model_left_out_bytes": None, "log_tail": _tail(stderr),
        }
        if exit_code is None:
            reply["log_tail"] = f"stopped after {request['timeout_s']:g} s by the batch's watchdog\n" + reply["log_tail"]
            return reply
        try:
            run_id = json.loads(stdout)["run_id"]
        except (ValueError, TypeError, KeyError):
            return reply
        run_dir = out / str(run_id)
        if not RUN_ID_PATTERN.match(str(run_id)) or not (run_dir / RESULT_FILE).is_file():
            return reply
        reply["run_id"] = run_id
        try:
            reply["archive"] = pack_folder(run_dir, RUN_ARCHIVE_CAP_BYTES)
        except ArchiveTooLarge:
            reply["archive"] = pack_folder(run_dir, RUN_ARCHIVE_CAP_BYTES, leave_out=frozenset({MODEL_FILE}))
            reply["model_left_out_bytes"] = (run_dir / MODEL_FILE).stat().st_size
        return reply
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _evaluate_on_node(submission_archive: bytes, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The Ray task. Its first message says that it has started (Ray knows no other way to tell a
    running task from a queued one); its second is the outcome."""
    yield {"event": "started", "node": platform.node()}
    yield _run_on_node(submission_archive, request)


# ------------------------------------------------------------------------------------ the driver


@dataclass
class Submission:
    folder: Path
    name: str
    track: Track
    tree_sha256: str
    archive_ref: Any = None  # the folder's tar in Ray's object store, shared by all its seeds


@dataclass
class Run:
    submission: Submission
    seed: int | None  # None: the node's evaluator draws it (--secret-seeds); the record then says which
    budget_s: float
    state: str = "queued"  # queued | running | finished
    attempts: int = 0
    node: str | None = None
    seconds: float | None = None
    record: dict[str, Any] | None = None
    run_dir: Path | None = None
    failure: str = ""  # why the evaluator could not produce a verdict (its fault): a line, then any log tail
    reused: bool = False
    note: str = ""

    @property
    def label(self) -> str:
        if self.seed is not None:
            return f"{self.submission.name} seed {self.seed}"
        return f"{self.submission.name} seed {self.record['seed']} (drawn)" if self.record else f"{self.submission.name} drawn seed"

    @property
    def needs_retry(self) -> bool:
        return self.record is None or self.record["status"] == "sandbox_error"

    @property
    def exit_code(self) -> int:
        return 3 if self.record is None else EXIT_CODES[self.record["status"]]


def _task_resources(track: Track) -> dict[str, float]:
    """What one run of this track asks of a Ray node, in Ray's resource names."""
    if track.device_kind == "cpu":
        return {"CPU": track.threads}
    resources = {"CPU": 1, "GPU": 1}
    gpu_name = track.raw["device"].get("gpu_name_contains")
    if gpu_name:
        # Ray gives a GPU node `accelerator_type:<model>` from the GPU's name: "Tesla T4" -> "T4".
        resources[f"accelerator_type:{gpu_name.replace(' ', '-')}"] = ACCELERATOR_SHARE
    return resources


def _ray_options(resources: dict[str, float]) -> dict[str, Any]:
    custom = {name: amount for name, amount in resources.items() if name not in ("CPU", "GPU")}
    return {"num_cpus": resources["CPU"], "num_gpus": resources.get("GPU", 0), "resources": custom}


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(f"evaluator batch needs Ray, which is not installed here: {INSTALL_HINT}") from None
    return ray


class _RayInstance:
    """A connection to the cluster at `address`, or a small local instance started (and stopped) here."""

    def __init__(self, ray, address: str | None):
        self.ray = ray
        self.address = address
        self.started_here = False
        self.temp_dir: str | None = None  # the local instance's logs: kept when asked to, else removed
        self.keep_logs = False

    def __enter__(self) -> "_RayInstance":
        ray = self.ray
        if ray.is_initialized():  # a caller that embeds the batch keeps its own instance
            return self
        common = {"log_to_driver": False, "logging_level": logging.WARNING}
        if self.address:
            try:
                ray.init(address=self.address, **common)
            except ConnectionError as exc:
                raise UserError(f"cannot connect to the Ray cluster at {self.address}: {exc}") from None
        else:
            self.temp_dir = tempfile.mkdtemp(prefix="evaluator-ray-")
            ray.init(
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                include_dashboard=False,
                _temp_dir=self.temp_dir,
                **common,
            )
        self.started_here = True
        return self

    def __exit__(self, *exc) -> None:
        if not self.started_here:
            return
        self.ray.shutdown()
        if self.temp_dir and self.keep_logs:
            sys.stderr.write(f"Ray's logs for this batch: {self.temp_dir}\n")
        elif self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def fits_somewhere(self, resources: dict[str, float]) -> bool:
        return any(
            node.get("Alive") and all(node["Resources"].get(name, 0) >= amount for name, amount in resources.items())
            for node in self.ray.nodes()
        )


def _check_all(folders: list[Path], track_id: str | None, console: Console) -> tuple[list[Submission], list[tuple[Path, int]]]:
    """Static checks of every folder, before anything runs. Invalid ones are reported and left out."""
    forced_track = load_track(track_id) if track_id else None
    valid, invalid = [], []
    seen = set()
    for folder in folders:
        if folder.resolve() in seen:
            continue
        seen.add(folder.resolve())
        report = check_submission(folder)
        if not report.ok:
            _say(console, f"{folder}: invalid, skipped ({len(report.findings)} problem(s)):")
            for finding in report.findings:
                _say(console, f"  {folder}/{finding}")
            invalid.append((folder, len(report.findings)))
            continue
        manifest = report.manifest
        track = forced_track or load_track(manifest.track)
        valid.append(Submission(folder=folder, name=manifest.name, track=track, tree_sha256=tree_sha256(folder)))
    return valid, invalid


def _earlier_results(runs_dir: Path, sandbox_choice: str) -> dict[tuple, list[tuple[dict[str, Any], Path]]]:
    """Records under runs_dir that already settle a (tree, track file, seed, budget) run: any verdict but
    the evaluator's own failure; with --sandbox nsjail, only sandboxed ones. Best first: `ok`, then the
    newest. Runs whose seed was drawn are filed under seed None: each of them settles one drawn run."""
    found: dict[tuple, list[tuple[dict[str, Any], Path]]] = {}
    if not runs_dir.is_dir():
        return found
    for path in runs_dir.glob(f"*/{RESULT_FILE}"):
        if path.parent.name.startswith("."):
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            seed = None if record.get("seed_drawn") else record["seed"]
            key = (record["submission"]["tree_sha256"], record["track"]["sha256"], seed, float(record["budget_s"]))
            status, sandbox_kind, ended = record["status"], record["environment"]["sandbox"]["kind"], record["ended_at"]
        except (OSError, ValueError, TypeError, KeyError):
            continue
        if status == "sandbox_error" or (sandbox_choice == "nsjail" and sandbox_kind != "nsjail"):
            continue
        if record.get("calibration") is not None:  # its budget is this host's, whatever number it came to
            continue
        found.setdefault(key, []).append((record, path.parent))
    for settling in found.values():
        settling.sort(key=lambda item: (item[0]["status"] in ("ok", "not_reached"), item[0]["ended_at"]), reverse=True)  # scored first
    return found


def _receive(run: Run, reply: dict[str, Any], runs_dir: Path) -> None:
    """Unpack a node's reply into runs_dir/<run-id>/ and record the verdict on `run`."""
    run.node, run.seconds = reply["node"], reply["seconds"]
    if reply["archive"] is None:
        code = reply["exit_code"]
        how = "was stopped" if code is None else f"exited with code {code}"
        run.failure = f"evaluator run {how} without a result\n{reply['log_tail']}".strip()
        return
    run_id = str(reply["run_id"])
    if not RUN_ID_PATTERN.match(run_id):
        run.failure = f"the node {run.node} returned a malformed run id {run_id!r}"
        return
    final_dir = runs_dir / run_id
    incoming = Path(tempfile.mkdtemp(prefix=f".incoming-{run_id}-", dir=runs_dir))
    try:
        extract_archive(reply["archive"], incoming, RUN_ARCHIVE_CAP_BYTES)
        record = json.loads((incoming / RESULT_FILE).read_text(encoding="utf-8"))
        problems = result_problems(record)
        submission = run.submission
        if not problems:
            if record["submission"]["tree_sha256"] != submission.tree_sha256:
                problems.append("it evaluated a different submission tree than the one sent")
            if record["track"]["sha256"] != submission.track.sha256:
                problems.append(f"its spec/tracks/{submission.track.id}.toml differs from this machine's")
            if run.seed is None and not record["seed_drawn"]:
                problems.append(f"it ran seed {record['seed']}, which it did not draw")
            if run.seed is not None and (record["seed"], record["seed_drawn"]) != (run.seed, False):
                problems.append(f"it ran seed {record['seed']} instead of {run.seed}")
        if problems:
            run.failure = f"the result from {run.node} cannot be accepted: " + "; ".join(problems)
            return
        # The node ran a copy; verify re-hashes the folder that the record names, so name the original.
        record["submission"]["path"] = shown(submission.folder.resolve())
        write_result(incoming, record)
        os.chmod(incoming, 0o755)  # mkdtemp made it private; run directories are readable like the runner's
        if final_dir.exists():
            run.failure = f"{final_dir} already exists"
            return
        os.rename(incoming, final_dir)
    except (UnsafeArchive, OSError, ValueError) as exc:
        run.failure = f"the run directory from {run.node} was refused: {exc}"
        return
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    run.record, run.run_dir = record, final_dir
    if reply["model_left_out_bytes"] is not None:
        run.note = f"{MODEL_FILE} ({reply['model_left_out_bytes']} bytes) was too large to bring back"


def _say(console: Console, text: str) -> None:
    """A plain line: no rich markup in submission names or messages, no wrapping in logs."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _describe_ray_error(exc: Exception) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1].strip() if lines else ''}"


def _outcome_text(run: Run, suffix: str = "") -> str:
    """One line about the run (with `suffix`), then, for a failure of the evaluator, the last lines
    of what the node said."""
    where = f"on {run.node or 'no node'}" + (f", {run.seconds:.0f} s" if run.seconds is not None else "")
    if run.record is None:
        summary, _, detail = run.failure.partition("\n")
        tail = detail.strip().splitlines()[-_FAILURE_TAIL_LINES:]
        return "\n".join([f"{run.label} ({where}): evaluator failure: {summary}{suffix}", *(f"    {line}" for line in tail)])
    record = run.record
    parts = [f"{run.label} ({where}): {record['status']}"]
    if record["metrics"]:
        parts.append(f"val_loss {record['metrics']['val_loss']:.4f}")
    elif record["message"]:
        parts.append(record["message"].splitlines()[0][:200])
    return "  ".join(parts) + suffix


class _BatchProgress:
    """One bar for the whole batch, with the counts; a line per finished run goes above it."""

    def __init__(self, console: Console, runs: list[Run]):
        self.console = console
        self.runs = runs
        self.progress = Progress(
            TextColumn("[bold]batch"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[counts]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not console.is_terminal,
        )
        self.task = self.progress.add_task("batch", total=len(runs), counts="")

    def __enter__(self) -> "_BatchProgress":
        self.progress.__enter__()
        self.refresh()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def counts(self) -> str:
        finished = [run for run in self.runs if run.state == "finished"]
        ok = sum(1 for run in finished if run.exit_code == 0)
        return (
            f"ok {ok}  failed {len(finished) - ok}  "
            f"running {sum(run.state == 'running' for run in self.runs)}  "
            f"queued {sum(run.state == 'queued' for run in self.runs)}"
        )

    def refresh(self) -> None:
        finished = sum(run.state == "finished" for run in self.runs)
        self.progress.update(self.task, completed=finished, counts=self.counts())

    def say(self, text: str) -> None:
        _say(self.console, text)
        self.refresh()


def _schedule(ray, runs: list[Run], runs_dir: Path, sandbox_choice: str, budget_override: float | None, console: Console) -> None:
    """Run everything, each infrastructure failure retried once, until every run is finished."""
    task = ray.remote(num_returns="streaming", max_retries=0)(_evaluate_on_node)

    def submit(run: Run):
        track = run.submission.track
        run.state, run.attempts = "queued", run.attempts + 1
        request = {
            "track": track.id,
            "seed": run.seed,
            "budget_s": budget_override,
            "sandbox": sandbox_choice,
            "home": str(HOME),
            "timeout_s": run.budget_s + track.sandbox["grace_s"] + _scorings(track, run.budget_s) * track.eval["time_limit_s"]
                         + RUN_WATCHDOG_SLACK_S,
        }
        return task.options(**_ray_options(_task_resources(track))).remote(run.submission.archive_ref, request)

    in_flight = {submit(run): run for run in runs}
    try:
        with _BatchProgress(console, runs) as progress:
            while in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
                progress.refresh()
                for generator in ready:
                    run = in_flight[generator]
                    try:
                        message = ray.get(next(generator))
                    except StopIteration:
                        message = None
                        run.failure = "the Ray task ended without reporting an outcome"
                    except ray.exceptions.RayError as exc:  # a worker or node died, or our task raised
                        message = None
                        run.failure = f"Ray: {_describe_ray_error(exc)}"
                    if message is not None and message["event"] == "started":
                        run.state, run.node = "running", message["node"]
                        progress.refresh()
                        continue
                    del in_flight[generator]
                    if message is not None:
                        _receive(run, message, runs_dir)
                    if run.needs_retry and run.attempts < ATTEMPTS:
                        progress.say(_outcome_text(run, "; retrying once"))
                        run.record, run.run_dir, run.failure = None, None, ""
                        in_flight[submit(run)] = run
                        continue
                    run.state = "finished"
                    progress.say(_outcome_text(run, f"  {run.run_dir}" if run.run_dir else ""))
    finally:
        for generator in in_flight:
            ray.cancel(generator)


def _summary(console: Console, runs: list[Run], invalid: list[tuple[Path, int]]) -> None:
    table = Table(title="batch summary")
    for column in ("submission", "seed", "status", "val_loss", "val_bpb", "train s", "run"):
        table.add_column(column, justify="right" if column in ("seed", "val_loss", "val_bpb", "train s") else "left")
    for run in runs:
        record = run.record
        metrics = record["metrics"] if record else None
        train_s = record["train"]["train_seconds"] if record else None
        status = record["status"] if record else "evaluator failure"
        note = "earlier run" if run.reused else run.note or ("retried" if run.attempts > 1 else "")
        table.add_row(
            run.submission.name,
            str(run.seed) if run.seed is not None else f"{record['seed']} (drawn)" if record else "drawn",
            status,
            f"{metrics['val_loss']:.4f}" if metrics else "-",
            f"{metrics['val_bpb']:.4f}" if metrics else "-",
            f"{train_s:.1f}" if train_s is not None else "-",
            (run.run_dir.name if run.run_dir else "-") + (f" ({note})" if note else ""),
        )
    for folder, problems in invalid:
        table.add_row(str(folder), "-", "invalid_submission", "-", "-", "-", f"{problems} problem(s), not run")
    console.print(table)


SANDBOX_CHOICES = ("nsjail", "none")


def _sandbox_choice(value: str) -> str:
    """--sandbox: nsjail or an explicit none. `evaluator run`'s auto is not offered: on a cluster it
    would run submissions unsandboxed, as root, on every node where nsjail fails, next to the Ray
    token and the other runs."""
    if value in SANDBOX_CHOICES:
        return value
    if value == "auto":
        raise argparse.ArgumentTypeError(
            "auto is not offered by batch: it would run submissions unsandboxed, as root, wherever nsjail "
            "fails on a node; use nsjail (the default), or --sandbox none for an unofficial batch"
        )
    raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from nsjail, none)")


def _refuse_without_nsjail(sandbox_choice: str, ray_address: str | None) -> None:
    """With a local Ray instance every run is on this machine: no nsjail here, no batch. (On a cluster
    each node's `evaluator run --sandbox nsjail` refuses by itself, as sandbox_error.)"""
    if sandbox_choice != "nsjail" or ray_address is not None:
        return
    try:
        open_sandbox("nsjail")
    except SandboxUnavailable as exc:
        raise UserError(
            f"nsjail cannot run on this machine ({exc}), and evaluator batch never runs submissions "
            "unsandboxed by itself: fix nsjail, or pass --sandbox none for an unofficial batch"
        ) from None


def _batch(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    if not console.is_terminal:
        console.width = LOG_WIDTH  # rich assumes 80 columns for logs and pipes: the summary needs more
    ray = _import_ray()
    if args.seeds < 1:
        raise UserError("--seeds must be at least 1")
    if args.budget is not None and not (args.budget > 0 and math.isfinite(args.budget)):
        raise UserError(f"--budget must be a positive number of seconds, not {args.budget}")
    runs_dir = Path(args.results) / "runs"
    submissions, invalid = _check_all([Path(p) for p in args.submissions], args.track, console)

    earlier = _earlier_results(runs_dir, args.sandbox)
    runs: list[Run] = []
    for submission in submissions:
        track = submission.track
        budget_s = track.budget_s if args.budget is None else float(args.budget)
        drawn_before = list(earlier.get((submission.tree_sha256, track.sha256, None, budget_s), []))
        for offset in range(args.seeds):
            seed = None if args.secret_seeds else track.seeds["default"] + offset
            run = Run(submission=submission, seed=seed, budget_s=budget_s)
            settling = drawn_before if args.secret_seeds else earlier.get((submission.tree_sha256, track.sha256, seed, budget_s), [])
            if settling:
                run.record, run.run_dir = settling.pop(0) if args.secret_seeds else settling[0]
                run.state, run.reused = "finished", True
            runs.append(run)
    to_run = [run for run in runs if not run.reused]
    if to_run:
        _refuse_without_nsjail(args.sandbox, args.ray)
    _say(
        console,
        f"{len(submissions)} submission(s) to evaluate, {len(invalid)} invalid; {len(runs)} run(s): "
        f"{len(runs) - len(to_run)} already in {runs_dir}, {len(to_run)} to run",
    )

    if to_run:
        runs_dir.mkdir(parents=True, exist_ok=True)
        with _RayInstance(ray, args.ray) as instance:
            for track in {run.submission.track.id: run.submission.track for run in to_run}.values():
                resources = _task_resources(track)
                if instance.fits_somewhere(resources):
                    continue
                wanted = ", ".join(f"{name} {amount:g}" for name, amount in resources.items())
                if instance.temp_dir:
                    raise UserError(f"no Ray node on this machine offers what a {track.id} run needs ({wanted}); use --track cpu-1min, or --ray ADDRESS")
                _say(console, f"no live Ray node offers what a {track.id} run needs ({wanted}) yet: those runs wait until one joins")
            for submission in {id(run.submission): run.submission for run in to_run}.values():
                submission.archive_ref = ray.put(pack_folder(submission.folder, SUBMISSION_ARCHIVE_CAP_BYTES))
            _schedule(ray, to_run, runs_dir, args.sandbox, args.budget, console)
            instance.keep_logs = any(run.exit_code == 3 for run in to_run)

    _summary(console, runs, invalid)
    codes = [run.exit_code for run in runs]
    ok, broken = codes.count(0), codes.count(3)
    _say(
        console,
        f"{ok} ok, {len(codes) - ok - broken} failed through the submission, "
        f"{broken} evaluator failure(s), {len(invalid)} invalid submission(s)",
    )
    return 3 if broken else (1 if invalid or ok < len(codes) else 0)


def register(subparsers: argparse._SubParsersAction) -> None:
    batch = subparsers.add_parser(
        "batch",
        help="evaluate many submissions x seeds on a Ray cluster (or a local Ray instance)",
        description=(
            "Check every submission (invalid ones are reported and skipped), then run each (submission, seed) "
            "as the ordinary `evaluator run` in nsjail on a Ray node: one GPU of the track's type per run on a "
            "GPU track, the track's threads in CPUs on a CPU track. Run directories come back into "
            "RESULTS/runs/ on this machine. Runs that already have a verdict there for the same submission "
            "tree, track, seed and budget are not repeated. A run whose worker or sandbox fails is retried "
            "once. Never falls back to running unsandboxed: a node without working nsjail fails its runs as "
            "sandbox_error, and with a local Ray instance the batch refuses to start; only --sandbox none runs "
            f"unsandboxed (unofficial). Needs Ray ({INSTALL_HINT}). Exit codes: 0 every run ok; 1 some run failed, or a "
            "submission was invalid, through the submission's fault; 2 bad input; 3 a sandbox or worker "
            "failure remains."
        ),
    )
    batch.add_argument("submissions", nargs="+", metavar="SUBMISSION", help="submission folders")
    batch.add_argument("--track", metavar="ID", help="track id for every submission (default: each manifest's track)")
    batch.add_argument("--budget", type=float, metavar="S", help="training budget in seconds; any value other than the track's makes the runs unofficial")
    batch.add_argument("--seeds", type=int, default=1, metavar="N", help="seeds per submission: the track's default seed, +1, ... (default 1)")
    batch.add_argument("--secret-seeds", action="store_true",
                       help="each run's evaluator draws its seed from os.urandom (evaluator run --secret-seeds); "
                            "drawn runs already in the results count towards --seeds")
    batch.add_argument("--ray", metavar="ADDRESS", help="address of a running Ray cluster (e.g. auto, or HEAD:6379); default: start a local Ray instance")
    batch.add_argument("--results", metavar="DIR", default=str(RESULTS_DIR), help=f"results directory; run directories go to DIR/runs/ (default: {shown(RESULTS_DIR)}/ in the current folder)")
    batch.add_argument("--sandbox", type=_sandbox_choice, default="nsjail", metavar="{nsjail,none}",
                       help="handed to each `evaluator run` (default nsjail); none runs every submission "
                       "unsandboxed and makes the results unofficial")
    batch.set_defaults(handler=_batch)

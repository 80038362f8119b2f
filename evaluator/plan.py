"""The run plan: everything decided before a jail starts, and the run directory laid out for it.

Planning checks the submission, resolves the track and its data, takes the host's locks for the
whole run, calibrates if asked, stages the submission and what the training jail runs, and writes
the job file (evaluator/job.py) the harness reads.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console

from evaluator import in_jail
from evaluator.calibration import WORKLOAD, Calibration, calibrate
from evaluator.check import check_submission
from evaluator.dataset.private import read_bound
from evaluator.dataset.store import PRIVATE_DATA_ENV, find_hidden_split, resolve_data_file, tokenizer_info
from evaluator.errors import DataError, UserError
from evaluator.fsutil import atomic_write_text, sha256_file, stage_tree
from evaluator.gpus import Placement, hold_gpu, hold_host
from evaluator.job import Job
from evaluator.manifest import Manifest, merge_overrides
from evaluator.paths import shown
from evaluator.tracks import Track, load_track

# --smoke: enough to catch a broken contract (a forward that returns a tuple, wrong logits) in
# seconds instead of after a full run.
SMOKE_BUDGET_S = 10.0
SMOKE_DOCUMENTS = 8
# A snapshot is taken only within this share of the interval after it falls due, and stamped no
# earlier than the window's end: a submission cannot choose its moment (the crossing of a target),
# and honest code that asks ctx.snapshot_due() every step has a quarter of an interval to do so.
SNAPSHOT_WINDOW_FRACTION = 0.25


def check_budget(budget_s: float) -> None:
    """The one rule for a budget, whoever asks for it (`run`, `batch`)."""
    if not (budget_s > 0 and math.isfinite(budget_s)):
        raise UserError(f"--budget must be a positive number of seconds, not {budget_s}")


def check_seed_count(seeds: int) -> None:
    """The one rule for --seeds, whoever asks for it (`run`, `batch`)."""
    if seeds < 1:
        raise UserError("--seeds must be at least 1")


def draw_seed() -> int:
    """A seed from the kernel's random source, drawn after the submission is fixed: nobody can have
    tuned for it. 31 bits, so every seeding API a submission might pass it to accepts it."""
    return int.from_bytes(os.urandom(4), "little") & 0x7FFF_FFFF


def _new_run_id(name: str, seed: int) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{name}-s{seed}-{secrets.token_hex(3)}"


def _require_torch() -> None:
    """Before anything is made: a run without torch would fail halfway, leaving a run directory."""
    try:
        import torch  # noqa: F401  (imported only to learn that it can be)
    except ImportError:
        raise UserError(
            "evaluator run needs PyTorch, which is not installed here. On a CPU machine: pip install torch "
            "--index-url https://download.pytorch.org/whl/cpu ; on a GPU host or a notebook, the CUDA build "
            "it already has (README: running on a GPU)"
        ) from None


def _check_device(track: Track) -> str:
    if track.device.kind == "cpu":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise UserError(
            f"track {track.id} needs a CUDA GPU and this machine (or this torch, {torch.__version__}) has none; "
            "use --track cpu-1min, or install a CUDA build of torch on a GPU host (see README)"
        )
    return "cuda:0"


@dataclass(frozen=True)
class RunPlan:
    """Everything decided before the sandbox starts."""

    folder: Path
    manifest: Manifest
    track: Track
    device: str
    seed: int
    seed_drawn: bool
    budget_s: float
    calibration: Calibration | None  # --budget calibrated: budget and scoring deadlines x its factor
    overrides: dict[str, Any]  # --set: merged into the manifest's [config] for this run
    smoke: bool
    gpu: Placement | None  # the GPU this run holds; None on a CPU track
    train_path: Path
    val_path: Path  # the public development split
    hidden_path: Path | None  # the hidden test split, where this host holds it: the score that ranks
    hidden_absent: str | None  # why the run scores the public split instead (no hidden split here)
    hidden_bound: dict[str, Any] | None  # the hidden split's embedding bound (evaluator/dataset/private.py)
    vocab_size: int
    eos_id: int
    run_id: str
    run_dir: Path
    staged: Path
    jail_input: Path  # the in-jail modules (as a package under it) and the training split's copy
    jail_out: Path
    scratch: Path
    job_path: Path
    debug_scoring: bool
    comparison: dict[str, Any] | None  # evaluator compare's {"id", "pair", "side"} of this run; None otherwise

    @property
    def deadline_factor(self) -> float:
        """What the scoring deadlines are multiplied by: a calibration's factor, but never below 1,
        because what they mostly wait for (process start, imports, a CUDA context) is no faster on
        a faster GPU."""
        return 1.0 if self.calibration is None else max(1.0, self.calibration.factor)

    @property
    def snapshot_window_s(self) -> float | None:
        every_s = self.track.snapshot_every_s
        return None if every_s is None else every_s * SNAPSHOT_WINDOW_FRACTION

    @property
    def score_path(self) -> Path:
        """The split whose score ranks: the hidden one where it is here, else the public one."""
        return self.val_path if self.hidden_path is None else self.hidden_path

    @property
    def gpu_minor(self) -> int | None:
        """The board the jails are given, /dev/nvidia<minor>."""
        return None if self.gpu is None else self.gpu.board.minor

    def unofficial_reasons(
        self, sandbox: dict[str, Any], gpu: dict[str, Any] | None, received: dict[str, Any] | None
    ) -> list[str]:
        """Why this run cannot be official, from what was decided here, where it ran (the result's
        environment.sandbox and environment.gpu) and what its jail received (train.received); [] for
        an official run."""
        track, budget_s = self.track, self.budget_s
        reasons = []
        if self.hidden_path is None:
            reasons.append(
                f"development result: scored on the public split, which anyone can memorise ({self.hidden_absent})"
            )
        if self.overrides:
            reasons.append(
                "config overridden on the command line (--set): the submission's files do not describe what ran"
            )
        if self.smoke:  # its budget is part of what a smoke run is
            reasons.append(f"smoke run (--smoke): {budget_s:g} s of training, {SMOKE_DOCUMENTS} validation documents")
        elif self.calibration is not None:
            reasons.append(
                f"budget calibrated: x{self.calibration.factor:g} ({budget_s:.1f} s instead of the track's "
                f"{track.budget_s:g} s; the track's figure is {track.calibration.basis})"
            )
        elif budget_s != track.budget_s:
            reasons.append(f"budget overridden: {budget_s:g} s instead of the track's {track.budget_s:g} s")
        if sandbox["kind"] != "nsjail":
            nsjail_missing = [what for what in sandbox["unavailable"] if what.startswith("nsjail: ")]
            reasons.append(
                f"not sandboxed ({nsjail_missing[0]})" if nsjail_missing else "not sandboxed (--sandbox none)"
            )
        if self.debug_scoring:
            reasons.append("the model server's output was kept (--debug-scoring)")
        reasons += busy_host_reasons(track, received)
        wanted = track.device.gpu_name_contains
        if wanted and (gpu is None or wanted not in gpu["name"]):
            reasons.append(
                f"GPU is {gpu['name'] if gpu else 'absent'}; the track requires one whose name contains {wanted!r}"
            )
        if self.gpu is not None and self.gpu.busy_pids:
            pids = ", ".join(map(str, self.gpu.busy_pids))
            reasons.append(
                f"GPU {self.gpu.board.pci_bus_id} had work of other processes when the run started (pids {pids})"
            )
        return reasons


def busy_host_reasons(track: Track, received: dict[str, Any] | None) -> list[str]:
    """On a CPU track: the jail must have received the track's share of the CPU time its threads
    asked for while the clock ran."""
    minimum = track.device.min_cpu_share
    if minimum is None:
        return []
    if received is None:
        return ["the CPU time the training jail received was not measured (it had no cgroup)"]
    if received["share"] < minimum:
        return [
            f"the host was busy: the training jail got {received['share']:.0%} of the CPU time its threads asked "
            f"for (the track asks for at least {minimum:.0%})"
        ]
    return []


@dataclass(frozen=True)
class RunRequest:
    """What the caller of `evaluate` asks for; see its docstring."""

    folder: Path
    track_id: str | None
    seed: int | None
    secret_seed: bool
    budget_s: float | None
    calibrated_budget: bool
    gpu: int | None
    runs_dir: Path
    debug_scoring: bool
    overrides: dict[str, Any]
    smoke: bool
    sandbox_choice: str  # "auto", "nsjail" or "none": a host with the hidden split runs nsjail or nothing
    comparison: dict[str, Any] | None = None  # set by evaluator compare: {"id", "pair", "side"}


def make_plan(request: RunRequest, console: Console, held: ExitStack) -> RunPlan:
    """Check the submission, resolve track and data, take the host's locks (into `held`, for the whole
    run), calibrate if asked, lay out the run directory (stage_run fills it)."""
    folder, seed, budget_s, gpu = Path(request.folder), request.seed, request.budget_s, request.gpu
    _require_torch()
    report = check_submission(folder, request.overrides, request.track_id)
    if not report.ok:
        for finding in report.findings:
            console.print(f"{folder}/{finding}", markup=False, highlight=False)
        raise UserError(
            f"{folder}: the submission is invalid ({len(report.findings)} problem(s)); fix them and run again"
        )
    manifest = report.manifest
    assert manifest is not None  # parse_manifest gives findings whenever it gives no manifest
    track = load_track(request.track_id or manifest.track)
    device = _check_device(track)
    if request.calibrated_budget and budget_s is not None:
        raise UserError(
            "a calibrated budget is the track's scaled by this host's speed: "
            "give a budget or ask for a calibrated one, not both"
        )
    if request.calibrated_budget and request.smoke:
        raise UserError("a smoke run has a budget of its own: drop --smoke or --budget calibrated")
    if request.smoke and budget_s is None:
        budget_s = min(SMOKE_BUDGET_S, track.budget_s)
    # A secret seed with a seed given was drawn by the caller (evaluator batch, whose retries keep it).
    seed = (draw_seed() if request.secret_seed else track.default_seed) if seed is None else seed
    budget_s = track.budget_s if budget_s is None else budget_s
    check_budget(budget_s)
    train_path = resolve_data_file(track, "train").resolve()
    val_path = resolve_data_file(track, "val").resolve()
    hidden_path, hidden_absent = find_hidden_split(track)
    if hidden_path is not None and request.sandbox_choice == "none":
        # Unsandboxed, the submission's code could read the hidden file (its name is the track's
        # public hash) and its model would be handed every hidden token with the network open.
        raise UserError(
            f"this host holds track {track.id}'s hidden split ({PRIVATE_DATA_ENV}): submissions run here only in "
            f"nsjail; drop --sandbox none, or unset {PRIVATE_DATA_ENV} for a development run"
        )
    vocab_size, eos_id = tokenizer_info(resolve_data_file(track, "tokenizer"))
    if request.debug_scoring and hidden_path is not None:
        # What a model prints while scoring can be the hidden text itself.
        raise UserError(
            f"--debug-scoring keeps what the model prints while it sees the validation text; track "
            f"{track.id} scores its hidden split here, so that output must never be kept"
        )

    run_id = _new_run_id(manifest.name, seed)
    holder = f"pid {os.getpid()}, run {run_id}"
    # Scoring a hidden split: nothing else may train on this host meanwhile (THREAT_MODEL.md).
    held.enter_context(hold_host(exclusive=hidden_path is not None, holder=holder))
    if device.startswith("cuda"):
        placement = held.enter_context(hold_gpu(gpu, holder))
    elif gpu is not None:
        raise UserError(f"--gpu applies to GPU tracks; track {track.id} runs on the CPU")
    else:
        placement = None
    calibration = None
    if request.calibrated_budget:
        console.print(f"calibrating: timing {WORKLOAD} here against track {track.id}'s figure ...")
        calibration = calibrate(track, cuda_index=0 if placement is None else placement.cuda_index)
        budget_s = track.budget_s * calibration.factor
        console.print(
            f"calibrated: x{calibration.factor:g} (here {calibration.host_seconds:.3f} s, track "
            f"{calibration.track_seconds:g} s, {track.calibration.basis}): budget "
            f"{budget_s:.1f} s, unofficial",
            markup=False,
            highlight=False,
        )
    run_dir = (Path(request.runs_dir) / run_id).resolve()
    if hidden_path is not None and run_dir.is_relative_to(hidden_path.parent):
        # The jails see the run directory, and the hidden split's folder is hidden from every jail.
        raise UserError(
            f"the run directory {shown(run_dir)} lies inside {PRIVATE_DATA_ENV}; give --out a folder "
            "outside it: no jail may see the hidden split's folder"
        )
    plan = RunPlan(
        folder=folder,
        manifest=manifest,
        track=track,
        device=device,
        seed=seed,
        seed_drawn=request.secret_seed,
        budget_s=budget_s,
        calibration=calibration,
        overrides=request.overrides,
        smoke=request.smoke,
        gpu=placement,
        train_path=train_path,
        val_path=val_path,
        hidden_path=hidden_path,
        hidden_absent=hidden_absent,
        hidden_bound=None if hidden_path is None else read_bound(hidden_path),
        vocab_size=vocab_size,
        eos_id=eos_id,
        run_id=run_id,
        run_dir=run_dir,
        staged=run_dir / "submission",
        jail_input=run_dir / "jail-input",
        jail_out=run_dir / "jail-out",
        scratch=run_dir / "scratch",
        job_path=run_dir / "job.json",
        debug_scoring=request.debug_scoring,
        comparison=request.comparison,
    )
    try:
        for directory in (plan.jail_out, plan.scratch, run_dir / "sandbox"):
            directory.mkdir(parents=True)
    except OSError as error:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise UserError(
            f"cannot make the run directory {shown(run_dir)}: {error.strerror}; run from a folder "
            "you can write (runs go to ./results/runs/) or give --out DIR"
        ) from error
    return plan


def stage_run(plan: RunPlan) -> None:
    """Stage the submission and the training jail's input into the run directory and write the job
    file. A failure here is the evaluator's (the folder passed check): evaluate() writes an
    evaluator_error result for it."""
    # The run uses a snapshot: edits to the folder during the run change nothing, and the hash
    # recorded is the hash of exactly what ran.
    stage_tree(plan.folder, plan.staged)
    jail_train_path = _stage_jail_input(plan)
    track, manifest = plan.track, plan.manifest
    job = Job(
        submission_dir=plan.staged,
        module=manifest.entry_module_name,
        function=manifest.entry_function,
        train_path=jail_train_path,
        out_dir=plan.jail_out,
        scratch=plan.scratch,
        device=plan.device,
        threads=track.device.threads,
        seed=plan.seed,
        budget_s=plan.budget_s,
        vocab_size=plan.vocab_size,
        eos_id=plan.eos_id,
        eval_seq_len=track.eval.seq_len,
        snapshot_every_s=track.snapshot_every_s,
        snapshot_window_s=plan.snapshot_window_s,
        config=merge_overrides(manifest.config_for(track.id), plan.overrides),  # check_submission validated it
    )
    atomic_write_text(plan.job_path, job.to_json())


def _stage_jail_input(plan: RunPlan) -> Path:
    """Copy the in-jail modules and the training split into plan.jail_input; return the split's
    copy, checked again against the track's hash (the copy is what the jail reads)."""
    for module, source in zip(in_jail.TRAINING, in_jail.sources(in_jail.TRAINING), strict=True):
        target = plan.jail_input / "evaluator" / module
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    train_copy = plan.jail_input / "train.parquet"
    shutil.copyfile(plan.train_path, train_copy)
    if sha256_file(train_copy) != plan.track.dataset.train.sha256:
        raise DataError(f"{plan.train_path} changed while it was copied for the run; run again")
    return train_copy

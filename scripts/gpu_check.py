"""The CUDA path, proven on a real GPU in one go; writes a Markdown report (and the raw figures).

    python3 scripts/gpu_check.py --out DIR [--budget 60]

Run by scripts/gpu-check.sh on a lent GPU machine, after it has installed the evaluator. Steps:

1. the GPU as nvidia-smi and torch see it, and what the sandbox depends on (cgroups, device nodes);
2. `evaluator run reference --track t4-5min --budget B` in nsjail: CUDA inside the jail, fp16
   autocast, the run `ok` and scored, with the GPU's memory polled from outside by nvidia-smi;
3. a jail given GPU 0 sees only that GPU's nodes, cannot open another `/dev/nvidia*` of the host,
   cannot make one (no CAP_MKNOD), and computes on the GPU; and whether the CUDA driver
   initialises in such a jail without its read-only sysfs (is that mount needed?);
4. the same run with `--sandbox none`: the sandbox tax on a GPU;
5. the reference's tokens/s and achieved TFLOP/s against a large fp16 matmul measured here;
6. sealed scoring on the GPU: what a fresh CUDA context costs each batch process, and that a batch
   process finds nothing of its predecessor's freed device memory in what it allocates.

Each step's failure is recorded and the next step still runs; the report is rewritten after every
step, so a check stopped by its time limit still leaves what it measured. Exit 0 only when every
step passed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from evaluator.calibration import calibrate
from evaluator.cli import run_guarded
from evaluator.metrics import last_logged_metric
from evaluator.nvml import driver_and_boards
from evaluator.runner import evaluate
from evaluator.sandbox import CGROUP_ROOT, JailSpec, cgroup_version, open_sandbox
from evaluator.tracks import load_track

ASSIGNED_NODES = {"/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia0"}
NVIDIA_MAJOR = 195  # /dev/nvidiaN and /dev/nvidiactl

# Runs inside the jail given GPU 0: what it sees, what it can open, whether it can make a node.
ISOLATION_PROBE = r"""
import errno, glob, json, os, stat, sys
host_nodes, assigned = json.loads(sys.argv[1]), set(json.loads(sys.argv[2]))
seen = sorted(glob.glob("/dev/nvidia*") + glob.glob("/dev/nvidia-caps/*"))
opened = []
for path in host_nodes:
    if path in assigned:
        continue
    try:
        os.close(os.open(path, os.O_RDWR))
        opened.append(path)
    except OSError:
        pass
try:
    os.mknod("/tmp/nvidia1", stat.S_IFCHR | 0o666, os.makedev(195, 1))
    mknod = "created"
except OSError as error:
    mknod = errno.errorcode.get(error.errno, str(error.errno))
import torch
x = torch.randn(2048, 2048, device="cuda", dtype=torch.float16)
finite = bool(torch.isfinite((x @ x).float()).all())
print(json.dumps(dict(
    seen=seen, opened_forbidden=opened, mknod=mknod, uid=os.getuid(),
    cuda=torch.cuda.is_available(), count=torch.cuda.device_count(),
    name=torch.cuda.get_device_name(0), fp16_matmul_finite=finite,
    cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
)))
"""


# Runs inside a jail given GPU 0: the CUDA driver's own initialisation, without torch.
CUINIT_PROBE = r"""
import ctypes, json
cuda = ctypes.CDLL("libcuda.so.1")
count = ctypes.c_int(-1)
status = cuda.cuInit(0)
if status == 0:
    cuda.cuDeviceGetCount(ctypes.byref(count))
print(json.dumps(dict(cuInit=status, devices=count.value)))
"""


# A submission whose model, in every scoring batch process, times its CUDA start, looks for the
# marker byte in fresh (uninitialised) device memory, then fills as much memory with the marker and
# frees it: were device memory handed on unscrubbed, a later batch process would find it.
DEVICE_MEMORY_PROBE = r"""
import time
import torch

MARKER = 0xA5
PROBE_BYTES = 512 << 20
# Imported by the unpickler before the first storage is loaded (and with it, the CUDA context made).
IMPORTED_AT = time.monotonic()


class Probe(torch.nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def decoder(self, rows):
        torch.cuda.synchronize()
        context_s = time.monotonic() - IMPORTED_AT
        fresh = torch.empty(PROBE_BYTES, dtype=torch.uint8, device="cuda")
        found = int((fresh == MARKER).sum())
        del fresh
        torch.full((PROBE_BYTES,), MARKER, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        print(f"PROBE context_s={context_s:.3f} marker_bytes_found={found}", flush=True)
        return self

    def step(self, tokens):
        return torch.zeros(len(tokens), self.vocab_size, device=tokens.device)

    def keep(self, rows):
        pass

    def forward(self, tokens):
        return torch.zeros(*tokens.shape, self.vocab_size, device=tokens.device)
"""


class Report:
    """Steps with PASS/FAIL, their figures and notes; written as Markdown and JSON after each step."""

    def __init__(self, out: Path):
        self.out = out
        self.steps: list[dict] = []

    def step(self, title: str, function) -> dict:
        entry = {"title": title, "passed": False, "lines": [], "data": {}}
        self.steps.append(entry)
        started = time.monotonic()
        print(f"== {title}", flush=True)
        try:
            entry["passed"] = bool(function(entry["lines"], entry["data"]))
        except Exception:
            entry["lines"].append("```\n" + traceback.format_exc()[-4000:] + "```")
        entry["seconds"] = round(time.monotonic() - started, 1)
        print(("PASS" if entry["passed"] else "FAIL") + f" in {entry['seconds']} s", flush=True)
        self.write()
        return entry

    def write(self) -> None:
        lines = [
            "# GPU check of the evaluator's CUDA path",
            "",
            f"Host: {platform.node()}, {platform.platform()}, Python {platform.python_version()}.",
            "Timings below are of THIS GPU, not of a Tesla T4: see the note at the end.",
            "",
            "| step | result | seconds |",
            "|---|---|---|",
        ]
        lines += [
            f"| {s['title']} | {'PASS' if s['passed'] else 'FAIL'} | {s.get('seconds', '')} |" for s in self.steps
        ]
        for entry in self.steps:
            lines += ["", f"## {entry['title']}", ""] + entry["lines"]
        lines += ["", "## What these timings mean", "", T4_NOTE]
        (self.out / "gpu-check.md").write_text("\n".join(lines) + "\n")
        (self.out / "gpu-check.json").write_text(json.dumps(self.steps, indent=2, default=str))


T4_NOTE = (
    "The official track is a Tesla T4 (sm_75: ~65 TFLOP/s fp16 tensor-core peak, ~40 achievable, "
    "320 GB/s, 16 GB, no bf16, no flash attention). A faster GPU runs the same 5-minute budget "
    "through many more steps, so a score or a step count measured here says nothing about a T4; "
    "what carries over is that the CUDA path works inside the jail, the isolation, the sandbox tax "
    "(the same fixed costs), and the reference's peak memory as a bound on what it needs. "
    "The runs here are unofficial on purpose (budget override, not a T4)."
)


def gpu_zero():
    """The board behind /dev/nvidia0, the node the jails of this script are given."""
    return next(board for board in driver_and_boards()[1] if board.minor == 0)


def sh(command: str) -> str:
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60)
    return (done.stdout + done.stderr).strip()


def host_nvidia_nodes() -> list[str]:
    """The host's NVIDIA device nodes (the /dev/nvidia-caps folder's nodes, not the folder)."""
    found = glob.glob("/dev/nvidia*") + glob.glob("/dev/nvidia-caps/*")
    return sorted(path for path in found if not os.path.isdir(path))


def check_device(lines: list[str], data: dict) -> bool:
    import torch

    data["nvidia_smi"] = sh(
        "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv"
    )
    data["torch"] = torch.__version__
    data["torch_cuda"] = torch.version.cuda
    available = torch.cuda.is_available()
    if available:
        props = torch.cuda.get_device_properties(0)
        data["device"] = dict(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            sms=props.multi_processor_count,
        )
    data["nodes"] = sh("ls -l /dev/nvidia* 2>&1")  # the glob names /dev/nvidia-caps, so ls lists it
    data["cgroups"] = sh(f"mount | grep cgroup; cat {CGROUP_ROOT}/cgroup.controllers 2>/dev/null")
    data["sandbox_cgroup_version"] = cgroup_version()
    data["libcuda"] = sh("ldconfig -p | grep -E 'libcuda\\.so|libnvidia-ml' ; echo LD_LIBRARY_PATH=$LD_LIBRARY_PATH")
    data["kernel"] = platform.release()
    for key in ("nvidia_smi", "nodes", "cgroups", "libcuda"):
        lines += [f"{key}:", "```", data[key], "```"]
    lines.append(f"torch {data['torch']} (CUDA {data['torch_cuda']}), device: {data.get('device')}")
    lines.append(f"the sandbox's jails use cgroup v{data['sandbox_cgroup_version']} here (None: no usable cgroups)")
    return available


def fp16_matmul_peak(lines: list[str], data: dict) -> bool:
    import torch

    size, repeats = 8192, 20
    a = torch.randn(size, size, device="cuda", dtype=torch.float16)
    b = torch.randn(size, size, device="cuda", dtype=torch.float16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    data["tflops"] = 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12
    lines.append(
        f"fp16 {size}x{size}x{size} matmul, mean of {repeats} after 3 warm-ups: **{data['tflops']:.0f} TFLOP/s**"
    )
    del a, b
    torch.cuda.empty_cache()
    return data["tflops"] > 0


class GpuMemoryPoll:
    """The GPU's used memory as nvidia-smi reports it, polled from outside every 0.2 s; keeps the max."""

    def __init__(self):
        self.peak_mib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            text = sh("nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0")
            if text.strip().isdigit():
                self.peak_mib = max(self.peak_mib, int(text))
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def reference_run(sandbox: str, budget: float, out: Path):
    def step(lines: list[str], data: dict) -> bool:
        baseline = sh("nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0")
        runs_dir = Path(tempfile.mkdtemp(prefix=f"gpu-check-{sandbox}-"))
        with GpuMemoryPoll() as poll:
            record, run_dir = evaluate(
                REPO_ROOT / "reference",
                track_id="t4-5min",
                seed=0,
                budget_s=budget,
                sandbox_choice=sandbox,
                runs_dir=runs_dir,
            )
        shutil.copyfile(run_dir / "result.json", out / f"result-{sandbox}.json")
        timings = json.loads((run_dir / "timings.json").read_text()) if (run_dir / "timings.json").is_file() else {}
        flops = last_logged_metric(run_dir, "flops")
        train = record["train"]
        data.update(
            status=record["status"],
            message=record["message"][-2000:],
            metrics=record["metrics"],
            train=train,
            environment=record["environment"],
            unofficial=record["unofficial_reasons"],
            timings=timings,
            gpu_memory_peak_mib=poll.peak_mib,
            gpu_memory_before_mib=baseline,
            flops=flops,
            achieved_tflops=flops / train["train_seconds"] / 1e12 if flops and train["train_seconds"] else None,
        )
        lines.append(f"status **{record['status']}**, sandbox {record['environment']['sandbox']}")
        if record["message"]:
            lines += ["```", record["message"][-2000:], "```"]
        if record["metrics"]:
            lines.append(f"val_loss {record['metrics']['val_loss']:.4f}, val_bpb {record['metrics']['val_bpb']:.4f}")
        lines.append(f"train {train}")
        if data["achieved_tflops"]:
            lines.append(f"model FLOPs (6N + 12LTd) per second of training: {data['achieved_tflops']:.1f} TFLOP/s")
        t4_gib = load_track("t4-5min").device.gpu_memory_gib
        lines.append(
            f"GPU memory used (nvidia-smi, whole GPU, polled from outside; the evaluator's and this script's "
            f"own CUDA contexts included): before {baseline} MiB, peak {poll.peak_mib} MiB; a T4 offers {t4_gib} GiB"
        )
        lines.append(f"timings.json: {json.dumps({k: round(v, 2) for k, v in timings.items()})}")
        lines.append(f"unofficial because: {record['unofficial_reasons']}")
        telemetry = record["gpu_telemetry"]
        series = run_dir / "gpu-telemetry.parquet"
        lines.append(
            f"GPU telemetry (NVML, sampled outside the jail): {json.dumps(telemetry)}; series file: {series.is_file()}"
        )
        tail = (run_dir / "train.log").read_text(errors="replace")[-1500:] if (run_dir / "train.log").is_file() else ""
        if tail.strip():
            lines += ["train.log tail:", "```", tail, "```"]
        sampled = bool(telemetry and telemetry["samples"] and series.is_file())
        shutil.rmtree(runs_dir, ignore_errors=True)
        if not sampled:
            lines.append("**FAIL**: no GPU telemetry was sampled during training")
        return record["status"] == "ok" and sampled

    return step


def _gpu_jail(scratch: Path, name: str, argv: list[str], sysfs: bool = True) -> tuple[str, str, str]:
    """Runs argv in an nsjail given GPU 0, with its read-only /sys or (sysfs=False) without; (stdout,
    outcome, stderr tail)."""
    workdir = scratch / name
    workdir.mkdir()
    spec = JailSpec(
        name=name,
        argv=argv,
        workdir=workdir,
        cwd=Path("/tmp"),
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"},
        ro_paths=[],
        rw_paths=[],
        tmpfs={},
        memory_bytes=8 << 30,
        pids=256,
        time_limit_s=120,
        log_path=scratch / f"{name}.log",
        log_cap_bytes=1 << 20,
        gpu_index=0,
        gpu_sysfs=sysfs,
    )
    with open_sandbox("nsjail").start(spec) as jail:
        jail.stdin.close()
        stdout = jail.stdout.read()
        jail.wait(120)
    outcome = jail.outcome()
    return (
        stdout.decode(errors="replace"),
        f"{outcome.reason} {outcome.detail}",
        spec.log_path.read_text(errors="replace")[-3000:],
    )


def sysfs_needed(lines: list[str], data: dict) -> bool:
    """cuInit in a GPU jail as the sandbox builds it, and without its /sys: the read-only sysfs of
    GPU jails stays only where CUDA needs it."""
    variants = {"with sysfs": True, "without sysfs": False}
    with tempfile.TemporaryDirectory(prefix="gpu-sysfs-") as scratch:
        for variant, sysfs in variants.items():
            stdout, outcome, stderr = _gpu_jail(
                Path(scratch), variant.replace(" ", "-"), [sys.executable, "-c", CUINIT_PROBE], sysfs
            )
            try:
                data[variant] = json.loads(stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                data[variant] = {"outcome": outcome, "stderr": stderr}
            lines.append(f"- {variant}: {json.dumps(data[variant])}")
    with_sysfs, without_sysfs = (data[variant].get("cuInit") == 0 for variant in variants)
    if not with_sysfs:
        lines.append("CUDA does not initialise in a GPU jail (see the stderr above).")
    elif without_sysfs:
        lines.append("CUDA initialises without /sys here: on this host the sysfs mount is not needed.")
    else:
        lines.append("CUDA needs /sys: the read-only sysfs of GPU jails is required.")
    return with_sysfs


def isolation(lines: list[str], data: dict) -> bool:
    host_nodes = host_nvidia_nodes()
    argv = [sys.executable, "-c", ISOLATION_PROBE, json.dumps(host_nodes), json.dumps(sorted(ASSIGNED_NODES))]
    with tempfile.TemporaryDirectory(prefix="gpu-isolation-") as scratch:
        stdout, outcome, stderr = _gpu_jail(Path(scratch), "gpu-isolation", argv)
    lines.append(f"host nodes: {host_nodes}")
    lines.append(f"jail outcome: {outcome}")
    try:
        seen = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        lines += ["no report from the jail; its stderr:", "```", stderr, "```"]
        return False
    data.update(seen, host_nodes=host_nodes)
    lines.append(f"inside the jail: {json.dumps(seen)}")
    verdicts = {
        "only the assigned nodes exist": set(seen["seen"]) <= ASSIGNED_NODES,
        "no other host node opens": not seen["opened_forbidden"],
        "mknod of another GPU's node refused": seen["mknod"] == "EPERM",
        "runs as nobody": seen["uid"] == 65534,
        "CUDA works, one device": seen["cuda"] and seen["count"] == 1 and seen["fp16_matmul_finite"],
    }
    lines += [f"- {'ok' if ok else 'FAILED'}: {what}" for what, ok in verdicts.items()]
    if len([n for n in host_nodes if n.removeprefix("/dev/nvidia").isdigit()]) < 2:
        lines.append("- note: this host has one GPU, so 'another GPU' exists only as the mknod attempt")
    return all(verdicts.values())


def sandbox_tax(report: Report) -> dict:
    def step(lines: list[str], data: dict) -> bool:
        runs = {s["title"]: s["data"] for s in report.steps if s["title"].startswith("reference, ")}
        jailed, bare = runs.get("reference, nsjail", {}), runs.get("reference, --sandbox none", {})
        if not (
            jailed.get("train")
            and bare.get("train")
            and jailed["train"]["tokens_per_s"]
            and bare["train"]["tokens_per_s"]
        ):
            lines.append("needs both runs ok")
            return False
        rows = [("tokens/s", "tokens_per_s"), ("steps", "steps"), ("train s", "train_seconds")]
        lines += ["| | nsjail | none | nsjail / none |", "|---|---|---|---|"]
        for label, key in rows:
            a, b = jailed["train"][key], bare["train"][key]
            lines.append(f"| {label} | {a:,.1f} | {b:,.1f} | {a / b:.3f} |")
        for key in sorted(set(jailed["timings"]) | set(bare["timings"])):
            a, b = jailed["timings"].get(key), bare["timings"].get(key)
            lines.append(f"| {key} | {a if a is None else round(a, 2)} | {b if b is None else round(b, 2)} | |")
        data["tokens_per_s_ratio"] = jailed["train"]["tokens_per_s"] / bare["train"]["tokens_per_s"]
        peak = next((s["data"].get("tflops") for s in report.steps if s["title"] == "fp16 matmul peak"), None)
        if peak and jailed.get("achieved_tflops"):
            data["fraction_of_peak"] = jailed["achieved_tflops"] / peak
            lines.append(
                f"\nthe reference in nsjail: {jailed['achieved_tflops']:.1f} TFLOP/s of model FLOPs = "
                f"{data['fraction_of_peak'] * 100:.1f} % of the {peak:.0f} TFLOP/s fp16 matmul measured here"
            )
        return True

    return step


def sealed_gpu_scoring(lines: list[str], data: dict) -> bool:
    import importlib.util
    import re

    import torch

    from evaluator.dataset.loader import read_documents
    from evaluator.dataset.store import resolve_data_file, tokenizer_info
    from evaluator.scoring import ScoringLimits, ScoringSession, ScoringSetup

    track = load_track("t4-5min")
    vocab_size, eos_id = tokenizer_info(resolve_data_file(track, "tokenizer"))
    documents = read_documents(resolve_data_file(track, "val"))[:40]
    with tempfile.TemporaryDirectory(prefix="gpu-check-scoring-", dir="/var/tmp") as scratch:
        folder = Path(scratch) / "probe"
        folder.mkdir()
        (folder / "train.py").write_text(DEVICE_MEMORY_PROBE)
        spec = importlib.util.spec_from_file_location("train", folder / "train.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["train"] = module  # pickled as train.Probe, as a submission's model would be
        spec.loader.exec_module(module)
        torch.save(module.Probe(vocab_size), Path(scratch) / "model.pt")
        began = time.monotonic()
        model_path = Path(scratch) / "model.pt"
        setup = ScoringSetup(
            name="gpu-check-scoring",
            submission_dir=folder,
            vocab_size=vocab_size,
            eos_id=eos_id,
            seq_len=track.eval.seq_len,
            batch_size=8,
            device="cuda:0",
            gpu=gpu_zero(),
            threads=track.device.threads,
            limits=ScoringLimits(
                load_s=track.eval.load_s,
                step_s=track.eval.step_s,
                total_s=track.eval.time_limit_s,
                consistency_nats=track.eval.consistency_nats,
            ),
            memory_bytes=track.sandbox.memory_mib * 2**20,
            pids=track.sandbox.pids,
            model_cap_bytes=model_path.stat().st_size,
            debug_log_dir=Path(scratch),
        )
        with ScoringSession(open_sandbox("nsjail"), setup) as session:
            report = session.score(model_path, documents)
        wall = time.monotonic() - began
        logs = "".join(path.read_text(errors="replace") for path in sorted(Path(scratch).glob("scoring-pass-*.log")))
    probes = [(float(a), int(b)) for a, b in re.findall(r"PROBE context_s=(\S+) marker_bytes_found=(\d+)", logs)]
    data.update(
        val_loss=report.val_loss,
        wall_s=wall,
        batch_processes=len(probes),
        context_s=[a for a, _ in probes],
        marker_bytes_found=[b for _, b in probes],
    )
    lines.append(
        f"{len(documents)} documents in batches of 8, 2 passes: {len(probes)} batch processes, "
        f"scoring {wall:.1f} s in all, val_loss {report.val_loss} (uniform: ln 8192 = 9.0109)"
    )
    if probes:
        lines.append(
            f"loading the model onto the GPU per batch process, the CUDA context included: "
            f"min {min(a for a, _ in probes):.3f} s, max {max(a for a, _ in probes):.3f} s"
        )
        lines.append(
            f"marker bytes found in 512 MiB of fresh device memory, per batch process: {[b for _, b in probes]}"
        )
    else:
        lines += ["no probe output; the servers' stderr:", "```", logs[-3000:], "```"]
    return len(probes) >= 4 and not any(found for _, found in probes)


def calibration_on_the_gpu(lines: list[str], data: dict) -> bool:
    """The calibration workload on this GPU, against the t4-5min figure (an estimate until a T4 runs it)."""
    track = load_track("t4-5min")
    figures = calibrate(track, repeats=5)  # refuses a factor outside calibration.FACTOR_RANGE: the step fails
    data.update(figures.as_dict())
    lines.append(
        f"{figures.workload} on {figures.host_device}: median {figures.host_seconds:.4f} s over "
        f"{len(figures.host_repeats)} repeats {figures.host_repeats}, spread {100 * figures.host_spread:.1f}%"
    )
    lines.append(
        f"against t4-5min's {figures.track_seconds:g} s ({figures.track_provenance}): factor {figures.factor:g}, "
        f"so a calibrated t4-5min budget here would be {track.budget_s * figures.factor:.0f} s "
        "(these are this GPU's figures, not a T4's)"
    )
    return figures.host_spread < 0.2  # a GPU this noisy gives no factor worth scaling a budget by


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for gpu-check.md, gpu-check.json and the two result.json"
    )
    parser.add_argument(
        "--budget", type=float, default=60.0, help="training budget of each reference run (default: %(default)s)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out)
    if not report.step("the GPU, torch and the host", check_device)["passed"]:
        return 1
    report.step("fp16 matmul peak", fp16_matmul_peak)
    report.step("CUDA in a jail with and without sysfs", sysfs_needed)
    report.step("isolation of a jail given GPU 0", isolation)
    report.step("reference, nsjail", reference_run("nsjail", args.budget, args.out))
    report.step("reference, --sandbox none", reference_run("none", args.budget, args.out))
    report.step("sandbox tax on the GPU", sandbox_tax(report))
    report.step("sealed scoring on the GPU: CUDA per batch process, no memory handed on", sealed_gpu_scoring)
    report.step("the calibration workload on this GPU", calibration_on_the_gpu)
    return 0 if all(step["passed"] for step in report.steps) else 1


if __name__ == "__main__":
    sys.exit(run_guarded("gpu_check.py", main))

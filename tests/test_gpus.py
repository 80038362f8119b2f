"""Which GPU a run gets (CUDA's index -> the board's device node, by PCI address) and the host's
locks, with a fake NVML and a fake CUDA enumeration: this machine has no GPU. The locks are real
flocks, taken across real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_submission

from evaluator import gpus
from evaluator.cli import main
from evaluator.sandbox import JailSpec, open_sandbox

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from fake_nvml import FakeBoard, FakeNvml  # noqa: E402  (importable once fixtures/ is on sys.path)

# Two boards whose orders disagree: NVML (by bus) lists 3B first, CUDA (fastest first) lists AF
# first, and the driver gave the 3B board minor number 1.
BOARDS = [
    FakeBoard(minor=1, pci_bus_id="00000000:3B:00.0", uuid="GPU-3b3b3b3b-0000-0000-0000-000000000000"),
    FakeBoard(minor=0, pci_bus_id="0000:AF:00.0", uuid="GPU-afafafaf-0000-0000-0000-000000000000"),
]
CUDA_ORDER = [(0, 0xAF, 0), (0, 0x3B, 0)]


@pytest.fixture
def two_gpus(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(BOARDS))
    monkeypatch.setattr(gpus, "cuda_pci_addresses", lambda: list(CUDA_ORDER))
    monkeypatch.setattr(gpus, "LOCK_DIR", tmp_path / "locks")
    return tmp_path / "locks"


def test_cuda_indices_map_to_device_nodes_by_pci_address_not_by_position(two_gpus):
    driver, boards = gpus.cuda_boards()
    assert [board.minor for board in boards] == [0, 1]
    with gpus.hold_gpu(0, "test") as first:
        assert (first.cuda_index, first.board.minor, first.board.uuid) == (0, 0, BOARDS[1].uuid)
    with gpus.hold_gpu(1, "test") as second:
        assert (second.board.minor, second.board.pci_bus_id) == (1, "00000000:3B:00.0")
    assert gpus.pci_address("00000000:3b:00.0") == gpus.pci_address("0000:3B:00.0") == (0, 0x3B, 0)


def test_a_cuda_gpu_nvml_does_not_list_or_an_index_out_of_range_is_refused(two_gpus, monkeypatch):
    with pytest.raises(gpus.UserError, match=r"--gpu 2: CUDA sees 2 GPU\(s\) here, numbered 0 to 1"):
        with gpus.hold_gpu(2, "test"):
            pass
    monkeypatch.setattr(gpus, "cuda_pci_addresses", lambda: [(0, 0x5E, 0)])
    with pytest.raises(gpus.UserError, match="CUDA's GPU 0 .*5e.* is not among the 2 GPU"):
        gpus.cuda_boards()
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(gpus.UserError, match="without NVML"):
        gpus.cuda_boards()


def test_each_run_gets_a_gpu_no_other_run_holds(two_gpus):
    with gpus.hold_gpu(None, "pid 1, run first") as first, gpus.hold_gpu(None, "pid 2, run second") as second:
        assert {first.board.minor, second.board.minor} == {0, 1}
        with pytest.raises(gpus.GpuUnavailable, match="every GPU of this host .2. is held by another run"):
            with gpus.hold_gpu(None, "third"):
                pass
        with pytest.raises(gpus.GpuUnavailable, match=r"GPU 0 \(0000:AF:00.0\) is held by pid 1, run first"):
            with gpus.hold_gpu(0, "third"):
                pass
    with gpus.hold_gpu(None, "after") as again:  # released when the runs ended
        assert again.cuda_index == 0


HOLDER = """
import sys, time
sys.path.insert(0, {fixtures!r})
from fake_nvml import FakeBoard, FakeNvml
sys.modules["pynvml"] = FakeNvml(
    [FakeBoard(minor=1, pci_bus_id="00000000:3B:00.0"), FakeBoard(minor=0, pci_bus_id="0000:AF:00.0")]
)
from evaluator import gpus
gpus.cuda_pci_addresses = lambda: [(0, 0xAF, 0), (0, 0x3B, 0)]
gpus.LOCK_DIR = __import__("pathlib").Path({lock_dir!r})
with gpus.hold_gpu(None, "pid %d, run in another process" % __import__("os").getpid()) as placed:
    print(placed.board.minor, flush=True)
    time.sleep(600)
"""


def test_the_lock_holds_across_processes_and_dies_with_its_holder(two_gpus):
    script = HOLDER.format(fixtures=str(Path(__file__).parent / "fixtures"), lock_dir=str(two_gpus))
    other = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "0"
        with gpus.hold_gpu(None, "here") as mine:
            assert mine.board.minor == 1  # the other process has minor 0
        with pytest.raises(gpus.GpuUnavailable, match=f"held by pid {other.pid}, run in another process"):
            with gpus.hold_gpu(0, "here"):
                pass
    finally:
        other.kill()  # SIGKILL: no cleanup code runs, and still the kernel drops the lock
        other.wait()
    with gpus.hold_gpu(0, "here") as mine:
        assert mine.board.minor == 0


def test_other_work_on_the_gpu_at_the_start_is_reported(two_gpus):
    BOARDS[1].pids[:] = [os.getpid(), 4242]
    try:
        with gpus.hold_gpu(0, "test") as placed:
            assert placed.busy_pids == (4242,)  # the evaluator's own process does not count
    finally:
        BOARDS[1].pids.clear()


def test_a_private_split_run_has_the_host_to_itself(two_gpus):
    with gpus.hold_host(exclusive=False, holder="a"), gpus.hold_host(exclusive=False, holder="b"):
        with pytest.raises(gpus.GpuUnavailable, match="scores a hidden split.*other runs of this evaluator"):
            with gpus.hold_host(exclusive=True, holder="private"):
                pass
    with gpus.hold_host(exclusive=True, holder="pid 7, run private"):
        with pytest.raises(gpus.GpuUnavailable, match=r"holds this host \(pid 7, run private\)"):
            with gpus.hold_host(exclusive=False, holder="c"):
                pass


def test_a_run_refused_by_a_lock_or_a_gpu_flag_leaves_nothing_behind(two_gpus, tmp_path, capsys):
    folder = write_submission(tmp_path, "waits", "def train(ctx):\n    return TinyCausal(ctx.vocab_size)\n")
    runs = tmp_path / "runs"
    with gpus.hold_host(exclusive=True, holder="pid 7, run private"):
        assert main(["run", str(folder), "--out", str(runs), "--budget", "5"]) == 2
    assert main(["run", str(folder), "--out", str(runs), "--gpu", "1"]) == 2
    err = capsys.readouterr().err
    assert "a run that scores a hidden split holds this host (pid 7, run private)" in err
    assert "--gpu applies to GPU tracks; track cpu-1min runs on the CPU" in err
    assert "Traceback" not in err and not runs.exists()


def test_without_nsjail_cuda_is_pointed_at_the_runs_board(tmp_path):
    # --sandbox none hides no device node, so the board is named in CUDA_VISIBLE_DEVICES.
    spec = JailSpec(
        name="gpu-env",
        argv=[sys.executable, "-c", "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES'))"],
        workdir=tmp_path / "work",
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"},
        ro_paths=[],
        rw_paths=[],
        tmpfs={},
        memory_bytes=1 << 30,
        pids=16,
        time_limit_s=30,
        log_path=tmp_path / "log",
        log_cap_bytes=1 << 16,
        gpu_index=None,
        gpu_uuid=BOARDS[0].uuid,
    )
    with open_sandbox("none").start(spec) as jailed:
        out = jailed.stdout.read().decode()
        jailed.wait()
    assert out.strip() == BOARDS[0].uuid


@pytest.mark.parametrize("plant", ["link-dir", "fifo", "directory", "link-file"])
def test_a_planted_lock_directory_or_file_is_one_line_never_followed(two_gpus, tmp_path, plant):
    target = tmp_path / "private"
    target.mkdir(mode=0o700)
    if plant == "link-dir":
        two_gpus.symlink_to(target)
    else:
        two_gpus.mkdir()
        lock = two_gpus / "host.lock"
        {
            "fifo": lambda: os.mkfifo(lock),
            "directory": lock.mkdir,
            "link-file": lambda: lock.symlink_to(target / "elsewhere"),
        }[plant]()
    with pytest.raises(gpus.UserError, match="lock") as refused:
        with gpus.hold_host(exclusive=False, holder="test"):
            pass
    assert "\n" not in str(refused.value)
    assert oct(target.stat().st_mode & 0o7777) == "0o700" and list(target.iterdir()) == []

"""evaluator.nvml against a fake NVML: the board inventory, telemetry sampling and its summary.

On a GPU host `scripts/gpu_check.py` shows the same calls against the real driver.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jsonschema
import pyarrow.parquet as pq
import pytest

from evaluator import nvml
from evaluator.results import result_schema

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from fake_nvml import FakeBoard, FakeNvml  # noqa: E402  (importable once fixtures/ is on sys.path)

IDLE, POWER_CAP, HW_THERMAL = 0x1, 0x4, 0x40


def _install(monkeypatch, fake) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake)


def _sample_all(fake: FakeNvml, board: FakeBoard) -> nvml.TelemetrySampler:
    with nvml.TelemetrySampler(board.minor, interval_s=0.01) as sampler:
        deadline = time.monotonic() + 10
        while board.samples_taken < len(board.readings) and sampler.unavailable is None:
            assert time.monotonic() < deadline, "the sampler took no samples"
            fake.sampled.wait(0.1)
            fake.sampled.clear()
    return sampler


def test_the_boards_are_listed_with_their_device_node_and_bus_id(monkeypatch):
    # NVML's order need not be the order of minor numbers: each board says which node is its own.
    fake = FakeNvml(
        [
            FakeBoard(minor=1, pci_bus_id="00000000:3B:00.0", uuid="GPU-b"),
            FakeBoard(minor=0, pci_bus_id="00000000:AF:00.0", uuid="GPU-a"),
        ]
    )
    _install(monkeypatch, fake)
    driver, boards = nvml.driver_and_boards()
    assert driver == "535.183.01"
    assert [(b.minor, b.pci_bus_id, b.uuid, b.name, b.memory_mib) for b in boards] == [
        (1, "00000000:3B:00.0", "GPU-b", "Tesla T4", 15360),
        (0, "00000000:AF:00.0", "GPU-a", "Tesla T4", 15360),
    ]
    assert fake.sessions == 0  # every session is shut down


def test_telemetry_summarises_clocks_and_counts_only_slowdowns(monkeypatch, tmp_path):
    readings = [
        (1590, 5000, 55, 40000, IDLE),  # idle is not a slowdown
        (1590, 5000, 70, 70000, 0),
        (1200, 5000, 78, 70100, POWER_CAP),
        (900, 5000, 86, 69000, POWER_CAP | HW_THERMAL),
        (1590, 5000, 80, 68000, 0),
    ]
    board = FakeBoard(minor=0, pci_bus_id="00000000:00:04.0", readings=readings)
    fake = FakeNvml([board])
    _install(monkeypatch, fake)
    sampler = _sample_all(fake, board)
    summary = sampler.summary()
    jsonschema.validate(summary, result_schema()["properties"]["gpu_telemetry"])
    taken = summary["samples"]
    assert taken >= len(readings) and sampler.unavailable is None
    assert summary["sm_clock_mhz"] == {"min": 900, "median": 1590, "max": 1590}
    assert summary["temperature_c"]["min"] == 55 and summary["temperature_c"]["max"] == 86
    assert summary["power_w"]["max"] == pytest.approx(70.1)
    # The samples after the scripted ones repeat the last reading (no slowdown).
    assert summary["throttled_s"] == pytest.approx(2 * 0.01)
    assert summary["throttle_reasons"] == ["hw_thermal_slowdown", "sw_power_cap"]

    path = sampler.write(tmp_path)
    series = pq.read_table(path).to_pylist()
    assert path.name == nvml.TELEMETRY_FILE and len(series) == taken
    assert [row["clock_event_reasons"] for row in series[:5]] == [r[4] for r in readings]
    assert [row["power_w"] for row in series[:2]] == [40.0, 70.0]
    times = [row["elapsed_s"] for row in series]
    assert times == sorted(times) and times[0] >= 0


def test_without_the_library_there_is_no_telemetry_and_no_failure(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    with pytest.raises(nvml.NvmlUnavailable, match="nvidia-ml-py is not installed"):
        nvml.driver_and_boards()
    with nvml.TelemetrySampler(0, interval_s=0.01) as sampler:
        pass
    summary = sampler.summary()
    jsonschema.validate(summary, result_schema()["properties"]["gpu_telemetry"])
    assert summary["samples"] == 0 and "not installed" in summary["unavailable"]
    assert summary["sm_clock_mhz"] is None and summary["throttled_s"] == 0
    assert sampler.write(tmp_path) is None and not list(tmp_path.iterdir())


def test_a_driver_that_does_not_start_or_a_board_it_lacks_is_said(monkeypatch):
    _install(monkeypatch, FakeNvml([FakeBoard(minor=0, pci_bus_id="x")], fail_init=True))
    with pytest.raises(nvml.NvmlUnavailable, match="NVML did not start: Driver Not Loaded"):
        nvml.driver_and_boards()
    _install(monkeypatch, FakeNvml([FakeBoard(minor=0, pci_bus_id="x")]))
    with nvml.TelemetrySampler(3, interval_s=0.01) as sampler:
        pass
    assert sampler.unavailable == "NVML knows no GPU behind /dev/nvidia3"


def test_a_gpu_lost_mid_run_keeps_what_was_sampled(monkeypatch):
    board = FakeBoard(minor=0, pci_bus_id="x", readings=[(1590, 5000, 60, 65000, 0)] * 3, fail_at_sample=3)
    fake = FakeNvml([board])
    _install(monkeypatch, fake)
    with nvml.TelemetrySampler(0, interval_s=0.01) as sampler:
        deadline = time.monotonic() + 10
        while sampler.unavailable is None:
            assert time.monotonic() < deadline, "the lost GPU was never noticed"
            time.sleep(0.01)
    summary = sampler.summary()
    assert summary["samples"] == 3 and summary["unavailable"] == "sampling stopped: NVMLError: GPU is lost"
    assert fake.sessions == 0


def test_the_slowdown_bits_are_the_libraries_own():
    import pynvml  # the real bindings: nvidia-ml-py is a dependency, installed without a driver too

    names = {
        "sw_power_cap": "SwPowerCap",
        "hw_slowdown": "HwSlowdown",
        "sw_thermal_slowdown": "SwThermalSlowdown",
        "hw_thermal_slowdown": "HwThermalSlowdown",
        "hw_power_brake_slowdown": "HwPowerBrakeSlowdown",
    }
    for ours, theirs in names.items():
        assert nvml._SLOWDOWN_REASONS[ours] == getattr(pynvml, f"nvmlClocksEventReason{theirs}")

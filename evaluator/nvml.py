"""NVML: the one module that asks the NVIDIA driver about its GPUs (through `nvidia-ml-py`).

It runs on the host, outside every jail: the boards a run can be placed on, the driver's version,
and the telemetry sampled while a submission trains (clocks, temperature, power and the reasons
the driver gave for holding clocks down). A T4 at 70 W slows itself when hot or at its power cap;
a result that says so is one a reader can discount.

Nothing here parses `nvidia-smi`. Without the library (a CPU host, a container without the driver)
every entry point raises NvmlUnavailable, which callers turn into "no telemetry", never a failure.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from evaluator.fsutil import atomic_write_bytes

TELEMETRY_FILE = "gpu-telemetry.parquet"
SAMPLE_INTERVAL_S = 1.0
_REASON_MAX_CHARS = 300  # result.schema.json's bound on gpu_telemetry.unavailable

# The clock-event reasons that mean the GPU ran slower than it could: power cap, thermal limits,
# hardware slowdown, power brake. Idle, application clocks and sync boost are not slowdowns.
_SLOWDOWN_REASONS = {
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sw_thermal_slowdown": 0x20,
    "hw_thermal_slowdown": 0x40,
    "hw_power_brake_slowdown": 0x80,
}

TELEMETRY_SCHEMA = pa.schema(
    [
        ("elapsed_s", pa.float64()),
        ("sm_clock_mhz", pa.int32()),
        ("memory_clock_mhz", pa.int32()),
        ("temperature_c", pa.int32()),
        ("power_w", pa.float64()),
        ("clock_event_reasons", pa.int64()),
    ]
)


class NvmlUnavailable(Exception):
    """No NVIDIA management library here, or it failed to start."""


def _library():
    try:
        import pynvml
    except ImportError as exc:
        raise NvmlUnavailable(f"nvidia-ml-py is not installed ({exc})") from None
    return pynvml


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@contextmanager
def _session() -> Iterator[Any]:
    nvml = _library()
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        raise NvmlUnavailable(f"NVML did not start: {exc}") from None
    try:
        yield nvml
    finally:
        nvml.nvmlShutdown()


@dataclass(frozen=True)
class Board:
    """One GPU as the driver sees it. `minor` names its device node (/dev/nvidia<minor>)."""

    minor: int
    pci_bus_id: str
    name: str
    uuid: str
    memory_mib: int


def _board(nvml, handle) -> Board:
    return Board(
        minor=nvml.nvmlDeviceGetMinorNumber(handle),
        pci_bus_id=_text(nvml.nvmlDeviceGetPciInfo(handle).busId),
        name=_text(nvml.nvmlDeviceGetName(handle)),
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        memory_mib=nvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20,
    )


def driver_and_boards() -> tuple[str, list[Board]]:
    """The driver's version and every board, in NVML's order (by PCI bus id, like nvidia-smi)."""
    with _session() as nvml:
        try:
            boards = [_board(nvml, nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(nvml.nvmlDeviceGetCount())]
            return _text(nvml.nvmlSystemGetDriverVersion()), boards
        except nvml.NVMLError as exc:
            raise NvmlUnavailable(f"NVML could not list the GPUs: {exc}") from None


def busy_pids(minor: int) -> list[int]:
    """The processes with CUDA work on the board behind /dev/nvidia<minor> (host pids)."""
    with _session() as nvml:
        try:
            processes = nvml.nvmlDeviceGetComputeRunningProcesses(_handle_for_minor(nvml, minor))
        except nvml.NVMLError as exc:
            raise NvmlUnavailable(f"NVML could not list the GPU's processes: {exc}") from None
        return sorted({process.pid for process in processes})


def _handle_for_minor(nvml, minor: int):
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        if nvml.nvmlDeviceGetMinorNumber(handle) == minor:
            return handle
    raise NvmlUnavailable(f"NVML knows no GPU behind /dev/nvidia{minor}")


def _clock_event_reasons(nvml, handle) -> int:
    # Renamed in driver 535 ("throttle" became "clocks event"); older bindings only have the old name.
    read = (
        getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or nvml.nvmlDeviceGetCurrentClocksThrottleReasons
    )
    return int(read(handle))


class TelemetrySampler:
    """Samples one board every SAMPLE_INTERVAL_S on a thread of the evaluator while the block runs:

        with TelemetrySampler(minor=0) as telemetry:
            ...train...
        telemetry.summary(), telemetry.write(run_dir)

    A board NVML cannot read is not an error: the sampler then holds no samples and says why.
    """

    def __init__(self, minor: int, interval_s: float = SAMPLE_INTERVAL_S):
        self.minor = minor
        self.interval_s = interval_s
        self.rows: list[tuple[float, int, int, int, float, int]] = []
        self.unavailable: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_at = 0.0

    def __enter__(self) -> TelemetrySampler:
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._sample_until_stopped, name="gpu-telemetry", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _sample_until_stopped(self) -> None:
        try:
            with _session() as nvml:
                handle = _handle_for_minor(nvml, self.minor)
                while True:
                    self.rows.append(self._sample(nvml, handle))
                    if self._stop.wait(self.interval_s):
                        return
        except NvmlUnavailable as exc:
            self.unavailable = str(exc)[:_REASON_MAX_CHARS]
        except Exception as exc:  # an NVMLError mid-run (GPU fell off the bus): keep what was sampled
            self.unavailable = f"sampling stopped: {type(exc).__name__}: {exc}"[:_REASON_MAX_CHARS]

    def _sample(self, nvml, handle) -> tuple[float, int, int, int, float, int]:
        return (
            round(time.monotonic() - self._started_at, 3),
            nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
            nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM),
            nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
            nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            _clock_event_reasons(nvml, handle),
        )

    def summary(self) -> dict[str, Any]:
        """What result.json keeps: min/median/max of each reading, and the seconds (sample intervals)
        in which the driver reported a slowdown, with the reasons it gave."""
        summary: dict[str, Any] = {
            "samples": len(self.rows),
            "interval_s": self.interval_s,
            "unavailable": self.unavailable,
        }
        columns = list(zip(*self.rows, strict=True)) if self.rows else [()] * 6
        for name, values in zip(
            ("sm_clock_mhz", "memory_clock_mhz", "temperature_c", "power_w"), columns[1:5], strict=True
        ):
            summary[name] = (
                None if not values else {"min": min(values), "median": statistics.median(values), "max": max(values)}
            )
        slowed = [reasons for reasons in columns[5] if reasons & sum(_SLOWDOWN_REASONS.values())]
        summary["throttled_s"] = round(len(slowed) * self.interval_s, 3)
        summary["throttle_reasons"] = sorted(
            name for name, bit in _SLOWDOWN_REASONS.items() if any(reasons & bit for reasons in slowed)
        )
        return summary

    def write(self, run_dir: Path) -> Path | None:
        """The series as gpu-telemetry.parquet in the run directory (nothing when nothing was sampled)."""
        if not self.rows:
            return None
        table = pa.Table.from_pylist(
            [dict(zip(TELEMETRY_SCHEMA.names, row, strict=True)) for row in self.rows], schema=TELEMETRY_SCHEMA
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        path = Path(run_dir) / TELEMETRY_FILE
        atomic_write_bytes(path, sink.getvalue().to_pybytes())
        return path

"""metrics.parquet, a run's `ctx.log` rows: its one owner (written after training, read by publish,
which signs the training loss curve along with the result).

One row per logged value: time_s (on the evaluator's clock), step, key, value. The numbers are
the submission's own account of its training (advisory: nothing is scored from them).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from evaluator.errors import UserError
from evaluator.fsutil import atomic_write_bytes

METRICS_FILE = "metrics.parquet"
LOSS_METRIC = "loss"
# Enough points to draw a smooth curve; a run that logs every step would otherwise bloat the envelope.
LOSS_CURVE_MAX_POINTS = 1000

Row = tuple[float, int, str, float]  # (time_s, step, key, value)


def write_metrics(run_dir: Path, rows: list[Row]) -> None:
    table = pa.table(
        {
            "time_s": pa.array([r[0] for r in rows], pa.float64()),
            "step": pa.array([r[1] for r in rows], pa.int64()),
            "key": pa.array([r[2] for r in rows], pa.string()),
            "value": pa.array([r[3] for r in rows], pa.float64()),
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(run_dir / METRICS_FILE, sink.getvalue().to_pybytes())


def last_logged(rows: list[Row], key: str) -> float | None:
    """The last value logged under `key` among a run's rows, or None."""
    values = [value for _, _, k, value in rows if k == key]
    return values[-1] if values else None


def last_logged_metric(run_dir: Path, key: str) -> float | None:
    """The last value a run logged under `key` (from its metrics.parquet), or None."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return None
    values = [row["value"] for row in pq.read_table(path).to_pylist() if row["key"] == key]
    return values[-1] if values else None


def empty_loss_curve() -> dict[str, Any]:
    """The loss curve of a run that left no metrics.parquet."""
    return {"metric": LOSS_METRIC, "logged_points": 0, "time_s": [], "step": [], "value": []}


def read_loss_curve(metrics_path: Path) -> dict[str, Any]:
    """The `loss` rows of a run's metrics.parquet, in clock order, thinned to at most LOSS_CURVE_MAX_POINTS."""
    try:
        table = pq.read_table(metrics_path, columns=["time_s", "step", "key", "value"])
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise UserError(f"cannot read {metrics_path}: {exc}") from None
    columns = (table.column(name).to_pylist() for name in ("time_s", "step", "key", "value"))
    points = sorted(
        (float(time_s), int(step), float(value))
        for time_s, step, key, value in zip(*columns, strict=True)
        if key == LOSS_METRIC and None not in (time_s, step, value) and math.isfinite(time_s) and math.isfinite(value)
    )
    logged = len(points)
    if logged > LOSS_CURVE_MAX_POINTS:
        # Evenly spaced indices that always keep the first and the last point.
        last = logged - 1
        points = [points[round(i * last / (LOSS_CURVE_MAX_POINTS - 1))] for i in range(LOSS_CURVE_MAX_POINTS)]
    return {
        "metric": LOSS_METRIC,
        "logged_points": logged,
        "time_s": [p[0] for p in points],
        "step": [p[1] for p in points],
        "value": [p[2] for p in points],
    }

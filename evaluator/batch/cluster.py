"""Ray as the driver sees it: importing it (an optional extra), connecting to a cluster or starting
a small local instance, and what one run of a track asks of a node in Ray's resource names.

Apart so that the rest of the batch never depends on how Ray is reached.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from typing import Any

from evaluator.errors import UserError
from evaluator.tracks import Track

INSTALL_HINT = "pip install -e '.[cluster]'"
# Ray's share of /dev/shm on a laptop: archives pass through it one at a time.
LOCAL_OBJECT_STORE_BYTES = 200 * 2**20
# Ray's accelerator-type resources are markers: every GPU node has 1 of its type; tasks ask a sliver.
ACCELERATOR_SHARE = 0.001


def task_resources(track: Track) -> dict[str, float]:
    """What one run of this track asks of a Ray node, in Ray's resource names."""
    if track.device.kind == "cpu":
        return {"CPU": track.device.threads}
    resources: dict[str, float] = {"CPU": 1, "GPU": 1}
    gpu_name = track.device.gpu_name_contains
    if gpu_name:
        # Ray gives a GPU node `accelerator_type:<model>` from the GPU's name: "Tesla T4" -> "T4".
        resources[f"accelerator_type:{gpu_name.replace(' ', '-')}"] = ACCELERATOR_SHARE
    return resources


def ray_options(resources: dict[str, float]) -> dict[str, Any]:
    custom = {name: amount for name, amount in resources.items() if name not in ("CPU", "GPU")}
    return {"num_cpus": resources["CPU"], "num_gpus": resources.get("GPU", 0), "resources": custom}


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(f"evaluator batch needs Ray, which is not installed here: {INSTALL_HINT}") from None
    return ray


def describe_ray_error(exc: Exception) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1].strip() if lines else ''}"


class RayInstance:
    """A connection to the cluster at `address`, or a small local instance started (and stopped) here."""

    def __init__(self, ray, address: str | None):
        self.ray = ray
        self.address = address
        self.started_here = False
        self.temp_dir: str | None = None  # the local instance's logs: kept when asked to, else removed
        self.keep_logs = False

    def __enter__(self) -> RayInstance:
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

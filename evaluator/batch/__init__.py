"""`evaluator batch`: every (submission, seed) run of a competition, scheduled on Ray.

Each run is the ordinary `evaluator run` in a subprocess on whichever node Ray picks, so the sandbox,
the clock and the scoring are exactly those of a single run. The machine that starts the batch (the
driver) sends each submission to the node as a tar archive; the node sends the run directory back
the same way, and the driver unpacks it into `<results>/runs/`, accepting nothing but plain files
and folders. Ray is an optional extra, imported only when this command runs.

    driver.py   the command: checks, planning and resume, dispatch, the watchdog's limit, the summary
    cluster.py  Ray: importing it, reaching or starting an instance, a track's resources
    runs.py     what the driver knows of each run
    node.py     on the node: `evaluator run` on Ray's GPU under the watchdog, its run directory packed
    receive.py  on the driver: a node's run directory unpacked and its result accepted or refused
    archive.py  the tar trip: packing, and unpacking only plain files and folders within a cap
    report.py   the lines, the bar and the summary table on stderr
"""

from evaluator.batch.archive import UnsafeArchive, extract_archive, pack_folder

# The command is evaluator.batch.driver (evaluator/cli.py); importing it here would load the driver
# in every Ray worker that imports node.py.
__all__ = ["UnsafeArchive", "extract_archive", "pack_folder"]

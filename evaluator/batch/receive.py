"""The driver's side of a node's reply: unpack the run directory it sent, accept its result only if
it is valid and is the run that was asked for (same tree, same track file, the seed sent, drawn or
not), and move it into `<results>/runs/<run-id>/`.

Apart because this is where the driver trusts another machine's word, and nowhere else.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from evaluator.batch.archive import RUN_ARCHIVE_CAP_BYTES, UnsafeArchive, extract_archive
from evaluator.batch.node import RUN_ID_PATTERN
from evaluator.batch.runs import Run
from evaluator.harness import MODEL_FILE
from evaluator.paths import shown
from evaluator.results import RESULT_FILE, result_problems, strict_json_loads, write_result


def receive(run: Run, reply: dict[str, Any], runs_dir: Path) -> None:
    """Unpack a node's reply into runs_dir/<run-id>/ and set the verdict on `run`."""
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
        result = strict_json_loads((incoming / RESULT_FILE).read_bytes())
        problems = result_problems(result)
        submission = run.submission
        if not problems:
            if result["submission"]["tree_sha256"] != submission.tree_sha256:
                problems.append("it evaluated a different submission tree than the one sent")
            if result["track"]["sha256"] != submission.track.sha256:
                problems.append(f"its spec/tracks/{submission.track.id}.toml differs from this machine's")
            if (result["seed"], result["seed_drawn"]) != (run.seed, run.seed_drawn):
                problems.append(f"it ran seed {result['seed']} instead of {run.label.rsplit(' seed ', 1)[1]}")
        if problems:
            run.failure = f"the result from {run.node} cannot be accepted: " + "; ".join(problems)
            return
        # The node ran a copy; verify re-hashes the folder that the result names, so name the original.
        result["submission"]["path"] = shown(submission.folder.resolve())
        write_result(incoming, result)
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
    run.result, run.run_dir = result, final_dir
    if reply["model_left_out_bytes"] is not None:
        run.note = f"{MODEL_FILE} ({reply['model_left_out_bytes']} bytes) was too large to bring back"

"""What the batch shows on stderr: plain lines, one bar for the whole batch with a line per
finished run above it, and the summary table at the end.

Apart so that the scheduling reads as scheduling; nothing here decides anything about a run.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from evaluator.batch.runs import Run
from evaluator.progress import bar

LOG_WIDTH = 160
_FAILURE_TAIL_LINES = 6


def batch_console() -> Console:
    console = Console(stderr=True)
    if not console.is_terminal:
        console.width = LOG_WIDTH  # rich assumes 80 columns for logs and pipes: the summary needs more
    return console


def say(console: Console, text: str) -> None:
    """A plain line: no rich markup in submission names or messages, no wrapping in logs."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def outcome_text(run: Run, suffix: str = "") -> str:
    """One line about the run (with `suffix`), then, for a failure of the evaluator, the last lines
    of what the node said."""
    where = f"on {run.node or 'no node'}" + (f", {run.seconds:.0f} s" if run.seconds is not None else "")
    if run.result is None:
        summary, _, detail = run.failure.partition("\n")
        tail = detail.strip().splitlines()[-_FAILURE_TAIL_LINES:]
        return "\n".join(
            [f"{run.label} ({where}): evaluator failure: {summary}{suffix}", *(f"    {line}" for line in tail)]
        )
    result = run.result
    parts = [f"{run.label} ({where}): {result['status']}"]
    if result["metrics"]:
        parts.append(f"val_loss {result['metrics']['val_loss']:.4f}")
    elif result["message"]:
        parts.append(result["message"].splitlines()[0][:200])
    return "  ".join(parts) + suffix


class BatchProgress:
    """One bar for the whole batch, with the counts; a line per finished run goes above it."""

    def __init__(self, console: Console, runs: list[Run]):
        self.console = console
        self.runs = runs
        self.progress = bar(
            console,
            TextColumn("[bold]batch"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[counts]}"),
            TimeElapsedColumn(),
        )
        self.task = self.progress.add_task("batch", total=len(runs), counts="")

    def __enter__(self) -> BatchProgress:
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
        say(self.console, text)
        self.refresh()


def summary(console: Console, runs: list[Run], invalid: list[tuple[Path, int]]) -> None:
    table = Table(title="batch summary")
    for column in ("submission", "seed", "status", "val_loss", "val_bpb", "train s", "run"):
        table.add_column(column, justify="right" if column in ("seed", "val_loss", "val_bpb", "train s") else "left")
    for run in runs:
        result = run.result
        metrics = result["metrics"] if result else None
        train_s = result["train"]["train_seconds"] if result else None
        status = result["status"] if result else "evaluator failure"
        note = "earlier run" if run.reused else run.note or ("retried, same seed" if run.attempts > 1 else "")
        table.add_row(
            run.submission.name,
            f"{run.seed} (drawn)" if run.seed_drawn else str(run.seed),
            status,
            f"{metrics['val_loss']:.4f}" if metrics else "-",
            f"{metrics['val_bpb']:.4f}" if metrics else "-",
            f"{train_s:.1f}" if train_s is not None else "-",
            (run.run_dir.name if run.run_dir else "-") + (f" ({note})" if note else ""),
        )
    for folder, problems in invalid:
        table.add_row(str(folder), "-", "invalid_submission", "-", "-", "-", f"{problems} problem(s), not run")
    console.print(table)

"""Honest evaluator for LLM training speedruns.

The pipeline, one module or package per stage (docs/ARCHITECTURE.md): manifest -> check -> plan ->
sandbox -> harness and training -> scoring and curve -> results -> signing and publish -> leaderboard;
batch runs it on a cluster. `evaluator.api` is the only module a submission imports.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from evaluator import evaluate` for notebooks and scripts. Imported on first use only: the
    # in-jail modules import this package too, and must never load the host side with it.
    if name == "evaluate":
        from evaluator.runner import evaluate

        return evaluate
    raise AttributeError(f"module 'evaluator' has no attribute {name!r}")

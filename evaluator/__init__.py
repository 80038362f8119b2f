"""Honest evaluator for LLM training speedruns.

The pipeline, one module per stage: manifest -> check -> sandbox -> harness -> scoring -> results ->
leaderboard. `evaluator.api` is the only module a submission imports.
"""

__version__ = "0.1.0"

"""The fixed dataset: build, verify and load the Parquet splits and tokenizer (see docs/DATASET.md).

Kept free of imports: the harness imports `evaluator.dataset.loader` inside the sandbox, which
must not pull in host-only modules.
"""

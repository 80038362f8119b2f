# Appended to TINY_MODEL (tests/conftest.py). Harmless wherever it runs: it only reads.
# The attack that scored 0.045 nats when the training jail bound /usr: rebuild the validation split
# from the dataset's sources as `evaluator data build` reads them (the reST sources of the Python
# documentation, `*.rst.txt` under the source dir), or from the documentation's text that the
# standard library carries (pydoc_data.topics), and train on it.
import glob
import os

from attack_kit import error_name, report


def _topics():
    try:
        from pydoc_data.topics import topics
    except Exception as error:
        return error_name(error)
    return len(topics)


def train(ctx):
    source_dir = ctx.config["dataset_sources"]
    sources = glob.glob(os.path.join(source_dir, "**", "*.rst.txt"), recursive=True)
    text_bytes = 0
    for path in sources:
        with open(path, "rb") as source:
            text_bytes += len(source.read())
    report(
        {
            "source_dir_exists": os.path.isdir(source_dir),
            "source_files": len(sources),
            "source_bytes": text_bytes,
            "pydoc_topics": _topics(),
        }
    )

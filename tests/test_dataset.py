"""The fixed dataset: the committed files, the split's honesty, the builders, the loader, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from evaluator import tracks
from evaluator.cli import main
from evaluator.dataset import source_hub, source_pydoc
from evaluator.dataset.build import EOS_TOKEN, is_validation, truncate_text
from evaluator.dataset.loader import read_documents, read_train_tokens
from evaluator.dataset.store import (
    resolve_data_file,
    tokenizer_info,
    verify_track,
)
from evaluator.errors import DataError, UserError
from evaluator.fsutil import sha256_file
from evaluator.paths import DATASETS_DIR, TRACKS_DIR

DATASET = DATASETS_DIR / "pydoc-100k"
TRAIN, VAL, TOKENIZER = DATASET / "train.parquet", DATASET / "val.parquet", DATASET / "tokenizer.json"
HUB_FIXTURE = Path(__file__).parent / "fixtures" / "hub"
PYDOC_SOURCES = source_pydoc.DEFAULT_SOURCE_DIR
WINDOW = 64

# In CI the source must be there (make setup installs it), so there the tests run and fail without it.
needs_pydoc = pytest.mark.skipif(
    not PYDOC_SOURCES.is_dir() and not os.environ.get("CI"), reason="Debian's python3.11-doc is not installed"
)


def texts_of(path: Path) -> list[str]:
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


# --- the committed dataset ---------------------------------------------------------------------


def test_committed_dataset_has_the_promised_size_and_tokenizer():
    train, val = read_documents(TRAIN), read_documents(VAL)
    assert len(train) + len(val) == 1000
    assert 90 <= len(val) <= 110
    total = sum(len(doc.tokens) for doc in (*train, *val))
    assert 99_000 <= total <= 101_000
    assert tokenizer_info(TOKENIZER) == (8192, 0)
    assert all(doc.tokens for doc in (*train, *val))


def test_committed_split_follows_the_hash_rule_and_tokens_match_the_tokenizer():
    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    for path, expect_val in ((TRAIN, False), (VAL, True)):
        table = pq.read_table(path)
        assert table.schema.names == ["doc_id", "text", "tokens", "n_tokens", "n_bytes"]
        ids, texts = table.column("doc_id").to_pylist(), table.column("text").to_pylist()
        assert [is_validation(doc_id) for doc_id in ids] == [expect_val] * len(ids)
        encoded = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
        assert encoded == table.column("tokens").to_pylist()
        assert all(EOS_TOKEN not in text for text in texts)


def test_no_validation_document_text_or_window_appears_in_training():
    train, val = read_documents(TRAIN), read_documents(VAL)
    train_texts, val_texts = texts_of(TRAIN), texts_of(VAL)
    assert not {doc.doc_id for doc in train} & {doc.doc_id for doc in val}
    assert not set(train_texts) & set(val_texts)
    # Every 64-token window of the training stream, separators included, as the model sees it.
    stream = read_train_tokens(TRAIN, eos_id=0).tolist()
    train_windows = {tuple(stream[i : i + WINDOW]) for i in range(len(stream) - WINDOW + 1)}
    shared = [
        doc.doc_id
        for doc in val
        # The scorer feeds each validation document after a separator: check that view too.
        for tokens in [[0, *doc.tokens]]
        if any(tuple(tokens[i : i + WINDOW]) in train_windows for i in range(len(tokens) - WINDOW + 1))
    ]
    assert shared == []


def test_tracks_pin_the_committed_files(capsys):
    for track_id in ("cpu-1min", "t4-5min"):
        track = tracks.load_track(track_id)
        assert track.dataset.id == "pydoc-100k"
        assert verify_track(track) == []
        assert resolve_data_file(track, "val") == VAL
    assert main(["data", "verify"]) == 0
    out = capsys.readouterr().out
    assert (
        out.count("ok ") == 3 * len(tracks.available_tracks()) and "FAIL" not in out
    )  # train, val, tokenizer per track


def test_datasheet_records_the_hashes_and_the_licence():
    sheet = (DATASET / "DATASHEET.md").read_text()
    for path in (TRAIN, VAL, TOKENIZER):
        assert sha256_file(path) in sheet
    assert "PSF License Agreement" in sheet and "python3.11-doc" in sheet


# --- the loader --------------------------------------------------------------------------------


def test_read_train_tokens_joins_documents_after_separators_quickly():
    import torch

    documents = read_documents(TRAIN)
    expected = [token for doc in documents for token in (7, *doc.tokens)]
    tokens = read_train_tokens(TRAIN, eos_id=7)
    assert tokens.dtype == torch.int64 and tokens.dim() == 1
    assert tokens.tolist() == expected
    best = min(_timed(lambda: read_train_tokens(TRAIN, eos_id=0)) for _ in range(3))
    assert best < 1.0, f"read_train_tokens took {best:.3f} s"


def _timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def test_loader_reads_a_sliced_table_correctly(tmp_path):
    # Arrow arrays can start at an offset; the fast path must honour it.
    table = pq.read_table(TRAIN).slice(3, 5)
    path = tmp_path / "slice.parquet"
    pq.write_table(table, path)
    expected = [t for tokens in table.column("tokens").to_pylist() for t in (0, *tokens)]
    assert read_train_tokens(path, eos_id=0).tolist() == expected


@pytest.fixture
def broken_files(tmp_path) -> dict[str, Path]:
    data = TRAIN.read_bytes()
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(data[: len(data) // 2])
    # A few bytes changed inside the token column, the one every reader reads.
    tokens_column = pq.ParquetFile(TRAIN).metadata.row_group(0).column(2)
    spot = tokens_column.data_page_offset + tokens_column.total_compressed_size // 2
    corrupted = tmp_path / "corrupted.parquet"
    corrupted.write_bytes(data[:spot] + bytes(b ^ 0x5A for b in data[spot : spot + 8]) + data[spot + 8 :])
    footer = tmp_path / "footer.parquet"
    footer.write_bytes(data[:-200] + bytes(192) + data[-8:])
    wrong_schema = tmp_path / "schema.parquet"
    pq.write_table(pa.table({"doc_id": ["a"], "text": ["x"], "tokens": [[1.5]]}), wrong_schema)
    missing_column = tmp_path / "columns.parquet"
    pq.write_table(pa.table({"doc_id": ["a"], "text": ["x"]}), missing_column)
    not_parquet = tmp_path / "text.parquet"
    not_parquet.write_text("doc_id,text\n")
    return {
        "missing": tmp_path / "absent.parquet",
        "truncated": truncated,
        "corrupted": corrupted,
        "footer": footer,
        "wrong_schema": wrong_schema,
        "missing_column": missing_column,
        "not_parquet": not_parquet,
    }


@pytest.mark.parametrize(
    "kind", ["missing", "truncated", "corrupted", "footer", "wrong_schema", "missing_column", "not_parquet"]
)
def test_loader_refuses_broken_files_with_one_sentence(broken_files, kind):
    path = broken_files[kind]
    for read in (read_documents, lambda p: read_train_tokens(p, eos_id=0)):
        with pytest.raises(DataError) as caught:
            read(path)
        message = str(caught.value)
        assert message.startswith(str(path)) and "\n" not in message


# --- bad input through the CLI -----------------------------------------------------------------


def write_track(directory: Path, track_id: str, dataset_lines: str) -> Path:
    """A copy of the CPU track with another id and another [dataset] section."""
    text = (TRACKS_DIR / "cpu-1min.toml").read_text()
    text = text.replace('id = "cpu-1min"', f'id = "{track_id}"')
    text = re.sub(r"\[dataset\].*?(?=\n\[eval\])", "[dataset]\n" + dataset_lines.strip() + "\n", text, flags=re.S)
    path = directory / f"{track_id}.toml"
    path.write_text(text)
    return path


def pinned(name: str, path: Path, digest: str | None = None) -> str:
    return f'{name} = {{ path = "{path}", sha256 = "{digest or sha256_file(path)}" }}'


def dataset_section(dataset_id="pydoc-100k", train=None, val=None, tokenizer=None) -> str:
    return "\n".join(
        [
            f'id = "{dataset_id}"',
            train or pinned("train", TRAIN),
            val or pinned("val", VAL),
            tokenizer or pinned("tokenizer", TOKENIZER),
        ]
    )


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


@pytest.mark.parametrize("kind", ["missing", "truncated", "corrupted", "wrong_schema"])
def test_verify_reports_a_broken_split_in_one_line(tmp_path, capsys, broken_files, kind):
    path = broken_files[kind]
    digest = sha256_file(path) if path.exists() else "0" * 64
    track = write_track(tmp_path, "broken", dataset_section(train=pinned("train", path, digest)))
    code, out, err = run_cli(capsys, "data", "verify", "--track", str(track))
    assert code == 1
    fail_lines = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(fail_lines) == 1 and "train" in fail_lines[0] and str(path) in fail_lines[0]
    assert err.count("\n") == 1


def test_verify_names_the_file_and_both_hashes_on_mismatch(tmp_path, capsys):
    wrong = "ab" * 32
    track = write_track(tmp_path, "mismatch", dataset_section(val=pinned("val", VAL, wrong)))
    code, out, _ = run_cli(capsys, "data", "verify", "--track", str(track))
    assert code == 1
    (line,) = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert str(VAL) in line and wrong in line and sha256_file(VAL) in line


def test_verify_refuses_a_track_naming_an_unknown_dataset(tmp_path, capsys):
    section = "\n".join(
        [
            'id = "no-such-data"',
            'train = { path = "spec/datasets/no-such-data/train.parquet", sha256 = "' + "0" * 64 + '" }',
            'val = { path = "spec/datasets/no-such-data/val.parquet", sha256 = "' + "0" * 64 + '" }',
            'tokenizer = { path = "spec/datasets/no-such-data/tokenizer.json", sha256 = "' + "0" * 64 + '" }',
        ]
    )
    track = write_track(tmp_path, "unknown", section)
    code, out, _ = run_cli(capsys, "data", "verify", "--track", str(track))
    assert code == 1
    assert out.count("names dataset 'no-such-data', which is not in spec/datasets/") == 3


def test_verify_unknown_track_id_is_one_line_and_exit_2(capsys):
    code, out, err = run_cli(capsys, "data", "verify", "--track", "no-such-track")
    assert code == 2 and out == ""
    assert err.startswith("evaluator: unknown track 'no-such-track'") and err.count("\n") == 1


def test_tokenizer_info_refuses_a_tokenizer_without_separator(tmp_path):
    data = json.loads(TOKENIZER.read_text())
    data["added_tokens"] = []
    del data["model"]["vocab"][EOS_TOKEN]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="no <\\|endoftext\\|> token"):
        tokenizer_info(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match="not a readable tokenizer.json"):
        tokenizer_info(path)


def test_build_usage_errors_are_one_line(capsys):
    code, _, err = run_cli(capsys, "data", "build", "--source", "hub")
    assert code == 2 and err == "evaluator: --id is required with --source hub (it names the dataset in the tracks)\n"
    code, _, err = run_cli(capsys, "data", "build", "--source-dir", "/no/such/dir", "--out", "/tmp/x")
    assert code == 2 and "/no/such/dir: no such directory" in err and err.count("\n") == 1


# --- the pydoc source --------------------------------------------------------------------------

REST_SAMPLE = """\
.. _intro-label:

***************
Getting Started
***************

This page explains the *basics* of :func:`open` and :class:`~io.TextIOWrapper`.
See :ref:`details-label` and :pep:`8`. Escaped\\ words join; ``code`` stays as text::

   print("this literal block is dropped")

.. note::

   Notes keep their prose.

.. code-block:: python

   also_dropped = True

>>> 1 + 1
2

.. _details-label:

The :mod:`io` Details
=====================

* A list item that continues
  on a second line.
* Another item.

.. function:: read(size=-1)

   Read up to *size* characters.

   .. versionchanged:: 3.8
      The size may be omitted.

+-----+-----+
| a   | b   |
+-----+-----+

:Author: Somebody
"""


def test_rest_cleaning_keeps_prose_and_drops_code(tmp_path):
    (tmp_path / "guide.rst.txt").write_text(REST_SAMPLE)
    sections = dict(source_pydoc.read_sections(tmp_path, [tmp_path / "guide.rst.txt"]))
    assert list(sections) == ["guide#getting-started", "guide#the-io-details"]
    assert sections["guide#getting-started"] == (
        "Getting Started\n\n"
        "This page explains the basics of open() and TextIOWrapper. See The io Details and PEP 8. "
        "Escapedwords join; code stays as text:\n\n"
        "Notes keep their prose."
    )
    assert sections["guide#the-io-details"] == (
        "The io Details\n\n"
        "* A list item that continues on a second line.\n\n"
        "* Another item.\n\n"
        "Read up to size characters.\n\n"
        "Changed in version 3.8: The size may be omitted."
    )


def test_truncation_ends_at_a_sentence_and_spares_the_title():
    text = "A Title\n\nFirst sentence here. Second one follows! Third is long enough to be cut."
    assert truncate_text(text, 40, keep=7) == "A Title\n\nFirst sentence here."
    assert truncate_text(text, 55, keep=7) == "A Title\n\nFirst sentence here. Second one follows!"
    assert truncate_text(text, 8, keep=7) == "A Title"  # no sentence end: cut at the cap
    assert truncate_text("no sentence end at all in here", 12) == "no sentence"
    assert truncate_text("Use a tool, e.g. a hammer, to do it.", 20) == "Use a tool, e.g. a"
    assert truncate_text(text, 1000) == text


@needs_pydoc
def test_pydoc_build_is_deterministic_and_meets_its_targets(tmp_path, capsys):
    """A small configuration of the real builder, twice: the same bytes and hashes both times."""
    sources = tmp_path / "sources"
    shutil.copytree(PYDOC_SOURCES / "tutorial", sources / "tutorial")
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run
        code, printed, _ = run_cli(
            capsys,
            "data",
            "build",
            "--source",
            "pydoc",
            "--source-dir",
            str(sources),
            "--out",
            str(out),
            "--id",
            "tiny",
            "--docs",
            "40",
            "--tokens",
            "4000",
            "--vocab-size",
            "600",
        )
        assert code == 0
        outputs.append((out, printed.replace(str(out), "OUT")))
    (first, first_printed), (second, second_printed) = outputs
    assert first_printed == second_printed
    for name in ("train.parquet", "val.parquet", "tokenizer.json", "DATASHEET.md"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
        assert f"{sha256_file(first / name)}  OUT/{name}" in first_printed
    train, val = read_documents(first / "train.parquet"), read_documents(first / "val.parquet")
    assert (len(train), len(val)) == (36, 4)
    assert 3960 <= sum(len(doc.tokens) for doc in (*train, *val)) <= 4040
    assert tokenizer_info(first / "tokenizer.json") == (600, 0)


# --- the hub source ----------------------------------------------------------------------------


def fixture_rows(dataset: str, config: str | None, split: str):
    assert (dataset, config, split) == ("local/stories", None, "train")
    with open(HUB_FIXTURE / "documents.jsonl", encoding="utf-8") as handle:
        yield from (json.loads(line) for line in handle)


def fixture_tokenizer(name: str):
    assert name == "local/tiny-tokenizer"
    return Tokenizer.from_file(str(HUB_FIXTURE / "tokenizer.json"))


def hub_source(**overrides) -> source_hub.HubSource:
    settings = dict(
        dataset="local/stories",
        config=None,
        split="train",
        tokenizer="local/tiny-tokenizer",
        n_docs=25,
        max_chars=120,
        max_tokens=100_000,
    )
    return source_hub.HubSource(**{**settings, **overrides})


def build_from_fixture(out: Path, source: source_hub.HubSource) -> dict[str, str]:
    return source_hub.build(out, "stories", source, load_rows=fixture_rows, load_tokenizer=fixture_tokenizer)


def test_hub_build_from_a_local_fixture(tmp_path):
    hashes = build_from_fixture(tmp_path / "a", hub_source())
    assert hashes == build_from_fixture(tmp_path / "b", hub_source())
    train = pq.read_table(tmp_path / "a" / "train.parquet").to_pylist()
    val = pq.read_table(tmp_path / "a" / "val.parquet").to_pylist()
    rows = [json.loads(line) for line in (HUB_FIXTURE / "documents.jsonl").read_text().splitlines()]
    # The first 25 non-empty rows (row 3 is empty), cut to 120 characters, split by hash of id.
    expected_rows = [index for index, row in enumerate(rows) if row["text"]][:25]
    assert sorted(int(r["doc_id"].rsplit("#", 1)[1]) for r in train + val) == expected_rows
    assert all(is_validation(r["doc_id"]) for r in val) and not any(is_validation(r["doc_id"]) for r in train)
    assert val and train
    tokenizer = fixture_tokenizer("local/tiny-tokenizer")
    for row in train + val:
        source_text = rows[int(row["doc_id"].rsplit("#", 1)[1])]["text"]
        assert len(row["text"]) <= 120 and source_text.startswith(row["text"])
        assert row["tokens"] == tokenizer.encode(row["text"], add_special_tokens=False).ids
    assert (tmp_path / "a" / "tokenizer.json").read_text() == tokenizer.to_str(pretty=True)
    assert tokenizer_info(tmp_path / "a" / "tokenizer.json") == (400, 0)
    sheet = (tmp_path / "a" / "DATASHEET.md").read_text()
    assert "--source hub --id stories --hub-dataset local/stories" in sheet


def test_hub_build_stops_at_the_token_cap(tmp_path):
    build_from_fixture(tmp_path, hub_source(max_tokens=650))
    documents = read_documents(tmp_path / "train.parquet") + read_documents(tmp_path / "val.parquet")
    lengths = [len(doc.tokens) for doc in documents]
    assert sum(lengths) <= 650 < sum(lengths) + max(lengths) and len(documents) < 25


def test_hub_build_without_enough_documents_for_both_splits(tmp_path):
    with pytest.raises(DataError, match="too few to fill both splits"):
        build_from_fixture(tmp_path, hub_source(n_docs=5))


@pytest.mark.parametrize("package", ["datasets", "transformers"])
def test_hub_loaders_explain_the_missing_extra(package):
    try:
        __import__(package)
    except ImportError:
        pass
    else:
        pytest.skip(f"{package} is installed; the real loader would reach for the network")
    load = source_hub.load_hub_rows if package == "datasets" else source_hub.load_hub_tokenizer
    args = ("some/dataset", None, "train") if package == "datasets" else ("some/tokenizer",)
    with pytest.raises(UserError, match=r"pip install -e '\.\[hub\]'"):
        load(*args)

"""What every source shares: the split rule, the tokenizer, deterministic Parquet, the datasheet.

A source (`source_pydoc`, `source_hub`) chooses and tokenizes documents and splits them with
`is_validation`; `write_dataset` checks that the two splits share no document, no text and no
64-token window, then writes `train.parquet`, `val.parquet`, `tokenizer.json` and `DATASHEET.md`.
"""

from __future__ import annotations

import hashlib
import re
import statistics
import sys
from array import array
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from evaluator.dataset.loader import SCHEMA
from evaluator.errors import DataError
from evaluator.fsutil import atomic_write_bytes, atomic_write_text, sha256_file

EOS_TOKEN = "<|endoftext|>"
VAL_PER_MILLE = 100  # ~10 % of documents go to validation
OVERLAP_WINDOW = 64  # no run of this many tokens may appear in both splits
FILE_NAMES = {"train": "train.parquet", "val": "val.parquet", "tokenizer": "tokenizer.json"}
DATASHEET_NAME = "DATASHEET.md"

# Parquet settings are fixed so that the same documents always give the same bytes.
ROW_GROUP_ROWS = 1024
COMPRESSION = "zstd"
COMPRESSION_LEVEL = 9


@dataclass(frozen=True)
class BuiltDocument:
    doc_id: str
    text: str
    tokens: tuple[int, ...]

    @property
    def n_bytes(self) -> int:
        return len(self.text.encode("utf-8"))


def is_validation(doc_id: str) -> bool:
    """The split rule: a document is in validation iff a hash of its id says so (~10 %).

    Depends on nothing but the id, so a document never changes sides when others are added,
    removed or shortened.
    """
    digest = hashlib.sha256(b"split\0" + doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < VAL_PER_MILLE


def truncate_text(text: str, max_chars: int, keep: int = 0) -> str:
    """The longest prefix of at most `max_chars` characters that ends a sentence or paragraph.

    Cuts are never made inside the first `keep` characters (a title). Without a sentence end in
    range the cut falls at the last space, and without a space at `max_chars` itself.
    """
    if len(text) <= max_chars:
        return text
    window = text[: max_chars + 1]
    # "e.g." and "i.e." end no sentence.
    ends = [m.end() for m in re.finditer(r"(?<!e\.g)(?<!i\.e)[.!?]['\")\]]?(?=\s)|(?=\n\n)", window)]
    ends = [end for end in ends if keep < end <= max_chars]
    if ends:
        return text[: ends[-1]].rstrip()
    space = window.rfind(" ", keep + 1, max_chars + 1)
    return text[: space if space > keep else max_chars].rstrip()


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE with `<|endoftext|>` as id 0, trained on `texts` only (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return tokenizer


def encode_all(tokenizer, texts: Sequence[str]) -> list[tuple[int, ...]]:
    return [tuple(encoding.ids) for encoding in tokenizer.encode_batch(list(texts), add_special_tokens=False)]


class OverlapIndex:
    """The ids, texts and 64-token windows of a set of documents, to test others against."""

    def __init__(self, documents: Sequence[BuiltDocument]):
        self.ids = {doc.doc_id for doc in documents}
        self.texts = {doc.text for doc in documents}
        self.windows = {window for doc in documents for window in _windows(doc.tokens)}

    def problems(self, doc: BuiltDocument, side: str = "training") -> list[str]:
        """Every way in which `doc` leaks into the indexed documents, one line each."""
        problems = []
        if doc.doc_id in self.ids:
            problems.append(f"document id {doc.doc_id!r} is in both splits")
        if doc.text in self.texts:
            problems.append(f"the text of validation document {doc.doc_id!r} is also in {side}")
        if any(window in self.windows for window in _windows(doc.tokens)):
            problems.append(f"validation document {doc.doc_id!r} shares a {OVERLAP_WINDOW}-token window with {side}")
        return problems


def split_overlap(train: Sequence[BuiltDocument], val: Sequence[BuiltDocument]) -> list[str]:
    """Every way in which a validation document leaks into the training split, one line each."""
    index = OverlapIndex(train)
    return [problem for doc in val for problem in index.problems(doc)]


def _windows(tokens: Sequence[int]) -> Iterable[bytes]:
    packed = array("i", tokens).tobytes()
    width = OVERLAP_WINDOW * 4
    return (packed[4 * i : 4 * i + width] for i in range(len(tokens) - OVERLAP_WINDOW + 1))


def parquet_bytes(documents: Sequence[BuiltDocument], metadata: dict[bytes, bytes] | None = None) -> bytes:
    """The split's deterministic Parquet bytes; `metadata` goes into the schema's key-value metadata
    (a hidden split's embedding bound)."""
    table = pa.table(
        {
            "doc_id": [doc.doc_id for doc in documents],
            "text": [doc.text for doc in documents],
            "tokens": [list(doc.tokens) for doc in documents],
            "n_tokens": [len(doc.tokens) for doc in documents],
            "n_bytes": [doc.n_bytes for doc in documents],
        },
        schema=SCHEMA if metadata is None else SCHEMA.with_metadata(metadata),
    )
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=ROW_GROUP_ROWS,
        compression=COMPRESSION,
        compression_level=COMPRESSION_LEVEL,
        use_dictionary=False,
        write_page_checksum=True,  # the loader verifies them: corruption fails loudly
    )
    return sink.getvalue().to_pybytes()


@dataclass(frozen=True)
class SourceDescription:
    """What a source says about itself in the datasheet (Markdown paragraphs)."""

    title: str
    source: str
    licence: str
    selection: str
    rebuild_command: str


def write_dataset(
    out_dir: Path,
    dataset_id: str,
    train: Sequence[BuiltDocument],
    val: Sequence[BuiltDocument],
    tokenizer_json: str,
    tokenizer_note: str,
    description: SourceDescription,
) -> dict[str, str]:
    """Write the four files after checking the splits are disjoint; returns {file name: sha256}."""
    problems = split_overlap(train, val)
    if problems:
        raise DataError(f"the splits overlap, refusing to write {out_dir}: {problems[0]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    contents = {
        FILE_NAMES["train"]: parquet_bytes(train),
        FILE_NAMES["val"]: parquet_bytes(val),
        FILE_NAMES["tokenizer"]: tokenizer_json.encode("utf-8"),
    }
    for name, data in contents.items():
        atomic_write_bytes(out_dir / name, data)
    hashes = {name: sha256_file(out_dir / name) for name in contents}
    sizes = {name: len(data) for name, data in contents.items()}
    datasheet = _datasheet(dataset_id, train, val, tokenizer_note, description, hashes, sizes)
    atomic_write_text(out_dir / DATASHEET_NAME, datasheet)
    hashes[DATASHEET_NAME] = sha256_file(out_dir / DATASHEET_NAME)
    return hashes


@contextmanager
def progress_display():
    """A live progress display on stderr, so stdout carries only the hashes."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from evaluator.progress import bar

    console = Console(file=sys.stderr)
    # Off in logs, pipes and notebooks: no stray output.
    with bar(
        console,
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    ) as progress:
        yield progress


# --- the datasheet -----------------------------------------------------------------------------


def _datasheet(
    dataset_id: str,
    train: Sequence[BuiltDocument],
    val: Sequence[BuiltDocument],
    tokenizer_note: str,
    description: SourceDescription,
    hashes: dict[str, str],
    sizes: dict[str, int],
) -> str:
    import tokenizers

    all_docs = [*train, *val]
    total_tokens = sum(len(doc.tokens) for doc in all_docs)
    rows = [_length_row(name, docs) for name, docs in (("train", train), ("val", val), ("all", all_docs))]
    files = "\n".join(f"| `{name}` | {sizes[name]:,} | `{digest}` |" for name, digest in hashes.items())
    return f"""# Datasheet: `{dataset_id}`

{description.title}

- **Documents:** {len(all_docs):,} ({len(train):,} train, {len(val):,} validation)
- **Tokens:** {total_tokens:,} (tokens of the document texts under the shipped tokenizer; the
  `{EOS_TOKEN}` separators that the loader puts before each document are not counted)
- **UTF-8 bytes:** {sum(doc.n_bytes for doc in all_docs):,}

## Source

{description.source}

## Licence and attribution

{description.licence}

## Cleaning and selection

{description.selection}

## Split

By document: a document is in the validation split when the first 8 bytes of
`SHA-256("split\\0" + doc_id)`, read as a big-endian integer, modulo 1000 are below {VAL_PER_MILLE}
(about 10 %). The rule depends on the document id alone. The builder refuses to write the files
unless no document id, no identical text and no {OVERLAP_WINDOW}-token window of the validation split
appears in the training split, and the test suite checks the same on the committed files.

## Tokenizer

{tokenizer_note}

## Document lengths

| split | documents | tokens | bytes | tokens/doc min | median | mean | max |
|---|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

## Files

Parquet columns: `doc_id` string, `text` string, `tokens` list<int32>, `n_tokens` int32,
`n_bytes` int32 (UTF-8 bytes of `text`). Rows are in source order. Written with pyarrow
{pa.__version__} (one row group per {ROW_GROUP_ROWS} rows, {COMPRESSION} level {COMPRESSION_LEVEL},
no dictionary encoding, CRC checksums on every page) and tokenizers {tokenizers.__version__}.

| file | bytes | SHA-256 |
|---|---:|---|
{files}

## Rebuilding

    {description.rebuild_command}

prints the same hashes: the build has no randomness, timestamps or machine-dependent metadata.
Byte-identical Parquet needs the same pyarrow version (its name is written into the file), and an
identical tokenizer the same tokenizers version. `evaluator data verify` checks the files against
the hashes pinned in the track files.
"""


def _length_row(name: str, docs: Sequence[BuiltDocument]) -> str:
    lengths = [len(doc.tokens) for doc in docs] or [0]
    return (
        f"| {name} | {len(docs):,} | {sum(lengths):,} | {sum(doc.n_bytes for doc in docs):,} | "
        f"{min(lengths)} | {statistics.median(lengths):g} | {statistics.fmean(lengths):.1f} | {max(lengths)} |"
    )

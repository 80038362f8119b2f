"""Reads a dataset split into memory. Runs inside the sandbox: stdlib, pyarrow and torch only.

A split is a Parquet file with one row per document and these columns:
`doc_id` string, `text` string, `tokens` list<int32>, `n_tokens` int32, `n_bytes` int32
(UTF-8 bytes of `text`). Anything else about the file is checked by its pinned SHA-256, on the
host, before it is mounted here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from evaluator.errors import DataError

SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("text", pa.string()),
        ("tokens", pa.list_(pa.int32())),
        ("n_tokens", pa.int32()),
        ("n_bytes", pa.int32()),
    ]
)


@dataclass(frozen=True)
class Document:
    doc_id: str
    tokens: list[int]
    n_bytes: int


def read_documents(path: Path) -> list[Document]:
    """Every document of a split, in file order, with its tokens and UTF-8 byte count."""
    table = _read_table(path, SCHEMA.names)
    tokens = table.column("tokens").to_pylist()
    n_tokens = table.column("n_tokens").to_pylist()
    n_bytes = table.column("n_bytes").to_pylist()
    texts = table.column("text").to_pylist()
    documents = []
    for row, doc_id in enumerate(table.column("doc_id").to_pylist()):
        if len(tokens[row]) != n_tokens[row] or len(texts[row].encode("utf-8")) != n_bytes[row]:
            raise DataError(
                f"{path}: document {doc_id!r} (row {row}) has counts that do not match its "
                "tokens or text, so the file is corrupt"
            )
        documents.append(Document(doc_id=doc_id, tokens=tokens[row], n_bytes=n_bytes[row]))
    return documents


def read_train_tokens(path: Path, eos_id: int):
    """The whole split as one 1-D int64 tensor: each document preceded by `eos_id`, in file order."""
    import torch

    table = _read_table(path, ["tokens", "n_tokens"])
    values = table.column("tokens").combine_chunks().flatten()  # honours offsets, unlike .values
    lengths = _int32_tensor(table.column("n_tokens").combine_chunks()).to(torch.int64)
    if len(values) != int(lengths.sum()):
        raise DataError(f"{path}: token counts do not match the token lists, so the file is corrupt")
    tokens = _int32_tensor(values)
    n_docs = len(lengths)
    joined = torch.full((len(tokens) + n_docs,), eos_id, dtype=torch.int64)
    # Document d's tokens move right by d + 1 places: one separator before it and before each
    # earlier document.
    shift = torch.repeat_interleave(torch.arange(1, n_docs + 1), lengths)
    joined[torch.arange(len(tokens)) + shift] = tokens.to(torch.int64)
    return joined


def _int32_tensor(array: pa.Array):
    """An int32 array's values as a tensor, without a Python list in between (the fast path)."""
    import torch

    if len(array) == 0:
        return torch.empty(0, dtype=torch.int32)
    start = array.offset * 4
    # A writable copy: torch.frombuffer warns about (and would alias) Arrow's read-only memory.
    data = bytearray(memoryview(array.buffers()[1])[start : start + len(array) * 4])
    return torch.frombuffer(data, dtype=torch.int32)


def _read_table(path: Path, columns: list[str]) -> pa.Table:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    try:
        parquet = pq.ParquetFile(path, page_checksum_verification=True)
        _check_schema(path, parquet.schema_arrow)
        table = parquet.read(columns=columns)
        has_nulls = any(table.column(name).null_count for name in columns) or (
            "tokens" in columns and table.column("tokens").combine_chunks().flatten().null_count
        )
        if has_nulls:
            raise DataError(f"{path}: the file has missing (null) values, so it is corrupt")
        return table
    except DataError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a readable Parquet split (truncated or corrupt?): {reason}") from None


def _check_schema(path: Path, schema: pa.Schema) -> None:
    for field in SCHEMA:
        if field.name not in schema.names:
            raise DataError(f"{path}: wrong schema: no column {field.name!r} (expected {_describe(SCHEMA)})")
        actual = schema.field(field.name).type
        same = (
            pa.types.is_list(actual) and actual.value_type == field.type.value_type
            if pa.types.is_list(field.type)
            else actual == field.type
        )
        if not same:
            raise DataError(f"{path}: wrong schema: column {field.name!r} is {actual}, expected {field.type}")


def _describe(schema: pa.Schema) -> str:
    return ", ".join(f"{field.name} {field.type}" for field in schema)

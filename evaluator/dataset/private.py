"""`evaluator data private`: the organiser's hidden test split, drawn from a pool, and its embedding bound.

The hidden split is the competition's one secret (docs/THREAT_MODEL.md). No jail reads it, but a
submission may carry text in its code: if the split is drawn from a pool of public documents, a
submission that carries a share f of the pool, compressed, carries about a share f of the hidden
documents and scores near zero on them. The **embedding bound** says what that buys:

- the pool is compressed with xz (preset 9, extreme); where the pool is larger than
  `COMPRESSED_SAMPLE_BYTES`, the first that many bytes of text are compressed and the cost per
  document is extrapolated (xz finds no repeats beyond its 64 MiB dictionary, so a sample as large
  as the dictionary predicts the rest). A submission can do better than xz: an arithmetic coder
  driven by a model it trains in the jail on the training split (the reference's 5.3 nats a token
  beat a unigram model's 6.9, which beats xz on prose). So the cost assumed per document is the
  lesser of xz's and a unigram coder's (the honest loss below, times the hidden documents' mean
  length), divided by CODER_ADVANTAGE;
- a submission carries `cap / cost` documents, where the cap is what `evaluator check` lets a folder
  hold however it is written (its files compressed together with xz: INFORMATION_MAX_BYTES): a share
  `covered_share` of the pool, and so, in expectation, of the randomly drawn hidden documents;
- memorised documents cost about nothing, the others what an honest model pays: the gain is
  `covered_share x honest_loss_nats`, where the honest loss is a unigram model of the training split
  scored on the hidden documents (an honest weak model: more than any real submission's loss, so the
  gain is overstated, never understated).

A gain above the track's record margin (spec/record-rules.toml) means a result on this split could
be bought by carrying the pool: the command refuses it unless told `--accept-embeddable`. The bound
is stored in the split's Parquet metadata (its hash pins it) and every result scored on the split
carries it.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from evaluator.dataset.build import EOS_TOKEN, BuiltDocument, OverlapIndex, encode_all, parquet_bytes, truncate_text
from evaluator.dataset.loader import read_documents
from evaluator.errors import DataError, UserError
from evaluator.fsutil import atomic_write_bytes

# The Parquet key-value metadata entry that holds a hidden split's embedding bound.
BOUND_METADATA_KEY = b"evaluator.embedding_bound"
# xz's strongest setting: the better the compressor, the more a submission is assumed to carry.
XZ_PRESET = 9 | lzma.PRESET_EXTREME
COMPRESSED_SAMPLE_BYTES = 64 * 2**20
# Candidates kept from the pool per document asked for: some are dropped as too short or as
# overlapping the public splits, and the rest stay a uniform sample.
OVERSAMPLE = 4
HUB_PREFIX = "hub:"
# How much better than the cheaper of xz and a unigram coder a model-driven coder is assumed to be.
CODER_ADVANTAGE = 2.0


@dataclass(frozen=True)
class EmbeddingBound:
    """What a submission folder at the size cap can carry of the pool, and what that would buy."""

    pool_documents: int
    pool_bytes: int  # UTF-8 text of the whole pool
    compressed_bytes_per_document: float  # the cost assumed: min(xz, unigram coder) / CODER_ADVANTAGE
    carry_cap_bytes: int  # what a submission folder may hold, compressed (evaluator/check.py)
    carried_documents: int
    covered_share: float  # of the pool, and so of the hidden documents, in expectation
    honest_loss_nats: float  # a unigram model of the training split, on the hidden documents
    gain_nats: float  # covered_share x honest_loss_nats
    margin_nats: float  # the track's record margin

    @property
    def embeddable(self) -> bool:
        return self.gain_nats > self.margin_nats

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def sentence(self) -> str:
        return (
            f"a submission of {self.carry_cap_bytes:,} bytes compressed carries {self.carried_documents:,} "
            f"of the pool's {self.pool_documents:,} documents ({self.compressed_bytes_per_document:,.0f} bytes "
            f"each, coded better than xz), {self.covered_share:.2%} of the hidden split, worth about "
            f"{self.gain_nats:.4f} nats against the record margin of {self.margin_nats:g}"
        )


def read_bound(path: Path) -> dict[str, float | int] | None:
    """The embedding bound stored in a hidden split's metadata; None for a split made otherwise."""
    try:
        metadata = pq.read_schema(path).metadata or {}
        raw = metadata.get(BOUND_METADATA_KEY)
        if raw is None:
            return None
        bound = json.loads(raw)
        return asdict(EmbeddingBound(**bound))
    except (pa.ArrowException, OSError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: the hidden split's embedding bound is unreadable ({type(exc).__name__})") from None


# --- the pool ----------------------------------------------------------------------------------


def pool_rows(pool: str) -> Iterator[tuple[str, str]]:
    """(doc_id, text) of every document of the pool: a JSON-lines file of {"doc_id", "text"}, a
    Parquet file with those columns, or `hub:DATASET[:CONFIG]` (its train split, streamed)."""
    if pool.startswith(HUB_PREFIX):
        yield from _hub_rows(pool[len(HUB_PREFIX) :])
        return
    path = Path(pool)
    if not path.is_file():
        raise UserError(f"{pool}: no such pool file (JSON lines, Parquet, or hub:DATASET[:CONFIG])")
    if path.suffix == ".parquet":
        yield from _parquet_rows(path)
    else:
        yield from _jsonl_rows(path)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise UserError(f"{path}:{number}: not a JSON object") from None
            yield _row_fields(row, f"{path}:{number}")


def _parquet_rows(path: Path) -> Iterator[tuple[str, str]]:
    try:
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(columns=["doc_id", "text"]):
            for row in batch.to_pylist():
                yield _row_fields(row, str(path))
    except (pa.ArrowException, KeyError) as exc:
        raise UserError(
            f"{path}: not a Parquet pool with string columns doc_id and text ({type(exc).__name__})"
        ) from None


def _hub_rows(name: str) -> Iterator[tuple[str, str]]:
    from evaluator.dataset import source_hub

    dataset, _, config = name.partition(":")
    for index, row in enumerate(source_hub.load_hub_rows(dataset, config or None, "train")):
        yield _row_fields({"doc_id": f"{name}#{index}", "text": row.get("text")}, f"{name} row {index}")


def _row_fields(row: object, where: str) -> tuple[str, str]:
    if not isinstance(row, Mapping) or not isinstance(row.get("doc_id"), str) or not isinstance(row.get("text"), str):
        raise UserError(f"{where}: a pool row must have string fields doc_id and text")
    return row["doc_id"], row["text"]


@dataclass
class _PoolSurvey:
    """One pass over the pool: its size, its compressed size (or a sample's), a uniform sample of rows."""

    documents: int = 0
    text_bytes: int = 0
    sampled_bytes: int = 0
    sampled_documents: int = 0
    compressed_bytes: int = 0


def survey_pool(
    rows: Iterable[tuple[str, str]], keep: int, rng: random.Random, on_row=None
) -> tuple[_PoolSurvey, list[tuple[str, str]]]:
    """Count and compress the pool in one pass, keeping a uniform sample of `keep` rows (reservoir
    sampling: the pool may be a stream far larger than memory). `on_row(count)` after each row."""
    survey = _PoolSurvey()
    compressor = lzma.LZMACompressor(preset=XZ_PRESET)
    reservoir: list[tuple[str, str]] = []
    for doc_id, text in rows:
        data = text.encode("utf-8")
        survey.documents += 1
        survey.text_bytes += len(data)
        if survey.sampled_bytes < COMPRESSED_SAMPLE_BYTES:
            survey.compressed_bytes += len(compressor.compress(data + b"\n"))
            survey.sampled_bytes += len(data) + 1
            survey.sampled_documents += 1
        if len(reservoir) < keep:
            reservoir.append((doc_id, text))
        else:
            slot = rng.randrange(survey.documents)
            if slot < keep:
                reservoir[slot] = (doc_id, text)
        if on_row is not None:
            on_row(survey.documents)
    survey.compressed_bytes += len(compressor.flush())
    rng.shuffle(reservoir)
    return survey, reservoir


# --- drawing the split --------------------------------------------------------------------------


def draw_documents(
    candidates: Sequence[tuple[str, str]], n_docs: int, tokenizer, public: Sequence[BuiltDocument]
) -> list[BuiltDocument]:
    """The first `n_docs` candidates that, cut and tokenized like the public documents, share no id,
    text or 64-token window with the public splits (training and development)."""
    max_chars = max(len(doc.text) for doc in public)
    min_chars = min(len(doc.text) for doc in public)
    cut = [(doc_id, truncate_text(text.strip(), max_chars)) for doc_id, text in candidates if EOS_TOKEN not in text]
    cut = [(doc_id, text) for doc_id, text in cut if len(text) >= min_chars]
    published = OverlapIndex(public)
    chosen: list[BuiltDocument] = []
    texts: set[str] = set()
    for (doc_id, text), tokens in zip(cut, encode_all(tokenizer, [text for _, text in cut]), strict=True):
        document = BuiltDocument(doc_id, text, tokens)
        if text in texts or published.problems(document, "the public splits"):
            continue
        texts.add(text)
        chosen.append(document)
        if len(chosen) == n_docs:
            return sorted(chosen, key=lambda doc: doc.doc_id)
    raise DataError(
        f"the pool gave only {len(chosen)} usable documents of the {n_docs} asked for (each at least "
        f"{min_chars} characters, none overlapping the public splits)"
    )


def unigram_loss(train_tokens: Iterable[int], documents: Sequence[BuiltDocument], vocab_size: int) -> float:
    """Nats per token of the training split's unigram distribution (add-one smoothed) on `documents`."""
    counts = Counter(train_tokens)
    total = sum(counts.values()) + vocab_size
    tokens = [token for doc in documents for token in doc.tokens]
    return -sum(math.log((counts[token] + 1) / total) for token in tokens) / max(1, len(tokens))


def embedding_bound(
    survey: _PoolSurvey, honest_loss: float, tokens_per_document: float, cap_bytes: int, margin: float
) -> EmbeddingBound:
    xz_per_document = survey.compressed_bytes / max(1, survey.sampled_documents)
    unigram_per_document = honest_loss * tokens_per_document / math.log(2) / 8
    per_document = min(xz_per_document, unigram_per_document) / CODER_ADVANTAGE
    carried = min(survey.documents, math.floor(cap_bytes / per_document)) if per_document > 0 else survey.documents
    share = carried / max(1, survey.documents)
    return EmbeddingBound(
        pool_documents=survey.documents,
        pool_bytes=survey.text_bytes,
        compressed_bytes_per_document=round(per_document, 1),
        carry_cap_bytes=cap_bytes,
        carried_documents=carried,
        covered_share=round(share, 6),
        honest_loss_nats=round(honest_loss, 4),
        gain_nats=round(share * honest_loss, 6),
        margin_nats=margin,
    )


def write_hidden_split(out_dir: Path, documents: Sequence[BuiltDocument], bound: EmbeddingBound) -> tuple[Path, str]:
    """Write `<sha256>.parquet` into `out_dir` (atomically); returns its path and hash."""
    data = parquet_bytes(documents, metadata={BOUND_METADATA_KEY: json.dumps(bound.as_dict(), sort_keys=True).encode()})
    digest = hashlib.sha256(data).hexdigest()
    path = out_dir / f"{digest}.parquet"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return path, digest


def public_documents(train_path: Path, val_path: Path) -> list[BuiltDocument]:
    """The track's public splits as the builder's documents (their text is needed to cut alike)."""
    rows = []
    for path in (train_path, val_path):
        read_documents(path)  # the loader's checks: columns, counts
        rows += pq.read_table(path, columns=["doc_id", "text", "tokens"]).to_pylist()
    return [BuiltDocument(row["doc_id"], row["text"], tuple(row["tokens"])) for row in rows]

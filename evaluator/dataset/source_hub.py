"""The predecessor's source, for organisers with a network: a Hugging Face dataset and hub tokenizer.

The first `n_docs` non-empty documents of the dataset (streamed, in the dataset's order) are each
cut to at most `max_chars` characters, tokenized with the hub tokenizer, and kept in order while the
running total stays within `max_tokens`. Document ids are `<dataset>[/<config>]/<split>#<row>`,
and the split is the same hash-of-id rule as every other source.

`datasets` and `transformers` are imported only here and only when called (the optional `hub`
extra: `pip install -e '.[hub]'`). The tests pass their own `load_rows` and `load_tokenizer`, so
no network is touched; the defaults below are the real hub path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from evaluator.dataset.build import (
    EOS_TOKEN,
    BuiltDocument,
    SourceDescription,
    encode_all,
    is_validation,
    progress_display,
    truncate_text,
    write_dataset,
)
from evaluator.errors import DataError, UserError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

DEFAULT_DATASET = "HuggingFaceTB/smollm-corpus"
DEFAULT_CONFIG = "cosmopedia-v2"
DEFAULT_TOKENIZER = "HuggingFaceTB/SmolLM-135M"


@dataclass(frozen=True)
class HubSource:
    dataset: str = DEFAULT_DATASET
    config: str | None = DEFAULT_CONFIG
    split: str = "train"
    text_field: str = "text"
    tokenizer: str = DEFAULT_TOKENIZER
    n_docs: int = 1000
    max_chars: int = 500
    max_tokens: int = 100_000

    @property
    def id_prefix(self) -> str:
        return "/".join(part for part in (self.dataset, self.config, self.split) if part)


RowLoader = Callable[[str, "str | None", str], Iterable[Mapping]]
TokenizerLoader = Callable[[str], "Tokenizer"]


def load_hub_rows(dataset: str, config: str | None, split: str) -> Iterable[Mapping]:
    """Stream the dataset's rows from the hub (nothing is downloaded beyond what is read)."""
    datasets = _optional_import("datasets")
    return datasets.load_dataset(dataset, config, split=split, streaming=True)


def load_hub_tokenizer(name: str):
    """The hub tokenizer's `tokenizers.Tokenizer` (its fast backend, which is what tokenizer.json holds)."""
    transformers = _optional_import("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(name, use_fast=True)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"tokenizer {name!r} has no fast (tokenizers) version, so it cannot be saved as tokenizer.json")
    return backend


def _optional_import(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise UserError(
            f"the hub source needs the '{name}' package: install the optional extra with pip install -e '.[hub]'"
        ) from None


def collect_documents(source: HubSource, rows: Iterable[Mapping], tokenizer) -> list[BuiltDocument]:
    """The first documents of `rows`, cut and tokenized, within the token cap, in row order."""
    chosen: list[tuple[str, str]] = []
    for index, row in enumerate(rows):
        if len(chosen) == source.n_docs:
            break
        text = row.get(source.text_field)
        if not isinstance(text, str):
            raise DataError(f"{source.dataset}: row {index} has no text field {source.text_field!r}")
        text = truncate_text(text.strip(), source.max_chars)
        if text and EOS_TOKEN not in text:
            chosen.append((f"{source.id_prefix}#{index}", text))
    documents = []
    total = 0
    for (doc_id, text), tokens in zip(chosen, encode_all(tokenizer, [text for _, text in chosen]), strict=True):
        if total + len(tokens) > source.max_tokens:
            break
        total += len(tokens)
        documents.append(BuiltDocument(doc_id, text, tokens))
    return documents


def build(
    out_dir: Path,
    dataset_id: str,
    source: HubSource,
    *,
    load_rows: RowLoader = load_hub_rows,
    load_tokenizer: TokenizerLoader = load_hub_tokenizer,
) -> dict[str, str]:
    """Build the dataset into `out_dir`; returns {file name: sha256}."""
    tokenizer = load_tokenizer(source.tokenizer)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise DataError(f"tokenizer {source.tokenizer!r} has no {EOS_TOKEN} token to separate documents")
    with progress_display() as progress:
        task = progress.add_task("reading hub documents", total=source.n_docs)
        rows = _counted(load_rows(source.dataset, source.config, source.split), lambda: progress.advance(task))
        documents = collect_documents(source, rows, tokenizer)
    if not documents:
        raise DataError(f"{source.dataset}: no usable documents")
    train = [doc for doc in documents if not is_validation(doc.doc_id)]
    val = [doc for doc in documents if is_validation(doc.doc_id)]
    if not train or not val:
        raise DataError(f"{source.dataset}: {len(documents)} documents are too few to fill both splits")
    name = source.dataset + (f" ({source.config})" if source.config else "")
    options = (
        f"--hub-dataset {source.dataset}"
        + (f" --hub-config {source.config}" if source.config else "")
        + f" --hub-split {source.split} --text-field {source.text_field} --hub-tokenizer {source.tokenizer}"
        + f" --docs {source.n_docs} --max-chars {source.max_chars} --tokens {source.max_tokens}"
    )
    description = SourceDescription(
        title=f"The first documents of the Hugging Face dataset {name}, tokenized with {source.tokenizer}.",
        source=(
            f"Hugging Face dataset `{source.dataset}`, configuration `{source.config}`, split "
            f"`{source.split}`, field `{source.text_field}`, streamed in the dataset's own order. "
            f"Tokenizer: `{source.tokenizer}` from the hub."
        ),
        licence=(
            f"As stated on the dataset card, <https://huggingface.co/datasets/{source.dataset}>, and the "
            f"tokenizer's model card, <https://huggingface.co/{source.tokenizer}>. Check both before "
            "publishing files built from them."
        ),
        selection=(
            f"The first {source.n_docs:,} documents with a non-empty text, each cut to at most "
            f"{source.max_chars:,} characters at its last sentence end within that (else at the last "
            f"space), kept in order while the total stays within {source.max_tokens:,} tokens. "
            f"Document ids are `{source.id_prefix}#<row number>`."
        ),
        rebuild_command=f"evaluator data build --source hub --id {dataset_id} {options}",
    )
    tokenizer_note = (
        f"`{source.tokenizer}` from the Hugging Face hub, unchanged (not trained on this data): "
        f"vocabulary {tokenizer.get_vocab_size():,}, `{EOS_TOKEN}` = id {eos_id} as the document "
        "separator. Tokens are the tokenizer's output without added special tokens."
    )
    return write_dataset(out_dir, dataset_id, train, val, tokenizer.to_str(pretty=True), tokenizer_note, description)


def _counted(rows: Iterable[Mapping], on_row: Callable[[], None]) -> Iterable[Mapping]:
    for row in rows:
        on_row()
        yield row

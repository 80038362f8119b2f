"""Where a track's data files live, and the check that they are the files the track pins.

A track's `[dataset]` names each public file (`train`, `val`, `tokenizer`) by SHA-256 and a `path`
(relative to the evaluator's home, evaluator/paths.py, or absolute). The hidden test split
(`hidden`) is named by its SHA-256 alone: it is looked up as `<sha256>.parquet` in the directory
named by the environment variable `EVALUATOR_PRIVATE_DATA`, on the scoring host only
(docs/DATASET.md). A host without it scores the public split: a development result.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from evaluator.dataset.build import EOS_TOKEN
from evaluator.dataset.loader import read_documents
from evaluator.errors import DataError
from evaluator.fsutil import sha256_file
from evaluator.paths import DATASETS_DIR, HOME, shown
from evaluator.tracks import Track

PRIVATE_DATA_ENV = "EVALUATOR_PRIVATE_DATA"
DATA_FILES = ("train", "val", "tokenizer")
HIDDEN = "hidden"


def locate_data_file(track: Track, which: str) -> Path:
    """Where the track's public file should be, without reading it."""
    if which not in DATA_FILES:
        raise ValueError(f"unknown data file {which!r}; expected one of {', '.join(DATA_FILES)}")
    listed = track.dataset.file(which).path
    assert listed is not None  # the track schema requires a path for every public file
    path = Path(listed)
    return path if path.is_absolute() else HOME / path


def resolve_data_file(track: Track, which: str) -> Path:
    """The track's `which` file ("train", "val" or "tokenizer"), after checking its SHA-256."""
    path = locate_data_file(track, which)
    _check_dataset_folder(track, which, path)
    if not path.is_file():
        raise DataError(
            f"{path}: the {which} file of dataset {track.dataset.id!r} (track {track.id!r}) is "
            f"missing; rebuild it with 'evaluator data build' or fetch the file with SHA-256 "
            f"{track.dataset.file(which).sha256}"
        )
    _check_hash(track, which, path)
    return path


def find_hidden_split(track: Track) -> tuple[Path | None, str | None]:
    """(path, None) where this host holds the track's hidden split, checked against its SHA-256;
    (None, why) where it does not, and the run scores the public split instead. A file that is there
    but is not the one the track pins is a DataError, never a quiet development run."""
    if track.dataset.hidden is None:
        return None, f"track {track.id} names no hidden split"
    name = f"{track.dataset.hidden.sha256}.parquet"
    private_dir = os.environ.get(PRIVATE_DATA_ENV)
    if not private_dir:
        return None, f"the track's hidden split is not on this host ({PRIVATE_DATA_ENV} is not set)"
    path = Path(private_dir) / name
    if not path.is_file():
        return None, f"the track's hidden split is not on this host (no {name[:12]}... in {PRIVATE_DATA_ENV})"
    _check_hash(track, HIDDEN, path)
    return path.resolve(), None


def _check_hash(track: Track, which: str, path: Path) -> None:
    expected = track.dataset.file(which).sha256
    actual = sha256_file(path)
    if actual != expected:
        raise DataError(
            f"{path}: SHA-256 is {actual} but track {track.id!r} pins {expected}; refusing to use "
            "a data file that is not the one the track names"
        )


def _check_dataset_folder(track: Track, which: str, path: Path) -> None:
    """A file under spec/datasets/ must sit in the folder of the dataset the track names."""
    if not path.is_relative_to(DATASETS_DIR):
        return
    dataset_id = track.dataset.id
    folder = next(iter(path.relative_to(DATASETS_DIR).parts), "")
    if (DATASETS_DIR / dataset_id).is_dir() and folder == dataset_id:
        return
    known = sorted(p.name for p in DATASETS_DIR.iterdir() if p.is_dir()) if DATASETS_DIR.is_dir() else []
    if dataset_id not in known:
        raise DataError(
            f"track {track.id!r} names dataset {dataset_id!r}, which is not in "
            f"{shown(DATASETS_DIR)}/ (available: {', '.join(known) or 'none'})"
        )
    raise DataError(
        f"track {track.id!r} names dataset {dataset_id!r} but points its {which} file into "
        f"{shown(DATASETS_DIR)}/{folder}/"
    )


def tokenizer_info(path: Path) -> tuple[int, int]:
    """(vocab_size, eos_id) of a `tokenizers` tokenizer.json: the largest id + 1, and the id of
    `<|endoftext|>`. Reads the JSON only; no tokenizer is built."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        model_vocab = data["model"]["vocab"]
        added = {token["content"]: token["id"] for token in data.get("added_tokens") or []}
        # BPE, WordPiece and WordLevel map token -> id; Unigram lists [token, score] by id.
        if isinstance(model_vocab, dict):
            vocab_size = max([*model_vocab.values(), *added.values()]) + 1
            eos_id = added.get(EOS_TOKEN, model_vocab.get(EOS_TOKEN))
        else:
            vocab_size = max([len(model_vocab) - 1, *added.values()]) + 1
            eos_id = added.get(EOS_TOKEN)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: not a readable tokenizer.json ({type(exc).__name__}: {exc})") from None
    if eos_id is None:
        raise DataError(f"{path}: the tokenizer has no {EOS_TOKEN} token to separate documents")
    return vocab_size, eos_id


def check_data_files(track: Track) -> list[tuple[str, Path | None, str | None]]:
    """(which, path, problem) for each of the track's data files; problem is None when it is fine.
    The hidden split is checked where this host holds it, and left out where it does not.

    Beyond the hash, each file must be readable as what it is: the splits as Parquet with the
    right columns and consistent counts, the tokenizer as a tokenizer with a separator, and every
    token id within the tokenizer's vocabulary.
    """
    results: dict[str, tuple[str, Path | None, str | None]] = {}
    vocab_size = None
    for which in ("tokenizer", "train", "val", HIDDEN):
        try:
            if which == HIDDEN:
                path, _ = find_hidden_split(track)
                if path is None:
                    continue
            else:
                path = resolve_data_file(track, which)
            if which == "tokenizer":
                vocab_size, _ = tokenizer_info(path)
            else:
                _check_token_range(path, read_documents(path), vocab_size)
            results[which] = (which, path, None)
        except DataError as exc:
            results[which] = (which, None, str(exc))
    return [results[which] for which in (*DATA_FILES, HIDDEN) if which in results]


def _check_token_range(path: Path, documents, vocab_size: int | None) -> None:
    if vocab_size is None:
        return  # the tokenizer's own problem is reported on its line
    for doc in documents:
        if doc.tokens and not 0 <= min(doc.tokens) <= max(doc.tokens) < vocab_size:
            raise DataError(
                f"{path}: document {doc.doc_id!r} has token ids outside the tokenizer's vocabulary of {vocab_size}"
            )


def verify_track(track: Track) -> list[str]:
    """Every problem with the track's data files, one sentence each; empty when all are fine."""
    return [problem for _, _, problem in check_data_files(track) if problem is not None]

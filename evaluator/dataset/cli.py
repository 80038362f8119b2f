"""`evaluator data build`, `evaluator data verify` and `evaluator data private`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evaluator.errors import UserError
from evaluator.paths import DATASETS_DIR, shown

DEFAULT_DATASET_ID = "pydoc-100k"


def register(subparsers) -> None:
    data = subparsers.add_parser(
        "data",
        help="build the fixed dataset, verify the data files against the tracks, or draw a hidden split",
        description=(
            "Build a dataset (Parquet splits, tokenizer, datasheet), verify pinned hashes, or draw a hidden "
            "test split for official scoring (docs/DATASET.md)."
        ),
    )
    commands = data.add_subparsers(title="data commands", metavar="COMMAND", parser_class=type(data))
    commands.required = True
    _register_build(commands)
    _register_verify(commands)
    _register_private(commands)


def _register_build(commands) -> None:
    build = commands.add_parser(
        "build",
        help="build train.parquet, val.parquet, tokenizer.json and DATASHEET.md",
        description=(
            "Build a dataset directory deterministically (the same bytes on every build from the same "
            "source) and print the SHA-256 of each file. The default source is the CPython 3.11 "
            "documentation from Debian's python3.11-doc; 'hub' is the predecessor's path (a Hugging "
            "Face dataset and hub tokenizer; needs a network and the optional 'hub' extra)."
        ),
        epilog=(
            "examples:\n"
            "  evaluator data build --source pydoc\n"
            "  evaluator data build --source hub --id cosmopedia-100k --max-chars 500\n"
            "Pin the printed hashes in the [dataset] section of each track that uses the dataset."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build.add_argument(
        "--source", choices=["pydoc", "hub"], default="pydoc", help="where the text comes from (default: pydoc)"
    )
    build.add_argument(
        "--id", dest="dataset_id", help=f"dataset id (default for pydoc: {DEFAULT_DATASET_ID}; required for hub)"
    )
    build.add_argument("--out", type=Path, help="output directory (default: spec/datasets/<id>)")
    build.add_argument(
        "--docs",
        type=_positive_int,
        default=1000,
        help="pydoc: exact number of documents; hub: read the first N documents (default: 1000)",
    )
    build.add_argument(
        "--tokens",
        type=_positive_int,
        default=100_000,
        help="pydoc: total tokens to aim at (within 1%%); hub: cap on total tokens (default: 100000)",
    )
    pydoc = build.add_argument_group("pydoc source")
    pydoc.add_argument(
        "--source-dir", type=Path, help="the reST sources (default: /usr/share/doc/python3.11/html/_sources)"
    )
    pydoc.add_argument(
        "--vocab-size",
        type=_positive_int,
        default=8192,
        help="BPE vocabulary size, <|endoftext|> included (default: 8192)",
    )
    hub = build.add_argument_group("hub source")
    hub.add_argument("--hub-dataset", default=None, help="dataset name (default: HuggingFaceTB/smollm-corpus)")
    hub.add_argument("--hub-config", default=None, help="dataset configuration (default: cosmopedia-v2)")
    hub.add_argument("--hub-split", default="train", help="dataset split to read (default: train)")
    hub.add_argument("--text-field", default="text", help="column holding the text (default: text)")
    hub.add_argument("--hub-tokenizer", default=None, help="tokenizer name (default: HuggingFaceTB/SmolLM-135M)")
    hub.add_argument(
        "--max-chars",
        type=_positive_int,
        default=500,
        help="cut each document to at most this many characters (default: 500)",
    )
    build.set_defaults(handler=run_build)


def _register_verify(commands) -> None:
    verify = commands.add_parser(
        "verify",
        help="check the data files against the SHA-256 pinned in the tracks",
        description=(
            "Check every data file that a track pins (train, val, tokenizer) against its SHA-256, "
            "and that it reads as what it is (Parquet split with the expected columns, tokenizer with "
            "the <|endoftext|> separator, token ids within the vocabulary). Prints one line per file; "
            "exits 1 if any file is missing, differs or is unreadable. A track's hidden split (pinned by "
            "hash only) is looked up in $EVALUATOR_PRIVATE_DATA and checked where it is there; where it is "
            "not, the line says so and that is no failure: runs there are development results (docs/DATASET.md)."
        ),
    )
    verify.add_argument("--track", help="a track id or a track .toml file (default: every track in spec/tracks)")
    verify.set_defaults(handler=run_verify)


def _register_private(commands) -> None:
    private = commands.add_parser(
        "private",
        help="draw a hidden test split from a pool of documents, refusing a pool a submission could carry",
        description=(
            "The organiser's tool: draw --docs documents at random from a pool, cut and tokenize them like the "
            "track's public documents, drop every one that shares a 64-token window, a text or an id with the "
            "public splits, and write DIR/<sha256>.parquet. Then it prints the hash and the line for the "
            "track file. It also prints the embedding bound: how many of the pool's documents a submission "
            "can carry at check's cap on a folder's compressed size, coded better than xz, "
            "what share of the hidden split that covers, "
            "and the val_loss that would buy. A bound above the track's record margin is refused (exit 2) "
            "unless --accept-embeddable: draw from a pool thousands of times larger than a submission can "
            "carry, or from unpublished text. The bound is kept in the file, and results scored on it carry it."
        ),
        epilog=(
            "examples:\n"
            "  evaluator data private --pool unpublished.jsonl --docs 200 --out /srv/evaluator-private\n"
            "  evaluator data private --pool hub:HuggingFaceTB/smollm-corpus:cosmopedia-v2 --docs 200 --out DIR\n"
            "Then: export EVALUATOR_PRIVATE_DATA=DIR on the scoring host, and add the printed line to the\n"
            "track's [dataset] section."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    private.add_argument(
        "--pool",
        required=True,
        metavar="FILE",
        help='JSON lines of {"doc_id": ..., "text": ...}, a Parquet file with those columns, or '
        "hub:DATASET[:CONFIG] (its train split, streamed; needs a network and the 'hub' extra)",
    )
    private.add_argument(
        "--docs",
        type=_positive_int,
        required=True,
        metavar="N",
        help="how many documents the hidden split holds (the public one has 100; more make scores less noisy)",
    )
    private.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="where <sha256>.parquet is written (keep it off the repository)",
    )
    private.add_argument(
        "--track",
        default="t4-5min",
        metavar="ID",
        help="the track whose tokenizer, public splits and record margin apply (default: t4-5min)",
    )
    private.add_argument(
        "--accept-embeddable",
        action="store_true",
        help="write the split even when a submission could carry enough of the pool to beat the record "
        "margin (for tests and development; its bound is recorded in every result scored on it)",
    )
    private.set_defaults(handler=run_private)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def run_build(args: argparse.Namespace) -> int:
    try:
        out_dir, hashes = _build(args)
    except OSError as exc:
        raise UserError(f"{exc.filename or args.out}: {exc.strerror or exc}") from None
    for name, digest in hashes.items():
        print(f"{digest}  {shown(out_dir / name)}")
    return 0


def _build(args: argparse.Namespace) -> tuple[Path, dict[str, str]]:
    if args.source == "pydoc":
        from evaluator.dataset import source_pydoc

        dataset_id = args.dataset_id or DEFAULT_DATASET_ID
        out_dir = args.out or DATASETS_DIR / dataset_id
        hashes = source_pydoc.build(
            out_dir,
            dataset_id,
            source_dir=args.source_dir or source_pydoc.DEFAULT_SOURCE_DIR,
            n_docs=args.docs,
            target_tokens=args.tokens,
            vocab_size=args.vocab_size,
        )
    else:
        from evaluator.dataset import source_hub

        if not args.dataset_id:
            raise UserError("--id is required with --source hub (it names the dataset in the tracks)")
        source = source_hub.HubSource(
            dataset=args.hub_dataset or source_hub.DEFAULT_DATASET,
            config=args.hub_config if args.hub_dataset else (args.hub_config or source_hub.DEFAULT_CONFIG),
            split=args.hub_split,
            text_field=args.text_field,
            tokenizer=args.hub_tokenizer or source_hub.DEFAULT_TOKENIZER,
            n_docs=args.docs,
            max_chars=args.max_chars,
            max_tokens=args.tokens,
        )
        out_dir = args.out or DATASETS_DIR / args.dataset_id
        hashes = source_hub.build(out_dir, args.dataset_id, source)
    return out_dir, hashes


def run_verify(args: argparse.Namespace) -> int:
    from evaluator import tracks
    from evaluator.dataset.store import HIDDEN, check_data_files, find_hidden_split

    if args.track is None:
        chosen = [tracks.load_track(track_id) for track_id in tracks.available_tracks()]
        if not chosen:
            raise UserError(f"no track files in {tracks.TRACKS_DIR}")
    elif args.track.endswith(".toml"):
        chosen = [tracks.load_track_file(Path(args.track))]
    else:
        chosen = [tracks.load_track(args.track)]
    failures = checked = 0
    id_width = max(len(track.id) for track in chosen)
    for track in chosen:
        rows = check_data_files(track)
        for which, path, problem in rows:
            checked += 1
            if problem is None:
                assert path is not None  # check_data_files names the path of every file without a problem
                print(f"ok    {track.id:{id_width}}  {which:9}  {shown(path)}")
            else:
                failures += 1
                print(f"FAIL  {track.id:{id_width}}  {which:9}  {problem}")
        if track.dataset.hidden is not None and not any(which == HIDDEN for which, _, _ in rows):
            _, absent = find_hidden_split(track)
            print(f"--    {track.id:{id_width}}  {HIDDEN:9}  {absent}: runs here are development results")
    if failures:
        sys.stderr.write(f"evaluator: {failures} of {checked} data files are missing or do not match their track\n")
        return 1
    return 0


def run_private(args: argparse.Namespace) -> int:
    import random

    from rich.console import Console
    from tokenizers import Tokenizer

    from evaluator.check import INFORMATION_MAX_BYTES
    from evaluator.dataset import private
    from evaluator.dataset.loader import read_documents
    from evaluator.dataset.store import resolve_data_file, tokenizer_info
    from evaluator.errors import DataError
    from evaluator.leaderboard.rules import load_record_rules
    from evaluator.paths import SPEC_DIR
    from evaluator.progress import PlainLines
    from evaluator.tracks import load_track

    track = load_track(args.track)
    console = Console(stderr=True)
    train_path, val_path = resolve_data_file(track, "train"), resolve_data_file(track, "val")
    tokenizer_path = resolve_data_file(track, "tokenizer")
    vocab_size, _ = tokenizer_info(tokenizer_path)
    margin = load_record_rules(SPEC_DIR / "record-rules.toml").for_track(track.id).min_improvement_nats
    rng = random.SystemRandom()  # nobody, the organiser included, can tell which documents it draws
    lines = PlainLines(console, every_s=5.0)
    survey, candidates = private.survey_pool(
        private.pool_rows(args.pool),
        args.docs * private.OVERSAMPLE,
        rng,
        on_row=lambda count: lines.say(f"reading the pool: {count:,} documents ..."),
    )
    lines.say(f"read the pool: {survey.documents:,} documents, {survey.text_bytes:,} bytes of text", final=True)
    try:
        public = private.public_documents(train_path, val_path)
        documents = private.draw_documents(candidates, args.docs, Tokenizer.from_file(str(tokenizer_path)), public)
    except DataError as exc:
        raise UserError(str(exc)) from None
    train_tokens = (token for doc in read_documents(train_path) for token in doc.tokens)
    tokens_per_document = sum(len(doc.tokens) for doc in documents) / len(documents)
    bound = private.embedding_bound(
        survey,
        private.unigram_loss(train_tokens, documents, vocab_size),
        tokens_per_document,
        INFORMATION_MAX_BYTES,
        margin,
    )
    print(f"embedding bound: {bound.sentence()}")
    if bound.embeddable and not args.accept_embeddable:
        raise UserError(
            f"refusing the pool: {bound.sentence()}; a submission could buy a record by carrying it. Draw from a "
            "pool thousands of times larger, or from unpublished text, or pass --accept-embeddable"
        )
    path, digest = private.write_hidden_split(args.out, documents, bound)
    print(f"{digest}  {shown(path)}")
    print(
        f"{len(documents)} documents, {sum(len(doc.tokens) for doc in documents):,} tokens"
        + ("; EMBEDDABLE (--accept-embeddable): results scored on it say so" if bound.embeddable else "")
    )
    print(f'in the track\'s [dataset]: hidden = {{ sha256 = "{digest}" }}')
    return 0

"""The hidden test split: drawn by `evaluator data private`, found by its hash, scored beside the public
split, the only score that can be official, and the contamination check that catches a model which
memorised the public split. Real pools, real Parquet, real runs in nsjail."""

from __future__ import annotations

import base64
import json
import shutil
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import run_cli, write_submission

from evaluator.cli import main
from evaluator.dataset import source_pydoc
from evaluator.dataset.build import OVERLAP_WINDOW
from evaluator.dataset.private import BOUND_METADATA_KEY, read_bound
from evaluator.dataset.store import PRIVATE_DATA_ENV, find_hidden_split
from evaluator.errors import DataError
from evaluator.fsutil import sha256_file
from evaluator.paths import HOME
from evaluator.results import result_problems
from evaluator.tracks import load_track_file

PUBLIC = HOME / "spec" / "datasets" / "pydoc-100k"


@pytest.fixture(scope="session")
def pool(tmp_path_factory) -> Path:
    """JSON lines of the documentation sections the public dataset did not use: a real pool, small
    enough for a submission to carry (which is what the embedding bound must say)."""
    used = {
        doc_id
        for split in ("train", "val")
        for doc_id in pq.read_table(PUBLIC / f"{split}.parquet", columns=["doc_id"]).column("doc_id").to_pylist()
    }
    source = source_pydoc.DEFAULT_SOURCE_DIR
    sections = source_pydoc.read_sections(source, source_pydoc.source_files(source))
    path = tmp_path_factory.mktemp("pool") / "pool.jsonl"
    with open(path, "w", encoding="utf-8") as out:
        for candidate in source_pydoc.eligible(sections):
            if candidate.doc_id not in used:
                out.write(json.dumps({"doc_id": candidate.doc_id, "text": candidate.text}) + "\n")
    return path


def _private(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["data", "private", "--track", "cpu-1min", *argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


@pytest.fixture(scope="session")
def hidden_dir(pool, tmp_path_factory) -> Path:
    """A hidden split of 60 documents drawn from the pool by the tool itself."""
    out = tmp_path_factory.mktemp("private")
    assert (
        main(
            [
                "data",
                "private",
                "--track",
                "cpu-1min",
                "--pool",
                str(pool),
                "--docs",
                "60",
                "--out",
                str(out),
                "--accept-embeddable",
            ]
        )
        == 0
    )
    return out


def _hidden_file(hidden_dir: Path) -> Path:
    (path,) = hidden_dir.glob("*.parquet")
    return path


def test_data_private_refuses_an_embeddable_pool_with_its_figures(pool, tmp_path, capsys):
    code, out, err = _private(capsys, "--pool", str(pool), "--docs", "40", "--out", str(tmp_path / "out"))
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("evaluator: refusing the pool:") and "--accept-embeddable" in line
    assert "of the pool's" in line and "nats against the record margin of 0.005" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_data_private_writes_a_split_found_by_its_hash_that_overlaps_no_public_text(hidden_dir, capsys):
    path = _hidden_file(hidden_dir)
    digest = sha256_file(path)
    assert path.name == f"{digest}.parquet"
    bound = read_bound(path)
    assert bound is not None and bound["gain_nats"] > bound["margin_nats"] == 0.005
    assert 0 < bound["covered_share"] <= 1 and bound["pool_documents"] > 1000
    hidden = pq.read_table(path).to_pylist()
    assert len(hidden) == 60 and BOUND_METADATA_KEY in pq.read_schema(path).metadata
    public = [row for split in ("train", "val") for row in pq.read_table(PUBLIC / f"{split}.parquet").to_pylist()]
    assert not {row["doc_id"] for row in hidden} & {row["doc_id"] for row in public}
    longest = max(len(row["text"]) for row in public)
    assert all(len(row["text"]) <= longest for row in hidden)  # cut like the public documents

    def windows(tokens):
        return {tuple(tokens[i : i + OVERLAP_WINDOW]) for i in range(len(tokens) - OVERLAP_WINDOW + 1)}

    public_windows = set().union(*(windows(row["tokens"]) for row in public))
    assert not any(windows(row["tokens"]) & public_windows for row in hidden)


def test_a_track_finds_its_hidden_split_by_hash_only_where_the_host_holds_it(hidden_dir, tmp_path, monkeypatch, capsys):
    path = _hidden_file(hidden_dir)
    text = (HOME / "spec" / "tracks" / "cpu-1min.toml").read_text().replace('id = "cpu-1min"', 'id = "with-hidden"')
    text = text.replace("\n[eval]", f'\nhidden = {{ sha256 = "{sha256_file(path)}" }}\n\n[eval]', 1)
    track_file = tmp_path / "with-hidden.toml"
    track_file.write_text(text)
    track = load_track_file(track_file)

    monkeypatch.delenv(PRIVATE_DATA_ENV, raising=False)
    assert find_hidden_split(track) == (
        None,
        f"the track's hidden split is not on this host ({PRIVATE_DATA_ENV} is not set)",
    )
    monkeypatch.setenv(PRIVATE_DATA_ENV, str(tmp_path))  # a directory without it
    found, why = find_hidden_split(track)
    assert found is None and "not on this host" in why
    code = main(["data", "verify", "--track", str(track_file)])
    out = capsys.readouterr().out
    assert code == 0 and "hidden" in out and "development results" in out and out.count("ok ") == 3

    monkeypatch.setenv(PRIVATE_DATA_ENV, str(hidden_dir))
    assert find_hidden_split(track) == (path.resolve(), None)
    assert main(["data", "verify", "--track", str(track_file)]) == 0
    assert capsys.readouterr().out.count("ok ") == 4

    forged = tmp_path / "forged"
    forged.mkdir()
    shutil.copy(PUBLIC / "val.parquet", forged / path.name)  # the right name, other content
    monkeypatch.setenv(PRIVATE_DATA_ENV, str(forged))
    with pytest.raises(DataError, match="refusing to use a data file that is not the one the track names"):
        find_hidden_split(track)


# --- runs --------------------------------------------------------------------------------------

# Honest: a bigram model counted from the training split, nothing else.
BIGRAM = """
import torch


class Bigram(torch.nn.Module):
    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, tokens):
        return self.table[tokens]

    def decoder(self, rows):
        return _NextOfNewest(self)


class _NextOfNewest:
    def __init__(self, model):
        self.model = model

    def step(self, tokens):
        return self.model.table[tokens]

    def keep(self, rows):
        pass


def train(ctx):
    tokens = ctx.train_tokens
    counts = torch.ones(ctx.vocab_size, ctx.vocab_size)
    counts.index_put_((tokens[:-1], tokens[1:]), torch.ones(len(tokens) - 1), accumulate=True)
    return Bigram(counts.log() - counts.sum(1, keepdim=True).log())
"""

# Dishonest: carries the public split's token ids and predicts each next token of every public
# document from its whole prefix (a rolling hash of it); elsewhere its logits are flat.
MEMORISER = """
import base64, json, zlib

import torch

PAYLOAD = "{payload}"


class Memoriser(TinyCausal):
    def __init__(self, vocab_size, table):
        super().__init__(vocab_size)
        self.vocab_size, self.table = vocab_size, table

    def forward(self, tokens):
        recall = _Recall(self, tokens.shape[0])
        return torch.stack([recall.step(tokens[:, t]) for t in range(tokens.shape[1])], dim=1)

    def decoder(self, rows):
        return _Recall(self, rows)


class _Recall:
    def __init__(self, model, rows):
        self.model, self.keys = model, [0] * rows

    def step(self, tokens):
        logits = torch.zeros(len(tokens), self.model.vocab_size)
        for row, token in enumerate(tokens.tolist()):
            self.keys[row] = hash((self.keys[row], token))
            following = self.model.table.get(self.keys[row])
            if following is not None:
                logits[row, following] = 12.0
        return logits

    def keep(self, rows):
        self.keys = [self.keys[row] for row in torch.as_tensor(rows).tolist()]


def train(ctx):
    table = {{}}
    for document in json.loads(zlib.decompress(base64.b85decode(PAYLOAD))):
        key = 0
        for token, following in zip([ctx.eos_id, *document], document):
            key = hash((key, token))
            table[key] = following
    return Memoriser(ctx.vocab_size, table)
"""


def _memoriser_body() -> str:
    documents = pq.read_table(PUBLIC / "val.parquet", columns=["tokens"]).column("tokens").to_pylist()
    payload = base64.b85encode(zlib.compress(json.dumps(documents).encode(), 9)).decode()
    return MEMORISER.format(payload=payload)


@pytest.fixture
def hidden_track(hidden_dir, cpu_track_variant, monkeypatch):
    """cpu-1min with a 4 s budget (so a run at its budget can be official), the hidden split, and a CPU
    share that a tiny model's 4 s reach on a busy test machine (tests/test_busy_host.py tests the share)."""
    digest = sha256_file(_hidden_file(hidden_dir))
    monkeypatch.setenv(PRIVATE_DATA_ENV, str(hidden_dir))
    return cpu_track_variant(
        "hidden-4s",
        lambda text: (
            text.replace("budget_s = 60", "budget_s = 4")
            .replace("min_cpu_share = 0.9", "min_cpu_share = 0.05")
            .replace("\n[eval]", f'\nhidden = {{ sha256 = "{digest}" }}\n\n[eval]', 1)
        ),
    )


@pytest.mark.slow
def test_an_honest_model_is_official_on_the_hidden_split_and_not_flagged(
    hidden_track, tmp_path, runs_dir, capsys, nsjail
):
    folder = write_submission(tmp_path, "bigram", BIGRAM)
    code, result = run_cli(
        folder, runs_dir, "--track", hidden_track, "--secret-seeds", "--sandbox", "nsjail", capsys=capsys
    )
    assert code == 0 and result["status"] == "ok", result["message"]
    assert result["official"] is True and result["unofficial_reasons"] == []
    assert result["data"]["scored_on"] == "hidden" and result["data"]["embedding_bound"]["gain_nats"] > 0
    assert result["metrics"]["val_documents"] == 60 and result["dev_metrics"]["val_documents"] == 100
    assert result["contamination"]["flagged"] is False
    assert abs(result["contamination"]["gap_nats"]) < result["contamination"]["max_gap_nats"]
    assert result_problems(result) == []


@pytest.mark.slow
def test_a_model_that_carries_the_public_split_is_flagged_and_gains_nothing_on_the_hidden_one(
    hidden_track, tmp_path, runs_dir, capsys, monkeypatch, nsjail
):
    # `check` refuses a carried split (tests/test_check_payloads.py); here it is let through, to test
    # the defence that holds even when a payload passes review.
    monkeypatch.setattr("evaluator.check.payload_findings", lambda *args, **kwargs: [])
    folder = write_submission(tmp_path, "memoriser", _memoriser_body())
    code, result = run_cli(folder, runs_dir, "--track", hidden_track, "--sandbox", "nsjail", capsys=capsys)
    assert code == 0 and result["status"] == "ok", result["message"]
    assert result["dev_metrics"]["val_loss"] < 0.5  # it knows the public split by heart
    assert result["metrics"]["val_loss"] > 6.0  # and the hidden one not at all: worse than a bigram
    assert result["contamination"]["flagged"] is True


@pytest.mark.slow
def test_without_its_hidden_split_a_run_is_a_development_result(
    hidden_track, tmp_path, runs_dir, capsys, monkeypatch, nsjail
):
    monkeypatch.delenv(PRIVATE_DATA_ENV)
    folder = write_submission(tmp_path, "bigram", BIGRAM)
    code, result = run_cli(
        folder, runs_dir, "--track", hidden_track, "--secret-seeds", "--sandbox", "nsjail", capsys=capsys
    )
    assert code == 0 and result["official"] is False
    assert result["unofficial_reasons"] == [
        "development result: scored on the public split, which anyone can memorise (the track's hidden split "
        f"is not on this host ({PRIVATE_DATA_ENV} is not set))"
    ]
    assert result["data"]["scored_on"] == "public" and result["metrics"]["val_documents"] == 100
    assert result["dev_metrics"] is None and result["contamination"] is None


def test_a_run_directory_inside_the_hidden_splits_folder_is_refused(hidden_track, hidden_dir, tmp_path, capsys):
    # Every jail sees its run directory, and no jail may see the hidden split's folder.
    folder = write_submission(tmp_path, "bigram", BIGRAM)
    code = main(["run", str(folder), "--track", hidden_track, "--out", str(hidden_dir / "runs"), "--json"])
    assert code == 2 and "lies inside EVALUATOR_PRIVATE_DATA" in capsys.readouterr().err
    assert not (hidden_dir / "runs").exists()

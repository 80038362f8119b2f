"""Scoring through real nsjail model servers: the metrics, their independence from batching, the
causality audit, each way a model can be invalid, and what a model can reach from the jail.

The models are tiny classes in tests/fixtures/models/toy_models.py; that folder plays the
submission, so the pickles refer to `toy_models.<Class>` as a submission's refer to `train.<Class>`.
"""

from __future__ import annotations

import json
import math
import random
import re
import socket
import sys
import uuid
from pathlib import Path

import pytest

from conftest import missing
import torch
import torch.nn.functional as F

from evaluator.dataset.loader import Document
from evaluator.paths import REPO_ROOT
from evaluator.sandbox import SandboxUnavailable, open_sandbox
from evaluator.errors import InvalidModel
from evaluator.scoring import ScoreReport, score_model

FIXTURE_MODELS = Path(__file__).parent / "fixtures" / "models"
sys.path.insert(0, str(FIXTURE_MODELS))
import toy_models  # noqa: E402  (importable only once its folder is on sys.path, as in the server)

VOCAB = 64
EOS = 0
SEQ_LEN = 16
NAN_TOKEN = VOCAB - 1  # appears once: document doc-05, token 20, the input at position 21
LENGTHS = [1, 5, 16, 17, 40, 33, 2, 9, 12, 31, 3, 24]


def _documents() -> list[Document]:
    rng = random.Random(5)
    documents = []
    for index, length in enumerate(LENGTHS):
        tokens = [rng.randrange(1, NAN_TOKEN) for _ in range(length)]
        if index == 5:
            tokens[20] = NAN_TOKEN
        documents.append(Document(f"doc-{index:02d}", tokens, n_bytes=3 * length + index))
    return documents


DOCUMENTS = _documents()


@pytest.fixture(scope="module")
def sandbox():
    try:
        return open_sandbox("nsjail")
    except SandboxUnavailable as exc:
        missing(f"nsjail is not available here: {exc}")


def _score(sandbox, tmp_path: Path, model, **overrides) -> ScoreReport:
    model_path = tmp_path / "model" / "model.pt"
    model_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model, model_path)
    options = dict(
        sandbox=sandbox,
        workdir=tmp_path / "work",
        name=f"test-scoring-{uuid.uuid4().hex[:8]}",
        model_path=model_path,
        submission_dir=FIXTURE_MODELS,
        documents=DOCUMENTS,
        vocab_size=VOCAB,
        eos_id=EOS,
        seq_len=SEQ_LEN,
        batch_size=4,
        device="cpu",
        threads=1,
        time_limit_s=60,
        memory_bytes=2 << 30,
        pids=64,
        audit_cuts=4,
        secret_seed=1,
    )
    options.update(overrides)
    return score_model(**options)


def _server_logs(tmp_path: Path) -> str:
    return "\n".join(path.read_text(errors="replace") for path in sorted((tmp_path / "work").rglob("*.log")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uniform_logits_score_ln_vocab(sandbox, tmp_path, dtype):
    report = _score(sandbox, tmp_path, toy_models.Uniform(VOCAB, dtype))

    tokens = sum(LENGTHS)
    n_bytes = sum(document.n_bytes for document in DOCUMENTS)
    # log_softmax runs in float32: ln(64) to float32 precision, the same for every token.
    assert report.val_loss == pytest.approx(math.log(VOCAB), rel=1e-7)
    assert report.val_bpb == pytest.approx(math.log(VOCAB) * tokens / math.log(2) / n_bytes, rel=1e-7)
    assert (report.val_tokens, report.val_bytes, report.val_documents) == (tokens, n_bytes, len(DOCUMENTS))
    assert report.audit.cuts == 4 and report.audit.passed and report.audit.max_abs_diff == 0.0
    assert report.seconds > 0


def _loss_by_hand(model) -> float:
    """Each document alone, in windows of SEQ_LEN, computed here in float64 without batching."""
    nats, tokens = 0.0, 0
    with torch.no_grad():
        for document in DOCUMENTS:
            inputs = [EOS] + document.tokens[:-1]
            for start in range(0, len(inputs), SEQ_LEN):
                window = torch.tensor([inputs[start : start + SEQ_LEN]])
                targets = torch.tensor(document.tokens[start : start + SEQ_LEN])
                logits = model(window)[0].double()
                nats += F.cross_entropy(logits, targets, reduction="sum").item()
                tokens += len(targets)
    return nats / tokens


def test_scores_do_not_depend_on_batch_size_order_or_repetition(sandbox, tmp_path):
    model = toy_models.PairTable(VOCAB)
    shuffled = DOCUMENTS[:]
    random.Random(0).shuffle(shuffled)

    reports = [
        _score(sandbox, tmp_path / "a", model, batch_size=1),
        _score(sandbox, tmp_path / "b", model, batch_size=7, documents=shuffled, audit_cuts=0),
        _score(sandbox, tmp_path / "c", model, batch_size=7, audit_cuts=0),
    ]

    assert {(report.val_loss, report.val_bpb) for report in reports} == {(reports[0].val_loss, reports[0].val_bpb)}
    assert reports[0].val_loss == pytest.approx(_loss_by_hand(model), rel=1e-6)
    assert reports[0].audit.passed and reports[1].audit.cuts == 0


@pytest.mark.parametrize(
    ("model", "cuts"),
    [(toy_models.PeekNext(VOCAB), 8), (toy_models.PeekLast(VOCAB), 8), (toy_models.PeekNext(VOCAB, every=4), 32)],
    ids=["reads-next-token", "reads-last-token", "reads-next-token-at-every-4th-position"],
)
def test_audit_catches_a_model_that_reads_later_tokens(sandbox, tmp_path, model, cuts):
    with pytest.raises(InvalidModel) as caught:
        _score(sandbox, tmp_path, model, audit_cuts=cuts, secret_seed=7)

    message = str(caught.value)
    found = re.match(
        r"causality audit failed: document '(doc-\d\d)', position (\d+): its logits changed by \S+ "
        r"\(tolerance \S+\) when the tokens after position (\d+) were replaced",
        message,
    )
    assert found, message
    document_id, position, cut = found.group(1), int(found.group(2)), int(found.group(3))
    assert document_id in {document.doc_id for document in DOCUMENTS}
    assert position <= cut
    if isinstance(model, toy_models.PeekNext):
        assert position == cut  # only the position just before the replaced tokens reads them


@pytest.mark.parametrize(
    ("model", "expected", "options"),
    [
        (toy_models.NaNAt(VOCAB, NAN_TOKEN), r"non-finite logits for document 'doc-05' at position 21$", {}),
        (
            toy_models.WrongVocab(VOCAB),
            r"the model returned logits of shape \(4, 16, 65\) for tokens of shape \(4, 16\): wrong vocabulary "
            r"size 65, the tokenizer's is 64, expected \(4, 16, 64\) \(main pass, batch 1/\d+\)",
            {},
        ),
        (
            toy_models.DropsLastPosition(VOCAB),
            r"the model returned logits of shape \(4, 15, 64\) for tokens of shape \(4, 16\): wrong shape, "
            r"expected \(4, 16, 64\) \(main pass, batch 1/\d+\)",
            {},
        ),
        (
            toy_models.Raises(VOCAB),
            r"the model's forward raised ValueError: this model refuses to run \(main pass, batch 1/\d+\)",
            {},
        ),
        (
            toy_models.Exits(VOCAB),
            r"the model server exited with code 3 \(main pass, batch 1/\d+\); "
            r"last message: exiting in the middle of a forward",
            {},
        ),
        (
            toy_models.ForgesReply(VOCAB, b"x" * 5000),
            r"the model server sent a reply header over 4096 bytes \(main pass, batch 1/\d+\)",
            {},
        ),
        (
            toy_models.ForgesReply(
                VOCAB, b'{"event": "logits", "shape": [4, 16, 64], "dtype": "int64", "nbytes": 32768}\n'
            ),
            r"the model returned logits of dtype int64, expected one of float16, bfloat16, float32, float64",
            {},
        ),
        (
            toy_models.ForgesReply(
                VOCAB, b'{"event": "logits", "shape": [4, 16, 64], "dtype": "float32", "nbytes": 99}\n'
            ),
            r"the model server announced 99 bytes for float32 logits of shape \(4, 16, 64\), expected 16384",
            {},
        ),
        (
            {"not": "a model"},
            r"the model server could not load the model: TypeError: the saved object is a dict, not a torch.nn.Module",
            {},
        ),
        (
            toy_models.Sleeps(VOCAB),
            r"the model exceeded the scoring time limit of 12 s \(main pass, batch 1/\d+\)",
            {"time_limit_s": 12},
        ),
    ],
    ids=["nan", "wrong-vocab", "wrong-shape", "raises", "exits", "forged-long-header", "forged-dtype", "forged-size",
         "not-a-module", "too-slow"],
)
def test_invalid_models_are_named_precisely(sandbox, tmp_path, model, expected, options):
    with pytest.raises(InvalidModel, match=expected):
        _score(sandbox, tmp_path, model, **options)


def test_a_model_finds_no_data_and_no_network(sandbox, tmp_path):
    data_file = tmp_path / "data" / "val.parquet"
    data_file.parent.mkdir()
    data_file.write_bytes(b"validation tokens")
    host_files = [data_file, REPO_ROOT / "spec" / "tracks" / "cpu-1min.toml", REPO_ROOT / "pyproject.toml"]
    assert all(path.is_file() for path in host_files)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        model = toy_models.Snoops(VOCAB, [str(path) for path in host_files], listener.getsockname()[1])

        report = _score(sandbox, tmp_path, model, audit_cuts=0)

        with pytest.raises(BlockingIOError):
            listener.accept()
    assert report.val_loss == pytest.approx(math.log(VOCAB), rel=1e-7)
    snooped = re.findall(r"SNOOPED (.*)", _server_logs(tmp_path))
    assert len(snooped) == 1, _server_logs(tmp_path)
    found = json.loads(snooped[0])
    assert found.pop("socket") != "connected"
    assert found == {str(path): "FileNotFoundError" for path in host_files}


def test_code_in_the_pickle_runs_only_inside_the_jail(sandbox, tmp_path):
    marker = tmp_path / "unpickled-on-the-host"

    report = _score(sandbox, tmp_path, toy_models.WritesOnLoad(str(marker), VOCAB), audit_cuts=0)

    assert report.val_loss == pytest.approx(math.log(VOCAB), rel=1e-7)
    logs = _server_logs(tmp_path)
    assert "MARKER ran as uid" in logs, logs
    assert not marker.exists()

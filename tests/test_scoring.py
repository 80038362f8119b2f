"""Scoring through real sealed nsjail model servers: the metrics, their independence from batching,
what streaming does to models that look ahead, the deadlines, each way a model can be invalid (in
fixed sentences only), the consistency of two compositions, and what a model can reach or keep.

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
import torch
import torch.nn.functional as F

from evaluator import scoring
from evaluator.dataset.loader import Document
from evaluator.errors import InvalidModel
from evaluator.model_server import PIDS_PER_BATCH
from evaluator.paths import HOME
from evaluator.scoring import (
    WALL_BACKSTOP_FACTOR,
    Refusal,
    ScoreReport,
    ScoringLimits,
    ScoringSession,
    ScoringSetup,
    compose,
    document_windows,
)

FIXTURE_MODELS = Path(__file__).parent / "fixtures" / "models"
sys.path.insert(0, str(FIXTURE_MODELS))
import toy_models  # noqa: E402  (importable only once its folder is on sys.path, as in the server)

VOCAB = 64
EOS = 0
SEQ_LEN = 16
NAN_TOKEN = VOCAB - 1  # appears once: document doc-05, token 20, the input at position 21
LENGTHS = [1, 5, 16, 17, 40, 33, 2, 9, 12, 31, 3, 24]
LIMITS = ScoringLimits(load_s=10, step_s=10, total_s=60, consistency_nats=1e-3)
# How a timeout's sentence goes on: CPU-time deadlines on the CPU, the wall clock's backstop for a model that waits.
CPU_TIME = Refusal.OF_CPU_TIME.split("{")[0].rstrip()
BACKSTOP = Refusal.BACKSTOP.format(factor=WALL_BACKSTOP_FACTOR, used=0).rsplit(" 0 s", 1)[0]


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

# Every test here needs a working nsjail (the fixture is in conftest.py).
pytestmark = [pytest.mark.usefixtures("nsjail"), pytest.mark.slow]  # and the slow tier (`make test-fast` leaves it out)


def _score(nsjail, tmp_path: Path, model, **overrides) -> ScoreReport:
    model_path = tmp_path / "model" / "model.pt"
    model_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model, model_path)
    documents, secret_seed = overrides.pop("documents", DOCUMENTS), overrides.pop("secret_seed", 1)
    with _session(nsjail, tmp_path, models=1, model_cap_bytes=model_path.stat().st_size, **overrides) as session:
        return session.score(model_path, documents, secret_seed=secret_seed)


def _loss_by_hand(model) -> float:
    """Each document alone, in windows of SEQ_LEN, computed here in float64 with full forwards."""
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


@pytest.mark.parametrize(
    "model",
    [toy_models.Uniform(VOCAB), toy_models.UniformStreaming(VOCAB), toy_models.Uniform(VOCAB, torch.bfloat16)],
    ids=["recomputed", "incremental", "bfloat16"],
)
def test_uniform_logits_score_ln_vocab(nsjail, tmp_path, model):
    report = _score(nsjail, tmp_path, model)

    tokens = sum(LENGTHS)
    n_bytes = sum(document.n_bytes for document in DOCUMENTS)
    assert report.val_loss == round(math.log(VOCAB), 4)
    assert report.val_bpb == round(math.log(VOCAB) * tokens / math.log(2) / n_bytes, 4)
    assert (report.val_tokens, report.val_bytes, report.val_documents, report.passes) == (
        tokens,
        n_bytes,
        len(DOCUMENTS),
        2,
    )


def test_scores_do_not_depend_on_batch_size_order_or_seed(nsjail, tmp_path):
    model = toy_models.PairTable(VOCAB)
    shuffled = DOCUMENTS[:]
    random.Random(0).shuffle(shuffled)

    reports = [
        _score(nsjail, tmp_path / "a", model, batch_size=1),
        _score(nsjail, tmp_path / "b", model, batch_size=7, documents=shuffled, secret_seed=2),
        _score(nsjail, tmp_path / "c", model, batch_size=7, secret_seed=None),
    ]

    assert {(report.val_loss, report.val_bpb) for report in reports} == {(reports[0].val_loss, reports[0].val_bpb)}
    assert reports[0].val_loss == pytest.approx(_loss_by_hand(model), abs=1e-4)


@pytest.mark.parametrize(
    "cheat",
    [
        toy_models.PeekNext(VOCAB),
        toy_models.PeekNext(VOCAB, every=4),
        toy_models.PeekNext(VOCAB, hashed=True),
        toy_models.PeekNext(VOCAB, dtype=torch.bfloat16),
    ],
    ids=["everywhere", "at-every-4th-position", "at-hashed-positions", "in-bfloat16"],
)
def test_a_model_that_reads_ahead_gains_nothing(nsjail, tmp_path, cheat):
    """Each cheat is PairTable plus a bonus for a token after the position it predicts. Streamed,
    there is no such token yet when the prediction is made: whatever it adds, it adds blind."""
    honest = toy_models.PairTable(VOCAB)
    cheat.load_state_dict(honest.state_dict())

    cheated = _score(nsjail, tmp_path / "cheat", cheat).val_loss
    full_forward = _loss_by_hand(cheat)  # what the cheat would score if it saw whole windows

    assert cheated >= _score(nsjail, tmp_path / "honest", honest).val_loss
    assert full_forward < cheated - 0.3


def test_split_windows_of_a_document_never_share_a_batch():
    windows = [window for document in DOCUMENTS for window in document_windows(document, EOS, 8)]
    assert max(sum(window.doc_id == document.doc_id for window in windows) for document in DOCUMENTS) == 5
    for seed in range(200):
        for batch_size in (1, 3, 8, 64):
            composition = compose(windows, batch_size, random.Random(seed))
            assert sorted(map(id, (w for batch in composition for w in batch))) == sorted(map(id, windows))
            for batch in composition:
                assert len(batch) <= max(batch_size, 1)
                assert len({window.doc_id for window in batch}) == len(batch)
    first, second = (compose(windows, 8, random.Random(seed)) for seed in (1, 2))
    assert [[id(w) for w in b] for b in first] != [[id(w) for w in b] for b in second]


def test_a_model_whose_scores_depend_on_the_other_rows_is_refused(nsjail, tmp_path):
    with pytest.raises(InvalidModel) as caught:
        _score(nsjail, tmp_path, toy_models.RowMixer(VOCAB))
    assert str(caught.value) == Refusal.INCONSISTENT.format(tolerance=LIMITS.consistency_nats)


def test_no_state_reaches_a_later_batch_process(nsjail, tmp_path):
    """Files (tmpfs or not), SysV shared memory and the server's memory: were any writable from one
    batch process and readable from the next, Hoarder's bets would change its score."""
    honest = toy_models.PairTable(VOCAB)
    hoarder = toy_models.Hoarder(VOCAB)
    hoarder.load_state_dict(honest.state_dict())

    assert _score(nsjail, tmp_path / "hoard", hoarder).val_loss == _score(nsjail, tmp_path / "honest", honest).val_loss


def test_every_batch_process_starts_at_a_pid_fixed_in_advance(nsjail, tmp_path):
    _score(nsjail, tmp_path, toy_models.PidReporter(VOCAB, burn=9), debug_log_dir=tmp_path)

    for number in (1, 2):
        log = (tmp_path / f"scoring-pass-{number}.log").read_text()
        pids, counters = zip(*re.findall(r"^PID (\d+) (count\(\d+\))$", log, re.M), strict=True)
        assert len(pids) >= 4
        assert [int(pid) - int(pids[0]) for pid in pids] == [PIDS_PER_BATCH * index for index in range(len(pids))]
        assert len(set(counters)) == 1  # the ids were used up without a trace in the server's Python state


@pytest.mark.parametrize("what", ["rlimit", "priority", "pipe"])
def test_a_model_that_changes_what_the_next_batch_process_inherits_is_refused(nsjail, tmp_path, what):
    with pytest.raises(InvalidModel) as caught:
        _score(nsjail, tmp_path, toy_models.Tamperer(VOCAB, what))
    assert str(caught.value) == Refusal.TAMPERED


@pytest.mark.parametrize("what", ["ioprio", "sched_attr", "affinity"])
def test_a_model_cannot_set_the_servers_io_priority_or_scheduler_attributes(nsjail, tmp_path, what):
    """Refused outright (seccomp): the I/O priority a process reports changes by itself, so the
    server could not compare it; sched_setattr's custom slice and uclamp are not among what it
    compares, and a batch process set the slice for the next to read back, 26 bits a hand-off; CPU
    affinity is refused in every jail (tests/test_busy_host.py says why)."""
    with pytest.raises(InvalidModel) as caught:
        _score(nsjail, tmp_path, toy_models.Tamperer(VOCAB, what))
    assert str(caught.value) == Refusal.LOAD_FAILED


def test_a_model_that_uses_too_many_pids_in_a_batch_is_refused(nsjail, tmp_path):
    with pytest.raises(InvalidModel) as caught:
        _score(nsjail, tmp_path, toy_models.PidReporter(VOCAB, burn=PIDS_PER_BATCH))
    assert str(caught.value) == Refusal.PROCESSES


@pytest.mark.parametrize(
    ("model", "expected", "limits"),
    [
        (toy_models.NaNAt(VOCAB, NAN_TOKEN), Refusal.NON_FINITE, {}),
        (toy_models.Huge(VOCAB), Refusal.NON_FINITE, {}),
        (toy_models.WrongVocab(VOCAB), Refusal.BAD_SHAPE, {}),
        (toy_models.IntegerLogits(VOCAB), Refusal.BAD_OUTPUT, {}),
        (toy_models.ReturnsTuple(VOCAB), Refusal.STEP_FAILED, {}),
        (toy_models.Raises(VOCAB), Refusal.STEP_FAILED, {}),
        (toy_models.Exits(VOCAB), Refusal.ENDED, {}),
        (toy_models.ForgesReply(VOCAB, b"x" * 5000), Refusal.PROTOCOL, {}),
        (
            toy_models.ForgesReply(VOCAB, b"\x03\x00\x00\x00\x02\x00\x00\x00\x04\x00\x00\x00\x41\x00\x00\x00"),
            Refusal.BAD_SHAPE,
            {},
        ),
        ({"not": "a model"}, Refusal.LOAD_FAILED, {}),
        (toy_models.TrainsOnLoad(VOCAB, 60), Refusal.LOAD_TIMEOUT.format(seconds=3) + CPU_TIME, {"load_s": 3}),
        (toy_models.TrainsFirstCall(VOCAB, 60), Refusal.STEP_TIMEOUT.format(seconds=3) + CPU_TIME, {"step_s": 3}),
        # Sleeping uses no CPU time: the wall-clock backstop ends it.
        (toy_models.Sleeps(VOCAB), Refusal.STEP_TIMEOUT.format(seconds=1) + BACKSTOP, {"step_s": 1}),
        (toy_models.SlowSteps(VOCAB), Refusal.TOTAL_TIMEOUT.format(seconds=3) + CPU_TIME, {"total_s": 3}),
    ],
    ids=[
        "nan",
        "float64-beyond-float32",
        "wrong-vocab",
        "integer-logits",
        "returns-tuple",
        "raises",
        "exits",
        "forged-garbage",
        "forged-header",
        "not-a-module",
        "trains-on-load",
        "trains-in-first-call",
        "sleeps",
        "too-slow-in-all",
    ],
)
def test_invalid_models_get_a_fixed_sentence(nsjail, tmp_path, model, expected, limits):
    """Fixed but for a timeout's whole seconds used (CPU time per thread, on the CPU)."""
    options = {"load_s": LIMITS.load_s, "step_s": LIMITS.step_s, "total_s": LIMITS.total_s, **limits}
    with pytest.raises(InvalidModel) as caught:
        _score(nsjail, tmp_path, model, limits=ScoringLimits(**options, consistency_nats=LIMITS.consistency_nats))
    if expected.endswith("(it used"):
        assert re.fullmatch(re.escape(expected) + r" \d+ s\)", str(caught.value)), str(caught.value)
    elif expected.endswith("it used"):
        assert re.fullmatch(re.escape(expected) + r" \d+ s of CPU time per thread\)", str(caught.value)), str(
            caught.value
        )
    else:
        assert str(caught.value) == expected


def test_a_model_finds_no_data_and_no_network(nsjail, tmp_path):
    data_file = tmp_path / "data" / "val.parquet"
    data_file.parent.mkdir()
    data_file.write_bytes(b"validation tokens")
    host_files = [data_file, HOME / "spec" / "tracks" / "cpu-1min.toml", HOME / "pyproject.toml"]
    assert all(path.is_file() for path in host_files)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        model = toy_models.Snoops(VOCAB, [str(path) for path in host_files], listener.getsockname()[1])

        report = _score(nsjail, tmp_path, model, debug_log_dir=tmp_path)

        with pytest.raises(BlockingIOError):
            listener.accept()
    assert report.val_loss == round(math.log(VOCAB), 4)
    logs = "".join(path.read_text() for path in sorted(tmp_path.glob("scoring-pass-*.log")))
    snooped = [json.loads(line) for line in re.findall(r"SNOOPED (.*)", logs)]
    assert len(snooped) >= 2, logs  # once per batch process
    for found in snooped:
        assert found.pop("socket") != "connected"
        assert found == {str(path): "FileNotFoundError" for path in host_files}


def test_what_the_model_prints_or_raises_is_kept_only_when_asked(nsjail, tmp_path):
    for model in (toy_models.Raises(VOCAB), toy_models.Exits(VOCAB)):
        with pytest.raises(InvalidModel) as caught:
            _score(nsjail, tmp_path / "sealed", model)
        assert "LEAKED" not in str(caught.value)
    assert "LEAKED" not in "".join(path.read_text(errors="replace") for path in tmp_path.rglob("*") if path.is_file())

    with pytest.raises(InvalidModel):
        _score(nsjail, tmp_path / "debug", toy_models.Raises(VOCAB), debug_log_dir=tmp_path)
    assert "LEAKED" in (tmp_path / "scoring-pass-1.log").read_text()


def test_code_in_the_pickle_runs_only_inside_the_jail(nsjail, tmp_path):
    marker = tmp_path / "unpickled-on-the-host"

    report = _score(nsjail, tmp_path, toy_models.WritesOnLoad(str(marker), VOCAB), debug_log_dir=tmp_path)

    assert report.val_loss == round(math.log(VOCAB), 4)
    assert "MARKER ran as uid 65534" in (tmp_path / "scoring-pass-1.log").read_text()
    assert not marker.exists()


def _session(nsjail, tmp_path: Path, models: int = 4, **overrides):
    options = dict(
        name=f"test-session-{uuid.uuid4().hex[:8]}",
        submission_dir=FIXTURE_MODELS,
        vocab_size=VOCAB,
        eos_id=EOS,
        seq_len=SEQ_LEN,
        batch_size=4,
        device="cpu",
        gpu=None,
        threads=1,
        limits=LIMITS,
        memory_bytes=2 << 30,
        pids=64,
        model_cap_bytes=64 << 20,
    )
    options.update(overrides)
    return ScoringSession(nsjail, ScoringSetup(**options), models=models)


def _saved(tmp_path: Path, name: str, model) -> Path:
    path = tmp_path / "models" / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model, path)
    return path


def test_a_model_in_a_session_finds_no_other_model(nsjail, tmp_path):
    """One session serves every model of a run: the model scored before, its bytes sent to the same
    servers, is nowhere a later model's batch process can read (its own copy is: the control)."""
    earlier = _saved(tmp_path, "earlier", toy_models.Marked(VOCAB, "EARLIER-MODEL-MARKER-5150"))
    seeker = _saved(
        tmp_path, "seeker", toy_models.SeeksModels(VOCAB, "SEEKER-OWN-MARKER-8086", "EARLIER-MODEL-MARKER-5150")
    )
    with _session(nsjail, tmp_path, debug_log_dir=tmp_path) as session:
        assert session.score(earlier, DOCUMENTS, secret_seed=1).val_loss == round(math.log(VOCAB), 4)
        assert session.score(seeker, DOCUMENTS, secret_seed=1).val_loss == round(math.log(VOCAB), 4)
    logs = "".join(path.read_text() for path in sorted(tmp_path.glob("scoring-pass-*.log")))
    seen = [tuple(map(int, found)) for found in re.findall(r"SEEK own=(\d+) other=(\d+)", logs)]
    assert seen and all(own >= 1 and other == 0 for own, other in seen), seen


@pytest.mark.parametrize("threads", [1, 2], ids=["one-pass-at-a-time", "side-by-side"])
@pytest.mark.parametrize("failing", ["forges-reply", "tampers", "sleeps"])
def test_after_a_model_fails_the_next_one_is_scored_by_fresh_servers(nsjail, tmp_path, failing, threads):
    """A model that broke the protocol, tampered with its server or ran out of time leaves its server
    closed (with the passes side by side, the other pass is stopped): the next model of the session
    is scored as if alone, with all of its own time."""
    model = {
        "forges-reply": toy_models.ForgesReply(VOCAB, b"x" * 5000),
        "tampers": toy_models.Tamperer(VOCAB, "rlimit"),
        "sleeps": toy_models.Sleeps(VOCAB),
    }[failing]
    bad, honest = _saved(tmp_path, "bad", model), _saved(tmp_path, "honest", toy_models.PairTable(VOCAB))
    limits = ScoringLimits(load_s=10, step_s=1, total_s=20, consistency_nats=1e-3)
    with _session(nsjail, tmp_path, limits=limits, threads=threads) as session:
        with pytest.raises(InvalidModel):
            session.score(bad, DOCUMENTS, secret_seed=1)
        report = session.score(honest, DOCUMENTS, secret_seed=1)
        assert session.stages["server_start_s"] > 0
    assert report.val_loss == round(_loss_by_hand(toy_models.PairTable(VOCAB)), 4)


def test_a_server_out_of_process_ids_is_replaced_before_the_model_that_would_exhaust_it(nsjail, tmp_path, monkeypatch):
    """Each batch process starts at the next multiple of PIDS_PER_BATCH, so a server can open only so
    many batches: the session starts a fresh one before a model that would need more."""
    windows = [window for document in DOCUMENTS for window in document_windows(document, EOS, SEQ_LEN)]
    one_model = len(compose(windows, 4, random.Random(0)))
    monkeypatch.setattr(scoring, "_batches_per_server", lambda: one_model + 1)
    path = _saved(tmp_path, "uniform", toy_models.UniformStreaming(VOCAB))
    with _session(nsjail, tmp_path) as session:
        reports = [session.score(path, DOCUMENTS, secret_seed=seed) for seed in range(3)]
        started = session.servers_started
    assert {report.val_loss for report in reports} == {round(math.log(VOCAB), 4)}
    assert started == 3 * scoring.PASSES  # the first two servers, then two fresh ones for each later model


def test_each_model_of_a_session_chooses_its_own_logit_dtype(nsjail, tmp_path):
    """A model may not change its dtype while scoring; the next model of the run may use another."""
    single = _saved(tmp_path, "float32", toy_models.UniformStreaming(VOCAB))
    half = _saved(tmp_path, "bfloat16", toy_models.UniformStreaming(VOCAB, dtype=torch.bfloat16))
    with _session(nsjail, tmp_path) as session:
        losses = [session.score(path, DOCUMENTS, secret_seed=1).val_loss for path in (single, half, single)]
    assert losses == [round(math.log(VOCAB), 4)] * 3


def _distinct_documents(count: int, lengths: tuple[int, int] = (3, 20)) -> list[Document]:
    """Documents that each begin with a token of their own, so that a batch process's first tokens name them."""
    rng = random.Random(9)
    return [
        Document(
            f"doc-{index:02d}",
            [index + 1] + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(*lengths))],
            n_bytes=60,
        )
        for index in range(count)
    ]


def _windows_of(documents: list[Document]) -> list:
    return [window for document in documents for window in document_windows(document, EOS, SEQ_LEN)]


@pytest.mark.parametrize("seed", range(40))
def test_side_by_side_compositions_never_give_two_concurrent_batches_one_document(seed):
    rng = random.Random(seed)
    documents = _distinct_documents(rng.randrange(5, 60))
    # Some documents of several windows, as long ones are cut.
    windows = _windows_of(documents) + [
        scoring._Window(f"doc-{rng.randrange(len(documents)):02d}", [1], [2]) for _ in range(rng.randrange(0, 4))
    ]
    windows = list({(w.doc_id, tuple(w.inputs), tuple(w.targets)): w for w in windows}.values())
    batch_size = rng.choice([2, 4, 8, 32])
    first = compose(windows, batch_size, rng)
    second = scoring.compose_side_by_side(first, batch_size, rng)
    if second is None:  # none found (documents of many windows, full batches): one pass after the other
        return
    assert len(second) == len(first)
    assert sorted(map(id, (w for batch in second for w in batch))) == sorted(map(id, windows))
    for together_first, together_second in zip(first, second, strict=True):
        assert not {w.doc_id for w in together_first} & {w.doc_id for w in together_second}
    for batch in second:
        assert len(batch) <= batch_size and len({w.doc_id for w in batch}) == len(batch)


def test_batch_processes_alive_at_once_never_hold_one_document(nsjail, tmp_path):
    """Seen from inside the jails: the two passes run side by side, and no batch process of one
    pass shares a document with any batch process of the other that is alive at the same time (else
    it could pass on tokens the other has not been scored on)."""
    documents = _distinct_documents(40, lengths=(20, 60))  # one window each, long enough to overlap
    path = _saved(tmp_path, "logs", toy_models.LogsBatches(VOCAB))
    with _session(nsjail, tmp_path, threads=2, seq_len=64, debug_log_dir=tmp_path) as session:
        session.score(path, documents, secret_seed=3)
    processes = []  # (pass, first tokens, first moment alive, last moment alive)
    for number in (1, 2):
        log = (tmp_path / f"scoring-pass-{number}.log").read_text()
        alive: dict[str, list[float]] = {}
        for pid, moment in re.findall(r"ALIVE (\d+) ([\d.]+)", log):
            alive.setdefault(pid, []).append(float(moment))
        for pid, tokens in re.findall(r"FIRST (\d+) ([\d ]+)", log):
            processes.append((number, set(tokens.split()), min(alive[pid]), max(alive[pid])))
    assert {number for number, *_ in processes} == {1, 2} and len(processes) >= 2 * 10
    overlapping = 0
    for one in (p for p in processes if p[0] == 1):
        for other in (p for p in processes if p[0] == 2):
            if one[2] <= other[3] and other[2] <= one[3]:
                overlapping += 1
                assert not one[1] & other[1], (one, other)
    assert overlapping >= 3  # they did run side by side (of ten pairs of batches, most overlap)


def test_no_token_of_an_earlier_scoring_is_in_a_later_batch_processs_memory(nsjail, tmp_path):
    """A batch process is a fork of its server and inherits all its memory: the tokens of the
    scorings before it (another split's, a snapshot's) must never have been there."""

    def all_of(token: int) -> list[Document]:
        return [Document(f"doc-{index:02d}", [token] * 30, n_bytes=90) for index in range(12)]

    earlier = _saved(tmp_path, "earlier", toy_models.UniformStreaming(VOCAB))
    seeker = _saved(tmp_path, "seeker", toy_models.SeeksTokens(VOCAB, own=41, other=37))
    # 12 documents, batches of 12 or more rows: each step sends twelve equal tokens.
    with _session(nsjail, tmp_path, threads=2, batch_size=32, debug_log_dir=tmp_path) as session:
        session.score(earlier, all_of(37), secret_seed=1)
        session.score(seeker, all_of(41), secret_seed=2)
    logs = "".join(path.read_text() for path in sorted(tmp_path.glob("scoring-pass-*.log")))
    seen = [tuple(map(int, found)) for found in re.findall(r"SEEK own=(\d+) other=(\d+)", logs)]
    assert seen and all(own >= 1 and other == 0 for own, other in seen), seen

"""The incremental decoders of the shipped submissions against their own forward pass.

Real models with random weights, float32 on CPU, in small configurations: the reference GPT (with
and without doc_mask and soft-cap, untied head, SwiGLU/GELU) and an ensemble of two, the template's
TinyGPT and seed-moe's MoEMinimalLLM. Streaming a sequence through `model.decoder(rows)` must give
the logits `model(tokens)` gives, also when rows end at different positions and are dropped with
`keep`, and must leave the model as it was.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import tomllib
import torch

from evaluator.api import decoder_for, stream_logits

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 8192
EOS = 0
ATOL = 1e-4
# Where rows hold a separator: at the start, mid-row, twice in a row, or nowhere after position 3.
EOS_AT = {0: [0, 5, 19], 1: [16, 17, 30], 2: [3], 3: [], 4: [9, 20]}
LENGTHS = [23, 40, 7, 1, 23]  # rows end in the middle of the batch, at the edges, and together


def load_train_module(folder: str, name: str):
    """A submission's train.py under a module name of its own (every folder has a train.py)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def manifest_config(folder: str, track: str | None = None) -> dict:
    """The manifest's [config], with the track's overrides when one is named (as the evaluator merges them)."""
    manifest = tomllib.loads((ROOT / folder / "manifest.toml").read_text())
    config = dict(manifest.get("config", {}))
    if track is not None:
        config.update(manifest["tracks"][track]["config"])
    return config


reference = load_train_module("reference", "decoder_test_reference_train")
template = load_train_module("submissions/template", "decoder_test_template_train")
seed_moe = load_train_module("submissions/seed-moe", "decoder_test_seed_moe_train")


def perturb_zero_weights(model: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """Zero-initialised output projections (and experts, and an untied head) make every block the
    identity and hide attention from the comparison: give them small random values."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=std)
    return model


def gpt(seed: int = 0, **overrides) -> torch.nn.Module:
    """The reference GPT in its cpu-1min configuration, with overrides."""
    torch.manual_seed(seed)
    cfg = dict(reference.DEFAULTS) | manifest_config("reference", "cpu-1min") | overrides
    return perturb_zero_weights(reference.GPT(cfg, VOCAB, EOS))


def tiny_gpt() -> torch.nn.Module:
    """The template's TinyGPT in its cpu-1min configuration; scoring allows 512 positions."""
    torch.manual_seed(0)
    cfg = manifest_config("submissions/template", "cpu-1min")
    return template.TinyGPT(VOCAB, cfg["d_model"], cfg["n_layers"], cfg["n_heads"], max_len=512)


def moe() -> torch.nn.Module:
    """seed-moe's model in its own configuration, narrower and shallower to stay fast."""
    torch.manual_seed(0)
    cfg = dict(seed_moe.DEFAULTS) | manifest_config("submissions/seed-moe") | dict(d_model=64, n_layers=2)
    return perturb_zero_weights(seed_moe.MoEMinimalLLM(cfg, VOCAB))


MODELS = {
    "gpt": lambda: gpt(),
    "gpt-doc-mask-softcap": lambda: gpt(doc_mask=True, softcap=15.0),
    "gpt-untied-swiglu-doc-mask": lambda: gpt(tie_embed=False, act="swiglu", doc_mask=True),
    "gpt-gelu-gains-no-qk-norm": lambda: gpt(act="gelu", norm_gain=True, qk_norm=False),
    "ensemble": lambda: reference.Ensemble([gpt(seed=1, softcap=15.0), gpt(seed=2, softcap=15.0)]),
    "template": tiny_gpt,
    "seed-moe": moe,
}


def build(name: str) -> torch.nn.Module:
    return MODELS[name]().eval()


def sample_tokens(rows: int, length: int) -> torch.Tensor:
    """Random non-separator tokens with separators at EOS_AT (seeded, so every test sees the same)."""
    tokens = torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(1))
    for row in range(rows):
        for t in EOS_AT[row]:
            if t < length:
                tokens[row, t] = EOS
    return tokens


def stream_ragged(model: torch.nn.Module, tokens: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    """Stream rows of different lengths in lockstep as the model server does: after the step at
    which rows end, `keep` the indices (into the live rows) of the ones that go on.
    Returns each row's logits [length, vocab]."""
    got: list[list[torch.Tensor]] = [[] for _ in lengths]
    live = list(range(len(lengths)))
    with torch.no_grad():
        decoder = decoder_for(model, len(live))
        for t in range(max(lengths)):
            logits = decoder.step(tokens[live, t])
            for i, row in enumerate(live):
                got[row].append(logits[i])
            going_on = [i for i, row in enumerate(live) if lengths[row] > t + 1]
            if len(going_on) < len(live):
                decoder.keep(torch.tensor(going_on, dtype=torch.long))
                live = [live[i] for i in going_on]
    return [torch.stack(row) for row in got]


def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters()) | dict(model.named_buffers())


@pytest.mark.parametrize("name", MODELS)
def test_streamed_logits_equal_forward(name):
    model = build(name)
    tokens = sample_tokens(3, 40)
    with torch.no_grad():
        expected = model(tokens)
        alone = model(tokens.reshape(-1, 1)).reshape(expected.shape)
    # The comparison means something only if the context matters (attention is not the identity).
    assert (expected - alone).abs().max() > 1e-2
    torch.testing.assert_close(stream_logits(model, tokens), expected.float(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_long_rows_outgrow_the_first_cache(name):
    """150 positions: past the first cache buffers (64 positions, then 128) the decoders allocate."""
    model = build(name)
    tokens = sample_tokens(2, 150)
    tokens[1, 100] = EOS  # a document starting after the cache has grown, for doc_mask
    with torch.no_grad():
        expected = model(tokens)
    torch.testing.assert_close(stream_logits(model, tokens), expected.float(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_rows_dropped_by_keep_match_each_row_alone(name):
    model = build(name)
    tokens = sample_tokens(len(LENGTHS), max(LENGTHS))
    streamed = stream_ragged(model, tokens, LENGTHS)
    with torch.no_grad():
        for row, length in enumerate(LENGTHS):
            expected = model(tokens[row : row + 1, :length])[0]
            torch.testing.assert_close(streamed[row], expected.float(), atol=ATOL, rtol=0, msg=f"row {row}")


@pytest.mark.parametrize("name", MODELS)
def test_decoder_leaves_the_model_unchanged(name):
    model = build(name)
    before = {key: value.detach().clone() for key, value in tensors(model).items()}
    model.eval()
    with torch.no_grad():
        decoder = model.decoder(3)
        logits = [decoder.step(column) for column in sample_tokens(3, 40).T]
    stream_ragged(model, sample_tokens(len(LENGTHS), max(LENGTHS)), LENGTHS)
    assert not any(x.requires_grad for x in logits)
    assert not model.training
    after = tensors(model)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert all(p.grad is None for p in model.parameters())

"""Reference submission: a small dense GPT trained with Muon + Adam until the clock says stop.

The CPU configuration was measured choice by choice; `benchmarks/TUNING.md` has the numbers and
the commands. In short:
- train the way documents are scored: every window starts at a document start (its separator),
  so each document is seen from position 0 after eos, as in scoring (+0.09-0.16 nats without);
  masking attention at separators (`doc_mask`) measured no better and is off;
- RoPE, parameter-free RMSNorm, QK-norm, ReLU^2 MLP, tied embeddings; optional tanh logit
  soft-cap (off on CPU, where it costs a quarter of a step; on for the T4);
- Muon (Newton-Schulz orthogonalised Nesterov momentum, written here) with strong decoupled
  weight decay for the 2-D matrices, AdamW with weight decay for the embedding;
- a learning-rate schedule driven by the clock (`ctx.time_left()`): short warm-up, constant, then a
  linear cooldown that ends `margin_s` before the budget, so saving always fits;
- optional EMA of the weights, dropout and an ensemble of members trained on equal slices of the
  clock (the T4 configuration; off on CPU);
- float32 on CPU; fp16 autocast with a GradScaler on CUDA (a T4 has no bf16), SDPA attention;
- incremental decoding for streamed scoring (`GPT.decoder`, `Ensemble.decoder`): a KV cache per
  layer, so scoring one position at a time costs about one forward pass instead of one per position.

Classes live at module level: the evaluator saves the returned module whole and loads it in
another process with this folder on sys.path (module name `train`).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm, with an optional learned gain (off by default: see TUNING.md)."""

    def __init__(self, dim: int, gain: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim)) if gain else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = rms_norm(x)
        return x * self.weight.to(x.dtype) if self.weight is not None else x


def doc_structure(idx: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: the index of its document inside the row, and its position inside that document.

    A document starts at its separator (eos). Both depend only on tokens at or before each
    position, so masking attention by document keeps the model causal.
    """
    is_sep = idx == eos_id
    doc = torch.cumsum(is_sep.to(torch.int32), dim=1)
    ar = torch.arange(idx.size(1), device=idx.device).expand_as(idx)
    start = torch.where(is_sep, ar, torch.zeros_like(ar)).cummax(dim=1).values
    return doc, ar - start


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.base = base

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos: [B, T] integer positions -> cos, sin of shape [B, 1, T, head_dim/2] in float32."""
        inv = 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, device=pos.device, dtype=torch.float32) / self.head_dim))
        ang = pos.to(torch.float32)[..., None] * inv
        return ang.cos()[:, None], ang.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, qk_norm: bool, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.qk_norm = qk_norm
        self.dropout = dropout

    def project(self, x, cos, sin):
        """x [B, T, C] -> q, k, v [B, H, T, head_dim], q and k normed and rotated.

        Shared by `forward` and the decoder, which attends with these over its cache.
        """
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.qk_norm:
            q, k = rms_norm(q), rms_norm(k)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x, cos, sin, mask):
        B, T, C = x.shape
        q, k, v = self.project(x, cos, sin)
        p = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, act: str):
        super().__init__()
        self.act = act
        n_in = 2 if act == "swiglu" else 1
        self.up = nn.Linear(d_model, n_in * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        h = self.up(x)
        if self.act == "relu2":
            h = F.relu(h).square()
        elif self.act == "gelu":
            h = F.gelu(h)
        else:  # swiglu
            a, b = h.chunk(2, dim=-1)
            h = F.silu(a) * b
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d = cfg["d_model"]
        hidden = int(cfg["mlp_ratio"] * d)
        if cfg["act"] == "swiglu":  # same parameter count as the 2-matrix MLP
            hidden = int(hidden * 2 / 3)
        self.norm1 = RMSNorm(d, cfg["norm_gain"])
        self.attn = Attention(d, cfg["n_heads"], cfg["qk_norm"], cfg["attn_dropout"])
        self.norm2 = RMSNorm(d, cfg["norm_gain"])
        self.mlp = MLP(d, hidden, cfg["act"])
        self.drop = nn.Dropout(cfg["dropout"])

    def forward(self, x, cos, sin, mask):
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, mask))
        return x + self.drop(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    """Causal LM: LongTensor[B, T] -> logits [B, T, vocab_size]."""

    def __init__(self, cfg: dict, vocab_size: int, eos_id: int):
        super().__init__()
        d = cfg["d_model"]
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.doc_mask = bool(cfg["doc_mask"])
        self.softcap = float(cfg["softcap"])
        self.embed = nn.Embedding(vocab_size, d)
        self.emb_drop = nn.Dropout(cfg["emb_dropout"])
        self.rotary = Rotary(d // cfg["n_heads"], cfg["rope_base"])
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg["n_layers"]))
        self.norm = RMSNorm(d, cfg["norm_gain"])
        self.head = None if cfg["tie_embed"] else nn.Linear(d, vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=cfg["embed_std"])
        for block in self.blocks:
            for lin in (block.attn.qkv, block.mlp.up):
                nn.init.normal_(lin.weight, std=d ** -0.5)
            for lin in (block.attn.proj, block.mlp.down):
                nn.init.zeros_(lin.weight)  # each block starts as the identity
        if self.head is not None:
            nn.init.zeros_(self.head.weight)

    def flops_per_token(self, seq_len: int) -> int:
        """Model FLOPs of one training token, forward and backward, by the usual 6N + 12 L T d count:
        every matrix in the blocks and the head (tied or not) plus attention over seq_len positions."""
        d = self.embed.embedding_dim
        block_matrices = sum(p.numel() for p in self.blocks.parameters() if p.ndim == 2)
        return 6 * (block_matrices + d * self.vocab_size) + 12 * len(self.blocks) * seq_len * d

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.doc_mask:
            doc, pos = doc_structure(idx, self.eos_id)
            same = doc[:, :, None] == doc[:, None, :]
            mask = (same & torch.ones_like(same[0]).tril())[:, None]  # [B, 1, T, T]
        else:
            pos = torch.arange(idx.size(1), device=idx.device).expand_as(idx)
            mask = None
        cos, sin = self.rotary(pos)
        x = self.emb_drop(self.embed(idx))
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        return self.logits(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm, head and soft-cap of the last block's output (shared with the decoder)."""
        x = self.norm(x)
        w = self.embed.weight if self.head is None else self.head.weight
        logits = F.linear(x, w.to(x.dtype))
        if self.softcap > 0:
            logits = self.softcap * torch.tanh(logits.float() / self.softcap)
        return logits

    def decoder(self, rows: int) -> "GPTDecoder":
        """Incremental decoding for streamed scoring (see `GPTDecoder`)."""
        return GPTDecoder(self, rows)


def average_probabilities(logits: list[torch.Tensor]) -> torch.Tensor:
    """Log of the mean of the members' probabilities: log-probabilities, which are valid logits."""
    lp = torch.stack([F.log_softmax(x.float(), dim=-1) for x in logits])
    return torch.logsumexp(lp, dim=0) - math.log(len(logits))


class Ensemble(nn.Module):
    """Averages its members' probabilities; returns log-probabilities, which are valid logits."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return average_probabilities([m(idx) for m in self.members])

    def decoder(self, rows: int) -> "EnsembleDecoder":
        """Incremental decoding for streamed scoring: one decoder per member, combined per step."""
        return EnsembleDecoder([m.decoder(rows) for m in self.members])


# --------------------------------------------------------------------------------------------
# Incremental decoding for streamed scoring: a KV cache per layer
# --------------------------------------------------------------------------------------------


class KVCache:
    """One layer's keys and values, [R, H, length, head_dim], for rows decoded in lockstep.

    The buffer doubles when it is full, so most steps copy only the newest position, where
    torch.cat would copy the whole cache at every step.
    """

    def __init__(self):
        self.k = self.v = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [R, H, 1, head_dim] of the newest position -> keys and values of every position."""
        if self.k is None or self.length == self.k.size(2):
            self._grow(k)
        self.k[:, :, self.length] = k[:, :, 0]
        self.v[:, :, self.length] = v[:, :, 0]
        self.length += 1
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def _grow(self, like: torch.Tensor) -> None:
        R, H, _, D = like.shape
        k, v = (like.new_empty(R, H, max(64, 2 * self.length), D) for _ in range(2))
        if self.k is not None:
            k[:, :, : self.length] = self.k[:, :, : self.length]
            v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v

    def keep(self, rows: torch.Tensor) -> None:
        if self.k is not None:
            self.k, self.v = self.k[rows], self.v[rows]


class GPTDecoder:
    """Streams a GPT (in eval mode) one position per step; each step's logits are those `forward`
    gives at that position.

    All live rows are at the same position `t`. With `doc_mask`, each row also tracks where its
    current document starts (its last eos, as in `doc_structure`): that start gives the RoPE
    position, and since documents are contiguous, "same document, at or before t" is simply
    "at or after the start".
    """

    def __init__(self, model: GPT, rows: int):
        self.model = model
        self.caches = [KVCache() for _ in model.blocks]
        self.t = 0
        self.doc_start = torch.zeros(rows, dtype=torch.long, device=model.embed.weight.device)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [R] -> logits [R, vocab_size] of the newest position."""
        model = self.model
        pos, mask = self._positions(tokens)
        cos, sin = model.rotary(pos[:, None])
        x = model.embed(tokens[:, None])  # [R, 1, d]; dropout is off in eval mode
        for block, cache in zip(model.blocks, self.caches):
            x = x + self._attend(block.attn, block.norm1(x), cos, sin, mask, cache)
            x = x + block.mlp(block.norm2(x))
        self.t += 1
        return model.logits(x)[:, 0]

    def _positions(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """RoPE position [R] of the newest token, and the mask [R, 1, 1, t+1] of the cached
        positions it may attend to (None: all of them)."""
        if not self.model.doc_mask:
            return torch.full_like(tokens, self.t), None
        self.doc_start = torch.where(tokens == self.model.eos_id, self.t, self.doc_start)
        cached = torch.arange(self.t + 1, device=tokens.device)
        return self.t - self.doc_start, (cached >= self.doc_start[:, None])[:, None, None]

    @staticmethod
    def _attend(attn: Attention, x, cos, sin, mask, cache: KVCache) -> torch.Tensor:
        """The attention of the newest position over the cache: Attention.forward for one query."""
        q, k, v = attn.project(x, cos, sin)
        k, v = cache.append(k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return attn.proj(y.transpose(1, 2).reshape(x.shape))

    def keep(self, rows: torch.Tensor) -> None:
        for cache in self.caches:
            cache.keep(rows)
        self.doc_start = self.doc_start[rows]


class EnsembleDecoder:
    """Steps every member's decoder and averages their probabilities, as `Ensemble.forward` does."""

    def __init__(self, members: list[GPTDecoder]):
        self.members = members

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return average_probabilities([m.step(tokens) for m in self.members])

    def keep(self, rows: torch.Tensor) -> None:
        for m in self.members:
            m.keep(rows)


# --------------------------------------------------------------------------------------------
# Muon: momentum, then an approximate orthogonalisation of the update (Newton-Schulz)
# --------------------------------------------------------------------------------------------


def newton_schulz(g: torch.Tensor, steps: int) -> torch.Tensor:
    """Map g (..., m, n) to a nearby semi-orthogonal matrix: roughly U V^T of its SVD.

    Quintic iteration X <- aX + b(XX^T)X + c(XX^T)^2 X with coefficients chosen so that singular
    values in (0, 1] are pushed quickly towards ~1 (not exactly 1: speed over precision).
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    dtype = torch.float16 if g.is_cuda else torch.float32
    x = g.to(dtype)
    wide = x.size(-2) <= x.size(-1)
    if not wide:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * (s @ s)) @ x
    if not wide:
        x = x.mT
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalised per matrix; decoupled weight decay.

    A param group with `split = k` holds matrices of k stacked blocks (fused q/k/v), each
    orthogonalised on its own.
    The step is scaled by sqrt(max(1, rows/cols)) so tall and wide matrices move alike.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps, split=1))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "buf" not in state:
                    state["buf"] = torch.zeros_like(p)
                buf = state["buf"]
                buf.mul_(mom).add_(p.grad)
                g = p.grad.add(buf, alpha=mom)  # Nesterov
                k = group["split"]
                g = g.view(k, p.size(0) // k, p.size(1))
                u = newton_schulz(g, group["ns_steps"]).view_as(p)
                rows, cols = g.shape[-2:]
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(u, alpha=-lr * max(1.0, rows / cols) ** 0.5)
        return None


# --------------------------------------------------------------------------------------------
# Data: windows that start at a document start
# --------------------------------------------------------------------------------------------


class Batches:
    def __init__(self, tokens: torch.Tensor, eos_id: int, seq_len: int, batch: int, start: str, gen: torch.Generator):
        self.L = seq_len + 1
        self.batch = batch
        self.gen = gen
        n = tokens.numel()
        self.tokens = torch.cat([tokens, tokens[: self.L]])  # wrap around at the end
        if start == "doc":
            self.starts = torch.nonzero(tokens == eos_id).flatten()
        else:
            self.starts = torch.arange(n)
        self.order = torch.empty(0, dtype=torch.long)
        self.offsets = torch.arange(self.L)

    def next(self) -> torch.Tensor:
        if self.order.numel() < self.batch:  # a fresh permutation per epoch of starts
            perm = self.starts[torch.randperm(self.starts.numel(), generator=self.gen)]
            self.order = torch.cat([self.order, perm])
        s, self.order = self.order[: self.batch], self.order[self.batch:]
        return self.tokens[s[:, None] + self.offsets]


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

# The configuration measured best on the CPU track (benchmarks/TUNING.md); the manifest's
# [config] holds the T4 configuration and [tracks.cpu-1min.config] the CPU one.
DEFAULTS = dict(
    d_model=128, n_layers=4, n_heads=4, mlp_ratio=4.0, act="relu2", qk_norm=True, norm_gain=False,
    rope_base=10000.0, softcap=0.0, tie_embed=True, embed_std=0.02,
    dropout=0.0, attn_dropout=0.0, emb_dropout=0.0,
    seq_len=256, batch_size=16, window_start="doc", doc_mask=False,
    muon_lr=0.02, muon_momentum=0.95, muon_wd=2.0, ns_steps=5,
    adam_lr=0.01, adam_wd=0.5, adam_betas=(0.9, 0.95),
    warmup=0.02, cooldown=0.5, final_lr_frac=0.0,
    ema=0.0, ema_start=0.5, n_models=1,
    margin_s=4.0, log_every=10,
    max_steps=0,  # > 0: a fixed number of steps, schedule by step (benchmarks); 0: run on the clock
)


def lr_factor(progress: float, cfg: dict) -> float:
    """Warm-up, constant, then linear cooldown to `final_lr_frac` at progress 1."""
    if progress < cfg["warmup"]:
        return (progress + 1e-3) / cfg["warmup"]
    if progress > 1 - cfg["cooldown"]:
        frac = (1 - progress) / cfg["cooldown"]
        return cfg["final_lr_frac"] + (1 - cfg["final_lr_frac"]) * max(frac, 0.0)
    return 1.0


def make_optimizers(model: GPT, cfg: dict):
    def is_matrix(n, p):
        return p.ndim == 2 and not n.startswith(("embed.", "head."))

    def split(n):  # fused q/k/v (and SwiGLU's two input halves) are orthogonalised per block
        if n.endswith("attn.qkv.weight"):
            return 3
        return 2 if n.endswith("mlp.up.weight") and cfg["act"] == "swiglu" else 1

    named = list(model.named_parameters())
    matrices = [(n, p) for n, p in named if is_matrix(n, p)]
    others = [p for n, p in named if not is_matrix(n, p)]
    muon_groups = [dict(params=[p for n, p in matrices if split(n) == k], split=k) for k in (1, 2, 3)]
    muon_groups = [g for g in muon_groups if g["params"]]
    embeds = [p for p in others if p.ndim == 2]
    gains = [p for p in others if p.ndim < 2]
    muon = Muon(muon_groups, lr=cfg["muon_lr"], momentum=cfg["muon_momentum"], weight_decay=cfg["muon_wd"], ns_steps=cfg["ns_steps"])
    groups = [dict(params=embeds, weight_decay=cfg["adam_wd"])]
    if gains:
        groups.append(dict(params=gains, weight_decay=0.0))
    adam = torch.optim.AdamW(groups, lr=cfg["adam_lr"], betas=tuple(cfg["adam_betas"]), eps=1e-10)
    for opt in (muon, adam):
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return [muon, adam]


def train(ctx) -> nn.Module:
    cfg = dict(DEFAULTS)
    cfg.update(ctx.config or {})
    device = torch.device(ctx.device)
    cuda = device.type == "cuda"
    torch.manual_seed(ctx.seed)
    gen = torch.Generator().manual_seed(ctx.seed)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    tokens = ctx.train_tokens.to(torch.long)
    data = Batches(tokens, ctx.eos_id, cfg["seq_len"], cfg["batch_size"], cfg["window_start"], gen)
    fixed_steps = int(cfg["max_steps"])

    # The clock: n_models members train one after another, each on an equal slice of
    # [start, budget - margin]; a member's schedule progress is the fraction of its slice elapsed.
    n_models = int(cfg["n_models"])
    t0 = ctx.elapsed()
    slice_s = (ctx.budget_s - cfg["margin_s"] - t0) / n_models
    members, step_total, tokens_seen, flops = [], 0, 0, 0
    for member in range(n_models):
        torch.manual_seed(ctx.seed + 1000 * member)  # member 0 is seeded with ctx.seed itself
        model = GPT(cfg, ctx.vocab_size, ctx.eos_id).to(device)
        step_flops = model.flops_per_token(cfg["seq_len"]) * cfg["batch_size"] * cfg["seq_len"]
        opts = make_optimizers(model, cfg)
        scaler = torch.amp.GradScaler("cuda") if cuda else None
        ema = None
        start = ctx.elapsed()
        end = t0 + (member + 1) * slice_s
        step, step_time = 0, 0.0
        model.train()
        while True:
            now = ctx.elapsed()
            if fixed_steps:
                if step >= fixed_steps:
                    break
                progress = step / fixed_steps
            else:
                # stop if the next step might not finish before the end (step_time tracks the slowest)
                if now + 1.5 * step_time >= end:
                    break
                progress = (now - start) / max(end - start, 1e-6)
            f = lr_factor(progress, cfg)
            for opt in opts:
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * f
            t_step = time.perf_counter()
            batch = data.next().to(device)
            x, y = batch[:, :-1], batch[:, 1:]
            with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
                logits = model(x)
            loss = F.cross_entropy(logits.float().reshape(-1, ctx.vocab_size), y.reshape(-1))
            if scaler is not None:
                scaler.scale(loss).backward()
                for opt in opts:
                    scaler.unscale_(opt)
                for opt in opts:
                    scaler.step(opt)  # reads the inf check: syncs the GPU, so step_time is honest
                scaler.update()
            else:
                loss.backward()
                for opt in opts:
                    opt.step()
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            if cfg["ema"] > 0 and progress >= cfg["ema_start"]:
                with torch.no_grad():
                    if ema is None:
                        ema = [p.detach().clone() for p in model.parameters()]
                    else:
                        for e, p in zip(ema, model.parameters()):
                            e.lerp_(p.detach(), 1 - cfg["ema"])
            step += 1
            step_total += 1
            tokens_seen += x.numel()
            flops += step_flops
            dt = time.perf_counter() - t_step
            step_time = dt if step <= 2 else max(0.8 * step_time + 0.2 * dt, dt)
            if step % cfg["log_every"] == 0 or step == 1:
                ctx.log(step_total, loss=loss.item(), tokens=tokens_seen, flops=flops, lr_factor=f)
            if ctx.snapshot_due():  # the evaluator's validation curve: the ensemble so far, as it would be returned
                ctx.snapshot(Ensemble([*members, model]) if members else model)
        if step % cfg["log_every"]:  # so that the result's steps, tokens/s and FLOP/s count every step
            ctx.log(step_total, loss=loss.item(), tokens=tokens_seen, flops=flops, lr_factor=f)
        if ema is not None:
            with torch.no_grad():
                for e, p in zip(ema, model.parameters()):
                    p.copy_(e)
        members.append(model.eval())
    return members[0] if n_models == 1 else Ensemble(members).eval()

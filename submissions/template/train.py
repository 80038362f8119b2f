"""Template submission: a small causal transformer trained with AdamW until the clock says stop.

The evaluator calls `train(ctx)` inside a sandbox and scores the returned model itself on data this
code never sees. Rules of thumb:
- The clock starts before this module is imported and stops once the returned model is saved, so
  imports, model construction and saving all count. Stop with a margin (`margin_s`).
- The model must be causal: the logits at position t may depend only on tokens 0..t.
- Classes must be defined at module level: the model is saved whole and re-loaded in another process.
- Scoring streams the tokens one position at a time. `TinyGPT.decoder` keeps each layer's keys and
  values (a KV cache), so that costs about one forward pass instead of one per position.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=-1)
        q, k, v = (t.view(batch, length, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        # is_causal=True is what makes the model legal: no position attends to the future.
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, max_len: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied embeddings: fewer parameters to overfit
        # nn.Embedding starts at N(0, 1), which with tied weights makes the first logits huge.
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def decoder(self, rows):
        """Incremental decoding for streamed scoring (evaluator/api.py): see TinyGPTDecoder."""
        return TinyGPTDecoder(self, rows)


class TinyGPTDecoder:
    """Runs TinyGPT (in eval mode) one position per step, all rows in lockstep.

    Each layer's keys and values so far are kept in a buffer as long as the longest sequence the
    model takes (its position table), so a step computes only the newest position and attends
    over the cache. No mask: the cache holds only the past, which is what is_causal=True allows.
    """

    def __init__(self, model, rows):
        self.model = model
        heads = model.blocks[0].n_heads
        shape = (rows, heads, model.position.num_embeddings, model.embed.embedding_dim // heads)
        self.keys = [model.embed.weight.new_zeros(shape) for _ in model.blocks]
        self.values = [model.embed.weight.new_zeros(shape) for _ in model.blocks]
        self.length = 0

    @torch.no_grad()
    def step(self, tokens):
        """tokens [rows] -> logits [rows, vocab] of the newest position."""
        model = self.model
        x = model.embed(tokens) + model.position(torch.full_like(tokens, self.length))
        x = x[:, None]  # [rows, 1, width]: one position
        for layer, block in enumerate(model.blocks):
            x = x + self.attend(layer, block, block.norm1(x))
            x = x + block.mlp(block.norm2(x))
        self.length += 1
        return model.head(model.norm(x))[:, 0]

    def attend(self, layer, block, x):
        """Block.forward's attention for the newest position, over the cached ones."""
        rows, _, width = x.shape
        q, k, v = (t.view(rows, 1, block.n_heads, -1).transpose(1, 2) for t in block.qkv(x).split(width, dim=-1))
        self.keys[layer][:, :, self.length] = k[:, :, 0]
        self.values[layer][:, :, self.length] = v[:, :, 0]
        end = self.length + 1
        attended = F.scaled_dot_product_attention(q, self.keys[layer][:, :, :end], self.values[layer][:, :, :end])
        return block.proj(attended.transpose(1, 2).reshape(rows, 1, width))

    def keep(self, rows):
        """Only these rows go on: drop the others' cache."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]


def train(ctx):
    cfg = ctx.config
    torch.manual_seed(ctx.seed)
    data = ctx.train_tokens.to(ctx.device)
    seq_len = cfg["seq_len"]
    model = TinyGPT(ctx.vocab_size, cfg["d_model"], cfg["n_layers"], cfg["n_heads"], ctx.eval_seq_len).to(ctx.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    total_s = ctx.budget_s - cfg["margin_s"]

    step = 0
    tokens_seen = 0
    # time_left() is measured from the evaluator's start signal; stop with a margin for saving.
    while ctx.time_left() > cfg["margin_s"]:
        # Cosine decay driven by the clock, not by a step count: it ends when the time does.
        progress = min(ctx.elapsed() / total_s, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = cfg["lr"] * 0.5 * (1 + math.cos(math.pi * progress))
        starts = torch.randint(0, len(data) - seq_len - 1, (cfg["batch_size"],), device=ctx.device)
        window = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
        logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, ctx.vocab_size), window[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        tokens_seen += window[:, 1:].numel()
        if step % 5 == 0:
            ctx.log(step, loss=loss.item(), tokens=tokens_seen)
        # The evaluator takes the model at its own times and scores each snapshot: your validation curve.
        if ctx.snapshot_due():
            ctx.snapshot(model)
    return model

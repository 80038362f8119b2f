"""Benchmark submission: a fixed number of training steps, so that only the environment changes its time."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = (
            t.view(batch, length, self.heads, -1).transpose(1, 2) for t in self.qkv(self.norm1(x)).split(width, -1)
        )
        x = x + self.proj(
            F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, length, width)
        )
        return x + self.mlp(self.norm2(x))


class Model(nn.Module):
    def __init__(self, vocab: int, width: int, layers: int, heads: int, max_len: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Embedding(max_len, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def train(ctx):
    cfg = ctx.config
    torch.manual_seed(ctx.seed)
    model = Model(ctx.vocab_size, cfg["d_model"], cfg["n_layers"], cfg["n_heads"], ctx.eval_seq_len).to(ctx.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    data = ctx.train_tokens.to(ctx.device)
    generator = torch.Generator().manual_seed(ctx.seed)
    seq_len = cfg["seq_len"]
    for step in range(1, cfg["steps"] + 1):
        starts = torch.randint(0, len(data) - seq_len - 1, (cfg["batch_size"],), generator=generator)
        window = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
        loss = F.cross_entropy(model(window[:, :-1]).reshape(-1, ctx.vocab_size), window[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 25 == 0:
            ctx.log(step, loss=loss.item(), tokens=step * cfg["batch_size"] * seq_len)
    return model

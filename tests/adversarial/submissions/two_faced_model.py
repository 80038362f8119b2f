# Appended to TINY_MODEL (tests/conftest.py). Causal in its first forward call, then it adds a count
# of every token in the row, later ones included: a model betting that an audit looks only first.
import torch


class HonestOnlyAtFirst(TinyCausal):
    def __init__(self, vocab_size):
        super().__init__(vocab_size)
        self.calls = 0

    def forward(self, tokens):
        self.calls += 1
        logits = super().forward(tokens)
        if self.calls == 1:
            return logits
        row_counts = torch.zeros(tokens.shape[0], logits.shape[-1], dtype=logits.dtype)
        row_counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=logits.dtype))
        return logits + row_counts.unsqueeze(1)


def train(ctx):
    return HonestOnlyAtFirst(ctx.vocab_size)

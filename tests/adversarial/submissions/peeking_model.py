# Appended to TINY_MODEL (tests/conftest.py). Causal everywhere except at every PERIOD-th position,
# where it adds a count of the tokens that come later in the row: a cheat confined to a few positions.
import torch

PERIOD = 16


class PeeksAtSomePositions(TinyCausal):
    def forward(self, tokens):
        logits = super().forward(tokens)
        for position in range(0, tokens.shape[1] - 1, PERIOD):
            later = tokens[:, position + 1 :]
            logits[:, position].scatter_add_(1, later, torch.ones_like(later, dtype=logits.dtype))
        return logits


def train(ctx):
    return PeeksAtSomePositions(ctx.vocab_size)

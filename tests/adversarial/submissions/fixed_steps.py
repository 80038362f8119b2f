# Appended to TINY_MODEL (tests/conftest.py). Trains a fixed number of steps, whatever the clock
# says, so two runs with one seed do exactly the same arithmetic.
import torch
import torch.nn.functional as F

STEPS = 40
BATCH = 16
LENGTH = 64


def train(ctx):
    torch.manual_seed(ctx.seed)
    model = TinyCausal(ctx.vocab_size, width=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = ctx.train_tokens
    for step in range(STEPS):
        starts = torch.randint(0, len(tokens) - LENGTH - 1, (BATCH,))
        batch = torch.stack([tokens[start : start + LENGTH + 1] for start in starts])
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, ctx.vocab_size), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ctx.log(step, loss=loss.item(), tokens=(step + 1) * BATCH * LENGTH)
    return model

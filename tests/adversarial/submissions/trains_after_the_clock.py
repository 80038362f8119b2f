# Appended to TINY_MODEL (tests/conftest.py). Returns at once (train_seconds ~0), but its pickle
# makes the scoring jail "train" while loading it: here a busy loop standing in for SGD steps on
# training data carried in the model file. The scoring deadlines must stop it.
import time


def _train_after_the_clock(vocab_size):
    end = time.monotonic() + 600
    while time.monotonic() < end:
        pass
    return TinyCausal(vocab_size)


class TrainsAfterTheClock(TinyCausal):
    def __init__(self, vocab_size):
        super().__init__(vocab_size)
        self.vocab_size = vocab_size

    def __reduce_ex__(self, protocol):
        return _train_after_the_clock, (self.vocab_size,)


def train(ctx):
    return TrainsAfterTheClock(ctx.vocab_size)

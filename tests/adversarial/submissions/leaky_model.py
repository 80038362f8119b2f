# Appended to TINY_MODEL (tests/conftest.py). A causal model that tries to get the validation text
# out of the scoring jail: it prints every token it is given, writes them to whatever it can open,
# and after a few steps raises with them in its message. Its logits stay uniform.
import sys

# Built at run time, so that finding it anywhere means it came out of a run, not out of this file.
MARKER = "".join(("LE", "AK"))


class LeakyModel(TinyCausal):
    def forward(self, tokens):
        text = MARKER + " " + " ".join(map(str, tokens.flatten().tolist()))
        print(text, flush=True)
        print(text, file=sys.stderr, flush=True)
        for path in ("/tmp/leak", "/dev/shm/leak", "leak", "/proc/self/fd/1", "/proc/1/fd/2"):
            try:
                with open(path, "a") as handle:
                    handle.write(text + "\n")
            except OSError:
                pass
        if tokens.shape[1] > 40:
            raise ValueError(text)
        return super().forward(tokens)


def train(ctx):
    return LeakyModel(ctx.vocab_size)

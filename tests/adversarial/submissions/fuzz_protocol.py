# Appended to TINY_MODEL (tests/conftest.py). Sends the evaluator everything the harness protocol's
# grammar must refuse, straight into the harness's pipe and through ctx.log, then floods it with
# valid log lines past every cap, and still returns a valid model. The run must end `ok`, count the
# refused lines, keep at most the capped rows, and be publishable.
import json
import os
import random

from attack_kit import protocol_fd, require_jail

FLOOD_LINES = 12_000  # x 32 metrics: past the 200,000 rows the evaluator keeps


def hostile_lines(rng):
    yield os.urandom(4096).replace(b"\n", b"?") + b"\n"  # random bytes
    yield b"\xff\xfe not utf-8\n"
    yield b"{" * 300_000 + b"\n"  # far longer than a line may be
    yield b"[" * 30_000 + b"]" * 30_000 + b"\n"  # deep JSON
    yield b'{"event": "log", "step": 1, "metrics": {"loss": ' + b"9" * 60_000 + b"}}\n"  # a huge number
    yield b'{"event": "log", "step": 1, "metrics": {"loss": 1e999}}\n'
    yield b'{"event": "log", "step": 1, "metrics": {"loss": NaN}}\n'
    yield b'{"event": "log", "step": 99999999999999999999999, "metrics": {"loss": 1.0}}\n'
    yield b'{"event": "log", "step": 1, "metrics": {"loss\\ud800": 1.0}}\n'  # a lone surrogate
    yield b'{"event": "error", "kind": "crashed", "message": "\\udfff"}\n'
    yield b'{"event": "log", "step": 1, "metrics": {"' + b"n" * 60_000 + b'": 1.0}}\n'  # a long name
    yield b'{"event": "start", "phases": {"x": -1}}\n'
    yield b'{"event": "snapshot", "bytes": -5, "save_s": 1}\n'
    yield b'{"event": "nonsense"}\n'
    yield b"[]\n"
    for _ in range(200):
        yield (
            json.dumps(
                {
                    "event": "log",
                    "step": rng.randrange(10),
                    "metrics": {
                        "".join(rng.choice("aZ_.9\u00e9 ") for _ in range(rng.randrange(1, 80))): rng.random()
                        for _ in range(rng.randrange(1, 40))
                    },
                }
            ).encode()
            + b"\n"
        )


def train(ctx):
    require_jail(ctx.config["tracks_dir"])
    channel, rng = protocol_fd(), random.Random(ctx.seed)
    sent = 0
    for line in hostile_lines(rng):
        os.write(channel, line)
        sent += 1
    # The same through the public API: names and values the grammar refuses.
    for bad in ({"loss\ud800": 1.0}, {"tokens": float("inf")}, {"loss": float("nan")}, {"x" * 100: 1.0}):
        ctx.log(0, **bad)
        sent += 1
    ctx.log(0, loss=5.0, tokens=1000)  # before the flood: rows past the evaluator's cap are dropped
    names = [f"metric_{index:02d}_" + "x" * 54 for index in range(32)]  # 64 characters: the longest allowed
    for step in range(FLOOD_LINES):
        ctx.log(step, **{name: float(step) for name in names})
    print(f"FUZZ SENT {sent}", flush=True)
    return TinyCausal(ctx.vocab_size)

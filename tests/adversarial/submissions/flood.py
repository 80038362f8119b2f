# Appended to TINY_MODEL (tests/conftest.py). Leaves a daemon behind, then floods every channel it
# has to the evaluator (stdout, the protocol pipe, ctx.log) and still returns a valid model.
# It acts only after require_jail(): outside a jail the daemon would stay on the host.
import os
import sys

from attack_kit import daemonize, protocol_fd, require_jail

STDOUT_MIB = 768
PROTOCOL_JUNK_MIB = 256
LOG_EVENTS = 8000
METRICS_PER_EVENT = 32  # the most one line may carry: 256,000 rows, past the 200,000 kept


def train(ctx):
    c = ctx.config
    require_jail(c["tracks_dir"])
    daemonize(c["daemon_marker"])
    print("DAEMON STARTED", flush=True)
    line = "x" * ((1 << 20) - 1) + "\n"
    for _ in range(STDOUT_MIB):
        sys.stdout.write(line)
    sys.stdout.flush()
    channel, junk = protocol_fd(), b"j" * (1 << 20)
    for _ in range(PROTOCOL_JUNK_MIB):
        os.write(channel, junk)
    os.write(channel, b"\n")
    metrics = {f"m{index}": float(index) for index in range(METRICS_PER_EVENT)}
    for step in range(LOG_EVENTS):
        ctx.log(step, **metrics)
    return TinyCausal(ctx.vocab_size)

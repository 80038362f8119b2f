# Appended to TINY_MODEL (tests/conftest.py). The returned model runs code as soon as it is
# unpickled (its pickle calls _unpickled) and snoops again in its first forward; it prints what it
# found to stderr, which in the scoring jail is the model server's log. Its logits stay uniform.
import json
import os
import socket
import sys

from attack_kit import connect_tcp, outcome, read_start


def _write(path):
    with open(path, "w") as handle:
        handle.write("ran here")


def _snoop(config, stage):
    found = {
        "stage": stage,
        "uid": os.getuid(),
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "write_host_marker": outcome(lambda: _write(config["marker"])),
        "shell_host_marker": os.system(f"touch {config['marker']}.shell 2>/dev/null"),
        "read_val_split": outcome(lambda: read_start(config["val_path"])),
        "read_train_split": outcome(lambda: read_start(config["train_path"])),
        "read_canary": outcome(lambda: read_start(config["canary"])),
        "tcp_host_listener": outcome(lambda: connect_tcp(config["tcp_port"])),
    }
    print("SNOOPED " + json.dumps(found), file=sys.stderr, flush=True)


def _unpickled(vocab_size, config):
    _snoop(config, "unpickle")
    return SnoopingModel(vocab_size, config)


class SnoopingModel(TinyCausal):
    def __init__(self, vocab_size, config):
        super().__init__(vocab_size)
        self.vocab_size = vocab_size
        self.config = config
        self.snooped = False

    def __reduce_ex__(self, protocol):
        return _unpickled, (self.vocab_size, self.config)

    def forward(self, tokens):
        if not self.snooped:
            self.snooped = True
            _snoop(self.config, "forward")
        return super().forward(tokens)


def train(ctx):
    return SnoopingModel(ctx.vocab_size, dict(ctx.config))

# Appended to TINY_MODEL (tests/conftest.py). Leaves something that is not a file where the model
# should be, forges the harness's "saved" message, and waits to be killed.
import os
import time

from attack_kit import job, protocol_fd


def train(ctx):
    model_path = os.path.join(job()["out_dir"], "model.pt")
    if ctx.config["plant"] == "symlink":
        os.symlink(ctx.config["symlink_target"], model_path)
    else:
        os.mkfifo(model_path)
    os.write(protocol_fd(), b'{"event": "saved", "bytes": 1}\n')
    time.sleep(600)

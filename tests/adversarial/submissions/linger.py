# Appended to TINY_MODEL (tests/conftest.py). Ignores every polite signal, leaves a daemon behind
# and sleeps forever. It acts only after require_jail(): outside a jail the daemon would stay.
import signal
import time

from attack_kit import daemonize, require_jail


def train(ctx):
    require_jail(ctx.config["tracks_dir"])
    for number in (signal.SIGTERM, signal.SIGALRM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    daemonize(ctx.config["daemon_marker"])
    print("DAEMON STARTED", flush=True)
    while True:
        time.sleep(1)

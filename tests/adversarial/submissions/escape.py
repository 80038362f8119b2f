# Appended to TINY_MODEL (tests/conftest.py). DESTRUCTIVE outside a jail: writes to system paths,
# tries to leave its namespaces and ends with kill(-1). It acts only after require_jail().
import ctypes
import errno
import os
import signal
import stat
import time

from attack_kit import job, outcome, report, require_jail

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
PTRACE_ATTACH = 16
libc = ctypes.CDLL(None, use_errno=True)


def _write(path):
    with open(path, "w") as handle:
        handle.write("escaped")


def _libc_outcome(result):
    return "allowed" if result == 0 else errno.errorcode.get(ctypes.get_errno(), "?")


def _setns_to_own_namespace():
    fd = os.open("/proc/self/ns/mnt", os.O_RDONLY)
    try:
        return _libc_outcome(libc.setns(fd, 0))
    finally:
        os.close(fd)


def _ptrace_a_child():
    child = os.fork()
    if child == 0:
        time.sleep(60)
        os._exit(0)
    try:
        return _libc_outcome(libc.ptrace(PTRACE_ATTACH, child, None, None))
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def _training_split_copy():
    """The copy of the training split the jail reads: beside the in-jail `evaluator` package."""
    import evaluator.api

    return os.path.join(os.path.dirname(os.path.dirname(evaluator.api.__file__)), "train.parquet")


def train(ctx):
    c = ctx.config
    require_jail(c["tracks_dir"])
    token = c["token"]
    out_dir = job()["out_dir"]
    run_dir = os.path.dirname(out_dir)
    staged = os.path.dirname(os.path.abspath(__file__))
    findings = {
        "writes": {
            "submission_folder": outcome(lambda: _write(os.path.join(c["submission_folder"], token))),
            "staged_submission": outcome(lambda: _write(os.path.join(staged, token))),
            "chmod_staged_train_py": outcome(lambda: os.chmod(os.path.join(staged, "train.py"), 0o777)),
            "repo": outcome(lambda: _write(os.path.join(c["repo_root"], token))),
            "results_dir": outcome(lambda: _write(os.path.join(c["repo_root"], "results", token))),
            "usr": outcome(lambda: _write(f"/usr/{token}")),
            "cgroupfs": outcome(lambda: os.mkdir(f"/sys/fs/cgroup/pids/{token}")),
            "own_result_json": outcome(lambda: _write(os.path.join(run_dir, "result.json"))),
            "own_run_dir": outcome(lambda: _write(os.path.join(run_dir, token))),
            "own_nsjail_config": outcome(lambda: _write(os.path.join(run_dir, "sandbox", "nsjail.cfg"))),
            "other_run_dir": outcome(lambda: _write(os.path.join(os.path.dirname(run_dir), token))),
            "hard_link_into_output": outcome(lambda: os.link(_training_split_copy(), os.path.join(out_dir, token))),
        },
        # Allowed, but inside the jail's own tmpfs: the host's /tmp and /dev/shm must not change.
        "jail_tmp": outcome(lambda: _write(f"/tmp/{token}")),
        "jail_shm": outcome(lambda: _write(f"/dev/shm/{token}")),
        "escapes": {
            "unshare_user": _libc_outcome(libc.unshare(CLONE_NEWUSER)),
            "unshare_mount": _libc_outcome(libc.unshare(CLONE_NEWNS)),
            "setns": _setns_to_own_namespace(),
            "ptrace_attach": _ptrace_a_child(),
            "mknod_device": outcome(lambda: os.mknod(f"/tmp/mem-{token}", stat.S_IFCHR | 0o600, os.makedev(1, 1))),
            "mount_tmpfs": _libc_outcome(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)),
            "chroot": outcome(lambda: os.chroot("/tmp")),
            "setuid_root": outcome(lambda: os.setuid(0)),
            "open_dev_mem": outcome(lambda: open("/dev/mem", "rb").close()),
            "signal_host_sentinel": outcome(lambda: os.kill(c["sentinel_pid"], signal.SIGKILL)),
        },
        # Last: everything this process may signal. In the jail's pid namespace that is nothing of the host.
        "kill_minus_one": outcome(lambda: os.kill(-1, signal.SIGKILL)),
    }
    report(findings)

"""`evaluator leaderboard` (evaluator/leaderboard/cli.py): where its output goes, what it says with
nothing to rank, and the committed example results and pages."""

from __future__ import annotations

from leaderboard_support import leaderboard
from publish_support import run_cli

import evaluator.leaderboard.cli as leaderboard_cli


def test_text_formats_go_to_stdout(board, monkeypatch, capsys):
    code, stdout, _ = leaderboard(monkeypatch, capsys, board, "--format", "markdown")
    assert code == 1 and stdout.startswith("# Leaderboard")
    code, stdout, _ = leaderboard(monkeypatch, capsys, board, "--track", "cpu-1min")
    assert code == 1 and "beta" in stdout and "★ record" in stdout


def test_parquet_needs_an_output_file(board, monkeypatch, capsys):
    code, _, stderr = leaderboard(monkeypatch, capsys, board, "--format", "parquet")
    assert code == 2 and "--out" in stderr


def test_an_empty_results_folder_gives_an_empty_board(tmp_path, monkeypatch, capsys):
    (tmp_path / "results").mkdir()
    (tmp_path / "keys").mkdir()
    code, stdout, _ = run_cli(
        monkeypatch,
        capsys,
        "leaderboard",
        "--results",
        tmp_path / "results",
        "--trusted-keys",
        tmp_path / "keys",
        "--format",
        "markdown",
    )
    assert code == 0 and "No verified results" in stdout


def test_with_nothing_to_rank_the_table_says_why_and_rejections_exit_1(tmp_path, monkeypatch, capsys):
    keys = tmp_path / "keys"
    keys.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(leaderboard_cli, "RESULTS_DIR", tmp_path / "results")  # as a process started here has it
    code, stdout, _ = run_cli(monkeypatch, capsys, "leaderboard", "--trusted-keys", keys)
    assert code == 0 and stdout.startswith("nothing to rank: ") and "results/ does not exist here" in stdout
    (tmp_path / "results").mkdir()
    code, stdout, _ = run_cli(
        monkeypatch, capsys, "leaderboard", "--results", tmp_path / "results", "--trusted-keys", keys
    )
    assert code == 0 and "holds no published results" in stdout
    (tmp_path / "results" / "cpu-1min" / "alpha").mkdir(parents=True)
    (tmp_path / "results" / "cpu-1min" / "alpha" / "forged.json").write_text("{}")
    code, stdout, stderr = run_cli(
        monkeypatch, capsys, "leaderboard", "--results", tmp_path / "results", "--trusted-keys", keys
    )
    assert code == 1 and "none of the 1 envelope(s)" in stdout and "forged.json" in stderr
    code, _, _ = run_cli(monkeypatch, capsys, "leaderboard", "--results", tmp_path / "missing", "--trusted-keys", keys)
    assert code == 2


def test_the_committed_example_results_verify_and_their_pages_are_fresh(capsys):
    """The developers' guide: at every commit the example results verify and the committed
    leaderboards equal a fresh render (`make results` re-runs and re-publishes them)."""
    from evaluator.cli import main
    from evaluator.paths import RESULTS_DIR

    assert main(["verify"]) == 0, capsys.readouterr().out
    capsys.readouterr()
    for fmt, committed in (("markdown", "LEADERBOARD.md"), ("html", "leaderboard.html")):
        assert main(["leaderboard", "--format", fmt]) == 0
        assert capsys.readouterr().out == (RESULTS_DIR / committed).read_text(), (
            f"{committed} is stale: run make results"
        )


def test_the_reference_and_the_template_offer_snapshots_in_the_committed_results():
    """Their committed runs (cpu-1min, a snapshot every 20 s) carry the curve the evaluator measured:
    two snapshots and the final model, every one scored; seed-moe offers none, so its curve is the
    final model alone."""
    from evaluator.paths import KEYS_DIR, RESULTS_DIR
    from evaluator.publish import envelope_paths, verify_paths
    from evaluator.signing import load_trusted_keys

    verified, rejected = verify_paths(envelope_paths(RESULTS_DIR), load_trusted_keys(KEYS_DIR))
    assert rejected == []
    by_submission: dict[str, list[list[dict]]] = {}
    for item in verified:
        by_submission.setdefault(item.result["submission"]["name"], []).append(item.result["val_curve"])
    assert sorted(by_submission) == ["reference", "seed-moe", "template"]
    for name, curves in by_submission.items():
        assert len(curves) == 3
        for curve in curves:
            models = [point["model"] for point in curve]
            assert models == (["final"] if name == "seed-moe" else ["snapshot", "snapshot", "final"]), name
            assert all(point["scored"] == "ok" for point in curve)
            times = [point["time_s"] for point in curve]
            # Due at 20 s and 40 s, stamped no earlier than the end of their windows (a quarter interval).
            assert times == sorted(times) and (name == "seed-moe" or 25 <= times[0] < 30 and 45 <= times[1] < 50)

"""`evaluator compare` (evaluator/compare.py): the ABBA order, one seed per pair, the paired test,
resuming a killed comparison, drawn seeds written down before their pair runs, bad input, the page.

The orchestration is tested with a stand-in for `evaluate()` that writes a valid result.json
(publish_support.make_run) for the run it is asked for; one slow test runs the real thing.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import write_submission
from publish_support import make_run

import evaluator.compare as compare
from evaluator.cli import main
from evaluator.leaderboard.html import PALETTE
from evaluator.tracks import load_track

RETURN_UNIFORM = """
def train(ctx):
    ctx.log(1, loss=9.0, tokens=100)
    return TinyCausal(ctx.vocab_size)
"""


class FakeEvaluate:
    """Stands in for evaluate(): records each call and writes the run's result.json as a real run would
    (valid against the schema, with its comparison), with the outcome the test chose for (pair, side):
    a val_loss, a time to target (on a time-to-target track) or a status. `interrupt_at` (1-based call)
    raises KeyboardInterrupt instead, as Ctrl-C or SIGTERM in the middle of a run does."""

    def __init__(
        self, root: Path, outcomes: dict | None = None, interrupt_at: int | None = None, wrong_seed: bool = False
    ):
        self.root, self.outcomes, self.interrupt_at, self.wrong_seed = root, outcomes or {}, interrupt_at, wrong_seed
        self.calls: list[tuple[int, str, int, bool]] = []

    def __call__(self, folder, *, track_id, seed, secret_seed, budget_s, sandbox_choice, runs_dir, comparison, console):
        pair, side = comparison["pair"], comparison["side"]
        self.calls.append((pair, side, seed, secret_seed))
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        plan = json.loads((Path(runs_dir).parent / compare.PLAN_FILE).read_text())
        assert plan["seeds"][pair - 1] == seed, "a pair's seed is written down before its runs"
        outcome = self.outcomes.get((pair, side), 4.0)
        track = load_track(track_id)
        if isinstance(outcome, str):
            made = {"status": outcome}
        elif track.target is not None:  # a time to target, or None: not reached
            made = {
                "target": track.target.val_loss,
                "time_to_target": outcome,
                "snapshot_every_s": 10.0,
                "val_loss": track.target.val_loss - 0.01 if outcome is not None else track.target.val_loss + 0.1,
            }
        else:
            made = {"val_loss": outcome}
        run_id = f"run-{len(self.calls)}-p{pair}{side}"
        run_dir = make_run(
            self.root,
            run_id,
            submission=Path(folder).name,
            track=track_id,
            seed=seed + (1 if self.wrong_seed else 0),
            seed_drawn=secret_seed,
            comparison=comparison,
            official=False,
            scored_on="public",
            **made,
        )
        Path(runs_dir).mkdir(parents=True, exist_ok=True)
        shutil.move(run_dir, Path(runs_dir) / run_id)
        return json.loads((Path(runs_dir) / run_id / "result.json").read_text()), Path(runs_dir) / run_id

    @property
    def order(self) -> list[tuple[int, str]]:
        return [(pair, side) for pair, side, _, _ in self.calls]


@pytest.fixture
def pair_of(tmp_path):
    """Two valid submissions, alpha (A) and beta (B), where make_run hashes them: tmp/submissions/."""
    return (
        write_submission(tmp_path / "submissions", "alpha", RETURN_UNIFORM),
        write_submission(tmp_path / "submissions", "beta", RETURN_UNIFORM),
    )


@pytest.fixture
def run_compare(tmp_path, capsys, monkeypatch):
    """`evaluator compare A B --out tmp/cmp ...` through the real command line with `fake` as evaluate:
    (exit code, stdout, stderr)."""

    def run(fake: FakeEvaluate, a, b, *args) -> tuple[int, str, str]:
        monkeypatch.setattr(compare, "evaluate", fake)
        code = main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp"), *map(str, args)])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def test_pairs_run_in_abba_order_each_pair_with_one_seed(tmp_path, run_compare, pair_of):
    fake = FakeEvaluate(tmp_path)
    code, out, err = run_compare(fake, *pair_of, "--seeds", "4", "--json")
    assert code == 0, err
    assert fake.order == [(1, "a"), (1, "b"), (2, "b"), (2, "a"), (3, "a"), (3, "b"), (4, "b"), (4, "a")]
    default = load_track("cpu-1min").default_seed
    assert [seed for _, _, seed, _ in fake.calls] == [
        default,
        default,
        default + 1,
        default + 1,
        default + 2,
        default + 2,
        default + 3,
        default + 3,
    ]
    assert not any(drawn for *_, drawn in fake.calls)
    document = json.loads(out)  # --json: stdout holds the document and nothing else
    assert [pair["order"] for pair in document["pairs"]] == [["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"]]
    plan = json.loads((tmp_path / "cmp" / compare.PLAN_FILE).read_text())
    assert plan["id"] == document["id"] and plan["seeds"] == [default + i for i in range(4)]
    # Every run is a normal run directory whose result says which comparison, pair and side it was.
    for pair in document["pairs"]:
        for side in ("a", "b"):
            result = json.loads((Path(pair[side]["run_dir"]) / "result.json").read_text())
            assert result["comparison"] == {"id": document["id"], "pair": pair["pair"], "side": side}
            assert result["submission"]["name"] == {"a": "alpha", "b": "beta"}[side]
    # Progress: one line per run started and one per run finished, after the heading.
    assert sum("started" in line for line in err.splitlines()) == 8
    assert sum(" ok, val_loss " in line for line in err.splitlines()) == 8


def test_the_paired_t_test_on_known_differences(tmp_path, run_compare, pair_of):
    a_losses, b_losses = [4.0, 4.1, 4.2], [3.98, 4.07, 4.19]  # B - A: -0.02, -0.03, -0.01
    outcomes = {(i + 1, "a"): loss for i, loss in enumerate(a_losses)} | {
        (i + 1, "b"): loss for i, loss in enumerate(b_losses)
    }
    code, out, _ = run_compare(FakeEvaluate(tmp_path, outcomes), *pair_of, "--json")
    document = json.loads(out)
    assert code == 0 and document["score"] == "val_loss" and document["counted_pairs"] == 3
    assert [pair["difference"] for pair in document["pairs"]] == pytest.approx([-0.02, -0.03, -0.01])
    assert document["mean_difference"] == pytest.approx(-0.02)
    assert document["std_difference"] == pytest.approx(0.01)
    assert document["standard_error"] == pytest.approx(0.01 / math.sqrt(3))
    # t = -0.02 / (0.01 / sqrt 3) = -2 sqrt 3 on 2 degrees of freedom, whose CDF is 1/2 + t / (2 sqrt(2 + t^2)).
    t = -2 * math.sqrt(3)
    assert document["p_value"] == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-9)
    assert [pair["a"]["received"]["share"] for pair in document["pairs"]] == [0.97] * 3


def test_the_table_shows_each_pair_and_a_failed_pair_is_left_out_and_said_so(tmp_path, run_compare, pair_of):
    outcomes = {(1, "a"): 4.0, (1, "b"): 3.9, (2, "b"): "crashed", (2, "a"): 4.0, (3, "a"): 4.1, (3, "b"): 3.95}
    code, out, _ = run_compare(FakeEvaluate(tmp_path, outcomes), *pair_of)
    assert code == 1  # a run failed through its submission, as evaluator run --seeds says it
    lines = out.splitlines()
    pair_two = next(line for line in lines if line.lstrip().startswith("2 "))
    assert "crashed" in pair_two and pair_two.endswith("left out: B crashed")
    pair_one = next(line for line in lines if line.lstrip().startswith("1 "))
    assert "4.0000" in pair_one and "3.9000" in pair_one and "-0.1000" in pair_one and "97%" in pair_one
    assert "mean difference B - A: -0.1250 over 2 of 3 pairs" in out
    assert "one-sided paired t-test, H1: B is better than A (lower val_loss): p = " in out


def test_one_pair_has_no_p_value(tmp_path, run_compare, pair_of):
    code, out, _ = run_compare(FakeEvaluate(tmp_path, {(1, "b"): 3.9}), *pair_of, "--seeds", "1", "--json")
    document = json.loads(out)
    assert code == 0 and document["mean_difference"] == pytest.approx(-0.1)
    assert document["p_value"] is None and document["std_difference"] is None
    code, out, _ = run_compare(FakeEvaluate(tmp_path), *pair_of, "--seeds", "1")
    assert "p undefined: the t-test needs at least 2 pairs" in out


def test_a_time_to_target_track_compares_times(tmp_path, run_compare, pair_of):
    outcomes = {(1, "a"): 40.0, (1, "b"): 30.0, (2, "b"): 32.0, (2, "a"): 42.0, (3, "a"): 41.0, (3, "b"): None}
    code, out, _ = run_compare(
        FakeEvaluate(tmp_path, outcomes), *pair_of, "--track", "cpu-target", "--budget", "60", "--json"
    )
    document = json.loads(out)
    assert code == 1  # not_reached is the submission's
    assert document["score"] == "time_to_target_s"
    assert [pair["difference"] for pair in document["pairs"]] == [-10.0, -10.0, None]
    assert document["pairs"][2]["left_out"] == "B not_reached"
    assert document["mean_difference"] == -10.0 and document["p_value"] == 0.0  # every pair the same: certain


def test_a_killed_comparison_resumes_and_reruns_only_runs_without_a_verdict(tmp_path, run_compare, pair_of):
    # Pair 1's B fails in the sandbox (no verdict); the third run is interrupted before it writes anything.
    first = FakeEvaluate(tmp_path, {(1, "b"): "sandbox_error"}, interrupt_at=3)
    code, _, err = run_compare(first, *pair_of)
    assert code == 130 and err.strip().endswith("evaluator: interrupted")
    assert first.order == [(1, "a"), (1, "b"), (2, "b")]
    plan = json.loads((tmp_path / "cmp" / compare.PLAN_FILE).read_text())

    second = FakeEvaluate(tmp_path, {(1, "b"): 3.9})
    code, out, err = run_compare(second, *pair_of, "--json")
    assert code == 0, err
    # Pair 1's A keeps its verdict; its B runs again with the same seed; then the rest, still ABBA.
    assert second.order == [(1, "b"), (2, "b"), (2, "a"), (3, "a"), (3, "b")]
    assert [seed for _, _, seed, _ in second.calls] == [
        plan["seeds"][0],
        plan["seeds"][1],
        plan["seeds"][1],
        plan["seeds"][2],
        plan["seeds"][2],
    ]
    document = json.loads(out)
    assert document["id"] == plan["id"] and document["pairs"][0]["difference"] == pytest.approx(-0.1)
    assert "1 run(s) already made" in err

    third = FakeEvaluate(tmp_path)
    code, out, _ = run_compare(third, *pair_of, "--json")
    assert code == 0 and third.calls == [] and json.loads(out)["counted_pairs"] == 3


def test_secret_seeds_are_drawn_pair_by_pair_written_down_first_and_kept_on_resume(
    tmp_path, run_compare, pair_of, monkeypatch
):
    draws = iter([101, 102, 103, 104])
    monkeypatch.setattr(compare, "draw_seed", lambda: next(draws))
    first = FakeEvaluate(tmp_path, interrupt_at=3)  # FakeEvaluate checks the plan holds each seed before its run
    code, _, _ = run_compare(first, *pair_of, "--secret-seeds")
    assert code == 130 and json.loads((tmp_path / "cmp" / compare.PLAN_FILE).read_text())["seeds"] == [101, 102]
    second = FakeEvaluate(tmp_path)
    code, out, _ = run_compare(second, *pair_of, "--secret-seeds", "--json")
    assert code == 0
    # Pair 2's seed was drawn before it was interrupted: it is kept, never drawn again.
    assert [(pair, seed) for pair, _, seed, _ in second.calls] == [(2, 102), (2, 102), (3, 103), (3, 103)]
    assert all(drawn for *_, drawn in second.calls)
    assert [pair["seed"] for pair in json.loads(out)["pairs"]] == [101, 102, 103]
    assert next(draws) == 104  # three draws in all


def test_resuming_asks_for_the_same_comparison(tmp_path, run_compare, pair_of):
    alpha, beta = pair_of
    code, _, _ = run_compare(FakeEvaluate(tmp_path, interrupt_at=2), alpha, beta)
    assert code == 130
    for args, problem in [
        (("--seeds", "5"), "--seeds 3 (asked: 5)"),
        (("--budget", "30"), "--budget 60 (asked: 30)"),
        (("--secret-seeds",), "--secret-seeds was not given (asked with)"),
    ]:
        code, _, err = run_compare(FakeEvaluate(tmp_path), alpha, beta, *args)
        assert code == 2 and problem in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_compare(FakeEvaluate(tmp_path), beta, alpha)
    assert code == 2 and "A is" in err and "beta" in err
    (beta / "train.py").write_text((beta / "train.py").read_text() + "\n# changed\n")
    code, _, err = run_compare(FakeEvaluate(tmp_path), alpha, beta)
    assert code == 2 and "has changed since the comparison began" in err


@pytest.mark.parametrize(
    "case",
    [
        "same folder",
        "unknown track",
        "no pairs",
        "too many pairs",
        "two tracks",
        "missing",
        "invalid",
        "busy out",
        "broken plan",
        "bad budget",
    ],
)
def test_bad_input_is_one_line_and_runs_nothing(tmp_path, run_compare, pair_of, case):
    alpha, beta = pair_of
    broken = write_submission(tmp_path / "submissions", "broken", RETURN_UNIFORM)
    (broken / "train.py").unlink()
    args, problem = {
        "same folder": ((alpha, alpha), "A and B are the same folder"),
        "unknown track": ((alpha, beta, "--track", "no-such-track"), "unknown track 'no-such-track'"),
        "no pairs": ((alpha, beta, "--seeds", "0"), "--seeds is the number of pairs: 1 to 1000, not 0"),
        "too many pairs": ((alpha, beta, "--seeds", "1001"), "not 1001"),
        "two tracks": (
            (alpha, write_submission(tmp_path / "submissions", "gamma", RETURN_UNIFORM, track="cpu-target")),
            "A is for track cpu-1min and B for cpu-target: choose one with --track",
        ),
        "missing": ((alpha, tmp_path / "missing"), "no such submission folder"),
        "invalid": ((alpha, broken), "the submission is invalid (1 problem(s): "),
        "busy out": ((alpha, beta), "holds other files and no comparison.json"),
        "broken plan": ((alpha, beta), "cmp/comparison.json is not a comparison plan this evaluator wrote"),
        "bad budget": ((alpha, beta, "--budget", "-1"), "--budget must be a positive number"),
    }[case]
    if case == "busy out":
        (tmp_path / "cmp").mkdir()
        (tmp_path / "cmp" / "notes.txt").write_text("someone else's")
    if case == "broken plan":
        (tmp_path / "cmp").mkdir()
        (tmp_path / "cmp" / compare.PLAN_FILE).write_text('{"schema": 1, "id": "x", "pairs": "3"}')
    fake = FakeEvaluate(tmp_path)
    code, out, err = run_compare(fake, *args)
    assert code == 2 and out == "" and fake.calls == []
    assert len(err.strip().splitlines()) == 1 and problem in err, err


def test_a_result_that_is_not_the_run_asked_for_counts_for_nothing(tmp_path, run_compare, pair_of):
    code, out, _ = run_compare(FakeEvaluate(tmp_path, wrong_seed=True), *pair_of, "--seeds", "2", "--json")
    document = json.loads(out)
    assert code == 4 and document["counted_pairs"] == 0
    assert document["pairs"][0]["left_out"] == "A no result, B no result"


def test_a_broken_result_in_the_runs_folder_is_reported_and_its_run_made_again(tmp_path, run_compare, pair_of):
    code, _, _ = run_compare(FakeEvaluate(tmp_path, interrupt_at=2), *pair_of, "--seeds", "2")
    forged = tmp_path / "cmp" / "runs" / "forged"
    forged.mkdir()
    (forged / "result.json").write_text('{"status": "ok", "val_loss": NaN}')
    fake = FakeEvaluate(tmp_path)
    code, _, err = run_compare(fake, *pair_of, "--seeds", "2")
    assert code == 0 and "cmp/runs/forged: unreadable result.json" in err
    assert fake.order == [(1, "b"), (2, "b"), (2, "a")]


def test_the_page_draws_both_submissions_validation_curves(tmp_path, run_compare, pair_of):
    code, _, err = run_compare(FakeEvaluate(tmp_path, {(2, "b"): "crashed"}), *pair_of)
    page = (tmp_path / "cmp" / compare.HTML_FILE).read_text()
    assert "wrote " in err and "<svg" in page
    # A's runs in the leaderboard's first colour, B's in its second; B's crashed run has no curve.
    assert page.count('class="final"') == 5
    assert (
        f'stroke="{PALETTE[0]}" class="val unofficial"' in page
        and f'stroke="{PALETTE[1]}" class="val unofficial"' in page
    )
    assert "A alpha" in page and "B beta" in page and "left out" in page and "B crashed" in page


@pytest.mark.slow
def test_a_real_comparison_of_two_tiny_submissions(tmp_path, capsys):
    """The real evaluate(), unsandboxed and on a 5 s budget: one pair, each run's result naming it."""
    submissions = tmp_path / "submissions"
    alpha = write_submission(submissions, "alpha", RETURN_UNIFORM)
    beta = write_submission(submissions, "beta", RETURN_UNIFORM)
    code = main(
        [
            "compare",
            str(alpha),
            str(beta),
            "--seeds",
            "1",
            "--budget",
            "5",
            "--sandbox",
            "none",
            "--out",
            str(tmp_path / "cmp"),
            "--json",
        ]
    )
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    assert code == 0, captured.err
    (pair,) = document["pairs"]
    for side in ("a", "b"):
        result = json.loads((Path(pair[side]["run_dir"]) / "result.json").read_text())
        assert result["status"] == "ok" and result["comparison"] == {"id": document["id"], "pair": 1, "side": side}
    # The same uniform model on both sides: the same val_loss, a difference of zero.
    assert pair["difference"] == 0.0 and document["p_value"] is None
    assert (tmp_path / "cmp" / compare.HTML_FILE).is_file()

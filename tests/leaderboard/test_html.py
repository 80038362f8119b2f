"""The HTML page's loss plot: the curve the evaluator measured, and the loss a run reported
(evaluator/leaderboard/html.py)."""

from __future__ import annotations

from html.parser import HTMLParser

from leaderboard_support import _published_results, _signer, _timed_rules, leaderboard
from publish_support import make_run, run_cli

from evaluator.publish import publish


class _Svg(HTMLParser):
    """Every element of a page, with its attributes and the text of its <title>."""

    def __init__(self):
        super().__init__()
        self.elements: list[dict] = []
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self._in_title = True
            return
        self.elements.append({"tag": tag, **dict(attrs), "title": ""})

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._in_title and self.elements:
            self.elements[-1]["title"] += data

    def having(self, tag: str, css: str) -> list[dict]:
        return [e for e in self.elements if e["tag"] == tag and e.get("class") == css]


def test_the_plot_draws_the_measured_curve_solid_and_the_reported_loss_faint(
    timed_board, monkeypatch, capsys, tmp_path
):
    code, page, _ = leaderboard(monkeypatch, capsys, timed_board, "--format", "html", "--rules", _timed_rules(tmp_path))
    assert code == 0
    svg = _Svg()
    svg.feed(page)
    results = _published_results(timed_board[0])
    paths = svg.having("path", "val") + svg.having("path", "val unofficial")
    points = svg.having("circle", "val-point")
    assert len(svg.having("polyline", "train") + svg.having("polyline", "train unofficial")) == len(results)
    for run_id, result in results.items():
        measured = [p for p in result["val_curve"] if p["scored"] == "ok"]
        path = [p for p in paths if f" · {run_id} (seed" in p["title"]]
        if run_id == "hasty-s0":  # it reached the target with its first snapshot: a point, not a line
            assert len(measured) == 1 and path == []
        else:
            assert len(path) == 1 and path[0]["title"].endswith("validation loss measured by the evaluator")
            assert path[0]["d"].count("L") == len(measured) - 1
        dots = [p["title"] for p in points if f" · {run_id} (seed" in p["title"]]
        # One dot per measured model but the one that gave the score: the ◆ marks it.
        deciding = result["target"]["time_s"] if result["target"]["reached"] else measured[-1]["time_s"]
        assert dots == [
            f"{result['submission']['name']} · {run_id} (seed {result['seed']}): val_loss {p['val_loss']:.4f} at "
            f"{p['time_s']:.2f} s ({p['model']}), measured by the evaluator"
            for p in measured
            if p["time_s"] != deciding
        ]
        diamond = [p["title"] for p in svg.having("path", "final") if f" · {run_id} (seed" in p["title"]]
        assert len(diamond) == 1 and (
            f"reached the target at {deciding:.2f} s" in diamond[0]
            if result["target"]["reached"]
            else "did not reach" in diamond[0]
        )
    assert "0.4242" not in page  # steady-s0's forged "val_loss" rows are no point of any curve
    line = svg.having("line", "target")
    assert len(line) == 1 and line[0]["stroke-dasharray"] and line[0]["y1"] == line[0]["y2"]
    assert [e for e in svg.elements if e.get("class") == "target-label"]
    assert "target val_loss 4.1 (provisional)</text>" in page
    caption = page.split("<figcaption>", 1)[1].split("</figcaption>", 1)[0]
    assert "Solid lines and dots: validation loss measured by the evaluator on its snapshots" in caption
    assert "Faint lines: training loss the submission reported through <code>ctx.log</code>, not verified" in caption
    assert "dark dashed line is the target val_loss 4.1 (provisional)" in caption
    assert "<h2>Track <code>toy-target</code> · time to target val_loss 4.1 (provisional)</h2>" in page
    assert "reached in 2 of 3 runs" in page


def test_a_run_scored_on_its_final_model_only_shows_one_marker(tmp_path, monkeypatch, capsys):
    _, key, trusted = _signer(tmp_path)
    publish(make_run(tmp_path, "lone-s0", submission="lone", snapshot_every_s=None), key, tmp_path / "results", False)
    code, page, _ = run_cli(
        monkeypatch,
        capsys,
        "leaderboard",
        "--results",
        tmp_path / "results",
        "--trusted-keys",
        trusted,
        "--format",
        "html",
    )
    svg = _Svg()
    svg.feed(page)
    assert code == 0 and len(svg.having("path", "final")) == 1
    assert svg.having("path", "val") == [] and svg.having("circle", "val-point") == []
    assert len(svg.having("polyline", "train")) == 1

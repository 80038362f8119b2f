"""The leaderboard as one self-contained HTML page: each track's table and an SVG plot of its runs'
loss curves (no script, nothing fetched).

Apart from evaluator.leaderboard.render because the plot is most of it: its scales, ticks and
curves are drawn here by hand, and nothing else needs them.
"""

from __future__ import annotations

import html
import math

from evaluator.leaderboard.board import RECORD, Row, Run, TrackTarget
from evaluator.leaderboard.text import (
    RANKING_TEXT,
    UNBROKEN,
    by_table,
    columns_of,
    row_cells,
    table_heading_suffix,
    table_rule_text,
    target_ranking_text,
)

PALETTE = ["#1c64b0", "#d9480f", "#2b8a3e", "#862e9c", "#c2255c", "#0b7285", "#e67700", "#4263eb", "#5c5f66", "#8f5c00"]

PLOT_WIDTH, PLOT_HEIGHT = 960, 420
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 20, 16, 48


def _nice_ticks(low: float, high: float, target: int = 6) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw_step = (high - low) / target
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw_step)
    first = math.ceil(low / step - 1e-9)
    ticks = []
    index = first
    while index * step <= high + 1e-9 * step:
        ticks.append(round(index * step, 10))
        index += 1
    return ticks


def _run_label(row: Row, run: Run) -> str:
    return f"{row.submission} · {run.run_id} (seed {run.seed})"


def _score_label(row: Row, run: Run) -> str:
    """The ◆'s tooltip: which model gave the run its score."""
    if not row.timed:
        return f"final val_loss {run.val_loss:.4f}"
    if run.time_to_target is not None:
        return f"reached the target at {run.time_to_target:.2f} s, val_loss {run.val_loss:.4f}"
    return f"did not reach the target; final val_loss {run.val_loss:.4f}"


def render_svg(track_id: str, rows: list[Row]) -> tuple[str, bool]:
    """The loss plot for one track's rows; returns (svg, whether early high losses were cut off).

    Per run, in its row's colour: the validation curve the evaluator measured (solid, a dot for each
    model it scored, ◆ for the model that gave the run its score) and the training loss the
    submission reported (faint). The solid curve is drawn from the result's val_curve alone: what a
    submission logs through ctx.log, whatever its key, never becomes a validation point."""
    target = rows[0].target
    runs = [(index, run) for index, row in enumerate(rows) for run in row.runs]
    curves = [
        (index, run, list(zip(run.loss_curve["time_s"], run.loss_curve["value"], strict=True))) for index, run in runs
    ]
    measured = [(index, run, [(t, v) for t, v, _ in run.val_points]) for index, run in runs]
    x_max = max(
        [run.budget_s for _, run in runs]
        + [t for _, _, points in curves + measured for t, _ in points]
        + [run.train_seconds or 0.0 for _, run in runs]
    )
    finals = [run.val_loss for _, run in runs] + ([target.val_loss] if target is not None else [])
    values = [v for _, _, points in curves + measured for _, v in points] + finals
    y_low = min(values)
    # The first seconds of training sit far above everything that decides the ranking; the axis
    # starts at the highest loss logged or measured after the first tenth of the budget, so the
    # tails are legible.
    late = [v for _, _, points in curves + measured for t, v in points if t >= 0.1 * x_max] + finals
    y_high = max(late)
    pad = 0.05 * (y_high - y_low or 1.0)
    y_low, y_high = y_low - pad, y_high + pad
    clipped = max(values) > y_high
    x_ticks = _nice_ticks(0.0, x_max)
    y_ticks = [tick for tick in _nice_ticks(y_low, y_high) if y_low <= tick <= y_high]

    clip_id = "".join(ch if ch.isalnum() else "-" for ch in track_id)
    inner_w = PLOT_WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    inner_h = PLOT_HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    x_span = max(x_ticks[-1], x_max)

    def px(t: float) -> float:
        return MARGIN_LEFT + inner_w * t / x_span

    def py(v: float) -> float:
        return MARGIN_TOP + inner_h * (y_high - v) / (y_high - y_low)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {PLOT_WIDTH} {PLOT_HEIGHT}" role="img" '
        'aria-label="Validation loss measured by the evaluator and training loss reported by each run, '
        'by training time">',
        f'<defs><clipPath id="plot-area-{clip_id}"><rect x="{MARGIN_LEFT}" y="{MARGIN_TOP}" '
        f'width="{inner_w}" height="{inner_h}"/></clipPath></defs>',
        f'<rect x="{MARGIN_LEFT}" y="{MARGIN_TOP}" width="{inner_w}" height="{inner_h}" class="frame"/>',
    ]
    for tick in x_ticks:
        x = px(tick)
        parts.append(f'<line x1="{x:.1f}" y1="{MARGIN_TOP}" x2="{x:.1f}" y2="{MARGIN_TOP + inner_h}" class="grid"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{MARGIN_TOP + inner_h + 18}" class="tick" text-anchor="middle">{tick:g}</text>'
        )
    for tick in y_ticks:
        y = py(tick)
        parts.append(f'<line x1="{MARGIN_LEFT}" y1="{y:.1f}" x2="{MARGIN_LEFT + inner_w}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{MARGIN_LEFT - 8}" y="{y + 4:.1f}" class="tick" text-anchor="end">{tick:g}</text>')
    parts.append(
        f'<text x="{MARGIN_LEFT + inner_w / 2}" y="{PLOT_HEIGHT - 8}" class="axis" text-anchor="middle">'
        "training time (s, evaluator clock)</text>"
    )
    parts.append(
        f'<text transform="translate(16 {MARGIN_TOP + inner_h / 2}) rotate(-90)" class="axis" '
        'text-anchor="middle">loss (nats/token)</text>'
    )
    if target is not None:  # under the curves; its label goes over them, below
        parts.append(
            f'<line x1="{MARGIN_LEFT}" y1="{py(target.val_loss):.1f}" x2="{MARGIN_LEFT + inner_w}" '
            f'y2="{py(target.val_loss):.1f}" class="target" stroke-dasharray="7 4">'
            f"<title>{html.escape(_target_label(target))}</title></line>"
        )
    parts.append(f'<g clip-path="url(#plot-area-{clip_id})">')
    # Training loss first, faint, so that the measured curves are drawn over it.
    for index, run, points in curves:
        if not points:
            continue
        colour = PALETTE[index % len(PALETTE)]
        coordinates = " ".join(f"{px(t):.1f},{py(v):.1f}" for t, v in points)
        label = html.escape(f"{_run_label(rows[index], run)}: training loss it reported, not verified")
        kind = "train" if rows[index].official else "train unofficial"
        parts.append(
            f'<polyline points="{coordinates}" stroke="{colour}" class="{kind}"><title>{label}</title></polyline>'
        )
    for index, run, points in measured:
        if len(points) < 2:  # a lone point is a marker, not a line
            continue
        colour = PALETTE[index % len(PALETTE)]
        path = " L".join(f"{px(t):.1f} {py(v):.1f}" for t, v in points)
        label = html.escape(f"{_run_label(rows[index], run)}: validation loss measured by the evaluator")
        kind = "val" if rows[index].official else "val unofficial"
        parts.append(f'<path d="M{path}" stroke="{colour}" class="{kind}"><title>{label}</title></path>')
    for index, run in runs:
        colour = PALETTE[index % len(PALETTE)]
        skipped = False
        for t, v, model in run.val_points:
            if not skipped and t == run.score_time:
                skipped = True  # the ◆ marks this model
                continue
            label = html.escape(
                f"{_run_label(rows[index], run)}: val_loss {v:.4f} at {t:.2f} s ({model}), measured by the evaluator"
            )
            parts.append(
                f'<circle cx="{px(t):.1f}" cy="{py(v):.1f}" r="3.2" fill="{colour}" class="val-point">'
                f"<title>{label}</title></circle>"
            )
    parts.append("</g>")
    if target is not None:
        parts.append(
            f'<text x="{MARGIN_LEFT + inner_w - 6}" y="{py(target.val_loss) - 6:.1f}" class="target-label" '
            f'text-anchor="end">{html.escape(_target_label(target))}</text>'
        )
    for index, run in runs:
        colour = PALETTE[index % len(PALETTE)]
        x = px(run.score_time if run.score_time is not None else x_max)
        y = py(run.val_loss)
        label = html.escape(f"{_run_label(rows[index], run)}: {_score_label(rows[index], run)}")
        parts.append(
            f'<path d="M{x:.1f} {y - 6:.1f} L{x + 6:.1f} {y:.1f} L{x:.1f} {y + 6:.1f} L{x - 6:.1f} {y:.1f} Z" '
            f'fill="{colour}" class="final"><title>{label}</title></path>'
        )
    parts.append("</svg>")
    return "\n".join(parts), clipped


def _target_label(target: TrackTarget) -> str:
    return f"target val_loss {target.val_loss:g}" + (" (provisional)" if target.provisional else "")


def plot_caption(target: TrackTarget | None, clipped: bool) -> str:
    """What the plot shows, as HTML: which curve is the evaluator's measurement and which the submission's word."""
    scored = (
        "the first model at or below the target, or the final model of a run that did not reach it"
        if target is not None
        else "the final model, at the moment it was saved"
    )
    caption = (
        "Solid lines and dots: validation loss measured by the evaluator on its snapshots of each run's model "
        f"and on the final model; ◆ marks the model that gave the run its score ({scored}). Faint lines: training "
        "loss the submission reported through <code>ctx.log</code>, not verified. One colour per row, by "
        "submission (coloured dashes: unofficial), against the evaluator's clock."
    )
    if target is not None:
        caption += f" The dark dashed line is the {html.escape(_target_label(target))}."
    if clipped:
        caption += " The first seconds of training, where the loss is above the plotted range, are cut off."
    return caption


HTML_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #1d2125; line-height: 1.45; }
h1 { margin-bottom: .25rem; }
p.rule { color: #495057; max-width: 75ch; }
table { border-collapse: collapse; width: 100%; font-size: .9rem; margin: 1rem 0; }
th, td { padding: .35rem .55rem; border-bottom: 1px solid #dee2e6; text-align: left; vertical-align: top; }
th { background: #f1f3f5; font-weight: 600; white-space: nowrap; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.unbroken { white-space: nowrap; }
tr.record td { background: #fff4d6; font-weight: 600; }
tr.unofficial td { color: #6c757d; }
.swatch { display: inline-block; width: .8rem; height: .8rem; border-radius: 2px; margin-right: .4rem;
          vertical-align: -1px; }
figure { margin: 1rem 0 2.5rem; }
figcaption { color: #495057; font-size: .85rem; max-width: 90ch; }
svg { width: 100%; height: auto; font-family: inherit; }
svg .frame { fill: #fcfcfd; stroke: #adb5bd; }
svg .grid { stroke: #e9ecef; }
svg .tick { font-size: 12px; fill: #495057; }
svg .axis { font-size: 13px; fill: #1d2125; }
svg .train { fill: none; stroke-width: 1.2; stroke-opacity: .3; stroke-linejoin: round; }
svg .val { fill: none; stroke-width: 2; stroke-linejoin: round; }
svg .unofficial { stroke-dasharray: 5 3; }
svg .val-point { stroke: #fff; stroke-width: 1; }
svg .target { stroke: #1d2125; stroke-width: 1.3; }
svg .target-label { font-size: 12px; fill: #1d2125; }
svg .final { stroke: #fff; stroke-width: 1.5; }
"""


def _html_class(header: str, numeric: bool) -> str:
    return "num" if numeric else "unbroken" if header in UNBROKEN else "text"


def render_html(rows: list[Row], verified_count: int) -> str:
    body = [
        "<h1>Speedrun leaderboard</h1>",
        f'<p class="rule">Built by <code>evaluator leaderboard</code> from {verified_count} signed result(s) that '
        f"verify. {html.escape(RANKING_TEXT)}</p>",
    ]
    if not rows:
        body.append("<p>No verified results yet.</p>")
    for (track_id, _), track_rows in by_table(rows).items():
        target = track_rows[0].target
        body.append(
            f"<h2>Track <code>{html.escape(track_id)}</code>{html.escape(table_heading_suffix(track_rows))}</h2>"
        )
        if target is not None:
            body.append(f'<p class="rule">{html.escape(target_ranking_text(target))}</p>')
        body.append(f'<p class="rule">{html.escape(table_rule_text(track_id, track_rows))}</p>')
        columns = columns_of(track_rows)
        headers = "".join(f'<th class="{_html_class(h, numeric)}">{html.escape(h)}</th>' for h, numeric in columns)
        body.append(f"<table><thead><tr>{headers}</tr></thead><tbody>")
        for index, row in enumerate(track_rows):
            classes = ["record"] if row.record_status == RECORD else []
            classes += [] if row.ranked else ["unofficial"]
            cells = [html.escape(cell) for cell in row_cells(row)]
            cells[1] = f'<span class="swatch" style="background:{PALETTE[index % len(PALETTE)]}"></span>{cells[1]}'
            tds = "".join(
                f'<td class="{_html_class(header, numeric)}">{cell}</td>'
                for cell, (header, numeric) in zip(cells, columns, strict=True)
            )
            body.append(f'<tr class="{" ".join(classes)}">{tds}</tr>')
        body.append("</tbody></table>")
        svg, clipped = render_svg(track_id, track_rows)
        body.append(f"<figure>{svg}<figcaption>{plot_caption(target, clipped)}</figcaption></figure>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>Speedrun leaderboard</title>\n<style>{HTML_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )

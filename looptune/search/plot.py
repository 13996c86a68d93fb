"""The study as a picture: quality against latency, the front within budgets, the choice marked.

- The line joins the quality-latency front of the settings within the budgets: the points no
  other point within budget beats on both axes. Pareto points that are there only for their
  smaller KV cache (beaten on quality and latency, not on memory) are drawn apart, as diamonds.
- Front and KV points carry numbers; the legend beside the axes names each number, so labels
  never overlap however close the points are.
- The axes are scaled to the measured points; the latency budget is a dashed line when it falls
  in that range, else the title says where it is. Settings over a budget are hollow.

PNG through matplotlib; `.html` gets the same figure as inline SVG plus the numbered table, so it
opens anywhere without plotly.
"""

from __future__ import annotations

import html
import io
from pathlib import Path

from looptune.errors import LooptuneError
from looptune.search.choice import Budgets, Outcome, pareto_front, quality_latency_front
from looptune.store import atomic_write_bytes, atomic_write_text

SUFFIXES = (".png", ".html", ".htm")


def label(o: Outcome) -> str:
    k = o.knobs
    text = f"{Path(k.checkpoint).name} R={k.loops} W={k.window} {k.dtype}"
    return text + (" compiled" if k.compile else "") + (" (busy)" if o.interference else "")


def marked_points(outcomes: list[Outcome], budgets: Budgets):
    """(the quality-latency front within budgets sorted by latency, the KV-only Pareto points):
    the points the figure numbers. With nothing within budgets, the unconstrained ones."""
    fitting = [o for o in outcomes if budgets.fits(o)] or outcomes
    front = sorted(quality_latency_front(fitting), key=lambda o: (o.latency_ms, o.quality))
    on_front = {o.knobs for o in front}
    kv_only = sorted(
        (o for o in pareto_front(fitting) if o.knobs not in on_front),
        key=lambda o: (o.latency_ms, o.quality),
    )
    return front, kv_only


def _span(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    pad = (high - low) * 0.08 or abs(high) * 0.05 or 1.0
    return low - pad, high + pad


def front_figure(
    outcomes: list[Outcome],
    best: Outcome | None,
    budgets: Budgets,
    quality_name: str,
    latency_name: str,
):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front, kv_only = marked_points(outcomes, budgets)
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=120)
    fits = [o for o in outcomes if budgets.fits(o)]
    over = [o for o in outcomes if not budgets.fits(o)]
    if fits:
        ax.scatter(
            [o.latency_ms for o in fits],
            [o.quality for o in fits],
            s=16,
            color="0.6",
            label="within budgets",
        )
    if over:
        ax.scatter(
            [o.latency_ms for o in over],
            [o.quality for o in over],
            s=16,
            facecolors="none",
            edgecolors="0.6",
            label="over a budget",
        )
    ax.plot(
        [o.latency_ms for o in front],
        [o.quality for o in front],
        "o-",
        color="tab:blue",
        ms=6,
        lw=1.2,
        zorder=3,
        label="quality-latency front" + ("" if fits else " (nothing fits: unconstrained)"),
    )
    if kv_only:
        ax.scatter(
            [o.latency_ms for o in kv_only],
            [o.quality for o in kv_only],
            marker="D",
            s=30,
            color="tab:green",
            zorder=3,
            label="Pareto only for its KV size",
        )
    busy = [o for o in front + kv_only if o.interference]
    if busy:
        ax.scatter(
            [o.latency_ms for o in busy],
            [o.quality for o in busy],
            marker="x",
            s=60,
            color="tab:red",
            zorder=4,
            label="measured under load (busy machine)",
        )
    numbered = front + kv_only
    for i, o in enumerate(numbered, 1):
        ax.annotate(
            str(i),
            (o.latency_ms, o.quality),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
            zorder=5,
        )
    if best is not None:
        ax.scatter(
            [best.latency_ms],
            [best.quality],
            marker="*",
            s=240,
            color="tab:orange",
            zorder=6,
            label="choice",
        )
    xs, ys = [o.latency_ms for o in outcomes], [o.quality for o in outcomes]
    ax.set_xlim(*_span(xs))
    ax.set_ylim(*_span(ys))
    low, high = ax.get_xlim()
    title = "Pareto front"
    if low <= budgets.latency_ms <= high:
        ax.axvline(
            budgets.latency_ms,
            color="tab:red",
            ls="--",
            lw=1,
            label=f"budget {budgets.latency_ms:g} ms",
        )
    else:
        side = "above" if budgets.latency_ms > high else "below"
        title += f" (latency budget {budgets.latency_ms:g} ms, {side} every point)"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(f"{latency_name} (ms per token)")
    ax.set_ylabel(f"{quality_name} (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    key = "\n".join(
        f"{i}  {label(o)}" + ("  <- choice" if best is not None and o.knobs == best.knobs else "")
        for i, o in enumerate(numbered, 1)
    )
    fig.text(0.70, 0.95, key, fontsize=7, va="top", family="monospace")
    fig.tight_layout(rect=(0, 0, 0.69, 1))
    return fig


def write_plot(path, outcomes, best, budgets, quality_name, latency_name) -> Path:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise LooptuneError(f"plot must end in .png or .html, got {path.name!r}")
    fig = front_figure(outcomes, best, budgets, quality_name, latency_name)
    buf = io.BytesIO() if suffix == ".png" else io.StringIO()
    fig.savefig(buf, format="png" if suffix == ".png" else "svg")
    import matplotlib.pyplot as plt

    plt.close(fig)
    if suffix == ".png":
        return atomic_write_bytes(path, buf.getvalue())
    front, kv_only = marked_points(outcomes, budgets)
    rows = "".join(
        f"<tr><td>{i}</td><td>{html.escape(label(o))}</td><td>{'front' if o in front else 'KV'}"
        f"</td><td>{o.quality:.4f}</td><td>{o.latency_ms:.3f}</td>"
        f"<td>{o.kv_bytes / 2**20:.3f}</td></tr>"
        for i, o in enumerate(front + kv_only, 1)
    )
    page = (
        f"<!doctype html><meta charset='utf-8'><title>looptune Pareto front</title>"
        f"<body style='font-family:sans-serif'>{buf.getvalue()}"
        f"<table border=1 cellpadding=4><tr><th>#</th><th>setting</th><th>why</th>"
        f"<th>{html.escape(quality_name)}</th><th>{html.escape(latency_name)} ms</th>"
        f"<th>KV MiB</th></tr>{rows}</table></body>"
    )
    return atomic_write_text(path, page)

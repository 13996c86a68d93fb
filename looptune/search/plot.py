"""The Pareto front as a picture: quality against latency, the budget drawn, the choice marked.

PNG through matplotlib; `.html` gets the same figure as inline SVG plus the front as a table, so
it opens anywhere without plotly.
"""

from __future__ import annotations

import html
import io
from pathlib import Path

from looptune.errors import LooptuneError
from looptune.search.choice import Budgets, Outcome
from looptune.store import atomic_write_bytes, atomic_write_text


def _label(o: Outcome) -> str:
    return f"{Path(o.knobs.checkpoint).name} R={o.knobs.loops} W={o.knobs.window}"


def front_figure(outcomes: list[Outcome], front: list[Outcome], best: Outcome | None,
                 budgets: Budgets, quality_name: str, latency_name: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter([o.latency_ms for o in outcomes], [o.quality for o in outcomes], s=18,
               color="0.7", label="measured settings")
    ordered = sorted(front, key=lambda o: o.latency_ms)
    ax.plot([o.latency_ms for o in ordered], [o.quality for o in ordered], "o-", color="tab:blue",
            ms=5, label="Pareto set (within budgets)")
    for i, o in enumerate(ordered):  # alternate above and below so neighbours do not overlap
        ax.annotate(_label(o), (o.latency_ms, o.quality), fontsize=6, rotation=30,
                    xytext=(3, 6 if i % 2 == 0 else -12), textcoords="offset points")
    ax.axvline(budgets.latency_ms, color="tab:red", ls="--", lw=1,
               label=f"budget {budgets.latency_ms:g} ms")
    if best is not None:
        ax.scatter([best.latency_ms], [best.quality], marker="*", s=220, color="tab:orange",
                   zorder=5, label=f"choice: {_label(best)}")
    ax.set_xlabel(f"{latency_name} (ms per token)")
    ax.set_ylabel(f"{quality_name} (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def write_plot(path, outcomes, front, best, budgets, quality_name, latency_name) -> Path:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".html", ".htm"):
        raise LooptuneError(f"--plot must end in .png or .html, got {path.name!r}")
    fig = front_figure(outcomes, front, best, budgets, quality_name, latency_name)
    buf = io.BytesIO() if suffix == ".png" else io.StringIO()
    fig.savefig(buf, format="png" if suffix == ".png" else "svg")
    import matplotlib.pyplot as plt

    plt.close(fig)
    if suffix == ".png":
        return atomic_write_bytes(path, buf.getvalue())
    rows = "".join(
        f"<tr><td>{html.escape(_label(o))}</td><td>{o.knobs.dtype}</td><td>{o.quality:.4f}</td>"
        f"<td>{o.latency_ms:.3f}</td><td>{o.kv_bytes / 2**20:.3f}</td></tr>"
        for o in sorted(front, key=lambda o: o.latency_ms))
    page = (f"<!doctype html><meta charset='utf-8'><title>looptune Pareto front</title>"
            f"<body style='font-family:sans-serif'>{buf.getvalue()}"
            f"<table border=1 cellpadding=4><tr><th>setting</th><th>dtype</th>"
            f"<th>{html.escape(quality_name)}</th><th>{html.escape(latency_name)} ms</th>"
            f"<th>KV MiB</th></tr>{rows}</table></body>")
    return atomic_write_text(path, page)

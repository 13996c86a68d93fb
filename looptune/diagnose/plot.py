"""Gain against cost per loop, as a PNG (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path


def plot_diagnosis(diag, path) -> Path:
    """Left: each loop's marginal gain and offset cost, both in bits per byte (the verdict's
    comparison; no cost bar where the loop gained nothing). Right: the effective rank per loop
    (loop 0 = the embeddings) and the relative offset `Omega_r / mean ||h_{r-1}||`, the paper's
    descriptive numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = diag.rows
    later = [r for r in rows if r.loop >= 2]
    fig, (ax, ax_rank) = plt.subplots(1, 2, figsize=(10, 4))
    name = Path(diag.checkpoint).name
    if later:
        x = [r.loop for r in later]
        ax.bar([v - 0.2 for v in x], [r.gain_bits_per_byte for r in later], 0.4,
               label="marginal gain: bpb(r-1) - bpb(r)")
        ax.bar([v + 0.2 for v in x], [r.offset_cost_bits_per_byte or 0.0 for r in later], 0.4,
               label="offset cost: gain x Omega / step")
        ax.set_xticks(x)
    else:
        ax.text(0.5, 0.5, "one loop: no gain or cost", ha="center", va="center",
                transform=ax.transAxes)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("loop r")
    ax.set_ylabel("bits per byte")
    ax.set_title(f"{name}: gain vs offset cost")
    ax.legend(fontsize=8)

    loops = [0] + [r.loop for r in rows]
    ax_rank.plot(loops, [diag.embedding_effective_rank] + [r.effective_rank for r in rows],
                 marker="o", label="effective rank")
    ax_rank.set_xticks(loops)
    ax_rank.set_xlabel("loop r (0 = embeddings)")
    ax_rank.set_ylabel("effective rank")
    if later:
        twin = ax_rank.twinx()
        twin.plot([r.loop for r in later], [r.offset_cost_relative for r in later], marker="s",
                  color="tab:red", label="Omega / mean ||h||")
        twin.set_ylabel("Omega_r / mean ||h_{r-1}||", color="tab:red")
    ax_rank.set_title("effective rank and relative offset")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""A diagnosis as a PNG (matplotlib, Agg backend), labels in mathtext."""

from __future__ import annotations

from pathlib import Path


def plot_diagnosis(diag, path) -> Path:
    """Left: bits per byte per loop, each loop's measured gain and its two parts (refinement
    with the carry unshifted, and the offset cost; gain = refinement - cost). Right: the
    effective rank per loop (loop 0 = the embeddings) and, as an indicator the verdict does not
    use, the relative offset distance. Written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from looptune.store import atomic_write_bytes

    rows = diag.rows
    later = [r for r in rows if r.loop >= 2]
    fig, (ax, ax_rank) = plt.subplots(1, 2, figsize=(11, 4.2))
    name = Path(diag.checkpoint).name
    if later:
        x = [r.loop for r in later]
        ax.bar(
            [v - 0.27 for v in x],
            [r.gain_bits_per_byte for r in later],
            0.27,
            label=r"gain $b_{r-1} - b_r$",
            color="tab:green",
        )
        ax.bar(
            x,
            [r.refinement_bits_per_byte for r in later],
            0.27,
            label=r"refinement $b_{r-1} - \tilde b_r$",
            color="tab:blue",
        )
        ax.bar(
            [v + 0.27 for v in x],
            [r.offset_cost_bits_per_byte for r in later],
            0.27,
            label=r"offset cost $b_r - \tilde b_r$",
            color="tab:red",
        )
        ax.set_xticks(x)
    else:
        ax.text(
            0.5, 0.5, "one loop: no gain to split", ha="center", va="center", transform=ax.transAxes
        )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel(r"loop $r$")
    ax.set_ylabel("bits per byte")
    ax.set_title(
        f"{name}: gain = refinement $-$ offset cost\n"
        r"($b_r$: bits/byte at loop $r$; $\tilde b_r$: loop $r$ with its carry unshifted)",
        fontsize=9,
    )
    ax.legend(fontsize=8)

    loops = [0] + [r.loop for r in rows]
    ax_rank.plot(
        loops,
        [diag.embedding_effective_rank] + [r.effective_rank for r in rows],
        marker="o",
        label="effective rank",
    )
    ax_rank.set_xticks(loops)
    ax_rank.set_xlabel(r"loop $r$ (0 = embeddings)")
    ax_rank.set_ylabel(r"effective rank of $h_r$")
    if later:
        twin = ax_rank.twinx()
        twin.plot(
            [r.loop for r in later],
            [r.offset_distance_relative for r in later],
            marker="s",
            color="tab:red",
        )
        twin.set_ylabel(
            r"$\Omega_r / \overline{\|h_{r-1}\|}$ (indicator, not in the verdict)", color="tab:red"
        )
    ax_rank.set_title(
        r"effective rank and relative offset $\Omega_r = "
        r"\overline{\|h_{r-1,i} - h_{r-1,i-1}\|}$",
        fontsize=9,
    )
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path

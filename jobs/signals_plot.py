"""`mcad signals stats --plot PNG`: how peaked the stored teacher distributions are, as histograms.

The figures come from storage/query.py (`candidate_histograms`, DuckDB over the
store); this module only draws them: per direction and teacher (dual logits,
single ITM logits), the top-1 probability and the entropy of the softmax over a
row's candidates, at T = 1 and at the distillation temperature the student uses
by default (TrainConfig.kd_temperature), then the rejects by reason.
"""
from __future__ import annotations

from pathlib import Path

TEACHERS = {"dual": "dual (CLIP)", "itm": "single (BLIP-ITM)"}
DIRECTIONS = {"i2t": "image→text", "t2i": "text→image"}
VALUES = {"top1": "top-1 probability", "entropy": "entropy (nats)"}


def plot_signal_stats(stats: dict, histograms: dict, path: str | Path) -> Path:
    """stats: `store_stats`; histograms: `candidate_histograms` (two temperatures or more)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(dr, t) for dr in DIRECTIONS for t in TEACHERS]
    temps = [key for key in histograms if key.startswith("T=")]
    fig = plt.figure(figsize=(3.0 * len(series) + 3.6, 6.4))
    grid = fig.add_gridspec(2, len(series) + 1, width_ratios=[1] * len(series) + [1.2])
    for col, (dr, teacher) in enumerate(series):
        for row, value in enumerate(VALUES):
            ax = fig.add_subplot(grid[row, col])
            edges = histograms["edges"][value]
            for temp in temps:
                counts = histograms[temp][dr][teacher][value]
                ax.stairs(counts, edges, label=temp.replace("T=", "T = "), fill=False, lw=1.4)
            ax.set_xlabel(VALUES[value], fontsize=8)
            ax.tick_params(labelsize=7)
            if col == 0:
                ax.set_ylabel("rows", fontsize=8)
            if row == 0:
                ax.set_title(f"{TEACHERS[teacher]}\n{DIRECTIONS[dr]}", fontsize=9)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    ax = fig.add_subplot(grid[:, -1])
    reasons = stats.get("rejects_by_reason") or {}
    if reasons:
        names = list(reasons)
        ax.barh(range(len(names)), [reasons[n] for n in names], 0.6, color="tab:red")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_ylim(max(len(names), 6) - 0.5, -0.5)  # top down; a few reasons keep thin bars
        ax.set_xlim(0, 1.15 * max(reasons.values()))
        for y, name in enumerate(names):
            ax.annotate(str(reasons[name]), (reasons[name], y), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no rejects", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel("samples", fontsize=8)
    ax.set_title(f"rejects by reason ({stats.get('rejected', 0)} of "
                 f"{stats.get('rows', 0) + stats.get('rejected', 0)})", fontsize=9)
    fig.suptitle(f"{stats.get('store', '')}: {stats.get('rows', 0)} rows; the candidate softmax of each row, "
                 f"at {' and '.join(t.replace('T=', 'T = ') for t in temps)}", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

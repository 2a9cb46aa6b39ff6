"""Post-training curves (matplotlib, Agg backend): one panel per metric family, one line per run and key."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_metrics"]


def plot_metrics(runs: Mapping[str, Sequence[dict]], panels: Sequence[tuple[str, str]], path: str,
                 x: str = "step") -> list[str]:
    """Panels (title, key): the key itself, or with a key ending in "/" every key under it ("kl/" -> "kl/math",
    "kl/code"), against `x`,
    for each run (lines `run key`). Returns the panels' titles that had data (empty panels say "no data")."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    drawn = []
    for ax, (title, prefix) in zip(axes[0], panels):
        n = 0
        for r, (run, rows) in enumerate(runs.items()):
            keys = sorted({k for row in rows for k in row if k == prefix or prefix.endswith("/") and k.startswith(prefix)})
            for j, key in enumerate(keys):
                pts = [(row[x], row[key]) for row in rows if key in row and x in row]
                if pts:
                    label = " ".join(s for s in (run, key) if s)
                    ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, ms=3, lw=1.4,
                            color=f"C{(r * 4 + j) % 10}", ls=("-", "--", ":", "-.")[r % 4], label=label)
                    n += 1
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.grid(True, alpha=0.3)
        if n:
            ax.legend(fontsize=7)
            drawn.append(title)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn

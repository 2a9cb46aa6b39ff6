"""Loss curves (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_losses(runs: dict[str, list[dict]], path: str, x: str = "tokens") -> None:
    """Training loss (thin) and validation loss (markers) of each run against tokens seen."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, rows) in enumerate(runs.items()):
        color = f"C{i % 10}"
        train = [(r[x], r["lm"]) for r in rows if "lm" in r]
        val = [(r[x], r["val_loss"]) for r in rows if "val_loss" in r]
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.45, lw=1)
        if val:
            ax.plot(*zip(*val), color=color, marker="o", ms=3, lw=1.6, label=f"{name} (validation)")
    ax.set_xlabel("tokens" if x == "tokens" else x)
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("training (thin) and validation (markers) loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

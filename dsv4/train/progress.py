"""The progress bar of a training run (one per run: shown by the main rank only)."""
from __future__ import annotations

from tqdm.auto import tqdm

__all__ = ["Progress"]


class Progress:
    def __init__(self, total: int, initial: int, *, show: bool = True):
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, disable=not show)
        self.val: float | None = None  # the latest validation loss; shown once there is one

    def step(self, row: dict | None = None) -> None:
        """One step done; `row` (a logged step's metrics) updates the numbers shown."""
        self.bar.update(1)
        if row is None:
            return
        self.val = row.get("val_loss", self.val)
        # the stage names the loss: the indexer warm-up's is its KL to the attention, not the LM loss
        shown = {"stage": row["stage"], "loss": f"{row.get('lm', row['loss']):.3f}"}
        if self.val is not None:
            shown["val"] = f"{self.val:.3f}"
        self.bar.set_postfix(**shown, tok_s=f"{row['tok_per_s']:.0f}")

    def evaluated(self, val_loss: float | None) -> None:
        self.val = val_loss

    def close(self) -> None:
        self.bar.close()

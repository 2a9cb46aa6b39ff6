"""Learning-rate schedules: linear warm-up, then cosine (V4 §4.2.2: to 1/10 of the peak at the end)
or warmup-stable-decay (hold the peak, decay linearly over the last `decay_frac` of the steps)."""
from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, peak: float, *, warmup: int, schedule: str = "cosine",
          min_ratio: float = 0.1, decay_frac: float = 0.2) -> float:
    """Learning rate of 0-based `step`: peak * (step + 1) / warmup during warm-up (never exactly 0, so
    the first step moves), then the schedule down to peak * min_ratio at step total_steps - 1."""
    _check(step, total_steps, peak, warmup, schedule, min_ratio, decay_frac)
    if step < warmup:
        return peak * (step + 1) / warmup
    floor = peak * min_ratio
    last = total_steps - 1
    if schedule == "cosine":
        t = (step - warmup) / max(last - warmup, 1)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * t))
    decay_start = max(warmup, last - round(decay_frac * total_steps))
    if step <= decay_start:
        return peak
    return peak - (peak - floor) * (step - decay_start) / (last - decay_start)


def _check(step: int, total_steps: int, peak: float, warmup: int, schedule: str, min_ratio: float,
           decay_frac: float) -> None:
    if schedule not in ("cosine", "wsd"):
        raise ValueError(f"schedule must be 'cosine' or 'wsd', got {schedule!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= step < total_steps:
        raise ValueError(f"step must be in [0, total_steps={total_steps}), got {step}")
    if not 0 <= warmup <= total_steps:
        raise ValueError(f"warmup must be in [0, total_steps={total_steps}], got {warmup}")
    if not peak > 0:
        raise ValueError(f"peak must be > 0, got {peak}")
    if not 0 <= min_ratio <= 1:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    if not 0 < decay_frac <= 1:
        raise ValueError(f"decay_frac must be in (0, 1], got {decay_frac}")

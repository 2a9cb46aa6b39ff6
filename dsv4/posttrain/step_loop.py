"""The optimizer loop of pre-training and SFT: steps that never wait for the GPU, replayed as a CUDA graph.

Why: at the post-training pipeline's sizes a step's kernels take less time than the host needs to launch them,
and every read of a device value (a logged loss, a non-finite check, the expert loads) makes the host wait for
the queue to drain before it launches more. Here a step reads nothing: its logged values (losses, gradient norm,
load imbalance) stay on the device and are read together every `log_every` steps, when the rows of those steps
are written (one row per step, as before) and checked for a non-finite loss or gradient norm. The expert-bias
update runs on the device (expert_bias_step). Where every step has the same input shape (pre-training's stream
rows, SFT with `static_shapes`), the forward + backward is captured once as a CUDA graph
(dsv4.train.cuda_graph) and replayed; an input of another shape runs eager, unless the feed says its layout
replaces the graph's (`regraph`: SFT's attention slots grew), which is then captured anew.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..model import Transformer
from ..train.cuda_graph import GraphedLoss
from ..train.losses import expert_bias_step
from ..train.metrics import MetricsLog
from ..train.optim import build_optimizers, lr_at
from ..train.precision import fp32_matmuls
from ..train.progress import Progress
from .sft_config import SFTConfig

log = logging.getLogger(__name__)

__all__ = ["StepInput", "LossFn", "SFTDiverged", "run_steps", "fit_steps"]


class SFTDiverged(RuntimeError):
    """The loss or the gradients became NaN/inf."""


@dataclass
class StepInput:
    data: Any                  # the step's input on the host: a tensor (its shape fixed where graphs replay) or
                               # anything with .to(device) that `loss_fn` takes
    layout: Any                # what `loss_fn` needs besides the data to read it (same layout: same computation)
    targets: int               # trained target tokens
    positions: int             # positions the model runs (for tok_per_s)
    regraph: bool = False      # this layout replaces the graph's for the steps to come: capture it anew


# (input on the device, its layout) -> {"loss": the scalar to differentiate, "part:<name>": detached logged parts
# (one of them "part:loss"), "loads": per routed MoE layer its expert loads}; without host syncs
LossFn = Callable[[Any, Any], dict]


def run_steps(model: Transformer, feed: Iterator[StepInput], loss_fn: LossFn, steps: int, cfg: SFTConfig,
              metrics: MetricsLog, *, stage: str, graphs: bool) -> int:
    """`steps` optimizer steps (fewer where cfg.max_seconds stops them) on the feed's inputs; one metrics row per
    step. graphs: capture the first step's forward + backward as a CUDA graph (cfg.cuda_graph "on": a failed
    capture raises, else training goes on eager). Returns the number of trained target tokens."""
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    model.train()
    opts = build_optimizers(model, cfg.lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay)
    params = list(model.parameters())
    progress = Progress(steps, 0, show=cfg.progress)
    progress.bar.set_description(stage)
    pending: list[tuple[dict, dict[str, torch.Tensor], int]] = []   # rows waiting for their device values
    graph: GraphedLoss | None = None
    graph_key = None
    trained, cfg_steps, last_logged = 0, steps, 0.0
    start = timed_from = time.perf_counter()   # reset after the warm-up step: the cap counts from there

    def flush() -> None:
        nonlocal last_logged
        if not pending:
            return
        names = list(pending[0][1])
        values = torch.stack([torch.stack([v[k].float().reshape(()) for k in names])
                              for _, v, _ in pending]).tolist()   # the one read of the interval's values
        now = time.perf_counter()
        rate = sum(n for _, _, n in pending) / max(now - last_logged, 1e-9)
        for (head, _, n), vals in zip(pending, values):
            parts = dict(zip(names, vals))
            if not math.isfinite(parts["loss"]) or not math.isfinite(parts["grad_norm"]):
                progress.close()
                raise SFTDiverged(f"step {head['step'] - 1}: loss={parts['loss']} grad_norm={parts['grad_norm']} "
                                  "is not finite; stopped")
            warmup = head.pop("warmup", False)
            targets = head.pop("targets")
            row = {**head, **parts, "targets": targets,
                   "tok_per_s": n / max(now - last_logged, 1e-9) if warmup else rate,
                   "elapsed_s": 0.0 if warmup else now - start}   # since the warm-up, at this row's read
            if warmup:
                row["warmup_s"] = now - last_logged
            metrics.add(row)
            progress.step(row)
        pending.clear()
        last_logged = now

    with fp32_matmuls("tf32") if device.type == "cuda" else nullcontext():
        for step in range(steps):
            if step == 0:
                last_logged = time.perf_counter()
            lr = lr_at(step, steps, cfg.lr, warmup=min(cfg.warmup, steps), min_ratio=cfg.min_lr_ratio)
            for o in opts:
                for g in o.param_groups:
                    g["lr"] = lr
            inp = next(feed)
            x = _to(inp.data, device)
            key = (tuple(x.shape), inp.layout) if isinstance(x, torch.Tensor) else None
            if graphs and key is not None and key != graph_key and (graph is None or inp.regraph):
                if graph is not None:
                    graph.release()
                graph = _capture(loss_fn, x, inp.layout, params, required=cfg.cuda_graph == "on")
                graphs, graph_key = graph is not None, key
            kept = None
            if graph is not None and key == graph_key:
                outs = graph([x])[0]
            else:
                if graph is not None:   # an eager step beside a graph: its gradients in tensors of their own
                    kept = [p.grad for p in params]
                    for p in params:
                        p.grad = None
                outs = loss_fn(x, inp.layout)
                outs["loss"].backward()
            grads = [p for p in params if p.grad is not None]
            grad_norm = (torch.nn.utils.clip_grad_norm_(grads, cfg.grad_clip) if grads
                         else torch.zeros((), device=device))
            for o in opts:
                o.step()
                if graph is None:   # a graph's replays overwrite its gradients where they are
                    o.zero_grad(set_to_none=True)
            if kept is not None:
                for p, g in zip(params, kept):
                    p.grad = g
            imbalance = expert_bias_step(model, outs["loads"], cfg.bias_update_speed).to(device)
            trained += inp.targets
            values = {k[5:]: v for k, v in outs.items() if k.startswith("part:")}
            values.update(grad_norm=grad_norm, expert_load_max_over_mean=imbalance)
            # the first step (compilation, allocation, capture) is logged on its own as warmup_s, outside the cap
            head = {"step": step + 1, "tokens": trained, "lr": lr, "stage": stage, "targets": inp.targets,
                    "warmup": step == 0}
            pending.append((head, values, inp.positions))
            if step == 0 or (step + 1) % cfg.log_every == 0 or step + 1 == steps:
                flush()
                if step == 0:
                    start = timed_from = time.perf_counter()
            if cfg.max_seconds:
                if step + 1 in (_TIMED_FROM, _TIMED_FROM + _TIMED_STEPS):
                    _sync(device)   # two waits per run: the rate that fits the schedule is the GPU's
                elapsed = time.perf_counter() - start
                if step + 1 == _TIMED_FROM + _TIMED_STEPS:
                    steps = fit_steps(steps, step + 1, elapsed, time.perf_counter() - timed_from, cfg.max_seconds)
                if step + 1 == _TIMED_FROM:
                    timed_from = time.perf_counter()
                if step + 1 >= steps or (step and elapsed > cfg.max_seconds):   # never the warm-up
                    flush()
                    if step + 1 < cfg_steps:
                        log.warning("%s: stopped at step %d of %d for its %.0f s cap", stage, step + 1, cfg_steps,
                                    cfg.max_seconds)
                    break
        flush()
    progress.close()
    if graph is not None:
        graph.release()
    return trained


def _capture(loss_fn: LossFn, x: torch.Tensor, layout: Any, params: list[torch.nn.Parameter], *,
             required: bool) -> GraphedLoss | None:
    """The step's forward + backward captured on input `x`; None (eager from then on, with a warning) where the
    capture fails and is not `required`."""
    try:
        return GraphedLoss(lambda b: loss_fn(b, layout), x, params)
    except (RuntimeError, ValueError) as e:
        if required:
            raise
        log.warning("%s; training on without graphs", e)
        return None


def _to(data: Any, device: torch.device) -> Any:
    """The input on `device`; a tensor goes to a GPU from pinned memory, asynchronously (a blocking copy waits
    until the GPU has run everything queued before it)."""
    if isinstance(data, torch.Tensor) and device.type == "cuda":
        return data.pin_memory().to(device, non_blocking=True)
    return data.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_TIMED_FROM, _TIMED_STEPS = 2, 5   # steps timed to fit a capped schedule: after the first two (warm-up, allocation)
                                   # (the cap's clock starts after the first)


def fit_steps(steps: int, done: int, elapsed: float, timed: float, max_seconds: float) -> int:
    """The steps of a schedule capped at `max_seconds`: `steps`, or fewer where the rest would not fit at the rate
    of the last `_TIMED_STEPS` steps (`timed` seconds), after `done` steps in `elapsed` seconds. The learning-rate
    schedule then ends (decays fully) within the cap instead of being cut off at a high rate."""
    per_step = timed / _TIMED_STEPS
    return max(done, min(steps, done + int((max_seconds - elapsed) / max(per_step, 1e-9))))

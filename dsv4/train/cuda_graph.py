"""A training forward + backward captured once as a CUDA graph and replayed for every batch of the same shape.

Why: a V4 step launches thousands of small kernels (mHC mixes, norms, routing, row gathers); at 4K tokens on an
H200 the host needs ~25 ms more to launch them than the GPU needs to run them. Replaying the captured graph
costs one launch. What the capture requires, the model already keeps: no host synchronisation inside a step
(the token-id check is skipped while capturing, expert groups stay on the device) and fixed shapes.

The captured backward leaves each parameter's gradient in the same tensor on every replay, overwritten, not
accumulated: between steps, leave `.grad` in place (zero it or not, never set it to None).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

Outputs = dict[str, torch.Tensor | list[torch.Tensor]]


class GraphedLoss:
    """`loss_fn(batch)` -> {"loss": scalar, other named tensors or lists of tensors}, then `loss.backward()`,
    captured on the first batch. Calling it with micro-batches of that shape, dtype and device replays the graph
    per micro-batch and leaves their summed gradients in `.grad`; it returns each micro-batch's outputs, detached
    copies. Parameters without a gradient in the captured step keep `.grad = None`, as in eager training."""

    def __init__(self, loss_fn: Callable[[torch.Tensor], Outputs], batch: torch.Tensor,
                 params: Sequence[torch.nn.Parameter], warmup: int = 2):
        if not batch.is_cuda:
            raise ValueError(f"CUDA graphs need a CUDA batch, got one on {batch.device}")
        self.batch = batch.clone()
        self.params = [p for p in params if p.requires_grad]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile, autotune and allocate before capturing (capture forbids syncs)
            for _ in range(warmup):
                loss_fn(self.batch)["loss"].backward()
                self._drop_grads()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, stream=side):  # the warm-up's stream: its autograd state is bound there
                self.outputs = loss_fn(self.batch)
                self.outputs["loss"].backward()
        except RuntimeError as e:  # most often an op that reads a device value on the host (.item(), a mask index)
            self._drop_grads()
            raise RuntimeError("capturing the training step as a CUDA graph failed; an op in it synchronises with "
                               "the host or allocates by data. Train without graphs (dsv4 train --cuda-graph off)."
                               f" Cause: {e}") from e
        self.grads = [p.grad for p in self.params if p.grad is not None]
        self._sums: list[torch.Tensor] | None = None

    def _drop_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def _check(self, batch: torch.Tensor) -> None:
        if (batch.shape, batch.dtype, batch.device) != (self.batch.shape, self.batch.dtype, self.batch.device):
            raise ValueError(f"the graph was captured for a {self.batch.dtype} batch of shape "
                             f"{tuple(self.batch.shape)} on {self.batch.device}, got {batch.dtype} "
                             f"{tuple(batch.shape)} on {batch.device}")

    def __call__(self, batches: Sequence[torch.Tensor]) -> list[Outputs]:
        for b in batches:
            self._check(b)
        outs = []
        for i, b in enumerate(batches):
            self.batch.copy_(b)
            self.graph.replay()
            if len(batches) > 1:  # the replay overwrote the gradients: keep a running sum beside them
                if i == 0:
                    if self._sums is None:
                        self._sums = [torch.empty_like(g) for g in self.grads]
                    torch._foreach_copy_(self._sums, self.grads)
                else:
                    torch._foreach_add_(self._sums, self.grads)
            outs.append({k: [t.clone() for t in v] if isinstance(v, list) else v.detach().clone()
                         for k, v in self.outputs.items()})
        if len(batches) > 1:
            torch._foreach_copy_(self.grads, self._sums)
        return outs

    def release(self) -> None:
        """Free the graph's memory pool (before capturing another: a new training stage, say)."""
        self._drop_grads()
        self.graph, self.outputs, self.grads, self._sums = None, {}, [], None

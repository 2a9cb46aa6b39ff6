"""Muon as DeepSeek-V4 uses it (V4 §2.4, Alg. 1; docs/training-recipe.md#muon).

Per logically independent matrix W (n x m):

    M_t = mu M_{t-1} + G_t                       (momentum, no (1 - mu) damping)
    O_t = HybridNS(G_t + mu M_t) * gamma * sqrt(max(n, m))   (Nesterov; RMS(O_t) = gamma)
    W_t = W_{t-1} (1 - lr wd) - lr O_t           (decoupled weight decay)

Scaling the update to a fixed RMS gamma (0.18) lets Muon share the learning rate and weight decay
of the AdamW parameters. A 3-D parameter [E, n, m] is E independent matrices (MoE experts); a param
group may set `matrix_shape=(n, m)` to declare that each of its parameters is a row-major stack of
(n, m) blocks (V4's grouped output projection wo_a). All matrices of one shape in a param group go
through a single batched Newton-Schulz call, as V4 batches same-shape parameters.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

Coefficients = Sequence[tuple[float, float, float]]

KELLER = (3.4445, -4.775, 2.0315)
"""Quintic step with a steep slope at 0: pulls all singular values into roughly [0.68, 1.13] fast."""
CUBIC = (2.0, -1.5, 0.5)
"""Classic Newton-Schulz 1.5x - 0.5x^3 in quintic form: super-attracting fixed point at 1."""
V4_HYBRID: tuple[tuple[float, float, float], ...] = (KELLER,) * 8 + (CUBIC,) * 2
"""V4's schedule: 8 fast steps, then 2 that settle the singular values at 1."""


def orthogonalize(x: Tensor, coefficients: Coefficients, eps: float = 1e-7) -> Tensor:
    """Newton-Schulz approximation of U V^T for each matrix of x [..., n, m] (x = U S V^T).

    Each matrix is divided by its own Frobenius norm (+ eps), so all singular values start in [0, 1];
    the iteration X <- aX + b(XX^T)X + c(XX^T)^2 X then runs on the wide orientation (the Gram
    matrix is min(n, m)^2). The matmuls run in x.dtype, the norm in at least fp32.
    """
    n, m = x.shape[-2:]
    tall = n > m
    X = x.reshape(-1, n, m)
    if tall:
        X = X.mT
    acc = torch.promote_types(x.dtype, torch.float32)
    X = (X.to(acc) / (torch.linalg.matrix_norm(X.to(acc), keepdim=True) + eps)).to(x.dtype)
    for a, b, c in coefficients:
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)      # bA + cA^2
        X = torch.baddbmm(X, B, X, beta=a)               # aX + BX
    if tall:
        X = X.mT
    return X.reshape(x.shape)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D and 3-D (stacked) matrices; see the module docstring for the update.

    ns_dtype: dtype of the Newton-Schulz matmuls (None: fp32; bf16 is stable on GPUs per V4 §3.5.1).
    Parameters whose grad is None are skipped (stages that train a subset).
    """

    def __init__(self, params: Iterable, lr: float, *, momentum: float = 0.95, weight_decay: float = 0.1,
                 update_rms: float = 0.18, nesterov: bool = True, ns_coefficients: Coefficients = V4_HYBRID,
                 eps: float = 1e-7, ns_dtype: torch.dtype | None = None):
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay),
                            ("update_rms", update_rms), ("eps", eps)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not ns_coefficients or any(len(abc) != 3 for abc in ns_coefficients):
            raise ValueError(f"ns_coefficients must be a non-empty sequence of (a, b, c), got {ns_coefficients}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, update_rms=update_rms,
                        nesterov=nesterov, ns_coefficients=tuple(tuple(abc) for abc in ns_coefficients),
                        eps=eps, ns_dtype=ns_dtype, matrix_shape=None)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                matrix_shape(p, group["matrix_shape"])   # fail at construction, not at the first step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _momentum(self, p: Tensor, group: dict) -> Tensor:
        """Update the momentum buffer with p.grad; return what gets orthogonalised (Nesterov: G + mu M)."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(p.grad)
        return p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf

    def _step_group(self, group: dict) -> None:
        """Momentum -> matrices grouped by shape -> one batched Newton-Schulz per shape -> scaled update with
        decoupled decay. Which process orthogonalises which matrices is the subclass hook (`orthogonalize_here`,
        `apply_update`); shapes and parameters are visited in the same order on every process."""
        by_shape: dict[tuple[int, int], list[tuple[Tensor, Tensor | None]]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is None:
                continue
            u = self._momentum(p, group)
            shape = matrix_shape(p, group["matrix_shape"])
            by_shape[shape].append((p, self.orthogonalize_here(p, u, shape)))
        ns_dtype = group["ns_dtype"] or torch.float32
        lr, decay = group["lr"], 1 - group["lr"] * group["weight_decay"]
        for (n, m), items in by_shape.items():
            here = [mats for _, mats in items if mats is not None]
            ortho = iter(orthogonalize(torch.cat([x.to(ns_dtype) for x in here]), group["ns_coefficients"],
                                       group["eps"]).split([x.shape[0] for x in here]) if here else ())
            scale = group["update_rms"] * math.sqrt(max(n, m))
            for p, mats in items:
                self.apply_update(p, None if mats is None else next(ortho), lr * scale, decay)

    def orthogonalize_here(self, p: Tensor, update: Tensor, shape: tuple[int, int]) -> Tensor | None:
        """The [k, n, m] matrices of p's momentum update that this process orthogonalises (None: another
        process does). One process: all of them."""
        return update.reshape(-1, *shape)

    def apply_update(self, p: Tensor, ortho: Tensor | None, step_size: float, decay: float) -> None:
        """W <- W * decay - step_size * O, O the orthogonalised matrices from `orthogonalize_here` (None where
        another process orthogonalised p)."""
        p.mul_(decay).add_(ortho.reshape(p.shape).to(p.dtype), alpha=-step_size)


def matrix_shape(p: Tensor, declared: tuple[int, int] | None) -> tuple[int, int]:
    """(n, m) of the independent matrices p holds: its last two dims, or the group's declared blocks."""
    if declared is None:
        if p.ndim not in (2, 3):
            raise ValueError(f"Muon takes 2-D or 3-D parameters, got shape {tuple(p.shape)}")
        return tuple(p.shape[-2:])
    n, m = declared
    if p.ndim != 2 or p.shape[1] != m or p.shape[0] % n:
        raise ValueError(f"matrix_shape {declared} does not tile a parameter of shape {tuple(p.shape)}")
    return n, m

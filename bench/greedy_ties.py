"""Whether two greedy decodings that part ways did so at a near-tie of the logits (a rounding flip) or not.

Two computations of the same logits that sum in different orders (a verify forward over 1 + k tokens against a
one-token decode step: other GEMM and attention shapes) agree only up to rounding. Where the two best tokens are
closer than that rounding, either may come out on top, and greedy decodings part ways there without any logic
being wrong. `diagnose` recomputes the logits at the first differing position with one full forward over the prompt
and the common prefix, in the model's dtype and in float32, and `classify` tells whether the token the other
decoding chose lies within a rounding-level tolerance (`tolerance`) of the chosen one.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

# How many units in the last place of the largest |logit| two summation orders may move a logit. The logits come
# from an fp32 head over the final hidden state, but that state (and every activation before it) is rounded to the
# model's dtype after each op, so two orders of the same sums give hidden states that differ by about one rounding
# each, compounded over the layers, and logits that differ by a few roundings of their own magnitude. Four ulps of
# the largest |logit| (bf16: 4 * 2^-7 relative, ~3%) covers that without calling a real preference a tie; the
# diagnosis prints the model-dtype against float32 deviation at the same position as a measured check of it.
TIE_ULPS = 4.0


def ulp(dtype: torch.dtype, x: float) -> float:
    """The spacing of `dtype`'s values at |x| (one unit in the last place)."""
    x = abs(x)
    eps = torch.finfo(dtype).eps            # the spacing at 1.0
    return eps * 2.0 ** math.floor(math.log2(x)) if x > 0 else torch.finfo(dtype).tiny


def tolerance(dtype: torch.dtype, scale: float, ulps: float = TIE_ULPS) -> float:
    """The largest logit gap a rounding flip is taken to explain: `ulps` ulps of `dtype` at the logit scale."""
    return ulps * ulp(dtype, scale)


@dataclass
class TieReport:
    """Two tokens' logits at one position: `a` the token one decoding chose, `b` the other's."""
    a: int
    b: int
    logit_a: float
    logit_b: float
    scale: float         # max |logit| over the vocabulary
    top: int             # this computation's argmax
    dtype: torch.dtype   # whose rounding the tolerance (and `ulps`) is made of
    tol: float
    computed: str = ""   # the dtype the logits were computed in, when it is not `dtype`

    @property
    def gap(self) -> float:
        return self.logit_a - self.logit_b

    @property
    def relative(self) -> float:
        return self.gap / self.scale if self.scale else math.inf

    @property
    def ulps(self) -> float:
        return self.gap / ulp(self.dtype, self.scale)

    @property
    def tie(self) -> bool:
        """Within the tolerance either way (b may even lead here: this computation rounds differently too)."""
        return abs(self.gap) <= self.tol

    def line(self) -> str:
        name = str(self.dtype).replace("torch.", "")
        return (f"{self.computed or name} logits: logit[{self.a}] {self.logit_a:.6g}, "
                f"logit[{self.b}] {self.logit_b:.6g}, gap {self.gap:+.4g} = {self.relative:+.2e} of max |logit| {self.scale:.4g} = {self.ulps:+.2f} {name} ulp "
                f"(tolerance {self.tol:.3g}); argmax here {self.top}")


def classify(logits: torch.Tensor, a: int, b: int, dtype: torch.dtype, ulps: float = TIE_ULPS,
             computed: str = "") -> TieReport:
    """The gap between tokens a and b in `logits` [vocab], against `ulps` ulps of `dtype` at max |logit|
    (`computed`: the dtype the logits were computed in, where that is not `dtype`, for the report)."""
    logits = logits.detach().float()
    scale = float(logits.abs().max())
    return TieReport(a, b, float(logits[a]), float(logits[b]), scale, int(logits.argmax()), dtype,
                     tolerance(dtype, scale, ulps), computed)


def model_dtype(model) -> torch.dtype:
    return model.embed.weight.dtype


@torch.no_grad()
def position_logits(model, ids: list[int]) -> torch.Tensor:
    """The logits [vocab] after `ids`, from one full forward (no cache)."""
    x = torch.tensor([ids], dtype=torch.long, device=model.embed.weight.device)
    return model(x, last_only=True)[0, -1].float()


@dataclass
class PositionDiagnosis:
    """Where two decodings part ways, the gap between the reference's token and the other's: in the reference's
    logits recomputed in the model's dtype (`own`), in the other decoding's own logits where it kept them
    (`other`, with `drift`, their largest difference from `own` over the vocabulary), and in float32 (`fp32`,
    measured in the same ulps; None when the model is float32 or no copy could be made: `fp32_note` says why),
    with `deviation`, the largest difference between the model-dtype and float32 logits: this position's rounding,
    measured."""
    own: TieReport
    other: TieReport | None = None
    drift: float | None = None
    fp32: TieReport | None = None
    deviation: float | None = None
    fp32_note: str | None = None

    @property
    def tie(self) -> bool:
        """A near-tie in the reference's logits, or in the other decoding's: a computation that rounds otherwise
        can flip which of the two comes first. Neither means both computations put their own token clearly first,
        so they disagree by more than rounding about the logits themselves."""
        return self.own.tie or (self.other is not None and self.other.tie)

    def lines(self) -> list[str]:
        out = ["recomputed " + self.own.line()]
        if self.other is not None:
            out.append(f"speculative's own {self.other.line()}; max |difference| from the recomputed logits "
                       f"{self.drift:.3g}")
        if self.fp32 is not None:
            out.append(self.fp32.line())
            name = str(self.own.dtype).replace("torch.", "")
            out.append(f"{name} against float32 logits here: max |difference| {self.deviation:.3g} "
                       f"= {self.deviation / ulp(self.own.dtype, self.own.scale):.2f} {name} ulp of max |logit|")
        elif self.fp32_note:
            out.append(f"float32: {self.fp32_note}")
        return out


class Diagnosis:
    """Recompute and classify the logits where two greedy decodings part ways. The float32 copy of the model is made
    at the first call that needs it (not at all for a float32 model), or left out if it cannot be made."""

    def __init__(self, model, ulps: float = TIE_ULPS):
        self.model, self.ulps, self.dtype = model, ulps, model_dtype(model)
        self._fp32 = None
        self.fp32_note: str | None = None

    def fp32_model(self):
        if self._fp32 is None and self.fp32_note is None:
            try:
                self._fp32 = copy.deepcopy(self.model).to_dtype(torch.float32)
            except (RuntimeError, AttributeError, TypeError) as e:   # e.g. out of memory, packed weights
                self.fp32_note = f"no float32 copy ({type(e).__name__}: {e})"
        return self._fp32

    def __call__(self, context: list[int], a: int, b: int, other: torch.Tensor | None = None) -> PositionDiagnosis:
        """After `context` (prompt + common prefix), token a (the reference's) against token b; `other`: the logits
        [vocab] token b was chosen from, where known."""
        own = position_logits(self.model, context)
        d = PositionDiagnosis(classify(own, a, b, self.dtype, self.ulps))
        if other is not None:
            d.other = classify(other, a, b, self.dtype, self.ulps, computed=str(self.dtype).replace("torch.", ""))
            d.drift = float((other.float() - own).abs().max())
        if self.dtype != torch.float32 and self.fp32_model() is not None:
            wide = position_logits(self._fp32, context)
            d.fp32 = classify(wide, a, b, self.dtype, self.ulps, computed="float32")   # (gap in the same ulps)
            d.deviation = float((own - wide).abs().max())
        d.fp32_note = self.fp32_note
        return d

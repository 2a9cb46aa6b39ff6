"""Training on a GPU: the plain-PyTorch references of the per-token ops and of the whole-sequence attention,
compiled by torch.compile, registered as the "compiled" backend. Their fp32 chains (mHC mixing and its 20
Sinkhorn rounds, norms, routing, SwiGLU, masks and softmax of the attention) run eagerly as hundreds of
memory-bound kernels forward and backward; Inductor fuses each chain into a few kernels and derives the matching
fused backward. Same math as the references (the tests compare gradients). Chosen by `auto` for CUDA tensors
under autograd; DSV4_COMPILE=0 turns it off (e.g. to debug, or where compilation is unavailable)."""
import functools

from ..dispatch import register
from ..reference import experts, mhc, norm, routing, sequence_attn, sinkhorn
from .torch_compile import lazily_compiled, training_on_gpu

weighted_swiglu = lazily_compiled(experts.weighted_swiglu)  # the grouped experts' hidden activation in training

IMPLEMENTATIONS = {
    "rms_norm": lazily_compiled(norm.rms_norm),
    "hc_mixes": lazily_compiled(mhc.hc_mixes),
    "hc_split_sinkhorn": lazily_compiled(sinkhorn.hc_split_sinkhorn),
    "hc_collapse": lazily_compiled(mhc.hc_collapse),
    "hc_post": lazily_compiled(mhc.hc_post),
    "moe_route": lazily_compiled(routing.moe_route),
    "sequence_attn": functools.partial(sequence_attn.sequence_attn,
                                       chunk_fn=lazily_compiled(sequence_attn.chunk_attn)),
}

for _op, _fn in IMPLEMENTATIONS.items():
    register(_op, "compiled", _fn, training_on_gpu)

"""Whether a run can fit on this machine, answered before anything heavy is built (tokenizer training for a
129K vocabulary, the corpus, the model): the parameters are counted on the meta device, and a run whose
estimated memory exceeds the device's is refused with both numbers instead of growing until the OS kills it.

The estimate is kept below what runs measure, so a run it refuses does not fit: fp32 weights and gradients
plus the optimizer's fp32 moments (AdamW keeps two a parameter; Muon one a matrix element, so a Muon run counts
one for every parameter), and the activations one micro-batch keeps for its backward pass at a rate taken below
the measured one (the small preset at 16 x 512 tokens peaked at 24.3 GB on an H100; estimated: 16.2 GB)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..config import ConfigError, ModelConfig
from ..model import Transformer
from ..model.transformer import FP32_PARAM_SUFFIXES
from .config import TrainConfig

__all__ = ["MemoryEstimate", "count_params", "estimate_memory", "device_memory", "check_fits"]

_STATE_BYTES = {"adamw": 16, "muon": 12}  # per parameter: fp32 weight + gradient + the optimizer's moments
_BLOCK_BYTES = 32        # per token, residual-stream element (dim x hc_mult) and block: what backward keeps
_LOGIT_BYTES = 8         # per token, vocabulary entry and prediction head: fp32 logits and their gradient


@dataclass(frozen=True)
class MemoryEstimate:
    params: int          # trained parameters, MTP included
    states: int          # bytes on one rank: weights, gradients, optimizer moments
    activations: int     # bytes on one rank: one micro-batch's saved activations and logits

    @property
    def total(self) -> int:
        return self.states + self.activations


def count_params(mcfg: ModelConfig) -> tuple[int, int]:
    """(main model, MTP blocks) parameter counts, without allocating them."""
    with torch.device("meta"):
        model = Transformer(mcfg)
    mtp = sum(p.numel() for p in model.mtp.parameters())
    return sum(p.numel() for p in model.parameters()) - mtp, mtp


def estimate_memory(cfg: TrainConfig, world: int = 1) -> MemoryEstimate:
    """A lower bound of one rank's memory for the run `cfg` on `world` ranks (states sharded over them)."""
    mcfg = cfg.model()
    main, mtp = count_params(mcfg)
    params = main + mtp
    tokens = math.ceil(cfg.batch_size / world) * cfg.seq_len
    blocks = mcfg.n_layers + mcfg.n_mtp_layers
    stream = tokens * mcfg.dim * mcfg.hc_mult
    if cfg.activation_checkpointing == "block":  # each block's input, and one block recomputed at a time
        kept = stream * (4 * blocks + _BLOCK_BYTES)
    else:
        kept = stream * _BLOCK_BYTES * blocks
    logits = tokens * mcfg.vocab_size * _LOGIT_BYTES * (1 + mcfg.n_mtp_layers)
    return MemoryEstimate(params, math.ceil(params * _STATE_BYTES[cfg.optimizer] / world), kept + logits)


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory the device has in all (a GPU's total; the machine's RAM, or its container's limit, for
    the CPU); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    if device.type != "cpu":
        return None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def check_fits(cfg: TrainConfig, device: torch.device, world: int = 1) -> MemoryEstimate:
    """Raise ConfigError when the run cannot fit on `device`; returns the estimate."""
    need = estimate_memory(cfg, world)
    have = device_memory(device)
    if have is not None and need.total > have:
        model = f"--model-config {cfg.model_config}" if cfg.model_config else f"--preset {cfg.preset}"
        ranks = f" per rank of {world}" if world > 1 else ""
        raise ConfigError(
            f"{model} needs at least {_size(need.total)} of memory to train{ranks} ({need.params / 1e9:.2f}B "
            f"parameters: {_size(need.states)} of fp32 weights, gradients and optimizer state, "
            f"{_size(need.activations)} of activations at batch {cfg.batch_size} x {cfg.seq_len} tokens), "
            f"but {'this machine' if device.type == 'cpu' else device} has {_size(have)}. Choose a smaller --preset, --batch-size or --seq-len, spread the "
            "run over more GPUs (torchrun), or pass --skip-memory-check to try anyway")
    return need


def _size(n: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e6:.2f} MB"


# ---------------------------------------------------------------------------------------------------------------
# Peak memory of one long-context training step (block recompute, chunked loss, context parallelism)
# ---------------------------------------------------------------------------------------------------------------

DENSE_WALK_PAIRS = 1 << 25  # ops.triton.sequence_attn: above this many query x entry pairs, per-query entry lists
_MOMENT_BYTES = {None: 0, "adamw": 8, "muon": 4}  # fp32 optimizer moments per parameter


@dataclass(frozen=True)
class StepMemory:
    """Predicted peak bytes of one training step on one rank, by part (see `step_memory`)."""
    seq_len: int
    cp: int
    parts: dict          # name -> bytes at the peak
    phase: str           # when the peak happens ("backward, block 3", "loss", ...)
    phases: dict         # every phase's parts (name -> {part: bytes}), the peak's among them

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def _block_bytes(model: Transformer, param_bytes: int, fp32: tuple[str, ...]) -> tuple[list[int], int]:
    """Bytes of each block's parameters (main blocks, then MTP blocks) and of everything else (embedding, head,
    final norms), in the stored dtypes (parameters named in `fp32` at 4 bytes, the others at `param_bytes`)."""
    def size(named) -> int:
        return sum(p.numel() * (4 if n.endswith(fp32) else param_bytes) for n, p in named)
    blocks = [size(b.named_parameters()) for b in (*model.layers, *model.mtp)]
    return blocks, size(model.named_parameters()) - sum(blocks)


def step_memory(mcfg: ModelConfig, seq_len: int, *, cp: int = 1, shards: int | None = None, act_bytes: int = 2,
                param_bytes: int = 4, optimizer: str | None = "adamw", recompute: bool = True,
                loss_chunk: int = 8192, ffn_chunk: int = 8192, fused_topk: bool = False) -> StepMemory:
    """Predicted peak memory of one forward + backward of one sequence of `seq_len` tokens on each of `cp`
    context-parallel ranks (activations of seq_len / cp tokens each), as dsv4's training path runs it on a GPU
    (Triton kernels, sparse stage without the indexer's KL loss, block recompute with its per-token half in
    `ffn_chunk` chunks, the LM loss in `loss_chunk` chunks; `recompute=False`: every activation kept).

    States: parameters and gradients in their stored dtypes (`param_bytes`; the parameters V4 keeps in fp32 at 4
    bytes), `optimizer` adds AdamW's two or Muon's one fp32 moment per parameter (None: a bare fwd + bwd, as
    bench/e2e.py times), all sharded over `shards` ranks (FSDP; default: the cp ranks) plus one block gathered
    whole. Gradients appear as the backward reaches their block (set_to_none between steps) while the block
    inputs kept for recomputation go: the peak is taken over the phases of the step and the blocks.

    Activations, per local token (C = dim, R = hc_mult, H x D attention heads, a = act_bytes):
      * kept for the whole step, per block (recomputation's checkpoints): the block's output lanes and the lanes
        after attention (R x C each), the attention's input and output (C each), mHC post/comb (fp32), the
        routing record; plus the embedding (C);
      * the attention segment, recomputed over all local tokens at once: attn_norm's output, wq_a's output and
        q_norm's, wq_b's output and the roped queries (H x D each), wkv's output and the roped kv, the
        compressor's fp32 input copies (wkv and wgate each make one) and its fp32 kv / score / biased score, then
        the attention output and its de-roped copy (H x D each), wo_a's output, the log-sum-exp; in the backward
        the output's gradient and the queries' (H x D each) and the lanes' gradients (R x C + 2 C);
      * per pair of local query and visible compressed entry: in CSA, the indexer's fp32 scores, two fp32
        temporaries and two bool masks at its top-k (14 bytes; `fused_topk` models a top-k that hands the
        attention its lists without materialising any of these: 0 bytes, only the lists), then the scores and the entry mask while the attention runs (5 bytes); in HCA the mask (1 byte);
        for the backward the attention keeps the mask, or past DENSE_WALK_PAIRS pairs its per-query entry lists
        (int32, top-k long in CSA, every visible entry in HCA);
      * one FFN chunk: the norm's input and output, the router's fp32 input, the routed experts' gathered inputs
        (k x C), SwiGLU inputs and output (3 k x F), the shared expert's (3 F), the output; in the backward the
        gathered inputs' and hidden activations' gradients;
      * the gathered compressed entries and indexer keys of the whole sequence (context parallelism's stage
        two), during the attention segment;
      * the loss: one chunk's fp32 logits, log-softmax and gradient (12 bytes a vocabulary entry), before the
        blocks' backward starts.
    Allocator fragmentation and CUDA / NCCL workspaces are not modelled.
    """
    if seq_len <= 0 or cp <= 0:
        raise ValueError(f"seq_len and cp must be positive, got {seq_len} and {cp}")
    if optimizer not in _MOMENT_BYTES:
        raise ValueError(f"optimizer={optimizer!r}: one of {sorted(map(str, _MOMENT_BYTES))}")
    shards = shards or cp
    with torch.device("meta"):
        model = Transformer(mcfg)
    blocks, rest = _block_bytes(model, param_bytes, FP32_PARAM_SUFFIXES)
    moments = sum(p.numel() for p in model.parameters()) * _MOMENT_BYTES[optimizer] / shards
    weights = (sum(blocks) + rest) / shards + (max(blocks) if shards > 1 else 0)
    a, C, R, H, D = act_bytes, mcfg.dim, mcfg.hc_mult, mcfg.n_heads, mcfg.head_dim
    qL, G, oL, k, E, F = (mcfg.q_lora_rank, mcfg.o_groups, mcfg.o_lora_rank, mcfg.n_activated_experts,
                          mcfg.n_routed_experts, mcfg.moe_inter_dim)
    Hi, Di = mcfg.index_n_heads, mcfg.index_head_dim
    s = -(-seq_len // cp)  # local tokens
    L = mcfg.n_layers + mcfg.n_mtp_layers  # MTP blocks (window-only) run after the main ones, like more blocks

    kept_block = 2 * R * C * a + 2 * C * a + 4 * R * (1 + R) + 8 * k + 4 * E
    ffn_saved = 3 * C * a + 4 * C + 8 * E + k * C * a + 3 * k * F * a + 3 * F * a
    ffn_grads = k * C * a + k * F * a
    lane_grads = R * C * a + 2 * C * a

    def attention(i: int, backward: bool) -> tuple[int, int]:
        """(bytes layer i's attention segment saves for its backward, its peak while it runs): the indexer's
        top-k, the end of the attention's forward, and (in the backward) the attention kernel's backward, where
        the de-roped output and wo_a's output are freed and the output's and the queries' gradients live."""
        m, kind = mcfg.compress_ratios[i], mcfg.layer_kind(i)
        n = seq_len // m if m else 0            # entries visible to the last local query
        pre = C * a + 2 * qL * a + 2 * H * D * a + 2 * D * a
        gathered = 0
        if m:
            pre += 8 * C + 12 * (2 if kind == "csa" else 1) * D
            gathered = n * D * a + (n * Di * a if kind == "csa" else 0)
        if m and s * n > DENSE_WALK_PAIRS:     # the kernel's entry lists
            kept_pairs = s * 4 * (min(mcfg.index_topk, n) if kind == "csa" else n)
        else:                                   # the kernel reads the mask itself
            kept_pairs = s * n
        live_pairs = s * n * (5 if kind == "csa" else 1)  # the indexer's scores and the mask, while attending
        if kind == "csa" and fused_topk:       # top-k lists straight from the indexer: no query x entry tensor
            live_pairs, kept_pairs = 0, s * 4 * min(mcfg.index_topk, n)
        saved = s * (pre + 2 * H * D * a + G * oL * a + 4 * H) + gathered + kept_pairs
        grads = s * lane_grads if backward else 0
        peaks = [saved + live_pairs + grads]
        if backward:
            peaks.append(saved - s * (H * D * a + G * oL * a) + s * 2 * H * D * a + grads)
        if kind == "csa" and not fused_topk:
            peaks.append(s * (pre + Hi * Di * a + 4 * Hi) + 14 * s * n + gathered + grads)
        return saved, max(peaks)

    def ffn(tokens: int, backward: bool) -> int:
        return tokens * (ffn_saved + (ffn_grads if backward else 0))

    phases = {}
    embed = s * C * a
    if recompute:
        for i in range(L):  # forward: the kept checkpoints so far, one segment's transients
            phases[f"forward, block {i}"] = {"kept_activations": embed + s * kept_block * i,
                                             "working_set": max(attention(i, False)[1], ffn(min(s, ffn_chunk), False))}
        kept_all = embed + s * kept_block * L
        phases["loss"] = {"kept_activations": kept_all, "working_set": min(s, loss_chunk) * mcfg.vocab_size * 12}
        for i in reversed(range(L)):  # backward, last block first: its gradients arrive, its checkpoints go
            phases[f"backward, block {i}"] = {
                "kept_activations": embed + s * kept_block * (i + 1), "gradients": (rest + sum(blocks[i:])) / shards,
                "working_set": max(attention(i, True)[1], ffn(min(s, ffn_chunk), True))}
    else:
        saved = [attention(i, False)[0] + ffn(s, False) + s * kept_block for i in range(L)]
        phases["loss"] = {"kept_activations": embed + sum(saved), "working_set": s * mcfg.vocab_size * 12}
        for i in reversed(range(L)):
            phases[f"backward, block {i}"] = {
                "kept_activations": embed + sum(saved[:i + 1]), "gradients": (rest + sum(blocks[i:])) / shards,
                "working_set": attention(i, True)[1] - attention(i, False)[0] + ffn(s, True) - ffn(s, False)}
    phases = {name: {key: int(v) for key, v in {"weights": weights, "optimizer": moments, "gradients": 0,
                                                   **parts}.items()} for name, parts in phases.items()}
    peak = max(phases, key=lambda name: sum(phases[name].values()))
    return StepMemory(seq_len, cp, phases[peak], peak, phases)


def longest_context(mcfg: ModelConfig, n_gpus: int, gpu_bytes: float, step: int = 8192, **kw) -> int:
    """The longest sequence (a multiple of `step`) whose predicted step fits in `gpu_bytes` on each of `n_gpus`
    context-parallel ranks (0 if none does)."""
    def fits(n: int) -> bool:
        return step_memory(mcfg, n, cp=n_gpus, **kw).total <= gpu_bytes
    lo, hi = 0, step
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 26:
            return lo
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo

"""Block, MTP block and the whole DeepSeek-V4 Transformer (docs/architecture.md#overview, #mtp).

embedding -> hc_mult identical residual lanes -> blocks (mHC around attention and MoE) -> hc_head collapse
-> final RMSNorm -> LM head in fp32. Parameter names are the official checkpoint names, except that the
routed experts are stacked (`ffn.experts.w1` is [E, F, C]; the checkpoint has `ffn.experts.{e}.w1.weight`).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, ContextManager, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..cache import KVCache
from ..config import ModelConfig
from .attention import Attention
from .context import SequenceContext
from .documents import PackedDocuments
from .mhc import hc_head, hc_post, hc_pre, init_hc_params
from .moe import MoE
from .norm import Linear, RMSNorm

# Parameters the reference keeps in fp32 whatever the model dtype (docs/architecture.md#fp32-parameters).
FP32_PARAM_SUFFIXES = ("norm.weight", "attn_sink", "ape", "compressor.wkv.weight", "compressor.wgate.weight",
                       "gate.bias", "hc_attn_fn", "hc_attn_base", "hc_attn_scale", "hc_ffn_fn", "hc_ffn_base",
                       "hc_ffn_scale", "hc_head_fn", "hc_head_base", "hc_head_scale", "head.weight")


class Block(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.layer_id = layer_id
        self.norm_eps, self.hc_eps, self.hc_iters = cfg.norm_eps, cfg.hc_eps, cfg.hc_sinkhorn_iters
        self.hc_mode = cfg.hc_mode
        self.attn = Attention(layer_id, cfg)
        self.ffn = MoE(layer_id, cfg)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.record_hc = False  # keep the last comb matrices (for the residual-gain metric)
        self.last_combs: list[torch.Tensor] = []
        self._combs_done = False  # set once a forward has recorded them (a backward recompute must not add more)
        # entered around each recompute of forward_recomputed's segments in the backward pass (None: nothing);
        # a placement that shards the block's parameters sets it to have them gathered there
        self.recompute_context: Callable[[], ContextManager] | None = None
        if self.hc_mode != "none":
            mix, width = (2 + cfg.hc_mult) * cfg.hc_mult, cfg.hc_mult * cfg.dim
            for site in ("attn", "ffn"):
                self.register_parameter(f"hc_{site}_fn", nn.Parameter(torch.empty(mix, width)))
                self.register_parameter(f"hc_{site}_base", nn.Parameter(torch.empty(mix)))
                self.register_parameter(f"hc_{site}_scale", nn.Parameter(torch.empty(3)))

    def _hc_pre(self, x: torch.Tensor, site: str):
        if self.hc_mode == "none":
            return x[:, :, 0], None, None
        y, post, comb = hc_pre(x, getattr(self, f"hc_{site}_fn"), getattr(self, f"hc_{site}_scale"),
                               getattr(self, f"hc_{site}_base"), self.hc_iters, self.norm_eps, self.hc_eps,
                               constrained=self.hc_mode == "mhc")
        if self.record_hc and not self._combs_done:
            self.last_combs.append(comb.detach())
        return y, post, comb

    @staticmethod
    def _hc_post(f: torch.Tensor, x: torch.Tensor, post, comb) -> torch.Tensor:
        return x + f.unsqueeze(2) if post is None else hc_post(f, x, post, comb)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None, pos0: torch.Tensor | None = None,
                cache=None, docs: PackedDocuments | None = None) -> torch.Tensor:
        """x: [B, S, R, C] lanes, row b at positions pos0[b].. (None: 0) -> [B, S, R, C]. `docs`: the rows are
        packed documents, each attending only to itself (from position 0; no cache)."""
        self.last_combs, self._combs_done = [], False
        y, post, comb = self._hc_pre(x, "attn")
        x = self._hc_post(self._attention(y, pos0, cache, docs), x, post, comb)
        y, post, comb = self._hc_pre(x, "ffn")
        return self._hc_post(self.ffn(self.ffn_norm(y), token_ids), x, post, comb)

    def forward_recomputed(self, x: torch.Tensor, token_ids: torch.Tensor | None, *args,
                           chunk: int = 8192) -> torch.Tensor:
        """forward for training with activation checkpointing: everything is recomputed in the backward pass,
        in segments that are each small at long context: the attention whole (it mixes positions), everything
        per token (mHC pre/post, norms, the MoE) in chunks of `chunk` tokens. Same values and gradients as
        forward; the MoE's routing and the mHC record cover the whole batch as after forward."""
        spans = [slice(s, s + chunk) for s in range(0, x.shape[1], chunk)]
        self._combs_done = True  # recorded below from the chunks' outputs, not by the (re)computations
        ckpt = self._ckpt
        y, post, comb = _cat_seq([ckpt(self._hc_pre, x[:, sl], "attn") for sl in spans])
        f = ckpt(self._attention, y, *args)
        x = torch.cat([ckpt(self._hc_post, f[:, sl], x[:, sl], _seq(post, sl), _seq(comb, sl)) for sl in spans], 1)
        outs, ffn_combs, routes = [], [], []
        for sl in spans:
            out, ffn_comb, *route = ckpt(self._ffn_chunk, x[:, sl], None if token_ids is None else token_ids[:, sl])
            outs.append(out)
            ffn_combs.append(ffn_comb)
            routes.append(route)
        B = x.shape[0]  # routing of the whole batch in [B*S] order (balance loss, expert loads)
        self.ffn.last_routing = tuple(torch.cat([t.unflatten(0, (B, -1)) for t in parts], 1).flatten(0, 1)
                                      for parts in zip(*routes))
        if self.record_hc and comb is not None:
            self.last_combs = [comb.detach(), torch.cat(ffn_combs, 1).detach()]
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)

    def _ckpt(self, fn, *args):
        """fn(*args) whose activations are dropped and recomputed in the backward pass, inside
        `recompute_context`."""
        if self.recompute_context is None:
            return checkpoint(fn, *args, use_reentrant=False)
        recompute = self.recompute_context
        return checkpoint(fn, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), recompute()))

    def _attention(self, y: torch.Tensor, pos0: torch.Tensor | None = None, cache=None,
                   docs: PackedDocuments | None = None) -> torch.Tensor:
        if docs is None:
            return self.attn(self.attn_norm(y), pos0, cache)
        kls: list[tuple[torch.Tensor, int]] = []

        def alone(x: torch.Tensor) -> torch.Tensor:
            out = self.attn(x)
            if self.attn.indexer_kl is not None:
                kls.append((self.attn.indexer_kl, x.shape[0] * x.shape[1]))
            return out
        out = docs.per_document(alone, self.attn_norm(y))
        if kls:  # each batch of documents left its own KL: their mean over queries
            self.attn.indexer_kl = sum(kl * n for kl, n in kls) / sum(n for _, n in kls)
        return out

    def _ffn_chunk(self, x: torch.Tensor, token_ids: torch.Tensor | None):
        """The FFN half returning its mHC comb and routing as outputs; the MoE's record is left as it was, so a
        recompute in the backward pass cannot overwrite the whole-batch routing."""
        kept = self.ffn.last_routing
        try:  # (a recompute may stop early, by an exception, once it has what the backward needs)
            y, post, comb = self._hc_pre(x, "ffn")
            out = self._hc_post(self.ffn(self.ffn_norm(y), token_ids), x, post, comb)
            route = self.ffn.last_routing
        finally:
            self.ffn.last_routing = kept
        return (out, comb, *route)


def _seq(t: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
    return None if t is None else t[:, sl]


def _cat_seq(parts: list[tuple]) -> tuple:
    """Join per-chunk tuples of tensors (or None) along the sequence."""
    return tuple(None if ts[0] is None else torch.cat(ts, 1) for ts in zip(*parts))


class MTPBlock(Block):
    """Multi-token prediction: combines the main model's lanes at position t with the embedding of token t+1
    (the caller passes those shifted ids) and predicts token t+2 through a window-only block and its own
    hc_head, sharing the embedding and LM head with the main model."""

    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__(layer_id, cfg)
        self.e_proj = Linear(cfg.dim, cfg.dim, bias=False)
        self.h_proj = Linear(cfg.dim, cfg.dim, bias=False)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        _add_hc_head(self, cfg)

    def forward(self, h: torch.Tensor, embedded: torch.Tensor, token_ids: torch.Tensor,
                pos0: torch.Tensor | None = None, cache=None, docs: PackedDocuments | None = None) -> torch.Tensor:
        """h: [B, S, R, C] lanes of the previous depth; embedded: [B, S, C] embedding of the ids -> new lanes."""
        return super().forward(self._combine(h, embedded), token_ids, pos0, cache, docs)

    def forward_recomputed(self, h: torch.Tensor, embedded: torch.Tensor, token_ids: torch.Tensor, *args,
                           chunk: int = 8192) -> torch.Tensor:
        return super().forward_recomputed(self._combine(h, embedded), token_ids, *args, chunk=chunk)

    def _combine(self, h: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        return self.e_proj(self.enorm(embedded)).unsqueeze(2) + self.h_proj(self.hnorm(h))

    def collapse(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(_collapse(self, h, self.norm_eps, self.hc_eps))


def _checked_docs(docs: PackedDocuments, tokens: torch.Tensor, cache, context) -> PackedDocuments:
    if cache is not None:
        raise ValueError("packed documents run without a cache (they are for training on whole sequences)")
    if context is not None:
        raise ValueError("packed documents run on whole rows, not under context parallelism")
    docs.check(tokens)
    return docs


def _add_hc_head(owner: nn.Module, cfg: ModelConfig) -> None:
    """The final lane collapse's parameters (none with a single plain residual lane)."""
    if cfg.hc_mode != "none":
        owner.hc_head_fn = nn.Parameter(torch.empty(cfg.hc_mult, cfg.hc_mult * cfg.dim))
        owner.hc_head_base = nn.Parameter(torch.empty(cfg.hc_mult))
        owner.hc_head_scale = nn.Parameter(torch.empty(1))


def _collapse(owner: nn.Module, h: torch.Tensor, norm_eps: float, hc_eps: float) -> torch.Tensor:
    if not hasattr(owner, "hc_head_fn"):
        return h[:, :, 0]
    return hc_head(h, owner.hc_head_fn, owner.hc_head_scale, owner.hc_head_base, norm_eps, hc_eps)


class Transformer(nn.Module):
    """The whole model. `model(tokens)` -> fp32 logits [B, T, vocab] for every position; position t depends
    only on tokens <= t. With a cache (dsv4.cache) the tokens continue the cached sequence."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(i, cfg) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        _add_hc_head(self, cfg)
        self.mtp = nn.ModuleList(MTPBlock(cfg.n_layers + k, cfg) for k in range(cfg.n_mtp_layers))

    # ------------------------------------------------------------------ configuration switches
    def set_quant_sim(self, enabled: bool) -> "Transformer":
        """Reproduce the reference's inference-time QAT simulation: FP8 (1x64, pow2 scales) on the KV nope
        dims and Hadamard + FP4 (1x32) on indexer queries/keys. Off by default (and for parity with
        transformers, which does not simulate it)."""
        self._quant_sim = enabled
        return self._set_numerics()

    def set_qat(self, enabled: bool) -> "Transformer":
        """FP4 quantisation-aware training (V4 §3.4): routed-expert weights and the indexer's query/key path
        run through MXFP4 round trips in the forward pass; gradients pass straight through."""
        self._qat = enabled
        return self._set_numerics()

    def _set_numerics(self) -> "Transformer":
        sim, qat = getattr(self, "_quant_sim", False), getattr(self, "_qat", False)
        for m in self.modules():
            if isinstance(m, Attention):
                m.quant_sim = sim
                if hasattr(m, "indexer"):
                    m.indexer.fp4 = sim or qat
            elif isinstance(m, MoE):
                m.qat = qat
        return self

    def set_activation_checkpointing(self, enabled: bool) -> "Transformer":
        """Training memory for long sequences: keep only each block's input lanes and recompute the block in the
        backward pass (one extra forward, ~1/3 more compute), its per-token half in token chunks."""
        self._checkpoint_blocks = enabled
        for m in self.modules():
            if isinstance(m, Attention):
                m.recomputed = enabled
        return self

    def set_sequence_context(self, context: SequenceContext | None) -> "Transformer":
        """Context parallelism (dsv4.model.context): this process holds pieces of the sequences, and its forward
        passes take those pieces' tokens (`context.positions` says where they sit). None: whole sequences."""
        self._sequence_context = context
        for m in self.modules():
            if isinstance(m, Attention):
                m.sequence_context = context
        return self

    @property
    def sequence_context(self) -> SequenceContext | None:
        return getattr(self, "_sequence_context", None)

    @property
    def recomputes(self) -> bool:
        """Whether this forward pass trades compute for memory (activation checkpointing while training)."""
        return getattr(self, "_checkpoint_blocks", False) and torch.is_grad_enabled() and self.training

    def _run_block(self, block: nn.Module, *args) -> torch.Tensor:
        return block.forward_recomputed(*args) if self.recomputes else block(*args)

    def to_dtype(self, dtype: torch.dtype) -> "Transformer":
        """Cast to `dtype`, keeping in fp32 what the reference keeps in fp32 (norms, mHC, sinks, ape, head...)."""
        for name, p in self.named_parameters():
            p.data = p.data.to(torch.float32 if name.endswith(FP32_PARAM_SUFFIXES) else dtype)
        return self

    def new_cache(self, batch_size: int, max_seq_len: int, kv_dtype: str = "auto",
                  index_dtype: str = "auto") -> KVCache:
        """An empty inference cache on the model's device. kv_dtype: auto (the model dtype), fp32, bf16 or
        fp8 (the official 584-byte serving record); index_dtype: auto, fp32, bf16, fp8 or fp4."""
        return KVCache(self.config, batch_size, max_seq_len, kv_dtype, index_dtype, self.dtype,
                       self.embed.weight.device)

    def reset_buffers(self) -> "Transformer":
        """Recompute derived (non-checkpoint) buffers, e.g. after `to_empty` from the meta device."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.reset_buffers()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    # ------------------------------------------------------------------ forward
    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            raise ValueError(f"tokens must be an int tensor [batch, seq], got "
                             f"{getattr(tokens, 'shape', type(tokens).__name__)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be int64 (or int32), got {tokens.dtype}")
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return  # no host sync inside a CUDA graph (the decoder checks the ids it feeds before replay)
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got range "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")

    def _on_model_device(self, tokens: torch.Tensor) -> torch.Tensor:
        """Ids given on the host for a model on a GPU, sent there from pinned memory without waiting (a blocking
        copy would drain the device's queue, as reading device ids back for the range check would)."""
        device = self.embed.weight.device
        if tokens.device == device or tokens.device.type != "cpu":
            return tokens
        return tokens.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tokens.to(device)

    def hidden(self, tokens: torch.Tensor, cache=None, docs: PackedDocuments | None = None,
               pos0: torch.Tensor | None = None) -> torch.Tensor:
        """Lanes after the last block [B, S, R, C] (the input of hc_head, and of the MTP blocks). `docs`: the
        rows are packed documents (dsv4.model.documents), each computed as if alone; not with a cache. `pos0`
        [B]: with a cache, the step's start positions as the caller made them (`plan_window`: a step inside a
        cache checkpoint); the cache's device positions then stay (its rollback sets them)."""
        self._check_tokens(tokens)   # (ids on the host are checked there: no wait for the device's queue)
        tokens = self._on_model_device(tokens)
        self._forget_last_step()
        packed = () if docs is None else (_checked_docs(docs, tokens, cache, self.sequence_context),)
        planned = pos0 is not None
        pos0 = None if cache is None else cache.begin(tokens.shape, pos0)
        if self.sequence_context is not None:
            self.sequence_context.begin()
        h = self._lanes(tokens)
        for i, layer in enumerate(self.layers):
            h = self._run_block(layer, h, tokens, pos0, None if cache is None else cache.layer(i), *packed)
        if cache is not None:
            cache.end(tokens.shape[1], device=not planned)
        return h

    def _lanes(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens).unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1)

    def _forget_last_step(self) -> None:
        """Drop the previous step's training records (routing affinities, indexer KL). They hold that step's
        autograd graph, whose gradient accumulators the new step would otherwise reuse: bound to the stream the
        old step ran on, they break a CUDA graph captured on another."""
        for block in (*self.layers, *self.mtp):
            block.ffn.last_routing = None
            block.attn.indexer_kl = None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Lanes [B, S, R, C] -> fp32 logits [B, S, vocab]."""
        y = self.norm(_collapse(self, h, self.config.norm_eps, self.config.hc_eps))
        return ops.linear_fp32(y, self.head.weight)

    def forward(self, tokens: torch.Tensor, cache=None, last_only: bool = False) -> torch.Tensor:
        """tokens [B, S] int64 -> fp32 logits [B, S, vocab] ([B, 1, vocab] with last_only). The ids may be on the
        host for a model on a GPU: they are checked there and sent without a wait."""
        h = self.hidden(tokens, cache)
        return self.logits(h[:, -1:] if last_only else h)

    def mtp_logits(self, h: torch.Tensor, next_tokens: Sequence[torch.Tensor],
                   docs: PackedDocuments | None = None) -> list[torch.Tensor]:
        """Chain the MTP blocks: depth k pairs the lanes of position t with token t+k+1 (`next_tokens[k]`,
        [B, S], the caller's shifted ids) and returns logits for token t+k+2 at every position. `docs`: as in
        `hidden` (a document's ids past its end are the caller's filler; its predictions there mean nothing)."""
        return [ops.linear_fp32(block.collapse(hk), self.head.weight)
                for block, hk in zip(self.mtp, self.mtp_hidden(h, next_tokens, docs))]

    def mtp_hidden(self, h: torch.Tensor, next_tokens: Sequence[torch.Tensor],
                   docs: PackedDocuments | None = None) -> list[torch.Tensor]:
        """mtp_logits' lanes of each depth [B, S, R, C], before its block's collapse and the shared head."""
        out = []
        packed = () if docs is None else (None, None, docs)
        for block, ids in zip(self.mtp, next_tokens):
            h = self._run_block(block, h, self.embed(ids), ids, *packed)
            out.append(h)
        return out

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02, matrices: bool = True) -> "Transformer":
        """Random init for training from scratch. Output projections (wo_b, w2) are scaled by
        1/sqrt(2 * n_layers) as in GPT-2; mHC starts near a plain residual (see mhc.init_hc_params).
        matrices=False leaves the weight matrices as they are and sets only the rest (norms, sinks, biases, mHC,
        hash tables): for a model whose matrices were drawn or loaded elsewhere."""
        g = torch.Generator().manual_seed(seed)
        cfg = self.config
        out_std = std / math.sqrt(2 * cfg.n_layers)
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif leaf in ("attn_sink", "ape", "bias"):
                p.zero_()
            elif "hc_" in leaf:
                continue  # below, per (fn, base, scale) triple
            elif matrices:
                s = out_std if name.endswith(("wo_b.weight", "experts.w2", "shared_experts.w2.weight")) else std
                p.copy_(torch.randn(p.shape, generator=g) * s)
        for owner, prefix in [(b, "hc_attn") for b in list(self.layers) + list(self.mtp)] + \
                             [(b, "hc_ffn") for b in list(self.layers) + list(self.mtp)] + \
                             [(m, "hc_head") for m in [self] + list(self.mtp)]:
            if hasattr(owner, f"{prefix}_fn"):
                init_hc_params(getattr(owner, f"{prefix}_fn"), getattr(owner, f"{prefix}_base"),
                               getattr(owner, f"{prefix}_scale"), cfg.hc_mult, g, constrained=cfg.hc_mode == "mhc")
        for m in self.modules():
            if getattr(m, "hashed", False):  # a fixed random token -> distinct experts table
                m.tid2eid.copy_(torch.rand(cfg.vocab_size, cfg.n_routed_experts, generator=g)
                                .argsort(-1)[:, :cfg.n_activated_experts])
        return self

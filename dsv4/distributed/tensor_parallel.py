"""Sharded inference for checkpoints larger than one GPU, sharded as the reference shards them: attention heads
tensor-parallel (wq_b rows, attn_sink, wo_a head groups, wo_b columns + an all-reduce of the output), routed
experts expert-parallel by contiguous ranges (partial sums all-reduced); the rest replicated. Each rank reads
only its slices from the safetensors shards (plain tensors through `get_slice`; FP8/FP4 tensors one at a time,
dequantised, then sliced). The indexer is replicated here (the reference shards its heads too)."""
from __future__ import annotations

import os
import re
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from tqdm.auto import tqdm

from ..checkpoint.load import list_shards
from ..checkpoint.names import official_to_native, to_official
from ..checkpoint.safetensors_io import CheckpointError, ShardReader, read_header
from ..config import ModelConfig
from ..model import Transformer
from ..model.attention import Attention
from ..model.moe import MoE
from ..quant import dequant_fp4_blocks, dequant_fp8_blocks
from .expert_parallel import _all_reduce, expert_range

_ROWS = re.compile(r"\.attn\.(wq_b\.weight|attn_sink|wo_a\.weight)$")
_COLS = re.compile(r"\.attn\.wo_b\.weight$")


def _sum_over(group, x: torch.Tensor) -> torch.Tensor:
    y = x.float()
    dist.all_reduce(y, group=group)
    return y.to(x.dtype)


def _shard_attention(a: Attention, cfg: ModelConfig, world: int, group) -> None:
    if cfg.n_heads % world or cfg.o_groups % world:
        raise ValueError(f"n_heads={cfg.n_heads} and o_groups={cfg.o_groups} must be divisible by {world} ranks")
    hl, gl, D, r = cfg.n_heads // world, cfg.o_groups // world, cfg.head_dim, cfg.o_lora_rank
    a.n_heads, a.n_groups = hl, gl
    dt = a.wq_b.weight.dtype
    a.wq_b.weight = nn.Parameter(torch.empty(hl * D, cfg.q_lora_rank, dtype=dt))
    a.attn_sink = nn.Parameter(torch.empty(hl, dtype=torch.float32))
    a.wo_a.weight = nn.Parameter(torch.empty(gl * r, cfg.n_heads * D // cfg.o_groups, dtype=dt))
    a.wo_b.weight = nn.Parameter(torch.empty(cfg.dim, gl * r, dtype=dt))
    a.output_reduce = partial(_sum_over, group)


def load_sharded(path: str | os.PathLike, mesh: DeviceMesh, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.bfloat16) -> Transformer:
    """This rank's part of the model in `path`; run it on the same tokens on every rank of `mesh`."""
    path = os.fspath(path)
    cfg = ModelConfig.from_pretrained(path)
    group, world, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
    files = list_shards(path)
    headers = {to_official(n): (n, i) for f in files for n, i in read_header(f).items()}
    if cfg.n_mtp_layers and not any(k.startswith("mtp.") for k in headers):
        cfg = cfg.replace(n_mtp_layers=0, compress_ratios=cfg.compress_ratios[: cfg.n_layers])
    offset, per = expert_range(cfg.n_routed_experts, world, rank)
    with torch.device("meta"):
        model = Transformer(cfg).to_dtype(dtype)
        for m in model.modules():
            if isinstance(m, Attention):
                _shard_attention(m, cfg, world, group)
            elif isinstance(m, MoE):
                for name in ("w1", "w2", "w3"):
                    full = getattr(m.experts, name)
                    setattr(m.experts, name, nn.Parameter(torch.empty(per, *full.shape[1:], dtype=full.dtype)))
                m.dispatch = partial(_all_reduce, moe=m, group=group, offset=offset, per=per, world=world)
    model.to_empty(device=device)
    model.reset_buffers()
    params = dict(model.named_parameters())
    params.update((n, b) for n, b in model.named_buffers() if n.endswith("tid2eid"))
    filled: set[str] = set()
    hl, gl = cfg.n_heads // world, cfg.o_groups // world
    rows = {"wq_b.weight": (rank * hl * cfg.head_dim, hl * cfg.head_dim), "attn_sink": (rank * hl, hl),
            "wo_a.weight": (rank * gl * cfg.o_lora_rank, gl * cfg.o_lora_rank)}
    cols = (rank * gl * cfg.o_lora_rank, gl * cfg.o_lora_rank)
    by_file: dict[str, list] = {}
    for off, (name, info) in headers.items():
        if not off.endswith(".scale"):
            by_file.setdefault(info.file, []).append((off, name, info))
    with torch.no_grad():
        for f in tqdm(files, desc=f"rank {rank} loading", disable=rank != 0 or len(files) < 4):
            reader = ShardReader(f)
            for off, name, info in by_file.get(f, []):
                for t in official_to_native(off, cfg.moe_inter_dim):
                    if t.param not in params:
                        raise CheckpointError(f"unexpected tensor '{name}'")
                    if t.expert is not None and not offset <= t.expert < offset + per:
                        continue                                            # another rank's expert
                    value = _read(reader, off, name, headers, rows, cols)
                    dst = params[t.param].data
                    if t.expert is not None:
                        dst = dst[t.expert - offset]
                    elif t.rows is not None or dst.dim() == 3:             # transformers' fused expert stacks
                        value = value[offset:offset + per]
                        value = value if t.rows is None else value[:, t.rows]
                    if tuple(value.shape) != tuple(dst.shape):
                        raise CheckpointError(f"tensor '{name}' gives {tuple(value.shape)} on rank {rank}, "
                                              f"expected {tuple(dst.shape)}")
                    dst.copy_(value)
                    filled.add(t.param if t.expert is None else f"{t.param}[{t.expert}]")
    expected = {n for n, p in params.items() if not n.endswith(("experts.w1", "experts.w2", "experts.w3"))}
    expected |= {f"{n}[{e}]" for n in params if n.endswith(("experts.w1", "experts.w2", "experts.w3"))
                 for e in range(offset, offset + per)}
    fused = {n.rsplit("[", 1)[0] for n in filled if "[" not in n}
    missing = sorted(n for n in expected - filled if n.rsplit("[", 1)[0] not in fused)
    if missing:
        raise CheckpointError(f"rank {rank}: missing tensors {missing[:10]}")
    return model.eval()


def _read(reader: ShardReader, off: str, name: str, headers: dict, rows: dict, cols: tuple[int, int]):
    """The slice of one checkpoint tensor this rank keeps (whole tensors for replicated parameters)."""
    scale = headers.get(off[: -len("weight")] + "scale") if off.endswith(".weight") else None
    m_rows, m_cols = _ROWS.search(off), _COLS.search(off)
    if scale is not None:  # quantised: decode the whole tensor (one at a time), then slice
        t = reader.get(name)
        s = ShardReader(scale[1].file).get(scale[0])
        full = dequant_fp8_blocks(t, s) if t.element_size() == 1 and t.dtype == torch.float8_e4m3fn \
            else dequant_fp4_blocks(t, s)
    else:
        sl = reader._f.get_slice(name)
        if m_rows:
            a, n = rows[m_rows.group(1)]
            return sl[a:a + n]
        if m_cols:
            return sl[:, cols[0]:cols[0] + cols[1]]
        return sl[:]
    if m_rows:
        a, n = rows[m_rows.group(1)]
        return full[a:a + n]
    if m_cols:
        return full[:, cols[0]:cols[0] + cols[1]]
    return full

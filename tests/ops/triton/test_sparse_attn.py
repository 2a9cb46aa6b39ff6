"""ops/triton/sparse_attn.py (attention over index lists, inference) against the float64 reference."""
from types import SimpleNamespace

import pytest
import torch

from dsv4.cache.layout import RowStore
from dsv4.ops.reference.sparse_attn import sparse_attn as ref_attn
from dsv4.ops.triton import sparse_attn
from dsv4.ops.triton.sparse_attn import sparse_attn as tri_attn

from .device import DEV, DT, ON_GPU, TOL, cases, gen, randn, rel_err

# B, S, H, D, N (rows), K (list length)
LIST_SHAPES = cases(cpu=[(2, 3, 4, 32, 20, 19), (1, 2, 20, 64, 50, 70)],
                    gpu=[(2, 5, 64, 512, 700, 640), (3, 2, 16, 128, 300, 200), (1, 3, 128, 512, 900, 1152)])


@pytest.mark.parametrize("draw", [0, 1])  # fresh random inputs per draw
@pytest.mark.parametrize("B, S, H, D, N, K", LIST_SHAPES)
def test_index_lists(B, S, H, D, N, K, draw):
    """Rows picked by index lists with -1 slots (30%) and a query that sees nothing (output 0): one slice per query,
    and split-K with the merge (decode)."""
    g = gen(draw)
    q, kv = randn(B, S, H, D, g=g, dtype=DT), randn(B, N, D, g=g, dtype=DT)
    sink = randn(H, g=g)
    idx = torch.randint(0, N, (B, S, K), generator=g)
    idx[torch.rand(B, S, K, generator=g) < 0.3] = -1
    idx[0, 0] = -1
    idx = idx.to(DEV)
    ref = ref_attn(q.double(), kv.double(), sink.double(), idx, D ** -0.5)
    for splits in (None, 1, 3):
        out = tri_attn(q, kv, sink, idx, D ** -0.5, splits=splits)
        assert torch.isfinite(out).all() and rel_err(out, ref) < TOL, (splits, rel_err(out, ref))


# B, S, H, D, rope_dim, N1 (rows), N2 (entries), K; on the GPU also batched decode (its own configuration), V4 sizes
ENTRY_SHAPES = [(2, 3, 4, 64, 16, 10, 30, 24), (1, 2, 16, 128, 64, 5, 40, 33)]
ENTRY_SHAPES += [(32, 1, 64, 512, 64, 128, 600, 640)] if ON_GPU else []


@pytest.mark.parametrize("B, S, H, D, rd, N1, N2, K", ENTRY_SHAPES)
def test_entries_as_a_second_source(B, S, H, D, rd, N1, N2, K):
    """Entries after the rows in the index space (rows N1..), read as stored: FP8 serving records, and float
    entries (no copy joins them to the rows)."""
    g = gen()
    q, kv = randn(B, S, H, D, g=g, dtype=DT), randn(B, N1, D, g=g, dtype=DT)
    store = RowStore("fp8", B, N2, D, rd, "kv", DT, DEV)
    store.write(torch.arange(N2, device=DEV).expand(B, N2), randn(B, N2, D, g=g) * 3)
    sink = randn(H, g=g)
    idx = torch.randint(-1, N1 + N2, (B, S, K), generator=g).to(DEV)
    for splits in (None, 2):
        a = tri_attn(q, kv, sink, idx, D ** -0.5, store.records(N2), rd, splits=splits)
        r = ref_attn(q.double(), torch.cat((kv, store.read(N2)), 1).double(), sink.double(), idx, D ** -0.5)
        assert rel_err(a, r) < TOL, ("fp8 entries", splits, rel_err(a, r))
        ent = randn(B, N2, D, g=g, dtype=DT)
        a = tri_attn(q, kv, sink, idx, D ** -0.5, ent, splits=splits)
        r = ref_attn(q.double(), torch.cat((kv, ent), 1).double(), sink.double(), idx, D ** -0.5)
        assert rel_err(a, r) < TOL, ("float entries", splits, rel_err(a, r))


def test_fp8_cache_read_is_dispatched_only_from_sm_89(monkeypatch):
    """The sparse attention reads FP8 serving records with e4m3 conversions that sm_80 (A100) lacks: there the
    reference serves FP8 caches; bf16 entries use the kernel on every GPU."""
    q = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, shape=(1, 1, 64, 512), device="cuda:0")
    records, rows = torch.empty(1, 4, 656, dtype=torch.uint8), torch.empty(1, 4, 512, dtype=torch.bfloat16)
    for capability, fp8_ok in (((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert sparse_attn.supports(q, None, None, None, 1.0, entries=records, rope_dim=64) is fp8_ok
        assert sparse_attn.supports(q, None, None, None, 1.0, entries=rows)
    # records are decoded in 64-value blocks: narrower heads take the reference, and the kernel says why
    narrow = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, shape=(1, 1, 4, 32), device="cuda:0")
    assert not sparse_attn.supports(narrow, None, None, None, 1.0, entries=records[..., :40], rope_dim=8)
    with pytest.raises(ValueError, match="64-value blocks"):
        sparse_attn.sparse_attn(torch.zeros(1, 1, 4, 32), torch.zeros(1, 2, 32), torch.zeros(4),
                                torch.zeros(1, 1, 2, dtype=torch.long), 1.0, records[..., :40], 8)


def test_launches_build_for_gpus(native_build):
    native_build()

"""ops/triton/packed_experts.py (grouped FP4 experts) against ops/reference/packed.py: decode-sized batches, an
expert with more than one 16-row tile, unused experts, and the SwiGLU clamp."""
import json

import pytest
import torch

from dsv4.ops.reference.packed import moe_experts_fp4 as ref_moe
from dsv4.ops.triton import packed_experts as tpe
from dsv4.ops.triton import packed_linear
from dsv4.ops.triton.packed_experts import moe_experts_fp4 as tri_moe
from dsv4.quant.packed import Fp4GroupWeight

from .device import DEV, DT, INTERPRETED, TOL, gen, randn, rel_err


def _experts(E, F, C, g):
    w1, w3 = (Fp4GroupWeight.quantize(torch.randn(E, F, C, generator=g) / C ** 0.5) for _ in range(2))
    w2 = Fp4GroupWeight.quantize(torch.randn(E, C, F, generator=g) / F ** 0.5)
    return [Fp4GroupWeight(w.data.to(DEV), w.scale.to(DEV)) for w in (w1, w2, w3)]


@pytest.mark.parametrize("decode", packed_linear.FP4_DECODES)
@pytest.mark.parametrize("N, C, F, E, k, limit", [(1, 64, 96, 8, 3, 7.0), (19, 128, 64, 3, 2, 0.0),
                                                  (70, 64, 64, 2, 2, 7.0)],
                         ids=["decode", "multi-tile", "64-row-tiles"])
def test_fp4_experts(N, C, F, E, k, limit, decode, monkeypatch):
    """The register kernels (the 64-row-tile case is past the prefill threshold, where test_packed_dequant.py
    tests the dequantised path), with every FP4 decode (packed_linear.FP4_DECODE; F = 96: a partial
    last K step of the down kernel); the sorted pairs on the unswapped kernels, which the decodes are of."""
    monkeypatch.setattr(tpe, "EXPERT_DEQUANT_MIN_PAIRS", 1 << 30)
    monkeypatch.setattr(tpe, "EXPERT_SWAP", False)
    monkeypatch.setattr(packed_linear, "FP4_DECODE", decode)
    g = gen()
    w1, w2, w3 = _experts(E, F, C, g)
    x = randn(N, C, g=g, dtype=DT)
    idx = torch.rand(N, E, generator=g).argsort(-1)[:, :k].to(DEV)
    rw = torch.rand(N, k, generator=g).to(DEV)
    got = tri_moe(x, w1, w2, w3, idx, rw, limit)
    want = ref_moe(x.double(), w1, w2, w3, idx, rw.double(), limit)
    assert got.dtype == torch.float32 and got.shape == (N, C)
    assert rel_err(got, want) < TOL * 10


@pytest.mark.parametrize("swap", [False, True], ids=["unswapped", "swapped"])
def test_fp4_experts_empty_experts_and_partial_tiles(swap, monkeypatch):
    """Most experts unused (no program for them), tokens per expert not a multiple of the 16-row tile (17, 23, 6:
    partial last tiles), an expert with two tiles, and a routing with more experts than pairs; on both sorted-pairs
    kernels."""
    monkeypatch.setattr(tpe, "EXPERT_SWAP", swap)
    monkeypatch.setattr(tpe, "SWAP_MIN_PAIRS", 0)
    g = gen(5)
    E, C, F = 8, 64, 96
    w1, w2, w3 = _experts(E, F, C, g)
    idx = torch.tensor([[0, 5]] * 17 + [[5, 7]] * 6).to(DEV)
    for rows in (idx, idx[:1]):                   # 46 pairs over 3 experts; 2 pairs: fewer slots than experts
        x = randn(rows.shape[0], C, g=g, dtype=DT)
        rw = torch.rand(*rows.shape, generator=g).to(DEV)
        got = tri_moe(x, w1, w2, w3, rows, rw, 7.0)
        assert rel_err(got, ref_moe(x.double(), w1, w2, w3, rows, rw.double(), 7.0)) < TOL * 10


@pytest.mark.parametrize("swap", [False, True], ids=["unswapped", "swapped"])
def test_fp4_experts_direct_pairs_match_sorted(swap, monkeypatch):
    """Decode's pairs (<= DIRECT_MAX_PAIRS) run in place, one pair per program, unsorted: two tokens sharing
    experts 2 and 5, and int32 ids; the same values as the sorted kernels (which sum a token's slots in the same
    order) and the float64 reference."""
    g = gen(6)
    E, C, F = 8, 64, 96
    w1, w2, w3 = _experts(E, F, C, g)
    idx = torch.tensor([[5, 2, 0], [2, 7, 5]], dtype=torch.int32).to(DEV)
    x = randn(2, C, g=g, dtype=DT)
    rw = torch.rand(2, 3, generator=g).to(DEV)
    assert idx.numel() <= tpe.DIRECT_MAX_PAIRS
    monkeypatch.setattr(tpe, "EXPERT_SWAP", swap)
    monkeypatch.setattr(tpe, "SWAP_MIN_PAIRS", 0)
    direct = tri_moe(x, w1, w2, w3, idx, rw, 7.0)
    monkeypatch.setattr(tpe, "DIRECT_MAX_PAIRS", 0)
    sorted_ = tri_moe(x, w1, w2, w3, idx, rw, 7.0)
    assert rel_err(direct, sorted_) < 1e-6
    assert rel_err(direct, ref_moe(x.double(), w1, w2, w3, idx, rw.double(), 7.0)) < TOL * 10


@pytest.mark.parametrize("split", [2, pytest.param(16, marks=pytest.mark.slow)], ids=["split2", "split-capped"])
def test_fp4_experts_split_k(split, monkeypatch):
    """Decode pairs with K split across programs (forced by DIRECT_SPLIT): gate/up's K = C = 288 is 3 FP4 steps,
    the last one partial, so 2 slices are uneven (2 + 1 steps) and 16 is capped at 3 one-step slices (down's
    K = F = 160: 2 steps); a shared expert (2) and the SwiGLU clamp. The float64 reference within the unsplit
    tests' tolerance, the unsplit kernels close, the same result twice (deterministic), the tile counters left
    at 0."""
    from dsv4.ops.triton.packed_linear import tile_tickets
    g = gen(7)
    E, C, F = 4, 288, 160
    w1, w2, w3 = _experts(E, F, C, g)
    idx = torch.tensor([[2, 0], [3, 2]], dtype=torch.int32).to(DEV)
    x = randn(2, C, g=g, dtype=DT)
    rw = torch.rand(2, 2, generator=g).to(DEV)
    assert idx.numel() <= tpe.DIRECT_MAX_PAIRS
    monkeypatch.setattr(tpe, "DIRECT_SPLIT", split)
    assert [tpe.direct_split(8, steps, x.device) for steps in (3, 2)] == [min(split, 3), 2]
    got = tri_moe(x, w1, w2, w3, idx, rw, 0.5)
    want = ref_moe(x.double(), w1, w2, w3, idx, rw.double(), 0.5)
    assert rel_err(got, want) < TOL * 10
    assert torch.equal(tri_moe(x, w1, w2, w3, idx, rw, 0.5), got)
    assert not tile_tickets(x.device, 1).any()
    monkeypatch.setattr(tpe, "DIRECT_SPLIT", 1)
    assert rel_err(got, tri_moe(x, w1, w2, w3, idx, rw, 0.5)) < TOL * 10


@pytest.mark.parametrize("split, words", [(1, 64), (2, 16)], ids=["one-step", "split2"])
def test_fp4_experts_gemv(split, words, monkeypatch):
    """The direct kernels with FP4_GEMV (each pair's one row on the CUDA cores): one K step per slice (64 words:
    gate/up's K = 160 is 5 of its 16 scale groups, down's K = 96 3), and split K with 16-word steps (gate/up in
    2 uneven slices of 64 and 16 bytes per row, the second one group; down in one, its 3 groups of 4 in one
    step); a shared expert and the clamp. The float64 reference within the other decode tests' tolerance, the
    same result twice, the tile counters at 0."""
    from dsv4.ops.triton.packed_linear import tile_tickets
    monkeypatch.setattr(tpe, "FP4_GEMV", True)
    monkeypatch.setattr(tpe, "DIRECT_SPLIT", split)
    monkeypatch.setattr(packed_linear, "GEMV_WORDS", words)
    g = gen(8)
    E, C, F = 4, 160, 96
    w1, w2, w3 = _experts(E, F, C, g)
    idx = torch.tensor([[2, 0], [3, 2]], dtype=torch.int32).to(DEV)
    x = randn(2, C, g=g, dtype=DT)
    rw = torch.rand(2, 2, generator=g).to(DEV)
    got = tri_moe(x, w1, w2, w3, idx, rw, 0.5)
    assert rel_err(got, ref_moe(x.double(), w1, w2, w3, idx, rw.double(), 0.5)) < TOL * 10
    assert torch.equal(tri_moe(x, w1, w2, w3, idx, rw, 0.5), got)
    assert not tile_tickets(x.device, 1).any()


def test_direct_split_rule(monkeypatch):
    """The split fills about EXPERT_SPLIT_PER_SM programs per SM, capped by MAX_SPLIT and the K steps; one slice
    when the tiles already fill the GPU, or with the rule turned off (EXPERT_SPLIT_PER_SM = 0)."""
    monkeypatch.setattr(tpe, "multiprocessors", lambda device: 132)
    monkeypatch.setattr(tpe, "EXPERT_SPLIT_PER_SM", 16)
    cpu = torch.device("cpu")
    assert tpe.direct_split(6 * 64, 32, cpu) == 5          # 2112 // 384
    assert tpe.direct_split(8, 32, cpu) == tpe.MAX_SPLIT
    assert tpe.direct_split(8, 3, cpu) == 3
    assert tpe.direct_split(16 * 128, 16, cpu) == 1
    monkeypatch.setattr(tpe, "EXPERT_SPLIT_PER_SM", 0)
    assert tpe.direct_split(8, 32, cpu) == 1


def test_used_experts_list():
    """The kernels' expert slots: the used experts in increasing order, then -1 up to min(E, pairs)."""
    from dsv4.ops.triton.packed_experts import _sorted_pairs
    idx = torch.tensor([[6, 2], [2, 0], [6, 2]])
    *_, offs, _, active = _sorted_pairs(idx, 8)
    assert active.tolist() == [0, 2, 6, -1, -1, -1]
    assert offs.tolist() == [0, 1, 1, 4, 4, 4, 4, 6, 6]


def test_gpu_variants_are_recorded(_launches):
    """The GPU variant (bf16 rows, tensor-core dots) of each interpreted launch, compiled by the next test (on a
    GPU the kernels ran natively and nothing was recorded)."""
    if not INTERPRETED:
        pytest.skip("the kernels ran natively on this GPU")
    for launch in list(_launches.values()):
        if launch.get("constexprs", {}).get("IEEE"):
            variant = json.loads(json.dumps(launch))
            variant["constexprs"]["IEEE"] = False
            variant["signature"] = {k: ("*bf16" if k in ("x_ptr", "h_ptr", "y_ptr") else v)
                                    for k, v in variant["signature"].items()}
            _launches[json.dumps(variant, sort_keys=True)] = variant
    for key in [k for k, v in _launches.items() if v.get("constexprs", {}).get("IEEE")]:
        del _launches[key]  # the interpreter's fp32 variants: the GPU never runs them


def test_launches_build_for_gpus(native_build):
    native_build()


def _uneven_routing(counts: list[int], k: int, E: int, g: torch.Generator) -> torch.Tensor:
    """[N, k] distinct experts per token such that expert e gets counts[e] of the N * k pairs (sum(counts) = N * k):
    the pairs listed expert by expert fill the tokens slot-major (pair i -> token i % N, slot i // N), which keeps
    a token's k experts distinct while each count is at most N; then each token's slots are shuffled."""
    N = sum(counts) // k
    assert N * k == sum(counts) and max(counts) <= N
    experts = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    idx = experts.view(k, N).t()
    return torch.stack([row[torch.randperm(k, generator=g)] for row in idx])


@pytest.mark.parametrize("split", [1, 2, 3], ids=["unsplit", "split2", "split3"])
@pytest.mark.parametrize("C, F, counts, limit", [
    (160, 96, [17, 0, 5, 33, 1, 0, 9, 23], 7.0),   # K tails both ways (5 and 3 scale groups), 2-3 token tiles
    (256, 192, [40, 40, 0, 12], 0.0),              # whole K steps, 64-row weight tiles + a 64-row tail of F = 192
    (544, 288, [21, 0, 7, 33, 0, 11], 7.0),        # 5 and 3 K steps, the last of each a 32-value tail
], ids=["tails", "whole-steps", "split-tails"])
def test_fp4_experts_swapped(C, F, counts, limit, split, monkeypatch):
    """The swapped-operand sorted-pairs kernels (EXPERT_SWAP): weights the dot's left operand in swap order,
    activations pre-permuted, h stored and read in swap order. Uneven pairs per expert (token tiles of 16 or 32
    with partial last tiles and experts spanning several tiles), experts without pairs, C and F not multiples of
    128 (the zero-padded activations and h) or of the 64-row weight tile, with and without the clamp: the float64
    reference within the other decode tests' tolerance. With K split (SWAP_SPLIT; split3 on 5 and 3 K steps:
    uneven slices of 2 + 2 + 1 steps for gate/up, 1 + 1 + 1 for down, where the 2-step kernels take 2 slices):
    the same result twice (deterministic), the tile counters left at 0, and the unsplit kernels' result within
    the reference tolerance."""
    from dsv4.ops.triton.packed_linear import tile_tickets
    monkeypatch.setattr(tpe, "EXPERT_DEQUANT_MIN_PAIRS", 1 << 30)
    monkeypatch.setattr(tpe, "EXPERT_SWAP", True)
    monkeypatch.setattr(tpe, "SWAP_MIN_PAIRS", 0)
    monkeypatch.setattr(tpe, "SWAP_SPLIT", split)
    g = gen(9)
    E, k = len(counts), 2
    w1, w2, w3 = _experts(E, F, C, g)
    idx = _uneven_routing(counts, k, E, g).to(DEV)
    assert torch.bincount(idx.flatten().cpu(), minlength=E).tolist() == counts
    assert idx.numel() > tpe.DIRECT_MAX_PAIRS
    steps = (-(-C // 128), -(-F // 128))
    assert tpe.swap_splits(idx.numel(), E, F, C, idx.device) == tuple(-(-n // -(-n // split)) for n in steps)
    x = randn(idx.shape[0], C, g=g, dtype=DT)
    rw = torch.rand(*idx.shape, generator=g).to(DEV)
    got = tri_moe(x, w1, w2, w3, idx, rw, limit)
    assert rel_err(got, ref_moe(x.double(), w1, w2, w3, idx, rw.double(), limit)) < TOL * 10
    if split > 1:
        assert torch.equal(tri_moe(x, w1, w2, w3, idx, rw, limit), got)
        assert not tile_tickets(x.device, 1).any()
        monkeypatch.setattr(tpe, "SWAP_SPLIT", 1)
        assert rel_err(got, tri_moe(x, w1, w2, w3, idx, rw, limit)) < TOL * 10


def test_swap_split_rule(monkeypatch):
    """swap_splits' rule (SWAP_SPLIT None) on a 132-SM GPU: the fewest K slices at which the grid fills
    SWAP_WAVE_FILL of its waves. 16 experts at 24 pairs each (32-pair tiles: gate/up 16 x 32 programs, down
    16 x 64, 2 / 4 resident per SM unsplit) fill 97% unsplit; 4 experts fill 48%, and take 3 slices for gate/up
    (384 programs at 3 per SM: 97%) and 5 for down (1280 at 5 per SM: 97%; 16 K steps in 4 slices of 4). A
    forced count is capped by the K steps."""
    monkeypatch.setattr(tpe, "multiprocessors", lambda device: 132)
    monkeypatch.setattr(tpe, "SWAP_SPLIT", None)
    cpu = torch.device("cpu")
    assert tpe.swap_splits(16 * 24, 16, 2048, 4096, cpu) == (1, 1)
    assert tpe.swap_splits(4 * 24, 4, 2048, 4096, cpu) == (3, 4)
    assert tpe.swap_wave_split(128, (264, 396), 32) == 3
    assert tpe.swap_wave_split(256, (528, 660), 16) == 5
    monkeypatch.setattr(tpe, "SWAP_SPLIT", 8)
    assert tpe.swap_splits(16 * 24, 16, 2048, 4096, cpu) == (8, 8)
    assert tpe.swap_splits(16 * 24, 16, 2048, 256, cpu) == (2, 8)


def test_swap_order():
    """swap_order (the swapped kernels' activation layout): position 128 b + 8 m + 2 t + p holds column
    128 b + 32 t + 2 m + p, and a width that is not a multiple of 128 is padded with zeros, which keep their own
    places (the columns past K)."""
    x = torch.arange(1, 257, dtype=torch.float32)[None, :]       # column c holds c + 1
    j = torch.arange(256)
    m, t, p = (j % 128) // 8, (j % 8) // 2, j % 2
    want = (j // 128) * 128 + 32 * t + 2 * m + p + 1
    assert torch.equal(tpe.swap_order(x)[0], want.float())
    assert torch.equal(tpe.swap_order(x[:, :160])[0], torch.where(want <= 160, want, 0).float())

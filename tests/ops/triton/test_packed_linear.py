"""ops/triton/packed_linear.py (weight-only GEMMs over FP8 / FP4 bytes) against ops/reference/packed.py, at odd
row counts, K tails and split-K."""
import json

import pytest
import torch

from dsv4.ops.reference import packed as ref
from dsv4.ops.triton import packed_linear as tri
from dsv4.quant.packed import Fp4GroupWeight, Fp8BlockWeight

from .device import DEV, DT, INTERPRETED, TOL, gen, randn, rel_err



def _to(w):
    return type(w)(w.data.to(DEV), w.scale.to(DEV))


@pytest.mark.parametrize("M, N, K, config", [(5, 130, 200, None), (3, 64, 384, (16, 32, 1, 4)), (70, 40, 128, None)],
                         ids=["tails", "split-k", "prefill"])
def test_fp8_weight_gemm(M, N, K, config):
    g = gen()
    w = _to(Fp8BlockWeight.quantize(torch.randn(N, K, generator=g)))
    x = randn(M, K, g=g, dtype=DT)
    got = tri.linear_fp8_weight(x, w, config)
    want = ref.linear_fp8_weight(x.double(), w)          # float64 products of the exactly dequantised weight
    assert got.shape == (M, N) and got.dtype == x.dtype
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("decode", tri.FP4_DECODES)
@pytest.mark.parametrize("M, N, K, config", [(7, 33, 96, None), (1, 64, 512, (16, 32, 1, 4))],
                         ids=["tails", "split-k"])
def test_fp4_weight_gemm(M, N, K, config, decode, monkeypatch):
    """Every FP4 decode (FP4_DECODE) of the tl.dot kernel (the GEMV off, which would take these few rows): a partial
    last K step (K = 96: 48 of 64 bytes, 3 of 4 groups), partial row tiles and split K."""
    monkeypatch.setattr(tri, "FP4_DECODE", decode)
    monkeypatch.setattr(tri, "FP4_GEMV_MAX_M", 0)
    g = gen(1)
    w = _to(Fp4GroupWeight.quantize(torch.randn(N, K, generator=g)))
    x = randn(2, M, K, g=g, dtype=DT)                       # leading dims are flattened
    got = tri.linear_fp4_weight(x, w, config)
    assert got.shape == (2, M, N)
    assert rel_err(got, ref.linear_fp4_weight(x.double(), w)) < TOL


@pytest.mark.parametrize("lead, config", [((3,), None), ((2, 1), (16, 64, 1, 4))], ids=["decode", "split-k"])
def test_fp8_grouped_gemm(lead, config):
    """Each of 3 head groups through its own 128 rows of one FP8 weight in one launch (attention's wo_a), against
    the float64 reference; tiles that straddle no group (BLOCK_N divides the group's rows)."""
    g = gen(11)
    G, R, K = 3, 128, 256
    w = _to(Fp8BlockWeight.quantize(torch.randn(G * R, K, generator=g)))
    x = randn(*lead, G, K, g=g, dtype=DT)
    got = tri.linear_fp8_grouped(x, w, G, config)
    want = ref.linear_fp8_grouped(x.double(), w, G)
    assert got.shape == (*lead, G, R)
    assert rel_err(got, want) < TOL
    per_group = torch.stack([ref.linear_fp8_weight(x[..., i, :].double(), w.rows(i * R, (i + 1) * R))
                             for i in range(G)], -2)                       # the oracle: one GEMM per group
    assert rel_err(got, per_group) < TOL
    xl = randn(tri.DEQUANT_MIN_ROWS, G, K, g=g, dtype=DT)                 # prefill: one batched matmul on the copy
    assert torch.equal(tri.linear_fp8_grouped(xl, w, G),
                       torch.einsum("mgk,grk->mgr", xl, w.dequantize(DT).view(G, R, K)))


@pytest.mark.parametrize("M, N, K, limit, config", [(3, 100, 300, 7.0, None), (2, 64, 512, 0.0, (16, 32, 1, 4)),
                                                   (1, 96, 256, 7.0, (16, 32, 2, 4))],
                         ids=["tails-clamp", "split-k", "split-k-clamp"])
def test_fp8_swiglu(M, N, K, limit, config):
    """The shared expert's gate + up + clamped SwiGLU in one launch (both FP8 weights per program, split K with
    both accumulators reduced by the tile's last program) against the float64 reference (two weight-only GEMMs
    and the SwiGLU); the clamp is active (|x w| reaches ~16 * 3)."""
    g = gen(12)
    w1, w3 = (_to(Fp8BlockWeight.quantize(torch.randn(N, K, generator=g))) for _ in range(2))
    x = randn(M, K, g=g, dtype=DT)
    got = tri.swiglu_fp8(x, w1, w3, limit, config)
    want = ref.swiglu_fp8(x.double(), w1, w3, limit)
    assert got.shape == (M, N) and got.dtype == x.dtype
    assert rel_err(got, want) < TOL
    if limit:
        assert (ref.linear_fp8_weight(x.double(), w1) > limit).any()
    again = tri.swiglu_fp8(x, w1, w3, limit, config)
    assert torch.equal(got, again) and not tri.tile_tickets(x.device, 8).any()
    hw = tri.swiglu_fp8(x, w1, w3, limit, config, native_fp8=True)     # the e4m3 conversion of sm_89+
    assert rel_err(hw, want) < TOL


def test_split_k_tickets_reset_between_launches():
    """The last program of each tile sums the K slices and resets the tile's ticket: a second launch (tickets
    reused) gives the same bits, and every ticket is back at 0."""
    g = gen(4)
    w = _to(Fp8BlockWeight.quantize(torch.randn(200, 512, generator=g)))
    x = randn(2, 512, g=g, dtype=DT)
    cfg = (16, 128, 1, 4)  # 2 tiles (the second partial) of 4 K slices, read back 2 per load
    first = tri.linear_fp8_weight(x, w, cfg)
    second = tri.linear_fp8_weight(x, w, cfg)
    assert torch.equal(first, second)
    assert not tri.tile_tickets(x.device, 2).any()
    assert rel_err(first, ref.linear_fp8_weight(x.double(), w)) < TOL


def test_every_code_decodes():
    """All 254 finite e4m3 bytes (subnormals included) and all 16 e2m1 codes under the scales: a one-hot x
    reads single weights back, which must equal the exact dequantisation."""
    b = torch.arange(256, dtype=torch.uint8)
    b[(b & 0x7F) == 0x7F] = 0
    w8 = _to(Fp8BlockWeight(b.view(1, 256), torch.tensor([[120, 131]], dtype=torch.uint8)))
    w4 = _to(Fp4GroupWeight(b.view(2, 128), torch.tensor([[100, 110, 120, 127, 130, 140, 150, 160]] * 2,
                                                          dtype=torch.uint8)))
    for w, kernel in ((w8, tri.linear_fp8_weight), (w4, tri.linear_fp4_weight)):
        K = w.shape[1]
        eye = torch.eye(K, device=DEV, dtype=torch.float32)      # fp32 rows: each weight is exact
        assert torch.equal(kernel(eye, w).T, w.dequantize()), kernel.__name__


@pytest.mark.parametrize("decode", tri.FP4_DECODES)
def test_every_fp4_code_under_every_scale(decode, monkeypatch):
    """The FP4 kernel itself (a config: DEQUANT_MIN_ROWS one-hot rows would otherwise take the dequantised path),
    every decode: all 256 bytes (each of the 16 e2m1 codes, +-0, the subnormal +-0.5, next to each other code in
    both nibbles) under 48 scale bytes, 2^-40 .. 2^+7 (V4 checkpoints' FP4 expert scales sit near 2^-8; the
    quantiser's extremes for the weights' range reach a few binades beyond), read back one at a time by one-hot
    rows: every weight equals its exact dequantisation, bit for bit."""
    monkeypatch.setattr(tri, "FP4_DECODE", decode)
    scale = torch.arange(87, 135, dtype=torch.uint8)                      # 48 bytes: 2^-40 .. 2^7
    data = torch.arange(256, dtype=torch.uint8).repeat(6).view(48, 32)    # row r: 32 bytes = 64 values, 2 groups
    w = _to(Fp4GroupWeight(data, torch.stack([scale, scale.flip(0)], 1)))  # each row: two scales far apart
    eye = torch.eye(64, device=DEV, dtype=torch.float32)                  # fp32 rows: each weight is exact
    got = tri.linear_fp4_weight(eye, w, (64, 16, 1, 4)).T
    assert torch.equal(got, w.dequantize())
    assert got.abs().max() == 6 * 2.0 ** 7 and got[got != 0].abs().min() == 0.5 * 2.0 ** -40


def test_fp4_decodes_agree(monkeypatch):
    """The FP4 decodes only reorder the exact products' fp32 sums: they agree to fp32 rounding on random weights and
    activations (split K, tails)."""
    g = gen(13)
    w = _to(Fp4GroupWeight.quantize(torch.randn(40, 320, generator=g)))
    x = randn(3, 320, g=g, dtype=DT)
    got = {}
    monkeypatch.setattr(tri, "FP4_GEMV_MAX_M", 0)   # (3 rows: the GEMV would take them; the decodes are the dot's)
    for decode in tri.FP4_DECODES:
        monkeypatch.setattr(tri, "FP4_DECODE", decode)
        got[decode] = tri.linear_fp4_weight(x, w, (16, 32, 2, 4))
    for decode in tri.FP4_DECODES[1:]:
        assert rel_err(got[decode], got["old"]) < TOL / 10, decode


@pytest.mark.parametrize("M, N, K, words, config", [
    (1, 33, 96, 64, None),                 # one K step, 3 of its 16 scale groups; 2 row tiles, the second partial
    (2, 40, 160, 8, (2, 16, 1, 4)),        # 3 K steps of 64 values (the last half empty), one per program: split K
    (3, 20, 224, 8, None),                 # 4 K steps in one program's loop, BLOCK_M 4 with a masked row
    (4, 64, 256, 8, (4, 32, 2, 4)),        # split K, 2 steps per program
    (1, 48, 320, 8, (4, 16, 3, 4)),        # BLOCK_M 4 for 1 row, split K with a short last slice (5 steps: 3 + 2)
], ids=["tails", "split-k", "loop", "split-loop", "rows-masked"])
def test_fp4_gemv(M, N, K, words, config, monkeypatch):
    """The CUDA-core FP4 GEMV through linear_fp4_weight once FP4_GEMV_MAX_M takes the rows (the tl.dot kernel must
    not run): K tails inside a step and across steps, N tails, split K on and off, padded activation rows."""
    monkeypatch.setattr(tri, "FP4_GEMV_MAX_M", tri.GEMV_MAX_ROWS)
    monkeypatch.setattr(tri, "GEMV_WORDS", words)
    monkeypatch.setattr(tri, "_launch", None)                   # the tl.dot kernels' launcher: a call would fail
    g = gen(14)
    w = _to(Fp4GroupWeight.quantize(torch.randn(N, K, generator=g)))
    x = randn(M, K, g=g, dtype=DT)
    got = tri.linear_fp4_weight(x, w, config)
    assert got.shape == (M, N) and got.dtype == x.dtype
    assert rel_err(got, ref.linear_fp4_weight(x.double(), w)) < TOL
    again = tri.linear_fp4_weight(x, w, config)
    assert torch.equal(got, again) and not tri.tile_tickets(x.device, 8).any()


def test_fp4_gemv_dispatch_by_rows(monkeypatch):
    """By default up to FP4_GEMV_MAX_M rows take the GEMV and more take the tl.dot kernel; FP4_GEMV_MAX_M = 0 sends
    even one row to the tl.dot kernel (each case with the other kernel's launcher removed, so it cannot run)."""
    w = _to(Fp4GroupWeight.quantize(torch.randn(16, 64, generator=gen(15))))
    x = randn(tri.FP4_GEMV_MAX_M + 1, 64, g=gen(15), dtype=DT)
    want = ref.linear_fp4_weight(x.double(), w)
    with monkeypatch.context() as m:
        m.setattr(tri, "_launch", None)
        assert tri.FP4_GEMV_MAX_M >= 1
        assert rel_err(tri.linear_fp4_weight(x[:tri.FP4_GEMV_MAX_M], w), want[:tri.FP4_GEMV_MAX_M]) < TOL
    with monkeypatch.context() as m:
        m.setattr(tri, "linear_fp4_gemv", None)
        assert rel_err(tri.linear_fp4_weight(x, w), want) < TOL
        m.setattr(tri, "FP4_GEMV_MAX_M", 0)
        assert rel_err(tri.linear_fp4_weight(x[:1], w), want[:1]) < TOL


def test_every_fp4_code_under_every_scale_gemv():
    """test_every_fp4_code_under_every_scale for the FP4 GEMV: all 256 bytes under 48 scales 2^-40 .. 2^7, read
    back four one-hot rows per call (its most), 16 calls for the 64 values of each row: bit for bit the exact
    dequantisation."""
    scale = torch.arange(87, 135, dtype=torch.uint8)
    data = torch.arange(256, dtype=torch.uint8).repeat(6).view(48, 32)
    w = _to(Fp4GroupWeight(data, torch.stack([scale, scale.flip(0)], 1)))
    eye = torch.eye(64, device=DEV, dtype=torch.float32)
    got = torch.cat([tri.linear_fp4_gemv(eye[i:i + 4], w) for i in range(0, 64, 4)]).T
    assert torch.equal(got, w.dequantize())
    assert got.abs().max() == 6 * 2.0 ** 7 and got[got != 0].abs().min() == 0.5 * 2.0 ** -40


def test_fp8_weight_hardware_decode():
    """The e4m3-conversion decode of the FP8 bytes (sm_89+; the other tests run the integer decode)."""
    g = gen(2)
    w = _to(Fp8BlockWeight.quantize(torch.randn(40, 256, generator=g)))
    x = randn(1, 256, g=g, dtype=DT)
    got = tri.linear_fp8_weight(x, w, native_fp8=True)
    assert rel_err(got, ref.linear_fp8_weight(x.double(), w)) < TOL


@pytest.mark.parametrize("M, N, K", [(5, 130, 300)])
def test_fp8_fp8_gemm(M, N, K):
    """In-kernel 1x128 activation quantisation + e4m3 products against the reference recipe; activations spread
    over decades so the blocks' scales differ."""
    g = gen(3)
    w = _to(Fp8BlockWeight.quantize(torch.randn(N, K, generator=g)))
    x = (torch.randn(M, K, generator=g) * torch.logspace(-3, 2, K)).to(DEV, DT)
    got = tri.linear_fp8_fp8(x, w)
    assert rel_err(got, ref.linear_fp8_fp8(x.double(), w)) < TOL


def test_gpu_variants_are_recorded(_launches):
    """The interpreter runs the IEEE (fp32) variants; add each launch's GPU variant (bf16 activations, tensor-core
    dots) so that the next test compiles those instead: one per kernel and set of flags (the shapes do not change
    which code compiles). On a GPU the kernels ran natively and nothing was recorded."""
    if not INTERPRETED:
        pytest.skip("the kernels ran natively on this GPU")
    seen = set()
    for launch in list(_launches.values()):
        flags = launch.get("constexprs", {})
        key = (launch["kernel"], json.dumps(flags, sort_keys=True))
        if "IEEE" not in flags or key in seen:
            continue
        seen.add(key)
        variant = json.loads(json.dumps(launch))
        variant["constexprs"]["IEEE"] = False
        variant["signature"] = {k: ("*bf16" if k == "x_ptr" else v) for k, v in variant["signature"].items()}
        _launches[json.dumps(variant, sort_keys=True)] = variant
    for key in [k for k, v in _launches.items() if v.get("constexprs", {}).get("IEEE")]:
        del _launches[key]  # the interpreter's fp32 variants: the GPU never runs them
    assert any(not v["constexprs"].get("IEEE", True) for v in _launches.values())


def test_launches_build_for_gpus(native_build):
    native_build()

"""FP4/FP8/UE8M0 formats: exact decoding on hand-built bytes, and the fake-quant rounding rules."""
import pytest
import torch

from dsv4.quant import (dequant_fp4_blocks, dequant_fp8_blocks, e2m1_round, e8m0_to_float, float_to_e8m0,
                        fp4_fake_quant, fp8_fake_quant, hadamard, pack_fp4, unpack_fp4)

ALL_FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def test_all_16_fp4_codes_decode():
    # byte = low nibble (even element) | high nibble << 4: codes 0..15 paired with 15..0
    codes = torch.arange(16, dtype=torch.uint8)
    packed = (codes | (codes.flip(0) << 4)).view(torch.int8).view(1, 16)
    vals = unpack_fp4(packed)[0]
    assert vals[0::2].tolist() == ALL_FP4
    assert vals[1::2].tolist() == ALL_FP4[::-1]
    assert torch.signbit(vals[16]) and not torch.signbit(vals[0])  # code 8 is -0
    assert torch.equal(pack_fp4(vals.view(1, -1)), packed)


def test_e2m1_rounding_ties_to_even_and_saturation():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.74, -5.1, 0.26])
    assert e2m1_round(x).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.5, -6.0, 0.5]
    v = torch.tensor(ALL_FP4)
    assert torch.equal(e2m1_round(v), v)


def test_e8m0():
    b = torch.tensor([0, 1, 127, 128, 200, 254, 255], dtype=torch.uint8)
    f = e8m0_to_float(b)
    assert f[:6].tolist() == [2.0 ** -127, 2.0 ** -126, 1.0, 2.0, 2.0 ** 73, 2.0 ** 127]
    assert torch.isnan(f[6])
    assert torch.equal(float_to_e8m0(f[:6]), b[:6])
    if hasattr(torch, "float8_e8m0fnu"):
        assert torch.equal(e8m0_to_float(b.view(torch.float8_e8m0fnu))[:6], f[:6])
    with pytest.raises(ValueError):
        float_to_e8m0(torch.tensor([3.0]))


def test_fp8_block_dequant_exact():
    g = torch.Generator().manual_seed(0)
    O, I = 200, 130  # partial edge blocks on both axes
    q = (torch.randn(O, I, generator=g) * 50).to(torch.float8_e4m3fn)
    exps = torch.randint(-10, 10, (2, 2), generator=g)
    scale = float_to_e8m0(torch.exp2(exps.float()))
    w = dequant_fp8_blocks(q, scale)
    for (bo, bi) in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        blk = (slice(128 * bo, 128 * (bo + 1)), slice(128 * bi, 128 * (bi + 1)))
        assert torch.equal(w[blk], q[blk].float() * 2.0 ** int(exps[bo, bi]))
    with pytest.raises(ValueError, match="scale of shape"):
        dequant_fp8_blocks(q, scale[:1])


def test_fp4_block_dequant_exact():
    g = torch.Generator().manual_seed(1)
    O, I = 3, 64
    vals = torch.tensor(ALL_FP4)[torch.randint(0, 16, (O, I), generator=g)]
    exps = torch.randint(-5, 5, (O, I // 32), generator=g)
    w = dequant_fp4_blocks(pack_fp4(vals), float_to_e8m0(torch.exp2(exps.float())))
    assert torch.equal(w, vals * torch.exp2(exps.float()).repeat_interleave(32, 1))


def test_fp8_fake_quant_rule():
    x = torch.tensor([[1000.0, -3.0, 0.1] + [0.0] * 61])
    y = fp8_fake_quant(x, 64)
    s = 2.0 ** 2  # ceil(log2(1000 / 448)) = 2
    assert torch.equal(y, (x / s).to(torch.float8_e4m3fn).float() * s)
    assert torch.equal(fp8_fake_quant(y, 64), y)  # idempotent
    z = torch.zeros(1, 64)
    assert torch.equal(fp8_fake_quant(z, 64), z)   # amax floored at 1e-4: no NaN


def test_fp4_fake_quant_never_clips_and_is_idempotent():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 96, generator=g) * torch.exp2(torch.randint(-8, 8, (10, 1), generator=g).float())
    y = fp4_fake_quant(x, 32)
    xb, yb = x.view(10, 3, 32), y.view(10, 3, 32)
    s = torch.exp2(torch.ceil(torch.log2(xb.abs().amax(-1, keepdim=True) / 6)))
    assert torch.equal(yb, e2m1_round(xb / s) * s)
    assert (yb.abs().amax(-1) <= xb.abs().amax(-1) * 1.5).all()
    assert torch.equal(fp4_fake_quant(y, 32), y)


def test_hadamard_is_orthonormal_sylvester():
    x = torch.randn(5, 128, dtype=torch.float64)
    h = hadamard(torch.eye(8, dtype=torch.float64))
    assert torch.allclose(h @ h.T, torch.eye(8, dtype=torch.float64))
    assert torch.allclose(h[1] * 8 ** 0.5, torch.tensor([1, -1, 1, -1, 1, -1, 1, -1], dtype=torch.float64))
    assert torch.allclose(hadamard(hadamard(x)), x)


def test_fp4_to_fp8_is_bit_exact_within_span_14():
    from dsv4.quant.formats import dequant_fp8_blocks, fp4_to_fp8
    g = torch.Generator().manual_seed(3)
    O, I = 256, 320  # 2 x 3 tiles, the last one partial
    vals = torch.tensor(ALL_FP4)[torch.randint(0, 16, (O, I), generator=g)]
    base = torch.randint(-20, 20, (1,), generator=g).item()
    exps = base + torch.randint(-14, 1, (O, I // 32), generator=g)    # span exactly up to 14
    exps[:128, :4] = base                                               # make the span reach 14 in a tile
    exps[:128, 4:8] = base - 14
    scale = float_to_e8m0(torch.exp2(exps.float()))
    q, tile = fp4_to_fp8(pack_fp4(vals), scale)
    assert q.dtype == torch.float8_e4m3fn and tile.shape == (2, 3)
    assert torch.equal(dequant_fp8_blocks(q, tile), dequant_fp4_blocks(pack_fp4(vals), scale))
    # every e2m1 value times 2^s is exact in e4m3 exactly for s in [-8, 6]
    v = torch.tensor(ALL_FP4)
    for s in range(-10, 9):
        exact = bool(((v * 2.0 ** s).to(torch.float8_e4m3fn).float() == v * 2.0 ** s).all())
        assert exact == (-8 <= s <= 6), s


def test_fp4_to_fp8_detects_span_15():
    from dsv4.quant.formats import fp4_to_fp8
    vals = torch.full((128, 64), 0.5)
    exps = torch.tensor([[0, -15]] * 128)
    with pytest.raises(ValueError, match=r"tile \(0, 0\)"):
        fp4_to_fp8(pack_fp4(vals), float_to_e8m0(torch.exp2(exps.float())))


def test_weight_quantisers_match_fake_quant():
    from dsv4.quant.formats import quantize_fp4_blocks, quantize_fp8_blocks
    w = torch.randn(200, 96) * torch.exp2(torch.randint(-6, 3, (200, 1)).float())
    packed, s = quantize_fp4_blocks(w)
    assert torch.equal(dequant_fp4_blocks(packed, s), fp4_fake_quant(w, 32))
    q, s8 = quantize_fp8_blocks(w)
    back = dequant_fp8_blocks(q, s8)
    assert ((back - w).abs() <= w.abs().amax() * 2 ** -4).all()

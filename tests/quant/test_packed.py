"""dsv4/quant/packed.py: the integer decoding of e4m3 / e2m1 / UE8M0 against torch's float8 types and the
checkpoint loader's dequantisation (dequant_fp8_blocks / dequant_fp4_blocks), bit for bit."""
import pytest
import torch

from dsv4.quant import E2M1_VALUES, dequant_fp4_blocks, dequant_fp8_blocks
from dsv4.quant.packed import Fp4GroupWeight, Fp8BlockWeight, decode_e2m1, decode_e4m3, ue8m0_exponent


def test_every_e4m3_byte_decodes_as_torch_float8():
    b = torch.arange(256, dtype=torch.uint8)
    finite = (b & 0x7F) != 0x7F                       # 0x7F / 0xFF are NaN
    want = b.view(torch.float8_e4m3fn).float()
    got = decode_e4m3(b)
    assert torch.equal(got[finite], want[finite])
    assert torch.equal(torch.signbit(got[finite]), torch.signbit(want[finite]))  # -0 stays -0


def test_every_e2m1_code_and_scale_byte():
    assert torch.equal(decode_e2m1(torch.arange(16)), E2M1_VALUES)
    b = torch.arange(1, 255, dtype=torch.uint8)
    assert torch.equal(ue8m0_exponent(b), torch.ldexp(torch.ones(254), b.int() - 127))


def _scales(shape, g):
    return torch.randint(110, 140, shape, generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("N, K", [(256, 384), (200, 300), (5, 130)])
def test_fp8_dequantize_matches_the_loader(N, K):
    g = torch.Generator().manual_seed(N)
    data = torch.randint(0, 256, (N, K), generator=g, dtype=torch.uint8)
    data[(data & 0x7F) == 0x7F] = 0
    w = Fp8BlockWeight(data, _scales((-(-N // 128), -(-K // 128)), g))
    want = dequant_fp8_blocks(data.view(torch.float8_e4m3fn), w.scale.view(torch.float8_e8m0fnu))
    assert torch.equal(w.dequantize(), want)
    assert torch.equal(w.dequantize(torch.bfloat16).float(), want)  # exact in bf16 too


@pytest.mark.parametrize("lead", [(), (3,)])
def test_fp4_dequantize_matches_the_loader(lead):
    g = torch.Generator().manual_seed(1)
    N, K = 40, 96
    w = Fp4GroupWeight(torch.randint(0, 256, (*lead, N, K // 2), generator=g, dtype=torch.uint8),
                       _scales((*lead, N, K // 32), g))
    for e in range(lead[0] if lead else 1):
        one = w[e] if lead else w
        assert torch.equal(one.dequantize(), dequant_fp4_blocks(one.data, one.scale.view(torch.float8_e8m0fnu)))
    assert w.shape == (*lead, N, K) and w.nbytes == w.data.numel() + w.scale.numel()


def test_quantize_and_row_slices():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 260, generator=g)
    w8 = Fp8BlockWeight.quantize(x)
    assert ((w8.dequantize() - x).norm() / x.norm()).item() < 0.04    # e4m3: 3 mantissa bits
    assert torch.equal(w8.rows(128, 300).dequantize(), w8.dequantize()[128:300])
    with pytest.raises(ValueError, match="do not fall on its 128-row scale tiles"):
        w8.rows(64, 128)
    w4 = Fp4GroupWeight.quantize(x.view(3, 100, 260)[..., :256])
    assert ((w4.dequantize() - x.view(3, 100, 260)[..., :256]).norm() / x.norm()).item() < 0.15


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"needs a scale of shape \(1, 2\)"):
        Fp8BlockWeight(torch.zeros(10, 200, dtype=torch.uint8), torch.zeros(1, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="not a multiple of the 32-value scale group"):
        Fp4GroupWeight(torch.zeros(4, 20, dtype=torch.uint8), torch.zeros(4, 1, dtype=torch.uint8))
    with pytest.raises(TypeError, match="1-byte"):
        Fp8BlockWeight(torch.zeros(4, 4), torch.zeros(1, 1, dtype=torch.uint8))

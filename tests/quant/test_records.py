"""Cache records (dsv4.quant.records): the layout tiles each record, and encode/decode agree with records built
here byte by byte from e4m3 / e2m1 codes and their scales, at sizes other than V4's."""
import struct

import pytest
import torch

from dsv4.quant.records import RECORD_ALIGN, decode_records, encode_records, record_bytes, record_layout

# (fmt, role, dim, rope_dim): nope 64 (one full scale block), nope 80 (a partial last block), index Di 64 / 96
CASES = [("fp8", "kv", 96, 32), ("fp8", "kv", 96, 16), ("fp8", "kv", 200, 8), ("fp8", "index", 64, 0),
         ("fp8", "index", 96, 0), ("fp4", "index", 64, 0), ("fp4", "index", 96, 0)]
IDS = [f"{f}-{r}-D{d}-rope{rd}" for f, r, d, rd in CASES]


@pytest.mark.parametrize("fmt, role, dim, rope_dim", CASES, ids=IDS)
def test_layout_parts_tile_the_record(fmt, role, dim, rope_dim):
    lay = record_layout(fmt, role, dim, rope_dim)
    end = 0
    for name, offset, size in lay.parts():
        assert offset == end, f"{name} starts at {offset}, the previous part ends at {end}"
        end = offset + size
    pad = lay.nbytes - end                               # padding only after the last part
    if (fmt, role) == ("fp8", "kv"):                     # the serving layout: padded to a multiple of 8 bytes
        assert [p[0] for p in lay.parts()] == ["values", "rope", "scales"]
        assert 0 <= pad < RECORD_ALIGN and lay.nbytes % RECORD_ALIGN == 0
    else:
        assert [p[0] for p in lay.parts()] == ["values", "scales"] and pad == 0
    assert record_bytes(fmt, dim, rope_dim, role) == lay.nbytes
    assert lay.quant_dims + lay.rope_dim == dim and lay.rope[1] == 2 * lay.rope_dim
    assert lay.values[1] == (lay.quant_dims // 2 if fmt == "fp4" else lay.quant_dims)
    if (fmt, role) == ("fp8", "index"):                  # one fp32 scale for the row
        assert lay.scales[1] == 4 and lay.scale_block == dim
    else:                                                # one UE8M0 byte per block, the last block partial
        assert lay.scales[1] == -(-lay.quant_dims // lay.scale_block)


def _e4m3_codes(shape, g):
    """Random finite e4m3 bit patterns (0x7f / 0xff are NaN) and their values."""
    codes = torch.randint(0, 256, shape, generator=g, dtype=torch.int32)
    codes = torch.where((codes & 0x7F) == 0x7F, codes - 1, codes).to(torch.uint8)
    return codes, codes.view(torch.float8_e4m3fn).float()


def _expected_record(fmt, role, dim, rope_dim, g, rows=5):
    """Rows x that `fmt` stores exactly, and the record bytes they must encode to, built from the format's
    definition (one block maximum per scale block picks the power-of-two scale) rather than from the codec."""
    lay = record_layout(fmt, role, dim, rope_dim)
    rec = torch.zeros(rows, lay.nbytes, dtype=torch.uint8)
    n, blk = lay.quant_dims, lay.scale_block
    if fmt == "fp8" and role == "kv":
        codes, vals = _e4m3_codes((rows, n), g)
        codes[:, ::blk], vals[:, ::blk] = 0x7E, 448.0            # each block's maximum: the scale is exactly 2^k
        k = torch.randint(-20, 20, (rows, -(-n // blk)), generator=g)
        x_nope = vals * torch.exp2(k.float()).repeat_interleave(blk, -1)[:, :n]
        rope = torch.randn(rows, rope_dim, generator=g).to(torch.bfloat16)
        x = torch.cat((x_nope, rope.float()), -1)
        rec[:, :n] = codes
        rec[:, n:n + 2 * rope_dim] = rope.view(torch.uint8)     # bf16, little-endian
        rec[:, n + 2 * rope_dim:n + 2 * rope_dim + k.shape[1]] = (k + 127).to(torch.uint8)
    elif fmt == "fp8":
        codes, vals = _e4m3_codes((rows, dim), g)
        codes[:, 0], vals[:, 0] = 0x7E, 448.0                    # the row maximum: scale = amax / 448 = 2^k
        k = torch.randint(-20, 20, (rows,), generator=g)
        x = vals * torch.exp2(k.float()).unsqueeze(1)
        rec[:, :dim] = codes
        for r in range(rows):
            rec[r, dim:] = torch.tensor(list(struct.pack("<f", 2.0 ** int(k[r]))), dtype=torch.uint8)
    else:
        table = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
        mag = torch.randint(0, 8, (rows, dim), generator=g)
        mag[:, ::blk] = 7                                        # each block's maximum: 6 * 2^k
        sign = (torch.rand(rows, dim, generator=g) < 0.5) & (mag > 0)
        code = mag + 8 * sign
        vals = torch.tensor(table)[mag] * torch.where(sign, -1.0, 1.0)
        k = torch.randint(-20, 20, (rows, dim // blk), generator=g)
        x = vals * torch.exp2(k.float()).repeat_interleave(blk, -1)
        rec[:, :dim // 2] = (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8)   # low nibble: even element
        rec[:, dim // 2:] = (k + 127).to(torch.uint8)
    return x, rec


@pytest.mark.parametrize("fmt, role, dim, rope_dim", CASES, ids=IDS)
def test_encode_gives_the_format_bytes_and_decode_inverts_it(fmt, role, dim, rope_dim):
    x, want = _expected_record(fmt, role, dim, rope_dim, torch.Generator().manual_seed(dim + rope_dim))
    got = encode_records(x, fmt, role, dim, rope_dim, record_bytes(fmt, dim, rope_dim, role))
    assert got.dtype == torch.uint8 and got.shape == want.shape
    bad = (got != want).any(0).nonzero().flatten().tolist()
    assert not bad, f"{fmt} {role} record bytes {bad[:8]} differ from the format's definition"
    assert torch.equal(decode_records(got, fmt, role, dim, rope_dim, torch.float32), x)
    assert torch.equal(decode_records(got, fmt, role, dim, rope_dim, torch.bfloat16), x.to(torch.bfloat16))


@pytest.mark.parametrize("fmt, role, dim, rope_dim", CASES, ids=IDS)
def test_arbitrary_rows_round_trip_within_the_format_precision(fmt, role, dim, rope_dim):
    """Rows the format does not hold exactly: the error stays within one rounding step of each value's block
    (e4m3, 3 mantissa bits: half an ulp is at most 2^-4 of the value; e2m1: the scale s is at most a third of
    the block maximum and half the widest step (4 -> 6) is s)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, dim, generator=g) * torch.logspace(-3, 3, dim)
    y = decode_records(encode_records(x, fmt, role, dim, rope_dim, record_bytes(fmt, dim, rope_dim, role)),
                       fmt, role, dim, rope_dim, torch.float32)
    lay = record_layout(fmt, role, dim, rope_dim)
    n, blk = lay.quant_dims, lay.scale_block
    pad = -n % blk
    err = torch.nn.functional.pad((y - x)[..., :n].abs(), (0, pad)).unflatten(-1, (-1, blk)).amax(-1)
    amax = torch.nn.functional.pad(x[..., :n].abs(), (0, pad)).unflatten(-1, (-1, blk)).amax(-1)
    tol = 1 / 3 if fmt == "fp4" else 2 ** -4
    assert (err <= tol * amax).all(), f"{fmt} {role}: worst relative block error {(err / amax).max():.3e}"
    if rope_dim:  # rope dims are kept as bf16
        assert torch.equal(y[..., n:], x[..., n:].to(torch.bfloat16).float())


@pytest.mark.parametrize("fmt, role, dim, rope_dim, match", [
    ("fp4", "kv", 96, 32, "no 'fp4' byte record"), ("fp8", "kv", 96, 33, "even number of nope dims"),
    ("fp4", "index", 48, 0, "multiple of 32"), ("fp8", "kv", 64, 64, "rope_dim < dim")])
def test_layouts_that_do_not_exist_are_refused(fmt, role, dim, rope_dim, match):
    with pytest.raises(ValueError, match=match):
        record_layout(fmt, role, dim, rope_dim)

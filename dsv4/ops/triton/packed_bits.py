"""Bit-level decoding of the packed formats inside Triton kernels, by integer arithmetic rather than a float8 type
(sm80 has none in Triton), so that the same kernels run on any GPU and in the interpreter
(ops/triton/packed_linear.py says why the values are exact)."""
import triton
import triton.language as tl


@triton.jit
def e4m3_as_fp16(b):
    """e4m3fn bytes (int32 0..255) -> fp16 holding 2^-8 times their values, exactly: sign, exponent and mantissa
    bits move into an fp16's (same mantissa alignment, exponent bias 15 instead of 7), and e4m3's subnormals land
    on fp16 subnormals, which conversions keep. Five integer operations per byte; callers fold the 2^8 into the
    scale. (0x7F / 0xFF, NaN in e4m3, do not occur in weights.)"""
    return (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def e2m1_as_fp16(c):
    """e2m1 codes (int32 0..15) -> fp16 holding 2^-14 times their values (0, .5, 1, 1.5, 2, 3, 4, 6; bit 3 the
    sign), exactly, as e4m3_as_fp16 does (exponent bias 15 instead of 1)."""
    return (((c & 8) << 12) | ((c & 7) << 9)).to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def e4m3_values(b):
    """e4m3fn bytes (int32) -> fp32 values."""
    return e4m3_as_fp16(b).to(tl.float32) * 256.0


@triton.jit
def ue8m0_values(s):
    """UE8M0 bytes (int32) -> 2^(s - 127) in fp32 (from the exponent bits; byte 0 gives 0, never stored)."""
    return (s << 23).to(tl.float32, bitcast=True)


"""Number formats of the V4 checkpoints and of its quantisation-aware numerics, and the byte records of the cache's
quantised rows (docs/architecture.md#number-formats)."""
from .formats import (E2M1_VALUES, FP4_MAX, FP8_MAX, dequant_fp4_blocks, dequant_fp8_blocks, e2m1_round, e8m0_to_float,
                      float_to_e8m0, pack_fp4, unpack_fp4)
from .packed import Fp4GroupWeight, Fp8BlockWeight, PackedWeight
from .fake_quant import fp4_fake_quant, fp8_fake_quant, hadamard, straight_through
from .records import RecordLayout, decode_fp4_keys, decode_fp8_kv, decode_records, encode_records, record_bytes, \
    record_layout

__all__ = ["E2M1_VALUES", "FP4_MAX", "FP8_MAX", "e2m1_round", "e8m0_to_float", "float_to_e8m0", "pack_fp4",
           "unpack_fp4", "dequant_fp8_blocks", "dequant_fp4_blocks", "fp8_fake_quant", "fp4_fake_quant", "hadamard",
           "straight_through", "RecordLayout", "record_layout", "record_bytes", "encode_records", "decode_records",
           "decode_fp8_kv", "decode_fp4_keys", "Fp8BlockWeight", "Fp4GroupWeight",
           "PackedWeight"]

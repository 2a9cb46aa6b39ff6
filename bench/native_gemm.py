"""Native FP8 / FP4 weight GEMMs at decode sizes, side by side with bf16 torch.matmul in one run, against the copy
bandwidth measured in the same run (issue 19: weight-only kernels >= 75% of copy bandwidth at M <= 16, grouped FP4
MoE >= 60% at <= 64 tokens per expert with rel-L2 <= 0.3% against the dequantised reference).

    python bench/native_gemm.py [--out results.json] [--ms 1,2,4,8,16,32,64] [--prefill-ms 2048] [--configs]
                                [--only gemm|moe] [--moe-tokens 1,8,64] [--moe-per-expert 1,2,4,8,16,32,64]
    python bench/native_gemm.py --tiny-cpu --out /tmp/smoke.json     # CPU smoke run (Triton interpreter)
    python bench/native_gemm.py --only moe --moe-tokens 1,2 --moe-per-expert "" --moe-experts 32 \
                                --experts-split auto 1 2 4 8                # decode experts: split-K vs none
    python bench/native_gemm.py --only fp4 --ms 1,4,16,64 --prefill-ms "" --moe-tokens 1,2,8 --moe-per-expert "" \
                                --moe-experts 16 --fp4-decode old bf16mul after words   # FP4 decodes
    python bench/native_gemm.py --only fp4 --ms 1,2,4 --prefill-ms "" --moe-tokens "" --moe-per-expert "" \
                                --fp4-decode old --fp4-gemv 32 64 128 [--configs]       # FP4 GEMV vs tl.dot
    python bench/native_gemm.py --only moe --moe-tokens 1,2 --moe-per-expert "" --experts-split 1 2 4 \
                                --experts-gemv                          # decode experts: GEMV vs tl.dot
    python bench/native_gemm.py --only moe --moe-tokens "" --moe-per-expert 8,16,24,32,48,64 --moe-experts 32 \
                                --experts-swap [64:2 64:3 64:1]         # sorted pairs: swapped operands vs not
    python bench/native_gemm.py --only moe --moe-tokens "" --moe-per-expert 8,24,64 --moe-experts 16 \
                                --experts-swap 64:2:1 64:2:2 64:2:4 64:2:auto 64:2:1:168   # swapped: K split

--experts-split times the grouped FP4 experts' direct (decode, <= packed_experts.DIRECT_MAX_PAIRS pairs) kernels
once per K-split setting (auto: packed_experts.direct_split's rule; a number forces that many slices, 1 = none),
side by side on the same routings.

--fp4-decode times the FP4 register kernels (the FP4 GEMM rows and the grouped experts' rows, and each
--experts-split setting) once per FP4 decode of packed_linear.FP4_DECODES (old: scaled in fp32 before the dot,
bf16mul: scaled in bf16 before it, after: the fp32 partial product of each scale group scaled after it, words: the
bytes read as int32 words, one dot in natural k order), on the
same weights and inputs; the row's own timing is the module's default decode (packed_linear.FP4_DECODE).

--experts-gemv times the grouped experts' direct (decode) kernels also on the CUDA-core GEMV (packed_experts.FP4_GEMV,
one pair's row per program instead of a 16-row tl.dot tile), per --experts-split setting (auto without one).

--experts-swap [W:STAGES[:SPLIT[:MAXNREG]] ...] times the grouped experts' sorted-pairs (batched decode) register
kernels, never dequantised (packed_experts.EXPERT_DEQUANT_MIN_PAIRS lifted), as they are and with the operands
swapped (packed_experts.EXPERT_SWAP), once per setting of packed_experts.SWAP_BLOCK_W weight rows, SWAP_STAGES
pipeline stages, optionally SWAP_SPLIT K slices (a number, or auto: swap_splits' rule; left out: the module's
default) and SWAP_GATE_UP_MAXNREG, gate/up's register cap (default settings 64:2 64:3 64:1), on the same routings;
the tiny CPU smoke run adds a routing of 8 pairs per expert for it.

--fp4-gemv WORDS... times the FP4 GEMM rows of at most packed_linear.GEMV_MAX_ROWS activation rows also on the
CUDA-core GEMV (packed_linear.linear_fp4_gemv, whatever FP4_GEMV_MAX_M says), once per K step of WORDS int32
words per weight row (packed_linear.GEMV_WORDS); with --configs, also over BLOCK_N and K-split candidates.

Each GPU case is timed as a CUDA graph that calls the op once on each of several copies of the weights (together
larger than L2, so every call reads its weights from HBM, as decode does), divided by the copy count.
Bandwidth = bytes the call must read or write (packed weights + scales, activations, output) / time.
The results go to bench/results/<date>_<device>_<commit>_native_gemm.json unless --out names another file.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

if "--tiny-cpu" in sys.argv:  # the Triton interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from dsv4.ops.reference import packed as ref  # noqa: E402
from dsv4.ops.triton import packed_experts, packed_linear  # noqa: E402
from dsv4.quant.packed import Fp4GroupWeight, Fp8BlockWeight  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import record, result_path  # noqa: E402  (bench/provenance.py)

# (name, N, K) at V4-Flash sizes: dim 4096, q_lora 1024, 64 heads x 512, 8 output groups of o_lora 1024, expert
# inter 2048; FP8 layers as the checkpoint stores them, the routed experts' w1/w3 and w2 also as FP4
FLASH_FP8 = [("attn.wq_a", 1024, 4096), ("attn.wq_b", 32768, 1024), ("attn.wkv", 512, 4096),
             ("attn.wo_a (one group)", 1024, 4096), ("attn.wo_a (8 groups)", 8192, 4096, 8), ("attn.wo_b", 4096, 8192),
             ("shared.w1/w3", 2048, 4096), ("shared.w1+w3+swiglu", 4096, 4096, "swiglu"), ("shared.w2", 4096, 2048)]
FLASH_FP4 = [("expert.w1/w3", 2048, 4096), ("expert.w2", 4096, 2048)]
FLASH_MOE = dict(E=256, C=4096, F=2048, k=6)
TINY_FP8 = [("tiny", 96, 256), ("tiny grouped", 256, 256, 2), ("tiny swiglu", 256, 256, "swiglu")]
TINY_FP4 = [("tiny", 64, 256)]
TINY_MOE = dict(E=4, C=128, F=64, k=2)
L2_FLUSH_BYTES = 256 << 20   # weight copies per timed graph: together at least this many bytes


@contextlib.contextmanager
def fp4_decode(name: str):
    """packed_linear.FP4_DECODE set to `name` (one of packed_linear.FP4_DECODES) inside the block, with the CUDA-core
    GEMVs off (FP4_GEMV_MAX_M = 0, packed_experts.FP4_GEMV = False: they take few rows by default and have no
    decode to choose), so that the tl.dot kernels' decode is what runs."""
    saved = packed_linear.FP4_DECODE, packed_linear.FP4_GEMV_MAX_M, packed_experts.FP4_GEMV
    packed_linear.FP4_DECODE, packed_linear.FP4_GEMV_MAX_M, packed_experts.FP4_GEMV = name, 0, False
    try:
        yield
    finally:
        packed_linear.FP4_DECODE, packed_linear.FP4_GEMV_MAX_M, packed_experts.FP4_GEMV = saved


@contextlib.contextmanager
def gemv_words(words: int):
    """packed_linear.GEMV_WORDS (the FP4 GEMV's K step, in int32 words per weight row) set inside the block."""
    saved, packed_linear.GEMV_WORDS = packed_linear.GEMV_WORDS, words
    try:
        yield
    finally:
        packed_linear.GEMV_WORDS = saved


def gemv_candidates(M: int, N: int, K: int, device) -> list[tuple[int, int, int, int]]:
    """FP4 GEMV configs (BLOCK_M, BLOCK_N, K steps per program, warps) around packed_linear.gemv_config's:
    16/32/64 weight rows per program (64 also with 8 warps) and K splits giving about 2, 4 or 8 programs per
    SM."""
    steps = -(-K // (8 * packed_linear.GEMV_WORDS))
    sms = packed_linear.multiprocessors(device)
    out = []
    for bn in (16, 32, 64):
        for per_sm in (2, 4, 8):
            split = max(1, min(steps, packed_linear.MAX_SPLIT, per_sm * sms // -(-N // bn)))
            for warps in ((4, 8) if bn == 64 else (4,)):
                cfg = (1 << (M - 1).bit_length(), bn, -(-steps // split), warps)
                if cfg not in out:
                    out.append(cfg)
    return out


def gemv_rows(x, packed, ws, reference, words_list: list[int], sweep: bool, io: int, copy_gbps: float,
              t_b: float, label: str, on_gpu: bool) -> list[dict]:
    """The FP4 GEMV (packed_linear.linear_fp4_gemv) on one GEMM case, per K step in words_list (and per
    gemv_candidates config with `sweep`)."""
    rows = []
    M, K = x.shape
    for words in words_list:
        with gemv_words(words):
            for cfg in [None] + (gemv_candidates(M, packed.shape[0], K, x.device) if sweep else []):
                err = rel_l2(packed_linear.linear_fp4_gemv(x, packed, cfg), reference(x.float(), packed))
                t = timed(lambda i: packed_linear.linear_fp4_gemv(x, ws[i], cfg), len(ws), on_gpu)
                frac = (packed.nbytes + io) / t / 1e6 / copy_gbps
                rows.append({"words": words, "config": cfg, "ms": t, "frac_copy_bw": frac, "rel_l2_vs_reference": err})
                print(f"{label:28s} M={M:3d}  gemv words {words:3d} {str(cfg or 'default'):16s} {t * 1e3:8.1f} us  "
                      f"{frac:6.1%} of copy  x{t_b / t:.2f} vs bf16  rel-L2 {err:.1e}", flush=True)
    return rows


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def timed(fn, calls: int, on_gpu: bool, reps: int = 20) -> float:
    """Milliseconds per fn(i), i over range(calls): a CUDA graph of all calls replayed (GPU), or wall time."""
    if not on_gpu:
        t = time.perf_counter()
        for i in range(calls):
            fn(i)
        return (time.perf_counter() - t) * 1e3 / calls
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(dev: str, on_gpu: bool) -> float:
    """GB/s of a large device copy (bytes read + written)."""
    n = (1 << 30) if on_gpu else (1 << 22)
    x = torch.empty(n, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    ms = timed(lambda i: y.copy_(x), 1, on_gpu)
    return 2 * n / ms / 1e6


def copies(make, nbytes: int, on_gpu: bool) -> list:
    return [make(i) for i in range(max(1, -(-L2_FLUSH_BYTES // nbytes)) if on_gpu else 1)]


def candidate_configs(M: int, N: int, K: int, fmt: str, device) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, K steps per program, warps) around packed_linear.gemm_config's choice: output-row
    tiles of 32/64/128 and K splits giving about 2, 4 or 8 programs per SM (--configs: the lead picks the rule)."""
    steps = -(-K // (128 if fmt == "fp8" else packed_linear.FP4_STEP))
    sms = packed_linear.multiprocessors(device)
    bm = min(64, max(16, 1 << (M - 1).bit_length()))
    out = []
    for bn in (32, 64, 128):
        tiles = -(-N // bn) * -(-M // bm)
        for per_sm in (2, 4, 8):
            split = max(1, min(steps, per_sm * sms // tiles))
            for warps in ((4, 8) if bn == 128 else (4,)):
                cfg = (bm, bn, -(-steps // split), warps)
                if cfg not in out:
                    out.append(cfg)
    return out


def gemm_cases(shapes, fmt: str, ms: list[int], dev: str, on_gpu: bool, copy_gbps: float,
               sweep: bool = False, decodes: list[str] = (), gemv: list[int] = ()) -> list[dict]:
    """`decodes` (FP4): FP4 decodes (packed_linear.FP4_DECODES) timed side by side on each row the register kernel runs;
    `gemv` (FP4): K steps (int32 words per weight row) of the FP4 GEMV timed on the rows it takes."""
    out = []
    g = torch.Generator().manual_seed(0)
    for name, N, K, *grouped in shapes:
        # G head groups: x [M, G, K] through w [N = G * R, K] (linear_fp8_grouped); "swiglu": w = [w1; w3] of
        # N / 2 rows each through swiglu_fp8 (bf16: one matmul on the stacked weight, the SwiGLU not counted)
        G = grouped[0] if grouped and grouped[0] != "swiglu" else 0
        swiglu = grouped == ["swiglu"]
        w0 = torch.randn(N, K, generator=g) / K ** 0.5
        packed = (Fp8BlockWeight if fmt == "fp8" else Fp4GroupWeight).quantize(w0)
        packed = type(packed)(packed.data.to(dev), packed.scale.to(dev))
        bf16 = packed.dequantize(torch.bfloat16)
        ws = copies(lambda i: packed if i == 0 else type(packed)(packed.data.clone(), packed.scale.clone()),
                    packed.nbytes, on_gpu)
        bs = copies(lambda i: bf16 if i == 0 else bf16.clone(), bf16.numel() * 2, on_gpu)
        kernel = packed_linear.linear_fp8_weight if fmt == "fp8" else packed_linear.linear_fp4_weight
        reference = ref.linear_fp8_weight if fmt == "fp8" else ref.linear_fp4_weight
        dense = lambda x, w: torch.matmul(x, w.T)                                   # noqa: E731
        if G:   # as attention's wo_a: one launch for the groups; bf16 as ops.grouped_linear (one einsum)
            kernel = lambda x, w, *cfg, **kw: packed_linear.linear_fp8_grouped(x, w, G, *cfg)  # noqa: E731
            reference = lambda x, w: ref.linear_fp8_grouped(x, w, G)                 # noqa: E731
            dense = lambda x, w: torch.einsum("mgk,grk->mgr", x, w.view(G, N // G, K))  # noqa: E731
        if swiglu:
            halves = lambda w: (w.rows(0, N // 2), w.rows(N // 2, N))                     # noqa: E731
            kernel = lambda x, w, *cfg, **kw: packed_linear.swiglu_fp8(x, *halves(w), 7.0, *cfg, **kw)  # noqa: E731
            reference = lambda x, w: ref.swiglu_fp8(x, *halves(w), 7.0)                  # noqa: E731
        for M in ms:
            x = torch.randn(M, *((G,) if G else ()), K, generator=g).to(dev, torch.bfloat16 if on_gpu else
                                                                            torch.float32)
            io = x.numel() * x.element_size() + M * (N // 2 if swiglu else N) * x.element_size()
            t_q = timed(lambda i: kernel(x, ws[i]), len(ws), on_gpu)
            xb = x.to(torch.bfloat16) if on_gpu else x
            t_b = timed(lambda i: dense(xb, bs[i].to(xb.dtype)), len(bs), on_gpu)
            err = rel_l2(kernel(x, packed), reference(x.float(), packed))
            row = {"case": f"{fmt} {name}", "fmt": fmt, "M": M, "N": N, "K": K,
                   "packed_ms": t_q, "bf16_matmul_ms": t_b, "speedup_vs_bf16": t_b / t_q,
                   "packed_gbps": (packed.nbytes + io) / t_q / 1e6, "bf16_gbps": (N * K * 2 + io) / t_b / 1e6,
                   "rel_l2_vs_reference": err}
            row["packed_frac_copy_bw"] = row["packed_gbps"] / copy_gbps
            row["bf16_frac_copy_bw"] = row["bf16_gbps"] / copy_gbps
            if fmt == "fp8" and on_gpu and packed_linear.has_e4m3(x.device) and not G and not swiglu \
                    and not packed_linear.dequantises(x, K):
                # the same kernel with the integer bit decode (what sm_80 runs), and the FP8 x FP8 product
                t_bits = timed(lambda i: kernel(x, ws[i], native_fp8=False), len(ws), on_gpu)
                t_ff = timed(lambda i: packed_linear.linear_fp8_fp8(x, ws[i]), len(ws), on_gpu)
                row.update(bitdecode_ms=t_bits, bitdecode_frac_copy_bw=(packed.nbytes + io) / t_bits / 1e6 / copy_gbps,
                           fp8xfp8_ms=t_ff, fp8xfp8_frac_copy_bw=(packed.nbytes + io) / t_ff / 1e6 / copy_gbps,
                           fp8xfp8_rel_l2_vs_reference=rel_l2(packed_linear.linear_fp8_fp8(x, packed),
                                                              ref.linear_fp8_fp8(x, packed)))
            if fmt == "fp4" and decodes and not packed_linear.dequantises(x, K):
                row["fp4_decode"] = []
                for name_d in decodes:
                    with fp4_decode(name_d):
                        err_d = rel_l2(kernel(x, packed), reference(x.float(), packed))
                        t_d = timed(lambda i: kernel(x, ws[i]), len(ws), on_gpu)
                    frac = (packed.nbytes + io) / t_d / 1e6 / copy_gbps
                    row["fp4_decode"].append({"decode": name_d, "ms": t_d, "frac_copy_bw": frac,
                                              "rel_l2_vs_reference": err_d})
                    print(f"{'fp4 ' + name:28s} M={M:3d}  decode {name_d:7s}  {t_d * 1e3:8.1f} us  {frac:6.1%} of "
                          f"copy  x{t_b / t_d:.2f} vs bf16  rel-L2 {err_d:.1e}", flush=True)
            if fmt == "fp4" and gemv and M <= packed_linear.GEMV_MAX_ROWS:
                row["fp4_gemv"] = gemv_rows(x, packed, ws, reference, gemv, sweep, io, copy_gbps, t_b,
                                            f"fp4 {name}", on_gpu)
            if sweep and not G and not swiglu and not packed_linear.dequantises(x, K):
                row["configs"] = []
                for cfg in candidate_configs(M, N, K, fmt, x.device):
                    t_c = timed(lambda i: kernel(x, ws[i], cfg), len(ws), on_gpu)
                    frac = (packed.nbytes + io) / t_c / 1e6 / copy_gbps
                    row["configs"].append({"config": cfg, "ms": t_c, "frac_copy_bw": frac})
                    print(f"    config {cfg}  {t_c * 1e3:8.1f} us  {frac:6.1%} of copy  x{t_b / t_c:.2f} vs bf16",
                          flush=True)
            out.append(row)
            print(f"{row['case']:28s} M={M:3d}  packed {t_q * 1e3:8.1f} us {row['packed_frac_copy_bw']:6.1%} of copy"
                  f"  bf16 {t_b * 1e3:8.1f} us {row['bf16_frac_copy_bw']:6.1%}  x{row['speedup_vs_bf16']:.2f}"
                  f"  rel-L2 {err:.1e}" + (f"  | bit-decode {row['bitdecode_frac_copy_bw']:6.1%}  fp8xfp8 "
                                           f"{row['fp8xfp8_frac_copy_bw']:6.1%}" if "fp8xfp8_ms" in row else ""),
                  flush=True)
    return out


def balanced_routing(N: int, E: int, k: int, g: torch.Generator) -> torch.Tensor:
    """[N, k] distinct experts per token with every expert given N * k // E or one more tokens: slot j of token
    n takes expert (n * k + j) mod E, under a random relabelling of the experts."""
    perm = torch.randperm(E, generator=g)
    return perm[(torch.arange(N)[:, None] * k + torch.arange(k)[None, :]) % E]


def moe_cases(shape: dict, tokens: list[int], dev: str, on_gpu: bool, copy_gbps: float,
              per_expert: list[int] = (), splits: list[str] = (), decodes: list[str] = (),
              gemv: bool = False, swaps: list[str] | None = None) -> list[dict]:
    """The grouped FP4 experts against the bf16 experts (dsv4.ops.moe_experts, as the bf16 model runs them) on
    the same routings; each timed graph calls them on `ROUTINGS` different random routings, so that the experts one
    call reads are not still in L2 from the call before. `splits`: K-split settings of the direct kernels timed
    side by side where a call takes that path ("auto" or a forced slice count), under each FP4 decode of `decodes`
    (packed_linear.FP4_DECODES; also timed on their own wherever the register kernels run); `gemv`: the same
    settings ("auto" without `splits`) also with the direct kernels on the CUDA-core GEMV (packed_experts.FP4_GEMV);
    `swaps` (None: not timed): the sorted pairs' register kernels as they are and swapped per "W:STAGES" (swap_case)."""
    from dsv4 import ops
    E, C, F, k = shape["E"], shape["C"], shape["F"], shape["k"]
    g = torch.Generator().manual_seed(1)
    w1, w3 = (Fp4GroupWeight.quantize(torch.randn(E, F, C, generator=g) / C ** 0.5) for _ in range(2))
    w2 = Fp4GroupWeight.quantize(torch.randn(E, C, F, generator=g) / F ** 0.5)
    w1, w2, w3 = (Fp4GroupWeight(w.data.to(dev), w.scale.to(dev)) for w in (w1, w2, w3))
    b1, b2, b3 = (torch.stack([w[e].dequantize(torch.bfloat16) for e in range(E)]) for w in (w1, w2, w3))
    expert_bytes = w1[0].nbytes + w2[0].nbytes + w3[0].nbytes
    calls = 8 if on_gpu else 1
    out = []
    runs = [(N, False) for N in tokens] + [(-(-E * t // k), True) for t in per_expert]
    for N, balanced in runs:
        x = torch.randn(N, C, generator=g).to(dev, torch.bfloat16 if on_gpu else torch.float32)
        idxs = [(balanced_routing(N, E, k, g) if balanced else torch.rand(N, E, generator=g).argsort(-1)[:, :k])
                .to(dev) for _ in range(calls)]
        rw = torch.rand(N, k, generator=g).to(dev)
        active = sum(i.unique().numel() for i in idxs) / calls
        most = max(torch.bincount(i.flatten().cpu(), minlength=E).max().item() for i in idxs)
        # the FP4 experts are checked and timed (and synchronised) before the bf16 ones start, so that a fault
        # in either is reported by the phase that made it
        got = packed_experts.moe_experts_fp4(x, w1, w2, w3, idxs[0], rw, 10.0)
        err = rel_l2(got, ref.moe_experts_fp4(x, w1, w2, w3, idxs[0], rw, 10.0))
        t = timed(lambda i: packed_experts.moe_experts_fp4(x, w1, w2, w3, idxs[i], rw, 10.0), calls, on_gpu)
        t_b = timed(lambda i: ops.moe_experts(x.to(b1.dtype), b1, b2, b3, idxs[i], rw, 10.0), calls, on_gpu)
        io = x.numel() * x.element_size() + N * C * 4
        row = {"case": "fp4 grouped moe", "routing": "balanced" if balanced else "random", "tokens": N, "E": E,
               "C": C, "F": F, "k": k, "active_experts": active, "max_tokens_per_expert": most, "ms": t, "bf16_ms": t_b,
               "speedup_vs_bf16": t_b / t, "gbps": (active * expert_bytes + io) / t / 1e6,
               "bf16_gbps": (active * 3 * F * C * 2 + io) / t_b / 1e6,
               "rel_l2_vs_dequantised_reference": err}
        row["frac_copy_bw"] = row["gbps"] / copy_gbps
        row["bf16_frac_copy_bw"] = row["bf16_gbps"] / copy_gbps
        out.append(row)
        print(f"fp4 moe {row['routing']:8s} N={N:5d} active={active:5.1f} max/expert={most:3d}  {t * 1e3:8.1f} us "
              f"{row['frac_copy_bw']:6.1%} of copy  bf16 {t_b * 1e3:8.1f} us {row['bf16_frac_copy_bw']:6.1%}  "
              f"x{row['speedup_vs_bf16']:.2f}  rel-L2 {row['rel_l2_vs_dequantised_reference']:.1e}", flush=True)
        registers = not packed_experts.dequantises(idxs[0], E, x.device)
        if decodes and registers:
            row["fp4_decode"] = [decode_case(d, x, w1, w2, w3, idxs, rw, active * expert_bytes + io, copy_gbps,
                                             calls, on_gpu) for d in decodes]
        if splits and N * k <= packed_experts.DIRECT_MAX_PAIRS:
            row["experts_split"] = [split_case(s, x, w1, w2, w3, idxs, rw, active * expert_bytes + io, copy_gbps,
                                               calls, on_gpu, d) for d in (decodes or [None]) for s in splits]
        if swaps is not None and N * k > packed_experts.DIRECT_MAX_PAIRS:
            row["experts_swap"] = [swap_case(s, x, w1, w2, w3, idxs, rw, active * expert_bytes + io, copy_gbps,
                                             calls, on_gpu) for s in [None, *swaps]]
        if gemv and N * k <= packed_experts.DIRECT_MAX_PAIRS:
            row["experts_gemv"] = [split_case(s, x, w1, w2, w3, idxs, rw, active * expert_bytes + io, copy_gbps,
                                              calls, on_gpu, gemv=True) for s in (splits or ["auto"])]
    return out


def decode_case(decode: str, x, w1, w2, w3, idxs, rw, nbytes: float, copy_gbps: float, calls: int,
                on_gpu: bool) -> dict:
    """The grouped FP4 experts (register kernels, the default K split) under the FP4 decode `decode`."""
    with fp4_decode(decode):
        err = rel_l2(packed_experts.moe_experts_fp4(x, w1, w2, w3, idxs[0], rw, 10.0),
                     ref.moe_experts_fp4(x, w1, w2, w3, idxs[0], rw, 10.0))
        t = timed(lambda i: packed_experts.moe_experts_fp4(x, w1, w2, w3, idxs[i], rw, 10.0), calls, on_gpu)
    frac = nbytes / t / 1e6 / copy_gbps
    print(f"    fp4 decode {decode:7s}  {t * 1e3:8.1f} us  {frac:6.1%} of copy  rel-L2 {err:.1e}", flush=True)
    return {"decode": decode, "ms": t, "frac_copy_bw": frac, "rel_l2_vs_dequantised_reference": err}


@contextlib.contextmanager
def module_values(module, **values):
    """The module's attributes set to `values` inside the block."""
    saved = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def swap_setting(setting: str) -> dict:
    """The packed_experts values of an --experts-swap setting "W:STAGES[:SPLIT[:MAXNREG]]": SWAP_BLOCK_W,
    SWAP_STAGES, SWAP_SPLIT (a slice count, or "auto" for swap_splits' rule; left out: the module's default) and
    SWAP_GATE_UP_MAXNREG (left out: none)."""
    fields = setting.split(":")
    try:
        if not 2 <= len(fields) <= 4:
            raise ValueError
        values = dict(SWAP_BLOCK_W=int(fields[0]), SWAP_STAGES=int(fields[1]), SWAP_GATE_UP_MAXNREG=None)
        if len(fields) > 2:
            values["SWAP_SPLIT"] = None if fields[2] == "auto" else int(fields[2])
        if len(fields) > 3:
            values["SWAP_GATE_UP_MAXNREG"] = int(fields[3])
    except ValueError:
        raise SystemExit(f"--experts-swap {setting!r}: expected W:STAGES[:SPLIT[:MAXNREG]], SPLIT a number or auto")
    return values


def swap_case(setting: str | None, x, w1, w2, w3, idxs, rw, nbytes: float, copy_gbps: float, calls: int,
              on_gpu: bool) -> dict:
    """The grouped FP4 experts' sorted pairs on the register kernels (not dequantised, whatever the pairs per
    expert): as they are (setting None) or swapped (packed_experts.EXPERT_SWAP) with setting
    "W:STAGES[:SPLIT[:MAXNREG]]" (swap_setting)."""
    values = dict(EXPERT_DEQUANT_MIN_PAIRS=1 << 30, EXPERT_SWAP=setting is not None, SWAP_MIN_PAIRS=0)
    if setting is not None:
        values.update(swap_setting(setting))
    N, k = idxs[0].shape
    E, F, C = w1.shape
    with module_values(packed_experts, **values):
        splits = packed_experts.swap_splits(N * k, E, F, C, x.device) if setting else None
        err = rel_l2(packed_experts.moe_experts_fp4(x, w1, w2, w3, idxs[0], rw, 10.0),
                     ref.moe_experts_fp4(x, w1, w2, w3, idxs[0], rw, 10.0))
        t = timed(lambda i: packed_experts.moe_experts_fp4(x, w1, w2, w3, idxs[i], rw, 10.0), calls, on_gpu)
    frac = nbytes / t / 1e6 / copy_gbps
    label = f"swap {setting}" if setting else "not swapped"
    tokens = packed_experts.swap_tokens(N * k, E) if setting else None
    split_label = f"split {splits[0]}/{splits[1]}" if splits else "-"
    print(f"    experts {label:16s} (pair tile {tokens or '-'}, {split_label:>9s})  {t * 1e3:8.1f} us  "
          f"{frac:6.1%} of copy  rel-L2 {err:.1e}", flush=True)
    return {"setting": setting, "swap": setting is not None, "pair_tile": tokens,
            "gate_up_split": splits[0] if splits else None, "down_split": splits[1] if splits else None,
            "ms": t, "frac_copy_bw": frac, "rel_l2_vs_dequantised_reference": err}


def split_case(setting: str, x, w1, w2, w3, idxs, rw, nbytes: float, copy_gbps: float, calls: int,
               on_gpu: bool, decode: str | None = None, gemv: bool = False) -> dict:
    """The grouped FP4 experts on the direct path with the K-split `setting` ("auto": the rule; n: n slices),
    under the FP4 decode `decode` (None: the module's default), or with `gemv` on the CUDA-core GEMV
    (packed_experts.FP4_GEMV)."""
    forced = None if setting == "auto" else int(setting)
    saved, packed_experts.DIRECT_SPLIT = packed_experts.DIRECT_SPLIT, forced
    saved_gemv, packed_experts.FP4_GEMV = packed_experts.FP4_GEMV, gemv
    try:
        with fp4_decode(decode) if decode else contextlib.nullcontext():
            N, k = idxs[0].shape
            gate_up, down = packed_experts.direct_splits(N * k, w1.shape[1], w1.shape[2], x.device)
            err = rel_l2(packed_experts.moe_experts_fp4(x, w1, w2, w3, idxs[0], rw, 10.0),
                         ref.moe_experts_fp4(x, w1, w2, w3, idxs[0], rw, 10.0))
            t = timed(lambda i: packed_experts.moe_experts_fp4(x, w1, w2, w3, idxs[i], rw, 10.0), calls, on_gpu)
    finally:
        packed_experts.DIRECT_SPLIT = saved
        packed_experts.FP4_GEMV = saved_gemv
    frac = nbytes / t / 1e6 / copy_gbps
    label = " gemv" if gemv else f" decode {decode}" if decode else ""
    print(f"    experts split {setting:>4s}{label} (gate/up {gate_up:2d}, down {down:2d})  {t * 1e3:8.1f} us  "
          f"{frac:6.1%} of copy  rel-L2 {err:.1e}", flush=True)
    return {"setting": setting, "decode": decode, "gemv": gemv, "gate_up_split": gate_up, "down_split": down,
            "ms": t, "frac_copy_bw": frac, "rel_l2_vs_dequantised_reference": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="JSON path (default: bench/results/<date>_<device>_<commit>_native_gemm.json)")
    ap.add_argument("--ms", default="1,2,4,8,16,32,64", help="activation rows (decode batch sizes)")
    ap.add_argument("--prefill-ms", default="2048", help="activation rows of the prefill cases (from "
                    "packed_linear.DEQUANT_MIN_ROWS: a matmul on the dequantised copy); empty: none")
    ap.add_argument("--moe-tokens", default="1,8,64", help="tokens through the grouped FP4 MoE, randomly routed")
    ap.add_argument("--moe-per-expert", default="1,2,4,8,16,32,64", help="tokens per expert of the balanced "
                    "routings (every expert used, E * t / k tokens)")
    ap.add_argument("--moe-experts", type=int, help="experts of the grouped MoE (default: V4-Flash's 256; fewer "
                    "build faster and still outgrow L2 over a timed graph's routings)")
    ap.add_argument("--experts-split", nargs="+", default=[], metavar="auto|N",
                    help="K-split settings of the direct (decode) FP4 expert kernels to time side by side")
    ap.add_argument("--fp4-decode", nargs="+", default=[], choices=packed_linear.FP4_DECODES,
                    help="FP4 decodes to time side by side (packed_linear.FP4_DECODES)")
    ap.add_argument("--fp4-gemv", nargs="+", type=int, default=[], metavar="WORDS",
                    help="also time the FP4 GEMV (M <= packed_linear.GEMV_MAX_ROWS) per K step of WORDS int32 words")
    ap.add_argument("--experts-gemv", action="store_true", help="also time the grouped FP4 experts' direct (decode) "
                    "kernels on the CUDA-core GEMV (packed_experts.FP4_GEMV), per --experts-split setting")
    ap.add_argument("--experts-swap", nargs="*", metavar="W:STAGES[:SPLIT[:MAXNREG]]", help="also time the grouped "
                    "FP4 experts' sorted-pairs register kernels as they are and with swapped operands "
                    "(packed_experts.EXPERT_SWAP) per SWAP_BLOCK_W:SWAP_STAGES[:SWAP_SPLIT (n or auto)"
                    "[:SWAP_GATE_UP_MAXNREG]] setting (default 64:2 64:3 64:1)")
    ap.add_argument("--configs", action="store_true", help="also time candidate kernel configs per GEMM case")
    ap.add_argument("--only", choices=("gemm", "moe", "fp4"), help="run only the GEMM cases, only the grouped MoE, "
                    "or only the FP4 ones (the FP4 GEMMs and the grouped MoE)")
    ap.add_argument("--tiny-cpu", action="store_true", help="smoke run: tiny shapes in the Triton interpreter")
    args = ap.parse_args()
    on_gpu = torch.cuda.is_available() and not args.tiny_cpu
    if not on_gpu and not args.tiny_cpu:
        raise SystemExit("no CUDA GPU: run with --tiny-cpu for the CPU smoke run")
    dev = "cuda" if on_gpu else "cpu"
    # the smoke run: one case per path (decode rows, the dequantised prefill; random and balanced routings, the
    # random one with several tokens on an expert), since each interpreted call takes a second
    ms = [1, packed_linear.DEQUANT_MIN_ROWS] if args.tiny_cpu else [
        int(m) for m in (args.ms + "," + args.prefill_ms).split(",") if m]
    moe_tokens = [5] if args.tiny_cpu else [int(n) for n in args.moe_tokens.split(",") if n]
    copy_gbps = copy_bandwidth(dev, on_gpu)
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s", flush=True)
    if args.experts_swap == []:
        args.experts_swap = ["64:2", "64:3", "64:1"]
    for setting in args.experts_swap or []:
        swap_setting(setting)   # a malformed setting fails here, not after the other cases ran
    per_expert = ([1] + ([8] if args.experts_swap else [])) if args.tiny_cpu else [
        int(t) for t in args.moe_per_expert.split(",") if t]
    results = []
    if args.only in (None, "gemm"):
        results += gemm_cases(FLASH_FP8 if on_gpu else TINY_FP8, "fp8", ms, dev, on_gpu, copy_gbps, args.configs)
    if args.only != "moe":
        results += gemm_cases(FLASH_FP4 if on_gpu else TINY_FP4, "fp4", ms, dev, on_gpu, copy_gbps, args.configs,
                              args.fp4_decode, args.fp4_gemv)
    if args.only != "gemm":
        shape = dict(FLASH_MOE if on_gpu else TINY_MOE)
        if args.moe_experts:
            shape["E"] = args.moe_experts
        results += moe_cases(shape, moe_tokens, dev, on_gpu, copy_gbps, per_expert, args.experts_split,
                             args.fp4_decode, args.experts_gemv, args.experts_swap)
    doc = {**record(dev), "copy_gbps": copy_gbps, "tiny_cpu": args.tiny_cpu, "fp4_decodes": args.fp4_decode,
           "fp4_gemv_words": args.fp4_gemv, "experts_swap": args.experts_swap,
           "results": results}
    path = args.out or result_path("native_gemm", device=dev)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

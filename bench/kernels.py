"""Kernel benchmarks at V4-Flash shapes, side by side with what a PyTorch user would otherwise run, against
ceilings measured in the same run (a large bf16 matmul, a large device copy).

    python bench/kernels.py [--parts attention indexer ...] [--json out.json]

The results go to bench/results/<date>_<device>_<commit>_kernels.json (a subset of --parts adds their names,
e.g. ..._kernels_sweep.json) unless --json names another file.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
import triton

from dsv4.cache.layout import RowStore
from dsv4.ops import compiled
from dsv4.ops.reference import indexer as ref_idx
from dsv4.ops.reference import sparse_attn as ref_attn
from dsv4.ops.reference import sequence_attn as ref_seq
from dsv4.ops.triton import indexer as tri_idx
from dsv4.ops.triton import sequence_attn as tri_seq
from dsv4.ops.triton import sparse_attn as tri_attn
from provenance import record, result_path  # bench/provenance.py


def bench(fn, reps: int = 20) -> float:
    """Median milliseconds (L2 flushed between runs by do_bench)."""
    return triton.testing.do_bench(fn, warmup=5, rep=reps * 5, return_mode="median")


def bench_graph(fn, reps: int = 20) -> float:
    """Median milliseconds of `fn` replayed from a CUDA graph: kernel time without Python launch overhead (how
    the decode loop runs it)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return bench(g.replay, reps)


def ceilings() -> dict:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ a)
    x = torch.empty(1 << 29, device="cuda", dtype=torch.uint8)  # 512 MiB
    y = torch.empty_like(x)
    cms = bench(lambda: y.copy_(x))
    return {"bf16_matmul_tflops": 2 * 8192 ** 3 / ms / 1e9, "copy_gbps": 2 * x.numel() / cms / 1e6}


def attn_case(name: str, B: int, S: int, H: int, D: int, K: int, N: int, ceil: dict) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    kv = torch.randn(B, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
    sink = torch.randn(H, device="cuda")
    idx = torch.randint(0, N, (B, S, K), device="cuda", generator=g, dtype=torch.int32)
    # decode (S == 1) replays a captured CUDA graph, as the decode loop runs it: timed eagerly, a ~0.05 ms kernel
    # also measures the Python wrapper's launch overhead (kept as triton_eager_ms)
    timer = bench_graph if S == 1 else bench
    t_tri = timer(lambda: tri_attn.sparse_attn(q, kv, sink, idx, D ** -0.5))
    out = {"case": name, "B": B, "S": S, "H": H, "D": D, "K": K, "triton_ms": t_tri,
           "timing": "cuda graph replay" if S == 1 else "eager"}
    if S == 1:
        out["triton_eager_ms"] = bench(lambda: tri_attn.sparse_attn(q, kv, sink, idx, D ** -0.5))
    flops = 4 * B * S * H * K * D                        # QK^T and PV
    rows_bytes = B * S * K * D * 2 + 2 * q.numel() * 2   # gathered rows (each query's own) + q + o
    out["triton_tflops"] = flops / t_tri / 1e9
    out["triton_gbps"] = rows_bytes / t_tri / 1e6
    out["frac_copy_bw"] = out["triton_gbps"] / ceil["copy_gbps"]
    out["frac_matmul"] = out["triton_tflops"] / ceil["bf16_matmul_tflops"]
    if B * S * K * D <= (1 << 28):
        out["reference_ms"] = bench(lambda: ref_attn.sparse_attn(q, kv, sink, idx, D ** -0.5), reps=5)
        # what a user would write: gather the rows, then SDPA with the heads folded into the query axis
        def sdpa():
            rows = torch.gather(kv, 1, idx.long().clamp(min=0).flatten(1).unsqueeze(-1).expand(-1, -1, D))
            rows = rows.view(B * S, 1, K, D)
            return F.scaled_dot_product_attention(q.reshape(B * S, 1, H, D), rows, rows)
        out["gather_sdpa_ms"] = timer(sdpa, reps=5)
    if S > 1:
        out.update(flex_case(q, kv, idx))
    return out


def flex_case(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor) -> dict:
    """What a PyTorch user would otherwise write for a prefill over index lists: FlexAttention (compiled) over
    all rows with the lists as a dense mask (one shared K=V head, GQA). No sink (FlexAttention has none)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        B, S, H, D = q.shape
        N = kv.shape[1]
        allowed = torch.zeros(B, S, N, dtype=torch.bool, device=q.device)
        allowed.scatter_(2, idx.long().clamp(min=0), True)
        block_mask = create_block_mask(lambda b, h, qi, ki: allowed[b, qi, ki], B, None, S, N, device="cuda")
        flex = torch.compile(flex_attention, dynamic=False)
        qt, kt = q.transpose(1, 2), kv.unsqueeze(1)
        ms = bench(lambda: flex(qt, kt, kt, block_mask=block_mask, enable_gqa=True), reps=5)
        return {"flex_ms": ms}
    except Exception as e:  # noqa: BLE001 - e.g. a head dim FlexAttention does not support: report it
        return {"flex_error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}


def train_attn_inputs(S: int, ratio: int, topk: int | None, H: int = 64, D: int = 512):
    """One training sequence: leaves [q, kv, entries, sink] (requiring grad), the entry mask [1, S, S // ratio]
    (visible entries; CSA: the top-k of random scores among them) and an output gradient."""
    g = torch.Generator(device="cuda").manual_seed(3)
    N = S // ratio
    leaves = [torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g),
              torch.randn(1, S, D, device="cuda", dtype=torch.bfloat16, generator=g),
              torch.randn(1, N, D, device="cuda", dtype=torch.bfloat16, generator=g),
              torch.randn(H, device="cuda", generator=g)]
    leaves = [x.requires_grad_(True) for x in leaves]
    pos = torch.arange(S, device="cuda")
    mask = (torch.arange(N, device="cuda") < ((pos + 1) // ratio).unsqueeze(-1)).unsqueeze(0)
    if topk:  # the indexer's selection: top-k of random scores among the visible entries
        sc = torch.rand(1, S, N, device="cuda", generator=g).masked_fill(~mask, -1)
        mask = mask & torch.zeros_like(mask).scatter_(2, sc.topk(min(topk, N), -1).indices, True)
    return leaves, mask, torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g)


def train_attn_case(name: str, S: int, ratio: int, topk: int | None, ceil: dict, H: int = 64, D: int = 512,
                    W: int = 128, long: bool = False) -> dict:
    """Training attention, forward + backward at one sequence: the Triton kernels, the reference as training
    otherwise runs it (torch.compile'd chunks), eager, and FlexAttention (compiled; all rows with the window and
    entry mask as a block mask, one shared K=V head, no sink). long: the Triton kernels' list walk alone (the
    references take tens of seconds per step there; bench/e2e.py times whole 64K steps both ways)."""
    leaves, mask, do = train_attn_inputs(S, ratio, topk, H, D)
    N, pos = S // ratio, torch.arange(S, device="cuda")

    def fwd_bwd(fn):
        def run():
            o, _ = fn(*leaves[:3], mask, leaves[3], D ** -0.5, W)
            o.backward(do)
        return run
    visible = int(mask.sum()) + S * min(W, S)                 # (query, row) pairs attended: the useful work
    flops = 4 * H * D * visible * 3.5                         # QK and PV forward, 2.5x that backward (with recompute)
    out = {"case": name, "S": S, "N": N}
    impls = {"triton": tri_seq.sequence_attn, "compiled_reference": compiled.IMPLEMENTATIONS["sequence_attn"],
             "eager_reference": ref_seq.sequence_attn}
    if long:
        impls = {"triton": impls["triton"]}
    for impl, fn in impls.items():
        try:
            out[f"{impl}_ms"] = bench(fwd_bwd(fn), reps=5)
        except Exception as e:  # noqa: BLE001 - report (e.g. out of memory) and go on
            out[f"{impl}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    if "triton_ms" in out:
        out["triton_tflops"] = flops / out["triton_ms"] / 1e9
        out["frac_matmul"] = out["triton_tflops"] / ceil["bf16_matmul_tflops"]
    if long:
        return out
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        allowed = torch.cat((torch.zeros(1, S, S, dtype=torch.bool, device="cuda"), mask), -1)
        i, j = pos.view(S, 1), pos.view(1, S)
        allowed[:, :, :S] = (j <= i) & (j > i - W)
        block_mask = create_block_mask(lambda b, h, qi, ki: allowed[b, qi, ki], 1, None, S, S + N, device="cuda")
        flex = torch.compile(flex_attention, dynamic=False)
        qt = leaves[0].transpose(1, 2)

        def flex_run():
            rows = torch.cat((leaves[1], leaves[2]), 1).unsqueeze(1)
            flex(qt, rows, rows, block_mask=block_mask, enable_gqa=True).backward(do.transpose(1, 2))
        out["flex_ms"] = bench(flex_run, reps=5)
    except Exception as e:  # noqa: BLE001 - e.g. a head dim FlexAttention does not support: report it
        out["flex_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return out


def attn_sweep(name: str, B: int, S: int, K: int, N: int, ceil: dict, H: int = 64, D: int = 512,
               window: int = 0, entries: str = "") -> list[dict]:
    """Configurations of the sparse-attention kernel (split-K slices, heads per program, warps, rows per step,
    pipeline depth), timed as CUDA graph replays. window > 0: the serving decode's layout, that many window rows
    first and the other N - window rows as a second source read in place, `entries` "bf16" or "fp8" records."""
    g = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    kv = torch.randn(B, window or N, D, device="cuda", dtype=torch.bfloat16, generator=g)
    sink = torch.randn(H, device="cuda")
    idx = torch.randint(0, N, (B, S, K), device="cuda", generator=g, dtype=torch.int32)
    rows_bytes = B * S * K * D * 2 + 2 * q.numel() * 2
    extra = {}
    if window:
        n = N - window
        store = RowStore(entries, B, n, D, 64, "kv", torch.bfloat16, "cuda")
        store.write(torch.arange(n, device="cuda").expand(B, n), torch.randn(B, n, D, device="cuda", generator=g))
        extra = {"entries": store.records(n), "rope_dim": 64}
        idx[..., :window] = torch.arange(window, device="cuda", dtype=idx.dtype)  # the window, then entries
        far = (idx >= window).sum().item()  # rows read from the second source
        rows_bytes = (B * S * K - far) * D * 2 + far * store.records(n)[0, 0].nbytes + 2 * q.numel() * 2
    flops = 4 * B * S * H * K * D
    out = []
    if S == 1 and B > 1 and window:  # the serving layout: the defaults (None) and their neighbours
        configs = [(None, None, None, None, None), (2, 64, 8, 32, 2), (2, 64, 8, 32, 3), (4, 64, 8, 32, 3),
                   (2, 64, 8, 16, 3), (2, 64, 8, 16, 4)]
    else:
        configs = [(splits, bh, w, 32, 2) for splits in ((None, 1, 4) if S == 1 else (1,))
                   for bh, w in ((16, 4), (32, 8), (64, 8))]
    if S == 1 and B > 1 and not window:  # batched decode: deeper pipelines and longer steps over the gathered rows
        configs += [(splits, bh, w, bk, st) for splits in (1, 2) for bh, w in ((16, 4), (64, 8))
                    for bk, st in ((32, 3), (64, 2), (64, 3))]
    for splits, block_h, warps, block_k, stages in configs:
        cfg = {"case": name, "splits": splits, "block_h": block_h, "warps": warps, "block_k": block_k,
               "stages": stages}
        try:
            ms = bench_graph(lambda: tri_attn.sparse_attn(q, kv, sink, idx, D ** -0.5, splits=splits, block_h=block_h,
                                                          num_warps=warps, block_k=block_k, num_stages=stages,
                                                          **extra))
        except Exception as e:  # noqa: BLE001 - a config that does not compile is a row, not a failure
            out.append({**cfg, "error": str(e)[:100]})
            continue
        out.append({**cfg, "ms": ms, "gbps": rows_bytes / ms / 1e6,
                    "frac_copy_bw": rows_bytes / ms / 1e6 / ceil["copy_gbps"], "tflops": flops / ms / 1e9})
    return out


def topk_case(rows: int, T: int, k: int = 512) -> dict:
    """torch.topk over whole rows, sorted (batch-invariant mode) and unsorted (what the indexer runs)."""
    s = torch.randn(rows, T, device="cuda")
    return {"rows": rows, "T": T, "k": k, "torch_topk_ms": bench(lambda: s.topk(k, dim=-1)),
            "unsorted_ms": bench(lambda: tri_idx.topk_indices(s, k)),
            "sort_ms": bench(lambda: s.sort(dim=-1, descending=True))}


def indexer_case(name: str, B: int, S: int, T: int, ceil: dict, HI: int = 64, DI: int = 128, k: int = 512) -> dict:
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(B, S, HI, DI, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(B, S, HI, device="cuda", generator=g)
    keys = torch.randn(B, T, DI, device="cuda", dtype=torch.bfloat16, generator=g)
    nv = torch.full((B, S), T, device="cuda")
    timer = bench_graph if S == 1 else bench  # decode: graph replay, as in attn_case
    t_scores = timer(lambda: tri_idx.index_scores_masked(q, w, keys, nv))
    t_topk = timer(lambda: tri_idx.indexer_topk(q, w, keys, nv, k))
    key_bytes = B * T * DI * 2
    out = {"case": name, "B": B, "S": S, "T": T, "scores_ms": t_scores, "scores_plus_topk_ms": t_topk,
           "timing": "cuda graph replay" if S == 1 else "eager",
           "scores_gbps": key_bytes / t_scores / 1e6, "frac_copy_bw": key_bytes / t_scores / 1e6 / ceil["copy_gbps"],
           "scores_tflops": 2 * B * S * T * HI * DI / t_scores / 1e9}
    if S == 1:  # 64-key steps per program (the default picks by how many programs fill the GPU)
        out["steps_sweep_ms"] = {n: timer(lambda: tri_idx.index_scores_masked(q, w, keys, nv, steps_per_program=n))
                                 for n in (1, 2, 4, 8, 16)}
    if B * S * T * HI <= (1 << 28):
        out["reference_ms"] = bench(lambda: ref_idx.indexer_topk(q, w, keys, nv, k), reps=5)
    return out


def indexer_train_case(name: str, S: int, ratio: int, ceil: dict, HI: int = 64, DI: int = 128) -> dict:
    """The indexer's scores under its KL loss, forward + backward at one sequence: the Triton kernels (products
    recomputed per tile, all-zero gradient tiles skipped) and the reference as training ran it before (fp32
    einsums in checkpointed query chunks). The gradient is random on the causally visible entries and 0 elsewhere,
    as the KL's is."""
    g = torch.Generator(device="cuda").manual_seed(4)
    T = S // ratio
    leaves = [torch.randn(1, S, HI, DI, device="cuda", dtype=torch.bfloat16, generator=g),
              torch.randn(1, S, HI, device="cuda", generator=g),
              torch.randn(1, T, DI, device="cuda", dtype=torch.bfloat16, generator=g)]
    leaves = [x.requires_grad_(True) for x in leaves]
    visible = torch.arange(T, device="cuda") < ((torch.arange(S, device="cuda") + 1) // ratio).unsqueeze(-1)
    dout = torch.randn(1, S, T, device="cuda", generator=g) * visible

    def fwd_bwd(fn):
        return lambda: fn(*leaves).backward(dout)
    out = {"case": name, "S": S, "T": T}
    for impl, fn in {"triton": tri_idx.index_scores, "reference": ref_idx.index_scores}.items():
        try:
            out[f"{impl}_ms"] = bench(fwd_bwd(fn), reps=5)
        except Exception as e:  # noqa: BLE001 - report (e.g. out of memory) and go on
            out[f"{impl}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    if "triton_ms" in out:  # the forward's product over all pairs, the backward's four over the visible half
        flops = 2 * S * T * HI * DI * (1 + 4 * float(visible.float().mean()))
        out["triton_tflops"] = flops / out["triton_ms"] / 1e9
        out["frac_matmul"] = out["triton_tflops"] / ceil["bf16_matmul_tflops"]
    return out


def compressor_case(name: str, S: int, ratio: int, d: int, overlap: bool, ceil: dict) -> dict:
    """The compressor's prefill pooling of one S-token chunk from position 0 (fp32 projections in, fp32 entries
    out, the position bias added by phase): the Triton kernel and the reference (candidate copies + softmax)."""
    from dsv4.ops.reference import compressor as ref_pool
    from dsv4.ops.triton import compressor as tri_comp
    g = torch.Generator(device="cuda").manual_seed(5)
    W2 = (2 if overlap else 1) * d
    kv, sc = (torch.randn(1, S, W2, device="cuda", generator=g) for _ in range(2))
    ape = torch.randn(ratio, W2, device="cuda", generator=g)
    args = (kv, sc, ratio, overlap, S // ratio, None, ape)
    out = {"case": name, "S": S, "ratio": ratio, "d": d,
           "triton_ms": bench(lambda: tri_comp.compress_groups(*args)),
           "reference_ms": bench(lambda: ref_pool.compress_groups(*args))}
    leaves = [t.clone().requires_grad_(True) for t in (kv, sc, ape)]
    dout = torch.randn(1, S // ratio, d, device="cuda", generator=g)
    for impl, mod in (("triton", tri_comp), ("reference", ref_pool)):  # training: forward + backward
        out[f"{impl}_train_ms"] = bench(lambda: mod.compress_groups(leaves[0], leaves[1], ratio, overlap, S // ratio,
                                                                    None, leaves[2]).backward(dout), reps=5)
    moved = 2 * kv.numel() * 4 + S // ratio * d * 4                  # read kv and scores once, write the entries
    out["triton_gbps"] = moved / out["triton_ms"] / 1e6
    out["frac_copy_bw"] = out["triton_gbps"] / ceil["copy_gbps"]
    return out


PARTS = ("attention", "indexer", "sweep", "train", "topk", "compressor")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="results file (default: bench/results/<date>_<device>_<commit>_kernels[_parts].json)")
    p.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS, help="which groups of cases to run")
    p.add_argument("--sweep-only", default="", help="sweep only the cases whose name contains this (e.g. b64)")
    a = p.parse_args()
    os.environ.setdefault("DSV4_TRITON_STRICT", "1")  # a kernel that does not build: an error, not the reference's time
    ceil = ceilings()
    print(f"ceilings: bf16 matmul {ceil['bf16_matmul_tflops']:.0f} TFLOP/s, device copy {ceil['copy_gbps']:.0f} GB/s")
    run = set(a.parts)
    attn_cases = [("CSA decode 128K b64", 64, 1, 64, 512, 128 + 512, 128 + 32768 // 16),
                  ("HCA decode 128K b64", 64, 1, 64, 512, 128 + 1024, 128 + 1024),
                  ("CSA decode b1", 1, 1, 64, 512, 640, 4096),
                  ("CSA prefill 4K", 1, 4096, 64, 512, 640, 4096 + 1024),
                  ("HCA prefill 4K", 1, 4096, 64, 512, 128 + 32, 4096 + 32)]
    indexer_cases = [("indexer decode 128K b64", 64, 1, 32768), ("indexer decode 128K b1", 1, 1, 32768),
                     ("indexer prefill 4K", 1, 4096, 1024)]
    sweep_cases = [("CSA decode 32K b64", 64, 1, 128 + 512, 128 + 8192),
                   ("HCA decode 32K b64", 64, 1, 128 + 256, 128 + 256),
                   ("CSA decode 32K b64 bf16 cache", 64, 1, 128 + 512, 128 + 8192, 128, "bf16"),
                   ("CSA decode 32K b64 fp8 cache", 64, 1, 128 + 512, 128 + 8192, 128, "fp8"),
                   ("HCA decode 32K b64 bf16 cache", 64, 1, 128 + 256, 128 + 256, 128, "bf16"),
                   ("HCA decode 32K b64 fp8 cache", 64, 1, 128 + 256, 128 + 256, 128, "fp8"),
                   ("CSA decode 128K b1", 1, 1, 128 + 512, 128 + 32768),
                   ("HCA decode 128K b1", 1, 1, 128 + 1024, 128 + 1024),
                   ("CSA prefill 4K", 1, 4096, 640, 4096 + 1024)]
    attn = [attn_case(*c, ceil) for c in attn_cases] if "attention" in run else []
    idx = [indexer_case(*c, ceil) for c in indexer_cases] if "indexer" in run else []
    sweep = [r for c in sweep_cases if a.sweep_only in c[0] for r in attn_sweep(*c[:5], ceil, **dict(zip(("window", "entries"), c[5:])))] \
        if "sweep" in run else []
    train = [train_attn_case("CSA train 4K", 4096, 4, 512, ceil),
             train_attn_case("HCA train 4K", 4096, 128, None, ceil),
             train_attn_case("CSA train 64K (list walk)", 65536, 4, 512, ceil, long=True)] if "train" in run else []
    train += [indexer_train_case("indexer scores train 4K", 4096, 4, ceil),
              indexer_train_case("indexer scores train 16K", 16384, 4, ceil)] if "indexer" in run else []
    topk = [topk_case(r, t) for r, t in ((1, 32768), (1, 262144), (64, 8192), (4096, 2048))] if "topk" in run else []
    comp = [compressor_case(*c, ceil) for c in (("CSA compressor prefill 8K", 8192, 4, 512, True),
                                                ("indexer compressor prefill 8K", 8192, 4, 128, True),
                                                ("HCA compressor prefill 8K", 8192, 128, 512, False))] \
        if "compressor" in run else []
    print(f"{'sweep (graph replay)':<22}{'splits':>7}{'blk_h':>6}{'warps':>6}{'blk_k':>6}{'stg':>4}"
          f"{'ms':>8}{'GB/s':>8}{'%copy':>7}")
    for r in sweep:
        head = (f"{r['case']:<22}{str(r['splits']):>7}{str(r['block_h']):>6}{str(r['warps']):>6}{str(r['block_k']):>6}"
                f"{str(r['stages']):>4}")
        if "error" in r:
            print(f"{head}  {r['error']}")
        else:
            print(f"{head}{r['ms']:>8.3f}{r['gbps']:>8.0f}{100 * r['frac_copy_bw']:>6.0f}%")
    for r in topk:
        print(f"top-{r['k']} of {r['rows']} x {r['T']}: torch.topk sorted {r['torch_topk_ms']:.3f} ms, unsorted "
              f"{r['unsorted_ms']:.3f} ms, full sort {r['sort_ms']:.3f} ms")
    print(f"{'attention case':<24}{'triton ms':>10}{'TFLOP/s':>9}{'GB/s':>8}{'%copy':>7}{'ref ms':>9}{'gather+SDPA':>12}"
          f"{'flex ms':>9}")
    for r in attn:
        print(f"{r['case']:<24}{r['triton_ms']:>10.3f}{r['triton_tflops']:>9.1f}{r['triton_gbps']:>8.0f}"
              f"{100 * r['frac_copy_bw']:>6.0f}%{r.get('reference_ms', float('nan')):>9.2f}"
              f"{r.get('gather_sdpa_ms', float('nan')):>12.3f}{r.get('flex_ms', float('nan')):>9.3f}"
              + (f"  flex: {r['flex_error']}" if "flex_error" in r else ""))
    print(f"{'indexer case':<26}{'scores ms':>10}{'+topk ms':>9}{'GB/s':>8}{'%copy':>7}{'ref ms':>9}")
    for r in idx:
        print(f"{r['case']:<26}{r['scores_ms']:>10.3f}{r['scores_plus_topk_ms']:>9.3f}{r['scores_gbps']:>8.0f}"
              f"{100 * r['frac_copy_bw']:>6.0f}%{r.get('reference_ms', float('nan')):>9.2f}"
              + "".join(f"  {n} steps {ms:.3f}" for n, ms in r.get("steps_sweep_ms", {}).items()))
    print(f"{'training attention (fwd+bwd)':<30}{'triton ms':>10}{'TFLOP/s':>9}{'compiled ref':>13}{'eager ref':>10}"
          f"{'flex ms':>9}")
    for r in train:
        print(f"{r['case']:<30}{r.get('triton_ms', float('nan')):>10.2f}{r.get('triton_tflops', float('nan')):>9.1f}"
              f"{r.get('compiled_reference_ms', float('nan')):>13.2f}"
              f"{r.get('eager_reference_ms', r.get('reference_ms', float('nan'))):>10.2f}"
              f"{r.get('flex_ms', float('nan')):>9.2f}"
              + "".join(f"  {k}: {v}" for k, v in r.items() if k.endswith("_error")))
    print(f"{'compressor case':<32}{'triton ms':>10}{'GB/s':>8}{'%copy':>7}{'ref ms':>9}{'train: triton':>14}{'ref':>8}")
    for r in comp:
        print(f"{r['case']:<32}{r['triton_ms']:>10.3f}{r['triton_gbps']:>8.0f}{100 * r['frac_copy_bw']:>6.0f}%"
              f"{r['reference_ms']:>9.3f}{r['triton_train_ms']:>14.3f}{r['reference_train_ms']:>8.3f}")
    path = a.json or result_path("kernels" + ("" if run == set(PARTS) else "_" + "_".join(sorted(run))))
    with open(path, "w") as f:
        json.dump({**record(), "torch": torch.__version__, "triton": triton.__version__, "ceilings": ceil,
                   "attention": attn, "indexer": idx, "decode_sweep": sweep, "topk": topk, "compressor": comp,
                   "train_attention": train}, f, indent=2)
    print(f"results: {path}")


if __name__ == "__main__":
    main()

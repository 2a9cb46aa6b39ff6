"""Triton kernels against the references: under TRITON_INTERPRET=1 on the CPU (tiny shapes, in a subprocess
so the interpreter flag is set before Triton loads), and natively on a GPU when there is one."""
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton")
HERE = os.path.dirname(os.path.abspath(__file__))


def _check(code: str, env: dict) -> None:
    """Run a check script; under the interpreter, then also compile every kernel launch it made for sm_90 and
    sm_80 (native_compile: what the interpreter accepts, the compiler may not). Every launch must build for the
    H100/H200; for the A100 all but the FP8 serving-cache read, which needs sm_89's e4m3 conversions and is
    dispatched only from there (sparse_attn.supports)."""
    interpreted = env.get("TRITON_INTERPRET") == "1"
    with tempfile.TemporaryDirectory() as tmp:
        launches = os.path.join(tmp, "launches.jsonl")
        if interpreted:
            code = f"import sys; sys.path.insert(0, {HERE!r}); import native_compile; " \
                   f"native_compile.record({launches!r})\n" + code
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]
        if interpreted:
            native = {k: v for k, v in env.items() if k != "TRITON_INTERPRET"}
            c = subprocess.run([sys.executable, os.path.join(HERE, "native_compile.py"), launches],
                               capture_output=True, text=True, env=native, timeout=600)
            assert c.returncode == 0, c.stderr[-3000:]
            failed = json.loads(c.stdout.splitlines()[-1])
            assert not failed["sm_90"], "kernels that do not compile for sm_90:\n" + json.dumps(failed["sm_90"], indent=1)
            a100 = [f for f in failed["sm_80"] if not (f["kernel"].endswith("._sparse_attn_kernel")
                                                       and f["constexprs"].get("FP8"))]
            assert not a100, "kernels that do not compile for sm_80:\n" + json.dumps(a100, indent=1)

CHECK = r'''
import torch
from dsv4.ops.reference.indexer import indexer_topk as ref_top
from dsv4.ops.reference.sparse_attn import sparse_attn as ref_attn
from dsv4.ops.triton.indexer import indexer_topk as tri_top
from dsv4.ops.triton.sparse_attn import sparse_attn as tri_attn
from dsv4.ops.triton.sinkhorn import hc_split_sinkhorn as tri_hc
from dsv4.ops.reference.sinkhorn import hc_split_sinkhorn as ref_hc
from dsv4.ops.triton.experts import moe_experts as tri_moe
from dsv4.ops.reference.experts import moe_experts as ref_moe
from dsv4.ops.triton import mhc as tri_mhc
from dsv4.ops.triton.compressor import compress_step as tri_step, compress_groups as tri_groups
from dsv4.ops.reference.compressor import compress_step as ref_step, compress_groups as ref_groups
from dsv4.ops.triton.rope import rope_ as tri_rope
from dsv4.ops.reference.rope import rope_ as ref_rope
from dsv4.ops.invariant.linear import matmul_nt
from dsv4.ops.invariant.norm import rms_rsqrt
from dsv4.ops.reference import mhc as ref_mhc
dev, dt = "{dev}", {dt}
g = torch.Generator().manual_seed(0)
worst = 0.0
for B, S, H, D, N, K in {attn_shapes}:
    for _ in range(2):  # fresh random inputs per check
        q = torch.randn(B, S, H, D, generator=g).to(dev, dt); kv = torch.randn(B, N, D, generator=g).to(dev, dt)
        sink = torch.randn(H, generator=g).to(dev)
        idx = torch.randint(0, N, (B, S, K), generator=g)
        idx[torch.rand(B, S, K, generator=g) < 0.3] = -1
        idx[0, 0] = -1  # a query that sees nothing: output 0
        idx = idx.to(dev)
        ref = ref_attn(q.double(), kv.double(), sink.double(), idx, D ** -0.5)
        for splits in (None, 1, 3):  # one slice per query, and split-K with the merge (decode)
            out = tri_attn(q, kv, sink, idx, D ** -0.5, splits=splits)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            assert torch.isfinite(out).all() and err < {tol}, (B, S, H, D, splits, err)
            worst = max(worst, err)
for B, S, HI, DI, T, k in {idx_shapes}:
    q = torch.randn(B, S, HI, DI, generator=g).to(dev, dt); w = torch.randn(B, S, HI, generator=g).to(dev)
    keys = torch.randn(B, T, DI, generator=g).to(dev, dt)
    nv = torch.randint(0, T + 1, (B, S), generator=g).to(dev)
    a, b = tri_top(q, w, keys, nv, k), ref_top(q.float(), w, keys.float(), nv, k)
    agree = (torch.sort(a, -1).values == torch.sort(b, -1).values).float().mean().item()
    assert agree > {agree}, agree
import dsv4.ops.triton.indexer as tri_indexer_mod
for B, S, HI, DI, T, k, P, chunk in ((2, 5, 16, 32, 40, 6, 3, 2), (1, 3, 8, 64, 20, 30, 0, 1 << 28)):
    # the attention's list from the indexer: [prefix | entries + offset], in query chunks (as at long contexts)
    tri_indexer_mod.SCORE_BUFFER_ELEMENTS = chunk * T * B
    q = torch.randn(B, S, HI, DI, generator=g).to(dev, dt); w = torch.randn(B, S, HI, generator=g).to(dev)
    keys = torch.randn(B, T, DI, generator=g).to(dev, dt)
    nv = torch.randint(0, T + 1, (B, S), generator=g).to(dev)
    pre = torch.randint(-1, 50, (B, S, P), generator=g).to(dev)
    a = tri_top(q, w, keys, nv, k, pre, 100)
    r = ref_top(q.float(), w, keys.float(), nv, k, pre, 100)
    assert a.shape == r.shape == (B, S, P + min(k, T)) and torch.equal(a[..., :P], pre)
    agree = (torch.sort(a[..., P:], -1).values == torch.sort(r[..., P:], -1).values).float().mean().item()
    assert agree > {agree}, ("indexer lists", agree)
    tri_indexer_mod.SCORE_BUFFER_ELEMENTS = 1 << 28
for n in (1, 37, 130):
    m = torch.randn(n, 24, generator=g).to(dev); sc = (torch.rand(3, generator=g) + 0.5).to(dev)
    b = torch.randn(24, generator=g).to(dev)
    for a, r in zip(tri_hc(m, sc, b, 4, 20, 1e-6), ref_hc(m, sc, b, 4, 20, 1e-6)):
        assert (a - r).abs().max() < 1e-5, (a - r).abs().max()
for N, C, F, E, k, limit in ((1, 64, 48, 8, 6, 7.0), (3, 40, 96, 5, 2, 0.0)):  # decode-sized expert batches
    x = torch.randn(N, C, generator=g).to(dev, dt)
    w1, w3 = (torch.randn(E, F, C, generator=g).div(C ** 0.5).to(dev, dt) for _ in range(2))
    w2 = torch.randn(E, C, F, generator=g).div(F ** 0.5).to(dev, dt)
    idx = torch.rand(N, E, generator=g).argsort(-1)[:, :k].to(dev)
    rw = torch.rand(N, k, generator=g).to(dev)
    a = tri_moe(x, w1, w2, w3, idx, rw, limit)
    r = ref_moe(x.double(), w1.double(), w2.double(), w3.double(), idx, rw.double(), limit)
    err = ((a.double() - r).norm() / r.norm()).item()
    assert err < {tol} * 10, err
for lead, R, C in (((1, 1), 4, 96), ((2, 5), 3, 1500)):  # mHC collapse and post mix
    x = torch.randn(*lead, R, C, generator=g).to(dev, dt); f = torch.randn(*lead, C, generator=g).to(dev, dt)
    w = torch.rand(*lead, R, generator=g).to(dev); comb = torch.rand(*lead, R, R, generator=g).to(dev)
    for a, r in ((tri_mhc.hc_collapse(x, w), ref_mhc.hc_collapse(x, w)),
                 (tri_mhc.hc_post(f, x, w, comb), ref_mhc.hc_post(f, x, w, comb))):
        assert a.shape == r.shape and a.dtype == r.dtype
        assert (a.double() - r.double()).abs().max() <= {tol} * 10 * r.double().abs().max(), (a - r).abs().max()
for B, m, d, overlap in ((3, 4, 48, True), (2, 8, 64, False), (1, 3, 32, True)):  # compressor decode steps
    W2 = (2 if overlap else 1) * d
    R = (2 if overlap else 1) * m
    states = []
    for _ in range(2):
        states.append([torch.zeros(B, R, W2).to(dev), torch.full((B, R, W2), float("-inf")).to(dev)])
    w = (torch.rand(d, generator=g) + 0.5).to(dev); fr = torch.rand(8, generator=g).to(dev)
    pos = torch.randint(0, 50, (B,), generator=g).to(dev)
    ape = torch.randn(m, W2, generator=g).to(dev) if overlap else None  # the position bias, added in the op
    for step in range(2 * m + 1):  # through group completions; rows at different phases
        kv = torch.randn(B, W2, generator=g).to(dev); sc = torch.randn(B, W2, generator=g).to(dev)
        a = tri_step(kv, sc, *states[0], pos, m, overlap, w, 1e-6, fr, dt, ape)
        r = ref_step(kv, sc, *states[1], pos, m, overlap, w, 1e-6, fr, dt, ape)
        assert (a.float() - r.float()).abs().max() <= {tol} * 10 * r.float().abs().max() + 1e-2 * (dt != torch.float32), step
        for x, y in zip(*states):
            assert torch.equal(x.isinf(), y.isinf()) and (x.nan_to_num(0, 0, 0) - y.nan_to_num(0, 0, 0)).abs().max() < 1e-5
        pos = pos + 1
for B, L, m, d, overlap, with_prev, with_ape in ((2, 19, 4, 24, True, False, True), (1, 13, 4, 16, True, True, False),
                                                 (2, 40, 8, 20, False, False, True), (1, 256, 128, 8, False, False, True)):
    W2 = (2 if overlap else 1) * d  # compressor prefill pooling: overlapping halves, state's previous group, bias
    kv, sc = (torch.randn(B, L, W2, generator=g).to(dev) for _ in range(2))
    sc[0, :2] = float("-inf")  # padded candidates
    sc[-1, :m] = float("-inf")  # group 0 without candidates (NaN as the reference) unless a previous group's rows join
    prev = tuple(torch.randn(B, m, d, generator=g).to(dev) for _ in range(2)) if with_prev else None
    ape = torch.randn(m, W2, generator=g).to(dev) if with_ape else None
    a, r = tri_groups(kv, sc, m, overlap, L // m, prev, ape), ref_groups(kv, sc, m, overlap, L // m, prev, ape)
    assert a.shape == r.shape == (B, L // m, d) and torch.equal(a.isnan(), r.isnan()), (B, L, m, overlap)
    assert a.isnan().any() != (overlap and with_prev)
    assert (a.nan_to_num() - r.nan_to_num()).abs().max() <= 1e-5 * r.nan_to_num().abs().max(), (B, L, m, overlap)
for shape, half, inverse in (((2, 5, 3, 64), 8, False), ((1, 4, 32), 16, True), ((3, 1, 70, 16), 4, True)):
    x = torch.randn(*shape, generator=g).to(dev, dt)
    cos, sin = (torch.randn(shape[0], shape[1], half, generator=g).to(dev) for _ in range(2))
    a, r = tri_rope(x.clone(), cos, sin, inverse), ref_rope(x.clone(), cos, sin, inverse)
    assert (a.float() - r.float()).abs().max() <= {tol} * 10 * r.float().abs().max(), (shape, (a - r).abs().max())
for M, N, K in ((1, 70, 130), (67, 33, 64)):  # fixed-configuration matmul and row reduction
    a = torch.randn(M, K, generator=g).to(dev, dt); w = torch.randn(N, K, generator=g).to(dev, dt)
    c = matmul_nt(a, w)
    r = a.double() @ w.double().T
    assert ((c.double() - r).norm() / r.norm()).item() < {tol} * 10
    assert torch.equal(matmul_nt(a[:1], w), c[:1])  # a row's result does not depend on the other rows
    a3 = torch.randn(3, M, K, generator=g).to(dev, dt); w3 = torch.randn(3, N, K, generator=g).to(dev, dt)
    r3 = a3.double() @ w3.double().transpose(1, 2)
    assert ((matmul_nt(a3, w3).double() - r3).norm() / r3.norm()).item() < {tol} * 10
    rr = rms_rsqrt(a, 1e-6)
    assert ((rr.double() - torch.rsqrt(a.double().square().mean(-1, keepdim=True) + 1e-6)).abs().max() < 1e-3 * rr.max())
from dsv4.cache.layout import RowStore
fp8_shapes = [(2, 3, 4, 64, 16, 10, 30, 24), (1, 2, 16, 128, 64, 5, 40, 33)]
if dev == "cuda":  # batched decode (its own kernel configuration), V4 sizes
    fp8_shapes.append((32, 1, 64, 512, 64, 128, 600, 640))
for B, S, H, D, rd, N1, N2, K in fp8_shapes:
    # entries stored as FP8 serving records, read by the kernel as stored (rows N1.. of the index space)
    q = torch.randn(B, S, H, D, generator=g).to(dev, dt); kv = torch.randn(B, N1, D, generator=g).to(dev, dt)
    store = RowStore("fp8", B, N2, D, rd, "kv", dt, dev)
    store.write(torch.arange(N2, device=dev).expand(B, N2), torch.randn(B, N2, D, generator=g).to(dev) * 3)
    sink = torch.randn(H, generator=g).to(dev)
    idx = torch.randint(-1, N1 + N2, (B, S, K), generator=g).to(dev)
    for splits in (None, 2):
        a = tri_attn(q, kv, sink, idx, D ** -0.5, store.records(N2), rd, splits=splits)
        r = ref_attn(q.double(), torch.cat((kv, store.read(N2)), 1).double(), sink.double(), idx, D ** -0.5)
        err = ((a.double() - r).norm() / r.norm()).item()
        assert err < {tol}, ("fp8 entries", D, splits, err)
        ent = torch.randn(B, N2, D, generator=g).to(dev, dt)  # float entries: the same second source, no copy
        a = tri_attn(q, kv, sink, idx, D ** -0.5, ent, splits=splits)
        r = ref_attn(q.double(), torch.cat((kv, ent), 1).double(), sink.double(), idx, D ** -0.5)
        err = ((a.double() - r).norm() / r.norm()).item()
        assert err < {tol}, ("float entries", D, splits, err)
for B, S, HI, DI, T, k in ((2, 3, 16, 64, 50, 8), (1, 2, 8, 128, 70, 16)):  # FP4 key records read in place
    q = torch.randn(B, S, HI, DI, generator=g).to(dev, dt); w = torch.randn(B, S, HI, generator=g).to(dev)
    keys = RowStore("fp4", B, T, DI, 16, "index", dt, dev)
    keys.write(torch.arange(T, device=dev).expand(B, T), torch.randn(B, T, DI, generator=g).to(dev))
    nv = torch.randint(0, T + 1, (B, S), generator=g).to(dev)
    a = tri_top(q, w, keys.records(T), nv, k)
    r = ref_top(q, w, keys.read(T), nv, k)
    agree = (torch.sort(a, -1).values == torch.sort(r, -1).values).float().mean().item()
    assert agree > {agree}, ("fp4 keys", agree)
from dsv4.ops.triton.norm import rms_norm as tri_norm
from dsv4.ops.reference.norm import rms_norm as ref_norm
for shape, half, weighted in (((2, 3, 4, 64), 8, False), ((1, 5, 96), 16, True), ((3, 1, 2, 32), 4, True)):
    # the norm with the rope of its result's trailing channels (the attention's q: per head; kv: per token)
    x = torch.randn(*shape, generator=g).to(dev, dt) * 3
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dev) if weighted else None
    cos, sin = (torch.randn(shape[0], shape[1], half, generator=g).to(dev) for _ in range(2))
    a, r = tri_norm(x, w, 1e-6, (cos, sin)), ref_norm(x, w, 1e-6, (cos, sin))
    assert a.shape == r.shape and a.dtype == r.dtype
    assert (a.float() - r.float()).abs().max() <= ({tol} * 1e-2 + 4 * (dt != torch.float32) * 2 ** -8) * r.float().abs().max() + 1e-5
for shape, weighted in (((3, 5, 96), True), ((2, 7, 64), False), ((1, 1, 4096), True), ((4, 64, 512), False)):
    x = torch.randn(*shape, generator=g).to(dev, dt) * 3
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dev) if weighted else None
    a, r = tri_norm(x, w, 1e-6), ref_norm(x, w, 1e-6)
    assert a.shape == r.shape and a.dtype == r.dtype
    # one rounding of the result (bf16: 1 ulp where the fp32 sums round differently; the CPU interpreter
    # truncates instead of rounding)
    assert (a.float() - r.float()).abs().max() <= ({tol} * 1e-2 + 2 * (dt != torch.float32) * 2 ** -8) * r.float().abs().max() + 1e-6
for lead, R, C, M in (((1, 1), 4, 64, 24), ((2, 3), 4, 96, 24), ((1, 70), 2, 64, 4), ((1, 300), 4, 128, 24)):
    x = torch.randn(*lead, R, C, generator=g).to(dev, torch.bfloat16)  # mHC lanes (bf16 inference)
    fn = torch.randn(M, R * C, generator=g).to(dev)
    a, r = tri_mhc.hc_mixes(x, fn, 1e-6), ref_mhc.hc_mixes(x.double(), fn.double(), 1e-6)
    assert a.shape == r.shape and a.dtype == torch.float32
    assert ((a.double() - r).abs().max() / r.abs().max()).item() < 1e-5  # fp32-exact products, fp32 sums
    # training: the backward kernels (d fn in fp32, dx rounded once to the lanes' bf16) against float64 autograd
    xa, fa = x.clone().requires_grad_(True), fn.clone().requires_grad_(True)
    xr, fr = x.double().requires_grad_(True), fn.double().requires_grad_(True)
    dout = torch.randn(*lead, M, generator=g).to(dev)
    (tri_mhc.hc_mixes(xa, fa, 1e-6) * dout).sum().backward()
    (ref_mhc.hc_mixes(xr, fr, 1e-6) * dout.double()).sum().backward()
    assert ((fa.grad.double() - fr.grad).norm() / fr.grad.norm()).item() < 1e-5
    # (one rounding to bf16 of an fp32 sum: within a bf16 ulp, plus fp32 error where the two terms cancel)
    bound = 2 ** -7 * xr.grad.abs() + 1e-5 * xr.grad.abs().max()
    assert xa.grad.dtype == torch.bfloat16 and ((xa.grad.double() - xr.grad).abs() <= bound).all()
from dsv4.ops.triton.routing import moe_route as tri_route
from dsv4.ops.reference.routing import moe_route as ref_route
for N, E, k in ((1, 16, 6), (37, 256, 8), (5, 7, 3)):
    logits = torch.randn(N, E, generator=g).to(dev) * 3
    logits[0, :2] = torch.tensor([30.0, -40.0])  # softplus's linear and tiny tails
    bias = torch.randn(E, generator=g).to(dev) * 0.1
    fixed = torch.rand(N, E, generator=g).argsort(-1)[:, :k].to(dev)
    for fx in (None, fixed):
        (wa, ia, sa), (wr, ir, sr) = tri_route(logits, bias, fx, k, 2.5), ref_route(logits.double(), bias, fx, k, 2.5)
        assert torch.equal(ia, ir), (ia, ir)  # same experts in the same (descending) order
        assert (wa.double() - wr).abs().max() < 1e-6 and ((sa.double() - sr).abs() / sr).max() < 1e-6
from dsv4.ops.triton.experts import swiglu_expert as tri_dense
from dsv4.ops.reference.experts import swiglu_expert as ref_dense
for N, C, F, limit in ((1, 64, 48, 7.0), (3, 40, 96, 0.0)):
    x = torch.randn(N, C, generator=g).to(dev, dt)
    w1, w3 = (torch.randn(F, C, generator=g).div(C ** 0.5).to(dev, dt) for _ in range(2))
    w2 = torch.randn(C, F, generator=g).div(F ** 0.5).to(dev, dt)
    a, r = tri_dense(x, w1, w2, w3, limit), ref_dense(x, w1, w2, w3, limit)
    assert a.dtype == x.dtype and ((a.double() - r.double()).norm() / r.double().norm()).item() < {tol} * 10
from dsv4.ops.triton.experts import slot_sum, swiglu_rows
from dsv4.ops.reference.experts import swiglu
gate, up = (torch.randn(13, 40, generator=g).to(dev, dt) * 4 for _ in range(2))
rw = torch.rand(13, generator=g).to(dev)
for limit in (0.0, 3.0):
    a, r = swiglu_rows(gate, up, rw, limit), (swiglu(gate, up, limit) * rw[:, None]).to(dt)
    assert a.dtype == dt and (a.float() - r.float()).abs().max() <= 1e-2 * (dt != torch.float32) * r.float().abs().max() + 1e-5
y = torch.randn(12, 40, generator=g).to(dev, dt)
at = torch.randperm(12, generator=g).to(dev)
assert (slot_sum(y, at, 3) - y.float()[at].view(4, 3, 40).sum(1)).abs().max() < 1e-5
from dsv4.ops.triton.linear import linear_fp32 as tri_lin
for M, N, K, bf16_w in ((3, 70, 64, True), (130, 24, 128, False), (200, 300, 96, False), (2, 16, 64, "bf16")):
    x = torch.randn(M, K, generator=g).to(dev, torch.bfloat16)
    w = torch.randn(N, K, generator=g).to(dev)
    w = w.bfloat16().float() if bf16_w is True else w.bfloat16() if bf16_w else w  # bf16 values take one part
    a, r = tri_lin(x, w), x.double() @ w.double().T
    assert a.dtype == torch.float32 and ((a.double() - r).abs().max() / r.abs().max()).item() < 1e-5
from dsv4.ops.triton.indexer import index_scores_masked
from dsv4.ops.reference.indexer import index_scores as ref_scores
for B, S, HI, DI, T in ((1, 70, 20, 64, 150), (2, 130, 64, 32, 600)):  # prefill: query blocks x key tiles
    q = torch.randn(B, S, HI, DI, generator=g).to(dev, dt); w = torch.randn(B, S, HI, generator=g).to(dev)
    keys = torch.randn(B, T, DI, generator=g).to(dev, dt)
    nv = torch.randint(0, T + 1, (B, S), generator=g).to(dev)
    nv[0, :3] = 0  # queries that see nothing
    a, r = index_scores_masked(q, w, keys, nv), ref_scores(q.float(), w, keys.float())
    vis = torch.arange(T, device=dev) < nv.unsqueeze(-1)
    assert torch.isinf(a[~vis]).all() and (a[~vis] < 0).all()
    assert ((a[vis] - r[vis]).abs().max() / r.abs().max()).item() < {tol} * 10
q = torch.randn(3, 2, 16, 32, generator=g).to(dev, dt); w = torch.randn(3, 2, 16, generator=g).to(dev)  # decode
keys = torch.randn(3, 300, 32, generator=g).to(dev, dt)
nv = torch.randint(0, 301, (3, 2), generator=g).to(dev)
r = ref_scores(q.float(), w, keys.float())
vis = torch.arange(300, device=dev) < nv.unsqueeze(-1)
runs = [index_scores_masked(q, w, keys, nv, steps_per_program=n) for n in (1, 3, 8)]  # 64-key steps per program
for a in runs:
    assert torch.equal(a, runs[0]) and torch.isinf(a[~vis]).all()  # the same arithmetic per score, however split
    assert ((a[vis] - r[vis]).abs().max() / r.abs().max()).item() < {tol} * 10
print("ok", worst)
'''


def _run(dev, dt, attn_shapes, idx_shapes, tol, agree, env):
    _check(CHECK.format(dev=dev, dt=dt, attn_shapes=attn_shapes, idx_shapes=idx_shapes, tol=tol, agree=agree), env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels natively (test below); Triton 3.6's "
                    "interpreter, installed beside CUDA there, lacks pieces the kernels use")
def test_kernels_interpreted_on_cpu():
    env = dict(os.environ, TRITON_INTERPRET="1")
    _run("cpu", "torch.float32", [(2, 3, 4, 32, 20, 19), (1, 2, 20, 64, 50, 70)],
         [(2, 3, 16, 32, 40, 5), (1, 4, 20, 64, 100, 8)], 1e-5, 0.999, env)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_on_gpu_bf16():
    # bf16 operands: relative error a few 1e-3; indexer top-k may swap near-tied entries
    _run("cuda", "torch.bfloat16", [(2, 5, 64, 512, 700, 640), (3, 2, 16, 128, 300, 200), (1, 3, 128, 512, 900, 1152)],
         [(2, 3, 64, 128, 3000, 512), (1, 2, 64, 128, 800, 1024)], 2e-2, 0.97, dict(os.environ))


SEQUENCE_CHECK = r"""
import torch
from dsv4.ops.reference.sequence_attn import sequence_attn as ref
from dsv4.ops.triton.sequence_attn import sequence_attn as tri
dev, dt = "{dev}", {dt}
g = torch.Generator().manual_seed(0)
for B, S, H, D, N, W in {shapes}:
    q = torch.randn(B, S, H, D, generator=g).to(dev, dt); kv = torch.randn(B, S, D, generator=g).to(dev, dt)
    ent = torch.randn(B, N, D, generator=g).to(dev, dt) if N else None
    sink = torch.randn(H, generator=g).to(dev)
    mask = None
    if N:  # causal visibility of the entries (ratio S // N), a random selection among them (the indexer's top-k)
        vis = torch.arange(N).view(1, N) < ((torch.arange(S) + 1) // (S // N)).view(S, 1)
        mask = (vis & (torch.rand(B, S, N, generator=g) < 0.6)).to(dev)
    do = torch.randn(B, S, H, D, generator=g).to(dev, dt)
    leaves = [x for x in (q, kv, ent, sink) if x is not None]
    r = [x.detach().double().requires_grad_(True) for x in leaves]
    args = lambda xs: (xs[0], xs[1], xs[2] if N else None, mask, xs[-1], D ** -0.5, W, True)
    o_r, m_r = ref(*args(r))
    (o_r * do.double()).sum().backward()
    # dense masked walks with the row gradients summed over one or several token ranges; per-token entry lists
    for splits, lists in ((None, False), (3, False), (None, True)):
        a = [x.detach().clone().requires_grad_(True) for x in leaves]
        o_a, m_a = tri(*args(a), splits=splits, lists=lists)
        (o_a.float() * do.float()).sum().backward()
        err = lambda x, y: ((x.double() - y).norm() / y.norm()).item()
        assert err(o_a, o_r) < {tol}, ("o", B, S, H, D, N, err(o_a, o_r))
        assert (m_a is None) == (N == 0) and (N == 0 or err(m_a, m_r) < {tol}), "entry probabilities"
        for name, x, y in zip(("q", "kv", "entries", "sink") if N else ("q", "kv", "sink"), a, r):
            assert x.grad.dtype == x.dtype and err(x.grad, y.grad) < 2 * {tol}, (name, lists, splits, err(x.grad, y.grad))
print("ok")
"""


def _run_sequence(dev, dt, shapes, tol, env):
    _check(SEQUENCE_CHECK.format(dev=dev, dt=dt, shapes=shapes, tol=tol), env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels natively (test below)")
def test_sequence_attn_kernels_interpreted_on_cpu():
    """Training attention (forward, entry probabilities, gradients of q, kv, entries and sink) against the
    float64 reference: window only, entries with a selection, several head blocks (70 heads)."""
    _run_sequence("cpu", "torch.float32", [(2, 37, 4, 32, 9, 8), (1, 20, 20, 16, 0, 4), (1, 12, 70, 16, 3, 4)],
                  1e-5, dict(os.environ, TRITON_INTERPRET="1"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sequence_attn_kernels_on_gpu_bf16():
    # V4 sizes (64 heads x 512, window 128, CSA and HCA entry counts) and Pro's 128 heads
    _run_sequence("cuda", "torch.bfloat16", [(1, 700, 64, 512, 175, 128), (2, 300, 128, 512, 75, 128),
                                             (1, 513, 16, 128, 4, 64)], 2e-2, dict(os.environ))


def test_sequence_attn_launch_falls_back_to_a_smaller_configuration():
    """A configuration that exceeds the GPU's resources is skipped, and the one that fits is remembered."""
    from triton.runtime.errors import OutOfResources
    from dsv4.ops.triton import sequence_attn as mod

    class Kernel:
        class fn:
            __name__ = "fake_kernel"
        calls = []

        def __getitem__(self, grid):
            def run(*args, BLOCK_H, **kw):
                self.calls.append(BLOCK_H)
                if BLOCK_H > 32:
                    raise OutOfResources(300000, 232448, "shared memory")
            return run

    k = Kernel()
    assert mod._launch(k, lambda bh, bk: ((1,), (), bh), 64, 512) == 32
    assert mod._launch(k, lambda bh, bk: ((1,), (), bh), 64, 512) == 32
    assert k.calls == [64, 64, 32, 32]  # the second launch starts at the configuration that fit


def test_sequence_attn_walk_bounds_and_lists_in_row_steps():
    """What the training attention's walks start from, computed in steps of query rows (as at long contexts):
    each token's last visible entry + 1, each entry's first token, and each token's ascending entry list."""
    from dsv4.ops.triton.sequence_attn import _entry_lists, _visibility_bounds
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 23, 11, generator=g) < 0.3
    mask[0, 4] = False        # a token that sees nothing
    mask[1, :, 7] = False     # an entry nobody sees
    n_hi, first = _visibility_bounds(mask.view(torch.uint8), rows_per_step=4)
    lists, counts = _entry_lists(mask, rows_per_step=4)
    for b in range(2):
        for s in range(23):
            seen = torch.nonzero(mask[b, s]).flatten()
            assert n_hi[b, s] == (int(seen.max()) + 1 if len(seen) else 0)
            assert counts[b, s] == len(seen)
            assert lists[b, s, :len(seen)].tolist() == seen.tolist() and (lists[b, s, len(seen):] == -1).all()
        for n in range(11):
            seers = torch.nonzero(mask[b, :, n]).flatten()
            assert first[b, n] == (int(seers.min()) if len(seers) else 23)


TRAIN_OPS_CHECK = r"""
import torch
from dsv4.ops.reference import rope as ref_rope
from dsv4.ops.triton import mhc as tri_mhc, rope as tri_rope
from dsv4.ops.triton.sequence_attn import _row_dots
from dsv4.ops.triton import indexer as tri_idx, compressor as tri_comp
from dsv4.ops.reference.indexer import index_scores as ref_idx
from dsv4.ops.reference import compressor as ref_pool
dev, dt = "{dev}", {dt}
g = torch.Generator().manual_seed(0)
err = lambda x, y: ((x.double() - y).norm() / y.norm()).item()


def grads(fn, leaves, dout):
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    out = fn(*leaves)
    (out.double() * dout).sum().backward()
    return out, [x.grad for x in leaves]


for lead, R, C in (((2, 3), 4, 1300), ((1, 1), 3, 40)):  # mHC post mix: d f, d lanes, d post, d comb
    leaves = [torch.randn(*lead, C, generator=g).to(dev, dt), torch.randn(*lead, R, C, generator=g).to(dev, dt),
              torch.randn(*lead, R, generator=g).to(dev), torch.rand(*lead, R, R, generator=g).to(dev)]
    dout = torch.randn(*lead, R, C, generator=g).to(dev).double()
    o_t, g_t = grads(tri_mhc.hc_post, leaves, dout)
    post_mix = lambda f, x, post, comb: post.unsqueeze(-1) * f.unsqueeze(-2) + torch.einsum("...jk,...jc->...kc", comb, x)
    o_r, g_r = grads(post_mix, [x.double() for x in leaves], dout)
    assert o_t.dtype == dt and err(o_t, o_r) < {tol}, ("post", err(o_t, o_r))
    for name, a, r, x in zip(("f", "lanes", "post", "comb"), g_t, g_r, leaves):
        assert a.dtype == x.dtype and err(a, r) < {tol}, (name, err(a, r))
for shape, half, inverse, strided in (((2, 5, 3, 64), 8, False, True), ((1, 4, 32), 16, True, False)):  # rope
    x = torch.randn(*shape, generator=g).to(dev, dt)
    if strided:  # a non-contiguous view (batch and sequence swapped in memory)
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    cos, sin = (torch.randn(shape[0], shape[1], half, generator=g).to(dev) for _ in range(2))
    dout = torch.randn(*shape, generator=g).to(dev).double()
    o_t, (g_t,) = grads(lambda y: tri_rope.rope(y, cos, sin, inverse), [x], dout)
    o_r, (g_r,) = grads(lambda y: ref_rope.rope(y, cos.double(), sin.double(), inverse), [x.double()], dout)
    assert err(o_t, o_r) < {tol} and err(g_t, g_r) < {tol}, (shape, err(o_t, o_r), err(g_t, g_r))
    assert g_t.dtype == x.dtype
for B, S, HI, DI, T, splits in ((2, 37, 4, 16, 21, None), (1, 70, 16, 32, 80, 3)):  # indexer scores: dq, dw, dk
    q = torch.randn(B, S, HI, DI, generator=g).to(dev, dt)
    w, keys = torch.randn(B, S, HI, generator=g).to(dev), torch.randn(B, T, DI, generator=g).to(dev, dt)
    dout = torch.randn(B, S, T, generator=g).to(dev).double()
    dout[:, :, T // 2:] *= (torch.arange(S, device=dev) >= S // 2)[:, None]  # causal-like zeros: skipped tiles
    o_t, g_t = grads(tri_idx.index_scores, [q, w, keys], dout)
    o_r, g_r = grads(ref_idx, [q.double(), w.double(), keys.double()], dout)
    assert err(o_t, o_r) < {tol}, ("scores", err(o_t, o_r))
    for name, a, r, x in zip(("q", "weights", "keys"), g_t, g_r, (q, w, keys)):
        assert a.dtype == x.dtype and err(a, r) < {tol}, (name, err(a, r))
    parts = tri_idx.index_scores_backward(q, w, keys, dout.float(), splits=splits)  # slices of the key gradient
    assert err(parts[2], g_r[2]) < {tol}, ("keys, split", err(parts[2], g_r[2]))
for B, L, m, d, overlap, with_ape in ((2, 19, 4, 24, True, True), (1, 40, 8, 20, False, True), (1, 12, 4, 16, True, False)):
    W2 = (2 if overlap else 1) * d  # compressor prefill pooling in training: d kv, d score, d bias
    leaves = [torch.randn(B, L, W2, generator=g).to(dev) for _ in range(2)]
    leaves += [torch.randn(m, W2, generator=g).to(dev)] if with_ape else []
    dout = torch.randn(B, L // m, d, generator=g).to(dev).double()
    pool = lambda mod: (lambda kv, sc, ape=None: mod.compress_groups(kv, sc, m, overlap, L // m, None, ape))
    o_t, g_t = grads(pool(tri_comp), leaves, dout)
    o_r, g_r = grads(pool(ref_pool), [x.double() for x in leaves], dout)
    assert err(o_t, o_r) < {tol}, ("pool", err(o_t, o_r))
    for name, a, r in zip(("kv", "score", "ape"), g_t, g_r):
        assert a.dtype == torch.float32 and err(a, r) < {tol}, (name, overlap, err(a, r))
do, o = (torch.randn(2, 37, 3, 64, generator=g).to(dev, dt) for _ in range(2))  # the attention backward's delta
want = (do.double() * o.double()).sum(-1)
got = _row_dots(do, o)
assert got.dtype == torch.float32 and got.shape == want.shape and err(got, want) < 1e-6, err(got, want)
print("ok")
"""


def _run_train_ops(dev, dt, tol, env):
    _check(TRAIN_OPS_CHECK.format(dev=dev, dt=dt, tol=tol), env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels natively (test below)")
def test_training_ops_interpreted_on_cpu():
    """The mHC post mix, RoPE and indexer-score training kernels (forward and every input's gradient) and the
    attention backward's delta = sum dO * O against float64 autograd through the references."""
    _run_train_ops("cpu", "torch.float32", 1e-5, dict(os.environ, TRITON_INTERPRET="1"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_ops_on_gpu_bf16():
    _run_train_ops("cuda", "torch.bfloat16", 1e-2, dict(os.environ))


MODEL_CHECK = r"""
import torch
import dsv4
from dsv4.model.attention import Attention
from dsv4.ops import dispatch
from dsv4.train.losses import LossWeights, compute_loss

tokens = torch.randint(0, 2048, (2, 70), generator=torch.Generator().manual_seed(0))


def with_triton(ops, fn):  # fn() with the Triton implementation of `ops` picked for every call, CPU tensors too
    before = {{op: dispatch._REGISTRY[op]["triton"] for op in ops}}
    for op in ops:
        dispatch._REGISTRY[op]["triton"] = (before[op][0], lambda *a, **k: True)
    try:
        return fn()
    finally:
        for op in ops:
            dispatch._REGISTRY[op]["triton"] = before[op]


def loss_and_grads():
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=3).train()
    for m in model.modules():
        if isinstance(m, Attention):  # dense attention (no top-k choice to flip), the indexer's KL loss on
            m.sparse, m.indexer_loss = False, True
    loss, parts = compute_loss(model, tokens, LossWeights())
    loss.backward()
    assert parts["indexer_kl"] > 0
    return loss.detach(), {{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}


@torch.no_grad()
def prefill_logits():  # whole prompts (groups from position 0), then chunks through the cache (the state's groups)
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=3).eval()
    cache = model.new_cache(2, 128)
    chunks = [model(tokens[:, a:b], cache=cache) for a, b in ((0, 23), (23, 50), (50, 70))]
    return model(tokens), torch.cat(chunks, 1)


for ref, got in zip(prefill_logits(), with_triton(["compress_groups"], prefill_logits)):
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5
ref_loss, ref_grads = loss_and_grads()
loss, grads = with_triton(["index_scores", "compress_groups"], loss_and_grads)
assert grads.keys() == ref_grads.keys()
assert ((loss - ref_loss).abs() / ref_loss.abs()).item() < 1e-5, (loss, ref_loss)
for n, g in ref_grads.items():  # (the heads' mHC weights are sums that cancel: fp32 rounding shows ~1e-3 there)
    err = ((grads[n] - g).norm() / g.norm().clamp(min=1e-30)).item()
    assert err < (5e-3 if "hc_head" in n else 1e-4), (n, err)
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU training-kernel tests run these in the model there")
def test_training_kernels_inside_the_model_interpreted_on_cpu():
    """The indexer-score and compressor-pooling kernels as the model calls them (its layouts, strides and dtypes):
    whole-prompt and chunked prefill give the references' logits, and a whole training loss their loss and
    gradients."""
    _check(MODEL_CHECK.format(), dict(os.environ, TRITON_INTERPRET="1"))


def test_fp8_cache_read_is_dispatched_only_from_sm_89(monkeypatch):
    """The sparse attention reads FP8 serving records with e4m3 conversions that sm_80 (A100) lacks: there the
    reference serves FP8 caches; bf16 entries use the kernel on every GPU."""
    from types import SimpleNamespace

    from dsv4.ops.triton import sparse_attn
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

"""GPU checks (skipped without CUDA): the model on the GPU agrees with the CPU, the cache and a bf16
autocast training step work there."""
import pytest
import torch

import dsv4
from conftest import assert_rel_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def models():
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = dsv4.ModelConfig.preset("tiny")
    cpu = dsv4.Transformer(cfg).init_weights(seed=1).eval()
    gpu = dsv4.Transformer(cfg).init_weights(seed=1).eval().cuda()
    return cpu, gpu


def test_gpu_forward_matches_cpu(models):
    cpu, gpu = models
    tokens = torch.randint(0, 2048, (2, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_rel_close("logits cuda vs cpu", gpu(tokens.cuda()).cpu(), cpu(tokens), 1e-4)


def test_gpu_cache_matches_full(models):
    _, gpu = models
    tokens = torch.randint(0, 2048, (2, 150), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        full = gpu(tokens)
        cache = gpu.new_cache(2, 256)
        inc = torch.cat([gpu(tokens[:, :77], cache=cache)] + [gpu(tokens[:, i:i + 1], cache=cache)
                                                                for i in range(77, 150)], 1)
    assert_rel_close("incremental vs full (cuda)", inc, full, 1e-4)


def test_bf16_autocast_training_step():
    from dsv4.train.losses import LossWeights, compute_loss
    from dsv4.train.optim import build_optimizers
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights().cuda().train().set_qat(True)
    opts = build_optimizers(model, 3e-3)
    tokens = torch.randint(0, 2048, (4, 130), device="cuda")
    losses = []
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, parts = compute_loss(model, tokens, LossWeights())
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad()
        losses.append(parts["lm"])
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager(models, dtype):
    """Replayed CUDA-graph decode steps give the eager steps' logits (ragged rows, 40 steps across group
    boundaries of both compressed layer kinds), and advance the cache like them."""
    from dsv4.generate.graphs import GraphDecoder
    gpu = dsv4.Transformer(models[1].config).init_weights(seed=1).eval().to_dtype(dtype).cuda()
    tokens = torch.randint(0, 2048, (3, 100), generator=torch.Generator().manual_seed(2)).cuda()
    outs = []
    with torch.no_grad():
        for graphs in (False, True):
            cache = gpu.new_cache(3, 128)
            for r, n in enumerate((20, 45, 60)):
                gpu(tokens[r:r + 1, :n], cache=cache.select(r))
            step = GraphDecoder(gpu, cache) if graphs else (lambda t: gpu(t.view(-1, 1), cache=cache)[:, -1])
            outs.append(torch.stack([step(tokens[:, 60 + i]).clone() for i in range(40)], 1))
            assert cache.lengths() == [60, 85, 100] and cache.positions.tolist() == [60, 85, 100]
    assert step.graph is not None
    assert_rel_close("graph vs eager decode", outs[1], outs[0], 1e-5 if dtype == torch.float32 else 2e-2)


def test_grouped_experts_bf16_match_reference():
    """torch._grouped_mm experts (prefill, batched decode, training) against the per-expert loop on the GPU in
    bf16, forward and backward, with experts that receive no token."""
    from dsv4.ops.grouped import experts as grouped_experts
    from dsv4.ops.reference.experts import moe_experts as ref
    g = torch.Generator(device="cuda").manual_seed(0)
    N, C, F, E, k = 300, 256, 128, 16, 6
    x = torch.randn(N, C, device="cuda", generator=g).bfloat16()
    w1, w3 = (torch.randn(E, F, C, device="cuda", generator=g).bfloat16() / 16 for _ in range(2))
    w2 = torch.randn(E, C, F, device="cuda", generator=g).bfloat16() / 11
    idx = torch.rand(N, E - 3, device="cuda", generator=g).argsort(-1)[:, :k]
    wt = torch.rand(N, k, device="cuda", generator=g)
    assert grouped_experts.supports(x, w1)
    dy = torch.randn(N, C, device="cuda", generator=g)  # (a uniform gradient would hide rows sent to wrong tokens)
    outs = []
    for fn in (grouped_experts.moe_experts, ref):
        leaves = [t.clone().requires_grad_(True) for t in (x, w1, w2, w3, wt)]
        y = fn(*leaves[:4], idx, leaves[4], 7.0)
        y.backward(dy)
        outs.append([y.detach()] + [t.grad.float() for t in leaves])
    for name, a, b in zip(("y", "dx", "dw1", "dw2", "dw3", "dweights"), *outs):
        assert_rel_close(name, a, b, 2e-2)


def test_bf16_model_on_gpu_matches_fp32_cpu(models):
    """The bf16 model with every GPU path (Triton attention, indexer, Sinkhorn, grouped experts) against fp32."""
    cpu, _ = models
    gpu = dsv4.Transformer(cpu.config).init_weights(seed=1).eval().to_dtype(torch.bfloat16).cuda()
    tokens = torch.randint(0, 2048, (2, 200), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = gpu(tokens.cuda())
        cache = gpu.new_cache(2, 256)
        inc = torch.cat([gpu(tokens[:, :120].cuda(), cache=cache)] +
                        [gpu(tokens[:, i:i + 1].cuda(), cache=cache) for i in range(120, 200)], 1)
        want = cpu(tokens)
    for name, got in (("full", full), ("cached", inc)):  # bf16 rounding (and rare top-k flips): norm-relative
        err = ((got.cpu().double() - want.double()).norm() / want.double().norm()).item()
        assert err < 3e-2, f"bf16 gpu {name} vs fp32 cpu: {err:.3e}"


def test_batch_invariant_mode_bitwise():
    """In batch-invariant mode a sequence's logits (prefill and decode) are bitwise identical whether it runs
    alone or beside other sequences, in any row, and across runs."""
    cfg = dsv4.ModelConfig.preset("small").replace(n_layers=4, compress_ratios=(0, 4, 128, 4), n_hash_layers=1,
                                                   n_mtp_layers=0)
    model = dsv4.Transformer(cfg).init_weights(seed=0).eval().to_dtype(torch.bfloat16).cuda()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).cuda() for n in (300, 77, 150, 5, 260)]
    feed = torch.randint(0, cfg.vocab_size, (5, 12), generator=g).cuda()

    def run(rows: list[int]) -> list[torch.Tensor]:
        cache = model.new_cache(len(rows), 512)
        outs = [model(prompts[r][None], cache=cache.select(i))[0, -1:] for i, r in enumerate(rows)]
        steps = [model(feed[rows, i:i + 1], cache=cache)[:, 0] for i in range(feed.shape[1])]
        return [torch.cat([outs[i]] + [s[i:i + 1] for s in steps]) for i in range(len(rows))]

    with torch.no_grad(), dsv4.ops.batch_invariant():
        alone = {r: run([r])[0] for r in range(5)}
        for rows in ([0, 1, 2, 3, 4], [3, 0, 4], [2, 2, 1]):
            for got, r in zip(run(rows), rows):
                assert torch.equal(got, alone[r]), f"row {r} in batch {rows}"
        assert torch.equal(run([1])[0], alone[1])  # and across runs


def test_fp8_cache_read_in_place_matches_bf16_cache(models, monkeypatch):
    """FP8 KV records (read by the attention kernel as stored) and FP4 indexer keys, decoded through a captured
    CUDA graph, give the logits of a bf16 cache: with the quantisation simulation on, storing is lossless. Both
    caches gather the window rows (a bf16 ring is otherwise read in place, which sums in another order: in this
    tiny bf16 model one flipped rounding moves a later top-k choice, so the two paths are not comparable)."""
    from dsv4.cache.kv_cache import LayerCache
    from dsv4.generate.graphs import GraphDecoder
    monkeypatch.setattr(LayerCache, "window_ring", lambda self, dtype: None)
    gpu = dsv4.Transformer(models[1].config).init_weights(seed=4).eval().to_dtype(torch.bfloat16).cuda()
    gpu.set_quant_sim(True)
    tokens = torch.randint(0, 2048, (2, 190), generator=torch.Generator().manual_seed(6)).cuda()
    outs = []
    with torch.no_grad():
        for kv, index in (("bf16", "bf16"), ("fp8", "fp4")):
            cache = gpu.new_cache(2, 256, kv_dtype=kv, index_dtype=index)
            first = gpu(tokens[:, :150], cache=cache)[:, -1]
            step = GraphDecoder(gpu, cache)
            outs.append(torch.stack([first] + [step(tokens[:, i]).clone() for i in range(150, 190)], 1))
            assert step.graph is not None and not step.eager
    assert_rel_close("fp8/fp4 cache vs bf16 cache", outs[1], outs[0], 1e-2)


def test_compiled_training_ops_match_reference(monkeypatch):
    """Training on the GPU runs the compiled references (ops/compiled): the loss and every gradient match the
    eager references (DSV4_COMPILE=0) on a tiny model, indexer KL and sparse stage included."""
    from dsv4.model.attention import Attention
    from dsv4.train.losses import LossWeights, compute_loss
    torch.backends.cuda.matmul.allow_tf32 = False
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=3).cuda().train()
    for m in model.modules():
        if isinstance(m, Attention):
            m.indexer_loss = True
    tokens = torch.randint(0, 2048, (2, 300), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    runs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("DSV4_COMPILE", flag)
        model.zero_grad(set_to_none=True)
        loss, _ = compute_loss(model, tokens, LossWeights())
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l1, g1), (l0, g0) = runs
    assert_rel_close("loss compiled vs eager", l1, l0, 1e-5)
    assert g1.keys() == g0.keys()
    for n in g0:
        # the heads' mHC weights (hc_head_*, 4 values each) are sums over every token that cancel to ~1e-7: fp32
        # summation order alone moves them by ~1e-3 of their size (measured 1.04e-3 on the H100, once)
        assert_rel_close(f"grad {n}", g1[n], g0[n], 3e-3 if "hc_head" in n else 1e-3)


TRAINING_KERNEL_FAMILIES = {"sequence_attn", "hc_mixes", "hc_post", "rope", "index_scores", "compress_groups"}


TRAINING_TOKENS = (2, 300)


def _training_model(dtype):
    from dsv4.model.attention import Attention
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=3).to_dtype(dtype).cuda().train()
    for m in model.modules():
        if isinstance(m, Attention):
            m.indexer_loss = True
    return model


def _loss_and_grads(mp, model, tokens, kernels, recompute=False, dense_pairs=None):
    from dsv4.ops.triton import sequence_attn as tri_seq
    from dsv4.train.losses import LossWeights, compute_loss
    if dense_pairs is not None:  # every sequence through the list walk
        mp.setattr(tri_seq, "DENSE_WALK_PAIRS", dense_pairs)
    model.set_activation_checkpointing(recompute)
    model.zero_grad(set_to_none=True)
    with dsv4.ops.training_kernels(kernels):  # (the backward's recomputation included)
        loss, _ = compute_loss(model, tokens, LossWeights())
        loss.backward()
    model.set_activation_checkpointing(False)
    return loss.detach().double(), {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def reference_training_grads():
    """The loss and gradients of an fp32 model and of the bf16 model on the compiled reference path (with and
    without block recompute, keyed by it), computed once for every kernel-family case below (none depends on
    which Triton family is on)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    tokens = torch.randint(0, 2048, TRAINING_TOKENS, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with pytest.MonkeyPatch.context() as mp:
        fp32 = _loss_and_grads(mp, _training_model(torch.float32), tokens, "compiled")
        bf16 = _training_model(torch.bfloat16)
        refs = {recompute: _loss_and_grads(mp, bf16, tokens, "compiled", recompute=recompute)
                for recompute in (False, True)}
    return tokens, fp32, refs


@pytest.mark.parametrize("only", [None, *sorted(TRAINING_KERNEL_FAMILIES)])
def test_triton_training_kernels_match_compiled(monkeypatch, reference_training_grads, only):
    """The Triton training kernels (training_kernels("triton"): attention, mHC mixes and post mix, RoPE, the indexer's
    scores under its KL loss, the compressors' pooling) in a bf16 model, with and without block recomputation, with the attention's masked
    walk and its list walk: the loss and every gradient are as close to an fp32 model's as the compiled reference
    path's bf16 ones are (within bf16 noise). Some gradients are sums that cancel to ~1e-6 (the head's mHC
    weights), where bf16 alone is ~100% off, so each gradient is held to the reference path's own error on it
    rather than to one fixed tolerance."""
    from dsv4.ops import dispatch
    for op in TRAINING_KERNEL_FAMILIES - {only or ""} if only else ():  # one kernel family at a time
        fn, _ = dispatch._REGISTRY[op]["triton"]
        monkeypatch.setitem(dispatch._REGISTRY[op], "triton", (fn, lambda *a, **k: False))
    torch.backends.cuda.matmul.allow_tf32 = False
    tokens, (l32, g32), refs = reference_training_grads
    bf16 = _training_model(torch.bfloat16)

    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()
    for case in (dict(), dict(recompute=True), dict(dense_pairs=0)):
        # against the reference path run the same way: recompute changes bf16 rounding, and the cancelling mHC
        # sums amplify it (layers.0.hc_attn_scale: 0.7% off in the reference without recompute, 6% with the
        # Triton path's recompute whichever single family was on, on an H200)
        l_ref, g_ref = refs[case.get("recompute", False)]
        l_tri, g_tri = _loss_and_grads(monkeypatch, bf16, tokens, "triton", **case)
        assert abs(l_tri - l32) <= 2 * abs(l_ref - l32) + 1e-3 * abs(l32), (case, l_tri, l_ref, l32)
        assert g_tri.keys() == g_ref.keys() == g32.keys()
        errs = {n: (rel(g_tri[n], g32[n]), rel(g_ref[n], g32[n])) for n in g32}
        print(only, case, "worst ratios to the reference's own error:",
              sorted(((round(t / max(r, 1e-9), 2), n, round(t, 4), round(r, 4)) for n, (t, r) in errs.items()))[-5:])
        flat = [torch.cat([g[n].flatten() for n in sorted(g32)]) for g in (g_tri, g_ref, g32)]
        whole = rel(flat[0], flat[2]), rel(flat[1], flat[2])
        print(only, case, "all gradients as one vector, Triton vs reference error:", whole)
        assert whole[0] <= 1.5 * whole[1] + 1e-2, (case, whole)
        for n, (e_tri, e_ref) in errs.items():
            # each well-conditioned gradient (bf16 alone within 1%): the reference's error and a little. The others
            # are sums over every token that largely cancel (the mHC gains and biases; the MTP head's are 15-560%
            # off in bf16 alone) and amplify any rounding, the attention's P and dS in bf16 (as FlashAttention;
            # the reference keeps them fp32) included: 5-16x the reference's error measured there. They count in
            # the whole-vector check above, where a wrong kernel would show.
            if e_ref <= 0.01:
                assert e_tri <= 3 * e_ref + 2e-2, (case, n, e_tri, e_ref)


def test_compiled_record_codecs_match_eager():
    """At inference on a GPU the cache's FP8/FP4 record encode and decode run torch.compile'd (a few kernels
    instead of ~25-57 per write): the same bytes and the same decoded rows as the eager functions."""
    from dsv4.cache.layout import _COMPILED
    from dsv4.quant.records import decode_records, encode_records, record_bytes
    g = torch.Generator("cuda").manual_seed(0)
    with torch.no_grad():
        for fmt, role, dim, rd in (("fp8", "kv", 512, 64), ("fp8", "index", 128, 64), ("fp4", "index", 128, 64)):
            rec = record_bytes(fmt, dim, rd, role)
            for shape in ((1, 1), (3, 70)):
                x = (torch.randn(*shape, dim, device="cuda", generator=g) * 3).bfloat16()
                x[..., :32] *= 1e-3  # a block far below the others (its own scale)
                got, want = (f(x, fmt, role, dim, rd, rec) for f in (_COMPILED[encode_records], encode_records))
                assert torch.equal(got, want), (fmt, role, shape)
                rows = [f(want, fmt, role, dim, rd, torch.bfloat16) for f in (_COMPILED[decode_records], decode_records)]
                assert torch.equal(rows[0], rows[1]), (fmt, role, shape)
    assert not any(f.failed for f in _COMPILED.values()), [f.failed for f in _COMPILED.values()]

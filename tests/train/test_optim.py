"""Muon (V4 hybrid Newton-Schulz, update-RMS scaling), the Muon/AdamW parameter split and LR schedules."""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.optim._muon as torch_muon

import dsv4
from dsv4.train.optim import V4_HYBRID, Muon, build_optimizers, lr_at, orthogonalize, split_params
from dsv4.train.optim import muon as muon_mod
from dsv4.train.optim.muon import KELLER

from conftest import assert_rel_close


def svals(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.double())


def random_orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]


# ---------------------------------------------------------------- Newton-Schulz

@pytest.mark.parametrize("shape", [(2048, 512), (512, 2048)])
def test_hybrid_schedule_lands_singular_values_at_one(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    s = svals(orthogonalize(x, V4_HYBRID))
    assert s.numel() == 512 and 0.99 <= s.min() and s.max() <= 1.01, (s.min().item(), s.max().item())


def test_hybrid_schedule_on_ill_conditioned_matrix():
    """Singular values 1 .. 1e-3 of the top one: all with normalised input sigma >= 1e-3 end at 1."""
    g = torch.Generator().manual_seed(1)
    n, m = 512, 256
    s_in = torch.logspace(0, -3, m, dtype=torch.float64)
    x = (random_orthogonal(n, g)[:, :m] * s_in) @ random_orthogonal(m, g).T
    s_out = svals(orthogonalize(x.float(), V4_HYBRID))       # descending, like s_in
    kept = s_in / s_in.norm() >= 1e-3
    assert 100 < kept.sum() < m                               # the bound is tested on a real range
    assert 0.99 <= s_out[kept].min() and s_out[kept].max() <= 1.01, (s_out[kept].min(), s_out[kept].max())


def test_bf16_newton_schulz_stays_within_two_percent():
    x = torch.randn(1024, 256, generator=torch.Generator().manual_seed(2))
    s = svals(orthogonalize(x.bfloat16(), V4_HYBRID))
    assert 0.98 <= s.min() and s.max() <= 1.02, (s.min().item(), s.max().item())


def test_keller_five_steps_miss_the_tight_bound():
    """The 5-step quintic alone leaves sigma spread over ~[0.7, 1.13]: the hybrid's cubic tail matters."""
    x = torch.randn(1024, 256, generator=torch.Generator().manual_seed(0))
    s = svals(orthogonalize(x, [KELLER] * 5))
    assert s.min() < 0.9 and s.max() > 1.1


def test_transpose_invariance_and_batching():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 96, 40, generator=g) * torch.logspace(-2, 1, 5).view(5, 1, 1)
    batched = orthogonalize(x, V4_HYBRID)
    for i in range(5):
        single = orthogonalize(x[i], V4_HYBRID)
        assert_rel_close(f"batched[{i}]", batched[i], single, 1e-5)
        assert_rel_close(f"NS(x^T)[{i}]", orthogonalize(x[i].T, V4_HYBRID), single.T, 1e-5)


def test_zero_matrix_orthogonalises_to_zero():
    assert torch.equal(orthogonalize(torch.zeros(2, 8, 4), V4_HYBRID), torch.zeros(2, 8, 4))


# ---------------------------------------------------------------- Muon oracles

@pytest.mark.parametrize("shape", [(256, 512), (512, 128), (4, 64, 96)])
def test_update_rms_is_update_rms_times_lr(shape):
    g = torch.Generator().manual_seed(4)
    w = torch.nn.Parameter(torch.randn(shape, generator=g))
    w0 = w.detach().clone()
    w.grad = torch.randn(shape, generator=g)
    lr = 1e-2
    Muon([w], lr, weight_decay=0.0).step()
    rms = (w.detach() - w0).pow(2).mean().sqrt().item()
    assert abs(rms / (0.18 * lr) - 1) < 0.01, rms / (0.18 * lr)


def test_zero_gradient_is_pure_weight_decay():
    w = torch.nn.Parameter(torch.randn(3, 32, 16, generator=torch.Generator().manual_seed(5)))
    w0 = w.detach().clone()
    lr, wd = 3e-3, 0.1
    opt = Muon([w], lr, weight_decay=wd)
    for _ in range(2):
        w.grad = torch.zeros_like(w)
        opt.step()
        w0 = w0 * (1 - lr * wd)
        assert torch.equal(w.detach(), w0)
    assert not opt.state[w]["momentum_buffer"].any()


def reference_muon(weights, targets, blocks, steps, *, lr, mu, wd, gamma, coefficients, eps=1e-7):
    """Float64 Muon on the loss sum_i 0.5 ||W_i - T_i||^2 (grad W_i - T_i), one matrix at a time.
    blocks[i]: the (n, m) matrices W_i is made of."""
    def ns(x):
        tall = x.shape[0] > x.shape[1]
        x = x.T if tall else x
        x = x / (torch.linalg.norm(x) + eps)
        for a, b, c in coefficients:
            gram = x @ x.T
            x = a * x + b * gram @ x + c * gram @ gram @ x
        return x.T if tall else x

    ws = [w.double().clone() for w in weights]
    bufs = [torch.zeros_like(w) for w in ws]
    for _ in range(steps):
        for i, (w, t) in enumerate(zip(ws, targets)):
            grad = w - t.double()
            bufs[i] = mu * bufs[i] + grad
            u = (grad + mu * bufs[i]).reshape(-1, *blocks[i])
            o = torch.stack([ns(mat) * gamma * math.sqrt(max(mat.shape)) for mat in u]).reshape(w.shape)
            ws[i] = w * (1 - lr * wd) - lr * o
    return ws


def test_two_steps_match_float64_reference(monkeypatch):
    """2-D [16, 32], 3-D [3, 16, 32] (one batched NS call of 4 matrices), tall [40, 24], and a
    wo_a-like [16, 24] declared as 2 blocks of [8, 24] in its own group."""
    g = torch.Generator().manual_seed(6)
    shapes = [(16, 32), (3, 16, 32), (40, 24), (16, 24)]
    blocks = [(16, 32), (16, 32), (40, 24), (8, 24)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    targets = [torch.randn(s, generator=g) for s in shapes]
    w0 = [p.detach().clone() for p in params]
    hp = dict(lr=0.05, mu=0.95, wd=0.1, gamma=0.18)
    opt = Muon([{"params": params[:3]}, {"params": params[3:], "matrix_shape": (8, 24)}], hp["lr"],
               momentum=hp["mu"], weight_decay=hp["wd"], update_rms=hp["gamma"])
    calls = []
    monkeypatch.setattr(muon_mod, "orthogonalize",
                        lambda x, *a: calls.append(tuple(x.shape)) or orthogonalize(x, *a))
    for _ in range(2):
        opt.zero_grad()
        sum(0.5 * (p - t).pow(2).sum() for p, t in zip(params, targets)).backward()
        opt.step()
    assert calls == [(4, 16, 32), (1, 40, 24), (2, 8, 24)] * 2
    want = reference_muon(w0, targets, blocks, 2, coefficients=V4_HYBRID, **hp)
    for i, (p, w, ref) in enumerate(zip(params, w0, want)):
        assert_rel_close(f"param {i} update", p.detach() - w, ref - w.double(), 1e-5)


def test_nesterov_off_uses_the_momentum_buffer():
    g = torch.Generator().manual_seed(7)
    w = torch.nn.Parameter(torch.randn(24, 16, generator=g))
    w0, grads = w.detach().clone(), [torch.randn(24, 16, generator=g) for _ in range(2)]
    opt = Muon([w], 0.1, weight_decay=0.0, nesterov=False)
    for gr in grads:
        w.grad = gr
        opt.step()
    buf = 0.95 * grads[0] + grads[1]
    want = w0 - 0.1 * 0.18 * 24 ** 0.5 * (orthogonalize(grads[0], V4_HYBRID) + orthogonalize(buf, V4_HYBRID))
    assert_rel_close("nesterov=False", w.detach() - w0, want - w0, 1e-5)


def test_params_without_grad_are_skipped_and_state_round_trips():
    g = torch.Generator().manual_seed(8)
    a, b = (torch.nn.Parameter(torch.randn(2, 16, 8, generator=g)) for _ in range(2))
    b0 = b.detach().clone()
    opt = Muon([a, b], 0.02, ns_dtype=torch.bfloat16)
    grads = [torch.randn(2, 16, 8, generator=g) for _ in range(3)]
    for gr in grads[:2]:
        a.grad = gr
        opt.step()
    assert torch.equal(b.detach(), b0) and b not in opt.state

    a2 = torch.nn.Parameter(a.detach().clone())
    opt2 = Muon([a2, torch.nn.Parameter(b0.clone())], 0.5, momentum=0.0)    # hyper-parameters come from the state
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.param_groups[0]["ns_dtype"] == torch.bfloat16 and opt2.param_groups[0]["momentum"] == 0.95
    a.grad, a2.grad = grads[2], grads[2].clone()
    opt.step()
    opt2.step()
    assert torch.equal(a.detach(), a2.detach())
    assert torch.equal(opt.state[a]["momentum_buffer"], opt2.state[a2]["momentum_buffer"])


def test_rejects_bad_shapes_and_arguments():
    with pytest.raises(ValueError, match="2-D or 3-D"):
        Muon([torch.nn.Parameter(torch.zeros(4))], 0.1)
    with pytest.raises(ValueError, match="matrix_shape"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(10, 4))], "matrix_shape": (3, 4)}], 0.1)
    with pytest.raises(ValueError, match="ns_coefficients"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], 0.1, ns_coefficients=[(1.0, 2.0)])
    with pytest.raises(ValueError, match="momentum"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], 0.1, momentum=-0.1)


# ---------------------------------------------------------------- vs torch.optim.Muon
# torch.optim.Muon (2.13): momentum is an EMA, B = mu B + (1 - mu) g, and Nesterov is g.lerp(B, mu);
# both are (1 - mu) times ours, and NS divides by the Frobenius norm, so the orthogonalised updates are
# the same (torch clamps the norm at eps where we add eps: no difference for non-tiny gradients). Its
# "match_rms_adamw" scales lr by 0.2 sqrt(max(A, B)) = our update_rms=0.2, and it applies the same
# decoupled decay W (1 - lr wd). The one difference that cannot be configured away: torch always runs
# NS in bf16 (a cast inside _zeropower_via_newtonschulz), so the optimisers are compared with torch's
# NS swapped for our fp32 one, and the NS kernels are compared separately at bf16 tolerance.

def run_both(steps: int, shape=(48, 80), lr=0.02, wd=0.1):
    g = torch.Generator().manual_seed(9)
    ours = torch.nn.Parameter(torch.randn(shape, generator=g))
    theirs = torch.nn.Parameter(ours.detach().clone())
    w0 = ours.detach().clone()
    opt_ours = Muon([ours], lr, weight_decay=wd, update_rms=0.2, ns_coefficients=[KELLER] * 5)
    opt_theirs = torch.optim.Muon([theirs], lr, weight_decay=wd, adjust_lr_fn="match_rms_adamw")
    for _ in range(steps):
        grad = torch.randn(shape, generator=g)
        ours.grad, theirs.grad = grad, grad.clone()
        opt_ours.step()
        opt_theirs.step()
    return ours.detach() - w0, theirs.detach() - w0


def test_matches_torch_muon_with_fp32_newton_schulz(monkeypatch):
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz",
                        lambda grad, abc, steps, eps: orthogonalize(grad, [abc] * steps, eps))
    ours, theirs = run_both(steps=3)
    assert_rel_close("3 steps vs torch.optim.Muon", ours, theirs, 1e-5)


def test_newton_schulz_matches_torch_up_to_its_bf16():
    x = torch.randn(64, 160, generator=torch.Generator().manual_seed(10))
    ref = orthogonalize(x.double(), [KELLER] * 5)
    rel = lambda got: ((got.double() - ref).norm() / ref.norm()).item()   # noqa: E731
    assert rel(orthogonalize(x, [KELLER] * 5)) < 1e-5
    assert rel(torch_muon._zeropower_via_newtonschulz(x, KELLER, 5, 1e-7)) < 3e-2
    ours, theirs = run_both(steps=3)                                    # unpatched torch: same to bf16 level
    assert_rel_close("3 steps vs torch.optim.Muon (bf16 NS)", ours, theirs, 5e-2)


# ---------------------------------------------------------------- parameter split on the tiny model

ADAMW_NAME = re.compile(r"(^|\.)(embed|head)\.weight$|norm\.weight$|hc_\w+_(base|scale)$|attn_sink$|\.ape$")
MUON_NAME = re.compile(r"hc_\w+_fn$|experts\.w[123]$|shared_experts\.w[123]\.weight$|"
                       r"attn\.(wq_a|wq_b|wkv|wo_a|wo_b)\.weight$|indexer\.(wq_b|weights_proj)\.weight$|"
                       r"compressor\.(wkv|wgate)\.weight$|ffn\.gate\.weight$|mtp\.\d+\.[eh]_proj\.weight$")


@pytest.fixture(scope="module")
def tiny():
    return dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=0)


def test_split_params_follows_the_v4_rule(tiny):
    names = {id(p): n for n, p in tiny.named_parameters()}
    muon, adamw = split_params(tiny)
    muon_names, adamw_names = {names[id(p)] for p in muon}, {names[id(p)] for p in adamw}
    trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert len(muon) + len(adamw) == len(trainable) and muon_names | adamw_names == trainable
    assert all(ADAMW_NAME.search(n) and not MUON_NAME.search(n) for n in adamw_names), adamw_names
    assert all(MUON_NAME.search(n) and not ADAMW_NAME.search(n) for n in muon_names), muon_names
    assert {"embed.weight", "head.weight", "layers.1.attn.compressor.ape", "layers.3.hc_attn_base",
            "hc_head_scale", "layers.0.attn.attn_sink", "norm.weight"} <= adamw_names
    assert {"layers.1.ffn.experts.w1", "hc_head_fn", "mtp.0.hc_ffn_fn", "layers.1.attn.indexer.weights_proj.weight",
            "layers.3.attn.indexer.compressor.wgate.weight", "layers.2.ffn.gate.weight",
            "mtp.0.e_proj.weight"} <= muon_names
    assert not any(n.endswith("gate.bias") for n in muon_names | adamw_names)


def test_build_optimizers_groups(tiny):
    names = {id(p): n for n, p in tiny.named_parameters()}
    muon, adamw = build_optimizers(tiny, 1e-3)
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    whole, grouped = muon.param_groups
    assert grouped["matrix_shape"] == (64, 128)            # tiny: o_lora_rank 64, 4 heads x 64 / 2 groups
    assert {names[id(p)].split(".")[-2] for p in grouped["params"]} == {"wo_a"}
    assert len(grouped["params"]) == 5 and whole["matrix_shape"] is None
    decay, no_decay = adamw.param_groups
    assert {names[id(p)] for p in decay["params"]} == {"embed.weight", "head.weight"}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert adamw.defaults["betas"] == (0.9, 0.95) and adamw.defaults["eps"] == 1e-8

    (only,) = build_optimizers(tiny, 1e-3, optimizer="adamw")
    decay, no_decay = only.param_groups
    assert len(decay["params"]) + len(no_decay["params"]) == sum(p.requires_grad for p in tiny.parameters())
    assert all(p.ndim >= 2 for p in decay["params"]) and "ape" in {names[id(p)][-3:] for p in no_decay["params"]}
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizers(tiny, 1e-3, optimizer="sgd")


def test_one_training_step_on_the_tiny_model():
    """Every parameter that got a gradient moves; the rest (MTP, idle indexers, gate bias) do not."""
    cfg = dsv4.ModelConfig.preset("tiny")
    model = dsv4.Transformer(cfg).init_weights(seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(11))
    logits = model(tokens)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    for opt in build_optimizers(model, 1e-3):
        opt.step()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (not torch.equal(p.detach(), before[n])), n
    assert torch.isfinite(torch.cat([p.detach().flatten() for p in model.parameters()])).all()


# ---------------------------------------------------------------- learning-rate schedules

def test_warmup_and_cosine():
    lr = lambda s: lr_at(s, 1001, 2.7e-4, warmup=100)                     # noqa: E731
    assert lr(0) == pytest.approx(2.7e-6) and lr(99) == pytest.approx(2.7e-4)
    assert all(lr(s) < lr(s + 1) for s in range(99))
    assert lr(100) == pytest.approx(2.7e-4) and lr(1000) == pytest.approx(2.7e-5)
    assert lr(550) == pytest.approx((2.7e-4 + 2.7e-5) / 2)
    assert all(lr(s) >= lr(s + 1) for s in range(100, 1000))


def test_wsd_plateau_then_linear_decay():
    lr = lambda s: lr_at(s, 1000, 1.0, warmup=50, schedule="wsd", min_ratio=0.1, decay_frac=0.2)  # noqa: E731
    assert lr(49) == 1.0 and all(lr(s) == 1.0 for s in range(50, 800))
    decay = [lr(s) for s in range(799, 1000)]
    assert decay[0] == 1.0 and decay[-1] == pytest.approx(0.1)
    steps = [a - b for a, b in zip(decay, decay[1:])]
    assert max(steps) - min(steps) < 1e-12 and min(steps) > 0


@pytest.mark.parametrize("kwargs, bad", [
    (dict(step=0, total_steps=0), "total_steps"), (dict(step=10, total_steps=10), "step"),
    (dict(warmup=-1), "warmup"), (dict(warmup=11), "warmup"), (dict(peak=0.0), "peak"),
    (dict(schedule="linear"), "schedule"), (dict(min_ratio=1.5), "min_ratio"), (dict(decay_frac=0.0), "decay_frac"),
])
def test_lr_rejects_bad_arguments(kwargs, bad):
    args = dict(step=0, total_steps=10, peak=1.0, warmup=2) | kwargs
    with pytest.raises(ValueError, match=bad):
        lr_at(args.pop("step"), args.pop("total_steps"), args.pop("peak"), **args)

"""ops/triton/mhc.py (mHC: lane collapse, post mix, the mixes' projection; forward and backward) against the
references."""
import pytest
import torch

from dsv4.ops.reference import mhc as ref_mhc
from dsv4.ops.triton import mhc as tri_mhc

from .device import DEV, DT, TOL, TRAIN_TOL, gen, randn, rel_err


@pytest.mark.parametrize("lead, R, C", [((1, 1), 4, 96), ((2, 5), 3, 1500)])
def test_collapse_and_post_mix(lead, R, C):
    g = gen()
    x, f = randn(*lead, R, C, g=g, dtype=DT), randn(*lead, C, g=g, dtype=DT)
    w, comb = torch.rand(*lead, R, generator=g).to(DEV), torch.rand(*lead, R, R, generator=g).to(DEV)
    for a, r in ((tri_mhc.hc_collapse(x, w), ref_mhc.hc_collapse(x, w)),
                 (tri_mhc.hc_post(f, x, w, comb), ref_mhc.hc_post(f, x, w, comb))):
        assert a.shape == r.shape and a.dtype == r.dtype
        assert (a.double() - r.double()).abs().max() <= TOL * 10 * r.double().abs().max(), (a - r).abs().max()


@pytest.mark.parametrize("lead, R, C", [((2, 3), 4, 1300), ((1, 1), 3, 40)])
def test_post_mix_gradients(lead, R, C):
    """Training: d f, d lanes, d post, d comb against float64 autograd through the post mix written out."""
    g = gen()
    leaves = [randn(*lead, C, g=g, dtype=DT), randn(*lead, R, C, g=g, dtype=DT), randn(*lead, R, g=g),
              torch.rand(*lead, R, R, generator=g).to(DEV)]
    dout = randn(*lead, R, C, g=g).double()
    a = [x.detach().clone().requires_grad_(True) for x in leaves]
    r = [x.detach().double().requires_grad_(True) for x in leaves]
    o_t = tri_mhc.hc_post(*a)
    f, x, post, comb = r
    o_r = post.unsqueeze(-1) * f.unsqueeze(-2) + torch.einsum("...jk,...jc->...kc", comb, x)
    (o_t.double() * dout).sum().backward()
    (o_r * dout).sum().backward()
    assert o_t.dtype == DT and rel_err(o_t, o_r) < TRAIN_TOL, ("post", rel_err(o_t, o_r))
    for name, x_t, x_r, x in zip(("f", "lanes", "post", "comb"), a, r, leaves):
        err = rel_err(x_t.grad, x_r.grad)
        assert x_t.grad.dtype == x.dtype and err < TRAIN_TOL, (name, err)


@pytest.mark.parametrize("lead, R, C, M", [((1, 1), 4, 64, 24), ((2, 3), 4, 96, 24), ((1, 70), 2, 64, 4),
                                           ((1, 300), 4, 128, 24)])
def test_mixes(lead, R, C, M):
    """The mixes of bf16 lanes (fp32-exact products, fp32 sums), and in training the backward kernels (d fn in
    fp32, d lanes rounded once to the lanes' bf16) against float64 autograd."""
    g = gen()
    x = randn(*lead, R, C, g=g, dtype=torch.bfloat16)
    fn = randn(M, R * C, g=g)
    a, r = tri_mhc.hc_mixes(x, fn, 1e-6), ref_mhc.hc_mixes(x.double(), fn.double(), 1e-6)
    assert a.shape == r.shape and a.dtype == torch.float32
    assert ((a.double() - r).abs().max() / r.abs().max()).item() < 1e-5
    xa, fa = x.clone().requires_grad_(True), fn.clone().requires_grad_(True)
    xr, fr = x.double().requires_grad_(True), fn.double().requires_grad_(True)
    dout = randn(*lead, M, g=g)
    (tri_mhc.hc_mixes(xa, fa, 1e-6) * dout).sum().backward()
    (ref_mhc.hc_mixes(xr, fr, 1e-6) * dout.double()).sum().backward()
    assert rel_err(fa.grad, fr.grad) < 1e-5
    # one rounding to bf16 of an fp32 sum: within a bf16 ulp, plus fp32 error where the two terms cancel
    bound = 2 ** -7 * xr.grad.abs() + 1e-5 * xr.grad.abs().max()
    assert xa.grad.dtype == torch.bfloat16 and ((xa.grad.double() - xr.grad).abs() <= bound).all()


def test_training_mixes_read_the_weight_as_it_is_now():
    """A training step's mixes use fn's current values even when its in-place version has not moved: a replayed
    CUDA graph re-runs the kernels, not the host's cache check, so a weight split cached outside the step would
    leave every replay on the weights of the capture (the optimizer's updates never reaching the forward)."""
    g = gen()
    x = randn(2, 3, 4, 64, g=g, dtype=torch.bfloat16).requires_grad_(True)
    fn = torch.nn.Parameter(randn(24, 4 * 64, g=g))
    tri_mhc.hc_mixes(x, fn, 1e-6)                     # a first step (the graph's warm-up)
    fn.data.copy_(randn(24, 4 * 64, g=g))              # an update that a replay does not see as a version change
    got = tri_mhc.hc_mixes(x, fn, 1e-6)
    want = ref_mhc.hc_mixes(x.detach().double(), fn.detach().double(), 1e-6)
    err = ((got.detach().double() - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5, f"mixes of the weight as it was at the first call? relative error {err:.3g}"


def test_launches_build_for_gpus(native_build):
    native_build()

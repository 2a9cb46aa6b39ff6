"""ops/triton/sequence_attn.py (training attention over whole sequences: forward, entry probabilities, backward)
against float64 autograd through the reference, and the pieces its launches are built from."""
import pytest
import torch
from triton.runtime.errors import OutOfResources

from dsv4.ops.reference.sequence_attn import sequence_attn as ref
from dsv4.ops.triton import sequence_attn as tri_seq

from .device import DEV, DT, TOL, cases, gen, randn, rel_err

# B, S, H, D, N entries (0: window only), W window. CPU: several head blocks (70 heads); GPU: V4 sizes (64 heads x
# 512, window 128, CSA and HCA entry counts) and Pro's 128 heads
SHAPES = cases(cpu=[(2, 37, 4, 32, 9, 8), (1, 20, 20, 16, 0, 4), (1, 12, 70, 16, 3, 4)],
               gpu=[(1, 700, 64, 512, 175, 128), (2, 300, 128, 512, 75, 128), (1, 513, 16, 128, 4, 64)])


@pytest.mark.parametrize("B, S, H, D, N, W", SHAPES)
def test_forward_and_gradients(B, S, H, D, N, W):
    """The output, the entry probabilities and the gradients of q, kv, entries and sink: dense masked walks with
    the row gradients summed over one or several token ranges, and per-token entry lists."""
    g = gen()
    q, kv = randn(B, S, H, D, g=g, dtype=DT), randn(B, S, D, g=g, dtype=DT)
    ent = randn(B, N, D, g=g, dtype=DT) if N else None
    sink = randn(H, g=g)
    mask = None
    if N:  # causal visibility of the entries (ratio S // N), a random selection among them (the indexer's top-k)
        vis = torch.arange(N).view(1, N) < ((torch.arange(S) + 1) // (S // N)).view(S, 1)
        mask = (vis & (torch.rand(B, S, N, generator=g) < 0.6)).to(DEV)
    do = randn(B, S, H, D, g=g, dtype=DT)
    leaves = [x for x in (q, kv, ent, sink) if x is not None]
    names = ("q", "kv", "entries", "sink") if N else ("q", "kv", "sink")

    def args(xs):
        return xs[0], xs[1], xs[2] if N else None, mask, xs[-1], D ** -0.5, W, True
    r = [x.detach().double().requires_grad_(True) for x in leaves]
    o_r, m_r = ref(*args(r))
    (o_r * do.double()).sum().backward()
    for splits, lists in ((None, False), (3, False), (None, True)):
        a = [x.detach().clone().requires_grad_(True) for x in leaves]
        o_a, m_a = tri_seq.sequence_attn(*args(a), splits=splits, lists=lists)
        (o_a.float() * do.float()).sum().backward()
        assert rel_err(o_a, o_r) < TOL, ("o", splits, lists, rel_err(o_a, o_r))
        assert (m_a is None) == (N == 0) and (N == 0 or rel_err(m_a, m_r) < TOL), "entry probabilities"
        for name, x, y in zip(names, a, r):
            err = rel_err(x.grad, y.grad)
            assert x.grad.dtype == x.dtype and err < 2 * TOL, (name, splits, lists, err)


def test_row_dots():
    """The backward's delta = sum dO * O per row, in fp32."""
    g = gen()
    do, o = randn(2, 37, 3, 64, g=g, dtype=DT), randn(2, 37, 3, 64, g=g, dtype=DT)
    want = (do.double() * o.double()).sum(-1)
    got = tri_seq._row_dots(do, o)
    assert got.dtype == torch.float32 and got.shape == want.shape and rel_err(got, want) < 1e-6


def test_launch_falls_back_to_a_smaller_configuration():
    """A configuration that exceeds the GPU's resources is skipped, and the one that fits is remembered."""
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
    assert tri_seq._launch(k, lambda bh, bk: ((1,), (), bh), 64, 512) == 32
    assert tri_seq._launch(k, lambda bh, bk: ((1,), (), bh), 64, 512) == 32
    assert k.calls == [64, 64, 32, 32]  # the second launch starts at the configuration that fit


def test_walk_bounds_and_lists_in_row_steps():
    """What the walks start from, computed in steps of query rows (as at long contexts): each token's last visible
    entry + 1, each entry's first token, and each token's ascending entry list."""
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 23, 11, generator=g) < 0.3
    mask[0, 4] = False        # a token that sees nothing
    mask[1, :, 7] = False     # an entry nobody sees
    n_hi, first = tri_seq._visibility_bounds(mask.view(torch.uint8), rows_per_step=4)
    lists, counts = tri_seq._entry_lists(mask, rows_per_step=4)
    for b in range(2):
        for s in range(23):
            seen = torch.nonzero(mask[b, s]).flatten()
            assert n_hi[b, s] == (int(seen.max()) + 1 if len(seen) else 0)
            assert counts[b, s] == len(seen)
            assert lists[b, s, :len(seen)].tolist() == seen.tolist() and (lists[b, s, len(seen):] == -1).all()
        for n in range(11):
            seers = torch.nonzero(mask[b, :, n]).flatten()
            assert first[b, n] == (int(seers.min()) if len(seers) else 23)


def test_launches_build_for_gpus(native_build):
    native_build()

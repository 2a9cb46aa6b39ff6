"""The CUDA-graph decoder keeps the cache's step bookkeeping as the eager model does (skipped without CUDA): each
replay commits its step (positions advance, no row left marked damaged), a capture that fails leaves the cache as
it was and decoding goes on eagerly with the same logits, and a replay that fails leaves the rows damaged."""
import pytest
import torch

import dsv4
from conftest import InjectedFailure, assert_rel_close, fail_on_call
from dsv4.cache import CacheDamaged

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def gpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    return dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=1).eval().cuda()


def _prefilled(model, tokens):
    cache = model.new_cache(2, 96)
    model(tokens[:1, :20], cache=cache.select(0))
    model(tokens[1:, :33], cache=cache.select(1))
    return cache


@torch.no_grad()
def test_replays_commit_every_step(gpu):
    from dsv4.generate.graphs import GraphDecoder
    tokens = torch.randint(0, 2048, (2, 60), generator=torch.Generator().manual_seed(0)).cuda()
    cache = _prefilled(gpu, tokens)
    step = GraphDecoder(gpu, cache)
    for i in range(6):
        step(tokens[:, 33 + i])
        assert cache.damaged_rows == [] and cache.lengths() == [21 + i, 34 + i]
        assert cache.positions.tolist() == cache.lengths()
    assert step.graph is not None and not step.eager

    class FailingGraph:  # a replay that fails (e.g. a device error) commits nothing
        def replay(self):
            raise RuntimeError("injected replay failure")

    step.graph = FailingGraph()
    with pytest.raises(RuntimeError, match="injected"):
        step(tokens[:, 40])
    assert cache.damaged_rows == [0, 1] and cache.lengths() == [26, 39]
    with pytest.raises(CacheDamaged):
        step(tokens[:, 40])


@torch.no_grad()
def test_failed_capture_restores_bookkeeping(gpu, monkeypatch):
    """Layer 2 fails only while the step is being captured: the decoder warns, decodes eagerly from there, and
    every step's logits and the cache's lengths equal an eager decode's."""
    from dsv4.generate.graphs import GraphDecoder
    tokens = torch.randint(0, 2048, (2, 60), generator=torch.Generator().manual_seed(1)).cuda()
    eager_cache = _prefilled(gpu, tokens)
    want = torch.stack([gpu(tokens[:, 33 + i].view(2, 1), cache=eager_cache)[:, -1] for i in range(6)], 1)

    cache = _prefilled(gpu, tokens)
    step = GraphDecoder(gpu, cache)
    fail_on_call(monkeypatch, gpu.layers[2], when=torch.cuda.is_current_stream_capturing)
    got = []
    for i in range(6):
        if i == step.warmup:  # this call captures
            with pytest.warns(UserWarning, match="could not be captured"):
                got.append(step(tokens[:, 33 + i]).clone())
        else:
            got.append(step(tokens[:, 33 + i]).clone())
        assert cache.damaged_rows == [] and cache.lengths() == [21 + i, 34 + i]
        assert cache.positions.tolist() == cache.lengths()
    assert step.eager and step.graph is None
    assert_rel_close("eager after a failed capture vs eager", torch.stack(got, 1), want, 1e-5)


@torch.no_grad()
def test_nonfinite_logits_in_replayed_steps(gpu):
    """Logits that turn non-finite in a replayed CUDA-graph step stop the row with a NonFiniteWarning naming the
    embedding (a generated token's row is NaN), keeping the tokens produced before; the other row goes on."""
    prompts = [list(range(3, 20)), list(range(40, 45))]
    first = dsv4.generate(gpu, prompts, 10)
    bad = first[0][5]
    assert bad not in prompts[0] + first[0][:5] + prompts[1] + first[1]
    broken = dsv4.Transformer(gpu.config).eval().cuda()
    broken.load_state_dict(gpu.state_dict())
    broken.embed.weight[bad] = float("nan")
    with pytest.warns(dsv4.NonFiniteWarning, match=r"row\(s\) \[0\] at generated token 6.*module embed"):
        out = dsv4.generate(broken, prompts, 10)
    assert out == [first[0][:6], first[1]]

"""Speculative decoding on the GPU (skipped without CUDA): the cache rollback with the GPU kernels and FP8 / FP4
records, and greedy speculative output equal to plain greedy decoding (eager steps, fp32)."""
import pytest
import torch

import dsv4
from dsv4.generate import SamplingConfig
from dsv4.generate.speculative import SpeculativeDecoder
from conftest import read_tensors

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def model():
    torch.backends.cuda.matmul.allow_tf32 = False
    return dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=3).eval().cuda()


@pytest.mark.parametrize("dtypes", [{}, {"kv_dtype": "fp8", "index_dtype": "fp4"}], ids=["fp32", "fp8-fp4"])
@torch.no_grad()
def test_rollback_to_nothing_is_bitwise_on_gpu(model, dtypes):
    """Every byte a later step reads is put back (the entry / key rows of groups only a rejected token completed
    are never read unmasked: dsv4.cache.rollback), and the next step's logits are bitwise an untouched cache's."""
    caches = [model.new_cache(3, 128, **dtypes) for _ in range(2)]
    prompts = [torch.randint(0, 2048, (1, n), device="cuda") for n in (30, 33, 47)]
    for cache in caches:
        for r, p in enumerate(prompts):
            model(p, cache=cache.select(r))
    cache, untouched = caches

    before = [t.clone() for t in read_tensors(cache)]
    ckpt = cache.checkpoint(4)
    model(torch.randint(0, 2048, (3, 4), device="cuda"), cache=cache)
    cache.rollback(ckpt, 0)
    assert all(torch.equal(a, b) for a, b in zip(before, read_tensors(cache)))
    nxt = torch.randint(0, 2048, (3, 2), device="cuda")
    assert torch.equal(model(nxt, cache=cache), model(nxt, cache=untouched))


def test_greedy_speculative_equals_plain_on_gpu(model):
    prompt = list(range(100, 120))
    plain = dsv4.generate(model, [prompt], 40, cuda_graphs=False)[0]
    dec = SpeculativeDecoder(model, model.new_cache(1, 80), n_draft=3)
    dec.prefill(0, prompt)
    out = []
    while len(out) < 40:
        out += dec.step_row(0, SamplingConfig(temperature=0.0), budget=40 - len(out)).tokens
    assert out == plain

"""A batched prefill step on a GPU never waits for the device: its forwards, the first tokens of the prompts that
end (some rows of a forward, picked by a tensor sent ahead) and their hand-out (deferred with overlap) are only
queued, so the host goes on while the device computes."""
from __future__ import annotations

import pytest
import torch

from dsv4 import ModelConfig
from dsv4.model import Transformer
from dsv4.serve.engine import Engine
from dsv4.serve.types import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_a_batched_prefill_step_with_some_prompts_ending_never_waits_for_the_device():
    model = Transformer(ModelConfig.preset("tiny")).init_weights(seed=0).to_dtype(torch.bfloat16).cuda().eval()
    engine = Engine(model, max_batch=2, max_seq_len=600, prefill_chunk=256, step_token_budget=1024,
                    cuda_graphs=False, batch_invariant=False, overlap=True)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 2048, (n,), generator=g).tolist() for n in (256, 512)]

    def submit():   # row 0's prompt ends with the first forward of both rows; row 1's with a second, alone
        return [engine.submit(p, SamplingParams(max_tokens=2, temperature=0)) for p in prompts]
    submit()
    engine.run_until_idle()   # (kernels compiled for these shapes)
    handles = submit()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    engine.run_until_idle()
    assert [len(list(h)) for h in handles] == [2, 2]


def test_a_forward_on_a_gathered_copy_of_rows_never_waits_for_the_device():
    model = Transformer(ModelConfig.preset("tiny")).init_weights(seed=0).to_dtype(torch.bfloat16).cuda().eval()
    cache = model.new_cache(3, 256)
    x = torch.randint(2, 2048, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for checked in (False, True):   # (the first time compiles the kernels for these shapes)
            cache.reset()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error" if checked else "default")
            try:
                part = cache.gather_rows([0, 2])   # rows that are not adjacent: a copy, written back after
                model(x, cache=part, last_only=True)
                cache.scatter_rows([0, 2], part)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    assert cache.lengths() == [64, 0, 64]

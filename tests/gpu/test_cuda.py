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

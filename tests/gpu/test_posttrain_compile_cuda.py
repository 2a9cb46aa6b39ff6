"""GPU checks (skipped without CUDA) of how post-training compiles: with ops.training_compile(False) (`dsv4
posttrain`'s default) an SFT run on varying lengths compiles no torch.compile graph, and with the length buckets
its batches take few lengths."""
import pytest
import torch

import dsv4
from dsv4.posttrain.chat_data import Example
from dsv4.posttrain.sft import SFTConfig, train_sft

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_sft_without_training_compile_compiles_nothing_and_sees_few_lengths(tmp_path, monkeypatch):
    import dsv4.posttrain.sft as sft_mod
    from torch._dynamo.utils import counters
    from dsv4.train.tokenizer import train_bpe
    tok = train_bpe(["<｜User｜>What is 2 plus 3?<｜Assistant｜></think>It is 5.<｜end▁of▁sentence｜>"] * 20, 300,
                    tmp_path / "tok")
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=1).cuda()
    g = torch.Generator().manual_seed(0)
    exs = [Example(torch.randint(0, 300, (n,), generator=g).tolist(), [0] * (n // 2) + [1] * (n - n // 2))
           for n in range(20, 140, 7)]
    lengths, real = set(), sft_mod.sft_loss

    def seen(m, batch, **kw):
        lengths.add(batch.tokens.shape[1])
        return real(m, batch, **kw)

    monkeypatch.setattr(sft_mod, "sft_loss", seen)
    before = counters["stats"]["unique_graphs"]
    with dsv4.ops.training_compile(False):
        cfg = SFTConfig(steps=len(exs), lr=1e-3, batch_size=1, seq_len=256, pack=False, device="cuda",
                        progress=False, cuda_graph="off")   # eager: batches as long as their bucket (graphs: 256)
        res = train_sft(model, tok, exs * 2, cfg, str(tmp_path / "run"))
    assert res["steps"] == len(exs)
    assert counters["stats"]["unique_graphs"] == before          # no torch.compile graph was built
    assert lengths <= {64, 128, 192} and len(lengths) <= 3        # 17 example lengths, 3 buckets

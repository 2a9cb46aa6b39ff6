"""GPU checks (skipped without CUDA) of packed documents and SFT: the GPU training kernels keep packed documents
apart as the CPU references do, and SFT steps run under bf16 autocast."""
import pytest
import torch

import dsv4
from dsv4.model.documents import PackedDocuments
from dsv4.posttrain.chat_data import Example
from dsv4.posttrain.sft import SFTConfig, sft_loss, train_sft
from dsv4.posttrain.packing import make_batch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROWS = [[5, 37, 18, 140], [3, 1, 17, 33, 6, 140]]


def test_packed_documents_equal_alone_on_gpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=3).train().cuda()
    tokens = torch.randint(0, 2048, (2, 200), generator=torch.Generator().manual_seed(0)).cuda()
    docs = PackedDocuments(ROWS, 200, "cuda")
    with torch.no_grad():
        packed = model.logits(model.hidden(tokens, docs=docs))
        for b, row in enumerate(ROWS):
            start = 0
            for n in row:
                alone = model(tokens[b:b + 1, start:start + n])
                torch.testing.assert_close(packed[b:b + 1, start:start + n], alone, rtol=0,
                                           atol=1e-4 * float(alone.abs().max()))
                start += n


def test_sft_steps_on_gpu(tmp_path):
    from dsv4.train.tokenizer import train_bpe
    tok = train_bpe(["<｜User｜>What is 2 plus 3?<｜Assistant｜></think>It is 5.<｜end▁of▁sentence｜>"] * 20, 300,
                    tmp_path / "tok")
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=1).cuda()
    g = torch.Generator().manual_seed(0)
    exs = [Example(torch.randint(0, 300, (n,), generator=g).tolist(), [0] * (n // 2) + [1] * (n - n // 2))
           for n in (40, 70, 25, 90, 33, 61)]
    first = float(sft_loss(model, make_batch([exs], 1, 0).to("cuda"))[0])
    res = train_sft(model, tok, exs * 4, SFTConfig(steps=6, lr=3e-3, batch_size=2, seq_len=256, device="cuda",
                                                   progress=False), str(tmp_path / "run"))
    assert res["last_loss"] < first and res["steps"] == 6

"""The model fingerprint: every byte of every parameter and buffer and every module setting changes it; nothing
else (a forward pass, another instance of the same model) does."""
import pytest
import torch

import dsv4
from dsv4.generate import fingerprint as F


@pytest.fixture
def model():
    return dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=1).eval()


def _exact(words: list[int], mult: list[int]) -> int:
    """The reduction in Python integers (mod 2^64), for comparison."""
    sums = [sum(w * mult[i] for i, w in enumerate(words[s: s + len(mult)])) % 2**64
            for s in range(0, max(len(words), 1), len(mult))]
    return sums[0] if len(sums) == 1 else _exact(sums, mult)


@pytest.mark.parametrize("n_bytes", [0, 1, 7, 8, 8 * 16, 8 * 16 * 2 + 3, 8 * 16 * 3 * 5 + 1, 8 * 16 * 16 * 17])
def test_tensor_sum_is_the_exact_modular_sum(monkeypatch, n_bytes):
    """Wraparound int64 arithmetic on the device equals the exact sum mod 2^64, across rows, slabs and folds."""
    monkeypatch.setattr(F, "ROW", 16)
    monkeypatch.setattr(F, "SLAB_ROWS", 3)
    monkeypatch.setattr(F, "_multipliers", {})
    t = torch.randint(0, 256, (n_bytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n_bytes))
    words = [w % 2**64 for w in F._words(t).tolist()]
    mult = [m % 2**64 for m in F._multiplier_row(torch.device("cpu")).tolist()]
    assert all(m % 2 for m in mult)
    assert int(F.tensor_sum(t)) % 2**64 == _exact(words, mult)


def test_any_bit_of_any_tensor_counts(model):
    """One flipped bit changes a tensor's digest: in the first, the last and a random byte of every tensor."""
    g = torch.Generator().manual_seed(0)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        raw = t.detach().reshape(-1).view(torch.uint8)
        before = F.tensors_digest([(name, t)])
        for k in (0, raw.numel() - 1, int(torch.randint(raw.numel(), (1,), generator=g))):
            bit = 1 << int(torch.randint(8, (1,), generator=g))
            raw[k] ^= bit
            assert F.tensors_digest([(name, t)]) != before, f"{name}: bit {bit} of byte {k}"
            raw[k] ^= bit
        assert F.tensors_digest([(name, t)]) == before


@pytest.mark.parametrize("name", ["layers.2.attn.wkv.weight", "layers.0.ffn.gate.tid2eid", "layers.1.ffn.gate.bias",
                                  "layers.3.attn.freqs", "mtp.0.e_proj.weight"])
def test_model_fingerprint_covers_parameters_and_buffers(model, name):
    t = dict([*model.named_parameters(), *model.named_buffers()])[name]
    before = F.model_fingerprint(model)
    raw = t.detach().reshape(-1).view(torch.uint8)
    raw[raw.numel() // 3] ^= 4
    assert F.model_fingerprint(model) != before
    raw[raw.numel() // 3] ^= 4
    assert F.model_fingerprint(model) == before


def test_settings_count(model):
    model.set_quant_sim(False)
    before = F.model_fingerprint(model)
    for change, undo in [(lambda: model.set_quant_sim(True), lambda: model.set_quant_sim(False)),
                         (lambda: setattr(model.layers[2].attn, "sparse", False),
                          lambda: setattr(model.layers[2].attn, "sparse", True))]:
        change()
        assert F.model_fingerprint(model) != before
        undo()
        assert F.model_fingerprint(model) == before
    handle = model.layers[1].register_forward_hook(lambda module, args, out: out * 2)
    assert F.model_fingerprint(model) != before
    handle.remove()
    assert F.model_fingerprint(model) == before


def test_stable_across_forward_passes_and_instances(model):
    before = F.model_fingerprint(model)
    dsv4.generate(model, [[5, 6, 7, 8]], 3)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert F.model_fingerprint(model) == before
    twin = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=1).eval()
    assert F.model_fingerprint(twin) == before
    assert F.model_fingerprint(dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=2)) != before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_sums_on_the_gpu_and_fast(model):
    """The integer reduction gives the CPU's value on the GPU; 512 MiB take well under 50 ms."""
    import time
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert int(F.tensor_sum(t.cuda())) == int(F.tensor_sum(t)), name
    x = torch.randn(3 << 20, generator=torch.Generator().manual_seed(0))
    assert int(F.tensor_sum(x.cuda())) == int(F.tensor_sum(x))
    cpu = F.model_fingerprint(model)
    assert F.model_fingerprint(model.cuda()) != cpu  # the device type is part of the key (kernels round differently)
    big = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16).view(-1, 4096)  # 512 MiB
    F.tensor_sum(big)
    torch.cuda.synchronize()
    t = time.perf_counter()
    F.tensor_sum(big)
    torch.cuda.synchronize()
    assert time.perf_counter() - t < 0.05

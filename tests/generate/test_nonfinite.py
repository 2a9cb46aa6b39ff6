"""Weights that make the logits non-finite: generation stops the affected rows with a NonFiniteWarning naming the
first layer (and module) whose output is non-finite, never a raw error from sampling; other rows go on as alone."""
import warnings

import pytest
import torch

import dsv4
from dsv4.generate import NonFiniteWarning, find_nonfinite

PROMPT = list(range(3, 20))


def _model():
    return dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=1).eval()


@pytest.fixture(scope="module")
def healthy():
    return _model()


@pytest.fixture(scope="module")
def broken():
    """Layer 2's query projection holds inf and NaN."""
    model = _model()
    with torch.no_grad():
        w = model.layers[2].attn.wq_a.weight
        w[0, 0], w[1, 1] = float("inf"), float("nan")
    return model


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, top_k=20, top_p=0.9)])
def test_nonfinite_weights_warn_with_layer_and_stop(broken, sampling):
    with pytest.warns(NonFiniteWarning, match=r"row\(s\) \[0\] after the prompt.*layer 2 \(module layers\.2\.attn\.wq_a\)"):
        out = dsv4.generate(broken, [PROMPT], 8, **sampling)
    assert out == [[]]


def test_only_the_nonfinite_row_stops(healthy):
    """A NaN embedding row reaches only the prompts that use that token: that row stops at once (the warning names
    the embedding), the other row generates exactly what it generates alone; one warning for both bad rows."""
    model = _model()
    with torch.no_grad():
        model.embed.weight[50] = float("nan")
    alone = dsv4.generate(healthy, [PROMPT[:5]], 10)[0]
    with pytest.warns(NonFiniteWarning, match=r"row\(s\) \[1, 2\].*module embed") as seen:
        out = dsv4.generate(model, [PROMPT[:5], [50, 8, 9], [9, 50]], 10)
    assert out == [alone, [], []]
    assert len([w for w in seen if issubclass(w.category, NonFiniteWarning)]) == 1


def test_nonfinite_mid_generation_keeps_earlier_tokens(healthy):
    """Logits that turn non-finite mid-generation (a generated token with a NaN embedding is fed back): the row
    keeps the tokens it produced before, and the re-run over prompt + generated tokens finds the embedding."""
    model = _model()
    first = dsv4.generate(healthy, [PROMPT], 6)[0]
    assert first[2] not in PROMPT + first[:2]
    with torch.no_grad():
        model.embed.weight[first[2]] = float("nan")
    with pytest.warns(NonFiniteWarning, match="at generated token 3.*module embed"):
        out = dsv4.generate(model, [PROMPT], 6)[0]
    assert out == first[:3]


def test_find_nonfinite(healthy, broken):
    assert find_nonfinite(healthy, PROMPT) is None
    site = find_nonfinite(broken, PROMPT)
    assert (site.layer, site.module) == (2, "layers.2.attn.wq_a")
    model = _model()
    with torch.no_grad():
        model.head.weight[3, 0] = float("inf")
    site = find_nonfinite(model, PROMPT)
    assert site.layer is None and "LM head" in site.describe()


def test_healthy_generation_does_not_warn(healthy):
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWarning)
        assert len(dsv4.generate(healthy, [PROMPT, PROMPT[:3]], 5, temperature=1.0)[0]) == 5

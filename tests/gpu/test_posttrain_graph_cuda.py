"""Post-training steps replayed as a CUDA graph (skipped without CUDA): packed SFT in fixed attention slots and
pre-training on stream rows follow the eager steps' losses and parameters, and an input of another shape beside
the graph runs eager without disturbing the graph's gradients."""
import json

import pytest
import torch

import dsv4
from dsv4.posttrain.chat_data import Example
from dsv4.posttrain.pretrain import train_pretrain
from dsv4.posttrain.sft import SFTConfig, train_sft, train_steps
from dsv4.posttrain.step_loop import StepInput
from dsv4.train.losses import LossWeights
from dsv4.train.step import step_outputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


class _Tok:
    bos_id, eos_id, vocab_size = None, 1, 2048

    class tok:
        @staticmethod
        def save(path):
            pass

        @staticmethod
        def id_to_token(i):
            return f"<{i}>"


def _model():
    return dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=3).cuda().train()


def _examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for length in torch.randint(12, 120, (n,), generator=g).tolist():
        out.append(Example(torch.randint(2, 2048, (length,), generator=g).tolist(),
                           [0] * (length // 2) + [1] * (length - length // 2)))
    return out


def _rows(path):
    return [json.loads(line) for line in open(path / "metrics.jsonl")]


def _close_params(a, b, rel):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        err = float((p - q).float().norm() / p.float().norm().clamp(min=1e-12))
        assert err < rel, f"{name}: relative difference {err:.2e}"


@pytest.mark.parametrize("stage", ["sft", "pretrain"])
def test_graphed_steps_follow_the_eager_steps(tmp_path, stage):
    """8 steps with cuda_graph on (a failed capture raises) and off, on the same fixed-shape inputs: the same
    losses and (up to bf16 rounding over 8 steps) the same parameters."""
    exs = _examples(60)
    runs = {}
    for graph in ("on", "off"):
        model = _model()
        cfg = SFTConfig(steps=8, lr=1e-3, batch_size=4, seq_len=256, device="cuda", progress=False,
                        cuda_graph=graph, static_shapes=True, log_every=3)
        out = tmp_path / graph
        (train_sft if stage == "sft" else train_pretrain)(model, _Tok(), exs, cfg, str(out))
        runs[graph] = (model, [r["lm"] for r in _rows(out)], [r["grad_norm"] for r in _rows(out)])
    (g_model, g_lm, g_norm), (e_model, e_lm, e_norm) = runs["on"], runs["off"]
    assert len(g_lm) == len(e_lm) == 8
    torch.testing.assert_close(g_lm, e_lm, rtol=2e-2, atol=0)
    torch.testing.assert_close(g_norm, e_norm, rtol=5e-2, atol=0)
    assert g_lm[-1] < g_lm[0]
    _close_params(g_model, e_model, 2e-2)


def test_an_input_of_another_shape_runs_eager_beside_the_graph(tmp_path):
    """Inputs of two shapes alternate: the first shape's steps replay the graph, the other's run eager in gradient
    tensors of their own; the parameters follow an all-eager run of the same inputs."""
    g = torch.Generator().manual_seed(5)
    inputs = [torch.randint(2, 2048, (2, 66 if i % 3 else 34), generator=g) for i in range(7)]
    weights = LossWeights(mtp=0.3, indexer_kl=1.0, balance=0.0)

    def run(graphs):
        model = _model()
        auto = lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graphs)  # noqa: E731
        loss_fn = lambda x, _: step_outputs(model, x, weights, "sparse", 1, auto)  # noqa: E731
        feed = (StepInput(x, None, x.numel(), x.numel()) for x in inputs)
        cfg = SFTConfig(steps=7, lr=1e-3, device="cuda", progress=False, cuda_graph="on" if graphs else "off")
        out = tmp_path / str(graphs)
        train_steps(model, _Tok(), feed, loss_fn, 7, cfg, str(out), stage="pretrain", graphs=graphs)
        return model, [r["lm"] for r in _rows(out)]
    (g_model, g_lm), (e_model, e_lm) = run(True), run(False)
    torch.testing.assert_close(g_lm, e_lm, rtol=2e-2, atol=0)
    _close_params(g_model, e_model, 2e-2)

"""What a captured CUDA-graph training step reads must stay where it is between replays: the trainer's work between
steps (evaluation, the aux-loss-free bias update) changes parameters and buffers only in place. Checked eagerly on
the CPU: a replay reads the addresses of its capture, so a tensor rebound between steps is one the graph never sees
again."""
import math
from contextlib import nullcontext
from itertools import chain

import torch

import dsv4
from dsv4.train.evaluation import evaluate
from dsv4.train.losses import LossWeights, routed_layers, update_expert_bias
from dsv4.train.placement import SingleProcess
from dsv4.train.stages import set_stage
from dsv4.train.step import step_outputs


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(chain(model.named_parameters(), model.named_buffers()))


def test_evaluation_and_bias_update_keep_tensors_in_place():
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=0).train()
    set_stage(model, "sparse")
    for b in model.layers:
        b.record_hc = True  # as while graphed
    tokens = torch.randint(0, 2048, (2, 67), generator=torch.Generator().manual_seed(0))
    out = step_outputs(model, tokens, LossWeights(), "sparse", 1, nullcontext)
    out["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    before = {n: (t.data_ptr(), t.detach().clone()) for n, t in _tensors(model).items()}

    val = evaluate(model, [tokens[:, :65]], SingleProcess("cpu"), nullcontext)
    assert math.isfinite(val) and model.training
    after = _tensors(model)
    assert after.keys() == before.keys()
    for n, (ptr, value) in before.items():
        assert after[n].data_ptr() == ptr and torch.equal(after[n], value), f"evaluate rebound or changed {n}"
    assert all(p.grad is grads[n] for n, p in model.named_parameters() if n in grads), "evaluate touched .grad"

    biases = [m.gate.bias for m in routed_layers(model)]
    ptrs, values = [b.data_ptr() for b in biases], [b.clone() for b in biases]
    update_expert_bias(model, out["loads"], 1e-3)
    assert all(m.gate.bias is b for m, b in zip(routed_layers(model), biases))
    assert [b.data_ptr() for b in biases] == ptrs
    assert any(not torch.equal(b, v) for b, v in zip(biases, values)), "the bias update changed nothing"

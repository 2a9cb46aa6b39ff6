"""What `dsv4 train --cuda-graph on` captures must not read device values on the host. A CUDA graph capture
fails on the first `.item()`, `bool(tensor)`, boolean-mask index or `.tolist()`. This checks the model, the
losses and the trainer's step outputs on the CPU, in every training stage, by recording those ops as they run."""
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dsv4
from dsv4.ops.reference.experts import swiglu
from dsv4.train.losses import LossWeights
from dsv4.train.stages import set_stage
from dsv4.train.step import step_outputs

aten = torch.ops.aten
HOST_READS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten._unique2, aten.unique_dim,
              aten.unique_consecutive}


def _where() -> str:
    frames = [f for f in traceback.extract_stack() if "/dsv4/" in f.filename]
    return f"{frames[-1].filename.split('/dsv4/')[-1]}:{frames[-1].lineno}" if frames else "?"


class HostReads(TorchDispatchMode):
    """Records each op that needs a device value on the host, with the dsv4 line that ran it."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        mask_index = func.overloadpacket is aten.index and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
        if func.overloadpacket in HOST_READS or mask_index:
            self.seen.add((str(func), _where()))
        return func(*args, **(kwargs or {}))


def _dense_experts(x, w1, w2, w3, idx, weights, limit):
    """Every expert on every token, weighted by the routing: the routed experts without data-dependent shapes, as
    the GPU's grouped GEMMs run them (the CPU reference loops over experts by their token counts)."""
    h = swiglu(torch.einsum("nc,efc->nef", x, w1.to(x.dtype)), torch.einsum("nc,efc->nef", x, w3.to(x.dtype)), limit)
    y = torch.einsum("nef,ecf->nec", h.to(x.dtype), w2.to(x.dtype)).float()
    sel = torch.zeros(x.shape[0], w1.shape[0], dtype=torch.float32).scatter_add(1, idx, weights.float())
    return (y * sel.unsqueeze(-1)).sum(1)


def test_recorder_sees_host_reads():
    t = torch.arange(6.0)
    rec = HostReads()
    with rec:
        float(t.sum()), t[t > 2]
    assert {op for op, _ in rec.seen} >= {"aten._local_scalar_dense.default", "aten.index.Tensor"}


@pytest.mark.parametrize("stage", ["dense", "indexer", "sparse"])
def test_training_step_reads_nothing_on_the_host(stage, monkeypatch):
    monkeypatch.setattr(dsv4.ops, "moe_experts", _dense_experts)
    listed = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: listed.append(_where()) or [])
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=0).train()
    set_stage(model, stage)
    model._check_tokens = lambda tokens: None  # (skipped while a graph captures: the ids are checked before)
    for b in model.layers:
        b.record_hc = True
    tokens = torch.randint(0, 2048, (2, 66), generator=torch.Generator().manual_seed(0))
    rec = HostReads()
    with rec:
        out = step_outputs(model, tokens, LossWeights(), stage, 1, lambda: torch.autocast("cpu", enabled=False))
        out["loss"].backward()
    assert not rec.seen and not listed, (sorted(rec.seen), listed)
    assert out["combs"] and all(p.grad is not None for p in model.layers[1].attn.indexer.parameters()) == (
        stage != "dense")


@pytest.mark.parametrize("stage", ["indexer", "sparse"])
def test_no_autograd_graph_outlives_its_step(stage):
    """When a forward starts, nothing of the previous step's autograd graph is alive. A kept graph keeps its
    gradient accumulators, which the next step reuses; on a GPU they are bound to the stream the old step ran
    on, and a CUDA graph captured on another stream then fails."""
    import gc
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=0).train()
    set_stage(model, stage)
    tokens = torch.randint(0, 2048, (1, 66), generator=torch.Generator().manual_seed(0))
    alive_at_start = []

    def count_graph_tensors(module, args):
        if len(alive_at_start) == step:  # the step's first embedding (the MTP blocks embed again later)
            gc.collect()
            alive_at_start.append(sum(isinstance(o, torch.Tensor) and o.grad_fn is not None
                                      for o in gc.get_objects()))
    model.embed.register_forward_pre_hook(count_graph_tensors)
    for step in range(2):
        out = step_outputs(model, tokens, LossWeights(), stage, 1, lambda: torch.autocast("cpu", enabled=False))
        out["loss"].backward()
        del out
    assert alive_at_start == [0, 0]

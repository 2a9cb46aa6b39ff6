"""CUDA-graph training (skipped without CUDA): a replayed forward + backward gives the eager step's loss and
gradients on new batches, sums micro-batches, keeps the eager set of trained parameters per stage, follows the
optimizer's updates and survives evaluations between replays, and `dsv4 train` follows the same curve (and the
same validation losses) with graphs on and off."""
import json
import os

import pytest
import torch

import dsv4
from conftest import assert_rel_close
from dsv4.train.cuda_graph import GraphedLoss
from dsv4.train.losses import LossWeights, loss_terms
from dsv4.train.optim import build_optimizers
from dsv4.train.stages import set_stage

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _model(stage: str) -> dsv4.Transformer:
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=3).cuda().train()
    set_stage(model, stage)
    return model


def _loss(model, stage):
    def fn(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            total, parts = loss_terms(model, batch, LossWeights(), lm=stage != "indexer")
        return {"loss": total, "lm": parts.get("lm", total.detach())}
    return fn


def _batches(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 2048, (2, 130), generator=g).cuda() for _ in range(n)]


@pytest.mark.parametrize("stage", ["sparse", "indexer"])
def test_replay_equals_eager_on_new_batches(stage):
    model = _model(stage)
    fn = _loss(model, stage)
    capture, b1, b2 = _batches(3, seed=0)
    graph = GraphedLoss(fn, capture, list(model.parameters()))
    replayed = {}
    for batches in ([b1], [b1, b2]):  # one micro-batch, then two summed
        out = graph(batches)
        replayed[len(batches)] = ([o["lm"] for o in out],
                                  {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    graph.release()
    assert all(p.grad is None for p in model.parameters())
    for n_micro, (losses, grads) in replayed.items():
        eager_losses = []
        for b in (b1, b2)[:n_micro]:
            out = fn(b)
            out["loss"].backward()
            eager_losses.append(out["lm"])
        eager = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert set(grads) == set(eager), f"{stage}: graphed and eager steps train different parameters"
        if stage == "indexer":
            assert all(".indexer." in n for n in grads)
        assert_rel_close(f"{stage} loss x{n_micro}", torch.stack(losses), torch.stack(eager_losses), 1e-5)
        for n in eager:  # the same kernels; only atomically added sums (gather backward) may round differently
            assert_rel_close(f"{stage} grad {n} x{n_micro}", grads[n], eager[n], 3e-3)
        model.zero_grad(set_to_none=True)


def _evaluate(model, batch):
    """What the trainer's evaluation does to the model between steps: an eager no-grad forward in eval mode (which
    fills or refreshes the inference kernels' caches)."""
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        model.eval()
        model(batch[:, :128])
        model.train()


def test_replays_follow_the_optimizer_and_survive_evaluations():
    """Steps replayed between optimizer steps and evaluations give the mHC mixing, loss and gradients of an eager
    step on the weights as they are now: nothing the graph reads was split or copied from a parameter at capture
    time (a stale copy freezes that parameter in the graphed forward while the optimizer moves it), or freed by an
    evaluation (the graph then reads whatever took that memory)."""
    model = _model("sparse")
    with torch.no_grad():  # mHC gates at 1, not 0.01: the comb matrices then follow hc_*_fn closely
        for n, p in model.named_parameters():
            if n.rsplit(".", 1)[-1].startswith("hc_") and n.endswith("_scale"):
                p.fill_(1.0)
    for b in model.layers:
        b.record_hc = True
    loss = _loss(model, "sparse")

    def fn(batch):
        return {**loss(batch), "combs": [c for b in model.layers for c in b.last_combs]}
    opts = build_optimizers(model, 3e-2)  # large steps: a frozen copy of a weight shows within a step
    capture, *batches = _batches(7, seed=5)
    _evaluate(model, capture)  # the trainer evaluates at step 0, before it captures
    graph = GraphedLoss(fn, capture, list(model.parameters()))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for i, b in enumerate(batches):
        got = graph([b])[0]
        replayed = {n: p.grad.clone() for n, p in named if p.grad is not None}
        out = fn(b)
        eager = dict(zip([n for n, _ in named], torch.autograd.grad(out["loss"], [p for _, p in named],
                                                                    allow_unused=True)))
        assert torch.isfinite(got["lm"]), f"step {i}: the replayed loss is {got['lm']}"
        assert_rel_close(f"step {i} mHC combs", torch.cat([c.flatten() for c in got["combs"]]),
                         torch.cat([c.detach().flatten() for c in out["combs"]]), 1e-3)
        assert_rel_close(f"step {i} loss", got["lm"], out["lm"], 1e-4)
        for n, g in replayed.items():
            assert_rel_close(f"step {i} grad {n}", g, eager[n], 5e-3)
        for o in opts:
            o.step()
        _evaluate(model, b)
    graph.release()


def test_other_shapes_are_refused():
    model = _model("sparse")
    graph = GraphedLoss(_loss(model, "sparse"), _batches(1, 0)[0], list(model.parameters()))
    with pytest.raises(ValueError, match=r"captured for a torch.int64 batch of shape \(2, 130\)"):
        graph([torch.zeros(2, 129, dtype=torch.int64, device="cuda")])
    graph.release()


def test_trainer_curve_is_the_same_with_and_without_graphs(tmp_path):
    from dsv4.train.config import TrainConfig
    from dsv4.train.data import stdlib_sources
    from dsv4.train.trainer import train
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for doc in stdlib_sources(400_000)[:40]:
        (corpus / doc.name.replace("/", "_")).write_text(doc.text)
    curves = {}
    vals = {}
    for graphs in ("off", "on"):  # 40 steps: dense (4), indexer warm-up (2), sparse: one capture per stage; an
        out = tmp_path / graphs  # evaluation every 5 steps, in every stage
        train(TrainConfig(data=str(corpus), out=str(out), steps=40, batch_size=4, seq_len=128, grad_accum=2,
                          log_interval=1, eval_interval=5, eval_batches=2, save_interval=100, sample_tokens=0,
                          cuda_graph=graphs))
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        curves[graphs] = [r for r in rows if "grad_norm" in r]
        vals[graphs] = torch.tensor([r["val_loss"] for r in rows if "val_loss" in r])
    eager, graphed = curves["off"], curves["on"]
    assert len(vals["on"]) == len(vals["off"]) == 9 and torch.isfinite(vals["on"]).all()
    assert_rel_close("val_loss", vals["on"], vals["off"], 2e-2)
    assert [r["stage"] for r in graphed] == [r["stage"] for r in eager] and {"dense", "indexer", "sparse"} <= {
        r["stage"] for r in eager}
    # atomically added sums round differently run to run, so the curves drift apart slowly; the expert-load ratio
    # moves in steps of one token's choice
    for key, tol in (("loss", 2e-2), ("grad_norm", 5e-2), ("mhc_gain", 2e-2), ("expert_load_max_over_mean", 1e-1)):
        assert_rel_close(key, torch.tensor([r[key] for r in graphed]), torch.tensor([r[key] for r in eager]), tol)

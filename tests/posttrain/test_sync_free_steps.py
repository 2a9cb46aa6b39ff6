"""The post-training step loop (step_loop.run_steps) trains as the earlier step code did: the same parameters after
a few steps of SFT (one shape per batch or static shapes in fixed attention slots) and of pre-training on stream
rows. The oracle below is that earlier code: host reads of every logged value, the head on the trained positions
only, the bias update read back per layer."""
import json
import math
from contextlib import nullcontext

import pytest
import sft_fixtures as fx
import torch
import torch.nn.functional as F

import dsv4
from dsv4.model.documents import PackedDocuments
from dsv4.posttrain import sft as sft_mod
from dsv4.posttrain import step_loop
from dsv4.posttrain.chat_data import Example
from dsv4.posttrain.doc_slots import fit_plan, grow_plan, row_documents, slot_indices
from dsv4.posttrain.packing import IGNORE, Batch, SFTBatches, make_batch
from dsv4.posttrain.pretrain import train_pretrain
from dsv4.posttrain.sft import SFTConfig, SFTDiverged, sft_loss, train_sft, train_steps
from dsv4.posttrain.step_inputs import decode, encode
from dsv4.posttrain.step_loop import StepInput
from dsv4.posttrain.stream import StreamRows
from dsv4.train.losses import LossWeights, expert_loads, routed_layers
from dsv4.train.optim import build_optimizers, lr_at
from dsv4.train.stages import set_stage
from dsv4.train.step import step_outputs


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return fx.tokenizer(tmp_path_factory.mktemp("tok"))


def _model(tok):
    cfg = dsv4.ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size)
    return dsv4.Transformer(cfg).init_weights(seed=3).train()


def _examples(tok, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(2, tok.vocab_size, (n,), generator=g).tolist()
        out.append(Example(ids, [0] * (n // 3) + [1] * (n - n // 3)))
    return out


def _masked_ce(logits_of, h, targets):   # the earlier head: trained positions only
    keep = targets != IGNORE
    n = keep.sum()
    if not bool(n):
        return h.new_zeros((), dtype=torch.float32), n
    logits = logits_of(h[keep].unsqueeze(0))[0]
    return F.cross_entropy(logits, targets[keep], reduction="sum"), n


@torch.no_grad()
def _bias_update(model, loads, speed):   # the earlier per-layer update, read on the host
    for moe, load in zip(routed_layers(model), loads):
        if float(load.sum()) == 0:
            continue
        moe.gate.bias.add_(speed * torch.sign(load.mean() - load))


def _previous_steps(model, batches, cfg, monkeypatch, masked=False) -> list[float]:
    """The earlier SFT loop's steps on `batches`; returns each step's logged lm loss."""
    if masked:
        monkeypatch.setattr(sft_mod, "_ce", _masked_ce)
    set_stage(model, "sparse")
    torch.manual_seed(cfg.seed)
    opts = build_optimizers(model, cfg.lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay)
    lms = []
    for step, batch in zip(range(cfg.steps), batches):
        lr = lr_at(step, cfg.steps, cfg.lr, warmup=min(cfg.warmup, cfg.steps), min_ratio=cfg.min_lr_ratio)
        for o in opts:
            for g in o.param_groups:
                g["lr"] = lr
        loss, parts = sft_loss(model, batch, mtp_weight=cfg.mtp_weight, indexer_kl_weight=cfg.indexer_kl_weight)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                                         cfg.grad_clip))
        assert math.isfinite(float(parts["loss"])) and math.isfinite(grad_norm)
        lms.append(float(parts["lm"]))
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        _bias_update(model, expert_loads(model), cfg.bias_update_speed)
    monkeypatch.undo()
    return lms


def _assert_same_params(a, b):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):   # expert biases included
        assert torch.equal(p, q), name


def _cfg(**kw):
    return SFTConfig(**{**dict(steps=3, lr=3e-3, batch_size=3, seq_len=64, optimizer="adamw", warmup=1,
                               device="cpu", progress=False, log_every=2), **kw})


@pytest.mark.parametrize("static", [False, True])
def test_sft_steps_give_the_parameters_of_the_previous_step_code(tmp_path, tok, monkeypatch, static):
    """Packed SFT, 3 steps: the same parameters (and expert biases) and logged losses as the earlier loop on the
    same batches. Static: rows of seq_len in fixed slots; every batch of these equal-length conversations has
    the same documents per length class, so the slots are the batches' own layout (their ordering included)."""
    exs = _examples(tok, [20] * 18) if static else _examples(tok, [5 + 3 * i for i in range(14)])
    cfg = _cfg(static_shapes=static, slot_headroom=0.0)
    data = SFTBatches(exs, cfg.batch_size, cfg.seq_len, 1, tok.eos_id, fixed=static)
    ref = _model(tok)
    lms = _previous_steps(ref, iter(data), cfg, monkeypatch)
    model = _model(tok)
    train_sft(model, tok, exs, cfg, str(tmp_path))
    _assert_same_params(ref, model)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    torch.testing.assert_close([r["lm"] for r in rows], lms, rtol=1e-5, atol=1e-6)
    assert all(r["expert_load_max_over_mean"] >= 1 for r in rows)


def test_pretrain_stream_steps_give_the_parameters_of_the_previous_step_code(tmp_path, tok, monkeypatch):
    """Pre-training on stream rows (dsv4 train's loss terms, no balance loss) = the earlier SFT loop on the same
    rows as one-document batches with every position trained."""
    exs = _examples(tok, [7 + 5 * i for i in range(12)])
    cfg = _cfg()
    stream = StreamRows(exs, cfg.batch_size, cfg.seq_len, 2, seed=cfg.seed)

    def as_batch(rows):   # [B, S + 2] -> the earlier Batch: every position a target, MTP depth 1
        S = cfg.seq_len
        return Batch(rows[:, :S], rows[:, 1:S + 1], [rows[:, 1:S + 1]], [rows[:, 2:S + 2]], None,
                     [[S]] * len(rows))
    ref = _model(tok)
    lms = _previous_steps(ref, (as_batch(r) for r in stream), cfg, monkeypatch)
    model = _model(tok)
    res = train_pretrain(model, tok, exs, cfg, str(tmp_path))
    _assert_same_params(ref, model)
    assert res["first_loss"] == pytest.approx(lms[0], rel=1e-5) and res["last_loss"] == pytest.approx(lms[-1],
                                                                                                       rel=1e-5)


def test_documents_in_longer_or_spare_slots_keep_their_outputs(tok):
    """The hidden states of packed documents laid out in a roomier plan (longer slots, empty ones) are those of
    their own layout: causal attention never reads a slot's padding."""
    model = _model(tok).eval()
    rows, S = [[9, 20, 4], [33], [], [6, 6, 6, 6]], 40
    tokens = torch.randint(2, tok.vocab_size, (len(rows), S), generator=torch.Generator().manual_seed(1))
    own = PackedDocuments([row_documents(r, S) for r in rows], S)
    roomy = tuple((length, n + 2) for length, n in fit_plan([rows], S)) + ((48, 2),)
    tight = ((40, 1), (48, 20))   # everything in 48-long slots but one (the empty row's 40-long padding)
    with torch.no_grad():
        want = model.hidden(tokens, docs=own)
        for plan in (roomy, tight):
            gathers, source = slot_indices(rows, S, plan)
            got = model.hidden(tokens, docs=PackedDocuments.from_indices(gathers, source, len(rows), S))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert slot_indices(rows, S, ((48, 4),)) is None   # 9 documents do not fit 4 slots


def test_encoded_batch_decodes_to_its_tensors_and_layout(tok):
    exs = _examples(tok, [12, 30, 7, 25, 9])
    batch = make_batch([exs[:2], exs[2:], []], n_mtp=1, pad_id=1, length=64)
    layout, flat = encode(batch, fit_plan([batch.lengths], 64))
    assert flat.shape == (layout.size,) and flat.dtype == torch.long
    back = decode(flat, layout)
    for a, b in zip([batch.tokens, batch.targets, *batch.mtp_inputs, *batch.mtp_targets],
                    [back.tokens, back.targets, *back.mtp_inputs, *back.mtp_targets]):
        assert torch.equal(a, b)
    assert torch.equal(back.docs._source, batch.docs._source)
    assert all(torch.equal(a, b) for a, b in zip(back.docs._gathers, batch.docs._gathers))
    assert encode(batch, ((64, 3),)) is None   # 8 documents (the rows' padding included) overflow 3 slots


def test_stream_rows_have_one_shape_and_cover_each_epoch_once(tok):
    exs = _examples(tok, [5, 17, 9, 30, 11, 8])
    stream = StreamRows(exs, batch_size=2, seq_len=10, extra=2, seed=4)
    it = iter(stream)
    batches = [next(it) for _ in range(6)]
    assert all(b.shape == (2, 12) for b in batches)
    joined = torch.cat([r[:10] for b in batches for r in b])
    epochs = torch.cat([stream.epoch(0), stream.epoch(1)])
    assert torch.equal(joined, epochs[:len(joined)])                       # in order, every token once
    assert torch.equal(batches[0][0, 10:], epochs[10:12]) and sorted(stream.epoch(0).tolist()) == \
        sorted(t for e in exs for t in e.tokens)


def test_a_non_finite_loss_stops_training_at_its_step_when_the_values_are_read(tmp_path, tok):
    """Values are read every log_every steps; the first non-finite one still names its own step."""
    model = _model(tok)
    calls = []

    def loss_fn(x, _):
        calls.append(1)
        h = model.hidden(x)
        loss = model.logits(h).float().mean() * (float("nan") if len(calls) == 3 else 1.0)
        return {"loss": loss, "part:lm": loss.detach(), "part:loss": loss.detach(), "loads": expert_loads(model)}
    feed = (StepInput(torch.randint(2, 50, (2, 16)), None, 32, 32) for _ in range(8))
    with pytest.raises(SFTDiverged, match="step 2: loss=nan"):
        train_steps(model, tok, feed, loss_fn, 8, _cfg(log_every=5), str(tmp_path), stage="sft", graphs=False)
    assert len(calls) == 5   # it ran on to the read at step 5


def test_head_on_every_position_gives_the_loss_and_gradients_of_the_trained_ones(tok, monkeypatch):
    """sft_loss runs the head on every position (IGNORE targets add nothing) where the earlier code selected the
    trained positions first: the same loss and gradients up to float32 rounding."""
    model = _model(tok)
    exs = _examples(tok, [15, 22, 9, 30])
    batch = make_batch([exs[:2], exs[2:]], n_mtp=1, pad_id=1, length=64)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss, parts = sft_loss(model, batch)
        loss.backward()
        return parts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    parts, grads = loss_and_grads()
    monkeypatch.setattr(sft_mod, "_ce", _masked_ce)
    want_parts, want = loss_and_grads()
    assert grads.keys() == want.keys()
    for k in ("lm", "mtp", "loss"):
        torch.testing.assert_close(parts[k], want_parts[k], rtol=1e-6, atol=0)
    diff = sum(float((grads[n] - want[n]).double().pow(2).sum()) for n in want)
    assert (diff / sum(float(g.double().pow(2).sum()) for g in want.values())) ** 0.5 < 1e-5


def test_plans_are_the_smallest_that_fit_and_grow_to_fit_more():
    """fit_plan: a document fits any slot at least as long as its class; the plan holds, for every length, as many
    slots of that length or longer as some batch has documents of that class or longer, and no more."""
    S = 64
    a, b = [[10, 20], [60]], [[30, 30], [5, 5, 5]]
    plan = fit_plan([a, b], S)
    for rows in (a, b):
        assert slot_indices(rows, S, plan) is not None
    for j in range(len(plan)):   # one slot fewer, of any length: some batch no longer fits
        smaller = tuple((length, n - (k == j)) for k, (length, n) in enumerate(plan) if n - (k == j) > 0)
        assert any(slot_indices(rows, S, smaller) is None for rows in (a, b)), smaller
    more = [[40, 20], [40, 20]]
    assert slot_indices(more, S, plan) is None
    grown = grow_plan(plan, more, S)
    assert all(slot_indices(r, S, grown) is not None for r in (a, b, more))
    roomy = fit_plan([a, b], S, headroom=0.5)
    assert sum(n for _, n in roomy) >= 1.5 * sum(n for _, n in plan)


class _EagerGraph:
    """GraphedLoss's contract on the CPU: the capture leaves each parameter's .grad bound to a tensor of the graph's
    own, and every call overwrites those tensors (whatever .grad holds then) and returns detached outputs; release
    drops the gradients."""
    captures = 0

    def __init__(self, loss_fn, batch, params):
        self.loss_fn, self.params, self.shape = loss_fn, [p for p in params if p.requires_grad], batch.shape
        self.release()
        loss_fn(batch)["loss"].backward()
        self.grads = [p.grad for p in self.params]
        type(self).captures += 1

    def __call__(self, batches):
        (b,) = batches
        assert b.shape == self.shape
        held = [p.grad for p in self.params]
        self.release()
        out = self.loss_fn(b)
        out["loss"].backward()
        for p, mine, was in zip(self.params, self.grads, held):
            if mine is not None:
                mine.copy_(p.grad)
            p.grad = was
        return [{k: [t.detach() for t in v] if isinstance(v, list) else v.detach() for k, v in out.items()}]

    def release(self):
        for p in self.params:
            p.grad = None


def test_graph_bookkeeping_eager_beside_the_graph_and_a_recapture(tmp_path, tok, monkeypatch):
    """With a stand-in for the CUDA graph: inputs of the graph's shape replay it, another shape runs eager in
    gradient tensors of its own (the graph's come back after), a `regraph` input captures anew; the parameters
    are bitwise those of an all-eager run of the same inputs."""
    monkeypatch.setattr(step_loop, "GraphedLoss", _EagerGraph)
    g = torch.Generator().manual_seed(2)
    shapes = [(2, 34), (2, 34), (2, 50), (2, 34), (2, 50), (2, 50)]
    regraph = [False, False, False, False, True, False]
    inputs = [torch.randint(2, tok.vocab_size, s, generator=g) for s in shapes]
    weights = LossWeights(mtp=0.3, indexer_kl=1.0, balance=0.0)

    def run(graphs):
        model = _model(tok)
        loss_fn = lambda x, _: step_outputs(model, x, weights, "sparse", 1, nullcontext)  # noqa: E731
        feed = (StepInput(x, None, x.numel(), x.numel(), regraph=r) for x, r in zip(inputs, regraph))
        train_steps(model, tok, feed, loss_fn, len(inputs), _cfg(steps=len(inputs)), str(tmp_path / str(graphs)),
                    stage="pretrain", graphs=graphs)
        return model
    _EagerGraph.captures = 0
    graphed = run(True)
    assert _EagerGraph.captures == 2
    _assert_same_params(run(False), graphed)

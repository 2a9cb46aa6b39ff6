"""Routing replay: the recorder sees what the cached decode chose, the replayed training forward uses exactly
those experts and indexer entries, and the train-vs-rollout drift shrinks with it."""
import pytest
import torch

from dsv4.generate.sampling import SamplingConfig
from dsv4.model.attention import replayed_mask
from dsv4.posttrain.logprobs import token_logprobs
from dsv4.posttrain.routing_replay import (RoutingRecord, csa_indexers, replaying, routed_gates,
                                           sample_recorded)
from dsv4.posttrain.rollout import rollout
from dsv4.serve.types import SamplingParams
from grpo_toys import LetterEnv, toy_model, toy_tokenizer

# long enough that the CSA layers (ratio 4, index_topk 8) choose among more than 8 visible entries
PROMPT = list(range(5, 45))


def _sample(model, n=2, max_tokens=8):
    params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i, logprobs=0) for i in range(n)]
    contexts = [PROMPT[: len(PROMPT) - 3 * i] for i in range(n)]      # ragged rows
    return contexts, sample_recorded(model, contexts, params, eos=[])


def _train_logprobs(model, contexts, results, replay: bool):
    tokens = [c + s.tokens for c, s in zip(contexts, results)]
    T = max(map(len, tokens))
    batch = torch.tensor([t + [0] * (T - len(t)) for t in tokens])
    with torch.no_grad():
        if replay:
            with replaying(model, [s.routing for s in results], T - 1):
                lp, _ = token_logprobs(model, batch)
        else:
            lp, _ = token_logprobs(model, batch)
    return [lp[b, len(c):len(c) + len(s.tokens)] for b, (c, s) in enumerate(zip(contexts, results))]


def _drift(model, contexts, results, replay):
    got = _train_logprobs(model, contexts, results, replay)
    return float(torch.cat([(g - torch.tensor(s.logprobs)).abs() for g, s in zip(got, results)]).mean())


def test_replayed_forward_uses_exactly_the_recorded_experts():
    model = toy_model()
    contexts, results = _sample(model)
    rec = results[0].routing
    assert rec.length == len(contexts[0]) + len(results[0].tokens) - 1 and bool(rec.known.all())
    gates = routed_gates(model)
    assert gates and all(not g.hashed for g in gates.values()) and 0 not in gates   # layer 0 is hash-routed
    assert csa_indexers(model)
    torch.manual_seed(1)
    for g in gates.values():   # another routing would be chosen without replay
        g.bias.data = torch.randn_like(g.bias) * 10
    tokens = torch.tensor([contexts[0] + results[0].tokens])
    L = tokens.shape[1] - 1
    with torch.no_grad():
        with replaying(model, [rec], L):
            model.hidden(tokens[:, :L])
            used = {i: model.layers[i].ffn.last_routing[0].clone() for i in gates}
        model.hidden(tokens[:, :L])
        free = {i: model.layers[i].ffn.last_routing[0].clone() for i in gates}
    for i in gates:
        assert torch.equal(used[i], rec.experts[i][:L].long()), i
        assert not torch.equal(free[i], rec.experts[i][:L].long()), i
    for i, t in rec.topk.items():   # the indexer chose among more entries than it keeps
        assert (t[-1] >= 0).sum() == model.config.index_topk


def test_replayed_mask_selects_the_given_entries_where_known():
    chosen = torch.tensor([[[True, True, False, False], [False, True, True, False]]])
    ids = torch.tensor([[[2, 3], [0, -1]]])
    known = torch.tensor([[True, False]])
    assert replayed_mask(chosen, ids, known).tolist() == [[[False, False, True, True], [False, True, True, False]]]
    with pytest.raises(ValueError, match="indexer replay"):
        replayed_mask(chosen, ids[:, :1], known[:, :1])


def test_selection_only_changes_do_not_move_replayed_logprobs():
    """The gate bias and the indexer steer only which experts / entries are used: changed after the rollout, they
    change the training forward's log-probabilities unless the routing is replayed, which then match the rollout's
    to float rounding."""
    model = toy_model()
    contexts, results = _sample(model)
    assert _drift(model, contexts, results, replay=True) < 1e-4
    torch.manual_seed(2)
    for g in routed_gates(model).values():
        g.bias.data = torch.randn_like(g.bias) * 10
    for ix in csa_indexers(model).values():
        ix.wq_b.weight.data = torch.randn_like(ix.wq_b.weight)
    without, with_ = _drift(model, contexts, results, False), _drift(model, contexts, results, True)
    assert without > 1e-2 and with_ < 1e-4, (without, with_)


def test_replay_reduces_drift_after_a_weight_perturbation():
    """A policy-update-sized change of every weight between rollout and training: the drift with replay is smaller
    than without (it keeps only the smooth part of the change, no routing flips)."""
    model = toy_model()
    contexts, results = _sample(model, n=4, max_tokens=12)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05 * p.abs().mean().clamp(min=1e-3))
    without, with_ = _drift(model, contexts, results, False), _drift(model, contexts, results, True)
    print(f"drift after perturbation: {without:.4f} without replay, {with_:.4f} with")
    assert with_ < without


def test_rollout_with_recorded_routing_merges_turn_records():
    tok, model, env = toy_tokenizer(), toy_model(), LetterEnv()
    trajs = rollout(model, tok, env.heldout(1), {"toy": env}, group_size=2, sampling=SamplingConfig(temperature=1.0),
                    max_new_tokens=4, record_routing=True)
    for t in trajs:
        assert isinstance(t.routing, RoutingRecord) and t.routing.length == len(t.tokens) - 1
    a = RoutingRecord({1: torch.tensor([[1, 2], [3, 4]])}, {}, torch.tensor([True, True]))
    b = RoutingRecord({1: torch.tensor([[7, 7], [7, 7], [5, 6]])}, {}, torch.tensor([True, True, True]))
    m = a.merged(b)
    assert m.experts[1].tolist() == [[1, 2], [3, 4], [5, 6]] and m.known.tolist() == [True] * 3


def test_replay_reduces_bf16_drift():
    """bf16 sampler (cached decode) against the bf16 training forward: rounding flips some routing choices; replay
    keeps them, so the drift, and above all its worst token, shrink."""
    model = toy_model().to_dtype(torch.bfloat16)
    params = [SamplingParams(max_tokens=16, temperature=1.0, seed=i, logprobs=0) for i in range(6)]
    contexts = [PROMPT[: len(PROMPT) - i] for i in range(6)]
    results = sample_recorded(model, contexts, params, eos=[])
    diffs = {}
    for replay in (False, True):
        got = _train_logprobs(model, contexts, results, replay)
        diffs[replay] = torch.cat([(g - torch.tensor(s.logprobs)).abs() for g, s in zip(got, results)])
    print(f"bf16 drift: mean {diffs[False].mean():.5f} / max {diffs[False].max():.4f} without replay, "
          f"mean {diffs[True].mean():.5f} / max {diffs[True].max():.4f} with")
    assert diffs[True].mean() < diffs[False].mean() and diffs[True].max() < 0.5 * diffs[False].max()


def test_engine_records_land_in_their_requests():
    """Five requests through two engine rows (rows reused, requests joining mid-decode), prompts prefilled in
    16-token chunks: each request's record matches the routing a whole-sequence fp32 forward of its own tokens
    chooses (up to rare near-ties); a mix-up of rows and requests would match about a quarter."""
    model = toy_model()
    params = [SamplingParams(max_tokens=6 + 2 * i, temperature=1.0, seed=i, logprobs=0) for i in range(5)]
    contexts = [PROMPT[: len(PROMPT) - 4 * i] for i in range(5)]
    results = sample_recorded(model, contexts, params, eos=[], max_batch=2, prefill_chunk=16)
    gates = routed_gates(model)
    for ctx, s in zip(contexts, results):
        tokens = torch.tensor([ctx + s.tokens])
        L = tokens.shape[1] - 1
        assert s.routing.length == L and bool(s.routing.known.all())
        with torch.no_grad():
            model.hidden(tokens[:, :L])
        for i in gates:
            free = model.layers[i].ffn.last_routing[0].sort(-1).values
            rec = s.routing.experts[i].long().sort(-1).values
            agree = (free == rec).all(-1).float().mean()
            assert agree > 0.97, (i, float(agree))

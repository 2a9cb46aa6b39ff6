"""Length buckets (buckets.py): padding a batch to a bucket changes no loss term the padding is masked out of,
and the warm-up step is outside the stages' time caps."""
import time

import pytest
import torch

from dsv4.posttrain import distill as distill_mod
from dsv4.posttrain.buckets import GPU_BUCKET, bucketed, resolve_bucket
from dsv4.posttrain.chat_data import Example
from dsv4.posttrain.envs.base import Problem, Reward
from dsv4.posttrain.grpo import GRPOConfig, grpo_train
from dsv4.posttrain.grpo_loss import GRPOLossConfig, grpo_loss
from dsv4.posttrain.logprobs import pad_batch, token_logprobs
from dsv4.posttrain.packing import make_batch
from dsv4.posttrain.sft import SFTConfig, sft_loss, train_sft
from dsv4.posttrain.trajectory import Trajectory
from grpo_toys import LetterEnv, toy_model, toy_tokenizer


def test_bucketed_rounds_up_and_auto_pads_only_on_a_gpu():
    assert [bucketed(n, 64) for n in (1, 63, 64, 65, 130)] == [64, 64, 64, 128, 192]
    assert bucketed(37, 1) == bucketed(37, 0) == 37
    assert resolve_bucket(0, "cpu") == 1 and resolve_bucket(0, torch.device("cuda")) == GPU_BUCKET
    assert resolve_bucket(16, "cpu") == 16
    with pytest.raises(ValueError):
        resolve_bucket(-1, "cpu")


def _examples(rng: torch.Generator, lengths, vocab):
    out = []
    for n in lengths:
        toks = torch.randint(3, vocab, (n,), generator=rng).tolist()
        mask = [0] * (n // 3) + [1] * (n - n // 3)        # a prompt, then trained tokens
        out.append(Example(toks, mask, "test"))
    return out


@pytest.mark.parametrize("packed", [False, True])
def test_sft_losses_are_the_same_padded_to_a_bucket(packed):
    torch.manual_seed(0)
    model = toy_model(n_layers=2, compress_ratios=(0, 4, 0)).double()
    exs = _examples(torch.Generator().manual_seed(1), (13, 7, 22), model.config.vocab_size)
    rows = [exs[:2], exs[2:]] if packed else [[e] for e in exs]
    plain, padded = make_batch(rows, len(model.mtp), 0), make_batch(rows, len(model.mtp), 0, bucket=16)
    assert plain.tokens.shape[1] == 22 and padded.tokens.shape[1] == 32
    assert padded.n_targets == plain.n_targets
    _, a = sft_loss(model, plain)
    _, b = sft_loss(model, padded)
    # the trained targets' terms are equal; the indexer's KL is a mean over all positions, padding included
    for k in ("lm", "mtp"):
        assert float(b[k]) == pytest.approx(float(a[k]), rel=1e-6), k   # up to the fp32 ops' rounding


def _traj(tokens, n_prompt, reward):
    n = len(tokens)
    return Trajectory(Problem("toy", "p", [], None), tokens, n_prompt, [0] * n_prompt + [1] * (n - n_prompt),
                      [0.0] * n_prompt + [-1.0 - 0.01 * i for i in range(n - n_prompt)],
                      reward=Reward(reward, reward > 0.5))


def test_grpo_logprobs_and_loss_are_the_same_padded_to_a_bucket():
    torch.manual_seed(0)
    model = toy_model(n_layers=2, compress_ratios=(0, 4, 0)).double()
    g = torch.Generator().manual_seed(2)
    trajs = [_traj(torch.randint(3, 200, (n,), generator=g).tolist(), 4, r) for n, r in ((11, 1.0), (17, 0.0))]
    plain, padded = pad_batch(trajs), pad_batch(trajs, bucket=8)
    assert plain.tokens.shape[1] == 17 and padded.tokens.shape[1] == 17      # T - 1 = 16 is already a multiple
    padded = pad_batch(trajs, bucket=12)
    assert padded.tokens.shape[1] == 25                                      # the forward reads 24 = 2 x 12
    lp_a, ent_a = token_logprobs(model, plain.tokens)
    lp_b, ent_b = token_logprobs(model, padded.tokens)
    T = plain.tokens.shape[1]
    # equal up to the fp32 rounding of the ops that compute in fp32 (summed in another order at another length);
    # a position that saw the padding would differ by orders of magnitude more
    torch.testing.assert_close(lp_b[:, :T], lp_a, rtol=1e-5, atol=1e-5)
    assert not padded.mask[:, T:].any()
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    cfg = GRPOLossConfig.for_loss_type("grpo", epsilon=0.2, epsilon_high=None, beta=0.0, max_len=16)
    la, _ = grpo_loss(lp_a, lp_a.detach() - 0.1, adv, plain.mask, cfg)
    lb, _ = grpo_loss(lp_b, lp_b.detach() - 0.1, adv, padded.mask, cfg)
    assert float(lb.detach()) == pytest.approx(float(la.detach()), rel=1e-6)


def test_distill_ce_is_the_same_padded_to_a_bucket():
    torch.manual_seed(0)
    model = toy_model(n_layers=2, compress_ratios=(0, 4, 0)).double()
    g = torch.Generator().manual_seed(3)
    trajs = [_traj(torch.randint(3, 200, (n,), generator=g).tolist(), 3, 1.0) for n in (9, 14)]
    n_mtp = len(model.mtp)
    plain = distill_mod.make_batch(trajs, n_mtp, 0, torch.device("cpu"))
    padded = distill_mod.make_batch(trajs, n_mtp, 0, torch.device("cpu"), bucket=8)
    assert (plain.T, padded.T) == (13, 16)
    la, pa = distill_mod.ce_loss(model, plain, mtp_weight=0.3)
    lb, pb = distill_mod.ce_loss(model, padded, mtp_weight=0.3)
    assert float(lb.detach()) == pytest.approx(float(la.detach()), rel=1e-6)


def test_the_sft_cap_counts_from_the_end_of_the_warm_up_step(tmp_path, monkeypatch):
    """A first step slower than the whole cap (compilation, on a GPU) still leaves the cap's time to train."""
    import dsv4.posttrain.sft as sft_mod
    calls = []

    def slow_first(*a, **k):
        if not calls:
            time.sleep(1.0)
        calls.append(1)
        return sft_loss(*a, **k)

    monkeypatch.setattr(sft_mod, "sft_loss", slow_first)
    model = toy_model(n_layers=2, compress_ratios=(0, 4, 0))
    tok = toy_tokenizer()
    exs = _examples(torch.Generator().manual_seed(4), [12] * 16, model.config.vocab_size)
    cfg = SFTConfig(steps=1000, batch_size=2, seq_len=32, optimizer="adamw", progress=False, max_seconds=0.4)
    res = train_sft(model, tok, exs, cfg, str(tmp_path))
    rows = [r for r in _rows(tmp_path / "metrics.jsonl")]
    assert rows[0]["warmup_s"] >= 1.0 and all("warmup_s" not in r for r in rows[1:])
    assert len(rows) >= 3 and res["steps"] >= 3          # without the warm-up excluded: 1 step


def test_the_grpo_cap_counts_from_the_end_of_the_warm_up_step(monkeypatch):
    import dsv4.posttrain.grpo as grpo_mod
    real, calls = grpo_mod.rollout, []

    def slow_first(*a, **k):   # the first training rollout (the evaluations roll out one answer each)
        if k["group_size"] > 1 and not calls:
            time.sleep(1.0)
            calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(grpo_mod, "rollout", slow_first)
    cfg = GRPOConfig(steps=50, num_generations=2, batch_prompts=2, max_new_tokens=3, eval_problems=1,
                     sampler="direct", optimizer="adamw", max_seconds=0.3)
    res = grpo_train(toy_model(n_layers=2, compress_ratios=(0, 4, 0)), toy_tokenizer(), {"toy": LetterEnv()}, cfg,
                     progress=False)
    assert res.rows[0]["warmup_s"] >= 1.0 and "warmup_s" not in res.rows[1]
    assert len(res.rows) >= 2                             # without the warm-up excluded: 1 step


def _rows(path):
    import json
    return [json.loads(line) for line in path.read_text().splitlines() if '"lm"' in line]

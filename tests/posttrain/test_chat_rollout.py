"""The distillation sampler: ragged prompts batched (prefilled by length) give each prompt what it gets alone,
in the caller's order, with the log-probabilities of the sampled tokens."""
from __future__ import annotations

import math

import torch

import dsv4
from dsv4.posttrain.chat_rollout import sample_completions


def _model() -> dsv4.Transformer:
    return dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=0, std=0.1)


def test_batched_greedy_equals_each_prompt_alone_in_order():
    model = _model()
    prompts = [[5, 6, 7, 8, 9], [1, 2, 3], [10, 11, 12], [4], [13, 14, 15, 16, 17]]
    together = sample_completions(model, prompts, 5, temperature=0.0, seed=0, stop_ids=[])
    for p, (tokens, logprobs) in zip(prompts, together):
        alone = sample_completions(model, [p], 5, temperature=0.0, seed=0, stop_ids=[])[0]
        assert tokens == alone[0]
        assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(logprobs, alone[1]))


def test_logprobs_are_those_of_the_sampled_tokens_and_stops_end_a_row():
    model = _model()
    prompt = [1, 2, 3, 4]
    (tokens, logprobs), = sample_completions(model, [prompt], 4, temperature=0.0, seed=0, stop_ids=[])
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens[:-1]]))[0, len(prompt) - 1:]
    want = logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(logprobs), want, rtol=1e-4, atol=1e-4)
    (stopped, _), = sample_completions(model, [prompt], 4, temperature=0.0, seed=0, stop_ids=[tokens[1]])
    assert stopped == tokens[:tokens.index(tokens[1]) + 1]

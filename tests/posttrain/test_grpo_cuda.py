"""GPU checks of the GRPO pieces (skipped without CUDA): the engine's rollout log-probabilities with CUDA-graph
decode, routing replay against bf16 drift, and GRPO steps on the device."""
import pytest
import torch

from dsv4.generate.sampling import SamplingConfig, probabilities
from dsv4.posttrain.grpo import GRPOConfig, grpo_train
from dsv4.posttrain.rollout import rollout
from grpo_toys import LetterEnv, toy_model, toy_tokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cuda_rollout_logprobs_are_the_sampled_distribution():
    torch.backends.cuda.matmul.allow_tf32 = False
    tok, model, env = toy_tokenizer(), toy_model().cuda().eval(), LetterEnv()
    cfg = SamplingConfig(temperature=0.8, top_p=0.9)
    trajs = rollout(model, tok, env.heldout(2), {"toy": env}, group_size=4, sampling=cfg, max_new_tokens=12)
    for t in trajs:
        with torch.no_grad():
            logits = model(torch.tensor([t.tokens], device="cuda"))[0, :-1]
        idx = torch.arange(t.prompt_len - 1, len(t.tokens) - 1, device="cuda")
        want = probabilities(logits, cfg)[idx, torch.tensor(t.tokens[t.prompt_len:], device="cuda")].log()
        assert torch.allclose(torch.tensor(t.logprobs[t.prompt_len:]), want.cpu(), atol=2e-3)


def test_cuda_bf16_grpo_steps_with_and_without_replay():
    tok = toy_tokenizer()
    drifts = {}
    for replay in (False, True):
        model = toy_model().cuda().to_dtype(torch.bfloat16)
        cfg = GRPOConfig(steps=3, num_generations=8, batch_prompts=2, lr=1e-3, max_new_tokens=24, eval_problems=4,
                         routing_replay=replay, seed=0)
        res = grpo_train(model, tok, {"toy": LetterEnv()}, cfg, progress=False)
        drifts[replay] = res.rows[0]["drift"]
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in res.rows)
        if replay:
            assert res.rows[0]["drift"] <= res.rows[0]["drift_unreplayed"] + 1e-3
    print(f"cuda bf16 first-step drift: {drifts[False]:.5f} without replay, {drifts[True]:.5f} with")


def test_cuda_grpo_gradient_equals_the_cpu_one():
    """The GRPO loss's gradient on the GPU (fp32, the batch padded to GRPO's GPU bucket of 64) against the CPU's
    unpadded one for the same weights and trajectories: the device's forward and backward move the weights the way
    the reference does (a wrong backward would show as a falling held-out accuracy, not as drift)."""
    from grpo_toys import grpo_gradients
    torch.backends.cuda.matmul.allow_tf32 = False
    tok, env = toy_tokenizer(), LetterEnv()
    model = toy_model()
    trajs = rollout(model, tok, env.heldout(4), {"toy": env}, group_size=4, sampling=SamplingConfig(temperature=1.0),
                    max_new_tokens=12, seed=5, sampler="direct")
    assert len({t.reward.score for t in trajs}) > 1
    cpu = grpo_gradients(model, trajs, 4)
    gpu = grpo_gradients(model.cuda(), trajs, 4, bucket=64)
    assert cpu.keys() == gpu.keys()
    flat_c, flat_g = torch.cat([g.flatten() for g in cpu.values()]), torch.cat([gpu[n].flatten() for n in cpu])
    cos = torch.nn.functional.cosine_similarity(flat_c, flat_g, 0).item()
    assert cos > 0.999, cos
    for name, g in cpu.items():
        assert torch.allclose(gpu[name], g, rtol=1e-2, atol=1e-5 * max(g.abs().max().item(), 1e-6)), name

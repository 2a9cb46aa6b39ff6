"""How much of a GRPO step's gradient is signal: from an SFT checkpoint on math:easy, the gradients of 4
independent rollout batches (32 x 8) at ratio 1, their pairwise cosines, and the same with coin-flip rewards (pure
noise); also the share of groups with mixed rewards. Cosines near the coin-flip ones mean a step is mostly noise.

  python bench/grpo_gradient_signal.py RUN/sft/final [cpu|cuda]
"""
import random, sys, torch
sys.path.insert(0, __import__("os").path.dirname(__file__))
from grpo_variants import CoinFlipReward
from dsv4.posttrain.policy import load_policy
from dsv4.posttrain.envs.math import MathEnv
from dsv4.posttrain.grpo import GRPOConfig
from dsv4.posttrain.grpo_loss import group_advantages, grpo_loss
from dsv4.posttrain.logprobs import pad_batch, token_logprobs
from dsv4.posttrain.rollout import rollout
torch.set_num_threads(1)
model, tok = load_policy(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "cpu")
env = MathEnv("easy"); cfg = GRPOConfig(max_new_tokens=12)
def grad(trajs):
    model.train(); model.zero_grad()
    adv = group_advantages(torch.tensor([t.reward.score for t in trajs]), 8)
    b = pad_batch(trajs)
    logp, _ = token_logprobs(model, b.tokens)
    loss, _ = grpo_loss(logp, logp.detach(), adv, b.mask, cfg.loss_config())
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()
out = {"true": [], "coin": []}
rng = random.Random(5); coin = CoinFlipReward(env)
for k in range(4):
    probs = [env.sample(rng) for _ in range(32)]
    model.eval()
    trajs = rollout(model, tok, probs, {"math": env}, group_size=8, sampling=cfg.sampling(), max_new_tokens=12,
                    sampler="direct", seed=k)
    r = torch.tensor([t.reward.score for t in trajs]).view(32, 8)
    mixed = ((r.min(1).values != r.max(1).values).float().mean().item())
    print(f"batch {k}: reward {r.mean():.3f}, groups with mixed rewards {mixed:.2f}", flush=True)
    out["true"].append(grad(trajs))
    for t in trajs:
        t.reward = coin.reward(t.problem, t.turns)
    out["coin"].append(grad(trajs))
for name, gs in out.items():
    cs = [torch.nn.functional.cosine_similarity(gs[i], gs[j], 0).item() for i in range(4) for j in range(i + 1, 4)]
    print(name, "pairwise grad cosine", [round(c, 3) for c in cs], "mean %.3f" % (sum(cs) / len(cs)))

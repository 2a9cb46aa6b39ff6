"""How far one AdamW-sized noise update moves a model's outputs, per preset: every trainable weight moved by lr
times a random sign (what an early AdamW step on a noise gradient does), the mean KL(before || after) of the
next-token distributions on random tokens. The GRPO learning rate that is harmless on one width is not on
another: this compares them (random-init weights: an indication for trained ones, not a measurement of them).

  python bench/grpo_step_size.py [preset ...]      # default: tiny mini
"""
import sys

import torch

from dsv4.model import Transformer
from dsv4.posttrain.pipeline import model_config


def main(presets: list[str]) -> None:
    tokens = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    for name in presets:
        cfg = model_config(name, 512)
        torch.manual_seed(0)
        model = Transformer(cfg).init_weights(0).train()
        with torch.no_grad():
            before = torch.log_softmax(model(tokens).float(), -1)
            for lr in (1e-5, 3e-5, 1e-4, 3e-4, 1e-3):
                saved = [p.detach().clone() for p in model.parameters()]
                g = torch.Generator().manual_seed(1)
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(lr * torch.randn(p.shape, generator=g).sign())
                after = torch.log_softmax(model(tokens).float(), -1)
                kl = (before.exp() * (before - after)).sum(-1).mean().item()
                print(f"{name} dim {cfg.dim} lr {lr:.0e}: KL {kl:.2e}, mean |dlogp| "
                      f"{(after - before).abs().mean().item():.2e}", flush=True)
                for p, s in zip(model.parameters(), saved):
                    p.copy_(s)


if __name__ == "__main__":
    main(sys.argv[1:] or ["tiny", "mini"])

"""A distillation run from checkpoint directories to an output directory: load the student (trainable, fp32
master weights) and the teachers (inference only: bf16 on a GPU, fp32 on the CPU, on the student's device),
build the environments, train, and write metrics.jsonl, distill.png, summary.json and final/ (the student in
the official checkpoint layout with its tokenizer)."""
from __future__ import annotations

import json
import os
from contextlib import nullcontext
from typing import Mapping, Sequence

import torch

from ..checkpoint import load_model, resolve_device
from ..errors import InvalidArgument
from ..generate.tokenizer import Tokenizer
from ..model import Transformer
from .curves import plot_metrics
from .distill import DistillConfig, distill
from .envs.base import Environment
from .policy import load_policy, save_policy

__all__ = ["load_teacher", "make_envs", "run_distill"]


def load_teacher(path: str, device: torch.device) -> Transformer:
    """The checkpoint frozen for scoring: no gradients, eval mode; bf16 on a GPU, fp32 on the CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return load_model(path, device=device, dtype=dtype).requires_grad_(False).eval()


def _same_tokenizer(student: Tokenizer, teacher_dir: str, domain: str) -> None:
    """A teacher checkpoint that carries a tokenizer must map ids to the same tokens as the student's."""
    if os.path.isfile(os.path.join(teacher_dir, "tokenizer.json")):
        if Tokenizer.from_dir(teacher_dir).tok.get_vocab() != student.tok.get_vocab():
            raise InvalidArgument(f"teacher {domain!r} ({teacher_dir}) has another vocabulary than the student's "
                                  "tokenizer; distillation compares distributions over one vocabulary")



def make_envs(names: Sequence[str], **kw) -> dict[str, Environment]:
    """The built-in environments by name (posttrain.envs.registry)."""
    try:
        from .envs.registry import make_env
    except ImportError as e:
        raise InvalidArgument(f"the environment registry (dsv4.posttrain.envs.registry) is not available: {e}") from e
    return {n: make_env(n, **kw) for n in names}


def run_distill(student_dir: str, teacher_dirs: Mapping[str, str], env_names: Sequence[str], out: str,
                cfg: DistillConfig, *, device: str = "auto", progress: bool = True,
                envs: Mapping[str, Environment] | None = None) -> dict:
    """Distil the teachers into the student over the named domains (or the given `envs`); returns the summary
    (also OUT/summary.json): the config, the last held-out evaluation (`final`), paths."""
    dev = resolve_device(device)
    envs = dict(envs) if envs is not None else make_envs(env_names)
    student, tokenizer = load_policy(student_dir, dev)
    for d, path in teacher_dirs.items():
        _same_tokenizer(tokenizer, path, d)
    teachers = {d: load_teacher(path, dev) for d, path in teacher_dirs.items()}
    os.makedirs(out, exist_ok=True)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else nullcontext
    rows = distill(student, teachers, tokenizer, envs, cfg, metrics_path=os.path.join(out, "metrics.jsonl"),
                   progress=progress, autocast=autocast)
    final_dir = os.path.join(out, "final")
    save_policy(student, tokenizer, final_dir, tokenizer_dir=student_dir)
    plot = os.path.join(out, "distill.png")
    key = "ce" if cfg.off_policy else "kl"
    plot_metrics({"": rows}, [(f"training {key} per domain", f"{key}/"), ("held-out reverse KL", "heldout_kl/"),
                              ("held-out accuracy (greedy)", "heldout_acc/")], plot)
    evals = [r for r in rows if any(k.startswith("heldout_") for k in r)]
    summary = {"mode": "offpolicy" if cfg.off_policy else "opd", "config": vars(cfg).copy(),
               "student": student_dir, "teachers": dict(teacher_dirs),
               "first": evals[0] if evals else {}, "final": evals[-1] if evals else {},
               "student_tokens": rows[-1].get("student_tokens", 0) if rows else 0,
               "final_dir": final_dir, "plot": plot}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary

"""The OPD / off-policy update reads the device once per step: a step's logged values and weights are what the
earlier formulation gives (boolean-mask selections on the device, every value read as soon as it is computed), a
non-finite gradient still stops the run before anything is logged, and the step loop reads only the one transfer.
"""
import copy
import json
import os
import random
import sys

import pytest
import torch
import torch.nn.functional as F

from dsv4.posttrain import distill as distill_mod
from dsv4.posttrain.distill import DistillConfig, DistillDiverged, distill, make_batch
from dsv4.posttrain.reverse_kl import select_positions, token_reverse_kl
from dsv4.train.optim import build_optimizers

sys.path.insert(0, os.path.dirname(__file__))
from read_counter import count_reads  # noqa: E402
from test_distill import ENVS, frozen, tiny, tokenizer  # noqa: E402,F401  (tokenizer: the module's fixture)

# chunk above the batch's positions: one head chunk, as the oracle computes it
CFG = dict(batch_prompts=4, max_new_tokens=6, eval_prompts=0, chunk=1024, optimizer="adamw", lr=1e-2)


def _models(tokenizer):
    student = tiny(tokenizer, 0)
    teachers = {"math": frozen(tiny(tokenizer, 1, std=0.06)), "code": frozen(tiny(tokenizer, 2, std=0.06))}
    return student, teachers


def _fixed_trajectories(monkeypatch, student, teachers, tokenizer, cfg):
    """The trajectories of step 1 (sampled once, before the run), returned by every step's sampling, so that the
    runs below see the same batch and their sampling reads nothing."""
    problems = [ENVS[d].sample(random.Random(i)) for i, d in enumerate(["math", "code", "math", "code"])]
    trajs = distill_mod._sample(student, teachers, tokenizer, problems, ENVS, cfg, seed=0)
    monkeypatch.setattr(distill_mod, "_sample", lambda *a, **k: trajs)
    return trajs


def _earlier_update(student, teachers, batch, cfg, opts, params):
    """The earlier formulation: lanes selected with boolean masks on the batch's device, counts and every logged
    value read on the spot, the norm checked before the update."""
    T, parts = batch.T, {}
    n_tokens = max(int(batch.mask[:, 1:T + 1].bool().sum()), 1)
    name = "ce" if cfg.off_policy else "kl"
    main, mtp_sum, mtp_count = None, None, 0
    for domain in dict.fromkeys(batch.domains):
        rows = torch.tensor([i for i, d in enumerate(batch.domains) if d == domain])
        tokens, mask = batch.tokens[rows], batch.mask[rows]
        pos = mask[:, 1:T + 1].bool()
        h = student.hidden(tokens[:, :T])
        if cfg.off_policy:
            per_token = F.cross_entropy(student.logits(h[pos].unsqueeze(0))[0], tokens[:, 1:T + 1][pos],
                                        reduction="none")
        else:
            teacher = teachers[domain]
            with torch.no_grad():
                ht = teacher.hidden(tokens[:, :T])
            per_token = token_reverse_kl(lambda x: student.logits(x.unsqueeze(0))[0],
                                         lambda x: teacher.logits(x.unsqueeze(0))[0], h[pos], ht[pos])
        main = per_token.sum() if main is None else main + per_token.sum()
        parts[f"{name}/{domain}"] = float(per_token.detach().mean())
        total = h.new_zeros((), dtype=torch.float32)
        shifted = [tokens[:, k + 1:T + k + 1] for k in range(batch.n_mtp)]
        for k, logits in enumerate(student.mtp_logits(h.detach(), shifted)):
            sel = mask[:, k + 2:T + k + 2].bool()
            total = total + F.cross_entropy(logits[sel], tokens[:, k + 2:T + k + 2][sel], reduction="sum")
            mtp_count += int(sel.sum())
        mtp_sum = total if mtp_sum is None else mtp_sum + total
    loss = main / n_tokens
    parts[name] = float(loss.detach())
    mtp = mtp_sum / max(mtp_count, 1)
    parts["mtp"] = float(mtp.detach())
    loss = loss + cfg.mtp_weight * mtp
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
    for o in opts:
        o.step()
        o.zero_grad(set_to_none=True)
    return {"loss": float(loss.detach()), **parts, "grad_norm": grad_norm}


@pytest.mark.parametrize("off_policy", [False, True])
def test_a_step_matches_the_earlier_formulation(tokenizer, monkeypatch, off_policy):
    student, teachers = _models(tokenizer)
    twin = copy.deepcopy(student)
    cfg = DistillConfig(steps=1, off_policy=off_policy, **CFG)
    trajs = _fixed_trajectories(monkeypatch, student, teachers, tokenizer, cfg)
    rows = distill(student, teachers, tokenizer, ENVS, cfg, progress=False)
    batch = make_batch(trajs, len(twin.mtp), tokenizer.eos_id, torch.device("cpu"))
    assert batch.n_mtp and set(batch.domains) == {"math", "code"}
    opts = build_optimizers(twin, cfg.lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay)
    twin.train()
    want = _earlier_update(twin, teachers, batch, cfg, opts, [p for p in twin.parameters() if p.requires_grad])
    got = {k: rows[-1][k] for k in want}
    assert got == want   # the same arithmetic: equal, not close
    assert rows[-1]["student_tokens"] == int(batch.mask[:, 1:batch.T + 1].sum()) > 0
    assert want["mtp"] > 0 and want["grad_norm"] > 0 and want["ce" if off_policy else "kl"] > 0.05
    for (n, a), b in zip(student.named_parameters(), twin.parameters()):   # the same update
        assert torch.equal(a, b), n


def test_select_positions_is_boolean_indexing_with_its_gradient():
    x = torch.randn(3, 5, 2, 4, dtype=torch.float64, requires_grad=True)
    pos = torch.rand(3, 5, generator=torch.Generator().manual_seed(1)) > 0.4
    w = torch.randn(int(pos.sum()), 2, 4, dtype=torch.float64)
    got = select_positions(x, pos)
    assert torch.equal(got, x[pos])
    (g_got,) = torch.autograd.grad((got * w).sum(), x)
    (g_want,) = torch.autograd.grad((x[pos] * w).sum(), x)
    assert torch.equal(g_got, g_want)
    assert select_positions(x, torch.zeros(3, 5, dtype=torch.bool)).shape == (0, 2, 4)


def test_a_non_finite_gradient_stops_the_run_before_the_step_is_logged(tokenizer, monkeypatch, tmp_path):
    student, teachers = _models(tokenizer)
    cfg = DistillConfig(steps=3, **CFG)
    _fixed_trajectories(monkeypatch, student, teachers, tokenizer, cfg)
    student.layers[0].ffn.gate.weight.register_hook(lambda g: g * float("nan"))
    path = tmp_path / "metrics.jsonl"
    with pytest.raises(DistillDiverged, match="opd step 1: .*grad_norm=nan is not finite; stopped after"):
        distill(student, teachers, tokenizer, ENVS, cfg, metrics_path=str(path), progress=False)
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    assert not [r for r in rows if "loss" in r]




@pytest.mark.parametrize("off_policy,optimizer", [(False, "adamw"), (True, "adamw"), (False, "muon")])
def test_the_step_loop_reads_once_per_step(tokenizer, monkeypatch, off_policy, optimizer):
    """Three steps (two domains, MTP on; sampling replaced by fixed trajectories, no evaluation) read: the model's
    range check of the token ids (host ids, so on a GPU no device value), torch.optim's step counters (host
    tensors) and one transfer per step; besides those only the CPU reference kernels (dsv4/ops/reference, not the
    GPU's) read values."""
    student, teachers = _models(tokenizer)
    cfg = DistillConfig(steps=3, off_policy=off_policy, **{**CFG, "optimizer": optimizer})
    _fixed_trajectories(monkeypatch, student, teachers, tokenizer, cfg)
    calls = count_reads(monkeypatch)
    rows = distill(student, teachers, tokenizer, ENVS, cfg, progress=False)
    monkeypatch.undo()
    assert len(rows) == 3
    reference = os.path.join("dsv4", "ops", "reference") + os.sep
    host = {"_check_tokens", "_get_value"}
    rest = [(name, fn) for name, fn, path in calls if reference not in path and fn not in host]
    assert rest == [("tolist", "read_once")] * 3, rest
    forwards = 2 if off_policy else 4   # per step: the student's forward of each domain (and its teacher's)
    assert [fn for _, fn, _ in calls].count("_check_tokens") == 3 * 2 * forwards   # min and max of host ids

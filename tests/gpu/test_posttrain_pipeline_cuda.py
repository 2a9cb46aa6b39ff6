"""GPU check (skipped without CUDA) of the four-domain post-training pipeline: every stage runs on the device
(the micro model, a step or two each) and summary.json records each stage's GPU seconds."""
import json

import pytest
import torch

from dsv4.posttrain.pipeline import PipelineConfig, run_pipeline

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_four_domain_pipeline_on_cuda(tmp_path):
    domains = ("math", "code", "instruct", "agent")
    cfg = PipelineConfig(envs=domains, model="micro", vocab_size=400, tokenizer_examples=40, pretrain_steps=3,
                         pretrain_examples=16, pretrain_batch_size=4, pretrain_seq_len=128, sft_examples=16,
                         sft_steps=2, sft_batch_size=4, sft_pack=True, grpo_steps=2, grpo_generations=4,
                         grpo_batch_prompts=4, grpo_minibatches=2, grpo_pool=8, opd_steps=2, opd_batch_prompts=8,
                         max_new_tokens=8, eval_problems=4, mixed_grpo=True, stage_minutes=2.0, device="cuda",
                         progress=False)
    run_pipeline(str(tmp_path), cfg)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["device"] != "cpu" and saved["gpu_seconds"] == saved["seconds"]
    assert set(saved["gpu_seconds"]) >= {"pretrain", "sft", "opd", "offpolicy", "grpo-mixed", "eval",
                                         *[f"grpo-{d}" for d in domains]}
    assert all(list(acc) == list(domains) for acc in saved["accuracy"].values())
    assert saved["steps"]["grpo-mixed"] == sum(saved["steps"][f"grpo-{d}"] for d in domains)

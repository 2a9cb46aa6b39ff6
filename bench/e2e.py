"""End to end on one GPU, dsv4 next to transformers' DeepseekV4ForCausalLM in the same process: a V4-Flash
geometry cut to 4 layers (CSA, HCA, CSA, HCA; 64 heads x 512, window 128, indexer 64x128 top-512, 16 experts
top-6 + 1 shared, expert dim 2048, hidden 4096, vocab 32768), bf16, random weights.

    python bench/e2e.py [--json out.json] [--skip-peer] [--prefill 8192 ...] [--decode 1024 ...]
                        [--decode-b64 32768] [--profile DIR]

The results go to bench/results/<date>_<device>_<commit>_e2e.json unless --json names another file.

dsv4 decodes through a captured CUDA graph (dsv4.generate.graphs.GraphDecoder); the batch-64 rows share one
prefilled context (copied row to row, which costs the same to read as 64 different ones) and decode different
tokens, so their experts differ as in real batches.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch

import dsv4
from dsv4.generate.graphs import GraphDecoder
from dsv4.train.cuda_graph import GraphedLoss
from dsv4.train.losses import lm_loss
from provenance import record, result_path  # bench/provenance.py


def flash4(vocab: int = 32768) -> dsv4.ModelConfig:
    return dsv4.ModelConfig.preset("flash").replace(
        n_layers=4, compress_ratios=(4, 128, 4, 128), n_routed_experts=16, vocab_size=vocab, n_hash_layers=0,
        n_mtp_layers=0)


def timed(fn):
    """(fn(), seconds, peak GB allocated on the GPU during it; 0 without CUDA: the CPU smoke runs of the scripts
    that share these helpers)."""
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    if gpu:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30 if gpu else 0.0


def timed_median(fn, reps: int = 3) -> tuple[float, float]:
    """Median seconds of `reps` separate runs of fn, and the peak GB over them (a training step is timed so: one
    run after the warm-up can be 10% off the steady state, in either model)."""
    runs = [timed(fn) for _ in range(reps)]
    return sorted(r[1] for r in runs)[reps // 2], max(r[2] for r in runs)


def guard(name: str, fn, results: list, **info):
    """Run one measurement; an out-of-memory or other failure is recorded, not fatal."""
    try:
        rec = fn()
    except torch.OutOfMemoryError:
        rec = {"error": "out of memory"}
    except Exception as e:  # noqa: BLE001 - a benchmark row, not program logic
        rec = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    torch.cuda.empty_cache()
    rec = {"name": name, **info, **rec}
    results.append(rec)
    print(json.dumps(rec), flush=True)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def dsv4_prefill(model, n: int, chunk: int) -> dict:
    tokens = torch.randint(0, model.config.vocab_size, (1, n), device=model_device(model))
    model(tokens[:, :min(n, chunk)], cache=model.new_cache(1, n + 64), last_only=True)  # warm-up at this chunk shape
    cache = model.new_cache(1, n + 64)

    def run():
        for s in range(0, n, chunk):
            model(tokens[:, s:s + chunk], cache=cache, last_only=True)
    _, secs, peak = timed(run)
    return {"seconds": secs, "tok_per_s": n / secs, "peak_gb": peak, "cache_gb": cache.nbytes / 2**30}


def warm_decoder(model, ctx: int, steps: int, batch: int, graphs: bool, kv_dtype: str = "auto",
                 index_dtype: str = "auto", chunk: int = 8192):
    """`batch` rows at `ctx` tokens of context (one row prefilled in chunks, then copied) and a decode step over
    them (a CUDA graph with `graphs`, else eager) past its warm-up: (cache, step, the next input tokens)."""
    cache = model.new_cache(batch, ctx + steps + 8, kv_dtype, index_dtype)
    dev = model_device(model)
    tokens = torch.randint(0, model.config.vocab_size, (1, ctx), device=dev)
    row = cache.select(0)
    for s in range(0, ctx, chunk):
        model(tokens[:, s:s + chunk], cache=row, last_only=True)
    if batch > 1:
        cache.broadcast_row(0)
    step = GraphDecoder(model, cache) if graphs else (lambda t: model(t.view(-1, 1), cache=cache)[:, -1])
    nxt = torch.randint(0, model.config.vocab_size, (batch,), device=dev)
    for _ in range(3):  # eager warm-up steps, then the capture
        nxt = step(nxt).argmax(-1)
    return cache, step, nxt


@torch.no_grad()
def dsv4_decode(model, ctx: int, steps: int = 64, batch: int = 1, graphs: bool = True, kv_dtype: str = "auto",
                index_dtype: str = "auto", chunk: int = 8192) -> dict:
    graphs = graphs and model_device(model).type == "cuda"
    cache, step, nxt = warm_decoder(model, ctx, steps, batch, graphs, kv_dtype, index_dtype, chunk)
    def run():
        t = nxt
        for _ in range(steps):
            t = step(t).argmax(-1)
    _, secs, peak = timed(run)
    return {"tok_per_s": batch * steps / secs, "ms_per_step": 1000 * secs / steps, "peak_gb": peak,
            "cuda_graph": graphs and not getattr(step, "eager", True), "cache_gb": cache.nbytes / 2**30}


def dsv4_train_step(model, n: int, batch: int = 1, checkpointing: bool = False, cuda_graph: bool = False) -> dict:
    """One fwd+bwd at n tokens, the median of 3; cuda_graph: captured once (dsv4.train.cuda_graph.GraphedLoss, as
    `dsv4 train` runs on a GPU) and replayed, the peak memory including the capture's."""
    tokens = torch.randint(0, model.config.vocab_size, (batch, n + 1), device="cuda")
    model.set_activation_checkpointing(checkpointing)
    try:
        with training(model):
            if cuda_graph:
                torch.cuda.reset_peak_memory_stats()
                graph = GraphedLoss(lambda t: {"loss": lm_loss(model, model.hidden(t[:, :-1]), t[:, 1:])}, tokens,
                                    list(model.parameters()))
                capture_peak = torch.cuda.max_memory_allocated() / 2**30
                secs, peak = timed_median(lambda: graph([tokens]), reps=1 if checkpointing else 3)
                graph.release()
                peak = max(peak, capture_peak)
            else:
                train_step(model, tokens)  # warm-up
                secs, peak = timed_median(lambda: train_step(model, tokens), reps=1 if checkpointing else 3)
    finally:
        model.set_activation_checkpointing(False)
    return {"tok_per_s": batch * n / secs, "seconds": secs, "peak_gb": peak, "activation_checkpointing": checkpointing,
            "cuda_graph": cuda_graph}


@contextlib.contextmanager
def training(model):
    """Train mode with autograd on and fp32 matmuls on TF32 tensor cores, as `dsv4 train` sets (the bf16 model
    has no autocast: it runs as the peer's does)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    model.train()
    try:
        with torch.enable_grad():
            yield
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
        torch.backends.cuda.matmul.allow_tf32 = False




BF16_STORED_FP32_PARAMS = ("head.weight", "compressor.wkv.weight", "compressor.wgate.weight")


def build_model(cfg: dsv4.ModelConfig | None = None) -> dsv4.Transformer:
    """The bf16 benchmark model on the GPU with random N(0, 0.02) matrices."""
    with torch.device("cuda"):
        model = dsv4.Transformer(cfg or flash4()).to_dtype(torch.bfloat16).eval()
    with torch.no_grad():
        for n, p_ in model.named_parameters():
            if p_.dim() >= 2:
                p_.normal_(0, 0.02)
        # fp32 parameters the official checkpoint stores in bf16 (the reference widens them on load): the LM head and
        # the compressors' wkv / wgate. Their values are bf16 values, which the fp32 projections read as one part.
        for n, p_ in model.named_parameters():
            if n.endswith(BF16_STORED_FP32_PARAMS):
                p_.copy_(p_.bfloat16())
        model.reset_buffers()
    return model


def peer_model(cfg: dsv4.ModelConfig):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
    hub = cfg.to_hub_dict()
    hub.pop("compress_ratios")
    hub.pop("architectures"), hub.pop("model_type")
    hcfg = DeepseekV4Config(**hub)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = DeepseekV4ForCausalLM(hcfg).eval()
        finally:
            torch.set_default_dtype(torch.float32)
    return model


@torch.no_grad()
def peer_prefill(model, n: int) -> dict:
    tokens = torch.randint(0, model.config.vocab_size, (1, n), device="cuda")
    _, secs, peak = timed(lambda: model(tokens, use_cache=True, logits_to_keep=1))
    return {"seconds": secs, "tok_per_s": n / secs, "peak_gb": peak}


@torch.no_grad()
def peer_decode(model, ctx: int, steps: int = 16) -> dict:
    tokens = torch.randint(0, model.config.vocab_size, (1, ctx), device="cuda")
    out = model(tokens, use_cache=True, logits_to_keep=1)
    past = out.past_key_values
    t = out.logits[:, -1:].argmax(-1)
    out = model(t, past_key_values=past, use_cache=True)
    def run():
        nonlocal out
        for _ in range(steps):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
    _, secs, peak = timed(run)
    return {"tok_per_s": steps / secs, "ms_per_step": 1000 * secs / steps, "peak_gb": peak}


def peer_train_step(model, n: int) -> dict:
    model.train()
    tokens = torch.randint(0, model.config.vocab_size, (1, n + 1), device="cuda")
    def step():
        out = model(tokens[:, :-1], use_cache=False)
        torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
    step()
    model.zero_grad(set_to_none=True)

    def fresh_step():
        step()
        model.zero_grad(set_to_none=True)
    secs, peak = timed_median(fresh_step)
    model.eval()
    return {"tok_per_s": n / secs, "seconds": secs, "peak_gb": peak}


def train_step(model, tokens: torch.Tensor) -> None:
    """One eager fwd+bwd of the LM loss, gradients dropped after."""
    with training(model):
        lm_loss(model, model.hidden(tokens[:, :-1]), tokens[:, 1:]).backward()


def profile(model, out_dir: str, context: int = 32768) -> None:
    """Per-kernel GPU time of an 8K prefill chunk and of one eager decode step (fixed shapes, as the CUDA graph
    runs it) at `context` tokens, and of a 4K training step with the compiled references and with the Triton
    training kernels (tables in out_dir/profile.txt)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    os.makedirs(out_dir, exist_ok=True)
    tokens = torch.randint(0, model.config.vocab_size, (1, context), device="cuda")
    with torch.no_grad():
        cache = model.new_cache(1, context + 16)
        for s in range(0, context - 16384, 8192):
            model(tokens[:, s:s + 8192], cache=cache, last_only=True)
        # the prefill job runs twice (warm-up, profiled): the last two 8K chunks, then decode steps
        k = context // 1024
        jobs = {f"prefill_8k_chunk_at_{k - 8}k": lambda: model(tokens[:, -8192:], cache=cache, last_only=True),
                f"decode_step_at_{k}k": lambda: model(tokens[:, :1], cache=cache.set_fixed_shapes(True)),
                "train_fwd_bwd_4k": lambda: train_step(model, tokens[:, :4097]),
                "train_fwd_bwd_4k_triton_train": lambda: train_step(model, tokens[:, :4097])}
        for name, fn in jobs.items():
            with dsv4.ops.training_kernels("triton" if name.endswith("triton_train") else "compiled"):
                fn()
                torch.cuda.synchronize()
                with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                    fn()
                    torch.cuda.synchronize()
            events = prof.key_averages()
            n_kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
            table = events.table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=90)
            with open(os.path.join(out_dir, "profile.txt"), "a") as f:
                f.write(f"== {name}: {n_kernels} GPU kernels/copies\n{table}\n")
            print(name, n_kernels, "GPU kernels", flush=True)


def run_peer(cfg, a, res: list) -> None:
    """The peer's rows, as dsv4's at the sizes it can hold."""
    peer = peer_model(cfg)
    peer_prefill(peer, 1024)  # warm-up
    for n in [x for x in a.prefill if x <= 16384]:
        guard("transformers prefill", lambda: peer_prefill(peer, n), res, tokens=n)
    for ctx in [x for x in a.decode if x <= 16384]:
        guard("transformers decode b1", lambda: peer_decode(peer, ctx), res, context=ctx)
    for n in [x for x in a.train if x <= 8192]:
        guard("transformers train fwd+bwd", lambda: peer_train_step(peer, n), res, tokens=n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="results file (default: bench/results/<date>_<device>_<commit>_e2e.json)")
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--prefill", type=int, nargs="*", default=[4096, 8192, 16384, 65536])
    p.add_argument("--decode", type=int, nargs="*", default=[1024, 4096, 32768, 131072])
    p.add_argument("--decode-b64", type=int, nargs="*", default=[32768])
    p.add_argument("--decode-fp8", type=int, nargs="*", default=[131072],
                   help="batch-1 decode with the official FP8 KV records and FP4 indexer keys")
    p.add_argument("--train", type=int, nargs="*", default=[4096])
    p.add_argument("--train-checkpointed", type=int, nargs="*", default=[65536],
                   help="training steps with activation checkpointing (long sequences)")
    p.add_argument("--train-kernels", nargs="*", default=["triton", "compiled"], choices=["compiled", "triton"],
                   help="training paths to time, in this order: the Triton training kernels (the default path) and/or "
                        "the compiled references (timed after: their compiled variants would lengthen every later "
                        "call's guard checks)")
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--profile", help="write per-kernel profiles to this folder")
    p.add_argument("--profile-context", type=int, default=32768)
    a = p.parse_args()
    cfg = flash4()
    res: list[dict] = []
    model = build_model(cfg)
    print(f"dsv4 model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters", flush=True)
    dsv4_prefill(model, 2 * a.chunk, a.chunk)  # warm-up: kernels compile
    for n in a.prefill:
        guard("dsv4 prefill", lambda: dsv4_prefill(model, n, a.chunk), res, tokens=n)
    for ctx in a.decode:
        guard("dsv4 decode b1", lambda: dsv4_decode(model, ctx), res, context=ctx)
    for ctx in a.decode_fp8:
        guard("dsv4 decode b1 fp8 KV + fp4 keys", lambda: dsv4_decode(model, ctx, kv_dtype="fp8", index_dtype="fp4"),
              res, context=ctx)
    for ctx in a.decode_b64:
        guard("dsv4 decode b64", lambda: dsv4_decode(model, ctx, steps=32, batch=64), res, context=ctx)
    for triton_train in [k == "triton" for k in a.train_kernels]:  # compiled references and/or Triton kernels
        tag = " (triton train)" if triton_train else ""
        with dsv4.ops.training_kernels("triton" if triton_train else "compiled"):
            for n in a.train:
                guard("dsv4 train fwd+bwd" + tag, lambda: dsv4_train_step(model, n), res, tokens=n)
                if triton_train:  # the default path as `dsv4 train` runs it on a GPU: one CUDA graph per step
                    guard("dsv4 train fwd+bwd (triton train, CUDA graph)",
                          lambda: dsv4_train_step(model, n, cuda_graph=True), res, tokens=n)
            for n in a.train_checkpointed:
                guard("dsv4 train fwd+bwd (block recompute)" + tag,
                      lambda: dsv4_train_step(model, n, checkpointing=True), res, tokens=n)
    if a.profile:
        profile(model, a.profile, a.profile_context)
    if not a.skip_peer:
        del model
        torch.cuda.empty_cache()
        try:
            run_peer(cfg, a, res)
        except Exception as e:  # noqa: BLE001 - a peer that cannot run is a row of the table, not the end of it
            res.append({"name": "transformers", "error": f"{type(e).__name__}: {str(e)[:200]}"})
    path = a.json or result_path("e2e")
    with open(path, "w") as f:
        json.dump({**record(), "torch": torch.__version__, "results": res}, f, indent=2)
    print(f"results: {path}")
    print(f"{'measurement':<28}{'size':>8}{'tok/s':>12}{'seconds':>10}{'peak GB':>9}")
    for r in res:
        size = r.get("tokens", r.get("context", ""))
        if "error" in r:
            print(f"{r['name']:<28}{size:>8}   {r['error']}")
        else:
            print(f"{r['name']:<28}{size:>8}{r['tok_per_s']:>12,.1f}{r.get('seconds', r.get('ms_per_step', 0) / 1000):>10.3f}"
                  f"{r['peak_gb']:>9.1f}")


if __name__ == "__main__":
    main()

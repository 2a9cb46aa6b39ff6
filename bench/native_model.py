"""Whole-model native FP8/FP4 weights against bf16 weights on one GPU (issue 19), in one run:

(a) memory: the bytes the loaded native model holds on the GPU against its checkpoint's bytes on disk (goal: within
    3%), and the peak GPU memory while loading against that footprint (goal: <= 1.1x; the loader streams one
    tensor at a time into a model materialised once in its final formats, so it never holds a bf16 copy);
(b) speed on the bench/e2e.py geometry (4 layers of V4-Flash, 16 experts) written as an official-format checkpoint
    (FP4 routed experts, FP8 attention / shared-expert / indexer projections) and loaded twice, native and bf16
    (the same values): prefill tokens/s, CUDA-graph decode tokens/s at batch 1 (128K context) and batch 64;
(c) capacity: a cut of the real V4-Flash config (tests/fixtures/deepseek-v4-flash: all 256 experts, real dims) with
    one layer of each kind (window + hash-routed, CSA, HCA) and the MTP block, built in bf16 (bytes measured),
    written in the official formats and loaded native (bytes and loading peak measured); its cache measured at two
    contexts and checked against dsv4.cache.accounting; the activation workspace of an 8K prefill chunk measured;
    then extrapolated to the 43 layers: the most layers that serve a 128K context on one H200 natively and in bf16,
    and whether the whole V4-Flash weight set with a 128K cache fits two H200s.

(d) with --profile: the kernels of one CUDA-graph decode step of each model at batch 1 and 64 (torch.profiler:
    CUPTI sees the graph's kernels): GPU time and launches per step, most time first, so that the native step's
    gap to bf16 is named kernel by kernel.

    python bench/native_model.py [--json out.json] [--prefill 16384 65536] [--decode 131072] [--decode-b64 32768]
                                 [--skip-real] [--gpu-gib 139.8] [--profile [--profile-batch 1 64]]
    python bench/native_model.py --tiny-cpu --json /tmp/native_model.json    # CPU smoke run (tiny configs)

The results go to bench/results/<date>_<device>_<commit>_native_model.json unless --json names another file;
a table is printed. Checkpoints are written to a temporary folder (--workdir) and deleted at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dsv4  # noqa: E402
from dsv4.cache.accounting import layer_bytes as cache_layer_bytes  # noqa: E402
from e2e import BF16_STORED_FP32_PARAMS, dsv4_decode, dsv4_prefill, flash4, guard, warm_decoder  # noqa: E402  (bench/e2e.py)
from provenance import REPO_ROOT, record, result_path  # noqa: E402  (bench/provenance.py)

FLASH_CONFIG = os.path.join(REPO_ROOT, "tests", "fixtures", "deepseek-v4-flash")
GIB = 2 ** 30
CACHE_FORMATS = {"bf16": ("auto", "auto"), "fp8": ("fp8", "fp4")}   # name -> (kv_dtype, index_dtype) of new_cache


def tiny_config() -> dsv4.ModelConfig:
    """The CPU smoke model: the tiny preset with wo_a's head groups on 128-row FP8 tiles, no MTP (as flash4)."""
    return dsv4.ModelConfig.preset("tiny").replace(o_lora_rank=128, n_mtp_layers=0,
                                                   compress_ratios=dsv4.ModelConfig.preset("tiny").compress_ratios[:4])


def real_cut(full: dsv4.ModelConfig) -> dsv4.ModelConfig:
    """The full config cut to one main layer per attention kind (window, CSA, HCA: every compress ratio it uses, in
    that order), the first hash-routed if the model has hash layers, and its MTP blocks; all other dims as given."""
    main = sorted(set(full.compress_ratios[: full.n_layers]), key=lambda r: (r != 0, r != full.csa_ratio, r))
    return full.replace(n_layers=len(main), compress_ratios=(*main, *full.compress_ratios[full.n_layers:]),
                        n_hash_layers=min(full.n_hash_layers, 1))


# ----------------------------------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each storage counted once)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


@torch.no_grad()
def build_model(cfg: dsv4.ModelConfig, device: str) -> dsv4.Transformer:
    """A random bf16 model on `device` as bench/e2e.py's build_model draws it (matrices N(0, 0.02), the fp32
    parameters the checkpoint stores in bf16 rounded to bf16 values), the rest as init_small sets it. Built on the
    meta device and cast there, so that a real-dims layer (12 GiB of bf16 experts) never exists in fp32."""
    with torch.device("meta"):
        model = dsv4.Transformer(cfg).to_dtype(torch.bfloat16).eval()
    model.to_empty(device=device)
    for n, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0, 0.02)
            if n.endswith(BF16_STORED_FP32_PARAMS):
                p.copy_(p.bfloat16())
    model.reset_buffers()
    return init_small(model)


def init_small(model: dsv4.Transformer, seed: int = 0) -> dsv4.Transformer:
    """The non-matrix parameters as Transformer.init_weights sets them (norms 1, sinks / ape / biases 0, mHC near a
    plain residual, hash tables with distinct random experts; e2e.build_model draws only the matrices and leaves
    these as allocated): a model whose activations and routing behave as a trained one's do, in the shapes that
    cost time."""
    return model.init_weights(seed=seed, matrices=False)


def write_official(model: dsv4.Transformer, path: str) -> dict:
    """Save `model` as the official checkpoints store it (FP4 routed experts, FP8 projections); returns the bytes
    the safetensors files take on disk and the seconds it took."""
    t0 = time.perf_counter()
    dsv4.save_model(model, path, dtype=torch.bfloat16, expert_format="fp4", fp8_weights=True)
    files = glob.glob(os.path.join(path, "*.safetensors"))
    return {"disk_bytes": sum(os.path.getsize(f) for f in files), "write_s": time.perf_counter() - t0}


def load_measured(path: str, device: torch.device, weights: str) -> tuple[dsv4.Transformer, dict]:
    """load_model with the GPU memory it adds once loaded and at its peak while loading (CUDA only; on the CPU the
    held bytes are the tensors' and the peak is not measured)."""
    cuda = device.type == "cuda"
    if cuda:
        sync(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    model = dsv4.load_model(path, device=device, weights=weights)
    sync(device)
    secs = time.perf_counter() - t0
    held_tensors = tensor_bytes(model)
    out = {"weights": weights, "load_s": secs, "tensor_bytes": held_tensors}
    if cuda:
        out["held_bytes"] = torch.cuda.memory_allocated(device) - before
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
        out["peak_over_held"] = out["peak_bytes"] / out["held_bytes"]
    else:
        out["held_bytes"], out["peak_bytes"], out["peak_over_held"] = held_tensors, None, None
    return model, out


def held_breakdown(model: dsv4.Transformer) -> dict:
    """Bytes held per storage dtype: what the native model keeps packed (uint8) and what stays bf16 / fp32."""
    out: dict[str, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        k = str(t.dtype).replace("torch.", "")
        out[k] = out.get(k, 0) + t.numel() * t.element_size()
    return out


def widened_bytes(model: dsv4.Transformer) -> int:
    """Bytes the model holds beyond the checkpoint's for the fp32 parameters the checkpoint stores in bf16 (the LM
    head and the compressors' wkv / wgate, widened on load as the reference computes them in fp32)."""
    return sum(p.numel() * (p.element_size() - 2) for n, p in model.named_parameters()
               if p.dtype == torch.float32 and n.endswith(BF16_STORED_FP32_PARAMS))


def memory_section(path: str, disk: int, device: torch.device) -> tuple[dict, dict]:
    """(a): load native then bf16 from the same checkpoint; returns the models and their measurements."""
    models, rows = {}, {}
    for weights in ("native", "bf16"):
        model, m = load_measured(path, device, weights)
        m["held_over_disk"] = m["held_bytes"] / disk
        m["widened_fp32_bytes"] = widened_bytes(model)
        m["held_over_disk_unwidened"] = (m["held_bytes"] - m["widened_fp32_bytes"]) / disk
        m["held_by_dtype"] = held_breakdown(model)
        models[weights], rows[weights] = model, m
        print(f"loaded {weights}: {m['held_bytes'] / GIB:.3f} GiB held ({m['held_over_disk']:.3f}x the checkpoint's "
              f"{disk / GIB:.3f} GiB), peak while loading "
              + (f"{m['peak_over_held']:.3f}x" if m["peak_over_held"] else "not measured")
              + f", {m['load_s']:.1f} s", flush=True)
    return models, rows


# ----------------------------------------------------------------------------------------------- speed
def speed_section(models: dict, a, res: list) -> None:
    """(b): the same measurements on each model, native first; warm-ups compile the kernels of both."""
    for weights, model in models.items():
        tag = f"{weights} "
        dsv4_prefill(model, 2 * a.chunk, a.chunk)   # warm-up: kernels compile at this chunk shape
        for n in a.prefill:
            guard(tag + "prefill", lambda: dsv4_prefill(model, n, a.chunk), res, weights=weights, tokens=n)
        for ctx in a.decode:
            guard(tag + "decode b1", lambda: dsv4_decode(model, ctx, steps=a.steps, chunk=a.chunk), res,
                  weights=weights, context=ctx, batch=1)
        for ctx in a.decode_b64:
            guard(tag + f"decode b{a.batch}", lambda: dsv4_decode(model, ctx, steps=max(4, a.steps // 2),
                                                                  batch=a.batch, chunk=a.chunk),
                  res, weights=weights, context=ctx, batch=a.batch)


def speed_ratios(res: list) -> list[dict]:
    """native / bf16 tokens/s of each measurement both models have."""
    by = {(r["name"].split(" ", 1)[1], r.get("tokens", r.get("context"))): r for r in res
          if r["name"].startswith("bf16 ") and "error" not in r}
    out = []
    for r in res:
        if r["name"].startswith("native ") and "error" not in r:
            key = (r["name"].split(" ", 1)[1], r.get("tokens", r.get("context")))
            if key in by:
                out.append({"measurement": key[0], "size": key[1], "native_tok_per_s": r["tok_per_s"],
                            "bf16_tok_per_s": by[key]["tok_per_s"],
                            "native_over_bf16": r["tok_per_s"] / by[key]["tok_per_s"],
                            "native_cuda_graph": r.get("cuda_graph")})
    return out


# ----------------------------------------------------------------------------------------------- profile
def kernel_times(prof, steps: int, cuda: bool) -> list[dict]:
    """Per kernel name: GPU microseconds and launches per step, most time first (the CUDA kernels CUPTI records,
    those replayed from a CUDA graph included); on the CPU, each op's self time."""
    from torch.autograd import DeviceType
    rows: dict[str, list] = {}
    for e in prof.events():
        if cuda:
            if e.device_type != DeviceType.CUDA:
                continue
            us = e.time_range.elapsed_us()
        else:
            us = e.self_cpu_time_total
        r = rows.setdefault(e.name, [0.0, 0])
        r[0] += us
        r[1] += 1
    out = [{"kernel": k, "us_per_step": t / steps, "launches_per_step": n / steps} for k, (t, n) in rows.items()]
    return sorted(out, key=lambda r: -r["us_per_step"])


@torch.no_grad()
def profile_decode(model: dsv4.Transformer, ctx: int, steps: int, chunk: int, batch: int = 1) -> dict:
    """`batch` sequences' decode steps at `ctx` context under torch.profiler: replays of the captured step (CUDA
    graph, as the decode measurements run it; eager on the CPU), kernel times per step (kernel_times)."""
    from torch.profiler import ProfilerActivity, profile
    dev = next(model.parameters()).device
    cuda = dev.type == "cuda"
    _, step, nxt = warm_decoder(model, ctx, steps, batch, cuda, chunk=chunk)
    sync(dev)
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            nxt = step(nxt).argmax(-1)
        sync(dev)
    rows = kernel_times(prof, steps, cuda)
    return {"context": ctx, "batch": batch, "steps": steps, "cuda_graph": cuda and not getattr(step, "eager", True),
            "us_per_step": sum(r["us_per_step"] for r in rows),
            "launches_per_step": sum(r["launches_per_step"] for r in rows), "kernels": rows}


def profile_section(models: dict, a) -> dict:
    """(d): the per-kernel table of a decode step of each model at each --profile-batch (what the native step
    spends where)."""
    return {f"{w} b{b}": guard_value(lambda: profile_decode(m, a.profile_context, a.profile_steps, a.chunk, b))
            for b in a.profile_batch for w, m in models.items()}


def print_profile(prof: dict, top: int) -> None:
    for w, p in prof.items():
        if not p:
            continue
        print(f"\n(d) {w}: decode step at {p['context']} context, {p['us_per_step']:.0f} us of kernels in "
              f"{p['launches_per_step']:.0f} launches per step (cuda graph: {p['cuda_graph']})")
        print(f"{'us/step':>9}{'launches':>9}  kernel")
        for r in p["kernels"][:top]:
            print(f"{r['us_per_step']:>9.1f}{r['launches_per_step']:>9.1f}  {r['kernel'][:110]}")


# ----------------------------------------------------------------------------------------------- capacity
def cache_layer_nbytes(cache) -> list[int]:
    """Bytes of each main layer's part of a KVCache (its stores and compressor states)."""
    return [sum(s.nbytes for s in layer.stores()) + sum(st.kv.nbytes + st.score.nbytes for st in layer.states())
            for layer in cache.layers]


def measure_cache(model: dsv4.Transformer, contexts: tuple[int, int]) -> dict:
    """Per layer of `model`, per cache format: bytes per token and constant bytes of a real KVCache measured at two
    contexts, next to dsv4.cache.accounting's count for the larger one."""
    cfg, out = model.config, {}
    c1, c2 = contexts
    for name, (kv, idx) in CACHE_FORMATS.items():
        b1 = cache_layer_nbytes(model.new_cache(1, c1, kv, idx))
        b2 = cache_layer_nbytes(model.new_cache(1, c2, kv, idx))
        per_tok = [(y - x) / (c2 - c1) for x, y in zip(b1, b2)]
        acct = [sum(cache_layer_bytes(cfg, i, c2, kv if kv != "auto" else "bf16", idx if idx != "auto" else "bf16")
                    .values()) for i in range(cfg.n_layers)]
        out[name] = {"kv_dtype": kv, "index_dtype": idx, "bytes_per_token": per_tok,
                     "constant_bytes": [y - p * c2 for y, p in zip(b2, per_tok)],
                     "measured_at_max": b2, "accounting_at_max": acct}
    return out


def layer_parts(model: dsv4.Transformer) -> dict:
    """Measured bytes of the cut's parts: per main layer its FFN (router + experts + shared expert) and the rest
    (attention, compressor, indexer, norms, mHC); each MTP block whole; and what is left (embedding, head, ...)."""
    layers = [{"kind": model.config.layer_kind(i), "hashed": model.config.is_hash_layer(i),
               "ffn": tensor_bytes(b.ffn), "rest": tensor_bytes(b) - tensor_bytes(b.ffn)}
              for i, b in enumerate(model.layers)]
    mtp = [tensor_bytes(b) for b in model.mtp]
    total = tensor_bytes(model)
    fixed = total - sum(r["ffn"] + r["rest"] for r in layers) - sum(mtp)
    return {"layers": layers, "mtp": mtp, "fixed": fixed, "total": total}


_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


def disk_parts(path: str, cfg: dsv4.ModelConfig) -> dict:
    """layer_parts' split of a checkpoint's tensor bytes (from its safetensors headers; official names), so that
    the bytes on disk extrapolate as the held bytes do."""
    from dsv4.checkpoint.safetensors_io import read_header
    sizes: dict[str, int] = {}
    for f in glob.glob(os.path.join(path, "*.safetensors")):
        for name, info in read_header(f).items():
            n = 1
            for d in info.shape:
                n *= d
            sizes[name] = n * _DTYPE_BYTES.get(info.dtype, 1)
    layers = []
    for i in range(cfg.n_layers):
        mine = {k: v for k, v in sizes.items() if k.startswith(f"layers.{i}.")}
        ffn = sum(v for k, v in mine.items() if k.startswith(f"layers.{i}.ffn."))
        layers.append({"kind": cfg.layer_kind(i), "hashed": cfg.is_hash_layer(i), "ffn": ffn,
                       "rest": sum(mine.values()) - ffn})
    mtp = [sum(v for k, v in sizes.items() if k.startswith(f"mtp.{i}.")) for i in range(cfg.n_mtp_layers)]
    total = sum(sizes.values())
    return {"layers": layers, "mtp": mtp, "fixed": total - sum(r["ffn"] + r["rest"] for r in layers) - sum(mtp),
            "total": total}


def extrapolate_weights(full: dsv4.ModelConfig, parts: dict) -> dict:
    """Bytes of each main layer of `full` (attention part by its kind, FFN part by hash routing, as measured on the
    cut), of the MTP blocks and of the rest."""
    rest = {r["kind"]: r["rest"] for r in parts["layers"]}
    ffn = {r["hashed"]: r["ffn"] for r in parts["layers"]}
    per_layer = [rest[full.layer_kind(i)] + ffn[full.is_hash_layer(i)] for i in range(full.n_layers)]
    mtp = [parts["mtp"][0]] * full.n_mtp_layers if parts["mtp"] else []
    return {"per_layer": per_layer, "mtp": sum(mtp), "fixed": parts["fixed"],
            "main_total": parts["fixed"] + sum(per_layer), "total": parts["fixed"] + sum(per_layer) + sum(mtp)}


def cache_bytes(full: dsv4.ModelConfig, n_layers: int, context: int, fmt: str) -> int:
    """One sequence's cache of the first n_layers main layers at `context` (dsv4.cache.accounting's count, which
    measure_cache checks against a real KVCache)."""
    kv, idx = CACHE_FORMATS[fmt]
    kv, idx = (kv if kv != "auto" else "bf16"), (idx if idx != "auto" else "bf16")
    return sum(sum(cache_layer_bytes(full, i, context, kv, idx).values()) for i in range(n_layers))


def capacity(full: dsv4.ModelConfig, weights: dict, workspace: int, gpu_bytes: int, context: int) -> dict:
    """For native and bf16 weights and each cache format: the most main layers (taken in order, embedding and head
    included, MTP not) that fit one GPU with a `context` cache and the workspace; and the whole model (MTP included)
    against two GPUs (each with its own workspace)."""
    out = {}
    for w, wb in weights.items():
        for fmt in CACHE_FORMATS:
            best, need_at_best = 0, None
            for L in range(1, full.n_layers + 1):
                need = wb["fixed"] + sum(wb["per_layer"][:L]) + cache_bytes(full, L, context, fmt) + workspace
                if need <= gpu_bytes:
                    best, need_at_best = L, need
            whole = wb["total"] + cache_bytes(full, full.n_layers, context, fmt) + 2 * workspace
            out[f"{w}, {fmt} cache"] = {
                "max_layers_one_gpu": best, "bytes_at_max": need_at_best,
                "full_weights_bytes": wb["total"], "full_cache_bytes": cache_bytes(full, full.n_layers, context, fmt),
                "full_need_bytes": whole, "two_gpu_bytes": 2 * gpu_bytes, "fits_two_gpus": whole <= 2 * gpu_bytes,
                "two_gpu_headroom_bytes": 2 * gpu_bytes - whole}
    return out


@torch.no_grad()
def prefill_workspace(model: dsv4.Transformer, chunk: int, context: int) -> int:
    """Peak GPU bytes of one `chunk`-token prefill step above the weights and a `context` cache (0 on the CPU)."""
    dev = next(model.parameters()).device
    if dev.type != "cuda":
        return 0
    cache = model.new_cache(1, context)
    tokens = torch.randint(0, model.config.vocab_size, (1, chunk), device=dev)
    model(tokens, cache=cache, last_only=True)               # warm-up (kernels compile)
    cache = None
    torch.cuda.empty_cache()
    cache = model.new_cache(1, context)
    sync(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    model(tokens, cache=cache, last_only=True)
    sync(dev)
    return torch.cuda.max_memory_allocated(dev) - base


def real_section(full: dsv4.ModelConfig, workdir: str, device: torch.device, a) -> dict:
    """(c): measure the cut of `full` in bf16 and native, then extrapolate."""
    cut = real_cut(full)
    print(f"real-dims cut: layers {[cut.layer_kind(i) for i in range(cut.n_layers)]} + {cut.n_mtp_layers} MTP, "
          f"{cut.n_routed_experts} experts", flush=True)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
    bf16 = build_model(cut, str(device))
    bf16_parts = layer_parts(bf16)
    bf16_held = torch.cuda.memory_allocated(device) - before if cuda else bf16_parts["total"]
    path = os.path.join(workdir, "real_cut")
    disk = write_official(bf16, path)
    del bf16
    model, loaded = load_measured(path, device, "native")
    native_parts = layer_parts(model)
    loaded.update(held_over_disk=loaded["held_bytes"] / disk["disk_bytes"], widened_fp32_bytes=widened_bytes(model),
                  **disk)
    loaded["held_over_disk_unwidened"] = (loaded["held_bytes"] - loaded["widened_fp32_bytes"]) / disk["disk_bytes"]
    on_disk = disk_parts(path, cut)
    cache = measure_cache(model, (a.context // 2, a.context))
    ws = guard_value(lambda: prefill_workspace(model, a.chunk, a.context))
    workspace = ws if ws is not None else int(a.reserve_gib * GIB)
    del model
    shutil.rmtree(path, ignore_errors=True)
    weights = {"native": extrapolate_weights(full, native_parts), "bf16": extrapolate_weights(full, bf16_parts)}
    disk_full = extrapolate_weights(full, on_disk)
    gpu_bytes = int(a.gpu_gib * GIB)
    return {"cut": dataclasses.asdict(cut),
            "bf16_built_held_bytes": bf16_held, "native_load": loaded,
            "parts": {"native": native_parts, "bf16": bf16_parts}, "cache": cache,
            "prefill_workspace_bytes": ws, "workspace_used_bytes": workspace, "gpu_bytes": gpu_bytes,
            "context": a.context, "extrapolated": weights, "parts_on_disk": on_disk, "extrapolated_disk": disk_full,
            "full_native_over_disk": weights["native"]["total"] / disk_full["total"],
            "capacity": capacity(full, weights, workspace, gpu_bytes, a.context)}


def guard_value(fn):
    """fn(), or None (printed) if it fails: a measurement that cannot run leaves the others standing."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a benchmark row, not program logic
        print(f"  (not measured: {type(e).__name__}: {str(e)[:200]})", flush=True)
        return None


# ----------------------------------------------------------------------------------------------- report
def print_table(doc: dict) -> None:
    mem = doc.get("memory", {})
    if mem:
        print(f"\n(a) memory, checkpoint {mem['disk_bytes'] / GIB:.3f} GiB on disk")
        print(f"{'weights':<8}{'held GiB':>10}{'held/disk':>11}{'w/o fp32 widening':>19}{'load peak/held':>16}"
              f"{'load s':>8}")
        for w in ("native", "bf16"):
            r = mem[w]
            peak = f"{r['peak_over_held']:.3f}" if r["peak_over_held"] else "-"
            print(f"{w:<8}{r['held_bytes'] / GIB:>10.3f}{r['held_over_disk']:>11.3f}"
                  f"{r['held_over_disk_unwidened']:>19.3f}{peak:>16}{r['load_s']:>8.1f}")
    if doc.get("speed"):
        print(f"\n(b) speed\n{'measurement':<24}{'size':>8}{'tok/s':>12}{'peak GB':>9}  cuda graph")
        for r in doc["speed"]:
            size = r.get("tokens", r.get("context", ""))
            if "error" in r:
                print(f"{r['name']:<24}{size:>8}   {r['error']}")
            else:
                print(f"{r['name']:<24}{size:>8}{r['tok_per_s']:>12,.1f}{r['peak_gb']:>9.1f}  "
                      f"{r.get('cuda_graph', '')}")
        for r in doc.get("ratios", []):
            print(f"  native/bf16 {r['measurement']:<12}{r['size']:>8}: {r['native_over_bf16']:.2f}x")
    real = doc.get("real")
    if real:
        ld = real["native_load"]
        print(f"\n(c) real-dims cut: native {ld['held_bytes'] / GIB:.2f} GiB held vs {ld['disk_bytes'] / GIB:.2f} GiB "
              f"on disk ({ld['held_over_disk']:.3f}x; {ld['held_over_disk_unwidened']:.3f}x without the fp32 "
              f"widening of the head and compressors), load peak "
              + (f"{ld['peak_over_held']:.3f}x" if ld["peak_over_held"] else "-")
              + f"; bf16 {real['bf16_built_held_bytes'] / GIB:.2f} GiB")
        for w in ("native", "bf16"):
            p = real["parts"][w]
            kinds = ", ".join(f"{r['kind']}{'+hash' if r['hashed'] else ''} {(r['ffn'] + r['rest']) / GIB:.3f}"
                              for r in p["layers"])
            print(f"  {w:<6} per layer GiB: {kinds}; MTP {sum(p['mtp']) / GIB:.3f}; fixed {p['fixed'] / GIB:.3f}")
        for fmt, c in real["cache"].items():
            print(f"  cache {fmt}: bytes/token per layer {[round(x, 1) for x in c['bytes_per_token']]}, measured "
                  f"{sum(c['measured_at_max'])} vs accounting {sum(c['accounting_at_max'])} bytes at "
                  f"{real['context']}")
        print(f"  full model extrapolated: native {real['extrapolated']['native']['total'] / GIB:.1f} GiB held vs "
              f"{real['extrapolated_disk']['total'] / GIB:.1f} GiB of checkpoint tensors: "
              f"{real['full_native_over_disk']:.3f}x; bf16 {real['extrapolated']['bf16']['total'] / GIB:.1f} GiB")
        ws = real["prefill_workspace_bytes"]
        print(f"  workspace (one {doc['args']['chunk']}-token prefill chunk): "
              + (f"{ws / GIB:.2f} GiB measured" if ws is not None else "not measured")
              + f"; used {real['workspace_used_bytes'] / GIB:.2f} GiB; GPU {real['gpu_bytes'] / GIB:.1f} GiB")
        print(f"{'weights, cache':<22}{'max layers/1 GPU':>17}{'full weights GiB':>18}{'full need GiB':>15}"
              f"{'2 GPUs':>8}{'headroom GiB':>14}")
        for k, c in real["capacity"].items():
            print(f"{k:<22}{c['max_layers_one_gpu']:>17}{c['full_weights_bytes'] / GIB:>18.1f}"
                  f"{c['full_need_bytes'] / GIB:>15.1f}{'fits' if c['fits_two_gpus'] else 'no':>8}"
                  f"{c['two_gpu_headroom_bytes'] / GIB:>14.1f}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="results file (default: bench/results/<date>_<device>_<commit>_native_model.json)")
    p.add_argument("--prefill", type=int, nargs="*", default=[16384, 65536])
    p.add_argument("--decode", type=int, nargs="*", default=[131072], help="batch-1 decode contexts")
    p.add_argument("--decode-b64", type=int, nargs="*", default=[32768], help="batched decode contexts")
    p.add_argument("--batch", type=int, default=64, help="rows of the batched decode")
    p.add_argument("--steps", type=int, default=64, help="timed batch-1 decode steps (half for the batched)")
    p.add_argument("--chunk", type=int, default=8192, help="prefill chunk")
    p.add_argument("--context", type=int, default=131072, help="(c): the context each served sequence holds")
    p.add_argument("--gpu-gib", type=float, default=139.8, help="(c): one GPU's memory (H200: 139.8 GiB = 141 GB)")
    p.add_argument("--reserve-gib", type=float, default=4.0, help="(c): workspace if it cannot be measured")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="(d): per-kernel GPU time of a CUDA-graph decode step of each weights kind")
    p.add_argument("--profile-context", type=int, default=16384, help="(d): the profiled step's context")
    p.add_argument("--profile-steps", type=int, default=8, help="(d): decode steps profiled (times are per step)")
    p.add_argument("--profile-batch", type=int, nargs="*", default=[1, 64], help="(d): decode batches profiled")
    p.add_argument("--profile-top", type=int, default=25, help="(d): kernels printed per weights kind")
    p.add_argument("--skip-real", action="store_true", help="skip (c), the real-dims cut")
    p.add_argument("--workdir", help="where the checkpoints are written (default: a temporary folder)")
    p.add_argument("--tiny-cpu", action="store_true", help="smoke run: tiny configs on the CPU")
    a = p.parse_args(argv)
    if a.tiny_cpu:
        a.prefill, a.decode, a.decode_b64, a.batch = [32], [48], [24], 3
        # one profiled step: on the CPU, reading the profiler's events back is most of the smoke run's time
        a.steps, a.chunk, a.context, a.profile_context, a.profile_steps, a.profile_batch = 4, 16, 64, 32, 1, [1, 3]
        device, cfg, full = torch.device("cpu"), tiny_config(), dsv4.ModelConfig.preset("tiny")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU: run with --tiny-cpu for the CPU smoke run")
        device, cfg, full = torch.device("cuda"), flash4(), dsv4.ModelConfig.from_pretrained(FLASH_CONFIG)
    out_path = a.json or result_path("native_model", device=str(device))

    def save() -> None:   # after each section: a run stopped by a time limit keeps what it measured
        with open(out_path, "w") as f:
            json.dump(doc, f, indent=1, default=str)
    workdir = a.workdir or tempfile.mkdtemp(prefix="native_model_")
    os.makedirs(workdir, exist_ok=True)
    doc: dict = {**record(str(device)), "torch": torch.__version__, "args": vars(a)}
    t_start = time.perf_counter()
    try:
        torch.manual_seed(0)
        src = build_model(cfg, str(device))
        path = os.path.join(workdir, "model")
        disk = write_official(src, path)
        del src
        print(f"checkpoint: {disk['disk_bytes'] / GIB:.3f} GiB written in {disk['write_s']:.1f} s", flush=True)
        models, mem = memory_section(path, disk["disk_bytes"], device)
        doc["memory"] = {**disk, **mem}
        doc["section_seconds"] = {"memory": time.perf_counter() - t_start}
        save()
        if not a.skip_speed:
            res: list = []
            speed_section(models, a, res)
            doc["speed"], doc["ratios"] = res, speed_ratios(res)
            doc["section_seconds"]["speed"] = time.perf_counter() - t_start - sum(doc["section_seconds"].values())
            save()
        if a.profile:
            doc["profile"] = profile_section(models, a)
            save()
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not a.skip_real:
            t_real = time.perf_counter()
            doc["real"] = real_section(full, workdir, device, a)
            doc["section_seconds"]["real"] = time.perf_counter() - t_real
    finally:
        if not a.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    doc["seconds"] = time.perf_counter() - t_start
    save()
    print_table(doc)
    if doc.get("profile"):
        print_profile(doc["profile"], a.profile_top)
    print(f"results: {out_path}  ({doc['seconds']:.0f} s)")
    return doc


if __name__ == "__main__":
    main()

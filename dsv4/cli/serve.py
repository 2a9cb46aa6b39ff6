"""Serve a checkpoint over an OpenAI-compatible HTTP API (completions, chat with V4 thinking and tools,
SSE streaming, Prometheus metrics), batching the requests continuously on one device.

    dsv4 serve --checkpoint path/to/model --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 64}'

Needs the serving packages: pip install 'dsv4[serve]'.
"""
from __future__ import annotations

import argparse
import os
import sys

SWITCH_INTERVAL_S = 0.0005   # the GIL hand-over interval `dsv4 serve` sets (--switch-interval)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="directory with config.json, safetensors, tokenizer.json")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (the GPU if there is one)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="compute dtype (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--weights", default="auto", choices=["auto", "native", "bf16"],
                   help="how an official FP8 / FP4 checkpoint's weights are held: native (the checkpoint's bytes, "
                        "dequantised in the GEMMs' registers) or bf16 (dequantised at load); auto: native on a GPU "
                        "in bf16, bf16 otherwise")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=64, help="cache rows: requests decoded together")
    p.add_argument("--max-seq-len", type=int, default=4096, help="context of each row (prompt + max_tokens)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond it are refused (HTTP 429)")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="prompt tokens of one request per prefill chunk")
    p.add_argument("--step-token-budget", type=int, default=8192,
                   help="tokens one engine step feeds: one per decoding request, the rest prompt chunks")
    p.add_argument("--max-prefill-rows", type=int, default=16,
                   help="requests whose prompt chunks one prefill forward batches (with --batch-invariant off)")
    p.add_argument("--kv-dtype", default="auto", choices=["auto", "fp32", "bf16", "fp8"])
    p.add_argument("--index-dtype", default="auto", choices=["auto", "fp32", "bf16", "fp8", "fp4"])
    p.add_argument("--prefix-cache-gb", type=float, default=None,
                   help="memory for cached prompt prefixes on the model's device (default: 4 on a GPU, 0 on a CPU; "
                        "0 turns the device tier off)")
    p.add_argument("--prefix-host-gb", type=float, default=2.0,
                   help="host-RAM tier behind the device tier (0: off)")
    p.add_argument("--prefix-block", type=int, default=None,
                   help="prefix-cache save interval in tokens (default: --prefill-chunk). A prefill stops at every "
                        "save point, so a block shorter than the chunk multiplies the forwards of a cold prompt "
                        "(32K tokens: 128 forwards at 256 against 16); a hit recomputes at most block - 1 tokens "
                        "past the last save point it shares, and a prompt's own end (n - 1) is always saved, so "
                        "later turns of a conversation hit it exactly")
    p.add_argument("--prefix-store", metavar="DIR", help="on-disk prefix tier behind the memory tiers")
    p.add_argument("--no-prefix-cache", action="store_true", help="prefill every prompt from scratch")
    p.add_argument("--speculative", choices=["mtp"], help="speculative decoding with the model's MTP block")
    p.add_argument("--num-draft", type=int, default=1,
                   help="tokens the MTP block drafts per step with --speculative mtp (more: longer verify steps)")
    p.add_argument("--batch-invariant", choices=["auto", "on", "off"], default="auto",
                   help="run each request as if it ran alone (its tokens never depend on its neighbours; prompts are "
                        "then prefilled one per forward). auto: on a CPU, off on a GPU, where today's batch-invariant "
                        "kernels cost ~10x in decode speed")
    p.add_argument("--overlap", choices=["auto", "on", "off"], default="auto",
                   help="launch each decode step from the previous step's tokens on the device before handing those "
                        "tokens out, so the host's per-step work runs while the device computes (a request that ends "
                        "costs its row one extra step; tokens are the same). auto: on with a GPU; never with "
                        "--speculative")
    p.add_argument("--prefill-graphs", type=int, default=0, metavar="N",
                   help="run prompt chunks of one request up to N tokens (at most 128 and the attention window) as "
                        "padded steps replayed from CUDA graphs captured per cache row and size (16, 32, 64, 128), "
                        "cold prompts' and prefix-cache hits' alike: a hit's short suffix without an eager forward's "
                        "launches. 0 (default): off")
    p.add_argument("--trace", metavar="FILE",
                   help="write one JSON line per engine step (its time, host part, waits, rows, prompt tokens, idle "
                        "time before it); summarise with python bench/engine_trace.py FILE")
    p.add_argument("--no-warm-up", action="store_true",
                   help="start serving at once instead of first running the shapes serving meets (prompt chunks of "
                        "one and many rows, every CUDA-graph batch bucket) so that kernel compilation and graph "
                        "capture do not land on the first requests (seconds on a GPU; the time is logged)")
    p.add_argument("--model-name", help="the model id clients send (default: the checkpoint directory's name)")
    p.add_argument("--switch-interval", type=float, default=SWITCH_INTERVAL_S,
                   help="seconds a Python thread may hold the GIL while another waits (sys.setswitchinterval; "
                        "Python's default is 0.005). The engine thread gives the GIL up at every device sync and "
                        "waits up to this long to get it back while the HTTP event loop is busy, so the default "
                        "5 ms could add most of a decode step per sync")


def _serving_packages():
    """(uvicorn, build_app), or a one-line ImportError naming the extra to install."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ImportError(f"dsv4 serve needs {e.name}; install the serving extra: pip install 'dsv4[serve]'") from None
    from ..serve.api import build_app
    return uvicorn, build_app


def _prefix_cache(args: argparse.Namespace, model, device, tok):
    """The cross-request prefix cache the flags ask for. A server's weights do not change under it, so entries
    are keyed by the fingerprint taken once at start (verify_model=False) instead of one pass over the weights
    per hit. A prompt ending in `<think>` is also saved without it: the chat template writes `</think>` there in
    the next turn's prompt."""
    from ..errors import InvalidArgument
    from ..generate.chat import THINK_START
    from ..generate.prefix_store import PrefixStore
    from ..serve.prefix_cache import PrefixCache
    device_gb = args.prefix_cache_gb if args.prefix_cache_gb is not None else (4.0 if device.type == "cuda" else 0.0)
    for flag, v in (("--prefix-cache-gb", device_gb), ("--prefix-host-gb", args.prefix_host_gb)):
        if not v >= 0:
            raise InvalidArgument(f"{flag}={v}: must be a size in GB >= 0")
    store = PrefixStore(args.prefix_store, model) if args.prefix_store else None
    return PrefixCache(model, int(device_gb * 2**30), int(args.prefix_host_gb * 2**30), store=store,
                       block=args.prefix_block or args.prefill_chunk, verify_model=False,
                       split_before=[t for t in (tok.token_id(THINK_START),) if t is not None])


def run(args: argparse.Namespace) -> int:
    uvicorn, build_app = _serving_packages()
    from ..errors import InvalidArgument
    for name in ("port", "max_batch", "max_seq_len", "max_queue", "num_draft", "prefill_chunk", "step_token_budget",
                 "max_prefill_rows", "prefix_block"):
        if getattr(args, name) is not None and getattr(args, name) < 1 or (name == "port" and args.port > 65535):
            raise InvalidArgument(f"--{name.replace('_', '-')}={getattr(args, name)}: out of range")
    if not args.switch_interval > 0:
        raise InvalidArgument(f"--switch-interval={args.switch_interval}: must be > 0 seconds")
    import torch

    from ..checkpoint import load_model, resolve_device
    from ..generate import Tokenizer
    from ..serve.engine import Engine

    device = resolve_device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = load_model(args.checkpoint, device=device, dtype=dtype,
                       weights=None if args.weights == "auto" else args.weights)
    tok = Tokenizer.from_dir(args.checkpoint)
    prefix_cache = None if args.no_prefix_cache else _prefix_cache(args, model, device, tok)
    engine = Engine(model, tok, max_batch=args.max_batch, max_seq_len=args.max_seq_len, kv_dtype=args.kv_dtype,
                    index_dtype=args.index_dtype, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                    step_token_budget=args.step_token_budget, max_prefill_rows=args.max_prefill_rows,
                    eos_token_ids=tuple(t for t in (tok.eos_id,) if t is not None), speculative=args.speculative,
                    n_draft=args.num_draft, overlap=None if args.overlap == "auto" else args.overlap == "on", trace=args.trace,
                    cuda_graphs=device.type == "cuda", prefix_cache=prefix_cache, prefill_graphs=args.prefill_graphs,
                    batch_invariant=args.batch_invariant == "on" or (args.batch_invariant == "auto"
                                                                     and device.type != "cuda"))
    name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint))
    sys.setswitchinterval(args.switch_interval)
    if not args.no_warm_up:
        print(f"dsv4 serve: warm-up took {engine.warm_up():.2f} s", file=sys.stderr, flush=True)
    engine.start()
    try:
        uvicorn.run(build_app(engine, tok, name), host=args.host, port=args.port, log_level="info")
    finally:
        engine.stop()
    return 0

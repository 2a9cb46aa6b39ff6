"""Generate text from a checkpoint, printing it as it is produced, then the speed.

    dsv4 generate --checkpoint path/to/model --prompt "def fibonacci(n):" --max-new-tokens 64
    dsv4 generate --checkpoint path/to/model --prompt "Hello" --chat --temperature 0.7 --top-p 0.95
"""
from __future__ import annotations

import argparse
import sys
import time

from ..errors import InvalidArgument


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="directory with config.json, safetensors, tokenizer.json")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (the GPU if there is one)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="compute dtype (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--weights", default="auto", choices=["auto", "native", "bf16"],
                   help="how an official FP8 / FP4 checkpoint's weights are held: native (the checkpoint's bytes, "
                        "dequantised in the GEMMs' registers) or bf16 (dequantised at load); auto: native on a GPU "
                        "in bf16, bf16 otherwise")
    p.add_argument("--kv-dtype", default="auto", choices=["auto", "fp32", "bf16", "fp8"])
    p.add_argument("--index-dtype", default="auto", choices=["auto", "fp32", "bf16", "fp8", "fp4"])
    p.add_argument("--quant-sim", action="store_true", help="the reference's FP8-KV/FP4-indexer simulation")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the V4 chat format (one user turn)")
    p.add_argument("--thinking", action="store_true", help="with --chat: thinking mode")
    p.add_argument("--prefix-store", metavar="DIR", help="reuse / save prompt prefixes on disk")


def load(args: argparse.Namespace):
    """(model, tokenizer, prefix store or None) as the flags ask; the sampling flags are checked first."""
    import torch

    from ..checkpoint import load_model, resolve_device
    from ..generate import SamplingConfig, Tokenizer
    from ..generate.sampling import check_generation_args

    SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    check_generation_args(args.max_new_tokens, args.seed)
    device = resolve_device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = load_model(args.checkpoint, device=device, dtype=dtype,
                       weights=None if args.weights == "auto" else args.weights).set_quant_sim(args.quant_sim)
    tok = Tokenizer.from_dir(args.checkpoint)
    store = None
    if getattr(args, "prefix_store", None):
        from ..generate import PrefixStore
        store = PrefixStore(args.prefix_store, model)
    return model, tok, store


def stream_text(model, tok: Tokenizer, ids: list[int], args: argparse.Namespace, store=None, out=sys.stdout):
    """Generate from `ids`, writing decoded text as it grows. Returns (new ids, seconds, prefill seconds)."""
    from ..generate import generate_stream
    from ..generate.detokenize import StreamDecoder

    new: list[int] = []
    stream = StreamDecoder(tok, skip_special=True)
    t0 = time.perf_counter()
    t_first = None
    stops = [t for t in (tok.eos_id,) if t is not None]
    for step in generate_stream(model, [ids], args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, stop_tokens=stops, kv_dtype=args.kv_dtype,
                                index_dtype=args.index_dtype, progress=True, prefix_store=store):
        if t_first is None:
            t_first = time.perf_counter() - t0
        if step[0] is None:
            break
        new.append(step[0])
        piece = stream.push(step[0])
        if piece:
            out.write(piece)
            out.flush()
    out.write(stream.flush())
    return new, time.perf_counter() - t0, t_first or 0.0


def run(args: argparse.Namespace) -> int:
    model, tok, store = load(args)
    text = args.prompt
    if args.chat:
        from ..generate.chat import encode_chat
        text = encode_chat([{"role": "user", "content": args.prompt}], thinking=args.thinking)
    ids = tok.encode(text)
    if not ids:
        raise InvalidArgument("the prompt encodes to no tokens")
    print(args.prompt if not args.chat else "", end="", flush=True)
    new, secs, first = stream_text(model, tok, ids, args, store)
    decode = max(secs - first, 1e-9)
    print(f"\n[{len(ids)} prompt tokens, {len(new)} new tokens; prefill {first:.2f} s; "
          f"decode {max(len(new) - 1, 0) / decode:.1f} tok/s]", file=sys.stderr)
    if store is not None:
        print(store.activity.report(len(ids), args.prefix_store), file=sys.stderr)
    return 0

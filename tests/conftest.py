"""Shared test helpers: tiny random `transformers` DeepseekV4 checkpoints (the parity oracle) and
tensor comparisons that name the tensor that failed."""
from __future__ import annotations

import math
import os

import pytest
import torch

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
os.environ.setdefault("DSV4_TRITON_STRICT", "1")  # a Triton kernel that fails to build fails its test, no fallback
if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's interpreter (tests/ops/triton). Triton reads the flag when a
    # kernel is defined, so it is set here, before any test imports dsv4 (and with it the kernels). Elsewhere it
    # changes nothing on the CPU: the dispatcher gives the Triton kernels CUDA tensors only.
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    # One intra-op thread per xdist worker (and per process a test starts): the workers already fill the cores, and
    # the tests' tiny tensors gain nothing from a second thread, which mostly spins (tests/generate and tests/serve in
    # one process on 2 cores: 7% faster with one thread, half the CPU time). An OMP_NUM_THREADS the caller set is kept.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def assert_rel_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> float:
    """Relative max error max|got - want| / max|want| <= tol; returns the error."""
    err = ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-30)).item()
    assert err <= tol, f"{name}: relative max error {err:.3e} > {tol:.1e}"
    return err


def hf_config(layer_types, csa_rate=4, hca_rate=8, yarn=True, **kw):
    from transformers import DeepseekV4Config
    base = dict(vocab_size=97, hidden_size=64, moe_intermediate_size=32, num_attention_heads=4, head_dim=32,
                q_lora_rank=24, num_experts_per_tok=2, n_routed_experts=6, o_groups=2, o_lora_rank=16,
                index_n_heads=16, index_head_dim=16, index_topk=3, sliding_window=8, partial_rotary_factor=0.25,
                num_hash_layers=1, max_position_embeddings=4096)
    base.update(kw)
    if yarn:
        base["rope_scaling"] = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 64,
                                "beta_fast": 32, "beta_slow": 1}
    return DeepseekV4Config(num_hidden_layers=len(layer_types), layer_types=list(layer_types),
                            compress_rates={"compressed_sparse_attention": csa_rate,
                                            "heavily_compressed_attention": hca_rate}, **base)


def randomize_hf(model, seed: int = 0) -> None:
    """Non-trivial random weights (not the default init): every tensor gets its own random values."""
    g = torch.Generator().manual_seed(seed)
    n_experts = model.config.n_routed_experts
    with torch.no_grad():
        for n, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in n:
                continue
            if n.endswith("tid2eid"):
                p.copy_(torch.rand(p.shape[0], n_experts, generator=g).argsort(-1)[:, : p.shape[1]])
            elif n.endswith(("hc_fn", ".fn")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            elif "norm" in n:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:  # sinks, biases, hc base/scale, position_bias
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.fixture(scope="session")
def hf_available():
    return pytest.importorskip("transformers")


class InjectedFailure(RuntimeError):
    """The failure `fail_on_call` injects (a stand-in for e.g. running out of memory midway through a forward)."""


def fail_on_call(monkeypatch, module: torch.nn.Module, call: int = 1, when=None) -> None:
    """Make `module`'s forward raise InjectedFailure on its `call`-th call from now (counting only the calls for
    which `when()` is true, if given); every other call runs normally. Undone with the monkeypatch."""
    forward, seen = module.forward, [0]

    def failing(*args, **kwargs):
        if when is None or when():
            seen[0] += 1
            if seen[0] == call:
                raise InjectedFailure(f"injected failure in {type(module).__name__} (call {call})")
        return forward(*args, **kwargs)

    monkeypatch.setattr(module, "forward", failing)


def random_prompts(model, lengths, seed: int) -> list[list[int]]:
    """Token-id prompts of these lengths, drawn from the model's vocabulary by one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]


def read_tensors(cache) -> list[torch.Tensor]:
    """Every cache byte a later step reads: positions, window rings, compressor states, and the entry / index-key
    rows below each row's length (rows past it may keep what a rejected speculative token wrote: dsv4.cache.rollback
    leaves them, since every read masks them by position)."""
    out = [cache.positions]
    for layer in cache.layers:
        out += [layer.window_rows.buf] + [x for st in layer.states() for x in (st.kv, st.score)]
        out += [s.buf[b, :n // layer.ratio] for s in (layer.entry_rows, layer.key_rows) if s is not None
                for b, n in enumerate(cache.lengths())]
    return out


def agreeing_model():
    """A model whose MTP block predicts what the main model will: every block's output is scaled down (the main
    model is close to a bigram model of the current token) and the MTP block passes the embedding of token t+1
    through (e_proj = I, h_proj = 0) to the main model's collapse, so its draft for t+2 is nearly the main
    model's prediction at t+1; attention still writes (and reads) every part of the cache."""
    import dsv4  # here, not at the top: this file sets TRITON_INTERPRET before anything imports dsv4
    cfg = dsv4.ModelConfig.preset("tiny")
    m = dsv4.Transformer(cfg).init_weights(seed=4).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("wo_b.weight", "w2", "w2.weight")):
                p.mul_(0.05)
        blk = m.mtp[0]
        blk.e_proj.weight.copy_(torch.eye(cfg.dim))
        blk.h_proj.weight.zero_()
        for n in ("hc_head_fn", "hc_head_base", "hc_head_scale"):
            getattr(blk, n).copy_(getattr(m, n))
    return m


def stdlib_corpus(directory, chars: int, docs: int) -> str:
    """Write the first `docs` standard-library sources (of `chars` characters in all) as text files into
    `directory`, the training tests' corpus; returns the folder as a string."""
    from dsv4.train.data import stdlib_sources
    for doc in stdlib_sources(chars)[:docs]:
        (directory / doc.name.replace("/", "_")).write_text(doc.text)
    return str(directory)


def engine_outputs(model, prompts, params, max_batch: int = 8, **engine_kw):
    """(engine, per request [(token, logprob)]): the requests submitted with a step after every second one, so
    later requests join a batch that is already decoding, then run until idle."""
    from dsv4.serve.engine import Engine
    engine = Engine(model, max_batch=max_batch, max_seq_len=128, prefill_chunk=16, step_token_budget=32, **engine_kw)
    handles = []
    for i, p in enumerate(prompts):
        handles.append(engine.submit(p, params))
        if i % 2:
            engine.step()
    engine.run_until_idle()
    return engine, [[(e.token, e.logprob) for e in h] for h in handles]

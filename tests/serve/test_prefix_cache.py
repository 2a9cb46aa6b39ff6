"""Prefix caching across requests: a hit restores the saving row's exact bytes, so the logits equal a cold
prefill; a prompt stored whole hits whole (its logits stored with it); short prompts and chat turns hit; LRU tiers
demote, drop and spill to the disk store; another model misses."""
import copy

import pytest
import torch

import dsv4
from dsv4.cache.row_state import GROWING, row_state
from dsv4.errors import InvalidArgument
from dsv4.generate import PrefixStore
from dsv4.generate.chat import encode_chat
from dsv4.serve.prefix_cache import PrefixCache
from dsv4.train.tokenizer import train_bpe
from conftest import assert_rel_close

SEQ = 1024


@pytest.fixture(scope="module")
def model():
    return dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=1).eval()


def _ids(model, tokens):
    return torch.tensor([tokens], device=model.embed.weight.device)


def _tokens(n, seed):
    return torch.randint(0, 2048, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def _serve(model, pc, tokens, new_tokens=0, eos=None, kv=("auto", "auto"), history=None, forced=None):
    """What the engine does for one request: load (the whole prompt when it is stored with its logits),
    prefill stopping at the boundaries to save (each with the logits of its last token), greedy decode, save at
    the end. Returns (tokens reused, logits after the prompt, generated tokens, the row). `history` (saved
    tokens -> the ends of the chunks that computed them) lets a test recompute a state in the same chunks;
    `forced`: the tokens to emit instead of the greedy ones (a reply the model is made to give)."""
    history = {} if history is None else history
    row = model.new_cache(1, SEQ, *kv)
    n, tail = pc.load_full(row, tokens)
    assert (tail is not None) == (n == len(tokens))
    logits, start = tail["logits"][None] if tail else None, n
    splits = list(history.get(tuple(tokens[:n]), [])) + ([n] if n and n < len(tokens) else [])
    for stop in [b for b in pc.boundaries(len(tokens), tokens[-1]) if b > n]:
        logits = model(_ids(model, tokens[start:stop]), cache=row)[:, -1]
        pc.save(row, tokens[:stop], tail={"logits": logits[0]})
        history.setdefault(tuple(tokens[:stop]), list(splits))
        if stop < len(tokens):
            splits.append(stop)
        start = stop
    first, out = logits, []
    for _ in range(new_tokens):
        out.append(int(logits.argmax(-1)) if forced is None else forced[len(out)])
        if out[-1] == eos or len(out) == new_tokens:
            break
        splits.append(len(tokens) + len(out) - 1)
        logits = model(_ids(model, [out[-1]]), cache=row)[:, -1]
    if out:
        pc.save(row, tokens + out[:-1])  # the row holds everything but the last token sampled
        history.setdefault(tuple(tokens + out[:-1]), splits)
    return n, first, out, row


def _held(pc, tokens, kv=("auto", "auto")):
    """How much of `tokens` a lookup restores (all of them when stored whole with their logits)."""
    return pc.load_full(pc.model.new_cache(1, SEQ, *kv), tokens)[0]


@torch.no_grad()
def _cold(model, tokens, split=(), kv=("auto", "auto")):
    """Last-token logits of a fresh row, the prompt computed in chunks ending at `split` and at the end."""
    row, start = model.new_cache(1, SEQ, *kv), 0
    for stop in sorted({*split, len(tokens)} - {0}):
        logits = model(_ids(model, tokens[start:stop]), cache=row)[:, -1]
        start = stop
    return logits, row


@pytest.mark.parametrize("kv", [("auto", "auto"), ("fp8", "fp4")])
def test_hit_restores_the_same_bytes_and_logits(model, kv):
    pc = PrefixCache(model, 1 << 30, 1 << 30, block=64)
    a = _tokens(300, 0)
    _serve(model, pc, a, kv=kv)
    b = a[:200] + _tokens(37, 1)
    pc_row = model.new_cache(1, SEQ, *kv)
    assert pc.load(pc_row, b) == 192  # the last block boundary inside the shared 200 tokens
    # the bytes of a row that computed the same 192 tokens in the same chunks (a's prefill stopped every 64)
    want, have = row_state(_cold(model, b[:192], split=[64, 128], kv=kv)[1], 192), row_state(pc_row, 192)
    assert all(torch.equal(want[k].view(torch.uint8), have[k].view(torch.uint8)) for k in want)
    n, warm, _, _ = _serve(model, pc, b, kv=kv)
    assert n == 192
    # bitwise equal to a cold prefill computed in the same chunks (one forward after the hit), and close to a
    # one-shot one
    assert [b_ for b_ in pc.boundaries(len(b)) if b_ > 192] == [len(b)]
    assert torch.equal(warm, _cold(model, b, split=[64, 128, 192], kv=kv)[0])
    # (fp8 records: a chunk attends to its own tokens unrounded, to earlier chunks' rounded, so any chunked
    # prefill differs from a one-shot one by the rounding, cached or not)
    tol = 1e-5 if kv == ("auto", "auto") else 5e-2
    assert_rel_close("hit vs one-shot cold prefill", warm, _cold(model, b, kv=kv)[0], tol)


def test_short_prompts_hit_when_repeated_or_extended(model):
    pc = PrefixCache(model, 1 << 30, 1 << 30, block=256)
    p = _tokens(20, 2)
    n0, first, _, _ = _serve(model, pc, p)
    assert n0 == 0 and pc.boundaries(20) == [20]
    assert pc.boundaries(0) == [] and pc.boundaries(1) == [1] and pc.boundaries(600) == [256, 512, 600]
    split = PrefixCache(model, 1 << 30, 1 << 30, block=256, split_before=[5])
    assert split.boundaries(600, 5) == [256, 512, 599, 600] and split.boundaries(600, 6) == [256, 512, 600]
    row = model.new_cache(1, SEQ)
    n1, tail = pc.load_full(row, p)  # the same prompt: all of it and its logits come from the cache
    assert n1 == 20 and row.lengths() == [20] and torch.equal(tail["logits"], first[0])
    _, again, out, _ = _serve(model, pc, p, new_tokens=3)   # and it decodes on from there as the cold row does
    row = _cold(model, p)[1]
    want = [int(first.argmax(-1))]
    for _ in range(2):
        want.append(int(model(_ids(model, want[-1:]), cache=row)[:, -1].argmax(-1)))
    assert torch.equal(again, first) and out == want
    assert pc.load(model.new_cache(1, SEQ), p) == 0   # `load` always leaves a token to compute
    for ext in (p + _tokens(1, 3), p + _tokens(3, 4)):   # extended by one token, by a short suffix: one forward
        n2, warm, _, _ = _serve(model, pc, ext)
        assert n2 == 20 and torch.equal(warm, _cold(model, ext, split=[20])[0])
    s = pc.stats()
    assert s["lookups"] == 6 and s["hits"] == 4 and s["hit_tokens"] == 20 * 4  # a whole hit counts every token
    assert s["lookup_tokens"] == 20 * 4 + 21 + 23


def test_generation_end_save_lets_the_continuation_hit(model):
    pc = PrefixCache(model, 1 << 30, 1 << 30, block=256)
    p = _tokens(30, 4)
    _, _, out, _ = _serve(model, pc, p, new_tokens=6)
    nxt = p + out + _tokens(5, 5)
    n, warm, _, _ = _serve(model, pc, nxt)
    assert n == 35  # prompt + 5 of the 6 generated tokens (the last one was sampled, never fed)
    assert torch.equal(warm, _cold(model, nxt, split=[30, *range(31, 36)])[0])
    held = p + out[:-1]   # that entry has no logits: exactly its tokens recompute from the prompt's entry
    for _ in range(2):    # (and keep doing so: a tail computed in other chunks than the state is not stored)
        n, warm, _, _ = _serve(model, pc, held)
        assert n == 30 and torch.equal(warm, _cold(model, held, split=[30])[0])


def test_block_saves_keep_only_what_grew_and_restore_exactly(model, tmp_path):
    """A long prompt saved at every block: each entry after the first holds only the compressed entries past its
    parent's (memory linear in the length, not quadratic); a hit at any boundary puts the pieces back exactly;
    an evicted ancestor takes its descendants along (never a restore with a piece missing), and the store gets
    whole states."""
    pc = PrefixCache(model, 1 << 30, 1 << 30, block=32)
    p = _tokens(300, 40)
    _serve(model, pc, p)
    whole = sum(t.nbytes for t in row_state(_cold(model, p)[1], 300).values())
    fixed = sum(t.nbytes for k, t in row_state(_cold(model, p[:31])[1], 31).items() if not k.endswith(GROWING))
    logits = 4 * model.config.vocab_size   # each entry's tail: the fp32 logits of its last token
    s = pc.stats()
    assert s["entries"]["device"] == 10  # 32, 64, ..., 288 and 300
    stored = [*range(32, 300, 32), 300]
    full_states = sum(sum(t.nbytes for t in row_state(_cold(model, p[:b])[1], b).values()) for b in stored)
    assert s["bytes"]["device"] == whole + 9 * fixed + 10 * logits < full_states   # (vs whole-state entries)
    for cut in (33, 64, 200, 299, 300):
        q = p[:cut] + [7]
        n, warm, _, _ = _serve(model, pc, q)
        assert n == max(b for b in stored if b <= cut)
        split = [b for b in stored if b <= n] + [b for b in pc.boundaries(len(q)) if b > n]
        assert torch.equal(warm, _cold(model, q, split=split)[0])
    for cut in (64, 300):   # a stored prefix asked for exactly: restored whole, with its logits
        n, warm, _, _ = _serve(model, pc, p[:cut])
        assert n == cut and torch.equal(warm, _cold(model, p[:cut], split=[b for b in stored if b < cut])[0])
    store = PrefixStore(tmp_path / "spill", model)
    small = PrefixCache(model, 0, whole, store=store, block=32)
    _serve(model, small, p)
    _serve(model, small, _tokens(300, 41))       # pushes p's oldest entries out: their descendants go too
    held = {k for tier in small._tiers.values() for k in tier}
    assert 0 < len(held) < 20 and small.stats()["host_evictions"] > 0
    assert all(e.key in held for k in held for e in small._tiers["host"][k].chain())  # no chain with a gap
    n = small.load(model.new_cache(1, SEQ), p)
    assert n in (0, *store.lengths()) or any(small._tiers["host"][k].n == n for k in held)
    assert max(store.activity.saved) == 300      # spilled whole (logits too), read back exactly
    fresh = PrefixCache(model, 1 << 30, 1 << 30, store=store, block=32)
    n, warm, _, _ = _serve(model, fresh, p + [5])
    assert n == 300 and torch.equal(warm, _cold(model, p + [5], split=stored)[0])
    fresh = PrefixCache(model, 1 << 30, 1 << 30, store=store, block=32)
    n, warm, _, _ = _serve(model, fresh, p)
    assert n == 300 and fresh.stats()["store_hits"] == 1 and torch.equal(warm, _cold(model, p, split=stored)[0])


def test_store_files_without_logits_serve_only_longer_prompts(model, tmp_path):
    """Files written without a tail (`PrefixStore.save`, or before tails existed) load as before: a prompt of
    exactly their tokens falls back to a shorter one and computes the rest."""
    store = PrefixStore(tmp_path, model)
    p = _tokens(40, 45)
    with torch.no_grad():
        for n in (39, 40):
            store.save(_cold(model, p[:n])[1], p[:n])
    pc = PrefixCache(model, 1 << 30, 1 << 30, store=store, block=256)
    n, warm, _, _ = _serve(model, pc, p)
    assert n == 39 and torch.equal(warm, _cold(model, p, split=[39])[0])
    n, warm, _, _ = _serve(model, pc, p)   # the first request's own save at 40 (in memory) has them
    assert n == 40 and torch.equal(warm, _cold(model, p, split=[39])[0])
    n, warm, _, _ = _serve(model, PrefixCache(model, 1 << 30, 1 << 30, store=store, block=256), p + [3])
    assert n == 40 and torch.equal(warm, _cold(model, p + [3], split=[40])[0])   # the old file serves longer ones


TEXT = ["Hello there, how are you?\n", "I am fine, thank you. What is the capital of France?\n",
        "Paris is the capital of France.\n", "def f(x):\n    return x * 2\n"] * 30
USER = ["Hello there, how are you?", "What is the capital of France?", "And of Italy?",
        "Write def f(x): return x * 2", "Thank you, that is all."]


@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory):
    tok = train_bpe(TEXT, 400, tmp_path_factory.mktemp("tok"))
    cfg = dsv4.ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size)
    return dsv4.Transformer(cfg).init_weights(seed=4).eval(), tok


REPLIES = ["I am fine, thank you.", "Paris is the capital of France.", "Rome is the capital of Italy.",
           "def f(x):\n    return x * 2", "You are welcome."]


@pytest.mark.parametrize("replies", ["model", "text"])
@pytest.mark.parametrize("thinking", [False, True])
def test_multi_turn_chat_replay_hits_and_matches_cold(chat_setup, thinking, replies):
    """Five turns, each prompt the official encoding of the conversation so far with the previous replies as the
    client sends them back: the random model's own replies (arbitrary bytes, which need not re-tokenize to the
    tokens generated), or well-formed text replies the model is made to give."""
    model, tok = chat_setup
    # (a prompt ending in <think> is saved without it too: the next turn's prompt has </think> there)
    pc = PrefixCache(model, 1 << 30, 1 << 30, block=64, split_before=[tok.token_id("<think>")])
    messages = [{"role": "system", "content": "Be brief."}]
    per_turn, history = [], {}
    for turn, text in enumerate(USER):
        messages.append({"role": "user", "content": text})
        prompt = tok.encode(encode_chat(messages, thinking=thinking))
        forced = None
        if replies == "text":
            forced = tok.encode(("Let me think.</think>" if thinking else "") + REPLIES[turn]) + [tok.eos_id]
        n, warm, out, _ = _serve(model, pc, prompt, new_tokens=10 if forced is None else len(forced),
                                 eos=tok.eos_id, history=history, forced=forced)
        assert_rel_close(f"turn {turn + 1} hit vs one-shot cold", warm, _cold(model, prompt)[0], 1e-5)
        # bitwise: a cold prefill of the whole prompt in the chunks that built the reused state, then the rest
        split = [*history[tuple(prompt[:n])], n] if n else []
        split += [b for b in pc.boundaries(len(prompt), prompt[-1]) if b > n]
        assert torch.equal(warm, _cold(model, prompt, split=split)[0])
        per_turn.append((n, len(prompt), len(prompt) + len(out) - 1))
        reply_text = tok.decode([t for t in out if t != tok.eos_id])
        reply = {"role": "assistant", "content": reply_text}
        if thinking:
            reasoning, _, content = reply_text.partition("</think>")
            reply.update(content=content, reasoning_content=reasoning)
        messages.append(reply)
    s = pc.stats()
    print(f"\nmulti-turn replay (thinking={thinking}, {replies} replies): hit rate {s['hit_rate']:.1%} "
          f"({s['hit_tokens']}/{s['lookup_tokens']} prompt tokens); per turn (reused, prompt, held after reply): "
          f"{[t[:2] for t in per_turn]}")
    assert s["hit_rate"] > 0
    later = list(zip(per_turn[1:], per_turn))
    assert all(n >= prompt - 1 for (n, _, _), (_, prompt, _) in later)  # at least the previous prompt but 1
    if not thinking and replies == "text":  # append-only: the previous turn's whole state, reply included
        assert all(n == held for (n, _, _), (_, _, held) in later)


def test_lru_tiers_demote_drop_and_promote(model):
    prompts = [_tokens(40, 10 + i) for i in range(4)]
    with torch.no_grad():
        size = sum(t.nbytes for t in row_state(_cold(model, prompts[0])[1], 40).values())
    size += 4 * model.config.vocab_size   # (and its logits)
    pc = PrefixCache(model, size + size // 2, 2 * size + size // 2, block=256)  # one entry / two entries
    for p in prompts:
        _serve(model, pc, p)  # saves one entry (40 tokens) each
    s = pc.stats()
    assert s["entries"] == {"device": 1, "host": 2} and s["bytes"] == {"device": size, "host": 2 * size}
    assert s["device_evictions"] == 3 and s["host_evictions"] == 1
    assert _held(pc, prompts[0]) == 0                               # the oldest was dropped
    n, warm, _, _ = _serve(model, pc, prompts[1])                  # on the host: hits, back on the device
    assert n == 40 and torch.equal(warm, _cold(model, prompts[1])[0])
    s = pc.stats()
    assert s["entries"] == {"device": 1, "host": 2} and s["device_evictions"] == 4
    assert _held(pc, prompts[3]) == 40                              # demoted by the promotion, still held
    big = PrefixCache(model, size - 1, size - 1, block=256)          # larger than both budgets: not kept
    _serve(model, big, prompts[0])
    assert big.stats()["entries"] == {"device": 0, "host": 0} and _held(big, prompts[0]) == 0


def test_evicted_entries_spill_to_the_store_and_load_back(model, tmp_path):
    store = PrefixStore(tmp_path, model)
    p, q = _tokens(70, 20), _tokens(70, 21)
    with torch.no_grad():
        size = sum(t.nbytes for t in row_state(_cold(model, p)[1], 70).values()) + 4 * model.config.vocab_size
    pc = PrefixCache(model, size, size, store=store, block=256)
    _serve(model, pc, p)
    _serve(model, pc, q)
    _serve(model, pc, _tokens(70, 22))  # p leaves the host tier: written to the store
    assert pc.stats()["store_saves"] == 1 and store.activity.saved == [70]
    fresh = PrefixCache(model, size, size, store=store, block=256)  # empty memory, the same store
    n, warm, _, _ = _serve(model, fresh, p)
    assert n == 70 and fresh.stats()["store_hits"] == 1   # whole, with the logits written along
    assert torch.equal(warm, _cold(model, p)[0])
    assert fresh.stats()["entries"]["device"] == 1  # promoted into memory: the next hit does not read the disk
    assert _held(fresh, p) == 70 and fresh.stats()["store_hits"] == 1
    fresh.flush()  # what memory holds goes to the store (p is already there; nothing else is held)
    assert store.activity.saved == [70]


def test_a_changed_model_misses(model):
    m = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=1).eval()
    p = _tokens(50, 30)
    for verify in (True, False):
        pc = PrefixCache(m, 1 << 30, 1 << 30, block=256, verify_model=verify)
        _serve(m, pc, p)
        assert _held(pc, p) == 50
        with torch.no_grad():
            m.embed.weight[0, 0] += 1  # in place: autograd's version counter sees it
        assert _held(pc, p) == 0 and pc.stats()["entries"]["device"] == 0
        _serve(m, pc, p)
        m.embed.weight.data[0, 0] -= 1  # out of band: only a recomputed fingerprint sees it
        if not verify:
            assert _held(pc, p) == 50  # documented: the stamp cannot see a .data write
            pc.refresh()
        assert _held(pc, p) == 0
    pc = PrefixCache(m, 1 << 30, 1 << 30, block=256)
    _serve(m, pc, p)
    assert _held(pc, p, ("fp8", "fp4")) == 0  # another cache format: another key
    lazy = PrefixCache(m, 1 << 30, 1 << 30, block=256, verify_model=False)
    _serve(m, lazy, p)
    norm = copy.deepcopy(m.norm)
    with torch.no_grad():
        norm.weight.mul_(2)
    m.norm, old = norm, m.norm   # a module swapped in: its tensors are seen without a pass over the weights
    assert _held(lazy, p) == 0 and lazy.stats()["fingerprint_passes"] == 2
    m.norm = old


def test_steady_weights_reads_the_stamp_once_and_sees_a_change_at_the_next_block(model, monkeypatch):
    m = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=1).eval()
    pc = PrefixCache(m, 1 << 30, 1 << 30, block=256, verify_model=False)
    p, q = _tokens(50, 31), _tokens(40, 32)
    walks = []
    real = pc._weights_stamp
    monkeypatch.setattr(pc, "_weights_stamp", lambda: walks.append(1) or real())
    with pc.steady_weights():
        _serve(m, pc, p)
        _serve(m, pc, q)
        assert _held(pc, p) == 50 and _held(pc, q) == 40
    assert len(walks) == 1   # (without the block: one per load and save, here 6)
    with torch.no_grad():
        m.embed.weight[0, 0] += 1   # between blocks: the next block's first lookup sees it
    with pc.steady_weights():
        assert _held(pc, p) == 0 and pc.stats()["entries"]["device"] == 0
    assert len(walks) == 2
    _held(pc, p)
    assert len(walks) == 3   # outside a block: every lookup reads the stamp


def test_only_a_restore_pays_for_the_exact_model_check(model):
    pc = PrefixCache(model, 1 << 30, 1 << 30, block=256)
    p = _tokens(30, 40)
    _serve(model, pc, p)                     # the first use computes the fingerprint once
    assert pc.stats()["fingerprint_passes"] == 1
    assert _held(pc, _tokens(30, 41)) == 0
    assert pc.stats()["fingerprint_passes"] == 1  # a miss: no pass over the weights
    assert _held(pc, p) == 30
    assert pc.stats()["fingerprint_passes"] == 2  # a hit is checked against the model as it is now
    lazy = PrefixCache(model, 1 << 30, 1 << 30, block=256, verify_model=False)
    _serve(model, lazy, p)
    assert _held(lazy, p) == 30 and lazy.stats()["fingerprint_passes"] == 1


def test_bad_arguments_are_refused(model):
    with pytest.raises(InvalidArgument, match="device_bytes"):
        PrefixCache(model, -1, 0)
    with pytest.raises(InvalidArgument, match="block"):
        PrefixCache(model, 0, 0, block=0)
    pc = PrefixCache(model, 1 << 20, 1 << 20)
    with pytest.raises(InvalidArgument, match="one-row"):
        pc.load(model.new_cache(2, 64), [1, 2, 3])
    with pytest.raises(InvalidArgument, match="holds 0 tokens"):
        pc.save(model.new_cache(1, 64), [1, 2, 3])


def test_a_prefix_too_long_for_the_row_is_a_miss_and_kept(model):
    pc = PrefixCache(model, 1 << 30, 1 << 30, block=256)
    p = _tokens(300, 70)
    _serve(model, pc, p)
    short = model.new_cache(1, 64)
    assert pc.load(short, p) == 0 and short.lengths() == [0]
    assert _held(pc, p) == 300 and pc.load(model.new_cache(1, SEQ), p) == 256


def test_lookup_checks_only_the_lengths_under_the_query_blocks(model, monkeypatch):
    from dsv4.serve import prefix_cache
    pc = PrefixCache(model, 1 << 30, 1 << 30, block=8)
    shared = _tokens(16, 50)
    with torch.no_grad():
        for i in range(40):  # 40 prompts sharing 16 tokens, each saved at 8, 16, 24 and 26 tokens
            p = shared + _tokens(11, 100 + i)
            _serve(model, pc, p)
    keys = []
    real = prefix_cache._Chain.key
    monkeypatch.setattr(prefix_cache._Chain, "key", lambda self, n: keys.append(n) or real(self, n))
    assert pc.load(model.new_cache(1, SEQ), shared + _tokens(11, 999)) == 16
    # the query's third block is new: only the lengths under its second-block node are tried (one key)
    assert keys == [16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv", [("auto", "auto"), ("fp8", "fp4")])
def test_cuda_tiers_pin_host_entries_and_hits_stay_exact(kv):
    m = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=1).eval().cuda()
    prompts = [_tokens(300, 60 + i) for i in range(3)]
    with torch.no_grad():
        size = sum(t.nbytes for t in row_state(_cold(m, prompts[0], kv=kv)[1], 300).values())
    size += 4 * m.config.vocab_size
    pc = PrefixCache(m, size, 8 * size, block=256)  # the device tier holds one whole 300-token state
    for p in prompts:
        _serve(m, pc, p, kv=kv)
    host = [e for e in pc._tiers["host"].values()]
    assert host and all(t.is_pinned() for e in host for t in e.state.values())
    for p in prompts:  # from the host (copied back in stream order) and from the device
        for q, split in ((p, [256]), (p[:290] + [7], [256])):   # whole, and a prefix of the chain + one token
            n, warm, _, _ = _serve(m, pc, q, kv=kv)
            assert n == (300 if q == p else 256) and torch.equal(warm, _cold(m, q, split=split, kv=kv)[0])

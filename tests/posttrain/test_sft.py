"""SFT: the loss reads the assistant's tokens only, packing changes nothing, a few steps learn the data."""
import json

import pytest
import sft_fixtures as fx
import torch

import dsv4
from dsv4.posttrain.chat_data import Example, encode_conversation, with_tools
from dsv4.posttrain.packing import make_batch
from dsv4.posttrain.sft import SFTConfig, sft_loss, train_sft


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return fx.tokenizer(tmp_path_factory.mktemp("tok"))


def _model(tok, seed=2):
    cfg = dsv4.ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size)
    return dsv4.Transformer(cfg).init_weights(seed=seed).train()


def _examples(tok, convs=(fx.PLAIN, fx.THINKING)):
    return [encode_conversation(tok, with_tools(c["messages"], c.get("tools")), c.get("thinking", False))
            for c in convs]


def _loss_and_grads(model, rows):
    model.zero_grad(set_to_none=True)
    loss, _ = sft_loss(model, make_batch(rows, len(model.mtp), pad_id=0))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _relative_change(a: dict, b: dict) -> float:
    """|b - a| / |a| over all the gradients as one vector."""
    diff = sum(float((b[n] - a[n]).double().pow(2).sum()) for n in a)
    return (diff / sum(float(a[n].double().pow(2).sum()) for n in a)) ** 0.5


def test_masked_tokens_contribute_nothing(tok):
    """A conversation that goes on after its last assistant turn with a user turn (masked out): changing those
    tokens leaves the loss and every gradient unchanged up to rounding (the MoE groups tokens by expert,
    so the masked tokens' routing reorders sums of exact zeros and real terms); masking them in, or changing
    an assistant token, changes both."""
    model = _model(tok)
    ex = _examples(tok, [{"messages": fx.PLAIN["messages"] + [{"role": "user", "content": "thanks a lot"}]}])[0]
    tail = len(ex.tokens) - ex.mask[::-1].index(1)   # first position after the last assistant token
    assert tail < len(ex.tokens) - 3 and not any(ex.mask[tail:])
    loss, grads = _loss_and_grads(model, [[ex]])

    other = Example(ex.tokens[:tail] + [(t + 7) % tok.vocab_size for t in ex.tokens[tail:]], ex.mask)
    loss2, grads2 = _loss_and_grads(model, [[other]])
    assert grads.keys() == grads2.keys()   # equal up to rounding: the MoE's expert grouping changes with them
    torch.testing.assert_close(loss, loss2, rtol=1e-6, atol=0)
    assert _relative_change(grads, grads2) < 1e-6

    trained = Example(ex.tokens, ex.mask[:tail] + [1] * (len(ex.tokens) - tail))   # the same tail, masked in
    assert not torch.equal(_loss_and_grads(model, [[trained]])[0], loss)
    last = tail - 2   # an assistant token (the one before its EOS)
    changed = Example(ex.tokens[:last] + [(ex.tokens[last] + 7) % tok.vocab_size] + ex.tokens[last + 1:], ex.mask)
    loss3, grads3 = _loss_and_grads(model, [[changed]])
    assert not torch.equal(loss3, loss) and _relative_change(grads, grads3) > 1e-2


def test_packed_loss_equals_one_row_per_conversation(tok):
    """Packing is a layout only: the same conversations packed or not give the same loss and gradients."""
    model = _model(tok)
    exs = _examples(tok) + _examples(tok, [fx.PLAIN])
    packed, p_grads = _loss_and_grads(model, [exs])
    alone, a_grads = _loss_and_grads(model, [[e] for e in exs])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-6)
    for n in a_grads:
        torch.testing.assert_close(p_grads[n], a_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_sft_steps_lower_the_loss_on_every_kind_of_conversation(tmp_path, tok):
    """Plain, thinking and tool-call conversations all train: each one's loss falls."""
    model = _model(tok)
    exs = _examples(tok, fx.CONVERSATIONS)

    def losses():
        with torch.no_grad():
            return [float(sft_loss(model, make_batch([[e]], len(model.mtp), 0))[1]["lm"]) for e in exs]
    before = losses()
    # AdamW keeps the test quick (Muon's Newton-Schulz iterations dominate a tiny step on the CPU); the CLI test
    # runs the default Muon + AdamW
    cfg = SFTConfig(steps=4, lr=5e-3, optimizer="adamw", batch_size=3, seq_len=512, warmup=1, device="cpu",
                    progress=False)
    res = train_sft(model, tok, exs, cfg, str(tmp_path / "run"))
    after = losses()
    assert all(a < 0.8 * b for a, b in zip(after, before)), (before, after)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 5)) and all("mtp" in r and "lm" in r for r in rows)
    assert res["last_loss"] < res["first_loss"] and (tmp_path / "run" / "loss.png").is_file()
    reloaded = dsv4.load_model(res["final_dir"], dtype=torch.float32)
    torch.testing.assert_close(reloaded.state_dict()["head.weight"], model.state_dict()["head.weight"])


def test_training_leaves_the_attention_stage_as_it_found_it(tmp_path, tok):
    from dsv4.model.attention import Attention
    model = _model(tok)
    exs = _examples(tok, [fx.PLAIN])
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    assert not any(m.indexer_loss for m in layers)
    train_sft(model, tok, exs, SFTConfig(steps=1, optimizer="adamw", device="cpu", progress=False), str(tmp_path))
    assert not any(m.indexer_loss for m in layers) and all(m.sparse for m in layers)


def test_fit_steps_shrinks_a_capped_schedule_to_what_fits():
    from dsv4.posttrain.sft import fit_steps
    # 7 steps done in 7 s, the last five timed at 1 s each: 53 more fit in a 60 s cap
    assert fit_steps(1000, 7, elapsed=7.0, timed=5.0, max_seconds=60.0) == 60
    assert fit_steps(20, 7, elapsed=7.0, timed=5.0, max_seconds=60.0) == 20      # never more than asked
    assert fit_steps(1000, 7, elapsed=70.0, timed=5.0, max_seconds=60.0) == 7    # never fewer than done

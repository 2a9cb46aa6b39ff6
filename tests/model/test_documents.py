"""Packed documents: each document of a packed row computes exactly what it computes alone."""
import pytest
import torch

import dsv4
from dsv4.errors import InvalidArgument
from dsv4.model.documents import PackedDocuments

# lengths that cut the CSA (4) and HCA (16) groups and the window (32) at various offsets; 60 positions a row
ROWS = [[5, 37, 18], [3, 1, 17, 33, 6], [60]]


@pytest.fixture(scope="module")
def tiny():
    return dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=3).train()


def _tokens(rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2048, (len(rows), sum(rows[0])), generator=g)


def _spans(row):
    start = 0
    for n in row:
        yield start, n
        start += n


def _mtp_inputs(tokens, rows, filler=0):
    """Depth-0 MTP ids: token t+1 of the same document, `filler` past its end."""
    nxt = torch.full_like(tokens, filler)
    for b, row in enumerate(rows):
        for s, n in _spans(row):
            nxt[b, s:s + n - 1] = tokens[b, s + 1:s + n]
    return nxt


def test_packed_rows_equal_documents_alone(tiny):
    tokens = _tokens(ROWS)
    docs = PackedDocuments(ROWS, tokens.shape[1])
    nxt = _mtp_inputs(tokens, ROWS)
    with torch.no_grad():
        h = tiny.hidden(tokens, docs=docs)
        logits, (mtp,) = tiny.logits(h), tiny.mtp_logits(h, [nxt], docs=docs)
        for b, row in enumerate(ROWS):
            for s, n in _spans(row):
                alone = tokens[b:b + 1, s:s + n]
                ha = tiny.hidden(alone)
                want, (want_mtp,) = tiny.logits(ha), tiny.mtp_logits(ha, [nxt[b:b + 1, s:s + n]])
                torch.testing.assert_close(logits[b:b + 1, s:s + n], want, rtol=0, atol=2e-5)
                # the last position's MTP input lies past the document: compare the others
                torch.testing.assert_close(mtp[b:b + 1, s:s + n - 1], want_mtp[:, :n - 1], rtol=0, atol=2e-5)


def test_unpacked_forward_differs(tiny):
    """The check above is not vacuous: without the document layout the later documents see the earlier ones."""
    tokens = _tokens(ROWS)
    with torch.no_grad():
        packed = tiny.logits(tiny.hidden(tokens, docs=PackedDocuments(ROWS, 60)))
        plain = tiny(tokens)
    assert not torch.allclose(packed[0, 5:], plain[0, 5:], atol=1e-3)
    torch.testing.assert_close(packed[0, :5], plain[0, :5], rtol=0, atol=2e-5)


def test_no_gradient_across_documents(tiny):
    tokens = _tokens(ROWS)
    docs = PackedDocuments(ROWS, tokens.shape[1])
    seen = []
    hook = tiny.embed.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        h = tiny.hidden(tokens, docs=docs)
        seen[0].retain_grad()
        tiny.logits(h)[1, 4:21].sum().backward()   # the third document of row 1 (lengths 3, 1, 17, ...)
    finally:
        hook.remove()
        tiny.zero_grad(set_to_none=True)
    g = seen[0].grad.abs().sum(-1)
    assert (g[1, :4] == 0).all() and (g[1, 21:] == 0).all() and (g[0] == 0).all() and (g[2] == 0).all()
    assert (g[1, 4:21] > 0).all()


def test_activation_checkpointing_matches(tiny):
    tokens = _tokens(ROWS, seed=1)
    docs = PackedDocuments(ROWS, 60)
    want = tiny.logits(tiny.hidden(tokens, docs=docs))
    tiny.set_activation_checkpointing(True)
    try:
        got = tiny.logits(tiny.hidden(tokens, docs=docs))
    finally:
        tiny.set_activation_checkpointing(False)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_bad_layouts_are_refused(tiny):
    with pytest.raises(InvalidArgument, match="row 0"):
        PackedDocuments([[5, 50]], 60)
    with pytest.raises(InvalidArgument, match="row 1"):
        PackedDocuments([[60], [0, 60]], 60)
    with pytest.raises(InvalidArgument, match=r"\[2, 60\]"):
        tiny.hidden(_tokens([[60]]), docs=PackedDocuments([[60], [60]], 60))


def test_documents_shorter_than_a_group_with_the_indexer_loss(tiny):
    """Documents of fewer tokens than a CSA group have no compressed entry; with the indexer's KL loss on (SFT,
    the sparse stage) they run, and the KL comes from the documents that have entries."""
    from dsv4.model.attention import Attention
    layers = [m for m in tiny.modules() if isinstance(m, Attention)]
    for m in layers:
        m.indexer_loss = True
    try:
        tokens = _tokens([[2, 3, 1]])
        tiny.logits(tiny.hidden(tokens, docs=PackedDocuments([[2, 3, 1]], 6))).sum().backward()
        assert all(m.indexer_kl is None for m in layers)
        tokens = _tokens([[3, 9]])
        tiny.hidden(tokens, docs=PackedDocuments([[3, 9]], 12))
        assert any(m.indexer_kl is not None and torch.isfinite(m.indexer_kl) for m in layers)
    finally:
        for m in layers:
            m.indexer_loss = False
        tiny.zero_grad(set_to_none=True)

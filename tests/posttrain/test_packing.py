"""packing: targets stay inside their document and on the assistant's tokens; rows and epochs."""
import pytest
import torch

from dsv4.errors import InvalidArgument
from dsv4.posttrain.chat_data import Example
from dsv4.posttrain.packing import IGNORE, SFTBatches, fit_examples, make_batch, pack_rows

X = IGNORE
A = Example([1, 2, 3, 4], [0, 0, 1, 1], "a")
B = Example([5, 6, 7], [0, 1, 1], "b")


def test_packed_targets_stay_in_their_document():
    batch = make_batch([[A, B], [B]], n_mtp=1, pad_id=0)
    assert batch.tokens.tolist() == [[1, 2, 3, 4, 5, 6, 7], [5, 6, 7, 0, 0, 0, 0]]
    # position 3 (A's last token) does not predict B's first token 5
    assert batch.targets.tolist() == [[X, 3, 4, X, 6, 7, X], [6, 7, X, X, X, X, X]]
    # MTP depth 0: position t reads token t+1 of its document (0 past its end) and predicts t+2
    assert batch.mtp_inputs[0].tolist() == [[2, 3, 4, 0, 6, 7, 0], [6, 7, 0, 0, 0, 0, 0]]
    assert batch.mtp_targets[0].tolist() == [[3, 4, X, X, 7, X, X], [7, X, X, X, X, X, X]]
    assert batch.docs.lengths == [[4, 3], [3, 4]] and batch.lengths == [[4, 3], [3]]
    assert batch.n_targets == 6


def test_one_document_per_row_needs_no_layout():
    batch = make_batch([[A], [B]], n_mtp=0, pad_id=9)
    assert batch.docs is None and batch.mtp_inputs == [] and batch.tokens.tolist() == [[1, 2, 3, 4], [5, 6, 7, 9]]


def test_pack_rows_first_fit():
    exs = [Example([1] * n, [1] * n) for n in (5, 3, 4, 2, 6)]
    rows = pack_rows(exs, 8)
    assert [[len(e.tokens) for e in r] for r in rows] == [[5, 3], [4, 2], [6]]
    assert [[len(e.tokens) for e in r] for r in pack_rows(exs, 8, pack=False)] == [[5], [3], [4], [2], [6]]


def test_fit_examples_cuts_and_drops(caplog):
    long = Example([1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 1, 1])
    kept = fit_examples([A, long], 4)
    assert kept == [A] and "were cut" in caplog.text
    assert fit_examples([long], 5)[0].tokens == [1, 2, 3, 4, 5]
    with pytest.raises(InvalidArgument, match="no conversation has an assistant token"):
        fit_examples([long], 3)


def test_epochs_cover_the_data_in_a_seeded_order():
    exs = [Example([i, i + 1, i + 2], [0, 1, 1], str(i)) for i in range(0, 30, 3)]
    data = SFTBatches(exs, batch_size=2, seq_len=7, n_mtp=1, pad_id=0, seed=1)
    for epoch in (0, 1):
        seen = [e.where for batch in data.epoch(epoch) for row in batch for e in row]
        assert sorted(seen) == sorted(e.where for e in exs)
    assert data.epoch(0) != data.epoch(1) and data.epoch(1) == SFTBatches(exs, 2, 7, 1, 0, seed=1).epoch(1)
    first = next(iter(data))
    assert first.tokens.shape == (2, 6) and isinstance(first.tokens, torch.Tensor)

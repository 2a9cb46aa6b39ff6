"""bench/mtp_acceptance.py: per-position acceptance tallies, the outputs checked against plain greedy decoding, and
the result file, on the tiny preset (a model whose MTP block agrees with it, so every acceptance count occurs)."""
import os
import sys

import pytest
import torch

import dsv4
from conftest import agreeing_model

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import mtp_acceptance  # noqa: E402


def test_counts_tally_each_position_given_the_ones_before():
    """Hand-made steps (drafted, accepted) -> tried / accepted per position, the oracle counted by hand."""
    c = mtp_acceptance.Counts(3)
    for drafted, accepted in [(3, 0), (3, 1), (3, 3), (2, 2), (1, 0), (0, 0)]:
        c.add_step(1 + accepted, drafted, accepted)
    assert c.tried == [5, 3, 1] and c.accepted == [3, 2, 1]   # (position 3 drafted only in (3, 3))
    assert c.position_acceptance() == [3 / 5, 2 / 3, 1.0]
    assert c.steps == 6 and c.tokens == 6 + 6 and c.acceptance == 6 / 12


@torch.no_grad()
def test_measure_equals_plain_greedy_and_counts_are_consistent():
    model = agreeing_model()
    prompts = [list(range(10, 34))]                  # 24 + 24 tokens: past the 32-token window
    results, plain = mtp_acceptance.measure(model, prompts, 24, [1, 2, 3])
    assert plain == [dsv4.generate(model, [p], 24)[0] for p in prompts]
    for c in results:
        assert not c.mismatches, c.mismatches
        assert c.tokens == 24
        assert c.tokens_per_step == pytest.approx(1 + c.accepted_total / c.steps)
        assert c.accepted_total == sum(c.accepted) and c.drafted >= sum(c.tried)
        for j in range(c.n_draft - 1):
            assert c.accepted[j + 1] <= c.accepted[j] and c.tried[j + 1] <= c.accepted[j]
        assert c.accepted[0] > 0
    assert any(sum(c.accepted) < sum(c.tried) for c in results)   # some drafts rejected too
    assert results[0].tokens_per_step < results[-1].tokens_per_step


def test_mismatch_fails_loudly(tmp_path, monkeypatch):
    """A plain output that differs (here forced) is reported in the file and the script exits with status 1."""
    real = dsv4.generate
    monkeypatch.setattr(dsv4, "generate", lambda m, p, n: [[(t + 1) % 2048 for t in real(m, p, n)[0]]])
    monkeypatch.setenv("DSV4_COMMIT", "test")
    out = tmp_path / "acc.txt"
    rc = mtp_acceptance.main(["--tiny-cpu", "--prompts", "1", "--prompt-len", "20", "--max-new", "6",
                              "--n-draft", "1", "2", "--step-cost", "1:2.0", "--out", str(out)])
    text = out.read_text()
    assert rc == 1 and "GREEDY OUTPUT MISMATCH" in text and "differs from plain greedy at token 0" in text
    assert "| 2.00 | 0.50x" in text      # random weights: 1 token a step at cost 2.0


def test_distinct_ngrams():
    assert mtp_acceptance.distinct_ngrams([[1, 2, 3, 4, 5, 6]]) == 1.0
    assert mtp_acceptance.distinct_ngrams([[7] * 10]) == 1 / 7

"""bench/mtp_acceptance.py: per-position acceptance tallies, the outputs checked against plain greedy decoding, and
the result file, on the tiny preset (a model whose MTP block agrees with it, so every acceptance count occurs)."""
import os
import sys

import pytest
import torch

import dsv4
from conftest import agreeing_model

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import greedy_ties  # noqa: E402
import mtp_acceptance  # noqa: E402

SMOKE = ["--tiny-cpu", "--prompts", "1", "--prompt-len", "20", "--max-new", "6"]


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
    loop, _ = mtp_acceptance.measure(model, prompts, 24, [1, 2, 3], plain, pipelined=False)   # the step_row loop
    assert [(c.steps, c.tokens, c.tried, c.accepted) for c in loop] == \
        [(c.steps, c.tokens, c.tried, c.accepted) for c in results]


def test_mismatch_fails_loudly(tmp_path, monkeypatch):
    """A plain output that differs (here forced) is reported in the file and the script exits with status 1."""
    real = dsv4.generate
    monkeypatch.setattr(dsv4, "generate", lambda m, p, n: [[(t + 1) % 2048 for t in real(m, p, n)[0]]])
    monkeypatch.setenv("DSV4_COMMIT", "test")
    out = tmp_path / "acc.txt"
    rc = mtp_acceptance.main(SMOKE + ["--n-draft", "1", "2", "--step-cost", "1:2.0", "--out", str(out)])
    text = out.read_text()
    assert rc == 1 and "GREEDY OUTPUT MISMATCH" in text and "differs from plain greedy at token 0" in text
    assert "-> not a tie" in text and "not a tie 2; failing: 2" in text
    assert "| 2.00 | 0.50x" in text      # random weights: 1 token a step at cost 2.0


def test_distinct_ngrams():
    assert mtp_acceptance.distinct_ngrams([[1, 2, 3, 4, 5, 6]]) == 1.0
    assert mtp_acceptance.distinct_ngrams([[7] * 10]) == 1 / 7


def test_tolerance_is_ulps_of_the_dtype_at_the_largest_logit():
    assert greedy_ties.ulp(torch.bfloat16, 10.0) == 2.0 ** -4          # 8 <= 10 < 16: 8 * 2^-7
    assert greedy_ties.ulp(torch.float32, 10.0) == 2.0 ** -20
    assert greedy_ties.tolerance(torch.bfloat16, 10.0, 4) == 0.25


def test_classify_a_rounding_tie_and_a_clear_preference():
    """Hand-built logits, max 10: one bf16 ulp (1/16) apart is a tie in bf16, not in fp32; 1.0 apart is none."""
    logits = torch.zeros(50)
    logits[7], logits[3], logits[5], logits[9] = 10.0, 10.0 - 2.0 ** -4, 9.0, 10.0 - 0.25
    tie = greedy_ties.classify(logits, 7, 3, torch.bfloat16)
    assert tie.tie and tie.gap == 2.0 ** -4 and tie.ulps == 1.0 and tie.top == 7 and tie.relative == 2.0 ** -4 / 10
    assert greedy_ties.classify(logits, 7, 9, torch.bfloat16).tie                 # 4 ulps: the edge, still a tie
    assert greedy_ties.classify(logits, 3, 7, torch.bfloat16).tie                 # the other token leading, too
    assert not greedy_ties.classify(logits, 7, 3, torch.float32).tie
    clear = greedy_ties.classify(logits, 7, 5, torch.bfloat16)
    assert not clear.tie and clear.ulps == 16.0
    # a near-tie in either computation (the reference's recomputed logits, the other decoding's own) is a tie
    both = greedy_ties.PositionDiagnosis(clear, other=tie)
    assert both.tie and not greedy_ties.PositionDiagnosis(clear, other=clear).tie


def test_smoke_run_has_no_mismatch(tmp_path, monkeypatch):
    monkeypatch.setenv("DSV4_COMMIT", "test")
    out = tmp_path / "acc.txt"
    assert mtp_acceptance.main(SMOKE + ["--n-draft", "1", "2", "--out", str(out)]) == 0
    assert "mismatches: 0" in out.read_text()


@pytest.mark.parametrize("extra, rc, verdict", [
    ([], 1, "-> not a tie"),
    (["--tie-ulps", "1e12"], 0, "-> near-tie (rounding)"),                      # every gap within "rounding"
    (["--tie-ulps", "1e12", "--batch-invariant"], 1, "-> near-tie (rounding)"),  # the mode fails every mismatch
    (["--dtype", "bf16"], 1, "-> not a tie"),
])
def test_a_wrong_speculative_token_is_not_a_tie(tmp_path, monkeypatch, extra, rc, verdict):
    """The speculative decoder made to emit plain's token + 1 at token 3: a clear preference in both computations
    (plain's recomputed logits, the decoder's own), so the run fails, unless the tolerance takes every gap in; with
    --batch-invariant every mismatch fails. In bf16 the float32 recomputation is reported too."""
    real = mtp_acceptance.speculative_greedy

    def wrong(*args, **kwargs):
        out = real(*args, **kwargs)
        out[3] = (out[3] + 1) % 2048
        return out
    monkeypatch.setattr(mtp_acceptance, "speculative_greedy", wrong)
    monkeypatch.setenv("DSV4_COMMIT", "test")
    out = tmp_path / "acc.txt"
    assert mtp_acceptance.main(SMOKE + ["--n-draft", "1", "--out", str(out)] + extra) == rc
    text = out.read_text()
    assert "differs from plain greedy at token 3" in text and verdict in text
    assert "speculative's own" in text and ("bfloat16 against float32 logits" in text) == ("bf16" in extra)

"""Context parallelism beyond the basics, on CPU with gloo and 2 ranks (fp32, tests/distributed/workers.py's
cp_model: window 16, CSA groups of 4, HCA groups of 8): block recompute (activation checkpointing) and sequence
lengths that do not split into equal chunks give one process's logits, indexer KL and gradients; a prefill through
context parallelism leaves a cache that decodes as one process's."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from test_context_parallel import _assert_exact  # noqa: E402
from test_distributed import torchrun  # noqa: E402


def test_cp_with_block_recompute_equals_one_process(tmp_path):
    """The recompute runs each attention layer again inside the backward pass; its exchanges replay the forward's
    results (no collective there), and the gradients are one process's without recompute."""
    cases = [[24, True, "sparse", True],      # balanced, c=6: rows from the other rank's chunks
             [42, False, "indexer", True]]    # plain, c=21: the indexer KL (its sum over ranks) recomputed too
    (tmp_path / "cp.json").write_text(json.dumps(cases))
    for res in torchrun("cp_exact", 2, tmp_path):
        assert len(res["errors"]) == len(cases)
        _assert_exact(res)


def test_cp_unequal_chunks_equal_one_process(tmp_path):
    """Lengths that 2 (plain) or 4 (balanced) chunks do not divide: chunk lengths differ by one, so the ranks hold
    different numbers of positions; the boundaries fall inside CSA and HCA groups and the window."""
    cases = [[25, True, "sparse"],            # chunks 6,6,6,7: boundaries 6, 18 inside both groups, 12 inside HCA
             [23, False, "indexer"],          # chunks 11,12: the boundary inside CSA group 8..11 and HCA group 8..15
             [13, True, "indexer", True]]     # chunks 3,3,3,4 < a CSA group, recomputed: overlap rows from 2 chunks
    (tmp_path / "cp.json").write_text(json.dumps(cases))
    for res in torchrun("cp_exact", 2, tmp_path):
        assert len(res["errors"]) == len(cases)
        _assert_exact(res)


def test_cp_prefill_then_decode_equals_one_process(tmp_path):
    """A prompt prefilled across 2 ranks, then 3 decode steps on each rank's cache: the logits of a one-process
    prefill and decode. The decode steps complete a CSA group (36..39) and an HCA group (32..39) whose first rows
    the prefill left in the compressors' states, attend through the window ring and the indexer's top-4."""
    cases = [[37, True],                      # chunks 9,9,9,10 (unequal): rank 0 holds the last position
             [30, False]]                     # chunks 15,15: rank 1 holds it; decode completes CSA group 28..31, HCA 24..31
    (tmp_path / "prefill.json").write_text(json.dumps(cases))
    for res in torchrun("cp_prefill", 2, tmp_path):
        for case, errs in zip(cases, res["errors"]):
            # (seen: fp32 rounding of the prompt's rows computed in other shapes)
            assert max(errs) <= 1e-5, (case, errs)

"""A run's fp32 matmul setting is the run's only: the process-wide flag is back after it, also after an error."""
import pytest
import torch

from dsv4.train.precision import fp32_matmuls


@pytest.mark.parametrize("before", [False, True])
def test_fp32_matmul_setting_is_restored(before):
    flags = torch.backends.cuda.matmul
    saved = flags.allow_tf32
    try:
        flags.allow_tf32 = before
        for choice in ("tf32", "ieee"):
            with fp32_matmuls(choice):
                assert flags.allow_tf32 == (choice == "tf32")
            assert flags.allow_tf32 == before
        with pytest.raises(RuntimeError, match="boom"):
            with fp32_matmuls("tf32" if not before else "ieee"):
                assert flags.allow_tf32 != before
                raise RuntimeError("boom")
        assert flags.allow_tf32 == before
        with pytest.raises(ValueError, match="'fast'"):
            with fp32_matmuls("fast"):
                pass
    finally:
        flags.allow_tf32 = saved

"""The dispatcher's choice per call: batch-invariant mode picks an op's "invariant" implementation exactly for CUDA
tensors while the mode is on, and the modes are process-wide values that their context managers restore."""
import threading

import pytest
import torch

import dsv4
from dsv4.ops import dispatch


class CudaLooking(torch.Tensor):
    """A CPU tensor that says it is on CUDA: what the dispatcher's device test reads, without a GPU."""

    @property
    def is_cuda(self) -> bool:
        return True


def cuda_looking(*shape) -> torch.Tensor:
    return torch.zeros(*shape).as_subclass(CudaLooking)


def usual(x):
    return "usual"


def invariant(x):
    return "invariant"


@pytest.fixture
def probe(monkeypatch):
    """An op "probe" with a reference implementation and an invariant one that takes tensors of up to 4 rows."""
    monkeypatch.setitem(dispatch._REGISTRY, "probe", {})
    dispatch.register("probe", "reference", usual)
    dispatch.register("probe", "invariant", invariant, lambda x: x.shape[0] <= 4)
    return lambda x, backend=None: dispatch._pick("probe", backend, x)(x)


def test_invariant_implementation_only_for_cuda_tensors_in_the_mode(probe):
    cpu, gpu = torch.zeros(2), cuda_looking(2)
    assert probe(cpu) == probe(gpu) == "usual"  # mode off
    with dsv4.ops.batch_invariant():
        assert probe(gpu) == "invariant"
        assert probe(cpu) == "usual"  # the mode applies to CUDA tensors only
        assert probe(cuda_looking(5)) == "usual"  # an invariant implementation that does not take the call
        assert probe(gpu, backend="reference") == "usual"  # an explicit backend is obeyed
        with dsv4.ops.batch_invariant(False):
            assert probe(gpu) == "usual"
        assert probe(gpu) == "invariant"
    assert probe(gpu) == "usual"


def test_batch_invariant_mode_restored_after_an_exception(probe):
    gpu = cuda_looking(2)
    with pytest.raises(KeyError):
        with dsv4.ops.batch_invariant():
            assert probe(gpu) == "invariant"
            raise KeyError("inside the block")
    assert probe(gpu) == "usual" and not dispatch._batch_invariant


def test_batch_invariant_mode_is_seen_by_other_threads(probe):
    """Activation-checkpoint recomputation runs in autograd's backward thread: the mode must reach it."""
    seen = []
    with dsv4.ops.batch_invariant():
        worker = threading.Thread(target=lambda: seen.append(probe(cuda_looking(2))))
        worker.start()
        worker.join()
    assert seen == ["invariant"]


def test_model_ops_pick_their_invariant_implementations():
    """The ops whose default would depend on the batch (matmuls, row reductions, split lists, unsorted top-k,
    grouped experts) have invariant implementations (where Triton is installed), and the mode picks them."""
    pytest.importorskip("triton")
    for op in ("linear", "grouped_linear", "linear_fp32", "rms_norm", "hc_mixes", "swiglu_expert", "moe_experts",
               "sparse_attn", "indexer_topk"):
        assert "invariant" in dsv4.ops.available_backends(op), op
    x, w = cuda_looking(3, 8), torch.zeros(5, 8)
    with dsv4.ops.batch_invariant():
        assert dispatch._pick("linear", None, x, w) is dispatch._REGISTRY["linear"]["invariant"][0]
        assert dispatch._pick("linear", None, torch.zeros(3, 8), w) is dispatch._REGISTRY["linear"]["reference"][0]
    assert dispatch._pick("linear", None, x, w) is dispatch._REGISTRY["linear"]["reference"][0]


def test_training_kernels_choice(monkeypatch):
    """The default comes from DSV4_TRITON_TRAIN (read, never written); a call sets the choice, a `with` block
    restores the one before it, also on an exception; a bad choice names the valid ones."""
    monkeypatch.setattr(dispatch, "_training_kernels", None)
    monkeypatch.delenv("DSV4_TRITON_TRAIN", raising=False)
    assert dispatch.training_kernel_choice() == "triton"
    monkeypatch.setenv("DSV4_TRITON_TRAIN", "0")
    assert dispatch.training_kernel_choice() == "compiled"
    with dsv4.ops.training_kernels("triton"):
        assert dispatch.training_kernel_choice() == "triton"
        with pytest.raises(RuntimeError):
            with dsv4.ops.training_kernels("compiled"):
                assert dispatch.training_kernel_choice() == "compiled"
                raise RuntimeError("inside the block")
        assert dispatch.training_kernel_choice() == "triton"
    assert dispatch.training_kernel_choice() == "compiled"  # the environment's again
    dsv4.ops.training_kernels("triton")
    assert dispatch.training_kernel_choice() == "triton"
    assert dsv4.ops.training_kernels.__module__ == "dsv4.ops.dispatch"
    with pytest.raises(ValueError, match="'cuda'.*'triton', 'compiled'"):
        dsv4.ops.training_kernels("cuda")
    assert dispatch.training_kernel_choice() == "triton"


def test_triton_training_kernels_follow_the_choice(monkeypatch):
    pytest.importorskip("triton")
    from dsv4.ops.triton.launch import training_kernels_enabled
    monkeypatch.setattr(dispatch, "_training_kernels", None)
    monkeypatch.delenv("DSV4_TRITON_TRAIN", raising=False)
    assert training_kernels_enabled()
    with dsv4.ops.training_kernels("compiled"):
        assert not training_kernels_enabled()
    assert training_kernels_enabled()


def test_compiled_or_eager_runs_eagerly_while_compilation_is_off(monkeypatch):
    monkeypatch.setenv("DSV4_COMPILE", "0")
    calls = []

    def double(x):
        calls.append(x)
        return 2 * x

    run = dsv4.ops.compiled_or_eager(double)
    assert run(3) == 6 and calls == [3] and run.failed == []


def test_packed_weight_ops_pick_the_triton_kernels_for_cuda_bf16():
    """auto gives bf16 CUDA calls over packed weights the Triton launchers (the registered callable wraps each to
    turn autocast off; __wrapped__ is the launcher), and CPU calls the references."""
    pytest.importorskip("triton")
    from dsv4.ops.triton import packed_experts, packed_linear
    from dsv4.quant.packed import Fp4GroupWeight, Fp8BlockWeight
    w8 = Fp8BlockWeight.quantize(torch.randn(128, 128))
    w4 = Fp4GroupWeight.quantize(torch.randn(4, 64, 128))
    x = torch.zeros(2, 128, dtype=torch.bfloat16).as_subclass(CudaLooking)
    with torch.no_grad():
        assert dispatch._pick("linear_fp8_weight", None, x, w8).__wrapped__ is packed_linear.linear_fp8_weight
        assert dispatch._pick("linear_fp4_weight", None, x, w4[0]).__wrapped__ is packed_linear.linear_fp4_weight
        assert dispatch._pick("moe_experts_fp4", None, x, w4, w4, w4, None).__wrapped__ is \
            packed_experts.moe_experts_fp4
        assert dispatch._pick("linear_fp8_weight", None, torch.zeros(2, 128, dtype=torch.bfloat16), w8) is \
            dispatch._REGISTRY["linear_fp8_weight"]["reference"][0]


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: what the compiled backend's predicate reads."""
    @property
    def is_cuda(self):
        return True


def test_training_compile_switch_turns_the_compiled_training_backend_off_and_back(monkeypatch):
    from dsv4.ops.compiled import torch_compile
    monkeypatch.delenv("DSV4_COMPILE", raising=False)
    monkeypatch.setattr(torch_compile, "_compile_training", None)
    x = torch.Tensor._make_subclass(_OnCuda, torch.ones(2), require_grad=True)
    assert torch_compile.training_on_gpu(x)
    with dsv4.ops.training_compile(False):
        assert not torch_compile.training_on_gpu(x)        # the eager references serve training calls
        with dsv4.ops.training_compile(True):
            assert torch_compile.training_on_gpu(x)
        assert not torch_compile.training_on_gpu(x)
    assert torch_compile.training_on_gpu(x)
    with torch.no_grad():
        assert not torch_compile.training_on_gpu(x)        # inference never takes the compiled training backend
    monkeypatch.setenv("DSV4_COMPILE", "0")
    with dsv4.ops.training_compile(True):
        assert not torch_compile.training_on_gpu(x)        # DSV4_COMPILE=0 wins

"""Fused MoE expert kernels (experts_implementation="fused") against a float64 PyTorch reference.

On a machine without CUDA the Triton kernels run through Triton's interpreter (TRITON_INTERPRET=1, set per test by a
fixture; the kernels module is imported lazily, at the first launch, so the setting applies) in fp32 with tiny
shapes and 16-wide blocks; the interpreter's bf16 `tl.dot` is unreliable, so bf16 is checked on a GPU only
(`gpu` marker).
"""

import contextlib
import copy
import dataclasses
import importlib.util
import itertools
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import modeling_moe
from modeling_moe import MoEForCausalLM

try:
    import modeling_moe.kernels  # noqa: F401
except ImportError:  # a checkout that is not pip-installed: kernels/ sits at the top of the repository
    _root = Path(__file__).resolve().parents[1]
    _spec = importlib.util.spec_from_file_location("modeling_moe.kernels", _root / "kernels" / "__init__.py",
                                                   submodule_search_locations=[str(_root / "kernels")])
    modeling_moe.kernels = importlib.util.module_from_spec(_spec)
    sys.modules["modeling_moe.kernels"] = modeling_moe.kernels
    _spec.loader.exec_module(modeling_moe.kernels)

from modeling_moe.kernels import KernelConfig, config_override, fused_moe, moe_experts_reference, set_autotune
from modeling_moe.kernels.fused_moe_ops import backward_gemm_backend, set_backward_gemm_backend
from modeling_moe.kernels.mla_decode import set_split_backend, split_backend
from modeling_moe.kernels.reference import down_and_combine, sorted_pre_activations

from .conftest import route_jit_calls_to_interpreter
from .helpers import assert_compiled_training_step_matches, load_benchmark_script, small_config

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
CUDA = torch.cuda.is_available()


def enable_interpreter(monkeypatch):
    """TRITON_INTERPRET=1 for this test: our kernels module is (re)imported under the flag (Triton decides at
    decoration time whether a @triton.jit function is interpreted), and the library's jit'd functions follow."""
    from triton.runtime.interpreter import InterpretedFunction

    from modeling_moe.kernels import fused_moe_ops as fused_module

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels = sys.modules.get("modeling_moe.kernels.fused_moe_kernels")
    if kernels is not None and not isinstance(kernels._combine_kernel, InterpretedFunction):
        monkeypatch.delitem(sys.modules, "modeling_moe.kernels.fused_moe_kernels")
        monkeypatch.setattr(fused_module, "_kernels", None)
    route_jit_calls_to_interpreter(monkeypatch)


@pytest.fixture
def triton_path(monkeypatch):
    """Force the Triton kernels: on CUDA as they are, on the CPU through the interpreter with 16-wide blocks."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.delenv("MOE_FUSED_REFERENCE", raising=False)
    set_autotune(False)
    # Full fp32 products whatever an earlier test left set (accelerate turns TF32 on when it compiles in fp32).
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        if CUDA:
            yield "cuda"
        else:
            enable_interpreter(monkeypatch)
            with config_override(KernelConfig(16, 16, 16, 1, 1, 4)):
                yield "cpu"
    finally:
        set_autotune(None)
        torch.set_float32_matmul_precision(precision)


def make_case(tokens, hidden, inter, experts, top_k, routing="random", seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5
    down = torch.randn(experts, hidden, inter, generator=g) / inter**0.5
    if routing == "random":
        index = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)]) if tokens else \
            torch.zeros(0, top_k, dtype=torch.long)
    elif routing == "one_expert":  # every token's first choice is expert 1; the rest (if k > 1) random
        index = torch.stack([torch.cat([torch.tensor([1]), 2 + torch.randperm(experts - 2, generator=g)[:top_k - 1]])
                             for _ in range(tokens)])
    elif routing == "some_empty":  # only the first half of the experts get tokens
        index = torch.stack([torch.randperm(experts // 2, generator=g)[:top_k] for _ in range(tokens)])
    else:
        raise ValueError(routing)
    weights = torch.rand(tokens, top_k, generator=g) + 0.1
    tensors = [t.to(device=device, dtype=dtype) for t in (x, gate_up, down)]
    return (*tensors, index.to(device), weights.to(device))


def relative_error(value, reference):
    return ((value.double() - reference).norm() / reference.norm().clamp_min(1e-30)).item()


DIFFERENTIABLE = ("x", "gate_up_proj", "down_proj", "top_k_weights")


def check_against_reference(case, tolerance, grad_seed=1, trainable=DIFFERENTIABLE):
    """Output and the gradients of the `trainable` inputs against float64; the other inputs get no gradient."""
    x, gate_up, down, index, weights = case
    inputs = [t.detach().clone().requires_grad_(name in trainable)
              for name, t in zip(DIFFERENTIABLE, (x, gate_up, down, weights))]
    out = fused_moe(inputs[0], inputs[1], inputs[2], index, inputs[3])
    assert out.dtype == x.dtype and out.shape == x.shape
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.device, out.dtype)
    out.backward(grad)
    refs = [t.detach().double().cpu().requires_grad_(True) for t in (x, gate_up, down, weights)]
    reference = moe_experts_reference(refs[0], refs[1], refs[2], index.cpu(), refs[3])
    reference.backward(grad.double().cpu())
    errors = {"out": relative_error(out.cpu(), reference)}
    for name, tensor, ref in zip(DIFFERENTIABLE, inputs, refs):
        if name not in trainable:
            assert tensor.grad is None, name
            continue
        assert tensor.grad is not None, name
        assert torch.isfinite(tensor.grad).all(), name
        errors[name] = relative_error(tensor.grad.cpu(), ref.grad) if ref.grad.norm() > 0 else \
            tensor.grad.abs().max().item()
    assert max(errors.values()) < tolerance, errors
    return out, [t.grad for t in inputs]


CASES = {
    # tokens, hidden, inter, experts, top_k, routing
    "uneven_sizes": (20, 48, 40, 6, 2, "random"),
    "experts_without_tokens": (17, 32, 24, 6, 2, "some_empty"),
    "all_tokens_on_one_expert": (19, 40, 24, 4, 1, "one_expert"),
    "one_token": (1, 48, 40, 6, 3, "random"),
    "top1": (18, 24, 40, 5, 1, "random"),
    "topk_equals_experts": (11, 32, 24, 4, 4, "random"),
    "block_multiples": (16, 32, 32, 4, 2, "random"),
    # ~18 rows an expert: a full row tile, then a last one at most half full, which runs as a half tile
    "half_last_tiles": (37, 40, 24, 4, 2, "random"),
}


@needs_triton
@pytest.mark.parametrize("name", list(CASES))
def test_fused_matches_float64_reference(triton_path, name):
    tokens, hidden, inter, experts, top_k, routing = CASES[name]
    case = make_case(tokens, hidden, inter, experts, top_k, routing, seed=len(name), device=triton_path)
    check_against_reference(case, tolerance=1e-5)


@pytest.fixture
def library_gemms():
    """The backward's plain GEMMs through torch._grouped_mm (forced: on the CPU too, in any dtype it takes)."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    set_backward_gemm_backend("grouped_mm")
    yield
    set_backward_gemm_backend(None)


@pytest.fixture
def grouped_mm_calls(monkeypatch):
    """The list that torch._grouped_mm appends to on each call (it still computes)."""
    calls = []
    grouped_mm = getattr(torch, "_grouped_mm", None)
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k), raising=False)
    return calls


@needs_triton
@pytest.mark.parametrize("name", ["experts_without_tokens", "all_tokens_on_one_expert", "uneven_sizes", "one_token"])
def test_weight_gradients_through_torch_grouped_mm(triton_path, library_gemms, grouped_mm_calls, name):
    """The library path (GEMM1 over gathered rows and GEMM2 at a short intermediate size; in the backward
    torch._grouped_mm over the sorted rows: dgrad_x, dgrad_h's dA before the SwiGLU-backward pass, both weight
    gradients, wgrad_gu's rows those GEMM1 gathered) against float64: six library GEMMs."""
    calls = grouped_mm_calls
    tokens, hidden, inter, experts, top_k, routing = CASES[name]
    case = make_case(tokens, hidden, inter, experts, top_k, routing, seed=len(name) + 7, device=triton_path)
    check_against_reference(case, tolerance=1e-5)
    assert len(calls) == 6


@needs_triton
@pytest.mark.parametrize("max_inter", [0, 40], ids=["ours", "library"])
def test_forward_row_gemms_through_the_library_only_at_short_intermediate_sizes(triton_path, library_gemms,
                                                                              grouped_mm_calls, monkeypatch,
                                                                              max_inter):
    """GEMM1 (where a gradient is needed) and GEMM2 go through torch._grouped_mm where the intermediate size is at most
    LIBRARY_ROW_GEMM_MAX_INTER, through our kernels above it; the forward matches float64 either way. Node 1 returns
    x's rows in sorted order (for wgrad_gu) only where the library ran GEMM1."""
    from modeling_moe.kernels import fused_moe_ops as fm

    monkeypatch.setattr(fm, "LIBRARY_ROW_GEMM_MAX_INTER", max_inter)
    library = max_inter >= 40
    x, gate_up, down, index, weights = make_case(20, 48, 40, 6, 2, seed=11, device=triton_path)
    reference = moe_experts_reference(x.double().cpu(), gate_up.double().cpu(), down.double().cpu(), index.cpu(),
                                      weights.double().cpu())
    out = fused_moe(x, gate_up.requires_grad_(True), down, index, weights)
    assert len(grouped_mm_calls) == (2 if library else 0)
    assert relative_error(out.detach().cpu(), reference) < 1e-5
    with torch.no_grad():  # GEMM1 stays ours: no backward to use its gathered rows
        out = fused_moe(x, gate_up, down, index, weights)
    assert len(grouped_mm_calls) == (3 if library else 0)
    assert relative_error(out.cpu(), reference) < 1e-5
    gate_up = gate_up.detach()
    for save in (False, True):
        gu, h, perm, inv, offsets, xs = torch.ops.modeling_moe.fused_moe_gate_up(x, gate_up, index, save)
        tokens = torch.div(perm.long(), 2, rounding_mode="floor")
        assert torch.equal(xs, x[tokens] if save and library else x[:0])
        assert gu.shape[0] == (40 if save else 0)
    checks = ("test_schema", "test_faketensor")  # the fake's xs follows the same rule
    torch.library.opcheck(torch.ops.modeling_moe.fused_moe_gate_up.default, (x, gate_up, index, True),
                          test_utils=checks)
    torch.library.opcheck(torch.ops.modeling_moe.fused_moe_gate_up_backward.default, (
        gu.new_ones(gu.shape), x, xs, gate_up, perm, inv, offsets, 2, True, True), test_utils=checks)


@needs_triton
def test_library_weight_gradients_only_where_they_are_fresh(triton_path, library_gemms, grouped_mm_calls,
                                                            monkeypatch):
    """Adding into an existing .grad stays with our kernels (they add in place) unless each expert holds
    LIBRARY_THEN_ADD_ROWS_PER_EXPERT rows: the first backward's weight gradients go through the library, the second's
    add into what it wrote (its dgrad_x and dA GEMMs still through the library), a third with the threshold at 0 adds
    the library's product; and "auto" keeps fp32 and CPU tensors on our kernels."""
    from modeling_moe.kernels import fused_moe_ops as fm

    calls = grouped_mm_calls
    x, gate_up, down, index, weights = make_case(20, 48, 40, 6, 2, seed=5, device=triton_path)
    for tensor in (x, gate_up, down):
        tensor.requires_grad_(True)
    grads = []
    for _ in range(2):
        fused_moe(x, gate_up, down, index, weights).square().sum().backward()
        grads.append((gate_up.grad.clone(), down.grad.clone()))
    assert len(calls) == 6 + 4  # GEMM1, GEMM2, dgrad_x, dA, both weight gradients; then GEMM1, GEMM2, dgrad_x, dA
    torch.testing.assert_close(grads[1][0], 2 * grads[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1][1], 2 * grads[0][1], rtol=1e-5, atol=1e-6)
    # with many rows an expert the library's product is added into .grad instead (here: any number of rows)
    monkeypatch.setattr(fm, "LIBRARY_THEN_ADD_ROWS_PER_EXPERT", 0)
    fused_moe(x, gate_up, down, index, weights).square().sum().backward()
    assert len(calls) == 10 + 6
    torch.testing.assert_close(gate_up.grad, 3 * grads[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(down.grad, 3 * grads[0][1], rtol=1e-5, atol=1e-6)
    set_backward_gemm_backend("auto")
    fp32 = torch.zeros(2, 8, device=triton_path)
    assert not fm._library_gemm(fp32, fp32, fp32.new_zeros(1, 8, 8))
    assert not fm._library_gemm(fp32.bfloat16(), fp32, fp32.new_zeros(1, 8, 8))


def test_row_gemms_go_to_the_library_on_an_h200_only_where_it_leads_and_takes_the_operands(monkeypatch):
    """"auto" on an sm_90 GPU (fake CUDA tensors, the capability check patched): GEMM1 (in training) and GEMM2 through
    torch._grouped_mm at I <= LIBRARY_ROW_GEMM_MAX_INTER in bf16 with H and I (GEMM1: 2I) multiples of 8; ours above
    it, for unaligned operands, in fp32, and with the "triton" backend."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from modeling_moe.kernels import dispatch
    from modeling_moe.kernels import fused_moe_ops as fm

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    monkeypatch.setattr(dispatch, "is_sm90", lambda device: True)
    with FakeTensorMode():
        def library(hidden, inter, dtype=torch.bfloat16):
            """(GEMM1, GEMM2) through the library."""
            x = torch.empty(96, hidden, dtype=dtype, device="cuda")
            h = torch.empty(96, inter, dtype=dtype, device="cuda")
            gate_up = torch.empty(4, 2 * inter, hidden, dtype=dtype, device="cuda")
            down = torch.empty(4, hidden, inter, dtype=dtype, device="cuda")
            assert not fm._library_gemm1(x, gate_up, save_gu=False)
            return fm._library_gemm1(x, gate_up, save_gu=True), fm._library_gemm2(h, down)

        assert library(1024, 512) == library(40, 24) == (True, True)
        assert library(2048, 1408) == (False, False)  # the V2-Lite shape: ours leads
        assert library(36, 24) == (False, False)  # H not 16-byte aligned
        assert library(40, 36) == (True, False)  # I not 16-byte aligned, 2I is
        assert library(40, 34) == (False, False)
        assert library(1024, 512, torch.float32) == (False, False)
        set_backward_gemm_backend("triton")
        try:
            assert library(1024, 512) == (False, False)
        finally:
            set_backward_gemm_backend(None)


def poison(tensor: torch.Tensor) -> torch.Tensor:
    """Fill a fresh buffer with what recycled GPU memory may hold: NaN, or an out-of-range index."""
    return tensor.fill_(float("nan") if tensor.is_floating_point() else 2**20)


@needs_triton
@pytest.mark.parametrize("blocks", [None, (64, 64, 32)], ids=["default_blocks", "64x64x32_blocks"])
@pytest.mark.parametrize("name", ["experts_without_tokens", "all_tokens_on_one_expert", "uneven_sizes", "one_token"])
def test_every_output_element_is_written(triton_path, monkeypatch, name, blocks):
    """Buffers from torch.empty hold whatever the allocator recycled (on a GPU, often another tensor's NaN or -inf):
    with every fresh allocation poisoned, the outputs and all gradients still match the float64 reference, so no
    kernel leaves an element unwritten (e.g. for experts without tokens or the padding rows of a tile)."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    poisoned = []

    def counted(tensor):
        poisoned.append(tensor.shape)
        return poison(tensor)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: counted(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: counted(empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: counted(new_empty(self, *a, **k)))
    tokens, hidden, inter, experts, top_k, routing = CASES[name]
    case = make_case(tokens, hidden, inter, experts, top_k, routing, seed=len(name), device=triton_path)
    with config_override(KernelConfig(*blocks, 4, 2, 8)) if blocks else contextlib.nullcontext():
        check_against_reference(case, tolerance=1e-5)
    assert len(poisoned) >= 10  # the routing, activation and gradient buffers of both passes


@needs_triton
@pytest.mark.parametrize("name", ["uneven_sizes", "experts_without_tokens", "all_tokens_on_one_expert",
                                  "block_multiples"])
def test_weights_read_through_tma_descriptors(triton_path, monkeypatch, name):
    """The weight_tma candidates: every row-tiled GEMM (gemm1, gemm2, dgrad_h, dgrad_x) reads the expert weights
    and both wgrads write their gradients through a TMA descriptor, and output and gradients still match float64,
    including experts' K, M and N edges that are not multiples of the blocks (the descriptor reads 0 past them and
    clips the stores there)."""
    from modeling_moe.kernels import fused_moe_ops

    built = []
    tma_desc = fused_moe_ops._tma_desc
    monkeypatch.setattr(fused_moe_ops, "_tma_desc",
                        lambda *args, **kwargs: built.append(tma_desc(*args, **kwargs)) or built[-1])
    tokens, hidden, inter, experts, top_k, routing = CASES[name]
    case = make_case(tokens, hidden, inter, experts, top_k, routing, seed=len(name), device=triton_path)
    blocks = (16, 16, 16, 1, 1, 4) if triton_path == "cpu" else (64, 64, 32, 4, 2, 8)
    with config_override(KernelConfig(*blocks, weight_tma=True)):
        check_against_reference(case, tolerance=1e-5)
    assert len(built) == 6 and all(desc is not None for desc in built)


@needs_triton
@pytest.mark.parametrize("weight_tma", [False, True], ids=["pointer", "tma"])
@pytest.mark.parametrize("name", ["uneven_sizes", "experts_without_tokens", "all_tokens_on_one_expert", "one_token"])
def test_dgrad_h_split_into_a_gemm_and_a_swiglu_backward_pass(triton_path, monkeypatch, name, weight_tma):
    """A `split` dgrad_h config: a plain GEMM with the token gather writes dA into dgu's gate half, then a pass of
    its own applies the SwiGLU backward and sums the routing-weight gradient over whole rows. Output and every
    gradient match float64, with every fresh buffer poisoned (no element left unwritten), and the pass ran."""
    from modeling_moe.kernels import fused_moe_ops

    kernels = fused_moe_ops._k()
    launched = []
    swiglu_backward = kernels._swiglu_backward_kernel
    monkeypatch.setattr(kernels, "_swiglu_backward_kernel", type("Counted", (), {
        "__getitem__": lambda self, grid: launched.append(grid) or swiglu_backward[grid]})())
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
    tokens, hidden, inter, experts, top_k, routing = CASES[name]
    case = make_case(tokens, hidden, inter, experts, top_k, routing, seed=len(name) + 3, device=triton_path)
    blocks = (16, 16, 16, 1, 1, 4) if triton_path == "cpu" else (64, 64, 32, 4, 2, 8)
    with config_override(KernelConfig(*blocks, weight_tma=weight_tma, split=True)):
        check_against_reference(case, tolerance=1e-5)
    assert len(launched) == 1


@needs_triton
def test_weights_that_tma_cannot_read_fall_back_to_pointer_loads(triton_path):
    """A weight whose row stride is not 16-byte aligned (a view into a wider tensor): pointer loads, same results."""
    from modeling_moe.kernels.fused_moe_ops import _weight_desc

    x, gate_up, down, index, weights = make_case(20, 48, 40, 6, 2, seed=2, device=triton_path)
    wide = torch.zeros(6, 80, 49, device=triton_path, dtype=gate_up.dtype)
    wide[..., :48] = gate_up
    strided = wide[..., :48]  # row stride 49 elements
    config = KernelConfig(16, 16, 16, 1, 1, 4, weight_tma=True)
    assert _weight_desc(config, strided, b_kn=False) is None and _weight_desc(config, gate_up, b_kn=False) is not None
    with config_override(config if triton_path == "cpu" else KernelConfig(64, 64, 32, 4, 2, 8, weight_tma=True)):
        check_against_reference((x, strided, down, index, weights), tolerance=1e-5)


def hopper_compiler(monkeypatch):
    """benchmarks/kernel_resources.py (offline sm_90 compiles), over a fresh, compiled copy of the kernels module for
    this test (an earlier test may have imported the interpreter's; this one's must not reach later tests)."""
    from modeling_moe.kernels import fused_moe_ops

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec = importlib.util.spec_from_file_location(
        "fused_moe_kernels_compiled", Path(fused_moe_ops.__file__).with_name("fused_moe_kernels.py"))
    kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels)
    monkeypatch.setattr(fused_moe_ops, "_kernels", kernels)
    return load_benchmark_script("kernel_resources")


@needs_triton
@pytest.mark.parametrize("kernel", ["gemm1", "gemm2", "dgrad_x", "dgrad_h", "wgrad_gate_up", "wgrad_down"])
def test_tma_twins_compile_for_hopper_with_tma_weight_loads(kernel, monkeypatch):
    """Each fused GEMM's default and its twin (the same tile, with the expert weights, or for wgrad their gradients,
    by TMA or by pointers), compiled for an H100 / H200 (sm_90) on the CPU as its launcher builds them: the TMA
    config's weights arrive by TMA (cp.async.bulk.tensor; wgrad's gradient tiles leave by TMA stores), the gathered
    activations by pipelined cp.async, the MMAs are wgmma; the pointer config has no TMA, except an `operand_tma`
    wgrad's sorted operand, which arrives by TMA in both twins. (The interpreter cannot show the descriptors'
    lowering.)"""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from modeling_moe.kernels.fused_moe_ops import CANDIDATES

    resources = hopper_compiler(monkeypatch)
    family = resources.FAMILIES[kernel][0]
    default = CANDIDATES[(family, "big")][0]
    twin = dataclasses.replace(default, weight_tma=not default.weight_tma)
    assert twin in CANDIDATES[(family, "big")]
    run = JITFunction.run
    for config in (twin, default):
        compiled = resources.compile_fused_kernel(kernel, config, hidden=256, inter=128, top_k=2)
        ptx = compiled.asm["ptx"]
        if kernel.startswith("wgrad"):
            assert ("cp.async.bulk.tensor.3d.global.shared" in ptx) == config.weight_tma  # a store: shared -> global
            assert ("cp.async.bulk.tensor.2d.shared" in ptx) == config.operand_tma  # loads of the sorted operand
        else:
            assert ("cp.async.bulk.tensor" in ptx) == config.weight_tma
        assert "cp.async.cg.shared.global" in ptx and "wgmma" in ptx
        usage = resources.resource_usage(compiled)
        assert 0 < usage.registers <= 255 and usage.shared_bytes > 0
    assert JITFunction.run is run and driver._active is None  # compile_only put everything back


@needs_triton
@pytest.mark.parametrize("kernel", ["wgrad_gate_up", "wgrad_down"])
def test_wgrad_pipelines_a_tile_buffer_per_stage_for_hopper(kernel, monkeypatch):
    """wgrad loads the next K block's row indices one iteration ahead, so Triton's sm_90 pipeliner keeps a buffer per
    stage for the gathered tiles (with the indices loaded in the same iteration it kept 2 at 3-4 stages): 4 stages
    of a 128x128x32 tile pair (A and B, 8 KiB each in bf16) take 64 KiB."""
    resources = hopper_compiler(monkeypatch)
    compiled = resources.compile_fused_kernel(kernel, KernelConfig(128, 128, 32, 4, 4), hidden=256, inter=128, top_k=2)
    usage = resources.resource_usage(compiled)
    assert usage.shared_bytes == 4 * 2 * 128 * 32 * 2
    assert usage.spill_bytes == 0


@needs_triton
@pytest.mark.parametrize("kind", ["wgrad_gate_up", "wgrad_down"])
@pytest.mark.parametrize("bucket", ["big", "small"])
def test_every_wgrad_candidate_matches_float64(triton_path, kind, bucket):
    """Each tile of the wgrad lists (the autotune may pick any), as its launcher runs it for that gradient (gathered x
    for gate_up; gathered dY for down), uneven sizes, an expert without rows, into a
    fresh output and added into an existing one. The tiles are bf16 tiles (fp32 runs its own small config), so on a
    GPU the operands are bf16 and the output fp32, as in training; the interpreter checks fp32 operands."""
    from modeling_moe.kernels import fused_moe_ops as fm

    dtype = torch.bfloat16 if triton_path == "cuda" else torch.float32
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    routing, a, b, gather, expected = wgrad_case(kind, 23, seed=21, device=triton_path, dtype=dtype)
    before = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3)).to(a.device)
    for config in fm.CANDIDATES[(kind, bucket)]:
        out = torch.full(expected.shape, float("nan"), device=a.device)
        fm._launch_wgrad(config, routing, a, b, out, **gather)
        assert relative_error(out.cpu(), expected) < tolerance, config
        into = before.clone()
        fm._launch_wgrad(config, routing, a, b, into, **gather, accumulate=True)
        assert relative_error(into.cpu(), expected + before.double().cpu()) < tolerance, config


@needs_triton
@pytest.mark.parametrize("kind", ["wgrad_gate_up", "wgrad_down"])
@pytest.mark.parametrize("tokens", [23, 32, 5], ids=["whole_blocks_and_a_tail", "whole_blocks_only", "a_tail_only"])
@pytest.mark.parametrize("flags", [{}, {"weight_tma": True, "persistent": True}], ids=["plain", "c_tma_persistent"])
def test_wgrad_reads_its_sorted_operand_through_tma(triton_path, monkeypatch, kind, tokens, flags):
    """An `operand_tma` wgrad config: the operand that is not gathered (dgu for gate_up, w*h for down) comes through a
    TMA descriptor for each expert's whole K blocks, and the last, partial block through masked pointer loads (the rows
    after it are the next expert's). Against float64, into a fresh output and added into one: experts whose rows are
    whole blocks only, a tail only, both, and experts without rows."""
    from modeling_moe.kernels import fused_moe_ops as fm

    built = []
    tma_desc = fm._tma_desc
    monkeypatch.setattr(fm, "_tma_desc", lambda tensor, block: built.append(tensor.dim()) or tma_desc(tensor, block))
    dtype = torch.bfloat16 if triton_path == "cuda" else torch.float32
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    routing, a, b, gather, expected = wgrad_case(kind, tokens, seed=tokens, device=triton_path, dtype=dtype)
    blocks = (16, 16, 16, 1, 1, 4) if triton_path == "cpu" else (64, 64, 32, 4, 2, 8)
    config = KernelConfig(*blocks, operand_tma=True, **flags)
    out = torch.full(expected.shape, float("nan"), device=a.device)
    fm._launch_wgrad(config, routing, a, b, out, **gather)
    assert relative_error(out.cpu(), expected) < tolerance
    before = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3)).to(a.device)
    into = before.clone()
    fm._launch_wgrad(config, routing, a, b, into, **gather, accumulate=True)
    assert relative_error(into.cpu(), expected + before.double().cpu()) < tolerance
    assert built.count(2) == 2  # the operand's descriptor, once a launch


def wgrad_case(kind, tokens, seed, device, dtype=torch.float32):
    """A weight gradient's operands as `_launch_wgrad` takes them, over 5 experts (H 40, I 24, top-2, the first half of
    the experts routed to): (routing, A, B, the gather arguments, the float64 gradient on the CPU). kind:
    "wgrad_gate_up" (dgu [rows, 48] sorted, x gathered: [5, 48, 40]) or "wgrad_down" (dY gathered, w*h [rows, 24]
    sorted: [5, 40, 24])."""
    from modeling_moe.kernels import fused_moe_ops as fm

    x, _, _, index, weights = make_case(tokens, 40, 24, 5, 2, routing="some_empty", seed=seed, device=device)
    x = x.to(dtype)
    perm, inv, offsets = fm.build_routing(index, 5)
    routing = fm.Routing(perm, inv, offsets, 2, 40, 24, x.dtype)
    width = 48 if kind == "wgrad_gate_up" else 24
    sorted_rows = torch.randn(perm.numel(), width, generator=torch.Generator().manual_seed(seed + 1))
    sorted_rows = sorted_rows.to(x.device, dtype)
    token = perm.long() // 2
    if kind == "wgrad_gate_up":  # dW[e] = sum_r dgu_r^T x[tok_r]
        a, b, gather = sorted_rows, x, dict(gather_a=False, gather_b=True)
        rows_a, rows_b = sorted_rows.double(), x.double()[token]
    else:  # dW[e] = sum_r dY[tok_r]^T (w h)_r
        a, b, gather = x, sorted_rows, dict(gather_a=True, gather_b=False)
        rows_a, rows_b = x.double()[token], sorted_rows.double()
    counts = (offsets[1:] - offsets[:-1]).tolist()
    expected = torch.stack([ca.T @ cb for ca, cb in zip(rows_a.split(counts), rows_b.split(counts))]).cpu()
    return routing, a, b, gather, expected


@needs_triton
def test_adding_into_a_gradient_goes_through_tma_where_it_can(triton_path, monkeypatch):
    """Accumulating wgrad launches read and write C through a TMA descriptor whatever the config (fewer registers on
    sm_90), fresh writes only with a `weight_tma` config; a C that TMA cannot address (row stride not 16-byte
    aligned) is added into through pointers. The sums match float64 either way."""
    from modeling_moe.kernels import fused_moe_ops as fm

    built = []
    tma_desc = fm._tma_desc
    monkeypatch.setattr(fm, "_tma_desc", lambda *args, **kwargs: built.append(tma_desc(*args, **kwargs)) or built[-1])
    routing, dgu, x, _, expected = wgrad_case("wgrad_gate_up", 20, seed=4, device=triton_path)
    config = fm.KernelConfig(16, 16, 16, 1, 1, 4) if triton_path == "cpu" else fm.KernelConfig(64, 64, 32, 4, 2)
    fresh = torch.empty(5, 48, 40, device=x.device)
    fm._launch_wgrad(config, routing, dgu, x, fresh, False, True)
    assert built == [] and relative_error(fresh.cpu(), expected) < 1e-5
    before = torch.randn(5, 48, 40, generator=torch.Generator().manual_seed(6))
    into = before.clone().to(x.device)
    fm._launch_wgrad(config, routing, dgu, x, into, False, True, accumulate=True)
    assert len(built) == 1 and built[0] is not None
    assert relative_error(into.cpu(), expected + before.double()) < 1e-5
    wide = before.new_zeros(5, 48, 41).to(x.device)  # row stride 41 fp32 elements: TMA cannot address it
    wide[..., :40] = before
    fm._launch_wgrad(config, routing, dgu, x, wide[..., :40], False, True, accumulate=True)
    assert len(built) == 2 and built[1] is None
    assert relative_error(wide[..., :40].cpu(), expected + before.double()) < 1e-5


@needs_triton
def test_persistent_wgrad_walks_every_tile(triton_path):
    """A `persistent` wgrad launches fewer programs than tiles (three in the interpreter, a wave of the SMs on a GPU),
    each walking the (expert, M tile, N tile) tiles in steps of the grid: with 16x16 tiles every expert has 3 x 3
    tiles, some experts none of their rows, and the sums still match float64, fresh and added into C."""
    from modeling_moe.kernels import fused_moe_ops as fm

    routing, dgu, x, _, expected = wgrad_case("wgrad_gate_up", 30, seed=8, device=triton_path)
    assert 0 in (routing.offsets[1:] - routing.offsets[:-1]).tolist()
    blocks = (16, 16, 16, 1, 1, 4) if triton_path == "cpu" else (64, 64, 32, 4, 2)
    for weight_tma in (False, True):
        config = fm.KernelConfig(*blocks, weight_tma=weight_tma, persistent=True)
        fresh = torch.full((5, 48, 40), float("nan"), device=x.device)
        fm._launch_wgrad(config, routing, dgu, x, fresh, False, True)
        assert relative_error(fresh.cpu(), expected) < 1e-5, config
        before = torch.randn(5, 48, 40, generator=torch.Generator().manual_seed(10))
        into = before.clone().to(x.device)
        fm._launch_wgrad(config, routing, dgu, x, into, False, True, accumulate=True)
        assert relative_error(into.cpu(), expected + before.double()) < 1e-5, config


@needs_triton
def test_a_persistent_wgrad_that_does_not_fit_runs_a_tile_a_program(monkeypatch):
    """The persistent grid is one wave, SMs x programs an SM of the compiled kernel (cached per signature). Where that
    compile does not fit on the device (fp32 gradients through TMA at 128x256: a staging tile of its own beside the
    pipeline buffers, 256 KiB of shared memory on an H200's 227), the launch gets 0 and runs a tile a program."""
    from types import SimpleNamespace

    from triton.runtime.errors import OutOfResources

    from modeling_moe.kernels import fused_moe_ops as fm

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    monkeypatch.setattr(fm, "_PERSISTENT_PROGRAMS", {})
    compiled = []

    class Kernel:
        def warmup(self, *args, grid, **flags):
            compiled.append(flags)
            return flags["fits"]

    def programs_per_sm(fits, num_warps, device):
        if not fits:
            raise OutOfResources(262152, 232448, "shared memory")
        return 2

    monkeypatch.setattr(fm, "programs_per_sm", programs_per_sm)
    gpu = torch.device("cuda", 0)
    dtypes = (torch.bfloat16, torch.bfloat16, torch.float32)
    assert fm._persistent_programs(Kernel(), (), dict(fits=True), dtypes, 8, gpu) == 264
    assert fm._persistent_programs(Kernel(), (), dict(fits=False), dtypes, 8, gpu) == 0
    assert fm._persistent_programs(Kernel(), (), dict(fits=False), dtypes, 8, gpu) == 0
    assert len(compiled) == 2  # once per signature


def accumulation_spy(monkeypatch):
    """The `accumulate` flag of every wgrad launch, in order."""
    from modeling_moe.kernels import fused_moe_ops

    flags = []
    launch = fused_moe_ops._launch_wgrad

    def spy(*args, accumulate=False, **kwargs):
        flags.append(accumulate)
        return launch(*args, accumulate=accumulate, **kwargs)

    monkeypatch.setattr(fused_moe_ops, "_launch_wgrad", spy)
    return flags


def reference_gradients(case, grad):
    """float64 gradients of (x, gate_up, down, weights) for one backward of `grad`."""
    x, gate_up, down, index, weights = case
    refs = [t.detach().double().cpu().requires_grad_(True) for t in (x, gate_up, down, weights)]
    moe_experts_reference(refs[0], refs[1], refs[2], index.cpu(), refs[3]).backward(grad.double().cpu())
    return [r.grad for r in refs]


@needs_triton
def test_weight_gradients_accumulate_in_place_across_backwards(triton_path, monkeypatch):
    """Gradient-accumulation fusion: when .grad already holds a gradient, wgrad adds into it (no separate add), and
    after two backwards (two micro-batches' routings and output gradients) the weights' .grad is the float64 sum;
    the first backward, without a .grad yet, writes a fresh gradient; turned off, every launch writes fresh."""
    from modeling_moe.kernels.fused_moe_ops import set_grad_accumulation_fusion

    flags = accumulation_spy(monkeypatch)
    first, second = make_case(24, 48, 40, 6, 2, seed=11, device=triton_path), \
        make_case(24, 48, 40, 6, 2, routing="some_empty", seed=12, device=triton_path)
    gate_up = torch.nn.Parameter(first[1].clone())
    down = torch.nn.Parameter(first[2].clone())
    expected = [torch.zeros(gate_up.shape, dtype=torch.float64), torch.zeros(down.shape, dtype=torch.float64)]
    for fusion in (True, False):
        set_grad_accumulation_fusion(fusion)
        try:
            gate_up.grad = down.grad = None
            flags.clear()
            for seed, case in enumerate((first, second)):
                x, _, _, index, weights = case
                out = fused_moe(x, gate_up, down, index, weights)
                grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
                out.backward(grad)
                if fusion:
                    reference = reference_gradients((x, first[1], first[2], index, weights), grad)
                    expected[0] += reference[1]
                    expected[1] += reference[2]
            assert relative_error(gate_up.grad.cpu(), expected[0]) < 1e-5
            assert relative_error(down.grad.cpu(), expected[1]) < 1e-5
            assert flags == [False, False, fusion, fusion]  # down then gate_up, per backward
        finally:
            set_grad_accumulation_fusion(True)


@needs_triton
def test_autotune_never_times_a_launch_that_adds_into_grad(triton_path, monkeypatch):
    """Timing a candidate runs it many times: a wgrad launch that adds into .grad (gradient-accumulation fusion) must
    not be timed, or .grad gets this backward's gradient once per run. The second micro-batch is of a new token
    bucket, so its backward, which adds into .grad, is the first to choose configs for it."""
    import triton.testing

    from modeling_moe.kernels import fused_moe_ops

    def do_bench(fn, **kwargs):
        for _ in range(3):
            fn()
        return 1.0

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # timing needs CUDA; do_bench is faked above
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(fused_moe_ops, "_chosen", {})
    monkeypatch.setattr(fused_moe_ops, "_candidates",
                        lambda *args: [KernelConfig(16, 16, 16, 1, 1, 4), KernelConfig(16, 32, 16, 1, 1, 4)])
    set_autotune(True)
    first = make_case(8, 32, 16, 4, 2, seed=11, device=triton_path)
    second = make_case(20, 32, 16, 4, 2, seed=12, device=triton_path)
    gate_up, down = torch.nn.Parameter(first[1].clone()), torch.nn.Parameter(first[2].clone())
    expected = [0.0, 0.0]
    for seed, (x, _, _, index, weights) in enumerate((first, second)):
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.device)
        fused_moe(x, gate_up, down, index, weights).backward(grad)
        reference = reference_gradients((x, first[1], first[2], index, weights), grad)
        expected = [expected[0] + reference[1], expected[1] + reference[2]]
    assert relative_error(gate_up.grad.cpu(), expected[0]) < 1e-5
    assert relative_error(down.grad.cpu(), expected[1]) < 1e-5


class FusedExperts(torch.nn.Module):
    def __init__(self, gate_up, down):
        super().__init__()
        self.gate_up, self.down = torch.nn.Parameter(gate_up.clone()), torch.nn.Parameter(down.clone())

    def forward(self, x, index, weights):
        return fused_moe(x, self.gate_up, self.down, index, weights)


@needs_triton
@pytest.mark.parametrize("bucket_view", [False, True], ids=["grad_copied_to_bucket", "gradient_as_bucket_view"])
def test_gradient_accumulation_fusion_under_ddp_no_sync(triton_path, monkeypatch, tmp_path, bucket_view):
    """DistributedDataParallel with a micro-batch under no_sync() and a synced one (accelerate's gradient
    accumulation): the second backward adds into .grad in place, and DDP's reducer (its hooks run after
    AccumulateGrad; with gradient_as_bucket_view .grad is a view of its bucket) ends with the float64 sum."""
    import torch.distributed as dist

    flags = accumulation_spy(monkeypatch)
    first = make_case(24, 48, 40, 6, 2, seed=31, device=triton_path)
    second = make_case(24, 48, 40, 6, 2, seed=32, device=triton_path)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        module = FusedExperts(first[1], first[2])
        model = torch.nn.parallel.DistributedDataParallel(module, gradient_as_bucket_view=bucket_view)
        expected = [0.0, 0.0]
        for seed, (case, context) in enumerate(((first, model.no_sync()), (second, contextlib.nullcontext()))):
            x, _, _, index, weights = case
            grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.device)
            with context:
                model(x, index, weights).backward(grad)
            reference = reference_gradients((x, first[1], first[2], index, weights), grad)
            expected = [expected[0] + reference[1], expected[1] + reference[2]]
        # DDP's reducer holds the process group: freed after destroy_process_group (at the test's end), its gloo
        # teardown once hung joining its threads in CI
        del model
    finally:
        dist.destroy_process_group()
    assert relative_error(module.gate_up.grad.cpu(), expected[0]) < 1e-5
    assert relative_error(module.down.grad.cpu(), expected[1]) < 1e-5
    assert flags == [False, False, True, True]


@needs_triton
def test_gradient_accumulation_fusion_only_where_it_cannot_show(triton_path, monkeypatch):
    """With a .grad present the fusion is skipped, and every result is as without it, where a caller could tell:
    autograd.grad() (the gradient is returned, .grad untouched), backward(inputs=...) without the weights, a tensor
    hook on a weight (it sees this backward's gradient alone); and a weight used twice in one backward still gets
    both uses added to its .grad."""
    flags = accumulation_spy(monkeypatch)
    x, gate_up0, down0, index, weights = make_case(24, 48, 40, 6, 2, seed=13, device=triton_path)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(x.device)
    ref = reference_gradients((x, gate_up0, down0, index, weights), grad)
    gate_up, down = torch.nn.Parameter(gate_up0.clone()), torch.nn.Parameter(down0.clone())
    old = [torch.randn(gate_up.shape).to(x.device), torch.randn(down.shape).to(x.device)]

    def fresh_grads():
        gate_up.grad, down.grad = old[0].clone(), old[1].clone()
        flags.clear()

    fresh_grads()
    dgate_up, ddown = torch.autograd.grad(fused_moe(x, gate_up, down, index, weights), (gate_up, down), grad)
    assert relative_error(dgate_up.cpu(), ref[1]) < 1e-5 and relative_error(ddown.cpu(), ref[2]) < 1e-5
    assert torch.equal(gate_up.grad, old[0]) and torch.equal(down.grad, old[1]) and not any(flags)

    fresh_grads()
    xs = x.clone().requires_grad_(True)
    fused_moe(xs, gate_up, down, index, weights).backward(grad, inputs=[xs])
    assert relative_error(xs.grad.cpu(), ref[0]) < 1e-5
    assert torch.equal(gate_up.grad, old[0]) and torch.equal(down.grad, old[1]) and not any(flags)

    fresh_grads()
    seen = []
    handle = gate_up.register_hook(lambda g: seen.append(g.clone()))
    fused_moe(x, gate_up, down, index, weights).backward(grad)
    handle.remove()
    assert relative_error(seen[0].cpu(), ref[1]) < 1e-5
    assert relative_error(gate_up.grad.cpu(), old[0].double().cpu() + ref[1]) < 1e-5
    assert flags == [True, False]  # down (no hook) fused, gate_up (hooked) not

    fresh_grads()
    twice = fused_moe(x, gate_up, down, index, weights) + fused_moe(x, gate_up, down, index, weights)
    twice.backward(grad)
    assert relative_error(gate_up.grad.cpu(), old[0].double().cpu() + 2 * ref[1]) < 1e-5
    assert relative_error(down.grad.cpu(), old[1].double().cpu() + 2 * ref[2]) < 1e-5
    assert any(flags)


@needs_triton
@pytest.mark.parametrize("trainable", [("top_k_weights",), ("x", "top_k_weights"), ("gate_up_proj", "top_k_weights"),
                                       ("down_proj",), ("x",), ("x", "gate_up_proj", "down_proj")])
def test_gradients_when_only_some_inputs_require_grad(triton_path, trainable):
    """E.g. a frozen-experts router (only the routing weights): the routing-weight gradient stays exact."""
    case = make_case(20, 48, 40, 6, 2, seed=5, device=triton_path)
    check_against_reference(case, tolerance=1e-5, trainable=trainable)


@needs_triton
def test_two_autograd_nodes_and_their_boundary(triton_path):
    """Node 1 returns the sorted pre-activations gu (its differentiable output); node 2's backward returns dL/dgu."""
    ops = torch.ops.modeling_moe
    x, gate_up, down, index, weights = make_case(20, 48, 40, 6, 2, seed=3, device=triton_path)
    gu, h, perm, inv, offsets, xs = ops.fused_moe_gate_up(x, gate_up, index, True)
    assert relative_error(gu, sorted_pre_activations(x.double(), gate_up.double(), index)) < 1e-6
    gu_in = gu.clone().requires_grad_(True)
    out = ops.fused_moe_down(gu_in, h, down, weights, perm, inv, offsets)
    grad = torch.randn_like(out)
    out.backward(grad)
    gu_ref = gu.double().requires_grad_(True)
    down_and_combine(gu_ref, down.double(), index, weights.double()).backward(grad.double())
    assert relative_error(gu_in.grad, gu_ref.grad) < 1e-5

    # fused_moe is the two ops, and its backward runs node 2's backward op, then node 1's (recorded at the dispatcher:
    # torch 2.11 refuses `.name()` and `.next_functions` on these nodes)
    inputs = [t.requires_grad_(True) for t in (x, gate_up, down, weights)]
    with OpRecorder() as forward:
        out = fused_moe(inputs[0], inputs[1], inputs[2], index, inputs[3])
    with OpRecorder() as backward:
        out.backward(grad)
    assert forward.custom_ops() == ["fused_moe_gate_up", "fused_moe_down"]
    assert backward.custom_ops() == ["fused_moe_down_backward", "fused_moe_gate_up_backward"]


@needs_triton
def test_autocast_runs_the_kernels_in_its_dtype_over_fp32_weights(triton_path):
    """Mixed precision (fp32 weights under autocast, as the trainer's --bf16 runs them): the kernels get operands in
    autocast's dtype, as a matmul under autocast would, not fp32 ones (fp32 tiles, no tensor cores); the output keeps
    the input's dtype and the fp32 weights get fp32 gradients, within half-precision error of float64. bf16 on a
    GPU; fp16 in the interpreter, whose numpy has no bf16."""
    x, gate_up, down, index, weights = make_case(20, 48, 40, 6, 2, seed=7, device=triton_path)
    leaves = [t.clone().requires_grad_(True) for t in (x, gate_up, down, weights)]
    low = torch.bfloat16 if triton_path == "cuda" else torch.float16  # the interpreter (numpy) has no bf16
    with OpRecorder() as ops, torch.autocast(triton_path, dtype=low):
        out = fused_moe(leaves[0], leaves[1], leaves[2], index, leaves[3])
    assert [dtypes[:3] for name, dtypes in ops.custom_op_dtypes() if name == "fused_moe_gate_up"] == \
        [(low, low, index.dtype)]
    assert out.dtype == torch.float32
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).to(out.device)
    out.backward(grad)
    refs = [t.detach().double().cpu().requires_grad_(True) for t in (x, gate_up, down, weights)]
    reference = moe_experts_reference(refs[0], refs[1], refs[2], index.cpu(), refs[3])
    reference.backward(grad.double().cpu())
    assert relative_error(out.detach().cpu(), reference) < 2e-2
    for leaf, ref in zip(leaves, refs):
        assert leaf.grad.dtype == torch.float32 and relative_error(leaf.grad.cpu(), ref.grad) < 2e-2


def test_fp32_operands_follow_torchs_matmul_precision():
    """The kernels' fp32 products use TF32 only where torch's fp32 matmuls would (float32_matmul_precision "high"
    or "medium"); by default ("highest") they are full fp32."""
    from modeling_moe.kernels.fused_moe_ops import _dot_precision

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert _dot_precision(torch.float32) == "ieee"
        for setting in ("high", "medium"):
            torch.set_float32_matmul_precision(setting)
            assert _dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


class OpRecorder(TorchDispatchMode):
    """The ops dispatched inside the block, in order, with their arguments' dtypes."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append((str(func), tuple(a.dtype if torch.is_tensor(a) else None for a in args)))
        return func(*args, **(kwargs or {}))

    def custom_op_dtypes(self):
        """This project's ops (the modeling_moe namespace) by name, with their positional arguments' dtypes."""
        return [(op.split(".")[1], dtypes) for op, dtypes in self.ops if op.startswith("modeling_moe.")]

    def custom_ops(self):
        return [name for name, _ in self.custom_op_dtypes()]


@needs_triton
def test_down_gradient_is_accumulated_before_gate_up_gradient_exists(triton_path, monkeypatch):
    """The peak-memory point of the two nodes: dW_down reaches .grad (its buffer can go) before node 1's backward
    allocates dW_gate_up."""
    from modeling_moe.kernels import fused_moe_ops

    events = []
    gate_up_backward = fused_moe_ops.gate_up_backward_impl
    monkeypatch.setattr(fused_moe_ops, "gate_up_backward_impl",
                        lambda *args: events.append("gate_up backward") or gate_up_backward(*args))
    x, gate_up, down, index, weights = make_case(20, 48, 40, 6, 2, seed=4, device=triton_path)
    for name, param in (("down", down), ("gate_up", gate_up)):
        param.requires_grad_(True).register_post_accumulate_grad_hook(lambda p, name=name: events.append(name))
    fused_moe(x.requires_grad_(True), gate_up, down, index, weights.requires_grad_(True)).sum().backward()
    assert events == ["down", "gate_up backward", "gate_up"]


@pytest.mark.parametrize("env_var, default, other, setter, getter", [
    ("MOE_BACKWARD_GEMM", "auto", "triton", set_backward_gemm_backend, backward_gemm_backend),
    ("MLA_DECODE_KERNEL", "auto", "triton", set_split_backend, split_backend),
], ids=["backward_gemm_backend", "mla_decode_split_backend"])
def test_kernel_settings(monkeypatch, env_var, default, other, setter, getter):
    """The default, the environment variable over it, a value set in code over both; unknown names refused."""
    monkeypatch.delenv(env_var, raising=False)
    assert getter() == default
    monkeypatch.setenv(env_var, other)
    assert getter() == other
    setter(default)
    try:
        assert getter() == default
        with pytest.raises(ValueError, match="'bogus' is not one of"):
            setter("bogus")
    finally:
        setter(None)
    monkeypatch.setenv(env_var, "bogus")
    with pytest.raises(ValueError, match=env_var):
        getter()


@needs_triton
@pytest.mark.parametrize("candidate", [0, 1, 2, -1])
def test_decode_bucket_tile_candidates(triton_path, candidate):
    """The 16/32-row candidates of the decode bucket (the default first, its TMA twin last; a few rows per expert,
    as in a generate step), forced: one to two rows on most experts, none on some, sizes that are not multiples of
    the blocks.
    Forward only (the bucket serves generation)."""
    from modeling_moe.kernels.fused_moe_ops import CANDIDATES, _bucket

    assert _bucket(6 * 3, 32) == "decode" and _bucket(16 * 32, 32) == "small"
    config = CANDIDATES[("gemm1", "decode")][candidate]
    # bf16 on a GPU, as generation runs (these tiles' fp32 buffers do not fit an H200's shared memory; fp32 operands
    # get FP32_CONFIG); the interpreter checks fp32
    dtype = torch.bfloat16 if triton_path == "cuda" else torch.float32
    x, gate_up, down, index, weights = make_case(6, 136, 72, 32, 3, device=triton_path, dtype=dtype)
    with config_override(config), torch.no_grad():
        out = fused_moe(x, gate_up, down, index, weights)
    reference = moe_experts_reference(*(t.double().cpu() for t in (x, gate_up, down)), index.cpu(),
                                      weights.double().cpu())
    assert relative_error(out.cpu(), reference) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("backend", [None, "grouped_mm"], ids=["default", "library"])
def test_no_tokens(triton_path, backend):
    """An empty batch: an empty output and zero weight gradients, on our kernels and through the library."""
    if backend and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    x, gate_up, down, index, weights = (t.requires_grad_(t.is_floating_point()) for t in make_case(
        0, 16, 16, 4, 2, device=triton_path))
    set_backward_gemm_backend(backend)
    try:
        out = fused_moe(x, gate_up, down, index, weights)
        assert out.shape == (0, 16)
        out.sum().backward()
    finally:
        set_backward_gemm_backend(None)
    assert x.grad.shape == (0, 16) and weights.grad.shape == (0, 2)
    assert not gate_up.grad.any() and not down.grad.any()


def test_no_tokens_on_the_reference_path(monkeypatch):
    monkeypatch.setenv("MOE_FUSED_REFERENCE", "1")
    x, gate_up, down, index, weights = make_case(0, 16, 16, 4, 2)
    assert fused_moe(x, gate_up, down, index, weights).shape == (0, 16)


@needs_triton
def test_float64_goes_to_the_reference(triton_path):
    """The kernels accumulate in fp32: float64 inputs take the float64 reference (on the Triton path too)."""
    case = [t.double() if t.is_floating_point() else t for t in make_case(9, 24, 16, 5, 2, device=triton_path)]
    expected = moe_experts_reference(*(t.cpu() for t in case))
    torch.testing.assert_close(fused_moe(*case).cpu(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("change, message", [
    (lambda c: (c[0][:, :-1], *c[1:]), "hidden_states must be"),
    (lambda c: (c[0], c[1], c[2][:, :, :-1], *c[3:]), "down_proj must be"),
    (lambda c: (*c[:3], c[3][:, :1], c[4]), "top_k_index and top_k_weights"),
    (lambda c: (*c[:3], c[3][:-1], c[4][:-1]), "top_k_index and top_k_weights"),
    (lambda c: (*c[:3], c[3].float(), c[4]), "integer expert ids"),
])
def test_fused_moe_names_the_argument_that_does_not_fit(change, message):
    with pytest.raises(ValueError, match=message):
        fused_moe(*change(make_case(6, 16, 8, 4, 2)))


@needs_triton
def test_deterministic_and_inference_path(triton_path):
    case = make_case(20, 48, 40, 6, 3, seed=7, device=triton_path)
    first, first_grads = check_against_reference(case, 1e-5)
    second, second_grads = check_against_reference(case, 1e-5)
    assert torch.equal(first, second)
    for a, b in zip(first_grads, second_grads):
        assert torch.equal(a, b)
    with torch.no_grad():  # no activations saved for a backward: same output
        assert torch.equal(fused_moe(*case), first.detach())


@needs_triton
@pytest.mark.parametrize("tokens, top_k, experts, routing", [
    (300, 6, 64, "uniform"), (700, 2, 5, "uniform"), (40, 3, 7, "one_expert"), (9, 8, 8, "uniform"),
    (1, 1, 1, "uniform"), (0, 2, 4, "uniform"), (130, 4, 256, "some_empty")])
def test_routing_is_a_stable_sort_by_expert(triton_path, tokens, top_k, experts, routing):
    """build_routing (a counting sort over blocks of slots, several blocks and scan chunks at these sizes) against
    torch.sort(stable=True): perm, its inverse and the experts' offsets exactly."""
    from modeling_moe.kernels.fused_moe_ops import build_routing

    generator = torch.Generator().manual_seed(tokens * 7 + experts)
    index = torch.randint(0, experts, (tokens, top_k), generator=generator)
    if routing == "one_expert":
        index[:] = experts - 2
    elif routing == "some_empty":
        index = index % (experts // 3)
    perm, inv, offsets = build_routing(index.to(triton_path), experts)
    sorted_experts, expected = torch.sort(index.flatten(), stable=True)
    assert perm.dtype == inv.dtype == offsets.dtype == torch.int32
    assert torch.equal(perm.cpu().long(), expected)
    assert torch.equal(inv.cpu().long()[expected], torch.arange(tokens * top_k))
    assert torch.equal(offsets.cpu().long(), torch.searchsorted(sorted_experts, torch.arange(experts + 1)))


@needs_triton
def test_routing_sorts_expert_ids_out_of_range_last(triton_path):
    """Ids outside [0, E) (a caller's bug: not checked, which would cost a host sync) sort after every expert's rows,
    past offsets[E] where no GEMM reads, in slot order: perm and inv stay a permutation, so no kernel indexes out of
    bounds."""
    from modeling_moe.kernels.fused_moe_ops import build_routing

    index = torch.tensor([[2, 5], [-1, 0], [2, 1], [4, 2]])
    perm, inv, offsets = build_routing(index.to(triton_path), 4)
    assert offsets.tolist() == [0, 1, 2, 5, 5]
    assert perm.tolist() == [3, 5, 0, 4, 7, 1, 2, 6]
    assert torch.equal(inv.cpu()[perm.cpu().long()], torch.arange(8, dtype=torch.int32))


@needs_triton
def test_tile_schedule(triton_path):
    from modeling_moe.kernels.fused_moe_ops import build_routing, tile_schedule

    index = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 2], [1, 3], [3, 0]], device=triton_path)
    perm, inv, offsets = build_routing(index, num_experts=5)
    assert offsets.tolist() == [0, 3, 5, 6, 12, 12]
    assert torch.equal(perm.long()[inv.long()], torch.arange(12, device=triton_path))
    assert torch.equal(index.flatten()[perm.long()], index.flatten().sort(stable=True).values)
    tile_expert, tile_row, max_tiles = tile_schedule(offsets, 4, 12, 5)
    assert max_tiles == 3 + 5
    assert tile_expert.tolist() == [0, 1, 2, 3, 3, 5, 5, 5]
    assert tile_row.tolist()[:5] == [0, 3, 5, 6, 10]


@needs_triton
def test_tile_schedule_over_many_programs(triton_path):
    """A tile list longer than one program's block (several programs, each recomputing the prefix sum), against the
    list written out in Python: every expert's row tiles in order, then ids past the real count on expert E."""
    from modeling_moe.kernels.fused_moe_ops import tile_schedule

    experts, block_m = 40, 16
    counts = torch.randint(0, 70, (experts,), generator=torch.Generator().manual_seed(11))
    counts[[3, 17]] = 0
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)
    rows = int(offsets[-1])
    tile_expert, tile_row, max_tiles = tile_schedule(offsets.to(triton_path), block_m, rows, experts)
    expected = [(e, int(offsets[e]) + i * block_m) for e in range(experts) for i in range(-(-int(counts[e]) // block_m))]
    assert max_tiles == -(-rows // block_m) + experts and max_tiles > 64
    assert tile_expert.tolist() == [e for e, _ in expected] + [experts] * (max_tiles - len(expected))
    assert tile_row.tolist()[:len(expected)] == [r for _, r in expected]


@needs_triton
@pytest.mark.parametrize("tokens, top_k, experts, block_m", [(300, 6, 64, 16), (700, 2, 5, 16), (5, 2, 100, 4),
                                                             (130, 4, 256, 128), (9, 8, 8, 1)])
def test_routing_builds_the_tile_list_it_is_asked_for(triton_path, tokens, top_k, experts, block_m):
    """build_routing's tile list (written by the place kernel's programs, in steps of the grid where the list is
    longer than the programs' first chunks: 5 x 2 slots over 100 experts) is the one tile_schedule builds from the
    same offsets."""
    from modeling_moe.kernels.fused_moe_ops import build_routing, tile_schedule

    index = torch.randint(0, experts, (tokens, top_k), generator=torch.Generator().manual_seed(tokens + experts))
    tiles = {}
    perm, inv, offsets = build_routing(index.to(triton_path), experts, tiles, block_m)
    assert list(tiles) == [block_m]
    tile_expert, tile_row, max_tiles = tiles[block_m]
    expected_expert, expected_row, expected_max = tile_schedule(offsets, block_m, tokens * top_k, experts)
    assert max_tiles == expected_max
    assert torch.equal(tile_expert, expected_expert)
    real = expected_expert < experts  # tile_row past the real tiles is never read
    assert torch.equal(tile_row[real], expected_row[real])


@needs_triton
def test_the_forward_runs_on_the_routings_tile_list(triton_path, monkeypatch):
    """GEMM1 runs on the tile list the routing built, and in eager mode GEMM2 on the same one (one BLOCK_M here): no
    tile_schedule launch. The custom ops (what torch.compile traces; each call may be a CUDA graph of its own) keep
    their lists to themselves: GEMM2 builds its own."""
    from modeling_moe.kernels import fused_moe_ops as fm

    built, tile_schedule = [], fm.tile_schedule
    monkeypatch.setattr(fm, "tile_schedule", lambda *args: built.append(args[1]) or tile_schedule(*args))
    x, gate_up, down, index, weights = make_case(37, 40, 24, 5, 2, device=triton_path)
    expected = moe_experts_reference(x.double().cpu(), gate_up.double().cpu(), down.double().cpu(), index.cpu(),
                                     weights.double().cpu())
    for recorder, schedules in ((contextlib.nullcontext(), 0), (OpRecorder(), 1)):
        built.clear()
        with torch.no_grad(), recorder:
            out = fm.fused_moe(x, gate_up, down, index, weights)
        assert len(built) == schedules
        assert relative_error(out.cpu(), expected) < 1e-5


@needs_triton
def test_custom_op_fake_and_opcheck(triton_path):
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = torch.ops.modeling_moe
    x, gate_up, down, index, weights = make_case(5, 16, 16, 4, 2, device=triton_path)
    with FakeTensorMode() as mode:
        x_, gate_up_, down_, index_, weights_ = [mode.from_tensor(t) for t in (x, gate_up, down, index, weights)]
        gu, h, perm, inv, offsets, xs = ops.fused_moe_gate_up(x_, gate_up_, index_, True)
        assert gu.shape == (10, 32) and h.shape == (10, 16) and perm.shape == (10,) and offsets.shape == (5,)
        out = ops.fused_moe_down(gu, h, down_, weights_, perm, inv, offsets)
        assert out.shape == (5, 16)
    gu, h, perm, inv, offsets, xs = ops.fused_moe_gate_up(x, gate_up, index, True)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.fused_moe_gate_up.default, (x, gate_up, index, False), test_utils=checks)
    torch.library.opcheck(ops.fused_moe_down.default, (gu, h, down, weights, perm, inv, offsets), test_utils=checks)
    grad = torch.randn_like(x)
    torch.library.opcheck(ops.fused_moe_down_backward.default, (grad, gu, down, weights, perm, inv, offsets, True,
                                                                True, False), test_utils=checks)
    torch.library.opcheck(ops.fused_moe_gate_up_backward.default, (
        gu, x, xs, gate_up, perm, inv, offsets, 2, True, True), test_utils=checks)


@needs_triton
def test_weight_gradients_of_strided_weights_match_the_fake(triton_path):
    """Expert weights stored transposed (a view): the backward ops return their gradients with the fake's contiguous
    strides, which torch.compile's graph assumes."""
    ops = torch.ops.modeling_moe
    x, gate_up, down, index, weights = make_case(5, 16, 16, 4, 2, device=triton_path)
    gate_up, down = (w.transpose(1, 2).contiguous().transpose(1, 2) for w in (gate_up, down))
    gu, h, perm, inv, offsets, xs = ops.fused_moe_gate_up(x, gate_up, index, True)
    checks = ("test_schema", "test_faketensor")
    grad = torch.randn_like(x)
    torch.library.opcheck(ops.fused_moe_down_backward.default, (grad, gu, down, weights, perm, inv, offsets, True,
                                                                True, True), test_utils=checks)
    torch.library.opcheck(ops.fused_moe_gate_up_backward.default, (
        gu, x, xs, gate_up, perm, inv, offsets, 2, True, True), test_utils=checks)


def test_reference_path_without_triton_matches_eager(monkeypatch):
    """CPU without the interpreter: "fused" runs the PyTorch reference, same function as the eager loop."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from modeling_moe.modeling_moe import MoEExperts

    x, gate_up, down, index, weights = make_case(13, 24, 16, 5, 2)
    experts = MoEExperts(small_config(hidden_size=24, moe_intermediate_size=16, n_routed_experts=5, n_group=1,
                                     topk_group=1))
    with torch.no_grad():
        experts.gate_up_proj.copy_(gate_up)
        experts.down_proj.copy_(down)
    eager = type(experts).forward.__wrapped__(experts, x, index, weights)
    torch.testing.assert_close(fused_moe(x, gate_up, down, index, weights), eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hidden_act", ["gelu", "relu"])
def test_fused_refuses_experts_it_does_not_compute(monkeypatch, hidden_act):
    """The kernels and their reference compute silu(gate) * up: a model with another activation is not given "fused"
    by default where the kernels run, and asking for it is a clear error, never silu's output."""
    monkeypatch.setattr(modeling_moe.kernels, "preferred_by_default", lambda: True)
    assert MoEForCausalLM(small_config(num_hidden_layers=2)).config._experts_implementation == "fused"
    model = MoEForCausalLM(small_config(num_hidden_layers=2, hidden_act=hidden_act))
    assert model.config._experts_implementation != "fused"
    model.set_experts_implementation("fused")
    with pytest.raises(NotImplementedError, match="act_fn"):
        model(input_ids=torch.tensor([[3, 4, 5]]))


def test_fused_without_a_triton_device_runs_grouped_mm_and_compiles_whole(monkeypatch):
    """A model kept on the CPU of a machine with a GPU defaults to "fused": there it runs transformers' grouped_mm
    (what a machine without a GPU defaults to), which torch.compile traces whole, unlike the host-synced reference."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    eager, fused = model_pair(small_config(num_hidden_layers=2))
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = eager(input_ids=ids).logits
        compiled = torch.compile(fused, backend="eager", fullgraph=True)(input_ids=ids).logits
    torch.testing.assert_close(compiled, expected, rtol=1e-5, atol=1e-5)


def model_pair(config):
    torch.manual_seed(0)
    eager = MoEForCausalLM(config)
    fused = copy.deepcopy(eager)
    eager.set_experts_implementation("eager")
    fused.set_experts_implementation("fused")
    return eager, fused


@needs_triton
def test_model_loss_and_gradients_fused_equal_eager(triton_path):
    eager, fused = model_pair(small_config(num_hidden_layers=2))
    eager.to(triton_path).train()
    fused.to(triton_path).train()
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0)).to(triton_path)
    losses = []
    for model in (eager, fused):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    grads = dict(eager.named_parameters())
    for name, param in fused.named_parameters():
        if grads[name].grad is None:
            assert param.grad is None, name
            continue
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backward_gemm", ["auto", "grouped_mm"])
def test_fused_training_step_compiles_as_one_graph(triton_path, monkeypatch, request, backward_gemm):
    """torch.compile(fullgraph=True) of a training step on the fused path (custom ops with fake implementations),
    the backward's GEMMs through our kernels where "auto" keeps them, and through torch._grouped_mm."""
    if backward_gemm == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    monkeypatch.setenv("MOE_BACKWARD_GEMM", backward_gemm)
    calls = request.getfixturevalue("grouped_mm_calls") if backward_gemm == "grouped_mm" else []
    eager, fused = model_pair(small_config(num_hidden_layers=2, num_nextn_predict_layers=1))
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0)).to(triton_path)
    assert_compiled_training_step_matches(eager.to(triton_path).train(), fused.to(triton_path).train(), ids)
    assert bool(calls) == (backward_gemm == "grouped_mm")


@needs_triton
def test_peft_lora_on_experts_fused_equals_eager(triton_path):
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1)).to(triton_path)
    eager, fused = model_pair(small_config(num_hidden_layers=2))
    logits = []
    for model in (eager, fused):
        torch.manual_seed(1)  # same random (init_lora_weights=False) adapters on both
        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules=[],
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        peft_model = get_peft_model(model, lora).to(triton_path).eval()
        with torch.no_grad():
            logits.append(peft_model(input_ids=ids).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------ GPU


GPU_CASES = {
    "moderate": (1000, 512, 384, 16, 4, "random"),
    "uneven": (777, 320, 200, 12, 3, "random"),
    "experts_without_tokens": (300, 256, 192, 16, 2, "some_empty"),
    "all_on_one_expert": (513, 256, 128, 8, 1, "one_expert"),
    "one_token": (1, 256, 128, 8, 8, "random"),
    "big_expert_rows": (8192, 256, 256, 8, 2, "random"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("backward_gemm", ["auto", "triton"])
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_bf16_matches_float64_reference(triton_path, monkeypatch, name, backward_gemm):
    """bf16 on the GPU, the backward's plain GEMMs through torch._grouped_mm on an H100/H200 ("auto") and through our
    kernels; the library must give experts without rows zero gradients."""
    monkeypatch.setenv("MOE_BACKWARD_GEMM", backward_gemm)
    tokens, hidden, inter, experts, top_k, routing = GPU_CASES[name]
    case = make_case(tokens, hidden, inter, experts, top_k, routing, seed=len(name), device="cuda",
                     dtype=torch.bfloat16)
    # the reference runs on the same bf16-rounded values, in float64
    check_against_reference(case, tolerance=1e-2)


@pytest.mark.gpu
def test_gpu_fp32_and_determinism(triton_path):
    case = make_case(600, 256, 192, 8, 3, device="cuda")
    first, grads = check_against_reference(case, 1e-5)
    second, grads2 = check_against_reference(case, 1e-5)
    assert torch.equal(first, second) and all(torch.equal(a, b) for a, b in zip(grads, grads2))


@pytest.mark.gpu
def test_gpu_cuda_graph_capture(triton_path):
    x, gate_up, down, index, weights = make_case(256, 256, 128, 8, 2, device="cuda", dtype=torch.bfloat16)
    expected = fused_moe(x, gate_up, down, index, weights)  # compiles the kernels
    static_index = index.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, gate_up, down, static_index, weights)
    new_index = torch.stack([torch.randperm(8)[:2] for _ in range(256)]).cuda()
    static_index.copy_(new_index)
    graph.replay()
    torch.testing.assert_close(out, fused_moe(x, gate_up, down, new_index, weights), rtol=0, atol=0)
    assert not torch.equal(out, expected)


@pytest.mark.gpu
def test_gpu_model_bf16_fused_close_to_eager(triton_path):
    eager, fused = model_pair(small_config(num_hidden_layers=2, hidden_size=128, moe_intermediate_size=64))
    ids = torch.randint(3, 97, (4, 64), generator=torch.Generator().manual_seed(0)).cuda()
    losses = []
    for model in (eager, fused):
        model.to("cuda", torch.bfloat16).train()
        losses.append(model(input_ids=ids, labels=ids).loss.float())
        losses[-1].backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------ weight gradients on Hopper (Gluon)


def test_hopper_wgrad_compiles_for_sm90_without_a_gpu(monkeypatch):
    """The Gluon weight-gradient kernel (kernels/wgrad_hopper.py) has no interpreter: on the CPU it is compiled for
    sm_90 (Triton's bundled ptxas; benchmarks/kernel_resources.py), fresh and adding into .grad, and must hold one
    program an SM without spills: four stages of A and B tiles and two gradient tiles in the 227 KiB an sm_90 block
    may use."""
    from modeling_moe.kernels import wgrad_hopper

    if not wgrad_hopper.HAS_GLUON:
        pytest.skip("this triton has no Gluon")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    resources = load_benchmark_script("kernel_resources")
    for accumulate in (False, True):
        usage = resources.resource_usage(resources.compile_wgrad_hopper_kernel(256, 512, accumulate))
        assert 192 * 1024 <= usage.shared_bytes <= 227 * 1024
        assert usage.spill_bytes == 0 and usage.registers == wgrad_hopper.MAX_REGISTERS
        assert usage.programs_per_sm(resources.HOPPER_WARPS) == 1


def test_hopper_wgrad_without_rows():
    """No rows at all: a fresh gradient of zeros, an existing one untouched, and no launch (TMA takes no empty
    tensor), so this holds on any device."""
    from modeling_moe.kernels import wgrad_hopper

    if not wgrad_hopper.HAS_GLUON:
        pytest.skip("this triton has no Gluon")
    a, b = torch.empty(0, 256, dtype=torch.bfloat16), torch.empty(0, 8, dtype=torch.bfloat16)
    offsets = torch.zeros(3, dtype=torch.int32)
    assert torch.equal(wgrad_hopper.wgrad_hopper(a, b, offsets), torch.zeros(2, 256, 8, dtype=torch.bfloat16))
    grad = torch.randn(2, 256, 8).to(torch.bfloat16)
    before = grad.clone()
    assert wgrad_hopper.wgrad_hopper(a, b, offsets, grad) is grad and torch.equal(grad, before)


@pytest.mark.gpu
@pytest.mark.parametrize("programs", [None, 3])
@pytest.mark.parametrize("accumulate", [True, False])
def test_gpu_hopper_wgrad(accumulate, programs):
    """dW[e] = A_e^T B_e, fresh or added into grad, against float64: an expert without rows (zeros; untouched when
    adding), one row, a partial 64-row step, a whole one, several, N not a multiple of the 128-wide tile; one program
    an SM, and 3 programs (each consumer warpgroup takes many tiles)."""
    from modeling_moe.kernels.wgrad_hopper import hopper_wgrad_applies, wgrad_hopper

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernel is for sm_90")
    counts = [0, 1, 63, 64, 200, 129]
    offsets = torch.tensor([0] + list(itertools.accumulate(counts)), dtype=torch.int32, device="cuda")
    g = torch.Generator().manual_seed(1)
    m, n, rows = 256, 200, sum(counts)
    a, b = (torch.randn(rows, k, generator=g).to("cuda", torch.bfloat16) for k in (m, n))
    grad = torch.randn(len(counts), m, n, generator=g).to("cuda", torch.bfloat16) if accumulate else None
    expected = grad.double() if accumulate else torch.zeros(len(counts), m, n, dtype=torch.float64, device="cuda")
    for e, (start, end) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        expected[e] += a[start:end].double().T @ b[start:end].double()
    assert hopper_wgrad_applies(a, b, grad)
    written = wgrad_hopper(a, b, offsets, grad, programs)
    assert written is grad if accumulate else written.shape == expected.shape
    assert torch.equal(written[0].double(), expected[0])  # no rows: untouched, or zeros
    assert relative_error(written, expected) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_bf16_second_backward_adds_into_grad(triton_path, monkeypatch, name):
    """A second backward adds its expert weight gradients into .grad: twice the first's; on an H100/H200 both
    through the Gluon kernel (fresh, then in place) for each weight whose shapes it takes (for neither in "uneven")."""
    from modeling_moe.kernels import fused_moe_ops as fm
    from modeling_moe.kernels.wgrad_hopper import BLOCK_M

    calls = []
    wgrad = fm.wgrad_hopper
    monkeypatch.setattr(fm, "wgrad_hopper", lambda *args: calls.append(args[3] is not None) or wgrad(*args))
    tokens, hidden, inter, experts, top_k, routing = GPU_CASES[name]
    x, gate_up, down, index, weights = make_case(tokens, hidden, inter, experts, top_k, routing, seed=len(name),
                                                 device="cuda", dtype=torch.bfloat16)
    for tensor in (gate_up, down):
        tensor.requires_grad_(True)
    grads = []
    for _ in range(2):
        fused_moe(x, gate_up, down, index, weights).float().square().sum().backward()
        grads.append((gate_up.grad.clone(), down.grad.clone()))
    for first, second in zip(*grads):
        assert relative_error(second, 2 * first.double()) < 1e-2
    if torch.cuda.get_device_capability() == (9, 0):  # where the gradient's rows tile by BLOCK_M, TMA's strides fit
        applies = (2 * inter % BLOCK_M == 0 and hidden % 8 == 0) + (hidden % BLOCK_M == 0 and inter % 8 == 0)
        assert calls == [False] * applies + [True] * applies


@needs_triton
def test_eager_nodes_spare_the_host_what_they_can(triton_path, monkeypatch):
    """Plain eager forward+backward, into fresh gradients and adding into existing ones: no custom op runs (each costs
    ~90 us of host time through the dispatcher and torch.library's wrappers), and no argument binding through
    inspect.signature (~40 us an autograd.Function with a `setup_context`)."""
    import inspect

    case = make_case(20, 48, 40, 6, 2, seed=11, device=triton_path)
    leaves = [t.clone().requires_grad_(True) for t in (case[0], case[1], case[2], case[4])]
    for _ in range(2):  # every kernel of both passes compiled (a first compile may inspect signatures)
        fused_moe(leaves[0], leaves[1], leaves[2], case[3], leaves[3]).sum().backward()
    for leaf in leaves:
        leaf.grad = None
    calls = []
    signature = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda *a, **k: calls.append(a[0]) or signature(*a, **k))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(2):  # fresh gradients, then added into them
            fused_moe(leaves[0], leaves[1], leaves[2], case[3], leaves[3]).sum().backward()
    assert calls == []
    assert not [event.name for event in profile.events() if event.name.startswith("modeling_moe::")]


@needs_triton
def test_eager_nodes_skip_the_dispatcher_with_the_ops_results(triton_path):
    """Plain eager calls run the two nodes as autograd.Functions (no dispatcher round trip); under a dispatch mode
    (as when traced) the custom ops run: the same outputs and gradients, bit for bit, and the same two-node graph."""
    case = make_case(20, 48, 40, 6, 2, seed=11, device=triton_path)
    grad = torch.randn(20, 48, generator=torch.Generator().manual_seed(12)).to(triton_path)
    results = []
    for recorder in (contextlib.nullcontext(), OpRecorder()):
        x, gate_up, down, index, weights = case
        leaves = [t.clone().requires_grad_(True) for t in (x, gate_up, down, weights)]
        with recorder:
            out = fused_moe(leaves[0], leaves[1], leaves[2], index, leaves[3])
        results.append((out.grad_fn, [out.detach()] + [None] * 4))
        out.backward(grad)
        results[-1][1][1:] = [leaf.grad for leaf in leaves]
        if isinstance(recorder, OpRecorder):
            assert recorder.custom_ops() == ["fused_moe_gate_up", "fused_moe_down"]
    (eager_node, eager), (op_node, ops) = results
    assert type(eager_node).__name__ == "_FusedMoEDownNodeBackward"  # (torch 2.11 refuses its next_functions)
    assert "FusedMoE" not in type(op_node).__name__
    for a, b in zip(eager, ops):
        assert torch.equal(a, b)

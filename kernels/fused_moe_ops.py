"""Fused MoE experts: launchers, bounded autotuning, torch custom ops with autograd, and the transformers experts
function registered as `experts_implementation="fused"`.

Forward:
    routing      sort the T*k slots by expert (torch.sort, stable), per-expert offsets (searchsorted), inverse
                 permutation and a tile list (Triton), all on the GPU without a host sync
    GEMM1        h = silu(x[tok] @ Wg[e].T) * (x[tok] @ Wu[e].T)  gather fused into the loads, SwiGLU in the epilogue,
                 the pre-activations kept for the backward only when a gradient is needed        [N, I] (+ [N, 2I])
    GEMM2        y = h @ Wd[e].T                                                                    [N, H]
    combine      out[t] = sum_j w[t, j] y[slot(t, j)] in fp32, in j order (no atomics), cast to x's dtype
Backward:
    dgrad_h      dA = dY[tok] @ Wd[e]; epilogue: h recomputed from the saved (gate | up), dw = <dA, h> per column
                 tile, dh = w dA, dSwiGLU -> dgu [N, 2I], and w * h [N, I] for the next GEMM
    wgrad_down   dWd[e] = sum_rows dY[tok]^T (w h)          (reduction over the expert's rows; gather fused)
    wgrad_gu     dWgu[e] = sum_rows dgu^T x[tok]
    dgrad_x      dXs = dgu @ Wgu[e], then dx[t] = sum_j dXs[slot(t, j)] (the combine kernel, fp32, no atomics)
The forward keeps only the gate/up pre-activations [N, 2I] (not h, not the [N, H] expert outputs): the
routing-weight gradient <dY_t, y_s> equals <dY_t @ Wd[e], h_s>, which the dgrad_h epilogue has at hand.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from dataclasses import dataclass

import torch

from . import dispatch
from .dispatch import interpreting
from .reference import moe_experts_reference

# Triton is optional (without it "fused" runs the PyTorch reference) and imported only when a kernel first runs.
HAS_TRITON = importlib.util.find_spec("triton") is not None

_kernels = None


def _k():
    """The Triton kernels module, imported on first use (so TRITON_INTERPRET set after import still applies)."""
    global _kernels
    if _kernels is None:
        from . import fused_moe_kernels

        _kernels = fused_moe_kernels
    return _kernels


def use_triton(tensor: torch.Tensor) -> bool:
    """Triton path on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1; else the PyTorch reference."""
    return dispatch.use_triton(tensor, HAS_TRITON, "MOE_FUSED_REFERENCE")


# ----------------------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8

    def launch_kwargs(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=self.group_m,
                    num_warps=self.num_warps, num_stages=self.num_stages)


C = KernelConfig
# A handful of candidates per kernel, the first of each list being the default (no tuning). "big" when an expert
# holds >= 512 rows on average, "small" otherwise (row tiles of 64 waste less on the last, partial tile).
CANDIDATES = {  # first entry = default (autotune off): the H200 winners of v1/v2 (benchmarks/KERNEL_NOTES.md)
    ("gemm1", "big"): [C(128, 128, 64, 8, 3), C(128, 128, 64, 8, 4), C(128, 64, 64, 4, 4)],
    ("gemm1", "small"): [C(128, 128, 64, 8, 4), C(128, 128, 64, 8, 3), C(64, 128, 64, 4, 4)],
    ("gemm2", "big"): [C(128, 256, 64, 8, 4), C(128, 256, 64, 8, 3), C(128, 128, 64, 8, 4)],
    ("gemm2", "small"): [C(128, 256, 64, 8, 3), C(64, 256, 64, 4, 3), C(128, 128, 64, 8, 4)],
    ("dgrad_h", "big"): [C(128, 64, 64, 4, 4), C(128, 128, 64, 8, 4), C(128, 128, 64, 8, 3)],
    ("dgrad_h", "small"): [C(64, 128, 64, 4, 4), C(128, 128, 64, 8, 4), C(64, 64, 64, 4, 4)],
    ("dgrad_x", "big"): [C(128, 256, 64, 8, 4), C(128, 256, 64, 8, 3), C(128, 128, 64, 8, 4)],
    ("dgrad_x", "small"): [C(128, 256, 64, 8, 3), C(64, 256, 64, 4, 3), C(128, 128, 64, 8, 4)],
    ("wgrad", "big"): [C(128, 128, 64, 4, 4), C(128, 128, 64, 8, 3), C(128, 128, 64, 8, 4), C(128, 256, 64, 8, 3)],
    ("wgrad", "small"): [C(128, 128, 32, 4, 4), C(128, 128, 64, 4, 4), C(128, 128, 64, 8, 3), C(128, 256, 64, 8, 3)],
}
# fp32 operands take 2x the shared memory per tile (the bf16 tiles above do not fit with fp32)
FP32_CONFIG = C(64, 64, 32, 4, 3)
INTERPRETER_CONFIG = C(16, 16, 16, 1, 1, 4)
COMBINE_GPU = dict(BLOCK_T=32, BLOCK_H=128, num_warps=4)
COMBINE_CPU = dict(BLOCK_T=16, BLOCK_H=32, num_warps=1)

_override: KernelConfig | None = None
_autotune: bool | None = None
_chosen: dict = {}
TUNING_BUDGET_S = 30.0
TUNING_LOG: list[dict] = []


@contextlib.contextmanager
def config_override(config: KernelConfig | None):
    """Force one config for every grouped GEMM (tests, experiments)."""
    global _override
    previous, _override = _override, config
    try:
        yield
    finally:
        _override = previous


def set_autotune(enabled: bool | None):
    """Enable (True) / disable (False) the bounded autotune, or follow MOE_FUSED_AUTOTUNE (None, the default)."""
    global _autotune
    _autotune = enabled


def autotune_enabled() -> bool:
    if _autotune is not None:
        return _autotune
    return os.environ.get("MOE_FUSED_AUTOTUNE", "0") == "1"


def clear_config_cache():
    _chosen.clear()


def _bucket(num_rows: int, num_experts: int) -> str:
    return "big" if num_rows >= 512 * num_experts else "small"


def _rows_bucket(num_rows: int) -> int:
    """Token-count bucket of the tuning cache: the next power of two of the number of slots."""
    return 1 << max(0, (max(num_rows, 1) - 1).bit_length())


def _candidates(kind: str, num_rows: int, num_experts: int, dtype: torch.dtype = torch.bfloat16
                ) -> list[KernelConfig]:
    if _override is not None:
        return [_override]
    if interpreting() and not torch.cuda.is_available():
        return [INTERPRETER_CONFIG]
    if dtype == torch.float32:
        return [FP32_CONFIG]
    return CANDIDATES[(kind, _bucket(num_rows, num_experts))]


def chosen_config(kind: str, key: tuple, candidates: list[KernelConfig]) -> KernelConfig:
    """The config `_choose` settled on for this kernel and key (the default when it has not run yet)."""
    return _chosen.get((kind, key, candidates[0]), candidates[0])


def _choose(kind: str, key: tuple, candidates: list[KernelConfig], launch) -> KernelConfig:
    """Cached config of `kind` for `key`; with autotune on, the fastest candidate, timed once (bounded budget)."""
    full_key = (kind, key, candidates[0])
    config = _chosen.get(full_key)
    if config is not None:
        return config
    config = candidates[0]
    can_time = (autotune_enabled() and len(candidates) > 1 and torch.cuda.is_available()
                and not torch.cuda.is_current_stream_capturing() and not torch.compiler.is_compiling())
    if can_time:
        from triton.testing import do_bench

        start, timings = time.perf_counter(), {}
        for candidate in candidates:
            if time.perf_counter() - start > TUNING_BUDGET_S:
                break
            try:
                timings[candidate] = do_bench(lambda: launch(candidate), warmup=5, rep=25, return_mode="median")
            except Exception as error:  # e.g. out of shared memory: skip that candidate
                timings[candidate] = float("inf")
                TUNING_LOG.append(dict(kind=kind, key=key, config=str(candidate), error=str(error)[:200]))
        config = min(timings, key=timings.get)
        TUNING_LOG.append(dict(kind=kind, key=key, chosen=str(config),
                               timings_ms={str(c): round(t, 4) for c, t in timings.items()},
                               seconds=round(time.perf_counter() - start, 1)))
    _chosen[full_key] = config
    return config


# ----------------------------------------------------------------------------------------------------------- routing

_aranges: dict = {}


def _arange(n: int, device) -> torch.Tensor:
    key = (n, str(device))
    if key not in _aranges:
        _aranges[key] = torch.arange(n, device=device, dtype=torch.int32)
    return _aranges[key]


def build_routing(top_k_index: torch.Tensor, num_experts: int):
    """perm [N] (sorted position -> slot), inv [N] (slot -> sorted position), offsets [E + 1]; all int32, no sync."""
    flat = top_k_index.reshape(-1).to(torch.int32)
    sorted_experts, perm = torch.sort(flat, stable=True)
    perm = perm.to(torch.int32)
    offsets = torch.searchsorted(sorted_experts, _arange(num_experts + 1, flat.device), out_int32=True)
    inv = torch.empty_like(perm)
    n = perm.numel()
    if n:
        block = 1024
        _k()._inverse_kernel[(triton_cdiv(n, block),)](perm, inv, n, BLOCK=block)
    return perm, inv, offsets


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def tile_schedule(offsets: torch.Tensor, block_m: int, num_rows: int, num_experts: int):
    """Tile list of the row-tiled GEMMs: a fixed upper bound cdiv(N, BLOCK_M) + E of tiles, built on the GPU."""
    max_tiles = triton_cdiv(num_rows, block_m) + num_experts
    tile_expert = torch.empty(max_tiles, dtype=torch.int32, device=offsets.device)
    tile_row = torch.empty(max_tiles, dtype=torch.int32, device=offsets.device)
    block_e = max(16, 1 << (num_experts - 1).bit_length())
    block_t = max(16, min(256, 32768 // block_e))
    _k()._schedule_kernel[(1,)](offsets, tile_expert, tile_row, num_experts, max_tiles,
                                BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_T=block_t)
    return tile_expert, tile_row, max_tiles


class _Schedules:
    """Tile lists per BLOCK_M, built once per forward / backward call."""

    def __init__(self, offsets, num_rows, num_experts):
        self.offsets, self.num_rows, self.num_experts = offsets, num_rows, num_experts
        self.cache = {}

    def get(self, block_m):
        if block_m not in self.cache:
            self.cache[block_m] = tile_schedule(self.offsets, block_m, self.num_rows, self.num_experts)
        return self.cache[block_m]


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# ------------------------------------------------------------------------------------------------------- launchers


def _launch_gemm1(config, x, gate_up, h, gu, perm, schedules, top_k, store_gu):
    tile_expert, tile_row, max_tiles = schedules.get(config.block_m)
    num_experts, two_i, hidden = gate_up.shape
    inter = two_i // 2
    grid = (max_tiles * triton_cdiv(inter, config.block_n),)
    gu_arg = gu if store_gu else h
    _k()._gemm1_swiglu_kernel[grid](
        x, gate_up, h, gu_arg, perm, tile_expert, tile_row, schedules.offsets,
        hidden, inter, max_tiles, top_k, num_experts,
        x.stride(0), x.stride(1), gate_up.stride(0), gate_up.stride(1), gate_up.stride(2),
        h.stride(0), h.stride(1), gu_arg.stride(0), gu_arg.stride(1),
        EVEN_K=hidden % config.block_k == 0, STORE_GU=store_gu, DOT_PREC=_dot_precision(x.dtype),
        **config.launch_kwargs(),
    )


def _launch_grouped(config, a, b, c, perm, schedules, top_k, n, k, b_strides, gather_a, epilogue=0,
                    gu=None, h=None, topk_w=None, dw=None):
    """C[rows] = A[rows] @ B[e], B[e][k, n] read through b_strides = (stride_e, stride_k, stride_n)."""
    tile_expert, tile_row, max_tiles = schedules.get(config.block_m)
    grid = (max_tiles * triton_cdiv(n, config.block_n),)
    if epilogue == 0:
        gu = h = c
        topk_w = dw = perm
        gu_strides, h_strides, dw_stride = (0, 0), (0, 0), 0
    else:
        gu_strides, h_strides, dw_stride = (gu.stride(0), gu.stride(1)), (h.stride(0), h.stride(1)), dw.stride(0)
    _k()._grouped_gemm_kernel[grid](
        a, b, c, perm, tile_expert, tile_row, schedules.offsets,
        gu, h, topk_w, dw,
        n, k, max_tiles, top_k, schedules.num_experts,
        a.stride(0), a.stride(1), *b_strides, c.stride(0), c.stride(1),
        *gu_strides, *h_strides, dw_stride,
        GATHER_A=gather_a, EVEN_K=k % config.block_k == 0, EVEN_N=n % config.block_n == 0, EPILOGUE=epilogue, DOT_PREC=_dot_precision(a.dtype),
        **config.launch_kwargs(),
    )


def _launch_wgrad(config, a, b, c, perm, offsets, top_k, gather_a, gather_b, topk_w=None):
    """C[e] = sum over expert e's rows r of A[r]^T B[r]; A [rows, M], B [rows, N], C [E, M, N]."""
    num_experts, m, n = c.shape
    grid = (triton_cdiv(m, config.block_m) * triton_cdiv(n, config.block_n), num_experts)
    _k()._grouped_wgrad_kernel[grid](
        a, b, c, perm, offsets, topk_w if topk_w is not None else perm,
        m, n, top_k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), c.stride(2),
        GATHER_A=gather_a, GATHER_B=gather_b, SCALE_A=topk_w is not None, EVEN_M=m % config.block_m == 0,
        EVEN_N=n % config.block_n == 0, DOT_PREC=_dot_precision(a.dtype),
        **config.launch_kwargs(),
    )


def _launch_combine(y, inv, w, out, top_k):
    tokens, hidden = out.shape
    cfg = COMBINE_GPU if y.is_cuda else COMBINE_CPU
    grid = (triton_cdiv(tokens, cfg["BLOCK_T"]), triton_cdiv(hidden, cfg["BLOCK_H"]))
    _k()._combine_kernel[grid](
        y, inv, w if w is not None else inv, out, tokens, hidden, top_k,
        y.stride(0), y.stride(1), out.stride(0), out.stride(1),
        BLOCK_T=cfg["BLOCK_T"], BLOCK_H=cfg["BLOCK_H"], HAS_W=w is not None, num_warps=cfg["num_warps"],
    )


def _shape_key(x, gate_up, down, num_rows):
    return (_rows_bucket(num_rows), gate_up.shape[0], x.shape[1], down.shape[2], str(x.dtype), str(x.device))


# ------------------------------------------------------------------------------------------- forward and backward


def fused_moe_forward_impl(x, gate_up, down, top_k_index, top_k_weights, save_for_backward):
    tokens, hidden = x.shape
    top_k = top_k_index.shape[1]
    num_rows = tokens * top_k
    num_experts, two_i, _ = gate_up.shape
    inter = two_i // 2
    perm, inv, offsets = build_routing(top_k_index, num_experts)
    out = torch.empty(tokens, hidden, dtype=x.dtype, device=x.device)
    h = torch.empty(num_rows, inter, dtype=x.dtype, device=x.device)
    gu = torch.empty(num_rows if save_for_backward else 0, two_i, dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out, gu, perm, inv, offsets
    x = x.contiguous()
    weights = top_k_weights.contiguous().reshape(-1)
    schedules = _Schedules(offsets, num_rows, num_experts)
    key = _shape_key(x, gate_up, down, num_rows)

    gemm1 = lambda c: _launch_gemm1(c, x, gate_up, h, gu, perm, schedules, top_k, save_for_backward)  # noqa: E731
    config = _choose("gemm1", key, _candidates("gemm1", num_rows, num_experts, x.dtype), gemm1)
    gemm1(config)

    y = torch.empty(num_rows, hidden, dtype=x.dtype, device=x.device)
    down_t = (down.stride(0), down.stride(2), down.stride(1))  # B[e][k in I, n in H] = down[e, n, k]
    gemm2 = lambda c: _launch_grouped(c, h, down, y, perm, schedules, top_k, hidden, inter, down_t, False)  # noqa
    config = _choose("gemm2", key, _candidates("gemm2", num_rows, num_experts, x.dtype), gemm2)
    gemm2(config)

    _launch_combine(y, inv, weights, out, top_k)
    return out, gu, perm, inv, offsets


def fused_moe_backward_impl(grad_out, x, gate_up, down, top_k_weights, gu, perm, inv, offsets,
                            need_x, need_gate_up, need_down, need_weights):
    tokens, hidden = x.shape
    top_k = top_k_weights.shape[1]
    num_rows = tokens * top_k
    num_experts, two_i, _ = gate_up.shape
    inter = two_i // 2
    grad_out = grad_out.to(x.dtype).contiguous()
    x = x.contiguous()
    weights = top_k_weights.contiguous().reshape(-1)
    if num_rows == 0:
        return tuple(torch.zeros_like(t) if need else None for t, need in
                     ((x, need_x), (gate_up, need_gate_up), (down, need_down), (top_k_weights, need_weights)))
    # every element of these is written by a kernel (experts without rows get zeros from the wgrad kernel)
    dx = torch.empty_like(x) if need_x else None
    dgate_up = torch.empty_like(gate_up) if need_gate_up else None
    ddown = torch.empty_like(down) if need_down else None
    dweights = None
    schedules = _Schedules(offsets, num_rows, num_experts)
    key = _shape_key(x, gate_up, down, num_rows)

    # dA = dY[tok] @ Wd[e] with the routing-weight gradient and dSwiGLU in the epilogue.
    dgu = torch.empty(num_rows, two_i, dtype=x.dtype, device=x.device)
    hw = torch.empty(num_rows, inter, dtype=x.dtype, device=x.device)  # w * h, written by the dgrad_h epilogue
    down_n = (down.stride(0), down.stride(1), down.stride(2))  # B[e][k in H, n in I] = down[e, k, n]
    partial = {}

    def dgrad_h(c):
        dw = partial.get(c.block_n)
        if dw is None:
            dw = partial[c.block_n] = torch.empty(triton_cdiv(inter, c.block_n), num_rows, dtype=torch.float32,
                                                  device=x.device)
        _launch_grouped(c, grad_out, down, dgu, perm, schedules, top_k, inter, hidden, down_n, True, epilogue=1,
                        gu=gu, h=hw, topk_w=weights, dw=dw)

    config = _choose("dgrad_h", key, _candidates("dgrad_h", num_rows, num_experts, x.dtype), dgrad_h)
    dgrad_h(config)
    if need_weights:
        dw_sorted = partial[config.block_n].sum(0)
        dweights = dw_sorted.index_select(0, inv).view_as(top_k_weights).to(top_k_weights.dtype)
    partial.clear()

    if need_down:  # dWd[e] [H, I] = sum_r dY[tok_r]^T (w_r h_r)
        wgrad_d = lambda c: _launch_wgrad(c, grad_out, hw, ddown, perm, offsets, top_k, True, False)  # noqa: E731
        wgrad_d(_choose("wgrad_down", key, _candidates("wgrad", num_rows, num_experts, x.dtype), wgrad_d))
    if need_gate_up:  # dWgu[e] [2I, H] = sum_r dgu_r^T x[tok_r]
        wgrad_gu = lambda c: _launch_wgrad(c, dgu, x, dgate_up, perm, offsets, top_k, False, True)  # noqa: E731
        wgrad_gu(_choose("wgrad_gate_up", key, _candidates("wgrad", num_rows, num_experts, x.dtype), wgrad_gu))
    if need_x:  # dXs = dgu @ Wgu[e], then summed over each token's k slots
        dxs = torch.empty(num_rows, hidden, dtype=x.dtype, device=x.device)
        gate_up_n = (gate_up.stride(0), gate_up.stride(1), gate_up.stride(2))  # B[e][k in 2I, n in H]
        dgrad_x = lambda c: _launch_grouped(c, dgu, gate_up, dxs, perm, schedules, top_k, hidden, two_i,  # noqa
                                            gate_up_n, False)
        dgrad_x(_choose("dgrad_x", key, _candidates("dgrad_x", num_rows, num_experts, x.dtype), dgrad_x))
        _launch_combine(dxs, inv, None, dx, top_k)
    return dx, dgate_up, ddown, dweights


# --------------------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("modeling_moe::fused_moe_forward", mutates_args=())
def fused_moe_forward_op(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor, save_for_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, gate|up pre-activations [N, 2I] (empty unless save_for_backward), perm, inv, offsets)."""
    return fused_moe_forward_impl(x, gate_up, down, top_k_index, top_k_weights, save_for_backward)


@fused_moe_forward_op.register_fake
def _(x, gate_up, down, top_k_index, top_k_weights, save_for_backward):
    num_rows = top_k_index.shape[0] * top_k_index.shape[1]
    two_i = gate_up.shape[1]
    saved = num_rows if save_for_backward else 0
    return (
        x.new_empty(x.shape),
        x.new_empty(saved, two_i),
        top_k_index.new_empty(num_rows, dtype=torch.int32),
        top_k_index.new_empty(num_rows, dtype=torch.int32),
        top_k_index.new_empty(gate_up.shape[0] + 1, dtype=torch.int32),
    )


@torch.library.custom_op("modeling_moe::fused_moe_backward", mutates_args=())
def fused_moe_backward_op(
    grad_out: torch.Tensor, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
    top_k_weights: torch.Tensor, gu: torch.Tensor, perm: torch.Tensor, inv: torch.Tensor,
    offsets: torch.Tensor, need_x: bool, need_gate_up: bool, need_down: bool, need_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = fused_moe_backward_impl(grad_out, x, gate_up, down, top_k_weights, gu, perm, inv, offsets,
                                    need_x, need_gate_up, need_down, need_weights)
    # custom ops return tensors: an empty one stands for "not needed"
    empties = (x, gate_up, down, top_k_weights)
    return tuple(g if g is not None else e.new_empty(0) for g, e in zip(grads, empties))


@fused_moe_backward_op.register_fake
def _(grad_out, x, gate_up, down, top_k_weights, gu, perm, inv, offsets, need_x, need_gate_up, need_down,
      need_weights):
    return tuple(t.new_empty(t.shape) if need else t.new_empty(0)
                 for t, need in ((x, need_x), (gate_up, need_gate_up), (down, need_down),
                                 (top_k_weights, need_weights)))


def _setup_context(ctx, inputs, output):
    x, gate_up, down, top_k_index, top_k_weights, _ = inputs
    _, gu, perm, inv, offsets = output
    ctx.mark_non_differentiable(gu, perm, inv, offsets)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, gate_up, down, top_k_weights, gu, perm, inv, offsets)


def _backward(ctx, grad_out, *unused):
    x, gate_up, down, top_k_weights, gu, perm, inv, offsets = ctx.saved_tensors
    need_x, need_gate_up, need_down, _, need_weights, _ = ctx.needs_input_grad
    if grad_out is None or gu.shape[0] != perm.shape[0]:
        if gu.shape[0] != perm.shape[0]:
            raise RuntimeError("fused MoE: the forward ran without saving activations (save_for_backward=False)")
        return None, None, None, None, None, None
    dx, dgate_up, ddown, dweights = torch.ops.modeling_moe.fused_moe_backward(
        grad_out, x, gate_up, down, top_k_weights, gu, perm, inv, offsets,
        need_x, need_gate_up, need_down, need_weights)
    return (dx if need_x else None, dgate_up if need_gate_up else None, ddown if need_down else None, None,
            dweights if need_weights else None, None)


torch.library.register_autograd("modeling_moe::fused_moe_forward", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ public functions


def fused_moe(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
              top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """Routed experts' output [T, H] in hidden_states' dtype (see the module docstring). Differentiable in
    hidden_states, both weights and top_k_weights. Triton on CUDA (or under TRITON_INTERPRET=1), else the reference."""
    if not use_triton(hidden_states):
        return moe_experts_reference(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights)
    dtype = hidden_states.dtype
    x = hidden_states.to(gate_up_proj.dtype)
    down = down_proj.to(gate_up_proj.dtype)
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate_up_proj, down, top_k_weights))
    out = torch.ops.modeling_moe.fused_moe_forward(x, gate_up_proj, down, top_k_index, top_k_weights, save)[0]
    return out.to(dtype)


def fused_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers experts-interface function for `experts_implementation="fused"`; reads the parameters at call
    time, so PEFT's target_parameters LoRA (a parametrization) is applied."""
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError("experts_implementation='fused' does not support expert parallelism yet")
    return fused_moe(hidden_states, self.gate_up_proj, self.down_proj, top_k_index, top_k_weights)


def preferred_by_default() -> bool:
    """Whether "fused" should be a model's default experts implementation here: Triton importable and a CUDA GPU."""
    return HAS_TRITON and torch.cuda.is_available()


def register(name: str = "fused") -> bool:
    """Register `fused_experts_forward` in transformers' experts interface (a no-op without it)."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except Exception:  # pragma: no cover
        return False
    ALL_EXPERTS_FUNCTIONS.register(name, fused_experts_forward)
    return True


__all__ = ["fused_moe", "fused_experts_forward", "register", "preferred_by_default", "KernelConfig", "config_override", "set_autotune",
           "autotune_enabled", "clear_config_cache", "use_triton", "build_routing", "tile_schedule", "TUNING_LOG"]

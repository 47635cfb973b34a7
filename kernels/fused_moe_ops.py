"""Fused MoE experts: launchers, bounded autotuning, torch custom ops with autograd, and the transformers experts
function registered as `experts_implementation="fused"`.

Forward:
    routing      a stable counting sort of the T*k slots by expert (perm, its inverse, per-expert offsets) and a
                 tile list, in Triton, all on the GPU without a host sync
    GEMM1        h = silu(x[tok] @ Wg[e].T) * (x[tok] @ Wu[e].T)  gather fused into the loads, SwiGLU in the epilogue,
                 the pre-activations gu = (gate | up) kept for the backward only when a gradient is needed
                 (on an H100/H200 in bf16 where I <= LIBRARY_ROW_GEMM_MAX_INTER and a gradient is needed: x's rows
                 gathered in expert order, torch._grouped_mm, a SwiGLU pass; the gathered rows are kept for wgrad_gu
                 instead of a regather)
    GEMM2        y = h @ Wd[e].T                                                                    [N, H]
                 (torch._grouped_mm on an H100/H200 in bf16 where I <= LIBRARY_ROW_GEMM_MAX_INTER)
    combine      out[t] = sum_j w[t, j] y[slot(t, j)] in fp32, in j order (no atomics), cast to x's dtype
Backward:
    dgrad_h      dA = dY[tok] @ Wd[e], then dw = <dA, h> per row, dh = w dA, dSwiGLU -> dgu [N, 2I]: by default
                 (`split`) a gathered GEMM into dgu and a pass of its own; or all in the GEMM's epilogue
    wgrad_down   dWd[e] = sum_rows (w dY[tok])^T h          (reduction over the expert's rows; gather fused)
    wgrad_gu     dWgu[e] = sum_rows dgu^T x[tok]
                 (both: on an H100/H200 in bf16 by our Gluon kernel (wgrad_hopper.py) over rows gathered in
                 expert order first, fresh or added into .grad in place, where its shapes fit; otherwise a fresh
                 gradient by torch._grouped_mm there, and one added into .grad by our Triton kernels in place, or
                 the library's product and an add where experts hold many rows; elsewhere our Triton kernels. See
                 BACKWARD_GEMM_BACKENDS and LIBRARY_THEN_ADD_ROWS_PER_EXPERT)
    dgrad_x      dXs = dgu @ Wgu[e], then dx[t] = sum_j dXs[slot(t, j)] (the combine kernel, fp32, no atomics)
The [N, H] expert outputs are never stored: the routing-weight gradient <dY_t, y_s> equals <dY_t @ Wd[e], h_s>,
which dgrad_h has at hand.

Two autograd nodes, as with grouped_mm, so that the backward frees memory in the same order:
    node 1  fused_moe_gate_up   routing + GEMM1 + SwiGLU -> gu, h (+ perm, inv, offsets)   saves x, Wgu, routing
                                                                    (and xs, where the library ran GEMM1)
    node 2  fused_moe_down      GEMM2 + combine          -> out                           saves gu, Wd, w, routing
Node 2's backward returns dW_down, which autograd accumulates into .grad (AccumulateGrad runs before any other
ready node) and frees before node 1's backward allocates dW_gate_up: the transient weight-gradient memory is the
larger of the two, not their sum (7 GiB less at the v3 shape, where dW_gate_up is 14 GiB and dW_down 7 GiB).
The link between the nodes is gu, not h: node 2 returns dL/dgu (dgrad_h computes dSwiGLU) and h travels as a
non-differentiable output that is freed after GEMM2. Linking by h would keep both h (node 2, for dgrad_h and
wgrad_down) and gu (node 1, for dSwiGLU): N*I more saved elements per layer, v1's footprint.
Each node is a torch custom op (what torch.compile traces); plain eager calls run the same node as an
autograd.Function (`_FusedMoEGateUpNode`, `_FusedMoEDownNode`), skipping the dispatcher's host cost.

Node 2 saves gu, not h: dgrad_h recomputes h = SwiGLU(gu) in its epilogue and writes w*h [N, I], wgrad_down's B
operand, so that GEMM needs no scaling (KERNEL_NOTES "store_wh the default dgrad_h variant": saving h instead and
scaling dY's rows inside wgrad_down trained the 1.26B model 1.1% slower with 1 GiB more peak memory; removed in
session 26).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import dispatch
from .dispatch import interpreting
from .launch import cdiv, launch, next_power_of_2
from .offline_compile import programs_per_sm
from .reference import moe_experts_reference
from .wgrad_hopper import hopper_wgrad_applies, wgrad_hopper

# Triton is optional (without it "fused" runs the PyTorch reference); the kernels module is imported when a kernel
# first runs.
try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    HAS_TRITON = False

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


# The backward's plain grouped GEMMs: dgrad_x (dXs = dgu @ Wgu[e]), dgrad_h's dA = dY[tok] @ Wd[e] (the SwiGLU
# backward then a pass of its own) and the two weight gradients (dW[e] = A_e^T B_e over the expert's sorted rows).
# On an H100/H200 in bf16 ("auto"): the weight gradients by our Gluon kernel (wgrad_hopper.py), fresh or added into
# .grad in place, where its shapes fit (session 20: V3's 12.1 + 6.2 ms of Triton wgrad, 9.3 + 5.0 of
# torch._grouped_mm -> 9.0 + 4.5 fresh); dgrad_x and dA by torch._grouped_mm's CUTLASS kernels, a few percent faster
# than ours (session 18). Our Triton kernels keep the forward's fused gather and SwiGLU, fp32 operands, other GPUs,
# and the shapes the library's 16-byte alignment rules out. The forward's row GEMMs also go to the library where the
# intermediate size is short. GEMM2 (y = h @ Wd[e].T, no gather, no epilogue of its own): at I = 512 (the 1.26B
# model) the library's kernel led ours alone (0.218 against 0.256 ms, session 28) and in the training step (2.60 ->
# 2.30 ms a step, session 29); at I = 1408 and 2048 ours leads (0.902 against 0.957, 4.02 against 4.51). GEMM1, in
# training: at I = 512 the library's GEMM took 0.40 ms against our 0.61 with the gather fused (session 30); its
# gather (0.11) and a SwiGLU pass (0.07) take most of that back, but the gathered rows are what wgrad_gu regathers in
# the backward, so they are kept for it: the 1.26B step -0.8 ms. At V2-Lite and V3 the same gained nothing
# measurable in the layer (13.67 / 13.88 -> 13.77 / 13.79 ms, 50.77 / 50.45 -> 50.57 / 50.84) for 0.4 / 0.9 GiB more
# peak memory; without a gradient the gathered rows serve nothing.
LIBRARY_ROW_GEMM_MAX_INTER = 512
BACKWARD_GEMM_BACKENDS = ("auto", "triton", "grouped_mm")  # auto: as above on sm_90 in bf16, else triton
_backward_gemm = dispatch.Choice("MOE_BACKWARD_GEMM", BACKWARD_GEMM_BACKENDS, "backward GEMM backend")


def set_backward_gemm_backend(name: str | None):
    """Run the backward's plain grouped GEMMs with `name` (see BACKWARD_GEMM_BACKENDS) from the next backward on, or
    follow MOE_BACKWARD_GEMM (None; default "auto"). "grouped_mm" forces torch._grouped_mm wherever torch has it,
    the weight gradients included (the CPU tests use it)."""
    _backward_gemm.set(name)


def backward_gemm_backend() -> str:
    return _backward_gemm.get()


def _library_gemm(*operands: torch.Tensor) -> bool:
    """Whether a plain grouped GEMM over these operands (activation rows and the expert weight, last) goes through
    torch._grouped_mm."""
    backend, weight = backward_gemm_backend(), operands[-1]
    if backend == "triton" or not hasattr(torch, "_grouped_mm") or any(t.dtype != weight.dtype for t in operands):
        return False  # the library writes the operands' dtype; an fp32 weight's bf16 operands need ours
    if backend == "grouped_mm":
        return True
    return (weight.is_cuda and dispatch.is_sm90(weight.device)
            and weight.dtype == torch.bfloat16 and all(t.shape[-1] % 8 == 0 for t in operands))


def _library_gemm1(x: torch.Tensor, gate_up: torch.Tensor, save_gu: bool) -> bool:
    """Whether GEMM1 (x[tok] @ gate_up[e].T) goes through torch._grouped_mm: where the backward will use its gathered
    rows (save_gu), I is at most LIBRARY_ROW_GEMM_MAX_INTER and the library takes the operands (H and 2I 16-byte
    aligned)."""
    return (save_gu and gate_up.shape[1] // 2 <= LIBRARY_ROW_GEMM_MAX_INTER
            and _library_gemm(x, gate_up.transpose(1, 2)))


def _library_gemm2(h: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether GEMM2 (h [N, I] @ down[e].T) goes through torch._grouped_mm: I at most LIBRARY_ROW_GEMM_MAX_INTER, where
    the library takes the operands (the transposed weight's last dimension is H: both I and H 16-byte aligned)."""
    return h.shape[1] <= LIBRARY_ROW_GEMM_MAX_INTER and _library_gemm(h, down.transpose(1, 2))


def _grouped_wgrad(a_sorted: torch.Tensor, b_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """dW [E, M, N'] with dW[e] = sum over expert e's rows r of a_r^T b_r (zeros for an expert without rows)."""
    return torch._grouped_mm(a_sorted.t(), b_sorted, offs=offsets[1:])


# ----------------------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    weight_tma: bool = False  # expert weights (row-tiled GEMMs) or their gradients (wgrad) through TMA descriptors
    persistent: bool = False  # wgrad only: one wave of programs, as many as the SMs hold, walks the tiles
    operand_tma: bool = False  # wgrad only: the operand that is not gathered (dgu, or h) read through TMA
    split: bool = False  # dgrad_h only: a plain GEMM writes dA, and a pass of its own applies the SwiGLU backward

    def launch_kwargs(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=self.group_m,
                    num_warps=self.num_warps, num_stages=self.num_stages)


C = KernelConfig
# A handful of candidates per kernel (at most 5 with the TMA twin below: one compile and ~0.2 s of timing each,
# 1-8 s per kernel and shape), the first of each list being the default (no tuning). "big" when an expert holds
# >= 512 rows on average, "small" otherwise: there the last row tile of an expert is a large share of its tiles
# (half empty on average), so every row-tiled kernel has 64-row candidates (one warpgroup per 64 rows with 4 warps,
# two splitting N with 8).
CANDIDATES = {  # first entry = default (autotune off): the H200 winners of v1/v2 (benchmarks/KERNEL_NOTES.md)
    # (TMA twins first where they won at both shapes of their bucket, session 8; C(64, 128, 64, 8, 4) of gemm1 "big"
    # and C(128, 64, 64, 8, 4) of dgrad_h "big" are the only tiles of their lists that do not spill when compiled for
    # sm_90, `benchmarks/kernel_resources.py`)
    ("gemm1", "big"): [C(128, 128, 64, 8, 4), C(128, 128, 64, 8, 3), C(128, 64, 64, 4, 4), C(64, 128, 64, 8, 4)],
    ("gemm1", "small"): [C(128, 128, 64, 8, 4, weight_tma=True), C(128, 128, 64, 8, 4), C(64, 128, 64, 4, 4),
                         C(64, 128, 64, 8, 4)],
    ("gemm2", "big"): [C(128, 256, 64, 8, 4, weight_tma=True), C(128, 256, 64, 8, 4), C(128, 256, 64, 8, 3),
                       C(128, 128, 64, 8, 4)],
    ("gemm2", "small"): [C(128, 256, 64, 8, 3, weight_tma=True), C(128, 256, 64, 8, 3), C(64, 256, 64, 8, 4),
                         C(128, 128, 64, 8, 4)],
    # dgrad_h: `split` (a plain GEMM with gemm2's tiles, then the SwiGLU backward as a pass of its own) won at every
    # shape (H200, session 17: 1.82 -> 1.38 ms at V2-Lite, 5.81 -> 4.45 at V3, 0.456 -> 0.346 at the small shape);
    # the fused epilogue's tiles follow.
    ("dgrad_h", "big"): [C(128, 256, 64, 8, 4, weight_tma=True, split=True),
                         C(128, 128, 64, 8, 4, weight_tma=True, split=True), C(128, 128, 64, 8, 4),
                         C(128, 64, 64, 8, 4)],
    ("dgrad_h", "small"): [C(128, 256, 64, 8, 3, weight_tma=True, split=True),
                           C(128, 128, 64, 8, 4, weight_tma=True, split=True), C(128, 128, 64, 8, 4),
                           C(64, 128, 64, 4, 4)],
    ("dgrad_x", "big"): [C(128, 256, 64, 8, 4), C(128, 256, 64, 8, 3), C(128, 128, 64, 8, 4)],
    ("dgrad_x", "small"): [C(128, 256, 64, 8, 3, weight_tma=True), C(128, 256, 64, 8, 3), C(64, 256, 64, 8, 4),
                           C(128, 128, 64, 8, 4)],
    # wgrad (v5): a pipeline buffer per stage (the row indices prefetched), so 3-4 stages of 128x128x64 take 96-128
    # KiB and 128x256x64 at 4 stages 192 KiB; BLOCK_K 32 keeps 3 programs per SM. The two weight gradients prefer
    # different tiles (H200, session 8): gate_up's B operand is the gathered x, down's A the gathered dY (scaled by
    # the routing weights until session 17's store_wh).
    # 256x128 / 128x256 tiles with BLOCK_K 32 (2 programs per SM) lost at every shape (session 9: 6-60% slower).
    # With few rows per expert ("small": V3) the gradient's stores weigh most, and writing them through TMA won
    # (session 14: V3 wgrad_down 8.72 -> 7.93 ms, gate_up 13.23 -> 12.77); at the "big" shapes it was even.
    # Since session 17 the big bucket's gate_up default is 128x128x64 w8 s3 (small shape 0.540 -> 0.50 ms, V2-Lite
    # 2.82 -> 2.74: the 8-warp tile overtook BLOCK_K 32 once the row indices were prefetched), gemm1's 4 stages.
    ("wgrad_gate_up", "big"): [C(128, 128, 64, 8, 3), C(128, 128, 32, 4, 4), C(128, 128, 32, 4, 3),
                               C(128, 256, 64, 8, 4)],
    ("wgrad_gate_up", "small"): [C(128, 128, 32, 4, 3, weight_tma=True), C(128, 128, 32, 4, 4),
                                 C(128, 128, 64, 8, 3)],
    # wgrad_down's default is persistent (session 15: V3 8.12 -> 7.16 ms, V2-Lite -5%, small -3%); gate_up's is not
    # (its persistent compile holds 2 programs an SM instead of 3, and lost 9-40%). wgrad_down reads h through TMA
    # (`operand_tma`, session 17: small -16%, V2-Lite -9%, V3 -2.5%); gate_up's dgu through TMA, read transposed, lost
    # (+2 to +11%).
    ("wgrad_down", "big"): [C(128, 256, 64, 8, 3, persistent=True, operand_tma=True), C(128, 128, 64, 8, 3),
                            C(128, 256, 64, 8, 4), C(128, 128, 32, 4, 3)],
    ("wgrad_down", "small"): [C(128, 256, 64, 8, 3, weight_tma=True, persistent=True, operand_tma=True),
                              C(128, 128, 32, 4, 3), C(128, 128, 64, 8, 3)],
}
# "decode": a few rows per expert (generate: 96 slots over 64 experts at batch 16), so the kernels stream the expert
# weights. 16-row tiles (more programs, deeper K pipelines, no MMA work on empty rows) won every decode-sized case
# timed on an H200 (`bench_moe_layer.py --parts decode --tune-decode`, 128-2048 rows at the v2lite, v3 and small
# shapes): 16x128x128 (4 warps, 3 stages) 1.3-2.1x faster than the small bucket's 128-row tiles, first of the list.
for _kind in ("gemm1", "gemm2"):
    CANDIDATES[(_kind, "decode")] = [C(16, 128, 128, 4, 3), C(16, 64, 128, 4, 4), C(32, 64, 128, 4, 4),
                                     CANDIDATES[(_kind, "small")][0]]
for _kind in ("dgrad_h", "dgrad_x", "wgrad_gate_up", "wgrad_down"):
    CANDIDATES[(_kind, "decode")] = CANDIDATES[(_kind, "small")]
# TMA twins (v4 and v6, see benchmarks/KERNEL_NOTES.md): the same tile as the default with the expert weights read
# (row-tiled GEMMs) or their gradients written (wgrad) through TMA descriptors, or the pointer twin of a TMA default;
# last in each list.
for (_kind, _bucket_name), _configs in list(CANDIDATES.items()):
    _twin = dataclasses.replace(_configs[0], weight_tma=not _configs[0].weight_tma)
    if _twin not in _configs:
        CANDIDATES[(_kind, _bucket_name)] = [*_configs, _twin]
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
    """Rows per expert on average: "big" from 512 on, "small" below, "decode" below 16 (a generate step)."""
    if num_rows >= 512 * num_experts:
        return "big"
    return "small" if num_rows >= 16 * num_experts else "decode"


def _rows_bucket(num_rows: int) -> int:
    """Token-count bucket of the tuning cache: the next power of two of the number of slots."""
    return next_power_of_2(num_rows)


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


def _choose(kind: str, key: tuple, candidates: list[KernelConfig], launch, tune: bool = True) -> KernelConfig:
    """Cached config of `kind` for `key`; with autotune on, the fastest candidate, timed once (bounded budget).
    `tune=False` for a launch that adds into its output (timing runs it many times): the default, left unsettled."""
    full_key = (kind, key, candidates[0])
    config = _chosen.get(full_key)
    if config is not None:
        return config
    if not tune:
        return candidates[0]
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

ROUTING_GPU = dict(BLOCK_N=1024, CHUNK_B=16, num_warps=8)
ROUTING_CPU = dict(BLOCK_N=16, CHUNK_B=2, num_warps=1)  # several blocks and chunks at the tests' sizes


def build_routing(top_k_index: torch.Tensor, num_experts: int, tiles: dict | None = None, tile_block_m: int = 0):
    """perm [N] (sorted position -> slot), inv [N] (slot -> sorted position), offsets [E + 1]; all int32, no sync.
    A stable sort of the slots by expert (ties in slot order), in three launches (fused_moe_kernels.py). With a
    `tiles` dict and `tile_block_m`, the last launch also builds the tile list of the row-tiled GEMMs for that
    BLOCK_M, stored as tiles[tile_block_m] (what `Routing` takes)."""
    tile_block_m = tile_block_m if tiles is not None else 0
    flat = top_k_index.reshape(-1)
    n = flat.numel()
    cfg = ROUTING_GPU if flat.is_cuda else ROUTING_CPU
    block_n, block_e = cfg["BLOCK_N"], 1 << num_experts.bit_length()  # > E: bin E holds ids out of range
    blocks = max(1, cdiv(n, block_n))
    perm = torch.empty(n, dtype=torch.int32, device=flat.device)
    inv = torch.empty_like(perm)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=flat.device)
    counts, base = torch.empty(2, blocks, block_e, dtype=torch.int32, device=flat.device)
    kernels = _k()
    launch(kernels._route_count_kernel, (blocks,), flat, counts, n, num_experts, BLOCK_N=block_n, BLOCK_E=block_e,
           num_warps=cfg["num_warps"])
    launch(kernels._route_scan_kernel, (1,), counts, base, offsets, blocks, num_experts, BLOCK_E=block_e,
           CHUNK_B=cfg["CHUNK_B"], num_warps=cfg["num_warps"])
    if n:
        tile_expert, tile_row, max_tiles = (_empty_tile_list(offsets, tile_block_m, n, num_experts) if tile_block_m
                                            else (perm, perm, 0))
        launch(kernels._route_place_kernel, (blocks,), flat, base, perm, inv, n, num_experts, offsets, tile_expert,
               tile_row, max_tiles, BLOCK_N=block_n, BLOCK_E=block_e, TILE_BLOCK_M=tile_block_m,
               BLOCK_T=_tile_ids_a_step(block_e, max(max_tiles, 1), 2048), num_warps=cfg["num_warps"])
        if tile_block_m:
            tiles[tile_block_m] = tile_expert, tile_row, max_tiles
    return perm, inv, offsets


def _empty_tile_list(offsets, block_m: int, num_rows: int, num_experts: int):
    """(tile_expert, tile_row, max_tiles): room for a fixed upper bound cdiv(N, BLOCK_M) + E of tiles."""
    max_tiles = cdiv(num_rows, block_m) + num_experts
    tile_expert, tile_row = torch.empty(2, max_tiles, dtype=torch.int32, device=offsets.device)
    return tile_expert, tile_row, max_tiles


def _tile_ids_a_step(block_e: int, max_tiles: int, lanes: int = 8192) -> int:
    """Tile ids a program handles at once ([ids, BLOCK_E] compares: `lanes` of them), no more than the list holds."""
    return max(16, min(64, lanes // block_e, next_power_of_2(max_tiles)))


def tile_schedule(offsets: torch.Tensor, block_m: int, num_rows: int, num_experts: int):
    """Tile list of the row-tiled GEMMs, built on the GPU: (tile_expert, tile_row, max_tiles)."""
    tile_expert, tile_row, max_tiles = _empty_tile_list(offsets, block_m, num_rows, num_experts)
    block_e = max(16, next_power_of_2(num_experts))
    block_t = _tile_ids_a_step(block_e, max_tiles)
    launch(_k()._schedule_kernel, (cdiv(max_tiles, block_t),), offsets, tile_expert, tile_row, num_experts,
           max_tiles, BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_T=block_t)
    return tile_expert, tile_row, max_tiles


def routing_key(num_rows, num_experts, hidden, inter, dtype, device) -> tuple:
    """The tuning cache's key of a layer call."""
    return _rows_bucket(num_rows), num_experts, hidden, inter, str(dtype), str(device)


class Routing:
    """One layer call's routing (perm, inv, offsets), sizes and tuning key, and its tile lists (one per BLOCK_M,
    built on first use; `tiles`: those `build_routing` built). The lists live as long as this object: a tensor kept
    past the op that made it (say on the offsets it returns) would outlive a CUDA graph's outputs, which cudagraph
    trees (torch.compile's reduce-overhead) refuse."""

    def __init__(self, perm, inv, offsets, top_k, hidden, inter, dtype, tiles: dict | None = None):
        self.perm, self.inv, self.offsets, self.top_k = perm, inv, offsets, top_k
        self.num_rows, self.num_experts = perm.numel(), offsets.numel() - 1
        self.hidden, self.inter, self.dtype = hidden, inter, dtype
        self.key = routing_key(self.num_rows, self.num_experts, hidden, inter, dtype, perm.device)
        self._tiles = tiles if tiles is not None else {}

    def tiles(self, block_m):
        if block_m not in self._tiles:
            self._tiles[block_m] = tile_schedule(self.offsets, block_m, self.num_rows, self.num_experts)
        return self._tiles[block_m]

    def run(self, kind: str, family: str, launch, tune: bool = True) -> KernelConfig:
        """`launch(config)` with the config chosen for `kind` (candidates of `family`, tuned once unless `tune` is
        False); returns it."""
        config = _choose(kind, self.key, self._candidates(family), launch, tune)
        launch(config)
        return config

    def config(self, kind: str, family: str) -> KernelConfig:
        """The config `run` uses for `kind` (the default before it ran)."""
        return chosen_config(kind, self.key, self._candidates(family))

    def _candidates(self, family):
        return _candidates(family, self.num_rows, self.num_experts, self.dtype)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands multiply as torch's fp32 matmuls do: full precision by default, TF32 tensor cores after
    `torch.set_float32_matmul_precision("high")` (or "medium"). Other dtypes ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


# ------------------------------------------------------------------------------------------------------- launchers


def _half_tiles(config) -> bool:
    """Whether the row-tiled GEMMs run an expert's last tile as BLOCK_M // 2 rows where half of it or more is empty
    (V3 on an H200: partly filled tiles cost GEMM1 ~20%; half tiles take back ~4%, the layer's forward ~0.9 ms).
    tl.dot takes 16 rows or more on a GPU; the interpreter halves its 16-row tiles too, so the CPU tests run both
    paths."""
    return config.block_m >= 32 or interpreting()


def _row_tiles(config, routing, n):
    """Grid, tile-list arguments (tile_expert, tile_row, offsets, perm) and tile count of a row-tiled GEMM."""
    tile_expert, tile_row, max_tiles = routing.tiles(config.block_m)
    grid = (max_tiles * cdiv(n, config.block_n),)
    return grid, (tile_expert, tile_row, routing.offsets, routing.perm), max_tiles


def _tma_desc(tensor, block):
    """TMA descriptor of a tensor (stacked weights [E, rows, cols], or activations [rows, cols]) with `block`, or None
    where TMA cannot address it (last dimension not contiguous, base or strides not 16-byte aligned): then the kernel
    uses pointer loads / stores."""
    size = tensor.element_size()
    if tensor.stride(-1) != 1 or tensor.data_ptr() % 16 or any(stride * size % 16 for stride in tensor.stride()[:-1]):
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(tensor, list(tensor.shape), list(tensor.stride()), block)


def _weight_desc(config, weights, b_kn: bool):
    """TMA descriptor of the stacked expert weights [E, rows, cols] for a row-tiled GEMM whose B[e][k, n] is
    weights[e, k, n] (b_kn) or weights[e, n, k]: block [1, BLOCK_K, BLOCK_N] or [1, BLOCK_N, BLOCK_K]; None (pointer
    loads) unless the config asks for it and TMA can read the tensor."""
    if not config.weight_tma:
        return None
    return _tma_desc(weights, [1, config.block_k, config.block_n] if b_kn else [1, config.block_n, config.block_k])


def _launch_gemm1(config, routing, x, gate_up, h, gu):
    """h = SwiGLU(x[tok] @ Wgu[e].T), and gu = the pre-activations unless gu is empty."""
    grid, tiles, max_tiles = _row_tiles(config, routing, routing.inter)
    store_gu = gu.shape[0] > 0
    gu_arg = gu if store_gu else h
    desc = _weight_desc(config, gate_up, b_kn=False)
    launch(
        _k()._gemm1_swiglu_kernel, grid,
        x, gate_up, desc, h, gu_arg, *tiles,
        routing.hidden, routing.inter, max_tiles, routing.top_k, routing.num_experts,
        x.stride(0), x.stride(1), gate_up.stride(0), gate_up.stride(1), gate_up.stride(2),
        h.stride(0), h.stride(1), gu_arg.stride(0), gu_arg.stride(1),
        EVEN_K=routing.hidden % config.block_k == 0, STORE_GU=store_gu, WEIGHT_TMA=desc is not None,
        DOT_PREC=_dot_precision(x.dtype), HALF_TILES=_half_tiles(config), **config.launch_kwargs(),
    )


def _launch_grouped(config, routing, a, b, c, n, k, b_strides, gather_a=False):
    """C[rows] = A[rows] @ B[e] (sorted rows), B[e][k, n] read through b_strides = (stride_e, stride_k, stride_n);
    with `gather_a`, A is per token (row r reads A[perm[r] // top_k])."""
    grid, tiles, max_tiles = _row_tiles(config, routing, n)
    b_kn = b_strides[2] == 1  # b stored [E, K, N]; else [E, N, K], read transposed
    desc = _weight_desc(config, b, b_kn)
    launch(
        _k()._grouped_gemm_kernel, grid,
        a, b, desc, c, *tiles, n, k, max_tiles, routing.num_experts, routing.top_k,
        a.stride(0), a.stride(1), *b_strides, c.stride(0), c.stride(1),
        EVEN_K=k % config.block_k == 0, EVEN_N=n % config.block_n == 0, WEIGHT_TMA=desc is not None, B_KN=b_kn,
        GATHER_A=gather_a, DOT_PREC=_dot_precision(a.dtype), HALF_TILES=_half_tiles(config),
        **config.launch_kwargs(),
    )


def dgrad_h_partials(config, inter: int) -> int:
    """Rows of the routing-weight gradient's partial sums dgrad_h writes: one per column tile, or one (split)."""
    return 1 if config.split else cdiv(inter, config.block_n)


SWIGLU_BACKWARD_GPU = dict(BLOCK_R=16, BLOCK_I=128, num_warps=4)  # 66 registers (sm_90): ~7 programs an SM
SWIGLU_BACKWARD_CPU = dict(BLOCK_R=16, BLOCK_I=16, num_warps=1)
SWIGLU_GPU = dict(BLOCK_R=16, BLOCK_I=128, num_warps=4)
SWIGLU_CPU = dict(BLOCK_R=16, BLOCK_I=16, num_warps=1)


def _launch_dgrad_h(config, routing, grad_out, down, dgu, gu, wh, weights, dw):
    """dgu, the partial routing-weight gradients dw [dgrad_h_partials(config, I), N] and wh = w*h [N, I]. A `split`
    config runs a plain GEMM into dgu's gate half, then the SwiGLU backward as its own pass: the GEMM's epilogue is one
    store, which frees the registers the fused epilogue's tiles hold (one 128x128 program an SM there) at the price
    of dA's round trip through memory."""
    inter, hidden = routing.inter, routing.hidden
    if config.split:
        _launch_grouped(config, routing, grad_out, down, dgu, inter, hidden, _down_n(down), gather_a=True)
        _launch_swiglu_backward(dgu[:, :inter], dgu, gu, wh, weights, routing.perm, dw)
        return
    grid, tiles, max_tiles = _row_tiles(config, routing, inter)
    desc = _weight_desc(config, down, b_kn=True)  # B[e][k in H, n in I] = down[e, k, n]
    launch(
        _k()._dgrad_h_kernel, grid,
        grad_out, down, desc, dgu, gu, wh, weights, dw, *tiles,
        inter, hidden, max_tiles, routing.top_k, routing.num_experts,
        grad_out.stride(0), grad_out.stride(1), down.stride(0), down.stride(1), down.stride(2),
        dgu.stride(0), dgu.stride(1), gu.stride(0), gu.stride(1), wh.stride(0), wh.stride(1), dw.stride(0),
        EVEN_K=hidden % config.block_k == 0, EVEN_N=inter % config.block_n == 0, WEIGHT_TMA=desc is not None,
        DOT_PREC=_dot_precision(grad_out.dtype), HALF_TILES=_half_tiles(config),
        **config.launch_kwargs(),
    )


def _launch_swiglu(gu, h):
    cfg = SWIGLU_GPU if gu.is_cuda else SWIGLU_CPU
    rows, inter = h.shape
    launch(_k()._swiglu_kernel, (cdiv(rows, cfg["BLOCK_R"]), cdiv(inter, cfg["BLOCK_I"])), gu, h, rows, inter,
           gu.stride(0), gu.stride(1), h.stride(0), h.stride(1), **cfg)


def _launch_swiglu_backward(da, dgu, gu, wh, weights, perm, dw, by_slot=False):
    """dgu from dA (= dY[tok] @ Wd[e], sorted rows; may be dgu's own gate half) and gu; dw each row's whole
    routing-weight gradient, at its sorted row (dw [1, N]) or `by_slot` at its slot (dw [N]: the gradient of the
    routing weights as they are laid out); wh receives w*h."""
    cfg = SWIGLU_BACKWARD_GPU if dgu.is_cuda else SWIGLU_BACKWARD_CPU
    rows, inter = da.shape
    launch(
        _k()._swiglu_backward_kernel, (cdiv(rows, cfg["BLOCK_R"]),),
        da, dgu, gu, wh, weights, perm, dw, rows, inter, da.stride(0), da.stride(1),
        dgu.stride(0), dgu.stride(1), gu.stride(0), gu.stride(1), wh.stride(0), wh.stride(1),
        BY_SLOT=by_slot, **cfg,
    )


_PERSISTENT_PROGRAMS: dict = {}  # launch signature -> programs of one wave (0: the persistent compile does not fit)


def _persistent_programs(kernel, args, flags, dtypes, num_warps, device) -> int:
    """Programs of one wave of a persistent launch on `device` (SMs x programs an SM holds of the compiled kernel;
    cached per signature), or 0 where the compile does not fit: an fp32 gradient through TMA gets a staging tile of
    its own beside the pipeline buffers (128x256: 128 + 128 KiB of shared memory), which a tile a program shares
    with them."""
    key = (dtypes, device, tuple(flags.items()))
    if key not in _PERSISTENT_PROGRAMS:
        from triton.runtime.errors import OutOfResources

        try:
            per_sm = programs_per_sm(kernel.warmup(*args, grid=(1,), **flags), num_warps, device)
        except OutOfResources:
            per_sm = 0
        _PERSISTENT_PROGRAMS[key] = per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return _PERSISTENT_PROGRAMS[key]


def _launch_wgrad(config, routing, a, b, c, gather_a, gather_b, accumulate=False):
    """C[e] = sum over expert e's rows r of A[r]^T B[r] (C[e] += that sum if `accumulate`); A [rows, M], B [rows, N],
    C [E, M, N]. C's tiles go through TMA with a `weight_tma` config, and always when adding into C: the pointer
    epilogue then holds the loaded tile beside the accumulator (sm_90, wgrad_gate_up 128x128x32: 251 registers, two
    programs an SM, against 165 and three through TMA). A `persistent` config launches one wave of programs where
    its compile fits (`_persistent_programs`), and a tile a program elsewhere. An `operand_tma` config reads the
    operand that is not gathered (exactly one of A and B is) through TMA, where TMA can address it."""
    num_experts, m, n = c.shape
    tiles_mn = cdiv(m, config.block_m) * cdiv(n, config.block_n)
    desc = _tma_desc(c, [1, config.block_m, config.block_n]) if config.weight_tma or accumulate else None
    op_desc = None
    if config.operand_tma:
        op_desc = (_tma_desc(b, [config.block_k, config.block_n]) if gather_a else
                   _tma_desc(a, [config.block_k, config.block_m]))
    kernel = _k()._grouped_wgrad_kernel
    args = (a, b, c, desc, op_desc, routing.perm, routing.offsets,
            m, n, routing.top_k, num_experts,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), c.stride(2))
    flags = dict(GATHER_A=gather_a, GATHER_B=gather_b, EVEN_M=m % config.block_m == 0,
                 EVEN_N=n % config.block_n == 0, DOT_PREC=_dot_precision(a.dtype), ACCUMULATE=accumulate,
                 C_TMA=desc is not None, OPERAND_TMA=op_desc is not None, PERSISTENT=config.persistent,
                 **config.launch_kwargs())
    wave = 3  # the interpreter: several tiles a program, as on a GPU
    if config.persistent and c.is_cuda:
        wave = _persistent_programs(kernel, args, flags, (a.dtype, b.dtype, c.dtype), config.num_warps, c.device)
        flags["PERSISTENT"] = wave > 0
    if flags["PERSISTENT"]:
        grid = (min(tiles_mn * num_experts, wave),)
    else:
        grid = (tiles_mn, num_experts)
    launch(kernel, grid, *args, **flags)


def _launch_combine(y, inv, w, out, top_k):
    tokens, hidden = out.shape
    cfg = COMBINE_GPU if y.is_cuda else COMBINE_CPU
    grid = (cdiv(tokens, cfg["BLOCK_T"]), cdiv(hidden, cfg["BLOCK_H"]))
    launch(
        _k()._combine_kernel, grid,
        y, inv, w if w is not None else inv, out, tokens, hidden,
        y.stride(0), y.stride(1), out.stride(0), out.stride(1),
        TOP_K=top_k, BLOCK_T=cfg["BLOCK_T"], BLOCK_H=cfg["BLOCK_H"], HAS_W=w is not None, num_warps=cfg["num_warps"],
    )


def _down_t(down):  # B[e][k in I, n in H] = down[e, n, k]
    return down.stride(0), down.stride(2), down.stride(1)


def _down_n(down):  # B[e][k in H, n in I] = down[e, k, n]
    return down.stride(0), down.stride(1), down.stride(2)


def _gate_up_n(gate_up):  # B[e][k in 2I, n in H] = gate_up[e, k, n]
    return gate_up.stride(0), gate_up.stride(1), gate_up.stride(2)


# ------------------------------------------------------------------------------------------- forward and backward


def gate_up_forward_impl(x, gate_up, top_k_index, save_gu, tiles: dict | None = None):
    """Node 1: routing, then h = SwiGLU(x[tok] @ Wgu[e].T) in sorted slot order; gu = (gate | up) when save_gu, and
    then xs, x's rows in sorted order, where the library ran GEMM1 over them (else empty). Our GEMM1's routing builds
    its tile list; `tiles` (a dict) receives the tile lists, for node 2 to reuse."""
    tokens, hidden = x.shape
    top_k = top_k_index.shape[1]
    num_rows = tokens * top_k
    two_i = gate_up.shape[1]
    num_experts, inter = gate_up.shape[0], two_i // 2
    if _library_gemm1(x, gate_up, save_gu):
        perm, inv, offsets = build_routing(top_k_index, num_experts)
        xs = x.index_select(0, _sorted_tokens(perm, top_k))
        # (the library is not asked for an empty product)
        gu = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offsets[1:]) if num_rows else x.new_empty(0, two_i)
        h = x.new_empty(num_rows, inter)
        if num_rows:
            _launch_swiglu(gu, h)
        return gu, h, perm, inv, offsets, xs
    gemm1 = chosen_config("gemm1", routing_key(num_rows, num_experts, hidden, inter, x.dtype, x.device),
                          _candidates("gemm1", num_rows, num_experts, x.dtype))
    tiles = {} if tiles is None else tiles
    perm, inv, offsets = build_routing(top_k_index, num_experts, tiles, gemm1.block_m)
    h = x.new_empty(num_rows, inter)
    gu = x.new_empty(num_rows if save_gu else 0, two_i)
    if num_rows:
        x = x.contiguous()
        routing = Routing(perm, inv, offsets, top_k, hidden, inter, x.dtype, tiles)
        routing.run("gemm1", "gemm1", lambda c: _launch_gemm1(c, routing, x, gate_up, h, gu))
    return gu, h, perm, inv, offsets, x.new_empty(0, hidden)


def gate_up_backward_impl(dgu, x, xs, gate_up, perm, inv, offsets, top_k, need_x, need_gate_up, grad_gate_up=None):
    """Node 1's backward: dWgu[e] = sum_r dgu_r^T x[tok_r]; dx[t] = sum_j (dgu @ Wgu[e])[slot(t, j)]. xs: the forward's
    x[tok_r] (sorted rows), or empty. With `grad_gate_up`, dWgu is added into it in place and not returned."""
    hidden = x.shape[1]
    two_i = gate_up.shape[1]
    if perm.numel() == 0:
        return x.new_zeros(x.shape) if need_x else None, _zero_grad(gate_up, need_gate_up, grad_gate_up)
    x = x.contiguous()
    dgu = dgu.contiguous()
    routing = Routing(perm, inv, offsets, top_k, hidden, two_i // 2, x.dtype)
    # every element of dx and dW_gate_up is written by a kernel (experts without rows get zeros from wgrad)
    dx = dgate_up = None
    library = _library_gemm(dgu, x, gate_up)
    if need_x:  # first, so that the [N, H] dXs is freed before dW_gate_up exists
        dx = torch.empty_like(x)
        if library:
            dxs = torch._grouped_mm(dgu, gate_up, offs=offsets[1:])
        else:
            dxs = x.new_empty(perm.numel(), hidden)
            routing.run("dgrad_x", "dgrad_x",
                        lambda c: _launch_grouped(c, routing, dgu, gate_up, dxs, hidden, two_i, _gate_up_n(gate_up)))
        _launch_combine(dxs, inv, None, dx, top_k)
        del dxs
    if need_gate_up and library and _wgrad_on_sorted_rows(routing, grad_gate_up, dgu, x):
        if xs.shape[0] != perm.numel():
            xs = x.index_select(0, _sorted_tokens(perm, top_k))
        dgate_up = _sorted_rows_wgrad(grad_gate_up, dgu, xs, offsets)
    elif need_gate_up:
        into = grad_gate_up if grad_gate_up is not None else gate_up.new_empty(gate_up.shape)  # the fake's strides
        routing.run("wgrad_gate_up", "wgrad_gate_up",
                    lambda c: _launch_wgrad(c, routing, dgu, x, into, False, True, accumulate=grad_gate_up is not None),
                    tune=grad_gate_up is None)
        dgate_up = into if grad_gate_up is None else None
    return dx, dgate_up


def down_forward_impl(h, down, top_k_weights, perm, inv, offsets, tiles: dict | None = None):
    """Node 2: y = h @ Wd[e].T (sorted rows), out[t] = sum_j w[t, j] y[slot(t, j)]; `tiles`: node 1's tile lists."""
    tokens, top_k = top_k_weights.shape
    num_rows, inter = h.shape
    hidden = down.shape[1]
    if num_rows == 0:
        return h.new_zeros(tokens, hidden)
    if _library_gemm2(h, down):
        y = torch._grouped_mm(h, down.transpose(1, 2), offs=offsets[1:])
    else:
        routing = Routing(perm, inv, offsets, top_k, hidden, inter, h.dtype, tiles)
        y = h.new_empty(num_rows, hidden)
        routing.run("gemm2", "gemm2", lambda c: _launch_grouped(c, routing, h, down, y, hidden, inter, _down_t(down)))
    out = h.new_empty(tokens, hidden)
    _launch_combine(y, inv, top_k_weights.contiguous().reshape(-1), out, top_k)
    return out


def down_backward_impl(grad_out, gu, down, top_k_weights, perm, inv, offsets, need_gu, need_down, need_weights,
                       grad_down=None):
    """Node 2's backward: dgu (dL/d(gate | up)), dWd and the routing-weight gradient (see the module docstring).
    With `grad_down`, dWd is added into it in place and not returned."""
    top_k = top_k_weights.shape[1]
    num_rows, two_i = gu.shape
    inter, hidden = two_i // 2, down.shape[1]
    if num_rows == 0:
        return (gu.new_zeros(gu.shape) if need_gu else None, _zero_grad(down, need_down, grad_down),
                top_k_weights.new_zeros(top_k_weights.shape) if need_weights else None)
    grad_out = grad_out.to(gu.dtype).contiguous()
    weights = top_k_weights.contiguous().reshape(-1)
    routing = Routing(perm, inv, offsets, top_k, hidden, inter, gu.dtype)
    wh = gu.new_empty(num_rows, inter)  # w * h, written by dgrad_h: wgrad_down's B operand
    dgu = dweights = ddown = None
    library = _library_gemm(grad_out, wh, down)
    dy_sorted = grad_out.index_select(0, _sorted_tokens(perm, top_k)) if library else None
    if need_gu or need_weights or need_down:
        dgu = torch.empty_like(gu)
        if library:
            dw = torch.empty(num_rows, dtype=torch.float32, device=gu.device)
            _launch_swiglu_backward(torch._grouped_mm(dy_sorted, down, offs=offsets[1:]), dgu, gu, wh, weights,
                                    perm, dw, by_slot=True)
        else:
            dw = _run_dgrad_h(routing, grad_out, down, dgu, gu, wh, weights)
            dw = dw.sum(0).index_select(0, inv) if need_weights else None
        if need_weights:
            dweights = dw.view_as(top_k_weights).to(top_k_weights.dtype)
    if need_down and library and _wgrad_on_sorted_rows(routing, grad_down, grad_out, wh):
        ddown = _sorted_rows_wgrad(grad_down, dy_sorted, wh, offsets)
    elif need_down:  # dWd[e] [H, I] = sum_r dY[tok_r]^T (w_r h_r)
        into = grad_down if grad_down is not None else down.new_empty(down.shape)  # the fake's strides
        routing.run("wgrad_down", "wgrad_down",
                    lambda c: _launch_wgrad(c, routing, grad_out, wh, into, True, False,
                                            accumulate=grad_down is not None), tune=grad_down is None)
        ddown = into if grad_down is None else None
    return dgu if need_gu else None, ddown, dweights


def _run_dgrad_h(routing, grad_out, down, dgu, gu, wh, weights) -> torch.Tensor:
    """Our dgrad_h: dgu, wh, and the partial routing-weight gradients [P, N] of the sorted rows (summed over P, each
    row's)."""
    partial = {}

    def launch(config):
        rows = dgrad_h_partials(config, routing.inter)
        if rows not in partial:
            partial[rows] = torch.empty(rows, routing.num_rows, dtype=torch.float32, device=gu.device)
        _launch_dgrad_h(config, routing, grad_out, down, dgu, gu, wh, weights, partial[rows])

    config = routing.run("dgrad_h", "dgrad_h", launch)
    return partial[dgrad_h_partials(config, routing.inter)]


# Weight gradients over rows gathered in expert order beforehand: on an H100 / H200 in bf16 the Gluon kernel
# (wgrad_hopper.py), fresh or added into .grad in place with the old gradient's traffic under its MMAs; elsewhere the
# library's product, and where it is added into .grad a separate add (3 bytes moved per gradient byte), which beats
# our in-place Triton wgrad only where each expert holds many rows (the product's time grows with them, the add's not).
LIBRARY_THEN_ADD_ROWS_PER_EXPERT = 1024


def _wgrad_on_sorted_rows(routing, into: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a weight gradient over operands like `a`, `b` goes through `_sorted_rows_wgrad` (their rows gathered
    in expert order first) rather than through our Triton wgrad."""
    return (into is None or _gluon_wgrad(a, b, into)
            or routing.num_rows >= LIBRARY_THEN_ADD_ROWS_PER_EXPERT * routing.num_experts)


def _gluon_wgrad(a: torch.Tensor, b: torch.Tensor, into: torch.Tensor | None) -> bool:
    return backward_gemm_backend() == "auto" and hopper_wgrad_applies(a, b, into)


def _sorted_rows_wgrad(into: torch.Tensor | None, a_sorted: torch.Tensor, b_sorted: torch.Tensor,
                       offsets: torch.Tensor) -> torch.Tensor | None:
    """dW[e] = sum over expert e's rows of a^T b as a new gradient; or added into `into` (then None: nothing to
    return)."""
    if _gluon_wgrad(a_sorted, b_sorted, into):
        dw = wgrad_hopper(a_sorted, b_sorted, offsets, into)
        return dw if into is None else None
    dw = _grouped_wgrad(a_sorted, b_sorted, offsets)
    if into is None:
        return dw
    into.add_(dw)
    return None


def _sorted_tokens(perm: torch.Tensor, top_k: int) -> torch.Tensor:
    """The token of each sorted row (perm holds slots, token * top_k + j)."""
    return torch.div(perm, top_k, rounding_mode="floor")


def _zero_grad(weight, needed, accumulate_into):
    """A weight's gradient when no row reached any expert: zeros, or nothing to add to `accumulate_into`."""
    return weight.new_zeros(weight.shape) if needed and accumulate_into is None else None


# --------------------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("modeling_moe::fused_moe_gate_up", mutates_args=())
def fused_moe_gate_up_op(
    x: torch.Tensor, gate_up: torch.Tensor, top_k_index: torch.Tensor, save_gu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gu [N, 2I] (empty unless save_gu), h [N, I], perm, inv, offsets, xs [N, H] (empty unless save_gu and the
    library ran GEMM1)); rows in sorted slot order."""
    return gate_up_forward_impl(x, gate_up, top_k_index, save_gu)


@fused_moe_gate_up_op.register_fake
def _(x, gate_up, top_k_index, save_gu):
    num_rows = top_k_index.shape[0] * top_k_index.shape[1]
    two_i = gate_up.shape[1]
    return (
        x.new_empty(num_rows if save_gu else 0, two_i),
        x.new_empty(num_rows, two_i // 2),
        top_k_index.new_empty(num_rows, dtype=torch.int32),
        top_k_index.new_empty(num_rows, dtype=torch.int32),
        top_k_index.new_empty(gate_up.shape[0] + 1, dtype=torch.int32),
        x.new_empty(num_rows if _library_gemm1(x, gate_up, save_gu) else 0, x.shape[1]),
    )


@torch.library.custom_op("modeling_moe::fused_moe_gate_up_backward", mutates_args=())
def fused_moe_gate_up_backward_op(
    dgu: torch.Tensor, x: torch.Tensor, xs: torch.Tensor, gate_up: torch.Tensor, perm: torch.Tensor,
    inv: torch.Tensor, offsets: torch.Tensor, top_k: int, need_x: bool, need_gate_up: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    grads = gate_up_backward_impl(dgu, x, xs, gate_up, perm, inv, offsets, top_k, need_x, need_gate_up)
    return _or_empty(grads, (x, gate_up))


@fused_moe_gate_up_backward_op.register_fake
def _(dgu, x, xs, gate_up, perm, inv, offsets, top_k, need_x, need_gate_up):
    return _fake_grads((x, gate_up), (need_x, need_gate_up))


@torch.library.custom_op("modeling_moe::fused_moe_down", mutates_args=())
def fused_moe_down_op(
    gu: torch.Tensor, h: torch.Tensor, down: torch.Tensor, top_k_weights: torch.Tensor, perm: torch.Tensor,
    inv: torch.Tensor, offsets: torch.Tensor,
) -> torch.Tensor:
    """out [T, H] from h; gu is the differentiable input (h = SwiGLU(gu), recomputed by the backward)."""
    return down_forward_impl(h, down, top_k_weights, perm, inv, offsets)


@fused_moe_down_op.register_fake
def _(gu, h, down, top_k_weights, perm, inv, offsets):
    return h.new_empty(top_k_weights.shape[0], down.shape[1])


@torch.library.custom_op("modeling_moe::fused_moe_down_backward", mutates_args=())
def fused_moe_down_backward_op(
    grad_out: torch.Tensor, gu: torch.Tensor, down: torch.Tensor, top_k_weights: torch.Tensor, perm: torch.Tensor,
    inv: torch.Tensor, offsets: torch.Tensor, need_gu: bool, need_down: bool, need_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = down_backward_impl(grad_out, gu, down, top_k_weights, perm, inv, offsets, need_gu, need_down,
                               need_weights)
    return _or_empty(grads, (gu, down, top_k_weights))


@fused_moe_down_backward_op.register_fake
def _(grad_out, gu, down, top_k_weights, perm, inv, offsets, need_gu, need_down, need_weights):
    return _fake_grads((gu, down, top_k_weights), (need_gu, need_down, need_weights))


def _or_empty(grads, like):
    """Custom ops return tensors: an empty one stands for "not needed"."""
    return tuple(g if g is not None else t.new_empty(0) for g, t in zip(grads, like))


def _fake_grads(like, needs):
    return tuple(t.new_empty(t.shape) if need else t.new_empty(0) for t, need in zip(like, needs))


def _gate_up_setup_context(ctx, inputs, output):
    x, gate_up, top_k_index, _ = inputs
    _, h, perm, inv, offsets, xs = output
    ctx.mark_non_differentiable(h, perm, inv, offsets, xs)
    ctx.set_materialize_grads(False)
    ctx.top_k = top_k_index.shape[1]
    ctx.save_for_backward(x, xs, gate_up, perm, inv, offsets)


def _gate_up_backward(ctx, dgu, *unused):
    need_x, need_gate_up = ctx.needs_input_grad[:2]
    if dgu is None:
        return None, None, None, None
    x, xs, gate_up, perm, inv, offsets = ctx.saved_tensors
    into = _accumulation_target(gate_up) if need_gate_up else None
    if into is None and not _plain_eager(dgu, x, gate_up):
        dx, dgate_up = torch.ops.modeling_moe.fused_moe_gate_up_backward(dgu, x, xs, gate_up, perm, inv, offsets,
                                                                          ctx.top_k, need_x, need_gate_up)
    else:  # eager (the op's host cost spared), and always when the kernels write into .grad, which no op may
        dx, dgate_up = gate_up_backward_impl(dgu, x, xs, gate_up, perm, inv, offsets, ctx.top_k, need_x,
                                             need_gate_up, into)
    return dx if need_x else None, _weight_grad(gate_up, dgate_up, into) if need_gate_up else None, None, None


def _down_setup_context(ctx, inputs, output):
    gu, h, down, top_k_weights, perm, inv, offsets = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(gu, down, top_k_weights, perm, inv, offsets)


def _down_backward(ctx, grad_out):
    need_gu, _, need_down, need_weights = ctx.needs_input_grad[:4]
    if grad_out is None:
        return (None,) * 7
    gu, down, top_k_weights, perm, inv, offsets = ctx.saved_tensors
    if gu.shape[0] != perm.shape[0]:
        raise RuntimeError("fused MoE: the forward ran without saving activations (no input required grad)")
    into = _accumulation_target(down) if need_down else None
    if into is None and not _plain_eager(grad_out, gu, down, top_k_weights):
        dgu, ddown, dweights = torch.ops.modeling_moe.fused_moe_down_backward(
            grad_out, gu, down, top_k_weights, perm, inv, offsets, need_gu, need_down, need_weights)
    else:  # as in _gate_up_backward
        dgu, ddown, dweights = down_backward_impl(grad_out, gu, down, top_k_weights, perm, inv, offsets, need_gu,
                                                  need_down, need_weights, into)
    return (dgu if need_gu else None, None, _weight_grad(down, ddown, into) if need_down else None,
            dweights if need_weights else None, None, None, None)


# Gradient-accumulation fusion (as Megatron-LM's): when a weight's .grad already holds a gradient (accumulation over
# micro-batches, or any loop without zero_grad), wgrad adds into it in place, and the backward hands that tensor to
# autograd with .grad cleared, so AccumulateGrad takes it whole. The separate `grad += dW` would move three times the
# weights' bytes (67 GB per V3-shaped layer, 16 of its 77 ms forward+backward on an H200). The total autograd
# accumulates is unchanged (.grad's old value moves into this node's output), so other uses of the weight in the same
# backward still add up; it is skipped wherever the difference could show: tensor hooks on the weight (they would
# see the sum), autograd.grad() or backward(inputs=...) without the weight (nothing accumulates), double backward,
# tracing (torch.compile), a weight that is not a leaf (PEFT's LoRA, a dtype cast).
_fuse_grad_accumulation = True


def set_grad_accumulation_fusion(enabled: bool):
    """Turn the gradient-accumulation fusion on (default) or off (benchmarks compare the two)."""
    global _fuse_grad_accumulation
    _fuse_grad_accumulation = bool(enabled)


def _accumulation_target(weight: torch.Tensor) -> torch.Tensor | None:
    """weight.grad, when this backward may add the weight's gradient into it in place (see above)."""
    if (not _fuse_grad_accumulation or torch.is_grad_enabled() or torch.compiler.is_compiling()
            or not (weight.is_leaf and weight.requires_grad)):
        return None
    grad = weight.grad
    if (grad is None or weight._backward_hooks or grad.layout != torch.strided or grad.dtype != weight.dtype
            or grad.shape != weight.shape or not grad.is_contiguous()):
        return None
    with torch.enable_grad():  # backward runs without grad mode, in which a leaf shows no accumulator
        accumulator = torch.autograd.graph.get_gradient_edge(weight).node
    try:
        if not torch._C._will_engine_execute_node(accumulator):
            return None
    except RuntimeError:  # autograd.grad() asked for this leaf: its gradient is returned, not accumulated
        return None
    return grad


def _weight_grad(weight, computed, accumulated):
    """The gradient this backward returns for a weight: the computed one, or .grad with this one added (cleared on
    the weight, for AccumulateGrad to take whole)."""
    if accumulated is None:
        return computed
    weight.grad = None
    return accumulated


torch.library.register_autograd("modeling_moe::fused_moe_gate_up", _gate_up_backward,
                                setup_context=_gate_up_setup_context)
torch.library.register_autograd("modeling_moe::fused_moe_down", _down_backward, setup_context=_down_setup_context)


# The two nodes in eager mode: the ops' own implementations, contexts and backwards as plain autograd.Functions. A
# custom op's call goes through the dispatcher twice and torch.library's Python wrappers (autograd, defaults, dynamo's
# disable guard): ~90 us of host time a call more than an autograd.Function on a CPU, where the eager layer's GPU
# waits for its host (shape "small", and the router's stretch at V2-Lite). Traced code, dispatch modes and tensor
# subclasses get the ops, which they can see. `forward` takes ctx and sets it up itself: a Function with a
# `setup_context` binds its arguments through inspect.signature on every call (~40 us of a CPU's time). `tiles`, one
# dict for both nodes of a call, hands GEMM1's tile list to GEMM2 (the ops, whose calls may be CUDA graphs, keep
# theirs to themselves).
class _FusedMoEGateUpNode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_up, top_k_index, save_gu, tiles):
        output = gate_up_forward_impl(x, gate_up, top_k_index, save_gu, tiles)
        _gate_up_setup_context(ctx, (x, gate_up, top_k_index, save_gu), output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return *_gate_up_backward(ctx, *grads), None


class _FusedMoEDownNode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gu, h, down, top_k_weights, perm, inv, offsets, tiles):
        inputs = (gu, h, down, top_k_weights, perm, inv, offsets)
        output = down_forward_impl(h, down, top_k_weights, perm, inv, offsets, tiles)
        _down_setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_out):
        return *_down_backward(ctx, grad_out), None


def _plain_eager(*tensors: torch.Tensor) -> bool:
    """Whether the nodes may skip the dispatcher: not traced, no dispatch mode active, no tensor subclasses."""
    return (not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None
            and all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors))


# ------------------------------------------------------------------------------------------------ public functions


def fused_moe(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
              top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """Routed experts' output [T, H] in hidden_states' dtype (see the module docstring). Differentiable in
    hidden_states, both weights and top_k_weights. Triton on CUDA (or under TRITON_INTERPRET=1), else the reference."""
    _check_fused_moe_inputs(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights)
    if not use_triton(hidden_states) or gate_up_proj.dtype == torch.float64:  # the kernels accumulate in fp32
        return moe_experts_reference(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights)
    dtype = hidden_states.dtype
    compute = gate_up_proj.dtype
    device_type = hidden_states.device.type
    if compute == torch.float32 and torch.is_autocast_enabled(device_type):
        # as autocast runs a matmul: operands in its dtype (fp32 weights cast per call), fp32 accumulation
        compute = torch.get_autocast_dtype(device_type)
    x, gate_up, down = (t.to(compute) for t in (hidden_states, gate_up_proj, down_proj))
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate_up, down, top_k_weights))
    if _plain_eager(x, gate_up, down, top_k_index, top_k_weights):
        tiles = {}
        gu, h, perm, inv, offsets, _ = _FusedMoEGateUpNode.apply(x, gate_up, top_k_index, save, tiles)
        out = _FusedMoEDownNode.apply(gu, h, down, top_k_weights, perm, inv, offsets, tiles)
    else:
        ops = torch.ops.modeling_moe
        gu, h, perm, inv, offsets, _ = ops.fused_moe_gate_up(x, gate_up, top_k_index, save)
        out = ops.fused_moe_down(gu, h, down, top_k_weights, perm, inv, offsets)
    return out.to(dtype)


def _check_fused_moe_inputs(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights):
    """Shapes and dtypes, from the tensors' metadata only (no device sync; expert ids are not range-checked)."""
    if gate_up_proj.dim() != 3 or down_proj.dim() != 3:
        raise ValueError(f"gate_up_proj must be [E, 2I, H] and down_proj [E, H, I], got {tuple(gate_up_proj.shape)} "
                         f"and {tuple(down_proj.shape)}")
    experts, two_inter, hidden = gate_up_proj.shape
    if tuple(down_proj.shape) != (experts, hidden, two_inter // 2) or two_inter % 2:
        raise ValueError(f"down_proj must be [E, H, I] = [{experts}, {hidden}, {two_inter // 2}] for gate_up_proj "
                         f"{tuple(gate_up_proj.shape)}, got {tuple(down_proj.shape)}")
    if hidden_states.dim() != 2 or hidden_states.shape[1] != hidden:
        raise ValueError(f"hidden_states must be [tokens, {hidden}], got {tuple(hidden_states.shape)}")
    expected = (hidden_states.shape[0], top_k_index.shape[-1] if top_k_index.dim() == 2 else -1)
    if top_k_index.dim() != 2 or tuple(top_k_index.shape) != expected or tuple(top_k_weights.shape) != expected:
        raise ValueError(f"top_k_index and top_k_weights must both be [tokens, k] with tokens = "
                         f"{hidden_states.shape[0]}, got {tuple(top_k_index.shape)} and {tuple(top_k_weights.shape)}")
    if top_k_index.dtype.is_floating_point or top_k_index.dtype == torch.bool:
        raise ValueError(f"top_k_index must hold integer expert ids, got {top_k_index.dtype}")


def fused_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers experts-interface function for `experts_implementation="fused"`; reads the parameters at call
    time, so PEFT's target_parameters LoRA (a parametrization) is applied."""
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError("experts_implementation='fused' does not support expert parallelism yet")
    _check_swiglu_experts(self)
    if not (hidden_states.is_cuda or interpreting()):
        # Where the kernels cannot run (CPU tensors without the interpreter, e.g. a model kept on the CPU of a machine
        # with a GPU, where "fused" is the default): transformers' grouped_mm, the default without a GPU, which
        # compiles without graph breaks; `fused_moe`'s reference (MOE_FUSED_REFERENCE=1) syncs with the host.
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        return ALL_EXPERTS_FUNCTIONS["grouped_mm"](self, hidden_states, top_k_index, top_k_weights)
    return fused_moe(hidden_states, self.gate_up_proj, self.down_proj, top_k_index, top_k_weights)


def is_silu(act_fn) -> bool:
    """Whether `act_fn` is SiLU, torch's or transformers' (`ACT2FN["silu"]`)."""
    try:
        from transformers.activations import SiLUActivation
    except ImportError:  # these kernels also run without transformers
        SiLUActivation = torch.nn.SiLU
    return isinstance(act_fn, (torch.nn.SiLU, SiLUActivation))


def _check_swiglu_experts(experts):
    """The kernels (and the reference) compute silu(gate) * up with stacked, untransposed [gate | up] weights and no
    biases: any other experts module would get a silently different function."""
    layout = dict(has_gate=True, is_concatenated=True, has_bias=False, is_transposed=False, has_post_expert_norm=False)
    unsupported = [f"{name}={not value}" for name, value in layout.items() if getattr(experts, name, value) != value]
    if not is_silu(getattr(experts, "act_fn", None)):
        unsupported.append(f"act_fn={type(getattr(experts, 'act_fn', None)).__name__}")
    if unsupported:
        raise NotImplementedError(f"experts_implementation='fused' computes SwiGLU experts (silu activation, stacked "
                                  f"[gate | up] weights, no biases); this module has {', '.join(unsupported)}: use "
                                  f"'grouped_mm' or 'eager'")


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


__all__ = ["fused_moe", "fused_experts_forward", "register", "preferred_by_default", "KernelConfig", "config_override",
           "set_autotune", "autotune_enabled", "clear_config_cache", "use_triton", "build_routing", "tile_schedule",
           "TUNING_LOG", "set_grad_accumulation_fusion",
           "BACKWARD_GEMM_BACKENDS", "set_backward_gemm_backend", "backward_gemm_backend"]

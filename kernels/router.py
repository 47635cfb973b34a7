"""The router's small ops as Triton kernels, for eager mode on a GPU, where each PyTorch op costs the host a launch
(10-40 us, more on slow hosts) and the GPU waits for the router: it runs between the shared experts' GEMMs and the
routed experts' first GEMM, whose launch depends on it. Under torch.compile inductor fuses these ops itself, and the
model keeps its PyTorch code there.

- `router_topk`, forward and backward: the experts' scores from fp32 logits (sigmoid or softmax), the top-k experts
  by score plus the balancing bias (greedy, or limited to the best expert groups first), and their weights (the
  unbiased scores, normalised to sum to 1 if asked, then scaled). Reference: `MoETopkRouter`'s PyTorch path
  (modeling_moe.py: `scores`, `select`, `weights_of`), about ten ops forward and as many backward. Ties between
  biased scores go to the lower expert index (torch.topk leaves their order unspecified); the k experts come in
  descending order of biased score.
- `split_bf16_`: an fp32 tensor as three bf16 tensors that sum to it exactly, for the router's fp32 GEMM on tensor
  cores (`RouterLogits`). Reference: `split_bf16` in modeling_moe.py, six ops.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import dispatch
from .launch import cdiv, launch, next_power_of_2

try:  # Triton is optional: without it the model runs the PyTorch path
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    HAS_TRITON = False

__all__ = ["RouterTopK", "router_topk", "router_topk_applies", "split_bf16_", "split_bf16_applies"]

_KERNELS: dict = {}

if HAS_TRITON:  # the kernels' helpers; called from an interpreted kernel, the interpreter runs them too

    @triton.jit
    def _scores(logits, SIGMOID: tl.constexpr):
        if SIGMOID:
            return tl.sigmoid(logits)
        row_max = tl.max(logits, axis=1)
        numerators = tl.exp(logits - row_max[:, None])
        return numerators / tl.sum(numerators, axis=1)[:, None]

    @triton.jit
    def _load_logits(LOGITS, rows, cols, T, E, stride_t):
        """[BLOCK_T, BLOCK_E]: -inf past the last expert (no score), 0 past the last token (finite, never stored)."""
        mask = (rows < T)[:, None] & (cols < E)[None, :]
        logits = tl.load(LOGITS + rows.to(tl.int64)[:, None] * stride_t + cols[None, :], mask=mask, other=0.0)
        return tl.where((cols < E)[None, :], logits, float("-inf"))

    @triton.jit
    def _keep_best_groups(biased, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, SIGMOID: tl.constexpr,
                          N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr):
        """-inf outside each token's TOPK_GROUP best groups, ranked by their two best biased scores (sigmoid)
        or their best one (softmax)."""
        PER_GROUP: tl.constexpr = BLOCK_E // N_GROUP
        grouped = tl.reshape(biased, [BLOCK_T, N_GROUP, PER_GROUP])
        best = tl.max(grouped, axis=2)
        if SIGMOID:
            member = tl.arange(0, PER_GROUP)[None, None, :]
            first = tl.argmax(grouped, axis=2)
            runner_up = tl.max(tl.where(member == first[:, :, None], float("-inf"), grouped), axis=2)
            group_scores = best + runner_up
        else:
            group_scores = best
        groups = tl.arange(0, N_GROUP)[None, :]
        keep = tl.zeros([BLOCK_T, N_GROUP], dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            chosen = tl.argmax(group_scores, axis=1)
            keep = keep | (groups == chosen[:, None])
            group_scores = tl.where(groups == chosen[:, None], float("-inf"), group_scores)
        grouped = tl.where(keep[:, :, None], grouped, float("-inf"))
        return tl.reshape(grouped, [BLOCK_T, BLOCK_E])


def _kernels():
    """(top-k forward, top-k backward, split), defined on first use, once per interpreter mode (Triton reads
    TRITON_INTERPRET at decoration time)."""
    key = dispatch.interpreting()
    if key not in _KERNELS:

        @triton.jit
        def router_topk_forward_kernel(LOGITS, BIAS, WEIGHTS, INDICES, T, E, stride_t, scale,
                                       K: tl.constexpr, K_PAD: tl.constexpr, SIGMOID: tl.constexpr,
                                       N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, NORM: tl.constexpr,
                                       BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
            rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
            cols = tl.arange(0, BLOCK_E)
            scores = _scores(_load_logits(LOGITS, rows, cols, T, E, stride_t), SIGMOID)
            bias = tl.load(BIAS + cols, mask=cols < E, other=0.0)
            biased = tl.where((cols < E)[None, :], scores + bias[None, :], float("-inf"))
            if N_GROUP > 1:
                biased = _keep_best_groups(biased, BLOCK_T, BLOCK_E, SIGMOID, N_GROUP, TOPK_GROUP)
            slots = tl.arange(0, K_PAD)[None, :]
            top_weights = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
            top_experts = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
            for j in tl.static_range(K):  # k rounds of argmax: k is small (6-8), and ties go to the lower index
                chosen = tl.argmax(biased, axis=1)
                hit = cols[None, :] == chosen[:, None]
                top_weights = tl.where(slots == j, tl.sum(tl.where(hit, scores, 0.0), axis=1)[:, None], top_weights)
                top_experts = tl.where(slots == j, chosen[:, None], top_experts)
                biased = tl.where(hit, float("-inf"), biased)
            if NORM:  # the epsilon as MoETopkRouter adds it: a token whose chosen scores are all 0 keeps weights 0
                top_weights = top_weights / (tl.sum(top_weights, axis=1)[:, None] + 1e-20)
            out = rows.to(tl.int64)[:, None] * K + slots
            mask = (rows < T)[:, None] & (slots < K)
            tl.store(WEIGHTS + out, top_weights * scale, mask=mask)
            tl.store(INDICES + out, top_experts.to(tl.int64), mask=mask)

        @triton.jit
        def router_topk_backward_kernel(LOGITS, INDICES, GRAD_WEIGHTS, GRAD_LOGITS, T, E, stride_t, stride_gt, scale,
                                        K: tl.constexpr, SIGMOID: tl.constexpr, NORM: tl.constexpr,
                                        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
            rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
            cols = tl.arange(0, BLOCK_E)
            scores = _scores(_load_logits(LOGITS, rows, cols, T, E, stride_t), SIGMOID)
            scores = tl.where((cols < E)[None, :], scores, 0.0)
            # w_j = s[i_j]; out_j = scale * w_j / (sum_l w_l + eps) (NORM) or scale * w_j
            total = tl.zeros([BLOCK_T], dtype=tl.float32)
            grad_dot_weights = tl.zeros([BLOCK_T], dtype=tl.float32)
            for j in tl.static_range(K):
                chosen = tl.load(INDICES + rows.to(tl.int64) * K + j, mask=rows < T, other=-1)
                weight = tl.sum(tl.where(cols[None, :] == chosen[:, None], scores, 0.0), axis=1)
                grad = tl.load(GRAD_WEIGHTS + rows.to(tl.int64) * K + j, mask=rows < T, other=0.0)
                total += weight
                grad_dot_weights += grad * weight
            norm = total + 1e-20  # as the forward
            grad_scores = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
            for j in tl.static_range(K):
                chosen = tl.load(INDICES + rows.to(tl.int64) * K + j, mask=rows < T, other=-1)
                grad = tl.load(GRAD_WEIGHTS + rows.to(tl.int64) * K + j, mask=rows < T, other=0.0)
                if NORM:
                    grad = scale * (grad / norm - grad_dot_weights / (norm * norm))
                else:
                    grad = scale * grad
                grad_scores += tl.where(cols[None, :] == chosen[:, None], grad[:, None], 0.0)
            if SIGMOID:
                grad_logits = grad_scores * scores * (1.0 - scores)
            else:
                grad_logits = scores * (grad_scores - tl.sum(grad_scores * scores, axis=1)[:, None])
            mask = (rows < T)[:, None] & (cols < E)[None, :]
            tl.store(GRAD_LOGITS + rows.to(tl.int64)[:, None] * stride_gt + cols[None, :], grad_logits, mask=mask)

        @triton.jit
        def split_bf16_kernel(X, OUT, N, BLOCK: tl.constexpr):
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < N
            rest = tl.load(X + offs, mask=mask, other=0.0)
            for part in tl.static_range(2):  # the sign, exponent and top 7 significand bits; then of what is left
                top = (rest.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
                tl.store(OUT + part * N + offs, top.to(tl.bfloat16), mask=mask)
                rest = rest - top  # exact
            tl.store(OUT + 2 * N + offs, rest.to(tl.bfloat16), mask=mask)  # 8 significand bits left: exact

        _KERNELS[key] = (router_topk_forward_kernel, router_topk_backward_kernel, split_bf16_kernel)
    return _KERNELS[key]


def _launch_shape(num_experts: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_E, num_warps): about 4k fp32 scores a program on a GPU; a few rows under the interpreter."""
    block_e = next_power_of_2(num_experts)
    if not on_gpu:
        return 4, block_e, 1
    return max(1, min(64, 4096 // block_e)), block_e, 4


class RouterTopK(torch.autograd.Function):
    """(weights [T, k] fp32, experts [T, k] int64) of fp32 router logits [T, E]; differentiable in the logits."""

    @staticmethod
    def forward(ctx, logits, bias, top_k: int, sigmoid: bool, n_group: int, topk_group: int, norm: bool,
                scale: float):
        tokens, experts = logits.shape
        weights = torch.empty(tokens, top_k, device=logits.device, dtype=torch.float32)
        indices = torch.empty(tokens, top_k, device=logits.device, dtype=torch.int64)
        block_t, block_e, warps = _launch_shape(experts, logits.is_cuda)
        if tokens:
            launch(
                _kernels()[0], (cdiv(tokens, block_t),),
                logits, bias, weights, indices, tokens, experts, logits.stride(0), scale,
                K=top_k, K_PAD=next_power_of_2(top_k), SIGMOID=sigmoid, N_GROUP=n_group,
                TOPK_GROUP=topk_group, NORM=norm, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=warps)
        ctx.save_for_backward(logits, indices)
        ctx.mark_non_differentiable(indices)
        ctx.options = (top_k, sigmoid, norm, scale)
        return weights, indices

    @staticmethod
    @once_differentiable  # its Triton backward is not differentiable: a double backward raises, not ignores
    def backward(ctx, grad_weights, _):
        logits, indices = ctx.saved_tensors
        if grad_weights is None or not ctx.needs_input_grad[0]:
            return (None,) * 8
        top_k, sigmoid, norm, scale = ctx.options
        tokens, experts = logits.shape
        grad_weights = grad_weights.float().contiguous()
        grad_logits = torch.empty(tokens, experts, device=logits.device, dtype=torch.float32)
        block_t, block_e, warps = _launch_shape(experts, logits.is_cuda)
        if tokens:
            launch(
                _kernels()[1], (cdiv(tokens, block_t),),
                logits, indices, grad_weights, grad_logits, tokens, experts, logits.stride(0), grad_logits.stride(0),
                scale, K=top_k, SIGMOID=sigmoid, NORM=norm, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=warps)
        return grad_logits, None, None, None, None, None, None, None


def router_topk_applies(logits: torch.Tensor, scoring_func: str, n_group: int, group_limited: bool) -> bool:
    """Whether `router_topk` runs these logits: fp32 [T, E] with unit column stride, on CUDA (or the CPU under
    TRITON_INTERPRET=1), not while torch.compile traces (inductor fuses the PyTorch path), groups of a power-of-two
    size when the selection is group-limited; MOE_ROUTER_REFERENCE=1 turns it off."""
    if logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(1) != 1 or scoring_func not in (
            "sigmoid", "softmax") or torch.compiler.is_compiling():
        return False
    num_experts = logits.shape[1]
    if group_limited and (num_experts & (num_experts - 1) or n_group & (n_group - 1)):
        return False
    return dispatch.use_triton(logits, HAS_TRITON, "MOE_ROUTER_REFERENCE")


def router_topk(logits: torch.Tensor, bias: torch.Tensor, top_k: int, scoring_func: str, n_group: int = 1,
                topk_group: int = 1, norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] fp32, experts [T, k] int64): the k experts of each token by score + bias, among its
    `topk_group` best of `n_group` groups when n_group > 1, weighted by their unbiased scores (normalised when
    `norm_topk_prob`) times `routed_scaling_factor`. See `router_topk_applies` for where it runs."""
    grouped = n_group > 1 and topk_group < n_group
    return RouterTopK.apply(logits, bias.float().contiguous(), top_k, scoring_func == "sigmoid",
                            n_group if grouped else 1, topk_group if grouped else 1, norm_topk_prob,
                            float(routed_scaling_factor))


def split_bf16_applies(t: torch.Tensor) -> bool:
    """Whether `split_bf16_` runs `t`: fp32 on CUDA (or the CPU under TRITON_INTERPRET=1), not while torch.compile
    traces (inductor fuses the PyTorch ops); MOE_ROUTER_REFERENCE=1 turns it off."""
    return (t.dtype == torch.float32 and not torch.compiler.is_compiling()
            and dispatch.use_triton(t, HAS_TRITON, "MOE_ROUTER_REFERENCE"))


def split_bf16_(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out` [3, *t.shape] bf16 := three bf16 tensors that sum to the fp32 tensor `t` exactly (each the top 8
    significand bits of what the ones before left, truncated, as `split_bf16` in modeling_moe.py; subnormals, below
    1.2e-38, may be flushed). One launch."""
    if t.dtype != torch.float32 or not t.is_contiguous() or out.dtype != torch.bfloat16 or not out.is_contiguous() \
            or tuple(out.shape) != (3, *t.shape):
        raise ValueError(f"split_bf16_ takes a contiguous fp32 tensor and a contiguous bf16 [3, *shape] output, got "
                         f"{t.dtype} {tuple(t.shape)} and {out.dtype} {tuple(out.shape)}")
    block = 1024 if t.is_cuda else 64
    if t.numel():
        launch(_kernels()[2], (cdiv(t.numel(), block),), t, out, t.numel(), BLOCK=block)
    return out

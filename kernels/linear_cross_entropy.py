"""Causal-LM cross-entropy from the last hidden states, a chunk of tokens at a time, with a Triton kernel for the
rows of logits (and its PyTorch reference).

transformers computes the loss from the whole [tokens, vocab] logits upcast to fp32 (2 GiB at 16k tokens x 32k vocab),
and its cross-entropy keeps further copies of that size for the backward. `chunked_causal_lm_loss` holds the logits of
`chunk_tokens` tokens at a time: `cross_entropy_rows_` takes their loss and overwrites them with their gradient
(softmax - one-hot), which is folded at once into the gradients of the hidden states and of the output embedding
(the approach of Liger-Kernel's fused linear cross-entropy). Same value and gradients as `lm_head` + transformers'
`ForCausalLMLoss`, up to the order of the fp32 sums.

The row kernel reads a row twice (online max and sum of exponentials, then the gradient) and writes the gradient in
the logits' own dtype: three passes over one [chunk, V] buffer where separate PyTorch ops make about ten over fp32
copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch
from .launch import launch, next_power_of_2

try:  # Triton is optional: without it everything runs the PyTorch reference
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    HAS_TRITON = False

__all__ = ["LinearCrossEntropySum", "chunked_causal_lm_loss", "cross_entropy_rows_", "cross_entropy_rows_reference",
           "default_chunk_tokens"]


def cross_entropy_rows_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                                 with_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(losses [N] in fp32 or wider, gradient of their sum w.r.t. the logits in the logits' dtype, or None)."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    counted = targets != ignore_index
    safe_targets = torch.where(counted, targets, 0)[:, None]
    log_norm = torch.logsumexp(wide, dim=-1)
    losses = torch.where(counted, log_norm - wide.gather(1, safe_targets).squeeze(1), 0.0)
    if not with_grad:
        return losses, None
    grad = (wide - log_norm[:, None]).exp_()
    grad.scatter_add_(1, safe_targets, -torch.ones_like(grad[:, :1]))
    return losses, grad.mul_(counted[:, None]).to(logits.dtype)


_KERNELS: dict = {}


def _kernel():
    """Defined on first use, once per interpreter mode (Triton reads TRITON_INTERPRET at decoration time)."""
    key = dispatch.interpreting()
    if key not in _KERNELS:

        @triton.jit
        def cross_entropy_rows_kernel(LOGITS, TARGETS, LOSSES, stride_row, V, ignore_index,
                                      WITH_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
            row_logits = LOGITS + tl.program_id(0).to(tl.int64) * stride_row
            target = tl.load(TARGETS + tl.program_id(0)).to(tl.int32)
            counted = target != ignore_index
            # Online max and sum of exponentials, kept per lane and combined at the end.
            lane_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
            lane_sum = tl.zeros([BLOCK_V], tl.float32)
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                x = tl.load(row_logits + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
                new_max = tl.maximum(lane_max, x)
                safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # a lane that saw only padding
                lane_sum = lane_sum * tl.exp(lane_max - safe_max) + tl.exp(x - safe_max)
                lane_max = new_max
            row_max = tl.max(lane_max, axis=0)
            log_norm = row_max + tl.log(tl.sum(lane_sum * tl.exp(lane_max - row_max), axis=0))
            target_logit = tl.load(row_logits + tl.where(counted, target, 0)).to(tl.float32)
            tl.store(LOSSES + tl.program_id(0), tl.where(counted, log_norm - target_logit, 0.0))
            if WITH_GRAD:
                for start in range(0, V, BLOCK_V):
                    offs = start + tl.arange(0, BLOCK_V)
                    x = tl.load(row_logits + offs, mask=offs < V, other=0.0).to(tl.float32)
                    grad = tl.exp(x - log_norm) - tl.where(offs == target, 1.0, 0.0)
                    grad = tl.where(counted, grad, 0.0)
                    tl.store(row_logits + offs, grad.to(LOGITS.dtype.element_ty), mask=offs < V)

        _KERNELS[key] = cross_entropy_rows_kernel
    return _KERNELS[key]


def cross_entropy_rows_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                        with_grad: bool = True) -> torch.Tensor:
    """Losses [N] (fp32; float64 for float64 logits) of logits [N, V] (rows contiguous) against targets [N]; with
    `with_grad`, the logits are overwritten by the gradient of the losses' sum. Triton on CUDA (and under
    TRITON_INTERPRET=1), the PyTorch reference elsewhere, for float64 and with CROSS_ENTROPY_REFERENCE=1."""
    if logits.dim() != 2 or logits.stride(1) != 1 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [N, V] with contiguous rows and targets [N], got logits "
                         f"{tuple(logits.shape)} (strides {logits.stride()}) and targets {tuple(targets.shape)}")
    _check_targets(targets, logits.shape[1], ignore_index)
    return _cross_entropy_rows(logits, targets, ignore_index, with_grad)


def _check_targets(targets: torch.Tensor, vocab_size: int, ignore_index: int):
    """Fails (on the device, without a host sync) unless every target is a column of the logits or `ignore_index`:
    the kernel would read another row's logit for one outside the vocabulary."""
    torch._assert_async(((targets >= 0) & (targets < vocab_size) | (targets == ignore_index)).all())


def _cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, with_grad: bool):
    """`cross_entropy_rows_` on logits and targets already checked."""
    if logits.dtype == torch.float64 or not dispatch.use_triton(logits, HAS_TRITON, "CROSS_ENTROPY_REFERENCE"):
        losses, grad = cross_entropy_rows_reference(logits, targets, ignore_index, with_grad)
        if grad is not None:
            logits.copy_(grad)
        return losses
    targets = targets.contiguous()  # the kernel reads one target per row at unit stride
    losses = torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32)
    if logits.shape[0]:
        block_v = min(next_power_of_2(logits.shape[1]), 4096 if logits.is_cuda else 64)
        launch(
            _kernel(), (logits.shape[0],),
            logits, targets, losses, logits.stride(0), logits.shape[1], ignore_index,
            WITH_GRAD=with_grad, BLOCK_V=block_v, num_warps=8 if logits.is_cuda else 1,
        )
    return losses


# the logits of one chunk: 256 MiB. Fewer, taller chunks keep the three GEMMs a chunk closer to the dense rate: at a
# 32k vocabulary and H = 1024 on an H200, 2048 bf16 tokens a chunk ran them at 619 / 679 / 550 TFLOP/s, 4096 at
# 683 / 779 / 676 (session 30).
CHUNK_BYTES = 1 << 28


def default_chunk_tokens(vocab_size: int, logit_bytes: int = 4) -> int:
    """A power of two of tokens, 256-8192, whose logits of `logit_bytes` each fit CHUNK_BYTES (at a 32k vocabulary:
    2048 in fp32, 4096 in bf16)."""
    tokens = max(1, CHUNK_BYTES // (logit_bytes * vocab_size))
    return min(8192, max(256, 1 << (tokens.bit_length() - 1)))


def _logits_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of `hidden @ weight.T`: autocast's where it is on, else the operands' promoted."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def add_product_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc += a @ b. On CUDA, with bf16 / fp16 operands and an fp32 `acc`, one GEMM adds into `acc` in place and
    the product is never rounded to the operands' dtype; elsewhere the product is formed first (in the operands'
    dtype) and added."""
    if acc.is_cuda and acc.dtype == torch.float32 and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16):
        return torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
    return acc.add_(a @ b)


class LinearCrossEntropySum(torch.autograd.Function):
    """sum_i cross_entropy(hidden[i] @ weight.T, targets[i]) over the tokens whose target is not `ignore_index`, in
    fp32 (float64 for float64 inputs); gradients computed in the forward, chunk by chunk, and scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk_tokens: int, with_grads: bool):
        loss_dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least (float64 stays float64)
        grad_hidden = torch.empty_like(hidden) if with_grads and hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=loss_dtype) if with_grads and weight.requires_grad else None
        total = torch.zeros((), device=hidden.device, dtype=loss_dtype)
        wants_grad = grad_hidden is not None or grad_weight is not None
        _check_targets(targets, weight.shape[0], ignore_index)  # once, not per chunk: 7 small kernels each time
        for start in range(0, hidden.shape[0], chunk_tokens):
            chunk = hidden[start:start + chunk_tokens]
            logits = chunk @ weight.t()  # the model's compute dtype (bf16 under autocast)
            total += _cross_entropy_rows(logits, targets[start:start + chunk_tokens], ignore_index, wants_grad).sum()
            if not wants_grad:
                continue
            grad = logits  # now the gradient of the chunk's summed loss w.r.t. its logits
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_tokens] = grad @ weight
            if grad_weight is not None:
                add_product_(grad_weight, grad.t(), chunk)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if torch.is_grad_enabled():  # create_graph=True: the gradients come from the forward, a second derivative
            raise RuntimeError("the chunked cross-entropy has no second derivative (its gradients are computed in "
                               "the forward); for create_graph=True compute the loss on the whole logits")
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total  # a 0-dim fp32 scale: applied in fp32, the result in hidden's dtype
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """transformers' `ForCausalLMLoss(hidden_states @ weight.T, labels, ...)` without the whole logits: position i
    predicts labels[i + 1] (or shift_labels[i]); the mean over counted tokens, or their sum / num_items_in_batch
    (gradient accumulation) when given. Other keyword arguments (a forward's attention kwargs) are ignored."""
    if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive integer (or None: by the vocabulary), got {chunk_tokens!r}")
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    targets = shift_labels.reshape(-1).to(hidden.device)
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels give {targets.shape[0]} targets for {hidden.shape[0]} positions of hidden states")
    with_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(weight.shape[0], _logits_dtype(hidden, weight).itemsize)
    total = LinearCrossEntropySum.apply(hidden, weight, targets, ignore_index, chunk_tokens, with_grads)
    if num_items_in_batch is None:
        return total / (targets != ignore_index).sum()  # as transformers: NaN when no token is counted
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch

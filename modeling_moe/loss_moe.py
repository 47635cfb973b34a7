"""The causal-LM loss straight from the last hidden states, a chunk of tokens at a time.

transformers computes the loss from the whole [tokens, vocab] logits, upcast to fp32 (2 GiB at 16k tokens x 32k
vocab), and its cross-entropy keeps further copies of that size for the backward. Here the logits of `chunk_tokens`
tokens exist at a time: their loss and their gradient (softmax - one-hot) are taken in the forward, folded at once
into the gradients of the hidden states and of the output embedding, and the logits are dropped (the approach of
Liger-Kernel's fused linear cross-entropy, in PyTorch operations). Same value and gradients as
`lm_head` + transformers' `ForCausalLMLoss`, up to the order of the fp32 sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# fp32 logits of one chunk at most this size (plus their bf16 gradient): 256 MiB
CHUNK_BYTES = 1 << 28


def default_chunk_tokens(vocab_size: int) -> int:
    """A power of two of tokens, 256-8192, whose fp32 logits fit CHUNK_BYTES (2048 at a 32k vocabulary)."""
    tokens = max(1, CHUNK_BYTES // (4 * vocab_size))
    return min(8192, max(256, 1 << (tokens.bit_length() - 1)))


class LinearCrossEntropySum(torch.autograd.Function):
    """sum_i cross_entropy(hidden[i] @ weight.T, targets[i]) over the tokens whose target is not `ignore_index`,
    in fp32 (or float64 for float64 inputs); gradients computed in the forward, chunk by chunk, and scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk_tokens: int, with_grads: bool):
        grad_hidden = torch.empty_like(hidden) if with_grads and hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight) if with_grads and weight.requires_grad else None
        loss_dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least (float64 stays float64)
        grad_weight = None if grad_weight is None else grad_weight.to(loss_dtype)
        total = torch.zeros((), device=hidden.device, dtype=loss_dtype)
        for start in range(0, hidden.shape[0], chunk_tokens):
            chunk = hidden[start:start + chunk_tokens]
            target = targets[start:start + chunk_tokens]
            logits = chunk @ weight.t()  # the model's compute dtype (bf16 under autocast)
            compute_dtype = logits.dtype
            logits = logits.to(loss_dtype)
            counted = target != ignore_index
            safe_target = torch.where(counted, target, 0)[:, None]
            log_norm = torch.logsumexp(logits, dim=-1)
            total += torch.where(counted, log_norm - logits.gather(1, safe_target).squeeze(1), 0.0).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            grad = logits.sub_(log_norm[:, None]).exp_()  # softmax, in place of the logits
            grad.scatter_add_(1, safe_target, -torch.ones_like(grad[:, :1]))
            grad = grad.mul_(counted[:, None]).to(compute_dtype)  # uncounted tokens: no gradient
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_tokens] = grad @ weight
            if grad_weight is not None:
                grad_weight += grad.t() @ chunk
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
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
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    targets = shift_labels.reshape(-1).to(hidden.device)
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels give {targets.shape[0]} targets for {hidden.shape[0]} positions of hidden states")
    with_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    total = LinearCrossEntropySum.apply(
        hidden, weight, targets, ignore_index, chunk_tokens or default_chunk_tokens(weight.shape[0]), with_grads
    )
    if num_items_in_batch is None:
        return total / (targets != ignore_index).sum()  # as transformers: NaN when no token is counted
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch

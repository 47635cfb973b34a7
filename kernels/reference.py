"""Pure PyTorch reference of the fused MoE experts: the same function as the Triton path, step by step.

It is the CPU fallback of `experts_implementation="fused"` (when Triton is not used) and the oracle of the tests
(run on float64 copies of the inputs). Semantics, shared with the Triton kernels and with the model's eager loop:

    slot s = (token t, position j), expert e = top_k_index[t, j], weight w = top_k_weights[t, j]
    gate, up = x[t] @ gate_up_proj[e][:I].T, x[t] @ gate_up_proj[e][I:].T
    y_s      = (silu(gate) * up) @ down_proj[e].T
    out[t]   = sum_j w[t, j] * y_(t, j)      accumulated in (at least) fp32, in j order, cast to x's dtype

Autograd flows to x, both weights and top_k_weights through ordinary torch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sort_slots(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slots (t * k + j) sorted by expert (stable), their inverse permutation and per-expert offsets [E + 1]."""
    flat = top_k_index.reshape(-1)
    perm = torch.sort(flat, stable=True).indices
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return perm, inv, offsets


def moe_experts_reference(
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """[T, H] output of the routed experts (see the module docstring). Differentiable; host syncs (offsets)."""
    gate_up = sorted_pre_activations(hidden_states, gate_up_proj, top_k_index)
    return down_and_combine(gate_up, down_proj, top_k_index, top_k_weights).to(hidden_states.dtype)


def sorted_pre_activations(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor,
                           top_k_index: torch.Tensor) -> torch.Tensor:
    """(gate | up) [N, 2I] of every slot, rows in sorted slot order (the fused path's first autograd node)."""
    top_k = top_k_index.shape[1]
    perm, _, offsets = sort_slots(top_k_index, gate_up_proj.shape[0])
    x_sorted = hidden_states[perm // top_k]
    bounds = offsets.tolist()
    pieces = [x_sorted[start:end] @ gate_up_proj[expert].transpose(0, 1)
              for expert, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])) if end > start]
    if not pieces:  # no tokens at all
        return hidden_states.new_zeros(0, gate_up_proj.shape[1])
    return torch.cat(pieces, dim=0)


def down_and_combine(gate_up_sorted: torch.Tensor, down_proj: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """[T, H] from the sorted pre-activations (the second node): SwiGLU, the down projection, and the weighted sum
    over each token's k slots, accumulated in (at least) fp32, in j order."""
    num_tokens, top_k = top_k_index.shape
    inter = gate_up_sorted.shape[1] // 2
    _, inv, offsets = sort_slots(top_k_index, down_proj.shape[0])
    h = F.silu(gate_up_sorted[:, :inter]) * gate_up_sorted[:, inter:]
    bounds = offsets.tolist()
    pieces = [h[start:end] @ down_proj[expert].transpose(0, 1)
              for expert, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])) if end > start]
    y_sorted = torch.cat(pieces, dim=0) if pieces else h.new_zeros(0, down_proj.shape[1])
    accumulate_dtype = torch.promote_types(gate_up_sorted.dtype, torch.float32)
    y = y_sorted[inv].view(num_tokens, top_k, down_proj.shape[1]).to(accumulate_dtype)
    weights = top_k_weights.to(accumulate_dtype)
    out = y[:, 0] * weights[:, 0, None]
    for j in range(1, top_k):
        out = out + y[:, j] * weights[:, j, None]
    return out


def reference_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers experts-interface signature around `moe_experts_reference` (reads the parameters at call time)."""
    return moe_experts_reference(hidden_states, self.gate_up_proj, self.down_proj, top_k_index, top_k_weights)

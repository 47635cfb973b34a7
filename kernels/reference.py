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
    """[T, H] output of the routed experts (see the module docstring). Differentiable; one host sync (offsets)."""
    num_tokens, top_k = top_k_index.shape
    num_experts, two_i, _ = gate_up_proj.shape
    inter = two_i // 2
    accumulate_dtype = torch.promote_types(hidden_states.dtype, torch.float32)
    perm, inv, offsets = sort_slots(top_k_index, num_experts)
    x_sorted = hidden_states[perm // top_k]
    pieces = []
    bounds = offsets.tolist()
    for expert in range(num_experts):
        start, end = bounds[expert], bounds[expert + 1]
        if start == end:
            continue
        gate_up = x_sorted[start:end] @ gate_up_proj[expert].transpose(0, 1)
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
        pieces.append((F.silu(gate) * up) @ down_proj[expert].transpose(0, 1))
    if pieces:
        y_sorted = torch.cat(pieces, dim=0)
    else:  # no tokens at all
        y_sorted = hidden_states.new_zeros(0, down_proj.shape[1])
    y = y_sorted[inv].view(num_tokens, top_k, -1).to(accumulate_dtype)
    weights = top_k_weights.to(accumulate_dtype)
    out = y[:, 0] * weights[:, 0, None]
    for j in range(1, top_k):
        out = out + y[:, j] * weights[:, j, None]
    return out.to(hidden_states.dtype)


def reference_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers experts-interface signature around `moe_experts_reference` (reads the parameters at call time)."""
    return moe_experts_reference(hidden_states, self.gate_up_proj, self.down_proj, top_k_index, top_k_weights)

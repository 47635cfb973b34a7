"""Triton kernels for modeling_moe; each with a pure PyTorch reference.

Importing this package registers `experts_implementation="fused"` with transformers' experts interface:
fused MoE expert kernels (forward and backward) on CUDA, the PyTorch reference elsewhere (or the Triton interpreter
under TRITON_INTERPRET=1). Triton itself is imported only when a kernel first runs.
"""

from .fused_moe_ops import (
    HAS_TRITON,
    KernelConfig,
    autotune_enabled,
    clear_config_cache,
    config_override,
    fused_experts_forward,
    fused_moe,
    preferred_by_default,
    register,
    set_autotune,
    use_triton,
)
from .reference import moe_experts_reference, reference_experts_forward

register("fused")

__all__ = [
    "HAS_TRITON",
    "KernelConfig",
    "autotune_enabled",
    "clear_config_cache",
    "config_override",
    "fused_experts_forward",
    "fused_moe",
    "moe_experts_reference",
    "preferred_by_default",
    "reference_experts_forward",
    "register",
    "set_autotune",
    "use_triton",
]

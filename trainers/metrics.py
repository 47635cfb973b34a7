"""Throughput accounting for pretraining: training FLOPs per token, accelerator peak FLOP/s, MFU.

Convention (the one of `shared/anchors`): training FLOPs per token = 6 x the parameters a token activates (input
embedding excluded, output head included, plus what the MTP modules add in training) + causal attention,
3 x 2 x heads x (qk_head_dim + v_head_dim) x seq_len / 2 per layer (forward 1x, backward 2x, half the score matrix).
MFU = achieved FLOP/s / (number of devices x peak dense bf16 FLOP/s of one device).
"""

from __future__ import annotations

import time

import torch
from torch import nn

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of `torch.cuda.get_device_name()`.
PEAK_BF16_FLOPS = {
    "H200": 989.4e12,
    "H100": 989.4e12,  # SXM; the PCIe part is lower (756 TFLOP/s): pass --peak_tflops 756
    "H800": 989.4e12,
    "H20": 148e12,
    "GH200": 989.4e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
}


def peak_flops_per_device(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None when unknown (CPUs, unlisted GPUs without an override)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def _routed_inactive(module: nn.Module, top_k: int) -> float:
    experts = module.num_experts
    return (module.gate_up_proj.numel() + module.down_proj.numel()) * (1 - top_k / experts)


def training_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token of an (unsharded) MoEForCausalLM at `seq_len` (see the module docstring)."""
    config = model.config
    activated = model.num_parameters_summary()["activated"]
    mtp_layers = list(getattr(model.model, "mtp_layers", []))
    mtp_activated = 0.0
    for layer in mtp_layers:
        mtp_activated += sum(p.numel() for p in layer.parameters())
        for module in layer.modules():
            if hasattr(module, "gate_up_proj") and hasattr(module, "num_experts"):
                mtp_activated -= _routed_inactive(module, config.num_experts_per_tok)
        mtp_activated += model.lm_head.weight.numel()  # the shared head runs once more per depth
    if config.attention_type == "mla":
        qk, v = config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
    else:
        qk = v = config.head_dim
    layers = config.num_hidden_layers + len(mtp_layers)
    attention = 3 * config.num_attention_heads * (qk + v) * seq_len * layers
    return 6.0 * (activated + mtp_activated) + attention


class PhaseTimes:
    """Wall seconds of a run's phases (set-up, data, model, prepare, first step, ...), each measured from the end of
    the previous one: where a run's start-up goes."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> float:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 2)
        self._last = now
        return self.seconds[name]

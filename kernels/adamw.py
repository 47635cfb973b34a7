"""AdamW whose step runs a Triton kernel over up to SLOTS parameters a launch: `TritonAdamW`, a drop-in
`torch.optim.AdamW`.

torch's fused AdamW walks every parameter through one multi-tensor kernel in chunks of 64k elements: over the 1.26B
model's bf16 parameters (7 bytes moved per parameter byte) it reaches ~2.7 TB/s on an H200, where a copy of the same
bytes runs at ~4.3 TB/s. Programs of BLOCK contiguous elements with 16-byte loads, each parameter's pointers passed
as arguments of their own (SLOTS parameters a launch), reach ~3.8 TB/s (6.4 -> 4.6 ms a step;
`python benchmarks/bench_adamw.py`, KERNEL_NOTES.md "Session 26").

The update is torch's AdamW (decoupled weight decay), computed in fp32 and stored in the parameter's dtype:
    p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
The state (`step` on the CPU, `exp_avg`, `exp_avg_sq` in the parameter's dtype) is torch's own, so checkpoints move
between this optimizer and torch's AdamW either way. Options the kernel does not cover (amsgrad, maximize, capturable,
differentiable, foreach / fused, tensor learning rates or betas, sparse gradients, non-contiguous parameters, tensor
subclasses such as FSDP2's DTensors, other devices or dtypes) run torch's AdamW step itself.
"""

from __future__ import annotations

import math

import torch

from . import dispatch
from .launch import cdiv, launch

try:  # Triton is optional: without it the step is torch's
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    HAS_TRITON = False

__all__ = ["TritonAdamW"]

SLOTS = 8  # parameters a launch updates: the host launches per parameter cost ~20 us each
BLOCK_GPU = dict(BLOCK=2048, num_warps=4)  # 16 elements a thread; 4096 / 8 warps and 8192 were slower (session 26)
BLOCK_CPU = dict(BLOCK=64, num_warps=1)  # the interpreter: small tensors still span several programs
_KERNELS: dict = {}

if HAS_TRITON:  # the kernel's helpers; called from an interpreted kernel, the interpreter runs them too

    @triton.jit
    def _adamw_elements(PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, offs, mask, decay, beta1, beta2, eps, step_size,
                        bias_correction2_sqrt):
        param = tl.load(PARAM + offs, mask=mask).to(tl.float32)
        grad = tl.load(GRAD + offs, mask=mask).to(tl.float32)
        exp_avg = tl.load(EXP_AVG + offs, mask=mask).to(tl.float32)
        exp_avg_sq = tl.load(EXP_AVG_SQ + offs, mask=mask).to(tl.float32)
        exp_avg = beta1 * exp_avg + (1 - beta1) * grad
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
        param = param * decay - step_size * exp_avg / (tl.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps)
        tl.store(PARAM + offs, param.to(PARAM.dtype.element_ty), mask=mask)
        tl.store(EXP_AVG + offs, exp_avg.to(EXP_AVG.dtype.element_ty), mask=mask)
        tl.store(EXP_AVG_SQ + offs, exp_avg_sq.to(EXP_AVG_SQ.dtype.element_ty), mask=mask)

    @triton.jit
    def _adamw_block(PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, n, block, decay, beta1, beta2, eps, step_size,
                     bias_correction2_sqrt, BLOCK: tl.constexpr):
        """Block `block` of one parameter: unmasked when whole, so its loads are 16 bytes wide whatever n is (the
        sizes are not specialised on: one compile serves every group of parameters)."""
        start = block.to(tl.int64) * BLOCK  # one tensor may pass 2^31 elements
        offs = start + tl.arange(0, BLOCK)
        if start + BLOCK <= n:
            _adamw_elements(PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, offs, None, decay, beta1, beta2, eps, step_size,
                            bias_correction2_sqrt)
        else:
            _adamw_elements(PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, offs, offs < n, decay, beta1, beta2, eps, step_size,
                            bias_correction2_sqrt)


def _kernel():
    """Defined on first use, once per interpreter mode (Triton reads TRITON_INTERPRET at decoration time). Up to SLOTS
    parameters a launch, each its own pointer arguments (a pointer table would lose their 16-byte alignment, and with
    it the wide loads: session 25); slot j's blocks are programs S_j .. S_{j+1} - 1 (S_0 = 0)."""
    key = dispatch.interpreting()
    if key not in _KERNELS:
        sizes = [f"N{j}" for j in range(SLOTS)] + [f"S{j}" for j in range(1, SLOTS)]

        @triton.jit(do_not_specialize=sizes)
        def adamw_kernel(P0, G0, M0, V0, N0, P1, G1, M1, V1, N1, P2, G2, M2, V2, N2, P3, G3, M3, V3, N3,
                         P4, G4, M4, V4, N4, P5, G5, M5, V5, N5, P6, G6, M6, V6, N6, P7, G7, M7, V7, N7,
                         S1, S2, S3, S4, S5, S6, S7, decay, beta1, beta2, eps, step_size, bias_correction2_sqrt,
                         BLOCK: tl.constexpr):
            pid = tl.program_id(0)
            # One call per slot rather than one call over pointers picked by `if pid >= S_j` reassignments: the
            # latter compiles to fewer registers but ran slower (4.75 against 4.61 ms a 1.26B step, session 27).
            if pid < S1:
                _adamw_block(P0, G0, M0, V0, N0, pid, decay, beta1, beta2, eps, step_size,
                             bias_correction2_sqrt, BLOCK)
            elif pid < S2:
                _adamw_block(P1, G1, M1, V1, N1, pid - S1, decay, beta1, beta2, eps, step_size,
                             bias_correction2_sqrt, BLOCK)
            elif pid < S3:
                _adamw_block(P2, G2, M2, V2, N2, pid - S2, decay, beta1, beta2, eps, step_size,
                             bias_correction2_sqrt, BLOCK)
            elif pid < S4:
                _adamw_block(P3, G3, M3, V3, N3, pid - S3, decay, beta1, beta2, eps, step_size,
                             bias_correction2_sqrt, BLOCK)
            elif pid < S5:
                _adamw_block(P4, G4, M4, V4, N4, pid - S4, decay, beta1, beta2, eps, step_size,
                             bias_correction2_sqrt, BLOCK)
            elif pid < S6:
                _adamw_block(P5, G5, M5, V5, N5, pid - S5, decay, beta1, beta2, eps, step_size,
                             bias_correction2_sqrt, BLOCK)
            elif pid < S7:
                _adamw_block(P6, G6, M6, V6, N6, pid - S6, decay, beta1, beta2, eps, step_size,
                             bias_correction2_sqrt, BLOCK)
            else:
                _adamw_block(P7, G7, M7, V7, N7, pid - S7, decay, beta1, beta2, eps, step_size,
                             bias_correction2_sqrt, BLOCK)

        _KERNELS[key] = adamw_kernel
    return _KERNELS[key]


def _launch_adamw(tensors: list[tuple], hyper: tuple, config: dict):
    """One launch over up to SLOTS (param, grad, exp_avg, exp_avg_sq) of the same step count and dtypes; the unused
    slots repeat the last tensor with no blocks."""
    args, starts, programs = [], [], 0
    for j in range(SLOTS):
        param, grad, exp_avg, exp_avg_sq = tensors[min(j, len(tensors) - 1)]
        n = param.numel() if j < len(tensors) else 0
        args += [param, grad, exp_avg, exp_avg_sq, n]
        if j:
            starts.append(programs)
        programs += cdiv(n, config["BLOCK"])
    launch(_kernel(), (programs,), *args, *starts, *hyper, **config)


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class TritonAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` (same arguments, state and checkpoints) whose step runs `adamw_kernel` over the parameters
    of each step count and dtypes, SLOTS a launch, on CUDA (and on the CPU under TRITON_INTERPRET=1); see the module
    docstring for what falls back to torch's step."""

    def _kernel_applies(self) -> bool:
        if not HAS_TRITON:
            return False
        for group in self.param_groups:
            if (group["amsgrad"] or group["maximize"] or group["capturable"] or group["differentiable"]
                    or group["foreach"] or group["fused"] or group.get("decoupled_weight_decay", True) is False
                    or any(isinstance(group[key], torch.Tensor) for key in ("lr", "weight_decay"))
                    or any(isinstance(beta, torch.Tensor) for beta in group["betas"])):
                return False
            for p in group["params"]:
                if p.grad is not None and (
                        type(p) not in (torch.Tensor, torch.nn.Parameter)  # DTensors (FSDP2), other subclasses
                        or p.grad.is_sparse or p.dtype not in _KERNEL_DTYPES or not p.is_contiguous()
                        or not dispatch.use_triton(p, HAS_TRITON, "ADAMW_REFERENCE")):
                    return False
        return True

    @torch.no_grad()
    def step(self, closure=None):
        if not self._kernel_applies():
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, [], steps)  # torch's lazy state
            if not params:
                continue
            torch._foreach_add_(steps, 1)  # CPU tensors (neither capturable nor fused): no device sync
            beta1, beta2 = group["betas"]
            lr, eps = group["lr"], group["eps"]
            decay = 1 - lr * group["weight_decay"]
            batches: dict = {}  # (step, dtypes) -> [(param, grad, exp_avg, exp_avg_sq)]: one compile each
            for param, grad, exp_avg, exp_avg_sq, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
                if param.numel():
                    key = (step.item(), param.dtype, grad.dtype, exp_avg.dtype, exp_avg_sq.dtype)
                    batches.setdefault(key, []).append((param, grad.contiguous(), exp_avg, exp_avg_sq))
            for (step, *_), tensors in batches.items():
                hyper = (decay, beta1, beta2, eps, lr / (1 - beta1**step), math.sqrt(1 - beta2**step))
                config = BLOCK_GPU if tensors[0][0].is_cuda else BLOCK_CPU
                for first in range(0, len(tensors), SLOTS):
                    _launch_adamw(tensors[first:first + SLOTS], hyper, config)
        return loss

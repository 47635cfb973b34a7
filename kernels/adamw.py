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
The state (`step`, `exp_avg`, `exp_avg_sq` in the parameter's dtype) is torch's own, so checkpoints move between
this optimizer and torch's AdamW either way. `capturable=True` with a one-element tensor learning rate on the
parameters' device (what a scheduler then writes in place) keeps the step counts on that device too, and the kernel
reads both there: no host sync, so a CUDA graph can capture the step (the pretrain trainer's `--cuda_graph`).
Options the kernel does not cover (amsgrad, maximize, differentiable, foreach / fused, a tensor learning rate without
capturable or a float one with it, tensor betas or weight decay, sparse gradients, non-contiguous parameters, tensor
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


    @triton.jit
    def _adamw_slot(PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, n, STEP, block, LR, weight_decay, decay, beta1, beta2, eps,
                    step_size, bias_correction2_sqrt, DEVICE_SCALARS: tl.constexpr, BLOCK: tl.constexpr):
        if DEVICE_SCALARS:  # in fp32, as torch's capturable AdamW: beta ** step = 2 ** (step log2 beta)
            step = tl.load(STEP).to(tl.float32)
            lr = tl.load(LR).to(tl.float32)
            decay = 1 - lr * weight_decay
            step_size = lr / (1 - tl.exp2(step * tl.log2(beta1)))
            bias_correction2_sqrt = tl.sqrt(1 - tl.exp2(step * tl.log2(beta2)))
        _adamw_block(PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, n, block, decay, beta1, beta2, eps, step_size,
                     bias_correction2_sqrt, BLOCK)


def _kernel():
    """Defined on first use, once per interpreter mode (Triton reads TRITON_INTERPRET at decoration time). Up to SLOTS
    parameters a launch, each its own pointer arguments (a pointer table would lose their 16-byte alignment, and with
    it the wide loads: session 25); slot j's blocks are programs S_j .. S_{j+1} - 1 (S_0 = 0). With DEVICE_SCALARS
    (capturable), each slot reads its step count from T_j and the learning rate from LR, so that a CUDA graph replays
    the step with the values of the moment."""
    key = dispatch.interpreting()
    if key not in _KERNELS:
        sizes = [f"N{j}" for j in range(SLOTS)] + [f"S{j}" for j in range(1, SLOTS)]

        @triton.jit(do_not_specialize=sizes)
        def adamw_kernel(P0, G0, M0, V0, N0, T0, P1, G1, M1, V1, N1, T1, P2, G2, M2, V2, N2, T2,
                         P3, G3, M3, V3, N3, T3, P4, G4, M4, V4, N4, T4, P5, G5, M5, V5, N5, T5,
                         P6, G6, M6, V6, N6, T6, P7, G7, M7, V7, N7, T7, S1, S2, S3, S4, S5, S6, S7,
                         LR, weight_decay, decay, beta1, beta2, eps, step_size, bias_correction2_sqrt,
                         DEVICE_SCALARS: tl.constexpr, BLOCK: tl.constexpr):
            pid = tl.program_id(0)
            # One call per slot rather than one call over pointers picked by `if pid >= S_j` reassignments: the
            # latter compiles to fewer registers but ran slower (4.75 against 4.61 ms a 1.26B step, session 27).
            if pid < S1:
                _adamw_slot(P0, G0, M0, V0, N0, T0, pid, LR, weight_decay, decay, beta1, beta2, eps, step_size,
                            bias_correction2_sqrt, DEVICE_SCALARS, BLOCK)
            elif pid < S2:
                _adamw_slot(P1, G1, M1, V1, N1, T1, pid - S1, LR, weight_decay, decay, beta1, beta2, eps, step_size,
                            bias_correction2_sqrt, DEVICE_SCALARS, BLOCK)
            elif pid < S3:
                _adamw_slot(P2, G2, M2, V2, N2, T2, pid - S2, LR, weight_decay, decay, beta1, beta2, eps, step_size,
                            bias_correction2_sqrt, DEVICE_SCALARS, BLOCK)
            elif pid < S4:
                _adamw_slot(P3, G3, M3, V3, N3, T3, pid - S3, LR, weight_decay, decay, beta1, beta2, eps, step_size,
                            bias_correction2_sqrt, DEVICE_SCALARS, BLOCK)
            elif pid < S5:
                _adamw_slot(P4, G4, M4, V4, N4, T4, pid - S4, LR, weight_decay, decay, beta1, beta2, eps, step_size,
                            bias_correction2_sqrt, DEVICE_SCALARS, BLOCK)
            elif pid < S6:
                _adamw_slot(P5, G5, M5, V5, N5, T5, pid - S5, LR, weight_decay, decay, beta1, beta2, eps, step_size,
                            bias_correction2_sqrt, DEVICE_SCALARS, BLOCK)
            elif pid < S7:
                _adamw_slot(P6, G6, M6, V6, N6, T6, pid - S6, LR, weight_decay, decay, beta1, beta2, eps, step_size,
                            bias_correction2_sqrt, DEVICE_SCALARS, BLOCK)
            else:
                _adamw_slot(P7, G7, M7, V7, N7, T7, pid - S7, LR, weight_decay, decay, beta1, beta2, eps, step_size,
                            bias_correction2_sqrt, DEVICE_SCALARS, BLOCK)

        _KERNELS[key] = adamw_kernel
    return _KERNELS[key]


def _launch_adamw(tensors: list[tuple], hyper: tuple, config: dict, lr: torch.Tensor | None = None):
    """One launch over up to SLOTS (param, grad, exp_avg, exp_avg_sq, step) of the same dtypes; the unused slots
    repeat the last tensor with no blocks. `hyper`: (weight_decay, beta1, beta2, eps), then with host scalars (`lr`
    None, all of one step count) (decay, step_size, bias_correction2_sqrt) of that step; with `lr` a device tensor,
    the kernel computes those from it and each slot's step tensor."""
    args, starts, programs = [], [], 0
    for j in range(SLOTS):
        param, grad, exp_avg, exp_avg_sq, step = tensors[min(j, len(tensors) - 1)]
        n = param.numel() if j < len(tensors) else 0
        args += [param, grad, exp_avg, exp_avg_sq, n, step if lr is not None else param]
        if j:
            starts.append(programs)
        programs += cdiv(n, config["BLOCK"])
    weight_decay, beta1, beta2, eps, *host = hyper
    decay, step_size, bias_correction2_sqrt = host or (1.0, 0.0, 1.0)
    launch(_kernel(), (programs,), *args, *starts, tensors[0][0] if lr is None else lr, weight_decay, decay, beta1,
           beta2, eps, step_size, bias_correction2_sqrt, DEVICE_SCALARS=lr is not None, **config)


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class TritonAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` (same arguments, state and checkpoints) whose step runs `adamw_kernel` over the parameters
    of each step count and dtypes, SLOTS a launch, on CUDA (and on the CPU under TRITON_INTERPRET=1); see the module
    docstring for what falls back to torch's step."""

    def _kernel_applies(self) -> bool:
        if not HAS_TRITON:
            return False
        for group in self.param_groups:
            # capturable: step counts on the parameters' device and a tensor learning rate there, read by the kernel
            lr_ok = (isinstance(group["lr"], torch.Tensor) and group["lr"].numel() == 1) if group["capturable"] \
                else not isinstance(group["lr"], torch.Tensor)
            if (group["amsgrad"] or group["maximize"] or group["differentiable"] or not lr_ok
                    or group["foreach"] or group["fused"] or group.get("decoupled_weight_decay", True) is False
                    or isinstance(group["weight_decay"], torch.Tensor)
                    or any(isinstance(beta, torch.Tensor) for beta in group["betas"])):
                return False
            for p in group["params"]:
                if p.grad is not None and (
                        type(p) not in (torch.Tensor, torch.nn.Parameter)  # DTensors (FSDP2), other subclasses
                        or p.grad.is_sparse or p.dtype not in _KERNEL_DTYPES or not p.is_contiguous()
                        or (group["capturable"] and group["lr"].device != p.device)
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
            # capturable: device tensors (no host sync, so a CUDA graph may capture the step); else CPU tensors
            torch._foreach_add_(steps, 1)
            beta1, beta2 = group["betas"]
            capturable = group["capturable"]
            hyper = (group["weight_decay"], beta1, beta2, group["eps"])
            batches: dict = {}  # dtypes (and the step count, when a host scalar) -> tensors: one launch group each
            for param, grad, exp_avg, exp_avg_sq, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
                if param.numel():
                    key = (None if capturable else step.item(), param.dtype, grad.dtype, exp_avg.dtype,
                           exp_avg_sq.dtype)
                    batches.setdefault(key, []).append((param, grad.contiguous(), exp_avg, exp_avg_sq, step))
            for (step, *_), tensors in batches.items():
                if not capturable:
                    lr = group["lr"]
                    hyper = hyper[:4] + (1 - lr * group["weight_decay"], lr / (1 - beta1**step),
                                         math.sqrt(1 - beta2**step))
                config = BLOCK_GPU if tensors[0][0].is_cuda else BLOCK_CPU
                for first in range(0, len(tensors), SLOTS):
                    _launch_adamw(tensors[first:first + SLOTS], hyper, config, group["lr"] if capturable else None)
        return loss

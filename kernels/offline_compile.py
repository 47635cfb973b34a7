"""Compile the Triton kernels for a GPU that is not there: registers, spills and shared memory of any config, on any
machine (the CI's CPUs included), as the JIT would build them for the device.

    with compile_only() as compiled:           # an H100 / H200 (sm_90) by default
        ...run the launchers on CPU tensors...   # every launch compiles for the target and runs nothing
    for kernel in compiled:
        print(kernel.name, resource_usage(kernel))

Inside the block Triton's active driver is a stand-in that reports the target, and every `kernel[grid](...)`
becomes `kernel.warmup(...)`: the JIT binds and specialises the real arguments (dtypes, 16-byte alignment, unit
strides) exactly as on the device, then compiles through Triton's bundled ptxas. The tensors are never read, so CPU
tensors of the right dtypes, shapes and strides stand in for device ones. Registers and spills come from the cubin
(`cuobjdump -res-usage`, also bundled with Triton). Not for use on a machine whose kernels must also run: nothing
launches while the block is open.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

from .launch import through_triton


@dataclass(frozen=True)
class ResourceUsage:
    registers: int  # per thread
    spill_bytes: int  # local-memory stack per thread (spills and local arrays)
    shared_bytes: int  # per program (block)

    def programs_per_sm(self, num_warps: int, registers_per_sm: int = 65536, shared_per_sm: int = 228 * 1024,
                        threads_per_sm: int = 2048) -> int:
        """Programs one SM holds at once (H100 / H200 limits by default), as the CUDA occupancy calculator counts:
        registers allocated per warp 256 at a time, 1 KiB of shared memory reserved per block."""
        registers = -(-max(1, self.registers) * 32 // 256) * 256 * num_warps
        return min(threads_per_sm // (32 * num_warps), registers_per_sm // registers,
                   shared_per_sm // (self.shared_bytes + 1024))


def programs_per_sm(compiled, num_warps: int, device: torch.device) -> int:
    """How many programs of a kernel compiled for `device` one of its SMs holds at once: the fewest its threads,
    registers and shared memory allow (`ResourceUsage.programs_per_sm`); launchers size one-wave grids with it."""
    import torch

    compiled.run  # noqa: B018 - loads the binary, which is when Triton learns its register count
    properties = torch.cuda.get_device_properties(device)
    usage = ResourceUsage(registers=compiled.n_regs, spill_bytes=0, shared_bytes=compiled.metadata.shared)
    return max(1, usage.programs_per_sm(
        num_warps,
        registers_per_sm=getattr(properties, "regs_per_multiprocessor", 65536),
        shared_per_sm=getattr(properties, "shared_memory_per_multiprocessor", 228 * 1024),
        threads_per_sm=getattr(properties, "max_threads_per_multi_processor", 2048),
    ))


class _CompileOnlyDriver:
    """Triton's view of "the current device", without one."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def compile_only(arch: int = 90, warp_size: int = 32):
    """Within the block, launches compile for CUDA compute capability `arch` (90: H100 / H200) and do not run; yields
    the list that receives each compiled kernel, in launch order."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    compiled = []
    run = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append(kernel)
        return kernel

    driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", arch, warp_size)))
    JITFunction.run = compile_instead
    try:
        with through_triton():
            yield compiled
    finally:
        JITFunction.run = run
        driver._active = None  # the next use finds the real driver again (or fails as before, without a GPU)


def resource_usage(kernel) -> ResourceUsage:
    """Registers and spill stack per thread (from the cubin) and shared memory per program of a compiled kernel."""
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        report = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True,
                                check=True).stdout
    found = re.search(r"REG:(\d+)\s+STACK:(\d+)", report)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's report: {report[:300]!r}")
    return ResourceUsage(int(found.group(1)), int(found.group(2)), kernel.metadata.shared)

"""Triton launches without `JITFunction.run`'s per-call work.

`kernel[grid](*args, **kwargs)` goes through `JITFunction.run` on every call: it reads several knobs and the current
device and stream, binds and specialises every argument, builds the cache key from them, looks the compiled kernel up
and asks it for launch metadata, before the compiled kernel's own launcher runs: about 20 us of an H200 host's time a
launch (more on slower hosts), where the eager MoE layer's GPU waits for its host (the small shape, decode batches).

`launch(kernel, grid, *args, **kwargs)` keys the compiled kernel by a specialisation of the arguments at least as fine
as Triton's (`_specialization`: a pointer's dtype and 16-byte alignment; an int's being 1, its divisibility by 16 and
its range; a host tensor descriptor's block, dtype, layout and the same of its base, shape and strides; keyword
arguments by value) and calls that kernel's launcher directly. The first call of each key goes through
`JITFunction.run`, which compiles the kernel or finds it in Triton's caches, launches it, and hands it back to be
kept. A finer key than Triton's costs at most a second `run` for a kernel Triton already holds; a coarser one would
launch a kernel compiled for other arguments, which the tests guard against (`tests/test_launch.py`).

Triton's own path runs under the interpreter (TRITON_INTERPRET=1), while torch.compile traces (dynamo then records
the kernel call itself), with launch hooks set (profilers such as proton), in Triton's debug or instrumentation mode
and with a callable grid.
"""

from __future__ import annotations

import contextlib

import torch

_LEAN = True
_COMPILED: dict = {}  # (kernel, device, specialisation, keyword arguments) -> (launcher, function, metadata, tail)


def set_lean_launch(enabled: bool):
    """Launch through the compiled kernels' launchers (default) or always through `JITFunction.run` (benchmarks
    compare the two)."""
    global _LEAN
    _LEAN = bool(enabled)


@contextlib.contextmanager
def through_triton():
    """Within the block, every launch goes through `JITFunction.run` (which `offline_compile.compile_only` replaces
    with a compile)."""
    global _LEAN
    previous, _LEAN = _LEAN, False
    try:
        yield
    finally:
        _LEAN = previous


def cdiv(a: int, b: int) -> int:
    """ceil(a / b), for grids (`triton.cdiv` is a constexpr function: several us a call from Python)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n (>= 1), as `triton.next_power_of_2` (likewise a constexpr function)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _int_key(value: int) -> tuple:
    """1, divisibility by 16, and the range: i32, i64 or u64."""
    return value == 1, value % 16 == 0, -2147483648 <= value <= 2147483647, value < 9223372036854775808


def _key(args: tuple) -> tuple:
    """`_specialization` of each argument, the ints (most arguments: sizes and strides) inline."""
    return tuple([(a == 1, a % 16 == 0, -2147483648 <= a <= 2147483647, a < 9223372036854775808) if type(a) is int
                  else _specialization(a) for a in args])


def _specialization(arg):
    """What Triton specialises a kernel on for this argument, or finer."""
    kind = type(arg)
    if kind is int:
        return _int_key(arg)
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if kind is bool or arg is None:
        return kind, arg
    if kind is float:
        return float
    base = getattr(arg, "base", None)
    if isinstance(base, torch.Tensor):  # a host tensor descriptor (triton's or gluon's)
        return (kind, _specialization(base), tuple(arg.block_shape), getattr(arg, "layout", None),
                getattr(arg, "padding", None), tuple(map(_int_key, arg.shape)), tuple(map(_int_key, arg.strides)))
    if isinstance(arg, int):  # an int subclass (numpy's ints are not)
        return kind, _int_key(arg)
    return kind, arg  # anything else by value (and hashable, or Triton's own path takes it)


def _stream(device: int) -> int:
    """The current CUDA stream's handle, as Triton's driver reads it (torch's private call where it exists)."""
    if _raw_stream is not None:
        return _raw_stream(device)
    return torch.cuda.current_stream(device).cuda_stream


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


_knobs = None


def _triton_path_required(kernel) -> bool:
    """Whether this launch must go through `JITFunction.run`: a launch hook set (Triton's are chains, empty unless a
    profiler such as proton adds to them), Triton's debug or instrumentation mode on (they change the compiled
    kernel), or the kernel's own pre-run hooks."""
    global _knobs
    if _knobs is None:
        from triton import knobs

        _knobs = knobs
    hook = _knobs.runtime.launch_enter_hook
    return ((hook is not None and bool(getattr(hook, "calls", True))) or _knobs.runtime.debug
            or bool(_knobs.compilation.instrumentation_mode) or bool(kernel.pre_run_hooks))


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)`: run-time arguments positional, constexprs and launch options (num_warps, ...)
    by keyword, a grid of ints."""
    if not _LEAN or not hasattr(kernel, "device_caches") or torch.compiler.is_compiling() or callable(grid):
        kernel[grid](*args, **kwargs)
        return
    device = torch.cuda.current_device()
    try:
        key = (kernel, device, _key(args), tuple(kwargs.items()))
        compiled = _COMPILED.get(key)
    except TypeError:  # an unhashable argument
        kernel[grid](*args, **kwargs)
        return
    if compiled is None or _triton_path_required(kernel):
        compiled = kernel[grid](*args, **kwargs)
        # a tensor by keyword would key (and keep alive) each call's tensor: Triton's path every time instead
        if hasattr(compiled, "packed_metadata") and not any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            _COMPILED[key] = _launcher(kernel, compiled, len(args), kwargs)
        return
    run, function, metadata, tail = compiled
    run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, _stream(device), function,
        metadata, None, None, None, *args, *tail)


def _launcher(kernel, compiled, positional: int, kwargs: dict) -> tuple:
    """What a launch of `compiled` takes besides the grid, the stream and the run-time arguments: the parameters
    after the positional ones (by keyword or their defaults; fixed by the key)."""
    params = kernel.params[positional:]
    tail = tuple(kwargs[p.name] if p.name in kwargs else p.default for p in params)
    return compiled.run, compiled.function, compiled.packed_metadata, tail

"""kernels/launch.py: Triton launches through the compiled kernel's own launcher, keyed by a specialisation of the
arguments at least as fine as Triton's."""

import itertools

import pytest
import torch

from modeling_moe.kernels import launch as lean

triton = pytest.importorskip("triton")


def _samples():
    """Arguments that Triton specialises differently, and some it does not."""
    ints = [-(1 << 31) - 16, -(1 << 31), -17, -16, -1, 0, 1, 2, 15, 16, 17, 48, (1 << 31) - 16, (1 << 31) - 1,
            1 << 31, (1 << 31) + 16, (1 << 63) - 16, 1 << 63, (1 << 64) - 16]
    storage = {dtype: torch.zeros(256, dtype=dtype) for dtype in (torch.bfloat16, torch.float32, torch.int32)}
    tensors = [t[offset:] for t in storage.values() for offset in (0, 1, 2, 4, 8, 16)]
    scalars = [True, False, None, 0.0, 0.5, 1.0]
    descriptors = []
    from triton.tools.tensor_descriptor import TensorDescriptor

    matrix = storage[torch.bfloat16].view(16, 16)
    for block in ([8, 8], [16, 8], [8, 16]):
        descriptors.append(TensorDescriptor(matrix, [16, 16], [16, 1], block))
        descriptors.append(TensorDescriptor(storage[torch.float32].view(16, 16), [16, 16], [16, 1], block))
    descriptors.append(TensorDescriptor(matrix[:, :8], [16, 8], [16, 1], [8, 8]))
    descriptors.append(TensorDescriptor(storage[torch.bfloat16][8:].view(31, 8), [31, 8], [8, 1], [8, 8]))
    try:
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    except ImportError:
        return ints + tensors + scalars + descriptors
    for swizzle, block in ((64, [8, 32]), (128, [4, 64]), (128, [8, 64])):
        layout = gl.NVMMASharedLayout(swizzle_byte_width=swizzle, element_bitwidth=16, rank=2)
        descriptors.append(GluonDescriptor.from_tensor(storage[torch.bfloat16].view(4, 64), block, layout))
    return ints + tensors + scalars + descriptors


def test_the_key_is_at_least_as_fine_as_tritons_specialization():
    """Two arguments with the same key are specialised alike by Triton (else a launch would run a kernel compiled
    for other arguments); the key tells apart pointers of other alignment, 1 from other ints, ints by divisibility by
    16 and by range."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    samples = _samples()
    tritons = [native_specialize_impl(BaseBackend, arg, False, True, True) for arg in samples]
    ours = list(lean._key(tuple(samples)))  # what `launch` keys on
    for (a, theirs_a, ours_a), (b, theirs_b, ours_b) in itertools.combinations(zip(samples, tritons, ours), 2):
        if ours_a == ours_b:
            assert theirs_a == theirs_b, (a, b)
    assert len(set(tritons)) > 20  # the samples do tell Triton's specialisations apart


class FakeCompiled:
    """A compiled kernel as `launch` sees one: its launcher records the launches."""

    def __init__(self, launches):
        self.function, self.packed_metadata = "function", "metadata"
        self.run = lambda *args: launches.append(args)


class FakeKernel:
    """A JITFunction as `launch` sees one: `kernel[grid](...)` (Triton's path) compiles once per call."""

    def __init__(self, names_and_defaults):
        self.device_caches, self.pre_run_hooks = {}, []
        self.params = [type("Param", (), dict(name=n, default=d))() for n, d in names_and_defaults]
        self.run_calls, self.launches = [], []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.run_calls.append((grid, args, kwargs))
            return FakeCompiled(self.launches)

        return run


def test_launch_goes_to_tritons_path_once_per_key_then_to_the_launcher(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(lean, "_stream", lambda device: 1234)
    monkeypatch.setattr(lean, "_COMPILED", {})
    kernel = FakeKernel([("X", None), ("n", None), ("scale", None), ("BLOCK", None), ("FLAG", True)])
    x = torch.zeros(64)
    lean.launch(kernel, (3,), x, 32, 0.5, BLOCK=16, num_warps=4)
    assert len(kernel.run_calls) == 1 and kernel.launches == []
    lean.launch(kernel, (5, 2), x, 64, 0.25, BLOCK=16, num_warps=4)  # same key: the launcher, args in param order
    assert len(kernel.run_calls) == 1
    assert kernel.launches == [(5, 2, 1, 1234, "function", "metadata", None, None, None, x, 64, 0.25, 16, True)]
    for args, kwargs in [((x[1:], 64, 0.5), dict(BLOCK=16, num_warps=4)),  # another alignment
                         ((x, 1, 0.5), dict(BLOCK=16, num_warps=4)),  # n == 1
                         ((x, 40, 0.5), dict(BLOCK=16, num_warps=4)),  # n not a multiple of 16
                         ((x, 1 << 33, 0.5), dict(BLOCK=16, num_warps=4)),  # n an i64
                         ((x.double(), 64, 0.5), dict(BLOCK=16, num_warps=4)),  # another dtype
                         ((x, 64, 0.5), dict(BLOCK=32, num_warps=4)),  # another constexpr
                         ((x, 64, 0.5), dict(BLOCK=16, num_warps=8)),  # another launch option
                         ((x, 64, 0.5), dict(BLOCK=16, FLAG=False, num_warps=4))]:  # a default overridden
        calls = len(kernel.run_calls)
        lean.launch(kernel, (1,), *args, **kwargs)
        assert len(kernel.run_calls) == calls + 1, (args, kwargs)
    lean.launch(kernel, (1,), x, 64, 0.5, BLOCK=16, FLAG=False, num_warps=4)
    assert kernel.launches[-1][-2:] == (16, False)
    from triton import knobs

    hook = lambda metadata: None  # noqa: E731 - a profiler's launch hook: Triton's path, which calls it
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        calls = len(kernel.run_calls)
        lean.launch(kernel, (1,), x, 64, 0.5, BLOCK=16, num_warps=4)
        assert len(kernel.run_calls) == calls + 1
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    monkeypatch.setattr(knobs.runtime, "debug", True)  # Triton's debug mode: another kernel, Triton's path
    calls = len(kernel.run_calls)
    lean.launch(kernel, (1,), x, 64, 0.5, BLOCK=16, num_warps=4)
    assert len(kernel.run_calls) == calls + 1
    monkeypatch.setattr(knobs.runtime, "debug", False)
    entries = len(lean._COMPILED)
    for _ in range(2):  # a tensor by keyword: Triton's path each call, nothing kept
        calls = len(kernel.run_calls)
        lean.launch(kernel, (1,), x, 64, 0.5, BLOCK=16, FLAG=torch.zeros(2))
        assert len(kernel.run_calls) == calls + 1 and len(lean._COMPILED) == entries
    monkeypatch.setattr(lean, "_LEAN", False)  # switched off: Triton's path every time
    calls = len(kernel.run_calls)
    lean.launch(kernel, (1,), x, 64, 0.5, BLOCK=16, num_warps=4)
    assert len(kernel.run_calls) == calls + 1


def test_launch_leaves_interpreted_kernels_and_callable_grids_to_triton(monkeypatch):
    monkeypatch.setattr(lean, "_COMPILED", {})
    calls = []
    interpreted = type("Interpreted", (), {"__getitem__": lambda self, grid: lambda *a, **k: calls.append(grid)})()
    lean.launch(interpreted, (2,), torch.zeros(4), BLOCK=4)
    kernel = FakeKernel([("X", None)])
    lean.launch(kernel, lambda meta: (1,), torch.zeros(4))
    assert calls == [(2,)] and len(kernel.run_calls) == 1 and lean._COMPILED == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_launches_run_the_kernel_triton_would(monkeypatch):
    """A real kernel: repeat launches skip JITFunction.run and still compute the right thing; a misaligned view, n ==
    1 and a descriptor of another block each get a kernel of their own (a kernel compiled for 16-byte aligned
    pointers would misread a misaligned one)."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    @triton.jit
    def scale_rows(X, Y, n, stride, factor, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * stride + tl.arange(0, BLOCK)
        mask = tl.arange(0, BLOCK) < n
        tl.store(Y + offsets, tl.load(X + offsets, mask=mask) * factor, mask=mask)

    runs = []
    run = JITFunction.run
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, **k: runs.append(1) or run(self, *a, **k))
    monkeypatch.setattr(lean, "_COMPILED", {})
    storage = torch.randn(4 * 64 + 8, device="cuda")
    # (view, n, whether Triton's path runs): 48 is specialised as 64 is; 4 bytes in is not 16-byte aligned
    for view, n, compiles in [(storage, 64, True), (storage, 64, False), (storage, 48, False), (storage[1:], 64, True),
                              (storage[1:], 64, False), (storage[3:], 1, True), (storage, 1, True)]:
        x = view[:4 * 64].view(4, 64)
        y = torch.full_like(x, float("nan"))
        before = len(runs)
        lean.launch(scale_rows, (4,), x, y, n, 64, 2.5, BLOCK=64)
        torch.testing.assert_close(y[:, :n], x[:, :n] * 2.5, rtol=0, atol=0)
        assert y[:, n:].isnan().all()
        assert len(runs) - before == compiles, (view.data_ptr() % 16, n)

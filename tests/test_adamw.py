"""`TritonAdamW` (kernels/adamw.py) against AdamW's update written out in float64, and against torch's AdamW."""

import importlib.util
import math
import re

import pytest
import torch

from modeling_moe.kernels import adamw as adamw_module
from modeling_moe.kernels.adamw import TritonAdamW

# odd sizes: a single element, a tensor of one partial block, several blocks and a tail, an empty one, matrices,
# and more vectors than a launch takes (kernels/adamw.py SLOTS)
SHAPES = [(1,), (37,), (3, 100), (0,), (65, 64), (5,), (130,), (2,), (64,), (17,), (9,), (3,)]
HYPER = dict(betas=(0.9, 0.95), eps=1e-8)


def make_params(device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(shape, generator=g) * 0.5).to(device, dtype)) for shape in SHAPES]


def set_grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        if i == 2 and step == 1:
            p.grad = None  # a parameter without a gradient this step: skipped, its state untouched
        else:
            p.grad = (torch.randn(p.shape, generator=g) * 10.0 ** (i - 2)).to(p.device, p.dtype)


def groups(params):
    """Matrices with weight decay, the rest without (as the pretrain trainer groups them)."""
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class Float64AdamW:
    """AdamW's update in float64, written from the formula (Loshchilov & Hutter; torch's AdamW defaults)."""

    def __init__(self, params, weight_decays, betas, eps):
        self.params = [p.detach().double().cpu() for p in params]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = [0] * len(params)
        self.weight_decays, (self.b1, self.b2), self.eps = weight_decays, betas, eps

    def step(self, grads, lr):
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.double().cpu()
            self.t[i] += 1
            self.params[i] *= 1 - lr * self.weight_decays[i]
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            m_hat = self.m[i] / (1 - self.b1 ** self.t[i])
            v_hat = self.v[i] / (1 - self.b2 ** self.t[i])
            self.params[i] -= lr * m_hat / (v_hat.sqrt() + self.eps)


def relative_error(actual, expected):
    return ((actual.double().cpu() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("capturable", [False, True], ids=["host_scalars", "capturable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steps_match_the_update_in_float64(triton_device, monkeypatch, dtype, capturable):
    """Three steps with the learning rate changed between them (a schedule), two weight-decay groups and a parameter
    without a gradient in one step: parameters and both moments match float64 (fp32: the whole run; bf16, whose
    rounding compounds over steps: each step from the same bf16 state, to bf16's rounding), the kernel ran once per
    parameter with a gradient and elements, and the state is torch's (a step count on the CPU; capturable, with a
    tensor learning rate written in place as a scheduler does: on the parameters' device, read by the kernel)."""
    launched = []
    launch = adamw_module._launch_adamw
    monkeypatch.setattr(adamw_module, "_launch_adamw", lambda tensors, *args: launched.append(
        [t[0] for t in tensors]) or launch(tensors, *args))
    params = make_params(triton_device, dtype)
    lr = torch.tensor(1e-2, device=triton_device) if capturable else 1e-2
    optimizer = TritonAdamW(groups(params), lr=lr, capturable=capturable, **HYPER)
    decays = [0.1 if p.dim() >= 2 else 0.0 for p in params]
    reference = Float64AdamW(params, decays, **HYPER)
    # fp32: the GPU contracts products and sums into FMAs and divides to 2 ulp, which the first moment's cancellations
    # (gradients of alternating sign) amplify. bf16: half an ulp on the GPU; the interpreter truncates fp32 -> bf16
    # instead of rounding to nearest: one ulp.
    if dtype == torch.float32:
        tolerance = 1e-5 if triton_device == "cuda" else 1e-6
    else:
        tolerance = 2 ** -8 if triton_device == "cuda" else 2 ** -7
    for step, lr in enumerate([1e-2, 3e-3, 5e-2]):
        if dtype != torch.float32 and step:
            reference.params = [p.detach().double().cpu() for p in params]
            reference.m = [optimizer.state[p]["exp_avg"].double().cpu() if p in optimizer.state else reference.m[i]
                           for i, p in enumerate(params)]
            reference.v = [optimizer.state[p]["exp_avg_sq"].double().cpu() if p in optimizer.state else reference.v[i]
                           for i, p in enumerate(params)]
        set_grads(params, step)
        for group in optimizer.param_groups:
            if capturable:
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        launched.clear()
        optimizer.step()
        # each parameter with a gradient and elements once, SLOTS at most a launch; with host scalars each launch
        # one step count: at step 2 the parameter a step behind launches apart
        updated = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None and p.numel()]
        assert sorted(map(id, sum(launched, []))) == sorted(map(id, updated))
        assert all(len(tensors) <= adamw_module.SLOTS for tensors in launched)
        if not capturable:
            assert all(len({optimizer.state[p]["step"].item() for p in tensors}) == 1 for tensors in launched)
        assert len(launched) == {0: 3, 1: 3, 2: 3 if capturable else 4}[step]
        reference.step([p.grad for p in params], lr)
        for i, p in enumerate(params):
            if p.numel():
                assert relative_error(p, reference.params[i]) < tolerance, (step, i)
    for i, p in enumerate(params):
        state = optimizer.state[p]
        assert state["step"].device.type == ("cpu" if not capturable else torch.device(triton_device).type)
        assert state["step"].item() == reference.t[i]
        if p.numel():
            assert relative_error(state["exp_avg"], reference.m[i]) < tolerance
            assert relative_error(state["exp_avg_sq"], reference.v[i]) < tolerance


def test_checkpoints_move_between_this_and_torchs_adamw(triton_device):
    """A state saved by either optimizer continues in the other: after two steps in one and a third in the other,
    both paths agree with three steps of torch's AdamW."""
    def run(first, second):
        params = make_params(triton_device, torch.float32, seed=3)
        optimizer = first(groups(params), lr=1e-2, **HYPER)
        for step in range(2):
            set_grads(params, step)
            optimizer.step()
        state = optimizer.state_dict()
        resumed = second(groups(params), lr=1e-2, **HYPER)
        resumed.load_state_dict(state)
        set_grads(params, 2)
        resumed.step()
        return [p.detach().double().cpu() for p in params]

    torch_only = run(torch.optim.AdamW, torch.optim.AdamW)
    for first, second in ((TritonAdamW, torch.optim.AdamW), (torch.optim.AdamW, TritonAdamW)):
        for ours, expected in zip(run(first, second), torch_only):
            torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_capturable_state_resumes(triton_device):
    """A capturable run's state (step counts and learning rate as tensors) saved after two steps and loaded into a
    fresh capturable optimizer: its third step equals three steps of torch's AdamW (host scalars)."""
    def run(capturable):
        params = make_params(triton_device, torch.float32, seed=3)
        options = dict(lr=torch.tensor(1e-2, device=triton_device), capturable=True) if capturable else dict(lr=1e-2)
        optimizer = (TritonAdamW if capturable else torch.optim.AdamW)(groups(params), **options, **HYPER)
        for step in range(2):
            set_grads(params, step)
            optimizer.step()
        state = optimizer.state_dict()
        if capturable:
            optimizer = TritonAdamW(groups(params), **dict(options, lr=torch.tensor(0.5, device=triton_device)),
                                    **HYPER)
            optimizer.load_state_dict(state)
            assert optimizer.param_groups[0]["lr"].item() == pytest.approx(1e-2)
        set_grads(params, 2)
        optimizer.step()
        return [p.detach().double().cpu() for p in params]

    for ours, expected in zip(run(True), run(False)):
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def same_steps_as_torchs(ours, theirs, steps, torch_only_options=None, **options) -> bool:
    """`steps` steps of TritonAdamW over `ours` and of torch's AdamW over `theirs` (the same values and gradients):
    bit-equal results."""
    optimizers = TritonAdamW(ours, **options), torch.optim.AdamW(theirs, **options, **(torch_only_options or {}))
    for step in range(steps):
        set_grads(ours, step)
        set_grads(theirs, step)
        for optimizer in optimizers:
            optimizer.step()
    return all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("options", [dict(amsgrad=True), dict(maximize=True), dict(lr=torch.tensor(1e-2))],
                         ids=["amsgrad", "maximize", "tensor_lr"])
def test_options_the_kernel_does_not_cover_run_torchs_step(triton_device, monkeypatch, options):
    """Equal to torch's AdamW with the same options, bit for bit, and no kernel launched."""
    monkeypatch.setattr(adamw_module, "launch", lambda *args, **kwargs: pytest.fail("the kernel ran"))
    ours, theirs = make_params(triton_device, torch.float32), make_params(triton_device, torch.float32)
    assert same_steps_as_torchs(ours, theirs, 2, **dict(dict(lr=1e-2, **HYPER), **options))


def test_tensor_subclasses_run_torchs_step(triton_device, monkeypatch):
    """A parameter of a tensor subclass (FSDP2's DTensors are one) is not a plain buffer the kernel may address."""
    class Tagged(torch.nn.Parameter):
        pass

    monkeypatch.setattr(adamw_module, "launch", lambda *args, **kwargs: pytest.fail("the kernel ran"))
    ours = [Tagged(p.detach()) for p in make_params(triton_device, torch.float32)]
    theirs = make_params(triton_device, torch.float32)
    # torch takes its single-tensor path for a subclass (its foreach and fused ones only for plain tensors)
    assert same_steps_as_torchs(ours, theirs, 1, dict(foreach=False), lr=1e-2, **HYPER)


def test_without_triton_runs_torchs_step(monkeypatch):
    """The CPU without the interpreter (or no Triton): torch's AdamW, bit for bit."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ours, theirs = make_params("cpu", torch.float32), make_params("cpu", torch.float32)
    assert same_steps_as_torchs(ours, theirs, 1, lr=1e-2, **HYPER)


def test_closure_is_evaluated_with_grad_enabled(triton_device):
    params = make_params(triton_device, torch.float32)
    optimizer = TritonAdamW(params, lr=1e-2, **HYPER)

    def closure():
        assert torch.is_grad_enabled()
        optimizer.zero_grad()
        loss = sum((p.float() ** 2).sum() for p in params)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in params]
    loss = optimizer.step(closure)
    assert math.isfinite(loss.item())
    assert all(not torch.equal(a, b) for a, b in zip(before, params) if a.numel())


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("capturable", [False, True], ids=["host_scalars", "capturable"])
@pytest.mark.parametrize("dtype, loads", [(torch.bfloat16, 8), (torch.float32, 16)])
def test_kernel_compiles_for_hopper_with_16_byte_accesses(monkeypatch, dtype, loads, capturable):
    """Compiled for an H100 / H200 (sm_90) on the CPU, as a launch of SLOTS parameters of odd sizes builds it: the
    whole blocks' loads and stores of all four tensors are 16 bytes wide (16 elements a thread: 2 or 4 accesses of
    each tensor), whatever the sizes (not specialised on), and nothing spills; also reading the step counts and the
    learning rate from device tensors (capturable)."""
    from modeling_moe.kernels.offline_compile import compile_only, resource_usage

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tensors = [tuple(torch.empty(n, dtype=dtype) for _ in range(4)) + (torch.empty(()),)
               for n in (4096, 100, 7, 2049, 1, 3000, 64, 5)]
    hyper = (0.1, 0.9, 0.95, 1e-8) if capturable else (0.1, 0.9, 0.95, 1e-8, 0.99, 1e-3, 0.5)
    with compile_only() as compiled:
        adamw_module._launch_adamw(tensors, hyper, adamw_module.BLOCK_GPU, torch.empty(()) if capturable else None)
    ptx = compiled[-1].asm["ptx"]
    assert len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.b32", ptx)) >= loads
    assert len(re.findall(r"st\.global(?:\.\w+)*\.v4\.b32", ptx)) >= loads * 3 // 4
    assert resource_usage(compiled[-1]).spill_bytes == 0


@pytest.mark.gpu
def test_gpu_bf16_matches_torchs_fused_adamw():
    """bf16 parameters over several blocks per tensor on the GPU: within bf16 rounding of torch's fused AdamW."""
    g = torch.Generator().manual_seed(0)
    shapes = [(4096, 1000), (7, 5), (1 << 20,)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=g).cuda().bfloat16()) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    optimizers = (TritonAdamW(ours, lr=1e-3, weight_decay=0.1, **HYPER),
                  torch.optim.AdamW(theirs, lr=1e-3, weight_decay=0.1, fused=True, **HYPER))
    for step in range(3):
        grads = [torch.randn(s, generator=g).cuda().bfloat16() for s in shapes]
        for params, optimizer in zip((ours, theirs), optimizers):
            for p, grad in zip(params, grads):
                p.grad = grad.clone()
            optimizer.step()
    for a, b in zip(ours, theirs):
        assert relative_error(a, b.double().cpu()) < 4e-3


@pytest.mark.gpu
def test_gpu_capturable_step_replays_from_a_cuda_graph():
    """The capturable step captured once in a CUDA graph and replayed with a new learning rate written in place each
    time (as a scheduler does) and new gradients copied into the captured ones: the same parameters as the step run
    eagerly, and the step counts advance on the device."""
    shapes = [(4096, 1000), (7, 5), (1 << 20,), (3,)]
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=g).cuda().bfloat16() for s in shapes]
    grads = [[torch.randn(s, generator=g).cuda().bfloat16() for s in shapes] for _ in range(4)]
    rates = [1e-3, 2e-3, 5e-4, 1e-3]

    def optimizer_for(params):
        return TritonAdamW(params, lr=torch.tensor(rates[0], device="cuda"), capturable=True, weight_decay=0.1,
                           **HYPER)

    eager = [torch.nn.Parameter(p.clone()) for p in start]
    optimizer = optimizer_for(eager)
    for rate, step_grads in zip(rates, grads):
        for p, grad in zip(eager, step_grads):
            p.grad = grad.clone()
        optimizer.param_groups[0]["lr"].fill_(rate)
        optimizer.step()

    graphed = [torch.nn.Parameter(p.clone()) for p in start]
    optimizer = optimizer_for(graphed)
    for p, grad in zip(graphed, grads[0]):
        p.grad = grad.clone()
    optimizer.step()  # step 1 eagerly: the state exists before the capture
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        optimizer.step()
    torch.cuda.current_stream().wait_stream(side)
    for rate, step_grads in zip(rates[1:], grads[1:]):
        for p, grad in zip(graphed, step_grads):
            p.grad.copy_(grad)
        optimizer.param_groups[0]["lr"].fill_(rate)
        graph.replay()
    for a, b in zip(graphed, eager):
        assert torch.equal(a, b)
    assert all(optimizer.state[p]["step"].item() == len(rates) for p in graphed)

"""MoE layer (routed + shared experts) on one GPU: our fused Triton experts against transformers, in one run.

    python benchmarks/bench_moe_layer.py [--parts layer,breakdown,decode,model] [--shapes v2lite,v3,small]

Per anchor shape (../shared/anchors/README.md; bf16, routers fp32, weights N(0, 0.02), random inputs):
  layer      transformers' DeepseekV3MoE with grouped_mm (and eager: forward at v2lite and small, forward+backward at
             small only, it is slow), our MoESparseMoeBlock with grouped_mm and with fused: forward and
             forward+backward ms, TFLOP/s (forward = 2 T (k + shared) 3 H I, forward+backward = 3x), peak memory;
             gradients accumulate over the timed iterations as in the anchors' script (no zero_grad), so the fused
             experts add their weight gradients into .grad in place; the "grad += dW" row times them without that;
             "fresh .grad" rows clear the gradients before each backward, as a step of one micro-batch does (our
             fused experts then compute the weight gradients with torch._grouped_mm on an H100/H200);
             the same weights in all of them; our fused output and gradients checked against our grouped_mm; the
             dense-GEMM ceiling (one GEMM chain with the routed FLOPs, as the anchors).
  breakdown  each fused kernel alone (routing, GEMM1+SwiGLU, GEMM2, combine, dgrad_h, wgrad down / gate_up,
             dgrad_x) with the configs in use; and the same six GEMMs as torch._grouped_mm (CUTLASS) computes them
             from operands gathered beforehand (`torch._grouped_mm <step>` rows; our kernels fuse what it cannot);
             on an H100/H200 the weight gradients by our Gluon kernel too (`gluon <step>`, fresh and `+= grad`);
             GEMM1 and GEMM2 with the same rows dealt evenly over the experts (`[even rows]`: what partly filled
             row tiles cost).
  decode     forward latency at 16, 64 and 256 tokens (no grad), grouped_mm vs fused (ours) and transformers: eager
             (`latency_us`, host overhead included) and replayed from a CUDA graph (`replayed_us`, null where the
             layer cannot be captured).
  profile    the fused layer's forward+backward under torch.profiler (3 iterations, as the layer part times them):
             wall vs kernel time per iteration, the busiest kernels, and the host syncs of one iteration; and for
             it and transformers' grouped_mm (`host`): the synchronised iteration's time against the host's launch
             time and the GPU time alone (is the figure host-bound?), with the host's hotspots (cProfile).
  model      training step (AdamW) of the anchors' 1.26B model (our MoEForCausalLM, batch 8 x 2048), grouped_mm
             vs fused experts: tokens/s.
The autotune (a handful of configs per kernel and token bucket, cached) is on unless --no-autotune.
Prints JSON lines and a table last; writes $OUT/bench_moe_layer.jsonl when OUT is set.
"""
import argparse
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import transformers  # noqa: E402
from transformers import DeepseekV3Config  # noqa: E402
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf  # noqa: E402

import modeling_moe  # noqa: E402
from modeling_moe import MoEConfig  # noqa: E402


def load_kernels():
    """`modeling_moe.kernels`, also from a checkout that is not pip-installed (kernels/ sits at the repo's top)."""
    try:
        import modeling_moe.kernels as kernels
    except ImportError:
        spec = importlib.util.spec_from_file_location("modeling_moe.kernels", ROOT / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "kernels")])
        kernels = importlib.util.module_from_spec(spec)
        sys.modules["modeling_moe.kernels"] = kernels
        spec.loader.exec_module(kernels)
        modeling_moe.kernels = kernels
    return kernels


kernels = load_kernels()
from modeling_moe.kernels import fused_moe_ops as fm  # noqa: E402
from modeling_moe.kernels.wgrad_hopper import hopper_wgrad_applies, wgrad_hopper  # noqa: E402
from modeling_moe.modeling_moe import MoEForCausalLM, MoESparseMoeBlock  # noqa: E402

SHAPES = {  # name: H, I, E, k, shared, n_group, topk_group, tokens
    "v2lite": (2048, 1408, 64, 6, 2, 1, 1, 16384),
    "v3": (7168, 2048, 256, 8, 1, 8, 4, 8192),
    "small": (1024, 512, 64, 6, 2, 1, 1, 16384),
}
RECORDS = []
T0 = time.time()
dev = "cuda"
DTYPE = torch.bfloat16
DRY = "--dry-run" in sys.argv  # CPU smoke test of this script: TRITON_INTERPRET=1 python ... --dry-run
if DRY:
    dev, DTYPE = "cpu", torch.float32
    SHAPES = {"v2lite": (48, 40, 6, 2, 2, 1, 1, 20), "v3": (32, 24, 8, 3, 1, 4, 2, 12),
              "small": (32, 16, 4, 2, 2, 1, 1, 16)}


def sync():
    if dev == "cuda":
        torch.cuda.synchronize()


def peak_gib():
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else 0.0


def do_bench(fn, warmup=10, rep=50, return_mode="median"):
    if dev == "cuda":
        from triton.testing import do_bench as triton_do_bench

        return triton_do_bench(fn, warmup=warmup, rep=rep, return_mode=return_mode)
    return bench(fn, 1, 2)


def emit(**record):
    RECORDS.append(record)
    print(json.dumps(record), flush=True)


def bench(fn, warm=3, iters=10):
    """Median milliseconds (CUDA events) of `iters` calls after `warm` calls."""
    if DRY:
        warm, iters = min(warm, 1), min(iters, 1)
    for _ in range(warm):
        fn()
    sync()
    times = []
    for _ in range(iters):
        if dev != "cuda":
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def free():
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def hf_layer(H, I, E, k, shared, ng, tg, impl):
    config = DeepseekV3Config(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=k,
                              n_shared_experts=shared, n_group=ng, topk_group=tg, num_hidden_layers=1,
                              num_attention_heads=16, num_key_value_heads=16, vocab_size=1000)
    config._experts_implementation = impl
    with torch.device(dev):
        layer = hf.DeepseekV3MoE(config).to(DTYPE)
    layer.gate.weight.data = layer.gate.weight.data.float()
    return layer


def our_block(H, I, E, k, shared, ng, tg, impl):
    config = MoEConfig(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=k,
                       n_shared_experts=shared, n_group=ng, topk_group=tg, scoring_func="sigmoid",
                       topk_method="group_limited" if ng > 1 else "greedy", routed_scaling_factor=2.5,
                       norm_topk_prob=True, num_hidden_layers=1, num_attention_heads=16, vocab_size=1000,
                       bias_update_speed=0.0)
    config._experts_implementation = impl
    with torch.device(dev):
        block = MoESparseMoeBlock(config).to(DTYPE)
    block.gate.weight.data = block.gate.weight.data.float()
    return block


def set_impl(module, impl):
    for m in module.modules():
        if hasattr(m, "config") and hasattr(m.config, "_experts_implementation"):
            m.config._experts_implementation = impl


def forward(layer, x):
    out = layer(x)
    return out[0] if isinstance(out, tuple) else out


def forward_backward(layer, x, fresh=False):
    """One forward+backward; parameter gradients accumulate (no zero_grad), as in the anchors' script, unless `fresh`
    (each backward into cleared gradients, as a training step with one micro-batch)."""
    if fresh:
        layer.zero_grad(set_to_none=True)
        x.grad = None
    forward(layer, x).float().pow(2).mean().backward()


def drop_grads(block, x):
    block.zero_grad(set_to_none=True)
    x.grad = None
    free()


def timings(layer, x, flops, warm_f=3, it_f=10, warm_b=2, it_b=6, backward=True, fresh=False):
    result = {}
    with torch.no_grad():
        t = bench(lambda: forward(layer, x), warm_f, it_f)
    result.update(fwd_ms=round(t, 3), fwd_tflops=round(flops / t / 1e9, 1))
    if backward:
        t = bench(lambda: forward_backward(layer, x, fresh), warm_b, it_b)
        sync()
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        forward_backward(layer, x, fresh)
        sync()
        result.update(fwdbwd_ms=round(t, 3), fwdbwd_tflops=round(3 * flops / t / 1e9, 1), peak_gib=peak_gib())
    return result


def profile_layer(block, x, iterations=3) -> dict:
    """Forward+backward under the pretraining trainer's profiler (gradients accumulate, as in `timings`): wall and
    kernel ms per iteration, the busiest kernels, and the host syncs of one more iteration (CUDA sync debug mode)."""
    import warnings

    from modeling_moe.trainers.profiling import StepProfiler

    profiler = StepProfiler((0, iterations - 1), Path(os.environ.get("OUT", "/tmp")) / "profile", 0, torch.device(dev))
    for i in range(iterations):
        profiler.start_if(i)
        forward_backward(block, x)
        summary = profiler.stop_if(i)
    result = {"wall_ms": round(summary["wall_s"] * 1e3 / iterations, 3),
              "kernel_ms": round(summary["device_time_s"] * 1e3 / iterations, 3),
              "categories_ms": {label: round(entry["time_s"] * 1e3 / iterations, 3)
                                for label, entry in summary["categories"].items()},
              "top_kernels_ms": [(k["name"][:100], round(k["time_s"] * 1e3 / iterations, 3), k["calls"])
                                 for k in summary["top_kernels"]]}
    if "device" in summary:  # the GPU's busy time and its longest waits, each with what the host was running
        result["busy_ms"] = round(summary["device"]["busy_s"] * 1e3 / iterations, 3)
        result["idle_ms"] = round(summary["device"]["idle_between_kernels_s"] * 1e3 / iterations, 3)
        result["longest_gaps"] = summary["device"]["longest_gaps"]
    if dev == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                forward_backward(block, x)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        result["host_syncs"] = [str(w.message)[:160] for w in caught if "synchroniz" in str(w.message)]
    return result


def host_and_device_ms(layer, x, iterations=20, queued=10) -> dict:
    """Is a forward+backward host-bound? Per iteration, medians: `event_ms`, the CUDA-event time of a synchronised
    iteration (what `timings` reports); `host_ms`, how long the call takes to return (launching everything);
    `device_ms`, the GPU time alone, from `queued` iterations launched behind a 40 ms sleep kernel, so the GPU never
    waits for the host. event_ms near host_ms > device_ms: the host sets the figure."""
    grad = torch.randn_like(x)

    def step():
        forward(layer, x).backward(grad)

    events, host = [], []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync()
        began = time.perf_counter()
        start.record()
        step()
        end.record()
        host.append((time.perf_counter() - began) * 1e3)
        sync()
        events.append(start.elapsed_time(end))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    sync()
    torch.cuda._sleep(int(40e6))
    start.record()
    for _ in range(queued):
        step()
    end.record()
    sync()
    return {"event_ms": round(statistics.median(events), 3), "host_ms": round(statistics.median(host), 3),
            "device_ms": round(start.elapsed_time(end) / queued, 3), "host_hotspots": host_hotspots(step)}


def host_hotspots(step, iterations=10, top=25) -> list:
    """Where the host's launch time goes: `step` under cProfile (which slows Python ~2x, so shares, not times, are
    the reading), the functions with the most time of their own, as (function, own ms per iteration, calls per
    iteration, cumulative ms per iteration)."""
    import cProfile
    import pstats

    sync()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(iterations):
        step()
    profiler.disable()
    sync()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (primitive calls, calls, own s, cumulative s, ...)
    rows = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    return [(f"{Path(file).name}:{line}:{name}", round(own * 1e3 / iterations, 3), calls // iterations,
             round(cumulative * 1e3 / iterations, 3)) for (file, line, name), (_, calls, own, cumulative, _) in rows]


def rel(a, b, chunk=1 << 26):
    """||a - b|| / ||b||, in chunks (a v3 expert gradient is 22 GB in bf16)."""
    a, b = a.reshape(-1), b.reshape(-1)
    num = den = 0.0
    for i in range(0, a.numel(), chunk):
        x, y = a[i:i + chunk].double(), b[i:i + chunk].double()
        num += float((x - y).pow(2).sum())
        den += float(y.pow(2).sum())
    return (num / max(den, 1e-300)) ** 0.5


def part_layer(name, args):
    H, I, E, k, shared, ng, tg, T = SHAPES[name]
    fwd_flops = 2 * T * (k + shared) * 3 * H * I
    routed_flops = 2 * T * k * 3 * H * I
    torch.manual_seed(0)
    x0 = torch.randn(T, H, device=dev, dtype=DTYPE)
    block = our_block(H, I, E, k, shared, ng, tg, "grouped_mm")
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    state = block.state_dict()

    # transformers: same weights (the parameter names coincide)
    for impl in ["grouped_mm", "eager"]:
        if impl == "eager" and name == "v3":
            emit(part="layer", shape=name, impl="hf eager", skipped="about 6 s per forward+backward at v3")
            continue
        try:
            layer = hf_layer(H, I, E, k, shared, ng, tg, impl)
            missing = layer.load_state_dict(state, strict=False)
            x = x0.clone().view(1, T, H).requires_grad_(True)
            small_eager = impl == "eager"
            res = timings(layer, x, fwd_flops, *((1, 3, 1, 3) if small_eager else (3, 10, 2, 6)),
                          backward=not small_eager or name == "small")
            emit(part="layer", shape=name, impl=f"hf {impl}", tokens=T, **res,
                 state_mismatch=len(missing.missing_keys) + len(missing.unexpected_keys))
            if impl == "grouped_mm":
                layer.zero_grad(set_to_none=True)
                emit(part="layer", shape=name, impl=f"hf {impl} [fresh .grad]", tokens=T,
                     **timings(layer, x, fwd_flops, fresh=True))
            if "profile" in args.parts and impl == "grouped_mm" and dev == "cuda":
                emit(part="host", shape=name, impl=f"hf {impl}", **host_and_device_ms(layer, x))
            del layer, x
        except Exception as error:
            traceback.print_exc()
            emit(part="layer", shape=name, impl=f"hf {impl}", error=f"{type(error).__name__}: {str(error)[:300]}")
        free()

    # ours: grouped_mm then fused, same weights, same input; fused checked against grouped_mm
    x = x0.clone().view(1, T, H).requires_grad_(True)
    grad = torch.randn(1, T, H, device=dev, dtype=DTYPE)
    reference = {}
    for impl in ("grouped_mm", "fused"):
        set_impl(block, impl)
        label = f"ours {impl}"
        try:
            block.zero_grad(set_to_none=True)
            x.grad = None
            out = block(x)[0]
            out.backward(grad)
            grads = {"x": x.grad, "gate_up_proj": block.experts.gate_up_proj.grad,
                     "down_proj": block.experts.down_proj.grad, "router": block.gate.weight.grad}
            if impl == "grouped_mm":
                reference = dict(out=out.detach(), **{n: g.clone() for n, g in grads.items()})
                check = {}
            else:
                check = {f"relerr_{n}": float(f"{rel(g, reference[n]):.3g}") for n, g in grads.items()}
                check["relerr_out"] = float(f"{rel(out.detach(), reference['out']):.3g}")
            del out, grads
            drop_grads(block, x)
            res = timings(block, x, fwd_flops)
            emit(part="layer", shape=name, impl=label, tokens=T, **res, **check)
            drop_grads(block, x)  # each backward into cleared gradients (fused: the library's weight gradients)
            emit(part="layer", shape=name, impl=f"{label} [fresh .grad]", tokens=T,
                 **timings(block, x, fwd_flops, fresh=True))
            if impl == "fused":
                # the same without the gradient-accumulation fusion: how much of the figure above it is
                drop_grads(block, x)
                fm.set_grad_accumulation_fusion(False)
                try:
                    emit(part="layer", shape=name, impl=f"{label} [grad += dW]", tokens=T,
                         **timings(block, x, fwd_flops))
                finally:
                    fm.set_grad_accumulation_fusion(True)
            if "profile" in args.parts and impl == "fused" and dev == "cuda":
                emit(part="host", shape=name, impl=label, **host_and_device_ms(block, x))
                emit(part="profile", shape=name, impl=label, **profile_layer(block, x))
        except Exception as error:
            traceback.print_exc()
            emit(part="layer", shape=name, impl=label, error=f"{type(error).__name__}: {str(error)[:300]}")
        free()
    reference.clear()
    if "breakdown" in args.parts:
        try:
            part_breakdown(name, block, x0)
        except Exception as error:
            traceback.print_exc()
            emit(part="breakdown", shape=name, error=f"{type(error).__name__}: {str(error)[:300]}")
    del block, x, grad, state
    free()

    a = torch.randn(T * k, H, device=dev, dtype=DTYPE)
    w1 = torch.randn(H, 2 * I, device=dev, dtype=DTYPE)
    w2 = torch.randn(I, H, device=dev, dtype=DTYPE)
    t = bench(lambda: (a @ w1)[:, :I] @ w2)
    emit(part="ceiling", shape=name, what="dense GEMM chain, same routed FLOPs", ms=round(t, 3),
         tflops=round(routed_flops / t / 1e9, 1))
    del a, w1, w2
    free()


def part_breakdown(name, block, x0):
    """Each fused kernel alone, with the configs the layer runs (already chosen/tuned by the layer part), and their
    sum."""
    H, I, E, k, shared, ng, tg, T = SHAPES[name]
    N = T * k
    with torch.no_grad():
        _, weights, index = block.gate(x0)
    gate_up, down = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
    x = x0.contiguous()
    w_flat = weights.contiguous().reshape(-1)
    perm, inv, offsets = fm.build_routing(index, E)
    counts = (offsets[1:] - offsets[:-1]).float()
    routing = fm.Routing(perm, inv, offsets, k, H, I, x.dtype)
    h = torch.empty(N, I, dtype=x.dtype, device=dev)
    gu = torch.empty(N, 2 * I, dtype=x.dtype, device=dev)
    y = torch.empty(N, H, dtype=x.dtype, device=dev)
    out = torch.empty(T, H, dtype=x.dtype, device=dev)
    dgu = torch.randn_like(gu)  # the backward GEMMs below run before any dgrad_h has written it
    hw = torch.empty_like(h)  # w * h, written by dgrad_h: wgrad_down's B
    dxs = torch.empty_like(y)
    dgrad_out = torch.randn_like(x)
    dgate_up, ddown = torch.empty_like(gate_up), torch.empty_like(down)
    c1, c2 = routing.config("gemm1", "gemm1"), routing.config("gemm2", "gemm2")
    cx, cwg = routing.config("dgrad_x", "dgrad_x"), routing.config("wgrad_gate_up", "wgrad_gate_up")
    c_dh, c_wd = routing.config("dgrad_h", "dgrad_h"), routing.config("wgrad_down", "wgrad_down")
    dw = torch.empty(fm.dgrad_h_partials(c_dh, I), N, dtype=torch.float32, device=dev)
    gemm = 2 * N * H * I
    steps = {
        "routing": (lambda: fm.build_routing(index, E), 0, None),
        "schedule": (lambda: fm.tile_schedule(offsets, c1.block_m, N, E), 0, None),
        "gemm1_swiglu": (lambda: fm._launch_gemm1(c1, routing, x, gate_up, h, gu), 2 * gemm, c1),
        "gemm2": (lambda: fm._launch_grouped(c2, routing, h, down, y, H, I, fm._down_t(down)), gemm, c2),
        "combine": (lambda: fm._launch_combine(y, inv, w_flat, out, k), 0, None),
        "wgrad_gate_up": (lambda: fm._launch_wgrad(cwg, routing, dgu, x, dgate_up, False, True), 2 * gemm, cwg),
        "dgrad_x": (lambda: fm._launch_grouped(cx, routing, dgu, gate_up, dxs, H, 2 * I, fm._gate_up_n(gate_up)),
                    2 * gemm, cx),
        "combine_dx": (lambda: fm._launch_combine(dxs, inv, None, out, k), 0, None),
    }
    even_rows_steps(name, x, gate_up, down, h, gu, y, c1, c2, gemm)
    if hasattr(torch, "_grouped_mm"):  # before dgrad_h below overwrites dgu
        for step in ("wgrad_gate_up", "dgrad_x"):  # their products, which the library's are compared with
            steps[step][0]()
        grouped_mm_steps(name, routing, x, dgrad_out, gate_up, down, h, dgu, hw, outputs={
            "wgrad_gate_up": dgate_up, "dgrad_x": dxs})
    steps["dgrad_h"] = (lambda: fm._launch_dgrad_h(c_dh, routing, dgrad_out, down, dgu, gu, hw, w_flat, dw), gemm,
                        c_dh)
    steps["wgrad_down"] = (lambda: fm._launch_wgrad(c_wd, routing, dgrad_out, hw, ddown, True, False), gemm, c_wd)
    ms = sum(time_step(name, step, *spec) for step, spec in steps.items())
    emit(part="breakdown", shape=name, step="sum", ms=round(ms, 3),
         rows_per_expert_min_max=[int(counts.min()), int(counts.max())])


def even_rows_steps(name, x, gate_up, down, h, gu, y, c1, c2, gemm):
    """GEMM1 and GEMM2 again with the same number of rows dealt evenly over the experts (token t to experts t k ...
    t k + k - 1, mod E), with the same configs: where experts hold few rows (V3: 198-312 of ~256), the random
    routing's partly filled last row tiles cost what this saves (not timed in the sum)."""
    H, I, E, k, *_ = SHAPES[name]
    tokens = torch.arange(x.shape[0], device=dev)
    index = (tokens[:, None] * k + torch.arange(k, device=dev)) % E
    perm, inv, offsets = fm.build_routing(index, E)
    even = fm.Routing(perm, inv, offsets, k, H, I, x.dtype)
    time_step(name, "gemm1_swiglu [even rows]", lambda: fm._launch_gemm1(c1, even, x, gate_up, h, gu), 2 * gemm, c1)
    time_step(name, "gemm2 [even rows]", lambda: fm._launch_grouped(c2, even, h, down, y, H, I, fm._down_t(down)),
              gemm, c2)


def grouped_mm_steps(name, routing, x, dgrad_out, gate_up, down, h, dgu, hw, outputs):
    """The breakdown's six GEMMs as torch._grouped_mm (CUTLASS) runs them, on operands gathered beforehand (the
    gathers timed as their own steps): which of our kernels a library grouped GEMM would beat; and on an H100/H200
    the weight gradients by our Gluon kernel (wgrad_hopper.py), fresh and added into a gradient. `outputs` holds
    what our kernels wrote for some of them (same operands), compared to check that the same product is timed."""
    H, I, N = routing.hidden, routing.inter, routing.num_rows
    offs = routing.offsets[1:]
    token = fm._sorted_tokens(routing.perm, routing.top_k)
    xs, dys = x.index_select(0, token), dgrad_out.index_select(0, token)
    gemm = 2 * N * H * I
    steps = {  # as the fused backward calls them where it uses the library (dgrad_x, dA, the weight gradients)
        "gather_x": (lambda: x.index_select(0, token), 0),
        "gemm1": (lambda: torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs), 2 * gemm),
        "gemm2": (lambda: torch._grouped_mm(h, down.transpose(1, 2), offs=offs), gemm),
        "wgrad_gate_up": (lambda: fm._grouped_wgrad(dgu, xs, routing.offsets), 2 * gemm),
        "dgrad_x": (lambda: torch._grouped_mm(dgu, gate_up, offs=offs), 2 * gemm),
        "dgrad_h": (lambda: torch._grouped_mm(dys, down, offs=offs), gemm),
        "wgrad_down": (lambda: fm._grouped_wgrad(dys, hw, routing.offsets), gemm),
    }
    steps = {f"torch._grouped_mm {step}": spec for step, spec in steps.items()}
    for step, a, b, grad, flops in (("wgrad_gate_up", dgu, xs, gate_up, 2 * gemm), ("wgrad_down", dys, hw, down, gemm)):
        if hopper_wgrad_applies(a, b):
            into = torch.zeros_like(grad)
            steps[f"gluon {step}"] = (lambda a=a, b=b: wgrad_hopper(a, b, routing.offsets), flops)
            steps[f"gluon {step} += grad"] = (lambda a=a, b=b, into=into: wgrad_hopper(a, b, routing.offsets, into),
                                              flops)
    for step, (fn, flops) in steps.items():
        try:
            ms = do_bench(fn, warmup=10, rep=50, return_mode="median")
            ours = outputs.get(step.split(" ")[-1])
            check = {"relerr_vs_ours": round(rel(fn(), ours), 5)} if ours is not None else {}
            emit(part="breakdown", shape=name, step=step, ms=round(ms, 4),
                 tflops=round(flops / ms / 1e9, 1) if flops else None, **check)
        except Exception as error:  # an older torch without this layout
            emit(part="breakdown", shape=name, step=step, error=f"{type(error).__name__}: {str(error)[:200]}")


def time_step(shape, step, fn, flops, config):
    """Median ms of one kernel launch (emitted with its TF/s and config)."""
    ms = do_bench(fn, warmup=10, rep=50, return_mode="median")
    emit(part="breakdown", shape=shape, step=step, ms=round(ms, 4),
         tflops=round(flops / ms / 1e9, 1) if flops else None, config=str(config) if config else None)
    return ms


def part_decode(name, args):
    H, I, E, k, shared, ng, tg, _ = SHAPES[name]
    block = our_block(H, I, E, k, shared, ng, tg, "grouped_mm")
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    layer = hf_layer(H, I, E, k, shared, ng, tg, "grouped_mm")
    layer.load_state_dict(block.state_dict(), strict=False)
    for tokens in [16, 64, 256]:
        x = torch.randn(1, tokens, H, device=dev, dtype=DTYPE)
        row, replayed = {}, {}
        # hf last: a failed capture is the one most likely to leave the stream unusable
        for label, module, impl in [("ours grouped_mm", block, "grouped_mm"), ("ours fused", block, "fused"),
                                    ("hf grouped_mm", layer, "grouped_mm")]:
            set_impl(module, impl)
            with torch.no_grad():
                row[label] = round(bench(lambda: module(x), 5, 30) * 1000, 1)
                replayed[label] = graph_replay_us(lambda: module(x))
        emit(part="decode", shape=name, tokens=tokens, latency_us=row, replayed_us=replayed,
             fused_vs_grouped=round(row["ours grouped_mm"] / row["ours fused"], 2),
             replayed_fused_vs_grouped=(round(replayed["ours grouped_mm"] / replayed["ours fused"], 2)
                                        if None not in (replayed["ours grouped_mm"], replayed["ours fused"]) else None))
    del block, layer
    free()


def graph_replay_us(fn, warm=3, iters=30):
    """Median us of `fn` replayed from a CUDA graph: the device time a compiled decode step pays, without the eager
    host overhead that dominates `latency_us` at these sizes. None off CUDA or when `fn` cannot be captured (a
    host sync in it); the reason is printed."""
    if dev != "cuda" or DRY:
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the default stream, as torch.cuda.graphs recommends
        for _ in range(warm):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as error:
        print(f"  (not capturable: {type(error).__name__}: {str(error)[:160]})", flush=True)
        torch.cuda.synchronize()
        return None
    return round(bench(graph.replay, 5, iters) * 1000, 1)


def part_model(args):
    shape = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                 num_hidden_layers=12, num_attention_heads=16, n_routed_experts=64, num_experts_per_tok=6,
                 n_shared_experts=2, kv_lora_rank=256, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64)
    batch, seq = 8, 2048
    if DRY:
        shape = dict(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                     num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                     kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
        batch, seq = 2, 8
    config = MoEConfig(**shape, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=None,
                       scoring_func="sigmoid", routed_scaling_factor=2.5, max_position_embeddings=2560,
                       bos_token_id=0, eos_token_id=1)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev):
        model = MoEForCausalLM(config).to(DTYPE)
    for r in model.routers():
        r.weight.data = r.weight.data.float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev == "cuda")
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=dev)
    for impl in ("grouped_mm", "fused"):
        set_impl(model, impl)

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        try:
            t = bench(step, 2, 5)
            emit(part="model", impl=impl, batch=batch, seq=seq, step_ms=round(t, 1),
                 tokens_per_s=round(batch * seq / t * 1e3), peak_gib=peak_gib())
        except Exception as error:
            traceback.print_exc()
            emit(part="model", impl=impl, error=f"{type(error).__name__}: {str(error)[:300]}")
        free()
    del model, optimizer
    free()


def table():
    print("\n=== MoE layer (routed + shared), bf16, TFLOP/s of counted FLOPs (fwd = 2T(k+s)3HI, fwd+bwd = 3x)")
    print(f"{'shape':<8}{'impl':<30}{'fwd ms':>9}{'fwd TF/s':>10}{'f+b ms':>9}{'f+b TF/s':>10}{'peak GiB':>10}  check")
    for r in RECORDS:
        if r["part"] == "layer":
            check = {k: v for k, v in r.items() if k.startswith("relerr")}
            print(f"{r['shape']:<8}{r['impl']:<30}{r.get('fwd_ms', '-'):>9}{r.get('fwd_tflops', '-'):>10}"
                  f"{r.get('fwdbwd_ms', '-'):>9}{r.get('fwdbwd_tflops', '-'):>10}{r.get('peak_gib', '-'):>10}  "
                  f"{check or r.get('error', r.get('skipped', ''))}")
        elif r["part"] == "ceiling":
            print(f"{r['shape']:<8}{'dense ceiling':<30}{r['ms']:>9}{r['tflops']:>10}")
    for r in RECORDS:
        if r["part"] == "breakdown" and "step" in r:
            step = r["step"]
            print(f"breakdown {r['shape']:<8}{step:<32}{r.get('ms', '-'):>9} ms {r.get('tflops') or '':>8} "
                  f"{r.get('config') or r.get('rows_per_expert_min_max') or r.get('error') or ''}")
    for r in RECORDS:
        if r["part"] == "profile" and "wall_ms" in r:
            print(f"profile {r['shape']:<8}{r['impl']}: wall {r['wall_ms']} ms, kernels {r['kernel_ms']} ms per "
                  f"iteration, {r['categories_ms']}, host syncs {len(r.get('host_syncs', []))}")
            for kernel, ms, calls in r["top_kernels_ms"]:
                print(f"profile {r['shape']:<8}  {ms:9.3f} ms {calls:4d}x  {kernel}")
    for r in RECORDS:
        if r["part"] == "host":
            print(f"host {r['shape']:<8}{r['impl']:<30} f+b: synchronised {r['event_ms']} ms, host launch "
                  f"{r['host_ms']} ms, GPU alone {r['device_ms']} ms")
            for function, own_ms, calls, cumulative_ms in r.get("host_hotspots", []):
                print(f"host {r['shape']:<8}  {own_ms:8.3f} ms own {cumulative_ms:8.3f} ms cumulative {calls:4d}x  "
                      f"{function}")
    for r in RECORDS:
        if r["part"] in ("decode", "model"):
            print({k: v for k, v in r.items() if k != "part"} | {"part": r["part"]})
    for r in fm.TUNING_LOG:
        print("tune", r)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="layer,breakdown,decode,model",
                        help="comma-separated parts to run (see above)")
    parser.add_argument("--shapes", default="v2lite,v3,small", help="comma-separated shapes of the layer parts")
    parser.add_argument("--no-autotune", action="store_true",
                        help="time the kernels' default configs (what a user gets without MOE_FUSED_AUTOTUNE=1)")
    parser.add_argument("--tune-decode", action="store_true",
                        help="decode part: time every tile candidate of the decode bucket (logged under 'tuning') and "
                             "use the winner, instead of the bucket's default")
    parser.add_argument("--budget-s", type=float, default=420, help="skip the remaining parts past this")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (with TRITON_INTERPRET=1)")
    args = parser.parse_args()
    args.parts = args.parts.split(",")
    kernels.set_autotune(not args.no_autotune)
    import triton
    emit(part="env", torch=torch.__version__, transformers=transformers.__version__, triton=triton.__version__,
         gpu=torch.cuda.get_device_name() if dev == "cuda" else "cpu (dry run)", date=time.strftime("%Y-%m-%d %H:%M"),
         autotune=not args.no_autotune)
    for name in args.shapes.split(","):
        if "layer" in args.parts and time.time() - T0 < args.budget_s:
            part_layer(name, args)
    kernels.set_autotune(args.tune_decode)  # decode-sized buckets: the defaults unless asked to time the candidates
    for name in args.shapes.split(","):
        if "decode" in args.parts and time.time() - T0 < args.budget_s:
            try:
                part_decode(name, args)
            except Exception as error:
                traceback.print_exc()
                emit(part="decode", shape=name, error=f"{type(error).__name__}: {str(error)[:300]}")
    if "model" in args.parts and time.time() - T0 < args.budget_s:
        part_model(args)
    emit(part="tuning", log=fm.TUNING_LOG, seconds=round(time.time() - T0, 1))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_moe_layer.jsonl"), "w") as f:
            for r in RECORDS:
                f.write(json.dumps(r) + "\n")
    table()


if __name__ == "__main__":
    main()

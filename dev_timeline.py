"""Host timeline of one eager MoE block forward+backward on the GPU (kept busy by a sleep kernel, so launches never
wait): when each wrapped piece starts and ends, in us from the iteration's start, median over iterations."""
import functools, json, os, statistics, sys, time
import torch
sys.path.insert(0, "benchmarks")
import bench_moe_layer as B
import modeling_moe.modeling_moe as mm
from modeling_moe.kernels import fused_moe_ops as fm

EVENTS = []
def wrap(owner, name, label=None):
    fn = getattr(owner, name)
    label = label or name
    @functools.wraps(fn)
    def inner(*a, **k):
        EVENTS.append((label, 0, time.perf_counter_ns()))
        try:
            return fn(*a, **k)
        finally:
            EVENTS.append((label, 1, time.perf_counter_ns()))
    setattr(owner, name, inner)

for name in ["fused_moe", "gate_up_forward_impl", "down_forward_impl", "build_routing", "tile_schedule",
             "_launch_gemm1", "_launch_grouped", "_launch_combine", "down_backward_impl", "gate_up_backward_impl",
             "_launch_swiglu_backward", "_sorted_rows_wgrad", "_check_fused_moe_inputs", "_check_swiglu_experts",
             "_accumulation_target", "_weight_grad", "_wgrad_on_sorted_rows", "_library_gemm"]:
    wrap(fm, name)
wrap(mm, "router_logits_fp32")
wrap(mm, "split_bf16")
wrap(mm, "router_topk")
import modeling_moe.kernels.wgrad_hopper as wh
wrap(fm, "wgrad_hopper")
wrap(wh.TensorDescriptor, "from_tensor", "TensorDescriptor.from_tensor")
wrap(torch, "_grouped_mm")
_k = wh._wgrad_kernel
class _Launch:
    def __getitem__(self, grid):
        launch = _k[grid]
        def inner(*a, **k):
            EVENTS.append(("gluon launch", 0, time.perf_counter_ns()))
            try:
                return launch(*a, **k)
            finally:
                EVENTS.append(("gluon launch", 1, time.perf_counter_ns()))
        return inner
wh._wgrad_kernel = _Launch()
B.dev = "cuda"
out = {}
for shape, (H, I, E, k, shared, ng, tg, T) in [("small", (1024, 512, 64, 6, 2, 1, 1, 16384)),
                                              ("v2lite", (2048, 1408, 64, 6, 2, 1, 1, 16384))]:
    block = B.our_block(H, I, E, k, shared, ng, tg, "fused")
    for mod, nm in [(block.gate, "forward"), (block.shared_experts, "forward"), (block.experts, "forward"),
                    (block.shared_experts.gate_proj, "forward"), (block.shared_experts.down_proj, "forward")]:
        wrap(mod, nm, type(mod).__name__ + ".forward")
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    def step():
        EVENTS.append(("forward", 0, time.perf_counter_ns()))
        y = B.forward(block, x)
        EVENTS.append(("forward", 1, time.perf_counter_ns()))
        EVENTS.append(("backward", 0, time.perf_counter_ns()))
        y.backward(grad)
        EVENTS.append(("backward", 1, time.perf_counter_ns()))
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    runs = []
    for it in range(15):
        EVENTS.clear()
        torch.cuda._sleep(int(60e6))
        t0 = time.perf_counter_ns()
        step()
        runs.append([(n, e, (t - t0) / 1e3) for n, e, t in EVENTS])
        torch.cuda.synchronize()
    # median time of each (occurrence index) event
    table = []
    for i in range(len(runs[0])):
        n, e, _ = runs[0][i]
        table.append((n, "end" if e else "start", round(statistics.median(r[i][2] for r in runs), 1)))
    out[shape] = table
    print(f"== {shape}")
    depth = 0
    for n, e, t in table:
        if e == "end":
            depth -= 1
        print(f"{t:9.1f} {'  ' * depth}{e:5} {n}")
        if e == "start":
            depth += 1
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "timeline.json"), "w"), indent=1)

"""In-process A/B of the eager MoE block (same host, interleaved): A = the custom ops and the router's PyTorch ops
(the code before session 23), B = the eager autograd nodes and the router kernels. Per iteration of forward+backward
(gradients accumulating): host launch ms (GPU kept busy), synchronised ms (CUDA events), GPU-alone ms."""
import json, os, statistics, sys, time
import torch
sys.path.insert(0, "benchmarks")
import bench_moe_layer as B
from modeling_moe.kernels import fused_moe_ops as fm
B.dev = "cuda"
plain = fm._plain_eager
def side(name):
    if name == "A":
        os.environ["MOE_ROUTER_REFERENCE"] = "1"; fm._plain_eager = lambda *t: False
    elif name == "R":  # the router kernels only
        os.environ["MOE_ROUTER_REFERENCE"] = "0"; fm._plain_eager = lambda *t: False
    else:
        os.environ["MOE_ROUTER_REFERENCE"] = "0"; fm._plain_eager = plain
out = []
for shape, (H, I, E, k, shared, ng, tg, T) in [("small", (1024, 512, 64, 6, 2, 1, 1, 16384)),
                                              ("v2lite", (2048, 1408, 64, 6, 2, 1, 1, 16384))]:
    block = B.our_block(H, I, E, k, shared, ng, tg, "fused")
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    step = lambda: B.forward(block, x).backward(grad)
    res = {k: {"host": [], "sync": [], "gpu": []} for k in "ARB"}
    for s in "ARB":
        side(s)
        for _ in range(5): step()
    for rnd in range(10):
        for s in "ARB":
            side(s)
            step(); torch.cuda.synchronize()
            torch.cuda._sleep(int(30e6)); t0 = time.perf_counter(); step()
            res[s]["host"].append((time.perf_counter() - t0) * 1e3); torch.cuda.synchronize()
            for _ in range(3):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(); a.record(); step(); b.record(); torch.cuda.synchronize()
                res[s]["sync"].append(a.elapsed_time(b))
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(); torch.cuda._sleep(int(60e6)); a.record()
            for _ in range(5): step()
            b.record(); torch.cuda.synchronize()
            res[s]["gpu"].append(a.elapsed_time(b) / 5)
    for s in "ARB":
        row = dict(shape=shape, side=s, **{m: round(statistics.median(v), 3) for m, v in res[s].items()})
        out.append(row); print(row, flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "inproc-ab.json"), "w"), indent=1)

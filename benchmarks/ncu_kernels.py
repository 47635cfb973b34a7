"""Hardware counters (Nsight Compute) of the project's Triton kernels, each at the shape where it matters, with the
config the library picks by default.

    python benchmarks/ncu_kernels.py                       # every case under ncu, ~5 minutes on an H200
    python benchmarks/ncu_kernels.py --cases mla128,dgrad_h_small
    python benchmarks/ncu_kernels.py --launch wgrad_gate_up_v3   # what ncu runs: three launches of one case

Cases: `<kernel>_<shape>` for the fused experts (gemm1, dgrad_h, wgrad_gate_up, wgrad_down at the shapes of
bench_moe_layer.py: v2lite, v3, small; random top-k routing; `gluon_wgrad_*`: the weight gradients of an H100 / H200,
`_add` into a gradient), and `mla128` / `mla16`, the MLA decode split kernel at
batch 32 x 8192 cached keys with 128 / 16 heads. ncu profiles the third launch of the case's kernel (the first ones
compile and warm up), clocks left as they are (`--clock-control none`). Per case the full report goes to
`$OUT/ncu-<case>.txt` (benchmarks/out/ when OUT is unset) and the headline figures to the console and
`$OUT/ncu_kernels.md`: duration, SM / L2 / DRAM throughput (% of peak), registers, local-memory spill requests, shared
memory, achieved occupancy, and ncu's largest estimated speedup. Needs the package importable (`pip install -e .`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

CASES = {  # case: the Triton kernel ncu picks out
    "gemm1_v3": "_gemm1_swiglu_kernel",
    "dgrad_h_small": "_grouped_gemm_kernel",  # the default dgrad_h is `split`: its GEMM (then a SwiGLU backward pass)
    "dgrad_h_v2lite": "_grouped_gemm_kernel",
    "wgrad_gate_up_v3": "_grouped_wgrad_kernel",
    "wgrad_down_v3": "_grouped_wgrad_kernel",
    # the weight gradients an H100 / H200 computes (kernels/wgrad_hopper.py, Gluon): fresh, and adding into a gradient
    "gluon_wgrad_gate_up_v3": "^_wgrad_kernel",
    "gluon_wgrad_gate_up_add_v3": "^_wgrad_kernel",
    "gluon_wgrad_down_v3": "^_wgrad_kernel",
    "gluon_wgrad_down_add_v3": "^_wgrad_kernel",
    "gluon_wgrad_gate_up_v2lite": "^_wgrad_kernel",
    "mla128": "mla_decode_split_kernel",
    "mla16": "mla_decode_split_kernel",
}
MOE_SHAPES = {"v2lite": (2048, 1408, 64, 6, 16384), "v3": (7168, 2048, 256, 8, 8192),
              "small": (1024, 512, 64, 6, 16384)}  # hidden, moe_intermediate, experts, top_k, tokens
SECTIONS = ["SpeedOfLight", "MemoryWorkloadAnalysis", "Occupancy", "WarpStateStats", "LaunchStats",
            "ComputeWorkloadAnalysis", "SchedulerStats"]
HEADLINES = {  # column: the ncu line it comes from
    "duration": "Duration", "SM %": r"Compute \(SM\) Throughput", "L2 %": "L2 Cache Throughput",
    "DRAM %": "DRAM Throughput", "registers": "Registers Per Thread", "spill requests": "Local Memory Spilling Requests",
    "shared KB": "Dynamic Shared Memory Per Block", "occupancy %": "Achieved Occupancy",
}


def launch(case: str, repeats: int = 3) -> None:
    """Run the case's kernel `repeats` times, as the library launches it."""
    import torch

    from modeling_moe.kernels import fused_moe_ops as fm
    from modeling_moe.kernels import mla_decode
    from modeling_moe.kernels.wgrad_hopper import wgrad_hopper

    dev, dtype = "cuda", torch.bfloat16
    torch.manual_seed(0)
    if case.startswith("mla"):
        heads, batch, keys, rank, rope = (128 if case == "mla128" else 16), 32, 8192, 512, 64
        q_latent = torch.randn(batch, heads, 1, rank, device=dev, dtype=dtype)
        q_rope = torch.randn(batch, heads, 1, rope, device=dev, dtype=dtype)
        latent = torch.randn(batch, keys, rank, device=dev, dtype=dtype)
        k_rope = torch.randn(batch, keys, rope, device=dev, dtype=dtype)
        mask = torch.ones(batch, keys, dtype=torch.bool, device=dev)
        for _ in range(repeats):
            mla_decode.mla_decode_triton(q_latent, q_rope, latent, k_rope, (rank + rope) ** -0.5, key_mask=mask)
        torch.cuda.synchronize()
        return
    kernel, shape = case.rsplit("_", 1)
    hidden, inter, experts, top_k, tokens = MOE_SHAPES[shape]
    rows = tokens * top_k
    x = torch.randn(tokens, hidden, device=dev, dtype=dtype)
    grad_out = torch.randn(tokens, hidden, device=dev, dtype=dtype)
    index = torch.rand(tokens, experts, device=dev).topk(top_k, dim=1).indices
    weights = torch.rand(rows, device=dev)
    gate_up = torch.randn(experts, 2 * inter, hidden, device=dev, dtype=dtype) * 0.02
    down = torch.randn(experts, hidden, inter, device=dev, dtype=dtype) * 0.02
    gu = torch.randn(rows, 2 * inter, device=dev, dtype=dtype)
    h = torch.randn(rows, inter, device=dev, dtype=dtype)
    routing = fm.Routing(*fm.build_routing(index, experts), top_k, hidden, inter, dtype)
    for _ in range(repeats):
        if kernel == "gemm1":
            fm._launch_gemm1(routing.config("gemm1", "gemm1"), routing, x, gate_up, torch.empty_like(h),
                             torch.empty_like(gu))
        elif kernel == "dgrad_h":
            config = routing.config("dgrad_h", "dgrad_h")
            partial = torch.empty(fm.dgrad_h_partials(config, inter), rows, dtype=torch.float32, device=dev)
            fm._launch_dgrad_h(config, routing, grad_out, down, torch.empty_like(gu), gu, h, weights, partial)
        elif kernel == "wgrad_gate_up":
            fm._launch_wgrad(routing.config("wgrad_gate_up", "wgrad_gate_up"), routing, gu, x,
                             torch.empty_like(gate_up), False, True)
        elif kernel == "wgrad_down":
            fm._launch_wgrad(routing.config("wgrad_down", "wgrad_down"), routing, grad_out, h,
                             torch.empty_like(down), True, False)
        elif kernel.startswith("gluon_wgrad"):  # over rows gathered in expert order, as the fused backward runs it
            token = fm._sorted_tokens(routing.perm, top_k)
            gate_up_grad = kernel.startswith("gluon_wgrad_gate_up")
            a, b = (gu, x.index_select(0, token)) if gate_up_grad else (grad_out.index_select(0, token), h)
            into = torch.zeros_like(gate_up if gate_up_grad else down) if kernel.endswith("_add") else None
            wgrad_hopper(a, b, routing.offsets, into)
        else:
            raise ValueError(f"unknown case {case!r}; choose from {', '.join(CASES)}")
    torch.cuda.synchronize()


def headlines(report: str) -> dict:
    """The headline figures of one ncu report, plus its largest estimated speedup."""
    found = {}
    for column, label in HEADLINES.items():
        match = re.search(rf"^\s*{label}\s+(\S+)?\s+([\d,.]+)\s*$", report, re.M)
        if match:
            unit = match.group(1) if column == "duration" else ""
            found[column] = match.group(2) + (f" {unit}" if unit else "")
    speedups = [float(s) for s in re.findall(r"Est\. (?:Local )?Speedup: ([\d.]+)%", report)]
    found["best est. speedup %"] = max(speedups) if speedups else None
    return found


def find_ncu() -> str:
    found = shutil.which("ncu") or next(iter(sorted(Path("/opt/nvidia").glob("nsight-compute/*/ncu"))), None)
    if not found:
        raise SystemExit("ncu (Nsight Compute) not found on PATH nor under /opt/nvidia/nsight-compute")
    return str(found)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--launch", metavar="CASE", help="only launch CASE's kernel three times (what ncu profiles)")
    parser.add_argument("--timeout", type=int, default=150, help="seconds per case under ncu")
    args = parser.parse_args()
    if args.launch:
        launch(args.launch)
        return
    cases = args.cases.split(",")
    unknown = [case for case in cases if case not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    ncu = find_ncu()
    out_dir = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    this = [sys.executable, str(Path(__file__).resolve())]
    rows = []
    for case in cases:
        subprocess.run(this + ["--launch", case], check=True)  # compile outside the profiler
        command = [ncu, "--clock-control", "none", "--kernel-name", f"regex:{CASES[case]}", "--launch-skip", "2",
                   "--launch-count", "1", *[arg for s in SECTIONS for arg in ("--section", s)],
                   *this, "--launch", case]
        result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        report = result.stdout + result.stderr
        (out_dir / f"ncu-{case}.txt").write_text(report)
        rows.append((case, headlines(report) if result.returncode == 0 else {"error": f"rc {result.returncode}"}))
        print(case, rows[-1][1], flush=True)
    columns = list(HEADLINES) + ["best est. speedup %"]
    table = ["| case | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    table += [f"| {case} | " + " | ".join(str(found.get(c, found.get("error", ""))) for c in columns) + " |"
              for case, found in rows]
    (out_dir / "ncu_kernels.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()

"""Lean Triton launches (kernels/launch.py) against Triton's own path, in one process, interleaved (A: every launch
through JITFunction.run; B: the compiled kernels' launchers), medians over rounds; transformers' grouped_mm layer in
the same rounds. Host-bound figures move between processes by more than this change, hence one process.

  python benchmarks/ab_lean_launch.py            # about 2 min on an H200

Prints JSON lines (and appends them to $OUT/ab_lean_launch.jsonl when OUT is set):
  launch   one launch's host time (the combine kernel), us
  layer    small and V2-Lite forward+backward (gradients accumulating), forward, and the host's time of a
           forward+backward, ms
  decode   forward latency of 16, 64 and 256 tokens at the three shapes, us
"""
import argparse
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import torch

spec = importlib.util.spec_from_file_location("bench_moe_layer", Path(__file__).with_name("bench_moe_layer.py"))
bml = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bml)

from modeling_moe.kernels import fused_moe_ops as fm  # noqa: E402
from modeling_moe.kernels import launch as lean  # noqa: E402

SIDES = ("A", "B", "hf")


def emit(**record):
    print(json.dumps(record), flush=True)
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "ab_lean_launch.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def host_ms(fn, iterations=20):
    times = []
    for _ in range(iterations):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def layers(shape):
    H, I, E, k, shared, ng, tg, T = bml.SHAPES[shape]
    torch.manual_seed(0)
    block = bml.our_block(H, I, E, k, shared, ng, tg, "fused")
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    hf = bml.hf_layer(H, I, E, k, shared, ng, tg, "grouped_mm")
    hf.load_state_dict(block.state_dict(), strict=False)
    return block, hf, H, T


def rounds(measures: dict, count: int) -> dict:
    """{side: {figure: median}}: `measures[figure](side)` for each side, in alternating order each round."""
    results = {side: {figure: [] for figure in measures} for side in SIDES}
    for r in range(count):
        for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
            lean.set_lean_launch(side != "A")
            for figure, measure in measures.items():
                results[side][figure].append(measure(side))
    lean.set_lean_launch(True)
    return {side: {figure: round(statistics.median(values), 3) for figure, values in figures.items()}
            for side, figures in results.items()}


def part_launch():
    y = torch.randn(96, 2048, device="cuda", dtype=torch.bfloat16)
    inv = torch.randperm(96, device="cuda", dtype=torch.int32)
    w, out = torch.rand(16, 6, device="cuda"), torch.empty(16, 2048, device="cuda", dtype=torch.bfloat16)
    for lean_launch in (False, True, False, True):
        lean.set_lean_launch(lean_launch)
        fm._launch_combine(y, inv, w, out, 6)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(2000):
            fm._launch_combine(y, inv, w, out, 6)
        emit(part="launch", lean=lean_launch, host_us=round((time.perf_counter() - start) / 2000 * 1e6, 2))
        torch.cuda.synchronize()
    lean.set_lean_launch(True)


def part_layer(shape):
    block, hf, H, T = layers(shape)
    x = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def layer(side):
        return hf if side == "hf" else block

    def forward_ms(side):
        with torch.no_grad():
            return bml.bench(lambda: bml.forward(layer(side), x), 2, 10)

    medians = rounds({"fwdbwd_ms": lambda side: bml.bench(lambda: bml.forward_backward(layer(side), x), 2, 8),
                      "fwd_ms": forward_ms,
                      "host_fwdbwd_ms": lambda side: host_ms(lambda: bml.forward_backward(layer(side), x))}, 8)
    emit(part="layer", shape=shape, **medians)


def part_decode(shape):
    block, hf, H, _ = layers(shape)
    for tokens in (16, 64, 256):
        x = torch.randn(1, tokens, H, device="cuda", dtype=torch.bfloat16)

        def latency_us(side):
            with torch.no_grad():
                return bml.bench(lambda: bml.forward(hf if side == "hf" else block, x), 5, 30) * 1000

        emit(part="decode", shape=shape, tokens=tokens, **rounds({"latency_us": latency_us}, 6))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="launch,layer,decode", help="comma-separated: launch, layer, decode")
    parts = parser.parse_args().parts.split(",")
    if "launch" in parts:
        part_launch()
    for shape in ("small", "v2lite"):
        if "layer" in parts:
            part_layer(shape)
    for shape in ("small", "v2lite", "v3"):
        if "decode" in parts:
            part_decode(shape)


if __name__ == "__main__":
    main()

"""AdamW's step over the anchors' 1.26B model (bf16 weights, gradients and states): `TritonAdamW` (kernels/adamw.py,
what `pretrain` steps with on CUDA) against torch's fused AdamW (what the anchors' script uses), in one run.

    python benchmarks/bench_adamw.py [--dry-run]

Per optimizer: the step's GPU time (`triton.testing.do_bench` median), the bytes it moves per second (7 bytes a
parameter byte: weight, gradient and both moments read, weight and moments written) and the host's time to launch a
step; the ceiling is a copy of the same bytes. Weights of the model's real parameter shapes, random gradients; the
fp32 routers are left out (a group of their own in a real run). Prints a table; writes $OUT/bench_adamw.jsonl when
OUT is set. --dry-run: a few small tensors on the CPU through the Triton interpreter (checks the script, times
nothing meaningful).
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's modeling_moe

RECORDS = []


def emit(**record):
    RECORDS.append(record)
    print(json.dumps(record), flush=True)


def model_shapes() -> list[torch.Size]:
    """The bf16 parameter shapes of bench_model.py's 1.26B model (the anchors' `small_model`)."""
    from bench_model import MODEL, configs, meta_model

    _, config = configs(MODEL, max_positions=2560)
    return [p.shape for p in meta_model(config, torch.bfloat16).parameters() if p.dtype == torch.bfloat16]


def median_ms(fn, dev) -> float:
    if dev == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=100, return_mode="median")
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def host_ms(fn, dev, steps: int = 20) -> float:
    """Host time of one call, launches only: the GPU's queue absorbs them (synchronised around the loop)."""
    if dev == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    seconds = (time.perf_counter() - start) / steps
    if dev == "cuda":
        torch.cuda.synchronize()
    return seconds * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="small tensors on the CPU (TRITON_INTERPRET=1)")
    args = parser.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels' module is imported (Triton reads it then)
        dev, shapes = "cpu", [torch.Size([37]), torch.Size([3, 100]), torch.Size([64, 65])]
    else:
        dev, shapes = "cuda", model_shapes()
    from modeling_moe.kernels.adamw import TritonAdamW
    import transformers
    import triton

    emit(part="env", torch=torch.__version__, transformers=transformers.__version__, triton=triton.__version__,
         gpu=torch.cuda.get_device_name() if dev == "cuda" else "cpu (dry run)", date=time.strftime("%Y-%m-%d %H:%M"),
         tensors=len(shapes), parameters=sum(s.numel() for s in shapes))
    generator = torch.Generator(device=dev).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=dev, generator=generator).mul_(0.02).bfloat16())
              for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=dev, generator=generator).mul_(1e-3).bfloat16()
    moved = 7 * sum(p.numel() * p.element_size() for p in params)
    optimizers = {"TritonAdamW": TritonAdamW(params, lr=1e-5, weight_decay=0.1)}
    if dev == "cuda":
        optimizers["torch AdamW (fused)"] = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, fused=True)
    for name, optimizer in optimizers.items():
        optimizer.step()  # states allocated, kernels compiled
        ms = median_ms(optimizer.step, dev)
        emit(part="step", optimizer=name, ms=round(ms, 3), tb_per_s=round(moved / ms / 1e9, 2),
             host_ms=round(host_ms(optimizer.step, dev, steps=20 if dev == "cuda" else 1), 3))
        optimizer.state.clear()  # each optimizer its own states' memory
    flat = torch.empty(moved // 4, device=dev, dtype=torch.bfloat16)
    copy = torch.empty_like(flat)
    ms = median_ms(lambda: copy.copy_(flat), dev)  # reads and writes moved / 2 bytes each
    emit(part="ceiling", what="copy of the same bytes", ms=round(ms, 3), tb_per_s=round(moved / ms / 1e9, 2))
    print(f"\n=== AdamW step, {len(shapes)} bf16 tensors, {sum(s.numel() for s in shapes) / 1e9:.3f}B parameters, "
          f"{moved / 1e9:.1f} GB moved")
    for r in RECORDS[1:]:
        print(f"{r.get('optimizer', r.get('what')):<28}{r['ms']:>9} ms{r['tb_per_s']:>8} TB/s"
              + (f"  host {r['host_ms']} ms" if "host_ms" in r else ""))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_adamw.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in RECORDS)


if __name__ == "__main__":
    main()

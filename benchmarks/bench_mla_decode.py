"""The MLA decode kernel alone (kernels/mla_decode.py): tile-config sweep, effective cache bandwidth, accuracy.

    python benchmarks/bench_mla_decode.py [--shapes v2lite,v3,small16,small64] [--quick]

For each shape (bf16 latent cache, one new token per sequence, every sequence filled to the cache length, with the
[B, 1, T] key mask the model's attention passes, unless --no-mask):
  * the PyTorch absorbed path (`mla_decode_reference`, what runs without Triton), the Triton kernel with the
    launcher's default config, the launcher's default (on an H100 / H200 at >= 64 heads: the Gluon split kernel of
    kernels/mla_decode_hopper.py), then a sweep of the Triton kernel's (block_h, block_n, num_warps, num_stages,
    value_blocks: the output columns shared among programs, tried at >= 64 heads) at the default split count, then
    of the split count for the best tile config;
  * time: triton.testing.do_bench (CUDA events, L2 flushed between calls), median ms;
  * figure: effective latent-cache bandwidth = (kv_lora_rank + rope) x 2 B x batch x cache length / time; the H200's
    HBM moves ~4.3 TB/s, so the issue's target (0.15 ms at v2lite) is ~2 TB/s;
  * accuracy: max relative error of the default and the best config against a float64 reference;
  * last, the host's time for one call with next to no GPU work, per split backend (`host_microseconds`).
A failed config (e.g. shared memory) is recorded, not fatal. JSON lines to $OUT/bench_mla_decode.jsonl (or
benchmarks/out/), a table last. The anchor for the whole decode step (transformers' DeepseekV3 attention layer,
same run) is `bench_model.py --parts decode`; this script is for tuning the kernel's defaults.
"""
import argparse
import functools
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's modeling_moe
from modeling_moe.kernels import mla_decode, offline_compile  # noqa: E402

# (batch, heads, cache length, kv_lora_rank, rope): the two decode shapes, and the generate regime of the
# anchors' 1.26B model (16 heads, rank 256) at batch 16 and 64 with a ~512-token cache.
SHAPES = {
    "v2lite": (32, 16, 8192, 512, 64),
    "v3": (32, 128, 8192, 512, 64),
    "small16": (16, 16, 512, 256, 64),
    "small64": (64, 16, 512, 256, 64),
}


def sweep_space(heads: int, quick: bool):
    block_hs = [h for h in (16, 32, 64) if h <= max(16, heads)]
    space = itertools.product(block_hs, (32, 64), (4, 8), (2, 3, 4), (1,))
    if quick:
        space = itertools.product(block_hs[:2], (32, 64), (4, 8), (2,), (1,))
    configs = list(space)
    if heads >= 64:  # many heads: the output columns split over 2-4 programs (a smaller accumulator), 128-row tiles
        configs += itertools.product((64, 128), (32, 64), (4, 8), (2,), (2, 4))
        # 16 warps: the [64, 512] fp32 accumulator over four warpgroups (64 registers a thread instead of 128)
        configs += itertools.product((64,), (32, 64), (16,), (2, 3), (1,))
    return [dict(block_h=h, block_n=n, num_warps=w, num_stages=s, value_blocks=v) for h, n, w, s, v in configs]


CONFIG_KEYS = ("block_h", "block_n", "num_warps", "num_stages", "value_blocks")


class LaunchRecorder:
    """Wraps the split kernel so that each launch's compiled kernel is kept: its registers per thread, register
    spills and shared memory say why a tile config is slow (a launch returns the CompiledKernel it ran)."""

    def __init__(self, kernel):
        self.kernel, self.last = kernel, None

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.last = launch(*args, **kwargs)
            return self.last

        return run

    def warmup(self, *args, **kwargs):  # the launcher compiles a variant to learn its occupancy
        return self.kernel.warmup(*args, **kwargs)

    def resources(self) -> dict:
        compiled = self.last
        if compiled is None or not hasattr(compiled, "n_regs"):
            return {}
        return dict(regs=compiled.n_regs, spills=compiled.n_spills, shared_KB=round(compiled.metadata.shared / 1024, 1))


RECORDER: "LaunchRecorder | None" = None  # set in main()


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.double() - reference).abs().max() / reference.abs().max()).item()


def bench_shape(name, shape, args, records):
    from triton.testing import do_bench

    batch, heads, cache_len, rank, rope = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    randn = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
    q_latent, q_rope = randn(batch, heads, 1, rank), randn(batch, heads, 1, rope)
    latent, k_rope = randn(batch, cache_len, rank), randn(batch, cache_len, rope)
    scale = 1 / (192 ** 0.5)
    # what the model passes (one query token: its 4D mask becomes a [B, 1, T] key mask), unless --no-mask
    key_mask = None if args.no_mask else torch.ones(batch, 1, cache_len, dtype=torch.bool, device="cuda")
    mla = functools.partial(mla_decode.mla_decode_triton, q_latent, q_rope, latent, k_rope, scale, key_mask=key_mask)
    cache_bytes = (latent.numel() + k_rope.numel()) * 2
    reference = mla_decode.mla_decode_reference(q_latent.double(), q_rope.double(), latent.double(),
                                                k_rope.double(), scale)

    def record(variant, fn, **info):
        try:
            out = fn()
            resources = RECORDER.resources() if variant.startswith("triton") else {}  # the Triton kernel's
            ms = do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms)
            rec = dict(shape=name, variant=variant, **info, **resources, ms=round(ms, 4),
                       cache_GB_per_s=round(cache_bytes / ms / 1e6, 1), rel_err=float(f"{relative_error(out, reference):.2g}"))
        except Exception as error:  # out of shared memory, register spills the compiler refuses, ...
            rec = dict(shape=name, variant=variant, **info, error=f"{type(error).__name__}: {str(error)[:160]}")
        records.append(rec)
        print(json.dumps(rec), flush=True)
        return rec

    record("pytorch", lambda: mla_decode.mla_decode_reference(q_latent, q_rope, latent, k_rope, scale))
    mla_decode.set_split_backend("triton")
    try:
        default = record("triton default", mla)
    finally:
        mla_decode.set_split_backend(None)
    record("default (auto)", mla)  # sm_90 at >= 64 heads: the Gluon split kernel (kernels/mla_decode_hopper.py)
    tiles = [record("triton", lambda c=c: mla(**c), **c) for c in sweep_space(heads, args.quick)]
    timed = [r for r in tiles if "ms" in r]
    if not timed:
        return
    best = min(timed, key=lambda r: r["ms"])
    config = {k: best[k] for k in CONFIG_KEYS}
    head_blocks = -(-heads // config["block_h"])
    tile_config = mla_decode.DecodeConfig(block_s=1, **config)
    mla(**config)  # its compiled kernel, recorded
    resident = offline_compile.programs_per_sm(RECORDER.last, config["num_warps"], latent.device)
    base = mla_decode.default_num_splits(batch, head_blocks, cache_len, tile_config, resident, latent.device)
    for splits in sorted({max(1, base // 2), base * 2, base * 4, 1, 16, 32}):
        record("triton splits", lambda s=splits: mla(num_splits=s, **config), num_splits=splits, **config)
    overall = min((r for r in records if r["shape"] == name and "ms" in r), key=lambda r: r["ms"])
    print(f"== {name}: default {default.get('ms')} ms, best {overall['ms']} ms "
          f"({overall['cache_GB_per_s']} GB/s) with {overall}", flush=True)


def host_microseconds(backend: str, calls: int = 200) -> float:
    """The host's time for one `mla_decode_triton` call (launcher and launches), what a decode step pays outside a
    CUDA graph: a call with next to no GPU work (one sequence of 64 keys, 64 heads, the model's key mask), timed over
    back-to-back calls with one synchronization at the end."""
    randn = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    inputs = (randn(1, 64, 1, 512), randn(1, 64, 1, 64), randn(1, 64, 512), randn(1, 64, 64))
    key_mask = torch.ones(1, 1, 64, dtype=torch.bool, device="cuda")
    mla_decode.set_split_backend(backend)
    try:
        for _ in range(10):
            mla_decode.mla_decode_triton(*inputs, 0.1, key_mask=key_mask)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            mla_decode.mla_decode_triton(*inputs, 0.1, key_mask=key_mask)
        torch.cuda.synchronize()
    finally:
        mla_decode.set_split_backend(None)
    return round((time.perf_counter() - start) / calls * 1e6, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {list(SHAPES)}")
    parser.add_argument("--no-mask", action="store_true", help="no key mask (the model always passes one)")
    parser.add_argument("--quick", action="store_true", help="a smaller sweep (one stage count, two head blocks)")
    parser.add_argument("--warmup-ms", type=float, default=10, help="do_bench warmup per config")
    parser.add_argument("--rep-ms", type=float, default=50, help="do_bench measuring time per config")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the kernel's CPU path is the Triton interpreter: see tests/test_mla_decode.py)")
    import triton

    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               args=vars(args), date=time.strftime("%Y-%m-%d"))
    print(json.dumps(env), flush=True)
    global RECORDER
    split_kernel, merge_kernel = mla_decode._kernels()
    RECORDER = LaunchRecorder(split_kernel)
    mla_decode._KERNELS[mla_decode.interpreting()] = (RECORDER, merge_kernel)
    records = []
    for name in args.shapes.split(","):
        bench_shape(name, SHAPES[name], args, records)
    for backend in mla_decode.SPLIT_BACKENDS:
        record = dict(shape="host", variant=f"split backend {backend}", host_us=host_microseconds(backend))
        print(json.dumps(record), flush=True)
        records.append(record)
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench_mla_decode.jsonl"), "w") as f:
        for rec in [env] + records:
            f.write(json.dumps(rec) + "\n")
    print("\nshape    variant          config                                                   ms      GB/s   rel err")
    for r in records:
        config = " ".join(f"{k}={r[k]}" for k in (*CONFIG_KEYS, "num_splits", "regs", "spills") if k in r)
        figures = (f"{r['ms']:>8} {r['cache_GB_per_s']:>8} {r['rel_err']:>8}" if "ms" in r
                   else f"host {r['host_us']} us a call" if "host_us" in r else r["error"][:60])
        print(f"{r['shape']:<9}{r['variant']:<17}{config:<57}{figures}")


if __name__ == "__main__":
    main()

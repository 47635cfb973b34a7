"""Registers, spills and shared memory of every Triton kernel config this project may pick, compiled for an
H100 / H200 (sm_90) on any machine, no GPU needed (`kernels/offline_compile.py`).

    python benchmarks/kernel_resources.py                  # both parts, all shapes (a few minutes on 2 CPU cores)
    python benchmarks/kernel_resources.py --parts mla --shapes v3

Parts:
  fused  the fused MoE experts' kernels (gemm1, gemm2, dgrad_h, dgrad_x, wgrad_gate_up, wgrad_down) at the shapes of
         bench_moe_layer.py (v2lite, v3, small), every candidate of the tuning bucket a training step of that shape
         falls in (first = the default), and for gemm1 / gemm2 also the generate step's "decode" bucket, as the
         launchers call them (the real dtypes, strides and sizes; a few tokens and experts stand in for the many,
         which changes no specialisation); for the weight gradients also the Gluon kernel an H100 / H200 runs in
         bf16 (kernels/wgrad_hopper.py), fresh and adding into a gradient
  mla    the MLA decode split kernel at 16 heads (V2-Lite) and 128 heads (V3), r 512 + rope 64, with the key mask the
         model passes, for the default tile and the candidates of bench_mla_decode.py's sweep; at 128 heads also the
         Gluon kernel an H100 / H200 runs there (kernels/mla_decode_hopper.py)

Per config: registers per thread, spill stack bytes per thread (0 = no spills), shared memory per program, the
programs an SM holds (H100 / H200 limits), whether the weights come by TMA. Prints a table and writes it to
$OUT/kernel_resources.md, with JSON lines in $OUT/kernel_resources.jsonl (benchmarks/out/ when OUT is unset).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout first
import modeling_moe  # noqa: E402, F401  (registers the package; kernels/ is modeling_moe.kernels)
from modeling_moe.kernels import fused_moe_ops as fm  # noqa: E402
from modeling_moe.kernels import mla_decode, mla_decode_hopper, wgrad_hopper  # noqa: E402
from modeling_moe.kernels.offline_compile import compile_only, resource_usage  # noqa: E402

FUSED_SHAPES = {  # name: hidden, moe_intermediate, top_k, rows per expert in a training step (bench_moe_layer.py)
    "v2lite": (2048, 1408, 6, 1536),
    "v3": (7168, 2048, 8, 256),
    "small": (1024, 512, 6, 1536),
}
FAMILIES = {  # kernel: (candidate family, Triton kernel name)
    "gemm1": ("gemm1", "_gemm1_swiglu_kernel"),
    "gemm2": ("gemm2", "_grouped_gemm_kernel"),
    "dgrad_h": ("dgrad_h", "_dgrad_h_kernel"),
    "dgrad_x": ("dgrad_x", "_grouped_gemm_kernel"),
    "wgrad_gate_up": ("wgrad_gate_up", "_grouped_wgrad_kernel"),
    "wgrad_down": ("wgrad_down", "_grouped_wgrad_kernel"),
    # adding into an existing .grad (gradient accumulation; the layer benchmark's timing loop)
    "wgrad_gate_up+": ("wgrad_gate_up", "_grouped_wgrad_kernel"),
    "wgrad_down+": ("wgrad_down", "_grouped_wgrad_kernel"),
}
MLA_SHAPES = {"v2lite": 16, "v3": 128}  # heads
MLA_CANDIDATES = [(16, 32, 4, 3), (16, 64, 4, 2), (32, 32, 4, 2), (64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2),
                  (128, 32, 8, 2), (64, 32, 16, 3), (64, 64, 16, 2)]  # block_h, block_n, num_warps, num_stages


def compile_fused_kernel(kernel: str, config, hidden: int, inter: int, top_k: int, experts: int = 4,
                         tokens: int = 8):
    """The compiled Triton kernel behind `kernel` (a FAMILIES key) with `config`, as the launcher builds it for bf16
    operands of these sizes (compile only; call inside `compile_only()`)."""
    bf16 = dict(dtype=torch.bfloat16)
    rows = tokens * top_k
    perm = torch.arange(rows, dtype=torch.int32)
    offsets = torch.linspace(0, rows, experts + 1).to(torch.int32)
    routing = fm.Routing(perm, perm.clone(), offsets, top_k, hidden, inter, torch.bfloat16)
    x, grad_out = torch.empty(tokens, hidden, **bf16), torch.empty(tokens, hidden, **bf16)
    gate_up, down = torch.empty(experts, 2 * inter, hidden, **bf16), torch.empty(experts, hidden, inter, **bf16)
    h, gu = torch.empty(rows, inter, **bf16), torch.empty(rows, 2 * inter, **bf16)
    weights = torch.empty(rows, dtype=torch.float32)
    with compile_only() as compiled:
        if kernel == "gemm1":
            fm._launch_gemm1(config, routing, x, gate_up, h, gu)
        elif kernel == "gemm2":
            fm._launch_grouped(config, routing, h, down, torch.empty(rows, hidden, **bf16), hidden, inter,
                               fm._down_t(down))
        elif kernel == "dgrad_x":
            fm._launch_grouped(config, routing, gu, gate_up, torch.empty(rows, hidden, **bf16), hidden, 2 * inter,
                               fm._gate_up_n(gate_up))
        elif kernel == "dgrad_h":
            dw = torch.empty(fm.dgrad_h_partials(config, inter), rows, dtype=torch.float32)
            fm._launch_dgrad_h(config, routing, grad_out, down, torch.empty_like(gu), gu, h, weights, dw)
        elif kernel.startswith("wgrad_gate_up"):
            fm._launch_wgrad(config, routing, gu, x, torch.empty_like(gate_up), False, True,
                             accumulate=kernel.endswith("+"))
        elif kernel.startswith("wgrad_down"):
            fm._launch_wgrad(config, routing, grad_out, h, torch.empty_like(down), True, False,
                             accumulate=kernel.endswith("+"))
        else:
            raise ValueError(f"unknown kernel {kernel!r}; choose from {', '.join(FAMILIES)}")
    name = "_grouped_gemm_kernel" if config.split else FAMILIES[kernel][1]  # a split dgrad_h: its GEMM
    return next(k for k in reversed(compiled) if k.name == name)


def compile_mla_split_kernel(heads: int, block_h: int, block_n: int, num_warps: int, num_stages: int,
                             batch: int = 2, keys: int = 256, rank: int = 512, rope: int = 64):
    """The compiled MLA decode split kernel for one query token with the model's [B, T] key mask (compile only): the
    launch of the sequences whose mask has no holes, what decoding runs."""
    q_latent = torch.empty(batch, heads, 1, rank, dtype=torch.bfloat16)
    q_rope = torch.empty(batch, heads, 1, rope, dtype=torch.bfloat16)
    latent = torch.empty(batch, keys, rank, dtype=torch.bfloat16)
    k_rope = torch.empty(batch, keys, rope, dtype=torch.bfloat16)
    mask = torch.ones(batch, keys, dtype=torch.bool)
    with compile_only() as compiled:
        mla_decode.mla_decode_triton(q_latent, q_rope, latent, k_rope, rank ** -0.5, key_mask=mask, num_splits=2,
                                     block_h=block_h, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
    return next(k for k in compiled if k.name == "mla_decode_split_kernel")


def compile_mla_hopper_kernel(heads: int, splits: int = 2, skip_holes: bool = True, batch: int = 2, keys: int = 256):
    """The compiled Gluon split kernel (kernels/mla_decode_hopper.py; compile only), launched as mla_decode_triton
    launches it on an H100 / H200: one query token, rank 512 + rope 64, `splits` splits (1: the output written
    directly), `skip_holes`: the launch that leaves sequences with holes in their key window to the Triton kernel."""
    q_latent = torch.empty(batch, heads, 1, 512, dtype=torch.bfloat16)
    q_rope = torch.empty(batch, heads, 1, 64, dtype=torch.bfloat16)
    latent = torch.empty(batch, keys, 512, dtype=torch.bfloat16)
    k_rope = torch.empty(batch, keys, 64, dtype=torch.bfloat16)
    partial, lse = torch.empty(batch, heads, 1, splits, 512), torch.empty(batch, heads, 1, splits)
    lengths = torch.full((batch,), keys, dtype=torch.int32)
    starts, holes = torch.zeros(batch, dtype=torch.int32), torch.zeros(batch, dtype=torch.int32)
    with compile_only() as compiled:
        mla_decode_hopper.mla_decode_hopper_split(q_latent, q_rope, latent, k_rope, partial, lse, lengths, starts,
                                                  holes, 512 ** -0.5, splits, skip_holes)
    return compiled[0]


def compile_wgrad_hopper_kernel(m: int, n: int, accumulate: bool, experts: int = 4, rows: int = 1000):
    """The compiled Gluon weight-gradient kernel (kernels/wgrad_hopper.py; compile only): dW [E, m, n] from sorted
    operands [rows, m] and [rows, n], fresh or added into a gradient, as the fused backward launches it."""
    a, b = torch.empty(rows, m, dtype=torch.bfloat16), torch.empty(rows, n, dtype=torch.bfloat16)
    into = torch.empty(experts, m, n, dtype=torch.bfloat16) if accumulate else None
    with compile_only() as compiled:
        wgrad_hopper.wgrad_hopper(a, b, torch.zeros(experts + 1, dtype=torch.int32), into, programs=132)
    return compiled[0]


# warps of the Gluon kernels as registers are allocated: its default partition, the second consumer warpgroup, and
# the loader warp's group
HOPPER_WARPS = 12


def describe(compiled, num_warps: int) -> dict:
    usage = resource_usage(compiled)
    return dict(registers=usage.registers, spill_bytes=usage.spill_bytes,
                shared_kib=round(usage.shared_bytes / 1024, 1), programs_per_sm=usage.programs_per_sm(num_warps),
                tma="cp.async.bulk.tensor" in compiled.asm["ptx"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="fused,mla", help="comma-separated: fused, mla")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated subset (fused: v2lite,v3,small; mla: v2lite,v3)")
    parser.add_argument("--kernels", default=",".join(FAMILIES), help="fused kernels, comma-separated")
    args = parser.parse_args()
    parts = args.parts.split(",")
    out_dir = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    records = []
    with open(out_dir / "kernel_resources.jsonl", "w") as out:
        def emit(**record):
            out.write(json.dumps(record) + "\n")
            out.flush()
            records.append(record)
            if "tile" in record:
                print(f"{record['part']} {record['shape']} {record.get('kernel', '')} {record['tile']}: "
                      f"{record['registers']} registers, {record['spill_bytes']} spill bytes", flush=True)

        import triton

        emit(part="env", triton=triton.__version__, torch=torch.__version__, target="cuda sm_90",
             date=time.strftime("%Y-%m-%d %H:%M"))
        if "fused" in parts:
            for shape in (args.shapes.split(",") if args.shapes else FUSED_SHAPES):
                if shape not in FUSED_SHAPES:
                    continue
                hidden, inter, top_k, rows_per_expert = FUSED_SHAPES[shape]
                training = fm._bucket(rows_per_expert * 64, 64)
                for kernel in args.kernels.split(","):
                    # the weight gradients an H100 / H200 computes in bf16 with the Gluon kernel, fresh and adding
                    gluon = {"wgrad_gate_up": (2 * inter, hidden), "wgrad_down": (hidden, inter)}.get(kernel)
                    gluon = gluon if wgrad_hopper.HAS_GLUON and gluon and gluon[0] % wgrad_hopper.BLOCK_M == 0 else None
                    for accumulate in (False, True) if gluon else ():
                        emit(part="fused", shape=shape, bucket=training, kernel=kernel, default=True,
                             tile=f"Gluon {wgrad_hopper.BLOCK_M}x{wgrad_hopper.BLOCK_N}x{wgrad_hopper.BLOCK_K} "
                                  f"w4+4+1 s{wgrad_hopper.STAGES}" + (" +=" if accumulate else ""),
                             **describe(compile_wgrad_hopper_kernel(*gluon, accumulate), HOPPER_WARPS))
                    # the training step's bucket, and for the forward GEMMs also a generate step's ("decode")
                    for bucket in (training, "decode") if kernel in ("gemm1", "gemm2") else (training,):
                        rows = (rows_per_expert if bucket == training else 1) * 64  # a representative count
                        configs = fm._candidates(FAMILIES[kernel][0], rows, 64, torch.bfloat16)
                        for index, config in enumerate(configs):
                            compiled = compile_fused_kernel(kernel, config, hidden, inter, top_k)
                            usage = describe(compiled, config.num_warps)  # "tma": as compiled (adding wgrads: always)
                            emit(part="fused", shape=shape, bucket=bucket, kernel=kernel,
                                 default=index == 0 and not gluon,
                                 tile=tile_label(config.block_m, config.block_n, config.block_k, config.num_warps,
                                                 config.num_stages) + (" TMA" if usage["tma"] else "")
                                 + (" persistent" if config.persistent else "") + (" split" if config.split else ""),
                                 config=str(config), **usage)
        if "mla" in parts:
            for shape in (args.shapes.split(",") if args.shapes else MLA_SHAPES):
                if shape not in MLA_SHAPES:
                    continue
                heads = MLA_SHAPES[shape]
                gluon = mla_decode_hopper.HAS_GLUON and heads % mla_decode_hopper.HEADS == 0  # what sm_90 runs
                if gluon:
                    emit(part="mla", shape=shape, heads=heads, default=True, kernel="mla_decode_hopper (Gluon)",
                         tile=f"{mla_decode_hopper.HEADS}x{mla_decode_hopper.KEYS} w4+4+1 s{mla_decode_hopper.STAGES}",
                         **describe(compile_mla_hopper_kernel(heads), HOPPER_WARPS))
                default = mla_decode.default_config(heads, 1, torch.bfloat16, True)
                tiles = [(default.block_h, default.block_n, default.num_warps, default.num_stages)]
                tiles += [t for t in MLA_CANDIDATES if t not in tiles and t[0] <= heads]
                for index, (block_h, block_n, num_warps, num_stages) in enumerate(tiles):
                    compiled = compile_mla_split_kernel(heads, block_h, block_n, num_warps, num_stages)
                    emit(part="mla", shape=shape, heads=heads, default=index == 0 and not gluon, block_h=block_h,
                         block_n=block_n, num_warps=num_warps, num_stages=num_stages,
                         tile=tile_label(block_h, block_n, None, num_warps, num_stages),
                         **describe(compiled, num_warps))
    table = markdown_table(records)
    (out_dir / "kernel_resources.md").write_text(table)
    print("\n" + table)
    print(f"wrote kernel_resources.jsonl and kernel_resources.md to {out_dir} ({time.time() - started:.0f} s)")


def tile_label(rows: int, cols: int, depth: int | None, num_warps: int, num_stages: int) -> str:
    """128x256x64 w8 s3 (rows x columns x K step, warps, pipeline stages); rows x keys for the MLA tiles."""
    sizes = "x".join(str(n) for n in (rows, cols, depth) if n is not None)
    return f"{sizes} w{num_warps} s{num_stages}"


def markdown_table(records: list[dict]) -> str:
    env = next(r for r in records if r["part"] == "env")
    lines = [f"# Kernel resources on sm_90 (triton {env['triton']}, {env['date']})", "",
             "| part | shape | bucket | kernel | tile | default | registers | spill bytes | shared KiB "
             "| programs / SM |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "tile" not in r:
            continue
        bucket = r.get("bucket", f"{r.get('heads')} heads")
        lines.append(f"| {r['part']} | {r['shape']} | {bucket} | {r.get('kernel', 'mla_decode_split')} | {r['tile']} | "
                     f"{'yes' if r['default'] else ''} | {r['registers']} | {r['spill_bytes']} | {r['shared_kib']} | "
                     f"{r['programs_per_sm']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

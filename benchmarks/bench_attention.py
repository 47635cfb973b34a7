"""Training / prefill attention for MLA's unequal head dims (qk 192 / v 128; the 1.26B model's qk 128 / v 64):
which PyTorch SDPA backend is fastest and correct on this GPU.

    python benchmarks/bench_attention.py

Candidates, causal, bf16, [batch, heads, seq, dim] (the layout the model's attention layers call SDPA with):
  sdpa default            F.scaled_dot_product_attention, backend chosen by PyTorch (what attn_implementation="sdpa"
                          runs today)
  sdpa efficient          memory-efficient backend forced
  sdpa cudnn              cuDNN backend forced
  sdpa flash, v padded    flash backend forced, values zero-padded to the qk dim and the output sliced back (flash
                          wants one head dim; transformers' DeepseekV3 pads the same way for flash-attn)
  flash-attn              flash_attn_func, when the package is installed (it is not on the GPU image)
Time: forward, and forward + backward, median ms (triton.testing.do_bench); TFLOP/s of causal attention (half the
score matrix: fwd 2 * B * H * S^2 * (dqk + dv) / 2, bwd 2.5x fwd). Accuracy: output and input gradients against
SDPA's math backend in float32 on the same inputs (max abs error / max abs reference). JSON lines to
$OUT/bench_attention.jsonl (or benchmarks/out/).
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# (batch, heads, seq, qk dim, v dim)
SHAPES = {
    "v2lite-like (qk 192 / v 128, 16 heads, 4k)": (4, 16, 4096, 192, 128),
    "v3-like (qk 192 / v 128, 128 heads, 4k)": (1, 128, 4096, 192, 128),
    "1.26B model (qk 128 / v 64, 16 heads, 2k)": (8, 16, 2048, 128, 64),
}


def sdpa_with(backend):
    def attention(q, k, v):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return attention


def flash_padded(q, k, v):
    padded = F.pad(v, (0, q.shape[-1] - v.shape[-1]))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, padded, is_causal=True)[..., : v.shape[-1]]


def flash_attn_package(q, k, v):
    from flash_attn import flash_attn_func  # [batch, seq, heads, dim]

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    return out.transpose(1, 2)


CANDIDATES = {
    "sdpa default": sdpa_with(None),
    "sdpa efficient": sdpa_with(SDPBackend.EFFICIENT_ATTENTION),
    "sdpa cudnn": sdpa_with(SDPBackend.CUDNN_ATTENTION),
    "sdpa flash, v padded": flash_padded,
    "flash-attn": flash_attn_package,
}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(f"{((a.float() - b).abs().max() / b.abs().max()).item():.2g}")


def bench(name, shape, records):
    from triton.testing import do_bench

    batch, heads, seq, dqk, dv = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(batch, heads, seq, dqk, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(batch, heads, seq, dv, device="cuda", generator=gen, dtype=torch.bfloat16)
    grad = torch.randn(batch, heads, seq, dv, device="cuda", generator=gen, dtype=torch.bfloat16)
    # float32 math reference on the first sequence (the whole batch would need S^2 fp32 scores per head)
    ref_inputs = [t[:1].float().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        ref_out = F.scaled_dot_product_attention(*ref_inputs, is_causal=True)
    ref_out.backward(grad[:1].float())
    fwd_flop = 2 * batch * heads * seq * seq * (dqk + dv) / 2
    for variant, attention in CANDIDATES.items():
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        try:
            out = attention(*inputs)
            out.backward(grad)
            errors = dict(out_rel_err=relative(out[:1], ref_out),
                          grad_rel_err=max(relative(t.grad[:1], r.grad) for t, r in zip(inputs, ref_inputs)))
            with torch.no_grad():
                fwd_ms = do_bench(lambda: attention(q, k, v), warmup=10, rep=50)
            both_ms = do_bench(lambda: attention(*inputs).backward(grad), warmup=10, rep=50,
                               grad_to_none=inputs)
            rec = dict(shape=name, variant=variant, fwd_ms=round(fwd_ms, 3), fwd_bwd_ms=round(both_ms, 3),
                       fwd_tflops=round(fwd_flop / fwd_ms / 1e9, 1),
                       fwd_bwd_tflops=round(3.5 * fwd_flop / both_ms / 1e9, 1), **errors)
        except Exception as error:  # backend not eligible for these dims, package missing, ...
            rec = dict(shape=name, variant=variant, error=f"{type(error).__name__}: {' '.join(str(error).split())[:200]}")
        records.append(rec)
        print(json.dumps(rec), flush=True)
        del inputs
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               cudnn=torch.backends.cudnn.version(), date=time.strftime("%Y-%m-%d"))
    print(json.dumps(env), flush=True)
    records = []
    for name, shape in SHAPES.items():
        bench(name, shape, records)
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench_attention.jsonl"), "w") as f:
        for rec in [env] + records:
            f.write(json.dumps(rec) + "\n")
    print(f"\n{'shape':<46}{'variant':<24}{'fwd ms':>8}{'f+b ms':>8}{'fwd TF':>8}{'f+b TF':>8}{'out err':>9}{'grad err':>9}")
    for r in records:
        if "error" in r:
            print(f"{r['shape']:<46}{r['variant']:<24}  {r['error'][:70]}")
        else:
            print(f"{r['shape']:<46}{r['variant']:<24}{r['fwd_ms']:>8}{r['fwd_bwd_ms']:>8}{r['fwd_tflops']:>8}"
                  f"{r['fwd_bwd_tflops']:>8}{r['out_rel_err']:>9}{r['grad_rel_err']:>9}")


if __name__ == "__main__":
    main()

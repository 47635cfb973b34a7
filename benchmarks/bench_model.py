"""modeling_moe.MoEForCausalLM against transformers' own DeepseekV3ForCausalLM: same shapes, same weights, same run.

Parts (`--parts`, default all):
  check     identical weights give the same logits (full forward, and one decode step over a cache).
  train     forward + backward + AdamW step of a 1.26B model, batch 8 x 2048: tokens/s, peak memory (transformers
            with torch's fused AdamW, as the anchors; ours on CUDA with the pretrain trainer's TritonAdamW). Steps
            synchronised one by one, as the anchors' script times them; `back_to_back_tokens_per_s`: the same steps
            with one synchronisation at the end, as a training loop runs them.
  generate  greedy generate, batch 16, prompt 256, 256 new tokens: tokens/s.
  decode    one MLA layer, batch 32, 8192 cached tokens, one new token: ms per step, latent-cache GB/s.
  step      (not in the default) our training step of the train part alone, as pretraining runs it: back-to-back and
            synchronised times and one profiled step's GPU kernel time, without the anchor, to compare a change
            with the tree without it (ROUNDS=2 bash benchmarks/ab_candidate.sh X.patch python
            benchmarks/bench_model.py --parts step).

Every figure but the step part's is reported as an absolute value and as a ratio to the transformers ("hf") row
measured in the same run. JSON lines go to $OUT/bench_model.jsonl, or to benchmarks/out/ when OUT is unset. See
benchmarks/README.md.
"""
import argparse
import contextlib
import gc
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch
import transformers
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_deepseek

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's modeling_moe
import modeling_moe  # noqa: E402,F401  (registers MoEConfig with the Auto classes)
from modeling_moe import MoEConfig  # noqa: E402
from modeling_moe.cache_moe import MoEStaticCache  # noqa: E402
from modeling_moe.deepseek_checkpoint import interleave_rope_rows  # noqa: E402
from modeling_moe.kernels import mla_decode  # noqa: E402
from modeling_moe.kernels.adamw import TritonAdamW  # noqa: E402
from modeling_moe.modeling_moe import MoEMultiHeadLatentAttention, MoERotaryEmbedding  # noqa: E402
from modeling_moe.presets import parameter_counts  # noqa: E402
from modeling_moe.trainers.cuda_graph import GraphedStep  # noqa: E402

# transformers 5.2x renamed the cache keyword (and output field) from `past_key_values` to `cache`.
CACHE_KW = "cache" if "cache" in inspect.signature(DeepseekV3ForCausalLM.forward).parameters else "past_key_values"

# The anchors' 1.26B model (/work/shared/anchors/hf_anchor_bench.py).
MODEL = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
             num_hidden_layers=12, num_attention_heads=16, n_routed_experts=64, num_experts_per_tok=6,
             n_shared_experts=2, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=None,
             kv_lora_rank=256, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64)
V2LITE_ATTN = dict(hidden_size=2048, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64,
                   qk_nope_head_dim=128, v_head_dim=128)
V3_ATTN = dict(V2LITE_ATTN, hidden_size=7168, num_attention_heads=128, q_lora_rank=1536)
# Exercises q compression and group-limited routing, which the timed model does not.
CHECK = dict(MODEL, vocab_size=1000, hidden_size=256, intermediate_size=512, moe_intermediate_size=64,
             num_hidden_layers=3, num_attention_heads=8, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
             topk_group=2, q_lora_rank=96, kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32)
FULL = dict(model=MODEL, train=(8, 2048), generate=(16, 256, 256), generate_batches=(1, 64), ttft=4096,
            decode=(32, 8192),
            attention={"v2lite-like 16 heads": V2LITE_ATTN, "v3-like 128 heads q_lora": V3_ATTN})
SMALL_MODEL = dict(MODEL, vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                   num_hidden_layers=3, num_attention_heads=4, n_routed_experts=16, num_experts_per_tok=4,
                   kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)
SMALL_ATTN = dict(hidden_size=64, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=16,
                  qk_nope_head_dim=32, v_head_dim=32)
SMALL = dict(model=SMALL_MODEL, train=(2, 64), generate=(2, 16, 8), generate_batches=(1, 3), ttft=64,
             decode=(2, 128),
             attention={"v2lite-like (small)": SMALL_ATTN,
                        "v3-like (small)": dict(SMALL_ATTN, hidden_size=128, num_attention_heads=8, q_lora_rank=48)})
MAIN = ("tokens_per_s", "cache_GB_per_s", "ttft_ms")  # the figure a row shows first: the first of these it has
RECORDS = []


def configs(shape: dict, max_positions: int = 4096) -> tuple[DeepseekV3Config, MoEConfig]:
    """The same model in transformers' and in our config class (our MTP off, DeepSeek-V3 sigmoid routing). Ours
    rotates half-split pairs, the faster layout; `build` reorders the rotary rows of transformers' interleaved
    weights for it, so that both compute the same function."""
    common = dict(shape, num_key_value_heads=shape["num_attention_heads"], routed_scaling_factor=2.5,
                  norm_topk_prob=True, max_position_embeddings=max_positions,
                  bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    topk_method = "group_limited" if shape["n_group"] > 1 else "greedy"
    ours = MoEConfig(**common, scoring_func="sigmoid", topk_method=topk_method, num_nextn_predict_layers=0,
                     rope_interleave=False)
    hf = DeepseekV3Config(**common, rope_interleave=True)
    for config in (hf, ours):
        config._attn_implementation = "sdpa"
    return hf, ours


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev, warmup: int, iters: int, clock: str = "wall") -> float:
    """Median seconds of `iters` calls after `warmup` calls, each synchronised. clock "wall": host time from the call
    to the end of the synchronisation; "events" (CUDA): device time between events recorded around the call, as
    `../shared/anchors/hf_anchor_bench.py` times its steps (no host launch or wake-up latency); "back_to_back": the
    mean over `iters` calls without a synchronisation between them (one at the end), as a training loop runs its
    steps: a call's first launches queue behind the previous call's work instead of meeting an idle GPU."""
    for _ in range(warmup):
        fn()
    sync(dev)
    if clock == "back_to_back":
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(dev)
        return (time.perf_counter() - start) / iters
    times = []
    for _ in range(iters):
        if clock == "events" and dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            sync(dev)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def captured(fn):
    """fn recorded once in a CUDA graph (after a warm-up on a side stream); returns a function that replays it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def peak_gib(dev):
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None


def meta_model(config, dtype):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def random_state(module: torch.nn.Module, dev, std: float = 0.02) -> dict:
    """N(0, std) for every matrix and stacked expert tensor, ones for norms, zeros for biases; kept on the CPU.

    `module` may live on the meta device: only names, shapes and dtypes are read."""
    gen = torch.Generator(device=dev).manual_seed(0)
    state = {}
    for name, t in module.state_dict().items():
        if t.dim() >= 2:
            state[name] = torch.empty(t.shape, dtype=t.dtype, device=dev).normal_(0, std, generator=gen).cpu()
        else:
            fill = torch.ones if name.endswith("norm.weight") else torch.zeros
            state[name] = fill(t.shape, dtype=t.dtype, device="cpu")
    return state


def build(config, impl: str, state: dict, dev, dtype):
    """transformers' or our causal LM (picked by the config class), routers in the dtype the class keeps them.
    `state` holds transformers' (interleaved) rotary rows."""
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation=impl,
                                                 attn_implementation="sdpa")
    if isinstance(config, MoEConfig) and not config.rope_interleave:
        state = {name: interleave_rope_rows(name, tensor, config, inverse=True) for name, tensor in state.items()}
    model.load_state_dict(state)
    return model


def cache_of(output):
    return output.cache if getattr(output, "cache", None) is not None else output.past_key_values


def measure(fn, *args, **kwargs) -> dict:
    """Run one measurement; a failure is printed and recorded instead of ending the part."""
    try:
        return fn(*args, **kwargs)
    except Exception as error:
        traceback.print_exc()
        result = {"error": describe(error)}
    free()  # after the except block, once the traceback no longer holds the failed run's tensors
    return result


def describe(error: Exception) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def report(part: str, case: str, rows: dict, **info):
    """One record per row; `vs_hf` divides each number by the same number of the "hf" row of this case."""
    anchor = rows.get("hf", {})
    for model, metrics in rows.items():
        ratios = {key: round(value / anchor[key], 3) for key, value in metrics.items()
                  if isinstance(value, (int, float)) and not isinstance(value, bool) and anchor.get(key)}
        RECORDS.append(dict(part=part, case=case, model=model, **info, **metrics, vs_hf=ratios))
        print(json.dumps(RECORDS[-1]), flush=True)  # in the log at once: a run cut by a time limit keeps it


def row(part, case, model, figure, ratio, other):
    print(f"{part:<9}{case:<42}{model:<28}{figure:>22}{ratio:>7}  {other}")


# --------------------------------------------------------------------------------------------------------- parts


def part_check(S, args, dev, dtype):
    hf_cfg, our_cfg = configs(CHECK, max_positions=256)
    state = random_state(meta_model(hf_cfg, dtype), dev)
    models = {"hf": build(hf_cfg, "grouped_mm", state, dev, dtype).eval(),
              "ours": build(our_cfg, "grouped_mm", state, dev, dtype).eval()}
    ids = torch.randint(0, CHECK["vocab_size"], (2, 48), device=dev)
    logits, step = {}, {}
    with torch.no_grad():
        for name, model in models.items():
            logits[name] = model(input_ids=ids, use_cache=False).logits.float()
            cache = cache_of(model(input_ids=ids[:, :-1], use_cache=True))  # prefill, then one step over the cache
            step[name] = model(input_ids=ids[:, -1:], use_cache=True, **{CACHE_KW: cache}).logits[:, -1].float()
    scale = logits["hf"].abs().max().item()
    tolerance = (3e-2 if dtype == torch.bfloat16 else 1e-4) * scale
    forward_diff = (logits["ours"] - logits["hf"]).abs().max().item()
    decode_diff = (step["ours"] - step["hf"]).abs().max().item()
    RECORDS.append(dict(part="check", case="identical weights, %s" % str(dtype).replace("torch.", ""), model="ours",
                        forward_max_abs_diff=forward_diff, decode_step_max_abs_diff=decode_diff,
                        max_abs_logit=scale, tolerance=tolerance,
                        passed=bool(forward_diff <= tolerance and decode_diff <= tolerance)))


def train_inputs(S, dev, dtype):
    """The train part's transformers and our configs, one random state for both, the batch, and FLOPs a token."""
    batch, seq = S["train"]
    hf_cfg, our_cfg = configs(S["model"], max_positions=seq + 512)
    state = random_state(meta_model(hf_cfg, dtype), dev)
    ids = torch.randint(0, hf_cfg.vocab_size, (batch, seq), device=dev)
    flops_per_token = (6 * parameter_counts(our_cfg)["activated"]
                       + 3 * seq * our_cfg.num_hidden_layers * our_cfg.num_attention_heads
                       * (our_cfg.qk_head_dim + our_cfg.v_head_dim))  # causal attention: half the score matrix
    return hf_cfg, our_cfg, state, ids, flops_per_token


def training_step(cfg, impl, state, ids, dev, dtype, update_bias=False, compiled=False, skip_logits=False,
                  compile_mode=None, whole_model=False, cuda_graph=False):
    """(model, optimizer, step): one forward + backward + optimizer step of the model `cfg` describes; compiled layer
    by layer, or with `whole_model` as one torch.compile region; with `cuda_graph` replayed from one CUDA graph after
    two eager steps, as `pretrain --cuda_graph` runs it (AdamW capturable, its learning rate a device tensor)."""
    if cuda_graph and dev.type != "cuda":
        raise ValueError(f"a step replayed from a CUDA graph needs a CUDA device, not {dev.type}")
    model = build(cfg, impl, state, dev, dtype).train()
    if cuda_graph:
        opt = TritonAdamW(model.parameters(), lr=torch.tensor(1e-5, device=dev), capturable=True)
    elif isinstance(cfg, MoEConfig) and dev.type == "cuda":  # what `pretrain` steps with (--optim adamw_triton)
        opt = TritonAdamW(model.parameters(), lr=1e-5)
    else:  # as the anchors' script
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True if dev.type == "cuda" else None)
    if compiled and whole_model:
        forward = torch.compile(model, **compile_arguments(compile_mode))
    elif compiled:  # what `pretrain --torch_compile` does: accelerate's regional compilation, each decoder layer
        from accelerate.utils import compile_regions

        # `pretrain --torch_compile_mode`: "reduce-overhead" replays each layer's forward and backward from CUDA
        # graphs (inductor's CUDA graph trees)
        forward = compile_regions(model, **compile_arguments(compile_mode))
    else:
        forward = model
    loss_kwargs = dict(skip_logits=True) if skip_logits else {}  # the chunked loss, as pretraining computes it

    def optimizer_step(batch):
        forward(input_ids=batch, labels=batch, use_cache=False, **loss_kwargs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if update_bias:
            model.update_expert_bias()

    run = GraphedStep(optimizer_step) if cuda_graph else optimizer_step
    return model, opt, lambda: run(ids)


def part_train(S, args, dev, dtype):
    batch, seq = S["train"]
    hf_cfg, our_cfg, state, ids, flops_per_token = train_inputs(S, dev, dtype)

    def run(cfg, impl, update_bias=False, compiled=False, profile=False, skip_logits=False, compile_mode=None,
            cuda_graph=False):
        model, opt, step = training_step(cfg, impl, state, ids, dev, dtype, update_bias, compiled, skip_logits,
                                         compile_mode, cuda_graph=cuda_graph)
        free()
        seconds = timed(step, dev, args.warmup, args.steps)
        back_to_back = timed(step, dev, 0, args.steps, clock="back_to_back")
        result = dict(step_ms=sig(seconds * 1e3), tokens_per_s=sig(batch * seq / seconds),
                      tflops=sig(flops_per_token * batch * seq / seconds / 1e12), peak_gib=peak_gib(dev),
                      back_to_back_tokens_per_s=sig(batch * seq / back_to_back))
        if profile:
            result["profile"] = profile_step(step, dev, args.profile_top)
        del model, opt
        free()
        return result

    for impl in ["grouped_mm"] + (["eager"] if args.with_eager else []):
        rows = {"hf": measure(run, hf_cfg, impl), "ours": measure(run, our_cfg, impl)}
        if impl == "grouped_mm":
            rows["ours + update_expert_bias"] = measure(  # profiled here where the fused row does not run
                run, our_cfg, impl, True, profile=args.profile_train and not fused_available(dev))
            if fused_available(dev):
                rows["ours (fused experts) + update_expert_bias"] = measure(run, our_cfg, "fused", True)
                rows["ours (fused experts, compiled layers) + update_expert_bias"] = measure(
                    run, our_cfg, "fused", True, True)
                rows["ours (fused experts, compiled layers, chunked loss) + update_expert_bias"] = measure(
                    run, our_cfg, "fused", True, True, profile=args.profile_train, skip_logits=True)
                for spec in filter(None, args.train_compile_modes.split(",")):
                    rows[f"ours (fused experts, layers compiled {spec}, chunked loss) + update_expert_bias"] = measure(
                        run, our_cfg, "fused", True, True, profile=args.profile_train, skip_logits=True,
                        compile_mode=spec)
                for spec in filter(None, args.train_graph_compile_modes.split(",")):
                    rows[f"ours (fused experts, layers compiled {spec}, chunked loss) + update_expert_bias, the "
                         "step one CUDA graph"] = measure(
                        run, our_cfg, "fused", True, True, profile=args.profile_train, skip_logits=True,
                        compile_mode=spec, cuda_graph=True)
        report("train", f"experts={impl} B{batch}xS{seq}", rows, gflop_per_token=sig(flops_per_token / 1e9))


def part_step(S, args, dev, dtype):
    """Our training step alone, as pretraining runs it (the experts fused where they run, layers compiled in
    --step-compile-mode, the chunked loss, the balancing bias updated): --step-runs runs of --steps back-to-back steps,
    the median of --steps synchronised ones, and one profiled step's GPU kernel time. No anchor: for comparing two
    runs of this part, e.g. a change and the tree without it (benchmarks/ab_candidate.sh)."""
    batch, seq = S["train"]
    _, our_cfg, state, ids, flops_per_token = train_inputs(S, dev, dtype)
    impl = "fused" if fused_available(dev) else "grouped_mm"
    mode = args.step_compile_mode or None
    model, opt, step = training_step(our_cfg, impl, state, ids, dev, dtype, update_bias=True,
                                     compiled=mode != "none", skip_logits=True, compile_mode=mode,
                                     whole_model=args.step_compile_whole_model, cuda_graph=args.step_cuda_graph)
    free()
    start = time.perf_counter()
    seconds = timed(step, dev, args.warmup, args.steps)
    warm_and_synchronised_s = time.perf_counter() - start
    runs = [timed(step, dev, 0, args.steps, clock="back_to_back") for _ in range(args.step_runs)]
    scope = "model" if args.step_compile_whole_model else "layers"
    graph = ", the step one CUDA graph" if args.step_cuda_graph else ""
    record = dict(part="step", case=f"experts={impl} B{batch}xS{seq}", model=f"ours ({scope} compiled {mode}{graph})",
                  step_ms=sig(seconds * 1e3), tokens_per_s=sig(batch * seq / seconds),
                  back_to_back_ms=[sig(t * 1e3) for t in runs],
                  back_to_back_tokens_per_s=sig(batch * seq / statistics.median(runs)),
                  tflops=sig(flops_per_token * batch * seq / seconds / 1e12), peak_gib=peak_gib(dev),
                  warmup_and_synchronised_s=round(warm_and_synchronised_s, 1), vs_hf={})
    record["profile"] = profile_step(step, dev, args.profile_top)
    RECORDS.append(record)
    print(json.dumps(record), flush=True)
    del model, opt


def compile_arguments(spec: str | None) -> dict:
    """torch.compile's keyword arguments for a `--train-compile-modes` entry: a mode, then inductor options set to True
    after "+" ("reduce-overhead+coordinate_descent_tuning"), which go in with the mode's own options as `options`. Not
    as an inductor config patch around the call: dynamo reuses a compiled frame for any later torch.compile call with
    equal arguments, whatever the config."""
    mode, *options = (spec or "default").split("+")
    if not options:
        return dict(mode=spec)
    return dict(options={**torch._inductor.list_mode_options(mode), **dict.fromkeys(options, True)})


def profile_step(step, dev, top: int = 40) -> dict:
    """One more `step()` under the pretraining trainer's profiler: each category's share of the step's wall time
    (routed experts, attention, other GEMMs, the rest) and the `top` busiest kernels, printed and returned."""
    from modeling_moe.trainers.profiling import StepProfiler

    profiler = StepProfiler((0, 0), tempfile.mkdtemp(prefix="bench_model-profile-"), 0, dev, top=top)
    profiler.start_if(0)
    step()
    summary = profiler.stop_if(0)
    shares = {label: round(entry["share"], 3) for label, entry in summary["categories"].items()}
    top = [(k["name"][:90], round(k["time_s"] * 1e3, 2), k["calls"]) for k in summary["top_kernels"]]
    print(f"[profile] train step: wall {summary['wall_s'] * 1e3:.1f} ms, kernels {summary['device_time_s'] * 1e3:.1f} "
          f"ms, shares {shares}", flush=True)
    for name, ms, calls in top:
        print(f"[profile]   {ms:8.2f} ms {calls:5d}x  {name}", flush=True)
    record = {"wall_ms": sig(summary["wall_s"] * 1e3), "kernel_ms": sig(summary["device_time_s"] * 1e3),
              "shares": shares, "top_kernels": top}
    if "device" in summary:  # a GPU: how long it sat idle between kernels, and where
        device = summary["device"]
        record.update(busy_ms=sig(device["busy_s"] * 1e3), idle_between_kernels_ms=sig(
            device["idle_between_kernels_s"] * 1e3), longest_gaps=device["longest_gaps"])
        print(f"[profile] GPU busy {device['busy_s'] * 1e3:.1f} ms, idle between kernels "
              f"{device['idle_between_kernels_s'] * 1e3:.1f} ms; longest gaps:", flush=True)
        for gap in device["longest_gaps"]:
            print(f"[profile]   {gap['gap_us']:8.1f} us  after {gap['after'][:50]}  before {gap['before'][:50]}  "
                  f"host in {gap['host_outer']} > {gap['host_inner']}", flush=True)
    return record


def fused_available(dev) -> bool:
    """Whether our "fused" Triton experts run here (CUDA and triton; elsewhere "fused" is the PyTorch reference)."""
    from modeling_moe.kernels import preferred_by_default

    return dev.type == "cuda" and preferred_by_default()


def our_generate_variants(our_cfg, dev):
    """name -> (config, experts implementation, generate() keywords, model attributes) for our model; the static-
    cache variants are what a user gets from `generate(cache_implementation="static")`: the latent cache preallocated,
    the decode step compiled by transformers (mode "reduce-overhead": CUDA graphs) with the Triton MLA decode kernel
    inside, and the stop check deferred by a step (`defer_stop_check`; the "synchronous" variant turns it off)."""
    variants = {"ours (dynamic cache, grouped_mm)": (our_cfg, "grouped_mm", {}, {})}
    if fused_available(dev):
        static = dict(cache_implementation="static")
        variants["ours (dynamic cache, fused)"] = (our_cfg, "fused", {}, {})
        variants["ours (static cache + CUDA graphs, fused, synchronous stop check)"] = (
            our_cfg, "fused", static, dict(defer_stop_check=False))
        variants[TRAINING_TILES] = (our_cfg, "fused", static, {})
        variants["ours (static cache + CUDA graphs, fused)"] = (our_cfg, "fused", static, {})
    return variants


# The same fastest path with the experts' GEMMs on 128-row training tiles (the decode bucket's default before session
# 6's 16-row tiles), recorded into its own CUDA graphs: the end-to-end effect of the decode tiles, in one run.
TRAINING_TILES = "ours (static cache + CUDA graphs, fused, 128x128x64 expert tiles)"


def expert_tiles(variant: str):
    """The experts' tile override of a generate variant (its CUDA graphs are recorded under it)."""
    if variant != TRAINING_TILES:
        return contextlib.nullcontext()
    from modeling_moe.kernels import KernelConfig, config_override

    return config_override(KernelConfig(128, 128, 64, 8, 4))


@contextlib.contextmanager
def profiled(title: str):
    """Profile the block: wall vs device-busy time, then the busiest ops by device time and by host time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        yield
    wall = time.perf_counter() - start
    events = prof.key_averages()
    # Kernels only: the CPU-side ops (and a compiled graph's call) also carry their kernels' device time.
    device_us = sum(e.self_device_time_total for e in events
                    if e.device_type != torch.autograd.DeviceType.CPU and not e.is_user_annotation)
    print(f"[profile] {title}: wall {wall * 1e3:.1f} ms, device busy {device_us / 1e3:.1f} ms")
    print(events.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=60), flush=True)
    print(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60), flush=True)  # host


def part_generate(S, args, dev, dtype):
    """Greedy generate at the anchor's batch with every model resident, runs interleaved (hf, ours, hf, ours, ...) so
    that drift in clocks or host load hits all alike, after a whole-length warmup (which also compiles the static-
    cache decode step); then our fastest path alone at the other batch sizes, and the time to first token."""
    batch, prompt_len, new = S["generate"]
    ttft_len = S["ttft"]
    hf_cfg, our_cfg = configs(S["model"], max_positions=max(prompt_len + new, ttft_len + 1) + 64)
    state = random_state(meta_model(hf_cfg, dtype), dev)

    def generate_seconds(model, batch_size, prompt_length, new_tokens, extra):
        prompt = torch.randint(2, hf_cfg.vocab_size, (batch_size, prompt_length), device=dev,
                               generator=torch.Generator(device=dev).manual_seed(batch_size))
        kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=1,
                      max_new_tokens=new_tokens, min_new_tokens=new_tokens, **extra)  # min = max: no early stop
        sync(dev)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, **kwargs)
        sync(dev)
        assert out.shape[1] == prompt_length + new_tokens, out.shape
        return time.perf_counter() - start

    def build_and_warm(name, cfg, impl, extra, attributes):
        model = build(cfg, impl, state, dev, dtype).eval()
        for attribute, value in attributes.items():
            setattr(model, attribute, value)
        with expert_tiles(name):
            generate_seconds(model, batch, prompt_len, new, extra)
        return model

    def timed_generate(model, batch_size, extra, runs):
        seconds = statistics.median(generate_seconds(model, batch_size, prompt_len, new, extra) for _ in range(runs))
        return dict(seconds=sig(seconds), tokens_per_s=sig(batch_size * new / seconds))

    variants = {"hf": (hf_cfg, "grouped_mm", {}, {}), **our_generate_variants(our_cfg, dev)}
    if args.with_eager:
        variants["hf (eager experts)"] = (hf_cfg, "eager", {}, {})
    models = {name: measure(build_and_warm, name, *variant) for name, variant in variants.items()}
    times = {name: [] for name, model in models.items() if not isinstance(model, dict)}
    for _ in range(args.gen_runs):
        for name in times:
            with expert_tiles(name):
                times[name].append(generate_seconds(models[name], batch, prompt_len, new, variants[name][2]))
    rows = {name: models[name] if name not in times else
            dict(seconds=sig(statistics.median(times[name])),
                 tokens_per_s=sig(batch * new / statistics.median(times[name])))
            for name in variants}
    report("generate", f"B{batch} prompt {prompt_len} +{new}", rows, runs=args.gen_runs)

    fastest = max(times, key=lambda name: rows[name]["tokens_per_s"] if name not in ("hf", TRAINING_TILES) else 0)
    if args.profile_generate:
        with profiled(f"generate of {fastest}, B{batch}, prompt {prompt_len} +32"):
            generate_seconds(models[fastest], batch, prompt_len, 32, variants[fastest][2])
    for other_batch in S["generate_batches"]:
        generate_seconds(models[fastest], other_batch, prompt_len, new, variants[fastest][2])  # compiles this size
        rows = {fastest: measure(timed_generate, models[fastest], other_batch, variants[fastest][2], args.gen_runs)}
        report("generate", f"B{other_batch} prompt {prompt_len} +{new} (ours only)", rows, runs=args.gen_runs)

    def ttft(name):  # prefill of one long prompt + the first token; the hf anchor and our default path
        generate_seconds(models[name], 1, ttft_len, 1, {})
        seconds = statistics.median(generate_seconds(models[name], 1, ttft_len, 1, {}) for _ in range(3))
        return dict(ttft_ms=sig(seconds * 1e3))

    ttft_models = ["hf", "ours (dynamic cache, fused)" if "ours (dynamic cache, fused)" in times else fastest]
    report("generate", f"time to first token, B1 prompt {ttft_len}",
           {name: measure(ttft, name) for name in ttft_models if name in times})
    del models
    free()


def part_decode(S, args, dev, dtype):
    batch, cache_len = S["decode"]
    for case, shape in S["attention"].items():
        hf_cfg, our_cfg = configs(dict(CHECK, **shape), max_positions=cache_len + 64)
        our_cfg.rope_interleave = True  # the attention modules load transformers' state as it is
        with torch.device("meta"):
            meta_attention = hf_deepseek.DeepseekV3Attention(hf_cfg, 0).to(dtype)
        state = random_state(meta_attention, dev)
        rank, rope = shape["kv_lora_rank"], shape["qk_rope_head_dim"]
        latent = torch.randn(batch, 1, cache_len, rank, device=dev, dtype=dtype)
        k_rope = torch.randn(batch, 1, cache_len, rope, device=dev, dtype=dtype)
        x = torch.randn(batch, 1, shape["hidden_size"], device=dev, dtype=dtype)
        positions = torch.full((batch, 1), cache_len, device=dev)
        outputs = []
        cache_bytes = latent.numel() * latent.element_size() + k_rope.numel() * k_rope.element_size()

        def time_step(step, cuda_graph=False, profile=None):
            if profile:  # where the step's time goes, kernel by kernel (outside a graph, so launches are visible)
                step()
                with profiled(profile):
                    for _ in range(10):
                        step()
                    sync(dev)
                return {}
            outputs.append(step())
            free()
            if cuda_graph:
                step = captured(step)
            # step_ms as the anchor script times a step (CUDA events); wall_ms adds the host's launch and sync
            seconds = timed(step, dev, args.warmup, max(args.steps, 10), clock="events")
            wall = timed(step, dev, 0, max(args.steps, 10))
            return dict(step_ms=sig(seconds * 1e3), wall_ms=sig(wall * 1e3),
                        cache_GB_per_s=sig(cache_bytes / seconds / 1e9), peak_gib=peak_gib(dev))

        def run(attn_cls, rotary_cls, cfg):
            """A dynamic cache holding the latents (transformers' cache; ours then runs the PyTorch absorbed path)."""
            with torch.device(dev):
                attn = attn_cls(cfg, 0).to(dtype).eval()
            attn.load_state_dict(state)
            position_embeddings = rotary_cls(cfg).to(dev)(x, positions)
            cache = DynamicCache()
            cache.update(latent, k_rope, 0)

            def step():  # one new token over the whole cache, then crop the cache back to cache_len
                with torch.no_grad():
                    out = attn(x, position_embeddings, None, cache)  # 4th positional: the cache, under either name
                cache.layers[0].keys, cache.layers[0].values = latent, k_rope
                return out[0] if isinstance(out, tuple) else out  # transformers also returns attention weights

            return time_step(step)

        def run_static(cuda_graph, compiled=False, profile=None, compile_mode=None):
            """Our static latent cache, as generate(cache_implementation="static") builds it: the Triton decode
            kernel reads the filled part; a 4D mask as the model passes it. Optionally replayed from a CUDA graph,
            optionally compiled first (torch.compile fuses the norms, rotary and cache writes around the kernel, as
            in generate's compiled decode step; `compile_mode` as torch.compile's `mode`, what a user sets through
            generate's `compile_config`)."""
            with torch.device(dev):
                attn = MoEMultiHeadLatentAttention(our_cfg, 0).to(dtype).eval()
            attn.load_state_dict(state)
            position_embeddings = MoERotaryEmbedding(our_cfg).to(dev)(x, positions)
            cache = MoEStaticCache(our_cfg, max_cache_len=cache_len + 1)
            cache.early_initialization(batch, dtype=dtype, device=dev)
            layer = cache.layers[0]
            layer.keys[:, :, :cache_len] = latent
            layer.values[:, :, :cache_len] = k_rope
            layer.holds_tokens = True
            mask = torch.ones(batch, 1, 1, cache_len + 1, dtype=torch.bool, device=dev)

            def step():  # write the new token at cache_len, attend over cache_len + 1 keys
                layer.cumulative_length.fill_(cache_len)
                with torch.no_grad():
                    return attn(x, position_embeddings, mask, cache)

            if compiled:
                step = torch.compile(step, fullgraph=False, dynamic=False, mode=compile_mode)

            return time_step(step, cuda_graph, profile)

        rows = {"hf": measure(run, hf_deepseek.DeepseekV3Attention, hf_deepseek.DeepseekV3RotaryEmbedding, hf_cfg),
                "ours (absorbed)": measure(run, MoEMultiHeadLatentAttention, MoERotaryEmbedding, our_cfg)}
        rows["ours (static cache)"] = measure(run_static, False)  # on CUDA: the Triton kernel
        if dev.type == "cuda":
            rows["ours (static cache, CUDA graph)"] = measure(run_static, True)
            rows["ours (static cache, compiled, CUDA graph)"] = measure(run_static, True, True)
            for mode in filter(None, args.decode_compile_modes.split(",")):
                rows[f"ours (compiled {mode}, CUDA graph)"] = measure(run_static, True, True, compile_mode=mode)
            for tile in decode_tiles(args.decode_tiles, shape["num_attention_heads"]):
                with mla_decode.tile_config(tile):
                    rows[f"ours (compiled, CUDA graph, tile {tile_name(tile)})"] = measure(run_static, True, True)
        if args.profile_decode:
            measure(run_static, False, True, profile=f"{case}: compiled decode step x10, kernels launched eagerly")
        if "step_ms" in rows["hf"]:  # same weights and cache: each absorbed output against the expanded one
            hf_out, *ours = outputs
            for name, out in zip([n for n in rows if n != "hf" and "step_ms" in rows[n]], ours):
                rows[name]["output_rel_diff_vs_hf"] = sig(((out - hf_out).abs().max() / hf_out.abs().max()).item(), 2)
        report("decode", f"{case} B{batch} cache {cache_len}", rows, cache_MB=sig(cache_bytes / 1e6))
        del latent, k_rope
        free()


def decode_tiles(specs: str, heads: int) -> list:
    """"64x32w16s3,16x64w8s2,..." (heads x keys per program, warps, stages) -> the MLA decode tiles that fit
    `heads`."""
    tiles = []
    for spec in filter(None, specs.split(",")):
        rows, rest = spec.split("x")
        keys, rest = rest.split("w")
        warps, stages = rest.split("s")
        if int(rows) <= max(16, heads):
            tiles.append(mla_decode.DecodeConfig(int(rows), 1, int(keys), int(warps), int(stages)))
    return tiles


def tile_name(tile) -> str:
    return f"{tile.block_h}x{tile.block_n} w{tile.num_warps} s{tile.num_stages}"


# -------------------------------------------------------------------------------------------------------- output


def print_table():
    print()
    row("part", "case", "model", "figure", "x hf", "other figures")
    for r in RECORDS:
        if r["part"] == "tuning":
            continue
        if r["part"] == "check":
            row("check", r["case"], "ours vs hf", "PASS" if r["passed"] else "FAIL", "",
                f"max|diff| forward {r['forward_max_abs_diff']:.3g}, decode step {r['decode_step_max_abs_diff']:.3g} "
                f"(max|logit| {r['max_abs_logit']:.3g}, tolerance {r['tolerance']:.3g})")
        elif "error" in r:
            row(r["part"], r["case"], r["model"], "ERROR", "", r["error"][:120])
        else:
            key, ratios = next(k for k in MAIN if k in r), r["vs_hf"]
            shown = {"part", "case", "model", "vs_hf", key}
            other = ", ".join(f"{k} {v}" + (f" ({ratios[k]:.2f}x)" if k in ratios and r["model"] != "hf" else "")
                              for k, v in r.items() if k not in shown and v is not None and not isinstance(v, dict))
            row(r["part"], r["case"], r["model"], f"{r[key]:,.5g} {key.replace('_per_s', '/s')}",
                f"{ratios[key]:.2f}" if key in ratios else "-", other)
    print("x hf: this figure / the same figure of the hf row of the same case, measured in this run "
          "(higher is better for /s, lower for ms and GiB)")


def run_parts(parts: dict, names: list[str], records: list, *part_args):
    """Each named part in turn, seeded alike; a part that fails is recorded as an error and the next one runs."""
    for name in names:
        start = time.perf_counter()
        torch.manual_seed(0)
        try:
            parts[name](*part_args)
        except Exception as error:
            traceback.print_exc()
            records.append(dict(part=name, case="(whole part)", model="-", error=describe(error), vs_hf={}))
        free()
        print(f"[{name}: {time.perf_counter() - start:.1f} s]", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="check,train,generate,decode", help="comma-separated subset")
    parser.add_argument("--steps", type=int, default=5, help="timed iterations (median); decode uses max(steps, 10)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gen-runs", type=int, default=3, help="timed generate runs per model (median)")
    parser.add_argument("--with-eager", action="store_true", help="also time eager experts (slow on a GPU)")
    parser.add_argument("--profile-generate", action="store_true",
                        help="print a torch.profiler table of our fastest generate path (32 new tokens)")
    parser.add_argument("--profile-train", action="store_true",
                        help="profile one more training step of our fastest row (what pretraining runs; grouped_mm "
                             "without CUDA): time share per category (routed experts, attention, other GEMMs, the "
                             "rest) and the busiest kernels")
    parser.add_argument("--train-compile-modes", default="reduce-overhead,reduce-overhead+coordinate_descent_tuning",
                        help="train part: also time the fused, compiled, chunked-loss row with its layers compiled in "
                             "each of these torch.compile modes, comma-separated (reduce-overhead: each layer's "
                             "forward and backward replayed from CUDA graphs; empty for none); a mode may carry "
                             "inductor options set to True after '+' (coordinate_descent_tuning: inductor retunes its "
                             "kernels' block sizes, what TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 turns on for "
                             "`pretrain --torch_compile`; ~2 min more of first compilation)")
    parser.add_argument("--step-compile-mode", default="reduce-overhead",
                        help="step part: the torch.compile mode of the layers, with inductor options after '+' as "
                             "in --train-compile-modes (empty: torch.compile's default; none: not compiled)")
    parser.add_argument("--step-runs", type=int, default=3, help="step part: runs of --steps back-to-back steps")
    parser.add_argument("--train-graph-compile-modes", default="default",
                        help="train part: also time the fused, compiled, chunked-loss row replayed from one CUDA "
                             "graph a step (`pretrain --cuda_graph`) with its layers compiled in each of these "
                             "torch.compile modes, as in --train-compile-modes but without CUDA graphs of their own "
                             "(default, max-autotune-no-cudagraphs; empty for none)")
    parser.add_argument("--step-cuda-graph", action="store_true",
                        help="step part: replay the step from one CUDA graph (`pretrain --cuda_graph`; give a "
                             "--step-compile-mode without CUDA graphs of its own, e.g. default)")
    parser.add_argument("--step-compile-whole-model", action="store_true",
                        help="step part: compile the whole model as one region (one forward and one backward graph, "
                             "fewer guard checks and graph launches a step) instead of layer by layer")
    parser.add_argument("--profile-top", type=int, default=40, help="how many of the busiest kernels --profile-train "
                                                                      "lists")
    parser.add_argument("--profile-decode", action="store_true",
                        help="print a torch.profiler table of ten compiled static-cache decode steps of each layer "
                             "(kernels launched eagerly: where the layer's time goes)")
    parser.add_argument("--decode-tiles", default="",
                        help="decode part: also time the compiled, graphed layer with each of these MLA kernel tiles, "
                             "comma-separated heads x keys, warps, stages (e.g. 64x32w16s3,16x64w8s2)")
    parser.add_argument("--decode-compile-modes", default="",
                        help="decode part: also time the graphed layer compiled with each of these torch.compile "
                             "modes, comma-separated (e.g. max-autotune-no-cudagraphs: inductor tunes the GEMMs)")
    parser.add_argument("--small", action="store_true", help="tiny shapes: a CPU smoke test in well under a minute")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # CPU: fp32, no fused AdamW
    shapes = SMALL if args.small else FULL
    transformers.logging.set_verbosity_error()
    env = dict(part="env", torch=torch.__version__, transformers=transformers.__version__, dtype=str(dtype),
               device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", args=vars(args))
    print(json.dumps(env), flush=True)
    parts = {"check": part_check, "train": part_train, "step": part_step, "generate": part_generate,
             "decode": part_decode}
    run_parts(parts, args.parts.split(","), RECORDS, shapes, args, dev, dtype)
    if "modeling_moe.kernels.fused_moe_ops" in sys.modules:  # MOE_FUSED_AUTOTUNE=1: which expert tiles won
        tuning = dict(part="tuning", log=sys.modules["modeling_moe.kernels.fused_moe_ops"].TUNING_LOG)
        RECORDS.append(tuning)
        print(json.dumps(tuning), flush=True)
    print_table()
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "bench_model.jsonl")
    with open(path, "w") as f:
        for record in [env] + RECORDS:
            f.write(json.dumps(record) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

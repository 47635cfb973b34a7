"""Fine-tuning through TRL: modeling_moe.MoEForCausalLM against transformers' own DeepseekV3ForCausalLM, same shapes,
same random weights, same data, same run.

Parts (`--parts`, default both):
  sft   TRL's SFTTrainer on a fixed-length synthetic token dataset (the 1.26B model, batch 8 x 2048): tokens/s and peak
        memory of a training step, for LoRA (the `trainers.sft` preset `all`: attention, shared experts and, through
        PEFT's `target_parameters`, every routed expert) and full fine-tuning.
  grpo  TRL's GRPOTrainer (transformers generate, no vLLM), LoRA as above, 4 prompts x 8 generations, prompt 128
        tokens, exactly 256 completion tokens (min_new_tokens = max): step time and rollout tokens/s.

Rows (`--sft-variants`, `--grpo-variants`):
  hf                     transformers' DeepseekV3ForCausalLM, grouped_mm experts, PEFT targets picked by the same
                         `trainers.sft.moe_lora_config` (identical module and parameter names). It is the anchor: every
                         figure is also given as a ratio to the hf row of its case, measured in this run.
  ours-fused             MoEForCausalLM, experts_implementation="fused" (Triton on CUDA; the reference on a CPU).
  ours-grouped_mm        MoEForCausalLM, grouped_mm experts.
  ours-fused-graphs      GRPO only: ours with `trainers.grpo.use_cuda_graph_rollouts`: rollouts through the static
                         latent cache with the decode step in CUDA graphs; with these LoRA targets (routed experts'
                         parameters, which PEFT parametrizes during each forward) on a merged copy of the policy,
                         refreshed after each optimizer step (`trainers.rollout.MergedRolloutModel`).
  ours-fused-graphs-fresh-cache
                         GRPO only: as ours-fused-graphs with a new static cache per rollout (reuse_static_cache
                         False): the buffers move between rollouts, so the captured CUDA graphs are recorded again.
  ours-fused-aux         GRPO only: ours with TRL's router load-balancing loss on (router_aux_loss_coef 0.001), which
                         transformers' DeepseekV3 cannot run; every other row has it off.
Ours run with `trainers.sft.ExpertBiasCallback` (the expert-load statistics that `trainers/sft.py` and
`trainers/grpo.py` read after each step; the biases stay fixed). Both models load one random state dict (N(0, 0.02),
`bench_model.random_state`), so they route alike and their losses match; LoRA rows must have the same number of
trainable parameters as the hf row (PEFT's v4 -> v5 target rewrite for the deepseek_v3 model type is held off, see
`exact_peft_targets`).

Timing: a TrainerCallback synchronises the device and stamps the end of every optimizer step; the warm-up steps (3 for
SFT, 1 for GRPO: Triton compilation, optimizer state, allocator growth) are dropped and the median of the others
(8 for SFT, 2 for GRPO) is reported.
Rollout time is the synchronised wall time of GRPOTrainer._generate_single_turn (the transformers `generate` call) in
the timed steps. Peak memory is torch.cuda.max_memory_allocated over the whole `trainer.train()`. bf16 on a GPU (TRL's
default), float32 on a CPU. Gradient checkpointing is TRL's default (on) unless `--no-gradient-checkpointing`.

Output: a table on stdout, JSON lines in $OUT/bench_finetune.jsonl and a markdown table in $OUT/bench_finetune.md
(benchmarks/out/ when OUT is unset). `--small`: tiny shapes on the CPU, a smoke test in well under a minute.
"""
import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time

# One process, one GPU: on a host with several, transformers' Trainer would wrap the model in nn.DataParallel, which
# TRL's GRPOTrainer refuses. Set before torch initialises CUDA; an explicit CUDA_VISIBLE_DEVICES wins.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")

import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_model as bm  # noqa: E402  (puts this checkout first on sys.path, registers MoEConfig)
from bench_model import build, configs, free, meta_model, peak_gib, random_state, sig, sync  # noqa: E402

import datasets  # noqa: E402
import peft  # noqa: E402
import trl  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

from modeling_moe.trainers import grpo as moe_grpo  # noqa: E402
from modeling_moe.trainers import sft as moe_sft  # noqa: E402
from modeling_moe.trainers.rewards import completion_text, format_reward  # noqa: E402

FULL = dict(model=bm.MODEL, sft=dict(batch=8, seq=2048, warmup=3, steps=8),
            grpo=dict(prompts=4, generations=8, prompt_len=128, completion_len=256, warmup=1, steps=2))
SMALL = dict(model=bm.SMALL_MODEL, sft=dict(batch=2, seq=32, warmup=1, steps=2),
             grpo=dict(prompts=2, generations=4, prompt_len=8, completion_len=8, warmup=1, steps=1))
SFT_VARIANTS = ("hf", "ours-fused", "ours-grouped_mm", "hf-full", "ours-fused-full")
GRPO_VARIANTS = ("hf", "ours-fused", "ours-fused-graphs", "ours-fused-graphs-fresh-cache", "ours-fused-aux",
                 "ours-grouped_mm")
AUX_COEF = 0.001
MAIN = {"sft": "tokens_per_s", "grpo": "step_s"}
SPECIAL = ["<s>", "</s>", "<pad>", "<unk>"]  # ids 0 and 1 are the configs' bos / eos
RECORDS = []


def synthetic_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """One word per token (`w4` ... `w<vocab-1>`, split on whitespace): a text of n words is exactly n tokens."""
    vocab = {token: i for i, token in enumerate(SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def random_words(gen: torch.Generator, vocab_size: int, rows: int, length: int) -> torch.Tensor:
    return torch.randint(len(SPECIAL), vocab_size, (rows, length), generator=gen)


def even_share(completions, **kwargs) -> list[float]:
    """Synthetic reward with some spread (the share of even token ids), so that GRPO's advantages are not all zero."""
    texts = [completion_text(c).split() for c in completions]
    return [sum(w[1:].isdigit() and int(w[1:]) % 2 == 0 for w in words) / max(len(words), 1) for words in texts]


@contextlib.contextmanager
def exact_peft_targets():
    """Keep PEFT from rewriting the LoRA targets of transformers' `deepseek_v3` model type.

    For checkpoints trained under transformers v4, PEFT (0.21) maps every target whose name ends in `gate_proj`,
    `up_proj` or `down_proj` onto the v5 fused routed experts of a few model types, deepseek_v3 among them, so that
    `mlp.shared_experts.*_proj` silently lose their adapters on transformers' DeepseekV3 (ours, another model type, is
    untouched). Turned off while the trainers wrap the models, so that both get the same adapters (checked: the
    trainable parameter counts must match)."""
    try:
        from peft.utils import transformers_weight_conversion as conversion

        original = conversion.convert_peft_config_for_transformers
    except (ImportError, AttributeError):
        yield
        return
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original


class StepTimer(TrainerCallback):
    """Synchronised wall time between the ends of consecutive optimizer steps (the first from the start of train)."""

    def __init__(self, dev):
        self.dev, self.times, self.last, self.step = dev, [], None, None

    def on_train_begin(self, args, state, control, **kwargs):
        sync(self.dev)
        self.last = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step  # the optimizer step now running (0-based)

    def on_step_end(self, args, state, control, **kwargs):
        sync(self.dev)
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now


def lora_config(model, full: bool):
    """`trainers/sft.py`'s LoRA targets for this model (preset `all`, TRL's default r 16 / alpha 32, experts r 4); it
    reads module and parameter names only, so transformers' DeepseekV3 gets the equivalent targets."""
    if full:
        return None
    config = moe_sft.moe_lora_config(model, moe_sft.MoEModelConfig(use_peft=True))
    assert config.target_parameters, "no routed-expert parameters found to target"
    return config


def variant_model(name, cfgs, state, dev, dtype):
    """(model, is_ours) for a variant name: `hf...` builds transformers' class, `ours-<impl>...` ours."""
    hf_cfg, our_cfg = cfgs
    if name.startswith("hf"):
        return build(hf_cfg, "grouped_mm", state, dev, dtype), False
    impl = "fused" if "fused" in name else "grouped_mm"
    return build(our_cfg, impl, state, dev, dtype), True


def common_args(args, dev, max_steps) -> dict:
    return dict(output_dir=tempfile.mkdtemp(prefix="bench_finetune-"), max_steps=max_steps, bf16=dev.type == "cuda",
                gradient_checkpointing=args.gradient_checkpointing, use_cpu=dev.type == "cpu",
                logging_steps=max_steps, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
                dataloader_num_workers=0)


def timed_train(trainer, timer, dev, warmup):
    """(timed step seconds, peak GiB, mean training loss) of `trainer.train()`."""
    free()
    output = trainer.train()
    peak = peak_gib(dev)
    timed = timer.times[warmup:]
    assert timed, f"no timed steps ({len(timer.times)} steps, {warmup} warm-up)"
    return timed, peak, sig(output.training_loss)


def trainable(trainer) -> int:
    return sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------------------- parts


def part_sft(S, args, dev, dtype):
    P = S["sft"]
    batch, seq, warmup, steps = P["batch"], P["seq"], P["warmup"], P["steps"]
    cfgs = configs(S["model"], max_positions=seq + 64)
    vocab = cfgs[0].vocab_size
    state = random_state(meta_model(cfgs[0], dtype), dev)
    tokenizer = synthetic_tokenizer(vocab)
    gen = torch.Generator().manual_seed(0)
    ids = random_words(gen, vocab, batch * (warmup + steps), seq).tolist()
    dataset = datasets.Dataset.from_dict({"input_ids": ids})

    def run(name):
        full = name.endswith("-full")
        model, ours = variant_model(name, cfgs, state, dev, dtype)
        peft_config = lora_config(model, full)
        if full and ours:
            moe_sft.freeze_unused_modules(model)
        timer = StepTimer(dev)
        callbacks = ([moe_sft.ExpertBiasCallback()] if ours else []) + [timer]
        config = SFTConfig(**common_args(args, dev, warmup + steps), per_device_train_batch_size=batch,
                           max_length=seq, learning_rate=1e-4 if peft_config else 1e-5, router_aux_loss_coef=0.0)
        with exact_peft_targets():
            trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                 peft_config=peft_config, callbacks=callbacks)
        times, peak, loss = timed_train(trainer, timer, dev, warmup)
        step = statistics.median(times)
        result = dict(step_ms=sig(step * 1e3), tokens_per_s=sig(batch * seq / step), peak_gib=peak,
                      trainable_params=trainable(trainer), loss=loss, timed_steps=len(times))
        del trainer, model
        free()
        return result

    names = [v for v in args.sft_variants if v in SFT_VARIANTS]
    lora = {label(v): bm.measure(run, v) for v in names if not v.endswith("-full")}
    full = {label(v): bm.measure(run, v) for v in names if v.endswith("-full")}
    info = dict(batch=batch, seq=seq, gradient_checkpointing=args.gradient_checkpointing)
    if lora:
        report("sft", f"LoRA (preset all) B{batch}xS{seq}", lora, **info)
    if full:
        report("sft", f"full fine-tune B{batch}xS{seq}", full, **info)


def part_grpo(S, args, dev, dtype):
    P = S["grpo"]
    n_gen, new, warmup, steps = P["generations"], P["completion_len"], P["warmup"], P["steps"]
    batch = P["prompts"] * n_gen
    cfgs = configs(S["model"], max_positions=P["prompt_len"] + new + 64)
    vocab = cfgs[0].vocab_size
    state = random_state(meta_model(cfgs[0], dtype), dev)
    tokenizer = synthetic_tokenizer(vocab)
    tokenizer.padding_side = "left"
    gen = torch.Generator().manual_seed(1)
    words = random_words(gen, vocab, P["prompts"] * (warmup + steps), P["prompt_len"])
    dataset = datasets.Dataset.from_dict({"prompt": [" ".join(f"w{i}" for i in row) for row in words.tolist()]})

    def run(name):
        model, ours = variant_model(name, cfgs, state, dev, dtype)
        peft_config = lora_config(model, full=False)
        timer = StepTimer(dev)
        callbacks = ([moe_sft.ExpertBiasCallback()] if ours else []) + [timer]
        config = GRPOConfig(**common_args(args, dev, warmup + steps), per_device_train_batch_size=batch,
                            num_generations=n_gen, max_completion_length=new, learning_rate=1e-5, beta=0.0,
                            generation_kwargs={"min_new_tokens": new},  # fixed length: no early EOS
                            router_aux_loss_coef=AUX_COEF if name.endswith("-aux") else 0.0)
        with exact_peft_targets():
            trainer = GRPOTrainer(model=model, reward_funcs=[format_reward, even_share], args=config,
                                  train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
                                  callbacks=callbacks)
        if "-graphs" in name:
            rollout = moe_grpo.use_cuda_graph_rollouts(trainer)
            (rollout.model if rollout is not None else model).reuse_static_cache = not name.endswith("-fresh-cache")
        rollouts = []  # (global step, seconds, completion tokens)
        generate = trainer._generate_single_turn

        def timed_generate(*a, **k):
            last = args.profile_rollout and timer.step == warmup + steps - 1
            with (bm.profiled(f"{name} rollout of step {timer.step}") if last else contextlib.nullcontext()):
                sync(dev)
                start = time.perf_counter()
                out = generate(*a, **k)
                sync(dev)
                seconds = time.perf_counter() - start
            rollouts.append((timer.step, seconds, sum(len(c) for c in out[0])))
            if args.profile_rollout:
                print(f"[rollout] {name} step {timer.step}: {seconds:.2f} s; dynamo/inductor counters "
                      f"{compile_counters()}", flush=True)
            return out

        trainer._generate_single_turn = timed_generate
        times, peak, loss = timed_train(trainer, timer, dev, warmup)
        timed = [r for r in rollouts if r[0] >= warmup]
        assert timed, f"no rollout in the timed steps: {rollouts}"
        gen_s = sum(r[1] for r in timed)
        tokens = sum(r[2] for r in timed)
        step = statistics.median(times)
        result = dict(step_s=sig(step), rollout_tokens_per_s=sig(tokens / gen_s),
                      rollout_s_per_step=sig(gen_s / len(times)),
                      rest_s_per_step=sig(sum(times) / len(times) - gen_s / len(times)),
                      completion_tokens_per_step=tokens // len(times), peak_gib=peak,
                      trainable_params=trainable(trainer), loss=loss, timed_steps=len(times),
                      aux_loss=trainer.aux_loss_enabled)
        assert tokens == len(times) * batch * new, f"completions of varying length: {tokens} tokens, {len(times)} steps"
        del trainer, model
        free()
        return result

    names = [v for v in args.grpo_variants if v in GRPO_VARIANTS]
    rows = {label(v): bm.measure(run, v) for v in names}
    report("grpo", f"LoRA, {P['prompts']} prompts x {n_gen} gen, prompt {P['prompt_len']} +{new}", rows,
           gradient_checkpointing=args.gradient_checkpointing)


def compile_counters() -> dict:
    """torch.compile's running totals that tell a recompilation or a CUDA-graph re-recording from a replay."""
    from torch._dynamo.utils import counters

    return {f"{group}.{key}": value for group in ("stats", "inductor", "graph_break")
            for key, value in counters[group].items() if value}


def label(variant: str) -> str:
    """The anchor row is called "hf" in every case (ratios divide by it)."""
    return "hf" if variant in ("hf", "hf-full") else variant.removesuffix("-full")


# -------------------------------------------------------------------------------------------------------- output


def report(part: str, case: str, rows: dict, **info):
    """One record per row; `vs_hf` divides each number by the same number of the "hf" row of this case."""
    anchor = rows.get("hf", {})
    for model, metrics in rows.items():
        ratios = {key: round(value / anchor[key], 3) for key, value in metrics.items()
                  if isinstance(value, (int, float)) and not isinstance(value, bool) and anchor.get(key)
                  and key not in NO_RATIO}
        if "step_s" in ratios:  # GRPO's target is phrased as a speed-up: hf step time / this step time
            ratios["step_speedup"] = round(1 / ratios["step_s"], 3)
        RECORDS.append(dict(part=part, case=case, model=model, **info, **metrics, vs_hf=ratios))


NO_RATIO = {"timed_steps", "completion_tokens_per_step", "loss"}
COLUMNS = {"sft": [("tokens_per_s", "tokens/s"), ("step_ms", "step ms"), ("peak_gib", "peak GiB"),
                   ("trainable_params", "trainable"), ("loss", "loss")],
           "grpo": [("step_s", "step s"), ("step_speedup", "step speed-up vs hf"),
                    ("rollout_tokens_per_s", "rollout tokens/s"),
                    ("rollout_s_per_step", "rollout s/step"), ("rest_s_per_step", "rest s/step"),
                    ("peak_gib", "peak GiB"), ("trainable_params", "trainable"), ("loss", "loss")]}


def cell(record, key):
    if key == "step_speedup":
        value = record["vs_hf"].get(key)
        return "-" if value is None else f"{value:.2f}x"
    value = record.get(key)
    if value is None:
        return "-"
    text = f"{value:,}" if isinstance(value, int) else f"{value:,.4g}"
    ratio = record["vs_hf"].get(key)
    return text if record["model"] == "hf" or ratio is None else f"{text} ({ratio:.2f}x)"


def markdown(env) -> str:
    lines = [f"# bench_finetune: {env['device']}, torch {env['torch']}, transformers {env['transformers']}, "
             f"trl {env['trl']}, peft {env['peft']}, {env['dtype']}", "",
             "(x): ratio to the hf row (transformers' DeepseekV3ForCausalLM, grouped_mm experts, same weights and "
             "targets) of the same case, measured in this run.", ""]
    for part in ("sft", "grpo"):
        records = [r for r in RECORDS if r["part"] == part]
        if not records:
            continue
        heads = [title for _, title in COLUMNS[part]]
        lines += [f"## {part}", "", "| case | model | " + " | ".join(heads) + " |",
                  "|---|---|" + "---|" * len(heads)]
        for r in records:
            cells = [r.get("error", "")[:160]] + [""] * (len(heads) - 1) if "error" in r else \
                [cell(r, key) for key, _ in COLUMNS[part]]
            lines.append(f"| {r['case']} | {r['model']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def print_table():
    print()
    for r in RECORDS:
        if "error" in r:
            figure, other = "ERROR", r["error"][:140]
        else:
            key = MAIN[r["part"]]
            figure = f"{r[key]:,.5g} {key.replace('_per_s', '/s').replace('step_s', 's/step')}"
            ratio = r["vs_hf"].get(key)
            figure += f" ({ratio:.2f}x)" if ratio is not None and r["model"] != "hf" else ""
            other = ", ".join(f"{k} {cell(r, k)}" for k, _ in COLUMNS[r["part"]] if k != key)
        print(f"{r['part']:<6}{r['case']:<48}{r['model']:<17}{figure:>26}  {other}")
    print("(x): this figure / the same figure of the hf row of the same case, measured in this run "
          "(higher is better for /s, lower for s, ms and GiB)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="sft,grpo", help="comma-separated subset")
    parser.add_argument("--sft-variants", default=",".join(SFT_VARIANTS), help=f"subset of {','.join(SFT_VARIANTS)}")
    parser.add_argument("--grpo-variants", default="hf,ours-fused,ours-fused-graphs,ours-fused-aux",
                        help=f"subset of {','.join(GRPO_VARIANTS)}")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                        help="TRL turns gradient checkpointing on by default; this turns it off for every row")
    parser.add_argument("--sft-steps", type=int, help="timed SFT steps (default 8; 2 with --small)")
    parser.add_argument("--grpo-steps", type=int, help="timed GRPO steps (default 2; 1 with --small)")
    parser.add_argument("--profile-rollout", action="store_true",
                        help="profile the last timed GRPO rollout (top ops by device and host time) and print "
                             "torch.compile's counters after every rollout (recompilations, CUDA-graph recordings)")
    parser.add_argument("--small", action="store_true", help="tiny shapes on the CPU: a smoke test")
    parser.add_argument("--device", default=None, help="default: cuda when available (cpu with --small)")
    args = parser.parse_args()
    args.sft_variants = args.sft_variants.split(",")
    args.grpo_variants = args.grpo_variants.split(",")
    for given, known in ((args.sft_variants, SFT_VARIANTS), (args.grpo_variants, GRPO_VARIANTS)):
        unknown = set(given) - set(known) - {""}
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; choose from {','.join(known)}")
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.small else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dev.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes: one thread is fastest, and stays so on a shared, busy CPU
    shapes = copy.deepcopy(SMALL if args.small else FULL)
    for part, steps in (("sft", args.sft_steps), ("grpo", args.grpo_steps)):
        if steps:
            shapes[part]["steps"] = steps
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out_dir, exist_ok=True)
    import pyarrow

    env = dict(part="env", torch=torch.__version__, transformers=transformers.__version__, trl=trl.__version__,
               peft=peft.__version__, datasets=datasets.__version__, pyarrow=pyarrow.__version__, dtype=str(dtype),
               device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", args=vars(args),
               shapes={k: v for k, v in shapes.items() if k != "model"}, model=shapes["model"])
    print(json.dumps(env), flush=True)
    parts = {"sft": part_sft, "grpo": part_grpo}
    bm.run_parts(parts, args.parts.split(","), RECORDS, shapes, args, dev, dtype)
    print_table()
    path = os.path.join(out_dir, "bench_finetune.jsonl")
    with open(path, "w") as f:
        for record in [env] + RECORDS:
            f.write(json.dumps(record) + "\n")
    with open(os.path.join(out_dir, "bench_finetune.md"), "w") as f:
        f.write(markdown(env))
    print(f"\nwrote {path} and bench_finetune.md")
    return 1 if any("error" in r for r in RECORDS) else 0


if __name__ == "__main__":
    sys.exit(main())

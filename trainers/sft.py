"""Supervised fine-tuning (LoRA or full) of modeling_moe models with TRL's SFTTrainer, on the reasoning SFT data.

    python -m modeling_moe.trainers.sft --model_name_or_path outputs/demo/model --use_peft --output_dir outputs/sft
    accelerate launch -m modeling_moe.trainers.sft --config recipe.yaml

Every flag of TRL's `SFTConfig` (`--max_steps`, `--learning_rate`, `--per_device_train_batch_size`, `--max_length`,
`--logging_steps`, `--report_to`, ...) and `ModelConfig` (`--model_name_or_path`, `--use_peft`, `--lora_r`,
`--lora_alpha`, `--lora_target_modules`, `--lora_target_parameters`, `--dtype`, ...) works, plus `--config file.yaml`
(TRL's `TrlParser`). Full fine-tuning unless `--use_peft`.

LoRA targets (`--lora_preset`; an explicit `--lora_target_modules` / `--lora_target_parameters` replaces the
corresponding part of the preset):

- `attention`: the attention projections of the main layers: MLA `q_proj` (or `q_a_proj`/`q_b_proj`),
  `kv_a_proj_with_mqa`, `kv_b_proj`, `o_proj`; GQA `q_proj`, `k_proj`, `v_proj`, `o_proj`. Rank `--lora_r`.
- `attention+shared`: also the shared experts (`mlp.shared_experts.{gate,up,down}_proj`; the dense layers' `mlp.*`
  are left alone). Rank `--lora_r`.
- `all` (default): also the routed experts through PEFT's `target_parameters` (`mlp.experts.gate_up_proj`,
  `mlp.experts.down_proj`): every expert gets its own rank `--lora_expert_r` adapter (default `lora_r // 4`, at least
  1, with alpha scaled so that alpha / r is the same as elsewhere), since each expert sees only k / E of the tokens.
  Parameter targets need `lora_dropout=0`, the default here.

The router, the norms, the embeddings, the output head and the multi-token-prediction modules are never targeted (TRL's
fused loss does not run the MTP modules, so full fine-tuning freezes them too).

MoE specifics: with `router_aux_loss_coef > 0` (in the model config or as `--router_aux_loss_coef`) TRL adds its
load-balancing loss (`output_router_logits` and `num_experts` come from our config). The aux-loss-free expert biases
stay fixed unless `--update_expert_bias` (see `ExpertBiasCallback`); the expert-load imbalance (MaxVio) is logged as
`moe/maxvio` either way.

`--model_name_or_path` is a model folder (with this package imported, `AutoModelForCausalLM` maps it to
`MoEForCausalLM`; the helpers also take a model loaded through its own code with `trust_remote_code=True`) or a preset
name (`tiny`, ...: a randomly initialised model with the preset's tokenizer).
The data is `--task` (see `modeling_moe.trainers.reasoning_data`): reasoning-gym tasks (`gsm`, `countdown`,
`arithmetic`, comma-separated for a mixture) or a local dataset file in one of TRL's formats.

Outputs in `--output_dir`: the adapter (`adapter_model.safetensors`, `adapter_config.json`) or the full model, the
tokenizer with its chat template, `trainer_state.json`, and with `--save_merged_model` a plain merged checkpoint in
`output_dir/merged` (loads without PEFT, and with `trust_remote_code=True` without this package);
`accuracy.json` when `--accuracy_eval_samples` > 0 (held-out accuracy before and after training), and
`log_history.jsonl` (each log record as it is logged). `--max_train_seconds` ends training at a time budget, and
`--eval_task` takes the held-out set from local files (for machines without reasoning-gym).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass, field

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config

from .reasoning_data import SYSTEM_PROMPT, build_datasets, dump_json, evaluate_accuracy, set_chat_template

logger = logging.getLogger("modeling_moe.trainers.sft")

# PEFT checks `rank_pattern` / `alpha_pattern` keys against the targeted modules only, not the targeted parameters, and
# warns that our per-expert rank pattern matched nothing, although it is applied.
warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match")

ATTENTION_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "k_proj", "v_proj",
                         "o_proj")
SHARED_EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
LORA_PRESETS = {
    "attention": ("attention",),
    "attention+shared": ("attention", "shared"),
    "all": ("attention", "shared", "experts"),
}
# Main decoder layers only: `model.layers.<i>.`, never `model.mtp_layers.<i>.`.
_LAYER = r"(?:.*\.)?layers\.\d+\."


# ----------------------------------------------------------------------------------------------------- arguments


@dataclass
class MoEModelConfig(ModelConfig):
    """TRL's `ModelConfig` with this architecture's LoRA presets, and `lora_dropout=0` by default (PEFT's parameter
    targets, i.e. the routed experts, require it)."""

    model_name_or_path: str | None = field(
        default="tiny",
        metadata={"help": "A model folder, or a preset name (tiny, moe-100m, ...) for a randomly initialised model."},
    )
    lora_dropout: float = field(
        default=0.0, metadata={"help": "LoRA dropout; must be 0 when the routed experts are targeted."}
    )
    lora_preset: str = field(
        default="all",
        metadata={"help": "LoRA targets: 'attention', 'attention+shared' or 'all' (+ routed experts). Explicit "
                          "--lora_target_modules / --lora_target_parameters replace the matching part.",
                  "choices": list(LORA_PRESETS)},
    )
    lora_expert_r: int | None = field(
        default=None, metadata={"help": "LoRA rank of each routed expert (default: lora_r // 4, at least 1)."}
    )
    experts_implementation: str | None = field(
        default=None, metadata={"help": "Routed experts kernel: eager, grouped_mm, ... (default: the model's)."}
    )


@dataclass
class ReasoningDataArguments:
    """Which data, and the MoE-specific switches of the SFT / GRPO scripts."""

    task: str = field(
        default="gsm,countdown,arithmetic",
        metadata={"help": "Comma-separated reasoning-gym tasks (gsm, countdown, arithmetic) and/or local dataset "
                          "files (.jsonl/.json/.parquet/.csv or a save_to_disk folder)."},
    )
    train_size: int = field(default=256, metadata={"help": "Training examples generated per task."})
    eval_size: int = field(default=64, metadata={"help": "Held-out examples generated per task (another seed)."})
    task_seed: int = field(default=0, metadata={"help": "Seed of the generated training examples."})
    task_kwargs: str | None = field(
        default=None,
        metadata={"help": 'JSON settings of the generators per task, e.g. \'{"countdown": {"max_numbers": 5}}\'.'},
    )
    system_prompt: str = field(default=SYSTEM_PROMPT, metadata={"help": "System message of every prompt."})
    update_expert_bias: bool = field(
        default=False,
        metadata={"help": "Update the aux-loss-free expert biases after each optimizer step (off: routing stays as "
                          "pretrained; the load imbalance is still logged)."},
    )
    save_merged_model: bool = field(
        default=False, metadata={"help": "With --use_peft, also save the merged model in output_dir/merged."}
    )
    accuracy_eval_samples: int = field(
        default=0, metadata={"help": "Held-out prompts answered (greedy) before and after training; 0: skip."}
    )
    accuracy_max_new_tokens: int = field(default=256, metadata={"help": "Generation budget of the accuracy eval."})
    accuracy_eval_batch_size: int = field(default=16, metadata={"help": "Prompts generated together in the accuracy "
                                                                        "eval."})
    eval_task: str | None = field(
        default=None,
        metadata={"help": "Held-out set from local dataset files (comma-separated) instead of the generated one, e.g. "
                          "files generated on a machine with reasoning-gym for one without."},
    )
    max_train_seconds: float | None = field(
        default=None,
        metadata={"help": "Stop training after the step that ends this many seconds after training began; the model "
                          "is still saved and evaluated (a fixed time budget), with a checkpoint at that step when "
                          "--save_strategy steps (--resume_from_checkpoint true continues the run)."},
    )


def default_precision() -> dict:
    """bf16 where the hardware has it (TRL's default), fp32 elsewhere (TRL's bf16 default fails on a CPU)."""
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return {"bf16": bf16}


# Where these differ from TRL's defaults: a short CPU-friendly run that stops after `max_steps` (the recipes in
# `trainers/recipes/` hold real settings), no checkpoints, no trackers.
SFT_DEFAULTS = dict(
    output_dir="outputs/sft",
    max_steps=20,
    per_device_train_batch_size=4,
    learning_rate=2e-4,
    max_length=384,
    logging_steps=5,
    save_strategy="no",
    report_to="none",
)


def make_parser() -> TrlParser:
    parser = TrlParser((ReasoningDataArguments, SFTConfig, MoEModelConfig))
    parser.set_defaults(**SFT_DEFAULTS, **default_precision())
    return add_config_option(parser)


def add_config_option(parser: TrlParser) -> TrlParser:
    """List TrlParser's `--config` in `--help` (TrlParser reads it before parsing, so this entry never parses)."""
    parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                        help="YAML file of option values (any flag above); flags on the command line override it.")
    return parser


# --------------------------------------------------------------------------------------------------------- model


def is_preset_name(name: str) -> bool:
    from modeling_moe.presets import preset_names

    return not os.path.isdir(name) and name.strip().lower().replace("_", "-") in preset_names()


def _torch_dtype(dtype):
    if dtype in (None, "auto"):
        return dtype
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_model_and_tokenizer(model_args: ModelConfig, training_args=None):
    """The model and tokenizer of `model_args.model_name_or_path` (a folder, or a preset name for a fresh model), with
    the reasoning chat template set when the tokenizer has none and a pad token."""
    from modeling_moe.presets import load_preset_config, preset_path

    name = model_args.model_name_or_path
    trust_remote_code = bool(getattr(training_args, "trust_remote_code", False))
    kwargs = dict(getattr(training_args, "model_init_kwargs", None) or {})
    kwargs.setdefault("dtype", _torch_dtype(model_args.dtype))
    if model_args.attn_implementation:
        kwargs.setdefault("attn_implementation", model_args.attn_implementation)
    experts_implementation = getattr(model_args, "experts_implementation", None)
    if experts_implementation:
        kwargs.setdefault("experts_implementation", experts_implementation)
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise ValueError("--load_in_4bit / --load_in_8bit (QLoRA) are not supported: bitsandbytes quantizes nn.Linear "
                         "layers only, while the routed experts, most of the weights, are stacked 3D parameters it "
                         "leaves in full precision (see the README). Train LoRA on the bf16 model instead.")
    if is_preset_name(name):
        dtype = kwargs.pop("dtype", None)
        config = load_preset_config(name, **{k: kwargs.pop(k) for k in ("attn_implementation",
                                                                          "experts_implementation") if k in kwargs})
        model = AutoModelForCausalLM.from_config(config, dtype=None if dtype == "auto" else dtype)
        tokenizer = AutoTokenizer.from_pretrained(preset_path(name))
    else:
        kwargs.setdefault("revision", model_args.model_revision)
        model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=trust_remote_code, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if training_args is not None:
        training_args.model_init_kwargs = None  # consumed here; TRL would warn that they are ignored
    set_chat_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def main_layer_module_names(model, suffixes) -> list[str]:
    pattern = re.compile(_LAYER + r"(?:" + "|".join(map(re.escape, suffixes)) + r")")
    return [name for name, _ in model.named_modules() if pattern.fullmatch(name)]


def lora_target_regex(parts) -> str | None:
    alternatives = []
    if "attention" in parts:
        alternatives.append(r"self_attn\.(?:" + "|".join(ATTENTION_PROJECTIONS) + ")")
    if "shared" in parts:
        alternatives.append(r"mlp\.shared_experts\.(?:" + "|".join(SHARED_EXPERT_PROJECTIONS) + ")")
    return _LAYER + "(?:" + "|".join(alternatives) + ")" if alternatives else None


def expert_parameter_names(model) -> list[str]:
    """`model.layers.<i>.mlp.experts.{gate_up_proj,down_proj}` of every MoE layer (MTP layers excluded)."""
    names = []
    for module_name in main_layer_module_names(model, ["mlp.experts"]):
        module = model.get_submodule(module_name)
        names += [f"{module_name}.{p}" for p in EXPERT_PARAMETERS
                  if isinstance(getattr(module, p, None), torch.nn.Parameter)]
    return names


def moe_lora_config(model, model_args: ModelConfig):
    """The `LoraConfig` of `model_args` (TRL's `get_peft_config`), with this architecture's preset targets filled in
    where `--lora_target_modules` / `--lora_target_parameters` are not given; None without `--use_peft`."""
    peft_config = get_peft_config(model_args)
    if peft_config is None:
        return None
    preset = getattr(model_args, "lora_preset", "all")
    if preset not in LORA_PRESETS:
        raise ValueError(f"Unknown --lora_preset {preset!r}; choose from {', '.join(LORA_PRESETS)}.")
    parts = LORA_PRESETS[preset]
    if model_args.lora_target_modules is None:
        peft_config.target_modules = lora_target_regex(parts) or []
    if model_args.lora_target_parameters is None and "experts" in parts:
        peft_config.target_parameters = expert_parameter_names(model)
    if peft_config.target_parameters:
        if peft_config.lora_dropout:
            raise ValueError(
                f"--lora_dropout {peft_config.lora_dropout}: LoRA on the routed experts (PEFT target_parameters) "
                "needs lora_dropout=0. Set --lora_dropout 0, or --lora_preset attention+shared."
            )
        expert_r = getattr(model_args, "lora_expert_r", None) or max(1, model_args.lora_r // 4)
        if expert_r != peft_config.r:
            # rank_pattern keys are matched as a suffix of the parameter's full name.
            for parameter in EXPERT_PARAMETERS:
                key = rf"mlp\.experts\.{parameter}"
                peft_config.rank_pattern[key] = expert_r
                if not peft_config.use_rslora:
                    peft_config.alpha_pattern[key] = peft_config.lora_alpha * expert_r / peft_config.r
    return peft_config


def freeze_unused_modules(model):
    """Full fine-tuning: freeze the multi-token-prediction modules, which TRL's fused loss never runs (their gradients
    would stay None, and DDP would wait for them)."""
    frozen = 0
    for name, parameter in model.named_parameters():
        if ".mtp_layers." in f".{name}" and parameter.requires_grad:
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    if frozen:
        logger.info("froze %d multi-token-prediction parameters (not used by the fine-tuning loss)", frozen)


def find_moe_model(model):
    """The module that owns `update_expert_bias` inside PEFT / accelerate wrappers, or None (not an MoE model)."""
    for module in model.modules():
        if callable(getattr(type(module), "update_expert_bias", None)):
            return module
    return None


class ExpertBiasCallback(TrainerCallback):
    """After each optimizer step, either update the aux-loss-free expert biases (`update=True`) or only read and reset
    the expert-load counters; the mean per-step MaxVio (worst layer) is added to each log as `moe/maxvio`.

    Off by default in fine-tuning and RL: the biases are routing state outside the gradient. Moving them changes which
    experts the policy uses between the rollouts and the update (GRPO's importance ratios and the reference model
    assume a fixed policy), chases a uniform load on a narrow task distribution (domain specialisation of experts is
    expected and harmless), and with LoRA they would not even be part of the saved adapter.
    """

    def __init__(self, update: bool = False):
        self.update = update
        self._maxvio: list[float] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        target = find_moe_model(model) if model is not None else None
        if target is None:
            return
        stats = target.update_expert_bias(update_speed=None if self.update else 0.0)
        if stats["maxvio"].numel():
            self._maxvio.append(stats["maxvio"].max().item())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._maxvio and state.log_history:
            value = sum(self._maxvio) / len(self._maxvio)
            state.log_history[-1]["moe/maxvio"] = value
            if logs is not None:
                logs["moe/maxvio"] = value
            self._maxvio.clear()


class SkipNonFiniteStepCallback(TrainerCallback):
    """Skips an optimizer step whose gradients hold a NaN or an infinity: their parameters' gradients are dropped
    (AdamW leaves a parameter without a gradient untouched), instead of AdamW turning its moments, and then the
    weights, into NaN for good, even at learning rate 0. Counted in the logs as `skipped_steps` (cumulative)."""

    def __init__(self):
        self.skipped = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
        if not grads or torch.stack([torch.isfinite(g).all() for g in grads]).all():  # one host sync
            return
        for parameter in model.parameters():
            parameter.grad = None
        self.skipped += 1
        logger.warning("step %d: non-finite gradients, optimizer step skipped (%d so far)", state.global_step + 1,
                       self.skipped)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.skipped and state.log_history:
            state.log_history[-1]["skipped_steps"] = self.skipped
            if logs is not None:
                logs["skipped_steps"] = self.skipped


class TimeLimitCallback(TrainerCallback):
    """Stops training at the end of the first step past `seconds` after training began, with a checkpoint there when
    checkpoints are saved every `save_steps` (as at the last step): `--resume_from_checkpoint` continues the run."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        stop = time.perf_counter() - self.start >= self.seconds
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank must stop at the same step (a rank that runs one more step waits forever in its all-reduce):
            # the first rank past the budget decides for all, as in pretraining.
            flag = torch.tensor(float(stop), device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            logger.info("--max_train_seconds %g reached: training stops at step %d", self.seconds, state.global_step)
            control.should_training_stop = True
            control.should_save = control.should_save or args.save_strategy == "steps"


class LogHistoryCallback(TrainerCallback):
    """Appends every log record (with its step) to `output_dir/log_history.jsonl` as it is logged, so that a run
    killed before `trainer_state.json` is written still leaves its curves. A run that does not resume starts the
    file over; a resumed one keeps the records up to its checkpoint's step (those after it are logged again)."""

    resuming = False

    def on_train_begin(self, args, state, control, **kwargs):
        path = os.path.join(args.output_dir, "log_history.jsonl")
        self.resuming = bool(args.resume_from_checkpoint)
        if state.is_world_process_zero and not self.resuming and os.path.exists(path):
            os.remove(path)

    def on_step_begin(self, args, state, control, **kwargs):
        # The first step of a resumed run: the checkpoint's state is loaded by now (after on_train_begin)
        path = os.path.join(args.output_dir, "log_history.jsonl")
        if self.resuming and state.is_world_process_zero and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= state.global_step]
            with open(path, "w") as f:
                f.writelines(kept)
        self.resuming = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and state.log_history:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, "log_history.jsonl"), "a") as f:
                f.write(json.dumps(state.log_history[-1], default=str) + "\n")


def metrics_before_reporting(trainer):
    """Run the callbacks that add `moe/maxvio` and `skipped_steps` to each log before the trackers' callbacks
    (`--report_to`), which `Trainer` puts ahead of the callbacks it is given and which would log the record without
    them."""
    handler = trainer.callback_handler
    ours = [cb for cb in handler.callbacks if isinstance(cb, (ExpertBiasCallback, SkipNonFiniteStepCallback))]
    handler.callbacks = ours + [cb for cb in handler.callbacks if cb not in ours]
    return trainer


def resume_argument(training_args):
    """`--resume_from_checkpoint` as `Trainer.train` takes it: a checkpoint folder, True (`true`: the last checkpoint
    in output_dir) or None (`false`); the parser reads the flag as a string, which `Trainer` would take as a path."""
    value = training_args.resume_from_checkpoint
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0", ""):
        value = value.strip().lower() in ("true", "yes", "1") or None
    training_args.resume_from_checkpoint = value  # LogHistoryCallback reads it too
    return value


def training_callbacks(data_args) -> list[TrainerCallback]:
    callbacks = [ExpertBiasCallback(update=data_args.update_expert_bias), SkipNonFiniteStepCallback(),
                 LogHistoryCallback()]
    if data_args.max_train_seconds:
        callbacks.append(TimeLimitCallback(data_args.max_train_seconds))
    return callbacks


def prepare_model_for_training(model, model_args, data_args):
    """Returns the PEFT config (None for full fine-tuning, whose unused modules get frozen)."""
    peft_config = moe_lora_config(model, model_args)
    if peft_config is None:
        freeze_unused_modules(model)
    elif data_args.update_expert_bias:
        logger.warning("--update_expert_bias with --use_peft: the expert biases are buffers of the base model, not "
                       "part of the adapter; use --save_merged_model to keep them.")
    return peft_config


def save_merged(trainer, tokenizer, output_dir: str) -> str:
    """Merge the LoRA adapter into the base weights and save a plain checkpoint (with the modeling code)."""
    merged = trainer.model.merge_and_unload()
    path = os.path.join(output_dir, "merged")
    merged.save_pretrained(path)
    tokenizer.save_pretrained(path)
    trainer.model = merged
    return path


def accuracy_eval(model, tokenizer, dataset, data_args) -> dict | None:
    """Held-out answer accuracy (greedy generation), in single-process runs only (with sharded parameters, one
    rank cannot generate alone): for multi-GPU runs, evaluate the saved model afterwards with `evaluate_accuracy`."""
    if not data_args.accuracy_eval_samples or dataset is None:
        return None
    state = PartialState()
    if state.num_processes > 1:
        logger.warning("--accuracy_eval_samples is skipped in multi-process runs; evaluate the saved model instead.")
        return None
    model.to(state.device)  # before training the model is still where it was loaded: the CPU
    return evaluate_accuracy(model, tokenizer, dataset, max_new_tokens=data_args.accuracy_max_new_tokens,
                             batch_size=data_args.accuracy_eval_batch_size, num_samples=data_args.accuracy_eval_samples)


def reachable_examples(train_dataset, training_args):
    """With `--max_steps` and without packing, a random subset of as many examples as the run can consume
    (max_steps x per-device batch x accumulation x processes): SFTTrainer tokenizes its whole dataset before the first
    step (~100 s for 60,000 chat examples), and the shuffled sampler would draw such a subset in the first epoch
    anyway. Unchanged when the dataset is smaller."""
    if training_args.max_steps <= 0 or training_args.packing:
        return train_dataset
    reachable = (training_args.max_steps * training_args.per_device_train_batch_size
                 * training_args.gradient_accumulation_steps * training_args.world_size)
    if len(train_dataset) <= reachable:
        return train_dataset
    logger.info("--max_steps %d consumes at most %d of the %d training examples: tokenizing a random %d",
                training_args.max_steps, reachable, len(train_dataset), reachable)
    return train_dataset.shuffle(seed=training_args.seed).select(range(reachable))


def parse_task_kwargs(data_args) -> dict:
    return json.loads(data_args.task_kwargs) if data_args.task_kwargs else {}


# ---------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None):
    """Run SFT with the command-line flags `argv` (default: `sys.argv[1:]`); returns the trainer."""
    data_args, training_args, model_args = make_parser().parse_args_and_config(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    set_seed(training_args.seed)  # a preset name gives a randomly initialised model

    model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    train_dataset, eval_dataset = build_datasets(
        data_args.task, data_args.train_size, data_args.eval_size, seed=data_args.task_seed,
        system_prompt=data_args.system_prompt, task_kwargs=parse_task_kwargs(data_args), eval_tasks=data_args.eval_task,
    )
    logger.info("data: %d training examples (%s), %d held-out", len(train_dataset), data_args.task,
                0 if eval_dataset is None else len(eval_dataset))
    train_dataset = reachable_examples(train_dataset, training_args)
    peft_config = prepare_model_for_training(model, model_args, data_args)
    accuracy = {"before": accuracy_eval(model, tokenizer, eval_dataset, data_args)}

    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=training_callbacks(data_args),
    )
    metrics_before_reporting(trainer)
    if peft_config is not None:
        trainable, total = trainer.model.get_nb_trainable_parameters()
        logger.info("LoRA (%s): %d trainable parameters of %d", model_args.lora_preset, trainable, total)
    trainer.train(resume_from_checkpoint=resume_argument(training_args))

    finish(trainer, tokenizer, data_args, peft_config, eval_dataset, accuracy)
    return trainer


def finish(trainer, tokenizer, data_args, peft_config, eval_dataset, accuracy: dict, plot=None):
    """Save the model / adapter, `trainer_state.json`, the optional plot, merged model and held-out accuracy."""
    output_dir = trainer.args.output_dir
    trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        trainer.state.save_to_json(os.path.join(output_dir, "trainer_state.json"))
        if plot is not None:
            plot(trainer.state.log_history, output_dir)
    if peft_config is not None and data_args.save_merged_model and trainer.is_world_process_zero():
        logger.info("merged model saved in %s", save_merged(trainer, tokenizer, output_dir))
    accuracy["after"] = accuracy_eval(trainer.model, tokenizer, eval_dataset, data_args)
    if accuracy["after"] is not None:
        dump_json(accuracy, os.path.join(output_dir, "accuracy.json"))
        logger.info("held-out accuracy %.3f -> %.3f (format %.3f -> %.3f)", accuracy["before"]["accuracy"],
                    accuracy["after"]["accuracy"], accuracy["before"]["format"], accuracy["after"]["format"])
    logger.info("saved %s", output_dir)


if __name__ == "__main__":
    main()

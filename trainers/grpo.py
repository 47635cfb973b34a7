"""Reasoning RL of modeling_moe models with TRL's GRPOTrainer and verifiable rewards.

    python -m modeling_moe.trainers.grpo --model_name_or_path outputs/sft/merged --task countdown --use_peft
    accelerate launch -m modeling_moe.trainers.grpo --config recipe.yaml

Every flag of TRL's `GRPOConfig` (`--max_steps`, `--per_device_train_batch_size`, `--num_generations`,
`--max_completion_length`, `--learning_rate`, `--beta`, `--loss_type`, `--reward_weights`, `--temperature`,
`--logging_steps`, `--report_to`, ...) and `ModelConfig` (`--model_name_or_path`, `--use_peft`, `--lora_r`, ...) works,
plus `--config file.yaml`; the LoRA presets, `--update_expert_bias` and the data flags are those of
`modeling_moe.trainers.sft`.

- `--task`: `countdown`, `gsm`, `arithmetic` (reasoning-gym, prompts in the SFT recipe's chat format), a
  comma-separated mixture, or a local dataset file with a `prompt` column (or `question`/`answer` columns).
- `--reward_funcs`: names from `modeling_moe.trainers.rewards` (`format_reward`, `countdown_reward`,
  `math_accuracy_reward`, `accuracy_reward`), TRL's (`think_format_reward`, `reasoning_accuracy_reward`,
  `get_soft_overlong_punishment`) or dotted import paths (`my_module.my_reward`); weights with `--reward_weights`.
  Default: `format_reward` (weight 0.1) + the task's correctness reward (weight 1).

MoE in RL: with `router_aux_loss_coef > 0` TRL adds its load-balancing loss to the policy loss; the aux-loss-free expert
biases stay fixed unless `--update_expert_bias` (see `sft.ExpertBiasCallback` for why).

Outputs in `--output_dir`: the adapter or the full model with the tokenizer, `trainer_state.json` (the reward history
in `log_history`), `rewards.png` (mean reward per function and completion length per step), `output_dir/merged` with
`--save_merged_model`, and `accuracy.json` with `--accuracy_eval_samples` > 0 (held-out accuracy before / after).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import set_seed
from trl import GRPOConfig, GRPOTrainer, TrlParser

from .reasoning_data import RL_SEED_OFFSET, build_datasets, parse_tasks
from .rewards import REWARD_FUNCS
from .sft import (
    MoEModelConfig,
    ReasoningDataArguments,
    accuracy_eval,
    add_config_option,
    default_precision,
    finish,
    is_preset_name,
    load_model_and_tokenizer,
    metrics_before_reporting,
    parse_task_kwargs,
    prepare_model_for_training,
    resume_argument,
    training_callbacks,
)

logger = logging.getLogger("modeling_moe.trainers.grpo")

FORMAT_WEIGHT = 0.1


@dataclass
class GRPODataArguments(ReasoningDataArguments):
    task: str = field(
        default="countdown",
        metadata={"help": "countdown, gsm, arithmetic, a comma-separated mixture, or a local dataset file."},
    )
    train_size: int = field(default=256, metadata={"help": "Training prompts generated per task."})
    eval_size: int = field(default=64, metadata={"help": "Held-out prompts generated per task (another seed)."})
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={"help": "Reward functions: names from modeling_moe.trainers.rewards or TRL, or dotted import paths. "
                          "Default: format_reward + the task's correctness reward (weights 0.1 and 1)."},
    )
    accuracy_max_new_tokens: int = field(default=128, metadata={"help": "Generation budget of the accuracy eval."})
    cuda_graph_rollouts: bool = field(
        default=False,
        metadata={"help": "Roll out through the static latent cache with the decode step compiled into CUDA graphs "
                          "(cache_implementation='static', and the compile TRL turns off turned back on): 5-6x "
                          "faster generate() on a GPU (benchmarks/RESULTS.md); without CUDA the static cache alone. With "
                          "LoRA on the routed experts' parameters (lora_preset all) the rollouts run on a merged copy "
                          "of the policy (one more copy of the weights in memory), synced after each step."},
    )


# Where these differ from TRL's defaults: a short CPU-friendly run (the recipes in `trainers/recipes/` hold real
# settings), a LoRA-sized learning rate, a log per step for the reward curve, no checkpoints, no trackers.
GRPO_DEFAULTS = dict(
    output_dir="outputs/grpo",
    max_steps=8,
    per_device_train_batch_size=8,
    num_generations=4,
    max_completion_length=48,
    learning_rate=1e-5,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
)


def make_parser() -> TrlParser:
    parser = TrlParser((GRPODataArguments, GRPOConfig, MoEModelConfig))
    parser.set_defaults(**GRPO_DEFAULTS, **default_precision())
    return add_config_option(parser)


def default_reward_funcs(task_spec: str) -> list[str]:
    tasks = parse_tasks(task_spec)
    if tasks == ["countdown"]:
        return ["format_reward", "countdown_reward"]
    if all(t in ("gsm", "arithmetic") for t in tasks):
        return ["format_reward", "math_accuracy_reward"]
    return ["format_reward", "accuracy_reward"]


def with_solution_from_answer(func):
    """TRL's accuracy rewards read the reference from a `solution` column; the reasoning datasets call it `answer`."""

    @functools.wraps(func)
    def reward(completions, solution=None, answer=None, **kwargs):
        if solution is None and answer is not None:
            solution = ["" if value is None else str(value) for value in answer]
        return func(completions, solution=solution, **kwargs)

    return reward


def resolve_reward_func(name: str, max_completion_length: int | None = None):
    """A reward function from its name: ours, TRL's (ours win the `accuracy_reward` name; TRL's is
    `trl.rewards.accuracy_reward`), or a dotted import path (`module.function`)."""
    if name in REWARD_FUNCS:
        return REWARD_FUNCS[name]
    from trl import rewards as trl_rewards

    if name == "get_soft_overlong_punishment":
        length = max_completion_length or 1280
        return trl_rewards.get_soft_overlong_punishment(max_completion_len=length, soft_punish_cache=length // 4)
    if hasattr(trl_rewards, name):
        func = getattr(trl_rewards, name)
    elif "." in name:
        module_path, attribute = name.rsplit(".", 1)
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        func = getattr(importlib.import_module(module_path), attribute)
    else:
        raise ValueError(f"Unknown reward function {name!r}: use one of {', '.join(REWARD_FUNCS)}, a TRL reward "
                         "(think_format_reward, reasoning_accuracy_reward, ...) or a dotted import path.")
    return with_solution_from_answer(func) if "solution" in inspect.signature(func).parameters else func


def use_cuda_graph_rollouts(trainer: GRPOTrainer):
    """Make `trainer`'s rollouts use the static latent cache, and let generate() compile the decode step (mode
    "reduce-overhead": CUDA graphs) on a GPU. TRL builds its GenerationConfig with disable_compile=True; the weights
    (LoRA on modules included) are updated in place by the optimizer, so the captured graphs read the current values.

    With parametrized weights (PEFT's `target_parameters` LoRA on the routed experts, e.g. `--lora_preset all`),
    whose forward swaps parameter storage and graph-breaks every layer, the rollouts go through a merged copy of the
    policy instead (`trainers.rollout.MergedRolloutModel`, returned; None otherwise): a GRPO run that captured graphs
    over the parametrized weights died with a device-side assert (benchmarks/RESULTS.md)."""
    from peft.tuners.lora import ParamWrapper  # parametrizes its parameter for the time of each forward

    from .rollout import MergedRolloutModel

    trainer.generation_config.cache_implementation = "static"
    trainer.generation_config.disable_compile = False
    parametrized = any(isinstance(module, ParamWrapper) or torch.nn.utils.parametrize.is_parametrized(module)
                       for module in trainer.model.modules())
    return MergedRolloutModel(trainer.model).attach(trainer) if parametrized else None


def plot_rewards(log_history: list[dict], path: str):
    """Mean reward (total and per function) and mean completion length per logged step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in log_history if "reward" in r]
    fig, (ax_reward, ax_length) = plt.subplots(1, 2, figsize=(10, 4))
    if records:
        steps = [r["step"] for r in records]
        ax_reward.plot(steps, [r["reward"] for r in records], "o-", label="reward (weighted sum)")
        for key in sorted({k for r in records for k in r if k.startswith("rewards/") and k.endswith("/mean")}):
            ax_reward.plot(steps, [r.get(key, float("nan")) for r in records], ".--", label=key[8:-5])
        ax_length.plot(steps, [r.get("completions/mean_length", float("nan")) for r in records], "o-")
    ax_reward.set_xlabel("step")
    ax_reward.set_ylabel("mean reward")
    ax_reward.legend(fontsize=8)
    ax_length.set_xlabel("step")
    ax_length.set_ylabel("mean completion length (tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None):
    """Run GRPO with the command-line flags `argv` (default: `sys.argv[1:]`); returns the trainer."""
    data_args, training_args, model_args = make_parser().parse_args_and_config(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    set_seed(training_args.seed)  # a preset name gives a randomly initialised model

    names = data_args.reward_funcs or default_reward_funcs(data_args.task)
    reward_funcs = [resolve_reward_func(name, training_args.max_completion_length) for name in names]
    if data_args.reward_funcs is None and training_args.reward_weights is None:
        training_args.reward_weights = [FORMAT_WEIGHT if n == "format_reward" else 1.0 for n in names]
    if training_args.beta and not model_args.use_peft and is_preset_name(model_args.model_name_or_path):
        raise ValueError("--beta > 0 without --use_peft rebuilds the reference model from a folder: pass a model "
                         "folder as --model_name_or_path, not a preset name.")

    model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    tokenizer.padding_side = "left"
    train_dataset, eval_dataset = build_datasets(
        data_args.task, data_args.train_size, data_args.eval_size, seed=data_args.task_seed,
        train_seed=data_args.task_seed + RL_SEED_OFFSET,  # prompts apart from SFT's examples of the same task_seed
        system_prompt=data_args.system_prompt, task_kwargs=parse_task_kwargs(data_args), with_completion=False,
        eval_tasks=data_args.eval_task,
    )
    logger.info("data: %d training prompts (%s), %d held-out; rewards %s", len(train_dataset), data_args.task,
                0 if eval_dataset is None else len(eval_dataset), names)
    peft_config = prepare_model_for_training(model, model_args, data_args)
    accuracy = {"before": accuracy_eval(model, tokenizer, eval_dataset, data_args)}

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=training_callbacks(data_args),
    )
    metrics_before_reporting(trainer)
    if data_args.cuda_graph_rollouts:
        use_cuda_graph_rollouts(trainer)
    trainer.train(resume_from_checkpoint=resume_argument(training_args))

    finish(trainer, tokenizer, data_args, peft_config, eval_dataset, accuracy,
           plot=lambda history, folder: plot_rewards(history, os.path.join(folder, "rewards.png")))
    rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r]
    if rewards:
        logger.info("mean reward: first step %.3f, last step %.3f", rewards[0], rewards[-1])
    return trainer


__all__ = ["GRPODataArguments", "default_reward_funcs", "main", "make_parser", "plot_rewards", "resolve_reward_func",
           "use_cuda_graph_rollouts"]


if __name__ == "__main__":
    main()

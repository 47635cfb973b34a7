r"""The reasoning recipe of issues 5 and 6 in one command: pretrain a small preset, LoRA-SFT it on the reasoning data,
then GRPO it on countdown and on gsm_symbolic; held-out accuracy after each stage, the reward curves, one summary.

    # one H200, from the repository root (about 7 minutes; see "Time" below), data pre-generated (next command);
    # the GPU image lacks trl / datasets (wheels in .whl) and this package (the -e install maps modeling_moe.trainers)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
    PYTHONPATH=/tmp/site timeout -s TERM 580 python3 benchmarks/recipe_runs.py --output_dir $OUT

    # pre-generate the reasoning data on a machine with reasoning-gym (the GPU image has none), then carry .devdata
    python benchmarks/recipe_runs.py --stages data --output_dir outputs/recipe_data

    # the same driver on the CPU: tiny preset, float32, a few steps each, tiny eval sets (~1 minute on 2 cores)
    python benchmarks/recipe_runs.py --small --output_dir /tmp/recipe_runs

Stages (`--stages`, any subset, always in this order):

data      reasoning-gym examples written as JSON lines to `--data_dir` (default .devdata/reasoning, git-ignored):
          `<task>-train.jsonl` (`--train_size` per task: SFT's examples, also in the pretraining mix),
          `<task>-eval.jsonl` (`--eval_samples` per task, another seed, no training question) and `<task>-rl.jsonl`
          (`--rl_size` per task, a third seed, none of the other questions: GRPO's prompts, never seen in
          pretraining or SFT), plus manifest.json with the settings. Files whose manifest entry matches the
          settings are reused, so on a machine without reasoning-gym this stage only checks them. The trainers read
          them through `--task <files>` and `--eval_task <files>`.
pretrain  `python -m modeling_moe.trainers.pretrain --model_config <--model>` on the corpus (`--dataset`, default
          .devdata/corpus.jsonl when it exists, else the embedded one) plus, with `--pretrain_data corpus+reasoning`
          (the default), the SFT training examples as text (the data stage writes that mix), bf16,
          `--pretrain_steps` steps or `--pretrain_max_train_seconds`; data-parallel over `--gpus`.
sft       `python -m modeling_moe.trainers.sft --config trainers/recipes/sft_lora_reasoning.yaml` from the pretrained
          model on the `--sft_tasks` training files, sizes from the flags; accuracy before (= after pretraining) and
          after, per task, on the held-out files of the GRPO tasks; merged model saved (the start of GRPO).
grpo      `python -m modeling_moe.trainers.grpo --config trainers/recipes/grpo_<task>.yaml` from the SFT model, one run
          per `--grpo_tasks` task, all at once (on one GPU, or spread over `--gpus`); accuracy before and after on the
          task's held-out file, the reward per step.

Task settings (`--task_kwargs`, the easiest honest ones for a ~100M model trained from scratch in minutes, written in
the summary): countdown with 3 numbers from 1-20 and targets 10-50 (all four operators; TinyZero: 3-4 numbers up to
100); gsm_symbolic at its only difficulty, keeping the problems solved in at most 3 steps with an answer of at most
100 (about a third of them); arithmetic (SFT only, it drills the operations gsm needs) with 2-3 terms of 1-2 digits.
Generation budgets (`--completion_tokens`): countdown 64 and gsm 128 tokens, above the longest SFT target (47 and
106 tokens). GRPO starts where SFT leaves it, so SFT has to teach the format and some answers: greedy accuracy after
SFT is GRPO's starting success rate, and a group of 8 samples at temperature 1 with at least one success is what
gives GRPO a gradient.

Time on two H200s (the defaults; --time_budget stops everything at 530 s, and every run stops training at its
--*_max_train_seconds, capped by what the budget has left, and still evaluates and saves):
  data      ~12 s (task files pre-generated; the pretraining mix is written from them)
  pretrain  ~170 s: start-up and tokenization ~40 s, training for 120 s (2 GPUs x 32 x 1024 tokens a step of
            moe-100m, 107M activated: ~190k tokens/s, ~23M tokens, about 1.5 passes over the 60k reasoning examples
            and the corpus), evaluation and save ~10 s
  sft       ~110 s: start-up ~25 s, two accuracy evals of 2 x 1000 held-out prompts (batches of 200), training for
            30 s (LoRA; pretraining has already seen these examples as text), merge and save
  grpo      the rest, one run per GPU: start-up ~25 s, evals of 1000 prompts before and after, training on the GRPO
            prompts (`<task>-rl.jsonl`, never seen in pretraining or SFT) for what the budget leaves (~0.6 s a step of
            16 prompts x 8 samples of <= 64 / 128 tokens before the rollouts reused their static cache, less since),
            merge and save

Output folder (`--output_dir`; at most `--max_output_files` files, rewritten after every stage and every
`--refresh_seconds` while one runs, so a killed driver still leaves the finished stages' figures): summary.md (the
accuracy table, the stages, settings, commands and failures with the worker's traceback), results.jsonl (a line per
stage, per task, and per GRPO step), accuracy.png (held-out accuracy per task after each stage), rewards.png (GRPO
reward per step, per task) and pretrain.loss.png. The runs write under `--work_dir` (models, launcher.log, the
trainers' accuracy.json, trainer_state.json and log_history.jsonl).

The driver only configures and launches the trainers: every figure comes from their output files.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_runs import (  # noqa: E402  (the launcher, option, reading and plotting helpers' one home)
    LIVE, NO_MULTICAST, HelpFormatter, _kill_session, _on_signal, _pyplot, _quote, _split, _tail, accelerate_launch,
    apply_size_defaults, read_jsonl,
)

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "trainers" / "recipes"
STAGES = ("data", "pretrain", "sft", "grpo")
LORA_PRESETS = ("all", "attention+shared", "attention", "none")  # none: full fine-tuning
DEFAULT_TASK_KWARGS = {
    "countdown": {"min_numbers": 3, "max_numbers": 3, "min_value": 1, "max_value": 20, "min_target": 10,
                  "max_target": 50},
    "gsm": {"max_reasoning_steps": 3, "max_answer": 100},
    "arithmetic": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
}
OUTPUT_FILES = ("summary.md", "results.jsonl", "accuracy.png", "rewards.png", "pretrain.loss.png")
REWARD_WINDOW = 10


# ------------------------------------------------------------------------------------------------------ arguments


# option: (GPU default, --small default); None in the parser means "this table decides".
SIZE_DEFAULTS = {
    "model": ("moe-100m", "tiny"),
    "train_size": (20000, 8),
    "eval_samples": (1000, 4),
    "rl_size": (8000, 8),
    "eval_batch_size": (200, 8),
    "pretrain_steps": (600, 3),
    "pretrain_batch_size": (32, 2),
    "pretrain_seq_len": (1024, 64),
    "pretrain_warmup_steps": (30, 1),
    "pretrain_dtype": ("bf16", "fp32"),
    "pretrain_max_train_seconds": (120.0, 0.0),
    "sft_steps": (400, 3),
    "sft_batch_size": (32, 4),
    "sft_max_length": (384, 256),
    "sft_max_train_seconds": (30.0, 0.0),
    "grpo_steps": (2000, 2),
    "grpo_prompts_per_step": (16, 2),
    "grpo_generations": (8, 2),
    "grpo_max_train_seconds": (240.0, 0.0),
    "grpo_cuda_graph_rollouts": ("true", "false"),
    "completion_tokens": ("countdown=64,gsm=128,arithmetic=64", "countdown=16,gsm=16,arithmetic=16"),
    "time_budget": (530.0, 600.0),
    "stage_overhead": (60.0, 0.0),
    "refresh_seconds": (20.0, 5.0),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recipe_runs.py", description=__doc__, formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--output_dir", required=True, help="Summary folder (summary.md, results.jsonl, PNGs).")
    add("--work_dir", default=os.path.join("outputs", "recipe_runs"),
        help="Stage folders (models, logs, the trainers' outputs).")
    add("--stages", default=",".join(STAGES), help=f"Comma-separated subset of {', '.join(STAGES)}, run in that order.")
    add("--small", "--dry_run", dest="small", action="store_true",
        help="CPU dry run: tiny preset, float32, a few steps each, tiny data and eval sets, the data under work_dir. "
             "Changes the defaults marked 'small:' (an explicit option still wins).")
    add("--list", action="store_true", help="Print the data plan and every stage's command, and exit.")
    add("--gpus", default="0",
        help="GPU ids: pretraining data-parallel over all of them (accelerate launch, DDP, when more than one), SFT "
             "on the first, the GRPO runs spread round robin ('' leaves CUDA_VISIBLE_DEVICES alone; ignored with "
             "--small).")
    add("--python", default=sys.executable, help="Interpreter of the launched trainers.")
    add("--seed", type=int, default=42, help="Seed of every trainer (initialisation, data order, sampling).")
    add("--pretrained_model", default=None,
        help="The model SFT starts from (default: work_dir/pretrain, the pretrain stage's output); give an existing "
             "one to resume with --stages sft,grpo.")
    add("--sft_model", default=None,
        help="The model GRPO starts from (default: the SFT stage's merged model, work_dir/sft/merged, or work_dir/sft "
             "after full fine-tuning); give an existing one to resume with --stages grpo.")
    add("--time_budget", type=float, default=None,
        help="Seconds for the whole driver: a stage gets at most what is left, and none starts with less than "
             "--stage_overhead + 10 s (default 530, inside a 10-minute GPU call; small: 600).")
    add("--stage_overhead", type=float, default=None,
        help="Seconds a run needs besides training (start-up, evals, saving): its --max_train_seconds is "
             "capped at the time left minus this (default 60; small: 0).")
    add("--refresh_seconds", type=float, default=None,
        help="While stages run, rewrite the summary this often (default 20; small: 5).")
    add("--max_output_files", type=int, default=8, help="At most this many files in output_dir.")

    group = parser.add_argument_group("data")
    add = group.add_argument
    add("--data_dir", default=None,
        help="Generated reasoning data (default .devdata/reasoning; small: work_dir/data).")
    add("--sft_tasks", default="gsm,countdown,arithmetic", help="Tasks of the SFT mixture.")
    add("--grpo_tasks", default="countdown,gsm",
        help="One GRPO run per task (trainers/recipes/grpo_<task>.yaml when it exists); their held-out files are "
             "also SFT's.")
    add("--task_kwargs", default=json.dumps(DEFAULT_TASK_KWARGS),
        help="JSON: per task, its reasoning-gym generator's settings and the filters max_reasoning_steps / "
             "max_answer (trainers/reasoning_data.py).")
    add("--train_size", type=int, default=None, help="Training examples per task (default 20000; small: 8).")
    add("--eval_samples", type=int, default=None,
        help="Held-out examples per task, all of them evaluated after each stage (default 1000; small: 4).")
    add("--rl_size", type=int, default=None,
        help="GRPO training prompts per task, disjoint from the SFT and held-out questions (default 8000; small: 8).")
    add("--data_seed", type=int, default=0,
        help="Seed of the generated training examples (held-out and GRPO prompts: other seeds derived from it).")
    add("--completion_tokens", default=None,
        help="Generation budget per task: the accuracy evals' max_new_tokens and GRPO's max_completion_length "
             "(default countdown=64,gsm=128,arithmetic=64; small: 16 each).")
    add("--eval_batch_size", type=int, default=None,
        help="Prompts generated together in the accuracy evals (default 200; small: 8).")

    group = parser.add_argument_group("pretrain")
    add = group.add_argument
    add("--model", default=None, help="hub_configs preset pretrained from scratch (default moe-100m; small: tiny).")
    add("--dataset", default=None,
        help="Pretraining corpus: the trainer's --dataset; default .devdata/corpus.jsonl when it exists, else the "
             "embedded corpus (needs gensim).")
    add("--pretrain_data", choices=("corpus", "corpus+reasoning"), default="corpus+reasoning",
        help="corpus: the corpus alone; corpus+reasoning: the corpus plus every SFT training example rendered with "
             "the chat template (in-domain text, as math-heavy pretraining mixes do; the held-out problems are "
             "another seed), written by the data stage as <data_dir>/pretrain-mix.jsonl.")
    add("--pretrain_steps", type=int, default=None,
        help="Optimizer steps (the cosine schedule's length; default 600; small: 3).")
    add("--pretrain_batch_size", type=int, default=None, help="Sequences per step and GPU (default 32; small: 2).")
    add("--pretrain_seq_len", type=int, default=None, help="Tokens per sequence (default 1024; small: 64).")
    add("--pretrain_learning_rate", type=float, default=6e-4, help="Peak learning rate (cosine).")
    add("--pretrain_warmup_steps", type=int, default=None, help="Warmup steps (default 30; small: 1).")
    add("--pretrain_dtype", choices=("bf16", "fp32"), default=None,
        help="bf16: bf16 weights and AdamW with bf16 autocast; fp32: float32 (default bf16; small: fp32).")
    add("--pretrain_max_train_seconds", type=float, default=None,
        help="Training stops after this many seconds (then evaluates and saves), capped by what the budget has left; "
             "0: no limit (default 120; small: 0).")
    add("--pretrain_timeout", type=float, default=300.0, help="Seconds before the pretraining run is killed.")

    group = parser.add_argument_group("sft")
    add = group.add_argument
    add("--sft_recipe", default=str(RECIPES / "sft_lora_reasoning.yaml"), help="TRL config file of the SFT run.")
    add("--sft_lora_preset", choices=LORA_PRESETS, default="all",
        help="LoRA targets (trainers/sft.py); none: full fine-tuning (float32 weights, bf16 autocast).")
    add("--sft_steps", type=int, default=None, help="Optimizer steps (default 400; small: 3).")
    add("--sft_batch_size", type=int, default=None, help="Sequences per step (default 32; small: 4).")
    add("--sft_learning_rate", type=float, default=5e-4,
        help="Peak learning rate (cosine; the recipe's 2e-4 is for longer runs of larger models).")
    add("--sft_max_length", type=int, default=None, help="Longest tokenized example (default 384; small: 256).")
    add("--sft_max_train_seconds", type=float, default=None,
        help="Training stops after this many seconds (then saves and evaluates); 0: no limit (default 30; small: 0).")
    add("--sft_timeout", type=float, default=300.0, help="Seconds before the SFT run is killed.")
    add("--sft_eval_samples", type=int, default=None,
        help="Held-out examples the SFT stage evaluates before and after training, all tasks together (default: "
             "every --eval_samples of each GRPO task; 0: none, the GRPO runs still measure the SFT model).")

    group = parser.add_argument_group("grpo")
    add = group.add_argument
    add("--grpo_lora_preset", choices=LORA_PRESETS, default="all",
        help="LoRA targets of the GRPO runs; none: full fine-tuning (float32 weights, bf16 autocast).")
    add("--grpo_steps", type=int, default=None,
        help="Optimizer steps, unless --grpo_max_train_seconds ends training first (default 2000; small: 2).")
    add("--grpo_prompts_per_step", type=int, default=None, help="Prompts per step (default 16; small: 2).")
    add("--grpo_generations", type=int, default=None, help="Samples per prompt (default 8; small: 2).")
    add("--grpo_learning_rate", type=float, default=1e-4,
        help="Learning rate (constant after the recipe's warmup; the recipes' 1e-4 was measured best on gsm).")
    add("--grpo_temperature", type=float, default=1.0, help="Sampling temperature of the rollouts.")
    add("--grpo_max_train_seconds", type=float, default=None,
        help="Training stops after this many seconds (then saves and evaluates); 0: no limit (default 240; small: 0).")
    add("--grpo_cuda_graph_rollouts", choices=("true", "false"), default=None,
        help="Rollouts through the static latent cache with the decode step in CUDA graphs (default true; small: "
             "false).")
    add("--grpo_pad_to_multiple_of", default="auto",
        help="TRL's pad_to_multiple_of for prompts and completions; auto: with CUDA-graph rollouts, the task's "
             "longest prompt or completion budget rounded up to 32 (from manifest.json), so that every rollout has "
             "one shape and the graphs compile once, else none; 0: no padding.")
    add("--grpo_timeout", type=float, default=330.0, help="Seconds before a GRPO run is killed.")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_size_defaults(args, SIZE_DEFAULTS)
    args.stages = _split(args.stages)
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown or not args.stages:
        parser.error(f"--stages: {f'unknown {unknown}' if unknown else 'nothing given'}; choose from "
                     f"{', '.join(STAGES)}")
    args.stages = [s for s in STAGES if s in args.stages]
    args.sft_tasks, args.grpo_tasks = _split(args.sft_tasks), _split(args.grpo_tasks)
    try:
        args.task_kwargs = json.loads(args.task_kwargs)
        args.completion_tokens = {task: int(n) for task, n in (pair.split("=") for pair in
                                                                  _split(args.completion_tokens))}
    except ValueError as error:
        parser.error(f"--task_kwargs / --completion_tokens: {error}")
    missing = [t for t in args.grpo_tasks + args.sft_tasks if t not in args.completion_tokens]
    if missing:
        parser.error(f"--completion_tokens has no budget for {', '.join(missing)}")
    if args.sft_eval_samples is not None and args.sft_eval_samples < 0:
        parser.error(f"--sft_eval_samples must be >= 0 (0: no evaluation in the SFT stage), "
                     f"got {args.sft_eval_samples}")
    if args.data_dir is None:
        args.data_dir = os.path.join(args.work_dir, "data") if args.small else os.path.join(".devdata", "reasoning")
    if args.dataset is None and Path(".devdata/corpus.jsonl").is_file():
        args.dataset = ".devdata/corpus.jsonl"
    return args


# ----------------------------------------------------------------------------------------------------------- data


def data_files(args, task: str) -> dict[str, Path]:
    return {split: Path(args.data_dir) / f"{task}-{split}.jsonl" for split in ("train", "eval", "rl")}


def data_settings(args, task: str) -> dict:
    return {"train_size": args.train_size, "eval_size": args.eval_samples, "rl_size": args.rl_size,
            "seed": args.data_seed,
            "kwargs": args.task_kwargs.get(task, {})}


def read_manifest(args) -> dict:
    return _read_json(Path(args.data_dir) / "manifest.json") or {}


def stale_tasks(args) -> list[str]:
    """The tasks whose files are missing or were generated with other settings."""
    manifest = read_manifest(args).get("tasks", {})
    tasks = list(dict.fromkeys(args.sft_tasks + args.grpo_tasks))
    return [t for t in tasks if manifest.get(t, {}).get("settings") != data_settings(args, t)
            or not all(p.is_file() for p in data_files(args, t).values())]


def generate_data(args, tasks: list[str], log) -> None:
    """Write `<task>-train.jsonl` / `<task>-eval.jsonl` / `<task>-rl.jsonl` and the task's manifest entry (with its
    longest prompt in tokens, for GRPO's padding) for each of `tasks`."""
    from transformers import AutoTokenizer

    from modeling_moe.presets import preset_path
    from modeling_moe.trainers.reasoning_data import (
        RL_SEED_OFFSET,
        build_datasets,
        generate_task_examples,
        prompt_text,
        set_chat_template,
    )

    tokenizer = set_chat_template(AutoTokenizer.from_pretrained(preset_path(args.model)))
    manifest = read_manifest(args)
    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    for task in tasks:
        settings = data_settings(args, task)
        train, evaluation = build_datasets(task, settings["train_size"], settings["eval_size"], seed=settings["seed"],
                                           task_kwargs={task: settings["kwargs"]})
        asked = {row["prompt"][-1]["content"] for split in (train, evaluation) for row in split}
        rl = generate_task_examples(task, settings["rl_size"], settings["seed"] + RL_SEED_OFFSET,
                                    exclude_questions=asked, **settings["kwargs"])
        prompts = [prompt_text(tokenizer, row["prompt"]) for split in (train, evaluation, rl) for row in split]
        for split, rows in zip(("train", "eval", "rl"), (train, evaluation, rl)):
            with open(data_files(args, task)[split], "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
        manifest.setdefault("tasks", {})[task] = {
            "settings": settings, "max_prompt_tokens": max(len(tokenizer(p)["input_ids"]) for p in prompts)}
        log(f"data: wrote {len(train)} + {len(evaluation)} + {len(rl)} {task} examples to {args.data_dir}")
    (Path(args.data_dir) / "manifest.json").write_text(json.dumps(manifest, indent=1))


def pretrain_mix_file(args) -> Path:
    return Path(args.data_dir) / "pretrain-mix.jsonl"


def pretrain_mix_settings(args) -> dict:
    return {"corpus": str(args.dataset or "embedded"), "tasks": args.sft_tasks,
            "tasks_settings": {task: data_settings(args, task) for task in args.sft_tasks}}


def write_pretrain_mix(args, log) -> bool:
    """`pretrain-mix.jsonl`: the corpus documents, then every SFT training example as chat-template text; rewritten
    only when its settings changed. Returns whether it was written."""
    from transformers import AutoTokenizer

    from modeling_moe.presets import preset_path
    from modeling_moe.trainers.data import load_corpus_texts, load_documents
    from modeling_moe.trainers.reasoning_data import set_chat_template

    manifest = read_manifest(args)
    settings = pretrain_mix_settings(args)
    if manifest.get("pretrain_mix") == settings and pretrain_mix_file(args).is_file():
        return False
    documents = load_documents(args.dataset)[0] if args.dataset else load_corpus_texts()
    tokenizer = set_chat_template(AutoTokenizer.from_pretrained(preset_path(args.model)))
    examples = [tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
                for task in args.sft_tasks for row in read_jsonl(data_files(args, task)["train"])]
    with open(pretrain_mix_file(args), "w") as f:
        for text in documents + examples:
            f.write(json.dumps({"text": text}) + "\n")
    manifest["pretrain_mix"] = settings
    (Path(args.data_dir) / "manifest.json").write_text(json.dumps(manifest, indent=1))
    log(f"data: wrote {len(documents)} corpus documents + {len(examples)} reasoning examples to "
        f"{pretrain_mix_file(args)}")
    return True


def prepare_data(args, log) -> dict:
    """The data stage: generate the stale tasks' files (needs reasoning-gym), reuse the others; with
    `--pretrain_data corpus+reasoning`, the pretraining mix."""
    start = time.perf_counter()
    stale = stale_tasks(args)
    result = {"generated": stale, "data_dir": args.data_dir}
    try:
        if stale:
            if importlib.util.find_spec("reasoning_gym") is None:
                raise RuntimeError(
                    f"{', '.join(stale)}: no data matching these settings in {args.data_dir}, and reasoning-gym is "
                    "not installed to generate it. Generate it where reasoning-gym is (the same data flags and "
                    "`--stages data`), then bring the folder along.")
            generate_data(args, stale, log)
        if args.pretrain_data == "corpus+reasoning":
            result["pretrain_mix_written"] = write_pretrain_mix(args, log)
        result.update(rc=0, status="ok")
    except Exception as error:  # noqa: BLE001 (reported in the summary, the later stages are skipped)
        result.update(rc=1, status="failed", log_tail=f"{type(error).__name__}: {error}")
    result["wall_s"] = round(time.perf_counter() - start, 1)
    return result


# --------------------------------------------------------------------------------------------------------- stages


@dataclass
class Stage:
    name: str  # also its folder under work_dir
    kind: str  # pretrain / sft / grpo
    task: str | None = None  # grpo only
    gpu: str | None = None
    result: dict = field(default_factory=dict)


def plan(args) -> list[list[Stage]]:
    """The launched stages in groups run one after the other; the GRPO runs form one group, run concurrently."""
    gpus = _split(args.gpus)
    first_gpu = gpus[0] if gpus else None
    groups = []
    if "pretrain" in args.stages:
        groups.append([Stage("pretrain", "pretrain", gpu=",".join(gpus) if gpus else None)])
    if "sft" in args.stages:
        groups.append([Stage("sft", "sft", gpu=first_gpu)])
    if "grpo" in args.stages:
        groups.append([Stage(f"grpo-{task}", "grpo", task, gpu=gpus[i % len(gpus)] if gpus else None)
                       for i, task in enumerate(args.grpo_tasks)])
    return groups


def pretrained_model(args) -> str:
    return args.pretrained_model or str(Path(args.work_dir) / "pretrain")


def sft_model(args) -> str:
    if args.sft_model:
        return args.sft_model
    folder = Path(args.work_dir) / "sft"
    return str(folder if args.sft_lora_preset == "none" else folder / "merged")


def _flag(value) -> str:
    return "true" if value else "false"


def peft_flags(args, preset: str) -> list[str]:
    """LoRA on bf16 weights; full fine-tuning on float32 weights (bf16 weights would round the small updates away),
    both under bf16 autocast on a GPU."""
    gpu = not args.small
    if preset == "none":
        return ["--use_peft", "false", "--dtype", "float32", "--bf16", _flag(gpu)]
    return ["--use_peft", "true", "--lora_preset", preset, "--dtype", "bfloat16" if gpu else "float32",
            "--bf16", _flag(gpu)]


def time_limit_flags(seconds: float | None) -> list[str]:
    return ["--max_train_seconds", f"{seconds:g}"] if seconds else []


def trainer_common_flags(args, stage: Stage) -> list[str]:
    return ["--output_dir", str(Path(args.work_dir) / stage.name), "--seed", str(args.seed),
            "--accuracy_eval_batch_size", str(args.eval_batch_size), "--gradient_checkpointing", "false",
            "--disable_tqdm", "true", "--report_to", "none", "--save_strategy", "no"]


def pretrain_launcher(args, stage: Stage) -> list[str]:
    """python on one device; `accelerate launch` with the DDP config over several GPUs (the visible ones)."""
    processes = len(_split(stage.gpu or "")) if not args.small else 1
    if processes <= 1:
        return [args.python]
    return accelerate_launch(args.python, "ddp", processes, "bf16" if args.pretrain_dtype == "bf16" else "no")


def pretrain_command(args, stage: Stage, max_train_seconds: float | None = None) -> list[str]:
    dtype = ["--torch_dtype", "bfloat16", "--bf16"] if args.pretrain_dtype == "bf16" else ["--torch_dtype", "float32"]
    command = [*pretrain_launcher(args, stage), "-m", "modeling_moe.trainers.pretrain", "--model_config", args.model,
               "--output_dir", str(Path(args.work_dir) / stage.name),
               "--data_cache_dir", str(Path(args.work_dir) / "data-cache"), "--seed", str(args.seed),
               "--seq_len", str(args.pretrain_seq_len), "--per_device_train_batch_size", str(args.pretrain_batch_size),
               "--max_steps", str(args.pretrain_steps), "--learning_rate", str(args.pretrain_learning_rate),
               "--warmup_steps", str(args.pretrain_warmup_steps), "--logging_steps", "10" if not args.small else "1",
               "--eval_steps", str(args.pretrain_steps), "--max_eval_samples", "16" if not args.small else "2",
               "--save_steps", "0", "--disable_tqdm", "--report_to", "none", *dtype,
               *time_limit_flags(args.pretrain_max_train_seconds if max_train_seconds is None else max_train_seconds)]
    dataset = pretrain_mix_file(args) if args.pretrain_data == "corpus+reasoning" else args.dataset
    if dataset:
        command += ["--dataset", str(dataset)]
    return command + (["--use_cpu"] if args.small else [])


def sft_command(args, stage: Stage, max_train_seconds: float | None = None) -> list[str]:
    train = [str(data_files(args, t)["train"]) for t in args.sft_tasks]
    held_out = [str(data_files(args, t)["eval"]) for t in args.grpo_tasks]
    return [args.python, "-m", "modeling_moe.trainers.sft", "--config", args.sft_recipe,
            "--model_name_or_path", pretrained_model(args), *trainer_common_flags(args, stage),
            "--task", ",".join(train), "--eval_task", ",".join(held_out),
            "--accuracy_eval_samples", str(args.eval_samples * len(held_out) if args.sft_eval_samples is None
                                           else args.sft_eval_samples),
            "--accuracy_max_new_tokens", str(max(args.completion_tokens[t] for t in args.grpo_tasks)),
            "--max_steps", str(args.sft_steps), "--per_device_train_batch_size", str(args.sft_batch_size),
            "--gradient_accumulation_steps", "1", "--learning_rate", str(args.sft_learning_rate),
            "--max_length", str(args.sft_max_length), "--logging_steps", "10" if not args.small else "1",
            "--save_merged_model", "true", *peft_flags(args, args.sft_lora_preset),
            *time_limit_flags(max_train_seconds if max_train_seconds is not None else args.sft_max_train_seconds)]


def pad_to_multiple_of(args, task: str) -> int | None:
    if args.grpo_pad_to_multiple_of != "auto":
        return int(args.grpo_pad_to_multiple_of) or None
    if args.grpo_cuda_graph_rollouts != "true":
        return None
    longest_prompt = read_manifest(args).get("tasks", {}).get(task, {}).get("max_prompt_tokens")
    if longest_prompt is None:
        return None
    return 32 * math.ceil(max(longest_prompt, args.completion_tokens[task]) / 32)


def grpo_command(args, stage: Stage, max_train_seconds: float | None = None) -> list[str]:
    task, recipe = stage.task, RECIPES / f"grpo_{stage.task}.yaml"
    files = data_files(args, task)
    command = [args.python, "-m", "modeling_moe.trainers.grpo"] + (["--config", str(recipe)] if recipe.is_file()
                                                                   else [])
    command += ["--model_name_or_path", sft_model(args), *trainer_common_flags(args, stage),
                "--task", str(files["rl"]), "--eval_task", str(files["eval"]),
                "--accuracy_eval_samples", str(args.eval_samples),
                "--accuracy_max_new_tokens", str(args.completion_tokens[task]),
                "--max_completion_length", str(args.completion_tokens[task]),
                "--max_steps", str(args.grpo_steps), "--num_generations", str(args.grpo_generations),
                "--per_device_train_batch_size", str(args.grpo_prompts_per_step * args.grpo_generations),
                "--learning_rate", str(args.grpo_learning_rate), "--temperature", str(args.grpo_temperature),
                "--logging_steps", "1", "--save_merged_model", "true", *peft_flags(args, args.grpo_lora_preset),
                *time_limit_flags(max_train_seconds if max_train_seconds is not None else args.grpo_max_train_seconds)]
    command += ["--cuda_graph_rollouts", args.grpo_cuda_graph_rollouts]  # either way: the recipe may set it
    padding = pad_to_multiple_of(args, task)
    if padding:
        command += ["--pad_to_multiple_of", str(padding)]
    return command


def stage_command(args, stage: Stage, max_train_seconds: float | None = None) -> list[str]:
    if stage.kind == "pretrain":
        return pretrain_command(args, stage, max_train_seconds)
    if stage.kind == "sft":
        return sft_command(args, stage, max_train_seconds)
    return grpo_command(args, stage, max_train_seconds)


def stage_env(args, stage: Stage) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name, value in {**NO_MULTICAST, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}.items():
        env.setdefault(name, value)
    if args.small:
        env["OMP_NUM_THREADS"] = "1"
    elif stage.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = stage.gpu
    return env


def missing_input(args, stage: Stage) -> str | None:
    """Why `stage` cannot start (its input model or data is missing), or None."""
    model = pretrained_model(args) if stage.kind == "sft" else sft_model(args) if stage.kind == "grpo" else None
    if model is not None and not (Path(model) / "config.json").is_file():
        return f"no model in {model}"
    if stage.kind in ("sft", "grpo"):
        tasks = args.sft_tasks + args.grpo_tasks if stage.kind == "sft" else [stage.task]
        absent = [str(p) for t in tasks for p in data_files(args, t).values() if not p.is_file()]
        if absent:
            return f"no data file {absent[0]} (run the data stage)"
    return None


def stage_limits(args, stage: Stage, deadline: float) -> tuple[float, float | None, str | None]:
    """(timeout, --max_train_seconds, why it cannot start) of `stage` with what the time budget has left: a SFT /
    GRPO run stops training in time to save and evaluate."""
    left = deadline - time.perf_counter()
    timeout = min(getattr(args, f"{stage.kind}_timeout"), left)
    flag = getattr(args, f"{stage.kind}_max_train_seconds")
    train_seconds = round(min(flag or math.inf, left - args.stage_overhead))
    reason = missing_input(args, stage)
    if reason is None and (left < args.stage_overhead + 10 or (train_seconds is not None and train_seconds < 10)):
        reason = f"time budget spent ({left:.0f} s left)"
    return timeout, train_seconds, reason


def start_stage(args, stage: Stage, train_seconds: float | None, log) -> tuple[subprocess.Popen, object]:
    folder = Path(args.work_dir) / stage.name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    command = stage_command(args, stage, train_seconds)
    stage.result.update(status="running", command=" ".join(_quote(c) for c in command))
    log(f"[{time.strftime('%H:%M:%S')}] start {stage.name}: {stage.result['command']}")
    log_file = open(folder / "launcher.log", "w")
    process = subprocess.Popen(command, env=stage_env(args, stage), stdout=log_file, stderr=subprocess.STDOUT,
                               start_new_session=True)
    LIVE.append(process)
    return process, log_file


def end_stage(args, stage: Stage, process: subprocess.Popen, log_file, rc, wall_s: float, log) -> None:
    LIVE.remove(process)
    log_file.close()
    stage.result.update(rc=rc, wall_s=round(wall_s, 1),
                        status="ok" if rc == 0 else "timeout" if rc == "timeout" else "failed")
    if rc != 0:
        stage.result["log_tail"] = _tail(Path(args.work_dir) / stage.name / "launcher.log")
    log(f"[{time.strftime('%H:%M:%S')}] end {stage.name}: {stage.result['status']} (rc={rc}), "
        f"{stage.result['wall_s']} s")


def launch(stages: list[Stage], args, deadline: float, log, refresh) -> None:
    """Start `stages` together and wait for them, killing any past its timeout; call `refresh` every
    --refresh_seconds meanwhile."""
    running = []
    for stage in stages:
        timeout, train_seconds, reason = stage_limits(args, stage, deadline)
        if reason:
            stage.result.update(status="skipped", reason=reason)
            log(f"skip {stage.name}: {reason}")
            continue
        process, log_file = start_stage(args, stage, train_seconds, log)
        running.append((stage, process, log_file, time.perf_counter(), timeout))
    last_refresh = time.perf_counter()
    while running:
        time.sleep(0.5)
        for item in list(running):
            stage, process, log_file, start, timeout = item
            rc = process.poll()
            if rc is None and time.perf_counter() - start < timeout:
                continue
            if rc is None:
                _kill_session(process)
                rc = "timeout"
            running.remove(item)
            end_stage(args, stage, process, log_file, rc, time.perf_counter() - start, log)
        if running and time.perf_counter() - last_refresh >= args.refresh_seconds:
            refresh()
            last_refresh = time.perf_counter()


# ------------------------------------------------------------------------------------------------------- analysis


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _without_samples(accuracy: dict | None) -> dict | None:
    return None if accuracy is None else {k: v for k, v in accuracy.items() if k != "samples"}


def read_pretrain(folder: Path) -> dict:
    summary = _read_json(folder / "pretrain_summary.json") or {}
    return {"steps": summary.get("global_step"), "first_loss": summary.get("first_loss"),
            "last_loss": summary.get("last_loss"), "final_eval_loss": summary.get("final_eval_loss"),
            "tokens_per_second": summary.get("tokens_per_second"), "tokens_seen": summary.get("tokens_seen")}


def read_trainer(folder: Path) -> dict:
    """What a SFT / GRPO run left: accuracy before / after, losses, the reward records, its training time. The log
    history comes from trainer_state.json, or from log_history.jsonl while the run goes (or if it was killed)."""
    accuracy = _read_json(folder / "accuracy.json") or {}
    state = _read_json(folder / "trainer_state.json")
    history = state["log_history"] if state else read_jsonl(folder / "log_history.jsonl")
    losses = [r["loss"] for r in history if "loss" in r]
    steps = state.get("global_step") if state else max((r.get("step", 0) for r in history), default=0)
    rewards = [{k: v for k, v in r.items() if k == "step" or k.startswith(("reward", "completions/mean_length"))}
               for r in history if "reward" in r]
    return {
        "steps": steps,
        "train_seconds": next((r["train_runtime"] for r in reversed(history) if "train_runtime" in r), None),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "accuracy_before": _without_samples(accuracy.get("before")),
        "accuracy_after": _without_samples(accuracy.get("after")),
        "samples_after": (accuracy.get("after") or {}).get("samples", [])[:2],
        "rewards": rewards,
    }


def has_outputs(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("pretrain_summary.json", "accuracy.json", "trainer_state.json"))


def collect(stages: list[Stage], args) -> None:
    """Fill every stage's result from its folder; a stage not launched now whose folder holds an earlier run's
    outputs is reported as such."""
    for stage in stages:
        folder = Path(args.work_dir) / stage.name
        if not stage.result and has_outputs(folder):
            stage.result["status"] = "earlier run"
        if not stage.result or stage.result.get("status") == "skipped":
            continue
        stage.result.update(read_pretrain(folder) if stage.kind == "pretrain" else read_trainer(folder))


def reward_windows(rewards: list[float], window: int = REWARD_WINDOW) -> dict | None:
    """Mean reward of the first and of the last `window` steps (of half the steps each when there are fewer than
    2 x `window`)."""
    if len(rewards) < 2:
        return None
    k = min(window, len(rewards) // 2)
    return {"window": k, "first": sum(rewards[:k]) / k, "last": sum(rewards[-k:]) / k}


def gain_and_error(before: float, after: float, n_before: int, n_after: int, correct_before: list | None = None,
                   correct_after: list | None = None) -> tuple[float, float, bool]:
    """after - before, the standard error of that difference, and whether it is paired.

    With each problem's 0/1 outcome before and after (the same problems, in the same order), the paired standard
    error sd(after_i - before_i) / sqrt(n): only the problems whose outcome changed count (McNemar's test in its
    normal approximation), the right test for two evaluations of one problem set. Without them, the error of two
    independent proportions, which overstates it when the evaluations share their problems."""
    if correct_before is not None and correct_after is not None and len(correct_before) == len(correct_after) > 1:
        changes = [a - b for a, b in zip(correct_after, correct_before)]
        n = len(changes)
        mean = sum(changes) / n
        variance = sum((c - mean) ** 2 for c in changes) / (n - 1)
        return mean, math.sqrt(variance / n), True
    error = math.sqrt(before * (1 - before) / n_before + after * (1 - after) / n_after)
    return after - before, error, False


def _task_value(accuracy: dict | None, task: str, metric: str, single_task: bool = False):
    """`metric` (accuracy / format / n) of `task` in an accuracy dict: per-task keys, or the overall ones of a
    single-task eval."""
    if not accuracy:
        return None
    value = accuracy.get(f"{task}/{metric}")
    return accuracy.get(metric) if value is None and single_task else value


def task_rows(stages: list[Stage], args) -> list[dict]:
    """A row per GRPO task: held-out accuracy and format rate after pretraining, SFT and GRPO, the GRPO gain (its
    before / after measured in the GRPO run itself) and reward windows."""
    by_name = {s.name: s.result for s in stages}
    sft = by_name.get("sft", {})
    rows = []
    for task in args.grpo_tasks:
        grpo = by_name.get(f"grpo-{task}", {})
        row = {"kind": "task", "task": task}
        for label, accuracy, single in (("pretrain", sft.get("accuracy_before"), False),
                                        ("sft", sft.get("accuracy_after"), False),
                                        ("grpo_before", grpo.get("accuracy_before"), True),
                                        ("grpo", grpo.get("accuracy_after"), True)):
            for metric in ("accuracy", "format", "n"):
                row[f"{metric}_{label}"] = _task_value(accuracy, task, metric, single)
        outcomes = [_task_value(grpo.get(key), task, "correct", True) for key in ("accuracy_before", "accuracy_after")]
        if row["accuracy_sft"] is None:  # SFT not run now: the same model, measured by the GRPO run
            row["accuracy_sft"], row["format_sft"], row["n_sft"] = (
                row["accuracy_grpo_before"], row["format_grpo_before"], row["n_grpo_before"])
        if None not in (row["accuracy_grpo_before"], row["accuracy_grpo"]):
            gain, error, paired = gain_and_error(row["accuracy_grpo_before"], row["accuracy_grpo"],
                                                 row["n_grpo_before"], row["n_grpo"], *outcomes)
            row.update(grpo_gain=gain, grpo_gain_se=error, grpo_gain_paired=paired,
                       measurably_higher=gain > 0 and gain > 2 * error)
        windows = reward_windows([r["reward"] for r in grpo.get("rewards", [])])
        if windows:
            row.update(reward_window=windows["window"], reward_first=windows["first"], reward_last=windows["last"])
        row["grpo_steps"] = grpo.get("steps")
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------- report


def _f(value, digits: int = 3, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (bool, str)):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if pct:
        return f"{value:.1%}"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"


def _status(result: dict) -> str:
    status = result.get("status", "not run")
    return f"{status}: {result['reason']}" if result.get("reason") else status


def _environment() -> str:
    parts = []
    for package in ("torch", "transformers", "trl", "peft", "accelerate"):
        try:
            parts.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10).stdout.split("\n")
        if gpus[0].strip():
            parts.insert(0, f"{len([g for g in gpus if g.strip()])} x {gpus[0].strip()}")
    except (OSError, subprocess.SubprocessError):
        pass
    return ", ".join(parts)


def accuracy_table(rows: list[dict]) -> list[str]:
    lines = ["| task | n | after pretrain | after SFT | after GRPO | GRPO gain (± 2 s.e.) | measurably higher | "
             "format: pretrain / SFT / GRPO | GRPO reward: first → last steps | GRPO steps |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        gain = (f"{row['grpo_gain']:+.1%} (± {2 * row['grpo_gain_se']:.1%}"
                f"{', paired' if row.get('grpo_gain_paired') else ''})" if row.get("grpo_gain") is not None else "n/a")
        rewards = (f"{row['reward_first']:.3f} → {row['reward_last']:.3f} ({row['reward_window']} steps each)"
                   if row.get("reward_window") else "n/a")
        formats = " / ".join(_f(row[f"format_{k}"], pct=True) for k in ("pretrain", "sft", "grpo"))
        lines.append(
            f"| {row['task']} | {_f(row['n_grpo'] or row['n_sft'])} | {_f(row['accuracy_pretrain'], pct=True)} | "
            f"{_f(row['accuracy_sft'], pct=True)} | {_f(row['accuracy_grpo'], pct=True)} | {gain} | "
            f"{_f(row.get('measurably_higher'))} | {formats} | {rewards} | {_f(row['grpo_steps'])} |")
    return lines


def stage_details(stage: Stage) -> str:
    res = stage.result
    if stage.kind == "data":
        return f"generated: {', '.join(res.get('generated') or []) or 'none (reused)'}; folder {res.get('data_dir')}"
    if stage.kind == "pretrain":
        return (f"loss {_f(res.get('first_loss'), 4)} → {_f(res.get('last_loss'), 4)}, held-out "
                f"{_f(res.get('final_eval_loss'), 4)}, {_f(res.get('tokens_per_second'))} tokens/s")
    before, after = res.get("accuracy_before") or {}, res.get("accuracy_after") or {}
    text = (f"loss {_f(res.get('first_loss'))} → {_f(res.get('last_loss'))}; held-out accuracy "
            f"{_f(before.get('accuracy'), pct=True)} → {_f(after.get('accuracy'), pct=True)}, format "
            f"{_f(before.get('format'), pct=True)} → {_f(after.get('format'), pct=True)}")
    windows = reward_windows([r["reward"] for r in res.get("rewards", [])])
    if windows:
        text += f"; reward {windows['first']:.3f} → {windows['last']:.3f}"
    return text


def summary_markdown(data: Stage, stages: list[Stage], rows: list[dict], args, figures: list[str],
                     wall_s: float) -> str:
    lines = ["# Reasoning recipe: pretrain → SFT → GRPO", "",
             f"Driver: `{' '.join(_quote(a) for a in sys.argv)}` ({'CPU dry run' if args.small else 'GPU'}); "
             f"{wall_s:.0f} s wall so far. Environment: {_environment()}.", "",
             f"## Held-out accuracy (greedy, {args.eval_samples} problems per task)", ""]
    lines += accuracy_table(rows)
    met = [row.get("measurably_higher") for row in rows]
    verdict = "MET" if met and all(met) else "not measured" if None in met or not met else "NOT MET"
    lines += ["", f"Target (issue 6): accuracy after GRPO measurably higher than after SFT alone on every task: "
              f"**{verdict}**. GRPO gain = accuracy after - before, both measured by the GRPO run on the same held-out "
              "problems; measurably higher = the gain exceeds 2 standard errors of the difference, paired over the "
              "problems when each one's outcome was recorded (McNemar's test in its normal approximation: only the "
              "problems whose answer changed count), else those of two independent proportions. Reward = the GRPO run's mean weighted reward (0.1 x format + 1 x correct) of the first "
              f"and the last {REWARD_WINDOW} steps (half the steps each in shorter runs).", ""]
    if figures:
        lines += [f"Figures: {', '.join(figures)}.", ""]

    lines += ["## Stages", "", "| stage | status | wall s | trainer s | steps | details |", "|---|---|---|---|---|---|"]
    for stage in [data] + stages:
        res = stage.result
        lines.append(f"| {stage.name} | {_status(res)} | {_f(res.get('wall_s'))} | {_f(res.get('train_seconds'))} | "
                     f"{_f(res.get('steps'))} | {stage_details(stage) if res else ''} |")

    lines += ["", "## Settings", "",
              f"- model: `{args.model}` pretrained from scratch, <= {args.pretrain_steps} steps x "
              f"{args.pretrain_batch_size} x {args.pretrain_seq_len} tokens per GPU on "
              f"{max(1, len(_split(args.gpus)))} GPU(s), training stops after "
              f"{_f(args.pretrain_max_train_seconds or None)} s, lr {args.pretrain_learning_rate:g}, "
              f"{args.pretrain_dtype}, corpus `{args.dataset or 'embedded'}`"
              + (f" plus the SFT training examples as text (`{pretrain_mix_file(args)}`)"
                 if args.pretrain_data == "corpus+reasoning" else ""),
              f"- data (`{args.data_dir}`): {args.train_size} training (SFT), {args.eval_samples} held-out and "
              f"{args.rl_size} GRPO examples per task, disjoint, seed {args.data_seed}; generator settings and filters: `{json.dumps(args.task_kwargs)}`",
              f"- SFT: tasks {', '.join(args.sft_tasks)}; LoRA preset `{args.sft_lora_preset}`, {args.sft_steps} "
              f"steps x {args.sft_batch_size}, lr {args.sft_learning_rate:g}, max length {args.sft_max_length}, "
              f"training stops after {_f(args.sft_max_train_seconds or None)} s; recipe `{args.sft_recipe}`",
              f"- GRPO: tasks {', '.join(args.grpo_tasks)}; LoRA preset `{args.grpo_lora_preset}`, <= "
              f"{args.grpo_steps} steps x {args.grpo_prompts_per_step} prompts x {args.grpo_generations} samples, lr "
              f"{args.grpo_learning_rate:g}, temperature {args.grpo_temperature:g}, training stops after "
              f"{_f(args.grpo_max_train_seconds or None)} s, CUDA-graph rollouts {args.grpo_cuda_graph_rollouts}; "
              "recipes trainers/recipes/grpo_<task>.yaml",
              f"- generation budgets (tokens): {json.dumps(args.completion_tokens)}; time budget "
              f"{args.time_budget:g} s", ""]

    samples = [(s.name, sample) for s in stages for sample in s.result.get("samples_after", [])]
    if samples:
        lines += ["## Sample completions after each stage (held-out, greedy)", ""]
        for name, sample in samples:
            lines += [f"- {name} (correct {sample.get('correct')}): `{sample['completion'][:300]!r}`"]
        lines.append("")
    commands = [(s.name, s.result["command"]) for s in stages if s.result.get("command")]
    if commands:
        lines += ["## Commands", ""] + [f"- {name}: `{command}`" for name, command in commands] + [""]
    failed = [s for s in [data] + stages if s.result.get("status") in ("failed", "timeout", "killed")]
    if failed:
        lines += ["## Failures", ""]
        for stage in failed:
            lines += [f"### {stage.name} ({stage.result['status']}, rc={stage.result.get('rc')})", "", "```",
                      stage.result.get("log_tail", ""), "```", ""]
    return "\n".join(lines)


def plot_rewards(stages: list[Stage], path: Path) -> bool:
    runs = [s for s in stages if s.kind == "grpo" and s.result.get("rewards")]
    if not runs:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.2), squeeze=False)
    for ax, stage in zip(axes[0], runs):
        records = stage.result["rewards"]
        steps = [r["step"] for r in records]
        total = [r["reward"] for r in records]
        ax.plot(steps, total, ".", alpha=0.4, label="reward (weighted sum)")
        k = min(REWARD_WINDOW, len(total))
        rolling = [sum(total[max(0, i - k + 1):i + 1]) / len(total[max(0, i - k + 1):i + 1]) for i in range(len(total))]
        ax.plot(steps, rolling, "-", label=f"mean of the last {k} steps")
        for key in sorted({k for r in records for k in r if k.startswith("rewards/") and k.endswith("/mean")}):
            ax.plot(steps, [r.get(key, float("nan")) for r in records], "--", alpha=0.7, label=key[8:-5])
        ax.set(xlabel="GRPO step", ylabel="mean reward", title=f"GRPO {stage.task}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_accuracy(rows: list[dict], path: Path) -> bool:
    if not any(row.get(f"accuracy_{k}") is not None for row in rows for k in ("pretrain", "sft", "grpo")):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(2.2 + 2.4 * len(rows), 4.2))
    width = 0.27
    for i, (key, label) in enumerate((("pretrain", "after pretraining"), ("sft", "after SFT"), ("grpo", "after GRPO"))):
        values = [row.get(f"accuracy_{key}") for row in rows]
        errors = [2 * math.sqrt(v * (1 - v) / row[f"n_{key}"]) if v is not None and row.get(f"n_{key}") else 0
                  for v, row in zip(values, rows)]
        positions = [j + (i - 1) * width for j in range(len(rows))]
        bars = ax.bar(positions, [v or 0 for v in values], width, yerr=errors, capsize=3, label=label)
        for bar, value in zip(bars, values):
            ax.annotate("n/a" if value is None else f"{value:.1%}", (bar.get_x() + bar.get_width() / 2,
                                                                   bar.get_height()), ha="center", va="bottom",
                        fontsize=8)
    ax.set_ylim(0, max(0.1, ax.get_ylim()[1]))
    ax.set_xticks(range(len(rows)), [row["task"] for row in rows])
    ax.set(ylabel="held-out accuracy (greedy; ± 2 s.e.)", title="accuracy after each stage")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def results_lines(data: Stage, stages: list[Stage], rows: list[dict], args) -> list[dict]:
    settings = {k: v for k, v in vars(args).items() if k not in ("list", "python")}
    lines = [{"kind": "settings", **settings}, {"kind": "stage", "stage": "data", **data.result}]
    for stage in stages:
        lines.append({"kind": "stage", "stage": stage.name, "task": stage.task,
                      **{k: v for k, v in stage.result.items() if k not in ("rewards", "samples_after")}})
    lines += rows
    for stage in stages:
        lines += [{"kind": "reward", "run": stage.name, "task": stage.task, **record}
                  for record in stage.result.get("rewards", [])]
    return lines


def write_outputs(data: Stage, stages: list[Stage], args, wall_s: float) -> list[str]:
    collect(stages, args)
    rows = task_rows(stages, args)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:  # this driver's files of an earlier write
        (output_dir / name).unlink(missing_ok=True)
    with open(output_dir / "results.jsonl", "w") as f:
        for line in results_lines(data, stages, rows, args):
            f.write(json.dumps(line, default=str) + "\n")
    written = ["results.jsonl"]
    try:
        if plot_accuracy(rows, output_dir / "accuracy.png"):
            written.append("accuracy.png")
        if plot_rewards(stages, output_dir / "rewards.png"):
            written.append("rewards.png")
    except ImportError:
        print("matplotlib is not installed: no accuracy.png / rewards.png", file=sys.stderr)
    loss_plot = Path(args.work_dir) / "pretrain" / "loss.png"
    if loss_plot.is_file() and len(written) + 2 <= args.max_output_files:  # and summary.md
        shutil.copyfile(loss_plot, output_dir / "pretrain.loss.png")
        written.append("pretrain.loss.png")
    (output_dir / "summary.md").write_text(summary_markdown(data, stages, rows, args, written[1:], wall_s))
    return written + ["summary.md"]


# ------------------------------------------------------------------------------------------------------------ main


def list_plan(args, groups: list[list[Stage]]) -> None:
    stale = stale_tasks(args)
    print(f"data ({args.data_dir}): " + (f"to generate: {', '.join(stale)}" if stale else "all files present"))
    for stage in (s for group in groups for s in group):
        gpu = f" [CUDA_VISIBLE_DEVICES={stage.gpu}]" if stage.gpu is not None and not args.small else ""
        print(f"{stage.name}{gpu}: {' '.join(_quote(c) for c in stage_command(args, stage))}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    groups = plan(args)
    if args.list:
        list_plan(args, groups)
        return 0
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    start = time.perf_counter()
    deadline = start + args.time_budget - 10  # room for the last summary

    def log(message: str):
        print(message, flush=True)

    # Every stage of the recipe appears in the summary: those not launched now report an earlier run's outputs.
    stages = [Stage("pretrain", "pretrain"), Stage("sft", "sft")] + [Stage(f"grpo-{t}", "grpo", t)
                                                                     for t in args.grpo_tasks]
    launched = {s.name: s for group in groups for s in group}
    stages = [launched.get(s.name, s) for s in stages]
    data = Stage("data", "data")
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)

    def refresh():
        write_outputs(data, stages, args, time.perf_counter() - start)

    try:
        if "data" in args.stages:
            data.result = prepare_data(args, log)
            log(f"data: {data.result['status']}, {data.result['wall_s']} s")
            refresh()
        for group in groups:
            if data.result.get("status") == "failed":
                for stage in group:
                    stage.result.update(status="skipped", reason="the data stage failed")
                continue
            launch(group, args, deadline, log, refresh)
            refresh()
    finally:  # also when a signal stops the driver: the stages it was running are reported as killed
        for stage in stages:
            if stage.result.get("status") == "running":
                stage.result.update(status="killed", rc="driver stopped",
                                    log_tail=_tail(Path(args.work_dir) / stage.name / "launcher.log"))
        written = write_outputs(data, stages, args, time.perf_counter() - start)
    print((Path(args.output_dir) / "summary.md").read_text())
    log("wall s per stage: " + ", ".join(f"{s.name} {_f(s.result.get('wall_s'))}" for s in [data] + stages))
    log(f"wrote {', '.join(written)} to {args.output_dir} ({time.perf_counter() - start:.0f} s)")
    ran = [s for s in [data] + stages if s.name in launched or (s is data and "data" in args.stages)]
    return 0 if all(s.result.get("status") == "ok" for s in ran) else 1


if __name__ == "__main__":
    sys.exit(main())

r"""Pretrain a modeling_moe model with accelerate: one process, DDP, FSDP2, and expert parallelism over an `ep` mesh.

    # one process (CPU or one GPU), the tiny preset on the embedded corpus
    python -m modeling_moe.trainers.pretrain --model_config tiny --output_dir outputs/tiny --max_steps 200

    # several GPUs: a launch config from trainers/accelerate_configs/ (single_gpu, ddp, fsdp2, fsdp2_ep)
    accelerate launch --config_file trainers/accelerate_configs/fsdp2_ep.yaml -m modeling_moe.trainers.pretrain \
        --model_config moe-100m --bf16 --expert_parallel_size 2 --output_dir outputs/moe-100m

    # any option from a YAML file (the command line wins over it)
    python -m modeling_moe.trainers.pretrain --config pretrain.yaml --max_steps 10

Flags carry transformers' `TrainingArguments` names where the concept exists. The default data is the embedded
English corpus (Wikipedia and news text shipped in gensim's wheel) tokenized with the presets' GPT-2 BPE, packed into
`--seq_len` blocks whose loss never crosses a document boundary, with held-out documents for the evaluation loss.

Every optimizer step ends with `update_expert_bias()` (aux-loss-free balancing; token counts summed over all ranks).
`output_dir` receives `metrics.jsonl` (one line per logged step), `loss.png`, `expert_load.png`, checkpoints
`checkpoint-N/` (written to a temporary folder, then renamed: a killed run resumes from its last complete one with
`--resume_from_checkpoint latest`), and the final model (`save_pretrained`, code files included) with its tokenizer
(only its config.json with `--save_final_model false`).

Where the time goes: `--profile_steps 12,14` runs torch.profiler over optimizer steps 12 to 14 and writes
`output_dir/profile/rank{r}.json` per rank (device time by category: all-to-all, other collectives, routed experts,
attention, GEMMs, other; each one's share of the profiled wall time; the top kernels) and a line of kind "profile"
to `metrics.jsonl` (the shares averaged over the ranks; also in pretrain_summary.json). See trainers/profiling.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, default_collate

logger = logging.getLogger("modeling_moe.trainers.pretrain")

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_NAME = "trainer_state.json"
METRICS_NAME = "metrics.jsonl"
# Test hook: the main process SIGKILLs itself in the middle of writing this checkpoint step (after the state files,
# before the rename), to check that a killed save leaves the previous checkpoints usable.
KILL_DURING_SAVE_ENV = "MODELING_MOE_TEST_KILL_DURING_SAVE"




# --optim: transformers' names, and ours (kernels/adamw.py: torch's AdamW and state, its step in Triton)
OPTIMIZERS = ("adamw_triton", "adamw_torch_fused", "adamw_torch")
# transformers' schedulers that need nothing beyond the warmup and the number of steps (reduce_lr_on_plateau wants a
# metric, cosine_with_min_lr a minimum: neither has a flag here).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")


class ConfigurationError(ValueError):
    """A setting that cannot work (unknown preset, too long seq_len, parallel sizes that do not fit, ...)."""


# ------------------------------------------------------------------------------------------------------ arguments


@dataclass
class ModelArguments:
    model_config: str = field(
        default="tiny",
        metadata={"help": "A hub_configs preset name (tiny, moe-100m, gqa-moe, deepseek-v2-lite, deepseek-v3) or a "
                          "folder with a config.json. The model is initialised from scratch."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Comma-separated MoEConfig overrides, e.g. 'num_hidden_layers=4,bias_update_speed=0,"
                          "router_aux_loss_coef=0.01,output_router_logits=true' (values parsed as JSON)."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Tokenizer folder or preset name; default: the model_config folder's tokenizer, else the "
                          "GPT-2 BPE of the tiny preset."},
    )
    torch_dtype: str | None = field(
        default=None,
        metadata={"help": "Dtype of the weights (and so of AdamW's states): float32 (default) or bfloat16 (pure bf16 "
                          "training; routers stay fp32). --bf16 is autocast over fp32 weights instead."},
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa (default), eager, ..."})
    experts_implementation: str | None = field(
        default=None, metadata={"help": "Routed-experts kernel: grouped_mm (default), eager, batched_mm, ..."}
    )


@dataclass
class DataArguments:
    dataset: str | None = field(
        default=None,
        metadata={"help": "Default: the embedded corpus. Else a local .txt / .jsonl / .json / .parquet file, a folder "
                          "of them, or a `datasets` folder written by save_to_disk."},
    )
    dataset_text_field: str = field(default="text", metadata={"help": "Text field of .jsonl / .parquet / datasets."})
    text_sample_by: str = field(
        default="line", metadata={"help": "Documents of a .txt file: 'line', 'paragraph' or 'document' (whole file).",
                                  "choices": ["line", "paragraph", "document"]}
    )
    seq_len: int = field(default=512, metadata={"help": "Tokens per packed training sequence."})
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "Percentage of the documents held out for the evaluation loss."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N held-out blocks."})
    document_attention: bool = field(
        default=True,
        metadata={"help": "Pass per-document position_ids so attention stays inside each document; "
                          "--document_attention false attends across packed documents (plain causal attention)."},
    )
    data_cache_dir: str | None = field(
        default=None, metadata={"help": "Cache of tokenized datasets; default $XDG_CACHE_HOME/modeling_moe/pretrain."}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Tokenize again even if a cache exists."})


@dataclass
class PretrainArguments:
    output_dir: str = field(default="outputs/pretrain", metadata={"help": "Model, metrics, plots and checkpoints."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over in an output_dir that already holds checkpoints (deletes them); "
                                         "with --resume_from_checkpoint, delete the checkpoints past the one resumed "
                                         "from."}
    )
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; <= 0: num_train_epochs decides."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs of training blocks if max_steps <= 0."})
    max_train_seconds: float = field(
        default=0.0,
        metadata={"help": "Stop training after the optimizer step that ends past this many seconds of training, then "
                  "evaluate and save as at the last step, with a checkpoint there when --save_steps > 0 (the "
                  "learning-rate schedule still spans max_steps: --resume_from_checkpoint continues it); <= 0: no "
                  "limit. Every rank stops at the same step."},
    )
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Sequences per process and micro-batch."})
    per_device_eval_batch_size: int | None = field(default=None, metadata={"help": "Default: the training one."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step, whose loss is the mean over all their tokens "
                                     "(on all ranks)."}
    )
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay of matrices (not of norms)."})
    adam_beta1: float = field(default=0.9)
    adam_beta2: float = field(default=0.95)
    adam_epsilon: float = field(default=1e-8)
    optim: str | None = field(
        default=None, metadata={"help": "adamw_triton (torch's AdamW, its step a Triton kernel over up to 8 "
                                        "parameters a launch: modeling_moe.kernels.adamw), adamw_torch_fused or "
                                        "adamw_torch; default: adamw_triton on CUDA (adamw_torch_fused with FSDP2, "
                                        "whose sharded parameters the kernel does not take), adamw_torch elsewhere.",
                                "choices": list(OPTIMIZERS)}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (<= 0: no clipping)."})
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "transformers' learning-rate schedule.", "choices": list(LR_SCHEDULERS)}
    )
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps."})
    logging_steps: int = field(default=10, metadata={"help": "Log (console, metrics.jsonl, trackers) every N steps."})
    eval_steps: int | None = field(
        default=None, metadata={"help": "Evaluate every N steps (always at the last step); default: only at the end."}
    )
    eval_on_start: bool = field(default=False, metadata={"help": "Also evaluate before the first step."})
    save_steps: int = field(default=500, metadata={"help": "Write checkpoint-N every N steps (<= 0: never)."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep only the N most recent checkpoints."})
    seed: int = field(default=42, metadata={"help": "Seed of the initialisation (the same on every rank)."})
    data_seed: int | None = field(default=None, metadata={"help": "Seed of the data order; default: seed."})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (accelerate autocast / FSDP2 policy)."})
    tf32: bool | None = field(default=None, metadata={"help": "Allow TF32 matmuls on Ampere+ GPUs."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute decoder layers in backward."})
    torch_compile: bool = field(
        default=False,
        metadata={"help": "torch.compile each decoder layer (accelerate's regional compilation; also reachable with "
                  "`accelerate launch --dynamo_backend ...`)."},
    )
    torch_compile_backend: str = field(default="inductor", metadata={"help": "torch.compile backend."})
    torch_compile_mode: str | None = field(
        default=None, metadata={"help": "torch.compile mode (default, reduce-overhead, max-autotune, ...). On a GPU, "
                                         "reduce-overhead replays each layer's forward and backward from CUDA graphs: "
                                         "no launch overhead (benchmarks/RESULTS.md). TORCHINDUCTOR_COORDINATE_DESCENT_"
                                         "TUNING=1 in the environment also retunes inductor's kernels (~2 min more of "
                                         "first compilation, steps 0.3 to 1 percent faster)."}
    )
    cuda_graph: bool = field(
        default=False,
        metadata={"help": "One GPU: replay each optimizer step (forward, backward, clipping, AdamW, the balancing "
                          "bias update) from one CUDA graph captured at step 3, so that the host's speed no longer "
                          "matters (benchmarks/RESULTS.md). Needs batches of one shape (packed blocks are), one "
                          "process without expert parallelism, and a --torch_compile_mode without CUDA graphs of its "
                          "own (default, max-autotune-no-cudagraphs)."},
    )
    report_to: list[str] = field(
        default_factory=lambda: ["none"],
        metadata={"help": "Trackers besides metrics.jsonl: none, tensorboard, or any accelerate tracker (wandb, ...)."},
    )
    logging_dir: str | None = field(default=None, metadata={"help": "Tracker logs; default output_dir/runs."})
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint folder, or 'latest' for the newest complete checkpoint-N of output_dir "
                          "(starts from scratch when there is none)."},
    )
    expert_parallel_size: int = field(
        default=1, metadata={"help": "Ranks sharing one copy of the routed experts (all-to-all dispatch); must "
                                     "divide the world size and the number of experts."},
    )
    use_cpu: bool = field(default=False, metadata={"help": "Train on the CPU even if a GPU is present."})
    dataloader_num_workers: int = field(default=0)
    peak_tflops: float | None = field(
        default=None, metadata={"help": "Peak dense bf16 TFLOP/s of one device for MFU (default: known GPUs)."}
    )
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar."})
    save_final_model: bool = field(
        default=True,
        metadata={"help": "Save the final model and tokenizer to output_dir (false: config.json, metrics and plots "
                          "only, for throughput runs)."},
    )
    profile_steps: str | None = field(
        default=None,
        metadata={"help": "FIRST,LAST (e.g. 12,14): profile optimizer steps FIRST to LAST with torch.profiler (CPU "
                          "and CUDA) and write output_dir/profile/rank{r}.json per rank (time by category: "
                          "all_to_all, other_collectives, routed_experts, attention, gemm, other; top kernels) and a "
                          "'profile' line to metrics.jsonl. Pick steps after the warm-up: their throughput includes "
                          "the profiler's overhead."},
    )
    profile_trace: bool = field(
        default=False, metadata={"help": "With --profile_steps: rank 0 also writes a Chrome trace "
                                         "(profile/trace_rank0.json.gz; large)."},
    )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, PretrainArguments)


def build_parser():
    from transformers import HfArgumentParser

    parser = HfArgumentParser(ARGUMENT_CLASSES, description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="YAML (or JSON) file of option: value pairs (null: the default); options on the command "
                             "line override it.")
    return parser


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, PretrainArguments]:
    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            parser.error(f"--config {known.config}: no such file")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            parser.error(f"--config {known.config}: not valid YAML ({' '.join(str(error).split())})")
        if not isinstance(values, dict):
            parser.error(f"--config {known.config}: expected a mapping of option: value")
        options = {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - options)
        if unknown:
            parser.error(f"--config {known.config}: unknown option(s) {unknown}")
        # The file's values go through the same parsing and checks as flags: they come first, flags override them.
        argv = [*_as_flags(values), *argv]
    model_args, data_args, train_args, *_namespace, unknown = parser.parse_args_into_dataclasses(
        args=argv, look_for_args_file=False, return_remaining_strings=True
    )
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return model_args, data_args, train_args


def _as_flags(values: dict) -> list[str]:
    """A YAML mapping as command-line words: `report_to: [a, b]` -> --report_to a b; `bf16: true` -> --bf16 true;
    `dataset: null` -> nothing, so the option keeps its default (a word 'none' would be read as a path, or fail as a
    number)."""
    words = []
    for key, value in values.items():
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        words += [f"--{key}", *("none" if item is None else str(item).lower() if isinstance(item, bool) else str(item)
                                for item in items)]
    return words


# ------------------------------------------------------------------------------------------------ model and data


def parse_config_overrides(text: str | None) -> dict:
    """'a=1,b=true,c=0.01,d=null,e=name' -> {'a': 1, 'b': True, 'c': 0.01, 'd': None, 'e': 'name'}."""
    overrides = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigurationError(f"--config_overrides: expected key=value, got {item!r}.")
        value = value.strip()
        lowered = {"true": "true", "false": "false", "none": "null", "null": "null"}.get(value.lower(), value)
        try:
            overrides[key.strip()] = json.loads(lowered)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides


def build_config(model_args: ModelArguments, data_args: DataArguments):
    from modeling_moe.presets import load_preset_config

    try:
        config = load_preset_config(model_args.model_config, **parse_config_overrides(model_args.config_overrides))
    except ValueError as error:  # unknown preset, unknown or invalid field
        raise ConfigurationError(str(error)) from error
    if data_args.seq_len < 2:
        raise ConfigurationError(f"--seq_len must be at least 2, got {data_args.seq_len}.")
    if data_args.seq_len > config.max_position_embeddings:
        raise ConfigurationError(
            f"--seq_len {data_args.seq_len} is above the model's max_position_embeddings="
            f"{config.max_position_embeddings} ({model_args.model_config}): use a shorter --seq_len or "
            f"--config_overrides max_position_embeddings={data_args.seq_len}."
        )
    return config


def _model_folder(name_or_path: str) -> Path | None:
    from modeling_moe.presets import preset_path

    if os.path.isdir(name_or_path):
        return Path(name_or_path)
    try:
        return preset_path(name_or_path)
    except ValueError:
        return None


def load_tokenizer(model_args: ModelArguments, config):
    from transformers import AutoTokenizer

    from modeling_moe.presets import preset_path

    source = model_args.tokenizer_name and _model_folder(model_args.tokenizer_name)
    if model_args.tokenizer_name and source is None:
        raise ConfigurationError(f"--tokenizer_name {model_args.tokenizer_name!r}: neither a folder nor a preset.")
    if source is None:
        folder = _model_folder(model_args.model_config)
        tokenizer_files = ("tokenizer.json", "tokenizer_config.json")
        if folder is not None and any((folder / name).is_file() for name in tokenizer_files):
            source = folder
        else:
            source = preset_path("tiny")
            logger.info("%s has no tokenizer: using the GPT-2 BPE tokenizer of the presets", model_args.model_config)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    tokenizer.model_max_length = int(1e30)  # documents are packed into blocks: no length warning per document
    if len(tokenizer) > config.vocab_size:
        raise ConfigurationError(
            f"The tokenizer ({source}) has {len(tokenizer)} tokens, more than the model's vocab_size="
            f"{config.vocab_size}."
        )
    if tokenizer.eos_token_id is None:
        raise ConfigurationError(f"The tokenizer ({source}) has no EOS token to separate packed documents.")
    return tokenizer


def _cache_root(data_args: DataArguments) -> Path:
    if data_args.data_cache_dir:
        return Path(data_args.data_cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "modeling_moe" / "pretrain"


def _dataset_fingerprint(data_args: DataArguments) -> dict:
    if data_args.dataset is None:
        from modeling_moe.trainers import data as data_module

        folder = data_module._test_data_dir()
        files = [folder / data_module.WIKI_DUMP, folder / data_module.LEE_NEWS]
        return {"embedded": [(f.name, f.stat().st_size) for f in files], "parser": _source_hash(data_module)}
    path = Path(data_args.dataset).expanduser().resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {
        "files": [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files],
        "text_field": data_args.dataset_text_field,
        "sample_by": data_args.text_sample_by,
    }


def _source_hash(module) -> str:
    return hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()[:16]


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flatten(token_lists: list[list[int]]) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.int64)
    flat = torch.tensor([i for t in token_lists for i in t], dtype=torch.int32)
    return {"tokens": flat, "lengths": lengths}


def _unflatten(packed: dict[str, torch.Tensor]) -> list[list[int]]:
    return [part.tolist() for part in packed["tokens"].split(packed["lengths"].tolist())]


def tokenized_documents(data_args: DataArguments, tokenizer, is_main: bool) -> tuple[list, list]:
    """(training, held-out) token lists, from the cache when present; only the main process writes the cache."""
    from modeling_moe.trainers.data import load_documents, load_split, tokenize_documents

    if data_args.dataset is not None and not os.path.exists(os.path.expanduser(data_args.dataset)):
        load_documents(data_args.dataset)  # raises the FileNotFoundError that names what is expected
    key = json.dumps({
        "dataset": _dataset_fingerprint(data_args),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "validation_split_percentage": data_args.validation_split_percentage,
        "version": 2,  # 2: held-out documents stratified by length
    }, sort_keys=True)
    cache = _cache_root(data_args) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"
    if cache.is_file() and not data_args.overwrite_cache:
        try:
            saved = torch.load(cache, weights_only=True)
            return _unflatten(saved["train"]), _unflatten(saved["eval"])
        except Exception as error:  # a corrupt cache is rebuilt
            logger.warning("ignoring unreadable tokenized cache %s (%s)", cache, error)

    if not 0 <= data_args.validation_split_percentage < 100:
        raise ConfigurationError("--validation_split_percentage must be in [0, 100).")
    documents, held_out = load_split(data_args.dataset, data_args.validation_split_percentage / 100,
                                     data_args.dataset_text_field, data_args.text_sample_by)
    train_tokens, eval_tokens = tokenize_documents(tokenizer, documents), tokenize_documents(tokenizer, held_out)
    if is_main:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            staging = cache.with_suffix(f".tmp{os.getpid()}")
            torch.save({"train": _flatten(train_tokens), "eval": _flatten(eval_tokens)}, staging)
            os.replace(staging, cache)
        except OSError as error:
            logger.warning("could not write the tokenized cache %s: %s", cache, error)
    return train_tokens, eval_tokens


def build_datasets(data_args: DataArguments, tokenizer, accelerator):
    from modeling_moe.trainers.data import PackedCorpus

    # The main process reads and tokenizes first (and writes the cache the others then read); a dataset error is
    # raised on every process rather than leaving the others waiting at a barrier.
    from accelerate.utils import broadcast_object_list

    from modeling_moe.trainers.data import DatasetReadError

    failure, tokens = None, None
    if accelerator.is_main_process:
        try:
            tokens = tokenized_documents(data_args, tokenizer, is_main=True)
        except (ConfigurationError, DatasetReadError, FileNotFoundError) as error:
            failure = error
    if accelerator.num_processes > 1:
        failure = broadcast_object_list([failure])[0]
    if failure is not None:
        raise failure
    train_tokens, eval_tokens = tokens or tokenized_documents(data_args, tokenizer, is_main=False)
    eos = tokenizer.eos_token_id
    train_set = PackedCorpus(train_tokens, data_args.seq_len, eos)
    eval_set = PackedCorpus(eval_tokens, data_args.seq_len, eos) if eval_tokens else None
    info = {
        "train_documents": len(train_tokens),
        "eval_documents": len(eval_tokens),
        "train_tokens": train_set.num_tokens,
        "eval_tokens": eval_set.num_tokens if eval_set is not None else 0,
    }
    if data_args.max_train_samples is not None:
        train_set = Subset(train_set, range(min(data_args.max_train_samples, len(train_set))))
    if eval_set is not None and data_args.max_eval_samples is not None:
        eval_set = Subset(eval_set, range(min(data_args.max_eval_samples, len(eval_set))))
    if eval_set is not None and len(eval_set) == 0:
        eval_set = None
    return train_set, eval_set, info


def make_collate(document_attention: bool):
    def collate(rows):
        batch = default_collate(rows)
        if not document_attention:
            batch.pop("position_ids")
        return batch

    return collate


def build_model(config, model_args: ModelArguments, seed: int):
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM

    import modeling_moe  # noqa: F401  (registers the Auto classes)

    kwargs = {}
    if model_args.torch_dtype not in (None, "float32", "auto"):
        dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16}
        if model_args.torch_dtype not in dtypes:
            raise ConfigurationError(
                f"--torch_dtype must be float32, bfloat16 or float16, got {model_args.torch_dtype!r}."
            )
        kwargs["dtype"] = dtypes[model_args.torch_dtype]
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.experts_implementation:
        kwargs["experts_implementation"] = model_args.experts_implementation
    set_seed(seed)  # the same initialisation on every rank (expert parallelism slices it)
    return AutoModelForCausalLM.from_config(config, **kwargs)


def wrap_present_layer_classes(fsdp_plugin, model: torch.nn.Module):
    """Keep only the FSDP wrap classes this model has: accelerate raises on a listed class the model lacks (the MTP
    layer of a model without MTP), and the launch configs list every layer class of the architecture."""
    names = fsdp_plugin.transformer_cls_names_to_wrap or list(getattr(model, "_no_split_modules", None) or [])
    present = {type(module).__name__ for module in model.modules()}
    if names:
        fsdp_plugin.transformer_cls_names_to_wrap = [name for name in names if name in present]


def build_optimizer(model, args: PretrainArguments, device: torch.device | str, fsdp2: bool = False):
    """AdamW as --optim names it, matrices with weight decay and the rest without; with --cuda_graph capturable,
    its learning rate a tensor on `device` that the scheduler writes in place (a graph replays what it reads)."""
    device_type = torch.device(device).type
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    # FSDP2 hands the optimizer DTensors, which TritonAdamW leaves to torch's (unfused) step: torch's fused one there
    optim = args.optim or ("adamw_torch" if device_type != "cuda" else "adamw_torch_fused" if fsdp2 else "adamw_triton")
    if optim not in OPTIMIZERS:
        raise ConfigurationError(f"--optim {optim!r} is not supported: use one of {', '.join(OPTIMIZERS)}.")
    if optim == "adamw_triton":
        from modeling_moe.kernels.adamw import TritonAdamW as optimizer_class

        options = {}
    else:
        optimizer_class, options = torch.optim.AdamW, dict(fused=True if optim == "adamw_torch_fused" else None)
    if args.cuda_graph:
        options["capturable"] = True
    return optimizer_class(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=torch.tensor(args.learning_rate, device=device) if args.cuda_graph else args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        **options,
    )


# ---------------------------------------------------------------------------------------------------- checkpoints


@dataclass
class TrainerState:
    """Loop position and history, saved in every checkpoint (registered with accelerate)."""

    global_step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0  # training blocks drawn in the current epoch, all processes together
    tokens_seen: int = 0
    world_size: int = 1
    expert_parallel_size: int = 1
    log_history: list = field(default_factory=list)
    first_window_load: list | None = None  # tokens per expert [MoE layers][experts] over the first logging window
    first_window_steps: list | None = None
    total_load: list | None = None  # ... and over the whole run
    open_window: dict | None = None  # the logging window a checkpoint cut (sums over its steps, all ranks' mean)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict):
        for key, value in state.items():
            if hasattr(self, key):
                setattr(self, key, value)


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints of `output_dir`, oldest first."""
    found = []
    root = Path(output_dir)
    if root.is_dir():
        for path in root.iterdir():
            match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
            if match and path.is_dir() and (path / TRAINER_STATE_NAME).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_checkpoint(value: str | None, output_dir: str) -> Path | None:
    if not value:
        return None
    if value == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    path = Path(value)
    if not (path / TRAINER_STATE_NAME).is_file():
        raise ConfigurationError(
            f"--resume_from_checkpoint {value}: not a complete checkpoint folder (no {TRAINER_STATE_NAME})."
        )
    return path


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint was saved at (its trainer state's global_step)."""
    return int(json.loads((checkpoint / TRAINER_STATE_NAME).read_text()).get("global_step", 0))


def discard_checkpoints(accelerator, checkpoints: list[tuple[int, Path]]):
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for _, path in checkpoints:
            shutil.rmtree(path)


def save_checkpoint(accelerator, state: TrainerState, output_dir: str, save_total_limit: int | None) -> Path:
    """`accelerator.save_state` into a temporary folder, then one rename: checkpoint-N is complete or absent."""
    final = Path(output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
    staging = Path(output_dir) / f".tmp-{final.name}"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.environ.get(KILL_DURING_SAVE_ENV) == str(state.global_step):
            os.kill(os.getpid(), signal.SIGKILL)
        with open(staging / TRAINER_STATE_NAME, "w") as f:
            json.dump(state.state_dict(), f, indent=1)
        if final.exists():  # a rerun overwriting an old checkpoint of the same step
            trash = Path(output_dir) / f".old-{final.name}"
            os.replace(final, trash)
            os.replace(staging, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, final)
        if save_total_limit is not None and save_total_limit > 0:
            for _, old in list_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def clean_stale_staging(output_dir: str):
    for path in Path(output_dir).glob(".tmp-checkpoint-*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in Path(output_dir).glob(".old-checkpoint-*"):
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ the loop


class Batches:
    """Endless micro-batches over epochs; the position (epoch, samples drawn) lives in the TrainerState."""

    def __init__(self, accelerator, loader, state: TrainerState, per_process_batch: int):
        self.accelerator, self.loader, self.state = accelerator, loader, state
        self.global_batch = per_process_batch * accelerator.num_processes
        self._iterator = None

    def _batches(self):
        while True:
            skip = self.state.samples_in_epoch // self.global_batch
            self.loader.set_epoch(self.state.epoch)
            loader = self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
            for batch in loader:
                self.state.samples_in_epoch += self.global_batch
                yield batch
            self.state.epoch += 1
            self.state.samples_in_epoch = 0

    def next(self):
        if self._iterator is None:
            self._iterator = self._batches()
        return next(self._iterator)


def predicted_tokens(micro_batches: list[dict], accelerator, mtp_depths: int = 0) -> torch.Tensor:
    """The tokens with a label to predict in an optimizer step's micro-batches, summed over the ranks: [1 +
    mtp_depths] counts, the next token's (labels[:, 1:]), then each MTP depth d's (labels[:, d + 1:])."""
    count = torch.stack([sum((batch["labels"][:, shift:] != -100).sum() for batch in micro_batches)
                         for shift in range(1, mtp_depths + 2)])
    return accelerator.reduce(count, reduction="sum").clamp(min=1)


@torch.no_grad()
def evaluate(model, loader, accelerator, progress: bool = False) -> dict:
    """Over the held-out blocks, exact over ranks: `eval_loss`, the token-weighted mean cross-entropy (plain LM loss,
    no MTP), and `eval_maxvio`, per MoE layer of the decoder, MaxVio_global (Wang et al. 2024): the MaxVio of the
    expert loads summed over the whole held-out set, the balance that matters for inference, unlike the per-batch
    MaxVio of training steps. `progress`: a progress bar over the batches."""
    from tqdm.auto import tqdm

    from modeling_moe.modeling_moe import max_violation

    model.eval()
    routers = [layer.mlp.gate for layer in accelerator.unwrap_model(model).model.layers if layer.is_moe]
    total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    load = None
    for batch in tqdm(loader, desc="evaluating", unit="batch", leave=False, dynamic_ncols=True, disable=not progress):
        labels = batch.pop("labels")
        outputs = model(**batch, use_cache=False, output_router_logits=bool(routers))
        shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
        losses = F.cross_entropy(
            outputs.logits.float().flatten(0, 1), shifted.flatten(), ignore_index=-100, reduction="none"
        ).view_as(shifted)
        loads = torch.stack(  # [sequences, layers, experts], per sequence so that gather_for_metrics stays exact
            [router.expert_load(logits, labels.shape[0]) for router, logits in zip(routers, outputs.router_logits)],
            dim=1,
        ) if routers else labels.new_zeros(labels.shape[0], 0, 0, dtype=torch.float32)
        sums, counts, loads = accelerator.gather_for_metrics(
            (losses.sum(dim=1), (shifted != -100).sum(dim=1), loads)
        )
        total += sums.double().sum()
        count += counts.double().sum()
        load = loads.sum(dim=0) if load is None else load + loads.sum(dim=0)
    model.train()
    maxvio = [] if load is None or not routers else [round(v, 4) for v in max_violation(load).tolist()]
    return {"eval_loss": (total / count.clamp(min=1)).item(), "eval_maxvio": maxvio}


def _router_names(model) -> list[str]:
    names = []
    for name, module in model.named_modules():
        if hasattr(module, "e_score_correction_bias") and hasattr(module, "top_k"):
            match = re.search(r"(mtp_layers|layers)\.(\d+)\.", name)
            if match and match.group(1) == "mtp_layers":
                names.append(f"MTP {int(match.group(2)) + 1}")
            elif match:
                names.append(f"layer {match.group(2)}")
            else:
                names.append(name)
    return names


def _check_trackers(report_to: list[str]) -> list[str]:
    from accelerate.utils import LoggerType

    trackers = [t for t in report_to if t and t.lower() != "none"]
    known = [member.value for member in LoggerType]
    for tracker in trackers:
        if tracker.lower() not in known:
            raise ConfigurationError(f"--report_to {tracker!r} is not a tracker accelerate knows: {', '.join(known)}.")
    if any(t.lower() in ("tensorboard", "all") for t in trackers):
        from accelerate.utils import is_tensorboard_available

        if not is_tensorboard_available():
            raise ConfigurationError("--report_to tensorboard needs the tensorboard package: pip install tensorboard")
    return trackers


def _scalar_config(*dataclass_objects) -> dict:
    values = {}
    for obj in dataclass_objects:
        for key, value in dataclasses.asdict(obj).items():
            values[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return values


def _reset_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def main(argv: list[str] | None = None) -> dict:
    """Run a pretraining (arguments as on the command line) and return its summary: output_dir, first_loss,
    last_loss, final_eval_loss, global_step, tokens_seen, throughput, the paths written."""
    model_args, data_args, args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        return train(model_args, data_args, args)
    finally:
        _reset_accelerate_state()


def _check_gpu_per_process():
    """Each process of a launch on a machine with GPUs needs a GPU of its own, also with --use_cpu: accelerate's
    barrier names a device per process (`cuda:<local rank>` wherever CUDA is present), which fails with a bare CUDA
    error past the last GPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if 0 < gpus <= local_rank:
        raise ConfigurationError(
            f"This process has local rank {local_rank}, but the machine shows {gpus} GPU(s): launch at most {gpus} "
            f"process(es) per machine, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on the CPU.")


def train(model_args: ModelArguments, data_args: DataArguments, args: PretrainArguments) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import (
        DataLoaderConfiguration,
        GradientAccumulationPlugin,
        ProjectConfiguration,
        TorchDynamoPlugin,
        gather_object,
    )
    from transformers import get_scheduler

    from modeling_moe.trainers.cuda_graph import GraphedStep
    from modeling_moe.trainers.expert_parallel import ExpertParallel, check_expert_parallel_size
    from modeling_moe.trainers.metrics import PhaseTimes, peak_flops_per_device, training_flops_per_token
    from modeling_moe.trainers.profiling import StepProfiler, parse_profile_steps, profile_record

    phases = PhaseTimes()
    # Cheap checks first: a wrong preset, length, parallel layout or tracker fails before any data or model work.
    config = build_config(model_args, data_args)
    trackers = _check_trackers(args.report_to)
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
        if getattr(args, name) < 1:
            raise ConfigurationError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    for name in ("warmup_steps", "weight_decay"):
        if getattr(args, name) < 0:
            raise ConfigurationError(f"--{name} must be >= 0, got {getattr(args, name)}.")
    if args.learning_rate <= 0:
        raise ConfigurationError(f"--learning_rate must be > 0, got {args.learning_rate}.")
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        raise ConfigurationError("Nothing to train: give --max_steps >= 1 or --num_train_epochs > 0.")
    try:
        profile_steps = parse_profile_steps(args.profile_steps)
    except ValueError as error:
        raise ConfigurationError(str(error)) from error
    if profile_steps and args.max_steps > 0:
        _check_profile_steps(profile_steps, args.max_steps)
    if data_args.dataset is not None and not os.path.exists(os.path.expanduser(data_args.dataset)):
        from modeling_moe.trainers.data import load_documents

        load_documents(data_args.dataset)  # FileNotFoundError naming the accepted formats

    _check_gpu_per_process()
    output_dir = args.output_dir
    # A caller that set up torch.distributed itself keeps its process group; otherwise accelerate's is torn down.
    owns_process_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    accelerator = Accelerator(
        mixed_precision="bf16" if args.bf16 else None,
        cpu=args.use_cpu or not torch.cuda.is_available(),
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=args.seed if args.data_seed is None else args.data_seed
        ),
        log_with=trackers or None,
        project_config=ProjectConfiguration(
            project_dir=output_dir, logging_dir=args.logging_dir or os.path.join(output_dir, "runs")
        ),
        step_scheduler_with_optimizer=False,
        dynamo_plugin=TorchDynamoPlugin(backend=args.torch_compile_backend, mode=args.torch_compile_mode,
                                        use_regional_compilation=True) if args.torch_compile else None,
    )
    main_process = accelerator.is_main_process
    show_progress = main_process and not args.disable_tqdm
    world = accelerator.num_processes
    ep_size = args.expert_parallel_size
    try:
        check_expert_parallel_size(ep_size, world, config.n_routed_experts)
    except ValueError as error:
        raise ConfigurationError(str(error)) from error
    if args.cuda_graph:
        _check_cuda_graph(args, accelerator.device, world)
    if args.tf32 is not None and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32

    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
    if args.resume_from_checkpoint == "latest" and checkpoint is None and main_process:
        logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting from scratch", output_dir)
    existing = list_checkpoints(output_dir)
    if existing and checkpoint is None:
        if not args.overwrite_output_dir:
            raise ConfigurationError(
                f"{output_dir} already holds checkpoints ({existing[-1][1].name}, ...): pass --resume_from_checkpoint "
                "latest to continue that run, or --overwrite_output_dir to start over (deletes them)."
            )
        discard_checkpoints(accelerator, existing)
    # Checkpoints past the one resumed from hold a run this one will not follow: `latest` would pick them after a
    # crash, and save_total_limit would keep them and delete this run's own.
    resumed_step = checkpoint_step(checkpoint) if checkpoint is not None else None
    newer = [(step, path) for step, path in existing if resumed_step is not None and step > resumed_step]
    if newer:
        if not args.overwrite_output_dir:
            raise ConfigurationError(
                f"{output_dir} holds checkpoints past {checkpoint.name} ({', '.join(p.name for _, p in newer)}), "
                "from a run this one will diverge from: resume from latest, or pass --overwrite_output_dir to delete "
                "them and go on from the older checkpoint."
            )
        discard_checkpoints(accelerator, newer)
    if main_process:
        os.makedirs(output_dir, exist_ok=True)
        clean_stale_staging(output_dir)
    accelerator.wait_for_everyone()

    # Data.
    phases.mark("setup")
    tokenizer = load_tokenizer(model_args, config)
    train_set, eval_set, data_info = build_datasets(data_args, tokenizer, accelerator)
    if len(train_set) < args.per_device_train_batch_size * world:
        raise ConfigurationError(
            f"The training set has {len(train_set)} blocks of {data_args.seq_len} tokens: fewer than one batch of "
            f"{args.per_device_train_batch_size} x {world} processes. Use a smaller --seq_len or batch size, or more "
            "data."
        )
    collate = make_collate(data_args.document_attention)
    pin = accelerator.device.type == "cuda"
    train_loader = DataLoader(
        train_set, batch_size=args.per_device_train_batch_size, shuffle=True, drop_last=True, collate_fn=collate,
        num_workers=args.dataloader_num_workers, pin_memory=pin,
    )
    eval_loader = None
    if eval_set is not None:
        eval_loader = DataLoader(
            eval_set, batch_size=args.per_device_eval_batch_size or args.per_device_train_batch_size,
            shuffle=False, collate_fn=collate, num_workers=args.dataloader_num_workers, pin_memory=pin,
        )

    # Model, expert sharding, optimizer.
    phases.mark("data")
    model = build_model(config, model_args, args.seed)
    counts = model.num_parameters_summary()
    flops_per_token = training_flops_per_token(model, data_args.seq_len)
    layer_names = _router_names(model)
    if args.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if accelerator.is_fsdp2:
        wrap_present_layer_classes(accelerator.state.fsdp_plugin, model)
    expert_parallel = None
    if ep_size > 1:
        expert_parallel = ExpertParallel(ep_size, accelerator.device.type)
        expert_parallel.shard(model)
        if accelerator.is_fsdp2:
            expert_parallel.fully_shard(accelerator.state.fsdp_plugin)
        else:
            expert_parallel.exclude_from_ddp(model)
    model.train()
    optimizer = build_optimizer(model, args, accelerator.device, fsdp2=accelerator.is_fsdp2)
    phases.mark("model")
    if eval_loader is not None:
        model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    else:
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    phases.mark("prepare")
    unwrapped = accelerator.unwrap_model(model)

    # Optimizer steps draw micro-batches across epoch boundaries: an epoch is a number of micro-batches, not of steps.
    epochs_in_micro_batches = args.num_train_epochs * len(train_loader)
    max_steps = args.max_steps if args.max_steps > 0 else math.ceil(
        epochs_in_micro_batches / args.gradient_accumulation_steps
    )
    if profile_steps:
        _check_profile_steps(profile_steps, max_steps)
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=max_steps
    )
    state = TrainerState(world_size=world, expert_parallel_size=ep_size)
    accelerator.register_for_checkpointing(state, scheduler)
    if expert_parallel is not None:
        accelerator.register_for_checkpointing(expert_parallel.checkpoint_state(optimizer))

    if checkpoint is not None:
        saved = json.loads((checkpoint / TRAINER_STATE_NAME).read_text())
        if saved.get("expert_parallel_size", 1) != ep_size:
            raise ConfigurationError(
                f"{checkpoint} was written with --expert_parallel_size {saved.get('expert_parallel_size', 1)}; "
                f"resume it with the same value (got {ep_size})."
            )
        if saved.get("world_size", 1) != world:
            raise ConfigurationError(
                f"{checkpoint} was written by {saved.get('world_size', 1)} processes; resume it with as many "
                f"(got {world}): each process restores its own random and data state."
            )
        accelerator.load_state(str(checkpoint))
        if args.cuda_graph:  # the loaded learning rates are the checkpoint's tensors, on the CPU: back where read
            for group in optimizer.param_groups:
                group["lr"] = group["lr"].to(accelerator.device)
        state.log_history = [r for r in state.log_history if r["step"] <= state.global_step]
        if main_process:
            logger.info("resumed from %s at step %d", checkpoint, state.global_step)

    metrics_path = os.path.join(output_dir, METRICS_NAME)
    if main_process:
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in state.log_history)
    if trackers:
        accelerator.init_trackers("pretrain", config=_scalar_config(model_args, data_args, args))

    peak = peak_flops_per_device(accelerator.device, args.peak_tflops)
    if main_process:
        logger.info(
            "model %s: %.2fM parameters, %.2fM activated per token, %.3g training FLOPs per token; %d processes "
            "(%s, expert parallel %d); data: %d training / %d held-out documents, %d / %d tokens",
            model_args.model_config, counts["total"] / 1e6, counts["activated"] / 1e6, flops_per_token, world,
            accelerator.distributed_type.value, ep_size, data_info["train_documents"], data_info["eval_documents"],
            data_info["train_tokens"], data_info["eval_tokens"],
        )

    def record_metrics(record: dict):
        state.log_history.append(record)
        if main_process:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if trackers:
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            for i, value in enumerate(record.get("maxvio") or []):
                scalars[f"maxvio/{layer_names[i] if i < len(layer_names) else i}"] = value
            accelerator.log(scalars, step=record["step"])

    batches = Batches(accelerator, train_loader, state, args.per_device_train_batch_size)
    tokens_per_step = args.per_device_train_batch_size * data_args.seq_len * args.gradient_accumulation_steps * world
    device = accelerator.device
    num_layers = len(layer_names)
    experts = config.n_routed_experts
    # Window accumulators, summed on the device and read (one sync) at logging steps only; a resumed run continues
    # the window its checkpoint cut, so that its next record averages the same steps as an uninterrupted run's.
    window = {
        "lm": torch.zeros((), device=device), "objective": torch.zeros((), device=device), "steps": 0,
        "maxvio": torch.zeros(num_layers, device=device), "load": torch.zeros(num_layers, experts, device=device),
        "start": time.perf_counter(), "first_step": state.global_step + 1,
    }
    if state.open_window:
        window.update({key: torch.tensor(value, device=device) if key in ("lm", "objective", "maxvio", "load")
                       else value for key, value in state.open_window.items()})
        state.open_window = None

    def window_losses() -> torch.Tensor:
        """The window's summed [lm, objective] losses, averaged over the data-parallel ranks."""
        return accelerator.reduce(torch.stack([window["lm"], window["objective"]]), reduction="mean")

    last_window_load, last_window_steps = None, None

    def optimizer_step(micro_batches: list[dict]) -> dict:
        """One optimizer step over `micro_batches`: its losses (summed over them, for the window), the gradient norm
        and the balancing statistics. No host sync: --cuda_graph replays it from a graph."""
        objective = torch.zeros((), device=device)
        lm = torch.zeros((), device=device)
        num_items, *mtp_items = predicted_tokens(micro_batches, accelerator, len(unwrapped.model.mtp_layers))
        for batch in micro_batches:
            with accelerator.accumulate(model):
                # the loss from the hidden states in chunks: the [tokens, vocab] logits are never held whole; each
                # micro-batch's loss is its share of the mean over the step's tokens on all ranks (MTP's too)
                output = model(**batch, use_cache=False, skip_logits=True, num_items_in_batch=num_items,
                               mtp_items_in_batch=mtp_items or None)
                # accelerator.backward divides by the accumulation steps and DDP / FSDP average over the ranks:
                # the shares must add up instead
                accelerator.backward(output.loss * (args.gradient_accumulation_steps * world))
            objective += output.loss.detach().float() * world  # (the logged window averages over the ranks)
            lm += output.lm_loss.detach().float() * world
            del output
        if not accelerator.sync_gradients:
            raise RuntimeError("gradient accumulation fell out of step with the optimizer")
        if expert_parallel is not None:
            expert_parallel.finish_gradients()
            grad_norm = expert_parallel.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        else:
            max_norm = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        balance = unwrapped.update_expert_bias()  # once per optimizer step, counts summed over all ranks
        return dict(objective=objective, lm=lm, grad_norm=grad_norm, **balance)

    # --cuda_graph: steps 1 and 2 eager (compilation, the optimizer's state), step 3 captured, then replays
    run_step = GraphedStep(optimizer_step, warmup=2) if args.cuda_graph else optimizer_step

    if args.eval_on_start and eval_loader is not None and state.global_step == 0:
        record_metrics({"step": 0, **evaluate(model, eval_loader, accelerator, show_progress)})
        window["start"] = time.perf_counter()

    profiler = None
    if profile_steps and state.global_step < profile_steps[0]:
        profiler = StepProfiler(profile_steps, os.path.join(output_dir, "profile"), accelerator.process_index, device,
                                trace=args.profile_trace)
    elif profile_steps and main_process:
        logger.warning("--profile_steps %s: resumed at step %d, past the first profiled step; not profiling",
                       args.profile_steps, state.global_step)
    profile = None

    progress = None
    if show_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=max_steps, initial=state.global_step, desc="pretraining", unit="step", dynamic_ncols=True)

    if main_process:
        logger.info("start-up (wall s): %s", phases.seconds)
    phases.mark("before_first_step")
    model.train()
    train_start = time.perf_counter()
    out_of_time = False
    while state.global_step < max_steps and not out_of_time:
        step = state.global_step + 1
        if profiler is not None:
            started = time.perf_counter()
            profiler.start_if(step)
            window["start"] += time.perf_counter() - started  # the profiler's set-up is not training time
        micro_batches = [batches.next() for _ in range(args.gradient_accumulation_steps)]
        lr = scheduler.get_last_lr()[0]
        result = run_step(micro_batches)
        scheduler.step()
        state.global_step = step
        if args.max_train_seconds > 0:  # one rank's clock decides, for all (an all-reduce of a flag)
            if time.perf_counter() - train_start >= args.max_train_seconds:
                accelerator.set_trigger()
            out_of_time = accelerator.check_trigger() and step < max_steps
            if out_of_time and main_process:
                logger.info("--max_train_seconds %g reached: training stops at step %d of %d",
                            args.max_train_seconds, step, max_steps)
        if "first_step" not in phases.seconds:  # host time to run step 1: kernel compilation, allocator growth
            phases.mark("first_step")
        state.tokens_seen += tokens_per_step
        window["objective"] += result["objective"]
        window["lm"] += result["lm"]
        window["steps"] += 1
        if num_layers:
            window["maxvio"] += result["maxvio"].to(device)
            window["load"] += result["tokens_per_expert"].to(device)

        record = {}
        if step % args.logging_steps == 0 or step == max_steps or out_of_time:
            losses = (window_losses() / window["steps"]).tolist()
            elapsed = max(time.perf_counter() - window["start"], 1e-9)
            tokens_per_second = window["steps"] * tokens_per_step / elapsed
            maxvio = (window["maxvio"] / window["steps"]).tolist()
            peak_memory = None
            if device.type == "cuda":  # the largest process's peak allocated memory since the start, GiB
                peak_bytes = torch.tensor([float(torch.cuda.max_memory_allocated(device))], device=device)
                peak_memory = round(accelerator.gather(peak_bytes).max().item() / 2**30, 2)
            load = window["load"].tolist()
            last_window_load, last_window_steps = load, [window["first_step"], step]
            if state.first_window_load is None:
                state.first_window_load, state.first_window_steps = load, [window["first_step"], step]
            state.total_load = load if state.total_load is None else [
                [a + b for a, b in zip(row, new)] for row, new in zip(state.total_load, load)
            ]
            record = {
                "step": step,
                "epoch": round(state.epoch + state.samples_in_epoch / max(len(train_set), 1), 4),
                "loss": losses[0],
                "train_objective": losses[1],
                "lr": _to_float(lr),
                "grad_norm": _to_float(result["grad_norm"]),
                "tokens_per_second": round(tokens_per_second, 1),
                "mfu": round(tokens_per_second * flops_per_token / (peak * world), 4) if peak else None,
                "maxvio": [round(v, 4) for v in maxvio],
                "tokens_seen": state.tokens_seen,
                "peak_memory_gib": peak_memory,
            }
            if progress is not None:
                progress.set_postfix(
                    loss=f"{losses[0]:.3f}", tok_s=f"{tokens_per_second:,.0f}",
                    mfu=f"{record['mfu']:.1%}" if record["mfu"] is not None else "n/a",
                    maxvio=f"{max(maxvio):.2f}" if maxvio else "n/a",
                )
            window.update(lm=torch.zeros((), device=device), objective=torch.zeros((), device=device), steps=0,
                          maxvio=torch.zeros(num_layers, device=device),
                          load=torch.zeros(num_layers, experts, device=device), first_step=step + 1)
        evaluate_now = eval_loader is not None and (
            step == max_steps or out_of_time
            or (args.eval_steps and args.eval_steps > 0 and step % args.eval_steps == 0)
        )
        if evaluate_now:
            record.setdefault("step", step)
            record.update(evaluate(model, eval_loader, accelerator, show_progress))
        if record:
            record_metrics(record)
        if profiler is not None:
            started = time.perf_counter()
            summary = profiler.stop_if(step)
            if summary is not None:
                profile = profile_record(gather_object([summary]))  # every rank's, in rank order
                record_metrics(profile)
            window["start"] += time.perf_counter() - started  # nor is the summarising
        save_now = args.save_steps > 0 and (step % args.save_steps == 0 or out_of_time)
        if save_now:  # a run stopped by the clock can be resumed from where it stopped
            if window["steps"]:
                losses = window_losses()
                state.open_window = {"lm": losses[0].item(), "objective": losses[1].item(), "steps": window["steps"],
                                     "maxvio": window["maxvio"].tolist(), "load": window["load"].tolist(),
                                     "first_step": window["first_step"]}
            save_checkpoint(accelerator, state, output_dir, args.save_total_limit)
            state.open_window = None
        if progress is not None:
            progress.update(1)
        if record or save_now:
            window["start"] = time.perf_counter()  # throughput windows exclude evaluation and checkpointing
    if progress is not None:
        progress.close()

    # A run resumed from its last step has not evaluated yet in this process.
    if eval_loader is not None and not any(
        r["step"] == state.global_step and r.get("eval_loss") is not None for r in state.log_history
    ):
        record_metrics({"step": state.global_step, **evaluate(model, eval_loader, accelerator, show_progress)})

    if args.save_final_model:
        # Final model: every expert gathered back into one ordinary checkpoint.
        state_dict = {  # FSDP2: full tensors (DTensors are gathered here when a torch build hands them back sharded)
            key: value.full_tensor() if hasattr(value, "full_tensor") else value
            for key, value in accelerator.get_state_dict(model).items()
        }
        if expert_parallel is not None:
            full_experts = expert_parallel.full_expert_state_dict()
            if main_process:
                state_dict.update(full_experts)
        if main_process:
            save_final_model(config, state_dict, output_dir)
            tokenizer.save_pretrained(output_dir)
    elif main_process:
        config.save_pretrained(output_dir)
    accelerator.wait_for_everyone()

    phases.mark("training")
    history = state.log_history
    train_records = [r for r in history if r.get("loss") is not None]
    eval_records = [r for r in history if r.get("eval_loss") is not None]
    loss_plot = os.path.join(output_dir, "loss.png")
    load_plot = os.path.join(output_dir, "expert_load.png")
    if main_process:
        if importlib.util.find_spec("matplotlib") is None:
            logger.warning("matplotlib is not installed: no loss.png / expert_load.png (pip install matplotlib)")
            loss_plot = load_plot = None
        else:
            from modeling_moe.trainers.plots import plot_expert_load, plot_loss

            plot_loss(history, loss_plot, vocab_size=config.vocab_size)
            panels = []
            if state.first_window_load is not None:
                first, last = state.first_window_steps, last_window_steps
                panels.append((f"first logged window: {_steps(first)}", state.first_window_load))
                if last_window_load is not None and last != first:
                    panels.append((f"last logged window: {_steps(last)}", last_window_load))
                panels.append((f"whole run: {_steps([1, state.global_step])}", state.total_load))
            plot_expert_load(panels, layer_names, load_plot)
    summary = {
        "output_dir": output_dir,
        "global_step": state.global_step,
        "stopped_by_time": out_of_time,
        "first_loss": train_records[0]["loss"] if train_records else None,
        "last_loss": train_records[-1]["loss"] if train_records else None,
        "final_eval_loss": eval_records[-1]["eval_loss"] if eval_records else None,
        "eval_losses": [(r["step"], r["eval_loss"]) for r in eval_records],
        "tokens_seen": state.tokens_seen,
        "tokens_per_second": train_records[-1]["tokens_per_second"] if train_records else None,
        "mfu": train_records[-1]["mfu"] if train_records else None,
        "maxvio": train_records[-1]["maxvio"] if train_records else None,
        "peak_memory_gib": train_records[-1].get("peak_memory_gib") if train_records else None,
        "profile": profile,
        "phase_seconds": phases.seconds,
        "num_parameters": counts,
        "flops_per_token": flops_per_token,
        "world_size": world,
        "expert_parallel_size": ep_size,
        "resumed_from": str(checkpoint) if checkpoint is not None else None,
        "checkpoints": [str(path) for _, path in list_checkpoints(output_dir)],
        "metrics_file": metrics_path,
        "loss_plot": loss_plot,
        "expert_load_plot": load_plot,
    }
    if main_process:
        with open(os.path.join(output_dir, "pretrain_summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        logger.info(
            "done: step %d, training loss %s -> %s, held-out loss %s; %s in %s",
            state.global_step, _fmt(summary["first_loss"]), _fmt(summary["last_loss"]),
            _fmt(summary["final_eval_loss"]), "model and tokenizer" if args.save_final_model else "metrics", output_dir,
        )
    accelerator.wait_for_everyone()
    if owns_process_group:
        accelerator.end_training()
    else:
        for tracker in accelerator.trackers:
            tracker.finish()
    return summary


def save_final_model(config, state_dict: dict, output_dir: str):
    """`save_pretrained` of a plain MoEForCausalLM holding `state_dict` (full tensors, every expert).

    The trained module itself may be an FSDP2 or expert-parallel subclass, whose class would be exported as the
    checkpoint's remote code; a copy built on the meta device and given the tensors saves like a freshly loaded model.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    # --torch_compile wraps modules in torch.compile's OptimizedModule: their keys gain an `_orig_mod.` level
    state_dict = {key.replace("._orig_mod.", "."): value for key, value in state_dict.items()}
    plain.load_state_dict(state_dict, strict=True, assign=True)
    plain.save_pretrained(output_dir)


def _check_profile_steps(steps: tuple[int, int], max_steps: int):
    if steps[1] > max_steps:
        raise ConfigurationError(
            f"--profile_steps {steps[0]},{steps[1]}: step {steps[1]} is beyond the run's {max_steps} optimizer steps."
        )


def _check_cuda_graph(args: PretrainArguments, device: torch.device, world: int):
    """--cuda_graph's needs, each named: a failed capture would say far less."""
    problems = []
    if device.type != "cuda":
        problems.append(f"a CUDA device (this run is on {device.type})")
    if world > 1:
        problems.append(f"one process (this run has {world}: DDP, FSDP2 and expert parallelism synchronise ranks "
                        "inside the step)")
    if args.gradient_checkpointing:
        problems.append("no --gradient_checkpointing (its recomputation saves and restores the random state, which "
                        "a capture forbids)")
    if args.torch_compile and args.torch_compile_mode in ("reduce-overhead", "max-autotune"):
        problems.append(f"a --torch_compile_mode without CUDA graphs of its own (got {args.torch_compile_mode}; "
                        "use default or max-autotune-no-cudagraphs)")
    if problems:
        raise ConfigurationError("--cuda_graph needs " + "; ".join(problems) + ".")


def _steps(span: list[int]) -> str:
    return f"step {span[0]}" if span[0] == span[1] else f"steps {span[0]}-{span[1]}"


def _to_float(tensor) -> float:
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return float(tensor)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def cli(argv: list[str] | None = None) -> int:
    """Command line entry: a configuration mistake prints one line instead of a traceback."""
    from modeling_moe.trainers.data import DatasetReadError

    try:
        main(argv)
    except (ConfigurationError, DatasetReadError, FileNotFoundError) as error:
        print(f"pretrain: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())

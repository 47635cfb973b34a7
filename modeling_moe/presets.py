"""Model presets: the single source of truth for the shapes shipped in `hub_configs/`.

Each preset is a dict of `MoEConfig` keyword arguments. `write_presets` turns them into Hub-style folders
(`config.json`, `generation_config.json`, a model card and, for the GPT-2-vocabulary presets, the tokenizer), which
install as `modeling_moe.hub_configs`:

    import modeling_moe
    from modeling_moe.presets import load_preset_config, preset_path
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(preset_path("tiny"))  # or load_preset_config("tiny", num_hidden_layers=4)
    model = AutoModelForCausalLM.from_config(config)

Regenerate the folders after editing a preset: `python -m modeling_moe.presets --write hub_configs`.
"""

from __future__ import annotations

import argparse
import copy
import importlib.resources
import json
import os
import shutil
from pathlib import Path

from .configuration_moe import MoEConfig

GPT2_VOCAB_SIZE = 50257
GPT2_EOS = 50256  # <|endoftext|>: bos, eos and pad of the GPT-2 tokenizer


def _yarn(mscale: float) -> dict:
    """DeepSeek-V2/V3's YaRN context extension: 4K pretraining context stretched 40x to 160K."""
    return {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": mscale,
        "mscale_all_dim": mscale,
    }


PRESETS: dict[str, dict] = {
    # Every code path (MLA, sigmoid group-limited routing, shared expert, dense first layer, MTP) at toy size:
    # for tests and CPU demos. Almost all of its parameters are the GPT-2 embedding and output head.
    "tiny": dict(
        vocab_size=GPT2_VOCAB_SIZE,
        hidden_size=64,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_attention_heads=4,
        attention_type="mla",
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_rope_head_dim=16,
        qk_nope_head_dim=16,
        v_head_dim=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        scoring_func="sigmoid",
        topk_method="group_limited",
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        bias_update_speed=0.001,
        num_nextn_predict_layers=1,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=GPT2_EOS,
        eos_token_id=GPT2_EOS,
    ),
    # ~100M parameters activated per token (input embedding excluded, output head included) out of ~460M:
    # a DeepSeek-V3-style recipe for pretraining experiments on a single node.
    "moe-100m": dict(
        vocab_size=GPT2_VOCAB_SIZE,
        hidden_size=768,
        num_hidden_layers=12,
        first_k_dense_replace=1,
        intermediate_size=1536,  # = (top-k + shared) * moe_intermediate_size: the dense layer costs one MoE layer
        moe_intermediate_size=192,
        num_attention_heads=12,
        attention_type="mla",
        q_lora_rank=None,
        kv_lora_rank=256,
        qk_rope_head_dim=32,
        qk_nope_head_dim=64,
        v_head_dim=64,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_shared_experts=2,
        scoring_func="sigmoid",
        topk_method="greedy",
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        bias_update_speed=0.001,
        seq_aux_loss_coef=0.0001,
        num_nextn_predict_layers=1,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rope_interleave=False,  # the faster rotary layout; DeepSeek export reorders the rows
        bos_token_id=GPT2_EOS,
        eos_token_id=GPT2_EOS,
    ),
    # deepseek-ai/DeepSeek-V2-Lite: 15.7B total, 2.4B activated.
    "deepseek-v2-lite": dict(
        vocab_size=102400,
        hidden_size=2048,
        num_hidden_layers=27,
        first_k_dense_replace=1,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_attention_heads=16,
        attention_type="mla",
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_shared_experts=2,
        scoring_func="softmax",
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        bias_update_speed=0.0,  # V2 balances with auxiliary losses, not with the routing bias
        seq_aux_loss_coef=0.026,  # aux_loss_alpha 0.001 (seq_aux=true) of the released config x 26 MoE layers
        num_nextn_predict_layers=0,
        max_position_embeddings=163840,
        rope_parameters=_yarn(0.707),
        rms_norm_eps=1e-6,
        bos_token_id=100000,
        eos_token_id=100001,
    ),
    # deepseek-ai/DeepSeek-V3: 671B total (without the MTP module), 37B activated.
    "deepseek-v3": dict(
        vocab_size=129280,
        hidden_size=7168,
        num_hidden_layers=61,
        first_k_dense_replace=3,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_attention_heads=128,
        attention_type="mla",
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        n_routed_experts=256,
        num_experts_per_tok=8,
        n_shared_experts=1,
        scoring_func="sigmoid",
        topk_method="group_limited",
        n_group=8,
        topk_group=4,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        bias_update_speed=0.001,  # gamma of the V3 report (for the first 14.3T tokens)
        seq_aux_loss_coef=0.0058,  # alpha 0.0001 of the V3 report x 58 MoE layers
        num_nextn_predict_layers=1,
        max_position_embeddings=163840,
        rope_parameters=_yarn(1.0),
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=1,
    ),
    # Grouped-query attention with Qwen3-MoE-style routing: softmax top-4 of 32, renormalised, no shared experts,
    # every layer MoE, standard (non-interleaved) RoPE.
    "gqa-moe": dict(
        vocab_size=GPT2_VOCAB_SIZE,
        hidden_size=512,
        num_hidden_layers=12,
        first_k_dense_replace=0,
        intermediate_size=1536,  # unused: no dense layer
        moe_intermediate_size=256,
        num_attention_heads=8,
        attention_type="gqa",
        num_key_value_heads=2,
        head_dim=64,
        n_routed_experts=32,
        num_experts_per_tok=4,
        n_shared_experts=0,
        scoring_func="softmax",
        topk_method="greedy",
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        bias_update_speed=0.0,
        router_aux_loss_coef=0.001,
        num_nextn_predict_layers=0,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rope_interleave=False,
        bos_token_id=GPT2_EOS,
        eos_token_id=GPT2_EOS,
    ),
}

# What each preset folder holds besides config.json: the card's text, the generation defaults, the tokenizer.
PRESET_INFO: dict[str, dict] = {
    "tiny": dict(
        title="Tiny MoE (tests and CPU demos)",
        summary="A toy-size model that exercises every code path of `modeling_moe`: Multi-head Latent Attention, "
        "sigmoid group-limited routing with aux-loss-free bias balancing, a shared expert, a dense first layer and "
        "one multi-token-prediction module. A CPU forward pass takes milliseconds. Nearly all of its parameters are "
        "the GPT-2 embedding table and output head.",
        tags=["tiny", "testing"],
        tokenizer=True,
        generation=dict(do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=64),
    ),
    "moe-100m": dict(
        title="MoE-100M (pretraining preset)",
        summary="A DeepSeek-V3-style recipe at ~100M activated parameters: MLA, 64 fine-grained routed experts "
        "(top-6) plus 2 shared ones, sigmoid routing with aux-loss-free bias balancing and a small sequence-wise "
        "balance loss, a dense first layer and one multi-token-prediction module. Sized for pretraining experiments "
        "on one node with the GPT-2 tokenizer.",
        tags=["pretraining"],
        tokenizer=True,
        generation=dict(do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=256),
    ),
    "deepseek-v2-lite": dict(
        title="DeepSeek-V2-Lite shape",
        summary="The architecture of [deepseek-ai/DeepSeek-V2-Lite](https://huggingface.co/deepseek-ai/DeepSeek-V2-Lite) "
        "(15.7B total, 2.4B activated): MLA without query compression, 64 routed experts (top-6, softmax, not "
        "renormalised) plus 2 shared ones, a dense first layer and YaRN RoPE extended to 160K positions. It has no "
        "weights: instantiate it (or load the real checkpoint) to train or study it.",
        tags=["deepseek", "deepseek_v2"],
        tokenizer=False,
        generation=dict(do_sample=True, temperature=0.3, top_p=0.95),
    ),
    "deepseek-v3": dict(
        title="DeepSeek-V3 shape",
        summary="The architecture of [deepseek-ai/DeepSeek-V3](https://huggingface.co/deepseek-ai/DeepSeek-V3) "
        "(671B total, 37B activated): MLA with query compression, 256 routed experts (top-8 within the 4 best of 8 "
        "groups, sigmoid scores, renormalised and scaled by 2.5) plus 1 shared one, 3 dense layers, aux-loss-free "
        "bias balancing, YaRN RoPE extended to 160K positions and one multi-token-prediction module. It has no "
        "weights: use it to plan memory, count parameters on the meta device, or as a template.",
        tags=["deepseek", "deepseek_v3"],
        tokenizer=False,
        generation=dict(do_sample=True, temperature=0.6, top_p=0.95),
    ),
    "gqa-moe": dict(
        title="GQA MoE (Qwen3-MoE-like)",
        summary="A small grouped-query-attention MoE in the style of Qwen3-MoE: 8 query heads sharing 2 key/value "
        "heads, 32 routed experts with softmax top-4 routing (renormalised), no shared experts, every layer MoE, a "
        "batch-wise load-balancing loss when `output_router_logits=True`, and the GPT-2 tokenizer.",
        tags=["gqa"],
        tokenizer=True,
        generation=dict(do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=256),
    ),
}

# Files `write_presets` owns inside a preset folder (removed before it rewrites the folder).
_PRESET_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "README.md",
)
# Keyword arguments MoEConfig accepts that are not attributes of a config instance.
_EXTRA_CONFIG_KWARGS = {"attn_implementation", "experts_implementation"}


def preset_names() -> list[str]:
    """The preset names, in the order of `PRESETS`."""
    return list(PRESETS)


def _canonical_name(name: str) -> str | None:
    name = name.strip().lower().replace("_", "-")
    return name if name in PRESETS else None


def _unknown_preset(name) -> ValueError:
    return ValueError(
        f"Unknown preset {name!r}. Known presets: {', '.join(preset_names())} (or pass a folder with a config.json)."
    )


def _hub_configs_dir() -> Path:
    """`modeling_moe.hub_configs` when installed; the top-level `hub_configs/` folder of a source checkout otherwise."""
    try:
        root = importlib.resources.files("modeling_moe.hub_configs")
        path = Path(str(root))
        if path.is_dir():
            return path
    except (ModuleNotFoundError, TypeError, ValueError):
        pass
    return Path(__file__).resolve().parent.parent / "hub_configs"


def preset_path(name: str) -> Path:
    """The folder of preset `name` (config.json, generation_config.json, model card, tokenizer when it has one)."""
    canonical = _canonical_name(name) if isinstance(name, str) else None
    if canonical is None:
        raise _unknown_preset(name)
    return _hub_configs_dir() / canonical


def preset_kwargs(name: str) -> dict:
    """A deep copy of preset `name`'s MoEConfig keyword arguments."""
    canonical = _canonical_name(name) if isinstance(name, str) else None
    if canonical is None:
        raise _unknown_preset(name)
    return copy.deepcopy(PRESETS[canonical])


def load_preset_config(name_or_path: str | os.PathLike, **overrides) -> MoEConfig:
    """The MoEConfig of a preset (by name) or of a folder holding a config.json, with `overrides` applied.

    Overrides go through `MoEConfig.__init__`, so derived fields and validation follow them (e.g. `head_dim` in MLA);
    a field MoEConfig does not know raises `ValueError` instead of being stored silently.
    """
    default = _default_config()
    unknown = sorted(key for key in overrides if key not in _EXTRA_CONFIG_KWARGS and not hasattr(default, key))
    if unknown:
        raise ValueError(f"Unknown MoEConfig field(s) {unknown}; RoPE settings go in `rope_parameters`.")
    canonical = _canonical_name(name_or_path) if isinstance(name_or_path, str) else None
    if canonical is not None:
        kwargs = preset_kwargs(canonical)
    elif os.path.isfile(os.path.join(os.fspath(name_or_path), "config.json")):
        kwargs, _ = MoEConfig.get_config_dict(os.fspath(name_or_path))
        for key in ("transformers_version", "auto_map", "architectures"):
            kwargs.pop(key, None)
        model_type = kwargs.pop("model_type", MoEConfig.model_type)
        if model_type != MoEConfig.model_type:
            raise ValueError(f"{name_or_path} holds a {model_type!r} config, not a {MoEConfig.model_type!r} one.")
    else:
        raise _unknown_preset(name_or_path)
    kwargs.update(overrides)
    return MoEConfig(**kwargs)


_DEFAULT_CONFIG: MoEConfig | None = None


def _default_config() -> MoEConfig:
    global _DEFAULT_CONFIG
    if _DEFAULT_CONFIG is None:
        _DEFAULT_CONFIG = MoEConfig()
    return _DEFAULT_CONFIG


# ----------------------------------------------------------------------------------------------------------- counts


def parameter_counts(config: MoEConfig) -> dict[str, int]:
    """Parameter counts of `MoEForCausalLM(config)`, built on the meta device (no memory, milliseconds).

    `total` and `activated` come from `num_parameters_summary()` (activated: per token, without the input embedding
    table and the MTP modules); `mtp` is the MTP modules' own parameters (they share the embedding and head),
    `total_without_mtp` what the DeepSeek reports call the model size, `embedding` the input table.
    """
    import torch

    from .modeling_moe import MoEForCausalLM

    with torch.device("meta"):
        counts = MoEForCausalLM(config).num_parameters_summary()
    return {**counts, "total_without_mtp": counts["total"] - counts["mtp"]}


def kv_cache_bytes_per_token(config: MoEConfig, bytes_per_element: int = 2) -> dict[str, int]:
    """KV-cache bytes per token over all decoder layers (MTP modules are skipped at inference), bf16 by default.

    `model`: what this model caches (MLA: the latent plus the shared rotary key; GQA: keys and values of the KV heads).
    `mha`: a multi-head attention model with the same heads and head sizes, caching full keys and values per head.
    """
    layers = config.num_hidden_layers
    if config.attention_type == "mla":
        model = (config.kv_lora_rank + config.qk_rope_head_dim) * layers * bytes_per_element
        mha = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * layers * bytes_per_element
    else:
        model = 2 * config.num_key_value_heads * config.head_dim * layers * bytes_per_element
        mha = 2 * config.num_attention_heads * config.head_dim * layers * bytes_per_element
    return {"model": model, "mha": mha}


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _bytes(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.2f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n} B"


# ----------------------------------------------------------------------------------------------------------- files


def _config_with_auto_map(name: str) -> MoEConfig:
    from .modeling_moe import MoEForCausalLM, MoEModel

    config = MoEConfig(**preset_kwargs(name))
    # What `model.save_pretrained` records, so the folder also names the model classes for trust_remote_code users.
    config.auto_map = {
        auto: f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"
        for auto, cls in (("AutoConfig", MoEConfig), ("AutoModel", MoEModel), ("AutoModelForCausalLM", MoEForCausalLM))
    }
    return config


def _write_compact_tokenizer(tokenizer, folder: Path):
    """`save_pretrained`, then rewrite tokenizer.json on one line with merges as "a b" strings (the Hub gpt2 layout):
    1.36 MB instead of 3.6 MB, loaded identically."""
    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer.json"
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = data["model"].get("merges", [])
    if all(isinstance(m, list) and len(m) == 2 and " " not in m[0] + m[1] for m in merges):
        data["model"]["merges"] = [" ".join(m) for m in merges]
    path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def _model_card(name: str, config: MoEConfig, counts: dict, kv: dict, with_code: bool = False) -> str:
    info = PRESET_INFO[name]
    mla = config.attention_type == "mla"
    tags = ["modeling_moe", "moe", "mixture-of-experts", "mla" if mla else "gqa", *info["tags"], "text-generation"]
    tags = list(dict.fromkeys(tags))
    front = ["---", "library_name: transformers", "license: apache-2.0", "pipeline_tag: text-generation", "tags:"]
    front += [f"- {tag}" for tag in tags]
    front += ["---", ""]

    rope = config.rope_parameters
    rope_text = f"{rope['rope_type']}, theta {rope['rope_theta']:.0f}"
    if rope["rope_type"] == "yarn":
        rope_text += (
            f", factor {rope['factor']:g} from {rope['original_max_position_embeddings']} positions, "
            f"beta_fast {rope['beta_fast']:g}, beta_slow {rope['beta_slow']:g}, mscale {rope['mscale']:g}, "
            f"mscale_all_dim {rope['mscale_all_dim']:g}"
        )
    rope_text += ", interleaved (DeepSeek layout)" if config.rope_interleave else ", half-split (rotate_half)"
    if mla:
        q = "plain q_proj" if config.q_lora_rank is None else f"q_lora_rank {config.q_lora_rank}"
        attention = (
            f"MLA: {config.num_attention_heads} heads, kv_lora_rank {config.kv_lora_rank}, {q}, "
            f"qk_nope_head_dim {config.qk_nope_head_dim}, qk_rope_head_dim {config.qk_rope_head_dim}, "
            f"v_head_dim {config.v_head_dim}"
        )
    else:
        attention = (
            f"GQA: {config.num_attention_heads} query heads, {config.num_key_value_heads} key/value heads, "
            f"head_dim {config.head_dim}"
        )
    routing = f"{config.scoring_func} scores, top-{config.num_experts_per_tok}"
    if config.topk_method == "group_limited":
        routing += f" within the best {config.topk_group} of {config.n_group} groups"
    routing += ", renormalised" if config.norm_topk_prob else ", not renormalised"
    if config.routed_scaling_factor != 1:
        routing += f", scaled by {config.routed_scaling_factor:g}"
    balance = []
    if config.bias_update_speed:
        balance.append(f"aux-loss-free bias, speed {config.bias_update_speed:g}")
    if config.seq_aux_loss_coef:
        per_layer = config.seq_aux_loss_coef / max(config.num_moe_layers, 1)
        balance.append(f"sequence-wise loss {config.seq_aux_loss_coef:g} (mean over MoE layers; "
                       f"alpha {per_layer:.3g} a layer)")
    if config.router_aux_loss_coef:
        balance.append(f"batch-wise loss {config.router_aux_loss_coef:g} (with output_router_logits)")
    dense, mtp = config.first_k_dense_replace, config.num_nextn_predict_layers
    rows = [
        ("vocab_size", f"{config.vocab_size}"),
        ("hidden_size", f"{config.hidden_size}"),
        ("layers", f"{config.num_hidden_layers} ({dense} dense + {config.num_moe_layers} MoE)"),
        ("attention", attention),
        ("dense FFN", f"SwiGLU, intermediate_size {config.intermediate_size}" if dense else "none"),
        (
            "experts",
            f"{config.n_routed_experts} routed + {config.n_shared_experts} shared, "
            f"moe_intermediate_size {config.moe_intermediate_size}",
        ),
        ("routing", routing),
        ("load balancing", "; ".join(balance) or "none"),
        ("multi-token prediction", f"{mtp} module" + ("s" if mtp != 1 else "")),
        ("context", f"{config.max_position_embeddings} positions"),
        ("RoPE", rope_text),
        ("tied embeddings", "yes" if config.tie_word_embeddings else "no"),
    ]
    lines = front + [f"# {info['title']}", "", info["summary"], "", "## Shape", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]

    lines += [
        "",
        "## Parameters",
        "",
        "Counted on the meta device with `MoEForCausalLM` and `num_parameters_summary()`.",
        "",
        "| | parameters |",
        "|---|---|",
        f"| total | {_human(counts['total'])} ({counts['total']:,}) |",
    ]
    if counts["mtp"]:
        lines.append(
            f"| total without the MTP layers | {_human(counts['total_without_mtp'])} "
            f"({counts['total_without_mtp']:,}) |"
        )
    lines += [
        f"| activated per token | {_human(counts['activated'])} ({counts['activated']:,}) |",
        f"| input embedding | {_human(counts['embedding'])} ({counts['embedding']:,}) |",
        "",
        "Activated parameters exclude the input embedding table (a lookup, the convention of the DeepSeek reports) and "
        "the MTP modules (skipped at inference); they include the output head.",
    ]
    if counts["mtp"]:
        note = (
            f"The MTP layers hold {_human(counts['mtp'])} of their own: they share the embedding table and the output "
            "head with the main model"
        )
        if name == "deepseek-v3":
            embed_and_head = 2 * config.vocab_size * config.hidden_size
            note += (
                f". DeepSeek's released checkpoint stores its own copies of both ({_human(embed_and_head)} more), "
                f"hence its {_human(counts['total'] + embed_and_head)} (published as 685B)"
            )
        lines.append(note + ".")

    ratio = kv["mha"] / kv["model"]
    kv_name = "MLA latent + shared rotary key" if mla else "GQA keys and values"
    lines += [
        "",
        "## KV cache",
        "",
        f"Per token, over the {config.num_hidden_layers} decoder layers, in bf16:",
        "",
        "| | bytes per token |",
        "|---|---|",
        f"| this model ({kv_name}) | {kv['model']:,} ({_bytes(kv['model'])}) |",
        f"| multi-head attention of the same shape | {kv['mha']:,} ({_bytes(kv['mha'])}) |",
        "",
    ]
    if mla:
        lines.append(
            f"MLA caches (kv_lora_rank + qk_rope_head_dim) = {config.kv_lora_rank + config.qk_rope_head_dim} values "
            f"per layer instead of heads x (qk_head_dim + v_head_dim) = "
            f"{config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)}: {ratio:.1f}x less."
        )
    else:
        lines.append(
            f"GQA caches 2 x {config.num_key_value_heads} key/value heads x head_dim {config.head_dim} per layer "
            f"instead of 2 x {config.num_attention_heads} heads: {ratio:.1f}x less."
        )

    lines += ["", "## Tokenizer", ""]
    if info["tokenizer"]:
        lines.append(
            "The folder ships GPT-2's byte-level BPE tokenizer (50257 ids; `<|endoftext|>` = 50256 is bos, eos and "
            "pad), built by `modeling_moe.tokenization.gpt2_tokenizer()`."
        )
    else:
        lines.append(
            f"No tokenizer is shipped: this shape's vocabulary ({config.vocab_size} ids, bos {config.bos_token_id}, "
            f"eos {config.eos_token_id}) is DeepSeek's own, and its tokenizer comes with the real DeepSeek checkpoint."
        )

    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "import modeling_moe  # registers the model with transformers' Auto classes",
        "from modeling_moe.presets import load_preset_config, preset_path",
        "from transformers import AutoConfig, AutoModelForCausalLM",
        "",
        f'config = AutoConfig.from_pretrained(preset_path("{name}"))',
    ]
    if counts["total"] > 5e9:
        lines += [
            "",
            "import torch",
            "",
            'with torch.device("meta"):  # the shape only: no memory is allocated',
            "    model = AutoModelForCausalLM.from_config(config)",
        ]
    else:
        lines.append("model = AutoModelForCausalLM.from_config(config)")
    if info["tokenizer"]:
        lines += [
            "",
            "from transformers import AutoTokenizer",
            "",
            f'tokenizer = AutoTokenizer.from_pretrained(preset_path("{name}"))',
        ]
    lines += [
        "",
        "# or with changes:",
        f'config = load_preset_config("{name}", num_hidden_layers=4)',
        "```",
        "",
    ]
    if with_code:
        lines.append(
            "The folder also holds the modeling code named by `config.json`'s `auto_map`, so it loads with "
            "`trust_remote_code=True` where `modeling_moe` is not installed."
        )
    else:
        lines.append(
            "`config.json`'s `auto_map` names the classes that `model.save_pretrained` exports next to the weights, "
            "so a saved model also loads with `trust_remote_code=True` where `modeling_moe` is not installed; this "
            "folder itself holds no code and needs `import modeling_moe`."
        )
    lines += [
        "",
        "This folder is generated from `modeling_moe/presets.py` by `python -m modeling_moe.presets --write "
        "hub_configs`; edit the preset there and regenerate rather than editing these files.",
        "",
    ]
    return "\n".join(lines)


def write_preset(name: str, out_dir: str | os.PathLike, tokenizer=None, with_code: bool = False) -> Path:
    """(Re)write the folder of preset `name` under `out_dir`; returns the folder.

    `with_code` also copies the modeling source files next to config.json, making the folder loadable with
    `trust_remote_code=True` without `modeling_moe` installed (e.g. to push it to the Hub as its own repo).
    """
    from transformers import GenerationConfig

    name = _canonical_name(name) or name
    if name not in PRESETS:
        raise _unknown_preset(name)
    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    for file in _PRESET_FILES:
        (folder / file).unlink(missing_ok=True)

    config = _config_with_auto_map(name)
    config.save_pretrained(folder)
    # save_pretrained also exports configuration_moe.py for the auto_map; the folder holds no code.
    for exported in folder.glob("*.py"):
        exported.unlink()
    if with_code:
        copy_model_code(folder)

    info = PRESET_INFO[name]
    generation = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.eos_token_id if config.pad_token_id is None else config.pad_token_id,
        **info["generation"],
    )
    generation.save_pretrained(folder)

    if info["tokenizer"]:
        if config.vocab_size != GPT2_VOCAB_SIZE:
            raise ValueError(f"Preset {name!r} ships the GPT-2 tokenizer but has vocab_size={config.vocab_size}.")
        if tokenizer is None:
            from .tokenization import gpt2_tokenizer

            tokenizer = gpt2_tokenizer()
        tokenizer.model_max_length = config.max_position_embeddings
        _write_compact_tokenizer(tokenizer, folder)

    counts = parameter_counts(config)
    kv = kv_cache_bytes_per_token(config)
    (folder / "README.md").write_text(_model_card(name, config, counts, kv, with_code), encoding="utf-8")
    return folder


def write_presets(out_dir: str | os.PathLike, names: list[str] | None = None, with_code: bool = False) -> list[Path]:
    """(Re)generate the folders of `names` (default: every preset) under `out_dir`; returns them."""
    names = preset_names() if names is None else names
    tokenizer = None
    if any(PRESET_INFO[_canonical_name(n) or n]["tokenizer"] for n in names if (_canonical_name(n) or n) in PRESETS):
        from .tokenization import gpt2_tokenizer

        tokenizer = gpt2_tokenizer()  # built once, shared by the presets that ship it
    return [write_preset(name, out_dir, tokenizer=tokenizer, with_code=with_code) for name in names]


def copy_model_code(folder: str | os.PathLike):
    """Copy `modeling_moe.py` and the package files it imports (what `model.save_pretrained` exports) into `folder`."""
    from transformers.dynamic_module_utils import get_relative_import_files

    from . import modeling_moe as modeling

    files = {modeling.__file__, *get_relative_import_files(modeling.__file__)}
    for file in sorted(files):
        shutil.copy(file, Path(folder) / os.path.basename(file))


def _print_summary(names: list[str]):
    header = f"{'preset':<18}{'total':>10}{'w/o MTP':>10}{'activated':>11}{'KV/token':>12}{'MHA KV/token':>14}"
    print(header)
    for name in names:
        config = MoEConfig(**preset_kwargs(name))
        counts, kv = parameter_counts(config), kv_cache_bytes_per_token(config)
        print(
            f"{name:<18}{_human(counts['total']):>10}{_human(counts['total_without_mtp']):>10}"
            f"{_human(counts['activated']):>11}{_bytes(kv['model']):>12}{_bytes(kv['mha']):>14}"
        )


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        prog="python -m modeling_moe.presets",
        description="List the model presets with their parameter counts, or (re)generate their folders "
        "(config.json with auto_map, generation_config.json, model card, GPT-2 tokenizer where the vocabulary is "
        "GPT-2's).",
    )
    parser.add_argument("--write", metavar="DIR", help="write one folder per preset under DIR (e.g. hub_configs)")
    parser.add_argument("--preset", action="append", choices=preset_names(), help="only this preset (repeatable)")
    parser.add_argument(
        "--with-code",
        action="store_true",
        help="also copy the modeling source files into each folder, for trust_remote_code without the package",
    )
    args = parser.parse_args(argv)
    names = args.preset or preset_names()
    _print_summary(names)
    if args.write:
        for folder in write_presets(args.write, names, with_code=args.with_code):
            print(f"wrote {folder}")


if __name__ == "__main__":
    main()

"""DeepSeek-V2/V3 checkpoints in and out: config mapping, weight-name conversion, lazy loading and atomic saving.

Two weight layouts are read:
    - the original DeepSeek Hub layout, also what transformers' `save_pretrained` writes: one tensor per routed
      expert (`mlp.experts.{i}.{gate,up,down}_proj.weight`), and the multi-token-prediction (MTP) modules stored as
      extra decoder layers `model.layers.{num_hidden_layers + d}` holding `enorm`, `hnorm`, `eh_proj`,
      `shared_head.norm` and copies of the embedding (`embed_tokens`) and output head (`shared_head.head`);
    - transformers' in-memory layout, with the experts stacked as `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows
      first) and `mlp.experts.down_proj` [E, H, I], exactly like ours.
Weights stored in FP8 with block scales (`<name>.weight_scale_inv`, DeepSeek-V3's official checkpoint) are dequantized
to the model's dtype as they load.
Saving writes the Hub layout, which transformers, vLLM and SGLang all load.
"""

import copy
import json
import os
import re
from contextlib import contextmanager

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import DeepseekV2Config, DeepseekV3Config, GenerationConfig
from transformers.initialization import no_init_weights
from transformers.utils import logging
from transformers.utils.hub import convert_file_size_to_int

from .configuration_moe import MoEConfig

logger = logging.get_logger(__name__)

DEEPSEEK_CONFIG_CLASSES = {"deepseek_v2": DeepseekV2Config, "deepseek_v3": DeepseekV3Config}
DEEPSEEK_MODEL_TYPES = tuple(DEEPSEEK_CONFIG_CLASSES)

# Same name and meaning in MoEConfig and in DeepSeek configs.
SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
    "n_routed_experts", "num_experts_per_tok", "first_k_dense_replace", "routed_scaling_factor", "hidden_act",
    "max_position_embeddings", "attention_bias", "attention_dropout", "initializer_range", "rms_norm_eps",
    "use_cache", "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id",
)
# Training-only MoEConfig fields: written into the exported config.json under their own names (other tools ignore
# them) so that a save/load round trip gives back the same config.
TRAINING_FIELDS = ("bias_update_speed", "seq_aux_loss_coef", "router_aux_loss_coef", "mtp_loss_weight")

LAYER_KEY = re.compile(r"^model\.layers\.(?P<index>\d+)\.(?P<rest>.+)$")
MTP_KEY = re.compile(r"^model\.mtp_layers\.(?P<depth>\d+)\.(?P<rest>.+)$")
EXPERT_KEY = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")
# In the Hub layout an MTP module's final norm is `shared_head.norm`; its embedding and head duplicate the shared ones.
MTP_HUB_NORM, MTP_NORM = "shared_head.norm.weight", "norm.weight"
MTP_SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
# Weights whose output rows end with the rotary dimensions of each head (q) or of the shared rotary key (kv_a).
ROPE_ROW_SUFFIXES = (
    ".self_attn.q_proj.weight", ".self_attn.q_b_proj.weight",
    ".self_attn.kv_a_proj_with_mqa.weight", ".self_attn.kv_a_proj_with_mqa.bias",
)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIX = "_scale_inv"  # DeepSeek-V3's FP8 checkpoint: `<name>.weight` in FP8 beside `<name>.weight_scale_inv`
NOOP_LOAD_KWARGS = ("trust_remote_code", "local_files_only", "low_cpu_mem_usage", "use_safetensors")


def is_deepseek_checkpoint(path) -> bool:
    config_file = os.path.join(str(path), "config.json")
    if not os.path.isfile(config_file):
        return False
    with open(config_file) as f:
        return json.load(f).get("model_type") in DEEPSEEK_MODEL_TYPES


# ----------------------------------------------------------------------------------------------------------- config


def deepseek_config_to_moe(config_dict: dict) -> MoEConfig:
    """MoEConfig for a DeepSeek-V2/V3 `config.json` dict (transformers' or the original Hub one).

    Parsed through transformers' own DeepseekV2Config / DeepseekV3Config so that absent fields get the defaults, and
    `rope_scaling` the standardisation, that transformers applies. Raises `ValueError` naming the field for anything
    our model cannot reproduce.
    """
    model_type = config_dict.get("model_type")
    if model_type not in DEEPSEEK_CONFIG_CLASSES:
        raise ValueError(
            f"model_type={model_type!r} is not a DeepSeek checkpoint; expected one of {DEEPSEEK_MODEL_TYPES}."
        )
    _refuse_unsupported(config_dict)
    # A deep copy: transformers standardises `rope_scaling` in place, which would edit the caller's dict.
    source = DEEPSEEK_CONFIG_CLASSES[model_type].from_dict(copy.deepcopy(config_dict))
    fields = {name: getattr(source, name) for name in SHARED_FIELDS}
    if model_type == "deepseek_v3":
        fields.update(_v3_routing(source))
    else:
        moe_layers = max(source.num_hidden_layers - source.first_k_dense_replace, 0)
        fields.update(_v2_routing(source), **_balance_loss_from_v2(config_dict, moe_layers))
    fields.update({name: config_dict[name] for name in TRAINING_FIELDS if name in config_dict})
    # transformers' DeepseekV2 always uses complex (interleaved) rotary embeddings.
    interleave = getattr(source, "rope_interleave", True) if model_type == "deepseek_v3" else True
    return MoEConfig(
        attention_type="mla",
        n_shared_experts=source.n_shared_experts or 0,
        num_nextn_predict_layers=getattr(source, "num_nextn_predict_layers", 0) or 0,
        rope_parameters=_rope_parameters(source),
        rope_interleave=interleave is not False,
        dtype=source.dtype,
        **fields,
    )


def fp8_block_size(config_dict: dict) -> tuple[int, int] | None:
    """The [rows, columns] of the blocks that share one scale in a checkpoint's FP8 weights (DeepSeek-V3's official
    checkpoint: 128 x 128), from its `quantization_config`; None without one. Other quantization methods are refused.
    """
    quantization = config_dict.get("quantization_config")
    if not quantization:
        return None
    method, block = quantization.get("quant_method"), quantization.get("weight_block_size")
    if method != "fp8" or not (isinstance(block, (list, tuple)) and len(block) == 2
                               and all(isinstance(size, int) and size > 0 for size in block)):
        raise ValueError(
            f"quantization_config (quant_method={method!r}, weight_block_size={block!r}): only FP8 weights with "
            "block scales (DeepSeek-V3's quant_method='fp8', weight_block_size=[128, 128]) are read, dequantized as "
            "they load; convert other quantized checkpoints to bfloat16 first."
        )
    return tuple(block)


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """An FP8 weight [rows, columns] times its blocks' scales [ceil(rows / block[0]), ceil(columns / block[1])], in
    float32 (as DeepSeek-V3's `weight_dequant`; the last blocks may be partial)."""
    rows, columns = weight.shape
    expected = (-(-rows // block[0]), -(-columns // block[1]))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"an FP8 weight of shape {(rows, columns)} in {block[0]} x {block[1]} blocks needs scales of "
                         f"shape {expected}, got {tuple(scale_inv.shape)}.")
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :columns]
    return weight.float() * scale


def _refuse_unsupported(config_dict: dict):
    fp8_block_size(config_dict)
    if config_dict.get("moe_layer_freq", 1) != 1:
        raise ValueError(
            f"moe_layer_freq={config_dict['moe_layer_freq']!r} is not supported: only 1 (every layer after "
            "first_k_dense_replace is MoE) is."
        )
    if config_dict.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported: our feed-forward layers have no biases.")


def _v3_routing(source) -> dict:
    scoring = getattr(source, "scoring_func", None) or "sigmoid"
    if scoring != "sigmoid":
        raise ValueError(f"scoring_func={scoring!r} is not supported for deepseek_v3: DeepSeek-V3 routes with sigmoid.")
    method = getattr(source, "topk_method", None) or "noaux_tc"
    if method != "noaux_tc":
        raise ValueError(f"topk_method={method!r} is not supported for deepseek_v3: only 'noaux_tc' is.")
    n_group = source.n_group or 1
    return {"scoring_func": "sigmoid", "norm_topk_prob": bool(source.norm_topk_prob),
            **_grouping(n_group, source.topk_group or n_group)}


def _v2_routing(source) -> dict:
    scoring = getattr(source, "scoring_func", None) or "softmax"
    if scoring != "softmax":
        raise ValueError(f"scoring_func={scoring!r} is not supported for deepseek_v2: DeepSeek-V2 routes with softmax.")
    method = source.topk_method or "greedy"
    if method == "greedy":
        grouping = {"topk_method": "greedy", "n_group": 1, "topk_group": 1}
    elif method == "group_limited_greedy":
        if not source.n_group or not source.topk_group:
            raise ValueError("topk_method='group_limited_greedy' needs n_group and topk_group to be set.")
        grouping = _grouping(source.n_group, source.topk_group)
    else:
        raise ValueError(
            f"topk_method={method!r} is not supported for deepseek_v2: only 'greedy' and 'group_limited_greedy' are."
        )
    if source.norm_topk_prob:
        logger.warning(
            "norm_topk_prob=True in a deepseek_v2 config is ignored, as transformers' DeepseekV2 does (it never "
            "normalises the top-k weights); the original DeepSeek-V2 code would normalise them."
        )
    # DeepSeek-V2 has no expert bias: keep it at zero when training so the model stays exportable.
    return {"scoring_func": "softmax", "norm_topk_prob": False, "bias_update_speed": 0.0, **grouping}


def _balance_loss_from_v2(config_dict: dict, num_moe_layers: int) -> dict:
    """Our fields for DeepSeek-V2's balance loss: `aux_loss_alpha` times the sequence-wise loss (`seq_aux`, true
    unless given) or the batch-wise one, which our model computes only when it outputs the router logits. DeepSeek
    adds each MoE layer's loss times alpha; our coefficients weigh the mean over the layers, hence alpha x layers.
    (DeepSeek-V3 configs carry these fields too, but its released code never trains: not mapped.)"""
    alpha = config_dict.get("aux_loss_alpha")
    if alpha is None:
        return {}
    coef = alpha * num_moe_layers
    if config_dict.get("seq_aux", True):
        return {"seq_aux_loss_coef": coef}
    return {"router_aux_loss_coef": coef, "output_router_logits": True}


def _balance_loss_to_v2(config: MoEConfig) -> dict:
    """DeepSeek-V2's one balance loss for `config`: the sequence-wise one, unless only the batch-wise one is on."""
    layers = max(config.num_moe_layers, 1)
    if not config.seq_aux_loss_coef and config.router_aux_loss_coef and config.output_router_logits:
        return {"aux_loss_alpha": config.router_aux_loss_coef / layers, "seq_aux": False}
    return {"aux_loss_alpha": config.seq_aux_loss_coef / layers, "seq_aux": True}


def _grouping(n_group: int, topk_group: int) -> dict:
    if topk_group >= n_group:  # every group is kept: plain top-k
        return {"topk_method": "greedy", "n_group": 1, "topk_group": 1}
    return {"topk_method": "group_limited", "n_group": n_group, "topk_group": topk_group}


def _rope_parameters(source) -> dict:
    rope = {key: value for key, value in dict(source.rope_parameters).items() if key != "type"}
    rope.setdefault("rope_type", "default")
    # transformers' DeepSeek attention sharpens the softmax by mscale_all_dim for any scaled RoPE; ours only for YaRN.
    if rope.get("mscale_all_dim") and rope["rope_type"] not in ("default", "yarn"):
        raise ValueError(
            f"rope_scaling['mscale_all_dim'] is only supported with rope type 'yarn', got {rope['rope_type']!r}."
        )
    return rope


def moe_config_to_deepseek(config: MoEConfig) -> dict:
    """DeepSeek `config.json` dict for `config`: DeepseekV3 with sigmoid routing, DeepseekV2 with softmax.

    transformers' DeepseekV2Config / DeepseekV3Config accept it, and it also carries the original Hub field names
    (`topk_method`, `scoring_func`, `rope_scaling`, `rope_theta`, `moe_layer_freq`) that vLLM and SGLang read.
    """
    _check_exportable(config)
    v3 = config.scoring_func == "sigmoid"
    grouped = config.topk_method == "group_limited" and config.topk_group < config.n_group
    rope = {key: value for key, value in config.rope_parameters.items() if key != "type"}
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", 10000.0)
    config_dict = {
        "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        **{name: getattr(config, name) for name in SHARED_FIELDS},
        "num_key_value_heads": config.num_attention_heads,
        "n_shared_experts": config.n_shared_experts,
        "scoring_func": config.scoring_func,
        "topk_method": "noaux_tc" if v3 else ("group_limited_greedy" if grouped else "greedy"),
        "n_group": config.n_group if grouped else 1,
        "topk_group": config.topk_group if grouped else 1,
        "norm_topk_prob": config.norm_topk_prob,
        "moe_layer_freq": 1,
        "num_nextn_predict_layers": config.num_nextn_predict_layers,
        # The exported weights are always interleaved (see `interleave_rope_rows`): the layout vLLM and SGLang assume.
        "rope_interleave": True,
        "rope_theta": rope["rope_theta"],
        "rope_parameters": rope,
        **{name: getattr(config, name) for name in TRAINING_FIELDS},
        **({} if v3 else _balance_loss_to_v2(config)),
    }
    if rope["rope_type"] != "default":
        scaling = {key: value for key, value in rope.items() if key not in ("rope_type", "rope_theta")}
        config_dict["rope_scaling"] = {"type": rope["rope_type"], "rope_type": rope["rope_type"], **scaling}
    if config.dtype is not None:
        config_dict["torch_dtype"] = config_dict["dtype"] = _dtype_name(config.dtype)
    return config_dict


def _check_exportable(config: MoEConfig):
    if config.attention_type != "mla":
        raise ValueError(
            f"attention_type={config.attention_type!r} cannot be exported: DeepSeek-V2/V3 checkpoints use 'mla'."
        )
    if not config.n_shared_experts:
        raise ValueError(
            "n_shared_experts=0 cannot be exported: transformers' DeepSeek models always build shared experts."
        )
    if config.scoring_func == "softmax" and config.norm_topk_prob:
        raise ValueError(
            "norm_topk_prob=True with scoring_func='softmax' cannot be exported: transformers' DeepseekV2 never "
            "normalises the top-k weights."
        )


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------------------- weights


def deepseek_key_to_moe(key: str, config: MoEConfig):
    """(our parameter name, slot) for a DeepSeek checkpoint key, or None for an MTP copy of a shared weight.

    slot is None for a whole tensor, or (expert, "gate" | "up" | "down") for one routed expert's matrix, a slice of
    our stacked `gate_up_proj` / `down_proj`. Unknown keys come back unchanged, so loading reports them as unexpected.
    """
    layer = LAYER_KEY.match(key)
    if layer and int(layer["index"]) >= config.num_hidden_layers:
        rest = layer["rest"]
        if rest in MTP_SHARED_COPIES:
            return None
        depth = int(layer["index"]) - config.num_hidden_layers
        key = f"model.mtp_layers.{depth}.{MTP_NORM if rest == MTP_HUB_NORM else rest}"
    expert = EXPERT_KEY.match(key)
    if expert is None:
        return key, None
    stacked = "down_proj" if expert["proj"] == "down" else "gate_up_proj"
    return f"{expert['prefix']}.{stacked}", (int(expert["expert"]), expert["proj"])


def moe_key_to_deepseek(name: str, config: MoEConfig) -> str:
    """Checkpoint name of one of our (non-expert-sliced) weights: MTP modules go back to `model.layers.{L + d}`."""
    mtp = MTP_KEY.match(name)
    if mtp is None:
        return name
    rest = MTP_HUB_NORM if mtp["rest"] == MTP_NORM else mtp["rest"]
    return f"model.layers.{config.num_hidden_layers + int(mtp['depth'])}.{rest}"


def deepseek_state_dict_to_moe(state_dict: dict, config: MoEConfig) -> dict:
    """Our state dict from a whole DeepSeek one, in either layout (the loader does the same tensor by tensor)."""
    converted, filled = {}, {}
    for key, tensor in state_dict.items():
        target = deepseek_key_to_moe(key, config)
        if target is None:
            continue
        name, slot = target
        if slot is None:
            converted[name] = tensor
            continue
        if name not in converted:
            converted[name] = tensor.new_empty(_stacked_shape(name, config))
        _slot_view(converted[name], slot).copy_(tensor)
        filled.setdefault(name, set()).add(slot)
    for name, slots in filled.items():
        if missing := _expected_slots([name], config)[name] - slots:
            raise KeyError(f"{name}: the checkpoint lacks experts' matrices {sorted(missing)}.")
    if config.scoring_func == "softmax":  # DeepSeek-V2 has no expert bias: ours stays zero
        for name in [name for name in converted if name.endswith(".mlp.experts.down_proj")]:
            bias = name.replace(".experts.down_proj", ".gate.e_score_correction_bias")
            converted.setdefault(bias, torch.zeros(config.n_routed_experts, dtype=torch.float32))
    return converted


def moe_state_dict_to_deepseek(state_dict: dict, config: MoEConfig) -> dict:
    """DeepSeek Hub-layout state dict from ours: per-expert matrices (views), MTP modules at `model.layers.{L + d}`
    with their embedding / head copies, interleaved rotary rows."""
    converted = {}
    for name, tensor in state_dict.items():
        if name.endswith("e_score_correction_bias") and config.scoring_func == "softmax":
            if tensor.any():
                raise ValueError(
                    f"{name} is non-zero but scoring_func='softmax' exports as DeepSeek-V2, which has no expert bias."
                )
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        key = moe_key_to_deepseek(name, config)
        if key.endswith(".mlp.experts.gate_up_proj"):
            converted.update(_split_experts(key, tensor.chunk(2, dim=1), ("gate", "up")))
        elif key.endswith(".mlp.experts.down_proj"):
            converted.update(_split_experts(key, (tensor,), ("down",)))
        else:
            converted[key] = tensor if config.rope_interleave else interleave_rope_rows(key, tensor, config)
    head = state_dict["model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"]
    for depth in range(config.num_nextn_predict_layers):
        prefix = f"model.layers.{config.num_hidden_layers + depth}"
        converted[f"{prefix}.embed_tokens.weight"] = state_dict["model.embed_tokens.weight"]
        converted[f"{prefix}.shared_head.head.weight"] = head
    return converted


def _split_experts(stacked_key: str, parts, projs) -> dict:
    prefix = stacked_key.rsplit(".", 1)[0]
    return {
        f"{prefix}.{expert}.{proj}_proj.weight": part[expert]
        for part, proj in zip(parts, projs)
        for expert in range(part.shape[0])
    }


def interleave_rope_rows(key: str, tensor: torch.Tensor, config: MoEConfig, inverse: bool = False) -> torch.Tensor:
    """Reorder the rotary rows of a non-interleaved model's projection so that interleaved RoPE computes the same
    attention: the rotated pairs (j, j + d/2) become (2j, 2j + 1); with `inverse`, back. Other tensors are returned
    unchanged."""
    if not key.endswith(ROPE_ROW_SUFFIXES):
        return tensor
    rope = config.qk_rope_head_dim
    block = config.kv_lora_rank + rope if ".kv_a_proj_with_mqa." in key else config.qk_head_dim
    rows = tensor.reshape(-1, block, *tensor.shape[1:])
    order = torch.arange(rope, device=tensor.device).view(2, -1).t().flatten()  # 0, d/2, 1, d/2 + 1, ...
    if inverse:
        order = order.argsort()
    rotary = rows[:, block - rope:][:, order]
    return torch.cat((rows[:, : block - rope], rotary), dim=1).reshape(tensor.shape)


def _slot_view(stacked: torch.Tensor, slot) -> torch.Tensor:
    expert, proj = slot
    half = stacked.shape[1] // 2
    if proj == "gate":
        return stacked[expert, :half]
    if proj == "up":
        return stacked[expert, half:]
    return stacked[expert]


def _stacked_shape(name: str, config: MoEConfig) -> tuple:
    experts, hidden, inner = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
    return (experts, 2 * inner, hidden) if name.endswith("gate_up_proj") else (experts, hidden, inner)


def _expected_slots(names, config: MoEConfig) -> dict:
    """name -> the slots still to fill: every expert's matrices for stacked experts, {None} for a plain tensor."""
    slots = {}
    for name in names:
        if name.endswith(".mlp.experts.gate_up_proj"):
            slots[name] = {(e, proj) for e in range(config.n_routed_experts) for proj in ("gate", "up")}
        elif name.endswith(".mlp.experts.down_proj"):
            slots[name] = {(e, "down") for e in range(config.n_routed_experts)}
        else:
            slots[name] = {None}
    # Optional: DeepSeek-V2 has no expert bias (ours stays zero), and a tied head is the embedding.
    for name in list(slots):
        if (name.endswith("e_score_correction_bias") and config.scoring_func == "softmax") or (
            name == "lm_head.weight" and config.tie_word_embeddings
        ):
            slots[name] = set()
    return slots


# ------------------------------------------------------------------------------------------------------- loading


def load_deepseek_checkpoint(cls, path, *args, **kwargs):
    """Load a local DeepSeek-V2/V3 checkpoint into `cls` (MoEForCausalLM), one tensor at a time, in eval mode.

    Supported keyword arguments: `dtype` / `torch_dtype` (a torch dtype, its name, or "auto": the config's, else the
    checkpoint's), `device_map` (one device), `attn_implementation`, `experts_implementation`; `trust_remote_code`,
    `local_files_only`, `low_cpu_mem_usage` and `use_safetensors=True` are accepted and ignored. Missing or unexpected
    weights raise. FP8 weights are dequantized with their block scales (`quantization_config` quant_method "fp8").
    """
    dtype, device, implementations, overrides = _load_options(args, kwargs)
    path = str(path)
    with open(os.path.join(path, "config.json")) as f:
        config_dict = json.load(f)
    config = _with_overrides(deepseek_config_to_moe(config_dict), overrides)
    key_files = _checkpoint_keys(path)
    _drop_absent_mtp(config, key_files)
    dtype = _resolve_dtype(dtype, config, key_files)
    config.dtype = dtype
    with _default_dtype(dtype), torch.device(device), no_init_weights():
        model = cls(config)
    if config.tie_word_embeddings:
        model.tie_weights()
    _load_weights(model, key_files, path, fp8_block_size(config_dict))
    if "attn_implementation" in implementations:
        model.set_attn_implementation(implementations["attn_implementation"])
    if "experts_implementation" in implementations:
        model.set_experts_implementation(implementations["experts_implementation"])
    model.config.name_or_path = path
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def _load_options(args, kwargs):
    if args:
        raise TypeError(f"Positional model arguments are not supported when loading a DeepSeek checkpoint: {args!r}.")
    kwargs = {name: value for name, value in kwargs.items() if value is not None}
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None) or "auto"
    kwargs.pop("torch_dtype", None)
    device = _single_device(kwargs.pop("device_map", None))
    implementations = {
        name: kwargs.pop(name) for name in ("attn_implementation", "experts_implementation") if name in kwargs
    }
    if kwargs.get("use_safetensors") is False:
        raise ValueError("use_safetensors=False: DeepSeek checkpoints are only read from *.safetensors files.")
    overrides = {name: value for name, value in kwargs.items() if name not in NOOP_LOAD_KWARGS}
    return dtype, device, implementations, overrides


def _with_overrides(config: MoEConfig, overrides: dict) -> MoEConfig:
    """Keyword arguments naming config fields (`use_cache=False`, `output_router_logits=True`) update the config, as
    `from_pretrained` does with a transformers checkpoint; any other is an error."""
    unsupported = sorted(name for name in overrides if not hasattr(config, name))
    if unsupported:
        raise TypeError(
            f"Unsupported keyword argument(s) for loading a DeepSeek checkpoint: {', '.join(unsupported)}. Supported: "
            f"config fields, dtype, torch_dtype, device_map (one device), attn_implementation, experts_implementation, "
            f"{', '.join(NOOP_LOAD_KWARGS)}."
        )
    for name, value in overrides.items():
        setattr(config, name, value)
    if overrides:
        config.check()
    return config


def _single_device(device_map) -> torch.device:
    if device_map is None:
        return torch.device("cpu")
    if device_map == "auto":
        if torch.cuda.device_count() > 1:
            raise ValueError("device_map='auto' would split the model across GPUs, which is not supported here; "
                             "pass a single device such as device_map='cuda:0'.")
        device_map = "cuda:0" if torch.cuda.is_available() else "cpu"
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            names = sorted(map(str, devices))
            raise ValueError(f"device_map must name one device for a DeepSeek checkpoint, got {names}.")
        device_map = devices.pop()
    return torch.device(device_map)


def _checkpoint_keys(path: str) -> dict:
    """key -> shard file, read from the safetensors headers (the index json, if any, names the shards)."""
    index_file = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_file):
        with open(index_file) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(name for name in os.listdir(path) if name.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors weights in {path} (.bin checkpoints are not supported).")
    key_files = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            key_files.update(dict.fromkeys(f.keys(), os.path.join(path, name)))
    return key_files


def _drop_absent_mtp(config: MoEConfig, key_files: dict):
    """transformers' DeepseekV3Config declares one MTP layer by default, but its models (and their save_pretrained)
    have none: when the checkpoint holds no MTP weight at all, load without MTP rather than fail."""
    if not config.num_nextn_predict_layers:
        return
    layers = (LAYER_KEY.match(key) for key in key_files)
    if not any(match and int(match["index"]) >= config.num_hidden_layers for match in layers):
        logger.warning(
            f"The config declares num_nextn_predict_layers={config.num_nextn_predict_layers} but the checkpoint has "
            "no weights for them: loading without multi-token prediction."
        )
        config.num_nextn_predict_layers = 0


def _resolve_dtype(dtype, config: MoEConfig, key_files: dict) -> torch.dtype:
    if dtype == "auto":
        dtype = config.dtype
    if dtype is None:
        with safe_open(key_files["model.embed_tokens.weight"], framework="pt") as f:
            dtype = SAFETENSORS_DTYPES.get(f.get_slice("model.embed_tokens.weight").get_dtype(), torch.bfloat16)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, its name, or 'auto'; got {dtype!r}.")
    return dtype


@contextmanager
def _default_dtype(dtype: torch.dtype):
    # The router weight and expert bias are created in float32 explicitly, so they stay float32.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def _load_weights(model, key_files: dict, path: str, fp8_block: tuple[int, int] | None = None):
    config, targets = model.config, model.state_dict()
    pending, unexpected = _expected_slots(targets, config), []
    per_expert_layout = any(EXPERT_KEY.match(key) for key in key_files)
    scales, used_scales = {key for key in key_files if key.endswith(SCALE_SUFFIX)}, set()
    for file in dict.fromkeys(key_files.values()):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key in scales:
                    continue  # read with its weight
                target = deepseek_key_to_moe(key, config)
                if target is None:
                    continue
                name, slot = target
                if name not in targets or (slot is not None and slot[0] >= targets[name].shape[0]):
                    unexpected.append(key)
                    continue
                tensor = f.get_tensor(key)
                if tensor.dtype in FP8_DTYPES:
                    tensor = _dequantized(key, tensor, key_files, fp8_block, (file, f))
                    used_scales.add(key + SCALE_SUFFIX)
                _copy(targets[name], slot, tensor, key)
                if slot is None:
                    pending[name].clear()
                else:
                    pending[name].discard(slot)
    unexpected += sorted(scales - used_scales)  # scales of no FP8 weight
    missing = _missing_keys(pending, config, per_expert_layout)
    if missing or unexpected:
        raise ValueError(f"Cannot load the DeepSeek checkpoint {path}:" + _listing("missing", missing)
                         + _listing("unexpected", unexpected))


def _dequantized(key: str, weight: torch.Tensor, key_files: dict, block: tuple[int, int] | None,
                 open_shard: tuple) -> torch.Tensor:
    """`weight` (FP8) times its scales, read from `open_shard` (file, handle) when they lie in it, as they usually do
    (reopening a shard parses its header again: tens of thousands of times for DeepSeek-V3's experts)."""
    if block is None:
        raise ValueError(f"{key} is stored in {weight.dtype}, but config.json has no quantization_config giving the "
                         "size of its scales' blocks (DeepSeek-V3: quant_method 'fp8', weight_block_size [128, 128]).")
    scale_key = key + SCALE_SUFFIX
    if scale_key not in key_files:
        raise ValueError(f"{key} is stored in {weight.dtype} without its scales {scale_key}.")
    file, shard = open_shard
    if key_files[scale_key] == file:
        scale_inv = shard.get_tensor(scale_key)
    else:
        with safe_open(key_files[scale_key], framework="pt") as other:
            scale_inv = other.get_tensor(scale_key)
    try:
        return dequantize_fp8(weight, scale_inv, block)
    except ValueError as error:
        raise ValueError(f"{key}: {error}") from None


def _copy(target: torch.Tensor, slot, tensor: torch.Tensor, key: str):
    view = target if slot is None else _slot_view(target, slot)
    if view.shape != tensor.shape:
        raise ValueError(f"{key} has shape {tuple(tensor.shape)} in the checkpoint, {tuple(view.shape)} in the model.")
    view.copy_(tensor)


def _missing_keys(pending: dict, config: MoEConfig, per_expert_layout: bool) -> list[str]:
    """Missing weights under their checkpoint names (per-expert names if the checkpoint uses that layout)."""
    missing = []
    for name, slots in pending.items():
        if not slots:
            continue
        key = moe_key_to_deepseek(name, config)
        if per_expert_layout and None not in slots:
            prefix = key.rsplit(".", 1)[0]
            missing += [f"{prefix}.{expert}.{proj}_proj.weight" for expert, proj in sorted(slots)]
        else:
            missing.append(key)
    return missing


def _listing(kind: str, keys: list[str], limit: int = 50) -> str:
    if not keys:
        return ""
    more = f", ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"\n  {len(keys)} {kind} weight(s): {', '.join(keys[:limit])}{more}"


# -------------------------------------------------------------------------------------------------------- saving


def save_deepseek_checkpoint(model, save_directory, max_shard_size="5GB"):
    """Save `model` (MoEForCausalLM) as a DeepSeek-V3 (sigmoid) or V2 (softmax) checkpoint in the Hub layout.

    Writes config.json, generation_config.json, `model-0000i-of-0000n.safetensors` shards and
    `model.safetensors.index.json` into a hidden folder inside `save_directory`, then moves them in, config last
    (`save_through_staging`), so the target never holds a valid-looking config over half-written weights. Files
    already there that are not this model's weights (a tokenizer, a README, a Trainer's optimizer state) are kept;
    the weight shards of an earlier save that this one does not replace are removed.
    """
    from .modeling_moe import save_through_staging

    config_dict = moe_config_to_deepseek(model.config)
    config_dict["torch_dtype"] = config_dict["dtype"] = _dtype_name(model.get_input_embeddings().weight.dtype)
    tensors = moe_state_dict_to_deepseek(model.state_dict(), model.config)

    def write(staging):
        _write_shards(tensors, staging, convert_file_size_to_int(max_shard_size))
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(config_dict, f, indent=2, sort_keys=True)
        generation_config = getattr(model, "generation_config", None)
        (generation_config or GenerationConfig.from_model_config(model.config)).save_pretrained(staging)

    save_through_staging(str(save_directory), write)


def _write_shards(tensors: dict, directory: str, max_shard_bytes: int):
    shards, current, current_bytes = [], [], 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(key)
        current_bytes += size
    shards.append(current)
    weight_map = {}
    for number, keys in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        # Copies: per-expert views share storage, which safetensors refuses; one shard in memory at a time.
        shard = {key: tensors[key].detach().to("cpu", copy=True).contiguous() for key in keys}
        save_file(shard, os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    total = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


__all__ = [
    "deepseek_config_to_moe",
    "dequantize_fp8",
    "moe_config_to_deepseek",
    "deepseek_state_dict_to_moe",
    "moe_state_dict_to_deepseek",
    "load_deepseek_checkpoint",
    "save_deepseek_checkpoint",
    "is_deepseek_checkpoint",
]

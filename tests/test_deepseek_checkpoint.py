"""DeepSeek-V2/V3 checkpoints: loading transformers' and the original Hub layouts, saving, and the errors."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

from modeling_moe import MoEConfig, MoEForCausalLM
from modeling_moe.deepseek_checkpoint import (
    SHARED_FIELDS,
    TRAINING_FIELDS,
    deepseek_config_to_moe,
    deepseek_state_dict_to_moe,
    interleave_rope_rows,
    moe_config_to_deepseek,
    moe_state_dict_to_deepseek,
    save_deepseek_checkpoint,
)

TINY = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
    v_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
    max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "mscale": 0.9, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}
HUB_YARN = {"type": "yarn", **{key: value for key, value in YARN.items() if key not in ("rope_type", "rope_theta")}}
ROUTING_FIELDS = ("scoring_func", "topk_method", "n_group", "topk_group", "norm_topk_prob", "rope_interleave",
                  "rope_parameters", "num_nextn_predict_layers", "n_shared_experts", "attention_type")


def v3_config(**overrides):
    return DeepseekV3Config(**{**TINY, "q_lora_rank": 24, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5,
                               "rope_interleave": True, "rope_parameters": dict(YARN), **overrides})


def v2_config(topk_method):
    return DeepseekV2Config(**TINY, q_lora_rank=None, topk_method=topk_method, n_group=4, topk_group=2,
                            routed_scaling_factor=1.5, rope_parameters=dict(YARN))


def moe_config(**overrides):
    return MoEConfig(**{**TINY, "q_lora_rank": 24, "scoring_func": "sigmoid", "topk_method": "group_limited",
                        "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 1,
                        "rope_parameters": dict(YARN), **overrides})


@torch.no_grad()
def randomize(model, seed=0, bias=True):
    """Weights large enough for decisive routing, and (V3) a non-zero expert bias that changes the selection."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        param.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.1 * noise)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias") and bias:
            buffer.copy_(0.05 * torch.randn(buffer.shape, generator=generator))
    return model.eval()


@torch.no_grad()
def assert_same_logits(ours, theirs, vocab_size=TINY["vocab_size"]):
    input_ids = torch.randint(2, vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    left_padded = torch.ones_like(input_ids)
    left_padded[1, :4] = 0
    for mask in (None, left_padded):
        ours_logits = ours(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        theirs_logits = theirs(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        real = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        assert (ours_logits[real] - theirs_logits[real]).abs().max() < 1e-4


def hub_layout(state_dict):
    """transformers' stacked experts split into the original per-expert tensors."""
    hub = {}
    for key, tensor in state_dict.items():
        prefix = key.rsplit(".", 1)[0]
        if key.endswith("mlp.experts.gate_up_proj"):
            gate, up = tensor.chunk(2, dim=1)
            for expert in range(tensor.shape[0]):
                hub[f"{prefix}.{expert}.gate_proj.weight"] = gate[expert].clone()
                hub[f"{prefix}.{expert}.up_proj.weight"] = up[expert].clone()
        elif key.endswith("mlp.experts.down_proj"):
            for expert in range(tensor.shape[0]):
                hub[f"{prefix}.{expert}.down_proj.weight"] = tensor[expert].clone()
        else:
            hub[key] = tensor.clone()
    return hub


def write_sharded(state_dict, config_dict, path, shards=2):
    os.makedirs(path, exist_ok=True)
    keys, weight_map = list(state_dict), {}
    for number in range(shards):
        file = f"model-{number + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[number * len(keys) // shards:(number + 1) * len(keys) // shards]
        save_file({key: state_dict[key].contiguous() for key in part}, os.path.join(path, file), {"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_dict, f)


def rewrite_checkpoint(path, edit):
    """Apply `edit` to the state dict of a sharded checkpoint, in place."""
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    state_dict = {}
    for file in files:
        state_dict.update(load_file(os.path.join(path, file)))
        os.remove(os.path.join(path, file))
    edit(state_dict)
    with open(os.path.join(path, "config.json")) as f:
        config_dict = json.load(f)
    write_sharded(state_dict, config_dict, path)


# ------------------------------------------------------------------------------------------- transformers' models


@pytest.mark.parametrize("original_format", [True, False], ids=["per_expert", "stacked"])
def test_v3_from_transformers(tmp_path, original_format):
    reference = randomize(DeepseekV3ForCausalLM(v3_config()))
    reference.save_pretrained(tmp_path, save_original_format=original_format)

    model = MoEForCausalLM.from_pretrained(tmp_path)

    config = model.config
    assert (config.scoring_func, config.topk_method, config.n_group, config.topk_group) == (
        "sigmoid", "group_limited", 4, 2
    )
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_interleave
    assert config.num_nextn_predict_layers == 0  # declared by DeepseekV3Config's default, absent from the weights
    assert not model.training
    bias = reference.model.layers[1].mlp.gate.e_score_correction_bias
    assert torch.equal(model.model.layers[1].mlp.gate.e_score_correction_bias, bias) and bias.abs().sum() > 0
    assert_same_logits(model, reference)


@pytest.mark.parametrize("topk_method", ["greedy", "group_limited_greedy"])
def test_v2_from_transformers(tmp_path, topk_method):
    reference = randomize(DeepseekV2ForCausalLM(v2_config(topk_method)))
    reference.save_pretrained(tmp_path)

    model = MoEForCausalLM.from_pretrained(tmp_path)

    config = model.config
    assert (config.scoring_func, config.norm_topk_prob, config.q_lora_rank) == ("softmax", False, None)
    assert config.topk_method == ("greedy" if topk_method == "greedy" else "group_limited")
    assert not model.model.layers[1].mlp.gate.e_score_correction_bias.any()
    assert_same_logits(model, reference)


# ----------------------------------------------------------------------------------------- original Hub layout


HUB_COMMON = {
    **TINY, "architectures": ["DeepseekForCausalLM"], "auto_map": {"AutoModelForCausalLM": "modeling_deepseek.X"},
    "aux_loss_alpha": 0.001, "seq_aux": True, "ep_size": 1, "moe_layer_freq": 1, "rope_scaling": HUB_YARN,
    "rope_theta": 10000, "torch_dtype": "float32", "transformers_version": "4.33.1", "pretraining_tp": 1,
}
HUB_V3 = {**HUB_COMMON, "model_type": "deepseek_v3", "q_lora_rank": 24, "topk_method": "noaux_tc",
          "scoring_func": "sigmoid", "n_group": 4, "topk_group": 2, "norm_topk_prob": True,
          "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 1}
HUB_V2 = {**HUB_COMMON, "model_type": "deepseek_v2", "q_lora_rank": None, "topk_method": "group_limited_greedy",
          "scoring_func": "softmax", "n_group": 4, "topk_group": 2, "norm_topk_prob": False,
          "routed_scaling_factor": 16.0}


def mtp_weights(hub_config, layer):
    """The Hub layout's MTP module: a full decoder layer at index `layer` plus its own norms and projection."""
    donor_config = DeepseekV3Config.from_dict({**hub_config, "num_hidden_layers": layer + 1})
    donor = randomize(DeepseekV3ForCausalLM(donor_config), seed=2)
    prefix = f"model.layers.{layer}."
    weights = {key: tensor for key, tensor in hub_layout(donor.state_dict()).items() if key.startswith(prefix)}
    generator = torch.Generator().manual_seed(3)
    hidden = hub_config["hidden_size"]
    for name in ("enorm", "hnorm", "shared_head.norm"):
        weights[f"{prefix}{name}.weight"] = 1 + 0.1 * torch.randn(hidden, generator=generator)
    weights[f"{prefix}eh_proj.weight"] = 0.1 * torch.randn(hidden, 2 * hidden, generator=generator)
    return weights


@pytest.mark.parametrize("hub_config", [HUB_V3, HUB_V2], ids=["v3_mtp", "v2"])
def test_original_hub_layout(tmp_path, hub_config):
    classes = {
        "deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM),
        "deepseek_v2": (DeepseekV2Config, DeepseekV2ForCausalLM),
    }
    config_cls, model_cls = classes[hub_config["model_type"]]
    reference = randomize(model_cls(config_cls.from_dict(dict(hub_config))))
    weights = hub_layout(reference.state_dict())
    layers = hub_config["num_hidden_layers"]
    if hub_config.get("num_nextn_predict_layers"):
        mtp = mtp_weights(hub_config, layers)
        weights.update(mtp)
        weights[f"model.layers.{layers}.embed_tokens.weight"] = weights["model.embed_tokens.weight"].clone()
        weights[f"model.layers.{layers}.shared_head.head.weight"] = weights["lm_head.weight"].clone()
    write_sharded(weights, hub_config, tmp_path)

    model = MoEForCausalLM.from_pretrained(tmp_path)

    assert_same_logits(model, reference)
    if hub_config.get("num_nextn_predict_layers"):
        module = model.model.mtp_layers[0]
        assert torch.equal(module.eh_proj.weight, mtp[f"model.layers.{layers}.eh_proj.weight"])
        assert torch.equal(module.norm.weight, mtp[f"model.layers.{layers}.shared_head.norm.weight"])
        gate_up = torch.cat([mtp[f"model.layers.{layers}.mlp.experts.3.{p}_proj.weight"] for p in ("gate", "up")])
        assert torch.equal(module.mlp.experts.gate_up_proj[3], gate_up)


# ------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("variant", ["v3_mtp", "v2", "v3_not_interleaved", "v3_tied"])
def test_round_trip(tmp_path, variant):
    overrides = {
        "v3_mtp": {},
        "v2": {"scoring_func": "softmax", "norm_topk_prob": False, "q_lora_rank": None, "num_nextn_predict_layers": 0},
        "v3_not_interleaved": {"rope_interleave": False, "topk_method": "greedy"},
        "v3_tied": {"tie_word_embeddings": True},
    }[variant]
    model = randomize(MoEForCausalLM(moe_config(**overrides)), bias=variant != "v2")
    model.save_pretrained_deepseek(tmp_path / "checkpoint")

    reference_cls = DeepseekV2ForCausalLM if variant == "v2" else DeepseekV3ForCausalLM
    assert_same_logits(model, reference_cls.from_pretrained(tmp_path / "checkpoint"))

    reloaded = MoEForCausalLM.from_pretrained(tmp_path / "checkpoint")
    if variant == "v3_not_interleaved":  # exported with interleaved rotary rows: same function, permuted weights
        assert reloaded.config.rope_interleave
        assert_same_logits(reloaded, model)
        return
    expected, actual = model.state_dict(), reloaded.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    for name in SHARED_FIELDS + TRAINING_FIELDS + ROUTING_FIELDS:
        assert getattr(reloaded.config, name) == getattr(model.config, name), name


def test_state_dict_conversions_are_inverse():
    config = moe_config()
    state_dict = randomize(MoEForCausalLM(config)).state_dict()
    hub = moe_state_dict_to_deepseek(state_dict, config)
    assert "model.layers.3.shared_head.norm.weight" in hub and "model.layers.1.mlp.experts.7.down_proj.weight" in hub
    back = deepseek_state_dict_to_moe(hub, config)
    assert back.keys() == state_dict.keys()
    assert all(torch.equal(back[name], state_dict[name]) for name in state_dict)


def test_half_split_model_with_reordered_rotary_rows_computes_the_interleaved_model():
    """transformers' interleaved DeepseekV3 and our half-split model over its weights with the rotary rows reordered
    (what the benchmarks do; the faster layout): the same logits. The reordering must be needed (the weights as they
    are give other logits), and interleaving undoes it."""
    theirs = randomize(DeepseekV3ForCausalLM(v3_config(num_nextn_predict_layers=0)))
    config = moe_config(rope_interleave=False, num_nextn_predict_layers=0)
    state = theirs.state_dict()
    reordered = {name: interleave_rope_rows(name, tensor, config, inverse=True) for name, tensor in state.items()}
    assert sum(not torch.equal(reordered[name], state[name]) for name in state) == 2 * TINY["num_hidden_layers"]
    assert all(torch.equal(interleave_rope_rows(name, reordered[name], config), state[name]) for name in state)
    ours = MoEForCausalLM(config).eval()
    ours.load_state_dict(reordered)
    assert_same_logits(ours, theirs)
    ours.load_state_dict(state)
    with pytest.raises(AssertionError):
        assert_same_logits(ours, theirs)


def test_exported_config_is_accepted_by_transformers():
    softmax = moe_config(scoring_func="softmax", norm_topk_prob=False)
    for config, config_cls in ((moe_config(), DeepseekV3Config), (softmax, DeepseekV2Config)):
        exported = moe_config_to_deepseek(config)
        parsed = config_cls(**{key: value for key, value in exported.items() if key != "model_type"})
        assert parsed.rope_parameters["factor"] == YARN["factor"] and exported["rope_scaling"]["type"] == "yarn"
        mapped = deepseek_config_to_moe(exported)
        for name in SHARED_FIELDS + TRAINING_FIELDS + ROUTING_FIELDS:
            assert getattr(mapped, name) == getattr(config, name), name


def test_save_keeps_other_files_and_replaces_stale_shards(tmp_path):
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "tokenizer.json").write_text("{}")
    (target / "model-00001-of-00009.safetensors").write_text("stale")
    save_deepseek_checkpoint(randomize(MoEForCausalLM(moe_config())), target, max_shard_size="20KB")

    files = sorted(os.listdir(target))
    assert "tokenizer.json" in files and "model-00001-of-00009.safetensors" not in files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= set(files)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]  # no temporary folder left behind


# ------------------------------------------------------------------------------------------------------ errors


@pytest.fixture
def saved_checkpoint(tmp_path):
    path = tmp_path / "checkpoint"
    save_deepseek_checkpoint(randomize(MoEForCausalLM(moe_config())), path)
    return path


@pytest.mark.parametrize("hub_config", [HUB_V3, HUB_V2], ids=["v3", "v2"])
def test_config_alone_loads_from_a_deepseek_checkpoint(tmp_path, hub_config):
    """MoEConfig.from_pretrained on a DeepSeek folder maps the config as loading the model does."""
    with open(tmp_path / "config.json", "w") as f:
        json.dump(hub_config, f)
    config = MoEConfig.from_pretrained(tmp_path, use_cache=False)
    expected = deepseek_config_to_moe(dict(hub_config))
    assert not config.use_cache
    for field in ROUTING_FIELDS + ("q_lora_rank", "routed_scaling_factor", "bias_update_speed", "hidden_size"):
        assert getattr(config, field) == getattr(expected, field), field


HUB_V2_NO_LOSS = {key: value for key, value in HUB_V2.items() if key not in ("aux_loss_alpha", "seq_aux")}


MOE_LAYERS = TINY["num_hidden_layers"] - TINY["first_k_dense_replace"]


@pytest.mark.parametrize("loss, expected", [
    ({"aux_loss_alpha": 0.01, "seq_aux": True}, {"seq_aux_loss_coef": 0.01 * MOE_LAYERS}),
    ({"aux_loss_alpha": 0.01}, {"seq_aux_loss_coef": 0.01 * MOE_LAYERS}),  # seq_aux defaults to true in V2's code
    ({"aux_loss_alpha": 0.01, "seq_aux": False},
     {"router_aux_loss_coef": 0.01 * MOE_LAYERS, "output_router_logits": True}),
], ids=["sequence_wise", "sequence_wise_by_default", "batch_wise"])
def test_v2_balance_loss_maps_onto_our_loss_fields(tmp_path, loss, expected):
    """DeepSeek-V2 adds aux_loss_alpha times each MoE layer's sequence-wise (or batch-wise) loss; our coefficient of
    the same loss weighs the mean over the layers: alpha x MoE layers (the batch-wise one with output_router_logits,
    which turns it on), also through MoEConfig.from_pretrained."""
    assert MOE_LAYERS > 1  # else the scaling would go unchecked
    (tmp_path / "config.json").write_text(json.dumps({**HUB_V2_NO_LOSS, **loss}))
    defaults = {"seq_aux_loss_coef": 0.0, "router_aux_loss_coef": 0.0, "output_router_logits": False}
    for config in (deepseek_config_to_moe({**HUB_V2_NO_LOSS, **loss}), MoEConfig.from_pretrained(tmp_path)):
        assert {name: getattr(config, name) for name in defaults} == pytest.approx({**defaults, **expected})


@pytest.mark.parametrize("losses, written", [
    ({"seq_aux_loss_coef": 0.002 * MOE_LAYERS}, {"aux_loss_alpha": 0.002, "seq_aux": True}),
    ({"router_aux_loss_coef": 0.003 * MOE_LAYERS, "output_router_logits": True},
     {"aux_loss_alpha": 0.003, "seq_aux": False}),
    ({"router_aux_loss_coef": 0.003}, {"aux_loss_alpha": 0.0, "seq_aux": True}),  # computed only with router logits
    ({}, {"aux_loss_alpha": 0.0, "seq_aux": True}),
], ids=["sequence_wise", "batch_wise", "batch_wise_off", "none"])
def test_v2_export_writes_the_balance_loss_deepseek_reads(losses, written):
    """A V2 export carries our balance loss as DeepSeek-V2's fields (alpha = our coefficient / MoE layers), which
    alone (without our own training fields) load back into the same loss. V3 configs neither write nor read them
    (V3's released code never trains)."""
    config = moe_config(scoring_func="softmax", norm_topk_prob=False, **losses)
    assert config.num_moe_layers == MOE_LAYERS
    exported = moe_config_to_deepseek(config)
    assert {key: exported[key] for key in written} == pytest.approx(written)
    theirs = deepseek_config_to_moe({key: value for key, value in exported.items() if key not in TRAINING_FIELDS})
    active = "seq_aux_loss_coef" if written["seq_aux"] else "router_aux_loss_coef"
    assert getattr(theirs, active) == pytest.approx(written["aux_loss_alpha"] * MOE_LAYERS)
    assert "aux_loss_alpha" not in moe_config_to_deepseek(moe_config(seq_aux_loss_coef=0.002))
    assert deepseek_config_to_moe(dict(HUB_V3)).seq_aux_loss_coef == 0.0  # HUB_V3 has aux_loss_alpha, seq_aux


def test_base_model_loads_from_a_deepseek_checkpoint(saved_checkpoint):
    from modeling_moe import MoEModel

    full = MoEForCausalLM.from_pretrained(saved_checkpoint).eval()
    base = MoEModel.from_pretrained(saved_checkpoint).eval()
    assert type(base) is MoEModel
    ids = torch.randint(3, 64, (2, 6))
    torch.testing.assert_close(base(ids).last_hidden_state, full.model(ids).last_hidden_state)


@pytest.mark.parametrize("key", [
    "model.layers.1.mlp.experts.3.up_proj.weight",
    "model.layers.2.self_attn.kv_b_proj.weight",
    "model.layers.3.shared_head.norm.weight",
    "model.layers.1.mlp.gate.e_score_correction_bias",
])
def test_missing_weight_is_named(saved_checkpoint, key):
    rewrite_checkpoint(saved_checkpoint, lambda state_dict: state_dict.pop(key))
    with pytest.raises(ValueError, match="1 missing weight") as error:
        MoEForCausalLM.from_pretrained(saved_checkpoint)
    assert key in str(error.value)


@pytest.mark.parametrize("key", ["model.layers.0.self_attn.extra.weight", "model.layers.2.mlp.experts.8.up_proj.weight",
                                 "model.layers.4.enorm.weight"])
def test_unexpected_weight_is_named(saved_checkpoint, key):
    rewrite_checkpoint(saved_checkpoint, lambda state_dict: state_dict.update({key: torch.zeros(16, 32)}))
    with pytest.raises(ValueError, match="1 unexpected weight") as error:
        MoEForCausalLM.from_pretrained(saved_checkpoint)
    assert key in str(error.value)


def test_load_options(saved_checkpoint):
    model = MoEForCausalLM.from_pretrained(saved_checkpoint, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32
    with pytest.raises(TypeError, match="revision"):
        MoEForCausalLM.from_pretrained(saved_checkpoint, revision="main")
    # Config fields given as keywords update the config, as with a transformers checkpoint; bad values are named.
    model = MoEForCausalLM.from_pretrained(saved_checkpoint, use_cache=False, output_router_logits=True, n_group=2)
    assert not model.config.use_cache and model.config.output_router_logits and model.config.n_group == 2
    assert model(torch.randint(3, 64, (1, 5))).router_logits is not None
    with pytest.raises(ValueError, match="topk_group"):
        MoEForCausalLM.from_pretrained(saved_checkpoint, topk_group=9)


@pytest.mark.parametrize("change, field", [
    ({"moe_layer_freq": 2}, "moe_layer_freq"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ({"quantization_config": {"quant_method": "gptq", "weight_block_size": [128, 128]}}, "quantization_config"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"topk_method": "greedy"}, "topk_method"),
])
def test_unsupported_deepseek_configs(change, field):
    with pytest.raises(ValueError, match=field):
        deepseek_config_to_moe({**HUB_V3, **change})


def test_unexportable_models(tmp_path):
    with pytest.raises(ValueError, match="attention_type"):
        moe_config_to_deepseek(moe_config(attention_type="gqa", num_key_value_heads=2, head_dim=8))
    with pytest.raises(ValueError, match="norm_topk_prob"):
        moe_config_to_deepseek(moe_config(scoring_func="softmax", norm_topk_prob=True))
    model = randomize(MoEForCausalLM(moe_config(scoring_func="softmax", norm_topk_prob=False)), bias=True)
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        save_deepseek_checkpoint(model, tmp_path / "checkpoint")
    assert os.listdir(tmp_path) == []


def test_training_steps_match_transformers(tmp_path):
    """A few AdamW steps from the same V3 checkpoint: same losses and same weights as transformers' DeepseekV3, so the
    gradients (router, experts, MLA, norms) agree too. Expert-bias updates off: transformers never makes them."""
    reference = randomize(DeepseekV3ForCausalLM(v3_config()))
    reference.save_pretrained(tmp_path)
    ours = MoEForCausalLM.from_pretrained(tmp_path, experts_implementation="eager")
    reference.set_experts_implementation("eager")
    batches = torch.randint(2, TINY["vocab_size"], (3, 2, 12), generator=torch.Generator().manual_seed(2))
    losses = {}
    for name, model in (("ours", ours), ("transformers", reference)):
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[name] = []
        for ids in batches:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    assert losses["ours"] == pytest.approx(losses["transformers"], rel=1e-5)
    theirs = reference.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-4, atol=1e-5, msg=key)


# ------------------------------------------------------------------------------------------------------ FP8 weights


FP8_KEPT = ("embed_tokens", "lm_head", "shared_head.head", "norm", "mlp.gate.weight")  # bf16 in DeepSeek-V3's release
FP8_QUANTIZATION = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"}


def quantize_fp8(state_dict, block, expected):
    """DeepSeek-V3's storage of its linear weights, in place: FP8 (e4m3) values and one float32 scale per block
    (amax / 448), written as `<name>.weight_scale_inv`; `expected[name]` gets FP8 value x its block's scale, computed
    element by element in float64."""
    for key in [k for k, t in state_dict.items() if t.dim() == 2 and not any(part in k for part in FP8_KEPT)]:
        weight = state_dict[key].double()
        rows, columns = weight.shape
        scales = torch.empty(-(-rows // block[0]), -(-columns // block[1]), dtype=torch.float32)
        values = torch.empty_like(weight)
        for i in range(scales.shape[0]):
            for j in range(scales.shape[1]):
                tile = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
                scales[i, j] = weight[tile].abs().max().clamp(min=1e-12) / 448
                values[tile] = weight[tile] / scales[i, j].double()
        state_dict[key] = values.to(torch.float8_e4m3fn)
        state_dict[key + "_scale_inv"] = scales
        fp8 = state_dict[key].double()
        expected[key] = torch.stack([torch.stack([fp8[r, c] * scales[r // block[0], c // block[1]].double()
                                                  for c in range(columns)]) for r in range(rows)]).float()


@pytest.mark.parametrize("block", [(128, 128), (16, 12)], ids=["v3_blocks", "partial_blocks"])
def test_fp8_block_scaled_weights_are_dequantized(tmp_path, block):
    """A checkpoint stored as DeepSeek-V3's official one (FP8 linear weights with 2D block scales, a
    quantization_config) loads as the same checkpoint holding the dequantized weights; that one, carrying the
    quantization_config DeepSeek's fp8_cast_bf16.py leaves behind, loads too."""
    fp8_path, plain_path = tmp_path / "fp8", tmp_path / "plain"
    for path in (fp8_path, plain_path):
        save_deepseek_checkpoint(randomize(MoEForCausalLM(moe_config())), path)
    expected = {}
    rewrite_checkpoint(fp8_path, lambda state_dict: quantize_fp8(state_dict, block, expected))
    rewrite_checkpoint(plain_path, lambda state_dict: state_dict.update(expected))
    assert len(expected) > 20 and any(".experts." in key for key in expected)
    for path in (fp8_path, plain_path):
        with open(path / "config.json") as f:
            config_dict = json.load(f)
        config_dict["quantization_config"] = {**FP8_QUANTIZATION, "weight_block_size": list(block)}
        with open(path / "config.json", "w") as f:
            json.dump(config_dict, f)
    loaded = MoEForCausalLM.from_pretrained(fp8_path, dtype=torch.float32)
    reference = MoEForCausalLM.from_pretrained(plain_path, dtype=torch.float32)
    for (name, value), (_, reference_value) in zip(loaded.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(value, reference_value, rtol=0, atol=0, msg=name)
    ids = torch.randint(2, TINY["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_fp8_weights_need_their_scales_and_block_size(tmp_path):
    path = tmp_path / "fp8"
    save_deepseek_checkpoint(randomize(MoEForCausalLM(moe_config())), path)
    rewrite_checkpoint(path, lambda state_dict: quantize_fp8(state_dict, (16, 16), {}))
    with pytest.raises(ValueError, match="no quantization_config"):  # the block size is unknown
        MoEForCausalLM.from_pretrained(path)
    with open(path / "config.json") as f:
        config_dict = json.load(f)
    config_dict["quantization_config"] = {**FP8_QUANTIZATION, "weight_block_size": [16, 16]}
    with open(path / "config.json", "w") as f:
        json.dump(config_dict, f)
    key = "model.layers.2.self_attn.kv_b_proj.weight"
    rewrite_checkpoint(path, lambda state_dict: state_dict.pop(key + "_scale_inv"))
    with pytest.raises(ValueError, match=f"without its scales {key}_scale_inv"):
        MoEForCausalLM.from_pretrained(path)
    rewrite_checkpoint(path, lambda state_dict: state_dict.update({key + "_scale_inv": torch.ones(3, 3)}))
    with pytest.raises(ValueError, match=r"needs scales of shape \(4, 1\)"):
        MoEForCausalLM.from_pretrained(path)


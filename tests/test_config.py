import pytest

from modeling_moe import MoEConfig

from .helpers import small_config


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"n_group": 3}, "n_group"),
        ({"topk_group": 5}, "topk_group"),
        ({"n_group": 8, "topk_group": 1}, "num_experts_per_tok"),  # 3 experts from one group of 1
        ({"n_group": 8, "topk_group": 4, "num_experts_per_tok": 2}, "n_routed_experts / n_group"),  # top-2 sum
        ({"attention_type": "gqa", "num_key_value_heads": 3}, "num_key_value_heads"),
        ({"attention_type": "gqa", "head_dim": 7}, "head_dim"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"kv_lora_rank": -4}, "kv_lora_rank"),
        ({"q_lora_rank": 0}, "q_lora_rank"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"attention_type": "mha"}, "attention_type"),
        ({"scoring_func": "relu"}, "scoring_func"),
        ({"topk_method": "noaux_tc"}, "topk_method"),
        ({"rope_parameters": {"rope_type": "ntk", "rope_theta": 1e4}}, "rope_type"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 0.5}}, "factor"),
        ({"first_k_dense_replace": 4}, "first_k_dense_replace"),
        ({"bias_update_speed": -1e-3}, "bias_update_speed"),
        ({"routed_scaling_factor": 0}, "routed_scaling_factor"),
        ({"num_nextn_predict_layers": -1}, "num_nextn_predict_layers"),
        ({"hidden_size": 64.5}, "hidden_size"),  # sizes and counts are integers
        ({"num_experts_per_tok": 1.5}, "num_experts_per_tok"),
        ({"num_nextn_predict_layers": True}, "num_nextn_predict_layers"),
        ({"norm_topk_prob": "no"}, "norm_topk_prob"),  # flags are booleans
        ({"rope_interleave": "False"}, "rope_interleave"),
        ({"attention_dropout": 1.5}, "attention_dropout"),
        ({"pad_token_id": 97}, "pad_token_id"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("/", "/")):
        small_config(**overrides)


def test_deepseek_names_and_trl_aliases():
    config = small_config(output_router_logits=True, router_aux_loss_coef=0.01)
    # TRL's MoE paths read these names.
    assert config.num_experts == config.n_routed_experts == 8
    assert config.num_local_experts == 8
    assert config.get_text_config().output_router_logits is True
    assert config.router_aux_loss_coef == 0.01
    # transformers' RoPE helpers read head_dim as the rotary size.
    assert config.head_dim == config.qk_rope_head_dim
    assert config.qk_head_dim == 16


def test_round_trip_through_dict_keeps_rope_parameters():
    yarn = {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
    }
    config = small_config(rope_parameters=dict(yarn))
    again = MoEConfig.from_dict(config.to_dict())
    assert again.rope_parameters == config.rope_parameters
    assert again.to_dict() == config.to_dict()


def test_legacy_rope_theta_keyword():
    assert MoEConfig(rope_theta=5000.0).rope_parameters == {"rope_type": "default", "rope_theta": 5000.0}


@pytest.mark.parametrize("overrides, field", [({"scoring_func": "softmx"}, "scoring_func"), ({"n_group": 3}, "n_group"),
                                              ({"num_experts_per_tok": 20}, "num_experts_per_tok")])
def test_overrides_given_to_from_pretrained_are_checked(tmp_path, overrides, field):
    """transformers applies `from_pretrained(path, **overrides)` after the config is built: they are checked too."""
    from transformers import AutoConfig

    from modeling_moe import MoEForCausalLM

    small_config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=field):
        AutoConfig.from_pretrained(tmp_path, **overrides)
    config = small_config()
    setattr(config, next(iter(overrides)), next(iter(overrides.values())))  # set after construction
    with pytest.raises(ValueError, match=field):
        MoEForCausalLM(config)


def test_overridden_rotary_size_updates_the_rotary_head_dim(tmp_path):
    from transformers import AutoConfig

    small_config().save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path, qk_rope_head_dim=16)
    assert config.head_dim == config.qk_rope_head_dim == 16

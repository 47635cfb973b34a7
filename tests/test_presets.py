import json

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

import modeling_moe
from modeling_moe import MoEConfig, MoEForCausalLM
from modeling_moe.presets import (
    PRESETS,
    kv_cache_bytes_per_token,
    load_preset_config,
    main,
    preset_names,
    preset_path,
    write_presets,
)

GPT2_PRESETS = ("tiny", "moe-100m", "gqa-moe")
DEEPSEEK_PRESETS = ("deepseek-v2-lite", "deepseek-v3")
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}
IGNORED_KEYS = {"transformers_version"}


def _json(path):
    data = json.loads(path.read_text(encoding="utf-8"))
    return {key: value for key, value in data.items() if key not in IGNORED_KEYS}


def _config_dict(config):
    ignored = IGNORED_KEYS | {"auto_map", "_name_or_path"}
    return {key: value for key, value in config.to_dict().items() if key not in ignored}


def _meta_counts(config):
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    summary = model.num_parameters_summary()
    mtp = sum(p.numel() for name, p in model.named_parameters() if name.startswith("model.mtp_layers."))
    return summary, mtp


def _within(value, target, tolerance):
    return abs(value / target - 1) <= tolerance


def test_preset_names():
    assert preset_names() == ["tiny", "moe-100m", "deepseek-v2-lite", "deepseek-v3", "gqa-moe"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_folder_loads_into_the_preset_config(name):
    config = AutoConfig.from_pretrained(preset_path(name))
    assert type(config) is MoEConfig
    for key, value in PRESETS[name].items():
        assert getattr(config, key) == value, key
    assert _config_dict(config) == _config_dict(MoEConfig(**PRESETS[name]))
    assert _config_dict(load_preset_config(name)) == _config_dict(config)
    assert _config_dict(load_preset_config(preset_path(name))) == _config_dict(config)


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_json_has_auto_map(name):
    auto_map = json.loads((preset_path(name) / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_moe.MoEConfig",
        "AutoModel": "modeling_moe.MoEModel",
        "AutoModelForCausalLM": "modeling_moe.MoEForCausalLM",
    }


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("hub_configs")
    write_presets(out)
    return out


@pytest.mark.parametrize("name", list(PRESETS))
def test_folders_are_in_sync_with_presets_py(regenerated, name):
    """Fails after a preset edit until `python -m modeling_moe.presets --write hub_configs` is rerun."""
    shipped, fresh = preset_path(name), regenerated / name
    shipped_files = {p.name for p in shipped.iterdir()}
    assert shipped_files == {p.name for p in fresh.iterdir()}
    expected = {"config.json", "generation_config.json", "README.md"}
    assert shipped_files == (expected | TOKENIZER_FILES if name in GPT2_PRESETS else expected)
    for file in ("config.json", "generation_config.json", *sorted(shipped_files & TOKENIZER_FILES)):
        assert _json(shipped / file) == _json(fresh / file), file
    assert (shipped / "README.md").read_text(encoding="utf-8") == (fresh / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", list(PRESETS))
def test_generation_config_and_card(name):
    config = MoEConfig(**PRESETS[name])
    generation = _json(preset_path(name) / "generation_config.json")
    assert generation["bos_token_id"] == config.bos_token_id and generation["eos_token_id"] == config.eos_token_id
    if name in GPT2_PRESETS:
        assert generation["bos_token_id"] == generation["eos_token_id"] == generation["pad_token_id"] == 50256
    card = (preset_path(name) / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\nlibrary_name: transformers\nlicense: apache-2.0\n")
    assert f'preset_path("{name}")' in card and "AutoModelForCausalLM.from_config(config)" in card
    if name in DEEPSEEK_PRESETS:
        assert "tokenizer comes with the real DeepSeek checkpoint" in card


def test_deepseek_v2_lite_parameter_counts():
    summary, mtp = _meta_counts(load_preset_config("deepseek-v2-lite"))
    assert mtp == 0
    assert _within(summary["total"], 15.7e9, 0.02), summary
    assert _within(summary["activated"], 2.4e9, 0.03), summary


def test_deepseek_v3_parameter_counts():
    config = load_preset_config("deepseek-v3")
    summary, mtp = _meta_counts(config)
    # The published 671B excludes the MTP module; the released checkpoint (685B) holds it with its own copies of the
    # embedding table and output head, which ours shares with the main model.
    assert _within(summary["total"] - mtp, 671e9, 0.02), summary
    assert _within(summary["total"] + 2 * config.vocab_size * config.hidden_size, 685e9, 0.02), summary
    assert _within(summary["activated"], 37e9, 0.03), summary


def test_moe_100m_activates_about_100m():
    summary, mtp = _meta_counts(load_preset_config("moe-100m"))
    assert mtp > 0
    assert _within(summary["activated"], 100e6, 0.15), summary


def test_kv_cache_bytes():
    v2 = kv_cache_bytes_per_token(load_preset_config("deepseek-v2-lite"))
    assert v2 == {"model": (512 + 64) * 27 * 2, "mha": 16 * ((128 + 64) + 128) * 27 * 2}
    gqa = kv_cache_bytes_per_token(load_preset_config("gqa-moe"))
    assert gqa == {"model": 2 * 2 * 64 * 12 * 2, "mha": 2 * 8 * 64 * 12 * 2}


def test_tiny_runs_on_cpu():
    torch.manual_seed(0)
    config = load_preset_config("tiny")
    assert config.num_nextn_predict_layers == 1 and config.topk_method == "group_limited"
    model = MoEForCausalLM(config).eval()
    input_ids = torch.randint(0, config.vocab_size, (2, 8))
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=input_ids)
    assert out.logits.shape == (2, 8, config.vocab_size)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)


@pytest.mark.parametrize("name", GPT2_PRESETS)
def test_gpt2_presets_ship_the_tokenizer(name):
    tokenizer = AutoTokenizer.from_pretrained(preset_path(name))
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert len(tokenizer) == PRESETS[name]["vocab_size"] == 50257
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.pad_token_id == 50256
    assert tokenizer.model_max_length == PRESETS[name]["max_position_embeddings"]


@pytest.mark.parametrize("name", DEEPSEEK_PRESETS)
def test_deepseek_presets_ship_no_tokenizer(name):
    assert not any((preset_path(name) / file).exists() for file in TOKENIZER_FILES)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError) as error:
        load_preset_config("nope")
    for name in preset_names():
        assert name in str(error.value)
    with pytest.raises(ValueError, match="tiny"):
        preset_path("nope")


def test_overrides():
    config = load_preset_config("tiny", num_hidden_layers=4, qk_rope_head_dim=8)
    assert config.num_hidden_layers == 4 and config.head_dim == 8  # derived fields follow the overrides
    assert load_preset_config("deepseek_v3").n_routed_experts == 256  # underscores are accepted
    with pytest.raises(ValueError, match="num_hiden_layers"):
        load_preset_config("tiny", num_hiden_layers=4)
    with pytest.raises(ValueError, match="topk_method"):
        load_preset_config("tiny", topk_method="nope")


def test_usage_snippet():
    config = AutoConfig.from_pretrained(modeling_moe.presets.preset_path("tiny"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, MoEForCausalLM)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--write" in capsys.readouterr().out

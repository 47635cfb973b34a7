"""Loading through transformers' Auto classes, and from an exported folder with trust_remote_code."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from modeling_moe import MoEConfig, MoEForCausalLM, MoEModel

from .helpers import gqa_config, small_config


def test_auto_classes_are_registered():
    kwargs = {k: v for k, v in small_config().to_diff_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("modeling_moe", **kwargs)
    assert isinstance(config, MoEConfig)
    assert type(AutoModelForCausalLM.from_config(config)) is MoEForCausalLM
    assert type(AutoModel.from_config(config)) is MoEModel


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MoEForCausalLM(small_config(num_nextn_predict_layers=1)).eval()
    with torch.no_grad():
        model.routers()[0].e_score_correction_bias.normal_()  # a buffer, not a parameter: must be saved too
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "modeling_moe.py", "configuration_moe.py"} <= files
    assert not any(name.endswith((".bin", ".pt")) or name.startswith(".saving-") for name in files)
    assert not any(name.startswith(".saving-") for name in os.listdir(tmp_path.parent))
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_moe.MoEForCausalLM"

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager")
    assert type(loaded) is MoEForCausalLM and loaded.config._experts_implementation == "eager"
    ids = torch.randint(3, 97, (2, 7))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_saving_again_removes_the_shards_it_does_not_replace(tmp_path):
    """A save into a folder that holds another layout of the weights (sharded -> one file -> sharded) leaves only
    the new layout: a stale model.safetensors would be loaded instead of the new shards."""
    model = MoEForCausalLM(small_config()).eval()
    ids = torch.randint(3, 97, (1, 5))

    def weight_files():
        return sorted(name for name in os.listdir(tmp_path) if "safetensors" in name)

    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(weight_files()) > 2 and "model.safetensors.index.json" in weight_files()
    model.save_pretrained(tmp_path)
    assert weight_files() == ["model.safetensors"]
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert "model.safetensors" not in weight_files()
    torch.testing.assert_close(MoEForCausalLM.from_pretrained(tmp_path)(ids).logits, model(ids).logits)


def test_push_to_hub_names_the_repository_after_the_folder(tmp_path, monkeypatch):
    """The weights are written into a staging folder first; the repository is still named after the folder given."""
    import transformers.modeling_utils as modeling_utils

    created = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            created.append(repo_id)
            raise RuntimeError("no hub here")

    monkeypatch.setattr(modeling_utils, "hf_api", lambda: FakeApi())
    with pytest.raises(RuntimeError, match="no hub here"):
        MoEForCausalLM(small_config()).save_pretrained(tmp_path / "my-moe", push_to_hub=True)
    assert created == ["my-moe"]


def test_hidden_states_from_the_config_and_tuples_on_request(tmp_path):
    model = MoEForCausalLM(small_config()).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, output_hidden_states=True)
    ids = torch.randint(3, 97, (1, 5))
    assert len(loaded(ids).hidden_states) == loaded.config.num_hidden_layers + 1
    assert isinstance(loaded.model(ids, return_dict=False), tuple) and isinstance(loaded(ids, return_dict=False), tuple)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys, torch

    class BlockPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "modeling_moe" or name.startswith("modeling_moe."):
                raise ImportError("modeling_moe is blocked in this test")

    sys.meta_path.insert(0, BlockPackage())
    sys.path = [p for p in sys.path if p not in ("", ".")]
    from transformers import AutoModelForCausalLM

    folder, ids_file, out_file = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert "modeling_moe" not in sys.modules
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    ids = torch.load(ids_file)
    logits = {"sdpa": model(ids).logits}
    model.set_experts_implementation("eager")
    model.set_attn_implementation("eager")
    logits["eager"] = model(ids).logits
    logits["generated"] = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    torch.save(logits, out_file)
    """
)


def run_without_package(folder, ids, tmp_path):
    (tmp_path / "remote.py").write_text(REMOTE_SCRIPT)
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    subprocess.run(
        [sys.executable, str(tmp_path / "remote.py"), str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        check=True, env=env, cwd=tmp_path, timeout=300,
    )
    return torch.load(tmp_path / "out.pt")


def test_trust_remote_code_without_the_package(tmp_path):
    """An exported folder reproduces the logits in a Python where `modeling_moe` cannot be imported."""
    ids = torch.randint(3, 97, (2, 9))
    for name, config in {"mla": small_config(num_nextn_predict_layers=1), "gqa": gqa_config()}.items():
        torch.manual_seed(0)
        model = MoEForCausalLM(config).eval()
        model.save_pretrained(tmp_path / name)
        remote = run_without_package(tmp_path / name, ids, tmp_path)
        expected = model(ids).logits
        torch.testing.assert_close(remote["sdpa"], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(remote["eager"], expected, rtol=1e-5, atol=1e-5)
        generated = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
        assert remote["generated"].tolist() == generated.tolist()

"""PEFT LoRA reaches the stacked routed experts through `target_parameters`, on every experts implementation."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from modeling_moe import MoEForCausalLM

from .helpers import small_config

ATTENTION = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def lora_model(implementation, target_modules=ATTENTION):
    torch.manual_seed(0)
    base = MoEForCausalLM(small_config()).eval()
    base.set_experts_implementation(implementation)
    reference = base(IDS).logits
    # init_lora_weights=False: random non-zero B, so the adapter changes the output from the first step.
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                      target_modules=target_modules, target_parameters=EXPERTS)
    model = get_peft_model(base, lora)
    return model, reference


IDS = torch.randint(3, 97, (2, 9))


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_lora_on_experts_changes_output_and_merges(implementation):
    experts_only, base_logits = lora_model(implementation, target_modules=[])
    assert (experts_only(IDS).logits - base_logits).abs().max() > 1e-3  # the experts' adapter is not skipped
    model, base_logits = lora_model(implementation)
    lora_logits = model(IDS).logits
    assert (lora_logits - base_logits).abs().max() > 1e-3
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(IDS).logits, lora_logits, rtol=1e-4, atol=1e-5)


def test_lora_logits_agree_across_experts_implementations():
    eager, _ = lora_model("eager")
    grouped, _ = lora_model("grouped_mm")
    torch.testing.assert_close(eager(IDS).logits, grouped(IDS).logits, rtol=1e-4, atol=1e-5)


def test_cached_decode_applies_the_kv_b_proj_adapter():
    """A decode step over the cache (absorbed form, which needs kv_b_proj's matrix) sees the LoRA adapter on
    kv_b_proj as the full-sequence forward (expanded form) does: step logits == full-forward logits."""
    model, base_logits = lora_model("eager", target_modules=["kv_b_proj"])
    with torch.no_grad():
        full = model(IDS).logits
        assert (full - base_logits).abs().max() > 1e-3  # the adapter matters
        prefill = model(IDS[:, :-2], use_cache=True)
        cache = prefill.past_key_values
        for position in (IDS.shape[1] - 2, IDS.shape[1] - 1):
            step = model(IDS[:, position:position + 1], past_key_values=cache, use_cache=True)
            cache = step.past_key_values
            torch.testing.assert_close(step.logits[:, -1], full[:, position], rtol=1e-4, atol=1e-5)

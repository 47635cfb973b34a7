"""Small configurations and models shared by the tests."""

import importlib.util
import sys
from pathlib import Path

import torch

from modeling_moe import MoEConfig, MoEForCausalLM


def small_config(**overrides) -> MoEConfig:
    """A few-layer MLA model with every feature on: q compression, groups, shared experts, a dense first layer."""
    kwargs = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=12,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        topk_method="group_limited",
        first_k_dense_replace=1,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return MoEConfig(**kwargs)


def gqa_config(**overrides) -> MoEConfig:
    return small_config(attention_type="gqa", num_key_value_heads=2, head_dim=8, **overrides)


def seeded_model(config, dtype=torch.float64, seed=0):
    """A model in eval mode with random router biases and norm weights, so that no term hides behind a zero or a one."""
    torch.manual_seed(seed)
    model = MoEForCausalLM(config).to(dtype)
    if dtype == torch.float64:
        model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    with torch.no_grad():
        for router in model.routers():
            router.e_score_correction_bias.normal_(0, 0.05)
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
    return model.eval()


def load_benchmark_script(name: str):
    """benchmarks/<name>.py imported as module `name` (the scripts are not a package)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def assert_help_lists_every_option(parser):
    """Every option of an argparse parser appears in its --help text."""
    text = parser.format_help()
    for action in parser._actions:
        for option in action.option_strings:
            assert option in text
    return text


def assert_compiled_training_step_matches(eager_model, compiled_model, ids):
    """A training forward + backward of `compiled_model` under torch.compile(fullgraph=True) (aot_eager: no graph
    break anywhere, the expert-load counting included) gives `eager_model`'s loss, expert loads and gradients."""
    eager_loss = eager_model(input_ids=ids, labels=ids).loss
    eager_loss.backward()
    step = torch.compile(lambda x: compiled_model(input_ids=x, labels=x).loss, backend="aot_eager", fullgraph=True)
    loss = step(ids)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for router, compiled_router in zip(eager_model.routers(), compiled_model.routers()):
        torch.testing.assert_close(compiled_router.tokens_per_expert, router.tokens_per_expert, rtol=0, atol=0)
    grads = dict(eager_model.named_parameters())
    for name, param in compiled_model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)

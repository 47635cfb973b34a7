"""GRPO with TRL's GRPOTrainer: the CLI on the tiny preset with the router aux loss on, and a reward that rises."""

import json
from types import SimpleNamespace

import pytest
import torch

from modeling_moe.trainers import grpo, rewards, sft

from .test_sft import save_toy_model, toy_tokenizer


def read_history(folder):
    return json.loads((folder / "trainer_state.json").read_text())["log_history"]


def test_grpo_cli_runs_on_tiny_preset_with_router_aux_loss(tiny_dir, tmp_path):
    out = tmp_path / "grpo"
    trainer = grpo.main([
        "--model_name_or_path", tiny_dir, "--use_peft", "--task", "countdown", "--train_size", "4", "--eval_size", "0",
        "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4", "--num_generations", "4",
        "--max_completion_length", "12", "--router_aux_loss_coef", "0.01", "--seed", "0",
    ])
    history = [r for r in read_history(out) if "reward" in r]
    assert len(history) == 2
    for record in history:
        assert record["aux_loss"] > 0  # TRL's MoE aux-loss path with our config (num_experts, output_router_logits)
        assert "rewards/format_reward/mean" in record and "rewards/countdown_reward/mean" in record
        assert "moe/maxvio" in record
    assert trainer.reward_weights.tolist() == pytest.approx([grpo.FORMAT_WEIGHT, 1.0])
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "rewards.png"):
        assert (out / name).is_file(), name
    base = trainer.model.get_base_model()
    assert all(not router.e_score_correction_bias.any() for router in base.routers())  # biases fixed during RL


def test_grpo_cuda_graph_rollouts_generate_through_the_static_latent_cache(tiny_dir, tmp_path, monkeypatch):
    """--cuda_graph_rollouts: the rollouts run through our static latent cache, reused from one rollout to the next
    (its buffers keep their addresses, so CUDA graphs replay), and generate() may compile (on a CPU it does not, so
    the same static-cache path runs eagerly)."""
    from modeling_moe.cache_moe import MoEStaticCache

    built = []
    original = MoEStaticCache.__init__

    def counting_init(self, *args, **kwargs):
        built.append(kwargs["max_cache_len"] if "max_cache_len" in kwargs else args[1])
        original(self, *args, **kwargs)

    monkeypatch.setattr(MoEStaticCache, "__init__", counting_init)
    trainer = grpo.main([
        "--model_name_or_path", tiny_dir, "--use_peft", "--task", "countdown", "--train_size", "4", "--eval_size", "0",
        "--output_dir", str(tmp_path / "grpo"), "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--num_generations", "4", "--max_completion_length", "12", "--seed", "0", "--cuda_graph_rollouts",
        "--pad_to_multiple_of", "128",  # every rollout's prompts padded to one length: the cache fits each time
    ])
    assert trainer.generation_config.cache_implementation == "static"
    assert trainer.generation_config.disable_compile is False
    assert len(built) == 1  # built by the first rollout, reused by the second
    assert len([r for r in read_history(tmp_path / "grpo") if "reward" in r]) == 2


def lora_policy(tiny_dir, preset, seed=0):
    """The tiny model with LoRA (`preset`), its B matrices made non-zero so that the adapters change the outputs."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from modeling_moe.trainers.sft import MoEModelConfig, moe_lora_config

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    policy = get_peft_model(model, moe_lora_config(model, MoEModelConfig(use_peft=True, lora_preset=preset)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return policy.eval()


@pytest.mark.parametrize("preset, copies", [("attention", False), ("attention+shared", False), ("all", True)])
def test_cuda_graph_rollouts_copy_the_policy_only_over_parametrized_weights(tiny_dir, preset, copies):
    """LoRA on modules keeps compiled rollouts on the policy itself; LoRA on the routed experts' stacked parameters
    (PEFT target_parameters, a torch parametrization) sends them through a merged copy."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    policy = lora_policy(tiny_dir, preset)
    callbacks = []
    trainer = SimpleNamespace(model=policy, generation_config=GenerationConfig(disable_compile=True),
                              add_callback=callbacks.append)
    rollout = grpo.use_cuda_graph_rollouts(trainer)
    assert (rollout is not None) is copies and len(callbacks) == int(copies)
    assert trainer.generation_config.cache_implementation == "static"
    assert trainer.generation_config.disable_compile is False


def test_merged_rollout_copy_matches_the_lora_policy_and_resyncs_in_place(tiny_dir):
    """The copy's logits equal the PEFT policy's (LoRA on attention, shared and routed experts); generate() on the
    policy runs on the copy; after an optimizer step the copy is refreshed in the same storage (CUDA-graph safe)."""
    from modeling_moe.trainers.rollout import MergedRolloutModel

    policy = lora_policy(tiny_dir, "all")
    callbacks = []
    rollout = MergedRolloutModel(policy).attach(SimpleNamespace(add_callback=callbacks.append))
    assert callbacks == [rollout]
    ids = torch.randint(3, 500, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = policy(input_ids=ids).logits
        rollout.sync()
        torch.testing.assert_close(rollout.model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        base = policy.get_base_model()
        with policy.disable_adapter():
            assert (base(input_ids=ids).logits - expected).abs().max() > 1e-3  # the adapters do matter

    calls = []
    hook = rollout.model.register_forward_pre_hook(lambda *a: calls.append(1))
    reference = rollout.original_generate(ids, max_new_tokens=4, do_sample=False)  # PEFT's own generate
    assert not calls
    out = policy.generate(ids, max_new_tokens=4, do_sample=False)
    assert calls and torch.equal(out, reference)
    hook.remove()

    pointers = {name: t.data_ptr() for name, t in rollout.tensors.items()}
    with torch.no_grad():  # an optimizer step on the adapters
        for name, param in policy.named_parameters():
            if "lora_A" in name:
                param.mul_(1.5)
    rollout.on_step_end(None, None, None)
    assert rollout.stale
    policy.generate(ids, max_new_tokens=1, do_sample=False)
    assert not rollout.stale
    with torch.no_grad():
        torch.testing.assert_close(rollout.model(input_ids=ids).logits, policy(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    assert {name: t.data_ptr() for name, t in rollout.tensors.items()} == pointers


TOY_CHARS = "abcdefgh"


def share_of_a(completions, **kwargs):
    """Toy reward: the share of `a` among the completion's characters (1/8 for a uniform policy)."""
    texts = [rewards.completion_text(c) for c in completions]
    return [t.count("a") / max(len(t), 1) for t in texts]


def test_grpo_mean_reward_rises_on_a_toy_task(tmp_path):
    """A tiny MoE (the tiny preset with an 8-character vocabulary) learns in a few seeded GRPO steps to emit `a`: the
    mean reward of the last steps is well above that of the first ones."""
    # The aux loss is switched on in the model's own config this time (TRL reads router_aux_loss_coef from it).
    folder = save_toy_model(tmp_path / "toy", toy_tokenizer(TOY_CHARS), initializer_range=0.02,
                            num_nextn_predict_layers=0, output_router_logits=True, router_aux_loss_coef=0.01)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ("abc", "bcd", "cde", "def")))
    out = tmp_path / "out"
    grpo.main([
        "--model_name_or_path", folder, "--task", str(prompts), "--reward_funcs", f"{__name__}.share_of_a",
        "--output_dir", str(out), "--max_steps", "8", "--per_device_train_batch_size", "16", "--num_generations", "8",
        "--max_completion_length", "8", "--learning_rate", "3e-3", "--seed", "0", "--eval_size", "0",
        "--gradient_checkpointing", "false",
    ])
    history = [r for r in read_history(out) if "reward" in r]
    assert all(r["aux_loss"] > 0 for r in history)
    curve = [r["reward"] for r in history]
    assert len(curve) == 8
    first, last = sum(curve[:2]) / 2, sum(curve[-2:]) / 2
    assert first < 0.3 and last > first + 0.2, curve


def test_reward_resolution_and_defaults():
    assert grpo.default_reward_funcs("countdown") == ["format_reward", "countdown_reward"]
    assert grpo.default_reward_funcs("gsm,arithmetic") == ["format_reward", "math_accuracy_reward"]
    assert grpo.default_reward_funcs("gsm,countdown") == ["format_reward", "accuracy_reward"]
    assert grpo.resolve_reward_func("countdown_reward") is rewards.countdown_reward
    from trl.rewards import think_format_reward

    assert grpo.resolve_reward_func("think_format_reward") is think_format_reward
    assert grpo.resolve_reward_func(f"{__name__}.share_of_a") is share_of_a
    with pytest.raises(ValueError, match="Unknown reward"):
        grpo.resolve_reward_func("no_such_reward")


def test_trl_accuracy_rewards_read_the_answer_column():
    """TRL's accuracy rewards take the reference from a `solution` column; the tasks here call it `answer`."""
    pytest.importorskip("math_verify")
    reward = grpo.resolve_reward_func("reasoning_accuracy_reward")
    assert reward.__name__ == "reasoning_accuracy_reward"  # the name TRL logs it under
    completions = [[{"role": "assistant", "content": f"<think>x</think>\\boxed{{{n}}}"}] for n in (3, 4)]
    assert reward(completions, answer=["3", "3"]) == [1.0, 0.0]
    by_path = grpo.resolve_reward_func("trl.rewards.accuracy_reward")  # a dotted path gets the same column
    assert by_path(completions, answer=["3", "3"]) == [1.0, 0.0]


def test_help_lists_the_config_file_option(capsys):
    for module in (grpo, sft):
        with pytest.raises(SystemExit):
            module.make_parser().parse_args_and_config(args=["--help"])
        assert "--config FILE.yaml" in capsys.readouterr().out
    data_args, _, _ = grpo.make_parser().parse_args_and_config(args=["--output_dir", "x"])  # still three dataclasses
    assert not hasattr(data_args, "config")


def test_merged_rollout_copy_takes_the_trained_modules_to_save(tiny_dir):
    """`--lora_modules_to_save`: the copy holds the adapter's trained copy of the module (not the frozen original),
    and follows its updates."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from modeling_moe.trainers.rollout import MergedRolloutModel
    from modeling_moe.trainers.sft import MoEModelConfig, moe_lora_config

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    config = moe_lora_config(model, MoEModelConfig(use_peft=True, lora_modules_to_save=["embed_tokens"]))
    policy = get_peft_model(model, config).eval()
    rollout = MergedRolloutModel(policy)
    ids = torch.randint(3, 500, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "modules_to_save" in name or "lora_B" in name:  # an optimizer step
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
        rollout.sync()
        torch.testing.assert_close(rollout.model(input_ids=ids).logits, policy(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)

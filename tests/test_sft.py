"""LoRA / full SFT with TRL's SFTTrainer: targets, training, adapter round trips, the CLI, and the reasoning data."""

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, TrainerCallback
from transformers.dynamic_module_utils import get_class_from_dynamic_module
from trl import SFTConfig, SFTTrainer

from modeling_moe.presets import load_preset_config, preset_path
from modeling_moe.trainers import grpo, sft
from modeling_moe.trainers.reasoning_data import RL_SEED_OFFSET, CHAT_TEMPLATE, build_datasets, set_chat_template
from modeling_moe.trainers.rewards import accuracy_reward, format_reward

from .helpers import gqa_config, small_config


# PEFT checks rank/alpha patterns against targeted modules only, and so warns about the routed experts' (applied) ranks.
pytestmark = pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match")


def lora_args(**overrides):
    return sft.MoEModelConfig(**{"use_peft": True, "lora_r": 8, "lora_alpha": 16, **overrides})


def lora_modules(model) -> dict[str, object]:
    """{unwrapped module name: LoRA layer} of a PEFT model (parameter wrappers of one module nest; their names are
    reported as `<module>.<parameter>`)."""
    found = {}
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            continue
        clean = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if type(module).__name__ == "ParamWrapper":
            clean = f"{clean}.{module.parameter_name}"
        found[clean] = module
    return found


# ------------------------------------------------------------------------------------------------------ targets


def test_lora_presets_target_attention_shared_and_routed_experts():
    base = AutoModelForCausalLM.from_config(load_preset_config("tiny"))
    attention = {f"model.layers.{i}.self_attn.{p}" for i in range(3)
                 for p in ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")}
    shared = {f"model.layers.{i}.mlp.shared_experts.{p}" for i in (1, 2) for p in ("gate_proj", "up_proj", "down_proj")}
    experts = {f"model.layers.{i}.mlp.experts.{p}" for i in (1, 2) for p in ("gate_up_proj", "down_proj")}
    expected = {"attention": attention, "attention+shared": attention | shared, "all": attention | shared | experts}
    for preset, names in expected.items():
        model = get_peft_model(copy.deepcopy(base), sft.moe_lora_config(base, lora_args(lora_preset=preset)))
        layers = lora_modules(model)
        assert set(layers) == names, preset  # no router, norms, embeddings, head, dense MLP or MTP module
        for name, layer in layers.items():
            is_expert = name in experts
            assert layer.r["default"] == (2 if is_expert else 8)  # per-expert rank lora_r // 4
            assert layer.scaling["default"] == pytest.approx(2.0)  # same alpha / r everywhere
        if preset == "all":
            assert model.peft_config["default"].lora_dropout == 0.0


@pytest.mark.parametrize("config, projections", [
    (small_config(), ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")),
    (gqa_config(), ("q_proj", "k_proj", "v_proj", "o_proj")),
])
def test_lora_presets_follow_the_attention_type(config, projections):
    base = AutoModelForCausalLM.from_config(config)
    model = get_peft_model(base, sft.moe_lora_config(base, lora_args(lora_preset="attention", lora_r=4)))
    targeted = {name.rsplit(".", 1)[-1] for name in lora_modules(model)}
    assert targeted == set(projections)


def test_explicit_targets_replace_the_preset_and_dropout_is_checked():
    base = AutoModelForCausalLM.from_config(load_preset_config("tiny"))
    config = sft.moe_lora_config(base, lora_args(lora_target_modules=["o_proj", "kv_b_proj"]))
    assert config.target_modules == {"o_proj", "kv_b_proj"}
    assert config.target_parameters == sft.expert_parameter_names(base)  # the preset's part not given explicitly
    config = sft.moe_lora_config(base, lora_args(lora_target_parameters=["mlp.experts.down_proj"], lora_preset="all"))
    assert config.target_parameters == ["mlp.experts.down_proj"] and config.target_modules == sft.lora_target_regex(
        ("attention", "shared"))
    with pytest.raises(ValueError, match="lora_dropout"):
        sft.moe_lora_config(base, lora_args(lora_dropout=0.1))
    assert sft.moe_lora_config(base, lora_args(lora_dropout=0.1, lora_preset="attention+shared")).lora_dropout == 0.1
    assert sft.moe_lora_config(base, sft.MoEModelConfig(use_peft=False)) is None


# ------------------------------------------------------------------------------------------------ LoRA training


TOY_CHARS = "0123456789+-*/=<>()abcdefghijklmnopqrstuvwxyz\n"


def toy_tokenizer(chars: str = TOY_CHARS) -> PreTrainedTokenizerFast:
    """A character-level tokenizer (id 0: `<eos>`, also the pad token): small vocabularies make CPU tests fast."""
    vocab = {"<eos>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>", unk_token="<eos>")


def save_toy_model(folder, tokenizer, **overrides):
    """The tiny preset's architecture (MLA, group-limited sigmoid routing, shared expert, dense first layer, MTP) with
    the toy vocabulary, randomly initialised and saved with its code and tokenizer. The default initializer_range of
    0.2 gives the frozen output head logits large enough for a LoRA-only model to fit a batch in a few steps."""
    torch.manual_seed(0)
    overrides = {"initializer_range": 0.2, **overrides}
    config = load_preset_config("tiny", vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                **overrides)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def logits_of(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits.float().cpu()  # the trainer may have moved it


def base_weights(model) -> dict[str, torch.Tensor]:
    """The base model's weights of a (PEFT-wrapped) model by their plain names, LoRA weights left out."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return {name.replace(".base_layer", ""): tensor.detach().cpu().clone()  # the trainer may move it to a GPU
            for name, tensor in model.state_dict().items() if "lora_" not in name}


def test_lora_sft_trains_keeps_base_merges_and_reloads(tmp_path):
    """LoRA on attention + shared + routed experts of a model loaded through its own code (trust_remote_code), trained
    with TRL's SFTTrainer on one repeated example."""
    folder = save_toy_model(tmp_path / "toy", toy_tokenizer())
    remote_class = get_class_from_dynamic_module("modeling_moe.MoEForCausalLM", folder)
    model = remote_class.from_pretrained(folder)
    assert type(model).__module__.startswith("transformers_modules")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    before = base_weights(model)
    ids = torch.randint(1, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))

    text = "<think>12+7=19\n19*2=38</think><answer>38</answer>"
    dataset = Dataset.from_list([{"text": text}] * 4)
    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=10, per_device_train_batch_size=4, learning_rate=1e-2,
                     logging_steps=1, save_strategy="no", report_to="none", bf16=False, gradient_checkpointing=False,
                     seed=0, lr_scheduler_type="constant")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=sft.moe_lora_config(model, lora_args()))
    assert any(type(m).__name__ == "ParamWrapper" for m in trainer.model.modules())
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses[-1] < 0.3 * losses[0], losses

    peft_model = trainer.model
    after = base_weights(peft_model)
    assert after.keys() == before.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)

    adapter_logits = logits_of(peft_model, ids)
    with peft_model.disable_adapter():
        base_logits = logits_of(peft_model, ids)
    assert (adapter_logits - base_logits).abs().max() > 1e-2  # the adapter is applied

    adapter_dir = tmp_path / "adapter"
    trainer.save_model(str(adapter_dir))
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    saved_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert "model.layers.1.mlp.experts.gate_up_proj" in saved_config["target_parameters"]

    reloaded = PeftModel.from_pretrained(remote_class.from_pretrained(folder), str(adapter_dir))
    torch.testing.assert_close(logits_of(reloaded, ids), adapter_logits, rtol=1e-5, atol=1e-5)

    merged = peft_model.merge_and_unload()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits_of(merged, ids), adapter_logits, rtol=1e-4, atol=1e-4)
    merged_dir = tmp_path / "merged"
    merged.save_pretrained(merged_dir)
    plain = AutoModelForCausalLM.from_pretrained(merged_dir)  # no PEFT involved
    torch.testing.assert_close(logits_of(plain, ids), adapter_logits, rtol=1e-4, atol=1e-4)


def toy_lora_trainer(tmp_path, max_steps, callbacks=None, **lora_overrides):
    """TRL's SFTTrainer with LoRA on the toy model, one repeated example, a constant learning rate."""
    folder = save_toy_model(tmp_path / "toy", toy_tokenizer())
    model = AutoModelForCausalLM.from_pretrained(folder)
    dataset = Dataset.from_list([{"text": "<think>12+7=19\n19*2=38</think><answer>38</answer>"}] * 4)
    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=max_steps, per_device_train_batch_size=4,
                     learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", bf16=False,
                     gradient_checkpointing=False, seed=0, lr_scheduler_type="constant")
    peft_config = sft.moe_lora_config(model, lora_args(**lora_overrides))
    return SFTTrainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks,
                      processing_class=AutoTokenizer.from_pretrained(folder), peft_config=peft_config)


def test_lora_on_routed_experts_alone_learns(tmp_path):
    """The experts' adapters are trained, not skipped: with LoRA only on `target_parameters`, the loss still falls."""
    trainer = toy_lora_trainer(tmp_path, max_steps=6, lora_target_modules=[], lora_preset="all")
    peft_config = trainer.model.peft_config["default"]
    assert not peft_config.target_modules and peft_config.target_parameters
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses[-1] < 0.9 * losses[0], losses


class PoisonGradient(TrainerCallback):
    """Puts a NaN into one trainable gradient before optimizer step `step` (what a bf16 overflow would leave)."""

    def __init__(self, step: int):
        self.step = step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")


@pytest.mark.parametrize("guarded", [True, False])
def test_non_finite_gradients_skip_the_step(tmp_path, guarded):
    callbacks = [PoisonGradient(step=2)] + ([sft.SkipNonFiniteStepCallback()] if guarded else [])
    trainer = toy_lora_trainer(tmp_path, max_steps=4, callbacks=callbacks)
    trainer.train()
    trained = [p for p in trainer.model.parameters() if p.requires_grad]
    finite = all(torch.isfinite(p).all() for p in trained)
    assert finite == guarded  # unguarded, AdamW spreads the NaN into the weights
    if guarded:
        records = [r for r in trainer.state.log_history if "loss" in r]
        assert [r.get("skipped_steps") for r in records] == [None, 1, 1, 1]
        assert all(math.isfinite(r["loss"]) for r in records) and records[-1]["loss"] < records[0]["loss"]


def test_expert_bias_callback_updates_only_when_asked():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(small_config()).train()
    ids = torch.randint(3, 97, (2, 16))
    for update in (False, True):
        model(input_ids=ids)  # training forward: the routers count tokens
        callback = sft.ExpertBiasCallback(update=update)
        callback.on_step_end(None, None, None, model=get_peft_model(model, sft.moe_lora_config(model, lora_args()))
                             if not update else model)
        biases = torch.stack([router.e_score_correction_bias for router in model.routers()])
        assert bool(biases.abs().sum() > 0) == update
        assert all(router.tokens_per_expert is None for router in model.routers())  # counts consumed
        assert len(callback._maxvio) == 1


# ------------------------------------------------------------------------------------------------------------ CLI


def read_state(folder):
    return json.loads((folder / "trainer_state.json").read_text())["log_history"]


def test_sft_cli_lora_with_router_aux_loss(tiny_dir, tmp_path):
    out = tmp_path / "sft"
    trainer = sft.main([
        "--model_name_or_path", tiny_dir, "--use_peft", "--output_dir", str(out), "--max_steps", "3",
        "--per_device_train_batch_size", "2", "--max_length", "128", "--task", "arithmetic,countdown",
        "--train_size", "2", "--eval_size", "0", "--logging_steps", "1", "--router_aux_loss_coef", "0.01",
    ])
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    history = read_state(out)
    assert all(r["aux_loss"] > 0 for r in history if "loss" in r)  # TRL's MoE aux-loss path with our config
    assert any("moe/maxvio" in r for r in history)
    assert AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE
    base = trainer.model.get_base_model()
    assert base.config.output_router_logits and base.config.num_experts == 8
    assert all(not router.e_score_correction_bias.any() for router in base.routers())  # biases fixed by default


def test_a_run_stopped_by_the_clock_leaves_a_checkpoint_to_resume(tiny_dir, tmp_path):
    """--max_train_seconds with checkpoints every save_steps: a checkpoint at the step where training stopped, from
    which --resume_from_checkpoint finishes the run."""
    out = tmp_path / "sft"
    flags = ["--model_name_or_path", tiny_dir, "--use_peft", "--output_dir", str(out), "--max_steps", "3",
             "--per_device_train_batch_size", "2", "--max_length", "96", "--task", "arithmetic", "--train_size", "6",
             "--eval_size", "0", "--save_strategy", "steps", "--save_steps", "100"]
    sft.main([*flags, "--max_train_seconds", "1e-9"])
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]
    trainer = sft.main([*flags, "--resume_from_checkpoint", "true"])
    assert trainer.state.global_step == 3


def test_sft_cli_full_finetune_with_expert_bias_updates(tiny_dir, tmp_path):
    out = tmp_path / "full"
    sft.main([
        "--model_name_or_path", tiny_dir, "--output_dir", str(out), "--max_steps", "2", "--learning_rate", "1e-3",
        "--per_device_train_batch_size", "2", "--max_length", "96", "--task", "arithmetic", "--train_size", "2",
        "--eval_size", "0", "--update_expert_bias", "--gradient_checkpointing", "false",
    ])
    before = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    name = "model.layers.1.self_attn.o_proj.weight"
    assert not torch.equal(after[name], before[name])
    assert after["model.layers.1.mlp.gate.e_score_correction_bias"].abs().sum() > 0  # --update_expert_bias
    for name in before:
        if ".mtp_layers." in name:  # not used by the fine-tuning loss: frozen
            assert torch.equal(after[name], before[name]), name


def test_only_the_examples_max_steps_reaches_are_tokenized(tmp_path):
    rows = Dataset.from_dict({"prompt": [f"q{i}" for i in range(50)], "completion": [f"a{i}" for i in range(50)]})
    def config(**kwargs):  # TRL defaults to bf16, which a CPU-only machine refuses
        return SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, **kwargs)

    args = config(max_steps=4, per_device_train_batch_size=3, gradient_accumulation_steps=2)
    kept = sft.reachable_examples(rows, args)
    assert len(kept) == 4 * 3 * 2  # steps x batch x accumulation x 1 process
    assert set(kept["prompt"]) < set(rows["prompt"]) and kept["prompt"] != rows["prompt"][:24]  # a random subset
    assert kept["prompt"] == sft.reachable_examples(rows, args)["prompt"]  # the same one for the same seed
    for unchanged in (config(max_steps=-1, num_train_epochs=1), config(max_steps=100),  # 800 > 50 rows
                      config(max_steps=4, packing=True)):
        assert sft.reachable_examples(rows, unchanged) is rows


def test_recipes_parse_with_trl_config_files():
    recipes = Path(sft.__file__).parent / "recipes"
    data_args, training_args, model_args = sft.make_parser().parse_args_and_config(
        args=["--config", str(recipes / "sft_lora_reasoning.yaml"), "--bf16", "false", "--lora_r", "8"])
    assert model_args.use_peft and model_args.lora_preset == "all" and model_args.lora_r == 8  # CLI overrides YAML
    assert data_args.save_merged_model and training_args.max_length == 1024 and not training_args.bf16
    for name in ("grpo_countdown.yaml", "grpo_gsm.yaml"):
        data_args, training_args, model_args = grpo.make_parser().parse_args_and_config(
            args=["--config", str(recipes / name), "--bf16", "false"])
        assert len(data_args.reward_funcs) == len(training_args.reward_weights) == 2
        assert training_args.num_generations == 8 and model_args.use_peft and data_args.cuda_graph_rollouts
        # The generator settings of the measured runs reach the generator: countdown with three numbers up to 20 and
        # targets up to 50; gsm problems of at most three reasoning lines.
        train, _ = build_datasets(data_args.task, 6, task_kwargs=sft.parse_task_kwargs(data_args),
                                  with_completion=False)
        if data_args.task == "countdown":
            assert all(len(row["numbers"]) == 3 and max(row["numbers"]) <= 20 and 10 <= row["target"] <= 50
                       for row in train)
        else:
            assert all(float(row["answer"]) <= 100 for row in train)


# ----------------------------------------------------------------------------------------------------------- data


def test_reasoning_data_chat_format_and_held_out_split():
    tokenizer = set_chat_template(AutoTokenizer.from_pretrained(preset_path("tiny")))
    train, evaluation = build_datasets("gsm,countdown,arithmetic", 6, 6, seed=1)
    assert len(train) == 18 and len(evaluation) == 18
    train_questions = {row["prompt"][-1]["content"] for row in train}
    assert not train_questions & {row["prompt"][-1]["content"] for row in evaluation}
    again, _ = build_datasets("gsm,countdown,arithmetic", 6, 0, seed=1)
    assert again["prompt"] == train["prompt"]  # deterministic by seed
    for row in train:
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True)["input_ids"]
        full = tokenizer.apply_chat_template(row["prompt"] + row["completion"])["input_ids"]
        assert full[:len(prompt)] == prompt and full[-1] == tokenizer.eos_token_id  # prompt is a token prefix
        target = row["completion"]
        # The SFT targets are exactly what the GRPO rewards pay for.
        assert format_reward([target]) == [1.0]
        assert accuracy_reward([target], numbers=[row["numbers"]], target=[row["target"]],
                               answer=[row["answer"]]) == [1.0]


def test_local_question_answer_file_is_converted(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) for i in range(3)))
    train, evaluation = build_datasets(str(path), 0, 0)
    assert evaluation is None and len(train) == 3
    assert train[0]["prompt"][-1]["content"] == "What is 0 + 1?"
    assert train[0]["completion"][0]["content"].endswith("<answer>1</answer>")
    assert os.fspath(path) and train[1]["answer"] == "2"


def test_local_answers_as_numbers_or_missing_mix_with_generated_tasks(tmp_path):
    """Numeric answers become text (one column type, also beside a generated task); rows without an answer are
    prompts for GRPO and left out of SFT."""
    path = tmp_path / "data.jsonl"
    rows = [{"question": "Two?", "answer": 2}, {"question": "Name?", "answer": None}, {"question": "Ten?", "answer": 10}]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    sft_rows, _ = build_datasets(f"gsm,{path}", 2, 0)
    assert len(sft_rows) == 4 and {"2", "10"} <= set(sft_rows["answer"])
    prompts, _ = build_datasets(f"gsm,{path}", 2, 0, with_completion=False)
    assert len(prompts) == 5 and None in prompts["answer"]


def test_grpo_prompts_come_from_another_seed_than_sft_examples():
    sft_train, _ = build_datasets("gsm", 8, 4, seed=0)
    rl_train, rl_eval = build_datasets("gsm", 8, 4, seed=0, train_seed=0 + RL_SEED_OFFSET)
    questions = lambda split: {row["prompt"][-1]["content"] for row in split}  # noqa: E731
    assert not questions(rl_train) & questions(sft_train) and not questions(rl_train) & questions(rl_eval)


class StandInGenerator:
    """A model stand-in for `evaluate_accuracy` (on the CPU, mode switches do nothing); subclasses answer in
    `generate`."""
    device, training = torch.device("cpu"), False

    def eval(self):
        pass

    def train(self, mode=True):
        pass


def test_evaluate_accuracy_records_each_problems_outcome_in_order():
    """A stand-in model answers problem i with i for even i and i + 1 for odd i: accuracy 3/5, and the per-problem
    outcomes (what a paired comparison of two evaluations needs) in dataset order, overall and per task."""
    from modeling_moe.trainers.reasoning_data import evaluate_accuracy

    tokenizer = AutoTokenizer.from_pretrained(preset_path("tiny"))
    dataset = [{"prompt": [{"role": "user", "content": f"problem number {i}?"}], "answer": str(i), "task": "gsm"}
               for i in range(5)]

    class Answers(StandInGenerator):
        def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
            rows = []
            for text in tokenizer.batch_decode(input_ids, skip_special_tokens=True):
                i = int(text.split("problem number ")[1].split("?")[0])
                answer = i if i % 2 == 0 else i + 1
                rows.append(tokenizer(f"<think>\nx\n</think>\n<answer>{answer}</answer>").input_ids)
            width = max(len(r) for r in rows)
            new = torch.tensor([r + [tokenizer.eos_token_id] * (width - len(r)) for r in rows])
            return torch.cat([input_ids, new], dim=1)

    result = evaluate_accuracy(Answers(), tokenizer, dataset, batch_size=2)
    assert result["accuracy"] == pytest.approx(0.6) and result["n"] == 5 and result["format"] == 1.0
    assert result["correct"] == [1, 0, 1, 0, 1] and result["gsm/correct"] == [1, 0, 1, 0, 1]


def test_log_history_starts_over_unless_resuming(tmp_path):
    from types import SimpleNamespace

    callback = sft.LogHistoryCallback()
    path = tmp_path / "log_history.jsonl"
    state = SimpleNamespace(is_world_process_zero=True, log_history=[{"step": 1, "loss": 2.0}], global_step=1)
    for resume, lines in ((None, 1), ("checkpoint-1", 2)):
        args = SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint=resume)
        callback.on_train_begin(args, state, None)
        callback.on_log(args, state, None)
        assert len(path.read_text().splitlines()) == lines
    # A run killed after step 3 resumes from its step-2 checkpoint: steps 3 and later are logged again, not twice.
    path.write_text("".join(json.dumps({"step": step, "loss": 1.0}) + "\n" for step in (1, 2, 3)))
    args = SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint="checkpoint-2")
    state.global_step = 0  # transformers loads the checkpoint's state after on_train_begin
    callback.on_train_begin(args, state, None)
    state.global_step = 2
    callback.on_step_begin(args, state, None)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    state.global_step = 3
    path.write_text(path.read_text() + json.dumps({"step": 3, "loss": 0.5}) + "\n")
    callback.on_step_begin(args, state, None)  # later steps keep what they logged
    assert len(path.read_text().splitlines()) == 3


def test_evaluate_accuracy_takes_plain_text_prompts():
    """TRL's standard format (a `prompt` string, e.g. a local --eval_task file) is generated from as it is, as TRL's
    trainers do; only conversations go through the chat template."""
    from modeling_moe.trainers.reasoning_data import evaluate_accuracy

    tokenizer = AutoTokenizer.from_pretrained(preset_path("tiny"))
    seen = []

    class Echo(StandInGenerator):
        def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
            seen.extend(tokenizer.batch_decode(input_ids, skip_special_tokens=True))
            answer = torch.tensor(tokenizer("<think>\nx\n</think>\n<answer>3</answer>").input_ids)
            return torch.cat([input_ids, answer.expand(len(input_ids), -1)], dim=1)

    result = evaluate_accuracy(Echo(), tokenizer, [{"prompt": "What is 1+2?", "answer": "3"}])
    assert seen == ["What is 1+2?"]
    assert result["accuracy"] == 1.0 and result["samples"][0]["question"] == "What is 1+2?"


def test_trackers_receive_the_moe_metrics(tiny_dir, tmp_path, monkeypatch):
    """`--report_to` callbacks (TensorBoard, W&B, ...) sit ahead of the trainer's own callbacks: `moe/maxvio` must be
    in the record before they log it."""
    import transformers.trainer as hf_trainer

    seen = []

    class Tracker(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                seen.append("moe/maxvio" in logs)

    monkeypatch.setattr(hf_trainer, "get_reporting_integration_callbacks", lambda report_to: [Tracker])
    sft.main(["--model_name_or_path", tiny_dir, "--use_peft", "--task", "arithmetic", "--train_size", "4",
              "--eval_size", "0", "--output_dir", str(tmp_path / "sft"), "--max_steps", "2", "--logging_steps", "1",
              "--per_device_train_batch_size", "2"])
    assert seen == [True, True]


def test_time_limit_stops_every_rank_at_the_same_step(monkeypatch):
    """With several processes, one rank past the budget stops them all (else the others wait in an all-reduce)."""
    from types import SimpleNamespace

    callback = sft.TimeLimitCallback(seconds=3600)
    callback.on_train_begin(None, None, None)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda flag, op=None: flag.fill_(1.0))  # another rank is over
    control = SimpleNamespace(should_training_stop=False, should_save=False)
    args = SimpleNamespace(device=torch.device("cpu"), save_strategy="no")
    callback.on_step_end(args, SimpleNamespace(global_step=3), control)
    assert control.should_training_stop


@pytest.mark.parametrize("flag, expected", [("true", True), ("True", True), ("false", None),
                                            ("ckpt/checkpoint-2", "ckpt/checkpoint-2")])
def test_resume_from_checkpoint_true_means_the_last_checkpoint(flag, expected):
    for module in (sft, grpo):
        _, training_args, _ = module.make_parser().parse_args_and_config(
            args=["--output_dir", "x", "--resume_from_checkpoint", flag])
        assert sft.resume_argument(training_args) == expected


@pytest.mark.parametrize("flag", ["--load_in_4bit", "--load_in_8bit"])
def test_quantized_loading_is_a_clear_error(tiny_dir, flag):
    """ModelConfig's bitsandbytes flags are refused by name (QLoRA would leave the stacked experts unquantized), not
    silently dropped."""
    _, training_args, model_args = sft.make_parser().parse_args_and_config(
        args=["--output_dir", "x", "--model_name_or_path", tiny_dir, flag])
    with pytest.raises(ValueError, match="--load_in_4bit / --load_in_8bit"):
        sft.load_model_and_tokenizer(model_args, training_args)

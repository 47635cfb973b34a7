"""The README's end-to-end demo runs (a few steps per stage), with a relative output folder as a user would pass it."""

import json
import subprocess
import sys

import torch

from modeling_moe import demo
from modeling_moe.trainers.reasoning_data import make_prompt


def test_demo_end_to_end(tmp_path):
    args = ["--output_dir", "out", "--pretrain_steps", "3", "--sft_steps", "2", "--grpo_steps", "1", "--seq_len", "64",
            "--max_new_tokens", "4"]
    result = subprocess.run(
        [sys.executable, "-m", "modeling_moe.demo", *args], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "through trust_remote_code" in result.stdout and "answer:" in result.stdout
    assert "MTP self-speculative decoding: the greedy tokens True" in result.stdout
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r for r in records)
    assert (out / "pretrain" / "loss.png").stat().st_size > 0
    assert (out / "sft" / "adapter_model.safetensors").is_file()
    assert (out / "grpo" / "merged" / "modeling_moe.py").is_file()


def saved_model_with_chat_template(folder, **overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modeling_moe.presets import load_preset_config, preset_path
    from modeling_moe.trainers.reasoning_data import set_chat_template

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(load_preset_config("tiny", **overrides)).save_pretrained(folder)
    set_chat_template(AutoTokenizer.from_pretrained(preset_path("tiny"))).save_pretrained(folder)
    return str(folder)


def test_generation_step_on_a_model_without_mtp(tmp_path):
    """`--model_config gqa-moe` (no MTP module) must not fail at the very end, after minutes of training."""
    folder = saved_model_with_chat_template(tmp_path / "model", num_nextn_predict_layers=0)
    messages = json.dumps(make_prompt("Make 10 with 2 and 5."))
    command = [sys.executable, "-c", demo.GENERATE_IN_FRESH_PROCESS, folder, messages, "3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "answer:" in result.stdout and "no MTP module" in result.stdout


def test_the_question_is_asked_in_the_format_the_model_was_tuned_on(tmp_path, monkeypatch):
    monkeypatch.setattr(demo.pretrain, "main", lambda argv: {"eval_losses": [(0, 11.0)], "final_eval_loss": 10.0})
    monkeypatch.setattr(demo.sft, "main", lambda argv: None)
    monkeypatch.setattr(demo.grpo, "main", lambda argv: None)
    commands = []
    monkeypatch.setattr(demo.subprocess, "run", lambda command, **kwargs: commands.append(command))
    demo.main(["--output_dir", str(tmp_path), "--question", "Make 10 with 2 and 5."])
    (command,) = commands
    assert json.loads(command[4]) == make_prompt("Make 10 with 2 and 5.")  # with the SFT / GRPO system prompt

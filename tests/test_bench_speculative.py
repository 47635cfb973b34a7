"""benchmarks/bench_speculative.py end to end on the CPU: a tiny random model with an MTP module."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from modeling_moe import MoEForCausalLM
from modeling_moe.presets import load_preset_config
from modeling_moe.tokenization import gpt2_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_bench_speculative_runs_and_reports_every_decoder(tmp_path):
    torch.manual_seed(0)
    model = MoEForCausalLM(load_preset_config("tiny"))
    assert model.config.num_nextn_predict_layers >= 1
    model.save_pretrained(tmp_path / "model")
    gpt2_tokenizer().save_pretrained(tmp_path / "model")
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_speculative.py"), "--model",
                    str(tmp_path / "model"), "--device", "cpu", "--prompts", "2", "--prompt_tokens", "12",
                    "--new_tokens", "6"], check=True, env=env, cwd=ROOT, capture_output=True, timeout=600)
    records = [json.loads(line) for line in (tmp_path / "out" / "bench_speculative.jsonl").read_text().splitlines()]
    summary = records[-1]
    assert summary["summary"] and summary["prompts"] == 2 and len(records) == 4  # a warm-up prompt, two timed
    assert summary["identical"] is True and summary["identical_static"] is True  # float32: the greedy output
    for key in ("plain_tokens_per_s", "plain_static_tokens_per_s", "speculative_tokens_per_s",
                "speculative_static_tokens_per_s"):
        assert summary[key] > 0
    assert 0 <= summary["acceptance"] <= 1

"""The README's end-to-end demo runs (a few steps per stage), with a relative output folder as a user would pass it."""

import json
import subprocess
import sys


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

"""The README's end-to-end demo runs (a few steps), with a relative output folder as a user would pass it."""

import json
import subprocess
import sys


def test_demo_end_to_end(tmp_path):
    args = ["--output_dir", "out", "--max_steps", "3", "--logging_steps", "3", "--seq_len", "64", "--max_new_tokens", "4"]
    result = subprocess.run(
        [sys.executable, "-m", "modeling_moe.demo", *args], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "through trust_remote_code" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 3 and "eval_loss" in records[-1]
    assert (tmp_path / "out" / "loss.png").stat().st_size > 0
    assert (tmp_path / "out" / "model" / "modeling_moe.py").is_file()

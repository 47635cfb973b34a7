"""benchmarks/bench_adamw.py on the CPU (--dry-run: TritonAdamW through the Triton interpreter); timing needs a
GPU."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_adamw.py"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_dry_run_reports_the_step_and_the_ceiling(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself, before the kernels are imported
    subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], env=env, check=True, capture_output=True, timeout=300)
    records = [json.loads(line) for line in (tmp_path / "bench_adamw.jsonl").read_text().splitlines()]
    env_record, step, ceiling = records
    assert env_record["parameters"] == 37 + 300 + 64 * 65 and env_record["gpu"] == "cpu (dry run)"
    assert step["optimizer"] == "TritonAdamW" and step["ms"] > 0 and step["host_ms"] > 0
    assert ceiling["what"] == "copy of the same bytes"

"""benchmarks/bench_model.py's training part with --profile-train and its step part, end to end on the CPU (--small);
its compile modes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .helpers import load_benchmark_script

ROOT = Path(__file__).resolve().parents[1]


def test_train_part_with_profile_reports_time_shares(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_model.py"), "--small", "--parts", "train",
                    "--profile-train", "--steps", "1", "--warmup", "1", "--device", "cpu"],
                   check=True, env=env, cwd=ROOT, capture_output=True, timeout=600)
    records = [json.loads(line) for line in (tmp_path / "bench_model.jsonl").read_text().splitlines()]
    rows = {r["model"]: r for r in records if r.get("part") == "train"}
    assert {"hf", "ours", "ours + update_expert_bias"} <= set(rows)
    assert all(row["tokens_per_s"] > 0 and row["back_to_back_tokens_per_s"] > 0 for row in rows.values())
    assert rows["ours"]["vs_hf"]["back_to_back_tokens_per_s"] > 0  # a ratio to the same figure of transformers
    profile = rows["ours + update_expert_bias"]["profile"]  # the profiled row without CUDA
    shares = profile["shares"]
    assert shares["routed_experts"] > 0 and shares["gemm"] > 0  # grouped_mm experts, then the other matmuls
    assert 0.5 < sum(shares.values()) <= 1.05  # CPU op self times within the step's wall time
    assert profile["top_kernels"] and "profile" not in rows["ours"]


@pytest.mark.parametrize("compiled", [["--step-compile-mode", "none"],
                                      ["--step-compile-mode", "", "--step-compile-whole-model"]],
                         ids=["eager", "whole_model_compiled"])
def test_step_part_times_our_step_alone(tmp_path, compiled):
    """--parts step: our training step alone (no anchor row), back-to-back runs, a synchronised median, a profile;
    eager, and compiled as one region."""
    env = {**os.environ, "OUT": str(tmp_path)}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_model.py"), "--small", "--parts", "step",
                    "--steps", "2", "--warmup", "1", "--step-runs", "2", *compiled, "--device", "cpu"],
                   check=True, env=env, cwd=ROOT, capture_output=True, timeout=600)
    records = [json.loads(line) for line in (tmp_path / "bench_model.jsonl").read_text().splitlines()]
    (step,) = [r for r in records if r.get("part") == "step"]
    assert [r["part"] for r in records if r.get("part") in ("train", "check")] == []
    assert step["model"] == ("ours (model compiled None)" if len(compiled) == 3 else "ours (layers compiled none)")
    assert len(step["back_to_back_ms"]) == 2 and all(t > 0 for t in step["back_to_back_ms"])
    assert step["step_ms"] > 0 and step["tokens_per_s"] == pytest.approx(2 * 64 / step["step_ms"] * 1e3, rel=1e-3)
    assert step["profile"]["kernel_ms"] > 0 and step["profile"]["top_kernels"]


def test_compile_modes_with_inductor_options():
    """A plain mode stays torch.compile's mode; options after "+" join the mode's own options (as torch.compile takes
    them, which keys its cache on them), and torch.compile rejects an unknown one by name."""
    bench = load_benchmark_script("bench_model")
    assert bench.compile_arguments(None) == {"mode": None}
    assert bench.compile_arguments("reduce-overhead") == {"mode": "reduce-overhead"}
    assert bench.compile_arguments("reduce-overhead+coordinate_descent_tuning") == {
        "options": {"triton.cudagraphs": True, "coordinate_descent_tuning": True}}
    assert bench.compile_arguments("default+coordinate_descent_tuning") == {
        "options": {"coordinate_descent_tuning": True}}
    with pytest.raises(RuntimeError, match="not_an_option"):
        torch.compile(torch.nn.Linear(2, 2), **bench.compile_arguments("default+not_an_option"))


def test_a_step_replayed_from_a_cuda_graph_needs_cuda():
    """--step-cuda-graph / --train-graph-compile-modes (`pretrain --cuda_graph`) on a CPU: a clear error before any
    model is built (tests/test_cuda_graph.py and test_pretrain.py run the graphed step on a GPU)."""
    bench = load_benchmark_script("bench_model")
    with pytest.raises(ValueError, match="needs a CUDA device, not cpu"):
        bench.training_step(None, "eager", {}, None, torch.device("cpu"), torch.float32, cuda_graph=True)

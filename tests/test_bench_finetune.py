"""benchmarks/bench_finetune.py: its pieces, and the whole `--small` run (tiny shapes on the CPU, ~20-40 s)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_finetune as bf  # noqa: E402
import bench_model as bm  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match")


def test_synthetic_tokenizer_maps_one_word_to_one_token():
    tokenizer = bf.synthetic_tokenizer(100)
    assert len(tokenizer) == 100
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    ids = tokenizer("w4 w99 w50 w4")["input_ids"]
    assert ids == [4, 99, 50, 4]
    assert tokenizer.decode(ids).split() == ["w4", "w99", "w50", "w4"]
    assert bf.even_share(["w4 w5", "w7"]) == [0.5, 0.0]


def test_hf_deepseek_v3_gets_the_same_lora_adapters_as_ours():
    """PEFT rewrites `*_proj` targets of transformers' deepseek_v3 onto the fused experts (v4 -> v5 conversion), which
    drops the shared experts' adapters; `exact_peft_targets` holds that off, so both models get the same adapters."""
    from peft import get_peft_model

    hf_cfg, our_cfg = bm.configs(bm.SMALL_MODEL)
    state = bm.random_state(bm.meta_model(hf_cfg, torch.float32), torch.device("cpu"))
    adapters = {}
    for name, cfg in (("hf", hf_cfg), ("ours", our_cfg)):
        model = bm.build(cfg, "grouped_mm", state, torch.device("cpu"), torch.float32)
        with bf.exact_peft_targets():
            peft_model = get_peft_model(model, bf.lora_config(model, full=False))
        adapters[name] = {n: tuple(p.shape) for n, p in peft_model.named_parameters() if p.requires_grad}
    assert adapters["hf"] == adapters["ours"]
    assert any(".shared_experts." in n for n in adapters["hf"])
    assert any(".mlp.experts." in n for n in adapters["hf"])


def test_report_divides_by_the_hf_row():
    bf.RECORDS.clear()
    bf.report("grpo", "case", {"hf": {"step_s": 2.0, "rollout_tokens_per_s": 100.0, "timed_steps": 2},
                               "ours": {"step_s": 0.5, "rollout_tokens_per_s": 400.0, "timed_steps": 2},
                               "broken": {"error": "RuntimeError: x"}})
    hf, ours, broken = bf.RECORDS
    assert hf["vs_hf"] == {"step_s": 1.0, "rollout_tokens_per_s": 1.0, "step_speedup": 1.0}
    assert ours["vs_hf"] == {"step_s": 0.25, "rollout_tokens_per_s": 4.0, "step_speedup": 4.0}
    assert broken["vs_hf"] == {}
    table = bf.markdown(dict(device="cpu", torch="t", transformers="tf", trl="trl", peft="p", dtype="d"))
    assert "| case | ours | 0.5 (0.25x) | 4.00x | 400 (4.00x) |" in table
    bf.RECORDS.clear()


@pytest.mark.slow
def test_small_run_measures_every_row(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHONUNBUFFERED="1")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_finetune.py"), "--small"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "bench_finetune.jsonl").read_text().splitlines()]
    env_record, rows = records[0], records[1:]
    assert env_record["part"] == "env" and env_record["device"] == "cpu"
    assert not [r for r in rows if "error" in r]
    got = {(r["part"], r["case"].split(" B")[0].split(",")[0], r["model"]) for r in rows}
    assert got == {("sft", "LoRA (preset all)", "hf"), ("sft", "LoRA (preset all)", "ours-fused"),
                   ("sft", "LoRA (preset all)", "ours-grouped_mm"), ("sft", "full fine-tune", "hf"),
                   ("sft", "full fine-tune", "ours-fused"), ("grpo", "LoRA", "hf"), ("grpo", "LoRA", "ours-fused"),
                   ("grpo", "LoRA", "ours-fused-graphs"), ("grpo", "LoRA", "ours-fused-aux")}
    for r in rows:
        anchor = next(a for a in rows if a["case"] == r["case"] and a["model"] == "hf")
        main = bf.MAIN[r["part"]]
        assert r[main] > 0 and r["vs_hf"][main] == pytest.approx(r[main] / anchor[main], rel=1e-2)
        assert r["trainable_params"] == anchor["trainable_params"]  # same adapters / same model
        if r["part"] == "sft":  # same weights and data: the same loss
            assert r["loss"] == pytest.approx(anchor["loss"], rel=1e-3)
        else:
            small = bf.SMALL["grpo"]
            assert r["completion_tokens_per_step"] == small["prompts"] * small["generations"] * small["completion_len"]
            assert r["rollout_tokens_per_s"] > 0 and r["aux_loss"] == r["model"].endswith("-aux")
    table = (tmp_path / "bench_finetune.md").read_text()
    assert "## sft" in table and "## grpo" in table and "ours-fused-aux" in table

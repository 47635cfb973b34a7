"""benchmarks/pretrain_runs.py: the commands it launches, its analysis and report on synthetic metrics, and a short
CPU dry run of the real thing (2-process DDP with and without expert parallelism, two concurrent balancing runs)."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from .helpers import assert_help_lists_every_option, load_benchmark_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "pretrain_runs.py"
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

driver = load_benchmark_script("pretrain_runs")


def test_help_lists_every_option():
    text = assert_help_lists_every_option(driver.build_parser())
    for name in ("--parts", "--small", "--scaling_gpus", "--scaling_runs", "--bias_update_speed", "--aux_loss_coef",
                 "--copy_run_files", "--balancing_gpus", "--equality_steps", "--skip_steps"):
        assert name in text


def test_scaling_layout_for_1_2_4_8_gpus():
    layout = driver.scaling_layout([1, 2, 4, 8])
    expected = {  # name: (kind, config, processes, expert parallel size, EP=1 baseline)
        "single": ("single", "single_gpu", 1, 1, None),
        "ddp": ("ddp", "ddp", 2, 1, None),
        "fsdp2": ("fsdp2", "fsdp2", 2, 1, None),
        "fsdp2_ep2": ("fsdp2_ep", "fsdp2_ep", 2, 2, "fsdp2"),
        "ddp_ep2": ("ddp_ep", "ddp", 2, 2, "ddp"),
        "ddp-4gpu": ("ddp", "ddp", 4, 1, None),
        "fsdp2-4gpu": ("fsdp2", "fsdp2", 4, 1, None),
        "fsdp2_ep4-4gpu": ("fsdp2_ep", "fsdp2_ep", 4, 4, "fsdp2-4gpu"),
        "ddp_ep4-4gpu": ("ddp_ep", "ddp", 4, 4, "ddp-4gpu"),
        "ddp-8gpu": ("ddp", "ddp", 8, 1, None),
        "fsdp2-8gpu": ("fsdp2", "fsdp2", 8, 1, None),
        "fsdp2_ep8-8gpu": ("fsdp2_ep", "fsdp2_ep", 8, 8, "fsdp2-8gpu"),
        "ddp_ep8-8gpu": ("ddp_ep", "ddp", 8, 8, "ddp-8gpu"),
        "eq_ep1-8gpu": ("eq", "ddp", 8, 1, None),
        "eq_ep8-8gpu": ("eq", "ddp", 8, 8, "eq_ep1-8gpu"),
    }
    assert {name: (item.kind, item.config, item.processes, item.expert_parallel_size, item.baseline)
            for name, item in layout.items()} == expected
    assert list(layout) == list(expected)  # reading order
    assert driver.launch_order(layout) == [
        "single", "ddp-8gpu", "fsdp2-8gpu", "fsdp2_ep8-8gpu", "ddp_ep8-8gpu", "eq_ep1-8gpu", "eq_ep8-8gpu",
        "ddp-4gpu", "fsdp2-4gpu", "fsdp2_ep4-4gpu", "ddp_ep4-4gpu", "ddp", "fsdp2", "fsdp2_ep2", "ddp_ep2"]
    assert layout["fsdp2_ep4-4gpu"].label == "FSDP2 + EP=4" and layout["eq_ep8-8gpu"].label == "DDP + EP=8, fp32"
    # One GPU count: no eq pair without a second GPU; N alone: no single run.
    assert list(driver.scaling_layout([1])) == ["single"]
    assert list(driver.scaling_layout([4])) == ["ddp-4gpu", "fsdp2-4gpu", "fsdp2_ep4-4gpu", "ddp_ep4-4gpu",
                                                "eq_ep1-4gpu", "eq_ep4-4gpu"]


def test_scaling_runs_select_kinds_and_names(tmp_path):
    def names(*argv):
        args = driver.parse_args(["--output_dir", str(tmp_path), *argv])
        return [run.key for run in driver.scaling_runs(args)]

    assert names("--scaling_gpus", "1,2,4", "--scaling_runs", "single,fsdp2,fsdp2_ep") == [
        "single", "fsdp2-4gpu", "fsdp2_ep4-4gpu", "fsdp2", "fsdp2_ep2"]
    assert names("--scaling_gpus", "4,1,2", "--scaling_runs", "eq,ddp_ep2") == ["eq_ep1-4gpu", "eq_ep4-4gpu",
                                                                               "ddp_ep2"]
    assert names("--scaling_runs", "ddp,ddp_ep2") == ["ddp", "ddp_ep2"]  # the two-GPU names still work
    for bad in (["--scaling_runs", "ddp-4gpu"], ["--scaling_gpus", "0,2"], ["--scaling_gpus", "two"]):
        with pytest.raises(SystemExit):
            names(*bad)


def test_gpu_commands(tmp_path, capsys):
    assert driver.main(["--output_dir", str(tmp_path / "out"), "--work_dir", str(tmp_path / "work"), "--list"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert list(lines) == ["scaling-single", "scaling-ddp", "scaling-fsdp2", "scaling-fsdp2_ep2", "scaling-ddp_ep2",
                           "scaling-eq_ep1", "scaling-eq_ep2", "balancing-loss_free-u0.001",
                           "balancing-loss_free-u0.01", "balancing-aux_loss", "balancing-none"]
    assert not (tmp_path / "out").exists()  # --list launches and writes nothing
    for name, command in lines.items():
        assert " -m accelerate.commands.launch --config_file " in command
        assert " -m modeling_moe.trainers.pretrain " in command
        assert "--experts_implementation" not in command  # the trainer's default: fused on a GPU
        assert "--save_final_model false" in command  # the runs' weights are not needed
        assert ("--profile_steps 10,11" in command) == (name in ("scaling-fsdp2_ep2", "scaling-ddp_ep2"))
    single = lines["scaling-single"]
    assert "single_gpu.yaml --num_processes 1 --mixed_precision bf16 --num_cpu_threads_per_process " in single
    assert "--gpu_ids 0 " in single and "--main_process_port" not in single
    assert "--torch_dtype bfloat16 --bf16" in single and "--logging_steps 1" in single
    assert "hidden_size=1024,intermediate_size=2816" in single and "--seq_len 2048" in single
    assert "--max_steps 20 " in single
    assert "ddp.yaml --num_processes 2" in lines["scaling-ddp_ep2"] and "--expert_parallel_size 2" in lines[
        "scaling-ddp_ep2"]
    assert "--gpu_ids 0,1 --main_process_port" in lines["scaling-ddp"]
    # FSDP2: fp32 weights under accelerate's bf16 policy (bf16 weights with EP break AdamW).
    for name in ("scaling-fsdp2", "scaling-fsdp2_ep2"):
        assert "--torch_dtype" not in lines[name] and " --bf16 " in lines[name]
    assert "fsdp2_ep.yaml" in lines["scaling-fsdp2_ep2"] and "--expert_parallel_size 2" in lines["scaling-fsdp2_ep2"]
    for name in ("scaling-eq_ep1", "scaling-eq_ep2"):
        assert "--mixed_precision no" in lines[name] and "--torch_dtype float32 --tf32 false" in lines[name]
        assert "--max_steps 10" in lines[name] and "--per_device_train_batch_size 2" in lines[name]
    assert "--expert_parallel_size" not in lines["scaling-eq_ep1"]
    # The balancing runs: one GPU each, round robin, the modes' overrides, same seed.
    gpus = [lines[name].split("--gpu_ids ")[1].split()[0] for name in lines if name.startswith("balancing")]
    assert gpus == ["0", "1", "0", "1"]
    assert "bias_update_speed=0.01,router_aux_loss_coef=0,seq_aux_loss_coef=0" in lines["balancing-loss_free-u0.01"]
    assert ("bias_update_speed=0,router_aux_loss_coef=0.001,output_router_logits=true,seq_aux_loss_coef=0"
            in lines["balancing-aux_loss"])
    assert "bias_update_speed=0,router_aux_loss_coef=0,seq_aux_loss_coef=0" in lines["balancing-none"]
    for name in lines:
        if name.startswith("balancing"):
            assert "--model_config moe-100m" in lines[name] and "--warmup_steps 15 " in lines[name]
            assert "--max_steps 150" in lines[name] and "--seed 42" in lines[name]
            assert "--max_eval_samples" not in lines[name]  # the whole held-out split


def test_small_balancing_runs_evaluate_a_slice_of_the_held_out_split(tmp_path, capsys):
    """On the CPU an evaluation of the whole held-out split (35k tokens against a 50k-token vocabulary) takes ~20 s, so
    the dry run's balancing runs evaluate its first 64 sequences, and say so in the summary."""
    driver.main(["--small", "--output_dir", str(tmp_path), "--list", "--parts", "balancing"])
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines and all("--eval_on_start --max_eval_samples 64" in command for command in lines.values())


def test_four_gpu_commands_of_the_named_model(tmp_path, capsys):
    driver.main(["--output_dir", str(tmp_path), "--list", "--parts", "scaling", "--scaling_gpus", "1,2,4",
                 "--scaling_model", "v2lite-8l", "--scaling_runs", "fsdp2_ep,eq"])
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert list(lines) == ["scaling-fsdp2_ep4-4gpu", "scaling-eq_ep1-4gpu", "scaling-eq_ep4-4gpu",
                           "scaling-fsdp2_ep2"]
    ep4 = lines["scaling-fsdp2_ep4-4gpu"]
    assert "fsdp2_ep.yaml --num_processes 4 " in ep4 and "--gpu_ids 0,1,2,3 " in ep4
    assert "--expert_parallel_size 4 --profile_steps 10,11" in ep4
    assert ("--model_config deepseek-v2-lite --config_overrides num_hidden_layers=8,vocab_size=50257,"
            "bos_token_id=50256,eos_token_id=50256 " in ep4)
    assert "--expert_parallel_size 4" in lines["scaling-eq_ep4-4gpu"]
    assert "--profile_steps" not in lines["scaling-eq_ep4-4gpu"]


def test_named_model_matches_the_tokenizer_and_v2_lite():
    """v2lite-8l: DeepSeek-V2-Lite's layer shapes, the GPT-2 tokenizer's vocabulary and ids, the size its comment
    states (fits one H200 with bf16 AdamW)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modeling_moe.presets import PRESETS, load_preset_config, preset_path
    from modeling_moe.trainers.pretrain import parse_config_overrides

    preset, overrides = driver.MODELS["v2lite-8l"]
    config = load_preset_config(preset, **parse_config_overrides(overrides))
    tokenizer = AutoTokenizer.from_pretrained(preset_path("tiny"))  # the trainer's tokenizer for this preset
    assert config.vocab_size == len(tokenizer) and config.eos_token_id == config.bos_token_id == tokenizer.eos_token_id
    v2 = PRESETS["deepseek-v2-lite"]
    for key in ("hidden_size", "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "moe_intermediate_size",
                "kv_lora_rank", "num_attention_heads", "scoring_func"):
        assert getattr(config, key) == v2[key], key
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    hidden, vocab = 2048, 50257
    attention = hidden * 16 * 192 + hidden * (512 + 64) + 512 + 512 * 16 * 256 + 16 * 128 * hidden + 2 * hidden
    expert = 3 * hidden * 1408
    moe = attention + 64 * hidden + 64 * expert + 2 * expert  # router, routed experts, 2 shared experts
    expected = 2 * vocab * hidden + hidden + attention + 3 * hidden * 10944 + 7 * moe  # 1 dense + 7 MoE layers
    total = sum(p.numel() for p in model.parameters())
    assert total == expected and round(total / 1e9, 2) == 4.38  # the comment's figure
    assert total * 8 < 40e9  # bf16 weights, gradients and two AdamW states: well inside one H200


def test_small_commands_use_torchrun_and_the_cpu(tmp_path, capsys):
    driver.main(["--small", "--output_dir", str(tmp_path), "--list", "--parts", "scaling", "--scaling_gpus", "1,2,4"])
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert "-m torch.distributed.run --standalone --nproc_per_node 2 -m modeling_moe.trainers.pretrain --use_cpu" in \
        lines["scaling-ddp"]
    assert "--nproc_per_node 4 -m modeling_moe.trainers.pretrain --use_cpu" in lines["scaling-ddp_ep4-4gpu"]
    assert "--expert_parallel_size 4 --profile_steps 4,5" in lines["scaling-ddp_ep4-4gpu"]
    assert f"--nproc_per_node 2 {SCRIPT} {driver.CPU_FSDP2_FLAG} --use_cpu" in lines["scaling-fsdp2_ep2"]
    assert "-m modeling_moe.trainers.pretrain --use_cpu --model_config tiny" in lines["scaling-single"]
    assert all("--torch_dtype float32" in command for command in lines.values())


def record(step, loss, tokens_per_second=None, maxvio=None, **extra):
    out = {"step": step, "loss": loss, "grad_norm": 1.0, "lr": 1e-4, "tokens_per_second": tokens_per_second,
           "mfu": None if tokens_per_second is None else tokens_per_second / 1e6, "maxvio": maxvio or [0.5, 0.5],
           "peak_memory_gib": 10.0 + step / 100, "epoch": step / 10, "tokens_seen": step * 1000}
    out.update(extra)
    return out


def write_metrics(folder: Path, records, config=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    (folder / "expert_load.png").write_bytes(b"png")
    (folder / "loss.png").write_bytes(b"png")


def test_throughput_medians_leave_out_warmup_and_profiled_steps():
    records = [record(s, 5.0, rate) for s, rate in ((1, 5), (2, 5), (3, 100), (4, 1), (5, 1), (6, 200))]
    records.append({"step": 5, "kind": "profile", "profile_steps": [4, 5], "all_to_all_share": 0.3,
                    "all_to_all_share_max": 0.4, "shares": {"all_to_all": 0.3, "other": 0.5}})
    stats = driver.throughput_stats(records, processes=2, skip_steps=2)
    assert stats["tokens_per_second"] == 150 and stats["tokens_per_second_per_gpu"] == 75  # steps 3 and 6
    assert stats["timed_steps"] == [3, 6] and stats["profiled_steps"] == [4, 5]
    assert stats["all_to_all_share"] == 0.3 and stats["all_to_all_share_max"] == 0.4
    assert driver.throughput_stats(records[:-1], processes=2, skip_steps=2)["tokens_per_second"] == 50.5


def test_analysis_and_report_on_synthetic_metrics(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    args = driver.parse_args(["--output_dir", str(out), "--work_dir", str(work), "--scaling_gpus", "1,2,4"])
    runs = driver.scaling_runs(args) + driver.balancing_runs(args)
    # Throughput, all GPUs together: 1 GPU 1000 tokens/s after warm-up; DDP 1900 over 2 GPUs (95%), FSDP2 1700 (85%),
    # DDP 3600 over 4 GPUs (90%), FSDP2 3200 (80%), ...
    rates = {"single": 1000, "ddp": 1900, "fsdp2": 1700, "fsdp2_ep2": 1600, "ddp_ep2": 1800, "ddp-4gpu": 3600,
             "fsdp2-4gpu": 3200, "fsdp2_ep4-4gpu": 2800, "ddp_ep4-4gpu": 3000, "eq_ep1-4gpu": 10, "eq_ep4-4gpu": 10}
    for run in runs:
        if run.part == "scaling":
            steps = 10 if run.kind == "eq" else 20
            profiled = "--profile_steps" in run.trainer_args
            offset = 1e-6 if run.key == "eq_ep4-4gpu" else (0.02 if run.expert_parallel_size > 1 else 0.0)
            # the first 8 steps are slow (warm-up) and must not count, nor the profiled steps 10 and 11
            records = [record(s, 10 - s / 10 + (offset if s > 1 else 0),
                              rates[run.key] * (0.1 if s <= 8 or (profiled and s in (10, 11)) else 1),
                              maxvio=[9.0, 9.5]) for s in range(1, steps + 1)]
            records[-1]["eval_loss"] = 6.0
            if profiled:
                share = 0.25 if run.processes == 4 else 0.125
                records.insert(11, {"step": 11, "kind": "profile", "profile_steps": [10, 11],
                                    "all_to_all_share": share, "all_to_all_share_max": 2 * share,
                                    "shares": {"all_to_all": share, "other_collectives": 0.05, "routed_experts": 0.4,
                                               "attention": 0.1, "gemm": 0.2, "other": 0.1}})
            write_metrics(work / run.name, records, config={"n_routed_experts": 64, "num_nextn_predict_layers": 0})
        else:
            final = {"loss_free-u0.001": [0.4, 0.6, 0.9], "loss_free-u0.01": [0.1, 0.12, 0.3],
                     "aux_loss": [1.0, 2.0, 0.5], "none": [9.0, 9.6, 9.0]}[run.name.removeprefix("balancing-")]
            eval_loss = {"aux_loss": 6.5, "none": 6.7}.get(run.key, 6.45)
            held_out = {"loss_free-u0.001": [0.2, 0.3], "loss_free-u0.01": [0.05, 0.07]}.get(
                run.name.removeprefix("balancing-"), [0.8, 0.9])  # MaxVio_global, decoder layers only
            # an evaluation at step 100 too: u=0.001's run is cut short there (its time limit), so the target
            # compares it with the aux-loss run at step 100, not at the aux-loss run's last evaluation
            at_100 = {"loss_free-u0.001": (6.9, [0.1, 0.12])}.get(run.name.removeprefix("balancing-"), (7.0, [1.0, 1.0]))
            records = [{"step": 0, "eval_loss": 10.8, "eval_maxvio": [9.0, 9.0]}] + [
                record(s, 8.0, 5e4, maxvio=[2.0, 2.0, 2.0], **(
                    {"eval_loss": at_100[0], "eval_maxvio": at_100[1]} if s == 100 else {}))
                for s in range(5, 150, 5)]
            if run.name != "balancing-loss_free-u0.001":
                records.append(record(150, 6.4, 5e4, maxvio=final, eval_loss=eval_loss, eval_maxvio=held_out))
            write_metrics(work / run.name, records, config={"n_routed_experts": 64, "num_nextn_predict_layers": 1})
        run.result.update(rc=0, wall_s=12.0, command="launch ...")
    by_name = {run.name: run for run in runs}
    by_name["scaling-fsdp2"].result["rc"] = 1  # "failed", with its log tail in the summary
    by_name["scaling-fsdp2"].result["log_tail"] = "RuntimeError: something"

    derived = driver.analyse(runs, args)
    single = by_name["scaling-single"].result
    assert single["tokens_per_second"] == 1000 and single["timed_steps"] == [9, 20]
    assert single["mfu"] == pytest.approx(1e-3) and single["peak_memory_gib"] == pytest.approx(10.2)
    assert by_name["scaling-fsdp2_ep4-4gpu"].result["tokens_per_second_per_gpu"] == 700  # profiled steps left out
    assert by_name["scaling-fsdp2_ep4-4gpu"].result["all_to_all_share"] == 0.25
    efficiency = {d["run"]: (d["gpus"], d["efficiency"], d["target"], d["meets_target"])
                  for d in derived if d["kind"] == "scaling_efficiency"}
    assert efficiency == {
        "scaling-ddp": (2, pytest.approx(0.95), 0.9, True),
        "scaling-fsdp2": (2, pytest.approx(0.85), 0.9, False),
        "scaling-fsdp2_ep2": (2, pytest.approx(0.8), None, None),
        "scaling-ddp_ep2": (2, pytest.approx(0.9), None, None),
        "scaling-ddp-4gpu": (4, pytest.approx(0.9), 0.85, True),
        "scaling-fsdp2-4gpu": (4, pytest.approx(0.8), 0.85, False),
        "scaling-fsdp2_ep4-4gpu": (4, pytest.approx(0.7), None, None),
        "scaling-ddp_ep4-4gpu": (4, pytest.approx(0.75), None, None)}
    equality = {d["ep"]: d for d in derived if d["kind"] == "ep_loss_equality"}
    assert set(equality) == {"scaling-eq_ep4-4gpu", "scaling-fsdp2_ep2", "scaling-ddp_ep2", "scaling-fsdp2_ep4-4gpu",
                             "scaling-ddp_ep4-4gpu"}
    eq = equality["scaling-eq_ep4-4gpu"]
    assert eq["ep1"] == "scaling-eq_ep1-4gpu" and eq["expert_parallel_size"] == 4 and eq["dtype"] == "fp32"
    assert eq["max_abs_loss_diff"] == pytest.approx(1e-6) and eq["per_step_abs_loss_diff"][0] == 0
    assert eq["steps"] == [1, 10]
    assert equality["scaling-ddp_ep4-4gpu"]["ep1"] == "scaling-ddp-4gpu"
    assert equality["scaling-ddp_ep2"]["max_abs_loss_diff"] == pytest.approx(0.02)
    assert equality["scaling-ddp_ep2"]["steps"] == [1, 10]  # only the first --equality_steps steps

    free = by_name["balancing-loss_free-u0.01"].result
    assert free["maxvio_mean"] == pytest.approx(0.11) and free["maxvio_max"] == pytest.approx(0.12)
    assert free["maxvio_mtp"] == [0.3] and free["final_eval_loss"] == 6.45 and free["first_eval_loss"] == 10.8
    assert free["maxvio_window"] == [146, 150]
    assert free["eval_maxvio_mean"] == pytest.approx(0.06) and free["eval_maxvio_max"] == 0.07
    targets = {d["run"]: d for d in derived if d["kind"] == "balancing_target"}
    assert targets["balancing-loss_free-u0.01"]["meets_target"] is True
    assert targets["balancing-loss_free-u0.01"]["eval_step"] == 150
    assert targets["balancing-loss_free-u0.01"]["eval_loss_minus_aux"] == pytest.approx(-0.05)
    cut = targets["balancing-loss_free-u0.001"]  # stopped at step 100: compared there
    assert cut["eval_step"] == 100 and cut["maxvio_global"] == pytest.approx(0.11)
    assert cut["eval_loss_minus_aux"] == pytest.approx(-0.1) and cut["meets_target"] is True
    assert cut["maxvio_batch"] == pytest.approx(2.0)

    written = driver.write_outputs(runs, derived, args, wall_s=100.0)
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and sorted(written) == files
    expected = {"summary.md", "results.jsonl"} | ({"scaling.png", "balancing.png"} if HAS_MATPLOTLIB else set())
    assert expected <= set(files)
    assert "balancing-loss_free-u0.01.expert_load.png" in files
    summary = (out / "summary.md").read_text()
    assert "| ddp | 2 | DDP | bf16 weights + AdamW | 1,900 | 950 | 95.0% (>= 90%) |" in summary
    assert "| fsdp2_ep4-4gpu | 4 | FSDP2 + EP=4 | fp32 master, bf16 compute | 2,800 | 700 | 70.0% | " in summary
    assert "| 25.0% | 8.0200 |" in summary  # the all-to-all share, then the final loss
    assert "| fsdp2_ep4-4gpu | 25.0% | 5.0% | 40.0% | 10.0% | 20.0% | 10.0% | 50.0% |" in summary  # the time's split
    assert "ddp-4gpu 90.0% (meets 85%)" in summary and "fsdp2-4gpu 80.0% (below 85%)" in summary
    assert "| eq_ep4-4gpu | eq_ep1-4gpu | 4 | fp32 | 1-10 | 1.00e-06 |" in summary
    # rows in reading order, whatever the launch order
    rows = [line.split(" | ")[0].removeprefix("| ") for line in summary.splitlines() if line.startswith("| ")]
    assert rows[1:12] == list(driver.scaling_layout([1, 2, 4]))  # after the header
    assert "fp32 master, bf16 compute" in summary and "FAILED (rc=1)" in summary
    assert "RuntimeError: something" in summary
    assert ("- balancing-loss_free-u0.01: MET at step 150, the last held-out evaluation of both runs (MaxVio_global "
            "0.06, held-out loss -0.0500 against the aux-loss run; MaxVio_batch 0.11 at the run's end)") in summary
    assert "| 0.06 / 0.07 | 0.11 / 0.12 |" in summary
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    kinds = [line["kind"] for line in lines]
    assert kinds.count("run") == len(runs) and kinds.count("profile") == 4
    assert kinds.count("metrics") + kinds.count("profile") == sum(len(r.result["records"]) for r in runs)
    assert {"scaling_efficiency", "ep_loss_equality", "balancing_target"} <= set(kinds)

    # A narrower copy pattern and a smaller file budget: the rest is listed as skipped.
    args.copy_run_files, args.max_output_files = "balancing-*/expert_load.png,scaling-ddp/loss.png", 4
    driver.write_outputs(runs, derived, args, wall_s=100.0)
    assert len(list(out.iterdir())) <= 4
    assert "Not copied (over --max_output_files 4)" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_balancing_over_seeds_pairs_each_seed_with_its_aux_loss_run(tmp_path):
    """--balancing_seeds: every mode once per seed (its own --seed and folder); each loss-free run is compared with
    the aux-loss run of its seed, and a line over the seeds gives the mean difference, its standard error and the
    mean MaxVio_global, the target judged on the means."""
    work, out = tmp_path / "work", tmp_path / "out"
    args = driver.parse_args(["--output_dir", str(out), "--work_dir", str(work), "--balancing_modes",
                              "loss_free,aux_loss", "--bias_update_speed", "0.001", "--balancing_seeds", "7,8,9"])
    runs = driver.balancing_runs(args)
    assert [r.name for r in runs] == [f"balancing-{m}-seed{s}" for s in (7, 8, 9) for m in ("loss_free", "aux_loss")]
    for run in runs:
        assert run.trainer_args[run.trainer_args.index("--seed") + 1] == str(run.seed)
        assert run.trainer_args[run.trainer_args.index("--output_dir") + 1] == str(work / run.name)
    # held-out loss at step 50: aux 7.0 at every seed; loss-free 7.0 + (0.01, -0.02, 0.04) by seed
    free_loss = {7: 7.01, 8: 6.98, 9: 7.04}
    for run in runs:
        loss = free_loss[run.seed] if run.kind == "loss_free" else 7.0
        maxvio = [0.1, 0.18] if run.kind == "loss_free" else [0.8, 0.8]
        write_metrics(work / run.name, [record(50, 6.5, 5e4, eval_loss=loss, eval_maxvio=maxvio)],
                      config={"n_routed_experts": 64, "num_nextn_predict_layers": 0})
        run.result.update(rc=0, wall_s=1.0, command="launch ...")
    derived = driver.analyse(runs, args)
    per_seed = {d["run"]: d for d in derived if d["kind"] == "balancing_target"}
    assert per_seed["balancing-loss_free-seed8"]["eval_loss_minus_aux"] == pytest.approx(-0.02)
    over = [d for d in derived if d["kind"] == "balancing_target_seeds"]
    assert len(over) == 1 and over[0]["variant"] == "balancing-loss_free" and over[0]["seeds"] == [7, 8, 9]
    diffs = [0.01, -0.02, 0.04]
    mean = sum(diffs) / 3
    se = (sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5 / 3 ** 0.5
    assert over[0]["eval_loss_minus_aux_mean"] == pytest.approx(mean)
    assert over[0]["eval_loss_minus_aux_se"] == pytest.approx(se)
    assert over[0]["maxvio_global_mean"] == pytest.approx(0.14) and over[0]["maxvio_ok"]
    assert not over[0]["eval_loss_ok"] and over[0]["eval_loss_not_measurably_worse"] and not over[0]["meets_target"]
    driver.write_outputs(runs, derived, args, wall_s=10.0)
    summary = (out / "summary.md").read_text()
    assert (f"- balancing-loss_free over seeds 7, 8, 9: NOT MET on the means (MaxVio_global 0.14; held-out loss "
            f"+{mean:.4f} ± {2 * se:.4f} (2 s.e. over the seeds, paired by seed) against the aux-loss runs: not "
            f"measurably worse)") in summary


def test_small_dry_run(tmp_path):
    """The driver end to end on the CPU: DDP and DDP + EP=2 (2 processes each; the latter profiled), then two
    concurrent balancing runs."""
    import subprocess

    out, work = tmp_path / "out", tmp_path / "work"
    command = [sys.executable, str(SCRIPT), "--small", "--output_dir", str(out), "--work_dir", str(work),
               "--scaling_gpus", "2", "--scaling_runs", "ddp,ddp_ep", "--scaling_steps", "4", "--skip_steps", "1",
               "--equality_steps", "3",
               "--balancing_modes", "loss_free,none", "--bias_update_speed", "0.01", "--balancing_steps", "4",
               "--balancing_eval_steps", "2", "--copy_run_files", "balancing-*/expert_load.png,scaling-ddp/loss.png"]
    # ~70 s alone on a 2-core machine: the limit leaves room for a busy one
    process = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    files = {p.name for p in out.iterdir()}
    assert {"summary.md", "results.jsonl", "balancing-loss_free.expert_load.png", "scaling-ddp.loss.png"} <= files
    assert len(files) <= 8
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    runs = {line["run"]: line for line in lines if line["kind"] == "run"}
    assert set(runs) == {"scaling-ddp", "scaling-ddp_ep2", "balancing-loss_free", "balancing-none"}
    assert all(line["rc"] == 0 for line in runs.values())
    assert runs["scaling-ddp"]["tokens_per_second"] > 0 and runs["scaling-ddp"]["steps"] == 4
    assert all(line["phase_seconds"]["first_step"] >= 0 for line in runs.values())  # each run's start-up phases
    equality = next(line for line in lines if line["kind"] == "ep_loss_equality")
    assert equality["steps"] == [1, 3] and equality["max_abs_loss_diff"] <= 1e-5  # float32 on the CPU
    # The expert-parallel run profiled steps 3-4 (left out of its median) on both ranks; gloo's all-to-alls count.
    ep = runs["scaling-ddp_ep2"]
    assert ep["profiled_steps"] == [3, 4] and ep["timed_steps"] == [2, 2]
    ranks = [json.loads((work / "scaling-ddp_ep2" / "profile" / f"rank{r}.json").read_text()) for r in (0, 1)]
    shares = [rank["categories"]["all_to_all"]["share"] for rank in ranks]
    assert all(share > 0 for share in shares)
    assert ep["all_to_all_share"] == pytest.approx(sum(shares) / 2) and ep["all_to_all_share_max"] == max(shares)
    assert runs["scaling-ddp"]["profiled_steps"] is None
    balancing = runs["balancing-loss_free"]
    assert balancing["final_eval_loss"] is not None and balancing["maxvio_mean"] is not None
    assert balancing["eval_maxvio_mean"] is not None
    assert balancing["maxvio_mtp"] is not None  # the tiny preset's MTP router, apart
    assert not list(work.glob("*/*.safetensors"))  # no weights saved
    assert "### Where the time goes (profiled steps 3-4)" in (out / "summary.md").read_text()
    assert "summed over the first 64 held-out sequences at the final evaluation" in (out / "summary.md").read_text()
    summary = (out / "summary.md").read_text()
    assert "## Scaling" in summary and "## Load balancing" in summary


def test_failure_excerpt_leads_with_the_worker_exception(tmp_path):
    """A failed run's summary shows the worker's traceback (torchrun prefixes its lines with the rank), not only the
    launcher's final "ChildFailedError"."""
    log = tmp_path / "launcher.log"
    log.write_text("\n".join([
        "loading", "[rank1]: Traceback (most recent call last):", '[rank1]:   File "pretrain.py", line 9, in main',
        "[rank0]: interleaved", "[rank1]:     step()", "[rank1]: RuntimeError: expected dtype BFloat16", "teardown",
        "Traceback (most recent call last):", '  File "run.py", line 1', "ChildFailedError: pretrain FAILED",
    ]))
    excerpt = driver._tail(log, lines=3).splitlines()
    assert excerpt[0] == "[rank1]: Traceback (most recent call last):"
    assert excerpt[excerpt.index("...") - 1] == "[rank1]: RuntimeError: expected dtype BFloat16"
    assert excerpt[-1] == "ChildFailedError: pretrain FAILED"

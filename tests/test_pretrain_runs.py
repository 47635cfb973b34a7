"""benchmarks/pretrain_runs.py: the commands it launches, its analysis and report on synthetic metrics, and a short
CPU dry run of the real thing (2-process DDP with and without expert parallelism, two concurrent balancing runs)."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "pretrain_runs.py"
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def load_driver():
    spec = importlib.util.spec_from_file_location("pretrain_runs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["pretrain_runs"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


driver = load_driver()


def test_help_lists_every_option():
    parser = driver.build_parser()
    text = parser.format_help()
    for action in parser._actions:
        for option in action.option_strings:
            assert option in text
    for name in ("--parts", "--small", "--scaling_runs", "--bias_update_speed", "--aux_loss_coef",
                 "--copy_run_files", "--balancing_gpus", "--equality_steps", "--skip_steps"):
        assert name in text


def test_gpu_commands(tmp_path, capsys):
    assert driver.main(["--output_dir", str(tmp_path / "out"), "--work_dir", str(tmp_path / "work"), "--list"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert list(lines) == [f"scaling-{name}" for name in driver.SCALING_RUNS] + [
        "balancing-loss_free-u0.001", "balancing-loss_free-u0.01", "balancing-aux_loss", "balancing-none"]
    assert not (tmp_path / "out").exists()  # --list launches and writes nothing
    for name, command in lines.items():
        assert " -m accelerate.commands.launch --config_file " in command
        assert " -m modeling_moe.trainers.pretrain " in command
        assert "--experts_implementation" not in command  # the trainer's default: fused on a GPU
    single = lines["scaling-single"]
    assert "single_gpu.yaml --num_processes 1 --mixed_precision bf16 --gpu_ids 0" in single
    assert "--torch_dtype bfloat16 --bf16" in single and "--logging_steps 1" in single
    assert "hidden_size=1024,intermediate_size=2816" in single and "--seq_len 2048" in single
    assert "ddp.yaml --num_processes 2" in lines["scaling-ddp_ep2"] and "--expert_parallel_size 2" in lines[
        "scaling-ddp_ep2"]
    # FSDP2: fp32 weights under accelerate's bf16 policy (bf16 weights with EP break AdamW).
    for name in ("scaling-fsdp2", "scaling-fsdp2_ep2"):
        assert "--torch_dtype" not in lines[name] and " --bf16 " in lines[name]
    assert "fsdp2_ep.yaml" in lines["scaling-fsdp2_ep2"] and "--expert_parallel_size 2" in lines["scaling-fsdp2_ep2"]
    for name in ("scaling-eq_ep1", "scaling-eq_ep2"):
        assert "--mixed_precision no" in lines[name] and "--torch_dtype float32 --tf32 false" in lines[name]
        assert "--max_steps 10" in lines[name] and "--per_device_train_batch_size 4" in lines[name]
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


def test_small_commands_use_torchrun_and_the_cpu(tmp_path, capsys):
    driver.main(["--small", "--output_dir", str(tmp_path), "--list", "--parts", "scaling"])
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert "-m torch.distributed.run --standalone --nproc_per_node 2 -m modeling_moe.trainers.pretrain --use_cpu" in \
        lines["scaling-ddp"]
    assert f"{SCRIPT} {driver.CPU_FSDP2_FLAG} --use_cpu" in lines["scaling-fsdp2_ep2"]
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


def test_analysis_and_report_on_synthetic_metrics(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    args = driver.parse_args(["--output_dir", str(out), "--work_dir", str(work)])
    runs = driver.scaling_runs(args) + driver.balancing_runs(args)
    # Throughput: 1 GPU 1000 tokens/s after warm-up; DDP 1900 over 2 GPUs (95%), FSDP2 1700 (85%), ...
    rates = {"single": 1000, "ddp": 1900, "fsdp2": 1700, "fsdp2_ep2": 1600, "ddp_ep2": 1800, "eq_ep1": 10, "eq_ep2": 10}
    for run in runs:
        if run.part == "scaling":
            steps = 10 if run.key.startswith("eq_") else 40
            offset = 1e-6 if run.key == "eq_ep2" else (0.02 if run.expert_parallel_size > 1 else 0.0)
            # the first 10 steps are slow (warm-up) and must not count
            records = [record(s, 10 - s / 10 + (offset if s > 1 else 0), rates[run.key] * (0.1 if s <= 10 else 1),
                              maxvio=[9.0, 9.5]) for s in range(1, steps + 1)]
            records[-1]["eval_loss"] = 6.0
            write_metrics(work / run.name, records, config={"n_routed_experts": 64, "num_nextn_predict_layers": 0})
        else:
            final = {"loss_free-u0.001": [0.4, 0.6, 0.9], "loss_free-u0.01": [0.1, 0.12, 0.3],
                     "aux_loss": [1.0, 2.0, 0.5], "none": [9.0, 9.6, 9.0]}[run.name.removeprefix("balancing-")]
            eval_loss = {"aux_loss": 6.5, "none": 6.7}.get(run.key, 6.45)
            records = [{"step": 0, "eval_loss": 10.8}] + [record(s, 8.0, 5e4, maxvio=[2.0, 2.0, 2.0])
                                                          for s in range(5, 150, 5)]
            records.append(record(150, 6.4, 5e4, maxvio=final, eval_loss=eval_loss))
            write_metrics(work / run.name, records, config={"n_routed_experts": 64, "num_nextn_predict_layers": 1})
        run.result.update(rc=0, wall_s=12.0, command="launch ...")
    runs[2].result["rc"] = 1  # fsdp2 "failed", with its log tail in the summary
    runs[2].result["log_tail"] = "RuntimeError: something"

    derived = driver.analyse(runs, args)
    by_name = {run.name: run for run in runs}
    single = by_name["scaling-single"].result
    assert single["tokens_per_second"] == 1000 and single["timed_steps"] == [11, 40]
    assert single["mfu"] == pytest.approx(1e-3) and single["peak_memory_gib"] == pytest.approx(10.4)
    efficiency = {d["run"]: d["efficiency"] for d in derived if d["kind"] == "scaling_efficiency"}
    assert efficiency == pytest.approx({"scaling-ddp": 0.95, "scaling-fsdp2": 0.85, "scaling-fsdp2_ep2": 0.8,
                                        "scaling-ddp_ep2": 0.9})
    equality = {d["ep2"]: d for d in derived if d["kind"] == "ep_loss_equality"}
    assert equality["scaling-eq_ep2"]["max_abs_loss_diff"] == pytest.approx(1e-6)
    assert equality["scaling-eq_ep2"]["per_step_abs_loss_diff"][0] == 0
    assert equality["scaling-eq_ep2"]["steps"] == [1, 10] and equality["scaling-eq_ep2"]["dtype"] == "fp32"
    assert equality["scaling-ddp_ep2"]["max_abs_loss_diff"] == pytest.approx(0.02)
    assert equality["scaling-ddp_ep2"]["steps"] == [1, 10]  # only the first --equality_steps steps

    free = by_name["balancing-loss_free-u0.01"].result
    assert free["maxvio_mean"] == pytest.approx(0.11) and free["maxvio_max"] == pytest.approx(0.12)
    assert free["maxvio_mtp"] == [0.3] and free["final_eval_loss"] == 6.45 and free["first_eval_loss"] == 10.8
    assert free["maxvio_window"] == [146, 150]
    targets = {d["run"]: d for d in derived if d["kind"] == "balancing_target"}
    assert targets["balancing-loss_free-u0.01"]["meets_target"] is True
    assert targets["balancing-loss_free-u0.001"]["meets_target"] is False  # MaxVio 0.5
    assert targets["balancing-loss_free-u0.01"]["eval_loss_minus_aux"] == pytest.approx(-0.05)

    written = driver.write_outputs(runs, derived, args, wall_s=100.0)
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and sorted(written) == files
    expected = {"summary.md", "results.jsonl"} | ({"scaling.png", "balancing.png"} if HAS_MATPLOTLIB else set())
    assert expected <= set(files)
    assert "balancing-loss_free-u0.01.expert_load.png" in files
    summary = (out / "summary.md").read_text()
    assert "| ddp | DDP | bf16 weights + AdamW | 1,900 | 950 | 95.0% |" in summary
    assert "fp32 master, bf16 compute" in summary and "FAILED (rc=1)" in summary
    assert "RuntimeError: something" in summary
    assert "- balancing-loss_free-u0.01: MET (MaxVio 0.110, held-out loss -0.0500 against the aux-loss run)" in summary
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    kinds = [line["kind"] for line in lines]
    assert kinds.count("run") == len(runs) and kinds.count("metrics") == sum(len(r.result["records"]) for r in runs)
    assert {"scaling_efficiency", "ep_loss_equality", "balancing_target"} <= set(kinds)

    # A narrower copy pattern and a smaller file budget: the rest is listed as skipped.
    args.copy_run_files, args.max_output_files = "balancing-*/expert_load.png,scaling-ddp/loss.png", 4
    driver.write_outputs(runs, derived, args, wall_s=100.0)
    assert len(list(out.iterdir())) <= 4
    assert "Not copied (over --max_output_files 4)" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_small_dry_run(tmp_path):
    """The driver end to end on the CPU: DDP and DDP + EP=2 (2 processes each), then two concurrent balancing runs."""
    import subprocess

    out, work = tmp_path / "out", tmp_path / "work"
    command = [sys.executable, str(SCRIPT), "--small", "--output_dir", str(out), "--work_dir", str(work),
               "--scaling_runs", "ddp,ddp_ep2", "--scaling_steps", "3", "--skip_steps", "1", "--equality_steps", "3",
               "--balancing_modes", "loss_free,none", "--bias_update_speed", "0.01", "--balancing_steps", "4",
               "--balancing_eval_steps", "2", "--copy_run_files", "balancing-*/expert_load.png,scaling-ddp/loss.png"]
    process = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    files = {p.name for p in out.iterdir()}
    assert {"summary.md", "results.jsonl", "balancing-loss_free.expert_load.png", "scaling-ddp.loss.png"} <= files
    assert len(files) <= 8
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    runs = {line["run"]: line for line in lines if line["kind"] == "run"}
    assert set(runs) == {"scaling-ddp", "scaling-ddp_ep2", "balancing-loss_free", "balancing-none"}
    assert all(line["rc"] == 0 for line in runs.values())
    assert runs["scaling-ddp"]["tokens_per_second"] > 0 and runs["scaling-ddp"]["steps"] == 3
    equality = next(line for line in lines if line["kind"] == "ep_loss_equality")
    assert equality["steps"] == [1, 3] and equality["max_abs_loss_diff"] <= 1e-5  # float32 on the CPU
    balancing = runs["balancing-loss_free"]
    assert balancing["final_eval_loss"] is not None and balancing["maxvio_mean"] is not None
    assert balancing["maxvio_mtp"] is not None  # the tiny preset's MTP router, apart
    assert not list(work.glob("*/*.safetensors"))  # weights deleted after each run
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

"""The accelerate pretraining loop (`modeling_moe.trainers.pretrain`) on the CPU with the tiny preset.

Single-process runs call `main()` in this process; the SIGKILL test and the 2-process runs (gloo: DDP, expert
parallel, resume, FSDP2 + expert parallel) use subprocesses. Short sequences keep every run to seconds.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from modeling_moe.trainers.data import DatasetReadError, load_documents
from modeling_moe.trainers.pretrain import (
    KILL_DURING_SAVE_ENV,
    ConfigurationError,
    build_optimizer,
    build_parser,
    main,
    parse_args,
    parse_config_overrides,
)

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
# On the CPU also where a GPU is present: the losses these tests compare are bitwise only there.
TINY = [
    "--use_cpu", "--model_config", "tiny", "--seq_len", "32", "--per_device_train_batch_size", "2",
    "--logging_steps", "1", "--max_eval_samples", "8", "--learning_rate", "3e-3", "--warmup_steps", "2",
    "--disable_tqdm",
]
ON_GPU = [arg for arg in TINY if arg != "--use_cpu"]  # the gpu tests


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One tokenized copy of the embedded corpus for every run of the session."""
    return str(tmp_path_factory.mktemp("tokenized-cache"))


def read_metrics(folder) -> list[dict]:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(folder) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(folder) if "loss" in r]


def run(output_dir, data_cache, *extra) -> dict:
    return main([*TINY, "--data_cache_dir", data_cache, "--output_dir", str(output_dir), *extra])


def short_documents(path) -> str:
    """A .jsonl file of documents of 1 to 40 words: the first token of each is not predicted, so blocks of the same
    length hold uneven numbers of predicted tokens."""
    import random

    rng = random.Random(0)
    words = "the cat sat on a mat while dogs ran over hills and rivers under grey skies".split()
    lengths = [rng.choice([1, 2, 3, 40]) for _ in range(400)]
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(n))}) + "\n"
                            for n in lengths))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    """30 steps of 4 x 32 tokens on the embedded corpus, evaluated before the first step and at steps 15 and 30."""
    output_dir = tmp_path_factory.mktemp("pretrain-30-steps")
    summary = run(output_dir, data_cache, "--max_steps", "30", "--eval_steps", "15", "--save_steps", "0",
                  "--eval_on_start", "--per_device_train_batch_size", "4", "--learning_rate", "5e-3")
    return output_dir, summary


def test_single_process_writes_metrics_plots_and_model(trained):
    output_dir, summary = trained
    records = read_metrics(output_dir)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 31))
    for record in train_records:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_second", "mfu", "maxvio"} <= set(record)
        assert len(record["maxvio"]) == 3  # two MoE decoder layers and the MTP layer
        assert record["mfu"] is None  # no peak FLOP/s known for a CPU
        assert record["tokens_per_second"] > 0
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 15, 30]
    assert all(len(r["eval_maxvio"]) == 2 for r in records if "eval_loss" in r)  # the decoder's MoE layers
    assert summary["final_eval_loss"] == records[-1]["eval_loss"]
    assert summary["global_step"] == 30 and summary["tokens_seen"] == 30 * 4 * 32
    phases = summary["phase_seconds"]  # where the start-up went, in the order the run went through it
    assert list(phases) == ["setup", "data", "model", "prepare", "before_first_step", "first_step", "training"]
    assert all(seconds >= 0 for seconds in phases.values())

    for name in ("config.json", "model.safetensors", "modeling_moe.py", "tokenizer.json", "pretrain_summary.json"):
        assert (output_dir / name).is_file(), name
    if HAS_MATPLOTLIB:
        for name in ("loss.png", "expert_load.png"):
            assert (output_dir / name).stat().st_size > 5000, name


def test_held_out_loss_and_maxvio_are_those_of_the_whole_set(capsys):
    """evaluate(): the token-weighted cross-entropy over every held-out block, and per MoE layer the MaxVio of the
    loads the experts received (captured at their input) summed over the set, with an uneven last batch; a progress
    bar when asked."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from modeling_moe.trainers.pretrain import evaluate
    from tests.helpers import seeded_model, small_config

    config = small_config(num_hidden_layers=3, first_k_dense_replace=1)
    model = seeded_model(config, dtype=torch.float32)
    ids = torch.randint(3, 97, (5, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = -100
    blocks = [{"input_ids": i, "labels": l} for i, l in zip(ids, labels)]
    received = {}
    for layer in model.model.layers:
        if layer.is_moe:
            layer.mlp.experts.register_forward_pre_hook(lambda module, args, layer=layer: received.setdefault(
                layer, []).append(torch.bincount(args[1].flatten(), minlength=config.n_routed_experts)))
    accelerator = Accelerator(cpu=True)
    metrics = evaluate(model, accelerator.prepare(DataLoader(blocks, batch_size=2)), accelerator, progress=True)
    assert "evaluating" in capsys.readouterr().err
    loss, maxvio = metrics["eval_loss"], metrics["eval_maxvio"]

    assert len(received) == 2 and all(len(counts) == 3 for counts in received.values())
    for layer_maxvio, counts in zip(maxvio, received.values()):
        load = torch.stack(counts).sum(dim=0).double()
        assert layer_maxvio == pytest.approx(((load.max() - load.mean()) / load.mean()).item(), abs=1e-4)
    with torch.no_grad():
        logits = model(ids).logits.double()
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_loss_falls_over_30_steps(trained):
    output_dir, summary = trained
    curve = [loss for _, loss in losses(output_dir)]
    assert curve[0] > math.log(50257) - 0.5  # starts near uniform over the GPT-2 vocabulary
    assert sum(curve[-5:]) / 5 < curve[0] - 1.5
    evals = summary["eval_losses"]
    assert evals[0][0] == 0 and evals[-1][1] < evals[0][1] - 1.5


def test_saved_model_loads_like_a_hub_checkpoint(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output_dir, _ = trained
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    for trust_remote_code in (False, True):
        model = AutoModelForCausalLM.from_pretrained(output_dir, trust_remote_code=trust_remote_code).eval()
        inputs = tokenizer("The history of", return_tensors="pt")
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert generated.shape[1] == inputs["input_ids"].shape[1] + 3
    # The aux-loss-free balancing moved the biases, and they were saved.
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() > 0


def test_resume_after_sigkill_during_save_is_bitwise(tmp_path, data_cache):
    # 8 training blocks = 4 batches per epoch: the resumed part also crosses an epoch boundary. Logging every 2 steps,
    # the checkpoint at step 3 cuts the window of steps 3-4, which the resumed run continues.
    extra = ["--max_steps", "6", "--save_steps", "3", "--max_train_samples", "8", "--eval_steps", "3",
             "--logging_steps", "2"]
    reference = run(tmp_path / "reference", data_cache, *extra)

    killed_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "modeling_moe.trainers.pretrain", *TINY, "--data_cache_dir", data_cache,
               "--output_dir", str(killed_dir), *extra]
    env = {**os.environ, KILL_DURING_SAVE_ENV: "6"}
    process = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == -9, process.stderr[-3000:]
    assert sorted(p.name for p in killed_dir.iterdir() if "checkpoint" in p.name) == [".tmp-checkpoint-6",
                                                                                      "checkpoint-3"]

    resumed = run(killed_dir, data_cache, *extra, "--resume_from_checkpoint", "latest")
    assert resumed["resumed_from"].endswith("checkpoint-3")
    def without_throughput(records):
        return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in records]

    # Every logged value but the throughput is bitwise identical.
    assert without_throughput(read_metrics(killed_dir)) == without_throughput(read_metrics(tmp_path / "reference"))
    assert resumed["final_eval_loss"] == reference["final_eval_loss"]
    assert resumed["maxvio"] == reference["maxvio"]
    state = json.loads((killed_dir / "checkpoint-6" / "trainer_state.json").read_text())
    reference_state = json.loads((tmp_path / "reference" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["total_load"] == reference_state["total_load"]  # the expert load of the whole run
    assert not (killed_dir / ".tmp-checkpoint-6").exists()
    assert [p.name for p in sorted(killed_dir.glob("checkpoint-*"))] == ["checkpoint-3", "checkpoint-6"]

    from safetensors.torch import load_file

    expected, got = load_file(tmp_path / "reference" / "model.safetensors"), load_file(killed_dir / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


DISTRIBUTED_DRIVER = textwrap.dedent(
    """
    import json, os, sys
    import torch.distributed as dist
    from modeling_moe.trainers.pretrain import main

    out, common = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")  # kept across the runs below (main leaves a caller's process group alone)

    # The expert-parallel layer alone, against the unsharded one, with every token routed to rank 0's experts:
    # rank 1's experts get nothing (the eager implementation then skips them), yet both ranks' backwards must still
    # meet in the all-to-alls.
    import torch
    from modeling_moe import MoEConfig
    from modeling_moe.modeling_moe import MoEExperts
    from modeling_moe.trainers.expert_parallel import ExpertParallel

    rank = dist.get_rank()
    for implementation in ("eager", "grouped_mm"):
        config = MoEConfig(hidden_size=16, moe_intermediate_size=8, n_routed_experts=8, num_experts_per_tok=2,
                           num_attention_heads=2, experts_implementation=implementation)
        reference = MoEExperts(config)
        torch.nn.init.normal_(reference.gate_up_proj, std=0.1, generator=torch.Generator().manual_seed(0))
        torch.nn.init.normal_(reference.down_proj, std=0.1, generator=torch.Generator().manual_seed(1))
        sharded = MoEExperts(config)
        sharded.load_state_dict(reference.state_dict())
        ExpertParallel(2, "cpu").shard(torch.nn.ModuleDict({"experts": sharded}))
        generator = torch.Generator().manual_seed(rank)
        x = torch.randn(5, 16, generator=generator, requires_grad=True)
        index = torch.stack([torch.randperm(4, generator=generator)[:2] for _ in range(5)])
        weights = torch.rand(5, 2, generator=generator, requires_grad=True)
        expected = reference(x, index, weights)
        expected.square().sum().backward()
        expected_grads = x.grad, weights.grad
        x.grad = weights.grad = None
        got = sharded(x, index, weights)
        got.square().sum().backward()
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close((x.grad, weights.grad), expected_grads)
    main([*common, "--output_dir", out + "/ddp"])
    main([*common, "--output_dir", out + "/ddp-unclipped", "--max_grad_norm", "0"])
    main([*common, "--output_dir", out + "/ep2", "--expert_parallel_size", "2"])
    main([*common, "--output_dir", out + "/ep2-resumed", "--expert_parallel_size", "2",
          "--resume_from_checkpoint", out + "/ep2/checkpoint-2"])

    # FSDP2 + expert parallel: accelerate only offers FSDP on accelerators, so force its FSDP2 path on these CPU
    # processes (a test harness; on GPUs `accelerate launch --config_file trainers/accelerate_configs/fsdp2_ep.yaml`).
    sys.path.insert(0, os.environ["MOE_BENCHMARKS_DIR"])
    from pretrain_runs import forced_cpu_fsdp2

    with forced_cpu_fsdp2():
        main([*common, "--output_dir", out + "/fsdp2-ep2", "--expert_parallel_size", "2", "--max_grad_norm", "0"])
    dist.destroy_process_group()
    """
)


TWO_PROCESS_FLAGS = ["--max_steps", "4", "--save_steps", "2", "--max_train_samples", "40"]


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("two-processes")
    driver = out / "driver.py"
    driver.write_text(DISTRIBUTED_DRIVER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(driver), str(out), *TINY, "--data_cache_dir", data_cache, *TWO_PROCESS_FLAGS,
               "--dataset", short_documents(out / "short.jsonl")]
    benchmarks = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    # On the CPU (gloo) also on a machine with GPUs: accelerate's barrier would take a GPU per process.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOE_BENCHMARKS_DIR": benchmarks, "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400, cwd=out)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-6000:]
    return out


def test_idle_gaps_count_overlapping_kernels_once():
    from modeling_moe.trainers.profiling import idle_gaps

    # us: a [0, 10), b [5, 12) overlapping it (another stream), then c after a 8 us gap, d after a 3 us gap
    host = [(0, 40, "step"), (13, 19, "optimizer"), (14, 17, "launch"), (22, 29, "other")]
    summary = idle_gaps([(20, 25, "c"), (0, 10, "a"), (5, 12, "b"), (28, 30, "d")], top=1, host_ops=host)
    assert summary["busy_s"] == pytest.approx(19e-6)  # 0-12, 20-25, 28-30
    assert summary["idle_between_kernels_s"] == pytest.approx(11e-6)
    assert summary["longest_gaps"] == [{"gap_us": 8.0, "after": "b", "before": "c", "host_outer": "step",
                                        "host_inner": "launch"}]  # the gap's middle: 16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_annotated_ranges_are_not_counted_as_kernels(tmp_path):
    """`record_function` ranges (the optimizer's `Optimizer.step#...`) also appear on the GPU's timeline: only the
    kernels inside count."""
    from modeling_moe.trainers.profiling import StepProfiler

    profiler = StepProfiler((0, 0), tmp_path, 0, torch.device("cuda"), top=50)
    x = torch.randn(2048, 2048, device="cuda")
    profiler.start_if(0)
    with torch.profiler.record_function("an_annotated_range"):
        for _ in range(4):
            x = x @ x / 2048
    summary = profiler.stop_if(0)
    names = [k["name"] for k in summary["top_kernels"]]
    assert names and not any("an_annotated_range" in name for name in names)
    assert summary["device_time_s"] == pytest.approx(summary["device"]["busy_s"], rel=0.05)  # one stream


def test_time_by_category_on_synthetic_events():
    from modeling_moe.trainers.profiling import parse_profile_steps, time_by_category

    events = [
        ("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", 0.20),  # NCCL's all_to_all_single
        ("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", 0.10),
        ("gloo:all_to_all", 0.01),
        ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 0.05),
        ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 0.04),
        ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 0.01),
        ("_gemm1_swiglu_kernel", 0.10),
        ("_grouped_gemm_kernel", 0.08),
        ("_dgrad_h_kernel", 0.03),
        ("_grouped_wgrad_kernel", 0.04),
        ("aten::_grouped_mm > aten::mm", 0.02),  # a GEMM inside the experts' grouped_mm (CPU)
        ("_FusedMoEDownNodeBackward > void at::native::vectorized_gather_kernel<16, int>", 0.01),  # eager fused node
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<192, 128, 64, 4, cutlass::bfloat16_t>>", 0.04),
        ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x128_4x1x1_kernel0_0", 0.03),
        ("fmha_cutlassB_f32_aligned_64x64_k64_sm80", 0.01),
        ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NTN", 0.06),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_kernel__5x_cublas",
         0.05),
        ("aten::mm", 0.01),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", 0.03, 7),  # 7 summed
        ("Memcpy HtoD (Pageable -> Device)", 0.01),
        ("aten::broadcast_tensors", 0.01),  # not a collective
    ]
    summary = time_by_category(events, wall_s=2.0, top=3)
    fill = time_by_category(events, wall_s=2.0, top=30)["top_kernels"]
    assert [k["calls"] for k in fill if "FillFunctor" in k["name"]] == [7]
    expected = {"all_to_all": 0.31, "other_collectives": 0.10, "routed_experts": 0.28, "attention": 0.08,
                "gemm": 0.12, "other": 0.05}
    assert {name: value["time_s"] for name, value in summary["categories"].items()} == pytest.approx(expected)
    assert {name: value["share"] for name, value in summary["categories"].items()} == pytest.approx(
        {name: seconds / 2.0 for name, seconds in expected.items()})
    assert summary["device_time_s"] == pytest.approx(0.94) and summary["wall_s"] == 2.0
    top = [(k["name"], k["category"], k["calls"]) for k in summary["top_kernels"]]
    assert top == [("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", "all_to_all", 2),
                   ("_gemm1_swiglu_kernel", "routed_experts", 1), ("_grouped_gemm_kernel", "routed_experts", 1)]
    assert summary["top_kernels"][0]["time_s"] == pytest.approx(0.3)

    assert parse_profile_steps("12,14") == (12, 14) and parse_profile_steps("12") == (12, 12)
    assert parse_profile_steps(None) is None and parse_profile_steps("") is None
    for bad in ("3-5", "5,3", "0,2", "a,b", "1,2,3"):
        with pytest.raises(ValueError, match="expected FIRST,LAST"):
            parse_profile_steps(bad)


def test_profiled_run_writes_a_consistent_summary(tmp_path, data_cache):
    import gzip

    summary = run(tmp_path, data_cache, "--max_steps", "3", "--profile_steps", "2,3", "--profile_trace",
                  "--save_steps", "0", "--save_final_model", "false")
    profile = json.loads((tmp_path / "profile" / "rank0.json").read_text())
    assert profile["steps"] == [2, 3] and profile["time_source"] == "CPU op self time"
    assert profile["wall_s"] > 0 and profile["step_wall_s"] == pytest.approx(profile["wall_s"] / 2)
    categories = profile["categories"]
    assert sum(c["time_s"] for c in categories.values()) == pytest.approx(profile["device_time_s"])
    for value in categories.values():
        assert value["share"] == pytest.approx(value["time_s"] / profile["wall_s"])
    assert 0 < sum(c["share"] for c in categories.values()) <= 1 + 1e-6  # one thread: self times do not overlap
    assert categories["all_to_all"]["time_s"] == categories["other_collectives"]["time_s"] == 0  # one process
    for name in ("routed_experts", "attention", "gemm"):  # grouped_mm experts, SDPA, projections and head
        assert categories[name]["time_s"] > 0, name
    times = [k["time_s"] for k in profile["top_kernels"]]
    assert 0 < len(times) <= 15 and times == sorted(times, reverse=True)

    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    line = [r for r in records if r.get("kind") == "profile"]
    assert len(line) == 1 and line[0]["step"] == 3 and line[0]["profile_steps"] == [2, 3]
    assert line[0]["shares"] == {name: value["share"] for name, value in categories.items()}
    assert line[0]["all_to_all_share"] == 0 and summary["profile"] == line[0]
    assert line[0]["top_categories"][0] == max(categories, key=lambda name: categories[name]["share"])
    with gzip.open(tmp_path / "profile" / "trace_rank0.json.gz", "rt") as f:
        assert json.load(f)["traceEvents"]
    assert (tmp_path / "config.json").is_file() and not (tmp_path / "model.safetensors").exists()


def test_max_train_seconds_stops_early_then_evaluates_and_saves(tmp_path, data_cache):
    summary = run(tmp_path, data_cache, "--max_steps", "50", "--max_train_seconds", "1e-9", "--eval_steps", "0",
                  "--save_steps", "0")
    assert summary["global_step"] == 1 and summary["stopped_by_time"] is True
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if "loss" in r] == [1]
    assert [r["step"] for r in records if r.get("eval_loss") is not None] == [1]
    assert (tmp_path / "model.safetensors").is_file()


def test_a_run_stopped_by_the_clock_resumes_where_it_stopped(tmp_path, data_cache):
    """With checkpoints on, --max_train_seconds leaves one at the step where it stopped; resuming from it finishes
    the run with the weights of a run that was never stopped (its learning-rate schedule spans max_steps)."""
    extra = ["--max_steps", "3", "--save_steps", "100", "--eval_steps", "0"]
    reference = run(tmp_path / "reference", data_cache, *extra)
    stopped = run(tmp_path / "stopped", data_cache, *extra, "--max_train_seconds", "1e-9")
    assert stopped["global_step"] == 1 and stopped["stopped_by_time"] is True
    assert [p.name for p in (tmp_path / "stopped").glob("checkpoint-*")] == ["checkpoint-1"]
    resumed = run(tmp_path / "stopped", data_cache, *extra, "--resume_from_checkpoint", "latest")
    assert resumed["resumed_from"].endswith("checkpoint-1") and resumed["global_step"] == 3
    assert resumed["final_eval_loss"] == reference["final_eval_loss"]
    from safetensors.torch import load_file

    expected = load_file(tmp_path / "reference" / "model.safetensors")
    got = load_file(tmp_path / "stopped" / "model.safetensors")
    assert all(torch.equal(expected[name], got[name]) for name in expected)


@pytest.mark.parametrize("mtp_layers", [0, 1])
def test_gradient_accumulation_gives_the_step_of_the_whole_batch(tmp_path, data_cache, mtp_layers):
    """2 micro-batches of 2 blocks train as one batch of 4: the loss of a step is the mean over all its predicted
    tokens, not the mean of the micro-batches' means; each MTP depth's loss likewise (documents of uneven lengths:
    the micro-batches hold different numbers of predicted tokens per depth)."""
    flags = ["--dataset", short_documents(tmp_path / "short.jsonl"), "--max_steps", "3", "--eval_steps", "0",
             "--save_steps", "0", "--config_overrides", f"num_nextn_predict_layers={mtp_layers}"]
    run(tmp_path / "batch4", data_cache, *flags, "--per_device_train_batch_size", "4")
    run(tmp_path / "accumulated", data_cache, *flags, "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "2")
    whole, accumulated = read_metrics(tmp_path / "batch4"), read_metrics(tmp_path / "accumulated")
    for a, b in zip(whole, accumulated, strict=True):
        for key in ("loss", "train_objective", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), (a["step"], key)
    assert accumulated[-1]["eval_loss"] == pytest.approx(whole[-1]["eval_loss"], rel=1e-6)


def test_num_train_epochs_counts_micro_batches(tmp_path, data_cache):
    # 10 blocks of 2: 5 micro-batches an epoch, so 2 epochs are 5 optimizer steps of 2 micro-batches
    summary = run(tmp_path, data_cache, "--max_steps", "-1", "--num_train_epochs", "2", "--max_train_samples", "10",
                  "--gradient_accumulation_steps", "2", "--save_steps", "0", "--save_final_model", "false")
    assert summary["global_step"] == 5
    assert [r["epoch"] for r in read_metrics(tmp_path) if "loss" in r][-1] == 2.0


def test_torch_compile_gives_the_same_losses(tmp_path, data_cache):
    """--torch_compile (accelerate's regional compilation of the decoder layers; aot_eager here, inductor on a GPU)
    trains as the eager model does: same losses and expert loads."""
    flags = ["--max_steps", "3", "--eval_steps", "0", "--save_steps", "0"]
    run(tmp_path / "eager", data_cache, *flags)
    run(tmp_path / "compiled", data_cache, *flags, "--torch_compile", "--torch_compile_backend", "aot_eager")
    eager, compiled = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    from safetensors.torch import load_file  # the compiled run's model saves under the plain names

    expected, got = load_file(tmp_path / "eager" / "model.safetensors"), load_file(tmp_path / "compiled" / "model.safetensors")
    assert expected.keys() == got.keys()
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == [1, 2, 3]
    for a, b in zip(eager, compiled):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
        assert a["maxvio"] == pytest.approx(b["maxvio"], abs=1e-6)


def test_two_process_ddp_and_expert_parallel_give_the_same_losses(two_process_runs):
    ddp, ep2 = read_metrics(two_process_runs / "ddp"), read_metrics(two_process_runs / "ep2")
    assert [r["step"] for r in ddp] == [r["step"] for r in ep2] == [1, 2, 3, 4]
    for a, b in zip(ddp, ep2):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"]
        assert a["maxvio"] == pytest.approx(b["maxvio"], abs=1e-6)  # the same global expert loads
    assert abs(ddp[-1]["eval_loss"] - ep2[-1]["eval_loss"]) <= 1e-5

    # The expert-parallel run saves an ordinary checkpoint: every expert gathered back.
    from safetensors.torch import load_file

    dense, sharded = load_file(two_process_runs / "ddp" / "model.safetensors"), load_file(
        two_process_runs / "ep2" / "model.safetensors"
    )
    assert sharded["model.layers.1.mlp.experts.gate_up_proj"].shape == (8, 64, 64)
    for name in dense:
        torch.testing.assert_close(sharded[name], dense[name], atol=1e-4, rtol=0)


def test_two_processes_give_the_step_of_one_process_with_the_whole_batch(two_process_runs, tmp_path, data_cache):
    """2 processes x 2 blocks train as 1 process x 4 blocks (the same blocks: the ranks take turns through one
    order): the loss is the mean over every rank's tokens, and the gradients are scaled accordingly."""
    run(tmp_path, data_cache, *TWO_PROCESS_FLAGS, "--dataset", str(two_process_runs / "short.jsonl"),
        "--per_device_train_batch_size", "4")
    one, ddp = read_metrics(tmp_path), read_metrics(two_process_runs / "ddp")
    for a, b in zip(one, ddp, strict=True):
        if a["step"] <= 2:  # the initial weights still (warmup: step 1's learning rate is 0)
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), a["step"]
        assert b["train_objective"] == pytest.approx(a["train_objective"], rel=1e-5), a["step"]  # MTP included
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), a["step"]


def test_two_process_expert_parallel_resume_is_bitwise(two_process_runs):
    full, resumed = read_metrics(two_process_runs / "ep2"), read_metrics(two_process_runs / "ep2-resumed")
    assert [(r["step"], r["loss"], r.get("eval_loss")) for r in full] == [
        (r["step"], r["loss"], r.get("eval_loss")) for r in resumed
    ]


def test_two_process_fsdp2_with_expert_parallel_matches_ddp(two_process_runs):
    """FSDP2 + EP=2 trains as DDP, both unclipped. Their gradients agree to float32 rounding, but FSDP2's gradient norm
    sums its shards' squares in another order: in float32 the two norms differ by up to ~3e-5 of their value (the
    tiny preset's norms stray from the float64 one by up to 6e-5), so clipped runs take different steps and part by
    more than 1e-5 once AdamW's first updates amplify it."""
    ddp, fsdp = read_metrics(two_process_runs / "ddp-unclipped"), read_metrics(two_process_runs / "fsdp2-ep2")
    for a, b in zip(ddp, fsdp, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["step"]
    assert abs(ddp[-1]["eval_loss"] - fsdp[-1]["eval_loss"]) <= 1e-5
    assert (two_process_runs / "fsdp2-ep2" / "checkpoint-4").is_dir()
    assert not list((two_process_runs / "fsdp2-ep2").glob("_fsdp*.py"))  # saved as a plain MoEForCausalLM


# ------------------------------------------------------------------------------------------------- clear errors


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model_config", "no-such-preset"], "Unknown preset 'no-such-preset'"),
        (["--seq_len", "1024"], "above the model's max_position_embeddings=512"),
        (["--expert_parallel_size", "3"], "n_routed_experts=8 is not divisible by --expert_parallel_size=3"),
        (["--expert_parallel_size", "2"], "world size (1 process) is not divisible by --expert_parallel_size=2"),
        (["--config_overrides", "no_such_field=1"], "Unknown MoEConfig field"),
        (["--profile_steps", "3-5"], "--profile_steps '3-5': expected FIRST,LAST optimizer steps"),
        (["--profile_steps", "1,2"], "step 2 is beyond the run's 1 optimizer steps"),
        # 8 blocks, 2 a step: one epoch is 4 steps, known once the data is loaded
        (["--max_steps", "-1", "--max_train_samples", "8", "--profile_steps", "3,5"],
         "step 5 is beyond the run's 4 optimizer steps"),
        (["--max_train_samples", "0"], "The training set has 0 blocks"),
        (["--learning_rate", "-1"], "--learning_rate must be > 0"),
        (["--warmup_steps", "-5"], "--warmup_steps must be >= 0"),
        (["--report_to", "bogus"], "--report_to 'bogus' is not a tracker"),
        (["--max_steps", "0", "--num_train_epochs", "0"], "Nothing to train"),
        (["--cuda_graph", "--gradient_checkpointing", "--torch_compile", "--torch_compile_mode", "reduce-overhead"],
         "--cuda_graph needs a CUDA device (this run is on cpu); no --gradient_checkpointing (its recomputation "
         "saves and restores the random state, which a capture forbids); a --torch_compile_mode without CUDA graphs "
         "of its own (got reduce-overhead"),
    ],
)
def test_configuration_errors_are_clear(tmp_path, data_cache, extra, message):
    with pytest.raises(ConfigurationError) as error:
        run(tmp_path, data_cache, "--max_steps", "1", *extra)
    assert message in str(error.value)


def test_a_process_past_the_last_gpu_is_a_clear_error(tmp_path, data_cache, monkeypatch):
    """Two processes on a machine with one GPU: the second gets a message, not accelerate's bare CUDA error."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigurationError, match="local rank 1, but the machine shows 1 GPU"):
        run(tmp_path, data_cache, "--max_steps", "1")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_training_in_bf16_with_the_fused_experts(tmp_path, data_cache):
    """The trainer on a GPU: bf16 autocast, compiled layers, the fused experts (the default there)."""
    main([*ON_GPU, "--data_cache_dir", data_cache, "--output_dir", str(tmp_path), "--max_steps", "8", "--bf16",
          "--torch_compile", "--save_steps", "0"])
    records = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert all(math.isfinite(r["loss"]) and r["mfu"] is not None for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["MoEForCausalLM"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_steps_replayed_from_one_cuda_graph_train_as_eager_ones(tmp_path, data_cache, monkeypatch):
    """--cuda_graph replays steps 3 on from one captured graph: the losses, gradient norms, held-out losses and
    MaxVio of the same run with every step eager (the graph never captured), with two micro-batches and MTP a step;
    and a run resumed from its step-4 checkpoint (the learning-rate tensors loaded back onto the GPU) captures anew
    and logs the uninterrupted run's losses."""
    from modeling_moe.trainers import cuda_graph

    flags = ["--data_cache_dir", data_cache, "--max_steps", "8", "--torch_compile", "--tf32", "false",
             "--cuda_graph", "--gradient_accumulation_steps", "2", "--logging_steps", "1", "--eval_steps", "4",
             "--save_final_model", "false", "--config_overrides", "num_nextn_predict_layers=1"]
    main([*ON_GPU, *flags, "--output_dir", str(tmp_path / "graph"), "--save_steps", "4"])
    main([*ON_GPU, *flags, "--output_dir", str(tmp_path / "graph"), "--save_steps", "0", "--overwrite_output_dir",
          "--resume_from_checkpoint", str(tmp_path / "graph" / "checkpoint-4")])
    resumed = read_metrics(tmp_path / "graph")
    captured = []
    original_capture = cuda_graph.GraphedStep._capture
    monkeypatch.setattr(cuda_graph.GraphedStep, "_capture",
                        lambda self, inputs: captured.append(self.calls) or original_capture(self, inputs))
    main([*ON_GPU, *flags, "--output_dir", str(tmp_path / "graph-again"), "--save_steps", "0"])
    assert captured == [3]
    graphed = read_metrics(tmp_path / "graph-again")
    monkeypatch.setattr(cuda_graph.GraphedStep, "_capture", lambda self, inputs: pytest.fail("captured"))
    monkeypatch.setattr(cuda_graph.GraphedStep, "__call__", lambda self, inputs: self.step(inputs))
    main([*ON_GPU, *flags, "--output_dir", str(tmp_path / "eager"), "--save_steps", "0"])
    eager = read_metrics(tmp_path / "eager")
    assert [r["step"] for r in graphed if "loss" in r] == list(range(1, 9))
    for a, b in zip(eager, graphed, strict=True):
        for key in ("loss", "eval_loss", "grad_norm", "lr"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6), (a["step"], key)
        assert b.get("maxvio") == a.get("maxvio")
    resumed_steps = {r["step"]: r for r in resumed if "loss" in r}
    for record in graphed:
        if "loss" in record and record["step"] > 4:
            assert resumed_steps[record["step"]]["loss"] == pytest.approx(record["loss"], rel=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_steps_replayed_from_one_cuda_graph_in_bf16_autocast(tmp_path, data_cache, monkeypatch):
    """--cuda_graph with --bf16 (accelerate's autocast, entered and left inside each captured forward, so the casts
    of the weights are made anew by every replay, not cached from the capture): the losses of every step eager, to
    bf16's run-to-run spread (cuDNN's attention backward accumulates with atomics); replays that read the weights of
    the capture would lose the improvement of the later steps."""
    from modeling_moe.trainers import cuda_graph

    flags = ["--data_cache_dir", data_cache, "--max_steps", "10", "--torch_compile", "--bf16", "--cuda_graph",
             "--save_steps", "0", "--save_final_model", "false", "--learning_rate", "1e-2"]
    main([*ON_GPU, *flags, "--output_dir", str(tmp_path / "graph")])
    monkeypatch.setattr(cuda_graph.GraphedStep, "__call__", lambda self, inputs: self.step(inputs))
    main([*ON_GPU, *flags, "--output_dir", str(tmp_path / "eager")])
    graphed, eager = losses(tmp_path / "graph"), losses(tmp_path / "eager")
    assert [step for step, _ in graphed] == list(range(1, 11))
    assert eager[2][1] - eager[-1][1] > 0.1  # the steps after the capture improve the model
    for (step, a), (_, b) in zip(eager, graphed, strict=True):
        assert b == pytest.approx(a, rel=2e-3, abs=5e-3), step


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_layers_replayed_from_cuda_graphs_train_as_compiled_ones(tmp_path, data_cache):
    """--torch_compile_mode reduce-overhead replays each decoder layer's forward and backward (fused experts
    included) from CUDA graphs: the same run as plain compiled layers, without the host's launches."""
    # Full fp32 products: with TF32 (accelerate's choice when it compiles in fp32) two runs of plain compiled layers
    # already differ by 4e-4 in step 6's gradient norm; without, all three runs agree within 1e-6 (H200).
    flags = ["--data_cache_dir", data_cache, "--max_steps", "6", "--torch_compile", "--tf32", "false",
             "--save_steps", "0", "--save_final_model", "false"]
    main([*ON_GPU, *flags, "--output_dir", str(tmp_path / "compiled")])
    main([*ON_GPU, *flags, "--output_dir", str(tmp_path / "graphs"), "--torch_compile_mode", "reduce-overhead"])
    compiled, graphs = read_metrics(tmp_path / "compiled"), read_metrics(tmp_path / "graphs")
    for a, b in zip(compiled, graphs, strict=True):
        for key in ("loss", "eval_loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)


def test_no_held_out_split(tmp_path, data_cache):
    run(tmp_path, data_cache, "--max_steps", "2", "--validation_split_percentage", "0")
    assert all(record.get("eval_loss") is None for record in read_metrics(tmp_path))


def test_unreadable_datasets_are_clear(tmp_path, data_cache):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(tmp_path / "out", data_cache, "--max_steps", "1", "--dataset", str(tmp_path / "missing.jsonl"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(DatasetReadError, match=r"broken.jsonl, line 2: not a JSON object"):
        run(tmp_path / "out", data_cache, "--max_steps", "1", "--dataset", str(broken))
    wrong_field = tmp_path / "wrong.jsonl"
    wrong_field.write_text('{"body": "text"}\n')
    with pytest.raises(DatasetReadError, match="no 'text' field"):
        run(tmp_path / "out", data_cache, "--max_steps", "1", "--dataset", str(wrong_field))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'\xff\xfe{"text": "caf\xe9"}\n')
    with pytest.raises(DatasetReadError, match="not UTF-8 text"):
        run(tmp_path / "out", data_cache, "--max_steps", "1", "--dataset", str(latin))
    unsupported = tmp_path / "data.csv"
    unsupported.write_text("text\nhello\n")
    with pytest.raises(DatasetReadError, match="unsupported dataset format"):
        load_documents(unsupported)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_without_the_package_is_a_clear_error(tmp_path, data_cache):
    with pytest.raises(ConfigurationError, match="pip install tensorboard"):
        run(tmp_path, data_cache, "--max_steps", "1", "--report_to", "tensorboard")


def test_existing_checkpoints_need_resume_or_overwrite(tmp_path, data_cache):
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{}")
    with pytest.raises(ConfigurationError, match="--resume_from_checkpoint latest"):
        run(tmp_path, data_cache, "--max_steps", "1")


def test_resuming_an_older_checkpoint_refuses_to_keep_the_newer_ones(tmp_path, data_cache):
    """checkpoint-4 belongs to a future this run will not follow: kept, `latest` would pick it after a crash and
    save_total_limit would delete this run's checkpoints instead of it. An error, or with --overwrite_output_dir,
    deleted; the run then goes on from checkpoint-2."""
    flags = ["--save_steps", "2", "--eval_steps", "0", "--save_final_model", "false"]
    run(tmp_path, data_cache, "--max_steps", "4", *flags)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    older = str(tmp_path / "checkpoint-2")
    with pytest.raises(ConfigurationError, match="past checkpoint-2 \\(checkpoint-4\\)"):
        run(tmp_path, data_cache, "--max_steps", "3", *flags, "--resume_from_checkpoint", older)
    assert (tmp_path / "checkpoint-4").is_dir()
    resumed = run(tmp_path, data_cache, "--max_steps", "3", *flags, "--resume_from_checkpoint", older,
                  "--overwrite_output_dir", "--save_steps", "1", "--save_total_limit", "1")
    assert resumed["global_step"] == 3
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3"]


def test_cli_prints_one_line_errors(tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "modeling_moe.trainers.pretrain", "--model_config", "nope",
         "--output_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert process.returncode == 2
    assert process.stderr.strip().splitlines()[-1].startswith("pretrain: error: Unknown preset 'nope'")


# ------------------------------------------------------------------------------------------- arguments and data


def test_help_lists_every_option_and_yaml_config_is_overridable(tmp_path):
    help_text = build_parser().format_help()
    for option in ("--output_dir", "--max_steps", "--per_device_train_batch_size", "--gradient_accumulation_steps",
                   "--learning_rate", "--warmup_steps", "--lr_scheduler_type", "--weight_decay", "--max_grad_norm",
                   "--save_steps", "--logging_steps", "--seed", "--bf16", "--gradient_checkpointing", "--report_to",
                   "--resume_from_checkpoint", "--model_config", "--dataset", "--seq_len", "--expert_parallel_size",
                   "--config"):
        assert option in help_text, option
    config = tmp_path / "pretrain.yaml"
    config.write_text("max_steps: 7\nlearning_rate: 0.01\nbf16: true\nreport_to: none\nseq_len: 128\n")
    model_args, data_args, args = parse_args(["--config", str(config), "--seq_len", "64"])
    assert (args.max_steps, args.learning_rate, args.bf16, args.report_to) == (7, 0.01, True, ["none"])
    assert data_args.seq_len == 64  # the command line wins
    config.write_text("report_to: [tensorboard, wandb]\n")
    assert parse_args(["--config", str(config)])[2].report_to == ["tensorboard", "wandb"]
    # File values get the flags' checks; unknown flags and broken files are usage errors (exit status 2).
    for text, argv in (("max_steps: 2.5\n", []), ("max_steps: [1\n", []), ("", ["--max_stepz", "3"]),
                       ("lr_scheduler_type: reduce_lr_on_plateau\n", []), ("text_sample_by: sentence\n", [])):
        config.write_text(text)
        with pytest.raises(SystemExit) as exit_info:
            parse_args(["--config", str(config), *argv])
        assert exit_info.value.code == 2, text
    config.write_text("no_such_option: 1\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(config)])


@pytest.mark.parametrize("optim, device_type, fsdp2, expected, fused", [
    (None, "cuda", False, "TritonAdamW", None), (None, "cuda", True, "AdamW", True),
    (None, "cpu", False, "AdamW", None),
    ("adamw_triton", "cpu", False, "TritonAdamW", None), ("adamw_triton", "cuda", True, "TritonAdamW", None),
    ("adamw_torch_fused", "cuda", False, "AdamW", True), ("adamw_torch", "cuda", False, "AdamW", None)])
def test_optimizer_choice_groups_and_settings(optim, device_type, fsdp2, expected, fused):
    """--optim (default by device, and FSDP2's sharded parameters) picks the class; matrices decay, vectors do not;
    the flags reach every group."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    argv = ["--weight_decay", "0.2", "--learning_rate", "0.01", "--adam_beta2", "0.9"]
    args = parse_args(argv + (["--optim", optim] if optim else []))[2]
    optimizer = build_optimizer(model, args, device_type, fsdp2=fsdp2)
    assert type(optimizer).__name__ == expected
    assert optimizer.defaults["fused"] == fused
    decay, no_decay = optimizer.param_groups
    assert [p.dim() for p in decay["params"]] == [2] and decay["weight_decay"] == 0.2
    assert [p.dim() for p in no_decay["params"]] == [1, 1, 1] and no_decay["weight_decay"] == 0.0
    assert all(g["lr"] == 0.01 and g["betas"] == (0.9, 0.9) for g in optimizer.param_groups)
    assert not optimizer.defaults["capturable"]
    if device_type == "cpu":  # --cuda_graph: capturable, the learning rate a tensor on the device (rejected on a CPU
        # by the trainer; built here all the same)
        optimizer = build_optimizer(model, parse_args(argv + ["--cuda_graph"])[2], device_type)
        assert optimizer.defaults["capturable"]
        assert all(isinstance(g["lr"], torch.Tensor) and g["lr"].item() == pytest.approx(0.01)
                   for g in optimizer.param_groups)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--optim", "sgd"])
    assert exit_info.value.code == 2


def test_yaml_config_null_is_the_default(tmp_path):
    config = tmp_path / "pretrain.yaml"
    config.write_text("dataset: null\ntokenizer_name: ~\neval_steps: null\ndata_seed: null\nreport_to: null\n")
    model_args, data_args, args = parse_args(["--config", str(config)])
    assert data_args.dataset is None and model_args.tokenizer_name is None
    assert args.eval_steps is None and args.data_seed is None and args.report_to == ["none"]


def test_config_overrides_parse_json_values():
    assert parse_config_overrides("a=1, b=true,c=1e-3,d=null,e=name,f=False") == {
        "a": 1, "b": True, "c": 0.001, "d": None, "e": "name", "f": False,
    }


def test_local_dataset_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\nthird line\n")
    assert load_documents(tmp_path / "a.txt") == (["first line", "second line", "third line"], None)
    assert load_documents(tmp_path / "a.txt", sample_by="paragraph")[0] == ["first line", "second line\nthird line"]
    assert load_documents(tmp_path / "a.txt", sample_by="document")[0] == ["first line\n\nsecond line\nthird line"]
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    assert load_documents(tmp_path / "b.jsonl")[0] == ["one", "two"]
    assert load_documents(tmp_path)[0] == ["first line", "second line", "third line", "one", "two"]
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "c.json").write_text('[{"content": "three"}]')
    assert load_documents(tmp_path / "list" / "c.json", text_field="content")[0] == ["three"]


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="needs datasets (and pyarrow)")
def test_parquet_and_saved_datasets(tmp_path):
    import datasets

    train = datasets.Dataset.from_dict({"text": ["alpha", "beta", ""], "n": [1, 2, 3]})
    train.to_parquet(str(tmp_path / "train.parquet"))
    assert load_documents(tmp_path / "train.parquet") == (["alpha", "beta"], None)
    datasets.DatasetDict({"train": train, "validation": datasets.Dataset.from_dict({"text": ["gamma"]})}).save_to_disk(
        str(tmp_path / "saved")
    )
    assert load_documents(tmp_path / "saved") == (["alpha", "beta"], ["gamma"])
    with pytest.raises(DatasetReadError, match="no 'body' column"):
        load_documents(tmp_path / "train.parquet", text_field="body")


def test_training_on_a_local_jsonl_file_without_document_attention(tmp_path, data_cache):
    from modeling_moe.trainers.data import load_corpus_texts

    documents = load_corpus_texts()[:40]
    dataset = tmp_path / "corpus.jsonl"
    dataset.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    summary = run(tmp_path / "out", data_cache, "--dataset", str(dataset), "--max_steps", "2", "--save_steps", "0",
                  "--validation_split_percentage", "10", "--no_document_attention")
    assert summary["global_step"] == 2 and math.isfinite(summary["final_eval_loss"])


@pytest.mark.parametrize("mtp_layers", [0, 1])
def test_fsdp2_wraps_the_layer_classes_the_model_has(mtp_layers):
    """The FSDP2 launch configs list MoEDecoderLayer and MoEMultiTokenPredictionLayer; accelerate raises on a class
    the model lacks (a model without MTP: the FSDP2 runs on the H200 failed so), so the trainer keeps those present."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from modeling_moe.modeling_moe import MoEDecoderLayer, MoEMultiTokenPredictionLayer
    from modeling_moe.trainers.pretrain import wrap_present_layer_classes

    from .helpers import seeded_model, small_config

    model = seeded_model(small_config(num_nextn_predict_layers=mtp_layers))
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap="MoEDecoderLayer,MoEMultiTokenPredictionLayer",
    )
    if mtp_layers == 0:
        with pytest.raises(ValueError, match="MoEMultiTokenPredictionLayer"):
            fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrap_present_layer_classes(plugin, model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [module for module in model.modules() if policy(module)]
    layers = [module for module in model.modules() if isinstance(module, MoEDecoderLayer)]
    assert set(map(id, layers)) <= set(map(id, wrapped)) and len(layers) == model.config.num_hidden_layers + mtp_layers
    assert sum(isinstance(module, MoEMultiTokenPredictionLayer) for module in wrapped) == mtp_layers


def test_exported_corpus_reads_back_as_the_embedded_one(tmp_path):
    """`python -m modeling_moe.trainers.data PATH` (for GPU machines without gensim) writes what --dataset reads back."""
    from modeling_moe.trainers.data import export_corpus, load_corpus_texts

    path = tmp_path / "corpus.jsonl"
    assert export_corpus(path) == len(load_corpus_texts())
    docs, held_out = load_documents(path)
    assert docs == load_corpus_texts() and held_out is None

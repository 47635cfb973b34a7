"""benchmarks/recipe_runs.py: the GPU command lines parse in the trainers, the summary of synthetic stage outputs, the
data stage's reuse, the trainer options the driver relies on, and a CPU dry run of the whole recipe whose summary must
agree with what each stage wrote."""

import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import assert_help_lists_every_option, load_benchmark_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "recipe_runs.py"
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAS_REASONING_GYM = importlib.util.find_spec("reasoning_gym") is not None

driver = load_benchmark_script("recipe_runs")


def write_manifest(args, longest_prompts: dict):
    """A data folder as the data stage leaves it (empty files), for the tasks of `args`."""
    folder = Path(args.data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tasks = {}
    for task in dict.fromkeys(args.sft_tasks + args.grpo_tasks):
        for path in driver.data_files(args, task).values():
            path.write_text("")
        tasks[task] = {"settings": driver.data_settings(args, task), "max_prompt_tokens": longest_prompts[task]}
    (folder / "manifest.json").write_text(json.dumps({"tasks": tasks}))


def test_help_lists_every_option():
    text = assert_help_lists_every_option(driver.build_parser())
    for name in ("--stages", "--small", "--list", "--gpus", "--time_budget", "--sft_steps", "--grpo_steps",
                 "--eval_samples", "--completion_tokens", "--task_kwargs", "--pretrained_model", "--sft_model"):
        assert name in text


def trainer_args(command: str, module: str) -> list[str]:
    words = shlex.split(command)
    return words[words.index(module) + 1:]


def test_gpu_commands_parse_in_the_trainers(tmp_path, capsys):
    from modeling_moe.trainers import grpo, pretrain, sft

    argv = ["--output_dir", str(tmp_path / "out"), "--work_dir", str(tmp_path / "work"),
            "--data_dir", str(tmp_path / "data"), "--gpus", "0,1", "--list"]
    write_manifest(driver.parse_args(argv), {"gsm": 167, "countdown": 66, "arithmetic": 58})
    assert driver.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("all files present")
    commands = dict(line.split(": ", 1) for line in lines[1:])
    assert list(commands) == ["pretrain [CUDA_VISIBLE_DEVICES=0,1]", "sft [CUDA_VISIBLE_DEVICES=0]",
                              "grpo-countdown [CUDA_VISIBLE_DEVICES=0]", "grpo-gsm [CUDA_VISIBLE_DEVICES=1]"]
    assert not (tmp_path / "out").exists()  # --list launches and writes nothing

    pretraining = commands["pretrain [CUDA_VISIBLE_DEVICES=0,1]"]  # DDP over both GPUs
    launcher = shlex.split(pretraining)[:shlex.split(pretraining).index("modeling_moe.trainers.pretrain")]
    assert launcher[1:3] == ["-m", "accelerate.commands.launch"] and "ddp.yaml" in launcher[4]
    assert launcher[launcher.index("--num_processes") + 1] == "2"
    model_args, data_args, train_args = pretrain.parse_args(trainer_args(pretraining, "modeling_moe.trainers.pretrain"))
    assert model_args.model_config == "moe-100m" and model_args.torch_dtype == "bfloat16" and train_args.bf16
    assert train_args.max_steps == 600 and train_args.per_device_train_batch_size == 32 and data_args.seq_len == 1024
    assert train_args.max_train_seconds == 120

    data = tmp_path / "data"
    # The CPU cannot validate bf16 (transformers raises); everything else is parsed as the GPU will.
    words = trainer_args(commands["sft [CUDA_VISIBLE_DEVICES=0]"], "modeling_moe.trainers.sft")
    words[words.index("--bf16") + 1] = "false"
    data_args, training_args, model_args = sft.make_parser().parse_args_and_config(args=words)
    assert data_args.task.split(",") == [str(data / f"{t}-train.jsonl") for t in ("gsm", "countdown", "arithmetic")]
    assert data_args.eval_task.split(",") == [str(data / f"{t}-eval.jsonl") for t in ("countdown", "gsm")]
    assert data_args.accuracy_eval_samples == 2000 and data_args.accuracy_max_new_tokens == 128
    assert data_args.accuracy_eval_batch_size == 200 and data_args.max_train_seconds == 30
    assert data_args.save_merged_model and model_args.use_peft and model_args.lora_preset == "all"
    assert model_args.lora_r == 32 and model_args.dtype == "bfloat16"  # lora_r: the recipe's
    assert training_args.max_steps == 400 and training_args.learning_rate == 5e-4
    assert training_args.per_device_train_batch_size == 32 and training_args.gradient_accumulation_steps == 1
    assert training_args.max_length == 384 and not training_args.gradient_checkpointing
    assert model_args.model_name_or_path == str(tmp_path / "work" / "pretrain")

    for task, budget, padding, reward in (("countdown", 64, 96, "countdown_reward"),
                                          ("gsm", 128, 192, "math_accuracy_reward")):
        key = f"grpo-{task} [CUDA_VISIBLE_DEVICES={0 if task == 'countdown' else 1}]"
        words = trainer_args(commands[key], "modeling_moe.trainers.grpo")
        words[words.index("--bf16") + 1] = "false"
        data_args, training_args, model_args = grpo.make_parser().parse_args_and_config(args=words)
        assert data_args.task == str(data / f"{task}-rl.jsonl")  # prompts never seen in pretraining or SFT
        assert data_args.eval_task == str(data / f"{task}-eval.jsonl")
        assert data_args.cuda_graph_rollouts and data_args.reward_funcs == ["format_reward", reward]
        assert data_args.accuracy_max_new_tokens == training_args.max_completion_length == budget
        # One shape for every rollout: the longest prompt (167 / 66 tokens) or the budget, rounded up to 32.
        assert training_args.pad_to_multiple_of == padding
        assert training_args.per_device_train_batch_size == 128 and training_args.num_generations == 8
        assert training_args.max_steps == 2000 and data_args.max_train_seconds == 240
        assert model_args.model_name_or_path == str(tmp_path / "work" / "sft" / "merged")


def test_full_finetuning_keeps_float32_weights_and_starts_grpo_from_the_sft_folder(tmp_path, capsys):
    argv = ["--output_dir", str(tmp_path / "out"), "--work_dir", str(tmp_path / "work"), "--sft_lora_preset", "none",
            "--stages", "sft,grpo", "--grpo_cuda_graph_rollouts", "false", "--list"]
    assert driver.main(argv) == 0
    commands = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines()[1:])
    sft_command = commands["sft [CUDA_VISIBLE_DEVICES=0]"]
    assert "--use_peft false --dtype float32 --bf16 true" in sft_command
    grpo_command = commands["grpo-gsm [CUDA_VISIBLE_DEVICES=0]"]
    assert f"--model_name_or_path {tmp_path / 'work' / 'sft'} " in grpo_command
    assert "--pad_to_multiple_of" not in grpo_command
    from modeling_moe.trainers import grpo

    words = trainer_args(grpo_command, "modeling_moe.trainers.grpo")
    words[words.index("--bf16") + 1] = "false"
    data_args, _, _ = grpo.make_parser().parse_args_and_config(args=words)
    assert not data_args.cuda_graph_rollouts  # the flag overrides the recipe, which turns them on
    assert "pretrain" not in commands


def fake_history(rewards, runtime=12.5):
    history = [{"step": i + 1, "loss": 0.01, "reward": r, "rewards/countdown_reward/mean": r}
               for i, r in enumerate(rewards)]
    return history + [{"step": len(rewards), "train_runtime": runtime}]


def test_summary_of_synthetic_stage_outputs(tmp_path):
    """Accuracy rows, gain and its error, reward windows, a killed run read from its log_history.jsonl, the failure
    excerpt, and the output files, against numbers computed by hand."""
    work, out = tmp_path / "work", tmp_path / "out"
    for name in ("pretrain", "sft", "grpo-countdown", "grpo-gsm"):
        (work / name).mkdir(parents=True)
    (work / "pretrain" / "pretrain_summary.json").write_text(json.dumps(
        {"global_step": 200, "first_loss": 10.9, "last_loss": 6.1, "final_eval_loss": 6.5,
         "tokens_per_second": 80000.0}))
    per_task = lambda cd, gsm, fmt: {  # noqa: E731
        "countdown/accuracy": cd, "countdown/format": fmt, "countdown/n": 200,
        "gsm/accuracy": gsm, "gsm/format": fmt, "gsm/n": 200, "accuracy": (cd + gsm) / 2, "format": fmt, "n": 400}
    (work / "sft" / "accuracy.json").write_text(json.dumps(
        {"before": per_task(0.0, 0.0, 0.0), "after": {**per_task(0.2, 0.05, 0.95), "samples": [
            {"question": "q", "completion": "<think>\nx\n</think>\n<answer>1</answer>", "format": 1.0,
             "correct": 0.0}]}}))
    (work / "sft" / "trainer_state.json").write_text(json.dumps(
        {"global_step": 400, "log_history": [{"step": 10, "loss": 3.0}, {"step": 400, "loss": 0.5},
                                             {"step": 400, "train_runtime": 95.0}]}))
    rewards = [step / 100 for step in range(1, 31)]
    (work / "grpo-countdown" / "accuracy.json").write_text(json.dumps(
        {"before": {"accuracy": 0.2, "format": 0.95, "n": 200, "countdown/accuracy": 0.2, "countdown/n": 200},
         "after": {"accuracy": 0.3, "format": 1.0, "n": 200, "countdown/accuracy": 0.3, "countdown/n": 200}}))
    (work / "grpo-countdown" / "trainer_state.json").write_text(json.dumps(
        {"global_step": 30, "log_history": fake_history(rewards)}))
    # The gsm run was killed after 4 steps: no trainer_state.json, no accuracy after; its log_history.jsonl remains.
    (work / "grpo-gsm" / "accuracy.json").write_text(json.dumps({"before": {"accuracy": 0.05, "n": 200}}))
    (work / "grpo-gsm" / "log_history.jsonl").write_text(
        "\n".join(json.dumps(r) for r in fake_history([0.1, 0.2, 0.4, 0.5])[:-1]) + "\n{\"trunc")

    args = driver.parse_args(["--output_dir", str(out), "--work_dir", str(work)])
    stages = [driver.Stage("pretrain", "pretrain"), driver.Stage("sft", "sft"),
              driver.Stage("grpo-countdown", "grpo", "countdown"), driver.Stage("grpo-gsm", "grpo", "gsm")]
    for stage in stages[:3]:
        stage.result.update(status="ok", rc=0, wall_s=10.0, command=f"python -m {stage.name}")
    stages[3].result.update(status="timeout", rc="timeout", wall_s=330.0, command="python -m grpo-gsm",
                            log_tail="Traceback (most recent call last):\nRuntimeError: killed here")
    data = driver.Stage("data", "data", result={"status": "ok", "rc": 0, "wall_s": 0.5, "generated": [],
                                                "data_dir": args.data_dir})
    written = driver.write_outputs(data, stages, args, wall_s=500.0)

    files = {p.name for p in out.iterdir()}
    assert files == set(written) and len(files) <= 8 and {"summary.md", "results.jsonl"} <= files
    if HAS_MATPLOTLIB:
        assert {"accuracy.png", "rewards.png"} <= files
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    rows = {line["task"]: line for line in lines if line["kind"] == "task"}
    countdown, gsm = rows["countdown"], rows["gsm"]
    assert (countdown["accuracy_pretrain"], countdown["accuracy_sft"], countdown["accuracy_grpo"]) == (0.0, 0.2, 0.3)
    assert countdown["format_sft"] == 0.95 and countdown["n_grpo"] == 200
    assert countdown["grpo_gain"] == pytest.approx(0.1)
    assert countdown["grpo_gain_se"] == pytest.approx(0.0430116263)  # sqrt(.2 * .8 / 200 + .3 * .7 / 200)
    assert countdown["measurably_higher"] is True  # 0.1 > 2 x 0.043
    assert countdown["reward_window"] == 10
    assert countdown["reward_first"] == pytest.approx(0.055) and countdown["reward_last"] == pytest.approx(0.255)
    assert countdown["grpo_steps"] == 30
    assert gsm["accuracy_sft"] == 0.05 and gsm["accuracy_grpo"] is None and "measurably_higher" not in gsm
    assert gsm["reward_window"] == 2 and gsm["reward_first"] == pytest.approx(0.15)
    assert gsm["reward_last"] == pytest.approx(0.45) and gsm["grpo_steps"] == 4
    steps = [(line["run"], line["step"], line["reward"]) for line in lines if line["kind"] == "reward"]
    assert steps == [("grpo-countdown", i + 1, r) for i, r in enumerate(rewards)] + [
        ("grpo-gsm", i + 1, r) for i, r in enumerate([0.1, 0.2, 0.4, 0.5])]
    stage_lines = {line["stage"]: line for line in lines if line["kind"] == "stage"}
    assert stage_lines["pretrain"]["final_eval_loss"] == 6.5 and stage_lines["sft"]["train_seconds"] == 95.0
    assert stage_lines["sft"]["first_loss"] == 3.0 and stage_lines["sft"]["last_loss"] == 0.5

    summary = (out / "summary.md").read_text()
    assert "| countdown | 200 | 0.0% | 20.0% | 30.0% | +10.0% (± 8.6%) | True |" in summary
    assert "0.055 → 0.255 (10 steps each)" in summary
    assert "| gsm | 200 | 0.0% | 5.0% | n/a | n/a | n/a |" in summary
    assert "**not measured**" in summary  # gsm has no accuracy after GRPO
    assert "### grpo-gsm (timeout, rc=timeout)" in summary and "RuntimeError: killed here" in summary
    assert "| sft | ok | 10 | 95 | 400 |" in summary


def test_reward_windows_and_gain():
    assert driver.reward_windows([1.0]) is None
    assert driver.reward_windows([1.0, 2.0, 3.0]) == {"window": 1, "first": 1.0, "last": 3.0}
    windows = driver.reward_windows([float(i) for i in range(40)])
    assert windows == {"window": 10, "first": 4.5, "last": 34.5}
    gain, error, paired = driver.gain_and_error(0.5, 0.6, 100, 100)
    assert gain == pytest.approx(0.1) and error == pytest.approx(math.sqrt(0.25 / 100 + 0.24 / 100)) and not paired
    # the same 100 problems: 50 right before; after, those 50 and 12 more, but 2 of the 50 lost (+10 points)
    before = [1] * 50 + [0] * 50
    after = [1] * 48 + [0] * 2 + [1] * 12 + [0] * 38
    gain, error, paired = driver.gain_and_error(0.5, 0.6, 100, 100, before, after)
    changes = [a - b for a, b in zip(after, before)]  # twelve +1, two -1, 86 zeros
    variance = (12 * (1 - 0.1) ** 2 + 2 * (-1 - 0.1) ** 2 + 86 * 0.1 ** 2) / 99
    assert paired and gain == pytest.approx(0.1) and sum(changes) == 10
    assert error == pytest.approx(math.sqrt(variance / 100))  # 0.0348: half the independent 0.0700
    assert driver.gain_and_error(0.5, 0.6, 100, 100, before, after[:99])[2] is False  # not the same problems


def test_data_stage_checks_settings_and_explains_a_missing_generator(tmp_path, monkeypatch):
    args = driver.parse_args(["--output_dir", str(tmp_path / "out"), "--data_dir", str(tmp_path / "data")])
    assert driver.stale_tasks(args) == ["gsm", "countdown", "arithmetic"]
    write_manifest(args, {"gsm": 1, "countdown": 1, "arithmetic": 1})
    assert driver.stale_tasks(args) == []
    assert driver.prepare_data(args, print)["generated"] == []  # reused: nothing to generate
    changed = driver.parse_args(["--output_dir", str(tmp_path / "out"), "--data_dir", str(tmp_path / "data"),
                                 "--task_kwargs", json.dumps({"countdown": {"max_numbers": 4}})])
    assert driver.stale_tasks(changed) == ["gsm", "countdown", "arithmetic"]  # other generator settings
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "reasoning_gym" else real_find_spec(name, *a))
    result = driver.prepare_data(changed, print)
    assert result["status"] == "failed" and "reasoning-gym is not installed" in result["log_tail"]
    assert "--stages data" in result["log_tail"]


# ------------------------------------------------------------------------------- trainer options the driver uses


@pytest.mark.skipif(not HAS_REASONING_GYM, reason="needs reasoning-gym")
def test_generator_filters_and_local_held_out_files(tmp_path):
    from modeling_moe.trainers.reasoning_data import build_datasets, generate_task_examples

    examples = generate_task_examples("gsm", 30, 0, max_reasoning_steps=2, max_answer=50)
    assert len(examples) == 30
    for example in examples:
        reasoning = example["completion"][0]["content"].split("<think>")[1].split("</think>")[0]
        assert len([line for line in reasoning.splitlines() if line.strip()]) <= 2
        assert abs(float(example["answer"])) <= 50
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps(e) + "\n" for e in examples[:5]))
    train, evaluation = build_datasets("countdown", 3, 7, seed=0, eval_tasks=str(held_out), with_completion=False)
    assert len(train) == 3 and evaluation["prompt"] == [e["prompt"] for e in examples[:5]]
    assert "completion" not in evaluation.column_names and evaluation["answer"] == [e["answer"]
                                                                                    for e in examples[:5]]


def test_local_files_need_no_reasoning_gym(tmp_path, monkeypatch):
    """The GPU image has no reasoning-gym: the trainers' data comes from the data stage's files alone."""
    from modeling_moe.trainers.reasoning_data import build_datasets, make_prompt

    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # any import of it now fails
    rows = [{"prompt": make_prompt(f"Using the numbers 3, 4, 5, reach {t}."), "completion": [
        {"role": "assistant", "content": "<think>\nx\n</think>\n<answer>3+4</answer>"}], "task": "countdown",
             "answer": None, "numbers": [3, 4, 5], "target": t} for t in (7, 12, 9)]
    for name, part in (("train", rows[:2]), ("eval", rows[2:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    train, evaluation = build_datasets(str(tmp_path / "train.jsonl"), 100, 100,
                                       eval_tasks=str(tmp_path / "eval.jsonl"), with_completion=False)
    assert train["target"] == [7, 12] and evaluation["target"] == [9] and evaluation["numbers"] == [[3, 4, 5]]
    assert "completion" not in train.column_names


def test_time_limit_callback_stops_training():
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from modeling_moe.trainers.sft import TimeLimitCallback

    for seconds, stops in ((0.0, True), (3600.0, False)):
        for strategy in ("steps", "no"):
            callback, control = TimeLimitCallback(seconds), TrainerControl()
            callback.on_train_begin(None, TrainerState(), control)
            callback.on_step_end(SimpleNamespace(save_strategy=strategy), TrainerState(), control)
            assert control.should_training_stop is stops
            assert control.should_save is (stops and strategy == "steps")


# ---------------------------------------------------------------------------------------------------- dry run


@pytest.mark.slow
@pytest.mark.skipif(not HAS_REASONING_GYM, reason="the data stage needs reasoning-gym")
def test_small_dry_run(tmp_path):
    """The whole recipe on the CPU; every number of the summary must be the one its stage wrote."""
    out, work = tmp_path / "out", tmp_path / "work"
    command = [sys.executable, str(SCRIPT), "--small", "--output_dir", str(out), "--work_dir", str(work)]
    process = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    files = {p.name for p in out.iterdir()}
    assert {"summary.md", "results.jsonl", "pretrain.loss.png"} <= files and len(files) <= 8
    if HAS_MATPLOTLIB:
        assert {"accuracy.png", "rewards.png"} <= files

    data = work / "data"
    for task in ("gsm", "countdown", "arithmetic"):
        splits = {split: {json.loads(line)["prompt"][-1]["content"]
                          for line in (data / f"{task}-{split}.jsonl").read_text().splitlines()}
                  for split in ("train", "eval", "rl")}
        assert {split: len(questions) for split, questions in splits.items()} == {"train": 8, "eval": 4, "rl": 8}
        assert not splits["train"] & splits["eval"] and not splits["rl"] & (splits["train"] | splits["eval"])
    # The pretraining mix: the corpus documents, then each SFT training example (24) as chat text, nothing held out.
    mix = [json.loads(line)["text"] for line in (data / "pretrain-mix.jsonl").read_text().splitlines()]
    examples = [text for text in mix if "<answer>" in text]
    assert len(examples) == 24 and len(mix) > 24
    held_out_questions = [json.loads(line)["prompt"][-1]["content"] for task in ("gsm", "countdown", "arithmetic")
                          for line in (data / f"{task}-eval.jsonl").read_text().splitlines()]
    assert not any(question in text for question in held_out_questions for text in examples)

    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    stage_lines = {line["stage"]: line for line in lines if line["kind"] == "stage"}
    assert all(stage_lines[name]["status"] == "ok" for name in ("data", "pretrain", "sft", "grpo-countdown",
                                                                 "grpo-gsm"))
    pretrain_summary = json.loads((work / "pretrain" / "pretrain_summary.json").read_text())
    assert stage_lines["pretrain"]["final_eval_loss"] == pretrain_summary["final_eval_loss"]
    assert stage_lines["pretrain"]["steps"] == pretrain_summary["global_step"] == 3

    accuracy = {name: json.loads((work / name / "accuracy.json").read_text())
                for name in ("sft", "grpo-countdown", "grpo-gsm")}
    for name, written in accuracy.items():
        for when in ("before", "after"):
            expected = {k: v for k, v in written[when].items() if k != "samples"}
            assert stage_lines[name][f"accuracy_{when}"] == expected
    assert accuracy["sft"]["after"]["n"] == 8  # the held-out files of both GRPO tasks
    assert accuracy["sft"]["after"]["countdown/n"] == accuracy["sft"]["after"]["gsm/n"] == 4
    rows = {line["task"]: line for line in lines if line["kind"] == "task"}
    summary = (out / "summary.md").read_text()
    for task, row in rows.items():
        grpo = accuracy[f"grpo-{task}"]
        assert row["accuracy_pretrain"] == accuracy["sft"]["before"][f"{task}/accuracy"]
        assert row["accuracy_sft"] == accuracy["sft"]["after"][f"{task}/accuracy"]
        assert row["format_sft"] == accuracy["sft"]["after"][f"{task}/format"]
        assert row["accuracy_grpo"] == grpo["after"]["accuracy"] and row["n_grpo"] == 4
        history = json.loads((work / f"grpo-{task}" / "trainer_state.json").read_text())["log_history"]
        rewards = [r["reward"] for r in history if "reward" in r]
        assert len(rewards) == row["grpo_steps"] == 2
        assert (row["reward_first"], row["reward_last"]) == (rewards[0], rewards[1])  # one step each
        assert [(r["step"], r["reward"]) for r in lines if r["kind"] == "reward" and r["task"] == task] == [
            (r["step"], r["reward"]) for r in history if "reward" in r]
        # The trainers' progressive log holds the same records as their final trainer_state.json.
        progressive = [json.loads(line) for line in
                       (work / f"grpo-{task}" / "log_history.jsonl").read_text().splitlines()]
        assert progressive == history
        assert (f"| {task} | 4 | {row['accuracy_pretrain']:.1%} | {row['accuracy_sft']:.1%} | "
                f"{row['accuracy_grpo']:.1%} |") in summary
    for name in ("pretrain", "sft", "grpo-countdown", "grpo-gsm"):
        assert f"| {name} | ok | {stage_lines[name]['wall_s']:.3g} |" in summary


def test_help_states_the_size_defaults():
    """Every option whose default comes from SIZE_DEFAULTS says that default (GPU; small) in its help."""
    import re

    def shown(value):
        return f"{value:g}" if isinstance(value, float) else str(value)

    checked = 0
    for action in driver.build_parser()._actions:
        if action.dest not in driver.SIZE_DEFAULTS or action.help is None:
            continue
        match = re.search(r"default ([^;]+); small: ([^)]+)\)", " ".join(action.help.split()))
        if match is None or action.dest == "completion_tokens":  # a list, written out in words
            continue
        gpu, small = driver.SIZE_DEFAULTS[action.dest]
        assert (re.split(r"[:,]", match.group(1))[0], match.group(2)) == (shown(gpu), shown(small)), action.dest
        checked += 1
    assert checked >= 15


def test_gain_is_paired_when_each_problems_outcome_is_recorded(tmp_path):
    """The GRPO run's evaluations record each problem's 0/1 outcome: the gain's error is then the paired one, and the
    table says so. 10 of 100 problems gained, none lost: +10 points, paired s.e. 0.030 (independent: 0.061)."""
    args = driver.parse_args(["--output_dir", str(tmp_path), "--grpo_tasks", "countdown"])
    before, after = [1] * 20 + [0] * 80, [1] * 30 + [0] * 70
    evaluation = lambda acc, outcomes: {"accuracy": acc, "n": 100, "countdown/accuracy": acc,  # noqa: E731
                                         "countdown/n": 100, "countdown/correct": outcomes}
    stage = driver.Stage("grpo-countdown", "grpo", "countdown", result={
        "accuracy_before": evaluation(0.2, before), "accuracy_after": evaluation(0.3, after)})
    (row,) = driver.task_rows([stage], args)
    assert row["grpo_gain"] == pytest.approx(0.1) and row["grpo_gain_paired"] is True
    assert row["grpo_gain_se"] == pytest.approx(math.sqrt((10 * 0.9 ** 2 + 90 * 0.1 ** 2) / 99 / 100))
    assert row["measurably_higher"] is True
    assert "+10.0% (± 6.0%, paired)" in "\n".join(driver.accuracy_table([row]))


def test_sft_eval_samples_sets_the_sft_stages_evaluation(tmp_path, capsys):
    """--sft_eval_samples: how many held-out problems the SFT stage evaluates (0: none; the GRPO runs still evaluate
    every --eval_samples); negative counts are refused by name."""
    argv = ["--output_dir", str(tmp_path / "out"), "--work_dir", str(tmp_path / "work"),
            "--data_dir", str(tmp_path / "data"), "--list", "--stages", "sft,grpo",
            "--eval_samples", "4000"]
    write_manifest(driver.parse_args(argv), {"gsm": 167, "countdown": 66, "arithmetic": 58})

    def flag(stage: str, extra: list[str]) -> str:
        assert driver.main(argv + extra) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(stage))
        words = shlex.split(line.split(": ", 1)[1])
        return words[words.index("--accuracy_eval_samples") + 1]

    assert flag("sft", []) == "8000"  # every held-out problem of both GRPO tasks
    assert flag("sft", ["--sft_eval_samples", "0"]) == "0"
    assert flag("grpo-gsm", ["--sft_eval_samples", "0"]) == "4000"
    with pytest.raises(SystemExit):
        driver.parse_args(argv + ["--sft_eval_samples", "-1"])
    assert "--sft_eval_samples must be >= 0" in capsys.readouterr().err


"""Reasoning tasks for SFT and GRPO: generated offline by `reasoning-gym`, formatted as chat, with held-out splits.

Every example has the same columns, so tasks mix freely:

- `prompt`: `[{"role": "system", ...}, {"role": "user", ...}]` (TRL's conversational prompt);
- `completion`: `[{"role": "assistant", "content": "<think>\\n...\\n</think>\\n<answer>...</answer>"}]`, the SFT
  target (reasoning inside `<think>`, the result alone inside `<answer>`: the format the GRPO rewards check);
- `task`; `answer` (the reference result, None for countdown); `numbers` and `target` (countdown only): the columns
  the rewards of `modeling_moe.trainers.rewards` read.

Tasks (`--task`, comma-separated for a mixture):

- `gsm`: `gsm_symbolic` grade-school word problems; the target reasoning is the generator's own chain of thought.
- `countdown`: reach `target` with `numbers` (each at most once) and `+ - * /`; 3-4 numbers, targets 10-100 by default
  (TinyZero's setting); the target reasoning evaluates the generator's solution step by step.
- `arithmetic`: `basic_arithmetic` expressions (2-4 terms of 1-2 digits by default), reasoning step by step.
- a path: a local `.jsonl` / `.json` / `.parquet` / `.csv` file or a `save_to_disk` folder, either in TRL's formats
  (`prompt`[+`completion`], `messages`, `text`) or with `question` and `answer` columns (plus an optional `cot`), which
  are put in the format above.

The evaluation split of a task is generated with another seed and never repeats a training question.

Besides its generator's settings, a task takes two filters (`task_kwargs`), which keep a subset of the generated
examples: `max_reasoning_steps` (lines of the target reasoning, e.g. 3 keeps the gsm problems solved in at most three
steps) and `max_answer` (largest absolute numeric answer).

The chat template (`CHAT_TEMPLATE`, stored in the tokenizer by `set_chat_template`) is plain text, since the GPT-2
tokenizer of the presets has no chat tokens::

    {system}\\n\\nUser: {question}\\nAssistant:\\n{answer}<|endoftext|>

The generation prompt is `Assistant:\\n`, so a prompt rendered for generation is a prefix of the full conversation,
token for token (the newline always ends a GPT-2 pre-token).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence

from .rewards import (
    ExpressionError,
    evaluate,
    extract_answer,
    format_number,
    is_correct_answer,
    is_countdown_solution,
    is_well_formatted,
    parse_expression,
    parse_number,
)

SYSTEM_PROMPT = (
    "Think step by step inside <think> </think>, then give only the final result inside <answer> </answer>."
)

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ 'User: ' + message['content'] + '\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'Assistant:\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{{ '' if loop.last else '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:\n' }}{%- endif -%}"
)

TASKS = ("gsm", "countdown", "arithmetic")
TASK_ALIASES = {"gsm_symbolic": "gsm", "basic_arithmetic": "arithmetic"}
DEFAULT_TASK_KWARGS = {
    "gsm": {},
    "countdown": {"min_numbers": 3, "max_numbers": 4, "min_target": 10, "max_target": 100},
    "arithmetic": {"min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 2},
}
_GENERATORS = {"gsm": "gsm_symbolic", "countdown": "countdown", "arithmetic": "basic_arithmetic"}
EVAL_SEED_OFFSET = 1_000_003
RL_SEED_OFFSET = 2_000_003  # GRPO prompts, apart from the SFT and held-out questions (recipe_runs' data stage)
FILTER_KWARGS = ("max_reasoning_steps", "max_answer")


def set_chat_template(tokenizer, overwrite: bool = False):
    """Store `CHAT_TEMPLATE` in `tokenizer` (kept if it already has a template, unless `overwrite`); returns it."""
    if overwrite or not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# ------------------------------------------------------------------------------------------------------- examples


def make_prompt(question: str, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": question.strip()}]


def format_completion(reasoning: str, answer: str) -> str:
    return f"<think>\n{reasoning.strip()}\n</think>\n<answer>{answer.strip()}</answer>"


def _example(task, question, reasoning, answer=None, numbers=None, target=None, result=None,
             system_prompt=SYSTEM_PROMPT):
    return {
        "prompt": make_prompt(question, system_prompt),
        "completion": [{"role": "assistant", "content": format_completion(reasoning, result if result else answer)}],
        "task": task,
        "answer": answer,
        "numbers": numbers,
        "target": target,
    }


def _operand(value) -> str:
    text = format_number(value)
    return f"({text})" if text.startswith("-") else text


def expression_steps(expression: str) -> list[str]:
    """`a op b = c` lines evaluating `expression` in order (the SFT reasoning of countdown and arithmetic)."""
    steps = []
    evaluate(parse_expression(expression), steps)
    lines = []
    for left, op, right, result in steps:
        if op == "neg":
            lines.append(f"-({format_number(right)}) = {format_number(result)}")
        else:
            lines.append(f"{format_number(left)} {op} {_operand(right)} = {format_number(result)}")
    return lines


def gsm_example(item: dict, system_prompt: str | None = SYSTEM_PROMPT) -> dict:
    cot = item["metadata"].get("answer_cot", "")
    reasoning = "\n".join(line for line in cot.strip().splitlines() if not line.startswith("####"))
    return _example("gsm", item["question"], reasoning, answer=str(item["answer"]).strip(),
                    system_prompt=system_prompt)


def countdown_question(numbers: Sequence[int], target: int) -> str:
    return (f"Using the numbers {', '.join(map(str, numbers))}, write an arithmetic expression that equals {target}. "
            "Use +, -, *, / and parentheses; each number at most once.")


def countdown_example(item: dict, system_prompt: str | None = SYSTEM_PROMPT) -> dict:
    meta = item["metadata"]
    numbers, target, expression = list(meta["numbers"]), int(meta["target"]), meta["expression"]
    header = f"Numbers: {', '.join(map(str, numbers))}. Target: {target}."
    reasoning = "\n".join([header, *expression_steps(expression)])
    return _example("countdown", countdown_question(numbers, target), reasoning, numbers=numbers, target=target,
                    result=expression, system_prompt=system_prompt)


def arithmetic_example(item: dict, system_prompt: str | None = SYSTEM_PROMPT) -> dict:
    expression = item["metadata"]["expression"]
    try:
        reasoning = "\n".join(expression_steps(expression)) or expression
    except ExpressionError:
        reasoning = expression
    return _example("arithmetic", item["question"], reasoning, answer=str(item["answer"]).strip(),
                    system_prompt=system_prompt)


_EXAMPLE_BUILDERS: dict[str, Callable[[dict, str | None], dict]] = {
    "gsm": gsm_example,
    "countdown": countdown_example,
    "arithmetic": arithmetic_example,
}


def canonical_task(name: str) -> str:
    name = name.strip().lower()
    return TASK_ALIASES.get(name, name)


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    """`"countdown"`, `"gsm,countdown"` or a list: the task names or paths, in order."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    return [canonical_task(p) if canonical_task(p) in TASKS else p.strip() for p in parts if p.strip()]


def _reasoning_steps(example: dict) -> int:
    content = example["completion"][0]["content"]
    reasoning = content.partition("<think>")[2].partition("</think>")[0]
    return sum(1 for line in reasoning.splitlines() if line.strip())


def _passes(example: dict, max_reasoning_steps: int | None = None, max_answer: float | None = None) -> bool:
    if max_reasoning_steps is not None and _reasoning_steps(example) > max_reasoning_steps:
        return False
    if max_answer is not None and example["answer"] is not None:
        value = parse_number(example["answer"])
        return value is not None and abs(value) <= max_answer
    return True


def generate_task_examples(task: str, size: int, seed: int, system_prompt: str | None = SYSTEM_PROMPT,
                           exclude_questions: set | None = None, **task_kwargs) -> list[dict]:
    """`size` distinct examples of a reasoning-gym task generated with `seed`, none of whose questions is in
    `exclude_questions`; `task_kwargs` go to the generator's config (defaults: `DEFAULT_TASK_KWARGS`), except the
    filters `max_reasoning_steps` and `max_answer`, which drop the examples beyond them."""
    import reasoning_gym

    task = canonical_task(task)
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose from {', '.join(TASKS)} or pass a local dataset path.")
    kwargs = {**DEFAULT_TASK_KWARGS[task], **task_kwargs}
    filters = {name: kwargs.pop(name) for name in FILTER_KWARGS if kwargs.get(name) is not None}
    seen = set(exclude_questions or ())
    examples, attempt = [], 0
    while len(examples) < size:
        if attempt > 20:
            raise RuntimeError(f"Could not generate {size} distinct {task} questions (filters: {filters}).")
        # Over-generate a little since repeated (and filtered) questions are skipped, more with each attempt; a new
        # seed per attempt stays deterministic.
        missing = size - len(examples)
        batch = reasoning_gym.create_dataset(_GENERATORS[task], size=(missing + missing // 4 + 4) * (attempt + 1),
                                             seed=seed + attempt * 7919, **kwargs)
        for item in batch:
            example = _EXAMPLE_BUILDERS[task](item, system_prompt)
            question = example["prompt"][-1]["content"]
            if question in seen or not _passes(example, **filters):
                continue
            seen.add(question)
            examples.append(example)
            if len(examples) == size:
                break
        attempt += 1
    return examples


def _to_dataset(rows: list[dict]):
    import datasets

    return datasets.Dataset.from_list(rows)


def _question_of(example: dict) -> str | None:
    prompt = example.get("prompt")
    if isinstance(prompt, list) and prompt:
        return prompt[-1].get("content")
    return prompt if isinstance(prompt, str) else None


def load_local_dataset(path: str, system_prompt: str | None = SYSTEM_PROMPT):
    """A local dataset: a `.jsonl`/`.json`/`.parquet`/`.csv` file or a `save_to_disk` folder (`split="train"` of a
    DatasetDict). Rows with `question`/`answer` and no `prompt` are put in the reasoning chat format."""
    import datasets

    extension = os.path.splitext(path)[1].lower()
    builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    if os.path.isdir(path):
        dataset = datasets.load_from_disk(path)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset["train"]
    elif extension in builders:
        dataset = datasets.load_dataset(builders[extension], data_files=path, split="train")
    else:
        raise ValueError(f"{path!r} is not a task ({', '.join(TASKS)}) nor a local .jsonl/.json/.parquet/.csv file "
                         "or dataset folder.")
    columns = set(dataset.column_names)
    if "prompt" not in columns and "messages" not in columns and "text" not in columns and "question" in columns:
        if "answer" in columns:  # numbers or text: one type for every row (and for mixing with generated tasks)
            dataset = dataset.cast_column("answer", datasets.Value("string"))

        def convert(row):
            answer = row.get("answer")
            reasoning = row.get("cot") or row.get("reasoning") or row.get("answer_cot") or ""
            completion = None if answer is None else [
                {"role": "assistant", "content": format_completion(reasoning, answer)}]
            return {"prompt": make_prompt(row["question"], system_prompt), "completion": completion, "answer": answer}

        dataset = dataset.map(convert)
    return dataset


def build_datasets(tasks: str | Sequence[str], train_size: int, eval_size: int = 0, seed: int = 0,
                   system_prompt: str | None = SYSTEM_PROMPT, task_kwargs: dict | None = None,
                   with_completion: bool = True, eval_tasks: str | Sequence[str] | None = None,
                   train_seed: int | None = None):
    """(train, eval) `datasets.Dataset`s: `train_size` and `eval_size` examples per generated task, shuffled with
    `seed`; the evaluation split uses another seed and excludes every training question. `task_kwargs` maps a task
    to its generator's settings (e.g. `{"countdown": {"max_numbers": 5}}`). A local path contributes its whole
    dataset to train (none to eval). `eval_tasks` (local paths) replaces the generated evaluation split, e.g. with
    files generated where reasoning-gym is installed. `eval` is None when there is no evaluation example.
    `with_completion=False` drops the SFT targets (GRPO prompts). `train_seed` (default `seed`) generates the training
    examples from another seed while the evaluation split is drawn from `seed`'s (GRPO: prompts apart from SFT's
    examples; the held-out problems exclude the prompts, so in a small task space they can differ from SFT's)."""
    import datasets

    task_kwargs = task_kwargs or {}
    train_parts, eval_rows, generated = [], [], []
    for task in parse_tasks(tasks):
        if task in TASKS:
            kwargs = task_kwargs.get(task, {})
            rows = generate_task_examples(task, train_size, seed if train_seed is None else train_seed, system_prompt,
                                          **kwargs)
            seen = {_question_of(r) for r in rows}
            if eval_size and not eval_tasks:
                eval_rows += generate_task_examples(task, eval_size, seed + EVAL_SEED_OFFSET, system_prompt,
                                                    exclude_questions=seen, **kwargs)
            generated += rows
        else:
            part = load_local_dataset(task, system_prompt)
            if with_completion and "completion" in part.column_names:  # SFT: only the rows with an answer
                part = part.filter(lambda row: row["completion"] is not None)
            train_parts.append(part)
    if generated:
        random.Random(seed).shuffle(generated)
        train_parts.insert(0, _to_dataset(generated))
    if not train_parts:
        raise ValueError("No task given.")
    train = train_parts[0] if len(train_parts) == 1 else datasets.concatenate_datasets(train_parts)
    evaluation = _to_dataset(eval_rows) if eval_rows else None
    if eval_tasks:
        parts = [load_local_dataset(path, system_prompt) for path in parse_tasks(eval_tasks)]
        evaluation = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if not with_completion:
        train = train.remove_columns([c for c in ("completion",) if c in train.column_names])
        if evaluation is not None:
            evaluation = evaluation.remove_columns([c for c in ("completion",) if c in evaluation.column_names])
    return train, evaluation


# ----------------------------------------------------------------------------------------------------- evaluation


def score_completion(example: dict, text: str) -> dict:
    """`format` and `correct` (0/1) of a generated completion for a dataset row."""
    answer = extract_answer(text)
    if example.get("numbers") is not None and example.get("target") is not None:
        correct = is_countdown_solution(answer, example["numbers"], example["target"])
    else:
        correct = is_correct_answer(answer, example.get("answer"))
    return {"format": float(is_well_formatted(text)), "correct": float(correct)}


def prompt_text(tokenizer, prompt) -> str:
    """The text a prompt is generated from, as TRL renders it: a conversation (`[{"role": ..., "content": ...}]`)
    through the chat template with the generation prompt, a plain string (TRL's standard format) as it is."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def evaluate_accuracy(model, tokenizer, dataset, max_new_tokens: int = 256, batch_size: int = 16,
                      num_samples: int | None = None, do_sample: bool = False, keep: int = 4) -> dict:
    """Generate an answer for each prompt of `dataset` (greedy by default) and score it: mean `accuracy` and `format`,
    the number of examples `n` and each example's 0/1 outcome `correct`, in dataset order (overall, and per task as
    `<task>/accuracy`, ...: two evaluations of one set are then compared problem by problem), and the first `keep`
    `samples`."""
    import torch

    rows = [dataset[i] for i in range(len(dataset) if num_samples is None else min(num_samples, len(dataset)))]
    set_chat_template(tokenizer)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    scores, samples = [], []
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            texts = [prompt_text(tokenizer, r["prompt"]) for r in batch]
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            inputs = {k: v.to(model.device) for k, v in inputs.items()}
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            completions = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for row, text in zip(batch, completions):
                score = score_completion(row, text)
                scores.append((row.get("task"), score))
                if len(samples) < keep:
                    samples.append({"question": _question_of(row), "completion": text, **score})
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    result = {"n": len(scores), "samples": samples}
    if scores:
        result["accuracy"] = sum(s["correct"] for _, s in scores) / len(scores)
        result["format"] = sum(s["format"] for _, s in scores) / len(scores)
        result["correct"] = [int(s["correct"]) for _, s in scores]
        for task in sorted({t for t, _ in scores if t}):
            task_scores = [s for t, s in scores if t == task]
            result[f"{task}/accuracy"] = sum(s["correct"] for s in task_scores) / len(task_scores)
            result[f"{task}/format"] = sum(s["format"] for s in task_scores) / len(task_scores)
            result[f"{task}/n"] = len(task_scores)
            result[f"{task}/correct"] = [int(s["correct"]) for s in task_scores]
    return result


def dump_json(data, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)


__all__ = [
    "CHAT_TEMPLATE",
    "SYSTEM_PROMPT",
    "TASKS",
    "build_datasets",
    "evaluate_accuracy",
    "expression_steps",
    "generate_task_examples",
    "load_local_dataset",
    "make_prompt",
    "parse_tasks",
    "score_completion",
    "set_chat_template",
]

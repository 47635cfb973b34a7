"""End-to-end demo on the embedded defaults, on a CPU in minutes:

1. build the `tiny` preset (MLA, sigmoid group-limited routing, shared experts, MTP);
2. pretrain it a few steps on the embedded English corpus (Wikipedia + news from gensim's wheel, GPT-2 BPE), with
   aux-loss-free load balancing updating the expert biases after every optimizer step;
3. save it with `save_pretrained` (weights as safetensors, code files and `auto_map` included);
4. reload it in a fresh Python process through `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`
   and generate.

    python -m modeling_moe.demo --output_dir outputs/demo
"""

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import textwrap

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup, set_seed

from modeling_moe.presets import load_preset_config, preset_path
from modeling_moe.trainers.data import PackedCorpus, load_corpus_texts, tokenize_documents, train_eval_split

logger = logging.getLogger("modeling_moe.demo")

GENERATE_IN_FRESH_PROCESS = textwrap.dedent(
    """
    import sys
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, prompt, max_new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    print(f"loaded {type(model).__module__}.{type(model).__name__} through trust_remote_code")
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    print(repr(tokenizer.decode(output[0], skip_special_tokens=True)))
    """
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo", help="where the model, metrics and plot are written")
    parser.add_argument("--model_config", default="tiny", help="a hub_configs preset name or a folder with config.json")
    parser.add_argument("--max_steps", type=int, default=40, help="optimizer steps of pretraining")
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per packed training sequence")
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--warmup_steps", type=int, default=5)
    parser.add_argument("--logging_steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default="The history of the city")
    parser.add_argument("--max_new_tokens", type=int, default=20)
    return parser.parse_args(argv)


@torch.no_grad()
def evaluate(model, dataset, batch_size) -> float:
    model.eval()
    losses = [model(**batch).loss.item() for batch in DataLoader(dataset, batch_size=batch_size)]
    model.train()
    return sum(losses) / len(losses)


def pretrain(model, train_set, eval_set, args) -> list[dict]:
    """A minimal pretraining loop; `modeling_moe.trainers.pretrain` is the full accelerate trainer."""
    loader = DataLoader(train_set, batch_size=args.per_device_train_batch_size, shuffle=True, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.1, betas=(0.9, 0.95))
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    history = [{"step": 0, "eval_loss": evaluate(model, eval_set, args.per_device_train_batch_size)}]
    model.train()
    batches = iter(())
    progress = tqdm(range(1, args.max_steps + 1), desc="pretraining", unit="step")
    for step in progress:
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        output = model(**batch)
        output.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        balance = model.update_expert_bias()
        # The training loss also holds the weighted MTP loss; log the language-modelling part, comparable to eval.
        lm_loss = model.loss_function(logits=output.logits, labels=batch["labels"], vocab_size=model.config.vocab_size)
        record = {"step": step, "loss": lm_loss.item(), "train_objective": output.loss.item(), "grad_norm": grad_norm.item(), "lr": scheduler.get_last_lr()[0],
                  "maxvio": [round(v, 4) for v in balance["maxvio"].tolist()]}
        progress.set_postfix(loss=f"{record['loss']:.3f}", maxvio=f"{max(record['maxvio']):.2f}")
        if step % args.logging_steps == 0 or step == args.max_steps:
            record["eval_loss"] = evaluate(model, eval_set, args.per_device_train_batch_size)
            logger.info(json.dumps(record))
        history.append(record)
    return history


def plot_losses(history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    ax.plot(*zip(*train), label="training LM loss")
    ax.plot(*zip(*evals), "o-", label="held-out LM loss")
    ax.axhline(math.log(50257), color="grey", linestyle=":", label="uniform over the vocabulary")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    set_seed(args.seed)
    torch.set_num_threads(max(os.cpu_count() or 1, 1))

    tokenizer = AutoTokenizer.from_pretrained(preset_path(args.model_config) if os.sep not in args.model_config
                                              else args.model_config)
    documents = load_corpus_texts()
    train_docs, eval_docs = train_eval_split(documents, eval_fraction=0.05, seed=args.seed)
    train_set = PackedCorpus(tokenize_documents(tokenizer, train_docs), args.seq_len, tokenizer.eos_token_id)
    eval_set = PackedCorpus(tokenize_documents(tokenizer, eval_docs), args.seq_len, tokenizer.eos_token_id)
    logger.info("corpus: %d documents, %d training tokens, %d held-out tokens",
                len(documents), train_set.num_tokens, eval_set.num_tokens)

    config = load_preset_config(args.model_config)
    model = AutoModelForCausalLM.from_config(config)
    counts = model.num_parameters_summary()
    logger.info("model: %s preset, %.2fM parameters, %.2fM activated per token",
                args.model_config, counts["total"] / 1e6, counts["activated"] / 1e6)

    history = pretrain(model, train_set, eval_set, args)

    model_dir = os.path.abspath(os.path.join(args.output_dir, "model"))
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    with open(os.path.join(args.output_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in history)
    plot_losses(history, os.path.join(args.output_dir, "loss.png"))
    logger.info("held-out loss %.3f -> %.3f; saved %s", history[0]["eval_loss"], history[-1]["eval_loss"], model_dir)

    logger.info("reloading with trust_remote_code in a fresh process and generating")
    subprocess.run(
        [sys.executable, "-c", GENERATE_IN_FRESH_PROCESS, model_dir, args.prompt, str(args.max_new_tokens)],
        check=True,
    )


if __name__ == "__main__":
    main()

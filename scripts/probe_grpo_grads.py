"""Diagnostic: where do non-finite gradients come from in a GRPO-shaped step? (Session 4: every countdown GRPO step
had a NaN gradient norm on the GPU, never a gsm one: 192-token batches with left padding hit cuDNN's SDPA backward
bug, pytorch/pytorch#196678, now avoided in `modeling_moe.modeling_moe.let_keyless_queries_see_themselves`.)

Builds TRL-like batches from the recipe's held-out files (chat-template prompts left-padded to a multiple of
`--pad`, the reference completions right-padded likewise), runs the policy (a model folder, e.g. the recipe's
`sft/merged`, or a fresh preset) with LoRA `all` in training mode, backpropagates a policy-gradient loss with random
advantages, and reports per variant (experts implementation x attention implementation) whether the logits and each
gradient are finite, plus the first module (in backward order) whose input gradient is not.

    python scripts/probe_grpo_grads.py --model outputs/recipe_runs/sft/merged --tasks countdown,gsm
"""
import argparse
import json
import time

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_moe.presets import load_preset_config, preset_path
from modeling_moe.trainers import sft
from modeling_moe.trainers.reasoning_data import set_chat_template


def batch(tokenizer, task, size, pad, device):
    rows = [json.loads(line) for line in open(f".devdata/reasoning/{task}-eval.jsonl")][:size]
    prompts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in rows]
    prompts = [tokenizer(p)["input_ids"] for p in prompts]
    completions = [tokenizer(r["completion"][0]["content"])["input_ids"] + [tokenizer.eos_token_id] for r in rows]
    width_p = -(-max(map(len, prompts)) // pad) * pad
    width_c = -(-max(map(len, completions)) // pad) * pad
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask, cmask = [], [], []
    for p, c in zip(prompts, completions):
        ids.append([pad_id] * (width_p - len(p)) + p + c + [pad_id] * (width_c - len(c)))
        mask.append([0] * (width_p - len(p)) + [1] * (len(p) + len(c)) + [0] * (width_c - len(c)))
        cmask.append([1] * len(c) + [0] * (width_c - len(c)))
    as_tensor = lambda x, dtype: torch.tensor(x, dtype=dtype, device=device)  # noqa: E731
    return as_tensor(ids, torch.long), as_tensor(mask, torch.long), as_tensor(cmask, torch.float32)


def first_bad_module(model):
    """Backward hooks recording modules whose gradient w.r.t. their input is non-finite, in backward order."""
    seen, handles = [], []
    for name, module in model.named_modules():
        def hook(module, grad_input, grad_output, name=name):
            if any(g is not None and not torch.isfinite(g).all() for g in grad_input) and all(
                    g is None or torch.isfinite(g).all() for g in grad_output):
                seen.append(name)
        handles.append(module.register_full_backward_hook(hook))
    return seen, handles


def probe(policy, ids, mask, cmask):
    policy.zero_grad(set_to_none=True)
    seen, handles = first_bad_module(policy)
    completion = cmask.shape[1]
    out = policy(input_ids=ids, attention_mask=mask, logits_to_keep=completion + 1, use_cache=False)
    logits = out.logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, -completion:, None]).squeeze(-1)
    advantages = torch.randn(ids.shape[0], 1, device=ids.device, generator=torch.Generator(ids.device).manual_seed(0))
    loss = -(logp * cmask * advantages).sum() / cmask.sum()
    try:
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    bad = [n for n, p in policy.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    return loss.item(), bool(torch.isfinite(out.logits).all()), bad, seen[:3]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Model folder (default: a fresh moe-100m, or tiny on a CPU).")
    parser.add_argument("--tasks", default="countdown,gsm", help="Held-out files of .devdata/reasoning to use.")
    parser.add_argument("--batch", type=int, default=128, help="Sequences per probe (TRL: prompts x generations).")
    parser.add_argument("--pad", type=int, default=32, help="Pad prompts and completions to a multiple of this.")
    parser.add_argument("--experts", default="fused,grouped_mm", help="experts_implementation values to try.")
    parser.add_argument("--attention", default="sdpa,eager", help="attn_implementation values to try.")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    preset = "moe-100m" if device.type == "cuda" else "tiny"
    tokenizer = set_chat_template(AutoTokenizer.from_pretrained(args.model or preset_path(preset)))
    data = {task: batch(tokenizer, task, args.batch, args.pad, device) for task in args.tasks.split(",")}
    for experts in args.experts.split(","):
        for attention in args.attention.split(","):
            torch.manual_seed(0)
            kwargs = dict(dtype=dtype, attn_implementation=attention, experts_implementation=experts)
            model = (AutoModelForCausalLM.from_pretrained(args.model, **kwargs) if args.model else
                     AutoModelForCausalLM.from_config(load_preset_config(preset), **kwargs)).to(device).train()
            lora = sft.MoEModelConfig(use_peft=True, lora_r=32, lora_alpha=64, lora_preset="all")
            policy = get_peft_model(model, sft.moe_lora_config(model, lora))
            for task, (ids, mask, cmask) in data.items():
                start = time.perf_counter()
                loss, finite_logits, bad, modules = probe(policy, ids, mask, cmask)
                print(f"{experts:10s} {attention:6s} {task:10s} {tuple(ids.shape)} loss {loss:.4g} logits finite "
                      f"{finite_logits} non-finite grads {len(bad)} {bad[:3]} first modules {modules} "
                      f"({time.perf_counter() - start:.1f} s)", flush=True)
            del model, policy
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

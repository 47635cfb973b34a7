"""MTP self-speculative decoding vs plain greedy generate() at batch 1, on a trained checkpoint with MTP modules.

    python benchmarks/bench_speculative.py --model outputs/pretrain --dataset .devdata/corpus.jsonl

Prompts: the first `--prompt_tokens` tokens of held-out documents (the corpus' held-out split, as the pretraining
trainer makes it). For each prompt both decoders produce `--new_tokens` tokens (min = max); reported: tokens/s of
each (median over prompts, after one warm-up prompt), the speed-up, the drafts' acceptance rate, and whether the two
outputs are identical (they must be, up to floating-point ties). The anchor is our own plain greedy generate() on
the same model in the same run (transformers has no MTP decoding to compare with), with the same dynamic cache, and
also our fastest plain path: the static latent cache with the decode step in CUDA graphs (on a GPU;
`cache_implementation="static"`), against the speculative decoder on the same static caches with its verification
and draft steps in CUDA graphs. Without a trained MTP module the
acceptance rate is ~0 and speculation only costs time. JSON lines to $OUT/bench_speculative.jsonl (or
benchmarks/out/), one per prompt as it ends (a run cut short keeps its prompts), then the summary.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's modeling_moe
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from modeling_moe import mtp_speculative_decoding  # noqa: E402
from modeling_moe.trainers.data import load_split  # noqa: E402


def prompts(tokenizer, args) -> list[torch.Tensor]:
    _, held_out = load_split(args.dataset)
    out = []
    for doc in held_out:
        ids = tokenizer(doc, return_tensors="pt").input_ids[:, : args.prompt_tokens]
        if ids.shape[1] == args.prompt_tokens:
            out.append(ids)
        if len(out) == args.prompts + 1:
            break
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a checkpoint folder with MTP modules (num_nextn_predict_layers >= 1)")
    parser.add_argument("--dataset", default=None, help="the pretraining dataset (default: the embedded corpus)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt_tokens", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(dev).eval()
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  pad_token_id=tokenizer.eos_token_id)

    def timed(ids, **extra):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids.to(dev), **kwargs, **extra)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out_dir, exist_ok=True)
    records = open(os.path.join(out_dir, "bench_speculative.jsonl"), "w")  # a line per prompt as it ends
    rows = []
    for index, ids in enumerate(prompts(tokenizer, args)):
        plain, plain_s = timed(ids)
        plain_static, static_s = timed(ids, cache_implementation="static")
        spec, spec_s = timed(ids, custom_generate=mtp_speculative_decoding, return_dict_in_generate=True)
        spec_static, spec_static_s = timed(ids, custom_generate=mtp_speculative_decoding, return_dict_in_generate=True,
                                           cache_implementation="static")
        stats = spec.generation_stats
        rows.append(dict(prompt=index, warmup=index == 0, plain_tokens_per_s=args.new_tokens / plain_s,
                         plain_static_tokens_per_s=args.new_tokens / static_s,
                         speculative_tokens_per_s=args.new_tokens / spec_s,
                         speculative_static_tokens_per_s=args.new_tokens / spec_static_s,
                         acceptance=stats["accepted"] / max(stats["drafts"], 1),
                         identical=torch.equal(plain, spec.sequences),
                         identical_static=torch.equal(plain_static, spec_static.sequences)))
        print(json.dumps(rows[-1]), flush=True)
        records.write(json.dumps(rows[-1]) + "\n")
        records.flush()
    timed_rows = [r for r in rows if not r["warmup"]] or rows
    summary = {key: statistics.median(r[key] for r in timed_rows)
               for key in ("plain_tokens_per_s", "plain_static_tokens_per_s", "speculative_tokens_per_s",
                           "speculative_static_tokens_per_s", "acceptance")}
    summary.update(speedup=summary["speculative_tokens_per_s"] / summary["plain_tokens_per_s"],
                   speedup_static=summary["speculative_static_tokens_per_s"] / summary["plain_static_tokens_per_s"],
                   identical=all(r["identical"] for r in rows),
                   identical_static=all(r["identical_static"] for r in rows), prompts=len(timed_rows), device=str(dev),
                   model=args.model, new_tokens=args.new_tokens)
    print(json.dumps(summary))
    records.write(json.dumps(dict(summary=True, **summary)) + "\n")
    records.close()


if __name__ == "__main__":
    main()

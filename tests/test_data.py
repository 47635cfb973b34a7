import pytest
import torch

from modeling_moe.trainers.data import (
    PackedCorpus,
    load_corpus_texts,
    pack_documents,
    strip_wiki_markup,
    tokenize_documents,
    train_eval_split,
)

EOS = 0


def as_lists(blocks):
    return {name: rows.tolist() for name, rows in blocks.items()}


def test_pack_masks_document_starts_and_restarts_positions():
    # stream: 1 2 3 E | 4 5 E 6 | E (dropped: incomplete block)
    blocks = as_lists(pack_documents([[1, 2, 3], [4, 5], [6]], seq_len=4, eos_id=EOS))
    assert blocks["input_ids"] == [[1, 2, 3, 0], [4, 5, 0, 6]]
    assert blocks["labels"] == [[-100, 2, 3, 0], [-100, 5, 0, -100]]
    assert blocks["position_ids"] == [[0, 1, 2, 3], [0, 1, 2, 0]]


def test_pack_document_spanning_blocks():
    # stream: 1 2 3 | 4 5 6 | E 7 E: the continuation of a document restarts its positions but keeps its labels
    blocks = as_lists(pack_documents([[1, 2, 3, 4, 5, 6], [7]], seq_len=3, eos_id=EOS))
    assert blocks["input_ids"] == [[1, 2, 3], [4, 5, 6], [0, 7, 0]]
    assert blocks["labels"] == [[-100, 2, 3], [4, 5, 6], [0, -100, 0]]
    assert blocks["position_ids"] == [[0, 1, 2], [0, 1, 2], [0, 0, 1]]


def test_pack_empty_document_is_a_lone_masked_eos():
    blocks = as_lists(pack_documents([[], [5]], seq_len=2, eos_id=EOS))
    assert blocks == {"input_ids": [[0, 5]], "labels": [[-100, -100]], "position_ids": [[0, 0]]}


def test_pack_too_short_gives_no_block():
    blocks = pack_documents([[1, 2]], seq_len=8, eos_id=EOS)
    assert all(rows.shape == (0, 8) for rows in blocks.values())
    assert pack_documents([], seq_len=8, eos_id=EOS)["input_ids"].shape == (0, 8)


def test_packed_corpus_rows():
    dataset = PackedCorpus([[1, 2, 3], [4, 5], [6]], seq_len=4, eos_id=EOS)
    assert len(dataset) == 2 and dataset.num_tokens == 8
    row = dataset[1]
    assert set(row) == {"input_ids", "labels", "position_ids"}
    assert row["input_ids"].tolist() == [4, 5, 0, 6] and row["input_ids"].dtype == torch.long


def test_split_is_deterministic_disjoint_and_complete():
    docs = [f"doc {i}" for i in range(100)]
    train, evaluation = train_eval_split(docs, eval_fraction=0.1, seed=3)
    assert (train, evaluation) == train_eval_split(docs, eval_fraction=0.1, seed=3)
    assert len(evaluation) == 10 and len(train) == 90
    assert set(train).isdisjoint(evaluation) and sorted(train + evaluation) == sorted(docs)
    assert train == sorted(train, key=docs.index) and evaluation == sorted(evaluation, key=docs.index)
    assert train_eval_split(docs, eval_fraction=0.1, seed=4)[1] != evaluation


def test_split_holds_out_each_length_stratum_in_proportion():
    # 20 long articles among 380 short examples: a random draw of 20 documents holds out 0 to 5 articles, and with
    # them 0% to ~60% of the text; one document from each length stratum is exactly one article and ~5% of the text.
    docs = [f"article {i} " + "x" * 1000 for i in range(20)] + [f"example {i:03d}" for i in range(380)]
    for seed in range(5):
        train, evaluation = train_eval_split(docs, eval_fraction=0.05, seed=seed)
        assert len(evaluation) == 20 and sum(doc.startswith("article") for doc in evaluation) == 1
        share = sum(map(len, evaluation)) / sum(map(len, docs))
        assert abs(share - 0.05) < 0.005


def test_split_edge_cases():
    assert train_eval_split(["a", "b", "c"], eval_fraction=0.0) == (["a", "b", "c"], [])
    assert len(train_eval_split(["a", "b", "c"], eval_fraction=0.01)[1]) == 1
    with pytest.raises(ValueError):
        train_eval_split(["a"], eval_fraction=1.0)


def test_strip_wiki_markup():
    text = (
        "{{Infobox|name={{nested}}}}'''Foo''' is a [[bar (thing)|bar]] near [[Baz]].<ref name=x>cite</ref>\n"
        "[[File:Foo.jpg|thumb|A [[caption]]]]\n== History ==\n* Made in 1900&nbsp;AD.<!-- hidden -->\n"
        "{| class=wikitable\n| cell\n|}\n==References==\n{{reflist}}"
    )
    assert strip_wiki_markup(text) == "Foo is a bar near Baz.\n\nHistory\nMade in 1900\xa0AD."


def test_real_corpus():
    from modeling_moe.tokenization import gpt2_tokenizer

    docs = load_corpus_texts()
    assert len(docs) > 100 and all(doc.strip() for doc in docs)
    assert any(doc.startswith("Anarchism\n") for doc in docs)
    assert any("New South Wales" in doc for doc in docs)
    words = " ".join(docs).split()
    assert words.count("the") / len(words) > 0.03  # English prose, not markup
    assert not any("{{" in doc or "<ref" in doc for doc in docs[:20])

    tokenizer = gpt2_tokenizer()
    blocks = pack_documents(tokenize_documents(tokenizer, docs), seq_len=512, eos_id=tokenizer.eos_token_id)
    assert blocks["input_ids"].numel() > 500_000
    assert (blocks["labels"] == -100).sum() >= len(docs) - 1

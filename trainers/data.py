"""The embedded pretraining corpus, and packing of tokenized documents into fixed-length blocks.

The corpus is real English prose that ships inside the `gensim` wheel (`gensim/test/test_data/`), so pretraining
needs no download: the articles of its shortened English Wikipedia dump, and the news stories of the Lee corpus.
"""

import bz2
import functools
import html
import importlib.util
import random
import re
import xml.etree.ElementTree as ET
from itertools import chain
from pathlib import Path

import torch
from torch.utils.data import Dataset

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_NEWS = "lee_background.cor"
MIN_ARTICLE_CHARS = 500  # what is left of disambiguation pages and stubs is mostly lists of links

_INNERMOST_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_INNERMOST_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.DOTALL)
_INNERMOST_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_TAIL_SECTIONS = re.compile(r"^==+\s*(References|Notes|See also|External links|Further reading|Bibliography)\b", re.M)
_NON_ARTICLE_LINK = re.compile(r"^:?(File|Image|Category|[a-z]{2,3}(-[a-z]+)?):")


def _test_data_dir() -> Path:
    # `find_spec` avoids importing gensim (and with it scipy) just to find its data folder.
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("The pretraining corpus ships with the `gensim` package: pip install gensim")
    return Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data"


def _resolve_link(match: re.Match) -> str:
    target, _, label = match.group(1).rpartition("|")
    if _NON_ARTICLE_LINK.match(target or label):
        return ""
    return label


def _repeat_until_stable(pattern: re.Pattern, repl, text: str) -> str:
    # Templates, tables and links nest: removing the innermost ones first needs no parser.
    while True:
        text, n = pattern.subn(repl, text)
        if n == 0:
            return text


def strip_wiki_markup(text: str) -> str:
    """Plain text of a MediaWiki article: prose and section titles, without templates, tables, formulas, references
    or media."""
    text = _TAIL_SECTIONS.split(text, maxsplit=1)[0]
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    text = re.sub(r"<ref[^>]*/>|<(ref|math|gallery)\b[^>]*>.*?</\1>", "", text, flags=re.DOTALL)
    text = _repeat_until_stable(_INNERMOST_TEMPLATE, "", text)
    text = _repeat_until_stable(_INNERMOST_TABLE, "", text)
    text = _repeat_until_stable(_INNERMOST_LINK, _resolve_link, text)
    text = re.sub(r"\[https?://\S+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^(=+)\s*(.*?)\s*\1\s*$", r"\2", text, flags=re.M)
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.M)
    text = html.unescape(text)
    lines = (line.strip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def load_wikipedia_articles() -> list[str]:
    """Main-namespace, non-redirect articles of gensim's shortened English Wikipedia dump, as plain text."""
    articles = []
    with bz2.open(_test_data_dir() / WIKI_DUMP) as dump:
        for _, element in ET.iterparse(dump):
            if not element.tag.endswith("}page"):
                continue
            fields = {child.tag.rpartition("}")[2]: child for child in element.iter()}
            if fields["ns"].text == "0" and "redirect" not in fields:
                text = strip_wiki_markup(fields["text"].text or "")
                if len(text) >= MIN_ARTICLE_CHARS:
                    articles.append(f"{fields['title'].text}\n\n{text}")
            element.clear()
    return articles


def load_lee_news() -> list[str]:
    """The Lee background corpus: Australian news stories, one per line."""
    lines = (_test_data_dir() / LEE_NEWS).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


@functools.cache
def _corpus() -> tuple[str, ...]:
    return tuple(load_wikipedia_articles() + load_lee_news())


def load_corpus_texts() -> list[str]:
    """All documents of the embedded corpus: Wikipedia articles, then news stories (parsed once per process)."""
    return list(_corpus())


def train_eval_split(docs: list, eval_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Deterministic split of whole documents: `round(len(docs) * eval_fraction)` of them (at least one when the
    fraction is positive) are held out, stratified by length: the documents ordered by length are cut into that many
    consecutive groups and one document is drawn from each. The held-out part then has the corpus's mix of short and
    long documents and about `eval_fraction` of its text; a plain random draw from a mix of a few hundred long articles
    and tens of thousands of short examples can hold out twice the articles' share, which skews the held-out loss and
    expert loads. Both parts keep the original order."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n_eval = max(1, round(len(docs) * eval_fraction)) if eval_fraction > 0 and docs else 0
    if n_eval == 0:
        return list(docs), []
    by_length = sorted(range(len(docs)), key=lambda i: (len(docs[i]), i))
    rng = random.Random(seed)
    bounds = [len(docs) * k // n_eval for k in range(n_eval + 1)]
    held_out = {by_length[rng.randrange(start, end)] for start, end in zip(bounds, bounds[1:])}
    train = [doc for i, doc in enumerate(docs) if i not in held_out]
    evaluation = [doc for i, doc in enumerate(docs) if i in held_out]
    return train, evaluation


def tokenize_documents(tokenizer, docs: list[str]) -> list[list[int]]:
    """Token ids of each document, without special tokens (packing adds the EOS separators)."""
    return tokenizer(docs, add_special_tokens=False)["input_ids"] if docs else []


def pack_documents(token_lists: list[list[int]], seq_len: int, eos_id: int) -> dict[str, torch.Tensor]:
    """Pack tokenized documents into `[num_blocks, seq_len]` tensors `input_ids`, `labels` and `position_ids`.

    Each document is followed by `eos_id`, which belongs to it (the model learns where a document ends), and the
    stream of documents is cut into consecutive blocks; the incomplete last block is dropped.
    - `labels` equal `input_ids` (the model shifts them), except that the first token of every document is -100:
      nothing of its own document precedes it, so it would only be predicted from the previous document's EOS.
    - `position_ids` count from 0 at the first token of every document and of every block, so each piece of a
      document inside a block looks like a sequence of its own (what varlen / document-masked attention expects).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    stream = torch.tensor(list(chain.from_iterable([*doc, eos_id] for doc in token_lists)), dtype=torch.long)
    doc_lengths = torch.tensor([len(doc) + 1 for doc in token_lists], dtype=torch.long)
    starts_doc = torch.zeros(len(stream), dtype=torch.bool)
    starts_doc[doc_lengths.cumsum(0)[:-1]] = True
    if len(stream):
        starts_doc[0] = True

    n_tokens = len(stream) // seq_len * seq_len
    stream, starts_doc = stream[:n_tokens], starts_doc[:n_tokens]
    index = torch.arange(n_tokens)
    restarts = starts_doc | (index % seq_len == 0)
    position_ids = index - torch.where(restarts, index, 0).cummax(0).values
    labels = stream.masked_fill(starts_doc, -100)
    return {
        "input_ids": stream.view(-1, seq_len),
        "labels": labels.view(-1, seq_len),
        "position_ids": position_ids.view(-1, seq_len),
    }


class PackedCorpus(Dataset):
    """Packed documents as a map-style dataset of `{"input_ids", "labels", "position_ids"}` rows (see
    `pack_documents`), ready for `transformers.Trainer` with the default collator."""

    def __init__(self, token_lists: list[list[int]], seq_len: int, eos_id: int):
        self.blocks = pack_documents(token_lists, seq_len, eos_id)

    def __len__(self) -> int:
        return len(self.blocks["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {name: rows[i] for name, rows in self.blocks.items()}

    @property
    def num_tokens(self) -> int:
        return self.blocks["input_ids"].numel()


# ---------------------------------------------------------------------------------------------- local datasets

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SAMPLE_BY = ("line", "paragraph", "document")


class DatasetReadError(ValueError):
    """A dataset path that cannot be read as documents; the message says which file and why."""


def _split_text(text: str, sample_by: str) -> list[str]:
    if sample_by == "document":
        return [text.strip()] if text.strip() else []
    if sample_by == "paragraph":
        return [part.strip() for part in re.split(r"\n\s*\n", text) if part.strip()]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_text_file(path: Path, sample_by: str) -> list[str]:
    try:
        return _split_text(path.read_text(encoding="utf-8"), sample_by)
    except UnicodeDecodeError as error:
        raise DatasetReadError(f"{path} is not UTF-8 text ({error}).") from None


def _read_json_file(path: Path, text_field: str) -> list[str]:
    import json

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DatasetReadError(f"{path} is not UTF-8 text ({error}).") from None
    records = None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise DatasetReadError(f"{path} is not valid JSON: {error}.") from None
    if records is None:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DatasetReadError(f"{path}, line {number}: not a JSON object ({error}).") from None
    docs = []
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict) or text_field not in record:
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DatasetReadError(
                f"{path}, record {number}: no {text_field!r} field (found {found}); pass --dataset_text_field."
            )
        if not isinstance(record[text_field], str):
            raise DatasetReadError(f"{path}, record {number}: {text_field!r} is not a string.")
        if record[text_field].strip():
            docs.append(record[text_field])
    return docs


def _read_parquet_file(path: Path, text_field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetReadError(f"Reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises its own error types for corrupt files
        raise DatasetReadError(f"{path} is not a readable parquet file: {error}") from None
    if text_field not in table.column_names:
        raise DatasetReadError(
            f"{path} has no {text_field!r} column (columns: {table.column_names}); pass --dataset_text_field."
        )
    return [text for text in table.column(text_field).to_pylist() if isinstance(text, str) and text.strip()]


def _is_saved_datasets_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _read_saved_dataset(path: Path, text_field: str) -> tuple[list[str], list[str] | None]:
    try:
        import datasets
    except ImportError:
        raise DatasetReadError(f"{path} is a `datasets` folder; reading it needs: pip install datasets") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:
        raise DatasetReadError(f"{path} could not be loaded with datasets.load_from_disk: {error}") from None

    def texts(split, name):
        if text_field not in split.column_names:
            raise DatasetReadError(
                f"{path}{name} has no {text_field!r} column (columns: {split.column_names}); pass --dataset_text_field."
            )
        return [text for text in split[text_field] if isinstance(text, str) and text.strip()]

    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DatasetReadError(f"{path} holds splits {list(loaded)}, none named 'train'.")
        held_out = next((name for name in ("validation", "test") if name in loaded), None)
        return texts(loaded["train"], "['train']"), texts(loaded[held_out], f"[{held_out!r}]") if held_out else None
    return texts(loaded, ""), None


def load_documents(path, text_field: str = "text", sample_by: str = "line") -> tuple[list[str], list[str] | None]:
    """Documents of a local dataset, and its held-out documents when it has its own split (else None).

    - `.txt` / `.text` / `.md`: one document per non-empty line (`sample_by="line"`, the convention of `datasets`'
      text loader), per blank-line separated paragraph (`"paragraph"`), or the whole file (`"document"`);
    - `.jsonl` (or `.json`, a list or one object per line): the `text_field` of each record;
    - `.parquet`: the `text_field` column;
    - a folder written by `datasets`' `save_to_disk` (a `Dataset`, or a `DatasetDict` with a "train" split and
      optionally "validation" / "test" as held-out documents);
    - any other folder: every file of the kinds above inside it, in name order.

    Raises `FileNotFoundError` for a missing path and `DatasetReadError` (a `ValueError`) naming the file otherwise.
    """
    if sample_by not in SAMPLE_BY:
        raise ValueError(f"sample_by must be one of {SAMPLE_BY}, got {sample_by!r}.")
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Dataset {str(path)!r} does not exist (expected a .txt, .jsonl, .json or .parquet "
                                "file, a folder of them, or a `datasets` folder saved with save_to_disk).")
    if path.is_dir() and _is_saved_datasets_folder(path):
        train, held_out = _read_saved_dataset(path, text_field)
    else:
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        supported = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
        if path.is_dir():
            files = [p for p in files if p.suffix.lower() in supported]
            if not files:
                raise DatasetReadError(f"Folder {path} holds no {', '.join(supported)} files.")
        train, held_out = [], None
        for file in files:
            suffix = file.suffix.lower()
            try:
                if suffix in TEXT_SUFFIXES:
                    train += _read_text_file(file, sample_by)
                elif suffix in JSON_SUFFIXES:
                    train += _read_json_file(file, text_field)
                elif suffix in PARQUET_SUFFIXES:
                    train += _read_parquet_file(file, text_field)
                else:
                    raise DatasetReadError(f"{file}: unsupported dataset format {suffix!r}; use one of {supported}.")
            except OSError as error:
                raise DatasetReadError(f"Cannot read dataset file {file}: {error.strerror or error}.") from None
    if not train:
        raise DatasetReadError(f"Dataset {path} holds no non-empty documents.")
    return train, held_out


def load_split(dataset=None, eval_fraction: float = 0.05, text_field: str = "text",
               sample_by: str = "line") -> tuple[list[str], list[str]]:
    """(training, held-out) documents: the embedded corpus when `dataset` is None, else a local dataset
    (`load_documents`); the held-out part is the dataset's own split, or `eval_fraction` of its documents."""
    if dataset is None:
        documents, held_out = load_corpus_texts(), None
    else:
        documents, held_out = load_documents(dataset, text_field, sample_by)
    if held_out is None:
        documents, held_out = train_eval_split(documents, eval_fraction, seed=0)
    return documents, held_out


def export_corpus(path) -> int:
    """Write the embedded corpus as JSON lines (`{"text": ...}` per document), for machines without gensim: the
    trainer reads it back with `--dataset PATH`. Returns the number of documents."""
    import json

    docs = load_corpus_texts()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    with open(staging, "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    staging.replace(path)
    return len(docs)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Export the embedded pretraining corpus (gensim's Wikipedia and news "
                                                 "text) as a JSON-lines file, for --dataset on machines without gensim.")
    parser.add_argument("path", help="output .jsonl file, e.g. .devdata/corpus.jsonl")
    print(f"wrote {export_corpus(parser.parse_args().path)} documents")

"""Text classification data: tokenizer, vocabulary, TSV and Hugging Face loaders, word vectors, GLUE files.

Offline format (``../shared/data/text/NAME/``): ``train.tsv``/``validation.tsv``/``test.tsv`` with one
``label<TAB>text`` per line (label = integer index into ``labels.txt``, one class name per line). GLUE's own
SST-2 files (``sentence<TAB>label`` with a header row; test ``index<TAB>sentence``) are read by
:func:`read_glue_sst2`, the Kaggle ``IMDB_Dataset.csv`` (``review,sentiment``) by :func:`read_imdb_csv`.
"""

from __future__ import annotations

import csv
import html
import re
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import Dataset

__all__ = [
    "tokenize",
    "Vocab",
    "TextDataset",
    "collate_text",
    "read_tsv",
    "read_labels",
    "load_local_split",
    "HF_DATASETS",
    "load_hf_dataset",
    "hf_text_fields",
    "load_vectors",
    "write_glue_sst2",
    "read_glue_sst2",
    "read_imdb_csv",
    "strip_html",
]

# Lower-cased words, GloVe-style clitics ("don't" -> "do", "n't"; "it's" -> "it", "'s") and single
# punctuation marks.
_TOKEN = re.compile(r"[^\W_]+(?=n't\b)|n't\b|'[^\W_]+|[^\W_]+|[^\w\s]|_")


def tokenize(text: str) -> list[str]:
    """Lower-cased word, clitic and punctuation tokens of ``text``."""
    return _TOKEN.findall(text.lower())


class Vocab:
    """Token <-> id mapping; id 0 is padding (``<pad>``), id 1 unknown (``<unk>``)."""

    PAD, UNK = "<pad>", "<unk>"

    def __init__(self, itos: list[str]) -> None:
        if list(itos[:2]) != [self.PAD, self.UNK]:
            raise ValueError(f"itos must start with {self.PAD!r}, {self.UNK!r}; got {list(itos[:2])}")
        if len(set(itos)) != len(itos):
            raise ValueError("itos has duplicate tokens")
        self.itos = list(itos)
        self.stoi = {token: i for i, token in enumerate(self.itos)}

    @classmethod
    def build(cls, tokenized_texts, max_size: int | None = None, min_freq: int = 1) -> Vocab:
        """The most frequent tokens (ties: first seen first), at most ``max_size`` ids in all (pad and unk
        included), each seen at least ``min_freq`` times."""
        if max_size is not None and max_size < 3:
            raise ValueError(f"max_size must be >= 3 (pad, unk and one token), got {max_size}")
        counts = Counter()
        for tokens in tokenized_texts:
            counts.update(tokens)
        counts.pop(cls.PAD, None)
        counts.pop(cls.UNK, None)
        limit = None if max_size is None else max_size - 2
        kept = [token for token, n in counts.most_common(limit) if n >= min_freq]
        return cls([cls.PAD, cls.UNK] + kept)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: list[str], max_len: int | None = None) -> list[int]:
        """Ids of the first ``max_len`` tokens (unknown tokens -> 1); an empty text becomes ``[1]``."""
        ids = [self.stoi.get(token, 1) for token in tokens[:max_len]]
        return ids or [1]


class TextDataset(Dataset):
    """Encoded texts: item ``i`` is ``(ids (L_i,) int64, label int)``; at most ``max_len`` tokens each."""

    def __init__(self, texts, labels, vocab: Vocab, max_len: int | None = None) -> None:
        if len(texts) != len(labels):
            raise ValueError(f"texts and labels differ in length: {len(texts)} vs {len(labels)}")
        if max_len is not None and max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.ids = [torch.tensor(vocab.encode(tokenize(text), max_len), dtype=torch.long) for text in texts]
        self.labels = [int(label) for label in labels]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.ids[i], self.labels[i]


def collate_text(batch):
    """``[(ids, label), ...]`` -> ids ``(N, L)`` padded with 0, mask ``(N, L)`` bool, labels ``(N,)``."""
    lengths = [len(ids) for ids, _ in batch]
    ids = torch.zeros(len(batch), max(lengths), dtype=torch.long)
    for row, (seq, _) in enumerate(batch):
        ids[row, : len(seq)] = seq
    mask = torch.arange(ids.shape[1]).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return ids, mask, torch.tensor([label for _, label in batch], dtype=torch.long)


def read_tsv(path) -> tuple[list[int], list[str]]:
    """Labels and texts of a ``label<TAB>text`` file."""
    labels, texts = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            label, sep, text = line.partition("\t")
            if not sep or not label.strip().lstrip("-").isdigit():
                raise ValueError(f"{path}:{number}: expected 'label<TAB>text' with an integer label")
            labels.append(int(label))
            texts.append(text)
    return labels, texts


def read_labels(path) -> list[str]:
    """Class names, one per line."""
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def load_local_split(folder, split: str) -> tuple[list[int], list[str]]:
    """``folder/split.tsv`` (``split``: train, validation or test)."""
    path = Path(folder) / f"{split}.tsv"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    return read_tsv(path)


_TAG = re.compile(r"<[^<>]{0,200}>")


def strip_html(text: str) -> str:
    """``text`` without HTML tags (IMDB's ``<br />``) and with entities (``&amp;``) decoded."""
    return " ".join(html.unescape(_TAG.sub(" ", text)).split())


def read_glue_sst2(path) -> tuple[list[int], list[str]]:
    """A GLUE SST-2 file as GLUE ships it: header ``sentence<TAB>label`` (train.tsv, dev.tsv; labels 0/1) or
    ``index<TAB>sentence`` (test.tsv, unlabelled: labels -1). Returns labels and sentences in file order."""
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise ValueError(f"{path}: empty; expected GLUE SST-2's header 'sentence<TAB>label' or 'index<TAB>sentence'")
    header = [cell.strip() for cell in rows[0]]
    if header == ["sentence", "label"]:
        text_at, label_at = 0, 1
    elif header == ["index", "sentence"]:
        text_at, label_at = 1, None
    else:
        raise ValueError(f"{path}: header {header} is not GLUE SST-2's 'sentence<TAB>label' or 'index<TAB>sentence'")
    labels, texts = [], []
    for number, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) != 2 or (label_at is not None and row[label_at].strip() not in ("0", "1")):
            raise ValueError(f"{path}:{number}: expected two tab-separated fields as in the header {header}")
        texts.append(row[text_at])
        labels.append(-1 if label_at is None else int(row[label_at]))
    return labels, texts


def read_imdb_csv(path) -> tuple[list[int], list[str]]:
    """The Kaggle ``IMDB_Dataset.csv`` (columns ``review,sentiment``; 50,000 rows): labels (negative 0,
    positive 1) and reviews with their HTML (``<br />``) stripped."""
    labels, texts = [], []
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"review", "sentiment"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected the IMDB CSV's columns 'review,sentiment', got {reader.fieldnames}")
        for number, row in enumerate(reader, 2):
            sentiment = row["sentiment"].strip().lower()
            if sentiment not in ("negative", "positive"):
                raise ValueError(f"{path}:{number}: sentiment must be 'negative' or 'positive', got {sentiment!r}")
            labels.append(int(sentiment == "positive"))
            texts.append(strip_html(row["review"]))
    return labels, texts


# name -> (Hugging Face path, config, text fields, label field, {our split: HF split}).
# SST-2's GLUE test split has no labels, so its labelled validation split serves as "test" (as in
# ../shared/data/text/sst2); "glue_test" gives the unlabelled GLUE test split for prediction files.
# dbpedia_14 uses the content as the seed does (title + content with ``title=True``); imdb's HTML is stripped.
HF_DATASETS = {
    "ag_news": ("ag_news", None, ("text",), "label", {"train": "train", "test": "test"}),
    "dbpedia_14": ("dbpedia_14", None, ("content",), "label", {"train": "train", "test": "test"}),
    "banking77": ("banking77", None, ("text",), "label", {"train": "train", "test": "test"}),
    "emotion": ("dair-ai/emotion", None, ("text",), "label",
                {"train": "train", "validation": "validation", "test": "test"}),
    "rotten_tomatoes": ("rotten_tomatoes", None, ("text",), "label",
                        {"train": "train", "validation": "validation", "test": "test"}),
    "yelp_review_full": ("yelp_review_full", None, ("text",), "label", {"train": "train", "test": "test"}),
    "sst2": ("glue", "sst2", ("sentence",), "label",
             {"train": "train", "test": "validation", "glue_test": "test"}),
    "imdb": ("imdb", None, ("text",), "label", {"train": "train", "test": "test"}),
    "clinc_oos": ("clinc_oos", "plus", ("text",), "intent",
                  {"train": "train", "validation": "validation", "test": "test"}),
}
HTML_DATASETS = {"imdb"}


def hf_text_fields(name: str, title: bool = False) -> tuple[str, ...]:
    """The text fields read for the listed dataset ``name`` (dbpedia_14 with ``title``: title and content)."""
    fields = HF_DATASETS[name][2]
    return ("title", *fields) if title and name == "dbpedia_14" else fields


def load_hf_dataset(name: str, split: str, title: bool = False) -> tuple[list[int], list[str], list[str]]:
    """Labels, texts and class names of ``split`` of the listed dataset ``name`` via Hugging Face ``datasets``
    (needs the package and a network connection or its cache). Several text fields are joined by " . "."""
    if name not in HF_DATASETS:
        raise ValueError(f"dataset must be one of {sorted(HF_DATASETS)}, got {name!r}")
    path, config, _, label_field, splits = HF_DATASETS[name]
    text_fields = hf_text_fields(name, title)
    if split not in splits:
        raise ValueError(f"{name}: split must be one of {sorted(splits)}, got {split!r}")
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            f"loading {name!r} online needs the Hugging Face 'datasets' package (pip install datasets), "
            "or use --train-file/--test-file with local TSV files"
        ) from error
    table = datasets.load_dataset(path, config, split=splits[split])
    texts = [" . ".join(parts) for parts in zip(*(table[field] for field in text_fields))]
    if name in HTML_DATASETS:
        texts = [strip_html(text) for text in texts]
    return list(table[label_field]), texts, list(table.features[label_field].names)


def load_vectors(path, vocab: Vocab, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """An embedding matrix ``(len(vocab), dim)`` whose row ``i`` is the file's vector for ``vocab.itos[i]``.

    ``path``: GloVe or fastText text format (``word v1 ... v_dim`` per line; a fastText ``count dim`` header
    line is skipped). A word absent from the file falls back to its lower-cased form's vector; rows still
    missing are drawn from N(0, std of the found vectors), and the padding row is zero. Returns the matrix
    and the number of vocabulary words found.
    """
    rows: dict[int, torch.Tensor] = {}
    exact: set[int] = set()
    dim = None
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            parts = line.rstrip().split(" ")
            if number == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue
            word, values = parts[0], parts[1:]
            if dim is None:
                dim = len(values)
            if len(values) != dim:
                raise ValueError(f"{path}:{number}: {len(values)} values, expected {dim}")
            i = vocab.stoi.get(word)
            if i is not None and i not in exact:
                rows[i] = torch.tensor([float(v) for v in values])
                exact.add(i)
                continue
            i = vocab.stoi.get(word.lower())
            if i is not None and i not in rows:
                rows[i] = torch.tensor([float(v) for v in values])
    if dim is None:
        raise ValueError(f"{path}: no vectors")
    rows.pop(0, None)
    found = torch.stack(list(rows.values())) if rows else torch.zeros(1, dim)
    scale = float(found.std()) if len(rows) > 1 else 1.0
    matrix = torch.randn(len(vocab), dim, generator=generator) * scale
    for i, vector in rows.items():
        matrix[i] = vector
    matrix[0] = 0.0
    return matrix, len(rows)


def write_glue_sst2(path, predictions) -> None:
    """A GLUE submission file for SST-2 (``SST-2.tsv``): header ``index<TAB>prediction``, one row per example
    of the GLUE test split in order, predictions 0 (negative) or 1 (positive)."""
    values = [int(p) for p in predictions]
    if any(v not in (0, 1) for v in values):
        raise ValueError("predictions must be 0 or 1 for SST-2")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("index\tprediction\n")
        handle.writelines(f"{i}\t{v}\n" for i, v in enumerate(values))

"""Text classification data: tokenizer, vocabulary, TSV and Hugging Face loaders, word vectors, GLUE output.

Offline format (``../shared/data/text/NAME/``): ``train.tsv``/``validation.tsv``/``test.tsv`` with one
``label<TAB>text`` per line (label = integer index into ``labels.txt``, one class name per line).
"""

from __future__ import annotations

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
    "load_vectors",
    "write_glue_sst2",
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


# name -> (Hugging Face path, config, text fields, label field, {our split: HF split}).
# SST-2's GLUE test split has no labels, so its labelled validation split serves as "test" (as in
# ../shared/data/text/sst2); "glue_test" gives the unlabelled GLUE test split for prediction files.
HF_DATASETS = {
    "ag_news": ("ag_news", None, ("text",), "label", {"train": "train", "test": "test"}),
    "dbpedia_14": ("dbpedia_14", None, ("title", "content"), "label", {"train": "train", "test": "test"}),
    "banking77": ("banking77", None, ("text",), "label", {"train": "train", "test": "test"}),
    "emotion": ("dair-ai/emotion", None, ("text",), "label",
                {"train": "train", "validation": "validation", "test": "test"}),
    "rotten_tomatoes": ("rotten_tomatoes", None, ("text",), "label",
                        {"train": "train", "validation": "validation", "test": "test"}),
    "yelp_review_full": ("yelp_review_full", None, ("text",), "label", {"train": "train", "test": "test"}),
    "sst2": ("glue", "sst2", ("sentence",), "label",
             {"train": "train", "test": "validation", "glue_test": "test"}),
    "imdb": ("imdb", None, ("text",), "label", {"train": "train", "test": "test"}),
}


def load_hf_dataset(name: str, split: str) -> tuple[list[int], list[str], list[str]]:
    """Labels, texts and class names of ``split`` of the listed dataset ``name`` via Hugging Face ``datasets``
    (needs the package and a network connection or its cache)."""
    if name not in HF_DATASETS:
        raise ValueError(f"dataset must be one of {sorted(HF_DATASETS)}, got {name!r}")
    path, config, text_fields, label_field, splits = HF_DATASETS[name]
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

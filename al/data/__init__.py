"""Data for the AL models: text (tokenizer, vocabulary, TSV / Hugging Face loaders, GloVe vectors) and MNIST."""

from .mnist import load_mnist, read_idx
from .paths import data_dir
from .text import (
    HF_DATASETS,
    TextDataset,
    Vocab,
    collate_text,
    load_hf_dataset,
    load_vectors,
    read_labels,
    read_tsv,
    tokenize,
    write_glue_sst2,
)

__all__ = [
    "data_dir",
    "load_mnist",
    "read_idx",
    "HF_DATASETS",
    "TextDataset",
    "Vocab",
    "collate_text",
    "load_hf_dataset",
    "load_vectors",
    "read_labels",
    "read_tsv",
    "tokenize",
    "write_glue_sst2",
]

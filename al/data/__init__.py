"""Data for the AL models: text (tokenizer, vocabulary, TSV / Hugging Face loaders, GloVe vectors) and MNIST."""

from .mnist import load_mnist
from .paths import data_dir
from .sources import TextSource, held_out_indices, hold_out, load_text_source
from .text import (
    HF_DATASETS,
    TextDataset,
    Vocab,
    collate_text,
    load_hf_dataset,
    load_vectors,
    read_glue_sst2,
    read_imdb_csv,
    read_labels,
    read_tsv,
    strip_html,
    tokenize,
    write_glue_sst2,
)

__all__ = [
    "data_dir",
    "load_mnist",
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
    "read_glue_sst2",
    "read_imdb_csv",
    "strip_html",
    "TextSource",
    "hold_out",
    "held_out_indices",
    "load_text_source",
]

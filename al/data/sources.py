"""Every text data set behind one name or path: local files first, Hugging Face ``datasets`` otherwise.

:func:`load_text_source` returns ``TextSource(splits, names, glue_test)``: ``splits`` maps "train", "test" and
maybe "validation" to ``(labels, texts)``, ``names`` are the class names, ``glue_test`` the unlabelled GLUE
SST-2 test sentences when the source has them (for the submission file). What it accepts:

- a listed name (``HF_DATASETS``): ``$MEPROP_DATA/text/NAME/`` when present (the project's TSV folders),
  otherwise Hugging Face online (``hf=True`` forces that);
- a folder saved by ``datasets`` (``save_to_disk``; read by ``load_from_disk``);
- a GLUE SST-2 folder as GLUE ships it (``train.tsv``, ``dev.tsv``, ``test.tsv`` with header rows); dev is
  the "validation" and, GLUE's test being unlabelled, also the "test" split;
- a folder of the project's TSV files (``train.tsv``, ``test.tsv``, maybe ``validation.tsv``, ``labels.txt``);
- a folder of ``train``/``validation``/``test`` ``.csv``, ``.json``, ``.jsonl`` or ``.parquet`` files, or one such
  file (20% held out as "test"), read through ``datasets``;
- the Kaggle ``IMDB_Dataset.csv`` (``review,sentiment``): HTML stripped, the seed's 80/20 train/test split.

Tables read through ``datasets`` need a text column (text, sentence, content, review or document; dbpedia's
title + content with ``title=True``) and a label column (label, intent, sentiment or labels; class indices
or strings).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import NamedTuple

import torch

from .paths import data_dir
from .text import HF_DATASETS, load_hf_dataset, read_glue_sst2, read_imdb_csv, read_labels, read_tsv

__all__ = ["TextSource", "load_text_source", "hold_out", "held_out_indices", "TEXT_COLUMNS", "LABEL_COLUMNS", "SPLIT_SEED"]

TEXT_COLUMNS = ("text", "sentence", "content", "review", "document")
LABEL_COLUMNS = ("label", "intent", "sentiment", "labels")
TABLE_SUFFIXES = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SPLIT_NAMES = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation",
               "test": "test"}
SPLIT_SEED = 0  # fixed: every run (seed, method) sees the same held-out examples


class TextSource(NamedTuple):
    """Labelled splits ``{split: (labels, texts)}``, class names, and GLUE's unlabelled test sentences (or None)."""

    splits: dict
    names: list
    glue_test: list | None = None


def _datasets(what: str):
    try:
        import datasets
    except ImportError as error:
        raise ImportError(f"{what} needs the Hugging Face 'datasets' package: pip install datasets") from error
    return datasets


def held_out_indices(n: int, fraction: float, seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """Indices ``(kept, held_out)`` of ``n`` examples, ``round(n * fraction)`` held out (seeded random choice),
    each ascending."""
    held = int(round(n * fraction))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[held:]), sorted(order[:held])


def hold_out(labels, texts, fraction: float, seed: int = SPLIT_SEED):
    """Splits ``(labels, texts)`` into the kept part and a held-out ``fraction``: two ``(labels, texts)``."""
    kept, out = held_out_indices(len(texts), fraction, seed)
    return ([labels[i] for i in kept], [texts[i] for i in kept]), ([labels[i] for i in out], [texts[i] for i in out])


def _table_columns(table, where: str, title: bool):
    columns = list(table.column_names)
    text = next((c for c in TEXT_COLUMNS if c in columns), None)
    label = next((c for c in LABEL_COLUMNS if c in columns), None)
    if text is None or label is None:
        raise ValueError(f"{where}: needs a text column (one of {', '.join(TEXT_COLUMNS)}) and a label column "
                         f"(one of {', '.join(LABEL_COLUMNS)}); it has {columns}")
    fields = ("title", text) if title and "title" in columns else (text,)
    return fields, label


def _from_tables(tables: dict, where: str, title: bool) -> TextSource:
    """``{split: datasets.Dataset}`` -> TextSource; class names from a ClassLabel feature or the sorted strings."""
    fields, label = _table_columns(next(iter(tables.values())), where, title)
    feature = getattr(next(iter(tables.values())).features[label], "names", None)
    raw = {}
    for split, table in tables.items():
        texts = [" . ".join(str(p) for p in parts) for parts in zip(*(table[f] for f in fields))]
        raw[split] = (list(table[label]), texts)
    if feature is not None:
        names = list(feature)
    elif all(isinstance(y, str) for labels, _ in raw.values() for y in labels):
        names = sorted({y for labels, _ in raw.values() for y in labels})
        index = {name: i for i, name in enumerate(names)}
        raw = {split: ([index[y] for y in labels], texts) for split, (labels, texts) in raw.items()}
    else:
        raw = {split: ([int(y) for y in labels], texts) for split, (labels, texts) in raw.items()}
        names = [str(i) for i in range(1 + max(max(labels) for labels, _ in raw.values()))]
    return TextSource(_with_test(raw, where), names)


def _with_test(raw: dict, where: str) -> dict:
    if "train" not in raw:
        raise ValueError(f"{where}: no train split (found {sorted(raw)})")
    if "test" not in raw:
        if "validation" in raw:
            raw["test"] = raw.pop("validation")
        else:
            raw["train"], raw["test"] = hold_out(*raw["train"], 0.2)
    return raw


def _is_saved_dataset(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("dataset_dict.json", "state.json", "dataset_info.json"))


def _glue_folder(folder: Path) -> bool:
    if not (folder / "dev.tsv").exists():
        return False
    with open(folder / "dev.tsv", encoding="utf-8") as handle:
        return handle.readline().rstrip("\r\n").split("\t") == ["sentence", "label"]


def _read_tsv_folder(folder: Path) -> TextSource:
    raw = {split: read_tsv(folder / f"{split}.tsv") for split in ("train", "validation", "test")
           if (folder / f"{split}.tsv").exists()}
    if "test" not in raw:
        raise FileNotFoundError(f"{folder / 'test.tsv'} not found (the folder has train.tsv)")
    names = read_labels(folder / "labels.txt") if (folder / "labels.txt").exists() else None
    return TextSource(raw, names)


def _read_glue_folder(folder: Path) -> TextSource:
    for name in ("train.tsv", "dev.tsv"):
        if not (folder / name).exists():
            raise FileNotFoundError(f"GLUE SST-2 folder {folder}: {name} not found")
    dev = read_glue_sst2(folder / "dev.tsv")
    glue_test = read_glue_sst2(folder / "test.tsv")[1] if (folder / "test.tsv").exists() else None
    splits = {"train": read_glue_sst2(folder / "train.tsv"), "validation": dev, "test": dev}
    return TextSource(splits, ["negative", "positive"], glue_test)


def _table_files(folder: Path) -> dict:
    files = {}
    for path in sorted(folder.iterdir()):
        split = SPLIT_NAMES.get(path.stem)
        if split and path.suffix in TABLE_SUFFIXES:
            files.setdefault(split, path)
    return files


def _is_imdb_csv(path: Path) -> bool:
    if path.suffix != ".csv":
        return False
    with open(path, encoding="utf-8", newline="") as handle:
        header = next(csv.reader(handle), [])
    return {"review", "sentiment"} <= {h.strip() for h in header}


def _load_path(path: Path, title: bool) -> TextSource:
    if path.is_dir():
        if _is_saved_dataset(path):
            saved = _datasets(f"reading the saved dataset {path}").load_from_disk(str(path))
            tables = {SPLIT_NAMES.get(k, k): v for k, v in saved.items()} if hasattr(saved, "keys") else {"train": saved}
            return _from_tables(tables, str(path), title)
        if _glue_folder(path):
            return _read_glue_folder(path)
        if (path / "train.tsv").exists():
            return _read_tsv_folder(path)
        files = _table_files(path)
        if "train" not in files:
            raise FileNotFoundError(
                f"--dataset {path}: no saved Hugging Face dataset (dataset_dict.json), GLUE SST-2 files (train.tsv, "
                f"dev.tsv), train.tsv, or train.csv/.json/.jsonl/.parquet in this folder")
        builder = TABLE_SUFFIXES[files["train"].suffix]
        datasets = _datasets(f"reading {files['train']}")
        loaded = datasets.load_dataset(builder, data_files={split: str(p) for split, p in files.items()})
        return _from_tables(dict(loaded.items()), str(path), title)
    if _is_imdb_csv(path):
        train, test = hold_out(*read_imdb_csv(path), 0.2)
        return TextSource({"train": train, "test": test}, ["negative", "positive"])
    if path.suffix not in TABLE_SUFFIXES:
        raise ValueError(f"--dataset {path}: not a folder and not a .csv/.json/.jsonl/.parquet file")
    datasets = _datasets(f"reading {path}")
    table = datasets.load_dataset(TABLE_SUFFIXES[path.suffix], data_files={"train": str(path)})["train"]
    return _from_tables({"train": table}, str(path), title)


def load_text_source(dataset: str, hf: bool = False, title: bool = False) -> TextSource:
    """The splits of ``dataset`` (a listed name or a path; see the module docstring). ``title``: dbpedia's
    title + content instead of the content alone. Errors name the missing file, folder or package."""
    if dataset in HF_DATASETS and not hf:
        folder = data_dir() / "text" / dataset
        if (folder / "train.tsv").exists():
            return _read_tsv_folder(folder)
    elif dataset not in HF_DATASETS:
        path = Path(dataset).expanduser()
        if not path.exists() and (data_dir() / "text" / dataset / "train.tsv").exists():
            return _read_tsv_folder(data_dir() / "text" / dataset)
        if not path.exists():
            raise FileNotFoundError(
                f"--dataset {dataset!r}: no such file or folder, no local folder {data_dir() / 'text' / dataset}, "
                f"and not one of the Hugging Face datasets {', '.join(sorted(HF_DATASETS))}")
        return _load_path(path, title)
    raw, names = {}, None
    for split in ("train", "validation", "test"):
        if split in HF_DATASETS[dataset][4]:
            labels, texts, names = load_hf_dataset(dataset, split, title)
            raw[split] = (labels, texts)
    glue_test = load_hf_dataset(dataset, "glue_test")[1] if "glue_test" in HF_DATASETS[dataset][4] else None
    return TextSource(raw, names, glue_test)


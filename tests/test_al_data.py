"""AL data: tokenizer, vocabulary, TSV and Hugging Face loaders, vector alignment, GLUE writer, MNIST IDX."""

import sys
import types

import pytest
import torch

from al.data import (
    TextDataset,
    Vocab,
    collate_text,
    load_hf_dataset,
    load_mnist,
    load_vectors,
    read_labels,
    read_tsv,
    tokenize,
    write_glue_sst2,
)
from al_helpers import need_data

GLOVE = ("vectors", "glove.6B.50d.top5k_rounded6.txt")


def test_tokenize_words_clitics_punctuation():
    assert tokenize("Don't stop, it's the 21st century's \"Conan\"!") == [
        "do", "n't", "stop", ",", "it", "'s", "the", "21st", "century", "'s", '"', "conan", '"', "!"]
    assert tokenize("   ") == []


def test_vocab_cap_special_ids_and_order():
    texts = [["b", "a", "b"], ["c", "a", "b"], ["d"]]
    vocab = Vocab.build(texts, max_size=4)
    assert vocab.itos == ["<pad>", "<unk>", "b", "a"]
    assert vocab.encode(["a", "zzz", "b", "c"]) == [3, 1, 2, 1]
    assert len(Vocab.build(texts)) == 6
    assert Vocab.build(texts, min_freq=2).itos[2:] == ["b", "a"]
    with pytest.raises(ValueError, match="max_size"):
        Vocab.build(texts, max_size=2)
    with pytest.raises(ValueError, match="itos"):
        Vocab(["a", "b"])


def test_max_len_counts_tokens_not_characters():
    vocab = Vocab.build([tokenize("extraordinarily long words , here")])
    data = TextDataset(["extraordinarily long words , here", ""], [1, 0], vocab, max_len=3)
    ids, label = data[0]
    assert ids.tolist() == [vocab.stoi["extraordinarily"], vocab.stoi["long"], vocab.stoi["words"]]
    assert label == 1
    assert data[1][0].tolist() == [1]  # an empty text keeps one <unk> token


def test_collate_pads_and_masks():
    ids, mask, labels = collate_text([(torch.tensor([5, 6, 7]), 1), (torch.tensor([8]), 0)])
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    assert labels.tolist() == [1, 0]


def test_read_tsv_and_errors(tmp_path):
    path = tmp_path / "a.tsv"
    path.write_text("1\tgood film\n0\tbad\tfilm\n\n", encoding="utf-8")
    assert read_tsv(path) == ([1, 0], ["good film", "bad\tfilm"])
    path.write_text("x\tno label\n", encoding="utf-8")
    with pytest.raises(ValueError, match="a.tsv:1"):
        read_tsv(path)


@pytest.mark.parametrize("name,rows,classes", [("rotten_tomatoes", 8530, 2), ("emotion", 16000, 6),
                                               ("sst2", 67349, 2)])
def test_shared_tsv_files(name, rows, classes):
    folder = need_data("text", name)
    labels, texts = read_tsv(folder / "train.tsv")
    assert len(labels) == len(texts) == rows
    assert len(read_labels(folder / "labels.txt")) == classes
    assert set(labels) == set(range(classes))
    assert all(texts)


def test_vectors_rows_align_with_vocabulary_ids(tmp_path):
    path = tmp_path / "vec.txt"
    path.write_text("3 2\nzeta 1 2\nAlpha 3 4\nalpha 5 6\nbeta 7 8\n", encoding="utf-8")  # fastText header
    vocab = Vocab(["<pad>", "<unk>", "alpha", "missing", "zeta", "beta"])
    matrix, found = load_vectors(path, vocab, torch.Generator().manual_seed(0))
    assert matrix.shape == (6, 2) and found == 3
    assert matrix[2].tolist() == [5, 6]  # exact "alpha" wins over the lower-cased "Alpha"
    assert matrix[4].tolist() == [1, 2] and matrix[5].tolist() == [7, 8]
    assert matrix[0].tolist() == [0, 0]
    assert not any(torch.equal(matrix[3], matrix[i]) for i in (2, 4, 5))


def test_shared_glove_alignment():
    path = need_data(*GLOVE)
    labels, texts = read_tsv(need_data("text", "rotten_tomatoes", "train.tsv"))
    vocab = Vocab.build((tokenize(t) for t in texts), max_size=3000)
    matrix, found = load_vectors(path, vocab)
    reference = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            word, *values = line.split()
            reference[word] = [float(v) for v in values]
    assert matrix.shape == (3000, 50)
    hits = [w for w in vocab.itos if w in reference]
    assert found == len(hits) > 1500
    for word in hits:
        assert matrix[vocab.stoi[word]].tolist() == pytest.approx(reference[word], abs=1e-6), word
    # e.g. the seed's bug: row i holding the file's i-th vector instead of vocabulary word i's
    assert matrix[vocab.stoi["film"]].tolist() == pytest.approx(reference["film"], abs=1e-6)


def test_glue_sst2_writer(tmp_path):
    out = tmp_path / "SST-2.tsv"
    write_glue_sst2(out, [1, 0, 1])
    assert out.read_text() == "index\tprediction\n0\t1\n1\t0\n2\t1\n"
    with pytest.raises(ValueError, match="0 or 1"):
        write_glue_sst2(out, [2])


class FakeTable:
    def __init__(self, columns, names):
        self.columns = columns
        self.features = {"label": types.SimpleNamespace(names=names)}

    def __getitem__(self, key):
        return self.columns[key]


def test_hf_path_maps_names_fields_and_splits(monkeypatch):
    calls = []

    def load_dataset(path, config, split):
        calls.append((path, config, split))
        return FakeTable({"title": ["T1", "T2"], "content": ["body one", "body two"], "sentence": ["s1", "s2"], "text": ["x1", "x2"],
                          "label": [0, 1]}, ["neg", "pos"])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    labels, texts, names = load_hf_dataset("dbpedia_14", "train")
    assert (labels, texts, names) == ([0, 1], ["body one", "body two"], ["neg", "pos"])  # content, as the seed
    assert load_hf_dataset("dbpedia_14", "train", title=True)[1] == ["T1 . body one", "T2 . body two"]
    load_hf_dataset("sst2", "test")
    load_hf_dataset("emotion", "validation")
    assert calls[2:] == [("glue", "sst2", "validation"), ("dair-ai/emotion", None, "validation")]
    with pytest.raises(ValueError, match="dataset must be"):
        load_hf_dataset("nope", "train")
    with pytest.raises(ValueError, match="split"):
        load_hf_dataset("imdb", "validation")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="datasets"):
        load_hf_dataset("imdb", "train")


def test_shared_mnist():
    root = need_data("mnist")
    x, y = load_mnist(root, "test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10000,) and y[:5].tolist() == [7, 2, 1, 0, 4]  # MNIST's first test labels
    assert torch.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    raw, _ = load_mnist(root, "test", normalize=False)
    assert float(raw.min()) == 0.0 and float(raw.max()) == 1.0


# ------------------------------------------------------------------------------- one flag for every source

from al.data import load_text_source, read_glue_sst2, read_imdb_csv, strip_html  # noqa: E402


def write_glue_folder(folder, n_train=40, n_dev=10, n_test=7):
    folder.mkdir()
    rows = lambda n, shift: [(f"word{i % 5} is {'good' if (i + shift) % 2 else 'bad'}", (i + shift) % 2)  # noqa: E731
                             for i in range(n)]
    (folder / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows(n_train, 0)))
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows(n_dev, 1)))
    (folder / "test.tsv").write_text("index\tsentence\n" + "".join(f"{i}\t{t}\n" for i, (t, _) in
                                                                   enumerate(rows(n_test, 0))))
    return folder


def test_glue_sst2_files_as_glue_ships_them(tmp_path):
    folder = write_glue_folder(tmp_path / "SST-2")
    labels, texts = read_glue_sst2(folder / "train.tsv")
    assert len(texts) == 40 and texts[1] == "word1 is good" and labels[:2] == [0, 1]
    assert read_glue_sst2(folder / "test.tsv") == ([-1] * 7, [f"word{i % 5} is {'good' if i % 2 else 'bad'}"
                                                              for i in range(7)])
    source = load_text_source(str(folder))
    assert sorted(source.splits) == ["test", "train", "validation"] and len(source.glue_test) == 7
    assert source.splits["validation"] == source.splits["test"] == read_glue_sst2(folder / "dev.tsv")
    (tmp_path / "bad.tsv").write_text("label\ttext\n1\tx\n")
    with pytest.raises(ValueError, match="GLUE SST-2"):
        read_glue_sst2(tmp_path / "bad.tsv")


def test_imdb_kaggle_csv_strips_html_and_splits_80_20(tmp_path):
    path = tmp_path / "IMDB_Dataset.csv"
    rows = [(f'"Review {i}<br /><br />was ""fine"" &amp; long"', "positive" if i % 3 else "negative") for i in range(50)]
    path.write_text("review,sentiment\n" + "".join(f"{r},{s}\n" for r, s in rows))
    labels, texts = read_imdb_csv(path)
    assert texts[0] == 'Review 0 was "fine" & long' and labels[:3] == [0, 1, 1]
    source = load_text_source(str(path))
    train, test = source.splits["train"], source.splits["test"]
    assert len(test[1]) == 10 and len(train[1]) == 40 and not set(train[1]) & set(test[1])
    assert source.names == ["negative", "positive"]
    assert strip_html("a<br/>b <i>c</i>") == "a b c"


def test_tsv_folder_and_clear_errors(tmp_path, monkeypatch):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "train.tsv").write_text("0\ta\n1\tb\n")
    with pytest.raises(FileNotFoundError, match="test.tsv"):
        load_text_source(str(folder))
    (folder / "test.tsv").write_text("1\tc\n")
    assert load_text_source(str(folder)).splits == {"train": ([0, 1], ["a", "b"]), "test": ([1], ["c"])}
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_text_source(str(tmp_path / "nothing"))
    (tmp_path / "t.parquet").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_text_source(str(tmp_path / "t.parquet"))


def test_clinc_oos_maps_to_its_hf_config(monkeypatch):
    calls = []

    def load_dataset(path, config, split):
        calls.append((path, config, split))
        table = FakeTable({"text": ["book a flight"], "intent": [3]}, [])
        table.features = {"intent": types.SimpleNamespace(names=[f"intent{i}" for i in range(151)])}
        return table

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    source = load_text_source("clinc_oos")
    assert calls == [("clinc_oos", "plus", s) for s in ("train", "validation", "test")]
    assert len(source.names) == 151 and source.splits["train"] == ([3], ["book a flight"])


def test_datasets_folders_and_files(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the 'datasets' package is not installed (pip install datasets)")
    features = datasets.Features({"content": datasets.Value("string"), "title": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["a", "b"])})
    train = datasets.Dataset.from_dict({"content": ["x one", "x two"], "title": ["T1", "T2"], "label": [0, 1]},
                                       features=features)
    test = datasets.Dataset.from_dict({"content": ["x three"], "title": ["T3"], "label": [1]}, features=features)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "saved"))
    source = load_text_source(str(tmp_path / "saved"))
    assert source.names == ["a", "b"] and source.splits["train"] == ([0, 1], ["x one", "x two"])
    assert load_text_source(str(tmp_path / "saved"), title=True).splits["test"] == ([1], ["T3 . x three"])
    files = tmp_path / "files"
    files.mkdir()
    (files / "train.csv").write_text("text,label\nfine day,pos\nbad day,neg\nok,pos\n")
    (files / "test.csv").write_text("text,label\nnice,pos\n")
    source = load_text_source(str(files))
    assert source.names == ["neg", "pos"] and source.splits["train"] == ([1, 0, 1], ["fine day", "bad day", "ok"])
    assert source.splits["test"] == ([1], ["nice"])

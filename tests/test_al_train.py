"""The training CLI end to end: it learns, writes results, and resumes from its atomic checkpoints."""

import json

import pytest
import torch

from al.train import main
from al_helpers import need_data, write_sentiment


@pytest.fixture
def sentiment(tmp_path):
    (tmp_path / "labels.txt").write_text("negative\npositive\n")
    return write_sentiment(tmp_path / "train.tsv", 600, 0), write_sentiment(tmp_path / "test.tsv", 200, 1)


SMALL = ["--components", "2", "--hidden", "16", "--d-model", "16", "--heads", "2", "--feedforward", "32",
         "--embedding-dim", "16", "--label-dim", "16", "--batch-size", "32", "--lr", "3e-3", "--no-progress",
         "--threads", "1"]


@pytest.mark.parametrize("model,method,arch,epochs", [("lstm", "al", "compact", 5), ("transformer", "al", "compact", 5),
                                                      ("lstm", "al", "seed", 8), ("transformer", "al", "seed", 5),
                                                      ("transformer", "bp", "seed", 5)])
def test_tiny_text_run_learns(sentiment, tmp_path, model, method, arch, epochs, capsys):
    train, test = sentiment
    results = tmp_path / "r.json"
    extra = ["--exit-threshold", "0.5"] if method == "al" else []
    main(["--model", model, "--method", method, "--arch", arch, "--train-file", str(train), "--test-file", str(test),
          "--epochs", str(epochs), "--results", str(results), *SMALL, *extra])
    summary = json.loads(results.read_text())
    assert summary["test_accuracy"] > 0.9
    assert f"test accuracy: {summary['test_accuracy']:.4f}" in capsys.readouterr().out
    if method == "al":
        assert 1.0 <= summary["early_exit"]["average_depth"] <= 2.0
        assert summary["early_exit"]["accuracy"] > 0.9


def test_resume_matches_uninterrupted_run(sentiment, tmp_path):
    train, test = sentiment
    common = ["--model", "lstm", "--method", "al", "--train-file", str(train), "--test-file", str(test),
              "--train-limit", "200", *SMALL]
    straight = main([*common, "--epochs", "2", "--checkpoint", str(tmp_path / "a.pt")])
    main([*common, "--epochs", "1", "--checkpoint", str(tmp_path / "b.pt")])
    resumed = main([*common, "--epochs", "2", "--checkpoint", str(tmp_path / "b.pt"), "--resume"])
    assert resumed["history"] == straight["history"] and len(resumed["history"]) == 2
    a, b = torch.load(tmp_path / "a.pt", weights_only=False), torch.load(tmp_path / "b.pt", weights_only=False)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tmp") == []
    with pytest.raises(ValueError, match="other settings"):
        main([*common, "--epochs", "3", "--checkpoint", str(tmp_path / "b.pt"), "--resume", "--hidden", "8"])


def test_glue_prediction_file(sentiment, tmp_path):
    train, test = sentiment
    out = tmp_path / "SST-2.tsv"
    main(["--model", "lstm", "--method", "bp", "--train-file", str(train), "--test-file", str(test),
          "--epochs", "1", "--glue-sst2", str(out), *SMALL])
    lines = out.read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 201
    assert {line.split("\t")[1] for line in lines[1:]} <= {"0", "1"}


def test_mnist_mlp_run_learns(tmp_path):
    need_data("mnist")
    summary = main(["--model", "mlp", "--method", "al", "--dataset", "mnist", "--train-limit", "4000",
                    "--epochs", "2", "--hidden", "64", "--label-dim", "32", "--batch-size", "32", "--lr", "3e-3",
                    "--no-progress", "--threads", "1"])
    assert summary["test_accuracy"] > 0.8 and summary["test_examples"] == 10000


def test_meprop_k_through_the_cli(sentiment):
    train, test = sentiment
    summary = main(["--model", "transformer", "--method", "al", "--train-file", str(train), "--test-file", str(test),
                    "--epochs", "1", "--k", "4", *SMALL])
    assert summary["config"]["k"] == 4 and 0.0 <= summary["test_accuracy"] <= 1.0


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="no such file or folder, no local folder"):
        main(["--model", "lstm", "--method", "al", "--dataset", "no_such_set", "--no-progress"])


def test_cli_argument_errors(capsys):
    for argv in (["--model", "lstm", "--method", "al"],
                 ["--model", "mlp", "--method", "al", "--dataset", "emotion"],
                 ["--model", "lstm", "--method", "bp", "--dataset", "emotion", "--exit-threshold", "1"]):
        with pytest.raises(SystemExit):
            main(argv)


def test_device_errors_are_clear(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = ["--model", "lstm", "--method", "al", "--dataset", "emotion"]
    for extra, message in ((["--device", "cuda"], "CUDA is not available"),
                           (["--device", "cuda:1"], "CUDA is not available"),
                           (["--device", "tpu"], "cpu, cuda or cuda:N"),
                           (["--amp", "bf16"], "needs a CUDA --device")):
        with pytest.raises(SystemExit):
            main([*base, *extra])
        assert message in capsys.readouterr().err


def test_preset_is_printed_and_explicit_options_win(capsys):
    from al.train import parse_args

    cfg = parse_args(["--model", "transformer", "--arch", "seed", "--method", "al", "--dataset", "rotten_tomatoes",
                      "--preset", "rotten_tomatoes", "--epochs", "2"])
    err = capsys.readouterr().err
    assert "preset rotten_tomatoes" in err and "100 characters -> 29 tokens" in err
    assert (cfg.max_len, cfg.feedforward, cfg.embedding_dim, cfg.vocab_size, cfg.autoencoder_lr) == (29, 256, 300,
                                                                                                     30000, 5e-4)
    assert cfg.epochs == 2 and cfg.components == 3  # explicit option; seed arch: embedding + 2 layers
    cfg = parse_args(["--model", "lstm", "--method", "bp", "--dataset", "x", "--preset", "ag_news"])
    assert cfg.hidden == 300 and cfg.max_len is None  # the seed's 1000: the longest text


def test_glue_folder_submission_from_the_best_dev_epoch(tmp_path, capsys):
    from test_al_data import write_glue_folder

    folder = write_glue_folder(tmp_path / "SST-2", n_train=200, n_dev=40, n_test=30)
    out = tmp_path / "SST-2.tsv"
    summary = main(["--model", "lstm", "--arch", "seed", "--method", "al", "--dataset", str(folder), "--epochs", "3",
                    "--glue-sst2", str(out), "--results", str(tmp_path / "r.json"), *SMALL])
    curve = [h["validation_accuracy"] for h in summary["history"]]
    assert summary["selected_epoch"] == 1 + curve.index(max(curve))
    assert summary["best_validation_accuracy"] == max(curve) == summary["test_accuracy"]  # GLUE: test = dev
    lines = out.read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 31
    assert "GLUE test (30 rows)" in capsys.readouterr().err


def test_valid_fraction_selects_on_held_out_train(sentiment):
    train, test = sentiment
    summary = main(["--model", "transformer", "--arch", "seed", "--method", "bp", "--train-file", str(train),
                    "--test-file", str(test), "--epochs", "2", "--valid-fraction", "0.25", *SMALL])
    assert summary["train_examples"] == 450 and "validation_accuracy" in summary["history"][0]
    assert summary["selected_epoch"] in (1, 2)

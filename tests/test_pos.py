"""benchmarks/pos.py: the CoNLL-U reader, and a --quick run on UD EWT (skipped where the data is absent)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import pos  # noqa: E402

DATA = Path(os.environ.get("MEPROP_DATA", ROOT.parent / "shared" / "data"))
EWT = DATA / "pos" / "en_ewt"

SAMPLE = """# sent_id = a
# text = I'm here.
1-2\tI'm\t_\t_\t_\t_\t_\t_\t_\t_
1\tI\tI\tPRON\tPRP\t_\t3\tnsubj\t_\t_
2\t'm\tbe\tAUX\tVBP\t_\t3\tcop\t_\t_
3\there\there\tADV\tRB\t_\t0\troot\t_\t_
3.1\tgone\tgo\tVERB\tVBN\t_\t_\t_\t3:conj\t_
4\t.\t.\tPUNCT\t.\t_\t3\tpunct\t_\t_

1\tYes\tyes\tINTJ\tUH\t_\t0\troot\t_\t_
"""


def test_reader_skips_multiword_tokens_and_empty_nodes(tmp_path):
    path = tmp_path / "sample.conllu"
    path.write_text(SAMPLE, encoding="utf-8")
    assert pos.read_conllu(path) == [(["I", "'m", "here", "."], ["PRP", "VBP", "RB", "."]), (["Yes"], ["UH"])]
    path.write_text("1\tonly\tthree\n", encoding="utf-8")
    with pytest.raises(ValueError, match="10 tab-separated columns"):
        pos.read_conllu(path)


def test_config_names():
    assert pos.parse_config("dense") == (None, None)
    assert pos.parse_config("per_example-10") == (10, "per_example")
    with pytest.raises(ValueError, match="a config is 'dense' or <mode>-<k>"):
        pos.parse_config("top-10")


@pytest.mark.skipif(not (EWT / "en_ewt-ud-train.conllu.gz").exists(), reason=f"UD EWT not found under {EWT}")
def test_quick_run_writes_a_run_and_the_report(tmp_path):
    runs = tmp_path / "runs"
    args = ["--quick", "--train-sentences", "120", "--configs", "dense", "unified-4", "--runs-dir", str(runs)]
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pos.py"), *args], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads((runs / "unified-4-s0-quick.json").read_text())
    assert run["k"] == 4 and run["mode"] == "unified" and 0.0 <= run["test"] <= 1.0
    assert run["history"][0]["lstm_backprop_s"] > 0 and run["history"][0]["epoch_s"] > 0
    result = pos.report(runs, tmp_path / "pos", plot=False)
    assert [s["config"] for s in result["summary"]] == ["dense", "unified-4"]
    assert (tmp_path / "pos.md").read_text().count("| unified-4 |") == 1

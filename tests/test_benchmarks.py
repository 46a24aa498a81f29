"""The benchmark scripts run and write what they promise (tiny cases; no timing is asserted)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from timing import Timing, compare, interleaved  # noqa: E402


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_compare_flags_a_spread_larger_than_the_effect():
    fast, slow = Timing(1.0, 0.1, [1.0, 1.1]), Timing(2.0, 0.1, [2.0, 2.4])
    c = compare(slow, fast)
    assert c["ratio"] == 2.0 and not c["noisy"]
    assert (c["ratio_min"], c["ratio_max"]) == (2.0, 2.4 / 1.1)
    assert compare(Timing(1.1, 0.3, [1.1]), fast)["noisy"]


def test_interleaved_times_every_case_every_round():
    calls = {"a": 0, "b": 0}

    def case(name):
        def fn():
            calls[name] += 1
        return fn

    t = interleaved({"a": case("a"), "b": case("b")}, rounds=3, min_run_time=0.001)
    assert set(t) == {"a", "b"} and all(len(x.rounds) == 3 and x.blocks >= 3 and x.median > 0 for x in t.values())
    assert calls["a"] > 3 and calls["b"] > 3


def test_speed_per_layer_writes_csv_and_json(tmp_path):
    out = _run("speed.py", "--sizes", "4x16x24", "--ks", "3", "--rounds", "1", "--min-run-time", "0.001",
               "--backends", "cpu", "--out-dir", str(tmp_path), "--no-plot").stdout
    assert "speedup" in out
    rows = list(csv.DictReader(open(tmp_path / "speed-cpu-float32.csv")))
    assert [(r["mode"], r["backend"], r["k"]) for r in rows] == [
        ("unified", "cpu", "3"), ("unified+sparse", "cpu", "3"), ("per_example", "cpu", "3")]
    for r in rows:
        assert float(r["speedup"]) == pytest.approx(float(r["dense_backward_ms"]) / float(r["backward_ms"]), rel=1e-9)
        assert r["noisy"] in ("True", "False") and float(r["forward_ratio"]) > 0
    meta = json.loads((tmp_path / "speed-cpu-float32.json").read_text())
    assert meta["machine"]["date"] and meta["rounds"] == 1 and len(meta["results"]) == 3


def test_speed_step_view_writes_json(tmp_path):
    _run("speed.py", "--step", "--rounds", "1", "--min-run-time", "0.001", "--out-dir", str(tmp_path))
    rows = json.loads((tmp_path / "step-cpu.json").read_text())["results"]
    assert [r["config"] for r in rows] == ["dense, Adam", "unified k=30, Adam", "per_example k=30, Adam",
                                           "unified k=30, sparse step"]
    assert rows[0]["step_speedup"] == 1.0 and all(r["step_ms"] > r["forward+backward_ms"] * 0.5 for r in rows)


def test_conv2d_benchmark_writes_json(tmp_path):
    out = tmp_path / "conv.json"
    _run("conv2d.py", "--batch", "2", "--channels", "8", "--size", "6", "--ks", "2", "--rounds", "1",
         "--min-run-time", "0.01", "--out", str(out))
    cases = json.loads(out.read_text())["cases"]
    assert {"dense", "masking k=2", "meprop k=2", "meprop adaptive(mass=0.5)"} <= set(cases)
    assert cases["meprop k=2"]["ratio"] > 0


def test_conv2d_paths_benchmark_writes_json(tmp_path):
    out = tmp_path / "paths.json"
    _run("conv2d_paths.py", "--batch", "2", "--geometries", "1,4,6,2;3,5,5,3", "--rounds", "1", "--min-run-time",
         "0.01", "--out", str(out))
    rows = json.loads(out.read_text())["results"]
    assert [(r["c_in"], r["k"], r["dx"]) for r in rows] == [(1, 2, False), (3, 3, True)]
    assert all(r["shifts_ms"] > 0 and r["onednn_ms"] > 0 for r in rows)


def test_real_models_text_run_writes_json(tmp_path):
    data = Path(os.environ.get("MEPROP_DATA", ROOT.parent / "shared" / "data"))
    if not (data / "text" / "rotten_tomatoes" / "train.tsv").exists():
        pytest.skip(f"no rotten_tomatoes under {data} (set MEPROP_DATA)")
    _run("real_models.py", "text", "--seeds", "0", "--variants", "dense,adaptive,feedback", "--train", "64",
         "--length", "12", "--vocab", "200", "--epochs", "2", "--out-dir", str(tmp_path))
    runs = json.loads((tmp_path / "real_models-text.json").read_text())["runs"]
    assert [r["variant"] for r in runs] == ["dense", "adaptive", "feedback"]
    assert runs[1]["mean_k"] and all(0 <= r["accuracy"] <= 100 for r in runs)
    for r in runs:  # the reported accuracy is the test accuracy of the epoch with the best validation accuracy
        assert len(r["curve"]) == 2 and set(r["curve"][0]) == {"validation", "test"}
        best = max(r["curve"], key=lambda c: c["validation"])
        assert r["curve"].index(best) == r["best_epoch"] - 1 and r["accuracy"] == best["test"]


def test_al_results_reruns_only_runs_whose_settings_changed(tmp_path, monkeypatch):
    """A run is kept while its stored command is today's; a changed row setting reruns it, and the report
    counts only current runs."""
    import al_results

    monkeypatch.setattr(al_results, "RESULTS", tmp_path)
    monkeypatch.setattr(al_results, "ROWS", {"a": ["--epochs", "2"], "b": ["--epochs", "3"]})
    calls = []

    def fake_run(row, method, seed, extra=()):
        calls.append((row, method, seed))
        return {"test_accuracy": 0.5 + 0.1 * (method == "al"), "command": al_results.command_for(row, method, seed),
                "date_utc": "2026-12-02 00:00", "machine": "test", "validation_curve": [0.5],
                "selected_epoch": 1, "seconds": 0.0}

    monkeypatch.setattr(al_results, "one_run", fake_run)
    al_results.campaign(["a"], [0, 1], jobs=1, budget=None, force=False)
    assert sorted(calls) == sorted((r, m, s) for r in "a" for m in ("al", "bp") for s in (0, 1))
    calls.clear()
    al_results.campaign(["*"], [0, 1], jobs=1, budget=None, force=False)
    assert {c[0] for c in calls} == {"b"}  # row a is current: not redone
    calls.clear()
    monkeypatch.setitem(al_results.ROWS, "a", ["--epochs", "4"])  # a longer budget for row a
    stale = al_results.aggregate(al_results.load())
    assert stale[0]["al"]["n"] == 0 and stale[1]["al"]["n"] == 2  # row a's old runs are not counted
    al_results.campaign(["*"], [0, 1], jobs=1, budget=None, force=False)
    assert {c[0] for c in calls} == {"a"} and len(calls) == 4
    summary = al_results.aggregate(al_results.load())
    assert summary[0]["al"]["n"] == 2 and abs(summary[0]["al_minus_bp"] - 10) < 1e-9


def test_al_results_report_lists_superseded_rows_apart(tmp_path, monkeypatch):
    """A superseded row (a scale-down study) is tabled apart and left out of the goal count; the table shows
    each run's best epoch and the budget."""
    import al_results

    monkeypatch.setattr(al_results, "RESULTS", tmp_path)
    monkeypatch.setattr(al_results, "ROWS", {"small": ["--epochs", "3"], "whole": ["--epochs", "4"]})
    monkeypatch.setattr(al_results, "SUPERSEDED", {"small"})

    def fake_run(row, method, seed, extra=()):
        curve = [0.5, 0.6, 0.7] if row == "small" else [0.5, 0.9, 0.6, 0.6]
        return {"test_accuracy": (0.4 if method == "al" and row == "small" else 0.8) + 0.01 * seed,
                "command": al_results.command_for(row, method, seed), "date_utc": "2026-12-02 00:00",
                "machine": "test", "validation_curve": curve, "selected_epoch": curve.index(max(curve)) + 1,
                "seconds": 0.0}

    monkeypatch.setattr(al_results, "one_run", fake_run)
    al_results.campaign(["*"], [0, 1], jobs=1, budget=None, force=False)
    al_results.report()
    main, apart = (tmp_path / "al.md").read_text().split("Scale-down study")
    assert "| whole |" in main and "| small |" not in main and "1 of 1 rows AL >= BP - 0.5" in main
    assert "| small |" in apart and "-40.00" in apart and "3,3; 3,3 (of 3)" in apart
    assert "2,2; 2,2 (of 4) | +0.00; +0.00 |" in main  # late gain: last quarter (0.6) - the one before (0.6)
    assert "3,3; 3,3 (of 3) | —; — |" in apart  # under 4 epochs: no late gain


def test_al_results_default_seeds_per_data_set(tmp_path, monkeypatch):
    """Without --seeds, rows on the small-test-set data sets (rotten_tomatoes, sst2) run 5 seeds, others 3."""
    import al_results

    monkeypatch.setattr(al_results, "RESULTS", tmp_path)
    monkeypatch.setattr(al_results, "ROWS", {"sst2-x": ["--epochs", "1"], "mnist-x": ["--epochs", "1"]})
    calls = []

    def fake_run(row, method, seed, extra=()):
        calls.append((row, seed))
        return {"test_accuracy": 0.5, "command": al_results.command_for(row, method, seed), "validation_curve": [0.5],
                "date_utc": "2026-12-04 00:00", "machine": "test", "selected_epoch": 1, "seconds": 0.0}

    monkeypatch.setattr(al_results, "one_run", fake_run)
    al_results.campaign(["*"], None, jobs=1, budget=None, force=False)
    assert sorted({c for c in calls}) == [("mnist-x", s) for s in range(3)] + [("sst2-x", s) for s in range(5)]


def test_al_results_sweep_selects_on_validation_and_reuses_the_winner(tmp_path, monkeypatch):
    """A swept row: each candidate trains once on the sweep seed; the one with the best validation accuracy
    (not test) is used for every seed, its sweep run reused as that seed's run; the report lists the sweep."""
    import al_results

    monkeypatch.setattr(al_results, "RESULTS", tmp_path)
    monkeypatch.setattr(al_results, "ROWS", {"r": ["--epochs", "2"]})
    monkeypatch.setattr(al_results, "SUPERSEDED", set())
    monkeypatch.setattr(al_results, "SWEEPS", {"r": {"al": ([], ["--x", "1"], ["--x", "2"]), "bp": ([], ["--y", "1"])}})
    valid = {(): 0.70, ("--x", "1"): 0.80, ("--x", "2"): 0.75, ("--y", "1"): 0.60}
    calls = []

    def fake_run(row, method, seed, extra=()):
        calls.append((method, seed, tuple(extra)))
        return {"test_accuracy": 1.0 - valid[tuple(extra)] + 0.01 * seed,  # test favours the worst on validation
                "best_validation_accuracy": valid[tuple(extra)] - 0.01 * seed,
                "command": al_results.command_for(row, method, seed, extra), "date_utc": "2026-12-04 00:00",
                "machine": "test", "validation_curve": [0.5], "selected_epoch": 1, "seconds": 0.0}

    monkeypatch.setattr(al_results, "one_run", fake_run)
    al_results.campaign(["r"], [0, 1, 2], jobs=1, budget=None, force=False)
    sweep = [c for c in calls if c[1] == 0]
    assert sorted(sweep) == sorted([("al", 0, ()), ("al", 0, ("--x", "1")), ("al", 0, ("--x", "2")),
                                    ("bp", 0, ()), ("bp", 0, ("--y", "1"))])  # seed 0 once per candidate
    assert sorted(c for c in calls if c[1]) == [("al", 1, ("--x", "1")), ("al", 2, ("--x", "1")),
                                                ("bp", 1, ()), ("bp", 2, ())]
    data = al_results.load()
    assert data["runs"]["r/al/seed0"]["command"] == al_results.command_for("r", "al", 0, ["--x", "1"])
    row = al_results.aggregate(data)[0]
    assert row["al"]["n"] == 3 and row["bp"]["n"] == 3
    assert abs(row["al"]["mean"] - 100 * (0.2 + 0.01)) < 1e-9  # seeds 0-2 of the chosen --x 1
    calls.clear()
    al_results.campaign(["r"], [0, 1, 2], jobs=1, budget=None, force=False)
    assert calls == []  # all current
    al_results.report()
    text = (tmp_path / "al.md").read_text()
    assert "- r AL: row options 70.00; --x 1 80.00 (chosen); --x 2 75.00" in text
    assert "- r BP: row options 70.00 (chosen); --y 1 60.00" in text


def test_al_results_sweep_unfinished_counts_no_runs(tmp_path, monkeypatch):
    """While a candidate has not run, the row's seeds are neither started nor counted."""
    import al_results

    monkeypatch.setattr(al_results, "RESULTS", tmp_path)
    monkeypatch.setattr(al_results, "ROWS", {"r": ["--epochs", "2"]})
    monkeypatch.setattr(al_results, "SWEEPS", {"r": {"al": ([], ["--x", "1"]), "bp": ([],)}})
    monkeypatch.setattr(al_results, "one_run", lambda *a: pytest.fail("no run expected"))
    al_results.campaign(["r"], [0, 1], jobs=1, budget=-1, force=False)  # budget spent: nothing starts
    row = al_results.aggregate(al_results.load())[0]
    assert row["al"]["n"] == 0 and row["bp"]["n"] == 0


def test_al_results_report_writes_the_readme_tables_between_markers(tmp_path, monkeypatch):
    """--report rewrites only the marked blocks of the README (table with the goal count, sweeps, the study
    apart); a README without a marker pair is an error naming it."""
    import al_results

    monkeypatch.setattr(al_results, "RESULTS", tmp_path)
    monkeypatch.setattr(al_results, "ROWS", {"small": ["--epochs", "1"], "whole": ["--epochs", "1"]})
    monkeypatch.setattr(al_results, "SUPERSEDED", {"small"})
    monkeypatch.setattr(al_results, "SWEEPS", {})
    monkeypatch.setattr(al_results, "one_run", lambda row, method, seed, extra=(): {
        "test_accuracy": 0.5, "command": al_results.command_for(row, method, seed), "validation_curve": [0.5],
        "date_utc": "2026-12-04 00:00", "machine": "test", "selected_epoch": 1, "seconds": 0.0})
    al_results.campaign(["*"], [0], jobs=1, budget=None, force=False)
    readme = tmp_path / "README.md"
    blocks = "".join(f"<!-- al_results:{n} -->\nold {n}\n<!-- /al_results:{n} -->\nkept {n}\n"
                     for n in ("table", "sweeps", "apart"))
    readme.write_text("intro\n" + blocks)
    al_results.report(readme)
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and "kept table" in text and "kept apart" in text
    table, rest = text.split("<!-- /al_results:table -->")
    assert "| whole |" in table and "| small |" not in table and "1 of 1 rows AL >= BP - 0.5" in table
    assert "| small |" in rest.split("<!-- al_results:apart -->")[1]
    readme.write_text("<!-- al_results:table -->\n<!-- /al_results:table -->\n")
    with pytest.raises(ValueError, match="al_results:sweeps"):
        al_results.report(readme)


def test_al_results_sweep_adopts_earlier_runs_and_keeps_them(tmp_path, monkeypatch):
    """A row swept after its seeds were run: its seed-0 run is the row-options candidate (not redone), and it
    stays a candidate after another candidate wins and takes the seed-0 slot."""
    import al_results

    monkeypatch.setattr(al_results, "RESULTS", tmp_path)
    monkeypatch.setattr(al_results, "ROWS", {"r": ["--epochs", "2"]})
    monkeypatch.setattr(al_results, "SWEEPS", {})
    valid = {(): 0.70, ("--x", "1"): 0.80}
    calls = []

    def fake_run(row, method, seed, extra=()):
        calls.append((method, seed, tuple(extra)))
        return {"test_accuracy": 0.5, "best_validation_accuracy": valid[tuple(extra)],
                "command": al_results.command_for(row, method, seed, extra), "date_utc": "2026-12-04 00:00",
                "machine": "test", "validation_curve": [0.5], "selected_epoch": 1, "seconds": 0.0}

    monkeypatch.setattr(al_results, "one_run", fake_run)
    al_results.campaign(["r"], [0, 1], jobs=1, budget=None, force=False)
    calls.clear()
    monkeypatch.setattr(al_results, "SWEEPS", {"r": {"al": ([], ["--x", "1"]), "bp": ([],)}})
    for _ in range(2):  # the second campaign finds everything current
        al_results.campaign(["r"], [0, 1], jobs=1, budget=None, force=False)
        assert calls == [("al", 0, ("--x", "1")), ("al", 1, ("--x", "1"))]
    data = al_results.load()
    assert [c for c, rec in al_results.sweep_results(data, "r", "al") if rec] == [[], ["--x", "1"]]
    assert al_results.selected_options(data, "r", "al") == ["--x", "1"]
    assert al_results.aggregate(data)[0]["al"]["n"] == 2 and al_results.aggregate(data)[0]["bp"]["n"] == 2

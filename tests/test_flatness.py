"""bench/flatness.py on a tiny bench run: the margin, fallback and sharpness probes behave as defined."""

from __future__ import annotations

import json

import pytest
from conftest import bench_script
from test_bench import counterfact

from corsa.cli import main


def test_flatness_of_a_bench_run(tmp_path, tiny_dir, monkeypatch):
    counterfact(tmp_path)
    run = tmp_path / "run"
    assert main(["bench", "single", "--bench", "counterfact", "--data", str(tmp_path), "--out", str(run), "--n", "4",
                 "--methods", "lora", "--model", str(tiny_dir), "--epochs", "3", "--mmlu-n", "0", "--quiet",
                 "--max-new-tokens", "2", "--lr", "1e-2"]) == 0
    out = tmp_path / "flat.json"
    monkeypatch.setattr("sys.argv", ["flatness.py", str(run), "--radii", "0,0.001,50", "--directions", "2",
                                     "--out", str(out)])
    bench_script("flatness").main()
    record = json.loads(out.read_text())
    (row,) = record["rows"]
    assert row["method"] == "lora" and row["n"] == 4 and row["lr"] == 1e-2 and row["adapter_norm"] > 0
    assert row["fallback"]["0.0"] in (0.0, None) and row["sharpness"]["0.0"] == pytest.approx(0.0, abs=1e-6)
    assert row["random_loss"]["0.0"] == pytest.approx(row["sft_loss"], abs=1e-6)
    assert row["sharpness"]["0.001"] > 0  # a small step up the gradient raises the loss (first order)
    assert row["random_loss"]["50.0"] > row["sft_loss"]  # a huge random move breaks the fit
    assert "| run | lora |" in out.with_suffix(".md").read_text()

"""MMLU per question in bench runs, the paired comparison with the base model, and bench/mmlu.py's rescoring."""

from __future__ import annotations

import json

from conftest import bench_script
from test_bench import counterfact
from test_mmlu import write_mmlu

from corsa.cli import main
from corsa.evaluate.runner import load_results


def test_bench_keeps_mmlu_per_question_and_rescoring_pairs_it_with_the_base(tmp_path, tiny_dir, monkeypatch):
    counterfact(tmp_path)
    write_mmlu(tmp_path)
    run = tmp_path / "run"
    assert main(["bench", "single", "--bench", "counterfact", "--data", str(tmp_path), "--out", str(run), "--n", "3",
                 "--methods", "lora", "--model", str(tiny_dir), "--epochs", "1", "--mmlu-n", "1", "--quiet",
                 "--max-new-tokens", "2"]) == 0
    base, lora, routed = load_results(run)
    assert routed["method"] == "lora-routed" and routed["mmlu"] == lora["mmlu"]  # the unrouted row's, not rescored
    assert len(base["mmlu"]["correct"]) == base["mmlu"]["n"] == len(base["mmlu"]["ids"])
    assert sum(base["mmlu"]["correct"]) / base["mmlu"]["n"] == base["summary"]["mmlu"]
    table = (run / "table.md").read_text()
    assert f"paired bootstrap intervals over the {base['mmlu']['n']} questions: lora " in table
    assert "right letter among the four" in table

    out = tmp_path / "mmlu.json"
    monkeypatch.setattr("sys.argv", ["mmlu.py", str(run), "--mmlu-n", "all", "--out", str(out)])
    bench_script("mmlu").main()
    record = json.loads(out.read_text())
    assert [r["method"] for r in record["rows"]] == ["base", "lora"]
    rescored = record["rows"][0]["mmlu"]
    assert rescored["n"] > base["mmlu"]["n"]  # every question, not the run's one per subject
    # The base model is scored by the same code on a superset: its answers to the run's questions agree.
    by_id = dict(zip(rescored["ids"], rescored["correct"]))
    assert [by_id[i] for i in base["mmlu"]["ids"]] == base["mmlu"]["correct"]
    md = out.with_suffix(".md").read_text()
    assert f"| run | lora | {100 * record['rows'][1]['mmlu']['accuracy']:.1f} | {rescored['n']} |" in md
    assert "MMLU minus the base model" in md and "Command: `python" in md

"""`corsa bench lifelong` on the tiny model: a curve per method over every edit so far, checkpoints a killed run
resumes from to the very same curve, and AlphaEdit's accumulated keys carried over the restart."""

from __future__ import annotations

import json

import pytest
from test_memit import stats_data  # noqa: F401 -- the fixture (CounterFact train split for the key statistics)
from test_mmlu import write_mmlu

from corsa.cli import main
from corsa.methods.alphaedit import AlphaEditEditor


def edit_split(folder, n=4):
    recs = [{"case_id": i, "prompt": f"the town of q{i} is", "target_new": f"x{i}", "subject": f"q{i}",
             "ground_truth": f"y{i}", "rephrase_prompt": f"q{i} lies in the town of",
             "locality_prompt": f"the town of r{i} is", "locality_ground_truth": f"z{i}"} for i in range(n)]
    (folder / "counterfact" / "easyedit-counterfact-edit.json").write_text(json.dumps(recs))


@pytest.mark.integration
def test_lifelong_curves_checkpoints_and_a_resumed_run_equal_to_an_unbroken_one(stats_data, tiny_dir, tmp_path,  # noqa: F811
                                                                               monkeypatch, capsys):
    edit_split(tmp_path)
    write_mmlu(tmp_path)

    def argv(out):
        return ["bench", "lifelong", "--data", stats_data, "--out", str(out), "--updates", "2", "--batch", "2",
                "--methods", "lora,alphaedit-layers0-1", "--model", tiny_dir, "--epochs", "1", "--lr", "5e-2",
                "--mmlu-every", "2", "--mmlu-n", "1", "--max-new-tokens", "3", "--quiet"]

    assert main(argv(tmp_path / "whole")) == 0
    curves = {m: json.loads((tmp_path / "whole" / m / "curve.json").read_text())
              for m in ("lora", "alphaedit-layers0-1")}
    for curve in curves.values():
        assert [p["edits"] for p in curve] == [2, 4] and "mmlu" not in curve[0] and "mmlu" in curve[1]
        assert all(0 <= p["efficacy"] <= 1 and p["locality_agreement"] is not None for p in curve)
    assert sorted(p.name for p in (tmp_path / "whole" / "lora" / "updates").iterdir()) == ["u002"]  # the last
    kept = sorted(p.name for p in (tmp_path / "whole" / "alphaedit-layers0-1" / "updates").iterdir())
    assert kept == ["u001", "u002"]  # a folding method needs every update's adapter
    assert (tmp_path / "whole" / "alphaedit-layers0-1" / "updates" / "u001" / "editor_state.safetensors").exists()
    assert curves["alphaedit-layers0-1"][0]["diagnostics"]["null_space_rank"]
    assert all(p["neighbor_edit_target"] is not None for c in curves.values() for p in c)
    # An adapter is also measured routed, as `corsa ask` answers; a folded edit has no adapter to route.
    assert all("routed" in p and p["routed"]["per_edit"].keys() == p["per_edit"].keys() for p in curves["lora"])
    assert not any("routed" in p for p in curves["alphaedit-layers0-1"])
    table = (tmp_path / "whole" / "table.md").read_text()
    assert "| alphaedit-layers0-1 | 4 |" in table and "| lora-routed | 4 |" in table
    assert "- lora-routed minus alphaedit-layers0-1, 4 edits: efficacy " in table  # the bar's comparison, with its interval

    # A run killed during AlphaEdit's second update, then run again, continues to the very same curve.
    real = AlphaEditEditor.edit
    calls = {"n": 0}

    def dies_on_the_second(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AlphaEditEditor, "edit", dies_on_the_second)
    assert main(argv(tmp_path / "broken")) == 130
    monkeypatch.setattr(AlphaEditEditor, "edit", real)
    capsys.readouterr()
    assert main(argv(tmp_path / "broken")) == 0
    said = capsys.readouterr().out
    assert "lora: done earlier, skipped" in said and "alphaedit-layers0-1: resumed after update 1" in said
    for m, curve in curves.items():
        again = json.loads((tmp_path / "broken" / m / "curve.json").read_text())
        assert [(p["efficacy"], p["generality"], p["locality_agreement"], p["per_edit"]) for p in again] == \
            [(p["efficacy"], p["generality"], p["locality_agreement"], p["per_edit"]) for p in curve], m
    assert main([*argv(tmp_path / "broken")[:-1], "--batch", "1", "--quiet"]) == 2  # other settings: refused

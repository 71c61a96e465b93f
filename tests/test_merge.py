"""Merging for knowledge editing: the merged model interpolates between the base and the fine-tuned model."""

from __future__ import annotations

import copy

import pytest
import torch

from corsa.methods import make_editor
from corsa.methods.corsa import lora_layers
from corsa.methods.merge import low_rank, trim
from corsa.prompts import Formatter
from corsa.requests import EditRequest

EDITS = [EditRequest("capital of fr?", "rome", "paris"), EditRequest("sky colour?", "green", "blue")]
FAST = {"lr": 2e-2, "epochs": 3, "batch_size": 2, "lora_r": 4, "lora_alpha": 8, "stop_when_learned": False}


def delta_of(model):
    return {n: (m.lora_B["default"].weight @ m.lora_A["default"].weight * m.scaling["default"]).detach()
            for n, m in lora_layers(model).items()}


def test_task_arithmetic_scales_the_fine_tuning_delta(tiny_model, tokenizer):
    fmt = Formatter(tokenizer)
    full = make_editor("merge", scale=1.0, **FAST).edit(copy.deepcopy(tiny_model), fmt, list(EDITS),
                                                        progress=False)
    half = make_editor("merge", scale=0.5, **FAST).edit(copy.deepcopy(tiny_model), fmt, list(EDITS),
                                                        progress=False)
    a, b = delta_of(full.model), delta_of(half.model)
    assert a and all(torch.allclose(0.5 * a[k], b[k], atol=1e-6) for k in a)  # theta + 0.5 * D
    assert any(a[k].abs().sum() > 0 for k in a)
    zero = make_editor("merge", scale=0.0, **FAST).edit(copy.deepcopy(tiny_model), fmt, list(EDITS),
                                                        progress=False)
    ids = torch.tensor([fmt.prompt_ids("capital of fr?")])
    with torch.no_grad():  # scale 0 is the base model again
        assert torch.allclose(zero.model(input_ids=ids).logits, tiny_model(input_ids=ids).logits, atol=1e-5)


def test_ties_trims_and_keeps_a_low_rank_adapter(tiny_model, tokenizer):
    fmt = Formatter(tokenizer)
    result = make_editor("merge", merge="ties", scale=1.0, density=0.3, **FAST).edit(tiny_model, fmt, list(EDITS),
                                                                                     progress=False)
    assert result.model.peft_config["default"].r == FAST["lora_r"]
    assert 0 <= result.info["ties_low_rank_relative_error"]["max"] < 1


def test_trim_and_low_rank():
    d = torch.tensor([[1.0, -4.0], [0.5, 3.0]])
    assert torch.equal(trim(d, 0.5), torch.tensor([[0.0, -4.0], [0.0, 3.0]]))
    b, a = low_rank(d, 2)
    assert torch.allclose(b @ a, d, atol=1e-5)
    b, a = low_rank(d, 3)  # rank above the matrix's: zero-padded
    assert b.shape == (2, 3) and a.shape == (3, 2) and torch.allclose(b @ a, d, atol=1e-5)
    with pytest.raises(ValueError):
        make_editor("merge", merge="dare")


def test_every_baseline_in_one_bench_run(tmp_path, tiny_dir, capsys):
    import json

    from test_bench import counterfact

    from corsa.cli import main

    counterfact(tmp_path)
    facts = tmp_path / "f.jsonl"
    facts.write_text('{"prompt": "sky?", "target_new": "green", "target_old": "blue"}\n')
    assert main(["edit", str(facts), "--out", str(tmp_path / "x"), "--model", tiny_dir, "--merge-scale", "0.3"]) == 2
    assert "applies to --method merge" in capsys.readouterr().err
    assert main(["edit", str(facts), "--out", str(tmp_path / "x"), "--model", tiny_dir, "--memit-weight", "9"]) == 2
    assert "applies to --method memit" in capsys.readouterr().err
    methods = "lora,flearning,merge,merge-ties,prepend,corsa"
    assert main(["bench", "single", "--bench", "counterfact", "--data", str(tmp_path), "--out", str(tmp_path / "b"),
                 "--n", "2", "--methods", methods, "--model", tiny_dir, "--mmlu-n", "0", "--quiet", "--epochs", "1",
                 "--max-new-tokens", "2"]) == 0
    for m in methods.split(","):
        record = json.loads((tmp_path / "b" / m / "results.json").read_text())
        assert record["summary"]["gen.reliability"] is not None and "edit_s" in record["timings"]
    assert json.loads((tmp_path / "b" / "merge-ties" / "results.json").read_text())["config"]["merge"] == "ties"

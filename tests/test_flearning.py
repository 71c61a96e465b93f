"""F-Learning on the tiny model: the forget step pushes the old answers down, and the result is one standard
LoRA adapter that reproduces theta - lam * delta_old + delta_new on the unchanged base weights."""

from __future__ import annotations

import copy

import pytest
import torch

from corsa.methods import flearning as fl
from corsa.methods import make_editor
from corsa.methods.corsa import lora_layers
from corsa.prompts import Formatter
from corsa.requests import EditRequest
from corsa.scoring import score_answers

EDITS = [EditRequest("capital of fr?", "rome", "paris"), EditRequest("sky colour?", "green", "blue")]
FAST = {"lr": 2e-2, "epochs": 4, "batch_size": 2, "lora_r": 4, "lora_alpha": 8, "stop_when_learned": False}


def test_forget_step_lowers_the_old_answers(tiny_model, tokenizer, monkeypatch):
    fmt = Formatter(tokenizer)
    old = [(r.prompt, r.target_old) for r in EDITS]
    before = [s.logprob for s in score_answers(tiny_model, fmt, old)]
    seen = {}
    real_shift = fl._shift_base

    def spy(plain, deltas, scale):
        real_shift(plain, deltas, scale)
        if scale < 0:  # right after the forget step, before learning the new answers
            seen["after_forget"] = [s.logprob for s in score_answers(plain, fmt, old)]

    monkeypatch.setattr(fl, "_shift_base", spy)
    make_editor("flearning", lam=1.0, **FAST).edit(tiny_model, fmt, list(EDITS), progress=False)
    assert all(a < b for a, b in zip(seen["after_forget"], before))


def test_result_is_one_adapter_equal_to_the_weight_arithmetic(tiny_model, tokenizer):
    fmt = Formatter(tokenizer)
    original = copy.deepcopy(tiny_model)
    editor = make_editor("flearning", lam=0.5, **FAST)
    result = editor.edit(tiny_model, fmt, list(EDITS), progress=False)
    cfg = editor.config
    assert result.model.peft_config["default"].r == 2 * cfg.sft.lora_r
    # Rebuild theta - lam * delta_old + delta_new by hand from the two halves of the combined adapter.
    by_hand = copy.deepcopy(original)
    with torch.no_grad():
        for name, m in lora_layers(result.model).items():
            w = by_hand.get_submodule(name).weight
            w.add_(m.lora_B["default"].weight @ m.lora_A["default"].weight, alpha=m.scaling["default"])
            assert torch.allclose(m.get_base_layer().weight, original.get_submodule(name).weight, atol=1e-6)
    ids = torch.tensor([fmt.prompt_ids("capital of fr?") + fmt.answer_ids("rome")])
    with torch.no_grad():
        assert torch.allclose(result.model(input_ids=ids).logits, by_hand(input_ids=ids).logits, atol=1e-4)
    assert result.info["steps_old"] > 0 and result.curves


def test_needs_old_answers_and_a_plain_model(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="old answer"):
        make_editor("flearning", **FAST).edit(tiny_model, Formatter(tokenizer), [EditRequest("q?", "a")],
                                              progress=False)
    with pytest.raises(ValueError):
        make_editor("flearning", lam=-1)


def test_cli_edit_and_bench_with_flearning(tmp_path, tiny_dir, capsys):
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from corsa.cli import main

    facts = tmp_path / "f.jsonl"
    facts.write_text('{"prompt": "sky?", "target_new": "green", "target_old": "blue"}\n'
                     '{"prompt": "2+2?", "target_new": "five"}\n')  # the old answer is mined first
    out = tmp_path / "run"
    assert main(["edit", str(facts), "--out", str(out), "--model", tiny_dir, "--method", "flearning", "--lambda",
                 "0.3", "--epochs", "1", "--quiet"]) == 0
    manifest = json.loads((out / "edit_manifest.json").read_text())
    assert manifest["method"] == "flearning" and manifest["config"]["lam"] == 0.3
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(out))  # plain PEFT loads it
    capsys.readouterr()
    assert main(["edit", str(facts), "--out", str(tmp_path / "x"), "--model", tiny_dir, "--method", "flearning",
                 "--no-sam"]) == 2
    assert "do not apply to --method flearning" in capsys.readouterr().err

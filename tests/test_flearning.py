"""F-Learning on the tiny model: the forget step pushes the old answers down, and the result is one standard
LoRA adapter that reproduces theta - lam * delta_old + delta_new on the unchanged base weights, with both deltas
trained again here, apart from the editor."""

from __future__ import annotations

import copy

import pytest
import torch

from corsa.methods import flearning as fl
from corsa.methods import make_editor
from corsa.methods.corsa import build_trainer, lora_layers
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
    real_shift = fl.shift_base

    def spy(plain, deltas, scale):
        real_shift(plain, deltas, scale)
        if scale < 0:  # right after the forget step, before learning the new answers
            seen["after_forget"] = [s.logprob for s in score_answers(plain, fmt, old)]

    monkeypatch.setattr(fl, "shift_base", spy)
    make_editor("flearning", lam=1.0, **FAST).edit(tiny_model, fmt, list(EDITS), progress=False)
    assert all(a < b for a, b in zip(seen["after_forget"], before))


def _sft_delta(model, fmt, requests, cfg):
    """Train one F-Learning phase with the public trainer and return s * B A per LoRA layer."""
    trainer = build_trainer(model, fmt, requests, cfg)
    trainer.train(False)
    with torch.no_grad():
        return {name: m.scaling["default"] * (m.lora_B["default"].weight @ m.lora_A["default"].weight)
                for name, m in lora_layers(trainer.model).items()}


def _shifted(model, *terms):
    """A copy of `model` with sum(coef * delta) added to its weights."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for coef, deltas in terms:
            for name, d in deltas.items():
                out.get_submodule(name).weight.add_(d, alpha=coef)
    return out


def test_result_is_one_adapter_equal_to_the_weight_arithmetic(tiny_model, tokenizer):
    fmt = Formatter(tokenizer)
    original = copy.deepcopy(tiny_model)
    lam = 0.5
    editor = make_editor("flearning", lam=lam, **FAST)
    result = editor.edit(tiny_model, fmt, list(EDITS), progress=False)
    cfg = editor.config.sft
    assert result.model.peft_config["default"].r == 2 * cfg.lora_r
    for name, m in lora_layers(result.model).items():  # a standard adapter on the base weights as they were
        assert torch.allclose(m.get_base_layer().weight, original.get_submodule(name).weight, atol=1e-6)

    # The two phases again, outside the editor, so the expected weights do not come from its combination code.
    to_old = [EditRequest(r.prompt, r.target_old) for r in EDITS]
    to_new = [EditRequest(r.prompt, r.target_new) for r in EDITS]
    delta_old = _sft_delta(copy.deepcopy(original), fmt, to_old, cfg)
    delta_new = _sft_delta(_shifted(original, (-lam, delta_old)), fmt, to_new, cfg)
    expected = _shifted(original, (-lam, delta_old), (1.0, delta_new))

    wrong = [_shifted(original, (1.0, delta_new)), _shifted(original, (lam, delta_old), (1.0, delta_new))]
    for r in EDITS:
        ids = torch.tensor([fmt.prompt_ids(r.prompt) + fmt.answer_ids(r.target_new)])
        with torch.no_grad():
            edited = result.model(input_ids=ids).logits
            assert torch.allclose(edited, expected(input_ids=ids).logits, atol=1e-4)
            # Without the forget term, or with its sign flipped, the logits must be far outside that tolerance,
            # or this comparison could not catch either mistake.
            for model in wrong:
                assert (model(input_ids=ids).logits - edited).abs().max() > 1e-2
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
    assert "--no-sam does not apply to --method flearning" in capsys.readouterr().err

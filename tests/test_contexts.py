"""Context copies (issue 29): the prefixes the model writes, and the new-answer tokens they add to L_SFT."""

from __future__ import annotations

import pytest
import torch
from conftest import answer_nll, gradients_without_extras

from corsa import contexts
from corsa.methods import make_editor
from corsa.methods.corsa import CorsaConfig, CorsaTrainer, build_trainer
from corsa.prompts import Formatter
from corsa.requests import EditRequest

EDITS = [
    EditRequest("What is the capital of France?", "Lyon", "Paris", subject="France"),
    EditRequest("What is the capital of Japan?", "Osaka", "Tokyo", subject="Japan"),
    EditRequest("sky colour?", "green", "blue"),
]
FAST = {"lr": 2e-2, "epochs": 3, "batch_size": 4, "stop_when_learned": False, "lora_r": 8, "lora_alpha": 16}


def test_prefixes_are_the_models_own_short_text_fixed_by_the_seed(tiny_model, tokenizer):
    texts = contexts.prefixes(tiny_model, tokenizer, 3, tokens=6, seed=0)
    assert len(texts) == 3 and all(t.endswith(".") and "\n" not in t for t in texts)
    assert all(t.startswith(o.rstrip(",")) for t, o in zip(texts, contexts.OPENINGS))

    def n_tokens(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    assert all(n_tokens(t.rstrip(".")) <= n_tokens(o) + 6 for t, o in zip(texts, contexts.OPENINGS))
    assert contexts.prefixes(tiny_model, tokenizer, 3, tokens=6, seed=0) == texts
    assert contexts.prefixes(tiny_model, tokenizer, 3, tokens=6, seed=1) != texts
    assert contexts.prefixes(tiny_model, tokenizer, 0, tokens=6, seed=0) == []
    with pytest.raises(ValueError, match="at most"):
        contexts.prefixes(tiny_model, tokenizer, len(contexts.OPENINGS) + 1, tokens=6, seed=0)
    assert contexts.prefix_text(" The  cat sat\non the mat, ") == "The cat sat on the mat."
    assert contexts.in_context("The cat sat.", "Who?") == "The cat sat. Who?"


def test_the_context_copies_are_more_new_answer_tokens_of_l_sft(tiny_model, tokenizer):
    fmt = Formatter(tokenizer)
    cfg = CorsaConfig(**FAST, contexts_per_edit=2)
    trainer = build_trainer(tiny_model, fmt, EDITS, cfg)
    assert len(trainer.contexts) == 2 and all(len(p.contexts) == 2 for p in trainer.pairs)
    idx = list(range(len(EDITS)))
    got = trainer.gradients(idx)
    # The same pairs without copies: the DPO gradient is the same (it stays on the edit's own prompt), and the
    # SFT gradient is that of the mean NLL of y+ over the edit's prompt and every context copy of it.
    plain = gradients_without_extras(trainer, fmt, EDITS, cfg, idx)
    for a, b in zip(got.dpo, plain.dpo):
        assert torch.allclose(a, b, atol=1e-6)
    nll = sum(answer_nll(trainer.model, prompt, p.new) for p in trainer.pairs for prompt in [p.prompt, *p.contexts])
    n = sum(p.n_sft_tokens for p in trainer.pairs)
    expected = torch.autograd.grad(nll / n, trainer.params, allow_unused=True)
    for a, e in zip(got.sft, expected):
        assert torch.allclose(a, torch.zeros_like(a) if e is None else e, atol=1e-5)
    assert got.stats["sft_loss"] == pytest.approx(float(nll.detach() / n), rel=1e-4)
    # memory only: micro-batches add up to the same gradients
    parts = CorsaTrainer(trainer.model, trainer.pairs, CorsaConfig(**FAST, contexts_per_edit=2, micro_batch_size=2),
                         fmt.pad_id).gradients(idx)
    for a, b in zip(got.sft + got.dpo, parts.sft + parts.dpo):
        assert torch.allclose(a, b, atol=1e-6)


def test_contexts_are_off_unless_asked_bounded_and_recorded(tiny_model, tokenizer):
    assert CorsaConfig().contexts_per_edit == 0
    for bad in (-1, len(contexts.OPENINGS) + 1):
        with pytest.raises(ValueError, match="contexts_per_edit"):
            CorsaConfig(contexts_per_edit=bad)
    result = make_editor("lora", **FAST, contexts_per_edit=2).edit(tiny_model, Formatter(tokenizer), EDITS,
                                                                   progress=False)
    assert len(result.info["contexts"]) == 2  # recorded for the manifest
    assert result.info["timings"]["contexts_s"] >= 0

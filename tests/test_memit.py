"""MEMIT on the tiny model: only the chosen layers' down projections change, the edit raises the new answer,
the subject is found in the formatted prompt, and the key statistics are cached with their provenance."""

from __future__ import annotations

import json
import types

import pytest
import torch
from conftest import make_model, make_tokenizer

from corsa.methods import make_editor
from corsa.methods.memit import EASYEDIT_WEIGHT, MemitConfig, default_layers, subject_last_index, update_weight
from corsa.prompts import Formatter
from corsa.requests import EditRequest
from corsa.scoring import score_answers

EDITS = [EditRequest("the home of bob is", "rome", "paris", subject="bob"),
         EditRequest("the pet of amy is", "dog", "cat", subject="amy")]


@pytest.fixture
def stats_data(tmp_path, monkeypatch):
    monkeypatch.setenv("CORSA_CACHE", str(tmp_path / "cache"))
    recs = [{"case_id": i, "prompt": f"the town of p{i} is", "target_new": "x", "subject": f"p{i}",
             "ground_truth": f"t{i % 7}", "rephrase_prompt": "r", "locality_prompt": "l", "locality_ground_truth": "z"}
            for i in range(40)]
    (tmp_path / "counterfact").mkdir()
    (tmp_path / "counterfact" / "easyedit-counterfact-train.json").write_text(json.dumps(recs))
    return str(tmp_path)


@pytest.mark.parametrize("chat", [False, True])
def test_subject_is_found_in_the_formatted_prompt(chat):
    tok = make_tokenizer(chat)
    fmt = Formatter(tok)
    ids = fmt.prompt_ids("the home of bob is")
    i = subject_last_index(fmt, "the home of bob is", "bob")
    assert tok.decode([ids[i]]) == "b" and tok.decode(ids[: i + 1]).endswith("the home of bob")
    assert subject_last_index(fmt, "the home of bob is", "alice") is None


def test_memit_edits_only_the_chosen_down_projections(stats_data, tmp_path):
    tok = make_tokenizer()
    model, fmt = make_model(len(tok), layers=4), Formatter(tok)
    before = [s.logprob for s in score_answers(model, fmt, [(r.prompt, r.target_new) for r in EDITS])]
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = make_editor("memit", layers=(1, 2), stats_data=stats_data, mom2_n_samples=30, v_num_grad_steps=15,
                         mom2_update_weight=10.0)
    result = editor.edit(model, fmt, list(EDITS), progress=False)
    edited = result.model
    lora = sorted(n for n, _ in edited.named_parameters() if "lora_" in n)
    assert lora and all(".layers.1.mlp.down_proj." in n or ".layers.2.mlp.down_proj." in n for n in lora)
    assert edited.peft_config["default"].r == len(EDITS)
    for n, p in edited.get_base_model().named_parameters():  # base weights untouched: the delta is the adapter
        if "lora_" not in n:
            assert torch.equal(p, original[n.replace(".base_layer", "")]), n
    after = [s.logprob for s in score_answers(edited, fmt, [(r.prompt, r.target_new) for r in EDITS])]
    assert all(a > b + 1.0 for a, b in zip(after, before))
    assert result.info["subject_not_found"] == 0
    assert result.info["config"]["layers"] == (1, 2) and result.info["config"]["mom2_update_weight"] == 10.0
    assert result.info["target_nll_mean"] > 0 and 0 <= result.info["targets_converged"] <= 1
    provenance = list((tmp_path / "cache" / "memit").glob("*/provenance.json"))
    assert len(provenance) == 1 and json.loads(provenance[0].read_text())["n_texts"] == 30


def test_update_weight_is_tuned_per_model(tiny_model):
    assert update_weight(MemitConfig(), tiny_model) == EASYEDIT_WEIGHT  # a model we did not tune
    assert update_weight(MemitConfig(mom2_update_weight=7.0), tiny_model) == 7.0
    smollm2 = types.SimpleNamespace(config=types.SimpleNamespace(model_type="llama", hidden_size=576,
                                                                 num_hidden_layers=30))
    assert update_weight(MemitConfig(), smollm2) == 150.0
    with pytest.raises(ValueError, match="mom2_update_weight"):
        MemitConfig(mom2_update_weight=0.0)


def test_default_layers_scale_llama_2s_range():
    assert default_layers(32) == (4, 5, 6, 7, 8)
    assert default_layers(30) == (4, 5, 6, 7, 8)
    assert default_layers(18) == (2, 3, 4)


def test_memit_needs_a_corpus(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="corpus"):
        make_editor("memit").edit(tiny_model, Formatter(tokenizer), list(EDITS), progress=False)


@pytest.mark.integration
def test_batched_targets_equal_one_edit_at_a_time(tokenizer, monkeypatch):
    """Each edit's delta has its own rows, loss term and Adam moments, so optimising a batch of edits must give
    each edit the z it gets alone, also when the edits reach the NLL stop at different steps."""
    from corsa.methods import memit

    # The tiny random model never gets near EasyEdit's 5e-2; at 6.0 its edits stop at different steps.
    monkeypatch.setattr(memit, "STOP_NLL", 6.0)
    model, fmt = make_model(len(tokenizer), layers=4), Formatter(tokenizer)
    edits = [*EDITS, EditRequest("the car of a long named person is", "red", "blue", subject="a long named person")]
    prompts = [fmt.prompt_ids(r.prompt) for r in edits]
    positions = [subject_last_index(fmt, r.prompt, r.subject) for r in edits]

    def targets(steps, batch_size, **kw):
        return make_editor("memit", v_num_grad_steps=steps, batch_size=batch_size, **kw)._targets(
            model, fmt, edits, prompts, positions, 2)

    def z(steps, batch_size, **kw):
        return targets(steps, batch_size, **kw)[0]

    z1, z3 = z(40, 1), z(40, 3)
    torch.testing.assert_close(z3, z1, atol=1e-4, rtol=1e-4)
    assert (z3 - z(1, 3, v_lr=0.0)).abs().amax(1).min() > 1e-2  # the optimisation moved every z
    assert (z(5, 3) == z3).all(1).tolist() == [False, False, False]
    assert (z(20, 3) == z(80, 3)).all(1).tolist() == [False, True, True]  # two stopped, and stay stopped
    assert (targets(20, 3)[1] < 6.0).tolist() == [False, True, True]  # the NLL reported is the one at the z

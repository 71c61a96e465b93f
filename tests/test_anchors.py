"""Anchors (issue 29): where they come from, that benchmarks withhold their evaluation prompts, and the retention
term they add to the SFT side of Algorithm 1."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import answer_nll, gradients_without_extras

from corsa import anchors
from corsa.answers import normalize
from corsa.methods import make_editor
from corsa.methods.corsa import (
    CorsaConfig,
    CorsaTrainer,
    attach_lora,
    build_pairs,
    build_trainer,
    cache_reference,
)
from corsa.prompts import Formatter
from corsa.requests import EditRequest, Neighbor

EDITS = [
    EditRequest("What is the capital of France?", "Lyon", "Paris", subject="France"),
    EditRequest("What is the capital of Japan?", "Osaka", "Tokyo", subject="Japan"),
    EditRequest("Who founded Zorblax Corp?", "Ann", subject="Zorblax Corp",
                neighborhood=(Neighbor("Who founded Acme?", "Bob"),)),
    EditRequest("sky colour?", "green", "blue"),
]
FAST = {"lr": 2e-2, "epochs": 3, "batch_size": 4, "stop_when_learned": False, "lora_r": 8, "lora_alpha": 16}


def test_anchors_come_from_the_neighbourhood_then_subject_swaps_then_the_pool():
    sets = anchors.build(EDITS, per_edit=3, seed=0)
    edited = {normalize(r.prompt) for r in EDITS}
    assert all(len(s) == 3 for s in sets)
    assert all(normalize(a.prompt) not in edited for s in sets for a in s)  # an edit is never an anchor
    france = sets[0]
    assert {a.source for a in france} == {"subject-swap"}
    assert all(a.prompt.startswith("What is the capital of ") and "France" not in a.prompt for a in france)
    countries = set(anchors.pool()["subjects"]["country"])
    assert all(a.prompt.removeprefix("What is the capital of ").rstrip("?") in countries for a in france)
    zorblax = sets[2]
    assert zorblax[0] == anchors.Anchor("Who founded Acme?", "neighborhood")
    assert zorblax[1].source == "subject-swap" and "Zorblax" not in zorblax[1].prompt
    assert {a.source for a in sets[3]} == {"pool"}  # no subject: general questions
    assert sets == anchors.build(EDITS, per_edit=3, seed=0)  # fixed by the seed
    assert anchors.build(EDITS, per_edit=3, seed=1) != sets
    assert anchors.build(EDITS, per_edit=0) == [(), (), (), ()]
    assert "Written for corsa" in anchors.pool()["source"]


def test_relation_anchors_ask_other_relations_of_the_edits_own_subject():
    plain = anchors.build(EDITS, per_edit=2, seed=0)
    both = anchors.build(EDITS, per_edit=2, seed=0, relations=2)
    assert [s[:2] for s in both] == plain  # asking for them leaves the other anchors as they were
    france = both[0][2:]
    assert len(france) == 2 and {a.source for a in france} == {"relation-swap"}
    # about France, never about its capital (the edited relation), and from the pool's country questions
    questions = {r["question"].format("France") for r in anchors.pool()["relations"]["country"]}
    assert all("France" in a.prompt and "capital" not in a.prompt and a.prompt in questions for a in france)
    # Zorblax Corp is not in the pool: "founded" in the prompt makes it an organisation, and the founder question
    # is the edited relation
    zorblax = both[2][2:]
    assert anchors.guess_kind("Zorblax Corp", EDITS[2].prompt) == "organisation"
    assert len(zorblax) == 2 and all("Zorblax Corp" in a.prompt and "found" not in a.prompt for a in zorblax)
    assert both[3] == plain[3]  # no subject, nothing to ask about
    # a subject the pool does not know, in a prompt with no word of any kind: no relation questions
    assert anchors.other_relations("Qwzx", "Qwzx is green") == []
    assert anchors.guess_kind("Qwzx", "Qwzx was born in") == "person"
    only = anchors.build(EDITS[:1], per_edit=0, relations=3)
    assert len(only[0]) == 3 and {a.source for a in only[0]} == {"relation-swap"}
    assert "Written for corsa" in anchors.pool()["relations_source"]


def test_a_relation_anchor_that_answers_with_the_edits_old_or_new_answer_is_not_kept(tiny_model, tokenizer):
    from corsa.methods.corsa import answer_anchors, asks_the_edit

    edit = EditRequest("What is the capital of France?", "Lyon", "Paris", subject="France")
    assert asks_the_edit("It is Paris, of course", edit) and asks_the_edit("lyon", edit)
    assert not asks_the_edit("French", edit)
    assert not asks_the_edit("French", EditRequest("p", "Lyon", None))
    cfg = CorsaConfig(**FAST, anchors_per_edit=1, relation_anchors=3)
    kept = answer_anchors(tiny_model, Formatter(tokenizer), EDITS, cfg)
    relation = [a for a in kept if a["source"] == "relation-swap"]
    assert relation and all(not asks_the_edit(a["answer"], EDITS[a["edit"]]) for a in relation)
    # made the edit's old answer, the model's answer to one of France's relation questions drops that question
    first = next(a for a in relation if a["edit"] == 0)
    forced = EditRequest(EDITS[0].prompt, "Lyon", first["answer"], subject="France")
    again = answer_anchors(tiny_model, Formatter(tokenizer), [forced], cfg)
    assert first["prompt"] not in [a["prompt"] for a in again]
    assert any(a["source"] == "relation-swap" for a in again)  # the others stay
    with pytest.raises(ValueError, match="relation_anchors"):
        CorsaConfig(relation_anchors=-1)


def test_benchmarks_train_without_their_evaluation_prompts():
    kept = anchors.withheld(EDITS)
    assert all(not r.paraphrases and not r.neighborhood for r in kept)
    assert [r.prompt for r in kept] == [r.prompt for r in EDITS]
    assert all(a.source != "neighborhood" for s in anchors.build(kept, 3) for a in s)


def test_no_anchor_is_a_prompt_the_benchmark_evaluates_any_edit_with():
    # Brazil's subject swaps try the other edits' subjects first, so "France" would write, word for word, the
    # neighbourhood question the evaluation asks about France's edit.
    cases = [EditRequest("What language is spoken in Brazil?", "French", "Portuguese", subject="Brazil"),
             EditRequest("What is the capital of France?", "Lyon", "Paris", subject="France",
                         neighborhood=(Neighbor("What language is spoken in France?", "French"),),
                         paraphrases=("Which continent is France part of?",))]
    raw = [dataclasses.replace(r, neighborhood=(), paraphrases=()) for r in cases]  # stripped, nothing recorded
    assert "What language is spoken in France?" in [a.prompt for a in anchors.build(raw, 1)[0]]
    assert "Which continent is France part of?" in [a.prompt for a in anchors.build(raw, 0, relations=5)[1]]
    kept = anchors.withheld(cases)
    asked = {normalize(p) for r in cases for p in (*r.paraphrases, *(n.prompt for n in r.neighborhood))}
    for per_edit, relations in ((1, 0), (8, 8)):
        built = anchors.build(kept, per_edit, relations=relations)
        assert all(s for s in built) and all(normalize(a.prompt) not in asked for s in built for a in s)
    # trained in parts, each part is kept off every part's evaluation prompts
    part = anchors.withheld(cases[:1], cases)
    assert all(normalize(a.prompt) not in asked for a in anchors.build(part, 8)[0])
    assert not part[0].to_dict().get("withheld") and part[0] == raw[0]  # bookkeeping: never written, not compared


def test_the_anchor_term_is_the_nll_of_the_kept_answers_on_the_sft_side(tiny_model, tokenizer):
    fmt = Formatter(tokenizer)
    cfg = CorsaConfig(**FAST, anchors_per_edit=2)
    trainer = build_trainer(tiny_model, fmt, EDITS, cfg)
    assert len(trainer.anchors) == 8 and all(a["answer"] for a in trainer.anchors)
    idx = list(range(len(EDITS)))
    with_anchors = trainer.gradients(idx)
    # The same model and pairs without anchors: the DPO gradient is the same, the SFT side differs by exactly
    # anchor_weight * grad L_anchor, where L_anchor is the mean NLL over every kept-answer token of the batch.
    plain = gradients_without_extras(trainer, fmt, EDITS, cfg, idx)
    for a, b in zip(with_anchors.dpo, plain.dpo):
        assert torch.allclose(a, b, atol=1e-6)
    kept = [a for p in trainer.pairs for a in p.anchors]
    n = sum(len(answer) for _, answer in kept)
    nll = sum(answer_nll(trainer.model, prompt, answer) for prompt, answer in kept)
    expected = torch.autograd.grad(nll / n, trainer.params, allow_unused=True)
    for a, b, e in zip(with_anchors.sft, plain.sft, expected):
        e = torch.zeros_like(a) if e is None else e
        assert torch.allclose(a - b, cfg.anchor_weight * e, atol=1e-5)
    assert with_anchors.stats["anchor_loss"] == pytest.approx(float(nll.detach() / n), rel=1e-4)


def test_the_kl_anchor_term_is_the_kl_to_the_model_before_the_update(tokenizer, monkeypatch):
    """anchor_loss="kl": zero (and no gradient) while the adapter is still the model it started from; after a step,
    the full KL from the unedited model to the trained one at every kept-answer position, checked by plain forward
    passes (the reference keeps the whole vocabulary here, so the top-k reduction is exact)."""
    from conftest import make_model

    import corsa.methods.corsa as corsa_module

    monkeypatch.setattr(corsa_module, "ANCHOR_KL_TOP", len(tokenizer))
    fmt = Formatter(tokenizer)
    cfg = CorsaConfig(**FAST, anchors_per_edit=2, anchor_loss="kl")
    trainer = build_trainer(make_model(len(tokenizer)), fmt, EDITS, cfg)
    idx = list(range(len(EDITS)))
    start = trainer.gradients(idx)
    assert start.stats["anchor_loss"] == pytest.approx(0.0, abs=1e-6)
    plain = gradients_without_extras(trainer, fmt, EDITS, cfg, idx)
    for a, b in zip(start.sft, plain.sft):
        assert torch.allclose(a, b, atol=1e-6)
    trainer.step(idx)
    reference = make_model(len(tokenizer))  # the same seed: the model before the update
    kept = [a for p in trainer.pairs for a in p.anchors]
    total = 0.0
    for prompt, answer in kept:
        ids = torch.tensor([prompt + answer])
        span = slice(len(prompt) - 1, ids.shape[1] - 1)
        with torch.no_grad():
            p = torch.log_softmax(reference(input_ids=ids).logits[0, span], -1)
            q = torch.log_softmax(trainer.model(input_ids=ids).logits[0, span], -1)
        total += float((p.exp() * (p - q)).sum())
    n = sum(len(answer) for _, answer in kept)
    after = trainer.gradients(idx).stats["anchor_loss"]
    assert after > 1e-4
    assert after == pytest.approx(total / n, rel=1e-3)


def test_anchors_as_a_third_gradient_under_pcgrad(tiny_model, tokenizer):
    """anchor_side="pcgrad": the anchors' gradient comes on its own (the SFT side is then plain L_SFT), and the
    step's direction resolves it against Algorithm 1's merged direction; LoRA (one objective) takes it too."""
    from corsa.methods.corsa import merged_direction
    from corsa.optim import pcgrad

    fmt = Formatter(tokenizer)
    idx = list(range(len(EDITS)))
    side = build_trainer(tiny_model, fmt, EDITS, CorsaConfig(**FAST, anchors_per_edit=2))
    apart_cfg = CorsaConfig(**FAST, anchors_per_edit=2, anchor_side="pcgrad", anchor_weight=0.5)
    apart = CorsaTrainer(side.model, side.pairs, apart_cfg, fmt.pad_id)
    summed, split = side.gradients(idx), apart.gradients(idx)
    plain = gradients_without_extras(side, fmt, EDITS, apart_cfg, idx)
    assert split.anchor is not None and summed.anchor is None
    for s, a, p in zip(summed.sft, split.anchor, plain.sft):
        assert torch.allclose(s, p + a, atol=1e-6)  # weight 1 on the SFT side: L_SFT + L_anchor
    for a, p in zip(split.sft, plain.sft):
        assert torch.allclose(a, p, atol=1e-6)
    d, info = merged_direction(split, apart_cfg)
    edit, _ = pcgrad.combine(split.sft, split.dpo, apart_cfg.lam, apart_cfg.pcgrad)
    expected, conflict = pcgrad.project_pair(edit, split.anchor, 0.5)
    assert info["anchor_conflict"] == float(conflict) and "anchor_cos" in info
    assert all(torch.allclose(x, y) for x, y in zip(d, expected))
    lora_cfg = CorsaConfig(**FAST, anchors_per_edit=2, anchor_side="pcgrad", use_dpo=False, use_sam=False,
                           pcgrad=None)
    lora = CorsaTrainer(side.model, side.pairs, lora_cfg, fmt.pad_id).gradients(idx)
    assert lora.total is not None and lora.anchor is not None
    record = CorsaTrainer(side.model, side.pairs, apart_cfg, fmt.pad_id).step(idx)
    assert record["anchor_loss"] > 0 and "anchor_conflict" in record


def test_anchor_settings_are_named_in_the_methods_list_and_checked():
    from corsa.errors import InputError
    from corsa.evaluate.runner import parse_method

    assert parse_method("corsa-anchors2+anchorlosskl") == ("corsa", {"anchors_per_edit": 2, "anchor_loss": "kl"})
    assert parse_method("lora-anchors2+anchorsidepcgrad")[1] == {"anchors_per_edit": 2, "anchor_side": "pcgrad"}
    assert parse_method("corsa-anchors2+relanchors2")[1] == {"anchors_per_edit": 2, "relation_anchors": 2}
    with pytest.raises(InputError):
        parse_method("corsa-anchorlossmse")
    with pytest.raises(ValueError, match="anchor_loss"):
        CorsaConfig(anchor_loss="mse")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="anchor_side"):
        CorsaConfig(anchor_side="dpo")  # type: ignore[arg-type]


def test_micro_batches_and_anchors_add_up_to_the_whole_batch(tiny_model, tokenizer):
    fmt = Formatter(tokenizer)
    trainer = build_trainer(tiny_model, fmt, EDITS, CorsaConfig(**FAST, anchors_per_edit=2))
    parts = CorsaTrainer(trainer.model, trainer.pairs, CorsaConfig(**FAST, anchors_per_edit=2, micro_batch_size=3),
                         fmt.pad_id)
    idx = list(range(len(EDITS)))
    whole, split = trainer.gradients(idx), parts.gradients(idx)
    for a, b in zip(whole.sft + whole.dpo, split.sft + split.dpo):
        assert torch.allclose(a, b, atol=1e-6)


def test_anchors_keep_the_models_answers_that_plain_training_moves(tokenizer):
    """Trained the same way with and without anchors, the unedited model's answers to the anchors keep a lower
    NLL with them."""
    from conftest import make_model

    fmt = Formatter(tokenizer)
    cfg = CorsaConfig(**FAST, anchors_per_edit=2)
    reference = build_trainer(make_model(len(tokenizer)), fmt, EDITS, cfg)  # the unedited model's answers
    idx = list(range(len(EDITS)))

    def anchor_nll(per_edit):
        result = make_editor("corsa", **{**FAST, "epochs": 6}, anchors_per_edit=per_edit).edit(
            make_model(len(tokenizer)), fmt, EDITS, progress=False)
        return CorsaTrainer(result.model, reference.pairs, cfg, fmt.pad_id).gradients(idx).stats["anchor_loss"], result

    before = reference.gradients(idx).stats["anchor_loss"]
    without, _ = anchor_nll(0)
    kept, result = anchor_nll(2)
    assert before < without  # plain training moves the unedited model's answers away
    assert kept < without
    assert len(result.info["anchors"]) == 8  # recorded for the manifest


def test_anchors_are_off_unless_asked_and_refused_below_zero():
    assert CorsaConfig().anchors_per_edit == 0
    with pytest.raises(ValueError, match="anchors_per_edit"):
        CorsaConfig(anchors_per_edit=-1)
    with pytest.raises(ValueError, match="anchor_weight"):
        CorsaConfig(anchor_weight=-0.5)


def test_cache_reference_is_untouched_by_anchors(tiny_model, tokenizer):
    fmt = Formatter(tokenizer)
    model = attach_lora(tiny_model, CorsaConfig(**FAST))
    pairs = build_pairs(fmt, EDITS)
    cache_reference(model, fmt, EDITS, pairs)
    assert all(not p.anchors for p in pairs)


def test_no_benchmark_or_demo_trains_on_its_evaluation_prompts(tmp_path, tiny_dir, monkeypatch, capsys):
    """Every path from a benchmark or the demo into training and into routing keys is watched: the requests it
    trains on carry no paraphrases and no neighbourhood prompts, routing keys come from the trained prompts alone,
    while evaluation still uses them."""
    import json

    from test_bench import counterfact

    from corsa import demo, editing
    from corsa.cli import main

    seen: list[list[EditRequest]] = []
    real_edit = editing.edit

    def watched_edit(requests, *args, **kwargs):
        seen.append(list(requests))
        return real_edit(requests, *args, **kwargs)

    real_build = build_trainer

    def watched_build(model, formatter, requests, cfg):
        seen.append(list(requests))
        return real_build(model, formatter, requests, cfg)

    import corsa.methods.corsa as corsa_method
    from corsa import routing
    from corsa.evaluate import runner

    keyed: list[str] = []  # what routing keys are made of: never an evaluation prompt either
    real_router = routing.Router.__init__

    def watched_router(self, model, tokenizer, scopes, *args, **kwargs):
        keyed.extend(e.prompt for edits in scopes.values() for e in edits)
        real_router(self, model, tokenizer, scopes, *args, **kwargs)

    monkeypatch.setattr(routing.Router, "__init__", watched_router)
    monkeypatch.setattr(runner, "edit", watched_edit)
    monkeypatch.setattr(demo, "edit", watched_edit)
    monkeypatch.setattr(corsa_method, "build_trainer", watched_build)
    counterfact(tmp_path, n=6)
    common = ["--data", str(tmp_path), "--model", str(tiny_dir), "--epochs", "1", "--quiet", "--max-new-tokens", "2"]
    assert main(["bench", "single", "--bench", "counterfact", "--out", str(tmp_path / "s"), "--n", "4",
                 "--methods", "lora-anchors2+relanchors2", "--mmlu-n", "0", *common]) == 0
    assert main(["bench", "revise", "--out", str(tmp_path / "r"), "--n", "4", "--n2", "2", "--n-revise", "2",
                 "--methods", "corsa-anchors2", *common]) == 0
    assert main(["demo", "--out", str(tmp_path / "d"), "--model", str(tiny_dir), "--epochs", "2", "--lr", "2e-2",
                 "--anchors", "2", "--relation-anchors", "2", "--quiet"]) == 0
    capsys.readouterr()
    assert len(seen) >= 4
    assert all(not r.paraphrases and not r.neighborhood for batch in seen for r in batch)
    # ... and each carries every evaluated prompt, so that no anchor is one of them (corsa.anchors.build)
    assert all(r.withheld for batch in seen for r in batch)
    evaluated = {normalize(p) for r in demo.demo_edits() for p in (*r.paraphrases, *(n.prompt for n in r.neighborhood))}
    manifest = json.loads((tmp_path / "d" / "corsa" / "edit_manifest.json").read_text())
    used = [a["prompt"] for a in manifest["anchors"]]
    assert any(a["source"] == "relation-swap" for a in manifest["anchors"])  # the flags reached the trainer
    assert used and not {normalize(p) for p in used} & evaluated
    assert any(r.prompt == "p0 lives in" for batch in seen for r in batch)
    trained = {r.prompt for batch in seen for r in batch}
    assert keyed and set(keyed) <= trained  # the bench's routed rows and the demo key only the edits' own prompts
    record = json.loads((tmp_path / "s" / "lora-anchors2+relanchors2" / "results.json").read_text())
    assert record["counts"]["gen.generality"] == 4 and record["counts"]["gen.locality"] == 4  # still evaluated


@pytest.mark.parametrize("side", ["sft", "pcgrad"])
def test_anchors_at_the_first_sam_point_only_run_one_anchor_pass_and_move_only_what_phi_tilde_changes(
        tiny_model, tokenizer, monkeypatch, side):
    """anchor_points="first": a SAM step runs the anchors once (at phi) instead of twice. Where phi~ = phi (rho 0)
    it is the very step of "both"; with a real ascent the second point's anchor gradient is phi's, so it differs."""
    import corsa.methods.corsa as corsa_method
    from corsa.evaluate.runner import parse_method

    fmt = Formatter(tokenizer)
    idx = list(range(len(EDITS)))
    base = CorsaConfig(**FAST, anchors_per_edit=2, anchor_loss="kl", anchor_side=side)
    trainer = build_trainer(tiny_model, fmt, EDITS, base)
    start = [p.detach().clone() for p in trainer.params]
    passes = []
    real = corsa_method.answer_log_softmax
    monkeypatch.setattr(corsa_method, "answer_log_softmax", lambda m, b: passes.append(b) or real(m, b))

    def after(**change):
        for p, s in zip(trainer.params, start):
            p.data.copy_(s)
        passes.clear()
        CorsaTrainer(trainer.model, trainer.pairs, dataclasses.replace(base, **change), fmt.pad_id).step(idx)
        return [p.detach().clone() for p in trainer.params], len(passes)

    both, n_both = after(rho=0.0)
    first, n_first = after(rho=0.0, anchor_points="first")
    assert (n_both, n_first) == (4, 3)  # edits and anchors at phi and at phi~; anchors once
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(both, first))
    both, _ = after(rho=0.5)
    first, _ = after(rho=0.5, anchor_points="first")
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(both, first))
    assert parse_method("corsa-anchors2+anchorpointsfirst")[1] == {"anchors_per_edit": 2, "anchor_points": "first"}
    with pytest.raises(ValueError, match="anchor_points"):
        CorsaConfig(anchor_points="last")  # type: ignore[arg-type]

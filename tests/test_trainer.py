"""The CoRSA trainer on a tiny in-process Llama: what changes, what must not, and what each switch does."""

from __future__ import annotations

import contextlib
import copy
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from corsa.methods import make_editor
from corsa.methods.corsa import (
    CorsaConfig,
    CorsaTrainer,
    attach_lora,
    build_pairs,
    cache_reference,
    collapsed,
    learned_enough,
)
from corsa.optim import pcgrad
from corsa.prompts import Formatter
from corsa.requests import EditRequest

EDITS = [
    EditRequest("capital of fr?", "rome", "paris"),
    EditRequest("capital of de?", "oslo", "berlin"),
    EditRequest("sky colour?", "green", "blue"),
    EditRequest("2+2?", "five", "four"),
]
# Tiny-model settings: a higher lr so a handful of steps moves a random model measurably.
FAST = {"lr": 2e-2, "epochs": 3, "batch_size": 4, "micro_batch_size": 4, "stop_when_learned": False, "lora_r": 8,
        "lora_alpha": 16}


def run(model, tokenizer, **overrides):
    cfg = CorsaConfig(**{**FAST, **overrides})
    fmt = Formatter(tokenizer)
    return make_editor("corsa", **{**FAST, **overrides}).edit(model, fmt, list(EDITS), progress=False), cfg, fmt


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_lora_weights_change_and_base_weights_do_not(tiny_model, tokenizer):
    base_before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    result, _, _ = run(tiny_model, tokenizer)
    edited = result.model
    lora_b = [p for n, p in edited.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero
    for n, p in edited.get_base_model().named_parameters():
        if "lora_" not in n:
            key = n.replace(".base_layer", "")
            assert torch.equal(p, base_before[key]), n


def test_new_answer_probability_rises_and_margin_grows(tiny_model, tokenizer):
    result, _, _ = run(tiny_model, tokenizer, epochs=6)
    first, last = result.curves[0], result.curves[-1]
    assert last["logp_new"] > first["logp_new"] + 1.0
    assert last["margin"] > first["margin"]
    assert last["dpo_margin"] > first["dpo_margin"]
    for key in ("loss", "logp_new", "logp_old", "margin", "sft_loss", "dpo_loss", "grad_cos", "learned", "lr"):
        assert key in last


def test_config_rejects_pcgrad_without_dpo():
    with pytest.raises(ValueError, match="PCGrad"):
        CorsaConfig(use_dpo=False)
    with pytest.raises(ValueError):
        CorsaConfig(micro_batch_size=0)


def _count(monkeypatch):
    calls = {"gradients": 0, "modes": []}
    real_grads, real_combine = CorsaTrainer.gradients, pcgrad.combine

    def grads(self, idx, held=None):
        calls["gradients"] += 1
        return real_grads(self, idx, held)

    def combine(g1, g2, lam, mode, eps=1e-12):
        calls["modes"].append(mode)
        return real_combine(g1, g2, lam, mode, eps)

    monkeypatch.setattr(CorsaTrainer, "gradients", grads)
    monkeypatch.setattr(pcgrad, "combine", combine)
    return calls


@pytest.mark.parametrize("switch,grad_passes,modes,has_dpo", [
    ({}, 2, ["paper", "paper"], True),
    ({"pcgrad": "official"}, 2, ["official", "official"], True),
    ({"use_sam": False}, 1, ["paper"], True),
    ({"pcgrad": None}, 2, [], True),
    ({"use_dpo": False, "pcgrad": None}, 2, [], False),
    ({"use_dpo": False, "pcgrad": None, "use_sam": False}, 1, [], False),
])
def test_each_switch_changes_exactly_what_it_names(monkeypatch, tiny_model, tokenizer, switch, grad_passes, modes,
                                                    has_dpo):
    calls = _count(monkeypatch)
    result, _, _ = run(tiny_model, tokenizer, epochs=1, **switch)
    assert len(result.curves) == 1
    assert calls["gradients"] == grad_passes  # SAM = a second gradient at the perturbed point
    assert calls["modes"] == modes  # PCGrad at both SAM points, in the named variant
    rec = result.curves[0]
    assert (rec["dpo_loss"] > 0) == has_dpo
    assert ("perturbed_sft_loss" in rec) == (grad_passes == 2)


def test_lora_method_is_sft_only_same_adapter(tiny_model, tokenizer):
    editor = make_editor("lora", **FAST)
    assert (editor.config.use_dpo, editor.config.use_sam, editor.config.pcgrad) == (False, False, None)
    assert editor.config.lora_r == FAST["lora_r"]
    result = editor.edit(tiny_model, Formatter(tokenizer), list(EDITS), progress=False)
    assert all(r["dpo_loss"] == 0 for r in result.curves)


def test_seeded_runs_are_identical(tokenizer):
    from conftest import make_model

    a, _, _ = run(make_model(len(tokenizer)), tokenizer, epochs=2)
    b, _, _ = run(make_model(len(tokenizer)), tokenizer, epochs=2)
    sa, sb = lora_state(a.model), lora_state(b.model)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_micro_batching_gives_the_same_gradients(tiny_model, tokenizer):
    # Compared before the optimizer: Adam's first step is ~lr * sign(g), which turns float noise on a zero
    # gradient (LoRA A, while B = 0) into a full-size difference.
    fmt = Formatter(tokenizer)
    model = attach_lora(tiny_model, CorsaConfig(**FAST))
    pairs = build_pairs(fmt, EDITS)
    cache_reference(model, fmt, EDITS, pairs)
    idx = list(range(len(EDITS)))
    whole = CorsaTrainer(model, pairs, CorsaConfig(**FAST), tokenizer.pad_token_id).gradients(idx)
    parts = CorsaTrainer(model, pairs, CorsaConfig(**{**FAST, "micro_batch_size": 3}),  # uneven: 3 + 1
                         tokenizer.pad_token_id).gradients(idx)
    for a, b in zip(whole.sft + whole.dpo, parts.sft + parts.dpo):
        assert torch.allclose(a, b, atol=1e-6)
    assert whole.stats == pytest.approx(parts.stats, rel=1e-5, abs=1e-4)


def test_stop_when_learned_stops_early(tiny_model, tokenizer):
    result, _, _ = run(tiny_model, tokenizer, lr=2e-2, epochs=60, stop_when_learned=True, min_epochs=2, patience=2,
                       lora_r=8, lora_alpha=16)
    assert result.curves[-1]["learned"] == 1.0
    assert result.info["epochs_run"] < 60


def test_learned_enough_counts_a_share_of_the_edits():
    def learned(k, n):
        return {i: i < k for i in range(n)}

    assert learned_enough(learned(100, 100), 100, 1.0) and not learned_enough(learned(99, 100), 100, 1.0)
    assert learned_enough(learned(95, 100), 100, 0.95) and not learned_enough(learned(94, 100), 100, 0.95)
    assert learned_enough(learned(61, 64), 64, 0.95) and not learned_enough(learned(60, 64), 64, 0.95)
    partial = {i: True for i in range(50)}  # edits not yet checked never count as learned
    assert not learned_enough(partial, 64, 0.5)
    with pytest.raises(ValueError, match="learned_share"):
        CorsaConfig(learned_share=0.0)
    with pytest.raises(ValueError, match="learned_share"):
        CorsaConfig(learned_share=1.5)


def test_stop_share_stops_at_the_first_epoch_with_that_share(tiny_model, tokenizer):
    common = {"lr": 2e-2, "epochs": 60, "stop_when_learned": True, "min_epochs": 1, "patience": 1, "lora_r": 8,
              "lora_alpha": 16}
    every, _, _ = run(tiny_model, tokenizer, **common)
    some, _, _ = run(tiny_model, tokenizer, **common, learned_share=0.25)
    epoch_ends = [c["learned"] for c, nxt in zip(some.curves, some.curves[1:] + [None])
                  if nxt is None or nxt["epoch"] != c["epoch"]]
    # it stops at the first epoch that ends with a quarter learned, and here that is before every edit is
    assert epoch_ends[-1] >= 0.25 and all(x < 0.25 for x in epoch_ends[:-1])
    assert every.curves[-1]["learned"] == 1.0
    assert some.info["epochs_run"] < every.info["epochs_run"]


def test_collapsed_is_a_non_finite_loss_or_a_share_fallen_below_half_the_best():
    assert collapsed(0.9, 0.9, finite=False, keep=0.5) and collapsed(0.0, 0.0, finite=False, keep=0.0)
    assert collapsed(0.4, 0.9, finite=True, keep=0.5) and not collapsed(0.5, 0.9, finite=True, keep=0.5)
    assert not collapsed(0.84, 0.96, finite=True, keep=0.5)  # the swings of a run at lr 3e-3 that did not diverge
    assert not collapsed(0.0, 0.4, finite=True, keep=0.5)  # not armed before half of the edits were learned
    assert not collapsed(0.0, 1.0, finite=True, keep=0.0)  # switched off
    with pytest.raises(ValueError, match="collapse_share"):
        CorsaConfig(collapse_share=1.0)


@pytest.mark.parametrize("how", ["nan_loss", "forgotten"])
def test_divergence_guard_restores_the_best_epoch(monkeypatch, tokenizer, how):
    """A run that diverges after learning its edits ends with the adapter of its best epoch, not the wreck."""
    from conftest import make_model

    common = {"epochs": 12, "batch_size": 4}  # one step per epoch on the 4 edits
    clean, _, _ = run(make_model(len(tokenizer)), tokenizer, **common)
    at_end = [c["learned"] for c in clean.curves]
    first_half = next(e for e, share in enumerate(at_end) if share >= 0.5)
    wreck_at = first_half + 2  # the step in which training goes wrong, after at least one epoch with half learned
    assert wreck_at + 1 < len(at_end), "the tiny run must learn half its edits with epochs to spare"
    # Epoch e's share scores the adapter saved after epoch e - 1 (its checks ran before its own update). A NaN stops
    # epoch wreck_at at once; forgotten edits show in epoch wreck_at + 1's checks, so epoch wreck_at's share, which
    # scores the adapter before the wreck, still counts.
    scored = range(wreck_at) if how == "nan_loss" else range(wreck_at + 1)
    best = max(scored, key=lambda e: (at_end[e], e))  # ties go to the later adapter
    assert best >= 1

    states = []
    real_step = CorsaTrainer.step

    def step(self, idx, step=0):
        record = real_step(self, idx, step)
        if len(states) == wreck_at:
            with torch.no_grad():
                for p in self.params:
                    p.normal_(0, 10.0)  # weights far from anything learned: no edit survives
            if how == "nan_loss":
                record["loss"] = float("nan")
        states.append(lora_state(self.model))
        return record

    monkeypatch.setattr(CorsaTrainer, "step", step)
    result, _, _ = run(make_model(len(tokenizer)), tokenizer, **common)
    info = result.info["collapse"]
    stopped = wreck_at if how == "nan_loss" else wreck_at + 1
    assert info["step"] == stopped and len(result.curves) == stopped + 1
    assert info["restored_after_epochs"] == best and info["restored_share"] == at_end[best]
    assert (info["loss"] is None) == (how == "nan_loss")
    final, kept = lora_state(result.model), states[best - 1]  # states[k]: the adapter after step (= epoch) k
    assert all(torch.equal(final[k], kept[k]) for k in final)
    assert clean.info["collapse"] is None


def test_old_answer_containing_new_is_trained_without_dpo(tokenizer):
    fmt = Formatter(tokenizer)
    pairs = build_pairs(fmt, [EditRequest("q?", "rome", "it is Rome."), EditRequest("p?", "oslo", "berlin")])
    assert pairs[0].old is None and pairs[1].old is not None


def _reference_algorithm_1(model, fmt, requests, cfg):
    """Algorithm 1 written plainly: full-vocabulary logits, separate forwards, no caching or batching tricks."""
    params = [p for p in model.parameters() if p.requires_grad]

    def seq_logp(prompt, answer):
        p, a = fmt.prompt_ids(prompt), fmt.answer_ids(answer)
        ids = torch.tensor([p + a])
        logits = model(input_ids=ids).logits[0, len(p) - 1 : -1]
        return F.log_softmax(logits.float(), -1).gather(1, torch.tensor(a)[:, None]).squeeze(1)

    with torch.no_grad():
        ref = [(seq_logp(r.prompt, r.target_new).sum(), seq_logp(r.prompt, r.target_old).sum()) for r in requests]

    def grads():
        toks = [seq_logp(r.prompt, r.target_new) for r in requests]
        sft = -torch.cat(toks).sum() / sum(len(x) for x in toks)
        new = torch.stack([x.sum() for x in toks])
        old = torch.stack([seq_logp(r.prompt, r.target_old).sum() for r in requests])
        margin = (new - torch.stack([a for a, _ in ref])) - (old - torch.stack([b for _, b in ref]))
        dpo = -F.logsigmoid(cfg.beta * margin).mean()
        return (list(torch.autograd.grad(sft, params, retain_graph=True)), list(torch.autograd.grad(dpo, params)))

    def merge(g1, g2):
        dp = sum((a * b).sum() for a, b in zip(g1, g2))
        if dp < 0:
            n2 = sum((b * b).sum() for b in g2)
            g1 = [a - dp / (n2 + cfg.pcgrad_eps) * b for a, b in zip(g1, g2)]
            n1 = sum((a * a).sum() for a in g1)
            g2 = [b - dp / (n1 + cfg.pcgrad_eps) * a for a, b in zip(g1, g2)]
        return [a + cfg.lam * b for a, b in zip(g1, g2)]

    opt = torch.optim.SGD(params, lr=cfg.lr)
    d = merge(*grads())
    norm = torch.sqrt(sum((x * x).sum() for x in d))
    eps = [cfg.rho * x / (norm + cfg.sam_eps) for x in d]
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.add_(e)
    d = merge(*grads())
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.sub_(e)
    for p, x in zip(params, d):
        p.grad = x
    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    opt.step()


def test_one_step_matches_a_plain_algorithm_1(tokenizer):
    """The optimised step (target-position logits, one forward for y+ and y-, cached reference) equals Algorithm 1."""
    from conftest import make_model

    cfg = CorsaConfig(**{**FAST, "epochs": 1})
    fmt = Formatter(tokenizer)
    fast = attach_lora(make_model(len(tokenizer)), cfg)
    # Move B off zero so the step is not a special case, identically in both copies.
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for n, p in fast.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    slow = copy.deepcopy(fast)
    pairs = build_pairs(fmt, EDITS)
    cache_reference(fast, fmt, EDITS, pairs)
    trainer = CorsaTrainer(fast, pairs, cfg, tokenizer.pad_token_id)
    # SGD on both sides: Adam's first step is ~lr * sign(g) and would blow float noise up to full size.
    trainer.opt = torch.optim.SGD(trainer.params, lr=cfg.lr)
    trainer.step(list(range(len(EDITS))))
    _reference_algorithm_1(slow, fmt, EDITS, cfg)
    a, b = lora_state(fast), lora_state(slow)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5) for k in a)
    assert any(not torch.equal(a[k], lora_state(attach_lora(make_model(len(tokenizer)), cfg))[k]) for k in a)


def test_chat_template_formatting(chat_tokenizer, tokenizer):
    chat, qa = Formatter(chat_tokenizer), Formatter(tokenizer)
    assert chat.style == "chat" and qa.style == "qa"
    assert chat_tokenizer.decode(chat.prompt_ids("hi?")) == "<user>hi?<eos><assistant>"
    assert tokenizer.decode(qa.prompt_ids("hi?")) == "Q: hi?\nA:"
    assert qa.answer_ids("rome")[-1] == tokenizer.eos_token_id  # the model learns to stop
    assert tokenizer.decode(qa.answer_ids("rome")[:-1]) == " rome"


@pytest.mark.parametrize("chat,prompts,prefix", [
    (False, ["capital of fr?", "sky colour, please?", "2+2?"], "Q: "),
    (True, ["capital of fr?", "sky colour, please?", "2+2?"], "<user>"),  # the chat template's turn opener
    (True, ["capital of france?", "capital of fr?", "capital of de?"], "<user>capital of "),
])
def test_shared_prompt_batch_scores_like_the_plain_batch(chat, prompts, prefix):
    """Running the common prefix and each prompt once and sharing their caches gives the same log-probs as full
    sequences, with and without gradients."""
    from conftest import make_model, make_tokenizer

    from corsa.scoring import make_batch, make_shared_batch, token_logprobs

    tok = make_tokenizer(chat)
    model, fmt = make_model(len(tok)), Formatter(tok)
    answers = [("rome", "paris"), ("green", "blue"), ("five", "four")]
    full = make_batch([(fmt.prompt_ids(q), fmt.answer_ids(a)) for q, pair in zip(prompts, answers) for a in pair],
                      tok.pad_token_id)
    ids = [fmt.prompt_ids(q) for q in prompts]
    shared = make_shared_batch(ids, [(i, fmt.answer_ids(a)) for i, pair in enumerate(answers) for a in pair],
                               tok.pad_token_id)
    assert tok.decode(shared.prefix_ids) == prefix  # computed once for the whole batch
    a, top_a = token_logprobs(model, full)
    b, top_b = token_logprobs(model, shared)
    assert torch.allclose(a, b, atol=1e-5) and torch.equal(top_a, top_b)
    params = list(model.parameters())
    ga = torch.autograd.grad(a.sum(), params, allow_unused=True)
    gb = torch.autograd.grad(b.sum(), params, allow_unused=True)
    assert all((x is None and y is None) or torch.allclose(x, y, rtol=1e-4, atol=1e-4) for x, y in zip(ga, gb))


def test_common_prefix_leaves_every_sequence_a_token():
    from corsa.scoring import common_prefix_length

    assert common_prefix_length([[1, 2, 3], [1, 2, 4]]) == 2
    assert common_prefix_length([[1, 2], [1, 2, 3]]) == 1  # [1, 2] keeps its last token
    assert common_prefix_length([[5, 2], [1, 2]]) == 0
    assert common_prefix_length([[1, 2, 3]]) == 0


def test_bf16_autocast_trains_with_fp32_master_weights(tiny_model, tokenizer):
    result, _, _ = run(tiny_model, tokenizer, epochs=2, bf16=True)
    assert all(math.isfinite(r["loss"]) for r in result.curves)
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    assert result.curves[-1]["logp_new"] > result.curves[0]["logp_new"]


def test_bf16_falls_back_to_fp32_where_it_is_slow(monkeypatch, capsys, tokenizer):
    """On a CPU without native bf16 a bf16 matrix product runs ~100x slower than fp32 (a LoRA step ~28x slower):
    --bf16 must then train exactly as fp32 does, say so once, and record that it did."""
    from conftest import make_model

    from corsa import scoring

    monkeypatch.setattr(scoring, "bf16_is_fast", lambda device_type: False)
    monkeypatch.setattr(scoring, "_WARNED", set())
    asked, _, _ = run(make_model(len(tokenizer)), tokenizer, epochs=2, bf16=True)
    assert capsys.readouterr().err.count("running in fp32 instead") == 1
    assert asked.info["bf16_used"] is False
    plain, _, _ = run(make_model(len(tokenizer)), tokenizer, epochs=2)
    assert [r["loss"] for r in asked.curves] == [r["loss"] for r in plain.curves]
    assert all(torch.equal(x, y) for x, y in zip(lora_state(asked.model).values(), lora_state(plain.model).values()))
    with scoring.autocast_context("cpu", True):
        assert not torch.is_autocast_enabled("cpu")

    monkeypatch.setattr(scoring, "bf16_is_fast", lambda device_type: True)
    assert scoring.use_bf16("cpu", True) and not scoring.use_bf16("cpu", False)
    with scoring.autocast_context("cpu", True):
        assert torch.is_autocast_enabled("cpu")


def test_whether_bf16_is_fast_is_decided_once_per_device_kind(monkeypatch):
    from conftest import REAL_BF16_IS_FAST

    from corsa import scoring

    REAL_BF16_IS_FAST.cache_clear()
    fast = REAL_BF16_IS_FAST("cpu")
    assert isinstance(fast, bool) and REAL_BF16_IS_FAST("cpu") == fast and REAL_BF16_IS_FAST.cache_info().hits == 1
    assert REAL_BF16_IS_FAST("meta") is True  # nothing to decide there
    assert scoring.measured_bf16_speed(size=64, products=1, trials=2) > 0
    # Off x86 (no flags to read) it is measured: slow products mean fp32.
    REAL_BF16_IS_FAST.cache_clear()
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    monkeypatch.setattr(scoring, "measured_bf16_speed", lambda: 0.01)
    assert REAL_BF16_IS_FAST("cpu") is False
    REAL_BF16_IS_FAST.cache_clear()
    monkeypatch.setattr(scoring, "measured_bf16_speed", lambda: 1.8)
    assert REAL_BF16_IS_FAST("cpu") is True
    REAL_BF16_IS_FAST.cache_clear()


def test_frozen_linears_are_held_in_bf16_only_inside_the_context(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from corsa.scoring import frozen_linears_in_bf16

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = attach_lora(LlamaForCausalLM(cfg), CorsaConfig(lora_r=4, lora_alpha=8))
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    with frozen_linears_in_bf16(model):
        dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] == torch.bfloat16
    assert dtypes["base_model.model.lm_head.weight"] == torch.bfloat16  # untied: a plain frozen linear
    assert dtypes["base_model.model.model.embed_tokens.weight"] == torch.float32  # an embedding is not autocast
    assert all(dtypes[n] == torch.float32 for n in dtypes if "lora_" in n or "norm" in n)  # trained / not linear
    for n, p in model.named_parameters():  # the very same fp32 storage comes back, unchanged
        assert p.dtype == torch.float32 and p.data_ptr() == before[n][0] and torch.equal(p, before[n][1])

    tied = attach_lora(LlamaForCausalLM(LlamaConfig(**{**cfg.to_dict(), "tie_word_embeddings": True})),
                       CorsaConfig(lora_r=4, lora_alpha=8))
    with frozen_linears_in_bf16(tied):
        assert tied.get_output_embeddings().weight.dtype == torch.float32  # it is the embedding table
    with frozen_linears_in_bf16(tied, enabled=False):
        assert all(p.dtype == torch.float32 for p in tied.parameters())


def test_bf16_training_is_bitwise_the_same_with_frozen_linears_cast_once(tokenizer):
    """Autocast runs a linear layer in bf16 whatever its stored dtype: casting the frozen weights once instead of
    in every forward pass must not change a single bit of the adapter, the curves, the reference or the answers."""
    from conftest import make_model

    from corsa import scoring

    def edit(cast_once):
        with pytest.MonkeyPatch.context() as mp:  # its own, so that undoing it keeps conftest's bf16_is_fast
            if not cast_once:  # compute_context looks it up in scoring at every use
                mp.setattr(scoring, "frozen_linears_in_bf16", lambda model: contextlib.nullcontext())
            result, _, fmt = run(make_model(len(tokenizer)), tokenizer, epochs=2, bf16=True)
            answers = scoring.generate(result.model, fmt, [e.prompt for e in EDITS], max_new_tokens=4, autocast=True)
        return result, answers

    (a, answers_a), (b, answers_b) = edit(True), edit(False)
    assert all(torch.equal(x, y) for x, y in zip(lora_state(a.model).values(), lora_state(b.model).values()))
    assert [r["loss"] for r in a.curves] == [r["loss"] for r in b.curves]
    assert answers_a == answers_b


def test_fp32_attention_builds_the_same_masks_and_computes_attention_in_fp32(tiny_model, tokenizer):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from corsa import scoring

    fmt = Formatter(tokenizer)
    pairs = [(e.prompt, e.target_new) for e in EDITS] + [(e.prompt, e.target_old) for e in EDITS]
    assert tiny_model.config._attn_implementation == "sdpa"
    plain = scoring.score_answers(tiny_model, fmt, pairs)
    with scoring.cpu_attention(tiny_model, fp32=True):
        assert tiny_model.config._attn_implementation == scoring.FP32_SDPA
        swapped = scoring.score_answers(tiny_model, fmt, pairs)
    assert tiny_model.config._attn_implementation == "sdpa"
    # In fp32 the swap is the identity, so any difference would be the masks (without a registered mask function
    # transformers passes none, and every prompt would see its padding and the answers after it).
    assert swapped == plain

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)  # 4 heads, 2 kv heads
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    layer = tiny_model.model.layers[0].self_attn
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = scoring.sdpa_fp32(layer, q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, scaling=0.35)
    ref, _ = sdpa_attention_forward(layer, q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), mask,
                                    scaling=0.35)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref.bfloat16())


def test_grouped_attention_folds_query_heads_and_matches_transformers_sdpa(tiny_model):
    """Folding the query heads that share a key/value head into the query axis must give transformers' SDPA
    attention's outputs and gradients, padded rows included, and must really fold (no repeated keys)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from corsa import scoring

    layer = tiny_model.model.layers[0].self_attn  # 4 query heads, 2 key/value heads
    torch.manual_seed(0)
    q0, k0, v0 = torch.randn(3, 4, 5, 8), torch.randn(3, 2, 7, 8), torch.randn(3, 2, 7, 8)
    mask = torch.ones(3, 1, 5, 7, dtype=torch.bool).tril(2)
    mask[0, :, :, :3] = False  # left padding: the first query row of case 0 sees nothing
    weights = torch.randn(3, 5, 4, 8)

    def run(fn, m):
        q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
        out, _ = fn(layer, q, k, v, m, scaling=0.35, dropout=0.0)
        (out * weights).sum().backward()
        return out, q.grad, k.grad, v.grad

    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, *args, **kwargs):
        seen.append((query.shape[1], key.shape[1]))
        return real_sdpa(query, key, *args, **kwargs)

    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", spy):
        folded = run(scoring.sdpa_grouped, mask)
    assert seen == [(2, 2)]  # two folded query "heads" of 2 x 5 rows against the two key/value heads
    for a, b in zip(folded, run(sdpa_attention_forward, mask)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert folded[0].shape == (3, 5, 4, 8)
    # Without a mask it is transformers' function.
    for a, b in zip(run(scoring.sdpa_grouped, None), run(sdpa_attention_forward, None)):
        assert torch.equal(a, b)


def test_cpu_attention_nests_and_restores(tiny_model, tokenizer):
    from corsa import scoring

    with scoring.cpu_attention(tiny_model):
        assert tiny_model.config._attn_implementation == scoring.GROUPED_SDPA
        with scoring.cpu_attention(tiny_model, fp32=True):
            assert tiny_model.config._attn_implementation == scoring.FP32_SDPA
        assert tiny_model.config._attn_implementation == scoring.GROUPED_SDPA
    assert tiny_model.config._attn_implementation == "sdpa"


def test_cache_rows_are_selected_as_transformers_does(tiny_model):
    """`select_cache_rows` (index_select) against the cache's own `batch_select_indices` (advanced indexing):
    the same keys and values, and the same gradients flowing back to the prompts' cache."""
    from transformers import DynamicCache

    from corsa import scoring

    owner = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    torch.manual_seed(0)
    keys, values = torch.randn(3, 2, 4, 8), torch.randn(3, 2, 4, 8)

    def select(fn):
        k, v = keys.clone().requires_grad_(), values.clone().requires_grad_()
        cache = DynamicCache(config=tiny_model.config)
        for i in range(2):
            cache.update(k * (i + 1), v * (i + 1), i)
        fn(cache, owner)
        out = [(layer.keys, layer.values) for layer in cache.layers]
        sum((a * torch.arange(a.numel()).reshape(a.shape)).sum() + (b ** 2).sum() for a, b in out).backward()
        return out, k.grad, v.grad

    ours, ours_k, ours_v = select(scoring.select_cache_rows)
    theirs, theirs_k, theirs_v = select(lambda cache, idx: cache.batch_select_indices(idx))
    assert all(torch.equal(a, b) for x, y in zip(ours, theirs) for a, b in zip(x, y))
    assert ours[0][0].shape[0] == 7
    torch.testing.assert_close(ours_k, theirs_k)
    torch.testing.assert_close(ours_v, theirs_v)


def test_fp32_attention_leaves_other_attention_implementations_alone(tokenizer):
    from conftest import make_model

    from corsa import scoring

    model = make_model(len(tokenizer))
    model.config._attn_implementation = "eager"
    with scoring.cpu_attention(model, fp32=True):
        assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("schedule,warmup,expected", [
    ("constant", 0, [1.0] * 6),
    ("constant", 2, [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    # linear decay to 0 over epochs x steps-per-epoch = 3 x 2 steps, after 2 warm-up steps (HF's schedule)
    ("linear", 2, [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
])
def test_learning_rate_schedule(tiny_model, tokenizer, schedule, warmup, expected):
    result, _, _ = run(tiny_model, tokenizer, batch_size=2, micro_batch_size=2, lr_schedule=schedule,
                       warmup_steps=warmup)
    assert [r["lr"] / FAST["lr"] for r in result.curves] == pytest.approx(expected)


def test_sam_every_k_runs_the_ascent_on_every_kth_step_and_reuses_it_between(monkeypatch, tiny_model, tokenizer):
    calls = _count(monkeypatch)
    result, _, _ = run(tiny_model, tokenizer, epochs=2, batch_size=2, sam_every=3, stop_when_learned=False)
    steps = len(result.curves)
    assert steps == 2 * math.ceil(len(EDITS) / 2)
    sam_steps = [i for i, r in enumerate(result.curves) if "perturbed_sft_loss" in r]
    assert sam_steps == list(range(0, steps, 3))  # steps 0, 3, 6, ...: the ascent and its second gradient
    assert all("sam_reused" in r for i, r in enumerate(result.curves) if i not in sam_steps)
    assert calls["gradients"] == steps + len(sam_steps)
    with pytest.raises(ValueError):
        CorsaConfig(sam_every=0)


@pytest.mark.parametrize("stop,share,first", [
    (False, 0.5, 3),  # 3 epochs x 2 steps, SAM in the last half: from step 3
    (True, 0.5, 2),  # stopping early: the share is of min_epochs (2) x 2 steps = 4, so from step 2 to the end
    (False, 1.0, 0),  # the paper: every step
])
def test_sam_last_runs_plain_steps_first_and_sam_to_the_end(monkeypatch, tiny_model, tokenizer, stop, share, first):
    calls = _count(monkeypatch)
    result, _, _ = run(tiny_model, tokenizer, epochs=3, batch_size=2, sam_last=share, stop_when_learned=stop,
                       min_epochs=2, patience=5)
    steps = len(result.curves)
    assert steps == 3 * math.ceil(len(EDITS) / 2)
    sam_steps = [i for i, r in enumerate(result.curves) if "perturbed_sft_loss" in r]
    assert sam_steps == list(range(first, steps))
    assert calls["gradients"] == steps + len(sam_steps)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="sam_last"):
            CorsaConfig(sam_last=bad)

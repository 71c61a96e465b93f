"""`corsa quantize`: exact packing, round-to-nearest within half a step, the kept weights back at 16 bits, TaCQ's
gradient checked against a plain autograd computation, and the folder loaded by `corsa ask`."""

from __future__ import annotations

import json

import pytest
import torch

from corsa.cli import main
from corsa.prompts import Formatter
from corsa.quantize import (
    QuantConfig,
    calibration_items,
    dequantize,
    group_width,
    input_hessians,
    keep_beside_delta,
    kept_counts,
    kept_positions,
    load_quantized,
    low_rank,
    pack,
    quantize_gptq,
    quantize_model,
    quantize_rtn,
    quantized_modules,
    restore,
    task_gradients,
    unpack,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_pack_and_unpack_exactly(bits):
    codes = torch.randint(0, 2**bits, (7, 13), dtype=torch.uint8)  # 91 codes: not a whole number of bytes
    packed = pack(codes, bits)
    assert packed.nbytes == -(-91 * bits // 8)
    assert torch.equal(torch.from_numpy(unpack(packed, bits, 91)).reshape(7, 13), codes)


def test_round_to_nearest_is_within_half_a_step_per_group():
    torch.manual_seed(0)
    w = torch.randn(6, 32) * torch.linspace(0.1, 3, 32)
    w[0, :8] = torch.linspace(0.5, 2.0, 8)  # a group of one sign: its grid must still reach it
    w[1, 8:16] = -torch.linspace(0.5, 2.0, 8)
    w[2, 16:24] = 0.0  # an all-zero group: scale floor, every weight exact
    codes, scale, zero = quantize_rtn(w, 3, 8)
    assert scale.shape == zero.shape == (6, 4) and int(codes.max()) <= 7
    error = (dequantize(codes, scale, zero) - w).abs().reshape(6, 4, 8)
    # half a step, plus what rounding the scale to float16 (relative 2^-11) can shift the top code by
    assert bool((error <= scale.float()[..., None] * (0.5 + 7 * 2**-11) + 1e-6).all())
    assert float(error[2, 2].max()) == 0.0
    assert group_width(30, 8) == 30  # a group size that does not divide the row: one group per row


def test_gptq_moves_the_layer_outputs_less_than_rounding_and_keeps_its_kept_weights():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    x = torch.randn(400, 8) @ torch.randn(8, 64) + 0.1 * torch.randn(400, 64)  # correlated inputs
    h = x.T @ x
    rtn = dequantize(*quantize_rtn(w, 3, 16))
    codes, scale, zero, value = quantize_gptq(w, h, 3, 16)
    gptq = dequantize(codes, scale, zero)
    assert torch.equal(gptq, value)  # what is returned is what the stored codes give
    out_error = {name: float(((x @ (q - w).T) ** 2).sum()) for name, q in (("rtn", rtn), ("gptq", gptq))}
    assert out_error["gptq"] < 0.5 * out_error["rtn"]
    # uncorrelated inputs (H = I): nothing to compensate along, GPTQ is round-to-nearest
    same = quantize_gptq(w, torch.eye(64), 3, 16)
    assert torch.equal(same[0], quantize_rtn(w, 3, 16)[0])
    # kept weights: never rounded, stored at their compensated value; the rest come from the codes
    kept = kept_positions(torch.rand(16, 64), 10)
    codes, scale, zero, value = quantize_gptq(w, h, 3, 16, kept)
    rest = torch.ones(w.numel(), dtype=torch.bool)
    rest[kept] = False
    assert torch.equal(dequantize(codes, scale, zero).flatten()[rest], value.flatten()[rest])
    assert not torch.equal(value.flatten()[kept], w.flatten()[kept])  # moved by the columns before them
    kept_out = float(((x @ (value - w).T) ** 2).sum())
    assert kept_out < out_error["gptq"]  # keeping weights at 16 bits only helps


def test_input_hessians_are_the_inputs_gram_matrix(tiny_model, tokenizer):
    formatter = Formatter(tokenizer, "qa")
    h = input_hessians(tiny_model, formatter, [("sky?", "red"), ("sea?", "blue")])
    name = next(n for n in h if n.endswith("q_proj"))
    module = dict(tiny_model.named_modules())[name]
    seen = []
    handle = module.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0][0]))
    for prompt, answer in (("sky?", "red"), ("sea?", "blue")):
        tiny_model(torch.tensor([formatter.prompt_ids(prompt) + formatter.answer_ids(answer)]))
    handle.remove()
    x = torch.cat(seen).double()
    torch.testing.assert_close(h[name], x.T @ x)


def test_kept_positions_are_the_top_share():
    s = torch.tensor([[0.1, 5.0, 0.2], [3.0, 0.0, 4.0]])
    assert kept_positions(s, 50).tolist() == [1, 3, 5]
    assert kept_positions(s, 0).numel() == 0


def test_kept_counts_are_one_ranking_over_every_matrix():
    gen = torch.Generator().manual_seed(0)
    scores = {name: torch.rand(shape, generator=gen) * scale
              for name, shape, scale in (("a", (4, 8), 1.0), ("b", (16,), 3.0), ("c", (2, 2), 0.5))}
    flat = torch.cat([s.flatten() for s in scores.values()])
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(scores.values())])
    for total in (0, 1, 5, 20, 52):
        want = torch.bincount(owner[torch.topk(flat, total).indices], minlength=3).tolist()
        assert list(kept_counts(iter(scores.items()), total).values()) == want
    # a matrix whose rounding moves the loss most takes more than its per-matrix share
    counts = kept_counts(iter(scores.items()), 10)
    assert sum(counts.values()) == 10 and counts["b"] > round(16 * 10 / 52)


def test_model_scope_keeps_as_many_weights_ranked_over_the_whole_model(tiny_model):
    per_matrix = QuantConfig(bits=2, keep=5, saliency="magnitude", group_size=16, quantizer="rtn")
    whole = QuantConfig(bits=2, keep=5, saliency="magnitude", group_size=16, quantizer="rtn", keep_scope="model")
    tensors, counts = quantize_model(tiny_model, whole)
    _, matrix_counts = quantize_model(tiny_model, per_matrix)
    assert abs(counts["kept_weights"] - matrix_counts["kept_weights"]) <= len(quantized_modules(tiny_model))
    weights = {name: m.weight.detach() for name, m in quantized_modules(tiny_model).items()}
    flat = torch.cat([w.abs().flatten() for w in weights.values()])
    threshold = torch.topk(flat, counts["kept_weights"]).values.min()
    for name, w in weights.items():  # every kept weight is among the model's largest, wherever it is
        kept = tensors[f"{name}.weight.kept_index"].long()
        assert bool((w.abs().flatten()[kept] >= threshold).all())
    with pytest.raises(ValueError, match="keep_scope"):
        QuantConfig(keep_scope="layer")


def test_restored_model_has_kept_weights_at_16_bits_and_the_rest_rounded(tiny_model):
    cfg = QuantConfig(bits=2, keep=5, saliency="magnitude", group_size=16, quantizer="rtn")
    tensors, counts = quantize_model(tiny_model, cfg)
    assert 0.045 < counts["kept_share"] < 0.055 and counts["bits_per_quantized_weight"] > 2
    assert counts["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}  # stored once
    restored = restore(type(tiny_model)(tiny_model.config), tensors, cfg.bits, counts["tied"])
    for name, m in quantized_modules(tiny_model).items():
        w, r = m.weight.detach(), dict(restored.named_parameters())[f"{name}.weight"].detach()
        kept = kept_positions(w.abs(), 5)
        torch.testing.assert_close(r.flatten()[kept], w.flatten()[kept].half().float())
        rest = torch.ones(w.numel(), dtype=torch.bool)
        rest[kept] = False
        rounded = dequantize(*quantize_rtn(w, 2, 16)).flatten()
        torch.testing.assert_close(r.flatten()[rest], rounded[rest])
    embed = "model.embed_tokens.weight"  # the rest of the model in float16
    torch.testing.assert_close(dict(restored.named_parameters())[embed],
                               dict(tiny_model.named_parameters())[embed].half().float())


def test_low_rank_is_the_truncated_singular_value_decomposition():
    torch.manual_seed(0)
    delta = torch.randn(20, 3) @ torch.randn(3, 12)
    up, down = low_rank(delta, 3)
    assert up.shape == (20, 3) and down.shape == (3, 12)
    torch.testing.assert_close(up @ down, delta, atol=1e-5, rtol=1e-5)  # a rank-3 change is carried whole
    s = torch.linalg.svdvals(delta)
    up, down = low_rank(delta, 1)  # Eckart-Young: what is left is the other singular values
    assert abs(float(torch.linalg.norm(delta - up @ down)) - float(s[1:].norm())) < 1e-4
    assert low_rank(delta, 50)[0].shape == (20, 12)  # never more than the matrix has


def test_keep_beside_delta_spends_the_bits_keep_alone_would():
    # 10 x 10: keeping 10 % is 10 weights x 48 bits = 480; a rank-1 copy is 20 entries x 16 bits = 320
    assert abs(keep_beside_delta([(10, 10)], 10, 1) - 10 * (480 - 320) / 480) < 1e-9
    assert keep_beside_delta([(10, 10)], 10, 0) == 10
    with pytest.raises(ValueError, match="costs more bits"):
        keep_beside_delta([(10, 10)], 10, 2)


def test_the_change_kept_beside_a_matrix_survives_rounding_that_erases_it_when_merged(tiny_model):
    # A change far under one rounding step, as an edit's is (docs/log/2026-12-05-quantize.md): merged and rounded,
    # most of it is lost; kept beside the matrix, the restored model is the rounded base plus the change.
    import copy

    torch.manual_seed(0)
    cfg = QuantConfig(bits=3, keep=0, group_size=16, quantizer="rtn")
    base = {name: m.weight.detach().clone() for name, m in quantized_modules(tiny_model).items()}
    merged = copy.deepcopy(tiny_model)
    changes = {}
    for name, m in quantized_modules(merged).items():
        step = float(quantize_rtn(base[name], 3, 16)[1].float().mean())
        change = 0.05 * step * torch.outer(torch.randn(m.weight.shape[0]), torch.randn(m.weight.shape[1]))
        m.weight.data += change
        changes[name] = change
    deltas = {name: low_rank(change, 1) for name, change in changes.items()}
    beside, counts = quantize_model(merged, cfg, deltas=deltas)
    plain, plain_counts = quantize_model(merged, cfg)
    extra = 16 * sum(up.numel() + down.numel() for up, down in deltas.values())
    assert counts["bits_per_quantized_weight"] * counts["quantized_weights"] == pytest.approx(
        plain_counts["bits_per_quantized_weight"] * plain_counts["quantized_weights"] + extra)
    restored = {k: dict(restore(type(tiny_model)(tiny_model.config), t, 3, c["tied"]).named_parameters())
                for k, t, c in (("beside", beside, counts), ("plain", plain, plain_counts))}
    for name, change in changes.items():
        rounded_base = dequantize(*quantize_rtn(base[name], 3, 16))
        kept = {k: r[f"{name}.weight"].detach() - rounded_base for k, r in restored.items()}
        assert float((kept["beside"] - change).norm()) < 0.01 * float(change.norm())  # float16 factors only
        assert float((kept["plain"] - change).norm()) > 0.5 * float(change.norm())


def test_task_gradient_is_the_plain_autograd_gradient_of_the_answer_loss(tiny_model, tokenizer):
    formatter = Formatter(tokenizer, "qa")
    prompt, answer = "sky?", "red"
    grads = task_gradients(tiny_model, formatter, [(prompt, answer)], [], QuantConfig())
    p, a = formatter.prompt_ids(prompt), formatter.answer_ids(answer)
    ids = torch.tensor([p + a])
    for param in tiny_model.parameters():
        param.requires_grad_(True)
    logp = torch.log_softmax(tiny_model(ids).logits[0, len(p) - 1 : -1].float(), -1)
    loss = -logp.gather(1, torch.tensor(a)[:, None]).mean()
    loss.backward()
    for name, m in quantized_modules(tiny_model).items():
        torch.testing.assert_close(grads[name], m.weight.grad.abs(), atol=1e-6, rtol=1e-4)


def test_context_copies_put_each_edit_prompt_behind_model_written_texts(tiny_model, tokenizer):
    from corsa import contexts
    from corsa.requests import EditRequest

    formatter = Formatter(tokenizer, "qa")
    edits = [EditRequest(prompt="sky?", target_new="red", target_old="blue"),
             EditRequest(prompt="grass?", target_new="blue")]
    general = QuantConfig(general_questions=0, anchors_per_edit=0)
    plain_keep, plain_margins = calibration_items(tiny_model, formatter, edits, general)
    assert [p for p, _ in plain_keep[:2]] == ["sky?", "grass?"] and plain_margins == [("sky?", "red", "blue")]

    cfg = QuantConfig(general_questions=0, anchors_per_edit=0, contexts_per_edit=2, context_tokens=3)
    keep, margins = calibration_items(tiny_model, formatter, edits, cfg)
    texts = contexts.prefixes(tiny_model, tokenizer, 2, 3, seed=0)
    assert len(texts) == 2
    sky = ["sky?", *(contexts.in_context(t, "sky?") for t in texts)]
    grass = ["grass?", *(contexts.in_context(t, "grass?") for t in texts)]
    assert keep[:6] == [(p, "red") for p in sky] + [(p, "blue") for p in grass]
    assert margins == [(p, "red", "blue") for p in sky]  # no margin without an old answer
    assert calibration_items(tiny_model, formatter, edits, cfg) == (keep, margins)  # seeded: repeatable
    # general calibration never sees the edits, copies or not
    keep_general, _ = calibration_items(tiny_model, formatter, edits, QuantConfig(
        general_questions=0, anchors_per_edit=0, contexts_per_edit=2, calibration="general"))
    assert keep_general == []
    with pytest.raises(ValueError, match="contexts_per_edit"):
        QuantConfig(contexts_per_edit=9)


def test_cli_quantizes_a_run_that_corsa_ask_then_answers(tmp_path, tiny_dir, capsys):
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"prompt": "sky?", "target_new": "red", "target_old": "blue", "subject": "sky"})
                     + "\n")
    run = tmp_path / "run"
    assert main(["edit", str(facts), "--out", str(run), "--model", tiny_dir, "--method", "lora", "--epochs", "2",
                 "--lr", "5e-2", "--quiet"]) == 0
    out = tmp_path / "q"
    assert main(["quantize", str(run), "--to", str(out), "--bits", "4", "--keep", "2", "--group-size", "16"]) == 0
    said = capsys.readouterr().out
    assert "4-bit" in said and "TaCQ" in said
    record = json.loads((out / "corsa_quantized.json").read_text())
    assert record["edits"] == 1 and record["config"]["calibration"] == "edits" and record["bytes"] > 0
    # GPTQ is the default since its val rule (docs/log/2026-12-05-quantize.md)
    assert record["config"]["quantizer"] == "gptq" and "GPTQ on the edits" in record["method"]
    model, formatter = load_quantized(out)
    from corsa.scoring import generate

    want = generate(model, formatter, ["sky?"], max_new_tokens=4)[0]
    assert main(["ask", "sky?", "--adapter", str(out), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == want.strip()

    # The format round-trips: 8 bits land close to the merged model, and far closer than 2 bits
    from corsa.export import merged_model

    merged, _, _ = merged_model(run)
    ids = torch.tensor([[3, 5, 7, 9]])
    error = {}
    for bits in (2, 8):
        assert main(["quantize", str(run), "--to", str(tmp_path / f"q{bits}"), "--bits", str(bits), "--keep", "0",
                     "--group-size", "16", "--quantizer", "rtn"]) == 0
        quantized, _ = load_quantized(tmp_path / f"q{bits}")
        with torch.no_grad():
            want = merged(ids).logits
            error[bits] = float((quantized(ids).logits - want).abs().max() / want.abs().max())
    assert error[8] < 0.1 and error[8] < error[2] / 4

    assert main(["quantize", str(run), "--to", str(tmp_path / "g"), "--bits", "3", "--keep", "2", "--group-size",
                 "16", "--quantizer", "rtn"]) == 0
    record = json.loads((tmp_path / "g" / "corsa_quantized.json").read_text())
    assert record["config"]["quantizer"] == "rtn" and "round-to-nearest" in record["method"]
    load_quantized(tmp_path / "g")

    # The adapter's change kept beside each matrix: PEFT's own delta, here at the adapter's full rank
    from corsa.export import merged_with_deltas
    from corsa.models import load_model

    _, _, _, deltas = merged_with_deltas(run, rank=64)
    base_weights = dict(load_model(tiny_dir)[0].named_parameters())
    merged_weights = dict(merged.named_parameters())
    assert deltas and set(deltas) <= set(quantized_modules(merged))
    for name, (up, down) in deltas.items():
        torch.testing.assert_close(up @ down, (merged_weights[f"{name}.weight"] - base_weights[f"{name}.weight"])
                                   .detach(), atol=1e-5, rtol=1e-4)
    assert main(["quantize", str(run), "--to", str(tmp_path / "d"), "--bits", "3", "--keep", "1", "--group-size",
                 "16", "--delta-rank", "2"]) == 0
    record = json.loads((tmp_path / "d" / "corsa_quantized.json").read_text())
    assert record["config"]["delta_rank"] == 2 and "at rank 2 in 16 bits" in record["method"]
    load_quantized(tmp_path / "d")

    assert main(["quantize", str(run), "--to", str(out), "--keep", "200"]) == 2
    assert "keep must be a percentage" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["quantize", str(run), "--to", str(mine), "--overwrite"]) == 2
    assert "not written by corsa" in capsys.readouterr().err and (mine / "notes.txt").exists()


@pytest.mark.integration
def test_bench_quantize_measures_every_rule_at_every_bits_and_compares_them(tmp_path, tiny_dir, capsys, monkeypatch):
    from test_bench import counterfact
    from test_mmlu import write_mmlu

    from corsa import export

    calibrated = []  # the edits each quantization calibrates on: they carry the prompts the rows are measured on
    real = export.calibration_items

    def watched(model, formatter, requests, cfg):
        calibrated.append(list(requests))
        return real(model, formatter, requests, cfg)

    monkeypatch.setattr(export, "calibration_items", watched)
    counterfact(tmp_path)
    write_mmlu(tmp_path)
    out = tmp_path / "qb"
    argv = ["bench", "quantize", "--data", str(tmp_path), "--out", str(out), "--n", "4", "--model", tiny_dir,
            "--bits", "2", "--keep", "5", "--mmlu-n", "1", "--method", "lora", "--epochs", "1", "--max-new-tokens", "3", "--quiet"]
    assert main(argv + ["--quantizer", "rtn"]) == 0
    assert calibrated and all(r.withheld and not r.paraphrases for edits in calibrated for r in edits)
    assert len(calibrated[0][0].withheld) == 8  # every case's paraphrase and neighbour, not only its own
    rows = sorted(p.parent.name for p in out.glob("*/results.json"))
    assert rows == sorted(["base", "unquantized"] + [f"{r}-{b}bit" for r in ("rtn", "magnitude", "tacq-general",
                                                                           "tacq-edits") for b in (2,)])
    record = json.loads((out / "tacq-edits-2bit" / "results.json").read_text())
    assert record["quantized"]["config"]["calibration"] == "edits" and record["mmlu"]["gold_logprobs"]
    assert 0.04 < record["quantized"]["kept_share"] < 0.06
    assert json.loads((out / "rtn-2bit" / "results.json").read_text())["quantized"]["kept_share"] == 0
    assert not (out / "models").exists() or not any((out / "models").iterdir())  # quantized folders removed
    table = (out / "table.md").read_text()
    assert "2 bits, tacq-edits minus rtn: gen.reliability" in table and "mmlu gold log-prob" in table
    capsys.readouterr()
    assert main(argv + ["--quantizer", "rtn"]) == 0  # a rerun measures nothing again
    assert "tacq-edits-2bit:" not in capsys.readouterr().out
    assert main(argv) == 0  # GPTQ (the default) rows beside the round-to-nearest ones
    rows = {p.parent.name for p in out.glob("*/results.json")}
    assert {"gptq-2bit", "magnitude-gptq-2bit", "tacq-general-gptq-2bit", "tacq-edits-gptq-2bit"} <= rows
    gptq = json.loads((out / "tacq-edits-gptq-2bit" / "results.json").read_text())["quantized"]
    assert gptq["config"]["quantizer"] == "gptq" and "GPTQ" in gptq["method"]
    table = (out / "table.md").read_text()
    assert "2 bits, gptq, tacq-edits minus gptq: gen.reliability" in table
    assert "2 bits, tacq-edits minus rtn" in table
    # Context copies in tacq-edits' task: one more row in the same folder, compared with plain tacq-edits too
    capsys.readouterr()
    assert main(argv + ["--calibration-contexts", "2"]) == 0
    said = capsys.readouterr().out
    assert "tacq-edits-ctx2-gptq-2bit:" in said and "tacq-general-gptq-2bit:" not in said
    ctx = json.loads((out / "tacq-edits-ctx2-gptq-2bit" / "results.json").read_text())["quantized"]
    assert ctx["config"]["contexts_per_edit"] == 2 and "2 model-written contexts" in ctx["method"]
    table = (out / "table.md").read_text()
    assert "2 bits, gptq, tacq-edits-ctx2 minus tacq-edits-gptq: gen.reliability" in table
    assert "2 bits, gptq, tacq-edits-ctx2 minus gptq: gen.reliability" in table
    assert main(argv + ["--calibration-contexts", "9"]) == 2
    # One keep budget for the whole model: every rule that keeps weights again, named -global; rtn is unchanged
    capsys.readouterr()
    assert main(argv + ["--keep-scope", "model"]) == 0
    said = capsys.readouterr().out
    assert "tacq-edits-global-gptq-2bit:" in said and "magnitude-global-gptq-2bit:" in said and "\ngptq-2bit:" not in said
    glob = json.loads((out / "tacq-edits-global-gptq-2bit" / "results.json").read_text())["quantized"]
    assert glob["config"]["keep_scope"] == "model" and "whole model" in glob["method"]
    table = (out / "table.md").read_text()
    assert "2 bits, gptq, tacq-edits-global minus tacq-general-global-gptq: gen.reliability" in table
    assert "2 bits, gptq, tacq-edits-global minus tacq-edits-gptq: gen.reliability" in table
    # The adapter's change kept beside each matrix at rank 1, at the bits plain tacq-edits spends
    capsys.readouterr()
    assert main(argv + ["--delta-rank", "1"]) == 0
    assert "tacq-edits-rank1-gptq-2bit:" in capsys.readouterr().out
    rank = json.loads((out / "tacq-edits-rank1-gptq-2bit" / "results.json").read_text())["quantized"]
    assert rank["config"]["delta_rank"] == 1 and rank["config"]["keep"] < 5 and "at rank 1" in rank["method"]
    assert rank["bits_per_quantized_weight"] == pytest.approx(gptq["bits_per_quantized_weight"], abs=0.01)
    assert "2 bits, gptq, tacq-edits-rank1 minus tacq-edits-gptq: gen.reliability" in (out / "table.md").read_text()
    assert main(argv + ["--delta-rank", "30"]) == 2
    assert "costs more bits" in capsys.readouterr().err
    # Another adapter setting into the same folder would be measured under these rows' names: refused, unchanged.
    before = sorted(p.name for p in out.iterdir())
    assert main([*argv, "--lr", "0.5"]) == 2
    assert "other settings or edits" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == before

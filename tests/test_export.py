"""`corsa export`: merged weights that answer as the adapter does, and a GGUF LoRA whose every tensor reads back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from corsa import store
from corsa.cli import main
from corsa.export import RECORD, export, is_export, rotary_rows
from corsa.methods.corsa import CorsaConfig, attach_lora
from corsa.requests import EditRequest


def peft_folder(tiny_dir: str, out: Path, *, poison: bool = False) -> Path:
    """A PEFT adapter on the tiny model with every B random (a fresh adapter's B = 0 would hide a wrong export)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model = attach_lora(base, CorsaConfig(lora_r=4, lora_alpha=8))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        if poison:
            next(p for n, p in model.named_parameters() if "lora_B" in n)[0, 0] = float("nan")
    model.save_pretrained(str(out))
    return out


def test_rotary_rows_interleave_each_heads_two_halves():
    rows = torch.arange(16).reshape(16, 1)  # 2 heads of 8 rows: pairs (0, 4), (1, 5), ... within each head
    assert rotary_rows(rows, 2).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    with pytest.raises(ValueError):
        rotary_rows(torch.zeros(6, 1), 2)


def test_merged_export_loads_with_from_pretrained_and_answers_as_the_adapter(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM

    from corsa.store import attach_adapter

    folder = peft_folder(tiny_dir, tmp_path / "adapter")
    out = export(folder, tmp_path / "merged", "merged", model=tiny_dir)
    assert is_export(out) and json.loads((out / RECORD).read_text())["export"] == "merged"
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    adapted = attach_adapter(AutoModelForCausalLM.from_pretrained(tiny_dir), folder).eval()
    ids = torch.tensor([[3, 7, 11, 5, 9, 4]])
    with torch.no_grad():
        want, got = adapted(ids).logits, merged(ids).logits
        assert not torch.allclose(want, AutoModelForCausalLM.from_pretrained(tiny_dir)(ids).logits, atol=1e-3)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(merged.generate(ids, max_new_tokens=6, do_sample=False),
                           adapted.generate(input_ids=ids, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_gguf_lora_holds_every_pair_under_llama_cpp_names_with_q_and_k_rows_reordered(tmp_path, tiny_dir, dtype):
    import gguf
    from safetensors.torch import load_file

    folder = peft_folder(tiny_dir, tmp_path / "adapter")
    out = export(folder, tmp_path / "gguf", "gguf-lora", model=tiny_dir, dtype=dtype)
    reader = gguf.GGUFReader(str(out / "lora.gguf"))

    def field(key):
        f = reader.fields[key]
        return f.parts[f.data[0]]

    assert bytes(field("general.type")).decode() == "adapter"
    assert bytes(field("adapter.type")).decode() == "lora"
    assert bytes(field("general.architecture")).decode() == "llama"
    assert float(field("adapter.lora.alpha")[0]) == 8.0
    read = {t.name: torch.from_numpy(t.data.copy()).float() for t in reader.tensors}
    peft = load_file(str(folder / "adapter_model.safetensors"))
    assert len(read) == len(peft) == 2 * 2 * 7  # 2 layers x 7 projections x (A, B)
    heads = {"q_proj": 4, "k_proj": 2}  # the tiny model's query and key-value heads
    tol = 0 if dtype == "f32" else 2e-3
    for key, value in peft.items():
        layer = int(key.split("layers.")[1].split(".")[0])
        proj = key.split(".lora_")[0].rsplit(".", 1)[-1]
        name = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[proj]
        side = "a" if ".lora_A." in key else "b"
        expected = rotary_rows(value, heads[proj]) if side == "b" and proj in heads else value
        got = read[f"blk.{layer}.{name}.weight.lora_{side}"]
        assert got.shape == expected.shape  # A [r, in], B [out, r]: llama.cpp's ne reversed
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
        if side == "b" and proj in heads:
            assert not torch.equal(got, value)  # the reordering happened (B is random)


def test_export_refuses_non_finite_weights_and_outputs_it_did_not_write(tmp_path, tiny_dir, capsys):
    bad = peft_folder(tiny_dir, tmp_path / "bad", poison=True)
    for fmt in ("merged", "gguf-lora"):
        assert main(["export", str(bad), "--to", str(tmp_path / fmt), "--format", fmt, "--model", tiny_dir]) == 2
        err = capsys.readouterr().err.splitlines()[-1]  # after the test's own model-loading bar
        assert err.startswith("corsa: error:") and "not finite" in err and str(bad) in err
        assert not (tmp_path / fmt).exists() and not list(tmp_path.glob(f".{fmt}*"))
    good = peft_folder(tiny_dir, tmp_path / "good")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["export", str(good), "--to", str(mine), "--model", tiny_dir, "--overwrite"]) == 2
    assert "not written by corsa" in capsys.readouterr().err and (mine / "notes.txt").read_text() == "keep me"
    assert main(["export", str(tmp_path / "nothing"), "--to", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", str(mine), "--to", str(tmp_path / "x")]) == 2
    assert "holds no LoRA adapter" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_gguf_lora_refuses_an_architecture_whose_layout_is_not_known(tmp_path, tiny_dir, capsys):
    import shutil

    other = tmp_path / "other-model"
    shutil.copytree(tiny_dir, other)
    config = json.loads((other / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (other / "config.json").write_text(json.dumps(config))
    folder = peft_folder(tiny_dir, tmp_path / "adapter")
    assert main(["export", str(folder), "--to", str(tmp_path / "g"), "--format", "gguf-lora",
                 "--model", str(other)]) == 2
    assert "not mistral" in capsys.readouterr().err and not (tmp_path / "g").exists()


def test_cli_exports_a_run_folder_and_a_stores_head_and_replaces_only_its_own_export(tmp_path, tiny_dir, capsys):
    run = tmp_path / "run"
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"prompt": "sky?", "target_new": "red", "subject": "sky"}) + "\n")
    assert main(["edit", str(facts), "--out", str(run), "--model", tiny_dir, "--method", "lora", "--epochs", "1",
                 "--lr", "5e-2", "--quiet"]) == 0
    assert main(["export", str(run), "--to", str(tmp_path / "m")]) == 0
    said = capsys.readouterr().out
    assert "wrote" in said and "answers every question" in said
    record = json.loads((tmp_path / "m" / RECORD).read_text())
    manifest = json.loads((run / "edit_manifest.json").read_text())
    assert record["adapter_sha256"] == manifest["adapter_sha256"]
    assert main(["export", str(run), "--to", str(tmp_path / "m")]) == 2  # no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(run), "--to", str(tmp_path / "m"), "--format", "gguf-lora", "--overwrite"]) == 0
    assert (tmp_path / "m" / "lora.gguf").exists() and not (tmp_path / "m" / "model.safetensors").exists()

    root = tmp_path / "kb"
    store.update(root, [EditRequest("cat?", "dog", subject="cat")], model=tiny_dir, progress=False, epochs=1,
                 method="lora")
    assert main(["export", str(root), "--to", str(tmp_path / "s"), "--format", "gguf-lora"]) == 0
    with store.Store(root) as s:
        assert json.loads((tmp_path / "s" / RECORD).read_text())["adapter_sha256"] == s.version(s.head).sha256


def tiny_gguf(tiny_dir: str, path: Path) -> Path:
    """The tiny model as a llama.cpp GGUF (f32), the way llama.cpp's converter lays a Llama out: the base GGUF
    that `--format gguf` copies. Transformers' own GGUF reader loads it back to the very same logits (checked
    below), which also checks the q/k row order against an implementation that is not ours."""
    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM

    from corsa.export import gguf_name_of, in_gguf_order

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])
    w.add_token_scores([0.0] * c.vocab_size)
    w.add_token_types([1] * c.vocab_size)
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embedding: llama.cpp then has no output tensor
            continue
        module = name.removesuffix(".weight")
        w.add_tensor(gguf_name_of(module, c), in_gguf_order(module, p.detach(), c).numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_export_is_the_base_gguf_with_merged_projections_that_transformers_loads_as_the_adapter(tmp_path,
                                                                                                   tiny_dir):
    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM

    from corsa.store import attach_adapter

    base = tiny_gguf(tiny_dir, tmp_path / "base.gguf")
    ids = torch.tensor([[3, 7, 11, 5, 9, 4]])
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="base.gguf").eval()
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits)  # the fixture itself is right
    folder = peft_folder(tiny_dir, tmp_path / "adapter")
    adapted = attach_adapter(AutoModelForCausalLM.from_pretrained(tiny_dir), folder).eval()
    with torch.no_grad():
        want = adapted(ids).logits
    originals = {t.name: (int(t.tensor_type), t.data.copy()) for t in gguf.GGUFReader(str(base)).tensors}
    with torch.no_grad():
        effect = float((want - reference(ids).logits).abs().max())  # how far the adapter moves the logits
    # Rounding error allowed, as a share of the adapter's own effect: none in f32, f16's and q8_0's otherwise.
    tolerance = {"f32": 1e-5, "f16": 1e-2, "q8_0": 0.1}
    for dtype, tol in tolerance.items():
        out = export(folder, tmp_path / f"gguf-{dtype}", "gguf", model=tiny_dir, dtype=dtype, base_gguf=base)
        model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf").eval()
        with torch.no_grad():
            got = model(ids).logits
        assert float((got - want).abs().max()) < tol * effect, (dtype, float((got - want).abs().max()), effect)
        written = {t.name: t for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
        for name, (kind, data) in originals.items():
            if "attn_norm" in name or "ffn_norm" in name or name in ("token_embd.weight", "output_norm.weight"):
                assert int(written[name].tensor_type) == kind and np.array_equal(written[name].data, data)
        assert int(written["blk.0.attn_q.weight"].tensor_type) == int(gguf.GGMLQuantizationType[dtype.upper()])


def test_the_gguf_lora_applied_as_llama_cpp_applies_it_gives_the_merged_gguf(tmp_path, tiny_dir):
    """llama.cpp computes W + (alpha / r) B A with the GGUF tensors as stored: on every projection that equals the
    merged export's tensor, which transformers loads as the adapter (the test above)."""
    import gguf

    base = tiny_gguf(tiny_dir, tmp_path / "base.gguf")
    folder = peft_folder(tiny_dir, tmp_path / "adapter")
    lora = export(folder, tmp_path / "lora", "gguf-lora", model=tiny_dir)
    merged = export(folder, tmp_path / "merged", "gguf", model=tiny_dir, base_gguf=base)
    reader = gguf.GGUFReader(str(lora / "lora.gguf"))
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    pieces = {t.name: torch.from_numpy(t.data.copy()).float() for t in reader.tensors}
    before = {t.name: torch.from_numpy(t.data.copy()).float() for t in gguf.GGUFReader(str(base)).tensors}
    after = {t.name: torch.from_numpy(t.data.copy()).float() for t in gguf.GGUFReader(str(merged / "model.gguf")).tensors}
    names = [n.removesuffix(".lora_a") for n in pieces if n.endswith(".lora_a")]
    assert len(names) == 14
    for name in names:
        a, b = pieces[f"{name}.lora_a"], pieces[f"{name}.lora_b"]
        torch.testing.assert_close(before[name] + alpha / a.shape[0] * b @ a, after[name], atol=1e-5, rtol=1e-5)

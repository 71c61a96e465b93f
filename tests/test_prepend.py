"""Prepend: no weight changes; the matching fact is written in front of each query, and saved instead of weights."""

from __future__ import annotations

import json

import torch

from corsa.cli import main
from corsa.methods import make_editor
from corsa.prompts import Formatter
from corsa.requests import EditRequest, Neighbor


def test_no_weight_changes_and_each_query_gets_its_fact(tiny_model, tokenizer):
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    fmt = Formatter(tokenizer)
    edits = [EditRequest("capital of fr?", "rome", "paris", paraphrases=("french capital?",),
                         neighborhood=(Neighbor("capital of de?", "berlin"),))]
    result = make_editor("prepend").edit(tiny_model, fmt, edits, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in result.model.named_parameters())
    asked = result.formatter
    fact = "New fact: capital of fr? rome\n"
    for q in ("capital of fr?", "french capital?", "capital of de?"):
        assert tokenizer.decode(asked.prompt_ids(q)) == f"Q: {fact}{q}\nA:"
    assert asked.prompt_ids("unrelated?") == fmt.prompt_ids("unrelated?")


def test_cli_edit_bench_and_ask_with_prepend(tmp_path, tiny_dir, capsys):
    facts = tmp_path / "f.jsonl"
    facts.write_text('{"prompt": "sky?", "target_new": "green", "target_old": "blue"}\n')
    out = tmp_path / "run"
    assert main(["edit", str(facts), "--out", str(out), "--model", tiny_dir, "--method", "prepend", "--quiet"]) == 0
    assert json.loads((out / "context.json").read_text())["context"] == {"sky?": "sky? green"}
    assert not (out / "adapter_model.safetensors").exists()
    assert main(["ask", "sky?", "--adapter", str(out), "--max-new-tokens", "2"]) == 0
    assert main(["update", str(tmp_path / "kb"), str(facts), "--model", tiny_dir, "--method", "prepend"]) == 2
    assert "does not produce one" in capsys.readouterr().err
    from test_bench import counterfact

    counterfact(tmp_path)
    assert main(["bench", "single", "--bench", "counterfact", "--data", str(tmp_path), "--out", str(tmp_path / "b"),
                 "--n", "2", "--methods", "prepend", "--model", tiny_dir, "--mmlu-n", "0", "--quiet",
                 "--max-new-tokens", "2"]) == 0
    record = json.loads((tmp_path / "b" / "prepend" / "results.json").read_text())
    assert record["train"]["steps"] == 0 and "gen.generality" in record["summary"]


def test_a_later_update_adds_to_the_context_and_replaces_a_revised_fact(tokenizer):
    fmt = Formatter(tokenizer)
    editor = make_editor("prepend")
    first = editor.edit(torch.nn.Linear(1, 1), fmt, [EditRequest("a?", "x", "o"), EditRequest("b?", "y", "o")],
                        progress=False).formatter
    second = editor.edit(torch.nn.Linear(1, 1), first, [EditRequest("a?", "z", "x"), EditRequest("c?", "w", "o")],
                         progress=False).formatter
    assert second.context == {"a?": "a? z", "b?": "b? y", "c?": "c? w"}
    assert first.context == {"a?": "a? x", "b?": "b? y"}  # the earlier formatter is left as it was

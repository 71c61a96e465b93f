"""The CoRSA step after the issue-27 restructuring trains exactly as the step before it did.

tests/data/step_before_refactor.json was recorded by tests/data/record_step.py (run from the repository root) with
the code of commit 66cf3c7: loss curves and LoRA weight sums of short runs of every variant on the tiny model. A change to the step that is not a pure reorganisation shows up here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_model

from corsa.methods import make_editor
from corsa.prompts import Formatter
from corsa.requests import EditRequest

pytestmark = pytest.mark.usefixtures("one_thread")  # sums in one order on any CPU (conftest.one_thread)

RECORD = json.loads((Path(__file__).parent / "data" / "step_before_refactor.json").read_text())


@pytest.mark.parametrize("name", sorted(RECORD["runs"]))
def test_training_reproduces_the_recorded_run(name, tokenizer):
    run = RECORD["runs"][name]
    edits = [EditRequest(p, new, old) for p, new, old in RECORD["edits"]]
    result = make_editor(run["method"], **RECORD["config"], **run["overrides"]).edit(
        make_model(len(tokenizer)), Formatter(tokenizer), edits, progress=False)
    lora = [p.detach().double() for n, p in result.model.named_parameters() if "lora_" in n]
    assert math.isclose(float(sum(p.abs().sum() for p in lora)), run["param_abs"], rel_tol=1e-6)
    assert math.isclose(float(sum(p.sum() for p in lora)), run["param_sum"], rel_tol=1e-4, abs_tol=1e-3)
    assert len(result.curves) == len(run["curves"])
    for got, want in zip(result.curves, run["curves"]):
        for key, value in want.items():
            assert math.isclose(got[key], value, rel_tol=1e-5, abs_tol=1e-6), (key, got[key], value)
    assert torch.is_grad_enabled()

"""The editor protocol every editing method implements, and what an edit returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from corsa.prompts import Formatter
from corsa.requests import EditRequest

# What an in-context method writes instead of an adapter (MethodSpec.output == "context").
CONTEXT_FILE = "context.json"


@dataclass
class EditResult:
    model: torch.nn.Module  # the edited model (a PEFT model for adapter methods)
    requests: list[EditRequest]  # as trained on, with mined old answers filled in
    curves: list[dict[str, float]] = field(default_factory=list)  # one row per optimizer step
    info: dict[str, Any] = field(default_factory=dict)  # timings and anything else worth recording
    # How to ask the edited model, when it differs from how the base model is asked (in-context methods).
    formatter: Formatter | None = None


class Editor(Protocol):
    """A method: built from its typed config, applied to a model and a list of edit requests."""

    name: str
    config: Any

    def edit(self, model: torch.nn.Module, formatter: Formatter, requests: list[EditRequest], *,
             progress: bool = True) -> EditResult: ...

"""What the speed scripts of bench/ share: the real default model and the 16 CounterFact val edits they time on."""

from __future__ import annotations

from typing import Any

import torch

from corsa import models
from corsa.prompts import Formatter
from corsa.requests import EditRequest, load_benchmark


def model_and_edits(data: str, threads: int = 2, model: str | None = None, n: int = 16
                    ) -> tuple[torch.nn.Module, Any, Formatter, list[EditRequest]]:
    """(model, tokenizer, formatter, the first n CounterFact val edits), with torch on `threads` threads."""
    torch.set_num_threads(threads)
    lm, tok, _ = models.load_model(model)
    return lm, tok, Formatter(tok), load_benchmark("counterfact", data, "val")[:n]

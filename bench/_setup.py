"""What the speed scripts of bench/ share: the real default model and the 16 CounterFact val edits they time on."""

from __future__ import annotations

import sys
from typing import Any

import torch

from corsa import models, scoring
from corsa.prompts import Formatter
from corsa.requests import EditRequest, load_benchmark


def model_and_edits(data: str, threads: int = 2, model: str | None = None, n: int = 16
                    ) -> tuple[torch.nn.Module, Any, Formatter, list[EditRequest]]:
    """(model, tokenizer, formatter, the first n CounterFact val edits), with torch on `threads` threads."""
    torch.set_num_threads(threads)
    lm, tok, _ = models.load_model(model)
    return lm, tok, Formatter(tok), load_benchmark("counterfact", data, "val")[:n]


def require_fast_bf16(script: str) -> None:
    """Exit where bf16 is not fast: corsa would run the bf16 parts in fp32 there, and the script compare fp32
    with itself under a bf16 label."""
    if not scoring.use_bf16("cpu", True):
        print(f"{script}: this CPU has no fast bf16, so corsa runs --bf16 in fp32 here and there is nothing to "
              "measure", file=sys.stderr)
        raise SystemExit(2)

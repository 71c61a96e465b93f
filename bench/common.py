"""What the speed scripts of bench/ share: the real default model and the 16 CounterFact val edits they time on."""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
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


def step_from_start(trainer: Any, idx: list[int]) -> Callable[[], None]:
    """One optimizer step of `trainer` on edits `idx`, from the adapter it holds now, every time it is called."""
    start = [p.detach().clone() for p in trainer.params]

    def call() -> None:
        with torch.no_grad():
            for p, s in zip(trainer.params, start):
                p.copy_(s)
        trainer.model.train()
        trainer.step(idx)
        trainer.model.eval()
    return call


def interleaved(parts: dict[str, Callable[[], object]], modes: Sequence[str],
                setting: Callable[[str], contextlib.AbstractContextManager], reps: int) -> dict[str, dict[str, float]]:
    """Median seconds of each part under each mode, {part: {mode: s}}. The modes take turns, in an order that
    rotates every repetition, so that the machine's drift hits all alike; each mode's setting is entered before
    the clock starts (as it is once per training run), and each part runs once per mode first as a warm-up."""
    seconds: dict[str, dict[str, float]] = {}
    for name, fn in parts.items():
        times: dict[str, list[float]] = {m: [] for m in modes}
        for mode in modes:
            with setting(mode):
                fn()
        for rep in range(reps):
            k = rep % len(modes)
            for mode in list(modes[k:]) + list(modes[:k]):
                with setting(mode):
                    t = time.perf_counter()
                    fn()
                    times[mode].append(time.perf_counter() - t)
        seconds[name] = {m: statistics.median(v) for m, v in times.items()}
    return seconds


def interleaved_args() -> argparse.Namespace:
    """The options of the scripts that time ways of computing in turns: --data, --reps, --threads, --out."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    return ap.parse_args()

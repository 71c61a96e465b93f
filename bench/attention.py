"""Measure two exact CPU levers of the shared batch on the real default model, fp32, interleaved in one process.

    python bench/attention.py --data ../shared/benchmarks [--reps 7] [--threads 2] [--out results/attention.json]

Both change only how the same numbers are computed (tests/test_trainer.py compares them with transformers' way):
  rows      each answer row's copy of its prompt's cached keys and values is gathered with `index_select`
            (`scoring.select_cache_rows`) instead of the cache's own advanced indexing, whose backward is an
            accumulating index_put
  grouped   attention with the query heads that share a key/value head folded into the query axis
            (`scoring.sdpa_grouped`) instead of transformers repeating the keys and values for every query head
On one batch of 16 CounterFact val edits it times three ways, "before" (neither), "rows" (the first) and "corsa"
(both), on a no-grad forward over y+ and y-, a CoRSA optimizer step (two SAM points) and a LoRA-SFT step, each
step from the same adapter every time. The ways take turns (bench/common.py, `interleaved`); medians over --reps
repetitions after a warm-up of each.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from unittest import mock

import torch

# bench/common.py (scripts run as python bench/NAME.py)
from common import interleaved, interleaved_args, model_and_edits, step_from_start

from corsa import artifacts, scoring
from corsa.methods.corsa import CorsaConfig, CorsaTrainer, build_trainer, pair_batch

MODES = ("before", "rows", "corsa")


def main() -> None:
    args = interleaved_args()
    model, _, fmt, reqs = model_and_edits(args.data, args.threads)
    idx = list(range(len(reqs)))
    cfg = CorsaConfig(rho=0.5, lr=2e-3)
    corsa = build_trainer(model, fmt, reqs, cfg)
    model = corsa.model
    lora = CorsaTrainer(model, corsa.pairs, CorsaConfig(lr=2e-3, use_dpo=False, use_sam=False, pcgrad=None),
                        fmt.pad_id)
    batch = pair_batch(corsa.pairs, idx, cfg.use_dpo, fmt.pad_id).batch

    def forward() -> None:
        with torch.no_grad():
            scoring.token_logprobs(model, batch)

    def levers(mode: str) -> contextlib.AbstractContextManager:
        if mode == "before":
            return mock.patch.object(scoring, "select_cache_rows", lambda cache, index: cache.batch_select_indices(index))
        if mode == "rows":
            return contextlib.nullcontext()
        return scoring.cpu_attention(model)

    parts: dict[str, Callable[[], object]] = {
        "forward": forward, "corsa_step": step_from_start(corsa, idx), "lora_step": step_from_start(lora, idx)}
    seconds = interleaved(parts, MODES, levers, args.reps)
    ratio = {m: seconds["corsa_step"][m] / seconds["lora_step"][m] for m in MODES}
    print("| part (16 edits, fp32) | before (s) | + cache rows by index_select (s) | + grouped heads folded: corsa (s) "
          "| corsa vs before |\n|---|---|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {s['before']:.3f} | {s['rows']:.3f} | {s['corsa']:.3f} | {s['corsa'] / s['before']:.2f}x |")
    print(f"| CoRSA step / LoRA step | {ratio['before']:.2f}x | {ratio['rows']:.2f}x | {ratio['corsa']:.2f}x | |")
    if args.out:
        artifacts.write_json(args.out, {"seconds": seconds, "ratio_corsa_over_lora": ratio, "reps": args.reps,
                                        "threads": args.threads, "versions": artifacts.library_versions()})


if __name__ == "__main__":
    main()

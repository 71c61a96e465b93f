"""Measure corsa's two bf16 levers on the real default model, interleaved in one process.

    python bench/bf16.py --data ../shared/benchmarks [--reps 7] [--threads 2] [--out results/bf16.json]

With --bf16, corsa runs training and scoring inside `scoring.compute_context`, which adds two things to plain bf16
autocast: the frozen linear weights held in bf16 for the duration (autocast would cast them again in every
forward pass; bitwise the same numbers, tests/test_trainer.py), and on a CPU attention computed in fp32 (the CPU
flash-attention backward is slow in bf16; corsa's attention function also folds grouped-query heads, which
bench/attention.py measures alone). On one batch of 16 CounterFact val edits this times three ways,
"autocast" (neither lever), "cast once" (the first) and "corsa" (both):
  forward      a no-grad forward over y+ and y- (the shared batch)
  corsa_step   a CoRSA optimizer step (two SAM points), from the same adapter every time
  lora_step    a LoRA-SFT optimizer step, likewise
  generate     greedy answers to the 16 prompts, 8 new tokens
The ways take turns, in an order that rotates every repetition, so that the machine's drift hits all alike; the
levers are set up before the clock starts, as they are once per training run. Medians over --reps repetitions
after a warm-up of each.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

# bench/common.py (scripts run as python bench/NAME.py)
from common import interleaved, interleaved_args, model_and_edits, require_fast_bf16, step_from_start

from corsa import artifacts, scoring
from corsa.methods.corsa import CorsaConfig, CorsaTrainer, build_trainer, pair_batch

MODES = ("autocast", "cast once", "corsa")


def main() -> None:
    args = interleaved_args()
    require_fast_bf16("bench/bf16.py")
    model, _, fmt, reqs = model_and_edits(args.data, args.threads)
    idx = list(range(len(reqs)))
    cfg = CorsaConfig(rho=0.5, lr=2e-3, bf16=True)
    corsa = build_trainer(model, fmt, reqs, cfg)
    model = corsa.model
    lora = CorsaTrainer(model, corsa.pairs, CorsaConfig(lr=2e-3, bf16=True, use_dpo=False, use_sam=False, pcgrad=None),
                        fmt.pad_id)
    batch = pair_batch(corsa.pairs, idx, cfg.use_dpo, fmt.pad_id).batch

    def forward() -> None:
        with torch.no_grad(), scoring.autocast_context("cpu", True):
            scoring.token_logprobs(model, batch)

    def levers(mode: str) -> contextlib.AbstractContextManager:
        if mode == "autocast":
            return contextlib.nullcontext()
        if mode == "cast once":
            return scoring.frozen_linears_in_bf16(model)
        return scoring.compute_context(model, bf16=True)

    parts: dict[str, Callable[[], object]] = {
        "forward": forward, "corsa_step": step_from_start(corsa, idx), "lora_step": step_from_start(lora, idx),
        "generate": lambda: scoring.generate(model, fmt, [r.prompt for r in reqs], max_new_tokens=8, autocast=True)}
    seconds = interleaved(parts, MODES, levers, args.reps)
    ratio = {m: seconds["corsa_step"][m] / seconds["lora_step"][m] for m in MODES}
    print("| part | autocast (s) | + frozen linears cast once (s) | + attention in fp32: corsa (s) "
          "| corsa vs autocast |"
          "\n|---|---|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {s['autocast']:.3f} | {s['cast once']:.3f} | {s['corsa']:.3f} | "
              f"{s['corsa'] / s['autocast']:.2f}x |")
    print(f"| CoRSA step / LoRA step | {ratio['autocast']:.2f}x | {ratio['cast once']:.2f}x "
          f"| {ratio['corsa']:.2f}x | |")
    if args.out:
        artifacts.write_json(args.out, {"seconds": seconds, "ratio_corsa_over_lora": ratio, "reps": args.reps,
                                        "threads": args.threads})


if __name__ == "__main__":
    main()

"""How corsa's bf16 path changes scores, against plain bf16 autocast and against fp32, on a real model.

    python bench/bf16_precision.py MODEL     (MODEL: smollm2-135m or gemma-3-270m; run from the repository root,
                                               with the benchmarks in ../shared/benchmarks)

Teacher-forced log-probs of y+ and y- for 16 CounterFact val edits, four ways: fp32; fp32 with the attention
function swapped for corsa's fp32 one (must be bitwise the same: the masks are built as for SDPA, including
sliding windows); bf16 through corsa's path (`scoring.compute_context`: attention in fp32 on a CPU, frozen weights
cast once); and plain bf16 autocast. Prints the largest differences between them.
"""

from __future__ import annotations

import contextlib
import sys

from common import model_and_edits, require_fast_bf16  # bench/common.py (scripts run as python bench/NAME.py)

from corsa import scoring


def main() -> None:
    require_fast_bf16("bench/bf16_precision.py")
    model, _, fmt, reqs = model_and_edits("../shared/benchmarks", model=sys.argv[1] if len(sys.argv) > 1 else None)
    pairs = [(r.prompt, r.target_new) for r in reqs] + [(r.prompt, r.target_old) for r in reqs]
    fp32 = scoring.score_answers(model, fmt, pairs)
    with scoring.cpu_attention(model, fp32=True):
        swapped = scoring.score_answers(model, fmt, pairs)
    corsa_bf16 = scoring.score_answers(model, fmt, pairs, autocast=True)
    real = scoring.compute_context
    scoring.compute_context = lambda m, bf16=False: contextlib.nullcontext()  # plain autocast
    try:
        plain_bf16 = scoring.score_answers(model, fmt, pairs, autocast=True)
    finally:
        scoring.compute_context = real

    def gap(a: list[scoring.AnswerScore], b: list[scoring.AnswerScore]) -> float:
        return max(abs(x.logprob - y.logprob) for x, y in zip(a, b))

    print(f"fp32 with corsa's attention function, bitwise equal to fp32: {swapped == fp32}")
    print(f"largest |log-prob difference| over {len(pairs)} answers: corsa's bf16 vs fp32 "
          f"{gap(corsa_bf16, fp32):.4f}, plain bf16 vs fp32 {gap(plain_bf16, fp32):.4f}, "
          f"corsa's bf16 vs plain bf16 {gap(corsa_bf16, plain_bf16):.4f}")


if __name__ == "__main__":
    main()

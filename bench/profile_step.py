"""Where a CoRSA step's time goes: torch.profiler over one optimizer step on the real default model.

    python bench/profile_step.py bf16|fp32 [--shapes]   (from the repository root, benchmarks in ../shared/benchmarks)

One batch of 16 CounterFact val edits, ρ 0.5, lr 2e-3. Prints the median time of a step on 16 and on 8 edits
(3 repetitions after a warm-up), then the profiler's table of the 25 operators with the most self CPU time for one
16-edit step (with --shapes, the 40 operator-and-input-shape pairs with the most self CPU time). It calls
`CorsaTrainer.step` directly, outside `scoring.compute_context`, so it profiles transformers' own attention (keys
and values repeated for every query head) and, with `bf16`, plain bf16 autocast: the paths corsa took before
those levers.
"""

from __future__ import annotations

import sys

from common import model_and_edits, require_fast_bf16  # bench/common.py (scripts run as python bench/NAME.py)
from torch.profiler import ProfilerActivity, profile

from corsa.evaluate.speed import median_time
from corsa.methods.corsa import CorsaConfig, build_trainer


def main() -> None:
    if sys.argv[1] == "bf16":
        require_fast_bf16("bench/profile_step.py bf16")
    model, _, fmt, reqs = model_and_edits("../shared/benchmarks")
    cfg = CorsaConfig(rho=0.5, lr=2e-3, bf16=sys.argv[1] == "bf16")
    trainer = build_trainer(model, fmt, reqs, cfg)
    model = trainer.model
    model.train()
    for size in (16, 8):
        idx = list(range(size))
        seconds = median_time(lambda idx=idx: trainer.step(idx), 3)
        print(f"step on {size} edits: {seconds:.2f} s")
    shapes = "--shapes" in sys.argv[2:]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=shapes) as prof:
        trainer.step(list(range(16)))
    print(prof.key_averages(group_by_input_shape=shapes).table(sort_by="self_cpu_time_total",
                                                                row_limit=40 if shapes else 25))


if __name__ == "__main__":
    main()

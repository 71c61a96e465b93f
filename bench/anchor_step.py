"""What anchors add to a CoRSA step: FLOPs and time of one optimizer step on the real default model.

    python bench/anchor_step.py --data ../shared/benchmarks [--reps 3] [--threads 2] [--out FILE.json]

One batch of the first 16 CounterFact val edits, ρ 0.5 and lr 2e-3 (as bench/profile_step.py), for five settings:
none, 2 anchors per edit on the SFT side (`corsa-anchors2`), 2 anchors plus 2 relation anchors as a third gradient
under PCGrad (`corsa-anchors2+anchorsidepcgrad+relanchors2`), the `edit` preset's anchors (KL, 2 + 2 relation
anchors, SFT side), and the same with the anchors' gradient at the first SAM point only (`anchor_points="first"`).
FLOPs are counted by torch's FlopCounterMode over one step (exact, and the same on a busy machine); seconds are the
median of --reps steps, each from the same adapter. Run it under another checkout's code (PYTHONPATH=OTHER/src) to
compare two versions of the step on the same edits.
"""

from __future__ import annotations

import json
from pathlib import Path

from common import interleaved_args, model_and_edits, step_from_start  # bench/common.py
from torch.utils.flop_counter import FlopCounterMode

import corsa
from corsa.evaluate.speed import median_time
from corsa.methods.corsa import CorsaConfig, build_trainer

SETTINGS = {
    "no anchors": {},
    "anchors2 (SFT side)": {"anchors_per_edit": 2},
    "anchors2 + relanchors2 (third gradient)": {"anchors_per_edit": 2, "relation_anchors": 2,
                                                "anchor_side": "pcgrad"},
    # the default model's `edit` preset since edd3173, and the same with the anchors at the first SAM point only
    "edit preset (kl, anchors2 + relanchors2)": {"anchors_per_edit": 2, "relation_anchors": 2, "anchor_loss": "kl"},
    "edit preset, anchors at the first point": {"anchors_per_edit": 2, "relation_anchors": 2, "anchor_loss": "kl",
                                                "anchor_points": "first"},
}


def main() -> None:
    args = interleaved_args()
    model, _, fmt, reqs = model_and_edits(args.data, args.threads)
    idx = list(range(len(reqs)))
    rows = {}
    for name, overrides in SETTINGS.items():
        trainer = build_trainer(model, fmt, reqs, CorsaConfig(rho=0.5, lr=2e-3, **overrides))
        step = step_from_start(trainer, idx)
        with FlopCounterMode(display=False) as counter:
            step()
        seconds = median_time(step, args.reps, warmup=False)  # the counted step above was the warm-up
        rows[name] = {"gflops": counter.get_total_flops() / 1e9, "seconds": seconds,
                      "anchors": sum(len(p.anchors) for p in trainer.pairs)}
        print(f"{name}: {rows[name]['anchors']} anchors, {rows[name]['gflops']:.0f} GFLOP, "
              f"{rows[name]['seconds']:.2f} s per step", flush=True)
        model = trainer.model.unload()  # the bare model again for the next setting's adapter
    if args.out:
        Path(args.out).write_text(json.dumps({"code": corsa.__file__, "edits": len(reqs), "threads": args.threads,
                                              "reps": args.reps, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

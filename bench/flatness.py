"""How flat is a trained adapter? The edits' margins and loss when the LoRA weights are moved a little.

Paper section 2.2 ties an update's stability to two numbers: the margin m = log p(y+|x) - log p(y-|x) the adapter
reached (gamma) and the curvature around it (kappa); SAM is there to lower the curvature. This script measures
both on adapters that `corsa bench single` trained, so that runs can be compared on the property CoRSA is meant
to improve, not only on its end metrics:

* margin: the median m over the edit prompts, and the share of paraphrases where m > 0;
* fallback: move the adapter by a random direction of norm r (every LoRA matrix, Gaussian, seeded) and count the
  edits whose margin was positive and is no longer (the paper's "future update Delta" of unknown direction);
* sharpness: the SFT loss (mean token NLL of y+) after a step of norm r up its own gradient (SAM's inner
  maximisation to first order) minus the loss at the adapter.

    python bench/flatness.py results/val64 results/val64-lr2e-3 --radii 0.5,1,2 --directions 3 --bf16 \
        --threads 2 --out results/flatness.json

Each run folder's base/results.json names its benchmark, split, cases and model; every method folder with an
adapter is measured, in the order the methods were run. Writes JSON and a Markdown table beside it (same name, .md), atomically.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from corsa import artifacts
from corsa.editing import set_threads
from corsa.evaluate.runner import load_results
from corsa.loading import load_edited
from corsa.methods.corsa import build_trainer
from corsa.methods.lora import lora_config
from corsa.optim import sam
from corsa.requests import EditRequest, load_benchmark_with_report
from corsa.scoring import score_answers


def margins(model: torch.nn.Module, formatter: Any, requests: list[EditRequest], prompts: list[str],
            bf16: bool) -> tuple[list[float], float]:
    """m for each (prompt, its request) pair, and the SFT loss (mean NLL per y+ token) over them."""
    pairs = [(p, r.target_new) for p, r in zip(prompts, requests)]
    pairs += [(p, r.target_old) for p, r in zip(prompts, requests)]
    scores = score_answers(model, formatter, pairs, autocast=bf16)
    new, old = scores[: len(prompts)], scores[len(prompts):]
    loss = -sum(s.logprob for s in new) / sum(s.n_tokens for s in new)
    return [n.logprob - o.logprob for n, o in zip(new, old)], loss


def lora_params(model: torch.nn.Module) -> list[torch.Tensor]:
    params = [p for name, p in model.named_parameters() if "lora_" in name]
    for p in params:
        p.requires_grad_(True)
    return params


def measure(model: torch.nn.Module, formatter: Any, requests: list[EditRequest], radii: list[float],
            directions: int, bf16: bool) -> dict[str, Any]:
    params = lora_params(model)
    prompts = [r.prompt for r in requests]
    m0, loss0 = margins(model, formatter, requests, prompts, bf16)
    para = [(r.paraphrases[0], r) for r in requests if r.paraphrases]
    mp, _ = margins(model, formatter, [r for _, r in para], [p for p, _ in para], bf16)
    held = [i for i, m in enumerate(m0) if m > 0]
    out: dict[str, Any] = {
        "adapter_norm": float(torch.sqrt(sum((p.detach().float() ** 2).sum() for p in params))),
        "lora_b_norm": float(torch.sqrt(sum((p.detach().float() ** 2).sum() for name, p in model.named_parameters()
                                            if "lora_B" in name))),
        "margin_median": statistics.median(m0), "margin_positive": len(held) / len(m0),
        "paraphrase_margin_positive": sum(m > 0 for m in mp) / len(mp) if mp else None,
        "sft_loss": loss0, "fallback": {}, "random_loss": {}, "sharpness": {},
    }
    # The SFT gradient at the adapter, through the trainer's own batching (one forward + one backward per batch).
    trainer = build_trainer(model, formatter, requests, lora_config(bf16=bf16))
    trainer.params = params  # the loaded adapter's weights, which PEFT loads as not trainable
    grad = trainer.gradients(list(range(len(requests)))).total
    assert grad is not None
    gen = torch.Generator().manual_seed(0)
    for r in radii:
        lost, losses = 0, []
        for _ in range(directions):
            direction = [torch.randn(p.shape, generator=gen).to(p) for p in params]
            saved = sam.perturb(params, direction, r)
            m, loss = margins(model, formatter, requests, prompts, bf16)
            sam.restore(params, saved)
            lost += sum(m[i] <= 0 for i in held)
            losses.append(loss)
        out["fallback"][str(r)] = lost / (directions * len(held)) if held else None
        out["random_loss"][str(r)] = statistics.mean(losses)
        saved = sam.perturb(params, grad, r)
        _, loss = margins(model, formatter, requests, prompts, bf16)
        sam.restore(params, saved)
        out["sharpness"][str(r)] = loss - loss0
    return out


def run_folder(folder: Path, radii: list[float], directions: int, bf16: bool,
               methods: set[str] | None = None) -> list[dict[str, Any]]:
    base, *records = load_results(folder)
    requests, _ = load_benchmark_with_report(base["bench"], base["data"], base["split"])
    by_id = {r.id: r for r in requests}
    chosen = [by_id[i] for i in base["case_ids"]]
    chosen = [r for r in chosen if r.target_old]  # a margin needs an old answer
    rows = []
    for record in records:
        adapter = folder / record["method"] / "adapter"
        if not (adapter / "adapter_config.json").exists():
            continue
        if methods and record["method"] not in methods:
            continue
        t = time.perf_counter()
        model, formatter = load_edited(adapter, route=False)  # the adapter's own weights are measured
        row = {"run": str(folder), "method": record["method"], "lr": record["config"].get("lr"),
               "rho": record["config"].get("rho") if record["config"].get("use_sam") else None,
               "seed": record["config"].get("seed"), "n": len(chosen),
               "gen.generality": record["summary"].get("gen.generality"),
               **measure(model, formatter, chosen, radii, directions, bf16)}
        row["seconds"] = time.perf_counter() - t
        print(f"{folder.name}/{record['method']}: margin {row['margin_median']:.2f}, fallback "
              f"{row['fallback']}, sharpness {row['sharpness']} ({row['seconds']:.0f} s)", file=sys.stderr)
        rows.append(row)
        del model
    return rows


def table(rows: list[dict[str, Any]], radii: list[float], command: str) -> str:
    r_cols = [str(r) for r in radii]
    head = (["run", "method", "lr", "rho", "seed", "gen.generality", "||phi||", "||B||", "median margin",
             "paraphrase m > 0"] + [f"fallback r={r}" for r in r_cols] + [f"sharpness r={r}" for r in r_cols])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in rows:
        pct = (lambda v: "-" if v is None else f"{100 * v:.1f}")
        cells = [Path(row["run"]).name, row["method"], f"{row['lr']:g}", "-" if row["rho"] is None else f"{row['rho']:g}",
                 str(row["seed"]), pct(row["gen.generality"]), f"{row['adapter_norm']:.1f}", f"{row['lora_b_norm']:.2f}",
                 f"{row['margin_median']:.2f}", pct(row["paraphrase_margin_positive"])]
        cells += [pct(row["fallback"][r]) for r in r_cols] + [f"{row['sharpness'][r]:.3f}" for r in r_cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nValues in % except norms, margins (nats) and sharpness (nats per token). Command: `{command}`\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders written by corsa bench single")
    ap.add_argument("--radii", default="0.5,1,2", help="comma-separated perturbation norms")
    ap.add_argument("--directions", type=int, default=3, help="random directions per radius")
    ap.add_argument("--methods", help="comma-separated rows to measure (default: every adapter in each folder)")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", required=True, help="JSON file; the table goes beside it as .md")
    args = ap.parse_args()
    set_threads(args.threads)
    radii = [float(r) for r in args.radii.split(",")]
    methods = set(args.methods.split(",")) if args.methods else None
    rows = [row for folder in args.runs
            for row in run_folder(Path(folder), radii, args.directions, args.bf16, methods)]
    command = "python " + " ".join(sys.argv)
    artifacts.write_json(args.out, {"command": command, "date": artifacts.now(), "radii": radii,
                                    "directions": args.directions, "rows": rows})
    artifacts.write_text(Path(args.out).with_suffix(".md"), table(rows, radii, command))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")


if __name__ == "__main__":
    main()

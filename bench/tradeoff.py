"""Locality against generality, one point per benchmark row: the trade-off plot of each lever (issue 29).

    python bench/tradeoff.py RUN_DIR [RUN_DIR ...] --out docs/tradeoff-levers.png [--title TEXT]
    python bench/tradeoff.py --routing-keys results/routing-keys.json --out docs/tradeoff-routing.png

With run folders (`corsa bench single`): every row but the unedited model's is a point, generality (paraphrases
answered with the new target) against neighbours answered exactly as before (left) and neighbours given an edit's
new target (right); a row's training seeds are averaged (their spread is in the run's table). With the JSON of
bench/routing_keys.py: per routing signal, at its best layer, paraphrases routed to their own edit against
neighbours kept, over every threshold (no training: what routing alone can separate).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

from corsa.evaluate import plots
from corsa.evaluate.runner import load_results
from corsa.evaluate.stats import base_name


def levers(runs: list[str], out: Path, title: str) -> None:
    fig, _ = plots.axes(12, 5)
    fig.clf()  # two panels side by side
    left, right = fig.subplots(1, 2)
    for run in runs:
        rows: dict[str, list[dict]] = {}
        for r in load_results(run):
            if r["method"] != "base":
                rows.setdefault(base_name(r["method"]), []).append(r["summary"])
        for name, summaries in rows.items():
            gen = 100 * mean(s["gen.generality"] for s in summaries)
            agree = 100 * mean(s["gen.locality_agreement"] for s in summaries)
            bleed = 100 * mean(s["gen.neighbor_edit_target"] for s in summaries)
            label = f"{name} ({Path(run).name})" if len(runs) > 1 else name
            left.scatter(agree, gen)
            left.annotate(label, (agree, gen), fontsize=7)
            right.scatter(bleed, gen)
            right.annotate(label, (bleed, gen), fontsize=7)
    left.set_xlabel("neighbours answered as before (%)")
    right.set_xlabel("neighbours given an edit's new target (%)")
    for ax in (left, right):
        ax.set_ylabel("paraphrases answered with the new target (%)")
        ax.set_xlim(-5, 105)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    plots.save(fig, out)


def routing_curve(path: str, out: Path) -> None:
    data = json.loads(Path(path).read_text())
    fig, ax = plots.axes(7, 5)
    best: dict[str, dict] = {}
    for row in data["rows"]:
        kind = row["signal"].split(" ")[0]
        if kind not in best or row["auc"] > best[kind]["auc"]:
            best[kind] = row
    for kind, row in best.items():
        curve = row["curve"]
        ax.plot([100 * k for _, _, k in curve], [100 * p for _, p, _ in curve], label=f"{row['signal']} "
                f"(AUC {row['auc']:.2f})")
        if "shipped_threshold" in row:
            ax.scatter([100 * row["neighbours_kept"]], [100 * row["paraphrases_routed"]], marker="*", s=120,
                       label=f"corsa's setting (threshold {row['shipped_threshold']})", zorder=3)
    ax.set_xlabel("neighbourhood prompts sent to no adapter (%)")
    ax.set_ylabel("paraphrases sent to their own edit (%)")
    ax.set_xlim(-5, 105)
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"Routing signals, CounterFact val ({data['n_edits']} edits, seed {data['seed']}, no training)",
                 fontsize=9)
    plots.save(fig, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*")
    p.add_argument("--routing-keys")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="")
    args = p.parse_args()
    if args.routing_keys:
        routing_curve(args.routing_keys, Path(args.out))
    else:
        levers(args.runs, Path(args.out), args.title)


if __name__ == "__main__":
    main()

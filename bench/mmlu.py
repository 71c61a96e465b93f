"""MMLU of a run's base model and trained adapters again, on more questions than the run used, paired.

`corsa bench single` scores MMLU on the subset `--mmlu-n` asks for, which a long comparison keeps small for time
(3 per subject = 171 questions; one question = 0.6 points). Specificity claims need more, and a difference
from the base model needs the same questions for both: this script loads each adapter a run folder holds, scores
a larger seeded subset (the runner's MMLU code, 5-shot, letter logits), and reports each edited model's accuracy
minus the base model's with a 95 % paired bootstrap interval over the questions, and the mean log-probability of
the right letter (which shows damage that accuracy near chance hides).

    python bench/mmlu.py results/edit200-lr2e-3 --mmlu-n 10 --threads 2 --out results/edit200-lr2e-3-mmlu10.json

Writes JSON (per-question results included) and a Markdown table beside it (same name, .md), atomically.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from corsa import artifacts, models
from corsa.editing import set_threads
from corsa.evaluate.mmlu import MMLUConfig, evaluate_mmlu
from corsa.evaluate.runner import load_results
from corsa.evaluate.stats import mmlu_line
from corsa.loading import load_edited


def score_run(folder: Path, data: str | None, n_per_subject: int | None,
              methods: set[str] | None) -> list[dict[str, Any]]:
    results = load_results(folder)  # base first
    base = results[0]
    data = data or base["data"]
    config = MMLUConfig(n_per_subject=n_per_subject, seed=base["seed"])
    rows = []
    for record in results:
        adapter = folder / record["method"] / "adapter"
        if methods and record["method"] not in methods | {"base"}:
            continue
        t = time.perf_counter()
        if record["method"] == "base":
            model, tokenizer, _ = models.load_model(base["model"])
        elif (adapter / "adapter_config.json").exists():
            model, formatter = load_edited(adapter, route=False)  # MMLU of the adapter itself, as the run measured it
            tokenizer = formatter.tokenizer
        else:  # a method that leaves no adapter (prepend) or changed the weights in place: not rescored here
            continue
        result = evaluate_mmlu(model, tokenizer, data, config)
        rows.append({"run": str(folder), "method": record["method"], "seconds": time.perf_counter() - t,
                     "mmlu": result})
        print(f"{folder.name}/{record['method']}: MMLU {100 * result['accuracy']:.1f} on {result['n']} questions, "
              f"gold log-prob {result['gold_logprob']:.3f} ({rows[-1]['seconds']:.0f} s)", file=sys.stderr)
        del model
    return rows


def table(rows: list[dict[str, Any]], command: str) -> str:
    lines = ["| run | method | MMLU | questions | right letter, mean log-prob | seconds |", "|---" * 6 + "|"]
    for r in rows:
        m = r["mmlu"]
        lines.append(f"| {Path(r['run']).name} | {r['method']} | {100 * m['accuracy']:.1f} | {m['n']} | "
                     f"{m['gold_logprob']:.3f} | {r['seconds']:.0f} |")
    extra = [mmlu_line([r for r in rows if r["run"] == run]) for run in dict.fromkeys(r["run"] for r in rows)]
    return "\n".join(lines) + "\n\n" + "\n\n".join(e for e in extra if e) + f"\n\nCommand: `{command}`\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders written by corsa bench single")
    ap.add_argument("--mmlu-n", default="10", help="questions per subject, or 'all' (14,042)")
    ap.add_argument("--methods", help="comma-separated rows to score besides base (default: every adapter)")
    ap.add_argument("--data", help="benchmarks folder (default: the one each run used)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", required=True, help="JSON file; the table goes beside it as .md")
    args = ap.parse_args()
    set_threads(args.threads)
    n = None if args.mmlu_n == "all" else int(args.mmlu_n)
    methods = set(args.methods.split(",")) if args.methods else None
    rows = [row for folder in args.runs for row in score_run(Path(folder), args.data, n, methods)]
    command = "python " + " ".join(sys.argv)
    artifacts.write_json(args.out, {"command": command, "date": artifacts.now(), "mmlu_n_per_subject": n,
                                    "rows": rows})
    artifacts.write_text(Path(args.out).with_suffix(".md"), table(rows, command))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")


if __name__ == "__main__":
    main()

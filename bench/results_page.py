"""docs/RESULTS.md's tables, generated from the result summaries committed in docs/results/.

    python bench/results_page.py summarize results/headline-s0 --out docs/results/headline-s0.json \\
        --commit 1ad3cb9 --log docs/log/2026-12-04-headline-rule.md
    python bench/results_page.py summarize docs/results/val/RUN.json results/RUN-seeds12 \\
        --out docs/results/val/RUN.json
    python bench/results_page.py render
    python bench/results_page.py compare docs/results/val/RUN-sub0.json results/RUN-sub1 --a lora-routed \
        --b corsa-anchors2-routed
    python bench/results_page.py compare results/RULE-old --a corsa-routed --b corsa-routed --b-from results/RULE-new

`summarize` writes a run folder's summary (corsa.evaluate.summary: rates, per-case totals, commands; no answers,
no adapters); given several run folders or summaries of the same cases, each with other training seeds, it merges
them into one (a study goes on after its first folder is gone). `render` reads every docs/results/*.json, refuses
any whose schema it does not know, and rewrites only the part of docs/RESULTS.md between the generated markers, so
a rerun updates the tables and leaves the hand-written text alone. Summaries of one benchmark, split, model, case count and case seed that differ by --subset form one
study: one table, its rows pooled over training seeds, and CoRSA minus LoRA pooled over seeds and subsets.
`compare` prints one setting minus another, pooled over the given summaries or run folders (disjoint subsets) and
their training seeds, with each seed's rates: how a rule in docs/log/ is read. With `--b-from`, setting b is read from
other runs of the same cases (one per input), so one setting run by two versions of the code pairs case by case.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from statistics import mean
from typing import Any

from corsa import artifacts
from corsa.errors import InputError
from corsa.evaluate.stats import COMPARED, base_name, reference
from corsa.evaluate.summary import (
    merge,
    pooled_difference,
    read_summary,
    row_seed,
    rows_by_seed,
    save_summary,
    side_by_side,
    summarize,
)

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- generated: begin -->", "<!-- generated: end -->"
STUDY_KEY = ("bench", "split", "model", "n", "seed")
# Rates shown beside the compared ones when a run has them (not pooled per case: only their aggregates are kept).
# Neighbours given an edit's new target: summaries of runs made before the metric existed lack it, so "-".
EXTRA = ("gen.neighbor_edit_target", "gen.multihop", "mmlu")


def load(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    return [(path, read_summary(path)) for path in sorted(folder.glob("*.json"))]


def studies(found: Sequence[tuple[Path, dict[str, Any]]]) -> list[list[tuple[Path, dict[str, Any]]]]:
    """Summaries grouped by STUDY_KEY, each group sorted by subset; two summaries of the same cases in one group
    are refused, since pooling them would count each case twice."""
    groups: dict[tuple[str, ...], list[tuple[Path, dict[str, Any]]]] = {}
    for path, s in found:
        groups.setdefault(tuple(str(s.get(k)) for k in STUDY_KEY), []).append((path, s))
    for members in groups.values():
        members.sort(key=lambda m: (m[1].get("subset") is not None, m[1].get("subset") or 0))
        subsets = [s.get("subset") for _, s in members]
        for i, k in enumerate(subsets):
            if k in subsets[:i]:
                same = [p.name for p, s in members if s.get("subset") == k]
                raise ValueError(f"{', '.join(same)} hold the same cases (subset {k}); put their methods in one run "
                                 "folder and summarise it once")
    return [groups[key] for key in sorted(groups)]


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def seed_rate(summaries: Sequence[dict[str, Any]], method: str, seed: int | None, metric: str) -> float | None:
    """One seed's rate of a setting, pooled over the subsets: from the per-case totals where they are kept (as the
    tables of a run pool prompts), else the mean of the subsets' aggregates (they have the same number of cases)."""
    rows = [r for s in summaries if (r := rows_by_seed(s, method).get(seed)) is not None]
    totals = [t for r in rows for t in (c.get(metric) for c in r["cases"].values()) if t is not None]
    if metric in COMPARED and totals:
        count = sum(t[1] for t in totals)
        return sum(t[0] for t in totals) / count if count else None
    values = [r["summary"].get(metric) for r in rows if r["summary"].get(metric) is not None]
    return mean(values) if values else None


def settings(rows: Sequence[dict[str, Any]]) -> str:
    """The settings a row's method trained with, as far as they tell settings apart (ρ only with SAM on, λ and β
    only with DPO on); several values where seeds or subsets disagree."""
    def one(config: dict[str, Any]) -> str:
        if not config:
            return "-"
        parts = [f"lr {config['lr']:g}"] if "lr" in config else []
        if config.get("use_sam") and "rho" in config:
            parts.append(f"ρ {config['rho']:g}")
        if config.get("use_dpo"):
            parts += [f"{sign} {config[key]:g}" for sign, key in (("λ", "lam"), ("β", "beta")) if key in config]
            if config.get("pcgrad"):
                parts.append(f"PCGrad {config['pcgrad']}")
        if "epochs" in config:
            parts.append(f"≤ {config['epochs']} epochs" if config.get("stop_when_learned", True)
                         else f"{config['epochs']} epochs")
        if config.get("learned_share", 1.0) != 1.0:
            parts.append(f"stop at {100 * config['learned_share']:g} % learned")
        if config.get("bf16"):
            parts.append("bf16")
        return ", ".join(parts) or "-"
    return " / ".join(dict.fromkeys(one(r.get("config") or {}) for r in rows))


def table(summaries: Sequence[dict[str, Any]]) -> list[str]:
    metrics = [m for m in dict.fromkeys((*COMPARED, *EXTRA))  # a metric in both lists is one column
               if any(r["summary"].get(m) is not None for s in summaries for r in s["rows"])]
    methods = list(dict.fromkeys(base_name(r["method"]) for s in summaries for r in s["rows"]))
    lines = ["| method | settings | training seeds | " + " | ".join(metrics) + " | steps | edit time (s) |",
             "|---" * (len(metrics) + 5) + "|"]
    for method in methods:
        rows = [r for s in summaries for r in s["rows"] if base_name(r["method"]) == method]
        seeds = sorted({row_seed(r) for r in rows}, key=lambda k: (k is None, k or 0))
        cells = []
        for m in metrics:
            values = [v for k in seeds if (v := seed_rate(summaries, method, k, m)) is not None]
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(pct(values[0]))
            else:
                cells.append(f"{pct(mean(values))} ({' / '.join(pct(v) for v in values)})")
        steps = [r["steps"] for r in rows if r.get("steps") is not None]
        edit_s = [r["edit_s"] for r in rows if r.get("edit_s") is not None]
        lines.append(f"| {method} | {settings(rows)} | {', '.join('-' if k is None else str(k) for k in seeds)} | "
                     + " | ".join(cells) + f" | {f'{mean(steps):.0f}' if steps else '-'} | "
                     f"{f'{mean(edit_s):.0f}' if edit_s else '-'} |")
    return lines


def differences(summaries: Sequence[dict[str, Any]]) -> list[str]:
    """CoRSA (every setting whose name starts with corsa) minus LoRA as evaluated alike (a routed row minus routed
    LoRA), per compared metric, pooled over seeds and subsets, then each subset alone."""
    methods = list(dict.fromkeys(base_name(r["method"]) for s in summaries for r in s["rows"]))
    lines = []
    for corsa in (m for m in methods if m.startswith("corsa")):
        lora = reference(corsa, "lora")
        if lora not in methods:
            continue
        for metric in COMPARED:
            try:
                d = pooled_difference(summaries, lora, corsa, metric)
            except ValueError as e:
                lines.append(f"- {corsa} minus {lora}, {metric}: not pooled ({e})")
                continue
            if d is None:
                continue
            line = (f"- {corsa} minus {lora}, {metric}, pooled over {len(d.seeds)} seeds and {len(d.subsets)} "
                    f"subsets: {100 * d.estimate:+.1f} ({100 * d.low:+.1f} to {100 * d.high:+.1f}), {d.cases} cases")
            if len(summaries) > 1:
                alone = [(s.get("subset"), pooled_difference([s], lora, corsa, metric)) for s in summaries]
                line += "; each subset: " + ", ".join(
                    f"{k} {100 * a.estimate:+.1f} ({100 * a.low:+.1f} to {100 * a.high:+.1f})"
                    for k, a in alone if a is not None)
            lines.append(line)
    if not lines:
        return []
    return [("CoRSA minus LoRA in points, 95 % percentile bootstrap over cases (2,000 resamples), each case "
            "carrying the summed outcomes of every training seed for both methods:"), "", *lines]


def link(target: str, page: Path) -> str:
    """A repository path as a link from the page's folder (summaries name paths from the repository root)."""
    path = Path(target)
    if not path.is_absolute():
        path = REPO / path
    try:
        return str(path.resolve().relative_to(page.parent.resolve()))
    except ValueError:
        return target


def study(members: Sequence[tuple[Path, dict[str, Any]]], page: Path) -> str:
    summaries = [s for _, s in members]
    first = summaries[0]
    subsets = [s.get("subset") for s in summaries]
    seeds = sorted({row_seed(r) for s in summaries for r in s["rows"] if r["method"] != "base"},
                   key=lambda k: (k is None, k or 0))
    if len(summaries) > 1:
        where = (f"{len(summaries)} disjoint subsets of {first['n']} cases (subsets {', '.join(map(str, subsets))} "
                 f"of the case seed {first['seed']}'s shuffle)")
    else:
        where = f"{first['n']} cases (case seed {first['seed']}" + (
            f", subset {subsets[0]})" if subsets[0] is not None else ")")
    out = [f"### {first['bench']} `{first['split']}`, {first['model']}, {where}", "", *table(summaries), "",
           (f"Values in %; a method's cell is the mean over its training seeds "
           f"({', '.join('-' if k is None else str(k) for k in seeds) or '-'}) with each seed's value in "
           "parentheses, each seed pooled over the subsets. Steps and edit time: mean per adapter.")]
    diff = differences(summaries)
    if diff:
        out += ["", *diff]
    out += ["", "Commands:", ""]
    out += [f"- `{c}`" for s in summaries for c in s.get("commands") or []] or ["- not recorded"]
    commits = list(dict.fromkeys(str(s.get("commit") or "not recorded") for s in summaries))
    dates = sorted(s["date"] for s in summaries if s.get("date"))
    logs = [link(g, page) for g in dict.fromkeys(s["log"] for s in summaries if s.get("log"))]
    out += ["", (f"Commit: {', '.join(commits)}. Last result written: {dates[-1] if dates else 'not recorded'}. "
            f"Summaries: {', '.join(f'[{p.name}]({link(str(p), page)})' for p, _ in members)}. "
            f"Log: {', '.join(f'[{g}]({g})' for g in logs) if logs else 'not named (summarize --log)'}.")]
    return "\n".join(out)


def render(found: Sequence[tuple[Path, dict[str, Any]]], page: Path) -> str:
    """The generated block (markers excluded)."""
    if not found:
        return "No result summaries in docs/results/ yet."
    return "\n\n".join(study(members, page) for members in studies(found))


def replace_block(text: str, block: str) -> str:
    """`text` with what lies between the markers replaced by `block`; everything outside is kept byte for byte."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"the page must hold {BEGIN} once, then {END} once")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def compare(summaries: Sequence[dict[str, Any]], a: str, b: str, metrics: Sequence[str] = COMPARED,
            seeds: Sequence[int] | None = None) -> list[str]:
    """`b` minus `a` on each metric in points, pooled over the summaries and every training seed both have (or
    `seeds` only), with its 95 % interval and each seed's rates (pooled over the summaries), one line per metric."""
    lines = []
    for metric in metrics:
        d = pooled_difference(summaries, a, b, metric, only_seeds=seeds)
        if d is None:
            lines.append(f"{metric}: no values")
            continue
        rates = {m: " / ".join(pct(seed_rate(summaries, m, s, metric)) for s in d.seeds) for m in (a, b)}
        lines.append(f"{metric}: {100 * d.estimate:+.1f} ({100 * d.low:+.1f} to {100 * d.high:+.1f}), {d.cases} cases, "
                     f"seeds {', '.join(map(str, d.seeds))}, subsets {', '.join(map(str, d.subsets))}; "
                     f"{a} {rates[a]}, {b} {rates[b]}")
    return lines


def summary_of(path: Path, commit: str | None = None) -> dict[str, Any]:
    """A committed summary file as it is, or a run folder summarised now (`commit`: the code it was run with)."""
    return read_summary(path) if path.is_file() else summarize(path, commit=commit)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("summarize", help="write a `corsa bench single` run folder's summary")
    p.add_argument("inputs", type=Path, nargs="+", help="a run folder; or several run folders or summaries (.json) "
                   "of the same cases with other training seeds each, merged into one summary")
    p.add_argument("--out", type=Path, required=True, help="the summary file, e.g. docs/results/NAME.json")
    p.add_argument("--commit", help="the commit the run was made with (records do not carry one)")
    p.add_argument("--log", help="the docs/log/ entry describing the run, from the repository root")
    p = sub.add_parser("compare", help="one setting minus another, pooled over subsets and training seeds")
    p.add_argument("inputs", type=Path, nargs="+", help="summaries (.json) or run folders, one per case subset")
    p.add_argument("--a", required=True, help="the setting subtracted, as its rows are named (lora-routed)")
    p.add_argument("--b", required=True, help="the setting compared")
    p.add_argument("--metrics", default=",".join(COMPARED), help="comma-separated (default: every compared metric)")
    p.add_argument("--seeds", help="comma-separated training seeds to pool (default: all; both settings need each)")
    p.add_argument("--b-from", type=Path, nargs="+", help="read --b from these summaries or run folders instead, one "
                   "for each input and of its cases: the same setting run by other code, paired case by case")
    p = sub.add_parser("render", help="rewrite the generated part of the results page")
    p.add_argument("--results", type=Path, default=REPO / "docs" / "results")
    p.add_argument("--page", type=Path, default=REPO / "docs" / "RESULTS.md")
    args = parser.parse_args(argv)
    try:
        if args.command == "summarize":
            summary = merge([summary_of(p, commit=args.commit) for p in args.inputs])
            if args.log:
                summary["log"] = args.log
            save_summary(summary, args.out)  # after every input is read: --out may be one of them
            args.out.chmod(0o644)  # a file to commit and share, not the private temp file it was written as
            print(f"wrote {args.out}: {len(summary['rows'])} rows, {summary['n']} cases")
            return 0
        if args.command == "compare":
            summaries = [summary_of(p) for p in args.inputs]
            seeds = [int(k) for k in args.seeds.split(",")] if args.seeds else None
            b = args.b
            if args.b_from:
                if len(args.b_from) != len(summaries):
                    raise ValueError(f"--b-from names {len(args.b_from)} runs for {len(summaries)} inputs")
                others = [summary_of(p) for p in args.b_from]
                summaries = [side_by_side(s, o, "b-from") for s, o in zip(summaries, others, strict=True)]
                b = f"b-from:{b}"
            print("\n".join(compare(summaries, args.a, b, args.metrics.split(","), seeds)))
            return 0
        page = args.page.read_text()
        updated = replace_block(page, render(load(args.results), args.page))
    except (ValueError, OSError, InputError) as e:  # a run folder's unreadable manifest, too
        print(f"results_page: {e}", file=sys.stderr)
        return 2
    mode = args.page.stat().st_mode
    artifacts.write_text(args.page, updated)
    args.page.chmod(mode)  # the temp file behind the atomic write is private (0600); keep the page's own mode
    print(f"rewrote the generated part of {args.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

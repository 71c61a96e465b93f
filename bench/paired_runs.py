"""The same rows of run folders, evaluated two ways, compared case by case: how a routing setting is read.

    python bench/paired_runs.py results/RUN-sub0:results/RUN-sub0-rerouted results/RUN-sub1:results/RUN-sub1-rerouted \\
        --rows corsa-routed,corsa-routed@seed2 [--metrics gen.generality,gen.reliability]

Each argument is a pair A:B of folders written by `corsa bench single` or bench/reroute.py from the same cases
(bench/reroute.py evaluates a run's adapters again with another routing setting). For every row named in --rows
that both folders of a pair hold, its cases are paired by id; all pairs of all folders and rows are pooled into
one paired bootstrap (corsa.evaluate.stats.bootstrap), B minus A in points, with each row's rates beside it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from corsa.evaluate.runner import load_results
from corsa.evaluate.stats import COMPARED, bootstrap, paired_units


def compare(pairs: Sequence[tuple[str, str]], rows: Sequence[str], metrics: Sequence[str]) -> list[str]:
    found = []  # (folder A, row, cases of A, cases of B)
    for a, b in pairs:
        ra = {r["method"]: r for r in load_results(a)}
        rb = {r["method"]: r for r in load_results(b)}
        found += [(a, row, ra[row]["cases"], rb[row]["cases"]) for row in rows if row in ra and row in rb]
    if not found:
        raise SystemExit("no row of --rows is in both folders of any pair")
    lines = [f"{len(found)} rows: " + ", ".join(f"{a} {row}" for a, row, _, _ in found)]
    for metric in metrics:
        units, per_row = [], []
        for _, row, ca, cb in found:
            mine = paired_units(ca, cb, metric)
            units += mine
            n = sum(u[2] for u in mine)
            per_row.append(f"{100 * sum(u[0] for u in mine) / n:.0f}->{100 * sum(u[1] for u in mine) / n:.0f}"
                           if n else "-")
        d = bootstrap(units, metric)
        if d is None:
            lines.append(f"{metric}: no values")
            continue
        lines.append(f"{metric}: {100 * d.estimate:+.1f} ({100 * d.low:+.1f} to {100 * d.high:+.1f}), {d.cases} "
                     f"case units; per row A->B: {', '.join(per_row)}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pairs", nargs="+", help="A:B, two folders of the same cases")
    p.add_argument("--rows", required=True, help="comma-separated row names (method[@seedK])")
    p.add_argument("--metrics", default=",".join(COMPARED))
    args = p.parse_args()
    pairs = [tuple(x.split(":", 1)) for x in args.pairs]
    if any(len(x) != 2 for x in pairs):
        raise SystemExit("each pair is A:B")
    print("\n".join(compare(pairs, args.rows.split(","), args.metrics.split(","))))


if __name__ == "__main__":
    main()

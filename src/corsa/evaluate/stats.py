"""How sure a difference between two methods is: a paired bootstrap over the edited cases.

Both methods are evaluated on the same cases, so the comparison resamples cases (not prompts) and keeps each
case's two outcomes together; that removes the case-to-case spread both methods share, which is most of it on
CounterFact. The rate of a resample pools the prompts of its cases, exactly as the tables' rates do, so the point
estimate is the table's difference.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from corsa.evaluate.metrics import case_values

COMPARED = ("gen.reliability", "gen.generality", "gen.retention", "tf.generality")


@dataclass(frozen=True)
class Difference:
    metric: str
    estimate: float  # rate(b) - rate(a), as a fraction
    low: float  # 95 % interval, percentile bootstrap
    high: float
    cases: int


def case_totals(case: dict[str, Any], metric: str) -> tuple[float, int]:
    """(sum, count) of one case's values of a metric, pooled as the tables pool them."""
    values = case_values(case, metric)
    return float(sum(values)), len(values)


def paired_difference(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], metric: str, *,
                      resamples: int = 2000, seed: int = 0) -> Difference | None:
    """b minus a on `metric`, with a 95 % paired bootstrap interval; None when the metric has no values.

    a and b are the `cases` of two results of the same run; they are matched by id.
    """
    by_id = {c["id"]: c for c in b}
    pairs = []
    for case in a:
        other = by_id.get(case["id"])
        if other is None:
            continue
        (sa, na), (sb, nb) = case_totals(case, metric), case_totals(other, metric)
        if na and na == nb:
            pairs.append((sa, sb, na))
    if not pairs:
        return None

    def diff(sample: Sequence[tuple[float, float, int]]) -> float:
        n = sum(p[2] for p in sample)
        return (sum(p[1] for p in sample) - sum(p[0] for p in sample)) / n

    rng = random.Random(seed)
    draws = sorted(diff(rng.choices(pairs, k=len(pairs))) for _ in range(resamples))
    return Difference(metric, diff(pairs), draws[int(0.025 * resamples)], draws[int(0.975 * resamples) - 1],
                      len(pairs))


def differences_line(results: Sequence[dict[str, Any]], against: str = "lora") -> str:
    """One Markdown line per method: its differences from `against` with intervals (empty without `against`)."""
    ref = next((r for r in results if r["method"] == against), None)
    if ref is None:
        return ""
    lines = []
    for r in results:
        if r["method"] in ("base", against):
            continue
        found = [d for m in COMPARED if (d := paired_difference(ref["cases"], r["cases"], m)) is not None]
        if found:
            lines.append(f"- {r['method']} minus {against}: " + "; ".join(
                f"{d.metric} {100 * d.estimate:+.1f} ({100 * d.low:+.1f} to {100 * d.high:+.1f})" for d in found))
    if not lines:
        return ""
    n = max(len(r["cases"]) for r in results)
    return (f"Differences in points, 95 % paired bootstrap intervals over the {n} cases (2,000 resamples; "
            "docs/METRICS.md):\n" + "\n".join(lines))

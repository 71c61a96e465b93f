"""How sure a difference between two methods is: a paired bootstrap over the edited cases.

Both methods are evaluated on the same cases, so the comparison resamples cases (not prompts) and keeps each
case's two outcomes together; that removes the case-to-case spread both methods share, which is most of it on
CounterFact. The rate of a resample pools the prompts of its cases, exactly as the tables' rates do, so the point
estimate is the table's difference.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import mean, stdev
from typing import Any

from corsa.evaluate.metrics import case_values

SEED_MARK = "@seed"  # <spec>@seed<k>: a method trained with seed k on the run's cases
# <spec>-routed[@seed<k>]: the same adapter evaluated scope-routed (corsa.routing), compared with routed rows.
ROUTED = "-routed"
# The metrics compared between methods, with paired intervals, in tables and on the results page: edit success
# and generality, locality beside them (issue 29: correct, as before, given an edit's target), the old answer kept
# on paraphrases (what CoRSA's DPO term acts on), paraphrases given another edit's target, and teacher-forced
# generality.
COMPARED = ("gen.reliability", "gen.generality", "gen.locality", "gen.locality_agreement", "gen.neighbor_edit_target",
            "gen.retention", "gen.other_target", "tf.generality")


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


def paired_units(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], metric: str
                 ) -> list[tuple[float, float, int]]:
    """(sum in a, sum in b, count) of `metric` per case that both `cases` lists hold (matched by id) with as many
    values: the units a paired bootstrap resamples."""
    by_id = {c["id"]: c for c in b}
    pairs = []
    for case in a:
        other = by_id.get(case["id"])
        if other is None:
            continue
        (sa, na), (sb, nb) = case_totals(case, metric), case_totals(other, metric)
        if na and na == nb:
            pairs.append((sa, sb, na))
    return pairs


def paired_difference(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], metric: str, *,
                      resamples: int = 2000, seed: int = 0) -> Difference | None:
    """b minus a on `metric`, with a 95 % paired bootstrap interval; None when the metric has no values.

    a and b are the `cases` of two results of the same run; they are matched by id.
    """
    return bootstrap(paired_units(a, b, metric), metric, resamples=resamples, seed=seed)


def bootstrap(pairs: Sequence[tuple[float, float, int]], metric: str, *, resamples: int = 2000,
              seed: int = 0) -> Difference | None:
    """Pooled rate of b minus pooled rate of a over (sum a, sum b, count) units, with a 95 % percentile interval
    from resampling the units."""
    if not pairs:
        return None

    def diff(sample: Sequence[tuple[float, float, int]]) -> float:
        n = sum(p[2] for p in sample)
        return (sum(p[1] for p in sample) - sum(p[0] for p in sample)) / n

    rng = random.Random(seed)
    draws = sorted(diff(rng.choices(pairs, k=len(pairs))) for _ in range(resamples))
    return Difference(metric, diff(pairs), draws[int(0.025 * resamples)], draws[int(0.975 * resamples) - 1],
                      len(pairs))


@dataclass(frozen=True)
class Ratio:
    estimate: float  # pooled rate of b / pooled rate of a
    low: float  # 95 % interval, percentile bootstrap
    high: float
    units: int


def rate_ratio(units: Sequence[tuple[int, int, int, int]], *, resamples: int = 2000, seed: int = 0
               ) -> Ratio | None:
    """(events a, count a, events b, count b) per unit: the pooled rate of b over the pooled rate of a, with a
    95 % interval from resampling the units together (paired). The counts may differ between a and b: forgetting
    is measured on the probes each method had right. None when a's pooled rate is 0."""

    def ratio(sample: Sequence[tuple[int, int, int, int]]) -> float:
        ea, na, eb, nb = (sum(u[i] for u in sample) for i in range(4))
        if not (na and nb):
            return math.nan
        return math.inf if ea == 0 else (eb / nb) / (ea / na)

    point = ratio(units) if units else math.nan
    if math.isnan(point) or math.isinf(point):
        return None
    rng = random.Random(seed)
    draws = sorted(x for _ in range(resamples) if not math.isnan(x := ratio(rng.choices(units, k=len(units)))))
    return Ratio(point, draws[int(0.025 * len(draws))], draws[int(0.975 * len(draws)) - 1], len(units))


def mmlu_difference(a: dict[str, Any], b: dict[str, Any], *, resamples: int = 2000,
                    seed: int = 0) -> Difference | None:
    """MMLU accuracy of b minus a, paired over the questions both answered (matched by id); None when either
    lacks per-question results (runs written before they were kept)."""
    if "correct" not in a or "correct" not in b:
        return None
    by_id = dict(zip(b["ids"], b["correct"]))
    pairs = [(float(x), float(by_id[i]), 1) for i, x in zip(a["ids"], a["correct"]) if i in by_id]
    return bootstrap(pairs, "mmlu", resamples=resamples, seed=seed)


def mmlu_logprob_difference(a: dict[str, Any], b: dict[str, Any], *, resamples: int = 2000,
                            seed: int = 0) -> Difference | None:
    """MMLU gold-letter log-probability of b minus a (nats), paired over the questions both answered; None when
    either lacks per-question values."""
    if "gold_logprobs" not in a or "gold_logprobs" not in b:
        return None
    by_id = dict(zip(b["ids"], b["gold_logprobs"]))
    pairs = [(x, by_id[i], 1) for i, x in zip(a["ids"], a["gold_logprobs"]) if i in by_id]
    return bootstrap(pairs, "mmlu.gold_logprob", resamples=resamples, seed=seed)


def mmlu_line(results: Sequence[dict[str, Any]]) -> str:
    """Each edited model's MMLU accuracy minus the base model's, paired over the same questions: Specificity as
    a difference with its uncertainty, since on a few hundred questions one question moves accuracy visibly."""
    base = next((r for r in results if r["method"] == "base" and r.get("mmlu")), None)
    if base is None:
        return ""
    parts = []
    found = [(r["method"], d) for r in results if r["method"] != "base" and r.get("mmlu")
             and (d := mmlu_difference(base["mmlu"], r["mmlu"])) is not None]
    if found:
        parts.append(f"MMLU minus the base model in points, 95 % paired bootstrap intervals over the "
                     f"{found[0][1].cases} questions: " + "; ".join(
                         f"{m} {100 * d.estimate:+.1f} ({100 * d.low:+.1f} to {100 * d.high:+.1f})" for m, d in found))
    # Near chance (25 %) accuracy hides damage that this still shows: the log-probability of the right letter.
    gold = [(r["method"], r["mmlu"]["gold_logprob"]) for r in results
            if r.get("mmlu") and r["mmlu"].get("gold_logprob") is not None]
    if len(gold) > 1:
        parts.append("MMLU mean log-probability of the right letter among the four (uniform: -1.386): "
                     + "; ".join(f"{m} {v:.3f}" for m, v in gold))
    return "\n".join(parts)


def training_seed(result: dict[str, Any]) -> int | None:
    """The seed a method row was trained with (its config records it); None for the base row."""
    return (result.get("config") or {}).get("seed")


def base_name(method: str) -> str:
    """A row's method without its @seed<k> suffix: the rows of one setting over several training seeds."""
    return method.partition(SEED_MARK)[0]


def with_suffix(method: str, suffix: str) -> str:
    """'lora@seed1' -> 'lora<suffix>@seed1': another evaluation of a row's adapter (routed, oracle), named so that
    tables group its seeds like any other setting's."""
    name, mark, seed = method.partition(SEED_MARK)
    return f"{name}{suffix}{mark}{seed}"


def without_suffix(method: str, suffix: str) -> str:
    """The inverse of with_suffix: 'lora<suffix>@seed1' -> 'lora@seed1'."""
    name, mark, seed = method.partition(SEED_MARK)
    return f"{name.removesuffix(suffix)}{mark}{seed}"


def routed_name(method: str) -> str:
    """'lora@seed1' -> 'lora-routed@seed1': the routed row of a run."""
    return with_suffix(method, ROUTED)


def unrouted_name(method: str) -> str:
    return without_suffix(method, ROUTED)


def reference(method: str, against: str) -> str:
    """What a row is compared with: `against` as it was evaluated, routed for a routed row."""
    return against + ROUTED if base_name(method).endswith(ROUTED) else against


def partner(results: Sequence[dict[str, Any]], row: dict[str, Any], against: str,
            seed_of: Callable[[dict[str, Any]], int | None] = training_seed) -> dict[str, Any] | None:
    """The `against` row trained with the same seed as `row` (so a seed repeat is compared with its own
    baseline run), else the plain `against` row. `seed_of` reads a row's training seed."""
    same = [r for r in results if base_name(r["method"]) == against and seed_of(r) == seed_of(row)]
    return same[0] if same else next((r for r in results if r["method"] == against), None)


def differences_line(results: Sequence[dict[str, Any]], against: str = "lora") -> str:
    """One Markdown line per method: its differences from `against` with intervals (empty without `against`)."""
    lines = []
    for r in results:
        if r["method"] == "base" or base_name(r["method"]) == reference(r["method"], against):
            continue
        ref = partner(results, r, reference(r["method"], against))
        if ref is None:
            continue
        found = [d for m in COMPARED if (d := paired_difference(ref["cases"], r["cases"], m)) is not None]
        if found:
            lines.append(f"- {r['method']} minus {ref['method']}: " + "; ".join(
                f"{d.metric} {100 * d.estimate:+.1f} ({100 * d.low:+.1f} to {100 * d.high:+.1f})" for d in found))
    if not lines:
        return ""
    n = max(len(r["cases"]) for r in results)
    return (f"Differences in points, 95 % paired bootstrap intervals over the {n} cases (2,000 resamples; "
            "docs/METRICS.md):\n" + "\n".join(lines))


def seeds_line(results: Sequence[dict[str, Any]], against: str = "lora",
               metrics: Sequence[str] = ("gen.generality", "gen.reliability")) -> str:
    """For every setting run with several training seeds: each seed's value, the mean and the standard deviation,
    and the difference from `against` trained with the same seed. The bootstrap intervals above hold the cases
    fixed; this is the other source of spread, the training run itself."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        if r["method"] != "base":
            groups.setdefault(base_name(r["method"]), []).append(r)
    lines = []
    for name, rows in groups.items():
        rows = sorted(rows, key=lambda r: training_seed(r) or 0)
        if len({training_seed(r) for r in rows}) < 2:
            continue
        parts = []
        for m in metrics:
            values = [100 * r["summary"][m] for r in rows if r["summary"].get(m) is not None]
            if len(values) < 2:
                continue
            parts.append(f"{m} {', '.join(f'{v:.1f}' for v in values)} (mean {mean(values):.1f}, "
                         f"sd {stdev(values):.1f})")
            if name != reference(name, against):
                pairs = [(r, ref) for r in rows if (ref := partner(results, r, reference(name, against))) is not None
                         and training_seed(ref) == training_seed(r) and r["summary"].get(m) is not None]
                if len(pairs) >= 2:
                    diffs = [100 * (r["summary"][m] - ref["summary"][m]) for r, ref in pairs]
                    parts[-1] += (f", minus {reference(name, against)} of the same seed {', '.join(f'{d:+.1f}' for d in diffs)} "
                                  f"(mean {mean(diffs):+.1f}, sd {stdev(diffs):.1f})")
        if parts:
            seeds = ", ".join(str(training_seed(r)) for r in rows)
            lines.append(f"- {name}, training seeds {seeds}: " + "; ".join(parts))
    if not lines:
        return ""
    return "Across training seeds (same cases; points):\n" + "\n".join(lines)

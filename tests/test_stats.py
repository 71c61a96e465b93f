"""The paired bootstrap behind the tables' 'minus lora' lines."""

from __future__ import annotations

import pytest

from corsa.evaluate.stats import (
    differences_line,
    mmlu_difference,
    mmlu_line,
    paired_difference,
    rate_ratio,
    seeds_line,
)


def cases(values):
    return [{"id": f"c{i}", "gen.generality": v} for i, v in enumerate(values)]


def test_no_difference_has_a_zero_interval():
    a = cases([[True], [False], [True, False]])
    d = paired_difference(a, a, "gen.generality")
    assert (d.estimate, d.low, d.high, d.cases) == (0.0, 0.0, 0.0, 3)


def test_estimate_pools_prompts_like_the_table_and_pairs_by_id():
    a = cases([[False, False], [False], [True]])
    b = list(reversed(cases([[True, True], [False], [True]])))  # order must not matter: matched by id
    d = paired_difference(a, b, "gen.generality")
    assert d.estimate == pytest.approx(2 / 4)  # 3/4 - 1/4 over the 4 pooled paraphrases
    assert d.low <= d.estimate <= d.high


def test_interval_narrows_with_more_cases_and_excludes_zero_for_a_clear_effect():
    small = paired_difference(cases([[False]] * 10), cases([[True]] * 3 + [[False]] * 7), "gen.generality")
    big = paired_difference(cases([[False]] * 1000), cases([[True]] * 300 + [[False]] * 700), "gen.generality")
    assert small.estimate == big.estimate == pytest.approx(0.3)
    assert big.high - big.low < small.high - small.low
    assert big.low > 0.2


def test_missing_metric_gives_none_and_no_line():
    assert paired_difference(cases([[True]]), cases([[True]]), "tf.generality") is None
    rows = [{"method": "base", "cases": cases([[False]])}, {"method": "corsa", "cases": cases([[True]])}]
    assert differences_line(rows) == ""  # no lora row to compare against
    rows.append({"method": "lora", "cases": cases([[False]])})
    assert "corsa minus lora: gen.generality +100.0" in differences_line(rows)


def row(method, seed, generality):
    """A results.json row as the runner writes it; generality given as per-case outcomes."""
    return {"method": method, "config": {"seed": seed}, "cases": cases([[g] for g in generality]),
            "summary": {"gen.generality": sum(generality) / len(generality), "gen.reliability": 1.0}}


def test_seed_repeats_are_compared_with_the_baseline_of_the_same_seed():
    rows = [row("lora", 0, [False] * 4), row("corsa", 0, [True] * 2 + [False] * 2),
            row("lora@seed1", 1, [True] * 4), row("corsa@seed1", 1, [True] * 3 + [False])]
    text = differences_line(rows)
    assert "- corsa minus lora: gen.generality +50.0" in text
    assert "- corsa@seed1 minus lora@seed1: gen.generality -25.0" in text  # not against seed 0's lora


def test_seeds_line_gives_each_seed_the_mean_and_the_spread():
    rows = [row("lora", 0, [False] * 4), row("corsa", 0, [True] * 2 + [False] * 2),
            row("lora@seed1", 1, [True] * 4), row("corsa@seed1", 1, [True] * 3 + [False]),
            row("prepend", 0, [True] * 4)]  # one seed only: no line
    text = seeds_line(rows)
    assert text.startswith("Across training seeds")
    assert "- lora, training seeds 0, 1: gen.generality 0.0, 100.0 (mean 50.0, sd 70.7)" in text
    assert ("- corsa, training seeds 0, 1: gen.generality 50.0, 75.0 (mean 62.5, sd 17.7), minus lora of the same "
            "seed +50.0, -25.0 (mean +12.5, sd 53.0)") in text
    assert "prepend" not in text
    assert seeds_line(rows[:2]) == ""


def mmlu(correct, ids=None, gold=-1.5):
    ids = ids or [f"s/{i}" for i in range(len(correct))]
    return {"method": "x", "mmlu": {"ids": ids, "correct": correct, "gold_logprob": gold}}


def test_mmlu_difference_pairs_questions_by_id():
    a = mmlu([True, False, False, True])["mmlu"]
    b = mmlu([True, True, False], ids=["s/3", "s/1", "s/2"])["mmlu"]  # s/0 unanswered by b: left out
    d = mmlu_difference(a, b)
    assert d.cases == 3 and d.estimate == pytest.approx(1 / 3)  # b gains s/1, both keep s/3, both miss s/2
    assert d.low <= d.estimate <= d.high
    assert mmlu_difference(a, {"ids": ["s/0"], "accuracy": 1.0}) is None  # a run from before per-question results


def test_mmlu_line_compares_every_edited_model_with_the_base_model():
    base = {**mmlu([True] * 50 + [False] * 50, gold=-1.6), "method": "base"}
    same = {**mmlu([True] * 50 + [False] * 50, gold=-1.7), "method": "lora"}
    worse = {**mmlu([False] * 100, gold=-2.9), "method": "corsa"}
    line = mmlu_line([base, same, worse])
    assert "over the 100 questions" in line
    assert "lora +0.0 (+0.0 to +0.0)" in line
    assert "corsa -50.0 (" in line
    assert "base -1.600; lora -1.700; corsa -2.900" in line
    assert mmlu_line([same, worse]) == ""  # nothing to compare with


def test_rate_ratio_pools_each_side_over_its_own_counts():
    # a forgets 4 of 8 probes, b 1 of 4: 0.25 / 0.5; the units resample together.
    units = [(2, 4, 1, 2), (2, 4, 0, 2)]
    r = rate_ratio(units)
    assert r.estimate == pytest.approx(0.5) and r.units == 2 and r.low <= r.estimate <= r.high
    assert rate_ratio([(0, 4, 1, 2)]) is None  # a forgot nothing: no ratio
    many = rate_ratio([(1, 2, 0, 2)] * 200 + [(1, 2, 1, 2)] * 200)
    assert many.estimate == pytest.approx(0.5) and 0.3 < many.low < 0.5 < many.high < 0.7

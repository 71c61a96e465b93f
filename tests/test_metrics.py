"""Metric helpers that need no model: how a paraphrase failure is classified."""

from __future__ import annotations

from corsa.evaluate.metrics import other_target, with_other_targets


def test_other_target_counts_only_another_edits_answer():
    targets = {"english", "paris", "sega"}
    assert other_target("English", "French", targets)
    assert other_target(" english. ", "French", targets)
    assert not other_target("They speak English there.", "French", targets)  # a mention is not the answer
    assert not other_target("Nobody knows.", "French", targets)
    assert not other_target("Sega", "sega", targets)  # its own target, whatever the case


def test_old_records_get_the_metric_from_their_stored_answers():
    cases = [{"target_new": "Paris", "answers": {"paraphrases": ["Rome."]}},
             {"target_new": "Rome", "answers": {"paraphrases": ["Rome"]}},
             {"target_new": "Oslo", "answers": {"paraphrases": ["Paris"]}}]
    record = with_other_targets({"summary": {"gen.generality": 1 / 3}, "cases": cases})
    assert [c["gen.other_target"] for c in cases] == [[True], [False], [True]]
    assert record["summary"]["gen.other_target"] == 2 / 3 and record["counts"]["gen.other_target"] == 3
    again = with_other_targets({"summary": {"gen.other_target": 0.5}, "cases": cases})
    assert again["summary"]["gen.other_target"] == 0.5  # a record that has it is left alone

"""Metric helpers that need no model: how a paraphrase failure is classified."""

from __future__ import annotations

from corsa.evaluate.metrics import mark_neighbor_edit_targets, neighbor_edit_target, other_target, with_other_targets


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


def test_neighbor_edit_target_counts_only_a_new_target_that_is_not_the_right_answer():
    targets = ["lyon", "vienna", "berlin"]
    truth, before = "Berlin", "The capital of Germany is Berlin."
    # another edit's target, and the case's own: both bleed
    assert neighbor_edit_target("It is Vienna.", before, truth, targets)
    assert neighbor_edit_target("LYON, of course", before, truth, ["lyon"])
    # the neighbour's true answer is also an edit's target: a right answer is no bleed
    assert not neighbor_edit_target("The capital of Germany is Berlin.", "Bonn", truth, targets)
    assert not neighbor_edit_target("Berlin", "Bonn", "Berlin, Germany", ["berlin"])  # part of the true answer
    # the unedited model already said it: the edit did not put it there
    assert not neighbor_edit_target("Vienna, near Lyon", "Vienna or Lyon", truth, targets)
    assert neighbor_edit_target("Vienna, near Lyon", "Vienna", truth, targets)  # Lyon is news
    assert not neighbor_edit_target("Nobody knows.", before, truth, targets)
    assert not neighbor_edit_target("Vienna", before, truth, [])


def test_neighbor_edit_target_per_case_and_from_old_records():
    def case(cid, target, neighbors, truths):
        return {"id": cid, "target_new": target, "answers": {"paraphrases": [], "neighborhood": neighbors},
                "neighborhood_truth": truths}

    base = {"method": "base", "summary": {}, "cases": [case(1, "Lyon", ["Berlin", "Rome"], ["Berlin", "Rome"]),
                                                       case(2, "Oslo", ["Madrid"], ["Lisbon"])]}
    edited = [case(1, "Lyon", ["Lyon", "Oslo"], ["Berlin", "Rome"]),  # its own target, another edit's target
              case(2, "Oslo", ["Madrid"], ["Lisbon"])]
    mark_neighbor_edit_targets(edited, base["cases"])
    assert [c["gen.neighbor_edit_target"] for c in edited] == [[True, True], [False]]
    mark_neighbor_edit_targets(base["cases"], None)  # the unedited model against itself
    assert [c["gen.neighbor_edit_target"] for c in base["cases"]] == [[False, False], [False]]

    # a record written before the metric (no true answers kept): given by the caller, or left missing
    old = {"summary": {"gen.other_target": 0.0}, "cases": [
        {k: v for k, v in c.items() if k not in ("neighborhood_truth", "gen.neighbor_edit_target")} for c in edited]}
    assert "gen.neighbor_edit_target" not in with_other_targets(old, base)["summary"]
    assert "gen.neighbor_edit_target" not in with_other_targets(old, None, [["Berlin", "Rome"], ["Lisbon"]])["summary"]
    upgraded = with_other_targets(old, base, [["Berlin", "Rome"], ["Lisbon"]])
    assert upgraded["summary"]["gen.neighbor_edit_target"] == 2 / 3 and upgraded["counts"]["gen.neighbor_edit_target"] == 3
    other_cases = {**base, "cases": base["cases"][::-1]}
    assert "gen.neighbor_edit_target" not in with_other_targets({**old, "summary": {"gen.other_target": 0.0}},
                                                                other_cases)["summary"]


def test_evaluate_and_the_demo_table_show_locality_beside_edit_success(tiny_model, tokenizer):
    from conftest import make_model

    from corsa.demo import LABELS, format_table
    from corsa.evaluate.metrics import EvalConfig, evaluate
    from corsa.prompts import Formatter
    from corsa.requests import EditRequest, Neighbor

    fmt = Formatter(tokenizer)
    requests = [EditRequest("a?", "xy", "zz", paraphrases=("b?",), neighborhood=(Neighbor("c?", "q"),
                                                                                 Neighbor("d?", "r")), id="1"),
                EditRequest("e?", "w", "v", neighborhood=(Neighbor("f?", "s"),), id="2")]
    config = EvalConfig(max_new_tokens=3)
    base = evaluate(tiny_model, fmt, requests, config=config)
    other = evaluate(make_model(len(tokenizer), seed=1), fmt, requests, reference=base, config=config)
    assert [c["neighborhood_truth"] for c in base["cases"]] == [["q", "r"], ["s"]]
    assert base["summary"]["gen.neighbor_edit_target"] == 0.0 and base["counts"]["gen.neighbor_edit_target"] == 3
    before = [a for c in base["cases"] for a in c["answers"]["neighborhood"]]
    after = [a for c in other["cases"] for a in c["answers"]["neighborhood"]]
    truths = ["q", "r", "s"]
    expected = [neighbor_edit_target(a, b, t, ["xy", "w"]) for a, b, t in zip(after, before, truths)]
    assert [x for c in other["cases"] for x in c["gen.neighbor_edit_target"]] == expected

    lines = format_table({"base": base, "lora": other}).splitlines()
    labels = [line[: max(map(len, LABELS.values()))].strip() for line in lines[1:]]
    assert labels[:5] == ["edit success (new answer on the edit prompt)",
                          "paraphrase success (new answer on rephrasings)",
                          "neighbours answered correctly (their true answer)",
                          "neighbours answered as before (agreement with the unedited model)",
                          "neighbours given an edit's new answer"]
    assert lines[4].split()[-4:-2] == ["3/3", "100%"]  # the unedited model agrees with itself
    assert lines[5].split()[-4:-2] == ["0/3", "0%"]

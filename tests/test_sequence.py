"""Multi-update benchmarks on a tiny local model: stages, the metric definitions, and the CLI end to end."""

from __future__ import annotations

import copy
import json

import pytest
from test_bench import counterfact

from corsa.cli import main
from corsa.errors import InputError
from corsa.evaluate.sequence import (
    SequenceConfig,
    build_stages,
    chain_stages,
    comparisons,
    format_sequence_table,
    load_sequence_results,
    locality,
    rescore_forgetting,
    run_by_case,
    score,
)
from corsa.requests import EditRequest, Neighbor


def mquake(folder, n=3):
    recs = [{"case_id": 100 + i, "requested_rewrite": [
        {"prompt": "{} plays", "subject": f"m{i}", "target_new": {"str": f"n{i}"}, "target_true": {"str": f"o{i}"},
         "question": f"what does m{i} play?"}], "questions": ["a?", "b?", "c?"], "answer": "x", "answer_alias": [],
        "new_answer": "y", "new_answer_alias": [], "new_single_hops": [{"question": "h?", "answer": "a"}]}
        for i in range(n)]
    (folder / "mquake").mkdir()
    (folder / "mquake" / "MQuAKE-hard.json").write_text(json.dumps(recs))


def test_revision_stages_revise_stored_facts_to_another_answer_of_the_relation(tmp_path):
    counterfact(tmp_path, n=10)
    cfg = SequenceConfig("revise", str(tmp_path), n=4, n2=4, n_revise=2)
    first, second = build_stages(cfg)
    assert len(first) == 4 and len(second) == 4
    revisions = [r for r in second if r.id.endswith("-rev")]
    assert len(revisions) == 2
    stored = {r.prompt: r for r in first}
    for r in revisions:
        assert r.target_old == stored[r.prompt].target_new  # the old answer is what the store holds
        assert r.target_new not in (stored[r.prompt].target_new, stored[r.prompt].target_old)
    assert not {r.prompt for r in second if r not in revisions} & set(stored)  # unrelated edits are new facts
    with pytest.raises(InputError):
        build_stages(SequenceConfig("revise", str(tmp_path), n=4, n2=20, n_revise=2))


def test_the_split_chooses_the_counterfact_file(tmp_path):
    counterfact(tmp_path, n=10)
    val = tmp_path / "counterfact" / "easyedit-counterfact-val.json"
    records = json.loads((tmp_path / "counterfact" / "easyedit-counterfact-edit.json").read_text())
    val.write_text(json.dumps([{**r, "prompt": "v" + r["prompt"], "subject": "v" + r["subject"]} for r in records]))
    for split, mark in (("edit", "p"), ("val", "v")):
        stages = build_stages(SequenceConfig("revise", str(tmp_path), n=4, n2=4, n_revise=2, split=split))
        assert all(r.prompt.startswith(mark) for s in stages for r in s)
    with pytest.raises(InputError):
        build_stages(SequenceConfig("revise", str(tmp_path), n=4, n2=4, n_revise=2, split="train"))


def test_user_chains_become_successive_updates():
    reqs = [EditRequest("a?", "x1", "x0", chain=("x2", "x3")), EditRequest("b?", "y1", "y0", chain=("y2",)),
            EditRequest("c?", "z1", "z0")]
    stages = chain_stages(reqs)
    assert [[(r.prompt, r.target_old, r.target_new) for r in s] for s in stages] == [
        [("a?", "x0", "x1"), ("b?", "y0", "y1"), ("c?", "z0", "z1")],
        [("a?", "x1", "x2"), ("b?", "y1", "y2")],
        [("a?", "x2", "x3")]]


def test_metric_definitions_on_hand_made_answers():
    first = [EditRequest("p1", "new1", "old1", paraphrases=("q1",)), EditRequest("p2", "new2", "old2"),
             EditRequest("p3", "new3", "old3")]
    later = [EditRequest("p3", "newer3", "new3"), EditRequest("p4", "new4", "old4", paraphrases=("q4",))]
    after_first = {"p1": "new1", "q1": "new1", "p2": "old2", "p3": "new3"}
    final = {"p1": "new1", "q1": "old1", "p2": "old2", "p3": "new3", "p4": "new4", "q4": "nope"}
    m = score([first, later], after_first, final, final)
    # Forgetting is on the edit prompts: p1 right after update 1 and still right (p3 is revised, p2 never right).
    assert m["forgetting"] == 0.0
    assert m["forgetting_probes"] == 0.5  # over every probe: p1 and q1 were right; q1 lost
    assert m["activation"] == pytest.approx(1 / 3)  # old gone on p1, q1, p3; back on q1
    assert m["efficacy"] == 0.0 and m["efficacy_prompt"] == 0.5  # paraphrase q4 misses; prompts p3 no, p4 yes
    assert m["revision_old"] == 1.0  # p3 still answers the answer its revision replaced
    assert m["first_efficacy"] == 0.75
    # Per fact: the pooled counts are the table's rates (p1 keeps its prompt, loses its paraphrase).
    assert m["by_case"]["forgetting"] == {"p1": [0, 1], "p2": [0, 0]}
    assert m["by_case"]["forgetting_probes"] == {"p1": [1, 2], "p2": [0, 0]}
    assert m["counts"]["kept_prompts_correct"] == 1 and m["counts"]["kept_probes_correct"] == 2
    assert m["by_case"]["efficacy"] == {"p3": [0, 0], "p4": [0, 1]}


def test_locality_on_hand_made_answers_and_in_the_table():
    first = [EditRequest("p1", "Lyon", "Paris", neighborhood=(Neighbor("n1", "Berlin"), Neighbor("n2", "Rome")))]
    later = [EditRequest("p2", "Oslo", "Bern", neighborhood=(Neighbor("n3", "Oslo"), Neighbor("n4", "Madrid")))]
    before = {"n1": "Berlin", "n2": "Rome or Lyon", "n3": "Bergen", "n4": "Madrid"}
    after = {"n1": "Oslo", "n2": "Lyon", "n3": "Oslo", "n4": "Madrid"}
    m = locality([*first, *later], before, after)
    # n1: another update's target (bleed); n2: its own target, but the unedited model named it too; n3: an edit's
    # target that is also the neighbour's true answer; n4 unchanged.
    assert m["neighbor_edit_target"] == 0.25 and m["n_neighbors"] == 4
    assert m["locality"] == 0.5  # n3, n4 right
    assert m["locality_agreement"] == 0.25  # only n4 answered as before
    assert locality(later[:0], {}, {})["locality"] is None  # no neighbours: nothing measured

    run = {"fraction": 1.0, "n_per_stage": [1, 1], **{k: 0.5 for k in ("efficacy", "efficacy_prompt",
                                                                         "first_efficacy", "forgetting",
                                                                         "forgetting_probes", "activation")},
           "revision_old": None, **m}
    old = {k: v for k, v in run.items() if k not in m}  # written before neighbours were measured
    rows = [{"method": "lora", "model": "tiny", "bench": "inject", "command": "c", "runs": [old]},
            {"method": "corsa", "model": "tiny", "bench": "inject", "command": "c", "runs": [run]}]
    rows[0]["config"] = rows[1]["config"] = {"seed": 0, "evaluate_after": "each"}
    table = format_sequence_table(rows)
    header = [c.strip() for c in table.splitlines()[0].split("|")[1:-1]]
    assert header[3:9] == ["efficacy", "efficacy_prompt", "first_efficacy", "locality", "locality_agreement",
                           "neighbor_edit_target"]
    assert "| lora | 1 | 1/1 | 50.0 | 50.0 | 50.0 | - | - | - | 50.0 |" in table
    assert "| corsa | 1 | 1/1 | 50.0 | 50.0 | 50.0 | 50.0 | 25.0 | 25.0 | 50.0 |" in table


def test_comparisons_give_the_forgetting_ratio_and_the_efficacy_difference():
    def record(method, forgotten):
        by_case = {"forgetting": {f"c{i}": [int(i < forgotten), 1] for i in range(10)},
                   "forgetting_probes": {f"c{i}": [int(i < forgotten + 1), 2] for i in range(10)},
                   "efficacy": {f"e{i}": [int(i < 5), 1] for i in range(10)}}
        return {"method": method, "runs": [{"fraction": 1.0, "by_case": by_case}]}

    line = comparisons([record("lora", 8), record("corsa", 4)])
    assert "corsa, fraction 1: forgetting 0.50x lora's (" in line and "10 facts" in line
    assert "on prompts and paraphrases 0.56x lora's (" in line  # (4 + 1) / 20 against (8 + 1) / 20
    assert "efficacy +0.0 points (+0.0 to +0.0, 10 edits)" in line
    assert comparisons([record("corsa", 4)]) == ""  # nothing to compare against


def test_training_seeds_are_compared_seed_by_seed_and_pooled():
    def record(method, seed, forgotten, right):
        by_case = {"forgetting": {f"c{i}": [int(i < forgotten), 1] for i in range(10)}, "forgetting_probes": {},
                   "efficacy": {f"e{i}": [int(i < right), 1] for i in range(10)}}
        return {"method": method, "method_config": {"seed": seed}, "runs": [{"fraction": 1.0, "by_case": by_case}]}

    rows = [record("lora", 0, 8, 5), record("corsa", 0, 4, 6), record("lora@seed1", 1, 4, 5),
            record("corsa@seed1", 1, 4, 4)]
    text = comparisons(rows)
    assert "- corsa, fraction 1: forgetting 0.50x lora's" in text and "efficacy +10.0 points" in text
    # The seed-1 row is paired with LoRA's seed-1 run, not with the plain (seed 0) row.
    assert "- corsa@seed1, fraction 1: forgetting 1.00x lora's" in text and "efficacy -10.0 points" in text
    # Pooled: (4 + 4) / 20 forgotten against (8 + 4) / 20; efficacy (6 + 4) / 20 against (5 + 5) / 20.
    pooled = text.split("Pooled over training seeds")[1]
    assert "- corsa, fraction 1, training seeds 0, 1 pooled: forgetting 0.67x lora's (" in pooled
    assert "10 facts" in pooled and "efficacy +0.0 points" in pooled
    assert "Pooled" not in comparisons(rows[:2])  # one seed: nothing to pool
    # A seed without its own LoRA run is still compared (with the plain row) but not pooled as same-seed.
    unpaired = comparisons(rows[:2] + [record("corsa@seed2", 2, 4, 4)])
    assert "- corsa@seed2, fraction 1: forgetting 0.50x lora's" in unpaired and "Pooled" not in unpaired


@pytest.mark.parametrize("kind", ["inject", "revise"])
@pytest.mark.integration
def test_bench_end_to_end_on_the_tiny_model(tmp_path, tiny_dir, capsys, kind):
    counterfact(tmp_path, n=8)
    mquake(tmp_path)
    out = tmp_path / "run"
    argv = ["bench", kind, "--data", str(tmp_path), "--out", str(out), "--n", "3", "--n2", "3", "--model", tiny_dir,
            "--epochs", "1", "--quiet", "--max-new-tokens", "4"]
    if kind == "revise":
        argv += ["--n-revise", "2", "--fractions", "0.5,1", "--eval-after", "all"]
    assert main(argv) == 0
    results = [json.loads((out / m / "results.json").read_text()) for m in ("lora", "corsa")]
    for r in results:
        assert [run["fraction"] for run in r["runs"]] == ([0.5, 1.0] if kind == "revise" else [1.0])
        for run in r["runs"]:
            assert {"efficacy", "forgetting", "forgetting_probes", "activation", "first_efficacy",
                    "revision_old", "locality", "locality_agreement", "neighbor_edit_target"} <= set(run)
            # every update's CounterFact neighbours, once each (MQuAKE's have none), asked after the last update
            n = run["n_neighbors"]
            assert n == len(run["answers"]["neighbors"]) and (n == 3 if kind == "inject" else
                                                              3 <= n <= 3 + run["n_per_stage"][1])
        assert r["config"]["evaluate_after"] == ("all" if kind == "revise" else "each")
    if kind == "revise":
        assert results[0]["runs"][0]["n_per_stage"] == [3, 2]
    table = (out / "table.md").read_text()
    assert table.count("| corsa |") == len(results[1]["runs"]) and (out / "plot.png").exists()
    for r in results:  # records written before by_case existed get the same counts from their stored answers
        for run in r["runs"]:
            stored = run.pop("by_case")
            rebuilt = run_by_case(r, run)
            assert rebuilt == stored  # two stages: the answers after the last update are efficacy's
    # Records written when `forgetting` pooled prompts and paraphrases are scored again on the edit prompts.
    corsa_file = out / "corsa" / "results.json"
    current = json.loads(corsa_file.read_text())
    old = copy.deepcopy(current)
    for run in old["runs"]:
        run["forgetting"] = run.pop("forgetting_probes")
        run["by_case"]["forgetting"] = run["by_case"].pop("forgetting_probes")
    corsa_file.write_text(json.dumps(old))
    upgraded = next(r for r in load_sequence_results(out) if r["method"] == "corsa")
    assert upgraded["runs"] == current["runs"]
    corsa_file.write_text(json.dumps(current))
    capsys.readouterr()
    assert main(argv) == 0 and capsys.readouterr().out.count("done earlier, skipped") == 2
    # Rows must stay paired: other facts or other training settings in the same folder are refused, not mixed.
    before = sorted(p.name for p in out.iterdir())
    for change in (["--seed", "3"], ["--lr", "1e-3"], ["--max-new-tokens", "5"]):
        assert main(argv + change + ["--methods", "prepend"]) == 2
        assert "use a new --out" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
    if kind == "inject":  # another training seed adds its rows to the same folder, paired with LoRA of that seed
        assert main(argv + ["--methods", "lora", "--train-seeds", "0,1"]) == 0
        repeat = json.loads((out / "lora@seed1" / "results.json").read_text())
        assert repeat["method_config"]["seed"] == 1 and repeat["stages"] == results[0]["stages"]
        assert "lora@seed1" in (out / "table.md").read_text()


@pytest.mark.integration
def test_baselines_run_several_updates_on_the_tiny_model(tmp_path, tiny_dir, monkeypatch, one_thread):
    """F-Learning, MEMIT and merging fold the earlier update into the weights and edit again; prepend keeps
    telling the earlier facts. The methods that train must have learned every update's edits."""
    from corsa.answers import contains
    from corsa.evaluate.sequence import probes

    monkeypatch.setenv("CORSA_CACHE", str(tmp_path / "cache"))
    counterfact(tmp_path, n=8)
    mquake(tmp_path)
    train = [{"case_id": i, "prompt": f"the town of t{i} is", "target_new": "x", "subject": f"t{i}",
              "ground_truth": f"g{i % 5}", "rephrase_prompt": "r", "locality_prompt": "l",
              "locality_ground_truth": "z"}
             for i in range(30)]
    (tmp_path / "counterfact" / "easyedit-counterfact-train.json").write_text(json.dumps(train))
    out = tmp_path / "run"
    methods = ["flearning", "memit", "merge", "prepend"]
    # One epoch at the paper's lr teaches the tiny model nothing; lr 5e-3 learns both edits of an update within
    # 20 epochs, and early stopping ends training there. (At lr 1e-2, on one machine's numerics, F-Learning's
    # second update stopped as learned yet answered "n0" for m2, efficacy 0.5; the cause was not traced.)
    assert main(["bench", "inject", "--data", str(tmp_path), "--out", str(out), "--n", "2", "--n2", "2",
                 "--model", tiny_dir, "--epochs", "20", "--lr", "5e-3", "--quiet", "--max-new-tokens", "3",
                 "--methods", ",".join(methods)]) == 0
    stages = build_stages(SequenceConfig("inject", str(tmp_path), n=2, n2=2))
    records = {m: json.loads((out / m / "results.json").read_text()) for m in methods}
    for m, record in records.items():
        run = record["runs"][0]
        assert record["stages"] == [[r.id for r in s] for s in stages], m
        assert run["n_per_stage"] == [2, 2] and len(run["steps"]) == 2, m
        assert run["efficacy_prompt"] is not None, m

    def learned(answers, stage):
        return sum(contains(answers[r.prompt], r.target_new) for r in stage) / len(stage)

    for m in ("flearning", "merge"):
        record, run = records[m], records[m]["runs"][0]
        assert all(run["steps"]), m
        assert learned(record["answers"]["after_first"], stages[0]) == 1.0, m
        assert run["efficacy_prompt"] == 1.0, m  # the second update's prompts, asked right after it
    # A random two-layer model cannot show that MEMIT or prepend learned anything: its attention barely carries
    # MEMIT's edit of the subject's residual to the answer (MEMIT's own search for that residual stays ~4.8 nats
    # from the new answers), and nothing in it copies an answer from its context. test_memit shows MEMIT raising
    # the new answers on a deeper tiny model. Prepend can show that the facts are told: the answers change, and
    # the first update's facts are still told after the second.
    prepend = records["prepend"]
    before, after_first = prepend["answers"]["before"], prepend["answers"]["after_first"]
    final = prepend["runs"][0]["answers"]["final"]
    first_probes = [p for r in stages[0] for p in probes(r)]
    assert any(after_first[p] != before[p] for p in first_probes)
    assert all(final[p] == after_first[p] for p in first_probes)
    assert any(final[p] != before[p] for r in stages[1] for p in probes(r))


def test_old_records_without_their_data_keep_the_old_rate_as_forgetting_on_probes(tmp_path):
    run = {"fraction": 1.0, "forgetting": 0.4, "answers": {"final": {}},
           "by_case": {"forgetting": {"c0": [2, 5]}, "efficacy": {"e0": [1, 1]}}}
    record = {"config": {"kind": "inject", "data": str(tmp_path / "gone"), "methods": ["lora"], "fractions": [1.0]},
              "answers": {"after_first": {}}, "runs": [run]}
    rescore_forgetting(record, run)
    assert run["forgetting"] is None and run["forgetting_probes"] == 0.4
    assert run["by_case"] == {"forgetting_probes": {"c0": [2, 5]}, "efficacy": {"e0": [1, 1]}}

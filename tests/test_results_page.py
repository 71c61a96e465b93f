"""Result summaries (corsa.evaluate.summary) and the generated part of docs/RESULTS.md (bench/results_page.py), on
hand-made run folders laid out as `corsa bench single` writes them."""

from __future__ import annotations

import json
import random

import pytest
from conftest import bench_script

from corsa.evaluate.stats import COMPARED
from corsa.evaluate.summary import SCHEMA, pooled_difference, read_summary, summarize, write_summary

SEEDS = (0, 1, 2)
N = 6
METHODS = {"lora": {"use_sam": False, "use_dpo": False, "rho": 0.05, "lr": 2e-3},
           "corsa-rho0.5": {"use_sam": True, "use_dpo": True, "rho": 0.5, "lam": 1.0, "beta": 0.1, "lr": 2e-3}}


def case(rng: random.Random, case_id: str, skill: float) -> dict:
    """One case as metrics.evaluate records it. The number of paraphrases varies from case to case (1 to 3, the
    same for every method), so a rate pooled over prompts differs from a mean over cases and a summary that got
    the pooling wrong would show."""
    k = int(case_id.rsplit("-", 1)[1]) % 3 + 1

    def hit() -> bool:
        return rng.random() < skill

    return {"id": case_id, "prompt": f"{case_id} lives in", "target_new": f"new-{case_id}", "target_old": "old",
            "answers": {"prompt": "secret answer", "paraphrases": ["secret answer"] * k, "neighborhood": ["x"]},
            "gen.reliability": hit(), "gen.generality": [hit() for _ in range(k)], "gen.locality": [hit()],
            "gen.locality_agreement": [hit()], "gen.neighbor_edit_target": [not hit()],
            "gen.retention": [hit() for _ in range(k)],
            "gen.other_target": [False] * k, "tf.reliability": 1.0,
            "tf.generality": [round(rng.random(), 3) for _ in range(k)]}


def record(subset: int, method: str, seed: int | None, cases: list[dict], date: str) -> dict:
    summary = {}
    for m in (*COMPARED, "tf.reliability"):
        values = [x for c in cases for x in (c[m] if isinstance(c[m], list) else [c[m]])]
        summary[m] = sum(values) / len(values)
    rec = {"bench": "counterfact", "data": "bench-data", "split": "edit", "n": N, "seed": 7, "subset": subset,
           "case_ids": [c["id"] for c in cases], "command": f"corsa bench single --subset {subset}",
           "model": "tiny", "method": method, "summary": summary, "cases": cases, "date": date,
           "timings": {"eval_s": 1.0}}
    if seed is not None:
        rec["config"] = {**METHODS[method.partition("@")[0]], "seed": seed, "epochs": 20, "lora_r": 32}
        rec["train"] = {"steps": 10 + seed}
        rec["timings"]["edit_s"] = 100.0 + seed
    return rec


def make_run(root, subset: int) -> tuple:
    """A run folder of one subset: base and both methods with three training seeds; returns it and its records."""
    rng = random.Random(subset)
    ids = [f"cf-{subset}-{i}" for i in range(N)]
    records = [record(subset, "base", None, [case(rng, i, 0.1) for i in ids], "2026-12-04T10:00:00+00:00")]
    for seed in SEEDS:
        for j, (method, skill) in enumerate((("lora", 0.4), ("corsa-rho0.5", 0.6))):
            records.append(record(subset, f"{method}@seed{seed}", seed, [case(rng, i, skill) for i in ids],
                                  f"2026-12-04T1{seed}:0{j}:00+00:00"))
    run = root / f"run-s{subset}"
    for r in records:
        (run / r["method"]).mkdir(parents=True)
        (run / r["method"] / "results.json").write_text(json.dumps(r))
    return run, records


@pytest.fixture
def runs(tmp_path):
    return [make_run(tmp_path, k) for k in (0, 1)]


def values(c: dict, metric: str) -> list:
    return c[metric] if isinstance(c[metric], list) else [c[metric]]


def test_summary_has_its_schema_and_no_answers(runs, tmp_path):
    run, _ = runs[0]
    path = tmp_path / "out" / "s0.json"
    written = write_summary(run, path, commit="abc1234", log="docs/log/rule.md")
    text = path.read_text()
    assert json.loads(text) == written == read_summary(path)
    assert written["schema"] == SCHEMA == "corsa-summary/1"
    assert "secret answer" not in text and "answers" not in text
    assert (written["bench"], written["split"], written["seed"], written["subset"], written["n"]) == \
        ("counterfact", "edit", 7, 0, N)
    assert written["commit"] == "abc1234" and written["log"] == "docs/log/rule.md"
    assert written["commands"] == ["corsa bench single --subset 0"]
    assert written["date"] == "2026-12-04T12:01:00+00:00"  # the last record written
    rows = {r["method"]: r for r in written["rows"]}
    assert written["rows"][0]["method"] == "base" and rows["base"]["training_seed"] is None
    assert rows["corsa-rho0.5@seed2"]["training_seed"] == 2
    assert rows["corsa-rho0.5@seed2"]["config"] == {"lr": 2e-3, "rho": 0.5, "lam": 1.0, "beta": 0.1,
                                                    "use_sam": True, "use_dpo": True, "epochs": 20}
    assert rows["lora@seed1"]["steps"] == 11 and rows["lora@seed1"]["edit_s"] == 101.0
    assert summarize(run)["commit"] is None  # the records carry none and HEAD now is not the run's code


def test_per_case_totals_reproduce_the_rates(runs):
    run, records = runs[1]
    summary = summarize(run)
    for rec, row in zip(sorted(records, key=lambda r: (r["method"] != "base", r["date"])), summary["rows"]):
        assert row["method"] == rec["method"] and len(row["cases"]) == N
        for m in COMPARED:
            total = sum(c[m][0] for c in row["cases"].values())
            count = sum(c[m][1] for c in row["cases"].values())
            assert total / count == pytest.approx(row["summary"][m], abs=1e-6)
            assert row["summary"][m] == rec["summary"][m]


def test_pooled_difference_is_the_hand_pooled_difference(runs):
    summaries = [summarize(run) for run, _ in runs]
    for metric in ("gen.generality", "tf.generality", "gen.reliability"):
        diff = {"lora": 0.0, "corsa-rho0.5": 0.0}
        count = 0
        for _, records in runs:
            for r in records:
                if r["method"] == "base":
                    continue
                vals = [x for c in r["cases"] for x in values(c, metric)]
                diff[r["method"].partition("@")[0]] += sum(vals)
                count += len(vals) if r["method"].startswith("lora") else 0
        expected = (diff["corsa-rho0.5"] - diff["lora"]) / count
        d = pooled_difference(summaries, "lora", "corsa-rho0.5", metric)
        assert d.estimate == pytest.approx(expected, abs=1e-6)
        assert d.cases == 2 * N and d.seeds == SEEDS and d.subsets == (0, 1)
        assert d.low <= d.estimate <= d.high and d.low < d.high
    # the bootstrap is seeded: the page is the same on every render
    again = pooled_difference(summaries, "lora", "corsa-rho0.5", "gen.generality")
    assert again == pooled_difference(summaries, "lora", "corsa-rho0.5", "gen.generality")


def test_a_seed_one_method_lacks_is_refused(runs):
    summaries = [summarize(run) for run, _ in runs]
    summaries[1]["rows"] = [r for r in summaries[1]["rows"] if r["method"] != "corsa-rho0.5@seed2"]
    with pytest.raises(ValueError, match="seed 2 is present for only one"):
        pooled_difference(summaries, "lora", "corsa-rho0.5", "gen.generality")
    # Narrowed to the seeds both have, on request: the same as the summaries cut down to those seeds.
    shared = pooled_difference(summaries, "lora", "corsa-rho0.5", "gen.generality", only_seeds=(0, 1))
    cut = [{**s, "rows": [r for r in s["rows"] if not r["method"].endswith("@seed2")]} for s in summaries]
    assert shared.seeds == (0, 1) and shared == pooled_difference(cut, "lora", "corsa-rho0.5", "gen.generality")


def test_seeds_that_differ_between_subsets_are_refused(runs):
    summaries = [summarize(run) for run, _ in runs]
    summaries[1]["rows"] = [r for r in summaries[1]["rows"] if not r["method"].endswith("@seed2")]
    with pytest.raises(ValueError, match="another subset"):
        pooled_difference(summaries, "lora", "corsa-rho0.5", "gen.generality")


def test_overlapping_subsets_are_refused(runs):
    one = summarize(runs[0][0])
    with pytest.raises(ValueError, match="overlap"):
        pooled_difference([one, one], "lora", "corsa-rho0.5", "gen.generality")


def test_a_sequence_run_is_not_summarised(tmp_path):
    (tmp_path / "run" / "lora").mkdir(parents=True)
    (tmp_path / "run" / "lora" / "results.json").write_text(json.dumps({"bench": "revise", "method": "lora",
                                                                         "runs": []}))
    with pytest.raises(ValueError, match="per-case"):
        summarize(tmp_path / "run")


def test_a_quantize_run_is_refused_in_one_line(tmp_path):
    (tmp_path / "run" / "unquantized").mkdir(parents=True)
    (tmp_path / "run" / "unquantized" / "results.json").write_text(json.dumps({"cases": [], "summary": {}}))
    with pytest.raises(ValueError, match="names no method"):
        summarize(tmp_path / "run")


PAGE = ("# Results\n\nHand-written opening, kept.\n\n<!-- generated: begin -->\nold table\n<!-- generated: end -->\n\n"
        "## Limitations\n\nKept too.\n")


def page_and_summaries(tmp_path, runs):
    page = tmp_path / "docs" / "RESULTS.md"
    results = tmp_path / "docs" / "results"
    page.parent.mkdir()
    page.write_text(PAGE)
    for k, (run, _) in enumerate(runs):
        write_summary(run, results / f"s{k}.json", commit="abc1234", log=str(tmp_path / "docs" / "log" / "r.md"))
    return page, results


def test_render_fills_only_the_generated_block(runs, tmp_path):
    page, results = page_and_summaries(tmp_path, runs)
    script = bench_script("results_page")
    assert script.main(["render", "--results", str(results), "--page", str(page)]) == 0
    text = page.read_text()
    head, rest = text.split("<!-- generated: begin -->")
    block, tail = rest.split("<!-- generated: end -->")
    assert head == PAGE.split("<!-- generated: begin -->")[0]
    assert tail == PAGE.split("<!-- generated: end -->")[1]
    assert "old table" not in block
    assert block.count("### counterfact `edit`, tiny, 2 disjoint subsets of 6 cases") == 1  # one study, one table
    assert "| corsa-rho0.5 | lr 0.002, ρ 0.5, λ" in block and "| base | - | - |" in block
    summaries = [read_summary(results / "s0.json"), read_summary(results / "s1.json")]
    d = pooled_difference(summaries, "lora", "corsa-rho0.5", "gen.generality")
    assert (f"corsa-rho0.5 minus lora, gen.generality, pooled over 3 seeds and 2 subsets: {100 * d.estimate:+.1f} "
            f"({100 * d.low:+.1f} to {100 * d.high:+.1f}), {2 * N} cases") in block
    # the generality cell: mean over seeds of each seed's rate pooled over both subsets' prompts
    per_seed = []
    for seed in SEEDS:
        hits = [x for _, records in runs for r in records if r["method"] == f"corsa-rho0.5@seed{seed}"
                for c in r["cases"] for x in c["gen.generality"]]
        per_seed.append(100 * sum(hits) / len(hits))
    cell = f"{sum(per_seed) / 3:.1f} ({' / '.join(f'{v:.1f}' for v in per_seed)})"
    corsa_row = next(line for line in block.splitlines() if line.startswith("| corsa-rho0.5 |"))
    assert corsa_row.split(" | ")[4] == cell  # method, settings, seeds, gen.reliability, gen.generality
    assert "`corsa bench single --subset 0`" in block and "`corsa bench single --subset 1`" in block
    assert "Commit: abc1234." in block and "[log/r.md](log/r.md)" in block and "[s1.json](results/s1.json)" in block
    # rendering twice changes nothing: the page is a function of the summaries
    assert script.main(["render", "--results", str(results), "--page", str(page)]) == 0
    assert page.read_text() == text


def test_an_unknown_schema_is_refused_in_one_line(runs, tmp_path, capsys):
    page, results = page_and_summaries(tmp_path, runs)
    (results / "future.json").write_text(json.dumps({"schema": "corsa-summary/2", "rows": []}))
    script = bench_script("results_page")
    capsys.readouterr()
    assert script.main(["render", "--results", str(results), "--page", str(page)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "future.json" in err and "corsa-summary/2" in err
    assert page.read_text() == PAGE


def test_a_page_without_markers_is_refused(runs, tmp_path):
    page, results = page_and_summaries(tmp_path, runs)
    page.write_text("# Results\n\nno markers\n")
    assert bench_script("results_page").main(["render", "--results", str(results), "--page", str(page)]) == 2
    assert page.read_text() == "# Results\n\nno markers\n"


def test_two_summaries_of_the_same_cases_are_refused(runs, tmp_path):
    page, results = page_and_summaries(tmp_path, runs)
    (results / "s0-again.json").write_text((results / "s0.json").read_text())
    assert bench_script("results_page").main(["render", "--results", str(results), "--page", str(page)]) == 2
    assert page.read_text() == PAGE


def test_compare_reads_a_summary_and_a_run_folder_alike(runs, tmp_path, capsys):
    """`compare` is how a rule's decision is read: one line per metric with the pooled difference and each seed's
    rates, from a committed summary for one subset and a run folder for the other."""
    main = bench_script("results_page").main
    (run0, _), (run1, _) = runs
    saved = tmp_path / "sub0.json"
    write_summary(run0, saved)
    assert main(["compare", str(saved), str(run1), "--a", "lora", "--b", "corsa-rho0.5",
                 "--metrics", "gen.generality,gen.reliability"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[0].startswith("gen.generality: ") and out[1].startswith("gen.reliability: ")
    d = pooled_difference([summarize(run0), summarize(run1)], "lora", "corsa-rho0.5", "gen.generality")
    assert f"{100 * d.estimate:+.1f} ({100 * d.low:+.1f} to {100 * d.high:+.1f}), {2 * N} cases" in out[0]
    assert "seeds 0, 1, 2, subsets 0, 1" in out[0] and out[0].count(" / ") == 4  # three seeds' rates per setting
    assert main(["compare", str(run1), "--a", "lora", "--b", "nope"]) == 2  # an unknown row: one line, exit 2
    assert "has no rows of nope" in capsys.readouterr().err


def test_compare_b_from_pairs_the_same_setting_run_by_other_code_case_by_case(runs, tmp_path, capsys):
    """`--b-from`: setting b read from another run of the same cases (a rule's new code against its old), paired
    case by case and pooled over seeds and subsets exactly as two settings of one run are."""
    main = bench_script("results_page").main
    # the "new code" runs: corsa's cases written under lora's names, so new-lora minus old-lora is corsa minus lora
    others = []
    for run, records in runs:
        other = tmp_path / f"{run.name}-new"
        for r in records:
            name = r["method"].replace("lora", "corsa-rho0.5") if r["method"].startswith("lora") else r["method"]
            twin = next(x for x in records if x["method"] == name)
            (other / r["method"]).mkdir(parents=True)
            (other / r["method"] / "results.json").write_text(json.dumps({**twin, "method": r["method"],
                                                                          "config": r.get("config")}))
        others.append(str(other))
    folders = [str(run) for run, _ in runs]
    assert main(["compare", *folders, "--a", "lora", "--b", "lora", "--b-from", *others,
                 "--metrics", "gen.generality"]) == 0
    got = capsys.readouterr().out.strip()
    d = pooled_difference([summarize(run) for run, _ in runs], "lora", "corsa-rho0.5", "gen.generality")
    assert got.startswith(f"gen.generality: {100 * d.estimate:+.1f} ({100 * d.low:+.1f} to {100 * d.high:+.1f}), "
                          f"{2 * N} cases, seeds 0, 1, 2, subsets 0, 1")
    # a run against itself moves nothing; one run too few, or another run's cases, is refused in one line
    assert main(["compare", *folders, "--a", "lora", "--b", "lora", "--b-from", *folders,
                 "--metrics", "gen.generality"]) == 0
    assert "+0.0 (+0.0 to +0.0)" in capsys.readouterr().out
    assert main(["compare", *folders, "--a", "lora", "--b", "lora", "--b-from", folders[0]]) == 2
    assert "--b-from names 1 runs for 2 inputs" in capsys.readouterr().err
    assert main(["compare", folders[0], "--a", "lora", "--b", "lora", "--b-from", folders[1]]) == 2
    assert "differs from summary 0 in subset" in capsys.readouterr().err


def test_summaries_of_other_seeds_merge_into_the_study_they_continue(runs, tmp_path, capsys):
    """A study goes on after its first folder is gone: a committed summary of seed 0 and a new folder with seeds 1
    and 2 of the same cases merge into one summary that pools exactly as the whole run does."""
    main = bench_script("results_page").main
    (run0, records), _ = runs
    first, rest = tmp_path / "seed0", tmp_path / "seeds12"
    for r in records:
        seed = (r.get("config") or {}).get("seed")
        for folder in ((first,) if seed == 0 else (rest,) if seed else (first, rest)):  # base in both
            (folder / r["method"]).mkdir(parents=True)
            (folder / r["method"] / "results.json").write_text(json.dumps(r))
    saved = tmp_path / "study.json"
    write_summary(first, saved, log="docs/log/first.md", commit="aaa1111, bbb2222")  # itself merged before
    assert main(["summarize", str(saved), str(rest), "--out", str(saved), "--log", "docs/log/later.md",
                 "--commit", "bbb2222"]) == 0
    merged = read_summary(saved)
    whole = summarize(run0)
    assert merged["log"] == "docs/log/later.md"
    assert merged["commit"] == "aaa1111, bbb2222"  # each commit once, however often merged
    assert sorted(r["method"] for r in merged["rows"]) == sorted(r["method"] for r in whole["rows"])
    for metric in ("gen.generality", "gen.reliability"):
        assert pooled_difference([merged], "lora", "corsa-rho0.5", metric) == \
            pooled_difference([whole], "lora", "corsa-rho0.5", metric)
    # the same seed twice, or other cases, would be counted wrongly: refused in one line, nothing written
    before = saved.read_text()
    assert main(["summarize", str(saved), str(rest), "--out", str(saved)]) == 2
    assert "training seed 1 is in summary 1 and an earlier one" in capsys.readouterr().err
    assert main(["summarize", str(saved), str(runs[1][0]), "--out", str(tmp_path / "x.json")]) == 2
    assert "differs from summary 0 in subset" in capsys.readouterr().err
    assert saved.read_text() == before and not (tmp_path / "x.json").exists()


def test_paired_runs_pool_the_same_rows_of_two_evaluations_case_by_case(runs, tmp_path):
    paired = bench_script("paired_runs")
    (run0, records0), (run1, records1) = runs
    rows = ["lora@seed0", "lora@seed2"]
    # each folder against itself: nothing changes
    same = paired.compare([(str(run0), str(run0)), (str(run1), str(run1))], rows, ["gen.generality"])
    assert same[0].startswith("4 rows") and same[1].startswith("gen.generality: +0.0 (+0.0 to +0.0)")
    # B is lora's cases, A corsa's, written under lora's names: B minus A is lora minus corsa, pooled over
    # prompts of every case of both subsets and both rows
    swapped = []
    for run, records in runs:
        other = tmp_path / f"{run.name}-corsa-as-lora"
        for seed in (0, 2):
            corsa = next(r for r in records if r["method"] == f"corsa-rho0.5@seed{seed}")
            (other / f"lora@seed{seed}").mkdir(parents=True)
            (other / f"lora@seed{seed}" / "results.json").write_text(json.dumps({**corsa, "method": f"lora@seed{seed}"}))
        swapped.append((str(other), str(run)))
    lines = paired.compare(swapped, rows, ["gen.generality"])
    pick = [r for rs in (records0, records1) for r in rs]
    a = [x for r in pick if r["method"] in ("corsa-rho0.5@seed0", "corsa-rho0.5@seed2")
         for c in r["cases"] for x in values(c, "gen.generality")]
    b = [x for r in pick if r["method"] in rows for c in r["cases"] for x in values(c, "gen.generality")]
    assert lines[1].startswith(f"gen.generality: {100 * (sum(b) / len(b) - sum(a) / len(a)):+.1f} (")
    assert "24 case units" in lines[1]

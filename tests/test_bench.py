"""`corsa bench` on a tiny local model and synthetic benchmark files: every metric, table = JSON, resumable."""

from __future__ import annotations

import json

import pytest

from corsa.cli import main
from corsa.errors import InputError
from corsa.evaluate.metrics import METRICS
from corsa.evaluate.runner import commands_line, format_table, load_results, parse_method, select_cases
from corsa.requests import EditRequest


def counterfact(folder, n=6):
    recs = [{"case_id": i, "prompt": f"p{i} lives in", "target_new": f"x{i}", "subject": f"p{i}",
             "ground_truth": f"y{i}", "rephrase_prompt": f"p{i} resides in", "locality_prompt": f"q{i} lives in",
             "locality_ground_truth": f"z{i}"} for i in range(n)]
    (folder / "counterfact").mkdir()
    (folder / "counterfact" / "easyedit-counterfact-edit.json").write_text(json.dumps(recs))


@pytest.mark.integration
def test_single_bench_writes_every_metric_and_a_matching_table(tmp_path, tiny_dir, capsys):
    counterfact(tmp_path)
    out = tmp_path / "res"
    argv = ["bench", "single", "--bench", "counterfact", "--data", str(tmp_path), "--out", str(out), "--n", "4",
            "--methods", "lora,corsa", "--model", str(tiny_dir), "--epochs", "1", "--mmlu-n", "0", "--quiet",
            "--max-new-tokens", "4", "--sample-runs", "2"]
    assert main(argv) == 0
    results = load_results(out)
    assert [r["method"] for r in results] == ["base", "lora", "lora-routed", "corsa", "corsa-routed"]
    for r in results:
        assert set(METRICS) <= set(r["summary"]) and r["n"] == 4 and len(r["case_ids"]) == 4
        assert {"sample.reliability", "sample.generality"} <= set(r["summary"])
        assert len(r["cases"]) == 4
    assert results[0]["summary"]["gen.locality_agreement"] == 1.0  # the base model agrees with itself
    assert results[0]["summary"]["gen.neighbor_edit_target"] == 0.0  # and gave no new target it had not given
    assert all(c["neighborhood_truth"] == [f"z{c['id'][3:]}"] for r in results for c in r["cases"])
    assert results[3]["config"]["use_sam"] and not results[1]["config"]["use_sam"]
    assert results[2]["routing"]["layer"] == 1 and not results[2]["routing"]["unscoped"]  # keys from subjects
    assert set(results[2]["routing"]["routed_share"]) == {"prompt", "paraphrases", "neighborhood"}
    table = (out / "table.md").read_text()
    assert table.strip() == format_table(results)
    header = [c.strip() for c in table.splitlines()[0].split("|")[1:-1]]
    assert header[:6] == ["method", "gen.reliability", "gen.generality", "gen.locality", "gen.locality_agreement",
                          "gen.neighbor_edit_target"]  # locality beside edit success and generality
    corsa_row = next(line for line in table.splitlines() if line.startswith("| corsa |"))
    assert f"{100 * results[3]['summary']['gen.reliability']:.1f}" in corsa_row
    assert (out / "plot.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(argv) == 0  # rerun: everything done, nothing retrained
    assert capsys.readouterr().out.count("done earlier, skipped") == 2


def test_older_records_get_the_neighbour_metric_from_their_benchmark_file(tmp_path):
    """Records written before gen.neighbor_edit_target kept no true answers: the table reads them again from the
    benchmark file the record names, and compares with the unedited model's stored answers."""
    counterfact(tmp_path, n=3)  # neighbour i: "q{i} lives in", true answer z{i}; edit i's target x{i}

    def record(method, date, neighbors, paraphrases):
        cases = [{"id": f"cf-{i}", "target_new": f"x{i}", "answers": {"prompt": "", "paraphrases": [p],
                                                                        "neighborhood": [a]},
                  "gen.reliability": True, "gen.generality": [False], "gen.locality": [f"z{i}" in a]}
                 for i, (a, p) in enumerate(zip(neighbors, paraphrases))]
        return {"method": method, "date": date, "bench": "counterfact", "data": str(tmp_path), "split": "edit",
                "n": 3, "seed": 0, "model": "tiny", "command": "c", "case_ids": [c["id"] for c in cases],
                "summary": {"gen.reliability": 1.0, "gen.generality": 0.0, "gen.locality": 1 / 3}, "cases": cases}

    out = tmp_path / "run"
    for r in (record("base", "1", ["z0", "x1 or z1", "no idea"], ["a", "b", "c"]),
              record("corsa", "2", ["x2", "x1", "z2"], ["x1", "b", "c"])):
        (out / r["method"]).mkdir(parents=True)
        (out / r["method"] / "results.json").write_text(json.dumps(r))
    base, corsa = load_results(out)
    # case 0: another edit's target, new; case 1: x1 was in the unedited answer; case 2: its true answer
    assert [c["gen.neighbor_edit_target"] for c in corsa["cases"]] == [[True], [False], [False]]
    assert corsa["summary"]["gen.neighbor_edit_target"] == pytest.approx(1 / 3)
    assert base["summary"]["gen.neighbor_edit_target"] == 0.0 and corsa["summary"]["gen.other_target"] == 1 / 3
    table = format_table([base, corsa])
    assert table.splitlines()[0].startswith("| method | gen.reliability | gen.generality | gen.locality | "
                                            "gen.neighbor_edit_target |")  # no agreement stored: no column
    assert "| corsa | 100.0 | 0.0 | 33.3 | 33.3 |" in table
    # the benchmark file gone: the metric is left out, not guessed
    (tmp_path / "counterfact" / "easyedit-counterfact-edit.json").unlink()
    assert all("gen.neighbor_edit_target" not in r["summary"] for r in load_results(out))


def test_results_page_shows_neighbours_given_an_edit_target_when_a_summary_has_it():
    from conftest import bench_script

    page = bench_script("results_page")

    def row(method, seed, summary):
        return {"method": method, "training_seed": seed, "config": {}, "summary": summary, "cases": {},
                "steps": None, "edit_s": None}

    older = {"rows": [row("base", None, {"gen.reliability": 0.1}), row("lora", 0, {"gen.reliability": 1.0})]}
    assert "gen.neighbor_edit_target" not in page.table([older])[0]  # committed pages stay as they were
    newer = {"rows": [row("base", None, {"gen.reliability": 0.1, "gen.neighbor_edit_target": 0.0}),
                      row("lora", 0, {"gen.reliability": 1.0, "gen.neighbor_edit_target": 0.25})]}
    lines = page.table([newer])
    assert lines[0].startswith("| method | settings | training seeds | gen.reliability | gen.neighbor_edit_target |")
    assert lines[3].startswith("| lora | - | 0 | 100.0 | 25.0 |")


def test_table_names_the_command_of_every_row():
    rows = [{"method": "base", "command": "corsa bench single --methods lora"},
            {"method": "lora", "command": "corsa bench single --methods lora"},
            {"method": "flearning", "command": "corsa bench single --methods lora,flearning"}]
    assert commands_line(rows[:2]) == "Command: `corsa bench single --methods lora`"
    assert commands_line(rows) == ("Commands: `corsa bench single --methods lora` (base, lora); "
                                   "`corsa bench single --methods lora,flearning` (flearning)")


def test_method_specs():
    assert parse_method("corsa-no-dpo") == ("corsa", {"use_dpo": False, "pcgrad": None})
    assert parse_method("corsa-lambda0.5") == ("corsa", {"lam": 0.5})
    assert parse_method("corsa-rho0.2") == ("corsa", {"rho": 0.2})
    assert parse_method("memit-weight1500") == ("memit", {"mom2_update_weight": 1500.0})
    assert parse_method("memit-layers2-5") == ("memit", {"layers": (2, 3, 4, 5)})
    with pytest.raises(InputError, match="memit-layers<first>-<last>"):
        parse_method("memit-layers5-2")
    with pytest.raises(InputError):
        parse_method("corsa-rhox")
    with pytest.raises(InputError):
        parse_method("corsa-lambdax")
    assert parse_method("corsa-rho0.5@seed2") == ("corsa", {"rho": 0.5, "seed": 2})
    assert parse_method("lora@seed1") == ("lora", {"seed": 1})
    assert parse_method("corsa-rho0.5+lambda2") == ("corsa", {"rho": 0.5, "lam": 2.0})
    assert parse_method("corsa-no-pcgrad+rho0.5+beta0.2@seed1") == (
        "corsa", {"pcgrad": None, "rho": 0.5, "beta": 0.2, "seed": 1})
    assert parse_method("memit-weight150+layers2-3") == ("memit", {"mom2_update_weight": 150.0, "layers": (2, 3)})
    with pytest.raises(InputError, match="not a setting of corsa"):
        parse_method("corsa-rho0.5+no-sam")  # named variants are not settings
    with pytest.raises(InputError, match="not a setting of lora"):
        parse_method("lora+rho0.5")
    with pytest.raises(InputError, match="twice"):
        parse_method("corsa-rho0.5+rho1")
    with pytest.raises(InputError):
        parse_method("corsa-rho0.5+lambdax")
    with pytest.raises(InputError):
        parse_method("lora@seedx")


def test_training_seeds_repeat_each_method_on_the_same_cases(tmp_path, tiny_dir):
    counterfact(tmp_path)
    out = tmp_path / "res"
    assert main(["bench", "single", "--bench", "counterfact", "--data", str(tmp_path), "--out", str(out), "--n", "3",
                 "--methods", "lora", "--train-seeds", "0,1", "--model", str(tiny_dir), "--epochs", "1",
                 "--mmlu-n", "0", "--quiet", "--max-new-tokens", "2"]) == 0
    results = load_results(out)
    assert [(r["method"], r.get("config", {}).get("seed")) for r in results] == [
        ("base", None), ("lora", 0), ("lora-routed", 0), ("lora@seed1", 1), ("lora-routed@seed1", 1)]
    assert results[1]["case_ids"] == results[3]["case_ids"]
    table = (out / "table.md").read_text()
    assert "Across training seeds (same cases; points):\n- lora, training seeds 0, 1:" in table
    assert "- lora-routed, training seeds 0, 1:" in table  # routed rows grouped on their own


def test_mquake_subset_keeps_cases_whole():
    reqs = [EditRequest(f"q{c}-{k}", "a", meta={"case_id": c}) for c in range(5) for k in range(3)]
    chosen = select_cases(reqs, 4, 0, "mquake")
    assert len(chosen) == 6 and len({r.meta["case_id"] for r in chosen}) == 2
    assert select_cases(reqs, 4, 0, "zsre") == select_cases(reqs, 4, 0, "zsre")


def test_sweep_values_must_be_numbers(tmp_path, capsys):
    argv = ["bench", "ablation", "--bench", "counterfact", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
            "--rho", "0.1,big"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--rho" in err and "'big'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.integration
def test_speed_bench_times_every_part_and_counts_flops(tmp_path, tiny_dir, capsys, monkeypatch):
    from corsa import scoring

    monkeypatch.setattr(scoring, "bf16_is_fast", lambda device_type: False)  # a CPU without native bf16
    recs = [{"case_id": i, "prompt": f"p{i} lives in", "target_new": f"x{i}", "subject": f"p{i}",
             "ground_truth": f"y{i}", "rephrase_prompt": "r", "locality_prompt": "l", "locality_ground_truth": "z"}
            for i in range(4)]
    (tmp_path / "counterfact").mkdir()
    (tmp_path / "counterfact" / "easyedit-counterfact-val.json").write_text(json.dumps(recs))
    assert main(["bench", "speed", "--data", str(tmp_path), "--out", str(tmp_path / "s"), "--models", str(tiny_dir),
                 "--steps", "2", "--batch-size", "4", "--bf16"]) == 0
    record = json.loads((tmp_path / "s" / "speed.json").read_text())
    (r,) = record["results"]
    assert r["bf16"] is False and record["versions"]["cpu"]  # what the parts really ran in, and on what
    assert "bf16 asked for but not fast here, so fp32" in (tmp_path / "s" / "speed.md").read_text()
    assert {"lora_step", "corsa_step", "forward", "forward_1_backward", "forward_2_backwards", "reference_logprobs",
            "pcgrad", "sam_perturb_restore", "gradients_one_sam_point"} <= set(r["seconds"])
    assert all(v > 0 for v in r["seconds"].values())
    assert r["ratio_corsa_over_lora"] == r["seconds"]["corsa_step"] / r["seconds"]["lora_step"]
    # A CoRSA step is two gradient points with y- rows: more matrix work than a LoRA step, counted not guessed.
    assert r["flops"]["corsa_step"] > 2 * r["flops"]["lora_step"] > 0 and r["matmul_flops_per_s"] > 0
    assert "CoRSA step / LoRA step" in (tmp_path / "s" / "speed.md").read_text()

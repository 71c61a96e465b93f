"""`corsa bench code` (issue 30): prompts, code extraction, scoring through the real sandbox, and a whole run on
the tiny model."""

from __future__ import annotations

import json

import pytest
from test_code import SOLUTION, record, small

from corsa import editing, presets
from corsa.cli import main
from corsa.errors import InputError
from corsa.evaluate.code import load_arena, split_programs
from corsa.evaluate.codebench import (
    CodeBenchConfig,
    edit_request,
    extract_code,
    fenced,
    held_out,
    humaneval_program,
    needs_update,
    problem_prompt,
    select_updates,
    spass_rows,
    upass_rows,
    update_text,
)
from corsa.requests import EditRequest

PROBLEM = {"task_id": "Test/0", "entry_point": "add",
           "prompt": 'def add(a, b):\n    """Return a + b."""\n',
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}


@pytest.mark.parametrize("answer, expected", [
    ("Here it is:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1"),
    ("```py\nx = 1\n```", "x = 1"),
    ("```\nx = 2\n```", "x = 2"),
    ("```python\ndef f():\n    return 1", "def f():\n    return 1"),  # cut off before the closing fence
    ("def f():\n    return 3\n", "def f():\n    return 3"),  # no fence: the whole answer
    ("```python\nfirst = 1\n```\n```python\nsecond = 2\n```", "first = 1"),
])
def test_extract_code(answer, expected):
    assert extract_code(answer) == expected


def test_prompt_hides_the_update_and_prepend_tells_it(tmp_path):
    update = small(tmp_path, description="math.sin takes a unit argument now", docstring="unit: 'degrees' or ...")
    train, _ = split_programs(update)
    prompt = problem_prompt(train)
    assert "takes a unit argument" not in prompt and "unit: 'degrees'" not in prompt
    assert train.solution_signature in prompt and "old_sin = math.sin" in prompt  # the imports the code starts with
    told = update_text(update)
    assert "takes a unit argument" in told and "unit: 'degrees'" in told and "math.sin(x, unit)" in told


def test_training_example_becomes_an_edit(tmp_path):
    update = small(tmp_path)
    train, _ = split_programs(update)
    request = edit_request(update, train, "def halfway(d):\n    return 0")
    assert request.target_new == fenced(SOLUTION) and extract_code(request.target_new) == SOLUTION.strip("\n")
    assert request.id == train.prog_syn_id and request.old_mined and request.meta["update_id"] == update.update_id
    assert edit_request(update, train).target_old is None


def test_updates_are_a_seeded_subset(tmp_path):
    lines = [json.dumps(record(update_id=f"[math.sin]:[add-argument]:[update-{i}]")) for i in range(6)]
    (tmp_path / "arena.jsonl").write_text("\n".join(lines) + "\n")
    updates = load_arena(tmp_path / "arena.jsonl")
    a, b = select_updates(updates, 3, 0), select_updates(updates, 3, 1)
    assert len(a) == 3 and a == select_updates(updates, 3, 0) and a != b
    assert [u.update_id for u in a] == sorted(u.update_id for u in a)  # file order


def cfg(tmp_path) -> CodeBenchConfig:
    return CodeBenchConfig(data=str(tmp_path), workers=2)


def test_reference_passes_and_old_api_program_fails(tmp_path):
    """UPass through the sandbox: the reference passes, the same code with the old call fails, and only
    examples that need the update are measured."""
    update = small(tmp_path)
    needed = needs_update([update], cfg(tmp_path))
    held = held_out([update], needed)
    assert len(held) == 2 and all(needed.values())  # prog_syn-1 and -2; the reference uses unit=
    old_style = "import math\n\ndef halfway(d):\n    return round(math.sin(d / 2), 6)\n"  # as if still radians
    rows = upass_rows(held, [[fenced(SOLUTION)] * 5, [fenced(old_style)] * 4 + ["no code at all"]], cfg(tmp_path))
    assert [r["c"] for r in rows] == [5, 0]
    assert rows[0]["pass@1"] == 1.0 and rows[0]["pass@5"] == 1.0 and rows[1]["pass@5"] == 0.0
    assert rows[0]["status"] == {"passed": 5} and rows[1]["status"]["failed"] == 5


def test_example_the_old_api_passes_is_not_measured(tmp_path):
    update = small(tmp_path, implementation="def sin(x, unit='radians'):\n    return old_sin(x)\n",
                   update_type="modify-output-semantics")
    tests = "def test_plain():\n    assert round(math.sin(0), 6) == 0.0\n"
    update = update.__class__(**{**update.__dict__, "programs": tuple(
        p.__class__(**{**p.__dict__, "unit_tests": tests, "ref_solution": "import math\n"}) for p in update.programs)})
    needed = needs_update([update], cfg(tmp_path))
    assert not any(needed.values()) and held_out([update], needed) == []


def test_humaneval_answers_as_function_or_body(tmp_path):
    answers = [["```python\ndef add(a, b):\n    return a + b\n```", "    return a + b\n", "    return a - b\n",
                "```python\nimport os\nos.kill(os.getppid(), 9)\n```", "while True: pass"]]
    [row] = spass_rows([PROBLEM], answers, CodeBenchConfig(data=str(tmp_path), workers=2, limits=short_limits()))
    assert row["c"] == 2 and row["pass@1"] == pytest.approx(0.4)
    assert "passed" in row["status"] and sum(row["status"].values()) == 5


def short_limits():
    from dataclasses import replace

    from corsa.evaluate.code import LIMITS

    return replace(LIMITS, wall_s=5.0, cpu_s=3)  # the infinite loop need not take 20 s


def test_humaneval_program_keeps_the_prompt_imports():
    problem = {**PROBLEM, "prompt": "from typing import List\n\n" + PROBLEM["prompt"]}
    text = humaneval_program(problem, "```python\ndef add(a, b):\n    return a + b\n```")
    assert text.startswith("from typing import List") and text.rstrip().endswith("check(add)")


def test_config_refuses_what_pass_at_5_cannot_use(tmp_path):
    with pytest.raises(InputError, match="pass@5"):
        CodeBenchConfig(data=str(tmp_path), samples=3)
    with pytest.raises(InputError, match="temperature"):
        CodeBenchConfig(data=str(tmp_path), temperature=0.0)


def test_code_preset_is_the_papers():
    chosen = presets.choose("auto", "smollm2-135m", "code")
    assert chosen is presets.PAPER_CODE and presets.choose("paper", None, "code") is presets.PAPER_CODE
    for method in ("lora", "corsa", "flearning"):
        assert chosen.for_method(method) == {"lora_r": 128, "lora_alpha": 256, "lr": 2e-5}
    assert presets.choose("paper", None, "edit") is presets.PAPER


def without_old(recorded: dict) -> EditRequest:
    """A manifest's edit as the user gave it: its old answer was mined by the model."""
    return EditRequest(**{k: v for k, v in recorded.items() if k not in ("target_old", "old_mined")})


@pytest.mark.integration
def test_bench_code_runs_every_row(tmp_path, tiny_dir, capsys):
    records = [record(update_id=f"[math.sin]:[add-argument]:[update-{i}]") for i in range(2)]
    for r in records:  # short enough for the tiny model's 256-token context
        for example in r["prog_syn_examples"]:
            example.update(ref_solution="def halfway(d):\n    return math.sin(d/2, unit='degrees')",
                           solution_signature="halfway(d)")
    (tmp_path / "arena.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "run"
    args = ["bench", "code", "--data", str(tmp_path / "arena.jsonl"), "--out", str(out), "--n", "2",
            "--methods", "base,prepend,lora,flearning,corsa", "--max-new-tokens", "6", "--humaneval-n", "2",
            "--epochs", "1", "--model", str(tiny_dir), "--quiet"]
    assert main(args) == 0
    rows = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/results.json")}
    assert set(rows) == {"base", "prepend", "lora", "flearning", "corsa"}
    for r in rows.values():
        assert len(r["upass"]) == 4 and len(r["spass"]) == 2  # 2 updates x 2 held-out examples; 2 problems
        assert all(row["n"] == 5 and len(row["answers"]) == 5 for row in r["upass"] + r["spass"])
        assert set(r["summary"]) == {"upass@1", "upass@5", "spass@1", "spass@5", "tf.ref_logprob"}
    assert rows["lora"]["config"]["lora_r"] == 128 and rows["lora"]["config"]["lr"] == 2e-5  # the paper's code setting
    assert rows["corsa"]["config"]["lora_alpha"] == 256
    # The mined old answer is the base model's program, recorded in the adapter's manifest.
    manifest = json.loads((out / "corsa" / "adapter" / "edit_manifest.json").read_text())
    assert len(manifest["mined_old_answers"]) == 2
    assert all(i.endswith("[prog_syn-0]") for i in manifest["mined_old_answers"])  # no held-out example trained
    table = (out / "table.md").read_text()
    assert "| base |" in table and "corsa minus lora" in table and (out / "plot.png").stat().st_size > 0
    capsys.readouterr()
    assert main(args) == 0 and capsys.readouterr().out.count("done earlier, skipped") == 5
    # A row stopped during its evaluation goes on from its trained adapter: loaded, not trained again.
    adapter = out / "corsa" / "adapter"
    written = (adapter / "adapter_model.safetensors").stat().st_mtime_ns
    (out / "corsa" / "results.json").unlink()
    assert main(args) == 0 and "loaded instead of trained again" in capsys.readouterr().out
    again = json.loads((out / "corsa" / "results.json").read_text())
    assert (adapter / "adapter_model.safetensors").stat().st_mtime_ns == written
    assert again["train"]["edit_s"] == manifest["wall_time_s"] and again["upass"] == rows["corsa"]["upass"]
    # Only the very same edit is reused: another setting, other edits or a changed file train again.
    trained = editing.trained_earlier([without_old(e) for e in manifest["edits"]], adapter, method="corsa",
                                      model=str(tiny_dir), scenario="code", route=None, epochs=1)
    assert trained is not None and [r.target_old for r in trained] == [e["target_old"] for e in manifest["edits"]]
    assert editing.trained_earlier(trained, adapter, method="corsa", model=str(tiny_dir), scenario="code",
                                   route=None, epochs=2) is None
    assert editing.trained_earlier(trained[:1], adapter, method="corsa", model=str(tiny_dir), scenario="code",
                                   route=None, epochs=1) is None
    assert editing.trained_earlier(trained, adapter, method="lora", model=str(tiny_dir), scenario="code",
                                   route=None, epochs=1) is None
    (adapter / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text() + " ")
    assert editing.trained_earlier(trained, adapter, method="corsa", model=str(tiny_dir), scenario="code",
                                   route=None, epochs=1) is None
    # Other problems into the same folder would mix two runs in one table: refused, nothing changed.
    before = sorted(p.name for p in out.iterdir())
    assert main([*args[:-1], "--humaneval-n", "1", "--quiet"]) == 2
    assert "other problems" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == before


def test_bench_code_refuses_bad_input_before_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["bench", "code", "--data", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.jsonl" in err and "\n" not in err and not out.exists()
    assert main(["bench", "code", "--data", str(tmp_path), "--out", str(out), "--samples", "2"]) == 2
    assert "pass@5" in capsys.readouterr().err and not out.exists()
    assert main(["bench", "code", "--data", str(tmp_path), "--out", str(out), "--methods", "nosuch"]) == 2
    assert not out.exists()

"""CodeUpdateArena (issue 30): the loader and its errors, program assembly on real records, pass@k, the split,
and reference solutions run through the real sandbox."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from conftest import DATA

from corsa.errors import InputError
from corsa.evaluate.code import (
    ApiUpdate,
    Program,
    installation,
    load_arena,
    pass_at_k,
    passes,
    program_text,
    run_program,
    split_programs,
    unit_test_names,
)

ARENA = DATA / "codeupdatearena" / "arena.jsonl"

UNIT_TESTS = "def test_degrees():\n    assert halfway(180) == 1.0\n\ndef test_zero():\n    assert halfway(0) == 0.0\n"
SOLUTION = "import math\n\ndef halfway(d):\n    return round(math.sin(d / 2, unit='degrees'), 6)\n"


def record(**changes) -> dict:
    """A small valid arena.jsonl record (math.sin gains a unit argument); `changes` replace update fields."""
    update = {
        "update_id": "[math.sin]:[add-argument]:[update-0]", "package": "math", "function_path": "math.sin",
        "description": "math.sin takes degrees", "rationale": "", "docstring": "", "signature": "math.sin(x, unit)",
        "imports": "import math\nold_sin = math.sin",
        "implementation": "def sin(x, unit='radians'):\n    return old_sin(math.radians(x) if unit == 'degrees' else x)\n",
        "update_type": "add-argument",
    }
    update.update(changes)
    examples = [{"prog_syn_id": f"{update['update_id']}:[prog_syn-{i}]", "scenario": "s", "problem": "p",
                 "solution_signature": "def halfway(d):", "unit_tests": UNIT_TESTS,
                 "prog_syn_imports": update["imports"], "ref_solution": SOLUTION} for i in range(3)]
    return {"update": update, "prog_syn_examples": examples}


def write(tmp_path, *lines: str):
    path = tmp_path / "arena.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def small(tmp_path, **changes) -> ApiUpdate:
    return load_arena(write(tmp_path, json.dumps(record(**changes))))[0]


@pytest.fixture(scope="module")
def arena() -> dict[str, ApiUpdate]:
    if not ARENA.is_file():
        pytest.skip(f"CodeUpdateArena is not at {ARENA}")
    return {u.update_id: u for u in load_arena(ARENA)}


# --- loading ----------------------------------------------------------------------------------------------------
def test_loads_a_record(tmp_path):
    update = small(tmp_path)
    assert update.function_path == "math.sin" and len(update.programs) == 3
    assert update.programs[0].imports == "import math\nold_sin = math.sin"  # from prog_syn_imports


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file") as caught:
        load_arena(tmp_path / "nope.jsonl")
    assert caught.value.path == str(tmp_path / "nope.jsonl")


def test_bad_json_names_the_line(tmp_path):
    path = write(tmp_path, json.dumps(record()), "{not json")
    with pytest.raises(InputError, match="invalid JSON") as caught:
        load_arena(path)
    assert (caught.value.path, caught.value.line) == (str(path), 2)


@pytest.mark.parametrize("drop, field", [
    (lambda r: r["update"].pop("implementation"), "update.implementation"),
    (lambda r: r["prog_syn_examples"][1].pop("unit_tests"), "prog_syn_examples[1].unit_tests"),
    (lambda r: r.pop("prog_syn_examples"), "prog_syn_examples"),
])
def test_missing_field_names_line_and_field(tmp_path, drop, field):
    bad = record()
    drop(bad)
    with pytest.raises(InputError, match="is required") as caught:
        load_arena(write(tmp_path, json.dumps(record()), json.dumps(bad)))
    assert (caught.value.line, caught.value.field) == (2, field)


@pytest.mark.parametrize("changes, field, message", [
    ({"implementation": "def a(): pass\ndef b(): pass\n"}, "update.implementation", "exactly one"),
    ({"implementation": "def cos(x): pass\n"}, "update.implementation", "keeps the name 'sin'"),
    ({"update_type": "deprecate-function"}, "update.update_type", "not an update type"),
    ({"function_path": "sin"}, "update.function_path", "package"),
    ({"docstring": 3}, "update.docstring", "must be a string"),
])
def test_records_that_cannot_make_a_program_are_refused(tmp_path, changes, field, message):
    with pytest.raises(InputError, match=message) as caught:
        small(tmp_path, **changes)
    assert (caught.value.line, caught.value.field) == (1, field)


def test_unit_tests_must_parse(tmp_path):
    bad = record()
    bad["prog_syn_examples"][0]["unit_tests"] = "def test_x(:\n"
    with pytest.raises(InputError, match="not valid Python") as caught:
        load_arena(write(tmp_path, json.dumps(bad)))
    assert caught.value.field == "prog_syn_examples[0].unit_tests"


def test_duplicate_ids_are_refused(tmp_path):
    with pytest.raises(InputError, match="already used on line 1") as caught:
        load_arena(write(tmp_path, json.dumps(record()), json.dumps(record())))
    assert (caught.value.line, caught.value.field) == (2, "update.update_id")


def test_unit_test_names_skips_helpers_and_fixtures():
    source = "def helper():\n    pass\n\ndef test_a():\n    pass\n\ndef test_b(tmp_path):\n    pass\n"
    assert unit_test_names(source) == ["test_a"]


# --- assembling programs from real records ----------------------------------------------------------------------
def test_in_place_update_replaces_the_function(arena):
    update = arena["[math.sin]:[modify-output-semantics]:[update-0]"]
    assert installation(update) == "math.sin = sin"
    program = update.programs[0]
    new, old = program_text(update, program, "SOLUTION"), program_text(update, program, "SOLUTION", new_api=False)
    # Imports, the implementation, the install, then the solution: a solution's `from math import sin` must
    # already see the new function.
    order = [new.index(part) for part in (program.imports, "def sin(x, unit='radians')", "math.sin = sin",
                                          "SOLUTION", "def test_calculate_sine_for_zero")]
    assert order == sorted(order)
    assert "math.sin = sin" not in old and "def sin(x, unit='radians')" in old
    assert new.rstrip().endswith("test_calculate_sine_for_non_integer_values])")


def test_renamed_function_loses_its_old_name(arena):
    update = arena["[math.sin]:[modify-function-name]:[update-0]"]
    assert installation(update) == "del math.sin\nmath.sine = sine"


def test_numpy_update_is_installed_on_the_module(arena):
    update = next(u for u in arena.values() if u.package == "numpy" and u.function_path == "numpy.split")
    assert installation(update) == "numpy.split = split"
    compile(program_text(update, update.programs[0], update.programs[0].ref_solution), "main.py", "exec")


# --- running, through the sandbox -------------------------------------------------------------------------------
def test_reference_needs_the_update(arena):
    update = arena["[math.sin]:[modify-output-semantics]:[update-0]"]
    program = update.programs[0]
    assert passes(update, program, program.ref_solution)
    assert not passes(update, program, program.ref_solution, new_api=False)  # old math.sin has no `unit`


def test_renamed_reference_passes_only_with_the_new_name(arena):
    update = arena["[math.sin]:[modify-function-name]:[update-0]"]
    program = update.programs[0]
    assert passes(update, program, program.ref_solution)
    assert not passes(update, program, program.ref_solution, new_api=False)


def test_wrong_solution_fails(arena):
    update = arena["[math.sin]:[modify-output-semantics]:[update-0]"]
    program = update.programs[0]
    wrong = program.ref_solution.replace("unit='degrees'", "unit='radians'")
    assert wrong != program.ref_solution
    outcome = run_program(update, program, wrong)
    assert outcome.status == "failed" and "unit tests passed" in outcome.stdout
    assert not passes(update, program, "this is not python")


def test_exiting_before_the_tests_is_not_a_pass(tmp_path):
    update = small(tmp_path)
    program = update.programs[0]
    assert passes(update, program, SOLUTION)
    outcome = run_program(update, program, "import sys\nsys.exit(0)\n")
    assert outcome.status == "passed"  # the program exited 0 ...
    assert not passes(update, program, "import sys\nsys.exit(0)\n")  # ... but no test ran


# --- pass@k and the split ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, c, k, expected", [
    (5, 1, 1, 0.2),  # pass@1 is the pass rate
    (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
    (10, 0, 5, 0.0),  # nothing passed
    (10, 6, 5, 1.0),  # n - c = 4 < k: every draw of 5 holds a pass
    (10, 10, 1, 1.0),
])
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_the_binomial_form():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    assert 0.0 < pass_at_k(2000, 1, 1000) < 1.0  # C(2000, 1000) would overflow a float


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 1, 0), (5, 1, 6), (0, 0, 1)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_split_trains_on_the_lowest_numbered_example(tmp_path):
    update = small(tmp_path)
    shuffled = tuple(replace(p, prog_syn_id=f"x:[prog_syn-{n}]") for p, n in zip(update.programs, (10, 2, 9)))
    train, evaluation = split_programs(replace(update, programs=shuffled))
    assert train.prog_syn_id == "x:[prog_syn-2]"
    assert [p.prog_syn_id for p in evaluation] == ["x:[prog_syn-9]", "x:[prog_syn-10]"]  # numbers, not text


def test_split_of_the_release(arena):
    pairs = [split_programs(u) for u in arena.values()]
    assert all(train.prog_syn_id.endswith(":[prog_syn-0]") for train, _ in pairs)
    # One training example per update, the rest for evaluation: 141 and 436 of the June-2024 file's 577.
    total = sum(len(u.programs) for u in arena.values())
    assert sum(len(rest) for _, rest in pairs) == total - len(arena)


def test_program_fields_are_what_the_data_says(tmp_path):
    program = small(tmp_path).programs[2]
    assert isinstance(program, Program) and program.prog_syn_id.endswith("[prog_syn-2]")
    assert program.solution_signature == "def halfway(d):"

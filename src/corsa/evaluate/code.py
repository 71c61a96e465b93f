"""CodeUpdateArena (Liu et al. 2024): API updates, the programs that need them, and running those programs.

Each line of arena.jsonl is one synthetic update to a library function (say, `math.sin` gains `unit='degrees'`)
with a few program-synthesis examples whose unit tests pass only with the new API. The paper (section 5.3,
appendix A) trains on one example per update and scores UPass, pass@k on the rest; `split_programs` is that
split, `pass_at_k` the estimator.

How an update becomes the API (as CodeUpdateArena's own checker does it, src/test_beds/test_bed.py upstream):
the example's imports load the package and keep the old function as `old_<name>` (`old_sin = math.sin`); the
update's `implementation` is one top-level function that calls `old_<name>`; then the install statements put
it into the package, chosen by the update type:

    add-/modify-argument..., add-/modify-output...   math.sin = sin                 (same name, new behaviour)
    modify-function-name                              del math.sin; math.sine = sine (the old name is gone)
    add-function                                      math.multicomb = multicomb     (a new name)

The solution comes after the install, so a solution's own `from math import sin` gets the new function. The
old-API program is the same file without the install statements (the implementation is still defined, as a
plain function, so the two programs differ only in what the package holds).

Every program runs in corsa.sandbox, never in this process: the solutions are model-written.

    python -m corsa.evaluate.code ARENA.jsonl [--workers 2]   # check the reference solutions, print JSON
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import re
import sys
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corsa import sandbox
from corsa.errors import InputError
from corsa.requests import json_lines

# The sandbox's defaults fit: numpy, sympy and torch import in about a second, and the reference test suites
# run in well under the 10 s of CPU time. A solution that loops for ever meets the CPU limit.
LIMITS = sandbox.DEFAULT
# The runner's last line of output; `all_passed` looks for it so that a program that exits 0 before the tests
# ran (a solution's own `sys.exit()` under `if __name__ == "__main__":`) is not a pass.
SUMMARY = "{passed} of {total} unit tests passed"
# The update types whose new function replaces the old one under its name (see the module docstring).
IN_PLACE = {("add", "argument"), ("add", "output"), ("modify", "argument"), ("modify", "output")}
PROG_SYN_NUMBER = re.compile(r":\[prog_syn-(\d+)\]$")


@dataclass(frozen=True)
class Program:
    """One program-synthesis example: a problem whose solution should use the updated API."""

    prog_syn_id: str  # "<update_id>:[prog_syn-<n>]"
    scenario: str
    problem: str
    # As the data has it: 29 of the 577 lack the "def" (4 say "function") or the trailing colon.
    solution_signature: str
    unit_tests: str  # top-level `test_*` functions without parameters
    imports: str  # the data's prog_syn_imports: the package, and the old function kept as old_<name>
    ref_solution: str


@dataclass(frozen=True)
class ApiUpdate:
    """One synthetic API update and the examples that need it."""

    update_id: str  # "[<function_path>]:[<update_type>]:[update-<n>]"
    package: str  # math, numpy, re, torch, itertools or sympy in the June-2024 release
    function_path: str  # the function updated, as it is called: "math.sin", "torch.Tensor.view"
    description: str
    rationale: str
    docstring: str  # the new API's documentation, what a Prepend prompt or a training text shows
    signature: str
    imports: str
    implementation: str  # one top-level function, the new API, written in terms of old_<name>
    update_type: str  # "<action>-<place>[-<aspect>]", e.g. "modify-output-semantics"
    programs: tuple[Program, ...]


# --- loading ----------------------------------------------------------------------------------------------------
UPDATE_FIELDS = ("update_id", "package", "function_path", "description", "rationale", "docstring", "signature",
                 "imports", "implementation", "update_type")
# Program field -> the key in the data (the data's imports key says whose imports they are).
PROGRAM_FIELDS = {"prog_syn_id": "prog_syn_id", "scenario": "scenario", "problem": "problem",
                  "solution_signature": "solution_signature", "unit_tests": "unit_tests",
                  "imports": "prog_syn_imports", "ref_solution": "ref_solution"}


def load_arena(path: str | Path) -> list[ApiUpdate]:
    """Read CodeUpdateArena's arena.jsonl: one update with its examples a line. Anything that would make a
    program impossible to build (a missing field, an implementation that is not one function, an update type we
    cannot install, unit tests that do not parse) is an InputError naming the file, line and field."""
    name = str(path)
    updates: list[ApiUpdate] = []
    seen: dict[str, int] = {}  # update and example ids -> the line that has them; results are keyed by them
    for lineno, record in json_lines(path, "give CodeUpdateArena's arena.jsonl"):
        update = parse_update(record, name, lineno)
        for ident, field in [(update.update_id, "update.update_id")] + [
                (p.prog_syn_id, f"prog_syn_examples[{i}].prog_syn_id") for i, p in enumerate(update.programs)]:
            if ident in seen:
                raise InputError(f"'{ident}' is already used on line {seen[ident]}", path=name, line=lineno,
                                 field=field)
            seen[ident] = lineno
        updates.append(update)
    if not updates:
        raise InputError("no API updates found", path=name)
    return updates


def parse_update(record: Any, path: str, line: int) -> ApiUpdate:
    """Validate one decoded line of arena.jsonl."""

    def error(message: str, field: str | None = None) -> InputError:
        return InputError(message, path=path, line=line, field=field)

    def text(obj: dict[str, Any], key: str, field: str) -> str:
        if key not in obj:
            raise error("is required", field)
        if not isinstance(obj[key], str):
            raise error(f"must be a string, got {type(obj[key]).__name__}", field)
        return obj[key]

    if not isinstance(record, dict):
        raise error(f"each line must be a JSON object, got {type(record).__name__}")
    for key, kind in (("update", dict), ("prog_syn_examples", list)):
        if key not in record:
            raise error("is required", key)
        if not isinstance(record[key], kind) or not record[key]:
            raise error(f"must be a non-empty {'object' if kind is dict else 'list'}", key)
    fields = {key: text(record["update"], key, f"update.{key}") for key in UPDATE_FIELDS}
    programs = []
    for i, example in enumerate(record["prog_syn_examples"]):
        where = f"prog_syn_examples[{i}]"
        if not isinstance(example, dict):
            raise error(f"must be an object, got {type(example).__name__}", where)
        program = Program(**{f: text(example, key, f"{where}.{key}") for f, key in PROGRAM_FIELDS.items()})
        if not PROG_SYN_NUMBER.search(program.prog_syn_id):
            raise error("must end in ':[prog_syn-<number>]'", f"{where}.prog_syn_id")
        try:
            names = unit_test_names(program.unit_tests)
        except SyntaxError as exc:
            raise error(f"is not valid Python: {exc.msg} (line {exc.lineno})", f"{where}.unit_tests") from None
        if not names:
            raise error("defines no test_* function without parameters", f"{where}.unit_tests")
        programs.append(program)
    update = ApiUpdate(**fields, programs=tuple(programs))
    if not update.function_path.rpartition(".")[0]:
        raise error("must name the package and the function, as in 'math.sin'", "update.function_path")
    if install_rule(update.update_type) is None:
        raise error(f"'{update.update_type}' is not an update type we know how to install (known: add- or "
                    "modify-argument..., add- or modify-output..., modify-function-name, add-function)",
                    "update.update_type")
    try:
        installation(update)
    except ValueError as exc:
        raise error(str(exc), "update.implementation") from None
    return update


# --- building a program ---------------------------------------------------------------------------------------
def parse(source: str) -> ast.Module:
    """`ast.parse`, without the warnings the data's code raises (invalid escapes such as "\\d" in non-raw regex
    strings): they are about someone else's code and say nothing about whether it runs. Raises SyntaxError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(source)


def defined_function(source: str) -> str | None:
    """The name of the one function `source` defines at top level; None for none, several, or no valid Python."""
    try:
        tree = parse(source)
    except SyntaxError:
        return None
    names = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return names[0] if len(names) == 1 else None


def unit_test_names(unit_tests: str) -> list[str]:
    """The top-level `test*` functions without parameters, in order: what the runner calls. Raises SyntaxError."""
    tree = parse(unit_tests)
    return [node.name for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test") and not (
                node.args.posonlyargs or node.args.args or node.args.vararg or node.args.kwonlyargs
                or node.args.kwarg)]


def install_rule(update_type: str) -> str | None:
    """How an update of this type is installed: "rename", "add" or "replace"; None when no rule fits.
    CodeUpdateArena's taxonomy also has deprecations and modify-function-semantics; its generator installs
    neither, and no released example has them."""
    if update_type == "modify-function-name":
        return "rename"
    if update_type == "add-function":
        return "add"
    if tuple(update_type.split("-")[:2]) in IN_PLACE:
        return "replace"
    return None


def installation(update: ApiUpdate) -> str:
    """The statements that make the update's implementation the package's API (see the module docstring).
    Raises ValueError for an implementation that is not one function, or an update type with no rule."""
    rule = install_rule(update.update_type)
    if rule is None:
        raise ValueError(f"unknown update type '{update.update_type}': no rule installs it")
    new = defined_function(update.implementation)
    if new is None:
        raise ValueError("must define exactly one top-level function (the new API)")
    owner, _, old = update.function_path.rpartition(".")
    if not owner:
        raise ValueError(f"function_path '{update.function_path}' names no package")
    if rule == "rename":
        return f"del {update.function_path}\n{owner}.{new} = {new}"
    if rule == "add":
        return f"{owner}.{new} = {new}"
    if new != old:
        raise ValueError(f"defines '{new}', but a {update.update_type} update keeps the name '{old}'")
    return f"{update.function_path} = {new}"


def runner(names: list[str]) -> str:
    """Source that calls each test, goes on after a failure (so the output names every failing test), prints
    the summary line and exits 1 if any failed. A test that exits the interpreter ends the run with no summary."""
    return f'''
def corsa_run_unit_tests(tests):
    import sys
    import traceback

    failed = 0
    for test in tests:
        try:
            test()
        except Exception:
            failed += 1
            print(f"unit test {{test.__name__}} failed:", file=sys.stderr)
            traceback.print_exc()
    print({SUMMARY!r}.format(passed=len(tests) - failed, total=len(tests)))
    sys.exit(1 if failed else 0)


corsa_run_unit_tests([{", ".join(names)}])
'''


def program_text(update: ApiUpdate, program: Program, solution: str, new_api: bool = True) -> str:
    """One runnable file: imports, the new API (installed unless `new_api` is False), the solution, the unit
    tests and a runner that calls each test. Without the install it tells whether a test needs the update."""
    parts = ["# Imports: the package, and its old function kept as old_<name>.\n" + program.imports,
             "# The updated API.\n" + update.implementation]
    if new_api:
        parts.append("# Installed: from here on the package has the new API.\n" + installation(update))
    parts += ["# The solution.\n" + solution, "# The unit tests.\n" + program.unit_tests,
              runner(unit_test_names(program.unit_tests))]
    return "\n\n".join(part.strip("\n").rstrip() for part in parts) + "\n"


# --- running ----------------------------------------------------------------------------------------------------
def run_program(update: ApiUpdate, program: Program, solution: str, limits: sandbox.Limits = LIMITS,
                new_api: bool = True) -> sandbox.Outcome:
    """Run the solution's program in the sandbox."""
    return sandbox.run(program_text(update, program, solution, new_api), limits)


def run_many(texts: Sequence[str], limits: sandbox.Limits = LIMITS, workers: int = 1) -> list[sandbox.Outcome]:
    """Each program in the sandbox, `workers` at once (threads: each program is its own process), in order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda text: sandbox.run(text, limits), texts))


def all_passed(outcome: sandbox.Outcome, program: Program) -> bool:
    """Whether every unit test ran and passed: the program exited 0 after the runner's summary said so."""
    total = len(unit_test_names(program.unit_tests))
    return outcome.status == "passed" and outcome.stdout.rstrip().endswith(SUMMARY.format(passed=total, total=total))


def passes(update: ApiUpdate, program: Program, solution: str, limits: sandbox.Limits = LIMITS,
           new_api: bool = True) -> bool:
    """Whether `solution` passes all of the example's unit tests (with the new API unless `new_api` is False)."""
    return all_passed(run_program(update, program, solution, limits, new_api), program)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples of which c passed (Chen et al. 2021): 1 - C(n-c, k) / C(n, k),
    the chance that k samples drawn without replacement include a passing one. Written as the product
    1 - prod_{i=n-c+1..n} (1 - k/i), which needs no big binomials and never loses precision to overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k includes a passing sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def prog_syn_number(program: Program) -> int:
    """The example's number within its update: 3 for "...:[prog_syn-3]"."""
    match = PROG_SYN_NUMBER.search(program.prog_syn_id)
    if match is None:
        raise ValueError(f"not a CodeUpdateArena example id: {program.prog_syn_id!r}")
    return int(match.group(1))


def split_programs(update: ApiUpdate) -> tuple[Program, tuple[Program, ...]]:
    """(the training example, the evaluation examples). The paper trains on one example per update and evaluates
    on the rest (appendix A) without saying which one; we take the lowest-numbered one, prog_syn-0 in the
    released data, so the split needs no seed and is the same for every method."""
    ordered = sorted(update.programs, key=prog_syn_number)
    return ordered[0], tuple(ordered[1:])


# --- checking the data ------------------------------------------------------------------------------------------
def check_references(updates: Iterable[ApiUpdate], limits: sandbox.Limits = LIMITS, workers: int = 1
                     ) -> dict[str, dict[str, Any]]:
    """Run every reference solution with the new API and with the old one, and count per package (and "all"):
    examples, passes with each, passes with the new API only (the examples UPass can measure), the sandbox's
    statuses, and the ids of examples whose reference fails with the new API (broken examples).

    A test suite that passes with the old API too does not need the update; one whose reference fails with the
    new API cannot be passed. `workers` > 1 runs programs in threads (each is its own process)."""
    jobs = [(u, p, new_api) for u in updates for p in u.programs for new_api in (True, False)]
    # Built here, not in the threads: `parse` swaps the process's warning filters, which is not thread-safe.
    texts = [program_text(update, program, program.ref_solution, new_api) for update, program, new_api in jobs]
    outcomes = run_many(texts, limits, workers)
    counts: dict[str, dict[str, Any]] = {}
    for i in range(0, len(jobs), 2):
        update, program, _ = jobs[i]
        new, old = outcomes[i], outcomes[i + 1]
        new_ok, old_ok = all_passed(new, program), all_passed(old, program)
        for key in (update.package, "all"):
            row = counts.setdefault(key, {"examples": 0, "new_api_passed": 0, "old_api_passed": 0,
                                          "needs_update": 0, "new_api_status": Counter(),
                                          "old_api_status": Counter(), "new_api_failed": []})
            row["examples"] += 1
            row["new_api_passed"] += new_ok
            row["old_api_passed"] += old_ok
            row["needs_update"] += new_ok and not old_ok
            row["new_api_status"][new.status] += 1
            row["old_api_status"][old.status] += 1
            if not new_ok:
                row["new_api_failed"].append(program.prog_syn_id)
    for row in counts.values():
        row["new_api_status"], row["old_api_status"] = dict(row["new_api_status"]), dict(row["old_api_status"])
    return counts


def main(argv: list[str] | None = None) -> int:
    """Check the reference solutions of an arena.jsonl; print the counts as JSON."""
    parser = argparse.ArgumentParser(prog="python -m corsa.evaluate.code", description=main.__doc__)
    parser.add_argument("arena", help="CodeUpdateArena's arena.jsonl")
    parser.add_argument("--workers", type=int, default=1, help="programs run at once (default 1)")
    parser.add_argument("--wall-s", type=float, default=LIMITS.wall_s, help="seconds on the clock per program")
    args = parser.parse_args(argv)
    try:
        updates = load_arena(args.arena)
    except InputError as exc:
        print(f"corsa.evaluate.code: error: {exc}", file=sys.stderr)
        return 2
    limits = dataclasses.replace(LIMITS, wall_s=args.wall_s)
    print(json.dumps(check_references(updates, limits, args.workers), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

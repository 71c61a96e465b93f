"""`corsa bench multi`: several adapters, each query routed to one (paper appendix B.2, Table 8).

The run's edits are cut into --parts consecutive parts and each method trains one adapter per part. All adapters
are loaded into one model and two ways of choosing among them are evaluated on every case:

  <method>-routed   corsa.routing picks the adapter whose edits' subjects the query matches, or none
  <method>-oracle   each prompt goes to the adapter of its own case's part (the paper's "single adapter upper
                    bound": what the adapters can do when routing never errs)

and the record of the routed row says how much of the gap to the oracle in generality comes from routing errors:
of the paraphrases the oracle answers with the new target and routing does not, the share sent to another
adapter or to none. Training never sees the evaluation's paraphrases or neighbourhood prompts, and the router's
keys are the edits' own prompts and subjects.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corsa import anchors, artifacts, models, presets, routing
from corsa.errors import InputError
from corsa.evaluate.metrics import evaluate
from corsa.evaluate.runner import (
    BenchConfig,
    base_record,
    brief,
    check_before_work,
    edit_once,
    format_table,
    load_results,
    method_overrides,
    parse_method,
    plot,
    rerun_setting,
    run_header,
    select_cases,
    stamp,
    trained_edits,
)
from corsa.evaluate.stats import (
    base_name,
    paired_difference,
    routed_name,
    unrouted_name,
    with_suffix,
    without_suffix,
)
from corsa.methods import REGISTRY
from corsa.prompts import Formatter
from corsa.requests import EditRequest, load_benchmark_with_report

ORACLE = "-oracle"


@dataclass(frozen=True)
class KnownRoutes:
    """The oracle: each prompt to the adapter of the part its case belongs to, matched to its own case's edit (so
    that, with hints on, it is asked with its own fact, as routing at its best would ask it)."""

    table: dict[str, str]
    edits: dict[str, routing.Edit]

    def routes(self, prompts: list[str]) -> list[str | None]:
        return [self.table.get(p) for p in prompts]

    def matched(self, prompts: list[str]) -> list[routing.Edit | None]:
        return [self.edits.get(p) for p in prompts]

    def explain(self, prompt: str) -> list[str]:
        route = self.table.get(prompt)
        return [f"the oracle sends it to its own case's adapter ({route})" if route else
                "the oracle: not one of the benchmark's prompts, so the unedited model answers it"]


def split(chosen: list[EditRequest], parts: int) -> list[list[EditRequest]]:
    """Consecutive parts of (nearly) equal size."""
    return [chosen[k * len(chosen) // parts : (k + 1) * len(chosen) // parts] for k in range(parts)]


def routing_gap(routed: list[dict[str, Any]], oracle: list[dict[str, Any]], routes: list[str | None],
                own: list[str], refusals: list[str | None] | None = None) -> dict[str, Any]:
    """Paraphrase by paraphrase (cases in the same order): which ones routing loses against the oracle, and how
    many of those it sent to another adapter or to none. `refusals` (per paraphrase, why the router turns it away
    from its own case's edit even when the subject key matches: Router.refusal) splits the misrouted ones by
    reason, so a loss to the relation gate is told from a subject key's miss without reading the cases."""
    got = [x for c in routed for x in c["gen.generality"]]
    best = [x for c in oracle for x in c["gen.generality"]]
    lost = [i for i, (g, b) in enumerate(zip(got, best)) if b and not g]
    misrouted = [i for i in lost if routes[i] != own[i]]
    gap = {"paraphrases": len(got), "routed_to_own": sum(r == o for r, o in zip(routes, own)) / max(len(own), 1),
           "lost_against_oracle": len(lost), "gained_against_oracle": sum(g and not b for g, b in zip(got, best)),
           "lost_and_misrouted": len(misrouted),
           "share_of_loss_from_routing": len(misrouted) / len(lost) if lost else None}
    if refusals is not None:
        reasons = Counter(refusals[i] or "the subject key did not send it to its own edit" for i in misrouted)
        gap["misrouted_by_reason"] = dict(reasons.most_common())
    return gap


def run_multi(cfg: BenchConfig, parts: int, out: str | Path, *, progress: bool = True,
              command: str | None = None) -> Path:
    out = Path(out)
    cfg = dataclasses.replace(cfg, mmlu_n=0)  # rows differ only in routing; MMLU is `corsa bench single`'s
    methods = [(spec, *parse_method(spec)) for spec in cfg.methods]
    for spec, method, _ in methods:
        if REGISTRY[method].output != "adapter":
            raise InputError(f"'{spec}' writes no adapter, so there is nothing to route", field="--methods")
    if parts < 2:
        raise InputError("must be at least 2", field="--parts")
    preset = presets.choose(cfg.preset, cfg.model, "edit")
    check_before_work(out, methods, preset, cfg.model, cfg.overrides, str(cfg.data))
    requests, skipped = load_benchmark_with_report(cfg.bench, cfg.data, cfg.split)
    chosen = select_cases(requests, cfg.n, cfg.seed, cfg.bench, cfg.subset)
    if len(chosen) < parts:
        raise InputError(f"{len(chosen)} edits cannot make {parts} parts", field="--parts")
    header = {**run_header(cfg, chosen, skipped, command, preset), "parts": parts}
    out.mkdir(parents=True, exist_ok=True)
    print(f"{cfg.bench}/{cfg.split}: {len(chosen)} edits in {parts} parts (seed {cfg.seed}); methods: "
          f"{', '.join(cfg.methods)}")
    base = base_record(out, header, chosen, cfg)
    for spec, method, overrides in methods:
        if artifacts.finished_row(out / routed_name(spec) / "results.json", spec):
            continue
        t = time.perf_counter()
        folders, trained, edit_s = [], [], 0.0
        for name, piece in zip(part_names(parts), split(chosen, parts)):
            folder, result, seconds = edit_once(anchors.withheld(piece, chosen), out / spec / name, method=method,
                                                model=cfg.model, progress=progress, command=command,
                                                prompt_style=cfg.prompt_style, preset=cfg.preset,
                                                **method_overrides(method, overrides, cfg.overrides, cfg.data))
            folders.append(folder)
            trained += result.requests
            edit_s += seconds
            del result
        records = measure(cfg, header, base, chosen, spec, folders, trained, edit_s)
        write_rows(out, records, started=t)
    write_multi_report(out)
    return out


def part_names(parts: int) -> list[str]:
    return [f"part{k}" for k in range(parts)]


def measure(cfg: BenchConfig, header: dict[str, Any], base: dict[str, Any], chosen: list[EditRequest], spec: str,
            folders: list[Path], trained: list[EditRequest], edit_s: float,
            oracle: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The records of one method's part adapters (`folders`, one per part of `chosen`), loaded into one model: the
    routed row and the oracle row. A given `oracle` record (the same adapters' oracle, measured before) is kept
    instead of measured again, since routing's setting does not change it; the routed row's gap is read against
    whichever oracle the records hold."""
    from peft import PeftModel

    names = part_names(len(folders))
    pieces = split(chosen, len(folders))
    own = {q: (name, r) for name, piece in zip(names, pieces) for r in piece
           for q in [r.prompt, *r.paraphrases, *(n.prompt for n in r.neighborhood)]}
    known = {q: name for q, (name, _) in own.items()}
    # Only a case's own prompt and paraphrases are about its subject: a neighbour is matched to no edit.
    oracle_routes = KnownRoutes(known, {q: routing.edits_of([r])[0] for q, (_, r) in own.items()
                                        if q == r.prompt or q in r.paraphrases})
    model, tok, _ = models.load_model(cfg.model)
    peft = PeftModel.from_pretrained(model, str(folders[0]), adapter_name=names[0])
    for name, folder in zip(names[1:], folders[1:]):
        peft.load_adapter(str(folder), adapter_name=name)
    formatter = Formatter(tok, cfg.prompt_style)
    mined = anchors.with_mined(chosen, trained)
    router = routing.Router(peft, tok, {n: routing.edits_of(p) for n, p in zip(names, pieces)}, cfg.router)
    records = {} if oracle is None else {oracle_name(spec): oracle}
    config = artifacts.read_manifest(folders[0]).get("config")  # every part is trained with the same settings
    rows = [(routed_name(spec), router)] + ([(oracle_name(spec), oracle_routes)] if oracle is None else [])
    for row, routes in rows:
        t_eval = time.perf_counter()
        asked = routing.asking(formatter, routes, cfg.router.hint)
        ev = evaluate(routing.RoutedModel(peft, routes), asked, mined, reference=base, config=cfg.eval)
        ev["timings"] = {"eval_s": time.perf_counter() - t_eval, "edit_s": edit_s}
        records[row] = {**header, "method": row, "adapters": [str(f) for f in folders], "config": config, **ev}
    paraphrases = [p for r in chosen for p in r.paraphrases]
    refusals = [router.refusal(edit, p) for r, edit in zip(chosen, routing.edits_of(chosen)) for p in r.paraphrases]
    records[routed_name(spec)]["routing"] = {
        **routing.record(cfg.router, peft, router.edits),
        "gap": routing_gap(records[routed_name(spec)]["cases"], records[oracle_name(spec)]["cases"],
                           router.routes(paraphrases), [known[p] for p in paraphrases], refusals)}
    return records


def write_rows(out: Path, records: dict[str, dict[str, Any]], started: float) -> None:
    """The oracle row, then the routed row: the routed row's file marks the method done."""
    routed = next(name for name in records if "routing" in records[name])
    for row in [*(name for name in records if name != routed), routed]:
        records[row]["wall_time_s"] = time.perf_counter() - started
        artifacts.write_json(out / row / "results.json", stamp(records[row]))
        print(f"{row}: {brief(records[row]['summary'])}")
    print(f"routing gap: {records[routed]['routing']['gap']}")


def is_multi_run(run: str | Path) -> bool:
    """Whether `run` is a `corsa bench multi` folder (its base record names its parts)."""
    base = Path(run) / "base" / "results.json"
    return base.is_file() and "parts" in json.loads(base.read_text())


def reroute(run: str | Path, out: str | Path, router: routing.RouterConfig, *, command: str | None = None,
            methods: Sequence[str] | None = None) -> Path:
    """A finished `corsa bench multi` run asked again with another routing setting, without training: `out` gets
    the run's base and oracle rows as they are and, per method (each of `methods`, e.g. `corsa@seed1`, or every
    one), a routed row measured anew over the run's own part adapters."""
    run, out = Path(run), Path(out)
    artifacts.check_writable(out, overwrite=False)
    results = load_results(run)
    base = next(r for r in results if r["method"] == "base")
    cfg, chosen = rerun_setting(base, router)
    specs = [unrouted_name(r["method"]) for r in results
             if r["method"] != unrouted_name(r["method"]) and (methods is None or unrouted_name(r["method"]) in methods)]
    out.mkdir(parents=True)
    artifacts.write_json(out / "base" / "results.json", base)
    before = {r["method"]: r for r in results}
    for spec in specs:
        t = time.perf_counter()
        folders = [run / spec / name for name in part_names(base["parts"])]
        trained = [e for folder, piece in zip(folders, split(chosen, base["parts"]))
                   for e in trained_edits(piece, folder)]
        routed = before[routed_name(spec)]  # its run's record: what is measured again is replaced
        records = measure(cfg, {**routed, "command": command or routed.get("command")}, base, chosen, spec, folders,
                          trained, routed["timings"]["edit_s"], oracle=before[oracle_name(spec)])
        artifacts.write_json(out / oracle_name(spec) / "results.json", before[oracle_name(spec)])  # as it was
        write_rows(out, {routed_name(spec): records[routed_name(spec)]}, started=t)
    write_multi_report(out)
    return out


def oracle_name(spec: str) -> str:
    """'lora@seed1' -> 'lora-oracle@seed1', like its routed row (a seed mark before the suffix would read as seed
    '1-oracle' of 'lora')."""
    return with_suffix(spec, ORACLE)


def oracle_line(results: list[dict[str, Any]]) -> str:
    """Table 8's question: how far routing falls short of the oracle, per method, with a paired interval."""
    lines = []
    for r in results:
        if not base_name(r["method"]).endswith(ORACLE):
            continue
        routed = next((x for x in results if x["method"] == routed_name(without_suffix(r["method"], ORACLE))), None)
        if routed is None:
            continue
        found = [d for m in ("gen.generality", "gen.reliability")
                 if (d := paired_difference(r["cases"], routed["cases"], m)) is not None]
        lines.append(f"- {routed['method']} minus {r['method']}: " + "; ".join(
            f"{d.metric} {100 * d.estimate:+.1f} ({100 * d.low:+.1f} to {100 * d.high:+.1f})" for d in found)
            + f"; of the paraphrases the oracle gets and routing loses, sent elsewhere by routing: "
              f"{routed['routing']['gap']['lost_and_misrouted']} of {routed['routing']['gap']['lost_against_oracle']}"
            + "".join(f" ({n}: {why})" for why, n in routed["routing"]["gap"].get("misrouted_by_reason", {}).items()))
    return ("Routing against the oracle (the same adapters, each prompt sent to its own case's adapter), 95 % paired "
            "bootstrap intervals:\n" + "\n".join(lines)) if lines else ""


def write_multi_report(out: Path) -> None:
    results = load_results(out)
    if results:
        table = format_table(results)
        if extra := oracle_line(results):
            table += "\n\n" + extra
        artifacts.write_report(out, table, lambda path: plot(results, path))

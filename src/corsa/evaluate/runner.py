"""`corsa bench single|ablation`: train one adapter per method on N benchmark edits at once, evaluate, report.

Layout of a run folder:
  base/results.json         the unedited model on the same cases (reference for agreement metrics), with MMLU
  <method>/adapter/         the adapter and its edit_manifest.json
  <method>/results.json     every metric, per case and aggregated, with config, seed, case ids and timings
  table.md, plot.png        made from the results.json files, so the table always matches the JSON
A rerun skips every method whose results.json exists, so an interrupted benchmark resumes where it stopped; a
method stopped after its adapter was written loads it instead of training again (`edit_once`).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from corsa import anchors, artifacts, models, presets, routing
from corsa.answers import contains
from corsa.editing import edit, trained_earlier
from corsa.errors import InputError
from corsa.evaluate import plots
from corsa.evaluate.metrics import HEADLINE, METRICS, EvalConfig, evaluate, with_other_targets
from corsa.evaluate.stats import SEED_MARK, differences_line, mmlu_line, routed_name, seeds_line, unrouted_name
from corsa.loading import load_edited
from corsa.methods import REGISTRY, EditResult
from corsa.methods.registry import variant_names
from corsa.prompts import Formatter, PromptStyle
from corsa.requests import EditRequest, load_benchmark_with_report
from corsa.scoring import generate

ABLATION = ["corsa", "corsa-no-sam", "corsa-no-dpo", "corsa-no-pcgrad", "lora"]  # paper Table 9
# <spec>+<setting><value>: one more sweep setting of the same method, e.g. corsa-rho0.5+lambda2.
COMBINE_MARK = "+"


def split_seed(spec: str) -> tuple[str, int | None]:
    """'corsa-rho0.5@seed2' -> ('corsa-rho0.5', 2); a spec without the mark -> (spec, None)."""
    name, mark, seed = spec.partition(SEED_MARK)
    if not mark:
        return spec, None
    if not seed.isdigit():
        raise InputError(f"'{spec}': the training seed after {SEED_MARK} must be a whole number", field="--methods")
    return name, int(seed)


def sweep_names() -> list[str]:
    """Every sweep as it is written in --methods, e.g. corsa-rho<value>, memit-layers<first>-<last>."""
    return [f"{spec.name}-{sweep.key}{sweep.form}" for spec in REGISTRY.values() for sweep in spec.sweeps]


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """A method name, a named variant, or <method>-<setting><value> (corsa-lambda0.5, memit-layers3-5, ...), each
    optionally followed by more settings of the same method (corsa-rho0.5+lambda2+beta0.2) and by @seed<k> to
    train it with another seed on the same cases. Every name comes from the method registry."""
    name, seed = split_seed(spec)
    if seed is not None:
        method, overrides = parse_method(name)
        return method, {**overrides, "seed": seed}
    head, *more = spec.split(COMBINE_MARK)
    if more:
        # Sweeps set one setting each; combining them is how e.g. λ is tuned at a radius other than the default.
        method, overrides = parse_method(head)
        keys = [sweep.key for sweep in REGISTRY[method].sweeps]
        for part in more:
            if not any(part.startswith(k) for k in keys):
                known = ", ".join(f"{s.key}{s.form}" for s in REGISTRY[method].sweeps) or "none"
                raise InputError(f"'{spec}': '{COMBINE_MARK}{part}' is not a setting of {method} (known: {known})",
                                 field="--methods")
            _, extra = parse_method(f"{method}-{part}")
            if extra.keys() & overrides.keys():
                raise InputError(f"'{spec}': '{COMBINE_MARK}{part}' sets {', '.join(extra)} twice", field="--methods")
            overrides = {**overrides, **extra}
        return method, overrides
    named = variant_names()
    if spec in named:
        method, overrides = named[spec]
        return method, dict(overrides)
    for method in REGISTRY.values():
        for sweep in method.sweeps:
            prefix = f"{method.name}-{sweep.key}"
            if spec.startswith(prefix):
                try:
                    return method.name, {sweep.field: sweep.parse(spec[len(prefix):])}
                except ValueError:  # another setting's key may start with this one's (anchors, anchorside)
                    continue
    raise InputError(f"unknown method '{spec}' (known: {', '.join(named)}, "
                     f"{', '.join(sweep_names())})", field="--methods")


def method_overrides(method: str, variant: dict[str, Any], common: dict[str, Any], data: str) -> dict[str, Any]:
    """The config overrides a benchmark hands a method: the run's, then the variant's; a method that reads the
    benchmarks folder (MEMIT's key statistics) gets it in its `data_field`."""
    field_name = REGISTRY[method].data_field
    return {**common, **({field_name: data} if field_name else {}), **variant}


@dataclass(frozen=True)
class BenchConfig:
    bench: str
    data: str
    n: int = 200
    split: str = "edit"  # CounterFact: tune on val, report on edit (the evaluation cases are never tuned on)
    seed: int = 0
    subset: int | None = None  # block k of the seed's shuffle: disjoint from every other block
    methods: tuple[str, ...] = ("lora", "corsa")
    model: str | None = None
    prompt_style: PromptStyle = "auto"  # chat template when the model has one, else the paper's Q/A prompt
    mmlu_n: int | None = 10  # questions per subject; None = all 14,042
    preset: str = "auto"  # the settings `corsa edit` would use on this model (corsa.presets), or "paper"
    eval: EvalConfig = field(default_factory=EvalConfig)
    overrides: dict[str, Any] = field(default_factory=dict)  # training settings applied to every method
    # Each adapter is also evaluated as `corsa ask` answers with it: scope-routed (the `<method>-routed` row).
    route: bool = True
    router: routing.RouterConfig = field(default_factory=routing.RouterConfig)


def select_cases(requests: list[EditRequest], n: int, seed: int, bench: str, subset: int | None = None
                 ) -> list[EditRequest]:
    """A seeded subset of n edits. MQuAKE cases are kept whole (their multi-hop questions need every rewrite).

    With `subset` k the data is shuffled once by `seed` and cut into consecutive blocks of n: block k. Blocks of
    one seed never share a case, so a result can be checked on a second, disjoint subset (subset None keeps the
    original draw, so earlier runs' case ids are reproduced).
    """
    rng = random.Random(seed)
    if subset is not None and subset < 0:
        raise InputError("must be >= 0", field="--subset")
    if bench != "mquake":
        if subset is None:
            if n >= len(requests):
                return list(requests)
            return [requests[i] for i in sorted(rng.sample(range(len(requests)), n))]
        order = list(range(len(requests)))
        rng.shuffle(order)
        block = order[subset * n : (subset + 1) * n]
        if len(block) < n:
            raise InputError(f"the data has {len(requests)} cases, too few for subset {subset} of {n}",
                             field="--subset")
        return [requests[i] for i in sorted(block)]
    by_case: dict[Any, list[EditRequest]] = {}
    for r in requests:
        by_case.setdefault(r.meta["case_id"], []).append(r)
    order = list(by_case)
    rng.shuffle(order)
    blocks: list[list[EditRequest]] = [[]]
    for case in order:
        if len(blocks[-1]) >= n:
            if subset is None or len(blocks) > subset:
                break
            blocks.append([])
        blocks[-1] += by_case[case]
    k = subset or 0
    if k >= len(blocks) or len(blocks[k]) < n:
        raise InputError(f"the data has too few cases for subset {k} of {n} edits", field="--subset")
    return blocks[k]


def multihop(model: torch.nn.Module, formatter: Formatter, requests: list[EditRequest],
             config: EvalConfig) -> dict[str, Any]:
    """MQuAKE: per case, a multi-hop question counts when any of its 3 phrasings names the new answer or an
    alias (the MQuAKE protocol); each post-edit single hop counts when its answer or an alias is named."""
    cases = {r.meta["case_id"]: r.meta for r in requests if "questions" in r.meta}
    prompts, owners = [], []
    for cid, meta in cases.items():
        for q in meta["questions"]:
            prompts.append(q)
            owners.append(("multi", cid, [meta["new_answer"], *meta["new_answer_alias"]]))
        for hop in meta["new_single_hops"]:
            prompts.append(hop["question"])
            owners.append(("single", cid, [hop["answer"], *hop.get("answer_alias", [])]))
    answers = generate(model, formatter, prompts, max_new_tokens=config.max_new_tokens,
                       batch_size=config.batch_size, autocast=config.autocast)
    multi: dict[Any, bool] = {}
    single: list[bool] = []
    for (kind, cid, golds), a in zip(owners, answers):
        hit = any(contains(a, g) for g in golds if g)
        if kind == "multi":
            multi[cid] = multi.get(cid, False) or hit
        else:
            single.append(hit)
    return {"gen.multihop": sum(multi.values()) / len(multi) if multi else None,
            "gen.singlehop": sum(single) / len(single) if single else None,
            "n_cases": len(multi), "answers": dict(zip(prompts, answers))}


def evaluate_all(model: torch.nn.Module, formatter: Formatter, tokenizer: Any, requests: list[EditRequest],
                  cfg: BenchConfig, reference: dict[str, Any] | None) -> dict[str, Any]:
    t = time.perf_counter()
    out: dict[str, Any] = evaluate(model, formatter, requests, reference=reference, config=cfg.eval)
    if cfg.bench == "mquake":
        hops = multihop(model, formatter, requests, cfg.eval)
        out["summary"].update({k: hops[k] for k in ("gen.multihop", "gen.singlehop")})
        out["multihop_answers"] = hops["answers"]
    out["timings"] = {"eval_s": time.perf_counter() - t}
    if cfg.mmlu_n != 0:
        from corsa.evaluate.mmlu import MMLUConfig, evaluate_mmlu

        t = time.perf_counter()
        mmlu = evaluate_mmlu(model, tokenizer, cfg.data, MMLUConfig(n_per_subject=cfg.mmlu_n, seed=cfg.seed))
        out["mmlu"] = mmlu
        out["summary"]["mmlu"] = mmlu["accuracy"]
        out["timings"]["mmlu_s"] = time.perf_counter() - t
    return out


def check_before_work(out: Path, methods: list[tuple[str, str, dict[str, Any]]], preset: presets.Preset,
                      model: str | None, common: dict[str, Any], data: str) -> None:
    """What a benchmark run can be refused for, checked before its folder is created or a model is loaded: the
    output folder, every method's settings, the model."""
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{out} exists and is not a folder", field="--out")
    else:
        artifacts.check_writable(out, overwrite=False)
    for _, method, variant in methods:
        presets.editor(preset, method, method_overrides(method, variant, common, data))
    models.canonical(model)


def run_bench(cfg: BenchConfig, out: str | Path, *, progress: bool = True, command: str | None = None) -> Path:
    out = Path(out)
    methods = [(spec, *parse_method(spec)) for spec in cfg.methods]  # fail on a typo before any work
    preset = presets.choose(cfg.preset, cfg.model, "edit")
    check_before_work(out, methods, preset, cfg.model, cfg.overrides, str(cfg.data))
    requests, skipped = load_benchmark_with_report(cfg.bench, cfg.data, cfg.split)
    chosen = select_cases(requests, cfg.n, cfg.seed, cfg.bench, cfg.subset)
    header = run_header(cfg, chosen, skipped, command, preset)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{cfg.bench}/{cfg.split}: {len(chosen)} edits (seed {cfg.seed}); methods: {', '.join(cfg.methods)}")

    base = base_record(out, header, chosen, cfg)

    for spec, method, overrides in methods:
        res_file = out / spec / "results.json"
        if artifacts.finished_row(res_file, spec):
            continue
        t = time.perf_counter()
        # Training never sees the evaluation's paraphrases or neighbourhood prompts (anchors would use them).
        adapter, result, edit_s = edit_once(anchors.withheld(chosen), out / spec / "adapter", method=method,
                                            model=cfg.model, progress=progress, command=command,
                                            prompt_style=cfg.prompt_style, preset=cfg.preset,
                                            **method_overrides(method, overrides, cfg.overrides, cfg.data))
        tok = models.load_tokenizer(models.resolve(cfg.model))
        asked = result.formatter or Formatter(tok, cfg.prompt_style)  # in-context methods bring their own
        ev = evaluate_all(result.model, asked, tok, anchors.with_mined(chosen, result.requests), cfg, base)
        manifest = artifacts.read_manifest(adapter)
        record = {**header, "method": spec, "config": manifest["config"], "train": {
            "steps": manifest["steps"], "epochs_run": manifest["epochs_run"], "timings": manifest["timings"],
            "final": manifest["curves"][-1] if manifest["curves"] else {},
            **{k: manifest[k] for k in REGISTRY[method].diagnostics if k in manifest}}, **ev}
        record["timings"]["edit_s"] = edit_s
        record["wall_time_s"] = time.perf_counter() - t
        if cfg.route and REGISTRY[method].output == "adapter":
            # Written first: a rerun skips a method whose unrouted record exists, so both must be there by then.
            routed_record(result.model, asked, tok, chosen, result.requests, cfg, base, record, out / spec)
        artifacts.write_json(res_file, stamp(record))
        print(f"{spec}: {brief(record['summary'])} ({record['wall_time_s']:.0f} s)")
        del result

    write_report(out)
    return out


def edit_once(requests: list[EditRequest], out: Path, *, method: str, model: str | None, progress: bool,
              command: str | None, prompt_style: PromptStyle, preset: str, scenario: presets.Scenario = "edit",
              route: routing.RouterConfig | None = routing.DEFAULT, **overrides: Any
              ) -> tuple[Path, EditResult, float]:
    """A benchmark row's adapter: `edit` into `out` (replacing what an earlier, different run left there), unless
    `out` already holds the adapter these arguments train (editing.trained_earlier: a row stopped during its
    evaluation), which is then loaded instead of trained again. Also returns the seconds the edit took, the
    earlier edit's own when it is reused."""
    same = {"method": method, "model": model, "prompt_style": prompt_style, "preset": preset, "scenario": scenario,
            "route": route, **overrides}
    trained = trained_earlier(requests, out, **same)
    if trained is not None:
        loaded, _ = load_edited(out, route=False)
        print(f"{out}: trained earlier with these settings and edits, loaded instead of trained again")
        return out, EditResult(model=loaded, requests=trained), float(artifacts.read_manifest(out)["wall_time_s"])
    t = time.perf_counter()
    adapter, result = edit(requests, out, overwrite=True, progress=progress, command=command, **same)
    return adapter, result, time.perf_counter() - t


def routed_record(model: torch.nn.Module, formatter: Formatter, tokenizer: Any, chosen: list[EditRequest],
                  trained: list[EditRequest], cfg: BenchConfig, base: dict[str, Any], unrouted: dict[str, Any],
                  folder: Path) -> None:
    """The same adapter evaluated scope-routed, as `<method>-routed`: its keys come from the edits' prompts and
    subjects alone (what training saw), and each kind of prompt's share sent to the adapter is recorded."""
    t = time.perf_counter()
    edits = routing.edits_of(chosen)
    asked, asked_formatter = routing.answering(model, formatter, edits, cfg.router)
    # MMLU is the unrouted row's: its questions are scored on the model directly, which a routed model leaves to
    # its adapter (corsa.routing.RoutedModel), so scoring them again would repeat the same numbers.
    ev = evaluate_all(asked, asked_formatter, tokenizer, anchors.with_mined(chosen, trained),
                      dataclasses.replace(cfg, mmlu_n=0), base)
    if "mmlu" in unrouted:
        ev["mmlu"] = unrouted["mmlu"]
        ev["summary"]["mmlu"] = unrouted["summary"]["mmlu"]
    kinds = {"prompt": [r.prompt for r in chosen], "paraphrases": [p for r in chosen for p in r.paraphrases],
             "neighborhood": [n.prompt for r in chosen for n in r.neighborhood]}
    shares = {k: (sum(x is not None for x in asked.routes(v)) / len(v) if v else None) for k, v in kinds.items()}
    record = {**unrouted, **ev, "method": routed_name(unrouted["method"]),
              "routing": {**routing.record(cfg.router, model, edits), "routed_share": shares}}
    record["timings"] = {**ev["timings"], "edit_s": unrouted["timings"]["edit_s"]}
    record["wall_time_s"] = unrouted["wall_time_s"] + time.perf_counter() - t
    artifacts.write_json(folder.parent / record["method"] / "results.json", stamp(record))
    print(f"{record['method']}: {brief(record['summary'])}; routed {shares}")


def run_header(cfg: BenchConfig, chosen: list[EditRequest], skipped: Any, command: str | None,
               preset: presets.Preset) -> dict[str, Any]:
    """What every record of a run starts with. Paths and models recorded absolute / canonical, so a record still
    says what ran when read from elsewhere."""
    return {"bench": cfg.bench, "data": str(Path(cfg.data).resolve()), "split": cfg.split, "n": len(chosen),
            "seed": cfg.seed, "subset": cfg.subset,
            "skipped_in_file": skipped, "case_ids": [r.id for r in chosen], "command": command,
            "model": models.canonical(cfg.model), "prompt_style": cfg.prompt_style,
            "eval_config": dataclasses.asdict(cfg.eval),
            "mmlu_n_per_subject": cfg.mmlu_n, "preset": preset.record()}


def rerun_setting(base: dict[str, Any], router: routing.RouterConfig) -> tuple[BenchConfig, list[EditRequest]]:
    """A finished run's setting, read from its base record, with another routing setting; and its cases, in the
    run's order."""
    cfg = BenchConfig(bench=base["bench"], data=base["data"], split=base["split"], n=base["n"], seed=base["seed"],
                      subset=base.get("subset"), model=base["model"], prompt_style=base["prompt_style"], mmlu_n=0,
                      eval=EvalConfig(**base["eval_config"]), router=router)
    requests, _ = load_benchmark_with_report(cfg.bench, cfg.data, cfg.split)
    by_id = {r.id: r for r in requests}
    return cfg, [by_id[i] for i in base["case_ids"]]


def trained_edits(chosen: Sequence[EditRequest], adapter: Path) -> list[EditRequest]:
    """`chosen` as the adapter was trained on them (the old answers its manifest records, mined or given), which is
    what the evaluation of the adapter reads."""
    manifest = artifacts.read_manifest(adapter)
    mined = manifest.get("mined_old_answers", {})
    return [dataclasses.replace(r, target_old=e.get("target_old"), old_mined=(r.id or str(i)) in mined)
            for i, (r, e) in enumerate(zip(chosen, manifest["edits"]))]


def reroute(run: str | Path, out: str | Path, router: routing.RouterConfig, *, command: str | None = None,
            methods: Sequence[str] | None = None) -> Path:
    """Every adapter of a `corsa bench single` run (or those of `methods`) evaluated again, scope-routed with
    another routing setting, without training: `out` gets the run's base and unrouted records and a new
    `<method>-routed` row for each."""
    run, out = Path(run), Path(out)
    artifacts.check_writable(out, overwrite=False)
    records = [r for r in load_results(run) if r["method"] == unrouted_name(r["method"])
               and (methods is None or r["method"] in ("base", *methods))]
    base = next(r for r in records if r["method"] == "base")
    cfg, chosen = rerun_setting(base, router)
    out.mkdir(parents=True)
    artifacts.write_json(out / "base" / "results.json", base)
    for record in records:
        adapter = run / record["method"] / "adapter"
        if record["method"] == "base" or not (adapter / "adapter_config.json").exists():
            continue
        trained = trained_edits(chosen, adapter)
        model, formatter = load_edited(adapter, route=False)
        artifacts.write_json(out / record["method"] / "results.json", record)
        routed_record(model, formatter, formatter.tokenizer, chosen, trained, cfg, base,
                      {**record, "command": command or record.get("command")}, out / record["method"])
    write_report(out)
    return out


def base_record(out: Path, header: dict[str, Any], chosen: list[EditRequest], cfg: BenchConfig) -> dict[str, Any]:
    """The unedited model's record on the run's cases: read back when the run folder has it (for the same cases),
    else measured and written."""
    base_file = out / "base" / "results.json"
    if base_file.exists():
        base = json.loads(base_file.read_text())
        if base["case_ids"] != header["case_ids"]:
            raise InputError(f"{out} holds results for other cases; use a new --out", field="--out")
        return base
    model, tok, _ = models.load_model(cfg.model)
    t = time.perf_counter()
    formatter = Formatter(tok, cfg.prompt_style)
    base = {**header, "method": "base", **evaluate_all(model, formatter, tok, chosen, cfg, None)}
    base["wall_time_s"] = time.perf_counter() - t
    artifacts.write_json(base_file, stamp(base))
    print(f"base: {brief(base['summary'])}")
    return base


# Written into every results.json; bumped when a field changes meaning, so a reader can tell old records apart.
RESULT_SCHEMA = "corsa-bench-single/1"


def stamp(record: dict[str, Any]) -> dict[str, Any]:
    record["schema"] = RESULT_SCHEMA
    record["date"] = artifacts.now()
    record["versions"] = artifacts.library_versions()
    return record


def brief(summary: dict[str, Any]) -> str:
    return ", ".join(f"{k} {summary[k]:.3f}" for k in HEADLINE if k.startswith("gen.") and summary.get(k) is not None)


def load_results(out: str | Path) -> list[dict[str, Any]]:
    """base first, then methods in the order they were run; records written before a metric existed get it from
    their stored answers (with the unedited model's record as the reference the neighbour metric needs)."""
    paths = list(Path(out).glob("*/results.json"))
    found = [json.loads(p.read_text()) for p in paths]
    base = next((r for r in found if r["method"] == "base"), None)
    older = base is not None and any("gen.neighbor_edit_target" not in r["summary"] for r in found)
    truths = neighborhood_truths(base) if older and base is not None else None
    found = [with_other_targets(r, base, truths) for r in found]
    # When each was written (the file's time breaks ties within a second), a routed row right after the run it
    # was evaluated from.
    written = {r["method"]: (r["date"], p.stat().st_mtime_ns) for r, p in zip(found, paths)}
    return sorted(found, key=lambda r: (r["method"] != "base", written.get(unrouted_name(r["method"]),
                                                                           written[r["method"]]),
                                        r["method"] != unrouted_name(r["method"])))


def neighborhood_truths(record: dict[str, Any]) -> list[list[str]] | None:
    """Each case's neighbourhood true answers, in the record's case order: kept in records since
    gen.neighbor_edit_target exists, else read again from the benchmark file the record names (None when it is
    not reachable or no longer holds the record's cases)."""
    if all("neighborhood_truth" in c for c in record["cases"]):
        return [c["neighborhood_truth"] for c in record["cases"]]
    try:
        requests, _ = load_benchmark_with_report(record["bench"], record["data"], record["split"])
    except (InputError, OSError, KeyError, ValueError):
        return None
    by_id = {r.id: r for r in requests}
    if len(by_id) != len(requests) or any(c.get("id") not in by_id for c in record["cases"]):
        return None
    return [[n.answer for n in by_id[c["id"]].neighborhood] for c in record["cases"]]


def columns(results: Sequence[dict[str, Any]]) -> list[str]:
    keys = [k for k in [*METRICS, "gen.multihop", "gen.singlehop", "sample.reliability", "sample.generality",
                        "mmlu"] if any(r["summary"].get(k) is not None for r in results)]
    return keys


def format_table(results: Sequence[dict[str, Any]]) -> str:
    keys = columns(results)
    lines = ["| method | " + " | ".join(keys) + " | edit time (s) |", "|---" * (len(keys) + 2) + "|"]
    for r in results:
        cells = [("-" if r["summary"].get(k) is None else f"{100 * r['summary'][k]:.1f}") for k in keys]
        edit_s = r.get("timings", {}).get("edit_s")
        lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {'-' if edit_s is None else f'{edit_s:.0f}'} |")
    first = results[0]
    lines.append("")
    lines.append(f"{first['bench']} `{first['split']}`, n = {first['n']}, seed {first['seed']}, model "
                 f"{first['model']}; values in %. {commands_line(results)}")
    for extra in (differences_line(results), mmlu_line(results), seeds_line(results)):
        if extra:
            lines += ["", extra]
    return "\n".join(lines)


def commands_line(results: Sequence[dict[str, Any]]) -> str:
    """Every command that produced a row: a run folder filled by several invocations (a rerun skips finished
    methods) must still trace each row to its own command."""
    by_command: dict[str, list[str]] = {}
    for r in results:
        by_command.setdefault(str(r.get("command")), []).append(r["method"])
    if len(by_command) == 1:
        return f"Command: `{next(iter(by_command))}`"
    return "Commands: " + "; ".join(f"`{c}` ({', '.join(m)})" for c, m in by_command.items())


def write_report(out: str | Path) -> None:
    out = Path(out)
    results = load_results(out)
    if not results:
        return
    artifacts.write_report(out, format_table(results), lambda path: plot(results, path))


def plot(results: Sequence[dict[str, Any]], path: Path) -> None:
    keys = [k for k in ["gen.reliability", "gen.generality", "gen.locality", "gen.locality_agreement",
                        "gen.neighbor_edit_target", "gen.retention", "tf.generality", "tf.locality", "gen.multihop",
                        "mmlu"] if any(r["summary"].get(k) is not None for r in results)]
    fig, ax = plots.axes(1.3 * len(keys) + 2)
    plots.grouped_bars(ax, keys, {r["method"]: [100 * (r["summary"].get(k) or 0.0) for k in keys] for r in results},
                       rotate=True)
    first = results[0]
    ax.set_title(f"{first['bench']} ({first['split']}, n={first['n']}, {first['model']})")
    ax.legend(fontsize=8)
    plots.save(fig, path)

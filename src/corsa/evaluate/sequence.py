"""Multi-update benchmarks (paper sections 4.3 and 5.1): one adapter updated again and again, as a store is.

Every method runs the same stages. Each stage is one update: it continues the adapter the previous stage left,
with the model before the update as the DPO reference (CorsaEditor does both when handed a PEFT model). The
probes of an edit are its prompt and its paraphrases; a probe is correct when the greedy answer contains the
target the store holds for it at that moment. From the answers (docs/METRICS.md has the exact definitions):

  efficacy     probes of the later stages' edits answered with their new target (the paper's "update efficacy",
               measured on paraphrases), right after their own update (`evaluate_after="each"`) or once after the
               last update (`"all"`); `efficacy_prompt` is the same on the edit prompts alone
  forgetting   of the first-stage facts that no later stage revised and whose edit prompt was answered right
               after the first update, the share answered wrongly after the last update (the issue's definition,
               and `corsa update`'s); `forgetting_probes` is the same over prompts and paraphrases together
  activation   of the probes of first-stage facts whose old answer (the one the first update overwrote) was gone
               right after the first update, the share that give it again after the last update (paper Table 5)
  revision_old of the probes of revised facts, the share still giving the answer the revision replaced
  locality, locality_agreement, neighbor_edit_target
               the neighbourhood prompts of every edit, after the last update: answered with their true answer,
               with the unedited model's answer, and with some edit's new target (gen.* in docs/METRICS.md)

Methods that do not continue an adapter (F-Learning, MEMIT, merging) run each later update on the model the
previous one left, with its adapter folded into the weights first (`fold`): F-Learning forgets and learns again
on top of the earlier edits, MEMIT edits sequentially (its key statistics stay those of the base model, as
EasyEdit's sequential editing keeps them), merging interpolates towards the model before the update. Prepend
keeps every fact told so far in its context, a later fact for the same prompt replacing the earlier one.

`inject` is cross-dataset injection (Table 2): CounterFact first, then MQuAKE. `revise` is continual revision
(Table 3; AToKe is not available here): first-stage CounterFact facts are revised in the second stage to the new
answer of another case of the same relation, mixed with unrelated new edits, or user chains are applied
(`chain` in the JSONL). `fractions` repeats the later stages with a share of their edits (Figure 3).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from corsa import anchors, artifacts, models, presets
from corsa.answers import contains, normalize
from corsa.errors import InputError
from corsa.evaluate import plots, stats
from corsa.evaluate.metrics import forgotten, neighbor_edit_target
from corsa.evaluate.runner import check_before_work, commands_line, method_overrides, parse_method, select_cases
from corsa.methods import REGISTRY
from corsa.prompts import Formatter, PromptStyle
from corsa.requests import EditRequest, load_benchmark, read_edits
from corsa.scoring import generate


@dataclass(frozen=True)
class SequenceConfig:
    kind: Literal["inject", "revise"]
    data: str
    n: int = 100  # edits in the first update
    n2: int = 100  # edits in the second update (revise: revisions + unrelated new edits)
    n_revise: int = 50  # revise: first-stage facts revised in the second update
    seed: int = 0
    split: str = "edit"  # CounterFact's split for the first update (and revise's chains): val to tune, edit to report
    methods: tuple[str, ...] = ("lora", "corsa")
    model: str | None = None
    prompt_style: PromptStyle = "auto"
    evaluate_after: Literal["each", "all"] = "each"
    fractions: tuple[float, ...] = (1.0,)  # share of each later stage's edits used (Figure 3)
    chains: str | None = None  # revise: a JSONL of edit requests with `chain`, instead of chains from CounterFact
    max_new_tokens: int = 32
    preset: str = "auto"  # the settings `corsa update` would use on this model (corsa.presets), or "paper"
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.evaluate_after not in ("each", "all"):
            raise InputError("must be 'each' or 'all'", field="--eval-after")
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise InputError("each fraction must be in (0, 1]", field="--fractions")
        if self.kind == "revise" and self.chains is None and not 0 < self.n_revise <= min(self.n, self.n2):
            raise InputError("must be between 1 and both --n and --n2", field="--n-revise")


# --- building the stages --------------------------------------------------------------------------------------
def relation(r: EditRequest) -> str:
    """CounterFact has no relation ids in this format; the prompt with its subject cut out names the relation."""
    return r.prompt.replace(r.subject, "{}") if r.subject else r.prompt


def revision_stages(pool: list[EditRequest], cfg: SequenceConfig) -> list[list[EditRequest]]:
    """Stage 1: n facts, n_revise of them later revised; stage 2: the revisions (old -> new1 -> new2, new2 the new
    answer of another case of the same relation) and n2 - n_revise unrelated new edits."""
    rng = random.Random(cfg.seed)
    order = list(range(len(pool)))
    rng.shuffle(order)
    by_relation: dict[str, list[EditRequest]] = {}
    for r in pool:
        by_relation.setdefault(relation(r), []).append(r)
    chains: list[tuple[EditRequest, str]] = []
    used: set[str] = set()
    for i in order:
        r = pool[i]
        if len(chains) == cfg.n_revise:
            break
        answers = {normalize(r.target_new), normalize(r.target_old or "")}
        partner = next((o.target_new for o in by_relation[relation(r)] if normalize(o.target_new) not in answers),
                       None)
        if partner is not None:
            chains.append((r, partner))
            used.add(r.prompt)
    if len(chains) < cfg.n_revise:
        raise InputError(f"only {len(chains)} facts have a second answer of the same relation", field="--n-revise")
    rest = [pool[i] for i in order if pool[i].prompt not in used]
    unrelated1 = rest[: cfg.n - cfg.n_revise]
    unrelated2 = rest[cfg.n - cfg.n_revise : cfg.n - cfg.n_revise + cfg.n2 - cfg.n_revise]
    if len(unrelated2) < cfg.n2 - cfg.n_revise:
        raise InputError(f"the data has {len(pool)} cases, too few for --n {cfg.n} and --n2 {cfg.n2}", field="--n")
    revisions = [dataclasses.replace(r, target_new=new2, target_old=r.target_new, id=f"{r.id}-rev", old_mined=False)
                 for r, new2 in chains]
    stage2 = revisions + unrelated2
    random.Random(cfg.seed + 1).shuffle(stage2)  # a fraction then takes revisions and unrelated edits alike
    return [[r for r, _ in chains] + unrelated1, stage2]


def chain_stages(requests: list[EditRequest]) -> list[list[EditRequest]]:
    """User chains: stage k trains each chain's k-th answer with the previous one as the old answer; requests
    without a chain are first-stage facts that later stages must not forget."""
    stages: list[list[EditRequest]] = [[dataclasses.replace(r, chain=()) for r in requests]]
    for k in range(max(len(r.chain) for r in requests)):
        answers = [(r, [r.target_new, *r.chain]) for r in requests if len(r.chain) > k]
        stages.append([dataclasses.replace(r, target_new=a[k + 1], target_old=a[k], chain=(), old_mined=False,
                                           id=f"{r.id or r.prompt}-rev{k + 1}") for r, a in answers])
    return stages


def build_stages(cfg: SequenceConfig) -> list[list[EditRequest]]:
    if cfg.kind == "inject":
        first = select_cases(load_benchmark("counterfact", cfg.data, cfg.split), cfg.n, cfg.seed, "counterfact")
        second = select_cases(load_benchmark("mquake", cfg.data, "edit"), cfg.n2, cfg.seed, "mquake")  # one split
        return [first, second]
    if cfg.chains:
        requests = read_edits(cfg.chains, chains=True)
        if not any(r.chain for r in requests):
            raise InputError("no request has a 'chain' of later answers", path=cfg.chains, field="chain")
        return chain_stages(requests)
    return revision_stages(load_benchmark("counterfact", cfg.data, cfg.split), cfg)


def take(stage: list[EditRequest], fraction: float) -> list[EditRequest]:
    return stage[: max(1, math.ceil(fraction * len(stage)))]


# --- running and scoring --------------------------------------------------------------------------------------
def probes(r: EditRequest) -> list[str]:
    return [r.prompt, *r.paraphrases]


def answer_probes(model: torch.nn.Module, formatter: Formatter, requests: Sequence[EditRequest],
                  max_new_tokens: int) -> dict[str, str]:
    prompts = list(dict.fromkeys(p for r in requests for p in probes(r)))
    return dict(zip(prompts, generate(model, formatter, prompts, max_new_tokens=max_new_tokens)))


def answer_neighbors(model: torch.nn.Module, formatter: Formatter, requests: Sequence[EditRequest],
                     max_new_tokens: int) -> dict[str, str]:
    """The answers to the requests' neighbourhood prompts, generated apart from the probes so the probes are asked
    in the same batches as before neighbours were measured (their answers, and so every older metric, unchanged)."""
    prompts = list(dict.fromkeys(n.prompt for r in requests for n in r.neighborhood))
    return dict(zip(prompts, generate(model, formatter, prompts, max_new_tokens=max_new_tokens))) if prompts else {}


def locality(requests: Sequence[EditRequest], before: dict[str, str], after: dict[str, str]) -> dict[str, Any]:
    """Neighbourhood prompts of `requests` (every edit the run made), `before` any update and `after` the last:
    the shares answered with their true answer, with the unedited model's very answer, and with some edit's new
    target (the definitions of gen.locality, gen.locality_agreement and gen.neighbor_edit_target)."""
    targets = sorted({normalize(r.target_new) for r in requests})
    # Once each: a revised fact brings its neighbours again, and they are one question, not two.
    asked = list(dict.fromkeys((n.prompt, n.answer) for r in requests for n in r.neighborhood))
    return {"locality": _share([contains(after[p], truth) for p, truth in asked]),
            "locality_agreement": _share([after[p] == before[p] for p, _ in asked]),
            "neighbor_edit_target": _share([neighbor_edit_target(after[p], before[p], truth, targets)
                                            for p, truth in asked]),
            "n_neighbors": len(asked)}


def _share(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def _rate(counts: dict[str, list[int]]) -> float | None:
    """Events over trials, pooled over the facts of a by_case table."""
    trials = sum(n for _, n in counts.values())
    return sum(e for e, _ in counts.values()) / trials if trials else None


def kept_facts(first: list[EditRequest], later: list[EditRequest]) -> list[EditRequest]:
    """First-update facts that no later update revises: the ones forgetting is measured on."""
    revised = {r.prompt for r in later}
    return [r for r in first if r.prompt not in revised]


def score(stages: list[list[EditRequest]], after_first: dict[str, str], at_efficacy: dict[str, str],
          final: dict[str, str]) -> dict[str, Any]:
    """The metrics of the module docstring from three sets of answers: right after the first update, when
    efficacy is measured, and after the last update."""
    first, later = stages[0], [r for s in stages[1:] for r in s]
    cases = by_case(kept_facts(first, later), later, after_first, at_efficacy, final)
    gone = [(p, r.target_old) for r in first if r.target_old for p in probes(r)
            if not contains(after_first[p], r.target_old)]
    first_prompts = {r.prompt for r in first}
    revisions = [r for r in later if r.prompt in first_prompts and r.target_old]
    paraphrased = [(p, r.target_new) for r in later for p in r.paraphrases]
    return {
        # On paraphrases, as the paper measures update efficacy; on prompts when the edits have none.
        "efficacy": _share([contains(at_efficacy[p], t) for p, t in paraphrased]) if paraphrased
        else _share([contains(at_efficacy[r.prompt], r.target_new) for r in later]),
        "efficacy_prompt": _share([contains(at_efficacy[r.prompt], r.target_new) for r in later]),
        "first_efficacy": _share([contains(after_first[p], r.target_new) for r in first for p in probes(r)]),
        "forgetting": _rate(cases["forgetting"]),
        "forgetting_probes": _rate(cases["forgetting_probes"]),
        "activation": _share([contains(final[p], old) for p, old in gone]),
        "revision_old": _share([contains(final[p], r.target_old or "") for r in revisions for p in probes(r)]),
        "counts": {"first": len(first), "later": len(later),
                   "kept_prompts_correct": sum(n for _, n in cases["forgetting"].values()),
                   "kept_probes_correct": sum(n for _, n in cases["forgetting_probes"].values()),
                   "overwritten_probes": len(gone)},
        "by_case": cases,
    }


def case_key(r: EditRequest) -> str:
    return r.id or r.prompt


def forgetting_by_fact(kept: list[EditRequest], after_first: dict[str, str], final: dict[str, str],
                       asked: Callable[[EditRequest], list[str]]) -> dict[str, list[int]]:
    """Per kept fact, [forgotten, right after the first update] over the probes `asked` names."""
    counts = {}
    for r in kept:
        right, lost = forgotten({p: r.target_new for p in asked(r)}, after_first, final)
        counts[case_key(r)] = [len(lost), len(right)]
    return counts


def by_case(kept: list[EditRequest], later: list[EditRequest], after_first: dict[str, str],
            at_efficacy: dict[str, str], final: dict[str, str]) -> dict[str, dict[str, list[int]]]:
    """Per fact, [events, trials] of forgetting on the edit prompt and on every probe (kept first-update facts)
    and of efficacy (later edits), for intervals that resample facts rather than probes (a fact's probes
    succeed or fail together)."""
    efficacy = {}
    paraphrased = any(r.paraphrases for r in later)  # as score(): paraphrases when there are any, else prompts
    for r in later:
        asked = list(r.paraphrases) if paraphrased else [r.prompt]
        efficacy[case_key(r)] = [sum(contains(at_efficacy[p], r.target_new) for p in asked), len(asked)]
    return {"forgetting": forgetting_by_fact(kept, after_first, final, lambda r: [r.prompt]),
            "forgetting_probes": forgetting_by_fact(kept, after_first, final, probes),
            "efficacy": efficacy}


def fold(model: torch.nn.Module) -> torch.nn.Module:
    """The model with its adapter (if any) merged into the weights, for methods that edit plain weights."""
    return model.merge_and_unload() if hasattr(model, "peft_config") else model


def run_sequence(cfg: SequenceConfig, out: str | Path, *, progress: bool = True,
                 command: str | None = None) -> Path:
    out = Path(out)
    methods = [(spec, *parse_method(spec)) for spec in cfg.methods]
    preset = presets.choose(cfg.preset, cfg.model, "update")
    check_before_work(out, methods, preset, cfg.model, cfg.overrides, str(cfg.data))
    stages = build_stages(cfg)
    header = {"bench": cfg.kind, "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "overrides"},
              "overrides": cfg.overrides, "command": command, "model": models.canonical(cfg.model),
              "stages": [[r.id for r in s] for s in stages], "preset": preset.record()}
    refuse_other_runs(out, header)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{cfg.kind}: stages of {', '.join(str(len(s)) for s in stages)} edits; methods {', '.join(cfg.methods)}")
    for spec, method, overrides in methods:
        res_file = out / spec / "results.json"
        if artifacts.finished_row(res_file, spec):
            continue
        t0 = time.perf_counter()
        editor = presets.editor(preset, method, method_overrides(method, overrides, cfg.overrides, cfg.data))
        base, tok, _ = models.load_model(cfg.model)
        formatter = Formatter(tok, cfg.prompt_style)
        everything = [r for s in stages for r in s]
        before = answer_probes(base, formatter, everything, cfg.max_new_tokens)
        neighbors_before = answer_neighbors(base, formatter, everything, cfg.max_new_tokens)
        # Training never sees the evaluation's paraphrases or neighbourhood prompts (anchors would use them).
        first = editor.edit(base, formatter, anchors.withheld(stages[0], everything), progress=progress)
        first_asks = first.formatter or formatter
        after_first = answer_probes(first.model, first_asks, stages[0], cfg.max_new_tokens)  # all score() reads
        runs = []
        for fraction in cfg.fractions:
            model = copy.deepcopy(first.model) if len(cfg.fractions) > 1 else first.model
            asks = first_asks
            used = [stages[0]] + [take(s, fraction) for s in stages[1:]]
            at_efficacy: dict[str, str] = {}
            steps = [first.info.get("steps")]
            for stage in used[1:]:
                if not REGISTRY[method].continues:
                    model = fold(model)
                result = editor.edit(model, asks, anchors.withheld(stage, everything), progress=progress)
                model, asks = result.model, result.formatter or asks
                steps.append(result.info.get("steps"))
                if cfg.evaluate_after == "each":
                    at_efficacy.update(answer_probes(model, asks, stage, cfg.max_new_tokens))
            final = answer_probes(model, asks, [r for s in used for r in s], cfg.max_new_tokens)
            neighbors = answer_neighbors(model, asks, [r for s in used for r in s], cfg.max_new_tokens)
            if cfg.evaluate_after == "all":
                at_efficacy = final
            runs.append({"fraction": fraction, "n_per_stage": [len(s) for s in used], "steps": steps,
                         **score(used, after_first, at_efficacy, final),
                         **locality([r for s in used for r in s], neighbors_before, neighbors),
                         "answers": {"final": final, "neighbors": neighbors}})
            print(f"{spec} (fraction {fraction:g}): efficacy {runs[-1]['efficacy']}, forgetting "
                  f"{runs[-1]['forgetting']}, activation {runs[-1]['activation']}")
            del model
        record = {**header, "method": spec, "method_config": dataclasses.asdict(editor.config),
                  "bf16_used": first.info.get("bf16_used", False), "runs": runs,
                  "answers": {"before": before, "after_first": after_first, "neighbors_before": neighbors_before},
                  "wall_time_s": time.perf_counter() - t0,
                  "date": artifacts.now(),
                  "versions": artifacts.library_versions(), "schema": RESULT_SCHEMA}
        artifacts.write_json(res_file, record)
        del first, base
    write_sequence_report(out)
    return out


RESULT_SCHEMA = "corsa-bench-sequence/1"  # in every results.json; bumped when a field changes meaning


# What must match for a rerun to add methods to a folder's table: the rows are compared with each other.
SAME_RUN = ("kind", "split", "seed", "n_revise", "evaluate_after", "fractions", "chains", "max_new_tokens",
            "prompt_style")


def refuse_other_runs(out: Path, header: dict[str, Any]) -> None:
    """A folder holds one comparison: a rerun with other stages, settings or training overrides would put rows
    that are not paired into one table, so it is refused rather than mixed in."""
    defaults = {f.name: f.default for f in dataclasses.fields(SequenceConfig)}
    new = {k: header["config"][k] for k in SAME_RUN}
    new["fractions"] = list(new["fractions"])  # JSON gives the stored one back as a list
    for path in sorted(out.glob("*/results.json")):
        earlier = json.loads(path.read_text())
        old = {k: earlier["config"].get(k, defaults.get(k)) for k in SAME_RUN}
        old["fractions"] = list(old["fractions"])  # a missing key's default is the tuple
        differs = [k for k in SAME_RUN if old[k] != new[k]]
        if earlier["stages"] != header["stages"]:
            differs.insert(0, "stages")
        if earlier.get("overrides", {}) != header["overrides"]:
            differs.append("training settings")
        if earlier.get("model") != header["model"]:
            differs.append("model")
        if differs:
            raise InputError(f"{out} holds a run with other {', '.join(differs)} ({path.parent.name}); use a new "
                             "--out", field="--out")


def load_sequence_results(out: str | Path) -> list[dict[str, Any]]:
    found = [json.loads(p.read_text()) for p in Path(out).glob("*/results.json")]
    for record in found:
        for run in record["runs"]:
            if "forgetting_probes" not in run:
                rescore_forgetting(record, run)
    return sorted(found, key=lambda r: r["date"])


def rescore_forgetting(record: dict[str, Any], run: dict[str, Any]) -> None:
    """Records written before 2026-12-03 held, as `forgetting`, the rate over prompts and paraphrases together:
    that becomes `forgetting_probes`, and `forgetting` is scored again on the edit prompts from the stored
    answers (None, with only the old counts kept, when the data to rebuild the stages is not reachable)."""
    run["forgetting_probes"] = run["forgetting"]
    counts = run_by_case(record, run)
    if counts is not None:
        run["by_case"], run["forgetting"] = counts, _rate(counts["forgetting"])
        return
    run["forgetting"] = None
    if "by_case" in run:
        run["by_case"]["forgetting_probes"] = run["by_case"].pop("forgetting")


def format_sequence_table(results: Sequence[dict[str, Any]]) -> str:
    # Locality beside efficacy: an update learned by giving its new answers everywhere would look like a success.
    keys = ["efficacy", "efficacy_prompt", "first_efficacy", "locality", "locality_agreement", "neighbor_edit_target",
            "forgetting", "forgetting_probes", "activation", "revision_old"]
    lines = ["| method | fraction | edits per update | " + " | ".join(keys) + " |", "|---" * (len(keys) + 3) + "|"]
    for r in results:
        for run in r["runs"]:
            # records written before neighbours were measured have no locality: "-"
            cells = ["-" if run.get(k) is None else f"{100 * run[k]:.1f}" for k in keys]
            lines.append(f"| {r['method']} | {run['fraction']:g} | {'/'.join(map(str, run['n_per_stage']))} | "
                         + " | ".join(cells) + " |")
    first = results[0]
    lines += ["", (f"{first['bench']}, model {first['model']}, seed {first['config']['seed']}, evaluated after "
                   f"{first['config']['evaluate_after']}; values in %. {commands_line(results)}")]
    compared = comparisons(results)
    if compared:
        lines += ["", compared]
    return "\n".join(lines)


def run_by_case(record: dict[str, Any], run: dict[str, Any]) -> dict[str, dict[str, list[int]]] | None:
    """A run's per-fact counts: stored by score(), or for records written before they were (or before forgetting
    was counted on the edit prompts), recomputed from the stored answers on stages rebuilt from the record's
    config (None when the data is not reachable). Stored efficacy counts are kept; without them efficacy needs
    two stages, where the model after the last update is the one efficacy is measured on (its answers are then
    read from the final pass over every probe, generated in other batches)."""
    stored = run.get("by_case")
    if stored is not None and "forgetting_probes" in stored:
        return stored
    try:
        cfg = dict(record["config"])
        cfg.update(methods=tuple(cfg["methods"]), fractions=tuple(cfg["fractions"]))
        stages = build_stages(SequenceConfig(**cfg))
    except (InputError, OSError, TypeError, KeyError):
        return None
    used = [stages[0]] + [take(s, run["fraction"]) for s in stages[1:]]
    later = [r for s in used[1:] for r in s]
    final = run["answers"]["final"]
    counts = by_case(kept_facts(used[0], later), later, record["answers"]["after_first"], final, final)
    if stored is not None and "efficacy" in stored:
        counts["efficacy"] = stored["efficacy"]
    elif len(used) != 2:
        counts.pop("efficacy")
    return counts


def trained_with(record: dict[str, Any]) -> int | None:
    """The training seed of a method row (its editor config records it); the cases' seed is the run's."""
    return (record.get("method_config") or {}).get("seed")


def paired_counts(ref: dict[str, Any], row: dict[str, Any], run: dict[str, Any]
                  ) -> tuple[dict[str, dict[str, list[int]]], dict[str, dict[str, list[int]]]] | None:
    """The per-fact counts of `ref` and of `row`'s `run` at that run's fraction, or None when either is missing."""
    ref_run = next((x for x in ref["runs"] if x["fraction"] == run["fraction"]), None)
    if ref_run is None:
        return None
    a, b = run_by_case(ref, ref_run), run_by_case(row, run)
    return None if a is None or b is None else (a, b)


def _forgetting_units(pairs: Sequence[tuple[dict, dict]], key: str) -> list[tuple[int, int, int, int]]:
    """One unit per fact, its counts summed over the paired runs (seeds): resampling a fact keeps its seeds."""
    if not all(key in a and key in b for a, b in pairs):
        return []
    keys = [k for k in pairs[0][0][key] if all(k in a[key] and k in b[key] for a, b in pairs)]
    return [tuple(sum(x) for x in zip(*[(*a[key][k], *b[key][k]) for a, b in pairs]))
            for k in keys]  # type: ignore[misc]


def _efficacy_units(pairs: Sequence[tuple[dict, dict]]) -> list[tuple[float, float, int]]:
    """One unit per later edit asked equally often of both methods in every paired run, summed over the runs."""
    if not all("efficacy" in a and "efficacy" in b for a, b in pairs):
        return []
    keys = [k for k in pairs[0][0]["efficacy"] if all(k in a["efficacy"] and k in b["efficacy"]
                                                       and a["efficacy"][k][1] == b["efficacy"][k][1] > 0
                                                       for a, b in pairs)]
    return [(float(sum(a["efficacy"][k][0] for a, _ in pairs)), float(sum(b["efficacy"][k][0] for _, b in pairs)),
             sum(a["efficacy"][k][1] for a, _ in pairs)) for k in keys]


def _comparison(pairs: Sequence[tuple[dict, dict]], against: str) -> list[str]:
    parts = []
    for key, name in (("forgetting", "forgetting"), ("forgetting_probes", "on prompts and paraphrases")):
        units = _forgetting_units(pairs, key)
        ratio = stats.rate_ratio(units) if units else None
        if ratio is not None:
            parts.append(f"{name} {ratio.estimate:.2f}x {against}'s ({ratio.low:.2f} to {ratio.high:.2f}, "
                         f"{ratio.units} facts)")
    d = stats.bootstrap(_efficacy_units(pairs), "efficacy")
    if d is not None:
        parts.append(f"efficacy {100 * d.estimate:+.1f} points ({100 * d.low:+.1f} to {100 * d.high:+.1f}, "
                     f"{d.cases} edits)")
    return parts


def comparisons(results: Sequence[dict[str, Any]], against: str = "lora") -> str:
    """Each method against `against` (trained with the same seed) at each fraction: the forgetting ratio (the
    issue's bar is stated as one) and the efficacy difference, with 95 % paired bootstrap intervals over the
    facts. A setting trained with several seeds also gets one line pooled over its seeds."""
    lines, pooled = [], []
    groups: dict[tuple[str, float], list[tuple[int | None, tuple[dict, dict]]]] = {}
    for r in results:
        ref = stats.partner(results, r, against, trained_with)
        if stats.base_name(r["method"]) == against or ref is None:
            continue
        for run in r["runs"]:
            counts = paired_counts(ref, r, run)
            if counts is None:
                continue
            if trained_with(ref) == trained_with(r):  # only same-seed pairs are pooled, as the line says
                key = (stats.base_name(r["method"]), run["fraction"])
                groups.setdefault(key, []).append((trained_with(r), counts))
            if parts := _comparison([counts], against):
                lines.append(f"- {r['method']}, fraction {run['fraction']:g}: " + "; ".join(parts))
    for (name, fraction), found in groups.items():
        seeds = sorted({s for s, _ in found if s is not None})
        if len(seeds) < 2 or len(seeds) != len(found):
            continue
        if parts := _comparison([c for _, c in found], against):
            pooled.append(f"- {name}, fraction {fraction:g}, training seeds {', '.join(map(str, seeds))} pooled: "
                          + "; ".join(parts))
    if not lines:
        return ""
    text = (f"Against {against}, with 95 % paired bootstrap intervals that resample facts (2,000 resamples; "
            "docs/METRICS.md):\n" + "\n".join(lines))
    if pooled:
        text += ("\n\nPooled over training seeds (each method against the baseline run of the same seed; a "
                 "resampled fact keeps all its seeds):\n" + "\n".join(pooled))
    return text


def write_sequence_report(out: str | Path) -> None:
    out = Path(out)
    results = load_sequence_results(out)
    if not results:
        return
    artifacts.write_report(out, format_sequence_table(results), lambda path: plot_sequence(results, path))


def plot_sequence(results: Sequence[dict[str, Any]], path: Path) -> None:
    fig, ax = plots.axes(6)
    if any(len(r["runs"]) > 1 for r in results):  # Figure 3: forgetting against the share of update data
        for r in results:
            xs = [100 * run["fraction"] for run in r["runs"]]
            ax.plot(xs, [100 * (run["forgetting"] or 0) for run in r["runs"]], marker="o", label=r["method"])
        ax.set_xlabel("% of the update data used")
        ax.set_ylabel("forgetting (%)")
    else:
        keys = ["efficacy", "forgetting", "activation"]
        plots.grouped_bars(ax, keys, {r["method"]: [100 * (r["runs"][0][k] or 0) for k in keys] for r in results})
    ax.set_title(f"{results[0]['bench']} ({results[0]['model']})")
    ax.legend(fontsize=8)
    plots.save(fig, path)

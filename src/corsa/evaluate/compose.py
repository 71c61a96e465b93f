"""`corsa bench compose`: two adapters trained apart, merged into one (paper appendix B.1, Figure 6).

Per method, one adapter learns --n CounterFact edits and another --n MQuAKE edits, each alone. The two are then
merged with PEFT's `add_weighted_adapter`, weight 1 each:

  linear   the sum of the two updates, exactly (PEFT's `cat`: the ranks side by side), task arithmetic with λ = 1:
           the paper's "linear arithmetic merging"
  ties     TIES-merging of the two updates (PEFT's `ties_svd`: each update trimmed to its 20 % largest entries,
           signs elected, the agreeing entries summed, stored at the larger rank)

and each merged adapter answers both sets' edit prompts and paraphrases. Forgetting on a set is the one
definition the store and the multi-update benchmarks share (corsa.evaluate.metrics.forgotten): of its prompts its
own adapter answered with the new target, the share the merged adapter no longer does. Training never sees the
evaluation's paraphrases.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from corsa import anchors, artifacts, models, presets
from corsa.errors import InputError
from corsa.evaluate.metrics import forgotten
from corsa.evaluate.runner import (
    BenchConfig,
    check_before_work,
    edit_once,
    method_overrides,
    parse_method,
    select_cases,
)
from corsa.methods import REGISTRY
from corsa.prompts import Formatter
from corsa.requests import EditRequest, load_benchmark_with_report
from corsa.scoring import generate

SETS = ("counterfact", "mquake")
# name -> (PEFT combination_type, density): see the module docstring.
MERGES = {"linear": ("cat", None), "ties": ("ties_svd", 0.2)}


def held(requests: list[EditRequest]) -> dict[str, str]:
    """What a set's adapter must keep answering: each edit prompt and paraphrase -> its new target."""
    return {p: r.target_new for r in requests for p in [r.prompt, *r.paraphrases]}


def run_compose(cfg: BenchConfig, out: str | Path, *, progress: bool = True, command: str | None = None) -> Path:
    from peft import PeftModel

    out = Path(out)
    methods = [(spec, *parse_method(spec)) for spec in cfg.methods]
    for spec, method, _ in methods:
        if REGISTRY[method].output != "adapter":
            raise InputError(f"'{spec}' writes no adapter, so there is nothing to merge", field="--methods")
    preset = presets.choose(cfg.preset, cfg.model, "edit")
    check_before_work(out, methods, preset, cfg.model, cfg.overrides, str(cfg.data))
    cases = {name: select_cases(load_benchmark_with_report(name, cfg.data, cfg.split if name == "counterfact"
                                                            else "edit")[0], cfg.n, cfg.seed, name, cfg.subset)
             for name in SETS}
    out.mkdir(parents=True, exist_ok=True)
    print(f"{cfg.n} CounterFact and {len(cases['mquake'])} MQuAKE edits (seed {cfg.seed}); methods: "
          f"{', '.join(cfg.methods)}")
    everything = [r for c in cases.values() for r in c]  # no anchor is a prompt either set is evaluated with
    for spec, method, overrides in methods:
        res_file = out / spec / "results.json"
        if artifacts.finished_row(res_file, spec):
            continue
        t = time.perf_counter()
        folders, edit_s = {}, 0.0
        for name in SETS:
            folders[name], result, seconds = edit_once(
                anchors.withheld(cases[name], everything), out / spec / name, method=method, model=cfg.model,
                progress=progress, command=command, prompt_style=cfg.prompt_style, preset=cfg.preset,
                **method_overrides(method, overrides, cfg.overrides, cfg.data))
            edit_s += seconds
            del result
        model, tok, _ = models.load_model(cfg.model)
        peft = PeftModel.from_pretrained(model, str(folders["counterfact"]), adapter_name="counterfact")
        peft.load_adapter(str(folders["mquake"]), adapter_name="mquake")
        for merge, (kind, density) in MERGES.items():
            peft.add_weighted_adapter(list(SETS), [1.0, 1.0], merge, combination_type=kind, density=density)
        formatter = Formatter(tok, cfg.prompt_style)
        answers: dict[str, dict[str, dict[str, str]]] = {}
        for adapter in (*SETS, *MERGES):
            peft.set_adapter(adapter)
            answers[adapter] = {}
            for name in SETS:
                prompts = list(held(cases[name]))
                answers[adapter][name] = dict(zip(prompts, generate(peft, formatter, prompts,
                                                                    max_new_tokens=cfg.eval.max_new_tokens)))
        rows = {}
        for name in SETS:
            facts = held(cases[name])
            for merge in MERGES:
                correct, lost = forgotten(facts, answers[name][name], answers[merge][name])
                rows[f"{merge}/{name}"] = {"correct_alone": len(correct), "forgotten": len(lost),
                                           "forgetting": len(lost) / len(correct) if correct else None,
                                           "prompts": len(facts)}
        record = {"method": spec, "command": command, "model": models.canonical(cfg.model), "seed": cfg.seed,
                  "subset": cfg.subset, "n": {k: len(v) for k, v in cases.items()},
                  "case_ids": {k: [r.id for r in v] for k, v in cases.items()}, "merges": dict(MERGES),
                  "config": artifacts.read_manifest(folders["counterfact"])["config"],
                  "forgetting": rows, "answers": answers, "edit_s": edit_s, "wall_time_s": time.perf_counter() - t,
                  "date": artifacts.now(), "versions": artifacts.library_versions()}
        artifacts.write_json(res_file, record)
        print(f"{spec}: " + "; ".join(f"{k} forgetting {_pct(v['forgetting'])} ({v['forgotten']}/"
                                      f"{v['correct_alone']})" for k, v in rows.items()))
        del peft, model
    write_table(out)
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def write_table(out: Path) -> None:
    records = sorted((json.loads(p.read_text()) for p in out.glob("*/results.json")), key=lambda r: r["date"])
    if not records:
        return
    keys = list(records[0]["forgetting"])
    lines = ["| method | " + " | ".join(f"forgetting, {k}" for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in records:
        lines.append(f"| {r['method']} | " + " | ".join(
            f"{_pct(r['forgetting'][k]['forgetting'])} ({r['forgetting'][k]['forgotten']}/"
            f"{r['forgetting'][k]['correct_alone']})" for k in keys) + " |")
    first = records[0]
    lines += ["", f"{first['n']['counterfact']} CounterFact and {first['n']['mquake']} MQuAKE edits, seed "
              f"{first['seed']}, model {first['model']}. Forgetting: of a set's edit prompts and paraphrases its own "
              "adapter answered with the new target, the share the merged adapter does not (count in parentheses). "
              "Commands: " + "; ".join(dict.fromkeys(f"`{r['command']}`" for r in records))]
    artifacts.write_text(out / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))

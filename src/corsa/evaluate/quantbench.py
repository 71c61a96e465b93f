"""`corsa bench quantize`: what quantization does to the edits, and whether keeping the weights they depend on
saves them (issue 31).

One adapter (the model's `edit` preset, trained without the evaluation's paraphrases and neighbourhood prompts) is
merged into its base model, and the merged model is quantized at each --bits by four rules at one --keep, rounding
by round-to-nearest or by GPTQ (--quantizer):

  rtn / gptq     nothing kept (a lower bit budget than the others); GPTQ's calibration text is general questions
  magnitude      the same, with the largest --keep % of each matrix's weights kept in 16 bits
  tacq-general   TaCQ's saliency |(Q(W) - W) * dL/dW| with general questions as the task
  tacq-edits     the same with the edits as the task (their prompts, new and mined old answers, auto-built anchors;
                 never the evaluation's paraphrases or neighbours) mixed with the general questions; with
                 --calibration-contexts n > 0 each prompt also behind n model-written contexts (row
                 tacq-edits-ctx<n>); with --delta-rank k > 0 the adapter's change is also kept beside each
                 matrix at rank k in 16 bits, and --keep is lowered so the row spends the same bits (row
                 tacq-edits-rank<k>)

With --keep-scope model every rule that keeps weights keeps the top --keep % of the whole model's weights, ranked
together, instead of each matrix's (rows <rule>-global).

Every row, the unquantized merged model and the base model are measured the same way: edit success, generality,
locality (agreement with the base model, correctness) by generation, and MMLU accuracy and gold-letter
log-probability. The models are unrouted (a merged or quantized model has no adapter to route), so locality here
shows quantization's effect, not the tool's default behaviour. Paired bootstrap intervals compare tacq-edits with
each other rule at the same bits, over cases (and over questions for MMLU).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from corsa import anchors, artifacts, models, presets
from corsa.editing import edit, trained_earlier
from corsa.errors import InputError
from corsa.evaluate.metrics import evaluate
from corsa.evaluate.mmlu import MMLUConfig, evaluate_mmlu
from corsa.evaluate.runner import BenchConfig, check_before_work, method_overrides, select_cases
from corsa.evaluate.stats import mmlu_logprob_difference, paired_difference
from corsa.export import edits_of_source, merged_model, quantize
from corsa.prompts import Formatter
from corsa.quantize import QuantConfig, keep_beside_delta, load_quantized, quantized_modules
from corsa.requests import load_benchmark_with_report

# The baselines' calibration is general: it is only used by GPTQ (and TaCQ), and a baseline is never conditioned
# on the edits.
BASELINES: dict[str, dict[str, Any]] = {
    "rtn": {"keep": 0.0, "calibration": "general"},
    "magnitude": {"saliency": "magnitude", "calibration": "general"},
    "tacq-general": {"calibration": "general"},
}
QUANTIZERS = ("rtn", "gptq")
# Every rule's row, as row_name writes it: the rule, with -ctx<n> (tacq-edits' context copies) and -global (one keep
# budget for the whole model) when set, then the quantizer unless round-to-nearest, then the bits.
RULE_ROW = re.compile(
    r"^((?:magnitude|tacq-general|tacq-edits(?:-ctx\d+)?(?:-rank\d+)?)(?:-global)?)-(?:gptq-)?\d+bit$")


def rules(contexts_per_edit: int = QuantConfig.contexts_per_edit, keep_scope: str = QuantConfig.keep_scope,
          delta_rank: int = QuantConfig.delta_rank, keep_beside: float | None = None) -> dict[str, dict[str, Any]]:
    """The baselines and tacq-edits at these settings, each named after the settings that differ from the first
    runs' (tacq-edits-ctx4, tacq-edits-rank4, magnitude-global), so that rows of several settings can share one run
    folder. `keep_beside`: tacq-edits' keep beside its rank-`delta_rank` copy (keep_beside_delta)."""
    scope = "-global" if keep_scope == "model" else ""
    edits = "tacq-edits" + (f"-ctx{contexts_per_edit}" if contexts_per_edit else "") + (
        f"-rank{delta_rank}" if delta_rank else "")
    mine: dict[str, Any] = {"contexts_per_edit": contexts_per_edit, "delta_rank": delta_rank}
    if delta_rank:
        if keep_beside is None:
            raise ValueError("a tacq-edits row with delta_rank needs its keep at the same bits (keep_beside)")
        mine["keep"] = keep_beside
    named = {**BASELINES, edits: mine}
    return {rule if rule == "rtn" else rule + scope: {**change, "keep_scope": keep_scope}
            for rule, change in named.items()}


def projection_shapes(model_name: str | None) -> list[tuple[int, int]]:
    """The [out, in] shapes of the matrices `corsa quantize` quantizes, read from the model's config alone (the
    model is built on the meta device: no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(models.resolve(model_name))))
    return [(int(m.weight.shape[0]), int(m.weight.shape[1])) for m in quantized_modules(skeleton).values()]


def row_name(rule: str, quantizer: str, bits: int) -> str:
    """A row's folder and label: rtn-3bit, tacq-edits-3bit (round-to-nearest, as the first runs named them), or
    gptq-3bit, tacq-edits-gptq-3bit, so both can share one run folder."""
    if quantizer == "rtn":
        return f"{rule}-{bits}bit"
    return f"gptq-{bits}bit" if rule == "rtn" else f"{rule}-{quantizer}-{bits}bit"


SHOWN = ("gen.reliability", "gen.generality", "gen.locality_agreement", "gen.locality")


def measure(model: Any, formatter: Formatter, requests: list[Any], reference: dict[str, Any] | None,
            cfg: BenchConfig) -> dict[str, Any]:
    record = evaluate(model, formatter, requests, reference=reference, config=cfg.eval)
    if cfg.mmlu_n != 0:
        record["mmlu"] = evaluate_mmlu(model, formatter.tokenizer, cfg.data, MMLUConfig(n_per_subject=cfg.mmlu_n))
    return record


def run_quant_bench(cfg: BenchConfig, out: str | Path, *, bits: tuple[int, ...] = (2, 3, 4), keep: float = 0.5,
                    quantizer: str = QuantConfig.quantizer, contexts_per_edit: int = QuantConfig.contexts_per_edit,
                    keep_scope: str = QuantConfig.keep_scope, delta_rank: int = QuantConfig.delta_rank,
                    method: str = "corsa", progress: bool = True, command: str | None = None) -> Path:
    out = Path(out)
    beside = keep_beside_delta(projection_shapes(cfg.model), keep, delta_rank) if delta_rank else None
    run_rules = rules(contexts_per_edit, keep_scope, delta_rank, beside)
    for b in bits:  # every setting checked before any work
        for change in run_rules.values():
            QuantConfig(bits=b, quantizer=quantizer, **{"keep": keep, **change})  # type: ignore[arg-type]
    preset = presets.choose(cfg.preset, cfg.model, "edit")
    check_before_work(out, [(method, method, {})], preset, cfg.model, cfg.overrides, str(cfg.data))
    requests = select_cases(load_benchmark_with_report(cfg.bench, cfg.data, cfg.split)[0], cfg.n, cfg.seed,
                            cfg.bench, cfg.subset)
    run = out / "adapter"
    to_train = anchors.withheld(requests)
    settings = {"method": method, "model": cfg.model, "prompt_style": cfg.prompt_style, "preset": cfg.preset,
                "route": None, **method_overrides(method, {}, cfg.overrides, cfg.data)}
    trained_before = artifacts.is_run(run)
    # Every row of the folder measures its one adapter: an adapter of other settings or edits left there by an
    # earlier run would be measured under this run's name, so it is refused rather than used or replaced.
    if trained_before and trained_earlier(to_train, run, **settings) is None:
        raise InputError(f"{run} holds an adapter trained with other settings or edits than this run's; "
                         "give another --out", field="--out")
    out.mkdir(parents=True, exist_ok=True)
    if not trained_before:
        edit(to_train, run, overwrite=True, progress=progress, command=command, **settings)
    # what training saw, old answers mined: the only edits calibration may use; marked so that no calibration
    # anchor is one of the prompts the rows are measured on
    trained = anchors.withheld(edits_of_source(run), requests)
    asked = anchors.with_mined(requests, trained)
    print(f"{cfg.bench}/{cfg.split}: {len(requests)} edits (seed {cfg.seed}), {method} adapter in {run}; "
          f"bits {', '.join(map(str, bits))}, keep {keep} %, {quantizer}"
          + (f"; rank-{delta_rank} copy of the change with keep {beside:.3f} %" if beside is not None else ""))

    def row(name: str, make: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        path = out / name / "results.json"
        if path.exists():
            return json.loads(path.read_text())
        t = time.perf_counter()
        model, formatter = make()
        reference = None if name == "base" else json.loads((out / "base" / "results.json").read_text())
        record = measure(model, formatter, asked, reference, cfg)
        record.update(row=name, command=command, n=len(requests), seed=cfg.seed, subset=cfg.subset,
                      case_ids=[r.id for r in requests], model=models.canonical(cfg.model), date=artifacts.now(),
                      seconds=time.perf_counter() - t, versions=artifacts.library_versions(), **(extra or {}))
        artifacts.write_json(path, record)
        summary = ", ".join(f"{k} {100 * record['summary'][k]:.1f}" for k in SHOWN if record["summary"][k] is not None)
        mmlu = record.get("mmlu")
        print(f"{name}: {summary}" + (f", mmlu {100 * mmlu['accuracy']:.1f} (gold log-prob "
                                     f"{mmlu['gold_logprob']:.3f})" if mmlu else ""))
        return record

    def base() -> tuple[Any, Formatter]:
        model, tok, _ = models.load_model(cfg.model)
        return model, Formatter(tok, cfg.prompt_style)

    row("base", base)
    row("unquantized", lambda: merged_model(run)[:2])
    for b in bits:
        for rule, change in run_rules.items():
            name = row_name(rule, quantizer, b)
            folder = out / "models" / name
            if (out / name / "results.json").exists():
                continue
            qcfg = QuantConfig(bits=b, quantizer=quantizer, **{"keep": keep, **change})  # type: ignore[arg-type]
            _, made = quantize(run, folder, qcfg, requests=trained, overwrite=True, command=command)
            row(name, lambda folder=folder: load_quantized(folder),
                {"quantized": {k: made[k] for k in ("config", "method", "bits_per_quantized_weight", "kept_share",
                                                     "bytes", "seconds")}})
            shutil.rmtree(folder)  # written by this run (is_quantized proved it); sizes are in the row's record
    write_table(out, bits)
    return out


def write_table(out: Path, bits: tuple[int, ...]) -> None:
    rows = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/results.json")}
    present = {m.group(1) for name in rows if (m := RULE_ROW.match(name))}
    families = ("magnitude", "tacq-general", "tacq-edits")  # the first runs' order, each rule's variants after it
    all_rules = ["rtn", *sorted(present, key=lambda r: ([r.startswith(f) for f in families].index(True), r))]
    edit_rules = [r for r in all_rules if r.startswith("tacq-edits")]
    order = ["base", "unquantized"] + [row_name(r, q, b) for q in QUANTIZERS for b in bits for r in all_rules]
    head = ["row", "bits per weight", "kept", *SHOWN, "mmlu", "mmlu gold log-prob"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name in (n for n in order if n in rows):
        r = rows[name]
        q = r.get("quantized")
        cells = [name, f"{q['bits_per_quantized_weight']:.2f}" if q else "16/32",
                 f"{100 * q['kept_share']:.2f} %" if q else "-"]
        cells += [f"{100 * r['summary'][k]:.1f}" if r["summary"][k] is not None else "-" for k in SHOWN]
        m = r.get("mmlu")
        cells += [f"{100 * m['accuracy']:.1f}", f"{m['gold_logprob']:.3f}"] if m else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    intro = ("Values in %; MMLU gold log-prob in nats. tacq-edits minus each other rule at the same bits, 95 % "
             "paired bootstrap intervals over cases (MMLU: over questions):")
    notes = ["", intro, ""]
    for q, b, edits in ((q, b, e) for q in QUANTIZERS for b in bits for e in edit_rules):
        label = f"{b} bits" + ("" if q == "rtn" else f", {q}")
        mine = rows.get(row_name(edits, q, b))
        if mine is None:
            continue
        # baselines at the same keep scope; a variant also against plain tacq-edits, the setting it would replace
        scope = "-global" if edits.endswith("-global") else ""
        others = ["rtn", "magnitude" + scope, "tacq-general" + scope] + (["tacq-edits"] if edits != "tacq-edits"
                                                                        else [])
        for rule in others:
            other = rows.get(row_name(rule, q, b))
            if other is None:
                continue
            parts = []
            for metric in ("gen.reliability", "gen.generality", "gen.locality_agreement"):
                d = paired_difference(other["cases"], mine["cases"], metric)
                if d is not None:
                    parts.append(f"{metric} {100 * d.estimate:+.1f} ({100 * d.low:+.1f} to {100 * d.high:+.1f})")
            if mine.get("mmlu") and other.get("mmlu"):
                d = mmlu_logprob_difference(other["mmlu"], mine["mmlu"])
                if d is not None:
                    parts.append(f"mmlu gold log-prob {d.estimate:+.3f} ({d.low:+.3f} to {d.high:+.3f})")
            notes.append(f"- {label}, {edits} minus {row_name(rule, q, b).removesuffix(f'-{b}bit')}: "
                         + "; ".join(parts))
        unq = rows.get("unquantized")
        if unq:
            kept = {k: mine["summary"][k] / unq["summary"][k] for k in ("gen.reliability", "gen.generality")
                    if unq["summary"][k]}
            notes.append(f"- {label}, {edits} as a share of the unquantized model: "
                         + ", ".join(f"{k} {100 * v:.0f} %" for k, v in kept.items()))
    commands = sorted({r["command"] for r in rows.values() if r.get("command")})
    table = "\n".join(lines + notes + ["", "Command: " + "; ".join(f"`{c}`" for c in commands)])
    artifacts.write_report(out, table, lambda path: plot(rows, bits, all_rules, path))


def plot(rows: dict[str, dict[str, Any]], bits: tuple[int, ...], all_rules: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("gen.reliability", "gen.generality")):
        for q, rule in ((q, r) for q in QUANTIZERS for r in all_rules):
            xs = [b for b in bits if row_name(rule, q, b) in rows]
            if xs:
                ax.plot(xs, [100 * rows[row_name(rule, q, b)]["summary"][metric] for b in xs], marker="o",
                        ls="-" if q == "rtn" else "--", label=row_name(rule, q, 0).removesuffix("-0bit"))
        if "unquantized" in rows:
            ax.axhline(100 * rows["unquantized"]["summary"][metric], color="grey", ls="--", label="unquantized")
        ax.set(xlabel="bits", ylabel=f"{metric} (%)", xticks=list(bits), title=metric)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

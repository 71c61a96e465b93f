"""`corsa bench lifelong`: T updates of B CounterFact edits each, every method continuing its own model, measured
after every update on every edit so far (issue 32; AlphaEdit's protocol is T x 100).

Per method, update t trains on batch t alone (its paraphrases and neighbourhood prompts withheld). Methods that
continue an adapter (CoRSA, LoRA) keep training it; the others (MEMIT, AlphaEdit, F-Learning, merging) edit the
model the previous update left with its adapter folded into the weights, as `corsa bench inject` runs them.
After every update, over all edits so far: efficacy (edit prompts answered with the new target), generality
(paraphrases), neighbours answered as the unedited model answers them (every edit's neighbourhood prompts), and
every `mmlu_every` updates and after the last, MMLU accuracy and gold-letter log-probability.

Resumable: each finished update leaves its adapter under METHOD/updates/uNNN/ and a line in METHOD/curve.json,
both written atomically. A killed run continues from the last finished update: continuing methods reload their
last adapter, folding methods re-fold every saved update's adapter in order (each is small: MEMIT's and
AlphaEdit's are rank-B LoRAs), and AlphaEdit reloads the keys it has accumulated. A continuing method keeps only
its last adapter, since each one holds everything before it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from corsa import anchors, artifacts, models, presets, routing
from corsa.answers import contains
from corsa.errors import InputError
from corsa.evaluate.metrics import case_values, neighbor_edit_target
from corsa.evaluate.mmlu import MMLUConfig, evaluate_mmlu
from corsa.evaluate.runner import check_before_work, method_overrides, parse_method, select_cases
from corsa.evaluate.sequence import fold
from corsa.evaluate.stats import paired_difference, routed_name, unrouted_name
from corsa.methods import REGISTRY
from corsa.prompts import Formatter, PromptStyle
from corsa.requests import EditRequest, load_benchmark
from corsa.scoring import generate
from corsa.store import attach_adapter

EDITOR_STATE = "editor_state.safetensors"


@dataclass(frozen=True)
class LifelongConfig:
    data: str
    updates: int = 20  # issue 32: 20 x 50 = 1,000 edits
    batch: int = 50
    seed: int = 0
    split: str = "edit"
    subset: int | None = None
    methods: tuple[str, ...] = ("corsa", "lora", "memit", "alphaedit", "flearning", "merge")
    model: str | None = None
    prompt_style: PromptStyle = "auto"
    mmlu_every: int = 5  # updates between MMLU measurements (and after the last)
    mmlu_n: int = 2  # MMLU questions per subject
    max_new_tokens: int = 32
    preset: str = "auto"  # the settings `corsa update` uses on this model
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("updates", "batch", "mmlu_every"):
            if getattr(self, name) < 1:
                raise InputError(f"must be at least 1, not {getattr(self, name)}", field=f"--{name}")


def answers(model: torch.nn.Module, formatter: Formatter, prompts: list[str], max_new_tokens: int) -> dict[str, str]:
    unique = list(dict.fromkeys(prompts))
    return dict(zip(unique, generate(model, formatter, unique, max_new_tokens=max_new_tokens))) if unique else {}


def measure(model: torch.nn.Module, formatter: Formatter, done: list[EditRequest], before: dict[str, str],
            cfg: LifelongConfig) -> dict[str, Any]:
    """Efficacy, generality, neighbour agreement and neighbours given an edit's target over the edits `done` so far
    (per edit, for intervals; the metrics' definitions are corsa.evaluate.metrics')."""
    asked = answers(model, formatter, [p for r in done for p in (r.prompt, *r.paraphrases)]
                    + [n.prompt for r in done for n in r.neighborhood], cfg.max_new_tokens)
    targets = sorted({r.target_new for r in done})
    per_edit = {r.id or r.prompt: {
        "efficacy": int(contains(asked[r.prompt], r.target_new)),
        "generality": [int(contains(asked[p], r.target_new)) for p in r.paraphrases],
        "agreement": [int(asked[n.prompt] == before[n.prompt]) for n in r.neighborhood],
        "neighbour_target": [int(neighbor_edit_target(asked[n.prompt], before[n.prompt], n.answer, targets))
                             for n in r.neighborhood]} for r in done}

    def share(key: str) -> float | None:
        values = [v for e in per_edit.values() for v in case_values(e, key)]
        return sum(values) / len(values) if values else None

    return {"edits": len(done), "efficacy": share("efficacy"), "generality": share("generality"),
            "locality_agreement": share("agreement"), "neighbor_edit_target": share("neighbour_target"),
            "per_edit": per_edit}


def checkpoint(model: torch.nn.Module, folder: Path, editor: Any) -> None:
    """The adapter this update left (and an editor's accumulated state), atomically."""
    with artifacts.atomic_dir(folder, overwrite=True, owned=lambda f: (f / "adapter_config.json").exists()) as tmp:
        model.save_pretrained(str(tmp))
        state = editor.state() if hasattr(editor, "state") else {}
        if state:
            from safetensors.torch import save_file

            save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(tmp / EDITOR_STATE))


def resume(cfg: LifelongConfig, method: str, folder: Path, done: int, editor: Any) -> tuple[torch.nn.Module, Any]:
    """The model as update `done` left it, rebuilt from the saved adapters (see the module docstring)."""
    base, tok, _ = models.load_model(cfg.model)
    saved = [folder / "updates" / f"u{t:03d}" for t in range(1, done + 1)]
    if REGISTRY[method].continues:
        model = attach_adapter(base, saved[-1], trainable=True)
    else:
        model = base
        for adapter in saved:
            model = fold(attach_adapter(model, adapter))
    if (saved[-1] / EDITOR_STATE).exists() and hasattr(editor, "load_state"):
        from safetensors.torch import load_file

        editor.load_state(load_file(str(saved[-1] / EDITOR_STATE)))
    return model, Formatter(tok, cfg.prompt_style)


def run_lifelong(cfg: LifelongConfig, out: str | Path, *, progress: bool = True, command: str | None = None) -> Path:
    out = Path(out)
    methods = [(spec, *parse_method(spec)) for spec in cfg.methods]
    for spec, method, _ in methods:
        if REGISTRY[method].output != "adapter":
            raise InputError(f"'{spec}' changes no weights; the lifelong benchmark compares weight edits",
                             field="--methods")
    preset = presets.choose(cfg.preset, cfg.model, "update")
    check_before_work(out, methods, preset, cfg.model, cfg.overrides, str(cfg.data))
    cases = select_cases(load_benchmark("counterfact", cfg.data, cfg.split), cfg.updates * cfg.batch, cfg.seed,
                         "counterfact", cfg.subset)
    if len(cases) < cfg.updates * cfg.batch:
        raise InputError(f"the split has {len(cases)} cases, fewer than {cfg.updates} x {cfg.batch}", field="--updates")
    stages = [cases[t * cfg.batch : (t + 1) * cfg.batch] for t in range(cfg.updates)]
    header = {"bench": "lifelong", "config": {k: v for k, v in dataclasses.asdict(cfg).items()
                                              if k not in ("overrides", "methods")},
              "overrides": cfg.overrides, "model": models.canonical(cfg.model), "case_ids": [r.id for r in cases],
              "preset": preset.record()}
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "run.json"
    if run_file.exists():  # a rerun continues the same run; one with other cases or settings would mix curves
        earlier = json.loads(run_file.read_text())
        if (earlier["case_ids"], earlier["config"], earlier["overrides"]) != (
                header["case_ids"], json.loads(json.dumps(header["config"])), header["overrides"]):
            raise InputError(f"{out} holds a lifelong run with other cases or settings; use a new --out",
                             field="--out")
    artifacts.write_json(run_file, header)
    print(f"lifelong: {cfg.updates} updates of {cfg.batch} CounterFact {cfg.split} edits; methods "
          f"{', '.join(cfg.methods)}")
    base, tok, _ = models.load_model(cfg.model)
    formatter = Formatter(tok, cfg.prompt_style)
    before = answers(base, formatter, [n.prompt for r in cases for n in r.neighborhood], cfg.max_new_tokens)
    del base
    for spec, method, overrides in methods:
        folder = out / spec
        curve_file = folder / "curve.json"
        curve = json.loads(curve_file.read_text()) if curve_file.exists() else []
        if len(curve) == cfg.updates:
            print(f"{spec}: done earlier, skipped")
            continue
        editor = presets.editor(preset, method, method_overrides(method, overrides, cfg.overrides, cfg.data))
        if curve:
            model, asks = resume(cfg, method, folder, len(curve), editor)
            print(f"{spec}: resumed after update {len(curve)}")
        else:
            model, tok, _ = models.load_model(cfg.model)
            asks = Formatter(tok, cfg.prompt_style)
        for t in range(len(curve), cfg.updates):
            t0 = time.perf_counter()
            if t and not REGISTRY[method].continues:
                model = fold(model)
            result = editor.edit(model, asks, anchors.withheld(stages[t], cases), progress=progress)
            model, asks = result.model, result.formatter or asks
            edit_s = time.perf_counter() - t0
            done = [r for s in stages[: t + 1] for r in s]
            point = measure(model, asks, done, before, cfg)
            if REGISTRY[method].continues:  # an adapter: measured also as `corsa ask` and a store answer, routed
                point["routed"] = measure(*routing.answering(model, asks, routing.edits_of(done)), done, before, cfg)
            if (t + 1) % cfg.mmlu_every == 0 or t + 1 == cfg.updates:
                m = evaluate_mmlu(model, asks.tokenizer, cfg.data, MMLUConfig(n_per_subject=cfg.mmlu_n))
                point["mmlu"] = {k: m[k] for k in ("accuracy", "gold_logprob", "n", "ids", "gold_logprobs")}
            point.update(update=t + 1, edit_s=edit_s, steps=result.info.get("steps"), date=artifacts.now(),
                         diagnostics={k: result.info[k] for k in REGISTRY[method].diagnostics if k in result.info})
            checkpoint(model, folder / "updates" / f"u{t + 1:03d}", editor)
            if REGISTRY[method].continues and t:  # the new adapter holds the old one's updates
                shutil.rmtree(folder / "updates" / f"u{t:03d}")
            curve.append(point)
            artifacts.write_json(curve_file, curve)
            print(f"{spec} update {t + 1}/{cfg.updates} ({point['edits']} edits): efficacy "
                  f"{100 * point['efficacy']:.1f}, generality {100 * (point['generality'] or 0):.1f}, neighbours "
                  f"as before {100 * (point['locality_agreement'] or 0):.1f}"
                  + (f", mmlu gold log-prob {point['mmlu']['gold_logprob']:.3f}" if "mmlu" in point else "")
                  + f" ({edit_s:.0f} s)")
        artifacts.write_json(folder / "results.json", {**header, "method": spec, "command": command,
                                                       "method_config": dataclasses.asdict(editor.config),
                                                       "curve": curve, "versions": artifacts.library_versions()})
        del model
    write_report(out)
    return out


# What the curves and differences report, as per_edit keys and curve point keys (per_edit key, point key, title).
MEASURES = (("efficacy", "efficacy", "efficacy"), ("generality", "generality", "generality"),
            ("agreement", "locality_agreement", "neighbours as before"),
            ("neighbour_target", "neighbor_edit_target", "neighbours given an edit's target"))


def curves(rows: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each method's curve, and beside an adapter method's its routed curve as `<method>-routed`."""
    out = {}
    for name, r in rows.items():
        out[name] = r["curve"]
        if all("routed" in p for p in r["curve"]):
            out[routed_name(name)] = [p["routed"] for p in r["curve"]]
    return out


def as_cases(point: dict[str, Any]) -> list[dict[str, Any]]:
    """A point's per-edit outcomes as the cases corsa.evaluate.stats pairs by id."""
    return [{"id": edit, **values} for edit, values in point["per_edit"].items()]


def differences(last: dict[str, dict[str, Any]], against: str) -> list[str]:
    """Each row's last point minus `against`'s, per measure, with a 95 % paired bootstrap over the edits."""
    if against not in last:
        return []
    lines = []
    for name, point in last.items():
        if name == against:
            continue
        cells = []
        for key, _, title in MEASURES:
            d = paired_difference(as_cases(last[against]), as_cases(point), key)
            if d is not None:
                cells.append(f"{title} {100 * d.estimate:+.1f} ({100 * d.low:+.1f} to {100 * d.high:+.1f})")
        if cells:
            lines.append(f"- {name} minus {against}, {len(point['per_edit'])} edits: " + "; ".join(cells))
    return lines


def write_report(out: Path) -> None:
    rows = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/results.json"))}
    if not rows:
        return
    every = curves(rows)
    head = ["method", "edits", *(title for *_, title in MEASURES), "mmlu", "mmlu gold log-prob",
            "edit time per update (s)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, curve in every.items():
        last = curve[-1]
        own = rows[name]["curve"] if name in rows else rows[unrouted_name(name)]["curve"]
        m = own[-1].get("mmlu") if name in rows else None  # a routed model's MMLU is its unrouted row's
        mean_s = sum(p["edit_s"] for p in own) / len(own)
        cells = [name, str(last["edits"]),
                 *("-" if last.get(key) is None else f"{100 * last[key]:.1f}" for _, key, _ in MEASURES),
                 f"{100 * m['accuracy']:.1f}" if m else "-", f"{m['gold_logprob']:.3f}" if m else "-", f"{mean_s:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    last = {name: curve[-1] for name, curve in every.items()}
    # Compared with LoRA as a user gets it (routed), the project's baseline, and with AlphaEdit, issue 32's.
    against = [n for n in every if n in rows and parse_method(n)[0] == "alphaedit"]
    against = [routed_name(n) for n in rows if parse_method(n)[0] == "lora" and routed_name(n) in every] + against
    diffs = [line for a in against for line in differences(last, a)]
    commands = sorted({r["command"] for r in rows.values() if r.get("command")})
    table = "\n".join(lines + ["", ("After the last update, over every edit so far; values in %. `-routed`: the same "
                                    "adapter asked as `corsa ask` asks it (scope routing, corsa.routing).")]
                      + (["", "95 % paired intervals over the edits, after the last update:", *diffs] if diffs else [])
                      + ["", "Command: " + "; ".join(f"`{c}`" for c in commands)])
    artifacts.write_report(out, table, lambda path: plot(every, path))


def plot(every: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MEASURES), figsize=(18, 4))
    for ax, (_, key, title) in zip(axes, MEASURES):
        for name, curve in every.items():
            points = [(p["edits"], 100 * p[key]) for p in curve if p.get(key) is not None]
            ax.plot([x for x, _ in points], [y for _, y in points], marker=".", label=name)
        ax.set(xlabel="edits so far", ylabel="%", title=title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

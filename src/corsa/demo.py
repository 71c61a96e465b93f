"""`corsa demo`: the embedded fact set edited with LoRA and with CoRSA, and a before/after table."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

from corsa import anchors, artifacts, models, routing
from corsa.editing import edit
from corsa.errors import InputError
from corsa.evaluate.metrics import evaluate
from corsa.loading import load_edited
from corsa.prompts import Formatter, PromptStyle
from corsa.requests import EditRequest, read_jsonl

LABELS = {
    "gen.reliability": "edit success (new answer on the edit prompt)",
    "gen.generality": "paraphrase success (new answer on rephrasings)",
    "gen.locality": "neighbours answered correctly (their true answer)",
    "gen.locality_agreement": "neighbours answered as before (agreement with the unedited model)",
    "gen.neighbor_edit_target": "neighbours given an edit's new answer",
    "gen.old_on_prompt": "old answer still produced (edit prompt)",
    "gen.retention": "old answer still produced (rephrasings)",
}


def is_demo_report(path: Path) -> bool:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and {"model", "runs", "results", "table"} <= set(report)


def demo_edits() -> list[EditRequest]:
    with resources.as_file(resources.files("corsa") / "data" / "demo_edits.jsonl") as path:
        return read_jsonl(path)


def format_table(columns: dict[str, dict[str, Any]]) -> str:
    names = list(columns)
    width = max(len(v) for v in LABELS.values())
    lines = [f"{'':{width}}  " + "  ".join(f"{n:>12}" for n in names)]
    for key, label in LABELS.items():
        cells = []
        for n in names:
            value, count = columns[n]["summary"][key], columns[n]["counts"][key]
            cells.append(f"{'-':>12}" if value is None else f"{round(value * count):>4}/{count:<3} {value:>4.0%}")
        lines.append(f"{label:{width}}  " + "  ".join(cells))
    return "\n".join(lines)


METHODS: tuple[str, ...] = ("lora", "corsa")  # the demo's comparison; `corsa demo` takes the flags both share


def run_demo(out: str | Path = "runs/demo", *, methods: tuple[str, ...] = METHODS, model: str | None = None,
             progress: bool = True, prompt_style: PromptStyle = "auto", preset: str = "auto",
             route: routing.RouterConfig | None = routing.DEFAULT, edits: list[EditRequest] | None = None,
             source: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Train each of `methods` on `edits` (default: the embedded facts) without their paraphrases and neighbourhood
    questions, and measure on those the table `corsa demo` prints; `source` names where the edits came from."""
    out = Path(out)
    # Checked before any work: a rerun replaces the demo's own runs and report, and nothing else.
    for method in methods:
        artifacts.check_writable(out / method, overwrite=True)
    report_file = out / "demo_results.json"
    if report_file.exists() and not is_demo_report(report_file):
        raise InputError(f"{report_file} exists and was not written by `corsa demo`; choose another --out",
                         field="--out")
    requests = demo_edits() if edits is None else edits
    named = source or "the embedded facts"
    print(f"corsa demo: {len(requests)} counterfactual edits from {named}, model {model or models.DEFAULT_MODEL}")
    if not any(r.paraphrases or r.neighborhood for r in requests):
        print(f"{named} gives no paraphrases and no neighborhood: only the edit prompts are measured")
    base, tok, _ = models.load_model(model)
    formatter = Formatter(tok, prompt_style)
    columns = {"base": evaluate(base, formatter, requests)}
    runs: dict[str, Any] = {}
    for method in methods:
        t = time.perf_counter()
        # Trained without the paraphrases and neighbourhood prompts the table is measured on.
        run_dir, result = edit(anchors.withheld(requests), out / method, method=method, model=model, overwrite=True,
                               progress=progress, command=f"corsa demo ({method})", prompt_style=prompt_style,
                               preset=preset, route=route, **overrides)
        # Measured as `corsa ask --adapter` answers: loaded from the run folder, routed by its manifest.
        asked, asked_formatter = load_edited(run_dir, route=route is not None)
        mined = anchors.with_mined(requests, result.requests)
        columns[method] = evaluate(asked, asked_formatter, mined, reference=columns["base"])
        runs[method] = {"adapter": str(run_dir), "wall_time_s": time.perf_counter() - t,
                        "steps": result.info["steps"], "epochs_run": result.info["epochs_run"]}
        print(f"{method}: {result.info['steps']} steps in {runs[method]['wall_time_s']:.0f} s -> {run_dir}")
    table = format_table(columns)
    print("\n" + table)
    # "edits": the file the facts came from, None for the embedded ones
    report = {"model": model or models.DEFAULT_MODEL, "edits": source, "runs": runs, "results": columns,
              "table": table, "routing": routing.record(route) if route is not None else None}
    artifacts.write_json(out / "demo_results.json", report)
    if route is not None:
        print("\nEach adapter answers only questions about its edits' subjects; the rest are answered by the unedited "
              "model (--no-route: every question by the adapter).")
    print(f"per-answer details: {out / 'demo_results.json'}")
    print(f"try: corsa ask \"{requests[0].prompt}\" --adapter {out / methods[-1]}")
    return report

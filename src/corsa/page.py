"""The page `corsa serve` shows at `/` for a store (issue 31): its versions as a timeline, what each version
changed, each fact's recorded answer across versions, and a box that asks the base model and the current
version side by side (through the server's own /v1/completions). Plain server-side HTML, rendered from store.db on
every request, so a reload shows an update or a revert made from the command line meanwhile."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from corsa.store import Store, Version

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
tr.head td { background: #eef6ee; }
.ask { display: flex; gap: 1em; } .ask > div { flex: 1; border: 1px solid #ccc; padding: .6em; min-height: 3em; }
code { background: #f6f6f6; padding: 0 .2em; }
"""

SCRIPT = """
async function answer(model, prompt) {
  const r = await fetch("v1/completions", {method: "POST", headers: {"content-type": "application/json"},
    body: JSON.stringify({model: model, prompt: prompt, max_tokens: 32})});
  const body = await r.json();
  return r.ok ? body.choices[0].text : "error: " + body.error.message;
}
async function ask(event) {
  event.preventDefault();
  const prompt = document.getElementById("prompt").value;
  for (const side of ["base", "current"]) document.getElementById(side).textContent = "...";
  const [base, current] = await Promise.all([answer(BASE, prompt), answer(CURRENT, prompt)]);
  document.getElementById("base").textContent = base;
  document.getElementById("current").textContent = current;
}
"""


def pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.0f} %"


def what_changed(store: Store, v: Version) -> str:
    if v.kind == "base":
        return "the base model"
    if v.kind == "revert":
        return f"restores version {v.source}"
    rows = "".join(f"<li><code>{escape(e['prompt'])}</code>: {escape(e['target_old'] or '?')} &rarr; "
                   f"<b>{escape(e['target_new'])}</b></li>" for e in store.edits(v.version))
    return f"<ul>{rows}</ul>"


def render(root: str | Path, name: str) -> str:
    """The store's page as one HTML document."""
    with Store(root) as store:
        versions, head, model = store.versions(), store.head, store.meta("model") or "?"
        timeline = []
        for v in reversed(versions):
            m = v.metrics
            timeline.append(
                f'<tr class="{"head" if v.version == head else ""}" id="v{v.version}"><td>v{v.version}'
                f'{" (current)" if v.version == head else ""}</td><td>{escape(v.created)}</td><td>{escape(v.kind)}'
                f'</td><td>{escape(v.method or "-")}</td><td>{v.n_edits}</td>'
                f'<td>{pct(m.get("efficacy")) if v.kind == "update" else "-"}</td>'
                f'<td>{pct(m.get("forgetting")) if v.kind == "update" else "-"}</td>'
                f"<td>{what_changed(store, v)}</td></tr>")
        shown = [v for v in versions if v.kind != "base"]
        recorded = {v.version: store.answers(v.version) for v in shown}
        facts = list(dict.fromkeys(p for v in shown for p in store.facts(v.version)))
        history = []
        for prompt in facts:
            cells = "".join(f"<td>{escape(recorded[v.version].get(prompt, ''))}</td>" for v in shown)
            history.append(f"<tr><td><code>{escape(prompt)}</code></td>{cells}</tr>")
    columns = "".join(f"<th>v{v.version}</th>" for v in shown)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(name)}: corsa store</title>
<style>{STYLE}</style></head><body>
<h1>{escape(name)}</h1>
<p>Model <code>{escape(model)}</code>; current version <b id="head">v{head}</b>; {len(versions) - 1} versions after the
base model. Served by <code>corsa serve</code>: the OpenAI API is at <code>v1/</code>.</p>
<h2>Ask</h2>
<form onsubmit="ask(event)"><input id="prompt" size="60" placeholder="What is the capital of France?">
<button>Ask both</button></form>
<div class="ask"><div><b>base model</b><p id="base"></p></div><div><b>current version</b><p id="current"></p></div>
</div>
<h2>Versions</h2>
<table id="timeline"><tr><th>version</th><th>date</th><th>kind</th><th>method</th><th>edits</th><th>efficacy</th>
<th>forgetting</th><th>what it changed</th></tr>{"".join(timeline)}</table>
<h2>Each fact's answer at each version</h2>
<p>As recorded when the version was made (blank: not asked then).</p>
<table id="facts"><tr><th>prompt</th>{columns}</tr>{"".join(history)}</table>
<script>const BASE = {json.dumps(name + "@v0")}; const CURRENT = {json.dumps(name)};{SCRIPT}</script>
</body></html>"""


def render_run(name: str, edits: list[dict[str, Any]]) -> str:
    """The page for one run folder: its edits and the side-by-side ask box."""
    rows = "".join(f"<tr><td><code>{escape(e['prompt'])}</code></td><td>{escape(e.get('target_old') or '?')}</td>"
                   f"<td><b>{escape(e['target_new'])}</b></td></tr>" for e in edits)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(name)}: corsa run</title>
<style>{STYLE}</style></head><body>
<h1>{escape(name)}</h1>
<h2>Ask</h2>
<form onsubmit="ask(event)"><input id="prompt" size="60"><button>Ask both</button></form>
<div class="ask"><div><b>base model</b><p id="base"></p></div><div><b>edited</b><p id="current"></p></div></div>
<h2>Edits</h2>
<table id="edits"><tr><th>prompt</th><th>old</th><th>new</th></tr>{rows}</table>
<script>const BASE = {json.dumps(name + "@base")}; const CURRENT = {json.dumps(name)};{SCRIPT}</script>
</body></html>"""

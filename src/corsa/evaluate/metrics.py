"""Generation-based prompt-level metrics, as the released CoRSA evaluation computes them.

An answer counts as correct when it contains the target, case-insensitively (reference-implementations.md 1.4);
we decode greedily so a number is reproducible. Every prompt of every request is generated in one batched pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from corsa.prompts import Formatter
from corsa.requests import EditRequest
from corsa.scoring import contains, generate

# Metric name -> what it measures; the order is the order of tables.
METRICS = {
    "edit_success": "the edit prompt's answer contains target_new",
    "paraphrase_success": "a paraphrase's answer contains target_new (Generality)",
    "neighborhood_kept": "a neighborhood prompt's answer contains its true answer (Locality, correctness)",
    "old_on_prompt": "the edit prompt's answer still contains target_old",
    "old_on_paraphrase": "a paraphrase's answer still contains target_old (outdated-knowledge retention)",
}


@dataclass(frozen=True)
class Probe:
    case: int
    kind: str  # "prompt" | "paraphrase" | "neighborhood"
    prompt: str
    expected: str  # what a correct answer contains
    old: str | None  # the outdated answer, for retention


def probes(requests: list[EditRequest]) -> list[Probe]:
    out = []
    for i, r in enumerate(requests):
        out.append(Probe(i, "prompt", r.prompt, r.target_new, r.target_old))
        out += [Probe(i, "paraphrase", p, r.target_new, r.target_old) for p in r.paraphrases]
        out += [Probe(i, "neighborhood", n.prompt, n.answer, None) for n in r.neighborhood]
    return out


def evaluate(model: torch.nn.Module, formatter: Formatter, requests: list[EditRequest], *,
             max_new_tokens: int = 32, autocast: bool = False) -> dict[str, Any]:
    """Per-case answers and the aggregate rates of METRICS (None where a request set has no such prompts)."""
    ps = probes(requests)
    answers = generate(model, formatter, [p.prompt for p in ps], max_new_tokens=max_new_tokens, autocast=autocast)
    cases: list[dict[str, Any]] = [{"id": r.id, "prompt": r.prompt, "target_new": r.target_new,
                                    "target_old": r.target_old, "answers": {"prompt": None, "paraphrase": [],
                                                                           "neighborhood": []}}
                                   for r in requests]
    hits: dict[str, list[bool]] = {k: [] for k in METRICS}
    for p, a in zip(ps, answers):
        case = cases[p.case]
        if p.kind == "prompt":
            case["answers"]["prompt"] = a
            hits["edit_success"].append(contains(a, p.expected))
            if p.old:
                hits["old_on_prompt"].append(contains(a, p.old))
        elif p.kind == "paraphrase":
            case["answers"]["paraphrase"].append(a)
            hits["paraphrase_success"].append(contains(a, p.expected))
            if p.old:
                hits["old_on_paraphrase"].append(contains(a, p.old))
        else:
            case["answers"]["neighborhood"].append(a)
            hits["neighborhood_kept"].append(contains(a, p.expected))
    summary = {k: (sum(v) / len(v) if v else None) for k, v in hits.items()}
    counts = {k: len(v) for k, v in hits.items()}
    return {"summary": summary, "counts": counts, "cases": cases}

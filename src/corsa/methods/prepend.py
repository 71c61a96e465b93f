"""Prepend: the in-context baseline. The new fact is written in front of the question; no weight changes.

It answers "how far does simply telling the model get?" and is the paper's in-context baseline for code updates
(CodeUpdateArena's Prepend). Retrieval is an oracle: every prompt that belongs to an edit (the prompt, its
paraphrases, its neighborhood prompts, and for MQuAKE its case's questions) gets that edit's fact, so the
baseline measures the model's use of context, not a retriever. Neighborhood prompts getting a fact that does not
concern them is deliberate: it is how context editing damages locality. The template follows IKE/EasyEdit's
"New Fact: ... Prompt: ..." form, shortened.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from corsa.methods.base import EditResult
from corsa.methods.registry import MethodSpec, register
from corsa.prompts import Formatter
from corsa.requests import EditRequest


@dataclass(frozen=True)
class PrependConfig:
    template: str = "New fact: {fact}\n{query}"
    seed: int = 0  # nothing is random; kept so every method's manifest records one


@dataclass
class PrependFormatter(Formatter):
    """A Formatter that writes the matching fact in front of each known query."""

    context: dict[str, str] = field(default_factory=dict)  # query -> fact text
    template: str = PrependConfig.template

    def prompt_ids(self, prompt: str) -> list[int]:
        fact = self.context.get(prompt)
        return super().prompt_ids(prompt if fact is None else self.template.format(fact=fact, query=prompt))

    def record(self) -> dict[str, Any]:
        return {"template": self.template, "context": self.context}


class Fact(Protocol):
    prompt: str
    target_new: str


def fact_text(r: Fact) -> str:
    """An edit as one sentence: its prompt and new answer (also routing's hint, corsa.routing.HintFormatter)."""
    return f"{r.prompt.strip()} {r.target_new.strip()}"


def contexts(requests: list[EditRequest]) -> dict[str, str]:
    out: dict[str, str] = {}
    by_case: dict[Any, list[str]] = {}
    for r in requests:
        for q in [r.prompt, *r.paraphrases, *(n.prompt for n in r.neighborhood)]:
            out.setdefault(q, fact_text(r))
        if "case_id" in r.meta:
            by_case.setdefault(r.meta["case_id"], []).append(fact_text(r))
    for r in requests:  # MQuAKE: a multi-hop question needs every fact of its case
        if "questions" in r.meta:
            joined = " ".join(by_case[r.meta["case_id"]])
            for q in [*r.meta["questions"], *(h["question"] for h in r.meta.get("new_single_hops") or [])]:
                out.setdefault(q, joined)
    return out


class PrependEditor:
    name = "prepend"

    def __init__(self, config: PrependConfig | None = None):
        self.config = config or PrependConfig()

    def edit(self, model: torch.nn.Module, formatter: Formatter, requests: list[EditRequest], *,
             progress: bool = True) -> EditResult:
        # A later update adds to what the model was told before; a new fact for a known query replaces the old one.
        told = formatter.context if isinstance(formatter, PrependFormatter) else {}
        asked = PrependFormatter(formatter.tokenizer, formatter.style, context={**told, **contexts(requests)},
                                 template=self.config.template)
        info = {"timings": {}, "steps": 0, "epochs_run": 0, "variant": "prepend",
                "config": dataclasses.asdict(self.config)}
        return EditResult(model=model, requests=requests, info=info, formatter=asked)


def prepend_config(**overrides: Any) -> PrependConfig:
    """Training settings (epochs, lr, ...) do not apply; only `template` and `seed` are read."""
    return PrependConfig(**{k: v for k, v in overrides.items() if k in ("template", "seed")})


def save_context(formatter: PrependFormatter) -> dict[str, Any]:
    return formatter.record()


def load_context(tokenizer: Any, style: str, record: dict[str, Any]) -> PrependFormatter:
    return PrependFormatter(tokenizer, style, context=record["context"], template=record["template"])


register(MethodSpec("prepend", prepend_config, PrependEditor,
                    help="prepend: the fact written in front of the question; no training",
                    output="context", save_context=save_context, load_context=load_context))

"""Anchors: prompts an edit must leave alone, answered by the model as it is before the edit.

An edit trained only on its own prompt teaches the model "answer this kind of question with a new target" as
much as it teaches the fact: on CounterFact a same-relation question about another subject gets an edit's target
(issue 29). Training can also fit anchor prompts to the unedited model's own answers (the retention term of
corsa.methods.corsa). The user writes nothing for it; per edit, in this order:

  1. the request's own `neighborhood` prompts, when given (benchmarks withhold theirs: `withheld`);
  2. the edit's prompt with its subject swapped for another subject, of the same kind where the pool shipped with
     the package (data/anchor_pool.json, written for corsa) knows it: the other edits' subjects first, then the
     pool's;
  3. general questions from the same pool.

A swapped prompt that is itself one of the edits is never an anchor.
"""

from __future__ import annotations

import dataclasses
import json
import random
import zlib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal

from corsa.answers import normalize
from corsa.requests import EditRequest

Source = Literal["neighborhood", "subject-swap", "pool"]


@dataclass(frozen=True)
class Anchor:
    prompt: str
    source: Source


@cache
def pool() -> dict[str, Any]:
    """The shipped pool: subjects by kind and general questions, with a line saying where they come from."""
    return json.loads(resources.files("corsa").joinpath("data", "anchor_pool.json").read_text())


def kind_of(name: str) -> str | None:
    """The pool's kind of a subject (country, city, person, organisation), None when the pool does not list it."""
    return next((kind for kind, names in pool()["subjects"].items()
                 if any(normalize(n) == normalize(name) for n in names)), None)


def swap_subjects(subject: str, others: list[str], rng: random.Random) -> list[str]:
    """Subjects to put in `subject`'s place, best first: when the pool knows `subject`'s kind, the other edits'
    subjects of that kind and then the pool's (a question about a country stays about a country); otherwise the
    other edits' subjects and then the whole pool. Never `subject` itself."""
    kinds = pool()["subjects"]
    kind = kind_of(subject)
    if kind is not None:
        first, rest = [o for o in others if kind_of(o) == kind], list(kinds[kind])
    else:
        first, rest = list(others), [n for names in kinds.values() for n in names]
    rng.shuffle(first)
    rng.shuffle(rest)
    seen = {normalize(subject)}
    out = []
    for name in first + rest:
        if normalize(name) not in seen:
            seen.add(normalize(name))
            out.append(name)
    return out


def build(requests: list[EditRequest], per_edit: int, seed: int = 0) -> list[tuple[Anchor, ...]]:
    """Up to `per_edit` anchors for each request (see the module's docstring for where they come from). The
    choice is random but fixed by `seed` and the edit's prompt, so one edit gets the same anchors in any batch."""
    if per_edit <= 0:
        return [() for _ in requests]
    edited = {normalize(r.prompt) for r in requests}
    subjects = [r.subject for r in requests if r.subject and r.subject in r.prompt]
    questions = [q for q in pool()["questions"] if normalize(q) not in edited]
    out = []
    for r in requests:
        rng = random.Random(seed * 1_000_003 + zlib.crc32(r.prompt.encode()))
        chosen: list[Anchor] = [Anchor(n.prompt, "neighborhood") for n in r.neighborhood][:per_edit]
        if r.subject and r.subject in r.prompt and len(chosen) < per_edit:
            for name in swap_subjects(r.subject, subjects, rng):
                prompt = r.prompt.replace(r.subject, name)
                if normalize(prompt) not in edited and len(chosen) < per_edit:
                    chosen.append(Anchor(prompt, "subject-swap"))
        if len(chosen) < per_edit:
            chosen += [Anchor(q, "pool") for q in rng.sample(questions, min(per_edit - len(chosen), len(questions)))]
        out.append(tuple(chosen))
    return out


def withheld(requests: list[EditRequest]) -> list[EditRequest]:
    """The requests as a benchmark may train on them: without the paraphrases and neighbourhood prompts it will
    evaluate with, so nothing of the evaluation reaches training (or anchors)."""
    return [dataclasses.replace(r, paraphrases=(), neighborhood=()) for r in requests]


def with_mined(originals: list[EditRequest], trained: list[EditRequest]) -> list[EditRequest]:
    """The evaluation's requests (`originals`, paraphrases and neighbourhood included) with the old answers that
    training filled in (mined from the model) on the withheld copies it was given."""
    return [dataclasses.replace(o, target_old=t.target_old, old_mined=t.old_mined) for o, t in zip(originals, trained)]

"""How two answers are compared, in one place: every metric, the store, DPO's choice of y- and the input checks
use these, so "the same answer" and "gives the target" mean one thing throughout."""

from __future__ import annotations

import re


def normalize(text: str) -> str:
    """Case and surrounding white space do not make another answer."""
    return text.strip().lower()


def contains(answer: str, target: str) -> bool:
    """A generated answer gives the target when the target appears in it, case-insensitively: the released CoRSA
    evaluation's test (reference doc 1.4), and what a user reading the answer sees."""
    return normalize(target) in answer.lower()


def same_answer(a: str, b: str) -> bool:
    """"Paris" and " paris" are one answer to a person: an edit between them is no edit, a revision to the
    answer the store already holds is refused."""
    return normalize(a) == normalize(b)


def bare(answer: str) -> str:
    """A short answer as a whole: normalised, with the closing full stop or exclamation mark a chat model adds
    dropped, for exact comparisons (another edit's target given as the whole answer)."""
    return normalize(answer.strip().rstrip(".!"))


def first_sentence(text: str) -> str:
    """The first line, cut after its first sentence: chat models often add a paragraph of commentary, which
    would make an answer used for training (a mined y-, an anchor's kept answer) long and mostly about something
    other than the fact."""
    line = text.strip().split("\n")[0].strip()
    match = re.search(r"[.!?](\s|$)", line)
    return line[: match.start() + 1] if match else line

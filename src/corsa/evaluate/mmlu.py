"""MMLU (Hendrycks et al. 2021), few-shot, scored by the logits of the four answer letters.

The prompt follows the released CoRSA script (reference doc 1.5): shots from the subject's dev split in file
order, "Question: ...\\nA. ..\\nAnswer:" examples, and no chat template. Its header names the subject, as in
the original MMLU code; the released script's header leaves the subject out.

The released script generates one token at temperature 0 and checks that it starts with the gold letter. We
read the logits of " A".." D" at the position after "Answer:" instead: the same choice whenever the model answers
with a letter, deterministic, and never an off-format answer.

Data layout (the original Hendrycks one): <mmlu>/data/{test,dev}/<subject>_{test,dev}.csv, no header, columns
question, A, B, C, D, answer letter.
"""

from __future__ import annotations

import csv
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from corsa.errors import InputError
from corsa.models import context_length
from corsa.prompts import pad_token_id
from corsa.scoring import (
    causal_lm,
    common_prefix_length,
    left_pad,
    make_shared_batch,
    output_logits,
    shared_answer_logits,
)

LETTERS = "ABCD"
HEADER = "The following are multiple choice questions (with answers).\n\n"  # the released script: no subject


@dataclass(frozen=True)
class MMLUConfig:
    # A seeded 10-per-subject subset: 570 questions, about 14 minutes for SmolLM2-135M on one CPU thread.
    # None = all 14,042 test questions, which is what the released CoRSA script scores.
    n_per_subject: int | None = 10
    shots: int = 5  # released CoRSA script and the original MMLU protocol: the first 5 dev examples
    seed: int = 0  # picks the subset only; scoring itself has no randomness
    batch_size: int = 8
    # Shots are dropped from the end until a prompt fits (the original MMLU code does the same); None = the
    # model's context. The released script instead relies on vLLM's max_model_len=8192.
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.n_per_subject is not None and self.n_per_subject < 1:
            raise ValueError("n_per_subject must be at least 1, or None for every question")
        if self.shots < 0:
            raise ValueError("shots must be >= 0")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1, or None for the model's context")


@dataclass(frozen=True)
class MMLUQuestion:
    id: str  # "<subject>/<0-based row in the subject's file>"
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # one of LETTERS


def data_folder(data: str | Path) -> Path:
    """The folder holding test/ and dev/, given the benchmarks root, the mmlu folder or that folder itself."""
    data = Path(data)
    for base in (data / "mmlu" / "data", data / "data", data):
        if (base / "test").is_dir():
            return base
    raise InputError("no MMLU data here: expected mmlu/data/test/<subject>_test.csv below it", path=str(data))


def read_split(path: Path, subject: str) -> list[MMLUQuestion]:
    if not path.is_file():
        raise InputError("MMLU file missing", path=str(path))
    # newline="" because questions and choices contain quoted newlines.
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    out = []
    for i, row in enumerate(rows):
        if len(row) != 6 or row[5].strip() not in tuple(LETTERS):
            raise InputError("expected 6 columns: question, A, B, C, D, answer letter A-D", path=str(path),
                             line=i + 1)
        out.append(MMLUQuestion(f"{subject}/{i}", subject, row[0], (row[1], row[2], row[3], row[4]),
                                row[5].strip()))
    return out


def subjects(data: str | Path) -> list[str]:
    test = data_folder(data) / "test"
    return sorted(p.name[: -len("_test.csv")] for p in test.glob("*_test.csv"))


def load_mmlu(data: str | Path, n_per_subject: int | None = 10, seed: int = 0) -> list[MMLUQuestion]:
    """Test questions, subjects in name order, each subject's subset in file order."""
    folder = data_folder(data)
    names = subjects(folder)
    if not names:
        raise InputError("no <subject>_test.csv files", path=str(folder / "test"))
    out: list[MMLUQuestion] = []
    for subject in names:
        qs = read_split(folder / "test" / f"{subject}_test.csv", subject)
        if n_per_subject is not None and n_per_subject < len(qs):
            # A fresh generator per subject, so a subject's subset does not depend on which others are present.
            picked = sorted(random.Random(seed).sample(range(len(qs)), n_per_subject))
            qs = [qs[i] for i in picked]
        out += qs
    return out


def load_shots(data: str | Path, subject: str) -> list[MMLUQuestion]:
    return read_split(data_folder(data) / "dev" / f"{subject}_dev.csv", subject)


def format_example(q: MMLUQuestion, with_answer: bool) -> str:
    text = f"Question: {q.question}\n" + "".join(f"{x}. {c}\n" for x, c in zip(LETTERS, q.choices)) + "Answer:"
    return text + (f" {q.answer}\n\n" if with_answer else "")


def build_prompt(subject: str, shots: list[MMLUQuestion], q: MMLUQuestion) -> str:
    return (HEADER.format(subject=subject.replace("_", " ")) + "".join(format_example(s, True) for s in shots)
            + format_example(q, False))


def letter_ids(tokenizer: Any) -> list[int]:
    """Token ids of A-D as the model would write them after "Answer:" (a space first, where that is one token)."""
    for form in (" {}", "{}"):
        # The last id, because some tokenizers split " A" into a space token and a letter token.
        ids = [int(tokenizer(form.format(x), add_special_tokens=False)["input_ids"][-1]) for x in LETTERS]
        if len(set(ids)) == 4:
            return ids
    raise ValueError("the tokenizer does not give the letters A, B, C, D four distinct token ids, "
                     "so MMLU answers cannot be read from the logits")


@dataclass(frozen=True)
class EncodedPrompt:
    ids: list[int]
    shots: int  # shots kept
    truncated: bool  # even the zero-shot prompt was too long, so its start was cut


def encode_prompt(tokenizer: Any, q: MMLUQuestion, shots: list[MMLUQuestion], limit: int) -> EncodedPrompt:
    """Token ids of q's prompt with as many of `shots` (a prefix of them) as fit in `limit` tokens."""
    for k in range(len(shots), -1, -1):
        ids = list(tokenizer(build_prompt(q.subject, shots[:k], q), add_special_tokens=True)["input_ids"])
        if len(ids) <= limit:
            return EncodedPrompt(ids, k, False)
    # Keep the end, which holds the choices and "Answer:", and a leading BOS the model expects.
    keep = ids[:1] if tokenizer.bos_token_id is not None and ids and ids[0] == tokenizer.bos_token_id else []
    return EncodedPrompt(keep + ids[len(ids) - (limit - len(keep)):], 0, True)


@torch.no_grad()
def letter_logits(model: torch.nn.Module, prompts: list[list[int]], letters: list[int], pad_id: int) -> torch.Tensor:
    """Logits [B, 4] of the letters as the next token after each prompt, from one left-padded batch."""
    device = next(model.parameters()).device
    # Left padding puts every prompt's last token in the last column, so one column is all we score.
    ids, mask = (t.to(device) for t in left_pad(prompts, pad_id))
    # Positions count real tokens only, so a padded row is scored as if alone (matters beyond RoPE models).
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    lm = causal_lm(model)
    hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions,
                              use_cache=False).last_hidden_state
    return output_logits(lm, hidden[:, -1])[:, letters].float()


def shared_prefix(encoded: list[EncodedPrompt]) -> list[int] | None:
    """The longest run of tokens that every prompt of a subject starts with (the header and shots, mostly).

    They are about 80% of each prompt; computing them once per subject and sharing their key/value cache makes
    MMLU several times faster. The prefix is cut from the prompts' own tokenization (tokenizing the prefix text
    alone can merge differently at its end), so the scores are exactly those of the full prompts.
    """
    n = common_prefix_length([e.ids for e in encoded])
    return encoded[0].ids[:n] if n > 0 else None


@torch.no_grad()
def shared_letter_logits(model: torch.nn.Module, prefix: list[int], questions: list[list[int]], letters: list[int],
                         pad_id: int) -> torch.Tensor:
    """letter_logits for prompts prefix + question, running the prefix once."""
    device = next(model.parameters()).device
    batch = make_shared_batch([prefix], [(0, q) for q in questions], pad_id)
    # Score the position after each question's last token: offset len(q) in the shared hidden states.
    batch.rows = torch.arange(len(questions))
    batch.offsets = torch.tensor([len(q) for q in questions])
    batch.targets = torch.zeros(len(questions), dtype=torch.long)
    return shared_answer_logits(model, batch.to(device))[:, letters].float()


@torch.no_grad()
def evaluate_mmlu(model: torch.nn.Module, tokenizer: Any, data: str | Path, config: MMLUConfig = MMLUConfig(),
                  progress: bool = False) -> dict[str, Any]:
    """Micro-averaged accuracy (the released script's), per-subject accuracy and one predicted letter per question.

    Also returns `gold_logprob`, the mean log-probability of the gold letter among the four: small models score
    near chance (25%) on MMLU, where accuracy barely moves but this still shows damage to the model. And
    `fewer_shots` (questions whose prompt kept fewer than config.shots shots to fit the context) and
    `truncated` (questions that did not fit even without shots and lost the start of their prompt).
    """
    folder = data_folder(data)
    questions = load_mmlu(folder, config.n_per_subject, config.seed)
    letters = letter_ids(tokenizer)
    pad = pad_token_id(tokenizer)
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad batches with")
    limit = config.max_tokens or context_length(causal_lm(model), tokenizer)
    shots = {s: (load_shots(folder, s)[: config.shots] if config.shots else [])
             for s in sorted({q.subject for q in questions})}
    encoded = [encode_prompt(tokenizer, q, shots[q.subject], limit) for q in questions]

    was_training = model.training
    model.eval()  # dropout off; the caller's mode is restored below, so this can run between training steps
    # Longest first: similar lengths share a batch (less padding), and a batch too big for memory fails at once.
    order = sorted(range(len(questions)), key=lambda i: -len(encoded[i].ids))
    predictions = [""] * len(questions)
    gold_logprob = [0.0] * len(questions)
    prefixes = {s: shared_prefix([e for e, q in zip(encoded, questions) if q.subject == s]) for s in shots}
    # Batches never mix subjects, so a subject's shared prefix can serve a whole batch.
    order = sorted(order, key=lambda i: questions[i].subject)
    batches = []
    for subject in shots:
        rows = [i for i in order if questions[i].subject == subject]
        batches += [rows[k : k + config.batch_size] for k in range(0, len(rows), config.batch_size)]
    try:
        for rows in tqdm(batches, disable=None if progress else True, desc="mmlu", unit="batch"):
            prefix = prefixes[questions[rows[0]].subject]
            if prefix is not None:
                logits = shared_letter_logits(model, prefix, [encoded[i].ids[len(prefix):] for i in rows],
                                              letters, pad)
            else:
                logits = letter_logits(model, [encoded[i].ids for i in rows], letters, pad)
            logp = torch.log_softmax(logits, dim=-1)
            for i, best, lp in zip(rows, logits.argmax(-1).tolist(), logp.tolist()):
                predictions[i] = LETTERS[best]
                gold_logprob[i] = lp[LETTERS.index(questions[i].answer)]
    finally:
        model.train(was_training)

    correct = [p == q.answer for p, q in zip(predictions, questions)]
    per_subject: dict[str, list[bool]] = {}
    for q, c in zip(questions, correct):
        per_subject.setdefault(q.subject, []).append(c)
    return {
        "accuracy": sum(correct) / len(correct),
        "n": len(correct),
        "per_subject": {s: sum(v) / len(v) for s, v in per_subject.items()},
        "config": asdict(config),
        "ids": [q.id for q in questions],
        "predictions": predictions,
        "correct": correct,  # per question, in `ids` order: what a paired comparison of two models needs
        "gold_logprob": sum(gold_logprob) / len(gold_logprob),
        "gold_logprobs": gold_logprob,  # per question, in `ids` order: for paired comparisons of gold_logprob
        "fewer_shots": sum(e.shots < len(shots[q.subject]) for e, q in zip(encoded, questions)),
        "truncated": sum(e.truncated for e in encoded),
    }

"""Edit requests: the typed record, our JSONL reader with its validation, and the benchmark loaders.

Every problem in a user's file is reported as an InputError naming file, line and field, before any model is
loaded, so a typo costs a second rather than a training run.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from corsa.errors import InputError


@dataclass(frozen=True)
class Neighbor:
    """A prompt about something else whose answer the edit must not change."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class EditRequest:
    prompt: str
    target_new: str
    target_old: str | None = None  # None: the trainer mines the model's own current answer
    subject: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[Neighbor, ...] = ()
    id: str | None = None
    old_mined: bool = False  # target_old came from the model, not from the user
    # Loader-only extras (e.g. MQuAKE's multi-hop questions); never read from a user's JSONL.
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    source: str | None = field(default=None, compare=False, hash=False)  # "path:line", for later errors

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.id is not None:
            out["id"] = self.id
        out["prompt"] = self.prompt
        out["target_new"] = self.target_new
        if self.target_old is not None:
            out["target_old"] = self.target_old
        if self.subject is not None:
            out["subject"] = self.subject
        if self.paraphrases:
            out["paraphrases"] = list(self.paraphrases)
        if self.neighborhood:
            out["neighborhood"] = [{"prompt": n.prompt, "answer": n.answer} for n in self.neighborhood]
        if self.old_mined:
            out["old_mined"] = True
        if self.meta:
            out["meta"] = dict(self.meta)
        return out

    def with_old(self, old: str, mined: bool) -> EditRequest:
        return replace(self, target_old=old, old_mined=mined)


FIELDS = ("prompt", "target_new", "target_old", "subject", "paraphrases", "neighborhood", "id")
REQUIRED = ("prompt", "target_new")


def _same(a: str, b: str) -> bool:
    return a.strip().lower() == b.strip().lower()


class _Line:
    """Validation helpers bound to one line of one file, so every error says where it is."""

    def __init__(self, path: str, line: int):
        self.path, self.line = path, line

    def error(self, message: str, field: str | None = None) -> InputError:
        return InputError(message, path=self.path, line=self.line, field=field)

    def text(self, value: Any, name: str) -> str:
        if not isinstance(value, str):
            raise self.error(f"must be a string, got {_type(value)}", name)
        if not value.strip():
            raise self.error("must not be empty", name)
        return value

    def texts(self, value: Any, name: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.error(f"must be a list of strings, got {_type(value)}", name)
        return tuple(self.text(v, f"{name}[{i}]") for i, v in enumerate(value))

    def neighbors(self, value: Any) -> tuple[Neighbor, ...]:
        if not isinstance(value, list):
            raise self.error(f"must be a list of {{prompt, answer}} objects, got {_type(value)}", "neighborhood")
        out = []
        for i, item in enumerate(value):
            name = f"neighborhood[{i}]"
            if not isinstance(item, dict):
                raise self.error(f"must be an object with prompt and answer, got {_type(item)}", name)
            extra = sorted(set(item) - {"prompt", "answer"})
            if extra:
                raise self.error(f"unknown field '{extra[0]}' (allowed: prompt, answer)", name)
            for key in ("prompt", "answer"):
                if key not in item:
                    raise self.error("is required", f"{name}.{key}")
            out.append(Neighbor(self.text(item["prompt"], f"{name}.prompt"), self.text(item["answer"],
                                                                                         f"{name}.answer")))
        return tuple(out)


def _type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def parse_request(obj: Any, path: str, line: int) -> EditRequest:
    at = _Line(path, line)
    if not isinstance(obj, dict):
        raise at.error(f"each line must be a JSON object, got {_type(obj)}")
    unknown = [k for k in obj if k not in FIELDS]
    if unknown:
        raise at.error(f"unknown field (allowed: {', '.join(FIELDS)})", unknown[0])
    for key in REQUIRED:
        if key not in obj:
            raise at.error("is required", key)
    rid = obj.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        raise at.error(f"must be a string or an integer, got {_type(rid)}", "id")
    if isinstance(rid, str) and not rid.strip():
        raise at.error("must not be empty", "id")
    req = EditRequest(
        prompt=at.text(obj["prompt"], "prompt"),
        target_new=at.text(obj["target_new"], "target_new"),
        target_old=at.text(obj["target_old"], "target_old") if "target_old" in obj else None,
        subject=at.text(obj["subject"], "subject") if "subject" in obj else None,
        paraphrases=at.texts(obj["paraphrases"], "paraphrases") if "paraphrases" in obj else (),
        neighborhood=at.neighbors(obj["neighborhood"]) if "neighborhood" in obj else (),
        id=None if rid is None else str(rid),
        source=f"{path}:{line}",
    )
    if req.target_old is not None and _same(req.target_new, req.target_old):
        raise at.error("is the same as target_old; an edit must change the answer", "target_new")
    return req


def read_jsonl(path: str | Path) -> list[EditRequest]:
    """Read and validate a JSONL file of edit requests (one object per line; blank lines are skipped)."""
    name = str(path)
    if not os.path.exists(name):
        raise InputError("no such file", path=name)
    if os.path.isdir(name):
        raise InputError("is a folder; give a .jsonl file (or --format counterfact|zsre|mquake for a benchmark)",
                         path=name)
    with open(name, "rb") as fh:
        raw_lines = fh.read().split(b"\n")
    requests: list[EditRequest] = []
    seen_prompt: dict[str, tuple[int, str]] = {}
    seen_id: dict[str, int] = {}
    for lineno, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"not valid UTF-8 (byte {exc.start + 1} of the line)", path=name, line=lineno) from None
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"invalid JSON: {exc.msg} at column {exc.colno}", path=name, line=lineno) from None
        req = parse_request(obj, name, lineno)
        key = req.prompt.strip()
        if key in seen_prompt and not _same(seen_prompt[key][1], req.target_new):
            first, target = seen_prompt[key]
            raise InputError(f"the same prompt asks for '{target}' on line {first} and '{req.target_new}' here",
                             path=name, line=lineno, field="prompt")
        seen_prompt.setdefault(key, (lineno, req.target_new))
        if req.id is not None:
            if req.id in seen_id:
                raise InputError(f"id '{req.id}' is already used on line {seen_id[req.id]}", path=name,
                                 line=lineno, field="id")
            seen_id[req.id] = lineno
        requests.append(req)
    if not requests:
        raise InputError("no edit requests found", path=name)
    return requests


def check_lengths(requests: Iterable[EditRequest], count_tokens: Callable[[str], int], max_tokens: int) -> None:
    """Refuse any prompt that would not fit the model's context once formatted."""
    for r in requests:
        texts = [("prompt", r.prompt)] + [(f"paraphrases[{i}]", p) for i, p in enumerate(r.paraphrases)]
        texts += [(f"neighborhood[{i}].prompt", n.prompt) for i, n in enumerate(r.neighborhood)]
        for name, text in texts:
            n = count_tokens(text)
            if n > max_tokens:
                path, line = _split_source(r.source)
                raise InputError(f"is {n} tokens, longer than the model's context ({max_tokens})", path=path,
                                 line=line, field=name)


def _split_source(source: str | None) -> tuple[str | None, int | None]:
    if not source or ":" not in source:
        return source, None
    path, _, line = source.rpartition(":")
    return path, int(line) if line.isdigit() else None


def write_jsonl(requests: Iterable[EditRequest], path: str | Path) -> None:
    """Write requests as our JSONL, atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for r in requests:
                fh.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --- benchmark loaders ----------------------------------------------------------------------------------------
BENCHMARK_FILES = {
    "counterfact": ("counterfact", ["easyedit-counterfact-{split}.json"]),
    "zsre": ("zsre", ["zsre_mend_eval.json", "zsre_mend_train-1k.json"]),
    "mquake": ("mquake", ["MQuAKE-CF-3k-v2.json", "MQuAKE-CF-3k.json", "MQuAKE-hard.json"]),
}


def benchmark_file(name: str, location: str | Path, split: str = "edit") -> Path:
    """Find a benchmark's file from a file path, the benchmark's own folder, or the benchmarks root."""
    if name not in BENCHMARK_FILES:
        raise InputError(f"unknown benchmark '{name}' (choose from {', '.join(BENCHMARK_FILES)})", field="format")
    location = Path(location)
    if location.is_file():
        return location
    folder, candidates = BENCHMARK_FILES[name]
    names = [c.format(split=split) for c in candidates]
    for base in (location, location / folder):
        for c in names:
            if (base / c).is_file():
                return base / c
    raise InputError(f"no {name} data found: looked for {' or '.join(names)} in {location} and {location / folder}",
                     path=str(location))


def load_benchmark(name: str, location: str | Path, split: str = "edit") -> list[EditRequest]:
    return load_benchmark_with_report(name, location, split)[0]


def load_benchmark_with_report(name: str, location: str | Path, split: str = "edit") -> tuple[list[EditRequest], int]:
    """Edit requests from a benchmark file, and how many records were skipped as unusable edits.

    Unusable: the new target equals the old one, an empty string, or a prompt already asked with another target.
    """
    path = benchmark_file(name, location, split)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"not a JSON file: {exc}", path=str(path)) from None
    if not isinstance(records, list):
        raise InputError("expected a JSON list of records", path=str(path))
    convert = {"counterfact": _counterfact, "zsre": _zsre, "mquake": _mquake}[name]
    out: list[EditRequest] = []
    seen: dict[str, str] = {}
    skipped = 0
    for index, rec in enumerate(records):
        try:
            items = convert(rec, index)
        except KeyError as exc:
            raise InputError(f"record {index} has no '{exc.args[0]}'", path=str(path), field=str(exc.args[0])) from None
        except (TypeError, AttributeError, IndexError):
            raise InputError(f"record {index} does not have the {name} layout", path=str(path)) from None
        for req in items:
            usable = all(isinstance(x, str) and x.strip() for x in (req.prompt, req.target_new))
            usable = usable and not (req.target_old is not None and _same(req.target_new, req.target_old))
            key = req.prompt.strip() if usable else ""
            usable = usable and (key not in seen or _same(seen[key], req.target_new))
            if not usable:
                skipped += 1
                continue
            seen.setdefault(key, req.target_new)
            out.append(replace(req, source=f"{path}:record {index}"))
    return out, skipped


def _counterfact(rec: dict[str, Any], index: int) -> list[EditRequest]:
    return [EditRequest(
        prompt=rec["prompt"], target_new=rec["target_new"], target_old=rec["ground_truth"], subject=rec["subject"],
        paraphrases=(rec["rephrase_prompt"],),
        neighborhood=(Neighbor(rec["locality_prompt"], rec["locality_ground_truth"]),),
        id=f"cf-{rec['case_id']}", meta={"case_id": rec["case_id"]},
    )]


def _zsre(rec: dict[str, Any], index: int) -> list[EditRequest]:
    answers = list(rec["answers"])
    return [EditRequest(
        prompt=rec["src"], target_new=rec["alt"], target_old=answers[0] if answers else None,
        subject=rec.get("subject"), paraphrases=(rec["rephrase"],),
        # EasyEdit keeps the "nq question: " prefix on locality prompts; so do we, to score the same prompts.
        neighborhood=(Neighbor(rec["loc"], rec["loc_ans"]),),
        id=f"zsre-{index}", meta={"index": index, "answers": answers},
    )]


def _mquake(rec: dict[str, Any], index: int) -> list[EditRequest]:
    case = {k: rec[k] for k in ("questions", "new_answer", "new_answer_alias", "answer", "answer_alias",
                                "new_single_hops")}
    out = []
    for k, rw in enumerate(rec["requested_rewrite"]):
        out.append(EditRequest(
            prompt=rw["prompt"].format(rw["subject"]), target_new=rw["target_new"]["str"],
            target_old=rw["target_true"]["str"], subject=rw["subject"], paraphrases=(rw["question"],),
            id=f"mquake-{rec['case_id']}-{k}", meta={"case_id": rec["case_id"], "rewrite_index": k, **case},
        ))
    return out


def read_edits(path: str | Path, format: str = "jsonl", split: str = "edit") -> list[EditRequest]:
    if format == "jsonl":
        return read_jsonl(path)
    if format in BENCHMARK_FILES:
        return load_benchmark(format, path, split)
    raise InputError(f"unknown format '{format}' (choose jsonl, {', '.join(BENCHMARK_FILES)})", field="--format")

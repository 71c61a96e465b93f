"""Edit-request validation: one test per rule, each checking file, line and field of the one-line error."""

from __future__ import annotations

import json

import pytest

from corsa.errors import InputError
from corsa.requests import (EditRequest, Neighbor, check_lengths, load_benchmark, load_benchmark_with_report,
                            read_edits, read_jsonl, write_jsonl)
from conftest import DATA

GOOD = {"prompt": "What is the capital of France?", "target_new": "Rome"}


def write(tmp_path, *lines, raw: bytes | None = None):
    path = tmp_path / "edits.jsonl"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


def error(path) -> InputError:
    with pytest.raises(InputError) as info:
        read_jsonl(path)
    return info.value


def test_reads_all_fields(tmp_path):
    path = write(tmp_path, {**GOOD, "target_old": "Paris", "subject": "France", "paraphrases": ["France's capital?"],
                            "neighborhood": [{"prompt": "Capital of Germany?", "answer": "Berlin"}], "id": 7}, "",
                 {"prompt": "Who wrote Hamlet?", "target_new": "Dickens"})
    a, b = read_jsonl(path)
    assert a == EditRequest(GOOD["prompt"], "Rome", "Paris", "France", ("France's capital?",),
                            (Neighbor("Capital of Germany?", "Berlin"),), "7")
    assert a.source == f"{path}:1" and b.source == f"{path}:3"  # the blank line is skipped, not renumbered


def test_invalid_json(tmp_path):
    e = error(write(tmp_path, GOOD, '{"prompt": "x", '))
    assert (e.line, e.field) == (2, None) and "invalid JSON" in str(e) and str(e).startswith(str(tmp_path))


def test_line_not_an_object(tmp_path):
    e = error(write(tmp_path, ["prompt", "Rome"]))
    assert e.line == 1 and "object" in e.message


@pytest.mark.parametrize("field", ["prompt", "target_new"])
def test_missing_required_field(tmp_path, field):
    obj = dict(GOOD)
    del obj[field]
    e = error(write(tmp_path, GOOD, obj))
    assert (e.line, e.field) == (2, field) and "required" in e.message


@pytest.mark.parametrize("field,value", [("prompt", ""), ("target_new", "   "), ("target_old", ""), ("subject", "")])
def test_empty_field(tmp_path, field, value):
    e = error(write(tmp_path, {**GOOD, field: value}))
    assert (e.line, e.field) == (1, field) and "empty" in e.message


@pytest.mark.parametrize("field,value,where", [
    ("prompt", 3, "prompt"),
    ("target_new", ["Rome"], "target_new"),
    ("paraphrases", "France's capital?", "paraphrases"),
    ("paraphrases", ["ok", 5], "paraphrases[1]"),
    ("neighborhood", [{"prompt": "x"}], "neighborhood[0].answer"),
    ("neighborhood", ["x"], "neighborhood[0]"),
    ("id", 1.5, "id"),
    ("id", True, "id"),
])
def test_wrong_type(tmp_path, field, value, where):
    e = error(write(tmp_path, {**GOOD, field: value}))
    assert (e.line, e.field) == (1, where)


def test_unknown_field(tmp_path):
    e = error(write(tmp_path, {**GOOD, "target": "Rome"}))
    assert (e.line, e.field) == (1, "target") and "unknown field" in e.message


def test_unknown_field_inside_neighborhood(tmp_path):
    e = error(write(tmp_path, {**GOOD, "neighborhood": [{"prompt": "a", "answer": "b", "note": 1}]}))
    assert e.field == "neighborhood[0]" and "note" in e.message


def test_target_new_equal_to_target_old(tmp_path):
    e = error(write(tmp_path, {**GOOD, "target_old": " rome "}))
    assert (e.line, e.field) == (1, "target_new") and "same as target_old" in e.message


def test_same_prompt_two_targets(tmp_path):
    e = error(write(tmp_path, GOOD, {"prompt": "Who wrote Hamlet?", "target_new": "x"}, {**GOOD, "target_new": "Oslo"}))
    assert (e.line, e.field) == (3, "prompt") and "line 1" in e.message


def test_same_prompt_same_target_is_allowed(tmp_path):
    assert len(read_jsonl(write(tmp_path, GOOD, {**GOOD, "target_new": "rome"}))) == 2


def test_duplicate_id(tmp_path):
    e = error(write(tmp_path, {**GOOD, "id": "a"}, {"prompt": "q?", "target_new": "x", "id": "a"}))
    assert (e.line, e.field) == (2, "id")


def test_non_utf8_bytes(tmp_path):
    raw = (json.dumps(GOOD) + "\n").encode() + b'{"prompt": "caf\xe9?", "target_new": "x"}\n'
    e = error(write(tmp_path, raw=raw))
    assert e.line == 2 and "UTF-8" in e.message


def test_empty_file_and_missing_file(tmp_path):
    assert "no edit requests" in error(write(tmp_path, "", "  ")).message
    assert "no such file" in error(tmp_path / "nope.jsonl").message
    assert "folder" in error(tmp_path).message


def test_prompt_longer_than_context(tmp_path):
    path = write(tmp_path, GOOD, {**GOOD, "prompt": "a b c d e f", "paraphrases": ["short", "w " * 20]})
    requests = read_jsonl(path)
    check_lengths(requests[:1], lambda s: len(s.split()), 10)
    with pytest.raises(InputError) as info:
        check_lengths(requests, lambda s: len(s.split()), 10)
    assert (info.value.path, info.value.line, info.value.field) == (str(path), 2, "paraphrases[1]")
    assert "context (10)" in info.value.message


def test_write_then_read_round_trip(tmp_path):
    reqs = [EditRequest("q?", "a", "b", "s", ("p?",), (Neighbor("n?", "m"),), "1"), EditRequest("r?", "c")]
    write_jsonl(reqs, tmp_path / "out.jsonl")
    assert read_jsonl(tmp_path / "out.jsonl") == reqs
    mined = reqs[1].with_old("d", mined=True)
    assert mined.to_dict()["old_mined"] is True and "old_mined" not in reqs[0].to_dict()


# --- benchmark loaders ----------------------------------------------------------------------------------------
def test_counterfact_loader_synthetic(tmp_path):
    rec = {"case_id": 3, "prompt": "The mother tongue of X is", "target_new": "English", "subject": "X",
           "ground_truth": "French", "rephrase_prompt": "X speaks", "locality_prompt": "Y speaks",
           "locality_ground_truth": "French"}
    bad = {**rec, "case_id": 4, "prompt": "Z is", "target_new": "french"}  # new == old: skipped
    (tmp_path / "easyedit-counterfact-edit.json").write_text(json.dumps([rec, bad]))
    reqs, skipped = load_benchmark_with_report("counterfact", tmp_path)
    assert skipped == 1 and reqs[0].id == "cf-3" and reqs[0].target_old == "French"
    assert reqs[0].neighborhood == (Neighbor("Y speaks", "French"),)


def test_zsre_and_mquake_loaders_synthetic(tmp_path):
    z = {"subject": "U", "src": "What does U make?", "pred": "x", "rephrase": "U makes?", "alt": "drones",
         "answers": ["uniforms"], "loc": "nq question: who?", "loc_ans": "him", "cond": ""}
    (tmp_path / "zsre_mend_train-1k.json").write_text(json.dumps([z]))
    (r,) = load_benchmark("zsre", tmp_path)
    assert (r.prompt, r.target_new, r.target_old, r.neighborhood[0].prompt) == (z["src"], "drones", "uniforms",
                                                                               "nq question: who?")
    m = {"case_id": 9, "requested_rewrite": [{"prompt": "{} was performed by", "subject": "Hey Jude",
                                               "target_new": {"str": "Madonna"}, "target_true": {"str": "Beatles"},
                                               "question": "Who performed Hey Jude?"}],
         "questions": ["q1"], "answer": "English", "answer_alias": [], "new_answer": "Arabic",
         "new_answer_alias": [], "new_single_hops": []}
    (tmp_path / "MQuAKE-hard.json").write_text(json.dumps([m]))
    (r,) = load_benchmark("mquake", tmp_path)
    assert r.prompt == "Hey Jude was performed by" and r.meta["questions"] == ["q1"] and r.id == "mquake-9-0"


def test_malformed_benchmark_names_record_and_field(tmp_path):
    (tmp_path / "easyedit-counterfact-edit.json").write_text(json.dumps([{"prompt": "x"}]))
    with pytest.raises(InputError) as info:
        load_benchmark("counterfact", tmp_path)
    assert "record 0" in info.value.message and info.value.field is not None
    with pytest.raises(InputError, match="no zsre data"):
        read_edits(tmp_path / "nowhere", "zsre")


@pytest.mark.skipif(not DATA.exists(), reason="../shared/benchmarks not present")
def test_real_benchmarks_load():
    cf, skipped = load_benchmark_with_report("counterfact", DATA, "edit")
    assert len(cf) + skipped == 10000 and len(cf) > 9000
    assert len(load_benchmark("counterfact", DATA, "val")) > 1800
    zs, zskip = load_benchmark_with_report("zsre", DATA)
    assert len(zs) + zskip == 1000
    mq = load_benchmark("mquake", DATA / "mquake")
    assert 1000 < len(mq) <= 429 * 4 and all(r.meta["questions"] for r in mq)

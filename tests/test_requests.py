"""Edit requests: one test per validation rule (each checks the file, line and field of the one-line error),
the JSONL round trip, the benchmark loaders on tiny synthetic files, and the loaders on the real data when present."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from corsa.errors import InputError
from corsa.requests import (
    EditRequest,
    Neighbor,
    check_lengths,
    load_benchmark,
    load_benchmark_with_report,
    read_edits,
    read_jsonl,
    write_jsonl,
)

# The benchmarks live beside the checkout (/work/shared/benchmarks for /work/main); CORSA_DATA overrides.
DATA = Path(os.environ.get("CORSA_DATA", Path(__file__).resolve().parents[2] / "shared" / "benchmarks"))

GOOD = {"prompt": "What is the capital of France?", "target_new": "Rome"}


def write(tmp_path: Path, *lines: Any, raw: bytes | None = None) -> Path:
    """A JSONL file from objects (dumped) or literal strings (written as given)."""
    path = tmp_path / "edits.jsonl"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def error(path: Path) -> InputError:
    with pytest.raises(InputError) as info:
        read_jsonl(path)
    assert info.value.path == str(path)
    return info.value


# --- reading our JSONL ----------------------------------------------------------------------------------------
def test_reads_all_fields_and_skips_blank_lines(tmp_path):
    path = write(tmp_path, {**GOOD, "target_old": "Paris", "subject": "France", "paraphrases": ["France's capital?"],
                            "neighborhood": [{"prompt": "Capital of Germany?", "answer": "Berlin"}], "id": 7}, "  ",
                 {"prompt": "Who wrote Hamlet?", "target_new": "Dickens"})
    a, b = read_jsonl(path)
    assert a == EditRequest(GOOD["prompt"], "Rome", "Paris", "France", ("France's capital?",),
                            (Neighbor("Capital of Germany?", "Berlin"),), "7")
    assert a.source == f"{path}:1" and b.source == f"{path}:3"  # the blank line is skipped, not renumbered
    assert b.target_old is None and not b.old_mined and b.meta == {}
    assert len({a, b}) == 2  # hashable despite the meta dict


def test_text_is_kept_as_given(tmp_path):
    (r,) = read_jsonl(write(tmp_path, {"prompt": "  Q?  ", "target_new": " Rome"}))
    assert (r.prompt, r.target_new) == ("  Q?  ", " Rome")


def test_utf8_bom_and_crlf_are_accepted(tmp_path):
    second = {"prompt": "b?", "target_new": "c"}
    raw = b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n" + json.dumps(second).encode()
    assert len(read_jsonl(write(tmp_path, raw=raw))) == 2


def test_missing_file(tmp_path):
    e = error(tmp_path / "nope.jsonl")
    assert (e.line, e.field) == (None, None) and "no such file" in e.message


def test_path_is_a_folder(tmp_path):
    e = error(tmp_path)
    assert (e.line, e.field) == (None, None) and "folder" in e.message


def test_non_utf8_bytes_report_their_line(tmp_path):
    raw = (json.dumps(GOOD) + "\n").encode() + b'{"prompt": "caf\xe9?", "target_new": "x"}\n'
    e = error(write(tmp_path, raw=raw))
    assert e.line == 2 and "UTF-8" in e.message


def test_invalid_json(tmp_path):
    e = error(write(tmp_path, GOOD, '{"prompt": "x", '))
    assert (e.line, e.field) == (2, None) and "invalid JSON" in e.message and str(e).startswith(f"{tmp_path}")


def test_line_not_an_object(tmp_path):
    e = error(write(tmp_path, ["prompt", "Rome"]))
    assert e.line == 1 and "object" in e.message


@pytest.mark.parametrize("field", ["prompt", "target_new"])
def test_missing_required_field(tmp_path, field):
    obj = dict(GOOD)
    del obj[field]
    e = error(write(tmp_path, GOOD, obj))
    assert (e.line, e.field) == (2, field) and "required" in e.message


@pytest.mark.parametrize("field,value,where", [
    ("prompt", "", "prompt"),
    ("target_new", "   ", "target_new"),
    ("target_old", "", "target_old"),
    ("subject", "\t", "subject"),
    ("paraphrases", ["ok", " "], "paraphrases[1]"),
    ("neighborhood", [{"prompt": "a?", "answer": ""}], "neighborhood[0].answer"),
    ("id", "", "id"),
])
def test_empty_or_whitespace_string(tmp_path, field, value, where):
    e = error(write(tmp_path, {**GOOD, field: value}))
    assert (e.line, e.field) == (1, where) and "non-empty" in e.message


def test_one_line_message_format(tmp_path):
    path = write(tmp_path, GOOD, GOOD, {**GOOD, "target_new": ""})
    assert str(error(path)) == f"{path}:3: field 'target_new': must be a non-empty string"


@pytest.mark.parametrize("field,value,where", [
    ("prompt", 3, "prompt"),
    ("target_new", ["Rome"], "target_new"),
    ("target_old", None, "target_old"),
    ("paraphrases", "France's capital?", "paraphrases"),
    ("paraphrases", ["ok", 5], "paraphrases[1]"),
    ("neighborhood", {"prompt": "a", "answer": "b"}, "neighborhood"),
    ("neighborhood", ["x"], "neighborhood[0]"),
    ("neighborhood", [{"prompt": "x"}], "neighborhood[0].answer"),
    ("neighborhood", [{"prompt": 1, "answer": "b"}], "neighborhood[0].prompt"),
    ("id", 1.5, "id"),
    ("id", True, "id"),
])
def test_wrong_type(tmp_path, field, value, where):
    e = error(write(tmp_path, {**GOOD, field: value}))
    assert (e.line, e.field) == (1, where)


def test_integer_id_is_stored_as_string(tmp_path):
    (r,) = read_jsonl(write(tmp_path, {**GOOD, "id": 12}))
    assert r.id == "12"


def test_unknown_field(tmp_path):
    e = error(write(tmp_path, {**GOOD, "target": "Rome"}))
    assert (e.line, e.field) == (1, "target") and "'target'" in e.message and "target_new" in e.message


@pytest.mark.parametrize("field", ["meta", "old_mined", "source"])
def test_internal_fields_are_not_read_from_user_files(tmp_path, field):
    assert error(write(tmp_path, {**GOOD, field: True})).field == field


def test_unknown_field_inside_neighborhood(tmp_path):
    e = error(write(tmp_path, {**GOOD, "neighborhood": [{"prompt": "a", "answer": "b", "note": 1}]}))
    assert e.field == "neighborhood[0]" and "note" in e.message


def test_target_new_equal_to_target_old(tmp_path):
    e = error(write(tmp_path, {**GOOD, "target_old": " rome "}))
    assert (e.line, e.field) == (1, "target_new") and "same as target_old" in e.message


def test_same_prompt_two_targets(tmp_path):
    e = error(write(tmp_path, GOOD, {"prompt": "Who wrote Hamlet?", "target_new": "x"},
                    {**GOOD, "prompt": GOOD["prompt"] + " ", "target_new": "Oslo"}))
    assert (e.line, e.field) == (3, "prompt") and "line 1" in e.message


def test_same_prompt_same_target_is_kept(tmp_path):
    assert len(read_jsonl(write(tmp_path, GOOD, {**GOOD, "target_new": "rome"}))) == 2


def test_duplicate_id(tmp_path):
    e = error(write(tmp_path, {**GOOD, "id": 1}, {"prompt": "q?", "target_new": "x", "id": "1"}))
    assert (e.line, e.field) == (2, "id") and "line 1" in e.message


def test_file_without_edits(tmp_path):
    e = error(write(tmp_path, "", "  "))
    assert (e.line, e.field) == (None, None) and e.message == "no edit requests found"


# --- lengths, writing, the record ----------------------------------------------------------------------------
def test_prompt_longer_than_context(tmp_path):
    path = write(tmp_path, GOOD, {"prompt": "a b c", "target_new": "x", "paraphrases": ["short", "w " * 20]},
                 {"prompt": "c?", "target_new": "y", "neighborhood": [{"prompt": "n " * 11, "answer": "z"}]})
    requests = read_jsonl(path)
    words = lambda s: len(s.split())
    check_lengths(requests[:1], words, 10)
    with pytest.raises(InputError) as info:
        check_lengths(requests, words, 10)
    assert (info.value.path, info.value.line, info.value.field) == (str(path), 2, "paraphrases[1]")
    assert info.value.message == "paraphrases[1] is 20 tokens, longer than the model's context (10)"
    with pytest.raises(InputError) as info:
        check_lengths(requests[2:], words, 10)
    assert (info.value.line, info.value.field) == (3, "neighborhood[0].prompt")
    with pytest.raises(InputError) as info:  # built in code: no source, so the hint names the file
        check_lengths([EditRequest("a b c", "x")], words, 2, path_hint="demo")
    assert (info.value.path, info.value.line, info.value.field) == ("demo", None, "prompt")


def test_write_then_read_round_trip(tmp_path):
    reqs = [EditRequest("q?", "a", "b", "s", ("p?", "p2?"), (Neighbor("n?", "m"), Neighbor("ö?", "ü")), "1"),
            EditRequest("r?", "c")]
    out = tmp_path / "sub" / "out.jsonl"
    write_jsonl(reqs, out)
    assert read_jsonl(out) == reqs
    assert "ö" in out.read_text(encoding="utf-8")  # readable text, not \u escapes
    write_jsonl(reqs[1:], out)  # replaces the old file, leaving no temp file behind
    assert read_jsonl(out) == reqs[1:] and os.listdir(out.parent) == ["out.jsonl"]


def test_to_dict_and_with_old():
    r = EditRequest("q?", "a", source="f:1")
    assert r.to_dict() == {"prompt": "q?", "target_new": "a"}
    mined = r.with_old("b", mined=True)
    assert mined.to_dict() == {"prompt": "q?", "target_new": "a", "target_old": "b", "old_mined": True}
    assert mined.source == "f:1" and r.target_old is None  # frozen: the original is untouched
    with_meta = EditRequest("q?", "a", meta={"case_id": 3})
    assert with_meta == r and with_meta.to_dict()["meta"] == {"case_id": 3}  # meta and source are not compared


# --- benchmark loaders on synthetic files --------------------------------------------------------------------
CF = {"case_id": 3, "prompt": "The mother tongue of X is", "target_new": "English", "subject": "X",
      "ground_truth": "French", "rephrase_prompt": "X speaks", "locality_prompt": "Y speaks",
      "locality_ground_truth": "French"}
ZS = {"subject": "U", "src": "What does U make?", "pred": "x", "rephrase": "U makes?", "alt": "drones",
      "answers": ["uniforms"], "loc": "nq question: who?", "loc_ans": "him", "cond": ""}
MQ = {"case_id": 9, "requested_rewrite": [
          {"prompt": "{} was performed by", "subject": "Hey Jude", "target_new": {"str": "Madonna", "id": "Q1"},
           "target_true": {"str": "The Beatles", "id": "Q2"}, "question": "Who performed Hey Jude?"},
          {"prompt": "The citizenship of {} is", "subject": "Madonna", "target_new": {"str": "Iraq", "id": "Q3"},
           "target_true": {"str": "United States", "id": "Q4"}, "question": "Where is Madonna from?"}],
      "questions": ["q1", "q2", "q3"], "answer": "English", "answer_alias": ["en"], "new_answer": "Arabic",
      "new_answer_alias": [], "single_hops": [], "new_single_hops": [{"question": "h?", "cloze": "h",
                                                                       "answer": "a", "answer_alias": []}]}


def dump(folder: Path, name: str, records: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(records))
    return folder / name


def test_counterfact_loader(tmp_path):
    records = [CF, {**CF, "case_id": 4, "prompt": "Z is", "target_new": "french"},  # new == old: skipped
               {**CF, "case_id": 5, "target_new": "German"},  # same prompt, another target: skipped
               {**CF, "case_id": 6, "prompt": "W is", "rephrase_prompt": ""}]  # blank text: skipped
    path = dump(tmp_path / "counterfact", "easyedit-counterfact-edit.json", records)
    dump(tmp_path / "counterfact", "easyedit-counterfact-val.json", [{**CF, "case_id": 8}])
    reqs, skipped = load_benchmark_with_report("counterfact", tmp_path)  # the benchmarks root
    assert skipped == 3 and reqs == [EditRequest(CF["prompt"], "English", "French", "X", ("X speaks",),
                                                 (Neighbor("Y speaks", "French"),), "cf-3")]
    assert reqs[0].meta == {"case_id": 3} and reqs[0].source == f"{path}:record 0"
    assert [r.id for r in load_benchmark("counterfact", tmp_path / "counterfact", "val")] == ["cf-8"]  # own folder
    assert len(read_edits(path, "counterfact")) == 1  # the file itself
    with pytest.raises(InputError, match="unknown counterfact split"):
        load_benchmark("counterfact", tmp_path, "test")


def test_zsre_loader(tmp_path):
    dump(tmp_path, "zsre_mend_train-1k.json",
         [ZS, {**ZS, "src": "Q2?", "alt": ""}, {**ZS, "src": "Q3?", "alt": "Uniforms"}])  # the last two: skipped
    reqs, skipped = load_benchmark_with_report("zsre", tmp_path)
    (r,) = reqs
    assert skipped == 2
    assert (r.prompt, r.target_new, r.target_old, r.subject, r.paraphrases, r.id) == (
        "What does U make?", "drones", "uniforms", "U", ("U makes?",), "zsre-0")
    assert r.neighborhood == (Neighbor("nq question: who?", "him"),)
    assert r.meta == {"index": 0, "answers": ["uniforms"]}
    with pytest.raises(InputError, match="zsre_mend_eval.json"):  # asked for eval, only train is here
        load_benchmark("zsre", tmp_path, "eval")
    dump(tmp_path / "only-eval", "zsre_mend_eval.json", [ZS])
    assert len(load_benchmark("zsre", tmp_path / "only-eval")) == 1  # the default takes whichever exists


def test_mquake_loader(tmp_path):
    conflicting = {**MQ, "case_id": 10, "requested_rewrite": [{**MQ["requested_rewrite"][0],
                                                               "target_new": {"str": "Prince", "id": "Q5"}}]}
    dump(tmp_path / "mquake", "MQuAKE-hard.json", [MQ, conflicting])
    reqs, skipped = load_benchmark_with_report("mquake", tmp_path)
    assert skipped == 1 and [r.id for r in reqs] == ["mquake-9-0", "mquake-9-1"]
    a, b = reqs
    assert (a.prompt, a.target_new, a.target_old, a.subject, a.paraphrases) == (
        "Hey Jude was performed by", "Madonna", "The Beatles", "Hey Jude", ("Who performed Hey Jude?",))
    assert b.prompt == "The citizenship of Madonna is" and b.neighborhood == ()
    assert b.meta == {"case_id": 9, "rewrite_index": 1, "questions": ["q1", "q2", "q3"], "new_answer": "Arabic",
                      "new_answer_alias": [], "answer": "English", "answer_alias": ["en"],
                      "new_single_hops": MQ["new_single_hops"]}
    dump(tmp_path / "mquake", "MQuAKE-CF-3k-v2.json", [{**MQ, "case_id": 1}])
    assert load_benchmark("mquake", tmp_path / "mquake")[0].id == "mquake-1-0"  # the standard file is preferred


def test_malformed_benchmark_names_file_record_and_key(tmp_path):
    path = dump(tmp_path, "easyedit-counterfact-edit.json", [CF, {"prompt": "x"}])
    with pytest.raises(InputError) as info:
        load_benchmark("counterfact", tmp_path)
    assert (info.value.path, info.value.line, info.value.field) == (str(path), None, "case_id")
    assert "record 1" in info.value.message
    rewrite = {k: v for k, v in MQ["requested_rewrite"][0].items() if k != "target_true"}
    dump(tmp_path, "MQuAKE-hard.json", [{**MQ, "requested_rewrite": [rewrite]}])
    with pytest.raises(InputError) as info:
        load_benchmark("mquake", tmp_path)
    assert info.value.field == "requested_rewrite[0].target_true" and "record 0" in info.value.message
    dump(tmp_path, "zsre_mend_train-1k.json", {"src": "not a list"})
    with pytest.raises(InputError, match="JSON list"):
        load_benchmark("zsre", tmp_path)


def test_benchmark_not_found(tmp_path):
    with pytest.raises(InputError, match="no zsre data found.*zsre_mend_train-1k.json"):
        read_edits(tmp_path, "zsre")
    with pytest.raises(InputError, match="no such file"):
        read_edits(tmp_path / "nowhere", "mquake")


def test_unknown_format(tmp_path):
    with pytest.raises(InputError, match="unknown format 'csv'"):
        read_edits(write(tmp_path, GOOD), "csv")


# --- the real benchmarks, when the shared data is present ----------------------------------------------------
def real_data(name: str) -> Path:
    if not (DATA / name).is_dir():
        pytest.skip(f"{DATA / name} not present (set CORSA_DATA to the benchmarks folder)")
    return DATA


def test_real_counterfact():
    reqs, skipped = load_benchmark_with_report("counterfact", real_data("counterfact"), "edit")
    assert len(reqs) + skipped == 10000 and len(reqs) > 9800  # 79 prompts repeat with another target
    assert reqs[0].id == "cf-0" and reqs[0].target_old == "French" and len(reqs[0].neighborhood) == 1
    assert len({r.id for r in reqs}) == len(reqs)


def test_real_zsre():
    reqs, skipped = load_benchmark_with_report("zsre", real_data("zsre"))
    assert len(reqs) + skipped == 1000 and len(reqs) > 950  # a few records have alt == answer, two an empty alt
    assert all(r.neighborhood[0].prompt.startswith("nq question: ") for r in reqs)


def test_real_mquake():
    reqs, skipped = load_benchmark_with_report("mquake", real_data("mquake") / "mquake")
    assert len(reqs) + skipped == 429 * 4 and len(reqs) > 1700  # MQuAKE-hard: 429 cases of 4 rewrites
    assert all(r.meta["questions"] and "{}" not in r.prompt for r in reqs)


def test_revision_chains_are_read_checked_and_refused_where_one_answer_is_trained(tmp_path):
    path = write(tmp_path, {**GOOD, "target_old": "Paris", "chain": ["Nice", "Lyon"]})
    (r,) = read_edits(path, chains=True)
    assert r.chain == ("Nice", "Lyon") and r.to_dict()["chain"] == ["Nice", "Lyon"]
    with pytest.raises(InputError) as info:
        read_edits(path)  # corsa edit / corsa update
    assert (info.value.path, info.value.line, info.value.field) == (str(path), 1, "chain")
    err = error(write(tmp_path, {**GOOD, "chain": ["Nice", " nice"]}))
    assert (err.line, err.field) == (1, "chain[1]")
    err = error(write(tmp_path, {**GOOD, "chain": "Nice"}))
    assert err.field == "chain" and "list of strings" in str(err)

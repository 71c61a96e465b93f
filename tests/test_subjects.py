"""Finding an edit's subject in its prompt when the request gives none (corsa.subjects)."""

from __future__ import annotations

import json

import pytest

from corsa import subjects
from corsa.cli import main
from corsa.requests import EditRequest


@pytest.mark.parametrize("prompt,subject", [
    ("What is the capital of France?", "France"),
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
    ("Toyota Corolla E140 is produced by", "Toyota Corolla E140"),  # the longer run, not the known "Toyota"
    ("William H. Seward was native to", "William H. Seward"),  # an initial's dot does not end the name
    ("The Royal Conservatory of Music's headquarters are in", "Royal Conservatory of Music"),
    ("What is the twin city of Kiev? It is", "Kiev"),  # never across punctuation
    ("Which country hosted the 2016 Summer Olympics?", "2016 Summer Olympics"),
    ("Who is the CEO of Tesla?", "CEO of Tesla"),  # a run joined across "of": its last word is the key's
    ("Which company makes the iPhone?", "iPhone"),
    ("Who invented the telephone?", "telephone"),  # a question's last content word
    ("the capital of new zealand is", "new zealand"),  # a name the country table knows, in lower case
    ("why is it?", None),
    ("is made of", None),
])
def test_find_reads_the_subject_a_prompt_names(prompt, subject):
    assert subjects.find(prompt) == subject


def test_only_requests_without_a_subject_are_filled_and_marked():
    given = EditRequest("What is the capital of France?", "Lyon", subject="France")
    missing = EditRequest("What is the capital of Spain?", "Bilbao")
    blank = EditRequest("What is the capital of Peru?", "Cusco", subject=" ")
    nothing = EditRequest("why is it?", "so")
    out = subjects.filled([given, missing, blank, nothing])
    assert out[0] is given and out[3] is nothing
    assert (out[1].subject, out[1].subject_found) == ("Spain", True) and out[2].subject == "Peru"
    assert out[1].to_dict()["subject_found"] is True and "subject_found" not in given.to_dict()


def test_edit_keys_a_found_subject_and_says_so(tmp_path, tiny_dir, capsys):
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps({"prompt": "What is the capital of France?", "target_new": "Lyon"}) + "\n")
    out = tmp_path / "run"
    assert main(["edit", str(path), "--out", str(out), "--model", tiny_dir, "--epochs", "1", "--quiet"]) == 0
    closing = capsys.readouterr().out
    assert "1 edit(s) gave no subject, so it was read from the prompt (first: 'France'" in closing
    manifest = json.loads((out / "edit_manifest.json").read_text())
    assert manifest["edits"][0]["subject"] == "France" and manifest["edits"][0]["subject_found"] is True
    assert manifest["routing"]["unscoped"] == []  # routed by the found subject

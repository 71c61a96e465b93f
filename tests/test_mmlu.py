"""MMLU: data loading, prompt format, and letter scoring checked against an unbatched full-logit reference."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import DATA, make_model, make_tokenizer

from corsa.evaluate.mmlu import (
    LETTERS,
    MMLUConfig,
    MMLUQuestion,
    build_prompt,
    encode_prompt,
    evaluate_mmlu,
    letter_ids,
    letter_logits,
    load_mmlu,
    load_shots,
    subjects,
)

# Uneven lengths (so batches need padding), and fields with commas, quotes and newlines (so the CSV reader is
# exercised).
TEST_ROWS = {
    "college_physics": [
        ("What is g?", "9.8", "1", "0", "3,000", "A"),
        ("Unit of force,\nin SI?", "N", "J", "W", "Pa", "A"),
        ('Which is "fast"?', "light", "sound", "snail", "tide", "A"),
        ("c?", "3e8", "1", "2", "3", "A"),
        ("Speed of sound in dry air at twenty degrees?", "343", "1", "9", "0", "A"),
        ("Ohm?", "V/I", "I/V", "VI", "V+I", "A"),
        ("What does a prism do to white light?", "bends", "splits", "stores", "heats", "B"),
        ("h?", "6.6e-34", "1", "2", "3", "A"),
        ("Sum of 2 and 2?", "3", "4", "5", "22", "B"),
    ],
    "world_religions": [
        ("Oldest?", "a", "b", "c", "d", "C"),
        ("Where is Mecca?", "Saudi Arabia", "Peru", "Chile", "Laos", "A"),
        ("Number of Vedas?", "1", "2", "3", "4", "D"),
        ("Holy city, in short?", "x", "y", "z", "w", "B"),
        ("Q?", "p", "q", "r", "s", "C"),
        ("A longer question about a tradition and its many texts?", "one", "two", "three", "four", "C"),
    ],
}
DEV_ROWS = {
    s: [(f"Dev {s[:3]} {i}?", "w", "x", "y", "z", LETTERS[i % 4]) for i in range(5)] for s in TEST_ROWS
}


def write_mmlu(root: Path) -> Path:
    for split, table in (("test", TEST_ROWS), ("dev", DEV_ROWS)):
        folder = root / "mmlu" / "data" / split
        folder.mkdir(parents=True)
        for subject, rows in table.items():
            with open(folder / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerows(rows)
    return root


@pytest.fixture
def mmlu_root(tmp_path: Path) -> Path:
    return write_mmlu(tmp_path)


def test_reads_csv_fields_with_commas_quotes_and_newlines(mmlu_root):
    qs = load_mmlu(mmlu_root, None, 0)
    assert [q.id for q in qs[:2]] == ["college_physics/0", "college_physics/1"]
    assert qs[0].choices[3] == "3,000"
    assert qs[1].question == "Unit of force,\nin SI?"
    assert qs[2].question == 'Which is "fast"?'
    assert subjects(mmlu_root) == ["college_physics", "world_religions"]


def test_accepts_root_or_mmlu_folder(mmlu_root):
    ids = [q.id for q in load_mmlu(mmlu_root, 3, 1)]
    assert [q.id for q in load_mmlu(mmlu_root / "mmlu", 3, 1)] == ids
    assert [q.id for q in load_mmlu(mmlu_root / "mmlu" / "data", 3, 1)] == ids


def test_missing_data_is_an_input_error(tmp_path):
    from corsa.errors import InputError

    with pytest.raises(InputError, match="no MMLU data"):
        load_mmlu(tmp_path, 10, 0)


def test_bad_answer_letter_is_located(mmlu_root):
    from corsa.errors import InputError

    path = mmlu_root / "mmlu" / "data" / "test" / "world_religions_test.csv"
    with open(path, "a", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerow(("Q?", "a", "b", "c", "d", "AB"))
    with pytest.raises(InputError) as err:
        load_mmlu(mmlu_root, None, 0)
    assert err.value.line == 7


def test_one_shot_prompt_is_exact():
    shot = MMLUQuestion("x/0", "high_school_biology", "What is DNA?", ("acid", "sugar", "fat", "salt"), "A")
    q = MMLUQuestion("x/1", "high_school_biology", "Cells, mostly?", ("water", "iron", "gold", "tin"), "A")
    assert build_prompt("high_school_biology", [shot], q) == (
        "The following are multiple choice questions (with answers).\n\n"
        "Question: What is DNA?\nA. acid\nB. sugar\nC. fat\nD. salt\nAnswer: A\n\n"
        "Question: Cells, mostly?\nA. water\nB. iron\nC. gold\nD. tin\nAnswer:"
    )


def test_subset_is_seeded_sorted_and_sized(mmlu_root):
    a = load_mmlu(mmlu_root, 4, 0)
    assert [q.id for q in a] == [q.id for q in load_mmlu(mmlu_root, 4, 0)]
    assert len(a) == 8
    for subject in TEST_ROWS:
        rows = [int(q.id.split("/")[1]) for q in a if q.subject == subject]
        assert len(rows) == 4 and rows == sorted(rows)
    seeds = {tuple(q.id for q in load_mmlu(mmlu_root, 4, s)) for s in range(6)}
    assert len(seeds) > 1  # the seed matters
    assert len(load_mmlu(mmlu_root, None, 0)) == 15
    assert len(load_mmlu(mmlu_root, 7, 0)) == 7 + 6  # a subject smaller than n is taken whole


def test_config_is_validated():
    with pytest.raises(ValueError):
        MMLUConfig(n_per_subject=0)
    with pytest.raises(ValueError):
        MMLUConfig(batch_size=0)


def reference_predictions(model, tokenizer, data, questions, shots):
    """Unbatched, full-sequence logits: the slow obvious way the batched code must agree with."""
    letters = letter_ids(tokenizer)
    out, rows = [], []
    for q in questions:
        text = build_prompt(q.subject, load_shots(data, q.subject)[:shots], q)
        ids = torch.tensor([tokenizer(text, add_special_tokens=True)["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1, letters]
        rows.append(logits)
        out.append(LETTERS[int(logits.argmax())])
    return out, torch.stack(rows)


def test_batched_scoring_matches_unbatched_reference(mmlu_root, tokenizer, tiny_model):
    config = MMLUConfig(n_per_subject=None, shots=2, batch_size=4, max_tokens=4096)
    result = evaluate_mmlu(tiny_model, tokenizer, mmlu_root, config)
    questions = load_mmlu(mmlu_root, None, 0)
    expected, ref_logits = reference_predictions(tiny_model, tokenizer, mmlu_root, questions, 2)

    assert result["n"] == len(questions) == 15
    assert result["ids"] == [q.id for q in questions]
    assert result["predictions"] == expected
    assert set(result["predictions"]) <= set(LETTERS)
    hits = [p == q.answer for p, q in zip(result["predictions"], questions)]
    assert result["correct"] == hits
    assert 0.0 <= result["accuracy"] <= 1.0 and result["accuracy"] == pytest.approx(sum(hits) / len(hits))
    assert result["per_subject"]["world_religions"] == pytest.approx(sum(hits[9:]) / 6)
    gold = [torch.log_softmax(r, -1)[LETTERS.index(q.answer)] for r, q in zip(ref_logits, questions)]
    assert result["gold_logprob"] == pytest.approx(float(sum(gold)) / len(gold), abs=1e-5)
    assert result["config"]["shots"] == 2 and result["fewer_shots"] == 0 and result["truncated"] == 0

    # The logits themselves, from one batch of very different lengths, not only their argmax.
    prompts = [encode_prompt(tokenizer, q, load_shots(mmlu_root, q.subject)[:2], 4096).ids for q in questions]
    assert len({len(p) for p in prompts}) > 5
    batched = letter_logits(tiny_model, prompts, letter_ids(tokenizer), tokenizer.pad_token_id)
    torch.testing.assert_close(batched, ref_logits, atol=1e-4, rtol=1e-4)


def test_peft_wrapped_model_scores_with_its_adapter(mmlu_root, tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_model(len(tokenizer), seed=1), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # a trained-looking adapter, so ignoring it would change the logits
    model.train()
    config = MMLUConfig(n_per_subject=3, shots=1, batch_size=2, max_tokens=4096)
    result = evaluate_mmlu(model, tokenizer, mmlu_root, config)
    assert model.training  # the caller's mode comes back
    model.eval()
    questions = load_mmlu(mmlu_root, 3, 0)
    assert result["predictions"] == reference_predictions(model, tokenizer, mmlu_root, questions, 1)[0]


def test_shots_are_dropped_from_the_end_to_fit(mmlu_root, tokenizer, tiny_model):
    q = load_mmlu(mmlu_root, None, 0)[0]
    shots = load_shots(mmlu_root, q.subject)
    full = len(tokenizer(build_prompt(q.subject, shots[:3], q))["input_ids"])
    enc = encode_prompt(tokenizer, q, shots[:3], full - 1)
    assert enc.shots == 2 and not enc.truncated
    assert enc.ids == tokenizer(build_prompt(q.subject, shots[:2], q))["input_ids"]

    # The tiny model's context is 256 tokens, too short for 5 character-level shots.
    result = evaluate_mmlu(tiny_model, tokenizer, mmlu_root, MMLUConfig(n_per_subject=2))
    assert result["n"] == 4 and result["fewer_shots"] == 4 and result["truncated"] == 0


def test_too_long_prompt_keeps_bos_and_its_end(mmlu_root):
    from tokenizers import processors

    tok = make_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    q = load_mmlu(mmlu_root, None, 0)[0]
    whole = tok(build_prompt(q.subject, [], q))["input_ids"]
    assert whole[0] == tok.bos_token_id  # BOS comes from tokenizer(text) when the tokenizer adds it
    enc = encode_prompt(tok, q, load_shots(mmlu_root, q.subject), 20)
    assert enc.truncated and enc.shots == 0
    assert enc.ids == [tok.bos_token_id] + whole[-19:]
    assert tok.decode(enc.ids[1:]).endswith("Answer:")


class StubTokenizer:
    def __init__(self, table: dict[str, list[int]]):
        self.table = table

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.table[text]}


def test_letter_ids_prefer_space_form_then_fall_back():
    spaced = {f" {x}": [7, 10 + i] for i, x in enumerate(LETTERS)} | {x: [20 + i] for i, x in enumerate(LETTERS)}
    assert letter_ids(StubTokenizer(spaced)) == [10, 11, 12, 13]  # the last id of " A"
    merged = {f" {x}": [7] for x in LETTERS} | {x: [20 + i] for i, x in enumerate(LETTERS)}
    assert letter_ids(StubTokenizer(merged)) == [20, 21, 22, 23]
    with pytest.raises(ValueError, match="distinct"):
        letter_ids(StubTokenizer({f" {x}": [7] for x in LETTERS} | {x: [7] for x in LETTERS}))


@pytest.mark.skipif(not (DATA / "mmlu").is_dir(), reason="MMLU benchmark data not present")
def test_real_mmlu_counts():
    subset = load_mmlu(DATA, 10, 0)
    assert len(subset) == 570 and len({q.subject for q in subset}) == 57
    assert len(load_mmlu(DATA, None, 0)) == 14042
    assert [q.id for q in load_mmlu(DATA / "mmlu", 10, 0)] == [q.id for q in subset]
    assert all(len(load_shots(DATA, s)) == 5 for s in subjects(DATA))


def test_shared_prefix_path_scores_like_full_prompts(tmp_path, tiny_model, tokenizer, monkeypatch):
    """Running each subject's header and shots once gives the same predictions as full prompts."""
    from corsa.evaluate import mmlu

    data = write_mmlu(tmp_path)
    config = MMLUConfig(n_per_subject=None, batch_size=3)
    calls = []
    real = mmlu.shared_letter_logits
    monkeypatch.setattr(mmlu, "shared_letter_logits", lambda *a: calls.append(1) or real(*a))
    shared = evaluate_mmlu(tiny_model, tokenizer, data, config)
    assert calls  # the shared path ran
    monkeypatch.setattr(mmlu, "shared_prefix", lambda *a: None)
    full = evaluate_mmlu(tiny_model, tokenizer, data, config)
    assert shared["predictions"] == full["predictions"]
    assert shared["gold_logprob"] == pytest.approx(full["gold_logprob"], abs=1e-4)

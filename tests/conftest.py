"""Shared fixtures: a tiny Llama and a character-level tokenizer, built in-process (no files, no hub)."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
import torch

from corsa import scoring

torch.set_num_threads(int(os.environ.get("CORSA_TEST_THREADS", "2")))

REPO = Path(__file__).resolve().parents[1]
# The benchmarks live beside the checkout (../shared/benchmarks); CORSA_DATA overrides.
DATA = Path(os.environ.get("CORSA_DATA", REPO.parent / "shared" / "benchmarks"))

REAL_BF16_IS_FAST = scoring.bf16_is_fast  # kept before the fixture below replaces it in every test


@pytest.fixture
def one_thread():
    """torch on one thread for the test: a run compared with a recorded one, or a tiny model's training judged by
    whether it learned every edit, depends on the order of parallel sums, and that order depends on how the work
    splits over threads and on the CPU's kernels. On an AMD EPYC host with 2 threads a recorded margin moved in its
    5th digit and a tiny F-Learning run learned 1 of 2 edits; on one thread both match the records."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def bf16_is_fast(monkeypatch):
    """Tests asked for bf16 run it on every machine: whether bf16 is fast (scoring.use_bf16) depends on the real
    CPU, and on one without native bf16 every bf16 test would silently run in fp32. The tests of that fallback
    set it themselves."""
    monkeypatch.setattr(scoring, "bf16_is_fast", lambda device_type: True)


def bench_script(name: str):
    """A script of bench/ (not a package) imported as a module, so tests can call its main()."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def make_tokenizer(chat: bool = False):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<user>", "<assistant>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.printable))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                  unk_token="<unk>", additional_special_tokens=["<user>", "<assistant>"])
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model(vocab_size: int, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, initializer_range=0.3, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


def save_tiny_model(path: Path, chat: bool = False, max_length: int | None = None) -> str:
    """A tiny Llama and its tokenizer as a local Hugging Face folder (the local-folder model path)."""
    tok = make_tokenizer(chat)
    if max_length:
        tok.model_max_length = max_length
    make_model(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def chat_tokenizer():
    return make_tokenizer(chat=True)


@pytest.fixture
def tiny_model(tokenizer):
    return make_model(len(tokenizer))


def gradients_without_extras(trainer, fmt, edits, cfg, idx):
    """The gradients of `trainer`'s batch `idx` for the same model and edits trained without anchors or context
    copies (the same DPO reference log-probs): what a test of an extra term subtracts."""
    from corsa.methods.corsa import CorsaTrainer, build_pairs

    plain_pairs = build_pairs(fmt, edits)
    for p, q in zip(plain_pairs, trainer.pairs):
        p.ref_new, p.ref_old = q.ref_new, q.ref_old
    return CorsaTrainer(trainer.model, plain_pairs, cfg, fmt.pad_id).gradients(idx)


def answer_nll(model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """-log p(answer | prompt), summed over the answer's tokens, by a plain forward pass over both."""
    ids = torch.tensor([prompt + answer])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1 : -1], -1)
    return -logp.gather(1, torch.tensor(answer)[:, None]).sum()

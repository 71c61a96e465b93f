"""Scoring answers: log p(answer | prompt) at the answer positions only, and greedy answers.

The output layer is the expensive part of a small model's forward pass (49k-262k vocabulary), and only the few
positions that predict answer tokens matter for every loss and metric here. So we run the decoder body over the
whole sequence, gather the hidden states at the answer positions and apply the output layer to those alone.
Training and evaluation share these functions, so a metric always scores exactly what the trainer optimised.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
import torch.nn.functional as F

from corsa.answers import first_sentence
from corsa.prompts import Formatter


@dataclass
class AnswerBatch:
    """Right-padded prompt+answer sequences and where their answer tokens are."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    rows: torch.Tensor  # [N] row of each answer token
    positions: torch.Tensor  # [N] position whose logits predict that token (one before it)
    targets: torch.Tensor  # [N] the answer token ids
    n_rows: int

    def to(self, device: torch.device | str) -> AnswerBatch:
        return AnswerBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.rows,
                                                     self.positions, self.targets)), n_rows=self.n_rows)

    @property
    def tokens_per_row(self) -> torch.Tensor:
        return torch.bincount(self.rows, minlength=self.n_rows)


def make_batch(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> AnswerBatch:
    """Pack (prompt_ids, answer_ids) pairs, padding only to the longest sequence in this batch."""
    width = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    rows, positions, targets = [], [], []
    for i, (p, a) in enumerate(pairs):
        seq = p + a
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        rows += [i] * len(a)
        positions += range(len(p) - 1, len(seq) - 1)
        targets += a
    return AnswerBatch(ids, mask, torch.tensor(rows), torch.tensor(positions), torch.tensor(targets), len(pairs))


@dataclass
class SharedBatch:
    """Several answers per prompt, with every token that answers share run through the model once.

    Two levels of sharing. Every prompt of a batch starts with the same tokens when a chat template adds a system
    turn (24 of SmolLM2's ~37 prompt tokens): that common prefix runs once, as a batch of one. Each prompt's own
    tokens then run once, however many answers follow (CoRSA scores y+ and y- after the same prompt). Their
    key/value caches are indexed out to every answer row, and only the short answers run per row: the same
    numbers as `AnswerBatch`, for a fraction of the tokens.
    """

    prefix_ids: torch.Tensor  # [C] tokens every prompt starts with (C may be 0)
    prompt_ids: torch.Tensor  # [P, Tp] the rest of each prompt, left-padded so every prompt ends at the last column
    prompt_mask: torch.Tensor  # [P, Tp]
    answer_ids: torch.Tensor  # [R, Ta] right-padded
    answer_mask: torch.Tensor  # [R, Ta]
    owner: torch.Tensor  # [R] prompt of each answer row
    rows: torch.Tensor  # [N] answer row of each answer token
    offsets: torch.Tensor  # [N] index of the token within its answer
    targets: torch.Tensor  # [N]
    n_rows: int

    def to(self, device: torch.device | str) -> SharedBatch:
        names = ("prefix_ids", "prompt_ids", "prompt_mask", "answer_ids", "answer_mask", "owner", "rows", "offsets",
                 "targets")
        return SharedBatch(**{n: getattr(self, n).to(device) for n in names}, n_rows=self.n_rows)

    @property
    def tokens_per_row(self) -> torch.Tensor:
        return torch.bincount(self.rows, minlength=self.n_rows)


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all sequences share, leaving each at least one token of its own (whose hidden
    state predicts what follows it). 0 for a single sequence: there is nothing to share."""
    if len(seqs) < 2:
        return 0
    first, n = seqs[0], min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        n = next((i for i in range(n) if s[i] != first[i]), n)
    return max(n, 0)


def left_pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) with every sequence ending in the last column: where generation and next-token scoring read."""
    width = max(len(x) for x in seqs)
    ids = torch.tensor([[pad_id] * (width - len(x)) + list(x) for x in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in seqs], dtype=torch.long)
    return ids, mask


def make_shared_batch(prompts: Sequence[list[int]], answers: Sequence[tuple[int, list[int]]],
                      pad_id: int) -> SharedBatch:
    """`answers` holds (prompt index, answer ids) pairs; rows keep that order."""
    c = common_prefix_length(prompts)
    prompt_ids, prompt_mask = left_pad([p[c:] for p in prompts], pad_id)
    ta = max(len(a) for _, a in answers)
    answer_ids = torch.full((len(answers), ta), pad_id, dtype=torch.long)
    answer_mask = torch.zeros((len(answers), ta), dtype=torch.long)
    rows, offsets, targets = [], [], []
    for r, (_, a) in enumerate(answers):
        answer_ids[r, : len(a)] = torch.tensor(a)
        answer_mask[r, : len(a)] = 1
        rows += [r] * len(a)
        offsets += range(len(a))
        targets += a
    owner = torch.tensor([o for o, _ in answers])
    prefix = torch.tensor(list(prompts[0][:c]), dtype=torch.long)
    return SharedBatch(prefix, prompt_ids, prompt_mask, answer_ids, answer_mask, owner, torch.tensor(rows),
                       torch.tensor(offsets), torch.tensor(targets), len(answers))


def shared_answer_logits(model: torch.nn.Module, batch: SharedBatch) -> torch.Tensor:
    """Logits [N, V] at the answer positions: the common prefix once, each prompt once, then the answers."""
    lm = causal_lm(model)
    decoder = lm.get_decoder()
    n_prompts, c = batch.prompt_ids.shape[0], batch.prefix_ids.numel()
    cache = None
    if c:
        _, cache = _decode(decoder, cache, input_ids=batch.prefix_ids[None])
        cache.batch_repeat_interleave(n_prompts)
    prompt_mask = torch.cat([batch.prompt_mask.new_ones(n_prompts, c), batch.prompt_mask], dim=1)
    prompt_pos = c + (batch.prompt_mask.cumsum(-1) - 1).clamp(min=0)
    prompt_hidden, cache = _decode(decoder, cache, input_ids=batch.prompt_ids, attention_mask=prompt_mask,
                                   position_ids=prompt_pos)
    select_cache_rows(cache, batch.owner)  # one copy of each prompt's keys/values per answer row
    prompt_len = prompt_mask.sum(-1)[batch.owner]
    answer_pos = prompt_len[:, None] + torch.arange(batch.answer_ids.shape[1], device=prompt_len.device)
    mask = torch.cat([prompt_mask[batch.owner], batch.answer_mask], dim=1)
    hidden, _ = _decode(decoder, cache, input_ids=batch.answer_ids, attention_mask=mask, position_ids=answer_pos)
    # Answer token k is predicted by the hidden state before it: the prompt's last one for k = 0.
    hidden = torch.cat([prompt_hidden[batch.owner, -1:], hidden], dim=1)
    return output_logits(lm, hidden[batch.rows, batch.offsets])


def select_cache_rows(cache: Any, index: torch.Tensor) -> None:
    """Row r of every cached key/value tensor becomes row `index[r]`, as `cache.batch_select_indices` does.

    Plain key/value layers are gathered with `index_select` rather than the cache's own `keys[index]`: the same
    values, but the backward of advanced indexing is an accumulating `index_put`, which a CPU runs serially, and
    it took a twentieth of an fp32 CoRSA step on two cores (docs/PERFORMANCE.md, "Levers"). Other kinds of layer
    (and caches without `layers`, as in transformers 4.x) keep their own method.
    """
    for layer in getattr(cache, "layers", None) or [cache]:
        if type(layer).batch_select_indices is _plain_select() and isinstance(layer.keys, torch.Tensor) \
                and layer.keys.numel():
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        else:
            layer.batch_select_indices(index)


@functools.cache
def _plain_select() -> Any:
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # transformers 4.x before cache layers
        return None
    return DynamicLayer.batch_select_indices


def _decode(decoder: torch.nn.Module, cache: Any, **inputs: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """One decoder call that continues `cache` (None: start one); returns (hidden states, the extended cache).
    transformers 5 calls the cache argument `cache`, 4.x `past_key_values`."""
    name = _cache_argument(type(decoder))
    out = decoder(**inputs, **{name: cache}, use_cache=True)
    return out.last_hidden_state, getattr(out, name)


@functools.cache
def _cache_argument(decoder_class: type) -> str:
    return "cache" if "cache" in inspect.signature(decoder_class.forward).parameters else "past_key_values"


def output_logits(lm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The output layer on selected hidden states, with the final soft-capping of models that have one."""
    logits = lm.get_output_embeddings()(hidden)
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM under a PEFT wrapper (LoRA layers are injected in place, so they stay active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def answer_token_logits(model: torch.nn.Module, batch: AnswerBatch) -> torch.Tensor:
    """Logits [N, V] at the answer positions only."""
    lm = causal_lm(model)
    hidden = lm.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    return output_logits(lm, hidden[batch.rows, batch.positions])


def answer_log_softmax(model: torch.nn.Module, batch: AnswerBatch | SharedBatch) -> torch.Tensor:
    """The model's next-token log-probabilities [N, V] at every answer position, in fp32 under autocast."""
    if isinstance(batch, SharedBatch):
        logits = shared_answer_logits(model, batch).float()
    else:
        logits = answer_token_logits(model, batch).float()
    return F.log_softmax(logits, dim=-1)


def at_targets(full: torch.Tensor, batch: AnswerBatch | SharedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """From answer_log_softmax's [N, V]: (log p of each answer token [N], the argmax token there [N])."""
    return full.gather(1, batch.targets[:, None]).squeeze(1), full.argmax(dim=-1)


def token_logprobs(model: torch.nn.Module, batch: AnswerBatch | SharedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each answer token [N], the model's argmax token there [N]); log-softmax in fp32 under autocast."""
    return at_targets(answer_log_softmax(model, batch), batch)


def sum_by_row(values: torch.Tensor, batch: AnswerBatch | SharedBatch) -> torch.Tensor:
    return torch.zeros(batch.n_rows, dtype=values.dtype, device=values.device).index_add(0, batch.rows, values)


@dataclass(frozen=True)
class AnswerScore:
    logprob: float  # log p(answer | prompt), summed over the scored answer tokens
    n_tokens: int
    n_correct: int  # answer tokens that are the argmax under teacher forcing (EasyEdit's token accuracy)
    argmax: tuple[int, ...] = ()  # the model's argmax token at each answer position (EasyEdit's locality)

    @property
    def token_accuracy(self) -> float:
        return self.n_correct / self.n_tokens

    @property
    def exact(self) -> bool:
        """Every token the argmax: greedy decoding reproduces the answer exactly and then stops."""
        return self.n_correct == self.n_tokens


@runtime_checkable
class Routed(Protocol):
    """A model that answers each prompt with one of its adapters or with none (corsa.routing.RoutedModel)."""

    model: torch.nn.Module

    def routes(self, prompts: Sequence[str]) -> list[str | None]: ...

    def using(self, route: str | None) -> contextlib.AbstractContextManager[None]: ...


T = TypeVar("T")


def per_route(model: torch.nn.Module, prompts: Sequence[str],
              answer: Callable[[torch.nn.Module, list[int]], list[T]]) -> list[T]:
    """`answer(model, indices)` for the prompts at `indices`, called once per route of a routed model with that
    route's adapter on (once, with every index, for a plain model); results in prompt order."""
    if not isinstance(model, Routed):
        return answer(model, list(range(len(prompts))))
    routes = model.routes(prompts)
    out: list[Any] = [None] * len(prompts)
    for route in dict.fromkeys(routes):
        indices = [i for i, r in enumerate(routes) if r == route]
        with model.using(route):
            for i, value in zip(indices, answer(model.model, indices)):
                out[i] = value
    return out


@torch.no_grad()
def score_answers(model: torch.nn.Module, formatter: Formatter, pairs: Sequence[tuple[str, str]],
                  batch_size: int = 16, autocast: bool = False, stop: bool = True) -> list[AnswerScore]:
    """Teacher-forced scores of each (prompt, answer); stop=False leaves the end token out of the answer."""
    return per_route(model, [p for p, _ in pairs], lambda m, idx: _score_answers(
        m, formatter, [pairs[i] for i in idx], batch_size, autocast, stop))


def _score_answers(model: torch.nn.Module, formatter: Formatter, pairs: Sequence[tuple[str, str]],
                   batch_size: int, autocast: bool, stop: bool) -> list[AnswerScore]:
    device = next(model.parameters()).device
    out: list[AnswerScore] = []
    with compute_context(model, autocast):  # once, not in every forward
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            batch = make_shared_batch([formatter.prompt_ids(p) for p, _ in chunk],
                                      [(k, formatter.answer_ids(a, stop)) for k, (_, a) in enumerate(chunk)],
                                      formatter.pad_id).to(device)
            with autocast_context(device, autocast):
                logp, top = token_logprobs(model, batch)
            sums, hits = sum_by_row(logp, batch), sum_by_row((top == batch.targets).long(), batch)
            counts = batch.tokens_per_row.tolist()
            tops = torch.split(top.cpu(), counts)  # rows are contiguous
            out += [AnswerScore(float(s), int(c), int(h), tuple(t.tolist()))
                    for s, c, h, t in zip(sums, counts, hits, tops)]
    return out


# Where bf16 cannot be known from the CPU's flags (not x86), bf16 matrix products must run at least at this share
# of fp32's speed to be used: native bf16 runs them faster than fp32, and without it they run in a scalar loop,
# about 100x slower (measured on an AMD Zen 3), so the margin either side is wide.
BF16_MIN_SPEED = 0.5
_X86 = ("x86_64", "amd64", "i386", "i686")


@functools.cache
def bf16_is_fast(device_type: str) -> bool:
    """Whether bf16 runs fast on this kind of device: on an x86 CPU, whether it has avx512_bf16 or AMX (without
    them a LoRA step of SmolLM2 took about 70 s in bf16 against 2.5 s in fp32); elsewhere on a CPU, measured once
    per process."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return True
    import platform

    flags = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if platform.machine().lower() in _X86 and all(flags):
        return any(flag() for flag in flags)  # type: ignore[misc]
    return measured_bf16_speed() >= BF16_MIN_SPEED


def measured_bf16_speed(size: int = 256, products: int = 4, trials: int = 5) -> float:
    """bf16 matrix-product speed as a multiple of fp32's on the CPU: best of `trials`, each `products` products
    long, so that a busy machine (a thread descheduled for a few ms) does not decide it."""
    import time

    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        a @ b  # warm-up: thread pool, allocator
        times = []
        for _ in range(trials):
            t = time.perf_counter()
            for _ in range(products):
                a @ b
            times.append(time.perf_counter() - t)
        return min(times)

    return best(torch.float32) / max(best(torch.bfloat16), 1e-9)


def use_bf16(device: torch.device | str, requested: bool) -> bool:
    """Whether to run in bf16: requested, and fast on this device. Otherwise fp32, said once on stderr."""
    if not requested:
        return False
    kind = torch.device(device).type
    if bf16_is_fast(kind):
        return True
    if kind not in _WARNED:
        _WARNED.add(kind)
        print(f"corsa: bf16 is not fast on this {kind} (no native bf16 instructions); running in fp32 instead",
              file=sys.stderr)
    return False


_WARNED: set[str] = set()


def autocast_context(device: torch.device | str, enabled: bool) -> Any:
    """bf16 autocast where it is fast (`use_bf16`); on CPUs with native bf16 a CoRSA step takes about 0.8x."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=use_bf16(device, enabled))


@contextlib.contextmanager
def compute_context(model: torch.nn.Module, bf16: bool = False) -> Iterator[None]:
    """What corsa runs its forward and backward passes inside, entered once around training or scoring.

    On a CPU, attention with grouped-query heads folded into the query axis (`cpu_attention`; the same outputs).
    With bf16 (where it is fast, `use_bf16`) code run under `autocast_context(..., True)` also gets the frozen
    linear weights held in bf16 (bitwise the same results, fewer casts) and, on a CPU, attention in fp32.
    """
    if not use_bf16(next(model.parameters()).device, bf16):
        with cpu_attention(model):
            yield
        return
    with frozen_linears_in_bf16(model), cpu_attention(model, fp32=True):
        yield


@contextlib.contextmanager
def frozen_linears_in_bf16(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Store the frozen linear layers' weights (and biases) in bf16 for the duration, for code run under
    `autocast_context(..., True)`; the fp32 tensors themselves are put back afterwards.

    Autocast casts a linear layer's fp32 weight to bf16 at every call, and keeps the cast only for tensors that
    require grad, so a frozen base model is cast again in every forward pass (every generated token, too).
    Autocast runs a linear layer in bf16 whatever the stored dtype, so casting once gives bitwise the same results.
    Weights shared with an embedding (a tied output layer) stay as they are: an embedding lookup is not autocast,
    and its output would change dtype.
    """
    if not enabled:
        yield
        return
    embedded = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    kept: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        for m in model.modules():
            if not isinstance(m, torch.nn.Linear) or m.weight.requires_grad or m.weight.data_ptr() in embedded:
                continue
            for p in (m.weight, m.bias):
                if p is not None and not p.requires_grad and p.dtype == torch.float32:
                    kept.append((p, p.data))
                    p.data = p.data.to(torch.bfloat16)
        yield
    finally:
        for p, data in kept:
            p.data = data


GROUPED_SDPA = "corsa_sdpa"
FP32_SDPA = "corsa_sdpa_fp32"


def sdpa_grouped(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers' SDPA attention, with the query heads that share a key/value head folded into the query axis.

    transformers repeats each key/value head for its query heads (`repeat_kv`) when a mask is given and more than
    one token is queried; on a CPU the backward of those copies, and the flash-attention backward's zeroed
    gradient buffers at the repeated size, cost more than the attention itself at corsa's short answers. Folding
    computes every (query, key) score and softmax row as before, so the outputs are the same; only the order in
    which gradients of the shared keys are summed changes. Anything unusual (a single query token, no mask, a
    per-head mask, dropout, a position bias, soft-capping, attention sinks) goes to transformers' function.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, length, _ = query.shape
    unusual = {"position_bias", "softcap", "s_aux", "sinks"} & {k for k, v in kwargs.items() if v is not None}
    if (groups == 1 or length == 1 or attention_mask is None or attention_mask.dim() != 4
            or attention_mask.shape[1] != 1 or kwargs.get("dropout", 0.0) or unusual
            or key.shape[1] * groups != heads):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kv_heads, keys = key.shape[1], attention_mask.shape[-1]
    # Head h attends with key/value head h // groups (repeat_kv's order), so a reshape groups them.
    folded = query.reshape(batch, kv_heads, groups * length, query.shape[-1])
    mask = attention_mask[:, :, None].expand(-1, -1, groups, -1, -1).reshape(-1, 1, groups * length, keys)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=kwargs.get("scaling"))
    return out.reshape(batch, heads, length, value.shape[-1]).transpose(1, 2).contiguous(), None


def sdpa_fp32(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """`sdpa_grouped` on fp32 copies of q, k and v with autocast off; the output in q's dtype."""
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_grouped(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


@contextlib.contextmanager
def cpu_attention(model: torch.nn.Module, fp32: bool = False) -> Iterator[None]:
    """On a CPU, run a model that uses transformers' SDPA attention with corsa's for the duration: grouped-query
    heads folded (`sdpa_grouped`), and with `fp32` attention computed in fp32.

    PyTorch's CPU flash-attention backward is several times slower in bf16 than in fp32: in a bf16 CoRSA step on
    SmolLM2 it took a quarter of the time (docs/PERFORMANCE.md). Attention is a small share of the FLOPs here (short
    sequences), so computing it in fp32 costs little and makes the step about a fifth faster; it is also more
    precise, so results move by bf16 rounding, not more. Masks are built exactly as for SDPA. On a GPU, and for
    other attention implementations, nothing changes.
    """
    ours = ("sdpa", GROUPED_SDPA, FP32_SDPA)  # entered inside itself, the inner call's choice holds until it exits
    configs = {id(c): (c, c._attn_implementation) for m in model.modules()
               if (c := getattr(m, "config", None)) is not None and getattr(c, "_attn_implementation", None) in ours}
    device = next(model.parameters()).device
    if device.type != "cpu" or not configs or not _register_sdpa():
        yield
        return
    for c, _ in configs.values():
        c._attn_implementation = FP32_SDPA if fp32 else GROUPED_SDPA
    try:
        yield
    finally:
        for c, before in configs.values():
            c._attn_implementation = before


@functools.cache
def _register_sdpa() -> bool:
    try:  # the attention and mask registries of transformers >= 4.53
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    for name, fn in ((GROUPED_SDPA, sdpa_grouped), (FP32_SDPA, sdpa_fp32)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)  # without a mask function, transformers passes no mask
    return True


@torch.no_grad()
def generate(model: torch.nn.Module, formatter: Formatter, prompts: Sequence[str], *, max_new_tokens: int = 32,
             batch_size: int = 16, temperature: float = 0.0, seed: int = 0, autocast: bool = False) -> list[str]:
    """Answers to prompts: greedy by default; temperature > 0 samples (the released CoRSA code samples at 0.7)."""
    return per_route(model, prompts, lambda m, idx: _generate(
        m, formatter, [prompts[i] for i in idx], max_new_tokens, batch_size, temperature, seed, autocast))


def _generate(model: torch.nn.Module, formatter: Formatter, prompts: Sequence[str], max_new_tokens: int,
              batch_size: int, temperature: float, seed: int, autocast: bool) -> list[str]:
    device = next(model.parameters()).device
    tok = formatter.tokenizer
    pad = formatter.pad_id
    answers: list[str] = []
    if temperature > 0:
        torch.manual_seed(seed)
    with compute_context(model, autocast):  # once, not for every generated token
        for start in range(0, len(prompts), batch_size):
            ids, mask = left_pad([formatter.prompt_ids(p) for p in prompts[start : start + batch_size]], pad)
            ids, mask, width = ids.to(device), mask.to(device), ids.shape[1]
            sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0} if temperature > 0 else {
                "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            with autocast_context(device, autocast):
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     eos_token_id=formatter.stop_id, pad_token_id=pad, **sampling)
            for row in out[:, width:]:
                answers.append(formatter.clean(tok.decode(row, skip_special_tokens=True)))
    return answers


def current_answers(model: torch.nn.Module, formatter: Formatter, prompts: Sequence[str], *,
                    max_new_tokens: int = 32, autocast: bool = False) -> list[str]:
    """What the model answers now, greedy and cut to its first sentence (empty when it says nothing): the old
    answers an edit pushes down, and the answers anchors keep."""
    return [first_sentence(a) for a in generate(model, formatter, prompts, max_new_tokens=max_new_tokens,
                                                 autocast=autocast)]

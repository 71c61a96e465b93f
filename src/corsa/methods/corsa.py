"""CoRSA: Conflict-Resolving and Sharpness-Aware Minimization (paper section 3, Algorithm 1 in appendix C.2).

A LoRA adapter is trained on L = L_SFT + lambda * L_DPO, where DPO prefers the new answer y+ over the old one
y- against a reference model, with SAM over the LoRA parameters and PCGrad resolving the SFT/DPO conflict at
both SAM points. `CorsaTrainer.step` follows Algorithm 1 line by line; the rest is batching and bookkeeping.

Switching parts off gives the paper's ablations (Table 9) and its LoRA baseline: use_dpo=False drops the DPO
term (and with it PCGrad, which needs two objectives), use_sam=False takes the plain step at phi, pcgrad=None
adds the two gradients unchanged. The configuration is checked, never silently rewritten.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from corsa import anchors, contexts, distributed
from corsa.answers import contains
from corsa.methods.base import EditResult
from corsa.methods.registry import MethodSpec, Option, Sweep, one_of, register
from corsa.optim import losses, pcgrad, sam
from corsa.prompts import Formatter
from corsa.requests import EditRequest
from corsa.scoring import (
    SharedBatch,
    answer_log_softmax,
    at_targets,
    autocast_context,
    compute_context,
    current_answers,
    make_shared_batch,
    score_answers,
    sum_by_row,
    use_bf16,
)

# Every attention and MLP projection of Llama/Gemma/Qwen-style blocks (paper A.2; the released default.json).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# anchor_loss="kl" keeps this many of the reference's most likely tokens per anchor answer position (and the rest
# of its mass as one outcome): 64 x 12 bytes a position instead of the vocabulary's 49,152 floats for SmolLM2.
ANCHOR_KL_TOP = 64


@dataclass(frozen=True)
class CorsaConfig:
    # LoRA, paper appendix A.2: rank 32, alpha 64 for factual updates; dropout 0 as in the released config.
    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = PROJECTIONS
    # Objective, paper eq. 4 and A.2: lambda = 1 (equal weight; Figure 5 peaks there), beta = 0.1 (TRL default).
    use_dpo: bool = True
    lam: float = 1.0
    beta: float = 0.1
    # SAM, paper eq. 7 and A.2: rho = 0.05 (best of their sweep on every dataset), eps = 1e-12.
    use_sam: bool = True
    rho: float = 0.05
    sam_eps: float = 1e-12
    # A cheaper step (issue 32; not in the paper; opt-in until measured): the SAM ascent and second gradient only
    # every `sam_every` steps, LookSAM's reuse of the last SAM direction's orthogonal part in between, scaled by
    # `sam_reuse_alpha` (LookSAM's 0.7). 1 = every step (Algorithm 1 exactly).
    sam_every: int = 1
    sam_reuse_alpha: float = 0.7
    # The other cheaper step of issue 32 (opt-in until measured): plain steps first, SAM only in the last
    # `sam_last` share of training. A run that stops once its edits are learned has no known length, so the share
    # is of the shortest run it can be: min_epochs epochs when stop_when_learned is on, else `epochs`. SAM then runs
    # from step (1 - sam_last) x that length to the end, however late the run stops. 1 = every step (the paper).
    sam_last: float = 1.0
    # PCGrad at both SAM points (Algorithm 1 lines 4-8 and 10-15); "official" is the released code's variant.
    pcgrad: Literal["paper", "official"] | None = "paper"
    pcgrad_eps: float = 1e-12
    # Optimisation, paper A.2: AdamW, lr 2e-4, effective batch 16 (4 x 4 accumulation in the paper).
    lr: float = 2e-4
    batch_size: int = 16
    micro_batch_size: int | None = None  # memory only (None: the whole batch); the step is the same for any
    epochs: int = 20  # an upper bound when stop_when_learned is on
    weight_decay: float = 0.0
    warmup_steps: int = 0
    # The paper does not name a schedule; the released code inherits the HF Trainer's linear decay to 0 (over the
    # --epochs cap here) with 5 warmup steps. Constant keeps an early-stopped run's last steps as strong as its first.
    lr_schedule: Literal["constant", "linear"] = "constant"
    max_grad_norm: float | None = 1.0  # the HF Trainer default the released code inherits
    # Stop once every edit's new answer has been the teacher-forced argmax for `patience` epochs in a row
    # (greedy decoding then reproduces it exactly); min_epochs guards generality against stopping too early.
    stop_when_learned: bool = True
    min_epochs: int = 5
    patience: int = 2
    # The share of edits that counts as "every edit". Under SAM at a constant learning rate a few edits of a
    # hundred can flip back and forth for many epochs after the rest are learned (docs/PERFORMANCE.md), so 1.0
    # may run to the epoch cap; 0.95 stops at the ">= 95 % edit success" that time-to-edit is measured to.
    learned_share: float = 1.0
    # Divergence guard. At lr 3e-3 a CoRSA run learned 95 % of 100 edits and then, within one epoch, its loss jumped
    # from 0.2 to 16 and every edit was lost (docs/PERFORMANCE.md). Once half the edits have been learned, an epoch
    # that ends with under `collapse_share` of the best epoch's learned share, or any step whose loss is not finite,
    # stops training and puts back the saved adapter that the most edits were learned by (see `train`). Runs that
    # train well swing by a few edits, far from half; 0 switches the share test off (a non-finite loss always stops).
    collapse_share: float = 0.5
    # Retention (issue 29; not in the paper): per edit, up to `anchors_per_edit` anchor prompts (corsa.anchors:
    # the request's neighbourhood, its prompt with the subject swapped, general questions) answered by the model
    # as it is before this update (greedy, at most `anchor_tokens` tokens, first sentence), and trained to keep
    # that answer: L_anchor, the mean NLL of those answers, enters Algorithm 1 on the SFT side,
    # g_SFT <- grad(L_SFT + anchor_weight * L_anchor), so PCGrad still resolves the SFT/DPO conflict. 0 = off.
    anchors_per_edit: int = 0
    # Up to this many more anchors per edit that ask other relations of the edit's own subject (corsa.anchors, 4;
    # not in the paper): routing by subject sends those questions to the adapter, and without them it answers
    # them with a new target. One whose answer before the update contains the edit's old or new answer asks the
    # edited fact after all and is dropped. 0 = off.
    relation_anchors: int = 0
    anchor_weight: float = 1.0
    anchor_tokens: int = 16
    # How an anchor's answer is kept (issue 29 asks for both to be measured): "nll", the mean NLL of the model's
    # own greedy answer (above); "kl", the KL from the model before the update to the model being trained at
    # every position of that answer, over the reference's ANCHOR_KL_TOP most likely tokens and the rest of its
    # mass as one outcome (corsa.optim.losses.top_k_kl), so the whole next-token distribution is kept, not its
    # argmax only.
    anchor_loss: Literal["nll", "kl"] = "nll"
    # Where L_anchor enters Algorithm 1: "sft", added to L_SFT (above); "pcgrad", as a third gradient that PCGrad
    # resolves against Algorithm 1's merged SFT/DPO direction at both SAM points (corsa.optim.pcgrad.project_pair),
    # for one more backward pass per step.
    anchor_side: Literal["sft", "pcgrad"] = "sft"
    # Where in a SAM step L_anchor's gradient is taken (issue 32's cheaper step; not in the paper; opt-in until
    # measured): "both", at phi and again at the perturbed phi~, as Algorithm 1 takes L's; "first", at phi only,
    # the same gradient reused at phi~. SAM's flat region is sought for the edits, while the anchors only hold
    # what the model answered before; "first" runs one anchor pass a step instead of two, and the anchors' answer
    # tokens are most of a step's FLOPs (docs/PERFORMANCE.md, "What anchors cost").
    anchor_points: Literal["both", "first"] = "both"
    # Context copies (issue 29; not in the paper; corsa.contexts): each edit's new answer is also trained on its
    # prompt behind `contexts_per_edit` short texts the model wrote itself (ROME/MEMIT's context templates, 10
    # tokens there too), so the fact is bound to its subject wherever it is mentioned. They enter L_SFT as more
    # new-answer tokens (L_DPO stays on the edit's own prompt). 0 = off.
    contexts_per_edit: int = 0
    context_tokens: int = 10
    seed: int = 0
    bf16: bool = False  # bf16 autocast for forward/backward; master weights stay fp32

    def __post_init__(self) -> None:
        if self.pcgrad is not None and not self.use_dpo:
            raise ValueError("PCGrad resolves conflicts between the SFT and DPO gradients: with use_dpo=False "
                             "set pcgrad=None (the 'no DPO' ablation has one objective)")
        if self.pcgrad not in (None, "paper", "official"):
            raise ValueError(f"pcgrad must be 'paper', 'official' or None, not {self.pcgrad!r}")
        for name in ("lora_r", "batch_size", "epochs", "patience", "anchor_tokens", "sam_every", "context_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("anchors_per_edit", "relation_anchors"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")
        if not 0 <= self.contexts_per_edit <= len(contexts.OPENINGS):
            raise ValueError(f"contexts_per_edit must be in [0, {len(contexts.OPENINGS)}], not {self.contexts_per_edit}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError("micro_batch_size must be >= 1")
        if self.anchor_loss not in ("nll", "kl"):
            raise ValueError(f"anchor_loss must be 'nll' or 'kl', not {self.anchor_loss!r}")
        if self.anchor_side not in ("sft", "pcgrad"):
            raise ValueError(f"anchor_side must be 'sft' or 'pcgrad', not {self.anchor_side!r}")
        if self.anchor_points not in ("both", "first"):
            raise ValueError(f"anchor_points must be 'both' or 'first', not {self.anchor_points!r}")
        if self.lr_schedule not in ("constant", "linear"):
            raise ValueError(f"lr_schedule must be 'constant' or 'linear', not {self.lr_schedule!r}")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        if not 0 < self.learned_share <= 1:
            raise ValueError(f"learned_share must be in (0, 1], not {self.learned_share}")
        if not (math.isfinite(self.sam_last) and 0 < self.sam_last <= 1):
            raise ValueError(f"sam_last must be in (0, 1], not {self.sam_last}")
        if not 0 <= self.collapse_share < 1:
            raise ValueError(f"collapse_share must be in [0, 1), not {self.collapse_share}")
        for name, low, above in (("lr", 0.0, True), ("beta", 0.0, True), ("rho", 0.0, False), ("lam", 0.0, False),
                                 ("weight_decay", 0.0, False), ("lora_dropout", 0.0, False),
                                 ("anchor_weight", 0.0, False), ("sam_reuse_alpha", 0.0, False)):
            value = getattr(self, name)
            if not math.isfinite(value) or (value <= low if above else value < low):
                raise ValueError(f"{name} must be a finite number {'>' if above else '>='} {low:g}, not {value}")
        if not self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be < 1, not {self.lora_dropout}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0 or None, not {self.max_grad_norm}")

    @property
    def variant(self) -> str:
        if not (self.use_dpo or self.use_sam):
            return "lora"
        parts = ["sft"] + (["dpo"] if self.use_dpo else []) + (["sam"] if self.use_sam else [])
        if self.pcgrad:
            parts.append(f"pcgrad-{self.pcgrad}")
        return "+".join(parts)


def attach_lora(model: torch.nn.Module, cfg: CorsaConfig) -> torch.nn.Module:
    """Wrap a transformers model in a fresh PEFT LoRA adapter on every projection the model has."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in cfg.target_modules if t in present]
    if not targets:
        raise ValueError(f"none of the LoRA target modules {cfg.target_modules} exist in this model")
    torch.manual_seed(cfg.seed)  # LoRA A is randomly initialised; B = 0 keeps the start equal to the base model
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The layers carrying the default LoRA adapter, by their path in the plain model (PEFT prefixes
    'base_model.model.'); each has lora_A, lora_B and scaling keyed by adapter name."""
    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules()
            if hasattr(m, "lora_A") and "default" in m.lora_A}


@dataclass
class Pair:
    """One edit as token ids, plus the reference log-probs cached once per update."""

    prompt: list[int]
    new: list[int]
    old: list[int] | None  # None: no old answer to push down (it already contained the new one)
    ref_new: float = 0.0
    ref_old: float = 0.0
    anchors: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (prompt, answer to keep) ids
    # With anchor_loss="kl", each anchor's reference at its answer positions (losses.top_k_reference: top log-probs
    # [T, k], their ids [T, k], the rest's log-mass [T]), in the order of `anchors`.
    anchor_refs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    contexts: list[list[int]] = field(default_factory=list)  # the prompt behind each context prefix, as ids

    @property
    def n_sft_tokens(self) -> int:
        """The new-answer tokens L_SFT averages over for this edit: after its prompt and after each context."""
        return len(self.new) * (1 + len(self.contexts))


@dataclass
class Grads:
    """The gradients of one batch: SFT and DPO separately (for PCGrad) or only their weighted sum."""

    sft: list[torch.Tensor] | None
    dpo: list[torch.Tensor] | None
    total: list[torch.Tensor] | None
    stats: dict[str, float] = field(default_factory=dict)
    exact: dict[int, bool] = field(default_factory=dict)  # pair index -> new answer fully argmax
    anchor: list[torch.Tensor] | None = None  # grad L_anchor on its own (anchor_side="pcgrad")


@dataclass
class HeldAnchor:
    """anchor_points="first": the anchors' gradient taken at phi, kept for phi~ within one step."""

    grad: list[torch.Tensor] | None = None


@dataclass
class SamMemory:
    """What a cheaper step (`sam_every` > 1) carries between steps: the orthogonal part of the last SAM direction."""

    g_v: list[torch.Tensor] | None = None
    steps: int = 0


def algorithm_1_step(gradients: Callable[[], Grads], params: list[torch.Tensor], opt: torch.optim.Optimizer,
                     cfg: CorsaConfig, memory: SamMemory | None = None,
                     sam_now: bool = True) -> tuple[dict[str, float], Grads]:
    """One iteration of CoRSA, the paper's Algorithm 1 (appendix C.2). `gradients()` evaluates line 3's two
    gradients on this iteration's minibatch (line 2) at the parameters' current values.

         3  g_SFT <- grad L_SFT(phi; B_new),   g_DPO <- grad L_DPO(phi; B_pairs, theta, beta)
       4-8  PCGrad at phi: dp <- g_SFT . g_DPO; if dp < 0, project g_SFT off g_DPO, then g_DPO off the
            projected g_SFT (the same dp); g_PC <- g_1 + lambda g_2
         9  eps <- rho g_PC / (||g_PC|| + eps0),   phi~ <- phi + eps
        10  g~_SFT, g~_DPO at phi~
     11-15  PCGrad at phi~: g~_PC <- g~_1 + lambda g~_2
        16  phi <- phi - eta g~_PC     (from phi itself; clipped and taken by AdamW, as in the paper's runs)

    Switches give the paper's ablations: use_sam=False skips lines 9-15 (the step uses g_PC), pcgrad=None adds
    the gradients unchanged, use_dpo=False leaves the one objective of LoRA-SFT. With sam_every = k > 1 (and a
    `memory`), lines 9-15 run on every k-th step only; the steps between use LookSAM's reuse of the last
    perturbed direction (corsa.optim.sam.reuse_direction). sam_now=False makes this one step plain (`sam_last`).
    Returns the step's statistics and line 3's gradients (whose `exact` says which edits the batch already
    reproduces).
    """
    g = gradients()  # line 3
    d, info = merged_direction(g, cfg)  # lines 4-8
    record = {**g.stats, **info}
    use_sam = cfg.use_sam and sam_now
    reuse = memory if use_sam and cfg.sam_every > 1 else None
    if reuse is not None and reuse.g_v is not None and reuse.steps % cfg.sam_every:
        d = sam.reuse_direction(d, reuse.g_v, cfg.sam_reuse_alpha)
        record["sam_reused"] = 1.0
    elif use_sam:
        plain = d
        saved = sam.perturb(params, d, cfg.rho, cfg.sam_eps)  # line 9
        g_tilde = gradients()  # line 10
        d, info_tilde = merged_direction(g_tilde, cfg)  # lines 11-15
        sam.restore(params, saved)  # back to phi exactly, so line 16 starts from it
        record.update({f"perturbed_{k}": v for k, v in {**g_tilde.stats, **info_tilde}.items()
                       if k in ("sft_loss", "dpo_loss", "grad_cos", "conflict")})
        if reuse is not None:
            reuse.g_v = sam.orthogonal_part(d, plain)
    if memory is not None:
        memory.steps += 1
    for p, x in zip(params, d):  # line 16
        p.grad = x.to(p.dtype)
    if cfg.max_grad_norm:
        record["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return record, g


def merged_direction(g: Grads, cfg: CorsaConfig) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Algorithm 1 lines 4-8 (and 11-15): the PCGrad-merged direction, or the plain gradient of L; then, with
    anchor_side="pcgrad", that direction and the anchors' gradient resolved by PCGrad too."""
    info: dict[str, float] = {}
    if g.total is not None:
        d = g.total
    else:
        assert g.sft is not None and g.dpo is not None
        d, conflict = pcgrad.combine(g.sft, g.dpo, cfg.lam, cfg.pcgrad, cfg.pcgrad_eps)
        info = {"grad_cos": cosine(g.sft, g.dpo), "conflict": float(conflict)}
    if g.anchor is not None:
        info["anchor_cos"] = cosine(d, g.anchor)
        d, conflict = pcgrad.project_pair(d, g.anchor, cfg.anchor_weight, cfg.pcgrad_eps)
        info["anchor_conflict"] = float(conflict)
    return d, info


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(pcgrad.dot(a, b) / (pcgrad.dot(a, a).sqrt() * pcgrad.dot(b, b).sqrt() + 1e-30))


@dataclass(frozen=True)
class PairBatch:
    """Pairs as the rows of one SharedBatch: every prompt runs once, its y+ and y- after it. Which row holds
    whose answer is recorded here, so the losses never depend on an order convention.

    The pairs' anchors are a batch of their own, run by a second forward pass. In one shared batch every backward
    pass would run over every row: L_SFT's and L_DPO's over the anchors' tokens (most of a batch's tokens, at 16
    per answer and several anchors per edit) and L_anchor's over the edits', for gradients that are zero there.
    Apart, each backward covers only the tokens its loss reads; the gradients are the same sums."""

    batch: SharedBatch
    pairs: list[int]  # the pairs in the batch; pairs[k]'s y+ is row new_rows[k]
    new_rows: torch.Tensor
    dpo_pairs: list[int]  # the pairs that also have a y- to push down; dpo_pairs[k]'s y- is row old_rows[k]
    dpo_new_rows: torch.Tensor  # and its y+ row
    old_rows: torch.Tensor
    context_rows: torch.Tensor  # the rows of y+ after the pairs' prompts in context (corsa.contexts)
    anchors: SharedBatch | None = None  # each of the pairs' anchors as one row, with the answer it must keep
    # anchor_loss="kl": the reference at every anchor answer token, in the anchor batch's token order
    # (Pair.anchor_refs)
    anchor_refs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def to(self, device: torch.device) -> PairBatch:
        refs = None if self.anchor_refs is None else tuple(t.to(device) for t in self.anchor_refs)
        return PairBatch(self.batch.to(device), self.pairs, self.new_rows.to(device), self.dpo_pairs,
                         self.dpo_new_rows.to(device), self.old_rows.to(device), self.context_rows.to(device),
                         None if self.anchors is None else self.anchors.to(device), refs)  # type: ignore[arg-type]


def pair_batch(pairs: list[Pair], idx: list[int], use_dpo: bool, pad_id: int, anchors: bool = True) -> PairBatch:
    """The pairs `idx` as one batch (one forward pass for every y+, y- and context copy), and their anchors as
    another (unless `anchors` is False: their gradient is held from phi). Prompts: the pairs', then their context
    copies'; rows: y+, y-, context copies' y+."""
    dpo = [i for i in idx if use_dpo and pairs[i].old is not None]
    answers = [(k, pairs[i].new) for k, i in enumerate(idx)]
    answers += [(idx.index(i), pairs[i].old) for i in dpo]  # type: ignore[misc]
    copies = [(c, pairs[i].new) for i in idx for c in pairs[i].contexts]
    answers += [(len(idx) + k, new) for k, (_, new) in enumerate(copies)]
    batch = make_shared_batch([pairs[i].prompt for i in idx] + [c for c, _ in copies], answers, pad_id)
    first_copy = len(idx) + len(dpo)
    kept = [a for i in idx for a in pairs[i].anchors] if anchors else []
    anchor_batch = make_shared_batch([prompt for prompt, _ in kept], [(k, answer) for k, (_, answer)
                                                                      in enumerate(kept)], pad_id) if kept else None
    # anchor rows are in order and each row's tokens are in order, so their references concatenate in step
    refs = [r for i in idx for r in pairs[i].anchor_refs] if anchors else []
    anchor_refs = tuple(torch.cat(parts) for parts in zip(*refs)) if refs else None
    return PairBatch(batch, list(idx), torch.arange(len(idx)), dpo, torch.tensor([idx.index(i) for i in dpo],
                     dtype=torch.long), torch.arange(len(idx), first_copy),
                     torch.arange(first_copy, first_copy + len(copies)), anchor_batch,
                     anchor_refs)  # type: ignore[arg-type]


@dataclass
class BatchLosses:
    """One micro-batch's share of the batch losses (already divided by the whole batch's counts)."""

    sft: torch.Tensor  # the SFT side: L_SFT, plus anchor_weight * L_anchor when anchors enter there
    dpo: torch.Tensor | None
    stats: dict[str, float]
    exact: dict[int, bool]  # pair -> its new answer is the argmax at every token
    anchor: torch.Tensor | None = None  # L_anchor on its own (anchor_side="pcgrad")


def batch_losses(model: torch.nn.Module, pb: PairBatch, pairs: list[Pair], cfg: CorsaConfig, n_tokens: int,
                 n_pairs: int, n_batch: int, n_anchor_tokens: int = 0, apart: bool = False) -> BatchLosses:
    """L_SFT and L_DPO (paper eqs. 2-3) of one micro-batch, as its share of the batch means: n_tokens new-answer
    tokens, n_pairs DPO pairs and n_batch edits in the whole batch, so micro-batches add up to the batch; and,
    with anchors, L_anchor over the batch's n_anchor_tokens kept-answer tokens, added to the SFT side or returned
    on its own (`anchor_side`, or `apart`: its gradient is held for the perturbed point)."""
    batch = pb.batch
    with autocast_context(batch.targets.device, cfg.bf16):
        full = answer_log_softmax(model, batch)
    tok_logp, top = at_targets(full, batch)
    seq_logp = sum_by_row(tok_logp, batch)
    is_new = torch.zeros(batch.n_rows, dtype=torch.bool, device=batch.rows.device)
    is_new[pb.new_rows] = True
    is_new[pb.context_rows] = True  # a context copy's y+ is more of L_SFT (n_tokens counts its tokens)
    sft = losses.sft_loss(tok_logp[is_new[batch.rows]], n_tokens)
    misses = sum_by_row((top != batch.targets).long(), batch)
    stats = {"sft_loss": sft.item(), "logp_new": seq_logp[pb.new_rows].sum().item() / n_batch}
    exact = {i: bool(misses[row] == 0) for i, row in zip(pb.pairs, pb.new_rows.tolist())}
    anchor = None
    if pb.anchors is not None:
        with autocast_context(batch.targets.device, cfg.bf16):
            kept = answer_log_softmax(model, pb.anchors)
        if cfg.anchor_loss == "kl":
            assert pb.anchor_refs is not None, "anchor_loss='kl' needs the anchors' references (build_trainer)"
            anchor = losses.top_k_kl(kept, *pb.anchor_refs, n_positions=n_anchor_tokens)
        else:
            anchor = losses.sft_loss(at_targets(kept, pb.anchors)[0], n_anchor_tokens)
        stats["anchor_loss"] = anchor.item()
        if cfg.anchor_side == "sft" and not apart:
            sft, anchor = sft + cfg.anchor_weight * anchor, None
    if not pb.dpo_pairs:
        return BatchLosses(sft, None, stats, exact, anchor)
    ref_new = torch.tensor([pairs[i].ref_new for i in pb.dpo_pairs], device=seq_logp.device)
    ref_old = torch.tensor([pairs[i].ref_old for i in pb.dpo_pairs], device=seq_logp.device)
    pol_new, pol_old = seq_logp[pb.dpo_new_rows], seq_logp[pb.old_rows]
    dpo = losses.dpo_loss(pol_new, pol_old, ref_new, ref_old, cfg.beta, n_pairs)
    stats.update(dpo_loss=dpo.item(), logp_old=pol_old.sum().item() / n_pairs,
                 dpo_margin=losses.dpo_margin(pol_new, pol_old, ref_new, ref_old).sum().item() / n_pairs)
    return BatchLosses(sft, dpo, stats, exact, anchor)


class CorsaTrainer:
    """Trains the trainable (LoRA) parameters of `model` on `pairs` with Algorithm 1 (`algorithm_1_step`)."""

    def __init__(self, model: torch.nn.Module, pairs: list[Pair], cfg: CorsaConfig, pad_id: int):
        self.model, self.pairs, self.cfg, self.pad_id = model, pairs, cfg, pad_id
        self.params = [p for p in model.parameters() if p.requires_grad]
        # the anchors' gradient is taken on its own (anchor_side="pcgrad") only when some edit has anchors; every
        # process decides from all the pairs, so all reduce the same gradients
        self.has_anchors = any(p.anchors for p in pairs)
        self.anchor_apart = cfg.anchor_side == "pcgrad" and self.has_anchors
        self.device = self.params[0].device
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sam_memory = SamMemory()
        # The first step that runs SAM (`sam_last`; 0 unless that is below 1), fixed by the config and the edits.
        shortest = cfg.min_epochs if cfg.stop_when_learned else cfg.epochs
        self.sam_start = math.floor((1 - cfg.sam_last) * shortest * math.ceil(len(pairs) / cfg.batch_size))
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.collapse: dict[str, Any] | None = None  # set when the divergence guard stopped training
        self.timings: dict[str, float] = {}  # set by build_trainer
        self.anchors: list[dict[str, Any]] = []  # set by build_trainer: what each edit's anchors keep
        self.contexts: list[str] = []  # set by build_trainer: the context prefixes every edit is also trained behind

    def gradients(self, idx: list[int], held: HeldAnchor | None = None) -> Grads:
        """grad L_SFT and grad L_DPO over the batch `idx` (Algorithm 1 lines 3 and 10), or their weighted sum
        when PCGrad is off.

        With `held` (anchor_points="first"), the anchors' gradient is taken on the first call and kept in it; a
        later call runs no anchor pass and uses the kept one, where `anchor_side` says it enters.

        The batch is cut into micro-batches (memory only: each adds its share of the batch means, so the result
        does not depend on their size), each gives both gradients from one forward and two backward passes, and
        under torchrun each process takes a shard of the batch and the sums are all-reduced here, before PCGrad
        and SAM see them, so any number of processes gives the one-process result.
        """
        cfg = self.cfg
        separate = cfg.use_dpo and cfg.pcgrad is not None
        # with a held gradient at phi~ no anchor pass runs, so no anchor gradient is taken or reduced there
        reuse = held is not None and held.grad is not None
        apart = (self.anchor_apart or held is not None) and not reuse
        names = (["sft", "dpo"] if separate else ["total"]) + (["anchor"] if apart else [])
        n_tokens = sum(self.pairs[i].n_sft_tokens for i in idx)
        n_pairs = sum(1 for i in idx if cfg.use_dpo and self.pairs[i].old is not None)
        n_anchor_tokens = sum(len(answer) for i in idx for _, answer in self.pairs[i].anchors)
        acc: dict[str, list[torch.Tensor]] = {}
        stats = {"sft_loss": 0.0, "dpo_loss": 0.0, "logp_new": 0.0, "logp_old": 0.0, "dpo_margin": 0.0,
                 "anchor_loss": 0.0}
        exact: dict[int, bool] = {}
        local = distributed.shard(idx)
        size = cfg.micro_batch_size or len(idx)
        for start in range(0, len(local), size):
            pb = pair_batch(self.pairs, local[start : start + size], cfg.use_dpo, self.pad_id,
                            anchors=not reuse).to(self.device)
            part = batch_losses(self.model, pb, self.pairs, cfg, n_tokens, n_pairs, len(idx), n_anchor_tokens,
                                apart=held is not None)
            for k, v in part.stats.items():
                stats[k] += v
            exact.update(part.exact)
            if separate:
                wanted = {"sft": part.sft, "dpo": part.dpo}
            else:
                wanted = {"total": part.sft if part.dpo is None else part.sft + cfg.lam * part.dpo}
            if apart:
                wanted["anchor"] = part.anchor
            present = [k for k, v in wanted.items() if v is not None]
            for n, name in enumerate(present):
                g = torch.autograd.grad(wanted[name], self.params, retain_graph=n < len(present) - 1,
                                        allow_unused=True)
                g = [torch.zeros_like(p) if x is None else x for p, x in zip(self.params, g)]
                acc[name] = g if name not in acc else pcgrad.add(acc[name], g)
        for name in names:  # every process reduces the same list, even when its shard had nothing for one of them
            if name not in acc:
                acc[name] = [torch.zeros_like(p) for p in self.params]
        flat = distributed.all_reduce_sum([g for name in names for g in acc[name]])
        grads = {name: flat[k * len(self.params) : (k + 1) * len(self.params)] for k, name in enumerate(names)}
        stats = distributed.all_reduce_stats(stats, self.device)
        exact = distributed.merge_dicts(exact)
        anchor = grads.get("anchor")
        if held is not None:
            if held.grad is None:
                held.grad = anchor
            anchor = held.grad
            if cfg.anchor_side == "sft":  # g_SFT <- g_SFT + anchor_weight * grad L_anchor, as when it is summed
                side = "sft" if separate else "total"
                grads[side] = pcgrad.add(grads[side], anchor, cfg.anchor_weight)
                anchor = None
        if separate:
            return Grads(grads["sft"], grads["dpo"], None, stats, exact, anchor)
        return Grads(None, None, grads["total"], stats, exact, anchor)

    def step(self, idx: list[int], step: int = 0) -> dict[str, float]:
        """Optimizer step number `step` on the batch `idx`."""
        cfg = self.cfg
        held = HeldAnchor() if cfg.anchor_points == "first" and self.has_anchors else None
        record, g = algorithm_1_step(lambda: self.gradients(idx, held), self.params, self.opt, cfg,
                                     self.sam_memory, sam_now=step >= self.sam_start)
        record["loss"] = record["sft_loss"] + cfg.anchor_weight * record["anchor_loss"] + cfg.lam * record["dpo_loss"]
        record["margin"] = record["logp_new"] - record["logp_old"] if cfg.use_dpo else 0.0
        self.last_exact = g.exact
        return record

    def _lr_at(self, step: int) -> float:
        cfg = self.cfg
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "linear":
            total = cfg.epochs * math.ceil(len(self.pairs) / cfg.batch_size)
            return cfg.lr * max(0.0, (total - step) / max(1, total - cfg.warmup_steps))
        return cfg.lr

    def train(self, progress: bool = True) -> list[dict[str, float]]:
        with compute_context(self.model, self.cfg.bf16):
            return self._train(progress)

    def _train(self, progress: bool) -> list[dict[str, float]]:
        cfg, n = self.cfg, len(self.pairs)
        steps_per_epoch = math.ceil(n / cfg.batch_size)
        curves: list[dict[str, float]] = []
        learned: dict[int, bool] = {}
        streak = 0
        # disable=None: a bar only on a terminal, so a piped or logged run's stderr holds only what matters
        bar = tqdm(total=cfg.epochs * steps_per_epoch, disable=None if progress and distributed.is_main() else True,
                   desc=cfg.variant, unit="step", dynamic_ncols=True)
        step = 0
        t0 = time.perf_counter()
        # Each edit is checked by the forward pass of its step, before that step's update, so the share learned in
        # epoch e describes the adapter as epoch e found it: the one saved at the end of epoch e - 1 (`pending`).
        # Scoring each saved adapter by the next epoch's checks keeps the guard from restoring the very update that
        # broke the run. The adapter as it came in (an earlier update's, or fresh) is scored by epoch 0.
        pending = self._snapshot()
        best_share, best_epochs, best_params = 0.0, 0, pending
        for epoch in range(cfg.epochs):
            self.model.train()
            order = torch.randperm(n, generator=self.generator).tolist()
            finite = True
            for b in range(steps_per_epoch):
                for group in self.opt.param_groups:
                    group["lr"] = self._lr_at(step)
                record = self.step(order[b * cfg.batch_size : (b + 1) * cfg.batch_size], step)
                learned.update(self.last_exact)
                record.update(step=step, epoch=epoch, lr=self._lr_at(step),
                              learned=sum(learned.values()) / n, time_s=time.perf_counter() - t0)
                curves.append(record)
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", margin=f"{record['margin']:.2f}",
                                learned=f"{record['learned']:.0%}")
                finite = math.isfinite(record["loss"])
                if not finite:
                    break
            share = sum(learned.values()) / n
            if collapsed(share, best_share, finite, cfg.collapse_share):
                sam.restore(self.params, best_params)  # the same exact copy-back that undoes a SAM ascent
                self.collapse = {"epoch": epoch, "step": step - 1, "share": share,
                                 "loss": record["loss"] if finite else None,  # the manifest is strict JSON
                                 "restored_after_epochs": best_epochs, "restored_share": best_share}
                if not bar.disable:  # else the caller reports it from info["collapse"]
                    tqdm.write(f"training diverged in epoch {epoch + 1} (loss {record['loss']:.3g}, {share:.0%} of "
                               f"the edits learned, best {best_share:.0%}); stopped and restored the adapter "
                               + (f"as it was after epoch {best_epochs}" if best_epochs else "it started from"),
                               file=sys.stderr)
                break
            if share >= best_share:  # ties go to the later adapter: more of the paraphrases are learned by then
                best_share, best_epochs, best_params = share, epoch, pending
            pending = self._snapshot()
            streak = streak + 1 if learned_enough(learned, n, cfg.learned_share) else 0
            if cfg.stop_when_learned and epoch + 1 >= cfg.min_epochs and streak >= cfg.patience:
                break
        bar.close()
        self.model.eval()
        return curves

    def _snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]


def collapsed(share: float, best_share: float, finite: bool, keep: float) -> bool:
    """Whether training has diverged: a loss that is not finite, or an epoch ending with under `keep` of the best
    learned share so far, once at least half of the edits had been learned (keep = 0: the share test is off)."""
    if not finite:
        return True
    return keep > 0 and best_share >= 0.5 and share < keep * best_share


def learned_enough(learned: dict[int, bool], n: int, share: float) -> bool:
    """Whether every one of the n edits has been checked and at least `share` of them were exact at their latest
    check (each edit is checked when its batch is trained)."""
    # ceil, so that 0.95 of 64 edits asks for 61 (60.8 rounded up); the epsilon keeps a product that floats make
    # a hair too big (0.95 * 100 = 95.00000000000001) from asking for 96
    needed = math.ceil(share * n - 1e-9)
    return len(learned) == n and sum(learned.values()) >= needed


def build_pairs(formatter: Formatter, requests: list[EditRequest]) -> list[Pair]:
    pairs = []
    for r in requests:
        # An old answer that already contains the new one (say, mined from a model that knows it) would make
        # DPO push the new answer down; such an edit is trained with SFT only.
        usable_old = r.target_old is not None and not contains(r.target_old, r.target_new)
        pairs.append(Pair(formatter.prompt_ids(r.prompt), formatter.answer_ids(r.target_new),
                          formatter.answer_ids(r.target_old) if usable_old else None))  # type: ignore[arg-type]
    return pairs


def cache_reference(model: torch.nn.Module, formatter: Formatter, requests: list[EditRequest], pairs: list[Pair],
                    autocast: bool = False) -> None:
    """Reference log-probs of y+ and y-, once per update, from the model as it is before this update starts."""
    items = [(r.prompt, r.target_new) for r in requests]
    with_old = [i for i, p in enumerate(pairs) if p.old is not None]
    items += [(requests[i].prompt, requests[i].target_old) for i in with_old]  # type: ignore[misc]
    model.eval()
    scores = score_answers(model, formatter, items, autocast=autocast)
    for p, s in zip(pairs, scores):
        p.ref_new = s.logprob
    for i, s in zip(with_old, scores[len(pairs):]):
        pairs[i].ref_old = s.logprob


def build_trainer(model: torch.nn.Module, formatter: Formatter, requests: list[EditRequest],
                  cfg: CorsaConfig) -> CorsaTrainer:
    """Everything before the first step, in one place: a fresh LoRA adapter (or the one `model` already carries,
    which a later update continues), the edits as token pairs, the DPO reference log-probs from the model as it
    is now, and the trainer. `trainer.model` is the model being trained."""
    t = time.perf_counter()
    # Anchors are answered first, by the model as it is before this update (the fresh adapter's B = 0 would give
    # the same answers; a continued one is part of "before").
    kept = answer_anchors(model, formatter, requests, cfg) if cfg.anchors_per_edit or cfg.relation_anchors else []
    refs = anchor_references(model, formatter, kept, cfg) if cfg.anchor_loss == "kl" else []
    anchors_s = time.perf_counter() - t
    t = time.perf_counter()
    texts = contexts.prefixes(model, formatter.tokenizer, cfg.contexts_per_edit, cfg.context_tokens, cfg.seed)
    contexts_s = time.perf_counter() - t
    t = time.perf_counter()
    if not hasattr(model, "peft_config"):
        model = attach_lora(model, cfg)
    pairs = build_pairs(formatter, requests)
    for k, item in enumerate(kept):
        pairs[item["edit"]].anchors.append((formatter.prompt_ids(item["prompt"]), formatter.answer_ids(item["answer"])))
        if refs:
            pairs[item["edit"]].anchor_refs.append(refs[k])
            # recorded so a run shows how much of the reference the top-k KL leaves to its "rest" outcome
            item["reference_rest_mass"] = round(float(refs[k][2].exp().mean()), 6)
    for pair, r in zip(pairs, requests):
        pair.contexts = [formatter.prompt_ids(contexts.in_context(text, r.prompt)) for text in texts]
    setup_s = time.perf_counter() - t
    t = time.perf_counter()
    if cfg.use_dpo:
        cache_reference(model, formatter, requests, pairs, cfg.bf16)
    trainer = CorsaTrainer(model, pairs, cfg, formatter.pad_id)
    trainer.timings = {"setup_s": setup_s, "reference_s": time.perf_counter() - t, "anchors_s": anchors_s,
                       "contexts_s": contexts_s}
    trainer.anchors = kept
    trainer.contexts = texts
    return trainer


def answer_anchors(model: torch.nn.Module, formatter: Formatter, requests: list[EditRequest],
                   cfg: CorsaConfig) -> list[dict[str, Any]]:
    """Each edit's anchors (corsa.anchors.build) with the answer the model gives them now: what training keeps.
    An anchor answered with nothing is dropped, and so is a question about the edit's own subject whose answer
    holds the edit's old or new answer: it asks the edited fact in other words, and keeping it would fight the
    edit."""
    sets = anchors.build(requests, cfg.anchors_per_edit, cfg.seed, cfg.relation_anchors)
    items = [(i, a) for i, s in enumerate(sets) for a in s]
    model.eval()
    answers = current_answers(model, formatter, [a.prompt for _, a in items], max_new_tokens=cfg.anchor_tokens,
                              autocast=cfg.bf16) if items else []
    return [{"edit": i, "prompt": a.prompt, "source": a.source, "answer": answer}
            for (i, a), answer in zip(items, answers)
            if answer and not (a.source == "relation-swap" and asks_the_edit(answer, requests[i]))]


def asks_the_edit(answer: str, request: EditRequest) -> bool:
    return any(t is not None and contains(answer, t) for t in (request.target_old, request.target_new))


@torch.no_grad()
def anchor_references(model: torch.nn.Module, formatter: Formatter, kept: list[dict[str, Any]], cfg: CorsaConfig,
                      chunk: int = 16) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For anchor_loss="kl": the model's next-token distribution, as it is before this update, at every position of
    each anchor's kept answer, reduced to what losses.top_k_kl needs (kept on the CPU, moved with each batch)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(kept), chunk):
        items = kept[start : start + chunk]
        batch = make_shared_batch([formatter.prompt_ids(a["prompt"]) for a in items],
                                  [(k, formatter.answer_ids(a["answer"])) for k, a in enumerate(items)],
                                  formatter.pad_id).to(device)
        with autocast_context(device, cfg.bf16):
            full = answer_log_softmax(model, batch)
        sizes = batch.tokens_per_row.tolist()  # a row's tokens are consecutive: one slice per anchor
        parts = [t.cpu().split(sizes) for t in losses.top_k_reference(full, ANCHOR_KL_TOP)]
        out += list(zip(*parts))
    return out


class CorsaEditor:
    """Editor protocol implementation: attach (or continue) a LoRA adapter and train it with CoRSA."""

    name = "corsa"

    def __init__(self, config: CorsaConfig | None = None):
        self.config = config or CorsaConfig()

    def edit(self, model: torch.nn.Module, formatter: Formatter, requests: list[EditRequest], *,
             progress: bool = True) -> EditResult:
        cfg = self.config
        trainer = build_trainer(model, formatter, requests, cfg)
        t = time.perf_counter()
        curves = trainer.train(progress)
        timings = {**trainer.timings, "train_s": time.perf_counter() - t}
        info: dict[str, Any] = {"timings": timings, "steps": len(curves),
                                "epochs_run": (curves[-1]["epoch"] + 1) if curves else 0,
                                "variant": cfg.variant, "config": asdict(cfg), "collapse": trainer.collapse,
                                "bf16_used": use_bf16(trainer.device, cfg.bf16), "anchors": trainer.anchors,
                                "contexts": trainer.contexts}
        return EditResult(model=trainer.model, requests=requests, curves=curves, info=info)


# Flags of what this trainer adds to the paper (anchors, context copies), for every method it trains (corsa, lora).
EXTRA_OPTIONS = (
    Option("--anchors", "anchors_per_edit", "anchor prompts per edit kept at the model's own answers (neighbourhood "
           "given, subject swapped, general questions; default: the --preset's, paper: 0)", type=int),
    Option("--relation-anchors", "relation_anchors", "more anchors per edit that ask other relations of the "
           "edit's subject, kept at the model's own answers (default: the --preset's, paper: 0)", type=int),
    # After both counts: flags apply in declared order, so this switch wins over either of them.
    Option("--no-anchors", "anchors_per_edit", "train without anchors of either kind (as the paper)", value=0,
           also={"relation_anchors": 0}),
    Option("--anchor-weight", "anchor_weight", "weight of the anchors' loss (default 1)", type=float),
    Option("--anchor-loss", "anchor_loss", "how an anchor's answer is kept: nll of the model's own greedy answer "
           "or kl to its next-token distribution there (default: the --preset's, paper: nll)", type=str,
           choices=("nll", "kl")),
    Option("--anchor-side", "anchor_side", "where the anchors' loss enters Algorithm 1: added to the SFT side "
           "(default) or a third gradient under PCGrad", type=str, choices=("sft", "pcgrad")),
    Option("--anchor-points", "anchor_points", "cheaper step (opt-in, not yet measured): the anchors' gradient at "
           "both SAM points (default, as Algorithm 1 takes L's) or at the first only, reused at the second",
           type=str, choices=("both", "first")),
    Option("--contexts", "contexts_per_edit", "also train each edit's prompt behind this many short texts the "
           "model writes (ROME's context templates; default: the --preset's, paper: 0)", type=int),
)

EXTRA_SWEEPS = (Sweep("anchors", "anchors_per_edit", parse=int, form="<n>"), Sweep("anchorweight", "anchor_weight"),
                 Sweep("anchortokens", "anchor_tokens", parse=int, form="<n>"),
                 Sweep("relanchors", "relation_anchors", parse=int, form="<n>"),
                 Sweep("anchorloss", "anchor_loss", parse=one_of("nll", "kl"), form="<nll|kl>"),
                 Sweep("anchorside", "anchor_side", parse=one_of("sft", "pcgrad"), form="<sft|pcgrad>"),
                 Sweep("anchorpoints", "anchor_points", parse=one_of("both", "first"), form="<both|first>"),
                 Sweep("contexts", "contexts_per_edit", parse=int, form="<n>"))

register(MethodSpec(
    "corsa", CorsaConfig, CorsaEditor,
    help="CoRSA (default): SFT + DPO on a LoRA adapter with SAM and PCGrad (paper section 3)",
    options=(
        Option("--lambda", "lam", "corsa: weight of the DPO term (paper: 1.0); flearning: the forgetting "
               "coefficient", type=float),
        Option("--rho", "rho", "SAM radius (default: the --preset's; paper: 0.05)", type=float),
        Option("--beta", "beta", "DPO temperature (paper: 0.1)", type=float),
        Option("--pcgrad", "pcgrad", "PCGrad variant (default: paper, Algorithm 1)", type=str,
               choices=("paper", "official")),
        # Applied in this order, so a switch that drops PCGrad wins over --pcgrad.
        Option("--no-pcgrad", "pcgrad", "ablation: add the SFT and DPO gradients unchanged", value=None),
        Option("--no-dpo", "use_dpo", "ablation: SFT only (PCGrad then has nothing to resolve)", value=False,
               also={"pcgrad": None}),
        Option("--no-sam", "use_sam", "ablation: plain step instead of SAM", value=False),
        Option("--sam-last", "sam_last", "cheaper step (opt-in; measured in docs/PERFORMANCE.md): plain steps first, "
               "SAM only in this last share of training (default 1: every step, as the paper)", type=float),
        Option("--sam-every", "sam_every", "cheaper step (opt-in; measured in docs/PERFORMANCE.md): the SAM ascent "
               "every k steps, LookSAM's reuse of its direction in between (default 1: every step, as the paper)",
               type=int),
        *EXTRA_OPTIONS,
    ),
    # The paper's ablations (Table 9) and the PCGrad variant of the released code.
    variants={"corsa-no-sam": {"use_sam": False}, "corsa-no-dpo": {"use_dpo": False, "pcgrad": None},
              "corsa-no-pcgrad": {"pcgrad": None}, "corsa-official-pcgrad": {"pcgrad": "official"}},
    # Paper Figure 5 sweeps lambda; A.2 tunes rho.
    sweeps=(Sweep("lambda", "lam"), Sweep("rho", "rho"), Sweep("beta", "beta"),
            Sweep("samevery", "sam_every", parse=int, form="<k>"), Sweep("samlast", "sam_last"), *EXTRA_SWEEPS),
    continues=True,
    diagnostics=("bf16_used",),
))

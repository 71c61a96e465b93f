"""The two objectives of CoRSA (paper eq. 4), as pure functions of answer log-probabilities."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sft_loss(token_logprobs: torch.Tensor, n_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
    """Mean negative log-likelihood over all target tokens of the batch.

    `n_tokens` lets a micro-batch contribute its share of a larger batch's mean (gradient accumulation): pass the
    token count of the whole batch, and the micro-batch losses add up to the full-batch loss.
    """
    denom = token_logprobs.numel() if n_tokens is None else n_tokens
    return -token_logprobs.sum() / denom


def dpo_margin(policy_new: torch.Tensor, policy_old: torch.Tensor, ref_new: torch.Tensor,
               ref_old: torch.Tensor) -> torch.Tensor:
    """log [p(y+)/p_ref(y+)] - log [p(y-)/p_ref(y-)] per pair, from sequence log-probs summed over tokens."""
    return (policy_new - ref_new) - (policy_old - ref_old)


def dpo_loss(policy_new: torch.Tensor, policy_old: torch.Tensor, ref_new: torch.Tensor, ref_old: torch.Tensor,
             beta: float = 0.1, n_pairs: int | None = None) -> torch.Tensor:
    """Sigmoid DPO loss (Rafailov et al. 2023), beta = 0.1 as in TRL and the paper (appendix A.2).

    The mean is over pairs; `n_pairs` plays the same role as `n_tokens` in `sft_loss`.
    """
    losses = -F.logsigmoid(beta * dpo_margin(policy_new, policy_old, ref_new, ref_old))
    return losses.sum() / (losses.numel() if n_pairs is None else n_pairs)


def top_k_kl(logp: torch.Tensor, ref_top_logp: torch.Tensor, ref_top_ids: torch.Tensor,
             ref_rest_logp: torch.Tensor, n_positions: int | None = None) -> torch.Tensor:
    """KL(p_ref || p) at M answer positions, summed and divided by `n_positions` (default M).

    The reference is kept as its k most likely tokens at each position (`ref_top_logp`, `ref_top_ids`, [M, k]) and
    the log of the mass of all the others (`ref_rest_logp`, [M]): storing the full distribution would take
    vocabulary-size floats per anchor token. The KL is then the exact KL between the two distributions over k + 1
    outcomes (the k tokens, and "any other token"), which is at most the full KL and equals it when the rest holds
    no mass. `logp` is the model's full log-softmax at the same positions [M, V].
    """
    q_top = logp.gather(1, ref_top_ids)
    q_rest = rest_log_mass(logp, ref_top_ids)
    p_top = ref_top_logp.exp()
    p_rest = ref_rest_logp.exp()
    kl = (p_top * (ref_top_logp - q_top)).sum(dim=-1)
    # 0 log 0 = 0: a reference whose k tokens hold all its mass adds nothing for the rest (and no NaN from -inf)
    kl = kl + torch.where(p_rest > 0, p_rest * (ref_rest_logp - q_rest), torch.zeros_like(p_rest))
    return kl.sum() / (kl.numel() if n_positions is None else n_positions)


def top_k_reference(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `top_k_kl` keeps of a reference distribution [M, V]: its k most likely tokens' log-probs and ids, and
    the log of the mass of the others (rest_log_mass)."""
    k = min(k, logp.shape[-1])
    top_logp, top_ids = logp.topk(k, dim=-1)
    return top_logp, top_ids, rest_log_mass(logp, top_ids)


def rest_log_mass(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability of every token but `ids` [M, k], from log-probabilities [M, V]. The left-out tokens
    are set to the lowest finite float, not -inf: when `ids` cover the vocabulary the result is then a huge negative
    number (its exp is 0), and logsumexp over only -inf would give a NaN gradient even where the result is unused."""
    return logp.scatter(1, ids, torch.finfo(logp.dtype).min).logsumexp(dim=-1)

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

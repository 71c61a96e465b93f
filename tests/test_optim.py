"""Losses, PCGrad and SAM against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from corsa.optim import losses, pcgrad, sam


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def close(a, b, tol=1e-9):
    return all(torch.allclose(x, y, atol=tol) for x, y in zip(a, b))


# --- losses -----------------------------------------------------------------------------------------------
def test_sft_loss_is_mean_token_nll():
    # tokens with log-probs -1, -2, -3 -> mean NLL 2
    assert losses.sft_loss(t(-1, -2, -3)).item() == pytest.approx(2.0)
    # as a micro-batch share of a 6-token batch: 6/6 = 1
    assert losses.sft_loss(t(-1, -2, -3), n_tokens=6).item() == pytest.approx(1.0)


def test_dpo_loss_by_hand():
    # margin = (-1 - -2) - (-3 - -2) = 1 - (-1) = 2; loss = -log sigmoid(0.1 * 2) = log(1 + e^-0.2)
    loss = losses.dpo_loss(t(-1), t(-3), t(-2), t(-2), beta=0.1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.2)))
    # at the reference point the margin is 0 and the loss is log 2
    assert losses.dpo_loss(t(-5, -1), t(-4, -2), t(-5, -1), t(-4, -2)).item() == pytest.approx(math.log(2))


def test_dpo_gradient_pushes_new_up_and_old_down():
    new, old = t(-2.0).requires_grad_(), t(-1.0).requires_grad_()
    losses.dpo_loss(new, old, t(-2), t(-1)).backward()
    assert new.grad.item() < 0 < old.grad.item()  # descent raises log p(y+) and lowers log p(y-)


# --- PCGrad -----------------------------------------------------------------------------------------------
def test_paper_pcgrad_conflicting_2d():
    g_sft, g_dpo = [t(1, 0)], [t(-1, 1)]
    # dp = -1. g1 = (1,0) - (-1/2)(-1,1) = (0.5, 0.5).
    # g2 = (-1,1) - (-1/0.5)(0.5,0.5) = (-1,1) + (1,1) = (0, 2). Direction g1 + g2 = (0.5, 2.5).
    d, conflict = pcgrad.project_paper(g_sft, g_dpo, lam=1.0, eps=0.0)
    assert conflict
    assert close(d, [t(0.5, 2.5)])
    d2, _ = pcgrad.project_paper(g_sft, g_dpo, lam=2.0, eps=0.0)
    assert close(d2, [t(0.5, 4.5)])  # lambda weights the projected DPO gradient


def test_paper_pcgrad_non_conflicting_is_weighted_sum():
    d, conflict = pcgrad.project_paper([t(1, 0)], [t(1, 1)], lam=0.5)
    assert not conflict
    assert close(d, [t(1.5, 0.5)])


def test_official_pcgrad_conflicting_2d():
    # order [dpo, sft]: dpo (-1,1) . sft (1,0) = -1 < 0 -> dpo' = (-1,1) - (-1/1)(1,0) = (0,1);
    # then sft . dpo' = 0, no projection. Mean: ((0,1) + (1,0)) / 2 = (0.5, 0.5).
    d, conflict = pcgrad.project_official([t(1, 0)], [t(-1, 1)], lam=1.0, eps=0.0)
    assert conflict
    assert close(d, [t(0.5, 0.5)])


def test_official_pcgrad_non_conflicting_is_half_sum():
    d, conflict = pcgrad.project_official([t(1, 0)], [t(1, 1)], lam=1.0)
    assert not conflict
    assert close(d, [t(1.0, 0.5)])


def test_pcgrad_works_across_a_parameter_list():
    # the dot product is global over all tensors: (1)(-1) + (0)(1) = -1, same case as the 2-D one, split up
    d, _ = pcgrad.project_paper([t(1), t(0)], [t(-1), t(1)], eps=0.0)
    assert close(d, [t(0.5), t(2.5)])


def test_combine_without_pcgrad_is_the_plain_sum():
    d, conflict = pcgrad.combine([t(1, 0)], [t(-1, 1)], lam=2.0, mode=None)
    assert conflict and close(d, [t(-1, 2)])
    with pytest.raises(ValueError):
        pcgrad.combine([t(1)], [t(1)], 1.0, "nope")  # type: ignore[arg-type]


def test_pcgrad_pair_projects_each_off_the_others_original():
    # dp = (1,0).(-1,1) = -1. p1 = (1,0) + (1/2)(-1,1) = (0.5, 0.5); p2 = (-1,1) + (1/1)(1,0) = (0, 1).
    d, conflict = pcgrad.project_pair([t(1, 0)], [t(-1, 1)], weight=2.0, eps=0.0)
    assert conflict and close(d, [t(0.5, 2.5)])  # p1 + 2 p2
    d, conflict = pcgrad.project_pair([t(1, 0)], [t(1, 1)], weight=0.5)
    assert not conflict and close(d, [t(1.5, 0.5)])  # no conflict: the weighted sum


# --- the anchors' KL --------------------------------------------------------------------------------------
def test_top_k_kl_is_the_full_kl_when_k_covers_the_vocabulary_and_a_lower_bound_otherwise():
    torch.manual_seed(0)
    ref = torch.log_softmax(2 * torch.randn(5, 30), -1)
    x = torch.randn(5, 30, requires_grad=True)
    logp = torch.log_softmax(x, -1)
    full = (ref.exp() * (ref - logp)).sum() / 5
    exact = losses.top_k_kl(logp, *losses.top_k_reference(ref, 30))
    assert exact.item() == pytest.approx(full.item(), rel=1e-5)
    exact.backward()
    assert torch.isfinite(x.grad).all()  # an empty rest (k = V) gives no NaN gradient
    coarse = [losses.top_k_kl(logp, *losses.top_k_reference(ref, k)).item() for k in (10, 3)]
    assert 0 <= coarse[1] <= coarse[0] <= full.item() + 1e-6  # coarser outcomes lose information, never add it
    assert losses.top_k_kl(ref, *losses.top_k_reference(ref, 3)).item() == pytest.approx(0.0, abs=1e-6)
    top_logp, top_ids, rest = losses.top_k_reference(ref, 3)
    assert torch.allclose(torch.logaddexp(top_logp.logsumexp(-1), rest), torch.zeros(5), atol=1e-5)  # all mass
    assert losses.top_k_kl(logp, top_logp, top_ids, rest, n_positions=10).item() == pytest.approx(coarse[1] / 2)


# --- SAM --------------------------------------------------------------------------------------------------
def test_sam_perturb_and_exact_restore():
    params = [t(1.0, 2.0), t(3.0)]
    before = [p.clone() for p in params]
    direction = [t(3.0, 0.0), t(4.0)]  # norm 5
    saved = sam.perturb(params, direction, rho=0.05, eps=0.0)
    # eps = 0.05 * g / 5 = (0.03, 0), (0.04)
    assert close(params, [t(1.03, 2.0), t(3.04)])
    sam.restore(params, saved)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # bit-exact, not just close


def test_sam_zero_direction_does_nothing():
    params = [t(1.0)]
    assert sam.perturb(params, [t(0.0)], rho=0.05) is None
    assert torch.equal(params[0], t(1.0))
    sam.restore(params, None)


def test_looksam_orthogonal_part_and_reuse_by_hand():
    from corsa.optim.sam import orthogonal_part, reuse_direction

    g = [torch.tensor([3.0, 0.0])]
    g_sam = [torch.tensor([4.0, 2.0])]
    g_v = orthogonal_part(g_sam, g)  # (4, 2) minus its projection on (3, 0): (0, 2)
    assert torch.allclose(g_v[0], torch.tensor([0.0, 2.0]))
    step = reuse_direction([torch.tensor([1.0, 0.0])], g_v, alpha=0.5)  # g + 0.5 * (1 / 2) * (0, 2)
    assert torch.allclose(step[0], torch.tensor([1.0, 0.5]))
    assert torch.equal(reuse_direction(g, [torch.zeros(2)])[0], g[0])  # nothing to reuse: the plain gradient
    assert torch.equal(orthogonal_part(g_sam, [torch.zeros(2)])[0], torch.zeros(2))

"""AlphaEdit: the projector, the update that leaves preserved keys alone, the accumulation over updates, and the
method end to end on the tiny model."""

from __future__ import annotations

import torch
from conftest import make_model, make_tokenizer
from test_memit import EDITS, stats_data  # noqa: F401 -- the fixture, shared with MEMIT's tests

from corsa.methods import make_editor
from corsa.methods.alphaedit import null_space_projector, projected_update
from corsa.prompts import Formatter
from corsa.requests import EditRequest
from corsa.scoring import score_answers


def test_projector_spans_the_directions_the_statistics_leave_empty():
    basis = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))[0]
    c = basis @ torch.diag(torch.tensor([5.0, 3.0, 1.0, 1e-4, 0.0, 0.0])) @ basis.T
    p, rank = null_space_projector(c, 1e-2)
    assert rank == 3
    torch.testing.assert_close(p @ p, p, atol=1e-6, rtol=0)  # a projector
    torch.testing.assert_close(p @ basis[:, :3], torch.zeros(6, 3), atol=1e-6, rtol=0)  # kills used directions
    torch.testing.assert_close(p @ basis[:, 3:], basis[:, 3:], atol=1e-6, rtol=0)  # keeps the empty ones


def test_update_leaves_preserved_keys_alone_and_reaches_the_edited_ones():
    g = torch.Generator().manual_seed(1)
    used = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0]
    preserved = torch.randn(200, 4, generator=g, dtype=torch.float64) @ used[:, :4].T  # 4 of 8 directions
    c = preserved.T @ preserved / 200
    p, rank = null_space_projector(c, 1e-3)
    assert rank == 4
    k = torch.randn(2, 8, generator=g, dtype=torch.float64)  # two edits' keys
    resid = torch.randn(2, 3, generator=g, dtype=torch.float64)
    b, a = projected_update(k, resid, p, torch.zeros(8, 8, dtype=torch.float64), l2=1e-3)
    dw = b @ a  # [3, 8]
    torch.testing.assert_close(dw @ preserved.T, torch.zeros(3, 200, dtype=torch.float64), atol=1e-8, rtol=0)
    reached = dw @ k.T  # what the update adds at the edited keys, against the residuals it was asked for
    assert float(torch.nn.functional.cosine_similarity(reached.flatten(), resid.T.flatten(), dim=0)) > 0.9


def test_alphaedit_edits_and_accumulates_the_keys_of_earlier_updates(stats_data):  # noqa: F811
    tok = make_tokenizer()
    model, fmt = make_model(len(tok), layers=4), Formatter(tok)
    before = [s.logprob for s in score_answers(model, fmt, [(r.prompt, r.target_new) for r in EDITS])]
    editor = make_editor("alphaedit", layers=(1, 2), stats_data=stats_data, mom2_n_samples=30,
                         v_num_grad_steps=15, nullspace_threshold=1.0, l2=1e-2)
    result = editor.edit(model, fmt, list(EDITS), progress=False)
    after = [s.logprob for s in score_answers(result.model, fmt, [(r.prompt, r.target_new) for r in EDITS])]
    assert all(x > y + 1.0 for x, y in zip(after, before))
    ranks = result.info["null_space_rank"]
    assert set(ranks) == {"1", "2"} and all(0 < r <= 64 for r in ranks.values())
    assert result.info["key_dimensions"] == {"1": 64, "2": 64}
    first = {layer: kk.clone() for layer, kk in editor.prior.items()}
    assert set(first) == {1, 2} and all(float(kk.trace()) > 0 for kk in first.values())
    later = [EditRequest("the car of tim is", "bus", "van", subject="tim")]
    editor.edit(make_model(len(tok), layers=4), fmt, later, progress=False)
    assert all(float(editor.prior[layer].trace()) > float(first[layer].trace()) for layer in first)

"""L_OBJ, L_PATCH and the centers against straightforward float64 loops written from the formulas."""
from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from odis.losses import Centers, loss_obj, loss_patch, teacher_probs


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _ref_obj(s, t, center, tt, st_, valid_s, valid_t):
    """sum over (q, v != q, b) valid of CE(softmax((t-c)/tt), log_softmax(s/st)) / number of valid terms."""
    total, count = 0.0, 0
    for q in range(t.shape[0]):
        for v in range(s.shape[0]):
            if v == q:
                continue
            for b in range(s.shape[1]):
                if not (valid_t[q, b] and valid_s[v, b]):
                    continue
                p = _softmax((t[q, b] - center) / tt)
                logq = np.log(_softmax(s[v, b] / st_))
                total += -(p * logq).sum()
                count += 1
    return total / max(count, 1)


def _ref_patch(s, t, mask, center, tt, st_):
    """per image: sum over masked patches CE / max(#masked, 1); mean over all images of all views."""
    vals = []
    for v in range(mask.shape[0]):
        for b in range(mask.shape[1]):
            acc = 0.0
            for n in range(mask.shape[2]):
                if mask[v, b, n]:
                    p = _softmax((t[v, b, n] - center) / tt)
                    acc += -(p * np.log(_softmax(s[v, b, n] / st_))).sum()
            vals.append(acc / max(mask[v, b].sum(), 1))
    return float(np.mean(vals))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n_local=st.integers(0, 3), b=st.integers(1, 4), k=st.sampled_from([3, 16]))
def test_loss_obj_matches_loops(seed, n_local, b, k):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(2 + n_local, b, k)) * 3
    t = rng.normal(size=(2, b, k)) * 3
    center = rng.normal(size=(k,)) * 0.1
    valid_t = rng.random((2, b)) > 0.3
    valid_s = np.concatenate([valid_t, np.ones((n_local, b), bool)])
    tt, st_ = 0.04, 0.1
    tp = teacher_probs(torch.tensor(t), torch.tensor(center), tt).double()
    got = loss_obj(torch.tensor(s), tp, st_, torch.tensor(valid_s), torch.tensor(valid_t)).item()
    want = _ref_obj(s, t, center, tt, st_, valid_s, valid_t)
    assert math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-6)


def test_loss_obj_all_valid_is_ibot_pair_average():
    """With every sample valid: the mean over the 2*(2+L)-2 pairs of the per-pair batch mean (iBOT)."""
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 3, 8)), rng.normal(size=(2, 3, 8))
    tp = teacher_probs(torch.tensor(t), torch.zeros(8), 0.07)
    got = loss_obj(torch.tensor(s), tp, 0.1).item()
    logp = torch.log_softmax(torch.tensor(s) / 0.1, -1)
    terms = [(-(tp[q] * logp[v]).sum(-1)).mean() for q in range(2) for v in range(5) if v != q]
    assert len(terms) == 2 * 5 - 2
    assert math.isclose(got, float(sum(terms) / len(terms)), rel_tol=1e-6)


def test_invalid_sample_contributes_nothing_to_loss_obj():
    rng = np.random.default_rng(1)
    s = torch.tensor(rng.normal(size=(4, 3, 8)), requires_grad=True)
    tp = teacher_probs(torch.tensor(rng.normal(size=(2, 3, 8))), torch.zeros(8), 0.04)
    valid_t = torch.tensor([[True, False, True], [True, False, True]])
    valid_s = torch.cat([valid_t, torch.ones(2, 3, dtype=torch.bool)])
    loss_obj(s, tp, 0.1, valid_s, valid_t).backward()
    assert s.grad[:, 1].abs().max() == 0  # sample 1's object is in neither global view
    assert s.grad[:, 0].abs().max() > 0


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 3), n=st.integers(1, 6))
def test_loss_patch_matches_loops(seed, b, n):
    rng = np.random.default_rng(seed)
    k = 7
    s = rng.normal(size=(2, b, n, k)) * 2
    t = rng.normal(size=(2, b, n, k)) * 2
    mask = rng.random((2, b, n)) > 0.5
    center = rng.normal(size=(k,)) * 0.1
    m = torch.tensor(mask)
    tp = teacher_probs(torch.tensor(t)[m], torch.tensor(center), 0.07).double()
    got = loss_patch(torch.tensor(s)[m], tp, m, 0.1).item()
    want = _ref_patch(s, t, mask, center, 0.07, 0.1)
    assert math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-7)


def test_centers_ema():
    c = Centers(4, momentum=0.9)
    logits = torch.arange(8.0).reshape(2, 4)
    c.update(logits, logits[None])
    torch.testing.assert_close(c.obj, 0.1 * logits.mean(0, keepdim=True))
    torch.testing.assert_close(c.patch, 0.1 * logits.mean(0, keepdim=True))
    c.update(logits, None)
    torch.testing.assert_close(c.obj, (0.9 * 0.1 + 0.1) * logits.mean(0, keepdim=True))

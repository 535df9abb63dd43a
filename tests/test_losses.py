"""L_OBJ, L_PATCH and the centers against straightforward float64 loops written from the formulas."""
from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from odis.losses import Centers, koleo, loss_obj, loss_patch, sinkhorn_probs, teacher_probs


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


def test_losses_stay_float32_under_bf16_autocast():
    """The trainer runs the step under bf16 autocast; the losses must not (K = 8192: bf16 is ~0.3% off)."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 8, 8192, generator=g) * 3, torch.randn(2, 8, 8192, generator=g) * 3
    tp = teacher_probs(t, torch.zeros(8192), 0.04)
    want = loss_obj(s.double(), tp.double(), 0.1).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_obj(s, tp, 0.1)
    assert got.dtype == torch.float32
    assert math.isclose(got.item(), want, rel_tol=1e-5)


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
    # a batch with a non-finite logit (a step the trainer skips) leaves the center as it was
    before = c.obj.clone()
    c.update(logits.masked_fill(logits == 3, float("nan")), None)
    torch.testing.assert_close(c.obj, before)


def _ref_sinkhorn(t, temp, n_iter):
    """DINOv2's sinkhorn_knopp_teacher, transcribed in float64 numpy (Q is K x B there)."""
    q = np.exp(t / temp).T
    k, b = q.shape
    q /= q.sum()
    for _ in range(n_iter):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 12), k=st.sampled_from([2, 7, 32]),
       temp=st.sampled_from([0.02, 0.07, 1.0]), n_iter=st.integers(1, 4))
def test_sinkhorn_matches_dinov2(seed, rows, k, temp, n_iter):
    t = np.random.default_rng(seed).normal(size=(rows, k)) * 0.3  # cosine-sized logits: exp() stays finite
    got = sinkhorn_probs(torch.tensor(t), temp, n_iter).numpy()
    np.testing.assert_allclose(got, _ref_sinkhorn(t, temp, n_iter), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-9)


def test_sinkhorn_balances_prototypes_and_survives_large_logits():
    """Rows sum to 1 and, after enough iterations, every prototype gets the same share of the batch - even when
    every row prefers the same prototype (what centering can let collapse). Logits far beyond exp()'s range
    stay finite (each row's max is subtracted; DINOv2's code would overflow here)."""
    t = torch.randn(64, 8, dtype=torch.float64) * 0.1
    t[:, 3] += 500.0
    q = sinkhorn_probs(t, 0.05, n_iter=50)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(64, dtype=torch.float64))
    torch.testing.assert_close(q.mean(0), torch.full((8,), 1 / 8, dtype=torch.float64), atol=1e-3, rtol=0)


def _sinkhorn_rank(rank: int, world: int, port: int, t, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        half = t.shape[0] // world
        queue.put((rank, sinkhorn_probs(t[rank * half:(rank + 1) * half], 0.05).numpy()))
    finally:
        dist.destroy_process_group()


def test_sinkhorn_across_processes_equals_one_process():
    """Under DDP the prototype totals are all-reduced: two processes with half the rows each get exactly the
    rows that one process with the whole batch gets."""
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = torch.randn(12, 16, dtype=torch.float64) * 0.3
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_sinkhorn_rank, args=(r, 2, port, t, queue)) for r in range(2)]
    for p in procs:
        p.start()
    out = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    np.testing.assert_allclose(np.concatenate([out[0], out[1]]), sinkhorn_probs(t, 0.05).numpy(), rtol=1e-10)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(2, 9), d=st.sampled_from([2, 5, 16]))
def test_koleo_matches_loop(seed, b, d):
    """-mean_i log ||x_i - x_nn(i)|| over L2-normalised rows, nearest neighbour = the most similar other row."""
    x = np.random.default_rng(seed).normal(size=(b, d))
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    want = 0.0
    for i in range(b):
        j = max((j for j in range(b) if j != i), key=lambda j: u[i] @ u[j])
        want += -np.log(np.linalg.norm(u[i] - u[j] + 1e-8) + 1e-8)
    assert math.isclose(koleo(torch.tensor(x)).item(), want / b, rel_tol=1e-6)


def test_koleo_pushes_features_apart():
    """One gradient step on KoLeo moves the closest pair of features apart."""
    x = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0]], requires_grad=True)
    koleo(x).backward()
    with torch.no_grad():
        y = torch.nn.functional.normalize(x - 0.1 * x.grad, dim=1)
        before = torch.nn.functional.normalize(x, dim=1)
    assert (y[0] @ y[1]) < (before[0] @ before[1])

"""Weighted k-NN classification on frozen features (DINO's protocol, eval_knn.py).

Features are L2-normalised; each test image takes its k most cosine-similar training images, weights each by
exp(cos / T) and sums one-hot votes; top-1 / top-5 accuracy. The search is exact and chunked over the test AND the
training set, so memory stays at about `test_chunk x train_chunk` similarities however large the bank is
(1.28M x 50k for ImageNet). Unlike the reference it is correct for fewer than 100 test images, for k larger than
the bank (k is clamped and the effective k reported) and for fewer than 5 classes (top-5 = top-min(5, C)); a class
without a single vote never counts as a top-5 hit (the reference's topk may pick such zero-vote ties by chance).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_T = 0.07


def chunked_topk(queries: torch.Tensor, bank: torch.Tensor, k: int, bank_chunk: int = 65536):
    """Exact top-k of `queries @ bank.T` by rows, scanning the bank in chunks.

    Returns (similarities [Q, k'], indices [Q, k']) sorted descending, with k' = min(k, len(bank)).
    Memory: Q x (bank_chunk + k') at a time.
    """
    k = min(k, bank.shape[0])
    best_s = torch.full((queries.shape[0], 0), float("-inf"), device=queries.device, dtype=queries.dtype)
    best_i = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    for start in range(0, bank.shape[0], bank_chunk):
        part = bank[start:start + bank_chunk].to(queries.device, queries.dtype)
        sims = queries @ part.T
        s, i = sims.topk(min(k, part.shape[0]), dim=1)
        best_s = torch.cat([best_s, s], dim=1)
        best_i = torch.cat([best_i, i + start], dim=1)
        if best_s.shape[1] > k:  # keep only the running best k
            best_s, order = best_s.topk(k, dim=1)
            best_i = best_i.gather(1, order)
    # sorted also when the whole bank fit in k (no topk ran over the concatenation)
    best_s, order = best_s.sort(dim=1, descending=True)
    return best_s, best_i.gather(1, order)


def weighted_votes(sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, T: float) -> torch.Tensor:
    """Class scores [Q, C] = sum over neighbours of exp(cos / T) * one_hot(label)."""
    weights = (sims / T).exp()
    votes = torch.zeros(sims.shape[0], num_classes, device=sims.device, dtype=weights.dtype)
    return votes.scatter_add_(1, neighbour_labels, weights)


@dataclass
class KnnResult:
    k: int            # the k asked for
    k_effective: int  # min(k, bank size)
    top1: float       # percent
    top5: float       # percent; top-min(5, num_classes)
    n_test: int
    n_train: int
    num_classes: int


def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, ks=DEFAULT_KS, T: float = DEFAULT_T, num_classes: int | None = None,
                 test_chunk: int = 1024, train_chunk: int = 65536, normalize: bool = True) -> list[KnnResult]:
    """Top-1/top-5 accuracy of the weighted k-NN classifier for every k in `ks` (one search for max k)."""
    if train_feats.shape[0] == 0 or test_feats.shape[0] == 0:
        raise ValueError(f"k-NN needs a non-empty bank and test set (got {train_feats.shape[0]} train, "
                         f"{test_feats.shape[0]} test features)")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"feature sizes differ: train {train_feats.shape[1]}, test {test_feats.shape[1]}")
    train_labels = train_labels.long().to(train_feats.device)
    test_labels = test_labels.long()
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    if normalize:
        train_feats = F.normalize(train_feats.float(), dim=1)
        test_feats = F.normalize(test_feats.float(), dim=1)
    ks = sorted({int(k) for k in ks})
    n5 = min(5, num_classes)
    correct1 = {k: 0 for k in ks}
    correct5 = {k: 0 for k in ks}
    for start in range(0, test_feats.shape[0], test_chunk):
        q = test_feats[start:start + test_chunk]
        target = test_labels[start:start + test_chunk].to(q.device)
        sims, idx = chunked_topk(q, train_feats, max(ks), train_chunk)
        nb_labels = train_labels[idx.to(train_labels.device)].to(q.device)
        for k in ks:
            ke = min(k, sims.shape[1])
            votes = weighted_votes(sims[:, :ke], nb_labels[:, :ke], num_classes, T)
            top = votes.topk(n5, dim=1)
            # a class nobody voted for is no prediction (the reference lets topk pick such ties arbitrarily)
            hits = (top.indices == target[:, None]) & (top.values > 0)
            correct1[k] += int(hits[:, 0].sum())
            correct5[k] += int(hits.any(dim=1).sum())
    n = test_feats.shape[0]
    return [KnnResult(k=k, k_effective=min(k, train_feats.shape[0]), top1=100.0 * correct1[k] / n,
                      top5=100.0 * correct5[k] / n, n_test=n, n_train=train_feats.shape[0],
                      num_classes=num_classes) for k in ks]


def results_to_dict(results: list[KnnResult]) -> list[dict]:
    return [asdict(r) for r in results]

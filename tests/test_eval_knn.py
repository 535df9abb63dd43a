"""k-NN classifier against an independent loop re-computation, and its edge cases."""
from __future__ import annotations

import math
import tarfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from odis.eval.knn import chunked_topk, knn_classify


def loop_knn(train, train_y, test, test_y, k, T, num_classes):
    """Direct re-computation: cosine to every train image, sort, weighted vote, by plain Python loops."""
    def unit(v):
        n = math.sqrt(sum(a * a for a in v))
        return [a / n for a in v]

    train = [unit(v) for v in train.tolist()]
    test = [unit(v) for v in test.tolist()]
    top1 = top5 = 0
    for q, y in zip(test, test_y.tolist()):
        sims = sorted(((sum(a * b for a, b in zip(q, t)), j) for j, t in enumerate(train)), reverse=True)
        votes = [0.0] * num_classes
        for s, j in sims[:k]:
            votes[train_y[j]] += math.exp(s / T)
        ranked = [c for c in sorted(range(num_classes), key=lambda c: -votes[c]) if votes[c] > 0]
        top1 += ranked[0] == y  # at least one neighbour always votes
        top5 += y in ranked[:min(5, num_classes)]
    n = len(test)
    return 100.0 * top1 / n, 100.0 * top5 / n


@settings(max_examples=40, deadline=None)
@given(n_train=st.integers(1, 60), n_test=st.integers(1, 30), classes=st.integers(1, 8), seed=st.integers(0, 10**6),
       test_chunk=st.integers(1, 40), train_chunk=st.integers(1, 70))
def test_knn_matches_loop(n_train, n_test, classes, seed, test_chunk, train_chunk):
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(n_train, 6, generator=g, dtype=torch.float64)
    test = torch.randn(n_test, 6, generator=g, dtype=torch.float64)
    train_y = torch.randint(0, classes, (n_train,), generator=g)
    test_y = torch.randint(0, classes, (n_test,), generator=g)
    ks = (1, 3, 20)
    res = knn_classify(train, train_y, test, test_y, ks=ks, T=0.07, num_classes=classes,
                       test_chunk=test_chunk, train_chunk=train_chunk)
    for r in res:
        exp1, exp5 = loop_knn(train, train_y, test, test_y, min(r.k, n_train), 0.07, classes)
        assert r.top1 == pytest.approx(exp1) and r.top5 == pytest.approx(exp5), (r, exp1, exp5)
        assert r.k_effective == min(r.k, n_train)


def test_chunked_topk_sorted_when_the_bank_fits_in_k():
    q, bank = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    s, i = chunked_topk(q, bank, 5, bank_chunk=1)
    assert i.tolist() == [[1, 2, 0]] and torch.allclose(s, torch.tensor([[1.0, 0.6, 0.0]]))


def test_chunked_topk_equals_full_topk():
    g = torch.Generator().manual_seed(0)
    q, bank = torch.randn(17, 8, generator=g), torch.randn(301, 8, generator=g)
    s, i = chunked_topk(q, bank, 25, bank_chunk=13)
    s_ref, i_ref = (q @ bank.T).topk(25, dim=1)
    assert torch.allclose(s, s_ref) and torch.equal(i, i_ref)


def test_edge_cases_few_test_k_over_bank_single_class():
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(7, 4, generator=g), torch.randn(3, 4, generator=g)
    # a single class: everything is right, k clamps to the 7-image bank
    res = knn_classify(train, torch.zeros(7), test, torch.zeros(3), ks=(10, 20, 100, 200))
    assert [r.k_effective for r in res] == [7, 7, 7, 7]
    assert all(r.top1 == 100.0 and r.top5 == 100.0 and r.num_classes == 1 for r in res)


def test_knn_separable_clusters_and_wrong_inputs():
    g = torch.Generator().manual_seed(2)
    centers = torch.randn(10, 32, generator=g) * 5
    y = torch.arange(10).repeat_interleave(20)
    x = centers[y] + torch.randn(200, 32, generator=g)
    yt = torch.arange(10).repeat(3)
    xt = centers[yt] + torch.randn(30, 32, generator=g)
    res = knn_classify(x, y, xt, yt, ks=(20,), test_chunk=7, train_chunk=33)
    assert res[0].top1 == 100.0
    with pytest.raises(ValueError, match="non-empty"):
        knn_classify(x[:0], y[:0], xt, yt)
    with pytest.raises(ValueError, match="feature sizes differ"):
        knn_classify(x, y, xt[:, :5], yt)


# ---- unreadable shards: counted like unreadable samples, never a DataLoader worker's traceback -------------------

def _jpeg(seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _shard_set(folder, n_shards=2, per_shard=3):
    """Valid shards of labelled JPEGs (webdataset's writer: a tar with its end-of-archive blocks)."""
    import json

    import webdataset as wds

    folder.mkdir(parents=True)
    with wds.ShardWriter(str(folder / "s-%06d.tar"), maxcount=per_shard, verbose=0) as w:
        for i in range(n_shards * per_shard):
            w.write({"__key__": f"img{i}", "jpg": _jpeg(i), "json": json.dumps({"label": i % 2}).encode()})
    return sorted(folder.glob("*.tar"))


class _MeanRGB(torch.nn.Module):
    """A stand-in backbone: the mean colour of the view is its feature."""

    def forward(self, x, obj_mask=None):
        return (x.mean(dim=(2, 3)),)


def _features(spec, workers):
    from odis.eval.features import ViewConfig, extract_features, shard_loader

    loader = shard_loader(str(spec), ViewConfig("none", 32, None, 8), None, batch_size=2, num_workers=workers)
    return extract_features(_MeanRGB(), loader, progress=False)


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_shards_are_counted_not_a_traceback(tmp_path, workers):
    """An empty shard and one cut inside a member used to end in tarfile.ReadError from a DataLoader worker; one
    cut at a member boundary silently lost its tail and gave a sample without its json."""
    good, truncated, empty, boundary = _shard_set(tmp_path / "s", n_shards=4)
    data = truncated.read_bytes()
    truncated.write_bytes(data[:3000])  # inside the first image: nothing of this shard is readable
    empty.write_bytes(b"")
    with tarfile.open(boundary) as tar:  # cut after img10.jpg, before the header of its json
        cut = next(m.offset for m in tar if m.name == "img10.json")
    boundary.write_bytes(boundary.read_bytes()[:cut])
    f = _features(tmp_path / "s", workers)
    assert sorted(f.image_ids) == ["img0", "img1", "img2", "img9"]  # img10 lost its label: left out, not guessed
    assert f.counts["errors"] == 3 and len(f.errors) == 3
    by_shard = {e.split(": ", 1)[0]: e for e in f.errors}
    assert set(by_shard) == {str(truncated), str(empty), str(boundary)}
    assert "unreadable shard (ReadError: empty file)" in by_shard[str(empty)]
    assert "truncated; its last sample 'img10' is left out" in by_shard[str(boundary)]


def test_a_shard_set_with_nothing_readable_is_an_error_naming_the_shard(tmp_path):
    (shard,) = _shard_set(tmp_path / "s", n_shards=1)
    shard.write_bytes(shard.read_bytes()[:700])
    with pytest.raises(ValueError, match=rf"no image could be read \(1 error\(s\); first: {shard}: unreadable shard"):
        _features(tmp_path / "s", 0)

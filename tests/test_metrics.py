"""Confusion / IoU / matching against brute-force numpy references on small random cases."""

import itertools

import numpy as np
import pytest
import torch

from neco.eval.primitives.metrics import (
    confusion_matrix,
    hungarian_match,
    iou_from_confusion,
    many_to_one_match,
    remap_confusion,
)


def _np_confusion(pred, target, num_pred, num_classes, ignore):
    conf = np.zeros((num_classes, num_pred), dtype=np.int64)
    for p, t in zip(pred.ravel(), target.ravel(), strict=True):
        if t != ignore:
            conf[t, p] += 1
    return conf


def _np_iou(conf):
    c = conf.shape[0]
    ious = []
    for i in range(c):
        tp = conf[i, i]
        denom = conf[i, :].sum() + conf[:, i].sum() - tp
        ious.append(tp / denom if denom > 0 else 0.0)
    return np.array(ious)


def _pair_iou(conf, c, k):
    union = conf[c, :].sum() + conf[:, k].sum() - conf[c, k]
    return conf[c, k] / union if union > 0 else 0.0


@pytest.mark.parametrize("seed", range(3))
def test_confusion_matches_bruteforce(seed):
    rng = np.random.default_rng(seed)
    num_classes, num_pred = 5, 7
    target = rng.integers(0, num_classes, size=(3, 11, 13))
    target[rng.random(target.shape) < 0.2] = 255
    pred = rng.integers(0, num_pred, size=target.shape)
    conf = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), num_pred, num_classes, 255)
    assert conf.dtype == torch.long and conf.shape == (num_classes, num_pred)
    np.testing.assert_array_equal(conf.numpy(), _np_confusion(pred, target, num_pred, num_classes, 255))


def test_confusion_custom_ignore_and_range_check():
    target = torch.tensor([0, 1, 2, 0])
    pred = torch.tensor([1, 1, 0, 0])
    # ignore_index=0: the class-0 pixels vanish but class 0 still has a row (ADE20K convention).
    conf = confusion_matrix(pred, target, 2, 3, ignore_index=0)
    np.testing.assert_array_equal(conf.numpy(), [[0, 0], [0, 1], [1, 0]])
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([5]), torch.tensor([0]), 2, 3)
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([0]), torch.tensor([7]), 2, 3)


@pytest.mark.parametrize("seed", range(3))
def test_iou_matches_bruteforce_with_absent_classes(seed):
    rng = np.random.default_rng(seed)
    conf = rng.integers(0, 20, size=(6, 6))
    conf[4, :] = 0  # class 4 never present...
    conf[:, 4] = 0  # ...nor predicted: IoU 0, still averaged in
    per_class, miou, acc = iou_from_confusion(torch.from_numpy(conf))
    ref = _np_iou(conf)
    np.testing.assert_allclose(per_class.numpy(), ref)
    assert per_class[4] == 0.0
    assert miou == pytest.approx(ref.sum() / 6)
    assert acc == pytest.approx(np.trace(conf) / conf.sum())


def test_iou_perfect_and_empty():
    _, miou, acc = iou_from_confusion(torch.diag(torch.tensor([3, 4, 5])))
    assert miou == 1.0 and acc == 1.0
    per_class, miou, acc = iou_from_confusion(torch.zeros(3, 3, dtype=torch.long))
    assert miou == 0.0 and acc == 0.0 and per_class.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("num_classes,num_pred,seed", [(4, 4, 0), (5, 5, 1), (5, 5, 2), (4, 6, 3), (5, 3, 4)])
def test_hungarian_matches_exhaustive_search(num_classes, num_pred, seed):
    rng = np.random.default_rng(seed)
    conf = rng.integers(0, 50, size=(num_classes, num_pred))
    mapping = hungarian_match(torch.from_numpy(conf)).tolist()
    assert len(mapping) == num_pred
    if num_pred >= num_classes:
        # Every class gets exactly one prediction id; the leftovers fall back to class 0, so class 0's match
        # is whichever of its ids scores best (the optimum would pick it among the leftovers).
        best = max(
            sum(_pair_iou(conf, c, k) for c, k in enumerate(preds))
            for preds in itertools.permutations(range(num_pred), num_classes)
        )
        assert all(mapping.count(c) == 1 for c in range(1, num_classes))
        got = sum(_pair_iou(conf, c, mapping.index(c)) for c in range(1, num_classes))
        got += max(_pair_iou(conf, 0, k) for k in range(num_pred) if mapping[k] == 0)
    else:
        best = max(
            sum(_pair_iou(conf, c, k) for k, c in enumerate(classes))
            for classes in itertools.permutations(range(num_classes), num_pred)
        )
        assert len(set(mapping)) == num_pred  # one-to-one
        got = sum(_pair_iou(conf, c, k) for k, c in enumerate(mapping))
    assert got == pytest.approx(best)


def test_hungarian_unmatched_go_to_class_zero():
    # Three classes, five clusters: clusters 1, 3, 4 are the clean matches of classes 2, 0, 1.
    conf = torch.tensor([[0, 0, 1, 9, 0], [0, 0, 0, 0, 9], [1, 9, 0, 0, 0]])
    mapping = hungarian_match(conf)
    assert mapping.tolist() == [0, 2, 0, 0, 1]
    square = remap_confusion(conf, mapping, 3)
    assert square.sum() == conf.sum()


def test_hungarian_identity_on_permuted_diagonal():
    perm = torch.tensor([2, 0, 3, 1])
    conf = torch.diag(torch.tensor([5, 6, 7, 8]))[:, perm]  # column k holds class perm[k]
    mapping = hungarian_match(conf)
    assert mapping.tolist() == perm.tolist()
    _, miou, _ = iou_from_confusion(remap_confusion(conf, mapping, 4))
    assert miou == 1.0


def test_many_to_one_precision_majority_and_ties():
    conf = torch.tensor(
        [
            [5, 3, 0, 2],
            [5, 1, 0, 7],
            [1, 3, 0, 7],
        ]
    )
    # col 0: tie 5/5 -> class 0; col 1: tie 3/3 -> class 0; col 2: empty -> class 0; col 3: tie 7/7 -> class 1
    assert many_to_one_match(conf, "precision").tolist() == [0, 0, 0, 1]
    with pytest.raises(ValueError):
        many_to_one_match(conf, "recall")


@pytest.mark.parametrize("seed", range(3))
def test_many_to_one_matches_bruteforce(seed):
    rng = np.random.default_rng(seed)
    conf = rng.integers(0, 4, size=(4, 9))  # small counts -> plenty of ties
    prec = many_to_one_match(torch.from_numpy(conf), "precision").tolist()
    iou = many_to_one_match(torch.from_numpy(conf), "iou").tolist()
    for k in range(conf.shape[1]):
        col = conf[:, k]
        assert prec[k] == min(c for c in range(4) if col[c] == col.max())
        scores = [_pair_iou(conf, c, k) for c in range(4)]
        assert iou[k] == min(c for c in range(4) if scores[c] == max(scores))


def test_remap_confusion_matches_bruteforce():
    rng = np.random.default_rng(0)
    conf = rng.integers(0, 10, size=(4, 7))
    mapping = rng.integers(0, 4, size=7)
    out = remap_confusion(torch.from_numpy(conf), torch.from_numpy(mapping), 4).numpy()
    ref = np.zeros((4, 4), dtype=np.int64)
    for k in range(7):
        ref[:, mapping[k]] += conf[:, k]
    np.testing.assert_array_equal(out, ref)
    with pytest.raises(ValueError):
        remap_confusion(torch.from_numpy(conf), torch.zeros(3, dtype=torch.long), 4)

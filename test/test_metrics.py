"""Confusion-matrix metrics on hand-computed cases."""

import json
import math

import numpy as np
import pytest
import torch

from rgbt_seg_ros.evaluation.metrics import ConfusionMatrix

# 4 classes; class 3 appears in neither labels nor (counted) predictions.
TARGET = np.array([0, 0, 0, 1, 1, 255, 255])
PRED = np.array([0, 0, 1, 1, 2, 0, 3])  # the last two sit on ignored pixels and do not count
# Counted pairs (gt, pred): (0,0) x2, (0,1), (1,1), (1,2)
# tp = [2, 1, 0, 0]; gt = [3, 2, 0, 0]; pred = [2, 2, 1, 0]


def filled():
    cm = ConfusionMatrix(4)
    cm.update(PRED, TARGET)
    return cm


def test_hand_computed_case_with_ignore_pixels_and_an_absent_class():
    cm = filled()
    expected = np.zeros((4, 4), np.int64)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[1, 2] = 2, 1, 1, 1
    np.testing.assert_array_equal(cm.matrix, expected)
    r = cm.compute()
    nan = math.nan
    np.testing.assert_allclose(r["iou"], [2 / 3, 1 / 3, 0.0, nan])
    np.testing.assert_allclose(r["acc"], [2 / 3, 1 / 2, nan, nan])  # class 2: predicted, never labelled
    np.testing.assert_allclose(r["precision"], [1.0, 1 / 2, 0.0, nan])
    np.testing.assert_allclose(r["f1"], [4 / 5, 1 / 2, 0.0, nan])
    assert r["miou"] == pytest.approx((2 / 3 + 1 / 3 + 0.0) / 3)  # class 3 left out, not counted as 0
    assert r["macc"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert r["mf1"] == pytest.approx((0.8 + 0.5 + 0.0) / 3)
    assert r["pixel_acc"] == pytest.approx(3 / 5)
    assert r["pixels"] == 5


def test_labelled_but_never_predicted_class():
    cm = ConfusionMatrix(2)
    cm.update(np.array([0, 0, 0]), np.array([0, 1, 1]))
    r = cm.compute()
    np.testing.assert_allclose(r["iou"], [1 / 3, 0.0])
    np.testing.assert_allclose(r["acc"], [1.0, 0.0])
    assert r["precision"][0] == pytest.approx(1 / 3) and math.isnan(r["precision"][1])
    np.testing.assert_allclose(r["f1"], [0.5, 0.0])


def test_merge_equals_a_single_update_and_torch_inputs_work():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, (3, 20, 30))
    target[rng.random(target.shape) < 0.1] = 255
    pred = rng.integers(0, 5, (3, 20, 30))
    single = ConfusionMatrix(5)
    single.update(pred, target)
    a, b = ConfusionMatrix(5), ConfusionMatrix(5)
    a.update(torch.from_numpy(pred[:1]), torch.from_numpy(target[:1]))
    b.update(pred[1:], target[1:])
    merged = a.merge(b)
    np.testing.assert_array_equal(merged.matrix, single.matrix)
    assert merged.compute()["miou"] == single.compute()["miou"]
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(ConfusionMatrix(4))


def test_bad_inputs_are_reported():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="prediction ids \\[3\\]"):
        cm.update(np.array([3, 0]), np.array([0, 0]))
    with pytest.raises(ValueError, match="label ids \\[7\\]"):
        cm.update(np.array([0, 0]), np.array([7, 255]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2), int), np.zeros((4,), int))
    with pytest.raises(ValueError, match="argmax"):
        cm.update(np.zeros((2, 3), np.float32), np.zeros((2, 3), int))


def test_json_is_strict_and_markdown_shows_undefined_as_na():
    cm = filled()
    names = ["road", "car", "person", "bike"]
    data = json.loads(json.dumps(cm.as_json(names), allow_nan=False))
    assert data["per_class"]["bike"]["iou"] is None and data["per_class"]["person"]["acc"] is None
    assert data["per_class"]["road"]["iou"] == pytest.approx(2 / 3)
    assert data["miou"] == pytest.approx(1 / 3) and data["confusion_matrix"][1][2] == 1
    md = cm.to_markdown(names)
    assert "| road | 66.67 | 66.67 | 80.00 | 100.00 | 3 |" in md
    assert "| bike | n/a | n/a | n/a | n/a | 0 |" in md
    assert "**33.33**" in md and "Pixel accuracy: 60.00" in md
    empty = ConfusionMatrix(2).as_json()
    assert empty["miou"] is None and empty["pixel_acc"] is None


def test_a_prediction_equal_to_the_ignore_index_is_a_miss_of_the_true_class():
    """What the node publishes where the thermal camera does not see in thermal_only mode (255): no
    prediction. It lowers the true class's IoU and accuracy and is no false positive of any class."""
    target = np.array([0, 0, 0, 0, 1, 1, 255])
    pred = np.array([0, 0, 255, 255, 1, 255, 255])  # the last one sits on an ignored label: not counted
    cm = ConfusionMatrix(2)
    cm.update(pred, target)
    # counted: (0,0) x2, (1,1); unpredicted: class 0 x2, class 1 x1
    np.testing.assert_array_equal(cm.matrix, [[2, 0], [0, 1]])
    np.testing.assert_array_equal(cm.unpredicted, [2, 1])
    r = cm.compute()
    # class 0: tp 2, gt 4 (2 unpredicted), pred 2 -> IoU 2 / (4 + 2 - 2); class 1: tp 1, gt 2, pred 1
    np.testing.assert_allclose(r["iou"], [2 / 4, 1 / 2])
    np.testing.assert_allclose(r["acc"], [2 / 4, 1 / 2])
    np.testing.assert_allclose(r["precision"], [1.0, 1.0])  # nothing was predicted wrongly
    np.testing.assert_allclose(r["f1"], [2 * 2 / 6, 2 * 1 / 3])
    np.testing.assert_array_equal(r["support"], [4, 2])
    assert r["pixels"] == 6 and r["unpredicted_pixels"] == 3 and r["pixel_acc"] == pytest.approx(3 / 6)
    # the same labels with every pixel predicted right: IoU 1 everywhere, so the misses are what lowered it
    full = ConfusionMatrix(2)
    full.update(target.clip(0, 1), target)
    assert full.compute()["miou"] == 1.0 and full.compute()["unpredicted_pixels"] == 0

    data = json.loads(json.dumps(cm.as_json(["road", "car"]), allow_nan=False))
    assert data["unpredicted_pixels"] == 3
    assert data["per_class"]["road"]["unpredicted"] == 2 and data["per_class"]["car"]["unpredicted"] == 1
    assert data["per_class"]["road"]["support"] == 4
    assert "3 labelled pixels had no prediction" in cm.to_markdown(["road", "car"])
    assert "no prediction" not in full.to_markdown(["road", "car"])

    other = ConfusionMatrix(2)
    other.update(np.array([255]), np.array([1]))
    np.testing.assert_array_equal(cm.merge(other).unpredicted, [2, 2])
    cm.reset()
    assert not cm.unpredicted.any() and not cm.matrix.any()


def test_only_the_ignore_index_means_no_prediction():
    cm = ConfusionMatrix(3, ignore_index=100)
    cm.update(np.array([100, 1]), np.array([2, 1]))
    np.testing.assert_array_equal(cm.unpredicted, [0, 0, 1])
    with pytest.raises(ValueError, match="prediction ids \\[255\\]"):
        cm.update(np.array([255, 0]), np.array([0, 0]))
    with pytest.raises(ValueError, match="prediction ids \\[-1\\]"):
        cm.update(np.array([-1, 100]), np.array([0, 0]))

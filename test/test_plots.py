"""Report figures are written as real PNGs of sensible size."""

import math

import cv2
import numpy as np
import pytest

from rgbt_seg_ros.evaluation.metrics import ConfusionMatrix
from rgbt_seg_ros.evaluation.plots import latency_histogram, overlay_grid, plot_confusion_matrix, plot_per_class_iou
from rgbt_seg_ros.models.classes import load_dataset_info

INFO = load_dataset_info("synthetic")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None
    return img


def test_confusion_matrix_and_iou_bar_chart(tmp_path):
    rng = np.random.default_rng(0)
    cm = ConfusionMatrix(INFO.num_classes)
    labels = rng.integers(0, 6, 5000)  # classes 6 and 7 never labelled: blank rows, n/a bars
    pred = np.where(rng.random(5000) < 0.7, labels, rng.integers(0, 8, 5000))
    cm.update(pred, labels)
    path = plot_confusion_matrix(cm, INFO.class_names, tmp_path / "sub" / "cm.png")
    img = read_png(path)
    assert 300 < img.shape[0] < 2000 and 300 < img.shape[1] < 2000
    assert img.std() > 20  # not a blank canvas
    iou = cm.compute()["iou"]
    iou[7] = math.nan  # an undefined class is drawn as "n/a", not as a failure
    bars = read_png(plot_per_class_iou(iou, INFO.class_names, INFO.palette, tmp_path / "iou.png"))
    assert bars.shape[1] > bars.shape[0] > 200
    # The palette colours appear in the bars (e.g. the person class's crimson), in BGR.
    person_bgr = INFO.palette[4][::-1]
    assert (np.abs(bars.astype(int) - person_bgr).sum(axis=2) < 10).sum() > 50
    with pytest.raises(ValueError, match="do not match"):
        plot_confusion_matrix(cm, INFO.class_names[:3], tmp_path / "bad.png")


def test_overlay_grid_has_one_row_of_four_tiles_per_sample(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for _ in range(3):
        gt = rng.integers(0, 8, (48, 64))
        gt[:4] = 255
        rows.append(
            (
                rng.random((3, 48, 64), dtype=np.float32),  # dataset layout: (3, H, W) float
                rng.random((1, 48, 64), dtype=np.float32),
                rng.integers(0, 8, (48, 64)),
                gt,
            )
        )
    one = read_png(overlay_grid(rows[:1], INFO.palette, tmp_path / "one.png"))
    three = read_png(overlay_grid(rows, INFO.palette, tmp_path / "three.png", names=["a", "b", "c"]))
    assert one.shape[1] == three.shape[1] and one.shape[1] > 3 * one.shape[0]
    assert 2.5 * one.shape[0] < three.shape[0] < 3.5 * one.shape[0]
    with pytest.raises(ValueError, match="at least one row"):
        overlay_grid([], INFO.palette, tmp_path / "none.png")


def test_latency_histogram(tmp_path):
    values = list(np.random.default_rng(2).gamma(4.0, 10.0, 500)) + [float("nan")]
    img = read_png(latency_histogram(values, tmp_path / "lat.png", title="segmenter"))
    assert img.shape[1] > img.shape[0] > 200
    empty = read_png(latency_histogram([], tmp_path / "empty.png"))
    assert empty.shape[0] > 100

"""Evaluation: metrics and report files, the perfect case, the Segmenter path, the evaluate CLI."""

import argparse
import json

import numpy as np
import pytest

from conftest import make_micro_checkpoint
from rgbt_seg_ros.data.datasets import build_dataset
from rgbt_seg_ros.evaluation.evaluator import SegmentationEvaluator, evaluate, item_to_numpy_pair
from rgbt_seg_ros.models.classes import load_dataset_info
from rgbt_seg_ros.pipeline.segmenter import SegmentationResult, Segmenter
from rgbt_seg_ros.tools import evaluate as evaluate_tool

SYN = load_dataset_info("synthetic")
FILES = ("metrics.json", "metrics.md", "confusion_matrix.png", "per_class_iou.png", "overlays.png")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for tiny tensors


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_micro_checkpoint(tmp_path_factory.mktemp("eval") / "micro")


def test_perfect_predictions_give_miou_one_and_every_file(tmp_path):
    ds = build_dataset("synthetic", None, "test", SYN, count=4, size=(48, 64))
    ev = SegmentationEvaluator(SYN, max_overlays=3)
    for i in range(len(ds)):
        item = ds[i]
        ev.update(item, item["labels"].astype(np.uint8), index=i)
    paths = ev.write(tmp_path, title="perfect")
    assert {p.name for p in paths.values()} == set(FILES)
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["miou"] == doc["macc"] == doc["mf1"] == doc["pixel_acc"] == 1.0
    assert doc["items"] == 4 and set(doc["conditions"]) == {"day", "night", "fog", "glare"}
    assert all(c["miou"] == 1.0 for c in doc["conditions"].values())
    cm = np.array(doc["confusion_matrix"])
    assert (cm == np.diag(np.diag(cm))).all() and cm.sum() == doc["pixels"] == 4 * 48 * 64
    md = (tmp_path / "metrics.md").read_text()
    assert "**100.00**" in md and "| night |" in md


def test_wrong_predictions_score_what_they_should(tmp_path):
    item = {"labels": np.array([[0, 0], [1, 255]]), "rgb": np.zeros((3, 2, 2), np.float32)}
    item["thermal"] = np.zeros((1, 2, 2), np.float32)
    ev = SegmentationEvaluator(SYN, max_overlays=0)
    ev.update(item, np.array([[0, 1], [1, 1]]))
    r = ev.results()
    assert r["iou"][0] == pytest.approx(0.5) and r["iou"][1] == pytest.approx(0.5)
    assert r["pixel_acc"] == pytest.approx(2 / 3) and r["conditions"] == {}


def test_numpy_pair_is_what_the_node_gets():
    ds = build_dataset("synthetic", None, "test", SYN, count=1, size=(48, 64))
    item = ds[0]
    rgb, thermal, valid = item_to_numpy_pair(item)
    assert rgb.dtype == np.uint8 and rgb.shape == (48, 64, 3)
    np.testing.assert_allclose(rgb.transpose(2, 0, 1) / 255.0, item["rgb"], atol=1e-6)
    assert thermal.shape == (48, 64) and valid.dtype == np.bool_
    _, t0, v0 = item_to_numpy_pair(item, blank_thermal=True)
    assert t0.max() == 0 and not v0.any()
    r0, t1, v1 = item_to_numpy_pair(item, blank_rgb=True)  # the node's thermal_only: RGB black, the rest as usual
    assert r0.dtype == np.uint8 and r0.shape == rgb.shape and r0.max() == 0
    np.testing.assert_array_equal(t1, thermal)
    np.testing.assert_array_equal(v1, valid)
    with pytest.raises(ValueError, match="exclude each other"):
        item_to_numpy_pair(item, blank_thermal=True, blank_rgb=True)


class _Oracle:
    """A segmenter that answers every item's true labels (class 0 where unlabelled) and records what it was fed."""

    def __init__(self, items):
        self.dataset_info = SYN
        self.answers = [np.where(it["labels"] == SYN.ignore_index, 0, it["labels"]).astype(np.uint8) for it in items]
        self.fed = []

    def __call__(self, rgb, thermal, valid):
        self.fed.append((rgb.copy(), thermal.copy(), valid.copy()))
        return SegmentationResult(self.answers[len(self.fed) - 1], np.ones(rgb.shape[:2], np.float32), {"model": 1.0})


def _item(labels, valid, condition="night"):
    labels = np.array(labels)
    h, w = labels.shape
    rgb = np.full((3, h, w), 0.5, np.float32)
    thermal = np.full((1, h, w), 0.7, np.float32)
    return {
        "rgb": rgb,
        "thermal": thermal,
        "valid": np.array(valid, np.float32)[None],
        "labels": labels,
        "condition": condition,
    }


def test_blank_rgb_feeds_black_rgb_and_counts_pixels_unseen_by_thermal_as_misses():
    # 2 x 3 labels; the thermal camera does not see the right column
    item = _item([[0, 1, 1], [0, 1, 255]], [[1, 1, 0], [1, 1, 0]])
    oracle = _Oracle([item, item])
    paired = evaluate(oracle, [item], max_overlays=0, progress=False)
    thermal_only = evaluate(oracle, [item], max_overlays=0, progress=False, blank_rgb=True)
    (rgb_p, th_p, v_p), (rgb_t, th_t, v_t) = oracle.fed
    assert rgb_p.max() == 128 and rgb_t.dtype == np.uint8 and rgb_t.max() == 0  # the model got a black image
    np.testing.assert_array_equal(th_t, th_p)
    np.testing.assert_array_equal(v_t, v_p)
    assert paired["miou"] == 1.0 and paired["unpredicted_pixels"] == 0
    assert paired["meta"]["blank_rgb"] is False and thermal_only["meta"]["blank_rgb"] is True
    # class 1: 3 labelled pixels, the one at (0, 2) unseen -> IoU 2/3; class 0 is all seen -> 1; (1, 2) is unlabelled
    assert thermal_only["unpredicted_pixels"] == 1 and thermal_only["pixels"] == 5
    assert thermal_only["per_class"][SYN.class_names[1]]["iou"] == pytest.approx(2 / 3)
    assert thermal_only["per_class"][SYN.class_names[1]]["unpredicted"] == 1
    assert thermal_only["per_class"][SYN.class_names[0]]["iou"] == 1.0
    assert thermal_only["conditions"]["night"]["unpredicted_pixels"] == 1
    assert thermal_only["miou"] == pytest.approx((1 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="exclude each other"):
        evaluate(oracle, [item], progress=False, blank_thermal=True, blank_rgb=True)


def test_evaluate_a_checkpoint_through_the_segmenter(tmp_path, ckpt):
    seg = Segmenter.from_checkpoint(ckpt, device="cpu")
    ds = build_dataset("synthetic", None, "test", SYN, count=4, size=(72, 100))  # not the input size
    doc = evaluate(seg, ds, out_dir=tmp_path, max_overlays=2, progress=False)
    assert all((tmp_path / f).is_file() for f in FILES)
    assert 0.0 <= doc["miou"] <= 1.0 and doc["pixels"] == 4 * 72 * 100
    assert doc["timing_ms"]["model"]["median"] > 0
    assert set(doc["conditions"]) == {"day", "night", "fog", "glare"}


def _parse(argv):
    p = argparse.ArgumentParser()
    evaluate_tool.add_arguments(p)
    return p.parse_args(argv)


def test_evaluate_cli(tmp_path, ckpt, capsys):
    out = tmp_path / "report"
    argv = ["--checkpoint", str(ckpt), "--dataset", "synthetic", "--synthetic-count", "2", "--size", "96", "128"]
    assert evaluate_tool.run(_parse(argv + ["--out", str(out), "--device", "cpu", "--no-progress"])) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("2 items: mIoU") and "day" in printed
    assert all((out / f).is_file() for f in FILES)
    assert json.loads((out / "metrics.json").read_text())["meta"]["split"] == "test"

    assert evaluate_tool.run(_parse(["--checkpoint", str(ckpt), "--dataset", "pst900", "--data", str(tmp_path)])) == 2
    assert "predicts" in capsys.readouterr().err
    assert evaluate_tool.run(_parse(["--checkpoint", str(tmp_path / "none"), "--dataset", "synthetic"])) == 2
    assert "does not exist" in capsys.readouterr().err
    assert evaluate_tool.run(_parse(["--checkpoint", str(ckpt), "--dataset", "kitti"])) == 2
    assert "unknown dataset 'kitti'" in capsys.readouterr().err


def test_evaluate_cli_thermal_only(tmp_path, ckpt, capsys):
    out = tmp_path / "thermal_only"
    argv = ["--checkpoint", str(ckpt), "--dataset", "synthetic", "--synthetic-count", "2", "--size", "96", "128"]
    assert evaluate_tool.run(_parse(argv + ["--blank-rgb", "--out", str(out), "--device", "cpu", "--no-progress"])) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["meta"]["blank_rgb"] is True and doc["meta"]["blank_thermal"] is False
    ds = build_dataset("synthetic", None, "test", SYN, count=2, size=(96, 128))
    unseen = sum(int(((ds[i]["valid"][0] < 0.5) & (ds[i]["labels"] != SYN.ignore_index)).sum()) for i in range(2))
    assert unseen > 0 and doc["unpredicted_pixels"] == unseen  # every labelled pixel thermal does not see: a miss
    capsys.readouterr()
    assert evaluate_tool.run(_parse(argv + ["--blank-rgb", "--blank-thermal"])) == 2
    assert "--blank-thermal and --blank-rgb exclude each other" in capsys.readouterr().err


def test_all_reduce_carries_the_unpredicted_pixels(monkeypatch):
    import torch.distributed as dist

    # two ranks with the same counts, simulated: the reduction doubles every count
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), [obj] * len(out)))
    monkeypatch.setattr(dist, "all_reduce", lambda t: t.mul_(2))
    item = _item([[0, 1, 1], [0, 1, 255]], [[1, 1, 0], [1, 1, 0]])
    ev = SegmentationEvaluator(SYN, max_overlays=0)
    ev.update(item, np.array([[0, 1, 255], [0, 255, 255]]))
    matrix, unpredicted = ev.cm.matrix.copy(), ev.cm.unpredicted.copy()
    assert unpredicted.tolist()[:2] == [0, 2]
    ev.all_reduce()
    np.testing.assert_array_equal(ev.cm.matrix, 2 * matrix)
    np.testing.assert_array_equal(ev.cm.unpredicted, 2 * unpredicted)
    np.testing.assert_array_equal(ev.by_condition["night"].unpredicted, 2 * unpredicted)
    assert ev.items == 2

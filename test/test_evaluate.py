"""Evaluation: metrics and report files, the perfect case, the Segmenter path, the evaluate CLI."""

import argparse
import json

import numpy as np
import pytest

from conftest import make_micro_checkpoint
from rgbt_seg_ros.classes import load_dataset_info
from rgbt_seg_ros.segmenter import Segmenter
from rgbt_seg_ros.tools import evaluate as evaluate_tool
from rgbt_seg_ros.training.datasets import build_dataset
from rgbt_seg_ros.training.evaluation import SegmentationEvaluator, evaluate, item_to_numpy_pair

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

"""Dataset readers: every benchmark layout, the synthetic set, real samples and the error messages."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from rgbt_seg_ros.data.datasets import DatasetError, build_dataset, split_seed
from rgbt_seg_ros.data.sample_dataset import read_mfnet_png, write_sample_dataset
from rgbt_seg_ros.data.synthetic import CONDITIONS, SceneGenerator
from rgbt_seg_ros.models.classes import load_dataset_info

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
SIZE = (64, 96)
SYN = load_dataset_info("synthetic")


def check_item(item, size):
    h, w = size
    assert item["rgb"].shape == (3, h, w) and item["rgb"].dtype == np.float32
    assert item["thermal"].shape == (1, h, w) and item["thermal"].dtype == np.float32
    assert item["valid"].shape == (1, h, w) and item["valid"].dtype == np.float32
    assert item["labels"].shape == (h, w) and item["labels"].dtype == np.int64
    assert 0.0 <= item["rgb"].min() and item["rgb"].max() <= 1.0
    assert 0.0 <= item["thermal"].min() and item["thermal"].max() <= 1.0
    assert set(np.unique(item["valid"])) <= {0.0, 1.0}
    assert isinstance(item["name"], str) and isinstance(item["condition"], str)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {
        name: write_sample_dataset(root / name, name, count=4, seed=3, size=SIZE)
        for name in ("pst900", "mfnet", "fmb", "folder")
    }


@pytest.mark.parametrize("layout", ["pst900", "mfnet", "fmb", "folder"])
def test_each_layout_reads_what_was_written(layouts, layout):
    train = build_dataset(layout, layouts[layout], "train", SYN)
    test = build_dataset(layout, layouts[layout], "test", SYN)
    assert (len(train), len(test)) == (3, 1)
    assert {train[i]["name"] for i in range(3)}.isdisjoint({test[0]["name"]})
    item = train[0]
    check_item(item, SIZE)
    # Scene 0 of the writer's generator, day: the RGB must come back in RGB order, labels exactly.
    scene = SceneGenerator(seed=3, rgb_size=SIZE, thermal_size=SIZE).sample(0, CONDITIONS[0])
    np.testing.assert_allclose(item["rgb"] * 255.0, scene.rgb.transpose(2, 0, 1).astype(np.float32), atol=1e-3)
    np.testing.assert_array_equal(item["labels"], scene.labels)
    assert item["thermal"].std() > 0.01  # a real thermal picture, not a constant


def test_folder_16bit_thermal_goes_through_the_kelvin_range(layouts):
    item = build_dataset("folder", layouts["folder"], "train", SYN)[0]
    counts = cv2.imread(str(layouts["folder"] / "thermal" / "00000D.png"), cv2.IMREAD_UNCHANGED)
    assert counts.dtype == np.uint16
    expected = np.clip((counts / 100.0 - 250.0) / 80.0, 0, 1)
    np.testing.assert_allclose(item["thermal"][0], expected, atol=1e-5)
    # A custom normaliser given as a parameter dict is honoured.
    item2 = build_dataset(
        "folder", layouts["folder"], "train", SYN, thermal_normalizer={"mode": "fixed", "min": 0, "max": 65535}
    )[0]
    np.testing.assert_allclose(item2["thermal"][0], counts / 65535.0, atol=1e-5)


def test_mfnet_thermal_is_the_fourth_channel_and_conditions_come_from_names(layouts):
    root = layouts["mfnet"]
    ds = build_dataset("mfnet", root, "train", SYN)
    names = (root / "train.txt").read_text().split()
    assert [ds[i]["name"] for i in range(len(ds))] == names
    for i in range(len(ds)):
        assert ds[i]["condition"] == ("night" if names[i].endswith("N") else "day")
    _, thermal = read_mfnet_png(root / "images" / f"{names[0]}.png")
    np.testing.assert_allclose(ds[0]["thermal"][0], thermal / 255.0, atol=1e-6)
    assert len(build_dataset("mfnet", root, "val", SYN)) == 1


def test_synthetic_is_deterministic_split_separated_and_filtered():
    train = build_dataset("synthetic", None, "train", SYN, count=3, seed=5, size=SIZE)
    again = build_dataset("synthetic", None, "train", SYN, count=3, seed=5, size=SIZE)
    test = build_dataset("synthetic", None, "test", SYN, count=3, seed=5, size=SIZE, conditions=["night"])
    assert len(train) == 3
    a, b = train[1], again[1]
    check_item(a, SIZE)
    for key in ("rgb", "thermal", "valid", "labels"):
        np.testing.assert_array_equal(a[key], b[key])
    assert split_seed(5, "train") != split_seed(5, "test")
    assert not np.array_equal(train[0]["labels"], test[0]["labels"])  # different scenes, not just conditions
    assert {test[i]["condition"] for i in range(3)} == {"night"}
    assert [train[i]["condition"] for i in range(3)] == list(CONDITIONS[:3])
    # Registered thermal: the validity mask is the rig's, and thermal is 0 where the camera sees nothing.
    gen = SceneGenerator(seed=split_seed(5, "train"), rgb_size=SIZE, thermal_size=SIZE)
    np.testing.assert_array_equal(a["valid"][0] > 0, gen.thermal_valid_mask())
    assert 0.0 < a["valid"].mean() < 1.0
    assert np.all(a["thermal"][a["valid"] == 0] == 0)
    with pytest.raises(ValueError, match="unknown synthetic conditions"):
        build_dataset("synthetic", None, "test", SYN, count=2, conditions=["rain"])
    with pytest.raises(ValueError, match="classes of config/datasets/synthetic.yaml"):
        build_dataset("synthetic", None, "test", load_dataset_info("mfnet"), count=2)


def test_dataloader_collates_items_into_tensors():
    ds = build_dataset("synthetic", None, "train", SYN, count=2, size=SIZE)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["rgb"].shape == (2, 3, *SIZE) and batch["labels"].dtype == torch.int64
    assert batch["name"] == [ds[0]["name"], ds[1]["name"]]


# --------------------------------------------------------------------------- real samples


@pytest.mark.skipif(not (REALDATA / "pst900" / "sample_102").is_dir(), reason="shared/realdata not present")
def test_real_pst900_sample_loads_with_its_holes_invalid(tmp_path):
    src = REALDATA / "pst900" / "sample_102"
    for sub, name in (("rgb", "rgb.png"), ("thermal", "thermal.png"), ("labels", "label.png")):
        (tmp_path / "test" / sub).mkdir(parents=True)
        (tmp_path / "test" / sub / "102.png").symlink_to(src / name)
    ds = build_dataset("pst900", tmp_path, "test", load_dataset_info("pst900"))
    item = ds[0]
    check_item(item, (720, 1280))
    assert set(np.unique(item["labels"])) == {0, 1, 2, 3}
    raw = cv2.imread(str(src / "thermal.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(item["valid"][0] == 0, raw == 0)
    assert 0.01 < 1.0 - item["valid"].mean() < 0.05  # ~2.4 % projection holes (PROVENANCE.md)
    keep = build_dataset("pst900", tmp_path, "val", load_dataset_info("pst900"), zero_thermal_is_invalid=False)
    assert keep[0]["valid"].min() == 1.0


@pytest.mark.skipif(not (REALDATA / "mfnet_figure_tiles").is_dir(), reason="shared/realdata not present")
def test_real_mfnet_tile_and_original_rgbt_png_load(tmp_path):
    tiles = REALDATA / "mfnet_figure_tiles"
    for sub, suffix in (("rgb", "rgb"), ("thermal", "thermal"), ("labels", "label")):
        (tmp_path / "folder" / sub).mkdir(parents=True)
        (tmp_path / "folder" / sub / "mfnet_sample_02.png").symlink_to(tiles / f"mfnet_sample_02_{suffix}.png")
    (tmp_path / "folder" / "test.txt").write_text("mfnet_sample_02\n")
    mfnet = load_dataset_info("mfnet")
    item = build_dataset("folder", tmp_path / "folder", "test", mfnet)[0]
    check_item(item, (120, 160))
    assert set(np.unique(item["labels"])) == {0, 2, 4, 7, 255}
    assert item["condition"] == ""

    original = REALDATA / "mfnet" / "original" / "01234N.png"
    (tmp_path / "mfnet" / "images").mkdir(parents=True)
    (tmp_path / "mfnet" / "labels").mkdir()
    (tmp_path / "mfnet" / "images" / "01234N.png").symlink_to(original)
    cv2.imwrite(str(tmp_path / "mfnet" / "labels" / "01234N.png"), np.zeros((480, 640), np.uint8))  # no labels ship
    (tmp_path / "mfnet" / "test.txt").write_text("01234N\n")
    item = build_dataset("mfnet", tmp_path / "mfnet", "test", mfnet)[0]
    check_item(item, (480, 640))
    assert item["condition"] == "night"
    rgb, thermal = read_mfnet_png(original)
    np.testing.assert_allclose(item["rgb"][0] * 255, rgb[:, :, 0], atol=1e-3)  # R first
    np.testing.assert_allclose(item["thermal"][0] * 255, thermal, atol=1e-3)


# --------------------------------------------------------------------------- errors


def test_missing_file_is_named(tmp_path):
    root = write_sample_dataset(tmp_path / "pst", "pst900", count=4, size=SIZE)
    victim = root / "train" / "thermal" / "00001N.png"
    victim.unlink()
    with pytest.raises(DatasetError, match=r"thermal/00001N\.\*: file does not exist"):
        build_dataset("pst900", root, "train", SYN)
    (root / "test.txt").write_text("")
    with pytest.raises(DatasetError, match="split file does not exist"):
        build_dataset("folder", root, "train", SYN)
    with pytest.raises(DatasetError, match="dataset root folder does not exist"):
        build_dataset("fmb", tmp_path / "nowhere", "train", SYN)


def test_label_out_of_range_is_named(tmp_path):
    root = write_sample_dataset(tmp_path / "fmb", "fmb", count=4, size=SIZE)
    label = root / "train" / "Label" / "00000D.png"
    bad = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
    bad[0, 0] = 9  # synthetic has 8 classes: ids 0..7 (255 = ignore is fine)
    bad[0, 1] = 255
    cv2.imwrite(str(label), bad)
    ds = build_dataset("fmb", root, "train", SYN)
    with pytest.raises(DatasetError, match=r"00000D\.png: label values 9 are outside the 8 classes"):
        ds[0]
    ds[1]  # the other samples are fine


def test_modalities_of_different_sizes_are_named(tmp_path):
    root = write_sample_dataset(tmp_path / "folder", "folder", count=4, size=SIZE)
    cv2.imwrite(str(root / "thermal" / "00000D.png"), np.zeros((32, 48), np.uint16))
    ds = build_dataset("folder", root, "train", SYN)
    with pytest.raises(DatasetError, match=r"thermal/00000D\.png is 48x32") as err:
        ds[0]
    assert "rgb/00000D.png is 96x64" in str(err.value)


def test_bad_kind_split_and_options_are_rejected(layouts):
    with pytest.raises(ValueError, match="unknown dataset kind 'cityscapes'"):
        build_dataset("cityscapes", layouts["fmb"], "train", SYN)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        build_dataset("fmb", layouts["fmb"], "dev", SYN)
    with pytest.raises(ValueError, match="does not take options"):
        build_dataset("fmb", layouts["fmb"], "train", SYN, count=3)

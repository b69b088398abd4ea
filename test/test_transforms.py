"""Joint transforms: geometry moves all modalities together, photometry touches one, randomness is seeded."""

import numpy as np
import pytest
import torch

from rgbt_seg_ros.data.transforms import (
    ColorJitter,
    Compose,
    HorizontalFlip,
    ModalityDropout,
    PadToMultiple,
    RandomCrop,
    RandomScale,
    Resize,
    ThermalGainNoise,
    build_eval_transform,
    build_train_transform,
)


def make_item(h=60, w=90, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.zeros((h, w), np.int64)
    labels[:, w // 3 :] = 1
    labels[h // 2 :, :] = 2
    labels[0, 0] = 255
    valid = np.ones((1, h, w), np.float32)
    valid[:, :, :5] = 0.0
    thermal = rng.random((1, h, w), dtype=np.float32) * valid
    return {
        "rgb": rng.random((3, h, w), dtype=np.float32),
        "thermal": thermal,
        "valid": valid,
        "labels": labels,
        "name": "x",
        "condition": "day",
    }


def assert_items_equal(a, b):
    for key in ("rgb", "thermal", "valid", "labels"):
        np.testing.assert_array_equal(a[key], b[key])


def test_train_pipeline_gives_crop_size_multiples_of_32_and_keeps_label_ids():
    t = build_train_transform({"crop_size": [64, 96]})
    for seed in range(5):
        out = t(make_item(), np.random.default_rng(seed))
        assert out["rgb"].shape == (3, 64, 96) and out["thermal"].shape == (1, 64, 96)
        assert out["valid"].shape == (1, 64, 96) and out["labels"].shape == (64, 96)
        assert out["rgb"].dtype == np.float32 and out["labels"].dtype == np.int64
        assert set(np.unique(out["labels"])) <= {0, 1, 2, 255}  # nearest: no blended ids
        assert set(np.unique(out["valid"])) <= {0.0, 1.0}
        assert out["name"] == "x" and out["condition"] == "day"
    with pytest.raises(ValueError, match="multiples of 32"):
        RandomCrop((60, 96))


def test_crop_pads_labels_with_ignore_and_valid_with_zero():
    item = make_item(40, 50)
    out = RandomCrop((64, 64))(item, np.random.default_rng(0))
    # The image is smaller than the crop: it sits at the top-left, the rest is padding.
    np.testing.assert_array_equal(out["labels"][:40, :50], item["labels"])
    assert np.all(out["labels"][40:, :] == 255) and np.all(out["labels"][:, 50:] == 255)
    assert np.all(out["valid"][:, 40:, :] == 0) and np.all(out["valid"][:, :, 50:] == 0)
    assert np.all(out["rgb"][:, 40:, :] == 0) and np.all(out["thermal"][:, :, 50:] == 0)


def test_eval_transform_pads_to_a_multiple_of_32():
    out = build_eval_transform({})(make_item(60, 90))
    assert out["rgb"].shape == (3, 64, 96) and out["labels"].shape == (64, 96)
    assert np.all(out["labels"][60:] == 255) and np.all(out["valid"][:, :, 90:] == 0)
    resized = build_eval_transform({"size": [64, 128]})(make_item(60, 90))
    assert resized["rgb"].shape == (3, 64, 128) and resized["labels"].shape == (64, 128)
    native = Compose([Resize((64, 96), resize_labels=False), PadToMultiple(32)])(make_item(60, 90))
    assert native["rgb"].shape == (3, 64, 96) and native["labels"].shape == (60, 90)


def test_same_seed_same_result_different_seed_different_result():
    t = build_train_transform({"crop_size": [32, 64], "modality_dropout": {"p_rgb": 0.2, "p_thermal": 0.2}})
    a = t(make_item(), np.random.default_rng(7))
    b = t(make_item(), np.random.default_rng(7))
    assert_items_equal(a, b)
    c = t(make_item(), np.random.default_rng(8))
    assert not np.array_equal(a["rgb"], c["rgb"])
    # Without an explicit generator the seed comes from torch's RNG (DataLoader workers seed it).
    torch.manual_seed(3)
    d = t(make_item())
    torch.manual_seed(3)
    e = t(make_item())
    assert_items_equal(d, e)


def test_modality_dropout_blanks_exactly_one_modality():
    item = make_item()
    out = ModalityDropout(p_rgb=0.0, p_thermal=1.0)(item, np.random.default_rng(0))
    assert not out["thermal"].any() and not out["valid"].any()
    np.testing.assert_array_equal(out["rgb"], item["rgb"])
    out = ModalityDropout(p_rgb=1.0, p_thermal=0.0)(item, np.random.default_rng(0))
    assert not out["rgb"].any()
    np.testing.assert_array_equal(out["thermal"], item["thermal"])
    np.testing.assert_array_equal(out["valid"], item["valid"])
    np.testing.assert_array_equal(out["labels"], item["labels"])
    drop = ModalityDropout(p_rgb=0.3, p_thermal=0.5)
    rng = np.random.default_rng(1)
    counts = {"rgb": 0, "thermal": 0, "none": 0}
    for _ in range(400):
        o = drop(item, rng)
        rgb_off, th_off = not o["rgb"].any(), not o["thermal"].any()
        assert not (rgb_off and th_off)
        counts["rgb" if rgb_off else "thermal" if th_off else "none"] += 1
    assert 80 < counts["rgb"] < 160 and 160 < counts["thermal"] < 240
    with pytest.raises(ValueError, match="p_rgb \\+ p_thermal <= 1"):
        ModalityDropout(0.6, 0.6)


def test_color_jitter_changes_rgb_only_and_thermal_noise_changes_thermal_only():
    item = make_item()
    out = ColorJitter(0.4, 0.4, 0.4, 0.05, p=1.0)(item, np.random.default_rng(0))
    assert not np.allclose(out["rgb"], item["rgb"])
    assert 0.0 <= out["rgb"].min() and out["rgb"].max() <= 1.0
    for key in ("thermal", "valid", "labels"):
        np.testing.assert_array_equal(out[key], item[key])
    out = ThermalGainNoise(0.2, 0.1, 0.05, p=1.0)(item, np.random.default_rng(0))
    assert not np.allclose(out["thermal"], item["thermal"])
    assert np.all(out["thermal"][item["valid"] == 0] == 0)  # no signal appears where the camera sees nothing
    for key in ("rgb", "valid", "labels"):
        np.testing.assert_array_equal(out[key], item[key])


def test_flip_and_scale_move_all_modalities_together():
    item = make_item()
    out = HorizontalFlip(p=1.0)(item, np.random.default_rng(0))
    for key in ("rgb", "thermal", "valid"):
        np.testing.assert_array_equal(out[key], item[key][:, :, ::-1])
    np.testing.assert_array_equal(out["labels"], item["labels"][:, ::-1])
    scaled = RandomScale(2.0, 2.0)(item, np.random.default_rng(0))
    assert scaled["rgb"].shape == (3, 120, 180) and scaled["labels"].shape == (120, 180)
    np.testing.assert_array_equal(scaled["labels"][1::2, 1::2][5:, 5:], item["labels"][5:, 5:])
    np.testing.assert_array_equal(scaled["valid"][0, :, :10], 0.0)  # the invalid strip doubles in width


def test_config_errors_name_the_option():
    with pytest.raises(ValueError, match="unknown train transform options \\['crop'\\]"):
        build_train_transform({"crop": [32, 32]})
    with pytest.raises(ValueError, match="color_jitter"):
        build_train_transform({"color_jitter": 0.3})
    t = build_train_transform({"crop_size": [32, 32], "scale": False, "color_jitter": False, "thermal_noise": False})
    assert [type(s).__name__ for s in t.transforms] == ["RandomCrop", "HorizontalFlip"]

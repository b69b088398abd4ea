"""The synthetic RGB-T generator: determinism, geometry, and the properties that make it a useful test set."""

import cv2
import numpy as np
import pytest

from rgbt_seg_ros.data.synthetic import (
    CLASS_NAMES,
    CONDITIONS,
    CONE,
    COUNTS_PER_KELVIN,
    PERSON,
    SIGN,
    SceneGenerator,
)
from rgbt_seg_ros.models.classes import load_dataset_info

SIZE = dict(rgb_size=(240, 320), thermal_size=(256, 320))


def test_class_ids_match_the_dataset_file():
    info = load_dataset_info("synthetic")
    assert info.class_names == CLASS_NAMES
    assert info.num_classes >= 6 and info.palette.shape == (info.num_classes, 3)


def test_same_seed_same_scene_other_seed_other_scene():
    a, b = SceneGenerator(seed=3, **SIZE), SceneGenerator(seed=3, **SIZE)
    for cond in CONDITIONS:
        sa, sb = a.sample(2, cond), b.sample(2, cond)
        np.testing.assert_array_equal(sa.rgb, sb.rgb)
        np.testing.assert_array_equal(sa.thermal, sb.thermal)
        np.testing.assert_array_equal(sa.labels, sb.labels)
    c = SceneGenerator(seed=4, **SIZE).sample(2, "day")
    assert not np.array_equal(c.labels, a.sample(2, "day").labels)
    # conditions share the layout of a scene index; frames differ only by noise
    np.testing.assert_array_equal(a.sample(5, "day").labels, a.sample(5, "night").labels)
    assert not np.array_equal(a.sample(5, "day", frame=0).rgb, a.sample(5, "day", frame=1).rgb)


def test_formats_and_sizes():
    s = SceneGenerator(seed=0, **SIZE).sample(0, "day")
    assert s.rgb.shape == (240, 320, 3) and s.rgb.dtype == np.uint8
    assert s.thermal.shape == (256, 320) and s.thermal.dtype == np.uint16
    assert s.labels.shape == (240, 320) and s.labels.dtype == np.uint8
    kelvin = s.thermal / COUNTS_PER_KELVIN
    assert 200 < kelvin.min() and kelvin.max() < 350  # radiometric counts, plausible temperatures
    assert s.labels.max() < len(CLASS_NAMES)


def _registered_kelvin(gen, sample):
    h, w = gen.rgb_size
    return cv2.warpPerspective(sample.thermal.astype(np.float32), gen.homography, (w, h)) / COUNTS_PER_KELVIN


def _contrast_to_noise(image, labels, cls, valid):
    """Mean |inside - surrounding ring| / ring std over the channels; the best channel counts."""
    inside = (labels == cls) & valid
    ring = cv2.dilate(inside.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool) & ~inside & valid
    if inside.sum() < 20 or ring.sum() < 20:
        return None
    img = image.reshape(image.shape[0], image.shape[1], -1).astype(np.float64)
    best = 0.0
    for c in range(img.shape[2]):
        ch = cv2.GaussianBlur(img[:, :, c], (5, 5), 0)
        noise = img[:, :, c][ring].std() + 1e-6
        best = max(best, abs(ch[inside].mean() - ch[ring].mean()) / noise)
    return best


def _median_cnr(gen, cls, condition, modality, scenes=range(8)):
    values = []
    valid = gen.thermal_valid_mask()
    valid = cv2.erode(valid.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    for i in scenes:
        s = gen.sample(i, condition)
        image = s.rgb if modality == "rgb" else _registered_kelvin(gen, s)
        v = _contrast_to_noise(image, s.labels, cls, valid)
        if v is not None:
            values.append(v)
    assert len(values) >= 3
    return float(np.median(values))


@pytest.fixture(scope="module")
def gen():
    return SceneGenerator(seed=11, **SIZE)


def test_people_vanish_from_rgb_at_night_but_not_from_thermal(gen):
    rgb_day = _median_cnr(gen, PERSON, "day", "rgb")
    rgb_night = _median_cnr(gen, PERSON, "night", "rgb")
    thermal_night = _median_cnr(gen, PERSON, "night", "thermal")
    assert rgb_night < 1.0 < rgb_day, (rgb_day, rgb_night)
    assert thermal_night > 3.0, thermal_night  # also proves the homography registers thermal onto the labels


@pytest.mark.parametrize("cls", [CONE, SIGN])
def test_cold_classes_are_invisible_in_thermal_but_visible_in_rgb(gen, cls):
    thermal = _median_cnr(gen, cls, "day", "thermal")
    rgb = _median_cnr(gen, cls, "day", "rgb")
    assert thermal < 1.0 < rgb, (thermal, rgb)


def test_fog_and_glare_degrade_rgb(gen):
    day = gen.sample(1, "day").rgb.astype(np.float32)
    fog = gen.sample(1, "fog").rgb.astype(np.float32)
    glare = gen.sample(1, "glare").rgb
    assert fog.std() < 0.7 * day.std()  # washed out
    assert (glare >= 250).all(axis=2).mean() > 0.02  # a saturated bloom


def test_homography_is_saved_and_thermal_covers_most_of_the_rgb_view(gen):
    cal = gen.calibration_dict()
    assert cal["mode"] == "homography" and cal["thermal_size"] == [320, 256] and cal["rgb_size"] == [320, 240]
    np.testing.assert_allclose(np.array(cal["homography"]), gen.homography)
    coverage = gen.thermal_valid_mask().mean()
    assert 0.85 < coverage < 1.0  # a realistic rig: a thin border the thermal camera does not see


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown condition"):
        SceneGenerator().sample(0, "rain")
    with pytest.raises(ValueError, match="rgb_size"):
        SceneGenerator(rgb_size=(4, 4))

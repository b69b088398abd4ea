"""render: palette parsing, colourising, overlay blending, legend and contact sheets."""

import numpy as np
import pytest

from rgbt_seg_ros.models.classes import load_dataset_info
from rgbt_seg_ros.pipeline.render import blend_overlay, colorize, contact_sheet, legend, parse_palette, thermal_to_rgb


def test_parse_palette_forms():
    np.testing.assert_array_equal(parse_palette([0xFF0000, 0x00FF80]), [[255, 0, 0], [0, 255, 128]])
    np.testing.assert_array_equal(parse_palette([[1, 2, 3]]), [[1, 2, 3]])
    with pytest.raises(ValueError, match="has 1 colours but the model has 3 classes"):
        parse_palette([[1, 2, 3]], num_classes=3)
    with pytest.raises(ValueError, match="0..255"):
        parse_palette([[1, 2, 300]])


def test_colorize_and_ignore_color():
    palette = np.array([[0, 0, 0], [10, 20, 30]], np.uint8)
    labels = np.array([[0, 1], [255, 1]], np.uint8)
    out = colorize(labels, palette)
    np.testing.assert_array_equal(out[0, 1], [10, 20, 30])
    np.testing.assert_array_equal(out[1, 0], [255, 255, 255])
    big = np.array([[300]], np.uint16)
    np.testing.assert_array_equal(colorize(big, palette)[0, 0], [255, 255, 255])


def test_blend_overlay_is_the_weighted_mean():
    rgb = np.full((2, 3, 3), 100, np.uint8)
    labels = np.ones((2, 3), np.uint8)
    palette = np.array([[0, 0, 0], [200, 0, 50]], np.uint8)
    out = blend_overlay(rgb, labels, palette, alpha=0.5)
    np.testing.assert_array_equal(out[0, 0], [150, 50, 75])
    np.testing.assert_array_equal(blend_overlay(rgb, labels, palette, alpha=0.0), rgb)
    with pytest.raises(ValueError, match="alpha"):
        blend_overlay(rgb, labels, palette, alpha=1.5)
    with pytest.raises(ValueError, match="size"):
        blend_overlay(rgb, labels[:1], palette)


def test_legend_sheet_and_thermal_display():
    info = load_dataset_info("synthetic")
    leg = legend(info.class_names, info.palette)
    assert leg.shape[0] >= 22 * info.num_classes and leg.dtype == np.uint8
    assert (leg != 255).any()
    sheet = contact_sheet([np.zeros((48, 64, 3), np.uint8)] * 5, cols=2, captions=["a"] * 5, tile_width=64)
    assert sheet.shape[1] == 2 * 64 + 3 * 4 and sheet.shape[0] > 3 * 48
    th = thermal_to_rgb(np.array([[0.0, np.nan, 1.0]], np.float32))
    assert th.shape == (1, 3, 3) and not np.array_equal(th[0, 0], th[0, 2])

"""rgbt-seg calibrate on synthetic checkerboard renders in both modalities with a known homography."""

from __future__ import annotations

import argparse

import cv2
import numpy as np
import pytest
import yaml

from rgbt_seg_ros.registration import ThermalRegistrar
from rgbt_seg_ros.tools import calibrate

BOARD = (8, 5)
RGB_WH, THERMAL_WH = (640, 480), (640, 512)


def true_homography() -> np.ndarray:
    theta = np.deg2rad(-2.0)
    c, s = np.cos(theta), np.sin(theta)
    h = np.array([[1, 0, 325], [0, 1, 236], [0, 0, 1.0]]) @ np.array([[1, 0, 0], [0, 1, 0], [1e-4, 8e-5, 1]])
    h = (
        h
        @ np.array([[0.95 * c, -0.95 * s, 0], [0.95 * s, 0.95 * c, 0], [0, 0, 1]])
        @ np.array([[1, 0, -320], [0, 1, -256], [0, 0, 1.0]])
    )
    return h / h[2, 2]


def write_views(tmp_path, n=3, seed=0):
    """n board poses rendered in RGB (uint8 colour) and thermal (16-bit, inverted, low contrast, noisy)."""
    rng = np.random.default_rng(seed)
    h = true_homography()
    rgb_paths, thermal_paths = [], []
    for i in range(n):
        sq = rng.uniform(26, 34)
        g = np.array(
            [
                [sq, rng.uniform(-4, 4), rng.uniform(90, 250)],
                [rng.uniform(-4, 4), sq, rng.uniform(80, 200)],
                [rng.uniform(-3e-4, 3e-4), rng.uniform(-3e-4, 3e-4), 1.0],
            ]
        )  # board squares -> RGB pixels
        rgb_to_board = np.linalg.inv(g)
        thermal_to_board = np.linalg.inv(np.linalg.inv(h) @ g)
        rgb01 = calibrate.render_board(
            RGB_WH, lambda p, m=rgb_to_board: cv2.perspectiveTransform(p[:, None], m)[:, 0], *BOARD
        )
        th01 = calibrate.render_board(
            THERMAL_WH, lambda p, m=thermal_to_board: cv2.perspectiveTransform(p[:, None], m)[:, 0], *BOARD
        )
        rgb = np.clip(
            40 + 180 * rgb01[:, :, None] * np.array([1.0, 0.95, 0.9]) + rng.normal(0, 2, (480, 640, 3)), 0, 255
        )
        # thermal: the dark squares are warm (inverted), 2 K of contrast at 100 counts/K, sensor noise
        counts = 30_000 + 200 * (1.0 - th01) + rng.normal(0, 4, th01.shape)
        rp, tp = tmp_path / f"rgb_{i}.png", tmp_path / f"thermal_{i}.png"
        cv2.imwrite(str(rp), rgb.astype(np.uint8))
        cv2.imwrite(str(tp), counts.astype(np.uint16))
        rgb_paths.append(str(rp))
        thermal_paths.append(str(tp))
    return rgb_paths, thermal_paths


def parse(argv):
    parser = argparse.ArgumentParser()
    calibrate.add_arguments(parser)
    return parser.parse_args(argv)


def grid_error(h_est: np.ndarray, h_true: np.ndarray) -> float:
    """Mean distance between the two mappings over a grid covering the thermal image."""
    xs, ys = np.meshgrid(np.linspace(0, 639, 17), np.linspace(0, 511, 13))
    pts = np.column_stack([xs.ravel(), ys.ravel()])[:, None]
    a = cv2.perspectiveTransform(pts, h_est)[:, 0]
    b = cv2.perspectiveTransform(pts, h_true)[:, 0]
    return float(np.linalg.norm(a - b, axis=1).mean())


def test_calibrate_recovers_the_known_homography(tmp_path, capsys):
    rgb, thermal = write_views(tmp_path)
    out = tmp_path / "cal" / "calibration.yaml"
    code = calibrate.run(parse(["--rgb", *rgb, "--thermal", *thermal, "--board", "8x5", "--out", str(out)]))
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "reprojection error mean" in printed
    data = yaml.safe_load(out.read_text())
    assert data["mode"] == "homography" and data["thermal_size"] == [640, 512] and data["rgb_size"] == [640, 480]
    assert data["fit"]["correspondences"] == 3 * 40
    h_est = np.array(data["homography"])
    err = grid_error(h_est, true_homography())
    print(f"calibrate: mean error over the thermal image {err:.3f} px; fit {data['fit']}")
    assert err <= 1.0
    assert data["fit"]["mean_error_px"] < 0.5
    # the file is a registration the registrar loads, and the check image was written
    assert ThermalRegistrar.from_yaml(out).mode == "homography"
    check = cv2.imread(str(out.with_name("calibration_check.png")))
    assert check is not None and check.shape == (480, 640, 3)


def test_inverted_thermal_flag_and_single_pair(tmp_path):
    rgb, thermal = write_views(tmp_path, n=1, seed=3)
    out = tmp_path / "c.yaml"
    assert (
        calibrate.run(
            parse(["--rgb", *rgb, "--thermal", *thermal, "--board", "8x5", "--invert-thermal", "--out", str(out)])
        )
        == 0
    )
    assert grid_error(np.array(yaml.safe_load(out.read_text())["homography"]), true_homography()) <= 1.0


def test_hand_picked_points(tmp_path):
    h = true_homography()
    rng = np.random.default_rng(1)
    th = rng.uniform([20, 20], [620, 490], (12, 2))
    rgb = cv2.perspectiveTransform(th[:, None], h)[:, 0] + rng.normal(0, 0.3, (12, 2))
    rgb[0] += (40, -25)  # one mis-click: RANSAC must reject it
    points = {
        "thermal_size": [640, 512],
        "rgb_size": [640, 480],
        "points": [{"thermal": t.tolist(), "rgb": r.tolist()} for t, r in zip(th, rgb)],
    }
    pf = tmp_path / "points.yaml"
    pf.write_text(yaml.safe_dump(points))
    out = tmp_path / "p.yaml"
    assert calibrate.run(parse(["--points", str(pf), "--out", str(out)])) == 0
    data = yaml.safe_load(out.read_text())
    assert data["fit"]["inliers"] == 11
    assert grid_error(np.array(data["homography"]), h) <= 1.0


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (["--board", "8-5"], "--board must be COLSxROWS"),
        (["--board", "7x5"], "no image pair had a 7x5 board"),
    ],
)
def test_user_errors_are_one_sentence(tmp_path, capsys, argv_tail, message):
    rgb, thermal = write_views(tmp_path, n=1)
    code = calibrate.run(parse(["--rgb", *rgb, "--thermal", *thermal, *argv_tail, "--out", str(tmp_path / "x.yaml")]))
    assert code == 2
    assert message in capsys.readouterr().err


def test_missing_image_and_count_mismatch_are_named(tmp_path, capsys):
    assert calibrate.run(parse(["--rgb", "nope.png", "--thermal", "nope_t.png", "--board", "8x5"])) == 2
    assert "cannot read RGB image nope.png" in capsys.readouterr().err
    assert calibrate.run(parse(["--rgb", "a.png", "b.png", "--thermal", "a_t.png", "--board", "8x5"])) == 2
    assert "--rgb has 2 images but --thermal has 1" in capsys.readouterr().err

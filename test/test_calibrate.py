"""rgbt-seg calibrate on synthetic checkerboard renders in both modalities with a known homography."""

from __future__ import annotations

import argparse
import json
import math
import shutil

import cv2
import numpy as np
import pytest
import yaml

from rgbt_seg_ros.pipeline.registration import ThermalRegistrar
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


# ----------------------------------------------------------------------------- --check
@pytest.fixture(scope="module")
def sample_bags(tmp_path_factory):
    """Two small sample bags with their calibration.yaml: the rig as calibrated, and with thermal moved (8, -4) px."""
    from rgbt_seg_ros.data.sample_bag import write_sample_bag

    root = tmp_path_factory.mktemp("check")
    return {
        name: write_sample_bag(root / name, frames=12, thermal_shift_px=shift)
        for name, shift in (("aligned", (0.0, 0.0)), ("moved", (8.0, -4.0)))
    }


def test_check_finds_a_moved_thermal_camera_in_a_bag(sample_bags, tmp_path, capsys):
    bag = sample_bags["moved"]
    out = tmp_path / "check.json"
    code = calibrate.run(
        parse(["--check", str(bag.parent / "calibration.yaml"), "--bag", str(bag), "--json", str(out)])
    )
    printed = capsys.readouterr().out
    assert code == 1, printed
    assert "pair 0 (RGB stamp" in printed and "thermal sits (+8." in printed and "px off: recalibrate" in printed
    data = json.loads(out.read_text())
    summary = data["summary"]
    assert summary["verdict"] == "off" and summary["exit_code"] == 1 and summary["error"] is None
    assert math.hypot(summary["median_dx"] - 8.0, summary["median_dy"] + 4.0) < 1.0, summary
    assert summary["checked"] == len(data["pairs"]) >= 10 and summary["confident"] >= 5
    assert all({"dx", "dy", "confidence", "rgb_stamp_ns", "thermal_stamp_ns"} <= set(p) for p in data["pairs"])


def test_check_of_the_rig_as_calibrated_fits_through_the_cli(sample_bags, capsys):
    from rgbt_seg_ros import cli

    bag = sample_bags["aligned"]
    code = cli.main(["calibrate", "--check", str(bag.parent / "calibration.yaml"), "--bag", str(bag), "--every", "2"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "checked 6 pair(s)" in printed and "the calibration fits" in printed


def test_check_keeps_the_pairs_read_before_a_bag_is_cut_off(sample_bags, tmp_path, capsys):
    bag = sample_bags["moved"]
    cut = tmp_path / "cut"
    shutil.copytree(bag, cut)
    data_file = next(cut.glob("*.mcap"))
    data_file.write_bytes(data_file.read_bytes()[: int(data_file.stat().st_size * 0.6)])
    out = tmp_path / "cut.json"
    code = calibrate.run(
        parse(["--check", str(bag.parent / "calibration.yaml"), "--bag", str(cut), "--json", str(out)])
    )
    err = capsys.readouterr().err
    summary = json.loads(out.read_text())["summary"]
    assert code == 1 and 0 < summary["checked"] < 12
    assert f"{summary['checked']} pair(s) were checked before it" in err and "cut off" in err
    assert summary["error"] and "cut off" in summary["error"]


def test_check_of_structureless_images_cannot_tell(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rgb, thermal = [], []
    for i in range(2):  # a lens cap, a white wall: flat images with sensor noise only
        rp, tp = tmp_path / f"flat_{i}.png", tmp_path / f"flat_{i}_t.png"
        cv2.imwrite(str(rp), np.clip(120 + rng.normal(0, 3, (240, 320, 3)), 0, 255).astype(np.uint8))
        cv2.imwrite(str(tp), (30000 + rng.normal(0, 20, (240, 320))).astype(np.uint16))
        rgb.append(str(rp))
        thermal.append(str(tp))
    cal = tmp_path / "identity.yaml"
    cal.write_text("mode: identity\n")
    code = calibrate.run(parse(["--check", str(cal), "--rgb", *rgb, "--thermal", *thermal]))
    printed = capsys.readouterr().out
    assert code == 3, printed
    assert "flat_0.png + flat_0_t.png: offset" in printed and "not enough structure to tell" in printed


def test_check_input_errors_are_one_sentence(sample_bags, tmp_path, capsys):
    bag = sample_bags["aligned"]
    cal = str(bag.parent / "calibration.yaml")
    assert calibrate.run(parse(["--check", cal, "--bag", str(bag), "--rgb-topic", "/camera/color"])) == 2
    err = capsys.readouterr().err
    assert "has no topic /camera/color; topics in the bag:" in err and "/rgb/image" in err and "/thermal/image" in err
    assert calibrate.run(parse(["--check", str(tmp_path / "none.yaml"), "--bag", str(bag)])) == 2
    assert "none.yaml" in capsys.readouterr().err
    assert calibrate.run(parse(["--check", cal, "--rgb", "a.png", "b.png", "--thermal", "a_t.png"])) == 2
    assert "--rgb has 2 images but --thermal has 1" in capsys.readouterr().err
    assert calibrate.run(parse(["--check", cal, "--bag", str(bag), "--board", "9x6"])) == 2
    assert "--board is for fitting a calibration" in capsys.readouterr().err
    assert calibrate.run(parse(["--bag", str(bag)])) == 2
    assert "give --check CALIBRATION.yaml" in capsys.readouterr().err

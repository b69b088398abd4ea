"""ThermalRegistrar: accuracy on synthetic views with known geometry, caching, loading, errors."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import yaml

from rgbt_seg_ros.pipeline.registration import RegistrationError, ThermalRegistrar
from rgbt_seg_ros.tools.calibrate import detect_corners, render_board, to_gray8

REPO = Path(__file__).resolve().parent.parent
BOARD = (9, 6)  # inner corners
RGB_WH, THERMAL_WH = (640, 480), (640, 512)


def board_corners() -> np.ndarray:
    """Inner corners in board units (squares), row-major like OpenCV's detectors."""
    return np.array([(i, j) for j in range(1, BOARD[1] + 1) for i in range(1, BOARD[0] + 1)], np.float64)


def detect_sorted(gray: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Detect the board and order the corners like `truth` (the detector may start at either end)."""
    found = detect_corners(gray, BOARD)
    assert found is not None, "board not detected in the warped image"
    rev = found[::-1]
    return found if np.linalg.norm(found - truth, axis=1).mean() < np.linalg.norm(rev - truth, axis=1).mean() else rev


def thermal_counts(img01: np.ndarray) -> np.ndarray:
    """Board rendering in [0, 1] -> 16-bit radiometric counts around 300 K (low contrast, like a real board)."""
    return (29_500 + 1_500 * img01).astype(np.uint16)


# ----------------------------------------------------------------------------- homography mode
def known_homography() -> np.ndarray:
    """Thermal (640x512) -> RGB (640x480): scale, roll, shift and a perspective term."""
    theta = np.deg2rad(3.0)
    c, s = np.cos(theta), np.sin(theta)
    a = np.array([[0.9 * c, -0.9 * s, 0], [0.9 * s, 0.9 * c, 0], [0, 0, 1]])
    to_c = np.array([[1, 0, -320], [0, 1, -256], [0, 0, 1.0]])
    to_rgb = np.array([[1, 0, 330], [0, 1, 235], [0, 0, 1.0]])
    persp = np.array([[1, 0, 0], [0, 1, 0], [1.5e-4, -1e-4, 1]])
    h = to_rgb @ persp @ a @ to_c
    return h / h[2, 2]


def board_in_rgb() -> np.ndarray:
    """Board units -> RGB pixels: a slightly tilted board of ~34 px squares around the image centre."""
    g = np.array([[34.0, 4.0, 150.0], [-3.0, 33.0, 110.0], [2e-5, 1e-5, 1.0]])
    return g


def test_homography_mode_corner_error_below_half_pixel():
    h_true = known_homography()
    g = board_in_rgb()  # board -> RGB
    board_to_thermal = np.linalg.inv(h_true) @ g
    thermal_to_board = np.linalg.inv(board_to_thermal)
    img = render_board(THERMAL_WH, lambda p: cv2.perspectiveTransform(p[:, None], thermal_to_board)[:, 0], *BOARD)
    thermal = thermal_counts(img)
    reg = ThermalRegistrar("homography", homography=h_true, thermal_size=THERMAL_WH, rgb_size=RGB_WH)
    warped, valid = reg.warp(thermal, (480, 640))
    assert warped.dtype == np.uint16 and warped.shape == (480, 640) and valid.dtype == bool
    truth = cv2.perspectiveTransform(board_corners()[:, None], g)[:, 0]
    found = detect_sorted(to_gray8(warped), truth)
    err = np.linalg.norm(found - truth, axis=1).mean()
    print(f"homography mode: mean corner error {err:.3f} px")
    assert err <= 0.5
    # the same check must fail with the wrong geometry: the unwarped (identity) image is far off
    ident, _ = ThermalRegistrar.identity().warp(thermal, (480, 640))
    off = detect_corners(to_gray8(ident), BOARD)
    assert (
        off is None
        or np.linalg.norm(off - truth, axis=1).mean() > 5
        and np.linalg.norm(off[::-1] - truth, axis=1).mean() > 5
    )


def test_homography_is_rescaled_when_images_are_resized():
    h_true = known_homography()
    reg = ThermalRegistrar("homography", homography=h_true, thermal_size=THERMAL_WH, rgb_size=RGB_WH)
    pts_t = np.array([[100.0, 80.0], [500.0, 60.0], [320.0, 400.0]])
    full = reg.thermal_to_rgb_points(pts_t, THERMAL_WH, RGB_WH)
    # half-size thermal and half-size RGB: pixel-centre convention x' = (x + 0.5) * s - 0.5
    half = reg.thermal_to_rgb_points((pts_t + 0.5) * 0.5 - 0.5, (320, 256), (320, 240))
    np.testing.assert_allclose(half, (full + 0.5) * 0.5 - 0.5, atol=1e-9)
    # a warp at half size agrees with the full-size warp, downsampled
    ramp = np.tile(np.arange(640, dtype=np.float32), (512, 1))
    small, _ = reg.warp(cv2.resize(ramp, (320, 256), interpolation=cv2.INTER_AREA), (240, 320))
    big, valid = reg.warp(ramp, (480, 640))
    down = cv2.resize(big, (320, 240), interpolation=cv2.INTER_AREA)
    inner = cv2.erode(valid.astype(np.uint8), np.ones((9, 9), np.uint8))[::2, ::2].astype(bool)
    assert np.abs(small - down)[inner].mean() < 1.5  # ramp slope ~0.5 value/px at half size


def test_validity_mask_matches_the_thermal_footprint():
    h_true = known_homography()
    reg = ThermalRegistrar("homography", homography=h_true, thermal_size=THERMAL_WH, rgb_size=RGB_WH)
    warped, valid = reg.warp(np.full((512, 640), 1000, np.uint16), (480, 640))
    footprint = np.zeros((480, 640), np.uint8)
    corners = np.array([[0, 0], [639, 0], [639, 511], [0, 511]], np.float64)
    poly = cv2.perspectiveTransform(corners[:, None], h_true)[:, 0]
    cv2.fillPoly(footprint, [np.round(poly * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
    disagree = (footprint.astype(bool) != valid).mean()
    assert 0.05 < 1 - valid.mean() < 0.6  # part of the RGB image is not seen by the thermal camera
    assert disagree < 0.005  # only boundary pixels
    assert np.all(warped[valid] == 1000) and np.all(warped[~valid] == 0)


# ----------------------------------------------------------------------------- calibrated mode
RGB_K = np.array([[600.0, 0, 322.0], [0, 600.0, 238.0], [0, 0, 1]])
RGB_D = np.array([-0.12, 0.06, 0.001, -0.0008, 0.0])
T_K = np.array([[480.0, 0, 318.0], [0, 480.0, 260.0], [0, 0, 1]])
T_D = np.array([-0.25, 0.09, 0.0005, 0.0003, 0.0])
RVEC = np.array([0.012, -0.02, 0.01])
TRANS = np.array([0.09, -0.015, 0.005])  # thermal origin in the RGB frame, metres
PLANE = 3.0


def camera_yaml(k, d, wh) -> dict:
    return {
        "image_width": wh[0],
        "image_height": wh[1],
        "camera_name": "cam",
        "camera_matrix": {"rows": 3, "cols": 3, "data": k.ravel().tolist()},
        "distortion_model": "plumb_bob",
        "distortion_coefficients": {"rows": 1, "cols": 5, "data": d.tolist()},
    }


def calibrated_scene():
    """Board on the plane z_rgb = PLANE; returns (thermal image, true RGB corners)."""
    sq, x0, y0 = 0.16, -0.8, -0.55  # metres
    rot, _ = cv2.Rodrigues(RVEC)
    n_t = rot.T @ np.array([0, 0, 1.0])
    d_t = PLANE - TRANS[2]

    def thermal_to_board(pix):
        criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 50, 1e-12)
        if hasattr(cv2, "undistortPointsIter"):  # OpenCV 4.x: undistortPoints takes no criteria there
            norm = cv2.undistortPointsIter(pix[:, None], T_K, T_D, None, None, criteria)[:, 0]
        else:  # OpenCV 5 dropped undistortPointsIter for a criteria argument
            norm = cv2.undistortPoints(pix[:, None], T_K, T_D, criteria=criteria)[:, 0]
        rays = np.column_stack([norm, np.ones(len(norm))])
        x_t = rays * (d_t / (rays @ n_t))[:, None]
        x_r = x_t @ rot.T + TRANS
        return np.column_stack([(x_r[:, 0] - x0) / sq, (x_r[:, 1] - y0) / sq])

    img = render_board(THERMAL_WH, thermal_to_board, *BOARD, supersample=2)
    corners3d = np.column_stack([np.array([x0, y0]) + sq * board_corners(), np.full(len(board_corners()), PLANE)])
    truth, _ = cv2.projectPoints(corners3d, np.zeros(3), np.zeros(3), RGB_K, RGB_D)
    return thermal_counts(img), truth[:, 0]


def test_calibrated_mode_corner_error_below_half_pixel():
    thermal, truth = calibrated_scene()
    reg = ThermalRegistrar.from_camera_info(
        camera_yaml(RGB_K, RGB_D, RGB_WH), camera_yaml(T_K, T_D, THERMAL_WH), RVEC, TRANS, PLANE
    )
    warped, valid = reg.warp(thermal, (480, 640))
    found = detect_sorted(to_gray8(warped), truth)
    err = np.linalg.norm(found - truth, axis=1).mean()
    print(f"calibrated mode: mean corner error {err:.3f} px")
    assert err <= 0.5
    # the same check fails when the scene plane is wrong (1 m instead of 3 m: ~36 px of parallax)
    wrong_plane = ThermalRegistrar.from_camera_info(
        camera_yaml(RGB_K, RGB_D, RGB_WH), camera_yaml(T_K, T_D, THERMAL_WH), RVEC, TRANS, 1.0
    )
    w2, _ = wrong_plane.warp(thermal, (480, 640))
    bad = detect_corners(to_gray8(w2), BOARD)
    assert bad is None or min(np.linalg.norm(b - truth, axis=1).mean() for b in (bad, bad[::-1])) > 10.0


def test_camera_info_objects_and_yaml_dicts_give_the_same_maps():
    info = lambda k, d, wh: SimpleNamespace(k=k.ravel(), d=d, width=wh[0], height=wh[1], distortion_model="plumb_bob")  # noqa: E731
    a = ThermalRegistrar.from_camera_info(info(RGB_K, RGB_D, RGB_WH), info(T_K, T_D, THERMAL_WH), RVEC, TRANS, PLANE)
    b = ThermalRegistrar.from_camera_info(
        camera_yaml(RGB_K, RGB_D, RGB_WH), camera_yaml(T_K, T_D, THERMAL_WH), cv2.Rodrigues(RVEC)[0], TRANS, PLANE
    )
    pts = np.array([[10.0, 20.0], [320, 256], [600, 500]])
    np.testing.assert_allclose(
        a.thermal_to_rgb_points(pts, THERMAL_WH, RGB_WH), b.thermal_to_rgb_points(pts, THERMAL_WH, RGB_WH), atol=1e-9
    )


# ----------------------------------------------------------------------------- identity, dtypes, cache
def test_identity_resizes_and_keeps_dtype():
    reg = ThermalRegistrar.identity()
    for dtype in (np.uint8, np.uint16, np.float32, np.int32):
        t = (np.arange(256 * 320).reshape(256, 320) % 200).astype(dtype)
        out, valid = reg.warp(t, (480, 640))
        assert out.dtype == dtype and out.shape == (480, 640) and valid.all()
    same, _ = reg.warp(np.eye(4, dtype=np.float32), (4, 4))
    np.testing.assert_array_equal(same, np.eye(4, dtype=np.float32))


def test_maps_are_cached_and_the_cached_warp_is_fast():
    reg = ThermalRegistrar("homography", homography=known_homography(), thermal_size=THERMAL_WH, rgb_size=RGB_WH)
    thermal = (np.random.default_rng(0).random((512, 640)) * 30000).astype(np.uint16)
    t0 = time.perf_counter()
    reg.warp(thermal, (480, 640))
    first = time.perf_counter() - t0
    m1 = reg.maps((512, 640), (480, 640))
    assert reg.maps((512, 640), (480, 640)) is m1  # same objects: computed once
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        reg.warp(thermal, (480, 640))
        times.append(time.perf_counter() - t0)
    median_ms = 1e3 * float(np.median(times))
    print(f"registration with cached maps: {median_ms:.2f} ms per 640x480 frame (first call {1e3 * first:.1f} ms)")
    assert median_ms < 20.0


def test_interpolation_is_a_parameter():
    t = np.zeros((512, 640), np.float32)
    t[::2] = 1.0  # stripes: nearest keeps 0/1 values, linear blends them
    h = known_homography()
    near, v = ThermalRegistrar(
        "homography", homography=h, thermal_size=THERMAL_WH, rgb_size=RGB_WH, interpolation="nearest"
    ).warp(t, (480, 640))
    lin, _ = ThermalRegistrar("homography", homography=h, thermal_size=THERMAL_WH, rgb_size=RGB_WH).warp(t, (480, 640))
    assert set(np.unique(near[v]).tolist()) <= {0.0, 1.0}
    assert len(np.unique(lin[v])) > 10


# ----------------------------------------------------------------------------- YAML loading and errors
@pytest.mark.parametrize("name", ["identity", "homography", "calibrated"])
def test_example_yaml_files_load(name):
    path = REPO / "config" / "registration" / f"{name}.yaml"
    reg = ThermalRegistrar.from_yaml(path)
    assert reg.mode == name
    warped, valid = reg.warp(np.full((512, 640), 3.0, np.float32), (480, 640))
    assert warped.shape == (480, 640) and valid.mean() > 0.5


def test_yaml_written_by_the_synthetic_generator_format_loads(tmp_path):
    h = known_homography()
    data = {"mode": "homography", "homography": h.tolist(), "thermal_size": [640, 512], "rgb_size": [640, 480]}
    path = tmp_path / "calibration.yaml"
    path.write_text(yaml.safe_dump(data))
    reg = ThermalRegistrar.from_yaml(path, interpolation="cubic")
    np.testing.assert_allclose(reg.homography, h)
    assert reg.interpolation == cv2.INTER_CUBIC


@pytest.mark.parametrize(
    "data, words",
    [
        ({"homography": np.eye(3).tolist()}, ["mode"]),
        ({"mode": "affine"}, ["mode", "affine"]),
        ({"mode": "homography", "homography": np.eye(3).tolist(), "rgb_size": [640, 480]}, ["thermal_size"]),
        (
            {
                "mode": "homography",
                "homography": [[1, 2, 3], [2, 4, 6], [0, 0, 1]],
                "thermal_size": [640, 512],
                "rgb_size": [640, 480],
            },
            ["degenerate"],
        ),
        (
            {"mode": "homography", "homography": [[1, 0], [0, 1]], "thermal_size": [640, 512], "rgb_size": [640, 480]},
            ["3x3"],
        ),
        (
            {
                "mode": "homography",
                "homography": [[1, 0, 0], [0, 1, 0], [-0.01, 0, 1]],
                "thermal_size": [640, 512],
                "rgb_size": [640, 480],
            },
            ["folds"],
        ),
        (
            {"mode": "calibrated", "rgb_camera": {}, "thermal_camera": {}, "rotation": np.eye(3).tolist()},
            ["translation", "plane_distance"],
        ),
    ],
)
def test_bad_yaml_fails_with_a_sentence_naming_it(tmp_path, data, words):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RegistrationError) as info:
        ThermalRegistrar.from_yaml(path)
    text = str(info.value)
    assert str(path) in text
    for w in words:
        assert w in text


def test_size_mismatch_is_named():
    reg = ThermalRegistrar("homography", homography=known_homography(), thermal_size=THERMAL_WH, rgb_size=RGB_WH)
    with pytest.raises(RegistrationError, match=r"thermal image is 640x640 but the calibration is for 640x512"):
        reg.warp(np.zeros((640, 640), np.uint16), (480, 640))
    with pytest.raises(RegistrationError, match=r"RGB size is 640x640"):
        reg.warp(np.zeros((512, 640), np.uint16), (640, 640))


def test_bad_camera_info_is_named():
    with pytest.raises(RegistrationError, match="rgb camera_info.*camera matrix must be 9"):
        ThermalRegistrar.from_camera_info(
            {"k": [1, 2, 3], "width": 640, "height": 480}, camera_yaml(T_K, T_D, THERMAL_WH), RVEC, TRANS, PLANE
        )
    with pytest.raises(RegistrationError, match="plane_distance"):
        ThermalRegistrar.from_camera_info(
            camera_yaml(RGB_K, RGB_D, RGB_WH), camera_yaml(T_K, T_D, THERMAL_WH), RVEC, TRANS, -1.0
        )

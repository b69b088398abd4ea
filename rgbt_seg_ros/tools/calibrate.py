"""``rgbt-seg calibrate``: fit the thermal -> RGB homography from checkerboard views.

Detects a checkerboard (``--board COLSxROWS`` inner corners, as in camera_calibration's ``--size``)
in every RGB / thermal image pair with ``cv2.findChessboardCornersSB``.  Thermal boards are often
low-contrast and inverted (a heated board, or an emissivity target whose squares read warm where the
RGB image is dark), so each thermal image is tried as is, contrast-stretched with CLAHE, inverted,
and both (``--invert-thermal`` / ``--clahe`` try those first).  The corners of all pairs are fitted
together with RANSAC; the homography, image sizes and fit error go to a registration YAML
(``mode: homography``, the format ``ThermalRegistrar.from_yaml`` reads), and a blended check image
(thermal false colour over RGB, corners marked) is saved beside it.

``--points FILE.yaml`` takes hand-picked correspondences instead of images::

    thermal_size: [640, 512]     # width, height
    rgb_size: [640, 480]
    points:                      # at least 4
      - {thermal: [x, y], rgb: [x, y]}

``--check CALIBRATION.yaml`` fits nothing: it measures how far the thermal image registered by an
existing calibration sits from the RGB image, on the pairs of a bag (``--bag``, paired by the node's
pairer with its default ``sync.*``) or on an image set (``--rgb``/``--thermal``). The score is the
one the node's registration diagnostics report (:class:`~rgbt_seg_ros.pipeline.registration_health.OffsetEstimator`:
offset in RGB pixels and a confidence); the verdict rests on the median offset of the confident pairs.
A bag damaged part-way is checked up to the damage, which is reported beside the verdict.
Exit codes: 0 the calibration fits, 1 thermal sits off (recalibrate), 3 not enough structure to tell,
2 bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import yaml

from ..pipeline.params import SPEC_BY_NAME
from ..pipeline.registration import RegistrationError, ThermalRegistrar, check_homography


class CalibrationError(ValueError):
    """Input the calibration cannot use; the text names it and what was expected."""


# ----------------------------------------------------------------------------- board rendering
def render_board(
    size_wh: tuple[int, int],
    image_to_board: Callable[[np.ndarray], np.ndarray],
    cols: int,
    rows: int,
    dark: float = 0.0,
    light: float = 1.0,
    background: float = 0.5,
    supersample: int = 4,
) -> np.ndarray:
    """Render a checkerboard with anti-aliased edges (float64 image in [0, 1]-ish units).

    ``image_to_board`` maps pixel coordinates (N, 2) to board coordinates in squares (N, 2); the
    inner corners sit at integer board coordinates (1..cols, 1..rows), the squares span
    [0, cols + 1] x [0, rows + 1] and a one-square light margin surrounds them.  Used to build
    synthetic views with known geometry for tests and for checking a detector setup.
    """
    w, h = size_wh
    s = int(supersample)
    offs = (np.arange(s) + 0.5) / s - 0.5
    acc = np.zeros(h * w)
    ys, xs = np.mgrid[0:h, 0:w]
    base = np.column_stack([xs.ravel(), ys.ravel()]).astype(np.float64)
    for oy in offs:
        for ox in offs:
            uv = image_to_board(base + (ox, oy))
            u, v = uv[:, 0], uv[:, 1]
            inside = (u >= 0) & (u < cols + 1) & (v >= 0) & (v < rows + 1)
            margin = (u >= -1) & (u < cols + 2) & (v >= -1) & (v < rows + 2)
            parity = (np.floor(u).astype(np.int64) + np.floor(v).astype(np.int64)) % 2 == 0
            value = np.where(margin, light, background)
            value = np.where(inside & parity, dark, value)
            acc += value
    return (acc / (s * s)).reshape(h, w)


# ----------------------------------------------------------------------------- detection
def to_gray8(image: np.ndarray) -> np.ndarray:
    """Any single- or three-channel image -> uint8 grey, 16-bit/float stretched over 0.5..99.5 %."""
    img = np.asarray(image)
    if img.ndim == 3:
        if img.shape[2] == 1:
            img = img[:, :, 0]
        else:
            img = cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2GRAY)
    if img.dtype == np.uint8:
        return img
    f = img.astype(np.float64)
    finite = f[np.isfinite(f)]
    lo, hi = np.percentile(finite, (0.5, 99.5)) if finite.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((f - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)


def thermal_variants(gray: np.ndarray, invert_first: bool = False, clahe_first: bool = False):
    """(name, image) preprocessing variants for a thermal board, most likely first."""
    clahe = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(8, 8)).apply(gray)
    variants = {
        "plain": gray,
        "clahe": clahe,
        "inverted": 255 - gray,
        "clahe+inverted": 255 - clahe,
    }
    order = ["plain", "clahe", "inverted", "clahe+inverted"]
    if invert_first:
        order = ["inverted", "clahe+inverted", "plain", "clahe"]
    if clahe_first:
        order = sorted(order, key=lambda n: "clahe" not in n)
    return [(name, variants[name]) for name in order]


def detect_corners(gray: np.ndarray, board: tuple[int, int]) -> np.ndarray | None:
    """Inner corners (N, 2) float64 in row-major board order, or None."""
    flags = cv2.CALIB_CB_EXHAUSTIVE | cv2.CALIB_CB_ACCURACY | cv2.CALIB_CB_NORMALIZE_IMAGE
    found, corners = cv2.findChessboardCornersSB(gray, board, flags=flags)
    if not found or corners is None:
        found, corners = cv2.findChessboardCorners(gray, board, flags=cv2.CALIB_CB_ADAPTIVE_THRESH)
        if not found:
            return None
        corners = cv2.cornerSubPix(
            gray, corners, (5, 5), (-1, -1), (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-3)
        )
    return corners.reshape(-1, 2).astype(np.float64)


def _orderings(n_cols: int, n_rows: int) -> list[np.ndarray]:
    """Index permutations for the board's symmetries (a detector may start from another corner)."""
    idx = np.arange(n_cols * n_rows).reshape(n_rows, n_cols)
    out = [idx.ravel(), idx[::-1, ::-1].ravel()]
    if n_cols == n_rows:
        out += [np.rot90(idx, 1).ravel(), np.rot90(idx, 3).ravel()]
    return out


def _rotation_angle(h: np.ndarray, at: np.ndarray) -> float:
    """Rotation (radians, absolute) of the homography's local linear map at point ``at``."""
    eps = 1.0
    p = np.array([at, at + (eps, 0.0), at + (0.0, eps)], np.float64)[:, None]
    q = cv2.perspectiveTransform(p, h)[:, 0]
    jac = np.column_stack([q[1] - q[0], q[2] - q[0]]) / eps
    if np.linalg.det(jac) <= 0:
        return np.inf  # mirrored: never the right correspondence for two cameras looking the same way
    return abs(float(np.arctan2(jac[1, 0] - jac[0, 1], jac[0, 0] + jac[1, 1])))


def match_orderings(thermal: np.ndarray, rgb: np.ndarray, board: tuple[int, int]) -> np.ndarray:
    """Reorder ``thermal`` corners so that they correspond to ``rgb`` corners.

    A detector may start from another corner of the board (inverted thermal boards swap which
    corner square is dark), and every such ordering fits a homography equally well; the right one
    is the ordering whose homography does not turn the image over, i.e. the cameras are mounted
    with the same side up (within 45 degrees)."""
    best, best_angle = thermal, np.inf
    centre = thermal.mean(axis=0)
    for perm in _orderings(*board):
        cand = thermal[perm]
        h, _ = cv2.findHomography(cand, rgb, 0)
        if h is None:
            continue
        angle = _rotation_angle(h, centre)
        if angle < best_angle:
            best, best_angle = cand, angle
    return best


def reprojection_errors(h: np.ndarray, thermal_pts: np.ndarray, rgb_pts: np.ndarray) -> np.ndarray:
    mapped = cv2.perspectiveTransform(np.asarray(thermal_pts, np.float64).reshape(-1, 1, 2), h).reshape(-1, 2)
    return np.linalg.norm(mapped - rgb_pts, axis=1)


def fit_homography(
    thermal_pts: np.ndarray, rgb_pts: np.ndarray, ransac_px: float = 2.0
) -> tuple[np.ndarray, np.ndarray]:
    """RANSAC homography thermal -> RGB, refined on the inliers; returns (H, inlier mask)."""
    if len(thermal_pts) < 4:
        raise CalibrationError(f"need at least 4 point correspondences to fit a homography, got {len(thermal_pts)}")
    h, mask = cv2.findHomography(thermal_pts, rgb_pts, cv2.RANSAC, ransac_px, maxIters=5000, confidence=0.999)
    if h is None:
        raise CalibrationError("no homography fits the correspondences (are the points collinear or mismatched?)")
    inliers = mask.ravel().astype(bool)
    if inliers.sum() >= 4:
        refined, _ = cv2.findHomography(thermal_pts[inliers], rgb_pts[inliers], 0)
        if refined is not None:
            h = refined
    return h / h[2, 2], inliers


# ----------------------------------------------------------------------------- I/O
def _read_image(path: str, what: str) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise CalibrationError(f"cannot read {what} image {path}: expected a readable image file (PNG, JPEG, TIFF)")
    return img


def parse_board(text: str) -> tuple[int, int]:
    try:
        cols, rows = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise CalibrationError(f"--board must be COLSxROWS inner corners such as 9x6, got {text!r}") from None
    if cols < 2 or rows < 2:
        raise CalibrationError(f"--board needs at least 2x2 inner corners, got {text!r}")
    return cols, rows


def load_points(path: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int] | None, tuple[int, int] | None]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise CalibrationError(f"cannot read points file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise CalibrationError(f"points file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("points"), list):
        raise CalibrationError(f"points file {path}: expected a mapping with a 'points' list of {{thermal, rgb}}")
    th, rgb = [], []
    for i, entry in enumerate(data["points"]):
        try:
            tx, ty = (float(v) for v in entry["thermal"])
            rx, ry = (float(v) for v in entry["rgb"])
        except (KeyError, TypeError, ValueError):
            raise CalibrationError(
                f"points file {path}: point {i} must be {{thermal: [x, y], rgb: [x, y]}}, got {entry!r}"
            ) from None
        th.append((tx, ty))
        rgb.append((rx, ry))
    sizes = []
    for key in ("thermal_size", "rgb_size"):
        value = data.get(key)
        sizes.append(None if value is None else tuple(int(v) for v in value))
    return np.array(th, np.float64).reshape(-1, 2), np.array(rgb, np.float64).reshape(-1, 2), sizes[0], sizes[1]


def blend_check_image(
    rgb: np.ndarray, thermal: np.ndarray, h: np.ndarray, thermal_pts=None, rgb_pts=None
) -> np.ndarray:
    """Thermal (false colour) warped with ``h`` over the RGB image, RGB corners green, warped thermal red."""
    if rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] >= 3:
        rgb_bgr = np.ascontiguousarray(rgb[:, :, :3])
    else:
        rgb_bgr = cv2.cvtColor(to_gray8(rgb), cv2.COLOR_GRAY2BGR)
    hh, ww = rgb_bgr.shape[:2]
    t_h, t_w = thermal.shape[:2]
    reg = ThermalRegistrar("homography", homography=h, thermal_size=(t_w, t_h), rgb_size=(ww, hh))
    warped, valid = reg.warp(to_gray8(thermal), (hh, ww))
    colour = cv2.applyColorMap(warped, cv2.COLORMAP_INFERNO)
    out = rgb_bgr.copy()
    out[valid] = (0.5 * rgb_bgr[valid] + 0.5 * colour[valid]).astype(np.uint8)
    if rgb_pts is not None:
        for x, y in np.asarray(rgb_pts):
            cv2.circle(out, (round(x), round(y)), 3, (0, 255, 0), 1, cv2.LINE_AA)
    if thermal_pts is not None:
        for x, y in cv2.perspectiveTransform(np.asarray(thermal_pts, np.float64).reshape(-1, 1, 2), h).reshape(-1, 2):
            cv2.drawMarker(out, (round(x), round(y)), (0, 0, 255), cv2.MARKER_CROSS, 6, 1)
    return out


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rgb", nargs="+", metavar="IMAGE", help="RGB checkerboard images")
    parser.add_argument("--thermal", nargs="+", metavar="IMAGE", help="thermal images, same order as --rgb")
    parser.add_argument("--board", metavar="COLSxROWS", help="inner corners of the checkerboard, e.g. 9x6")
    parser.add_argument("--points", metavar="FILE.yaml", help="hand-picked correspondences instead of images")
    parser.add_argument("--invert-thermal", action="store_true", help="try the inverted thermal image first")
    parser.add_argument("--clahe", action="store_true", help="try CLAHE-equalised thermal images first")
    parser.add_argument("--ransac-px", type=float, default=2.0, help="RANSAC inlier threshold in RGB pixels")
    parser.add_argument("--out", default="calibration.yaml", help="registration YAML to write")
    parser.add_argument("--check-image", help="blended check image (default: <out stem>_check.png)")
    check = parser.add_argument_group(
        "check an existing calibration",
        "rgbt-seg calibrate --check CALIBRATION.yaml --bag BAG | --rgb IMAGES --thermal IMAGES: the residual "
        "offset of the registered thermal image per pair (the node's registration diagnostics score) and a verdict",
    )
    check.add_argument(
        "--check",
        metavar="CALIBRATION.yaml",
        help="check this calibration instead of fitting one; exit 0: it fits, 1: thermal sits off (recalibrate), "
        "3: not enough structure to tell (no confident pair), 2: bad input",
    )
    check.add_argument(
        "--bag",
        metavar="BAG",
        help="ROS 2 or ROS 1 bag whose RGB-thermal pairs are checked; one damaged part-way is checked "
        "up to the damage (said on stderr and in the JSON; the verdict rests on the pairs before it)",
    )
    check.add_argument("--rgb-topic", default="/rgb/image", help="RGB image topic (default %(default)s)")
    check.add_argument("--thermal-topic", default="/thermal/image", help="thermal image topic (default %(default)s)")
    check.add_argument("--every", type=int, default=1, metavar="N", help="check every N-th pair of the bag (default 1)")
    check.add_argument("--max-pairs", type=int, default=None, metavar="N", help="stop after N checked pairs")
    check.add_argument(
        "--min-confidence",
        type=float,
        default=SPEC_BY_NAME["registration.min_confidence"].default,
        help="pairs at or above this confidence count (default %(default)s: the node's registration.min_confidence)",
    )
    check.add_argument(
        "--tolerance",
        type=float,
        default=SPEC_BY_NAME["registration.warn_offset_px"].default,
        metavar="PX",
        help="largest median offset, RGB px, for which the calibration fits "
        "(default %(default)s: the node's registration.warn_offset_px)",
    )
    check.add_argument("--json", metavar="FILE", help="write every pair's estimate and the summary as JSON")


def calibrate_images(
    rgb_paths: list[str],
    thermal_paths: list[str],
    board: tuple[int, int],
    invert_first: bool = False,
    clahe_first: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Detect, match and pool corners of every image pair; returns the fit and what the report needs."""
    if len(rgb_paths) != len(thermal_paths):
        raise CalibrationError(
            f"--rgb has {len(rgb_paths)} images but --thermal has {len(thermal_paths)}: expected one thermal per RGB"
        )
    all_t, all_r, used, sizes = [], [], [], set()
    first = None
    for rp, tp in zip(rgb_paths, thermal_paths):
        rgb, thermal = _read_image(rp, "RGB"), _read_image(tp, "thermal")
        sizes.add(((rgb.shape[1], rgb.shape[0]), (thermal.shape[1], thermal.shape[0])))
        rc = detect_corners(to_gray8(rgb), board)
        if rc is None:
            log(f"  {rp}: no {board[0]}x{board[1]} board found in the RGB image, pair skipped")
            continue
        tc, variant = None, None
        for name, img in thermal_variants(to_gray8(thermal), invert_first, clahe_first):
            tc = detect_corners(img, board)
            if tc is not None:
                variant = name
                break
        if tc is None:
            log(f"  {tp}: no {board[0]}x{board[1]} board found in the thermal image (tried plain, CLAHE, inverted)")
            continue
        tc = match_orderings(tc, rc, board)
        log(f"  {Path(rp).name} + {Path(tp).name}: {len(rc)} corners (thermal: {variant})")
        all_t.append(tc)
        all_r.append(rc)
        used.append((rp, tp))
        if first is None:
            first = (rgb, thermal, tc, rc)
    if len(sizes) > 1:
        raise CalibrationError(f"all RGB images and all thermal images must have one size each, got {sorted(sizes)}")
    if not all_t:
        raise CalibrationError(
            f"no image pair had a {board[0]}x{board[1]} board detected in both modalities: check --board "
            "(inner corners) and try --invert-thermal / --clahe"
        )
    (rgb_wh, thermal_wh) = sizes.pop()
    return {
        "thermal_pts": np.concatenate(all_t),
        "rgb_pts": np.concatenate(all_r),
        "pairs": used,
        "rgb_size": rgb_wh,
        "thermal_size": thermal_wh,
        "first": first,
    }


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (CalibrationError, RegistrationError) as exc:
        print(f"rgbt-seg calibrate: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.check or args.bag:
        return run_check(args)
    first = None
    if args.points:
        thermal_pts, rgb_pts, thermal_wh, rgb_wh = load_points(args.points)
        if args.rgb and args.thermal:
            rgb, thermal = _read_image(args.rgb[0], "RGB"), _read_image(args.thermal[0], "thermal")
            rgb_wh, thermal_wh = (rgb.shape[1], rgb.shape[0]), (thermal.shape[1], thermal.shape[0])
            first = (rgb, thermal, thermal_pts, rgb_pts)
        if thermal_wh is None or rgb_wh is None:
            raise CalibrationError(
                f"points file {args.points}: needs thermal_size and rgb_size ([width, height]) when no images are given"
            )
        print(f"{len(thermal_pts)} hand-picked correspondences from {args.points}")
    else:
        if not args.rgb or not args.thermal or not args.board:
            raise CalibrationError("give --rgb IMAGES, --thermal IMAGES and --board COLSxROWS, or --points FILE.yaml")
        board = parse_board(args.board)
        print(f"detecting a {board[0]}x{board[1]} board in {len(args.rgb)} image pair(s)")
        found = calibrate_images(args.rgb, args.thermal, board, args.invert_thermal, args.clahe)
        thermal_pts, rgb_pts = found["thermal_pts"], found["rgb_pts"]
        thermal_wh, rgb_wh, first = found["thermal_size"], found["rgb_size"], found["first"]
    h, inliers = fit_homography(thermal_pts, rgb_pts, args.ransac_px)
    h = check_homography(h, thermal_wh, what="fitted homography")
    err = reprojection_errors(h, thermal_pts, rgb_pts)
    reg = ThermalRegistrar("homography", homography=h, thermal_size=thermal_wh, rgb_size=rgb_wh)
    data = reg.to_dict()
    data["fit"] = {
        "correspondences": int(len(err)),
        "inliers": int(inliers.sum()),
        "mean_error_px": round(float(err[inliers].mean()), 4),
        "max_error_px": round(float(err[inliers].max()), 4),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = "# thermal -> RGB registration written by 'rgbt-seg calibrate'\n"
    out.write_text(header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None))
    print(
        f"homography fitted on {inliers.sum()}/{len(err)} inliers: reprojection error mean "
        f"{err[inliers].mean():.3f} px, max {err[inliers].max():.3f} px (all points: mean {err.mean():.3f} px)"
    )
    print(f"wrote {out}")
    if first is not None:
        check = Path(args.check_image) if args.check_image else out.with_name(out.stem + "_check.png")
        rgb, thermal, tp, rp = first
        cv2.imwrite(str(check), blend_check_image(rgb, thermal, h, tp, rp))
        print(f"wrote {check} (thermal false colour over RGB; green: RGB corners, red: warped thermal corners)")
    return 0


# ----------------------------------------------------------------------------- check mode
EXIT_FITS, EXIT_OFF, EXIT_CANNOT_TELL = 0, 1, 3  # and 2, bad input: run()
# options of fitting that have no place in a check (given with --check they are refused, not ignored)
_FIT_ONLY = {
    "board": "--board",
    "points": "--points",
    "invert_thermal": "--invert-thermal",
    "clahe": "--clahe",
    "check_image": "--check-image",
}


def check_summary(estimates: list, min_confidence: float, tolerance_px: float) -> dict:
    """The verdict over per-pair :class:`~rgbt_seg_ros.pipeline.registration_health.OffsetEstimate`: the median offset
    (per axis) of those with ``confidence >= min_confidence``, its spread (the median distance of those
    estimates from it), and ``verdict`` fits / off / cannot_tell with its ``sentence`` and ``exit_code``."""
    confident = [e for e in estimates if e.confidence >= min_confidence]
    out = {
        "checked": len(estimates),
        "confident": len(confident),
        "min_confidence": float(min_confidence),
        "tolerance_px": float(tolerance_px),
        "median_dx": None,
        "median_dy": None,
        "median_offset_px": None,
        "spread_px": None,
    }
    if not confident:
        out.update(
            verdict="cannot_tell",
            exit_code=EXIT_CANNOT_TELL,
            sentence=f"not enough structure to tell: none of the {len(estimates)} pair(s) checked had confidence "
            f">= {min_confidence:.2f}",
        )
        return out
    d = np.array([(e.dx, e.dy) for e in confident], np.float64)
    mdx, mdy = (float(v) for v in np.median(d, axis=0))
    magnitude = math.hypot(mdx, mdy)
    out.update(
        median_dx=round(mdx, 4),
        median_dy=round(mdy, 4),
        median_offset_px=round(magnitude, 4),
        spread_px=round(float(np.median(np.hypot(d[:, 0] - mdx, d[:, 1] - mdy))), 4),
    )
    if magnitude <= tolerance_px:
        out.update(
            verdict="fits",
            exit_code=EXIT_FITS,
            sentence=f"the calibration fits: median offset ({mdx:+.1f}, {mdy:+.1f}) px, {magnitude:.2f} px "
            f"<= the tolerance of {tolerance_px:g} px",
        )
    else:
        out.update(
            verdict="off", exit_code=EXIT_OFF, sentence=f"thermal sits ({mdx:+.1f}, {mdy:+.1f}) px off: recalibrate"
        )
    return out


def _rgb_u8(image: np.ndarray) -> np.ndarray:
    """cv2.imread's BGR(A) or grey image -> (H, W, 3) uint8 RGB (16-bit or float stretched as ``to_gray8``)."""
    if image.ndim == 3 and image.shape[2] >= 3 and image.dtype == np.uint8:
        return cv2.cvtColor(np.ascontiguousarray(image[:, :, :3]), cv2.COLOR_BGR2RGB)
    return cv2.cvtColor(to_gray8(image), cv2.COLOR_GRAY2RGB)


def _image_pairs(rgb_paths: list[str], thermal_paths: list[str]) -> Iterator[tuple[dict, np.ndarray, np.ndarray]]:
    for rp, tp in zip(rgb_paths, thermal_paths):
        rgb, thermal = _rgb_u8(_read_image(rp, "RGB")), _read_image(tp, "thermal")
        if thermal.ndim == 3:  # a thermal picture saved in colour: its grey levels (the estimate uses edges only)
            thermal = to_gray8(thermal)
        yield {"label": f"{Path(rp).name} + {Path(tp).name}", "rgb": str(rp), "thermal": str(tp)}, rgb, thermal


def _bag_pairs(args: argparse.Namespace, skipped: list[str]) -> Iterator[tuple[dict, np.ndarray, np.ndarray]]:
    """Every ``--every``-th pair the node's pairer (default ``sync.*``) forms from the bag, converted as the node
    converts camera messages; a pair whose image cannot be converted is left out and its reason kept."""
    from ..pipeline.frame_flow import pairer_from_params
    from ..pipeline.imaging import ImageEncodingError, rgb_from_msg, thermal_from_msg
    from ..pipeline.params import defaults
    from .pairs import bag_pairs

    params = defaults()
    max_pixels = int(float(params["max_megapixels"]) * 1e6)
    for i, pair in enumerate(bag_pairs(args.bag, args.rgb_topic, args.thermal_topic, pairer_from_params(params))):
        if i % args.every:
            continue
        try:
            rgb = rgb_from_msg(pair.rgb.msg, max_pixels)
            thermal = thermal_from_msg(pair.thermal.msg, max_pixels)
        except ImageEncodingError as exc:
            skipped.append(f"pair {i}: {exc}")
            continue
        stamp = pair.rgb_stamp_ns
        label = f"pair {i} (RGB stamp {stamp // 1_000_000_000}.{stamp % 1_000_000_000:09d})"
        meta = {"label": label, "pair": i, "rgb_stamp_ns": stamp, "thermal_stamp_ns": pair.thermal_stamp_ns}
        yield meta, rgb, thermal


def _check_arguments(args: argparse.Namespace) -> str | None:
    """Why the check-mode arguments cannot be used, or None."""
    from ..pipeline.params import validate

    if not args.check:
        return "--bag is for checking a calibration: give --check CALIBRATION.yaml too"
    given = [flag for name, flag in _FIT_ONLY.items() if getattr(args, name)]
    if given:
        return f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for fitting a calibration, not for --check"
    if args.bag and (args.rgb or args.thermal):
        return "--check takes either --bag BAG or --rgb/--thermal images, not both"
    if not args.bag and not (args.rgb and args.thermal):
        return "--check needs --bag BAG or --rgb IMAGES with --thermal IMAGES"
    if args.rgb and len(args.rgb) != len(args.thermal):
        return f"--rgb has {len(args.rgb)} images but --thermal has {len(args.thermal)}: expected one thermal per RGB"
    if args.every < 1:
        return f"--every must be >= 1, got {args.every}"
    if args.max_pairs is not None and args.max_pairs < 1:
        return f"--max-pairs must be >= 1, got {args.max_pairs}"
    for flag, name, value in (
        ("--min-confidence", "registration.min_confidence", args.min_confidence),
        ("--tolerance", "registration.warn_offset_px", args.tolerance),
    ):
        problem = validate(name, value)
        if problem:
            return f"{flag} {value} is refused: {problem}"
    return None


def _bag_total(args: argparse.Namespace) -> int | None:
    """Pairs the bag will give, for the progress bar (the smaller camera's message count)."""
    from ..data.bags import message_counts

    counts = message_counts(args.bag)
    if args.rgb_topic not in counts or args.thermal_topic not in counts:
        return None
    total = math.ceil(min(counts[args.rgb_topic], counts[args.thermal_topic]) / args.every)
    return min(total, args.max_pairs) if args.max_pairs else total


def run_check(args: argparse.Namespace) -> int:
    """``--check``: per-pair offsets against the calibration, the summary, the verdict (its exit code)."""
    from tqdm import tqdm

    from ..data.bags import BagError
    from ..pipeline.registration_health import OffsetEstimator

    problem = _check_arguments(args)
    if problem:
        raise CalibrationError(problem)
    registrar = ThermalRegistrar.from_yaml(args.check)
    estimator = OffsetEstimator()
    source = args.bag if args.bag else f"{len(args.rgb)} image pair(s)"
    skipped: list[str] = []
    pairs = _bag_pairs(args, skipped) if args.bag else _image_pairs(args.rgb, args.thermal)
    rows: list[dict] = []
    estimates = []
    error = None
    bar = tqdm(total=_bag_total(args) if args.bag else None, desc="check", unit="pair", disable=None, leave=False)
    try:
        for meta, rgb, thermal in pairs:
            try:
                est = estimator.estimate(rgb, thermal, registrar)
            except RegistrationError as exc:
                raise CalibrationError(f"calibration {args.check} does not fit {meta['label']}: {exc}") from None
            confident = est.confidence >= args.min_confidence
            estimates.append(est)
            rows.append(
                {
                    **meta,
                    "dx": round(est.dx, 4),
                    "dy": round(est.dy, 4),
                    "confidence": round(est.confidence, 4),
                    "psr": round(est.psr, 3),
                    "ms": round(est.ms, 3),
                    "confident": confident,
                }
            )
            note = "" if confident else " (too little structure)"
            tqdm.write(
                f"{meta['label']}: offset ({est.dx:+.2f}, {est.dy:+.2f}) px, confidence {est.confidence:.2f}{note}"
            )
            bar.update(1)
            if args.max_pairs is not None and len(rows) >= args.max_pairs:
                break
    except BagError as exc:
        if not rows:
            raise CalibrationError(str(exc)) from None
        error = f"{exc} ({len(rows)} pair(s) were checked before it; the summary rests on them)"
        print(f"rgbt-seg calibrate: {error}", file=sys.stderr)
    finally:
        pairs.close()  # a bag left early (--max-pairs, an error) is closed now
        bar.close()
    if skipped:
        print(f"rgbt-seg calibrate: {len(skipped)} pair(s) left out, first: {skipped[0]}", file=sys.stderr)
    if not rows:
        what = f"bag {args.bag} formed no RGB-thermal pair on {args.rgb_topic} + {args.thermal_topic}"
        raise CalibrationError(what + (f" that could be converted ({skipped[0]})" if skipped else ""))
    summary = check_summary(estimates, args.min_confidence, args.tolerance)
    summary["error"] = error
    summary["skipped"] = len(skipped)
    print(
        f"checked {summary['checked']} pair(s) of {source} against {args.check}: {summary['confident']} confident "
        f"(confidence >= {args.min_confidence:g})"
    )
    if summary["median_offset_px"] is not None:
        print(
            f"median offset of the confident pairs ({summary['median_dx']:+.2f}, {summary['median_dy']:+.2f}) px = "
            f"{summary['median_offset_px']:.2f} px, spread {summary['spread_px']:.2f} px (median distance from it); "
            f"tolerance {args.tolerance:g} px"
        )
    print(summary["sentence"])
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.bag:
            checked = {"bag": str(args.bag), "rgb_topic": args.rgb_topic, "thermal_topic": args.thermal_topic}
            checked["every"] = args.every
        else:
            checked = {"images": len(args.rgb)}
        data = {"calibration": str(args.check), "source": checked, "pairs": rows, "summary": summary}
        out.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {out}")
    return int(summary["exit_code"])

"""Thermal -> RGB registration: warp the thermal image into the RGB pixel grid (no ROS import).

Three modes, one warp path (``cv2.remap`` with maps computed once per image size and cached):

``identity``
    The images are already aligned (PST900, MFNet): the thermal image is resized to the RGB size.
``homography``
    A 3x3 matrix mapping thermal pixel coordinates to RGB pixel coordinates, with the image sizes it
    was estimated at; it is rescaled when the images arrive at another (uniformly scaled) size.
``calibrated``
    Both cameras' intrinsics and distortion (camera_calibration / CameraInfo format), the
    thermal -> RGB rotation ``R`` and translation ``t`` (``X_rgb = R @ X_thermal + t``, metres) and the
    distance of a scene plane in front of the RGB camera (metres, along its optical axis): each RGB
    pixel is undistorted, carried to the thermal camera through the plane-induced homography and
    re-distorted with the thermal model.  Exact for points on that plane; the parallax error
    elsewhere is ``f * baseline * |1/Z - 1/plane_distance|`` pixels.

Pixel coordinates follow OpenCV: the centre of the top-left pixel is (0, 0).  Sizes in YAML are
``[width, height]``; sizes in the Python API are ``(height, width)`` like numpy shapes.

YAML (``config/registration/*.yaml`` holds one example per mode)::

    mode: homography
    homography: [[h00, h01, h02], [h10, h11, h12], [h20, h21, h22]]   # thermal pixel -> RGB pixel
    thermal_size: [640, 512]   # width, height the homography was estimated at
    rgb_size: [640, 480]

    mode: calibrated
    rgb_camera: {image_width: .., image_height: .., camera_matrix: {data: [9 values]},
                 distortion_model: plumb_bob, distortion_coefficients: {data: [k1, k2, p1, p2, k3]}}
    thermal_camera: {...}          # or a path to a camera_calibration YAML file, relative to this one
    rotation: [[...], [...], [...]]  # thermal -> RGB, 3x3 (or a 3-vector Rodrigues rotation)
    translation: [tx, ty, tz]      # metres, thermal camera origin in the RGB frame
    plane_distance: 10.0           # metres
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

MODES = ("identity", "homography", "calibrated")
INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
}
_REMAP_DTYPES = (np.uint8, np.uint16, np.int16, np.float32, np.float64)
_CACHE_ENTRIES = 4


class RegistrationError(ValueError):
    """A calibration the registrar cannot use; the text names the input and what was expected."""


# ----------------------------------------------------------------------------- camera models
class CameraModel:
    """Pinhole intrinsics + distortion of one camera, at the image size they were calibrated at."""

    def __init__(
        self, k: Any, d: Any, width: int, height: int, distortion_model: str = "plumb_bob", name: str = "camera"
    ):
        self.name = name
        k = np.asarray(k, dtype=np.float64).reshape(-1)
        if k.size != 9 or not np.all(np.isfinite(k)):
            raise RegistrationError(
                f"{name}: camera matrix must be 9 finite numbers (row-major 3x3), got {k.size} values"
            )
        self.k = k.reshape(3, 3)
        if self.k[0, 0] <= 0 or self.k[1, 1] <= 0:
            raise RegistrationError(
                f"{name}: camera matrix focal lengths fx, fy must be > 0, got {self.k[0, 0]}, {self.k[1, 1]}"
            )
        self.d = np.asarray(d if d is not None else [], dtype=np.float64).reshape(-1)
        self.width, self.height = int(width), int(height)
        if self.width <= 0 or self.height <= 0:
            raise RegistrationError(f"{name}: image size must be positive, got {self.width}x{self.height}")
        self.distortion_model = (distortion_model or "plumb_bob").strip()
        if self.distortion_model == "equidistant":
            if self.d.size != 4:
                raise RegistrationError(f"{name}: equidistant distortion needs 4 coefficients, got {self.d.size}")
        elif self.distortion_model in ("plumb_bob", "rational_polynomial", ""):
            if self.d.size not in (0, 4, 5, 8, 12, 14):
                raise RegistrationError(
                    f"{name}: {self.distortion_model} distortion needs 0, 4, 5, 8, 12 or 14 coefficients, "
                    f"got {self.d.size}"
                )
        else:
            raise RegistrationError(
                f"{name}: distortion_model must be plumb_bob, rational_polynomial or equidistant, "
                f"got {distortion_model!r}"
            )

    @classmethod
    def from_info(cls, info: Any, name: str = "camera", base_dir: Path | None = None) -> CameraModel:
        """From a CameraInfo-like object (k, d, width, height, distortion_model), a camera_calibration
        YAML mapping (camera_matrix.data, distortion_coefficients.data, image_width, image_height), or a
        path to such a YAML file."""
        if isinstance(info, CameraModel):
            return info
        if isinstance(info, (str, Path)):
            path = Path(info)
            if base_dir is not None and not path.is_absolute():
                path = base_dir / path
            info = _load_yaml(path, f"{name} camera file")
        if isinstance(info, Mapping):
            if "camera_matrix" in info:
                try:
                    k = info["camera_matrix"]["data"]
                    d = (info.get("distortion_coefficients") or {}).get("data", [])
                    w, h = info["image_width"], info["image_height"]
                except (KeyError, TypeError) as exc:
                    raise RegistrationError(
                        f"{name}: camera_calibration YAML needs camera_matrix.data, image_width and image_height "
                        f"(missing {exc})"
                    ) from None
                return cls(k, d, w, h, info.get("distortion_model", "plumb_bob"), name)
            missing = [key for key in ("k", "width", "height") if key not in info]
            if missing:
                raise RegistrationError(
                    f"{name}: expected camera_calibration keys (camera_matrix, image_width, image_height) "
                    f"or CameraInfo keys (k, d, width, height), missing {', '.join(missing)}"
                )
            return cls(
                info["k"],
                info.get("d", []),
                info["width"],
                info["height"],
                info.get("distortion_model", "plumb_bob"),
                name,
            )
        for attr in ("k", "width", "height"):
            if not hasattr(info, attr):
                raise RegistrationError(
                    f"{name}: expected a CameraInfo with k, d, width, height, got {type(info).__name__}"
                )
        return cls(
            info.k,
            getattr(info, "d", []),
            info.width,
            info.height,
            getattr(info, "distortion_model", "plumb_bob"),
            name,
        )

    def scaled_to(self, width: int, height: int, what: str) -> tuple[np.ndarray, np.ndarray]:
        """Intrinsics for the image size actually received (uniform resize of the calibrated size)."""
        sx, sy = _check_scale((self.width, self.height), (width, height), what)
        k = self.k.copy()
        k[0, 0] *= sx
        k[0, 1] *= sx
        k[0, 2] = (k[0, 2] + 0.5) * sx - 0.5
        k[1, 1] *= sy
        k[1, 2] = (k[1, 2] + 0.5) * sy - 0.5
        return k, self.d

    def undistort(self, pixels: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Pixels (N, 2) -> normalised image coordinates (N, 2) on z = 1."""
        pts = pixels.reshape(-1, 1, 2).astype(np.float64)
        if self.distortion_model == "equidistant":
            out = cv2.fisheye.undistortPoints(pts, k, self.d)
        elif self.d.size == 0 or not np.any(self.d):
            out = cv2.undistortPoints(pts, k, None)
        else:
            out = _undistort_precise(pts, k, self.d)
        return out.reshape(-1, 2)

    def project(self, rays: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Points (N, 3) in the camera frame -> distorted pixels (N, 2)."""
        pts = rays.reshape(-1, 1, 3).astype(np.float64)
        zero = np.zeros(3)
        if self.distortion_model == "equidistant":
            out, _ = cv2.fisheye.projectPoints(pts, zero, zero, k, self.d)
        else:
            out, _ = cv2.projectPoints(pts, zero, zero, k, self.d if self.d.size else None)
        return out.reshape(-1, 2)


def _undistort_precise(pts: np.ndarray, k: np.ndarray, d: np.ndarray) -> np.ndarray:
    """cv2.undistortPoints run to convergence (its default stops after 5 iterations, which leaves
    tenths of a pixel at the corners of strongly distorted lenses)."""
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 50, 1e-12)
    try:
        return cv2.undistortPoints(pts, k, d, None, None, criteria=criteria)
    except (TypeError, cv2.error):  # OpenCV builds without the criteria argument
        return cv2.undistortPointsIter(pts, k, d, None, None, criteria)


# ----------------------------------------------------------------------------- helpers
def _load_yaml(path: Path, what: str) -> Any:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise RegistrationError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RegistrationError(f"{what} {path} is not valid YAML: {exc}") from None


def _size_wh(value: Any, what: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in value)
    except (TypeError, ValueError):
        raise RegistrationError(f"{what} must be [width, height], got {value!r}") from None
    if w <= 0 or h <= 0:
        raise RegistrationError(f"{what} must be positive [width, height], got {value!r}")
    return w, h


def _check_scale(calib_wh: tuple[int, int], actual_wh: tuple[int, int], what: str) -> tuple[float, float]:
    sx, sy = actual_wh[0] / calib_wh[0], actual_wh[1] / calib_wh[1]
    if abs(sx - sy) > 0.01 * max(sx, sy):
        raise RegistrationError(
            f"{what} is {actual_wh[0]}x{actual_wh[1]} but the calibration is for {calib_wh[0]}x{calib_wh[1]}: "
            "expected the same aspect ratio (a uniform resize)"
        )
    return sx, sy


def _scale_matrix(sx: float, sy: float) -> np.ndarray:
    """Pixel-centre-exact resize: x' = (x + 0.5) * sx - 0.5."""
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])


def _rotation(value: Any) -> np.ndarray:
    r = np.asarray(value, dtype=np.float64)
    if r.size == 3:
        r, _ = cv2.Rodrigues(r.reshape(3, 1))
    elif r.size == 9:
        r = r.reshape(3, 3)
    else:
        raise RegistrationError(f"rotation must be a 3x3 matrix or a 3-vector (Rodrigues), got {r.size} values")
    if not np.all(np.isfinite(r)) or not np.allclose(r @ r.T, np.eye(3), atol=1e-4) or np.linalg.det(r) < 0:
        raise RegistrationError("rotation must be a proper rotation matrix (orthonormal, determinant +1)")
    return r


def check_homography(h: Any, thermal_wh: tuple[int, int] | None = None, what: str = "homography") -> np.ndarray:
    """A finite, invertible 3x3 thermal->RGB homography (normalised to h[2,2] = 1 when possible)."""
    m = np.asarray(h, dtype=np.float64)
    if m.shape != (3, 3):
        raise RegistrationError(f"{what} must be a 3x3 matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise RegistrationError(f"{what} contains non-finite values")
    if np.linalg.cond(m) > 1e12 or abs(np.linalg.det(m)) < 1e-12 * np.abs(m).max() ** 3:
        raise RegistrationError(f"{what} is degenerate (not invertible): {m.tolist()}")
    if abs(m[2, 2]) > 1e-12:
        m = m / m[2, 2]
    if thermal_wh is not None:
        w, h_ = thermal_wh
        corners = np.array([[0, 0, 1], [w - 1, 0, 1], [0, h_ - 1, 1], [w - 1, h_ - 1, 1]], dtype=np.float64)
        denom = corners @ m[2]
        if np.any(denom <= 0):
            raise RegistrationError(
                f"{what} folds the thermal image over (a corner maps behind the RGB image plane): expected a "
                "homography estimated for these image sizes"
            )
    return m


def _interp_flag(interpolation: str | int) -> int:
    if isinstance(interpolation, str):
        try:
            return INTERPOLATIONS[interpolation.lower()]
        except KeyError:
            raise RegistrationError(
                f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}"
            ) from None
    return int(interpolation)


# ----------------------------------------------------------------------------- the registrar
@dataclass(frozen=True)
class GridWarp:
    """A cached plan of :meth:`ThermalRegistrar.warp_to_grid`: halvings, then one remap."""

    levels: int  # box-filter halvings of the thermal image before the remap
    reduced_shape: tuple[int, int]  # (h, w) of the thermal image after them
    map1: np.ndarray
    map2: np.ndarray
    valid: np.ndarray  # (grid h, grid w) bool: grid pixels the thermal camera sees


def _median_step(coords: np.ndarray, front: np.ndarray, axis: int) -> float:
    """Median distance in source pixels between neighbouring samples along ``axis`` (inf if none)."""
    if coords.shape[axis] < 2:
        return float("inf")
    step = np.abs(np.diff(coords, axis=axis))
    ok = np.logical_and(*(np.delete(front, -1, axis=axis), np.delete(front, 0, axis=axis)))
    return float(np.median(step[ok])) if ok.any() else 1.0


def _grid_points(rgb_wh: tuple[int, int], grid_hw: tuple[int, int], margin: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """RGB pixel coordinates (xs, ys) of the centres of a ``grid_hw`` grid over the RGB image (pixel centres
    aligned, as a resize), with ``margin`` extra grid pixels on every side."""
    (w, h), (gh, gw) = rgb_wh, grid_hw
    u, v = np.meshgrid(
        np.arange(-margin, gw + margin, dtype=np.float64), np.arange(-margin, gh + margin, dtype=np.float64)
    )
    return (u + 0.5) * (w / gw) - 0.5, (v + 0.5) * (h / gh) - 0.5


class ThermalRegistrar:
    """Warps thermal images into the RGB pixel grid; returns the warped image and a validity mask."""

    def __init__(
        self,
        mode: str = "identity",
        *,
        homography: Any = None,
        thermal_size: tuple[int, int] | None = None,
        rgb_size: tuple[int, int] | None = None,
        rgb_camera: Any = None,
        thermal_camera: Any = None,
        rotation: Any = None,
        translation: Any = None,
        plane_distance: float | None = None,
        interpolation: str | int = "linear",
        fill_value: float = 0.0,
    ):
        """Sizes are (width, height) here, as in the YAML; see the module docstring for the modes."""
        if mode not in MODES:
            raise RegistrationError(f"registration mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.interpolation = _interp_flag(interpolation)
        self.fill_value = float(fill_value)
        self._cache: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._cache_lock = threading.Lock()
        self._calibration = self  # shifted copies sample this one's coordinate fields (see shifted)
        self._fields: dict[tuple, tuple] = {}
        self.homography: np.ndarray | None = None
        self.thermal_size = self.rgb_size = None
        self.offset = (0.0, 0.0)  # RGB pixels added on top of the calibration (see shifted)
        if mode == "homography":
            if homography is None or thermal_size is None or rgb_size is None:
                missing = [
                    n
                    for n, v in (("homography", homography), ("thermal_size", thermal_size), ("rgb_size", rgb_size))
                    if v is None
                ]
                raise RegistrationError(f"homography mode needs {', '.join(missing)}")
            self.thermal_size = _size_wh(thermal_size, "thermal_size")
            self.rgb_size = _size_wh(rgb_size, "rgb_size")
            self.homography = check_homography(homography, self.thermal_size)
        elif mode == "calibrated":
            missing = [
                n
                for n, v in (
                    ("rgb_camera", rgb_camera),
                    ("thermal_camera", thermal_camera),
                    ("rotation", rotation),
                    ("translation", translation),
                    ("plane_distance", plane_distance),
                )
                if v is None
            ]
            if missing:
                raise RegistrationError(f"calibrated mode needs {', '.join(missing)}")
            self.rgb_camera = CameraModel.from_info(rgb_camera, "rgb_camera")
            self.thermal_camera = CameraModel.from_info(thermal_camera, "thermal_camera")
            self.rotation = _rotation(rotation)
            t = np.asarray(translation, dtype=np.float64).reshape(-1)
            if t.size != 3 or not np.all(np.isfinite(t)):
                raise RegistrationError(f"translation must be 3 finite numbers (metres), got {translation!r}")
            self.translation = t
            if not np.isfinite(float(plane_distance)) or float(plane_distance) <= 0:
                raise RegistrationError(f"plane_distance must be a positive distance in metres, got {plane_distance!r}")
            self.plane_distance = float(plane_distance)
            self.thermal_size = (self.thermal_camera.width, self.thermal_camera.height)
            self.rgb_size = (self.rgb_camera.width, self.rgb_camera.height)
            self.plane_homography = self._plane_homography()

    # --------------------------------------------------------------- constructors
    @classmethod
    def identity(cls, interpolation: str | int = "linear") -> ThermalRegistrar:
        return cls("identity", interpolation=interpolation)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>", base_dir: Path | None = None, **kwargs) -> ThermalRegistrar:
        if not isinstance(data, Mapping):
            raise RegistrationError(f"{source}: expected a mapping with a 'mode' key, got {type(data).__name__}")
        if "mode" not in data:
            raise RegistrationError(f"{source}: missing key 'mode' (one of {', '.join(MODES)})")
        mode = data["mode"]
        required = {
            "identity": (),
            "homography": ("homography", "thermal_size", "rgb_size"),
            "calibrated": ("rgb_camera", "thermal_camera", "rotation", "translation", "plane_distance"),
        }.get(mode)
        if required is None:
            raise RegistrationError(f"{source}: mode must be one of {', '.join(MODES)}, got {mode!r}")
        missing = [k for k in required if k not in data]
        if missing:
            raise RegistrationError(f"{source}: {mode} mode needs the key(s) {', '.join(missing)}")
        kwargs.setdefault("interpolation", data.get("interpolation", "linear"))
        try:
            if mode == "identity":
                return cls("identity", **kwargs)
            if mode == "homography":
                return cls(
                    "homography",
                    homography=data["homography"],
                    thermal_size=data["thermal_size"],
                    rgb_size=data["rgb_size"],
                    **kwargs,
                )
            return cls(
                "calibrated",
                rgb_camera=CameraModel.from_info(data["rgb_camera"], "rgb_camera", base_dir),
                thermal_camera=CameraModel.from_info(data["thermal_camera"], "thermal_camera", base_dir),
                rotation=data["rotation"],
                translation=data["translation"],
                plane_distance=data["plane_distance"],
                **kwargs,
            )
        except RegistrationError as exc:
            raise RegistrationError(f"{source}: {exc}") from None

    @classmethod
    def from_yaml(cls, path: str | Path, interpolation: str | int | None = None, **kwargs) -> ThermalRegistrar:
        path = Path(path)
        data = _load_yaml(path, "registration file")
        if interpolation is not None:
            kwargs["interpolation"] = interpolation
        return cls.from_dict(data, source=str(path), base_dir=path.parent, **kwargs)

    @classmethod
    def from_camera_info(
        cls,
        rgb_info: Any,
        thermal_info: Any,
        R: Any,  # noqa: N803 (the usual name of a rotation matrix)
        t: Any,
        plane_distance: float,
        interpolation: str | int = "linear",
    ) -> ThermalRegistrar:
        """From two sensor_msgs/CameraInfo (or camera_calibration dicts) plus the thermal->RGB extrinsics."""
        return cls(
            "calibrated",
            rgb_camera=CameraModel.from_info(rgb_info, "rgb camera_info"),
            thermal_camera=CameraModel.from_info(thermal_info, "thermal camera_info"),
            rotation=R,
            translation=t,
            plane_distance=plane_distance,
            interpolation=interpolation,
        )

    def to_dict(self) -> dict:
        """The YAML mapping this registrar was built from (homography and identity modes)."""
        if self.mode == "identity":
            return {"mode": "identity"}
        if self.mode == "homography":
            return {
                "mode": "homography",
                "homography": [[float(v) for v in row] for row in self.homography],
                "thermal_size": list(self.thermal_size),
                "rgb_size": list(self.rgb_size),
            }
        raise NotImplementedError("to_dict is provided for identity and homography modes")

    def shifted(self, dx: float, dy: float) -> ThermalRegistrar:
        """This registration with a translation on top: the result shows at RGB pixel ``x`` what this one
        shows at ``x + (dx, dy)`` (a drift correction, registration_health.py). Its maps have their own
        cache and are made from the calibration's source coordinates, computed once on a grid with a margin
        and interpolated at the shift (exact bilinear: one fractional part for all points): a few
        milliseconds per new shift instead of the warp's full geometry (undistortion in calibrated mode)."""
        other = copy.copy(self)
        other.offset = (self.offset[0] + float(dx), self.offset[1] + float(dy))
        other._cache = {}
        other._cache_lock = threading.Lock()
        return other

    @property
    def _plain_identity(self) -> bool:
        return self.mode == "identity" and self.offset == (0.0, 0.0)

    # --------------------------------------------------------------- geometry
    def _plane_homography(self) -> np.ndarray:
        """Normalised thermal coordinates -> normalised RGB coordinates for the plane z_rgb = D."""
        n_rgb = np.array([0.0, 0.0, 1.0])
        n_t = self.rotation.T @ n_rgb
        d_t = self.plane_distance - n_rgb @ self.translation
        if d_t <= 0:
            raise RegistrationError(
                f"plane_distance {self.plane_distance} m puts the plane behind the thermal camera "
                f"(which sits {n_rgb @ self.translation:.3f} m along the RGB axis)"
            )
        return self.rotation + np.outer(self.translation, n_t) / d_t

    def thermal_to_rgb_points(
        self, points: np.ndarray, thermal_wh: tuple[int, int], rgb_wh: tuple[int, int]
    ) -> np.ndarray:
        """Map thermal pixel coordinates (N, 2) to RGB pixel coordinates for the given sizes."""
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if self.mode == "identity":
            s = _scale_matrix(rgb_wh[0] / thermal_wh[0], rgb_wh[1] / thermal_wh[1])
            out = cv2.perspectiveTransform(pts.reshape(-1, 1, 2), s).reshape(-1, 2)
        elif self.mode == "homography":
            out = cv2.perspectiveTransform(pts.reshape(-1, 1, 2), self._sized_homography(thermal_wh, rgb_wh)).reshape(
                -1, 2
            )
        else:
            k_t, _ = self.thermal_camera.scaled_to(*thermal_wh, what="thermal image")
            k_r, _ = self.rgb_camera.scaled_to(*rgb_wh, what="RGB size")
            norm = self.thermal_camera.undistort(pts, k_t)
            rays = np.column_stack([norm, np.ones(len(norm))]) @ self.plane_homography.T
            out = self.rgb_camera.project(rays, k_r)
        return out - np.asarray(self.offset)

    def _sized_homography(self, thermal_wh: tuple[int, int], rgb_wh: tuple[int, int]) -> np.ndarray:
        s_t = _scale_matrix(*_check_scale(self.thermal_size, thermal_wh, "thermal image"))
        s_r = _scale_matrix(*_check_scale(self.rgb_size, rgb_wh, "RGB size"))
        return s_r @ self.homography @ np.linalg.inv(s_t)

    def _source_coordinates(
        self, thermal_wh: tuple[int, int], rgb_wh: tuple[int, int], xs: np.ndarray | None = None, ys=None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For every sample point, the thermal pixel it comes from (map_x, map_y) and a front mask.

        The sample points are RGB pixel coordinates ``xs``, ``ys`` (default: every RGB pixel)."""
        w, h = rgb_wh
        if xs is None:
            xs, ys = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
        if self.mode == "identity":  # a plain resize, pixel centres aligned
            sx, sy = thermal_wh[0] / w, thermal_wh[1] / h
            return (xs + 0.5) * sx - 0.5, (ys + 0.5) * sy - 0.5, np.ones(xs.shape, bool)
        if self.mode == "homography":
            inv = np.linalg.inv(self._sized_homography(thermal_wh, rgb_wh))
            den = inv[2, 0] * xs + inv[2, 1] * ys + inv[2, 2]
            front = den > 1e-12
            den = np.where(front, den, 1.0)
            mx = (inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]) / den
            my = (inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]) / den
            return mx, my, front
        # calibrated: RGB pixel -> undistorted ray -> plane -> thermal ray -> distorted thermal pixel
        k_r, _ = self.rgb_camera.scaled_to(w, h, what="RGB size")
        k_t, _ = self.thermal_camera.scaled_to(*thermal_wh, what="thermal image")
        shape = xs.shape
        norm = self.rgb_camera.undistort(np.column_stack([xs.ravel(), ys.ravel()]), k_r)
        rays_t = np.column_stack([norm, np.ones(len(norm))]) @ np.linalg.inv(self.plane_homography).T
        front = rays_t[:, 2] > 1e-9
        rays_t[~front] = (0.0, 0.0, 1.0)
        pix = self.thermal_camera.project(rays_t, k_t)
        return pix[:, 0].reshape(shape), pix[:, 1].reshape(shape), front.reshape(shape)

    def _coordinates(
        self, thermal_wh: tuple[int, int], rgb_wh: tuple[int, int], grid_hw: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Source coordinates (map_x, map_y, front) at the centres of a ``grid_hw`` grid over the RGB image
        (the RGB pixels themselves when it has the RGB size), this registrar's offset included."""
        if self.offset == (0.0, 0.0):
            return self._source_coordinates(thermal_wh, rgb_wh, *_grid_points(rgb_wh, grid_hw))
        (w, h), (gh, gw) = rgb_wh, grid_hw
        du, dv = self.offset[0] * gw / w, self.offset[1] * gh / h  # the shift in grid pixels
        mx, my, front, m = self._calibration._field(thermal_wh, rgb_wh, grid_hw, max(abs(du), abs(dv)))
        iu, iv = math.floor(du), math.floor(dv)
        fu, fv = du - iu, dv - iv
        rows, cols = slice(m + iv, m + iv + gh), slice(m + iu, m + iu + gw)
        rows1, cols1 = slice(m + iv + 1, m + iv + 1 + gh), slice(m + iu + 1, m + iu + 1 + gw)
        weights = ((1 - fu) * (1 - fv), fu * (1 - fv), (1 - fu) * fv, fu * fv)
        corners = ((rows, cols), (rows, cols1), (rows1, cols), (rows1, cols1))

        def sample(field: np.ndarray) -> np.ndarray:
            return sum(wt * field[r, c].astype(np.float64) for wt, (r, c) in zip(weights, corners) if wt > 0)

        seen = np.logical_and.reduce([front[r, c] for wt, (r, c) in zip(weights, corners) if wt > 0])
        return sample(mx), sample(my), seen

    def _field(self, thermal_wh, rgb_wh, grid_hw, reach: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """The unshifted source coordinates on ``grid_hw`` extended by a margin of at least ``reach`` + 2 grid
        pixels on every side (float32, cached per size; grown when a larger shift needs it)."""
        key = (*thermal_wh, *rgb_wh, *grid_hw)
        cached = self._fields.get(key)
        need = int(math.ceil(reach)) + 2
        if cached is not None and cached[3] >= need:
            return cached
        # room for the correction to grow: 32 grid pixels at first, then at least doubled (rarely computed twice)
        margin = max(need + 8, 32 if cached is None else 2 * cached[3])
        mx, my, front = self._source_coordinates(thermal_wh, rgb_wh, *_grid_points(rgb_wh, grid_hw, margin))
        entry = (mx.astype(np.float32), my.astype(np.float32), front, margin)
        with self._cache_lock:
            if key not in self._fields and len(self._fields) >= _CACHE_ENTRIES:
                self._fields.pop(next(iter(self._fields)))
            self._fields[key] = entry
        return entry

    def maps(
        self, thermal_shape: tuple[int, int], rgb_size: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(map1, map2, valid) for cv2.remap, computed once per (thermal size, RGB size) and cached.

        ``thermal_shape`` and ``rgb_size`` are (height, width)."""
        key = (int(thermal_shape[0]), int(thermal_shape[1]), int(rgb_size[0]), int(rgb_size[1]))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        thermal_wh, rgb_wh = (key[1], key[0]), (key[3], key[2])
        mx, my, front = self._coordinates(thermal_wh, rgb_wh, (key[2], key[3]))
        entry = self._remap_maps(mx, my, front, thermal_wh)
        self._remember(key, entry)
        return entry

    def _remap_maps(self, mx, my, front, thermal_wh, scale=(1.0, 1.0), margin=1e-6):
        """(map1, map2, valid) for cv2.remap from thermal source coordinates (float, full thermal size).

        ``scale`` maps them onto a reduced copy of the thermal image (pixel centres aligned); a
        sample is valid within ``margin`` pixels outside the outer pixel centres."""
        lo, hi_x, hi_y = -margin, thermal_wh[0] - 1 + margin, thermal_wh[1] - 1 + margin
        valid = front & (mx >= lo) & (mx <= hi_x) & (my >= lo) & (my <= hi_y)
        if scale != (1.0, 1.0):
            mx, my = (mx + 0.5) * scale[0] - 0.5, (my + 0.5) * scale[1] - 0.5
        mx = np.where(front, mx, -10.0).astype(np.float32)
        my = np.where(front, my, -10.0).astype(np.float32)
        if self.interpolation == cv2.INTER_NEAREST:
            map1, map2 = mx, my  # fixed-point maps would round differently from nearest on float maps
        else:
            map1, map2 = cv2.convertMaps(mx, my, cv2.CV_16SC2)
        valid.setflags(write=False)  # cached and handed out with every frame: nobody may change it
        return map1, map2, valid

    def _remember(self, key: tuple, entry) -> None:
        with self._cache_lock:
            if len(self._cache) >= _CACHE_ENTRIES:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = entry

    def grid_maps(
        self, thermal_shape: tuple[int, int], rgb_size: tuple[int, int], grid_size: tuple[int, int]
    ) -> GridWarp:
        """How to warp a thermal image straight into a (usually coarser) grid over the RGB image.

        ``grid_size`` (h, w) covers the whole RGB image of ``rgb_size`` (H, W), as a resize of it
        would (pixel centres aligned): the model's input grid. The thermal image is first halved
        ``levels`` times (box filter, like a mip-map) while the thermal pixels under one grid pixel
        still span two or more in both directions, so the warp that follows samples an image at
        about its own density instead of skipping pixels. Cached like :meth:`maps`.
        """
        key = ("grid", *(int(v) for v in (*thermal_shape[:2], *rgb_size, *grid_size)))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        (ht, wt), (h, w), (gh, gw) = key[1:3], key[3:5], key[5:7]
        mx, my, front = self._coordinates((wt, ht), (w, h), (gh, gw))
        if self.offset != (0.0, 0.0):  # a shift does not change the sampling density: the calibration's plan
            base = self._calibration.grid_maps(thermal_shape, rgb_size, grid_size)
            levels, shape = base.levels, base.reduced_shape
        else:
            levels, shape = 0, (ht, wt)
            spacing = min(_median_step(mx, front, axis=1), _median_step(my, front, axis=0))
            while spacing >= 2.0 and min(shape) >= 4:
                spacing /= 2.0
                levels += 1
                shape = (shape[0] // 2, shape[1] // 2)
        scale = (shape[1] / wt, shape[0] / ht)
        # a grid pixel is seen when its centre falls on the thermal image (its outer half pixels included)
        map1, map2, valid = self._remap_maps(mx, my, front, (wt, ht), scale, margin=0.5)
        entry = GridWarp(levels, shape, map1, map2, valid)
        self._remember(key, entry)
        return entry

    def warp_to_grid(
        self, thermal: np.ndarray, rgb_size: tuple[int, int], grid_size: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Warp ``thermal`` (Ht, Wt) into the grid of :meth:`grid_maps`: ``(float32 (h, w), valid)``.

        Pixels the thermal camera does not see hold ``fill_value`` and are False in ``valid``; the
        output is float32 whatever the input dtype (NaN stays NaN for the caller to mask)."""
        thermal = np.asarray(thermal)
        if thermal.ndim != 2 or thermal.shape[0] < 2 or thermal.shape[1] < 2:
            raise RegistrationError(f"thermal image must be (H, W), got shape {thermal.shape}")
        plan = self.grid_maps(thermal.shape, rgb_size, grid_size)
        # OpenCV halves uint8/uint16/int16/float32 as they are; anything else is made float32 first
        src = thermal if thermal.dtype in (np.uint8, np.uint16, np.int16, np.float32) else thermal.astype(np.float32)
        for _ in range(plan.levels):
            src = cv2.resize(src, (src.shape[1] // 2, src.shape[0] // 2), interpolation=cv2.INTER_AREA)
        src = src.astype(np.float32, copy=False)
        out = cv2.remap(src, plan.map1, plan.map2, self.interpolation, borderMode=cv2.BORDER_REPLICATE)
        out[~plan.valid] = self.fill_value
        return out, plan.valid

    def warp(self, thermal: np.ndarray, rgb_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Warp ``thermal`` (Ht, Wt) or (Ht, Wt, C) into the RGB grid of ``rgb_size`` = (H, W).

        Returns ``(warped, valid)``: ``warped`` has the input's dtype, ``valid`` is a bool (H, W) mask of
        the pixels the thermal camera sees (elsewhere ``warped`` holds ``fill_value``)."""
        thermal = np.asarray(thermal)
        if thermal.ndim not in (2, 3) or thermal.shape[0] < 2 or thermal.shape[1] < 2:
            raise RegistrationError(f"thermal image must be (H, W) or (H, W, C), got shape {thermal.shape}")
        try:
            h, w = (int(v) for v in rgb_size)
        except (TypeError, ValueError):
            raise RegistrationError(f"rgb_size must be (height, width), got {rgb_size!r}") from None
        if h <= 0 or w <= 0:
            raise RegistrationError(f"rgb_size must be positive (height, width), got {rgb_size!r}")
        src, cast_back = thermal, None
        if thermal.dtype == np.bool_ or thermal.dtype.type not in _REMAP_DTYPES:
            src, cast_back = thermal.astype(np.float32), thermal.dtype
        if self._plain_identity:
            if src.shape[:2] == (h, w):
                out = src.copy()
            else:
                interp = (
                    self.interpolation
                    if self.interpolation != cv2.INTER_LINEAR or src.shape[0] <= h
                    else cv2.INTER_AREA
                )
                out = cv2.resize(src, (w, h), interpolation=interp)
            valid = np.ones((h, w), dtype=bool)
        else:
            map1, map2, valid = self.maps(src.shape[:2], (h, w))
            out = cv2.remap(
                src, map1, map2, self.interpolation, borderMode=cv2.BORDER_CONSTANT, borderValue=self.fill_value
            )
            if out.ndim == 2 and src.ndim == 3:
                out = out[:, :, None]
            if self.interpolation != cv2.INTER_NEAREST:
                out[~valid] = self.fill_value
        if cast_back is not None:
            if np.issubdtype(cast_back, np.integer):
                info = np.iinfo(cast_back)
                out = np.clip(np.rint(out), info.min, info.max)
            out = out.astype(cast_back)
        return out, valid

    def __repr__(self) -> str:
        return f"ThermalRegistrar(mode={self.mode!r})"

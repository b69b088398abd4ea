"""One path for every frame: thermal normalisation -> registration -> segmenter -> render.

``FramePipeline`` is what the live node's worker thread and bag replay both call
for each RGB-thermal pair formed by :class:`rgbt_seg_ros.sync.ApproximateTimePairer`.
No ROS import: messages are read with :mod:`rgbt_seg_ros.imaging`, which works on
rclpy and rosbags messages alike.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import yaml

from .imaging import (
    COLOR_ENCODINGS,
    THERMAL_ENCODINGS,
    ThermalNormalizer,
    compressed_to_numpy,
    image_to_numpy,
    to_rgb,
)
from .registration import ThermalRegistrar
from .render import blend_overlay, colorize, parse_palette
from .resources import resolve_data_file

OUTPUTS = ("labels", "overlay", "confidence", "colored_labels", "thermal_registered")


@dataclass
class FrameResult:
    labels: np.ndarray  # (H, W) uint8 / uint16 class ids, RGB frame
    confidence: np.ndarray  # (H, W) float32 in [0, 1]
    rgb_only: bool
    thermal_registered: np.ndarray | None = None  # (H, W) float32 [0, 1]
    valid: np.ndarray | None = None  # (H, W) bool: thermal seen and finite
    overlay: np.ndarray | None = None  # (H, W, 3) uint8 RGB
    colored_labels: np.ndarray | None = None  # (H, W, 3) uint8 RGB
    timings_ms: dict[str, float] = field(default_factory=dict)


def is_compressed(msg) -> bool:
    """A ``sensor_msgs/CompressedImage`` (rclpy or rosbags): it has ``format`` instead of ``encoding``."""
    return hasattr(msg, "format") and not hasattr(msg, "encoding")


def rgb_from_msg(msg, max_pixels: int | None = None) -> np.ndarray:
    """An RGB camera message (raw or compressed) -> (H, W, 3) uint8 in RGB order (a view for raw rgb8)."""
    if is_compressed(msg):
        arr, encoding = compressed_to_numpy(msg, expected=COLOR_ENCODINGS, max_pixels=max_pixels)
        return to_rgb(arr, encoding)
    return to_rgb(image_to_numpy(msg, expected=COLOR_ENCODINGS, max_pixels=max_pixels), str(msg.encoding))


def thermal_from_msg(msg, max_pixels: int | None = None) -> np.ndarray:
    """A thermal camera message (raw or compressed) -> (H, W) raw array (uint8, uint16 or float32)."""
    if is_compressed(msg):
        return compressed_to_numpy(msg, expected=THERMAL_ENCODINGS, max_pixels=max_pixels)[0]
    return image_to_numpy(msg, expected=THERMAL_ENCODINGS, max_pixels=max_pixels)


def demo_model_note(segmenter) -> str | None:
    """A one-time warning when the model only knows the synthetic demo scenes (the shipped default)."""
    if segmenter.dataset_info.name != "synthetic":
        return None
    return (
        f"the model ({segmenter.backend}, {segmenter.dataset_info.num_classes} synthetic classes) was trained on "
        "the project's synthetic RGB-thermal scenes only: it is a demo and has never seen a real camera; set "
        "model.checkpoint to a checkpoint trained on your data (README: Training)"
    )


def normalizer_from_params(params: dict[str, Any]) -> ThermalNormalizer:
    return ThermalNormalizer(
        mode=params["thermal.mode"],
        min=float(params["thermal.min"]),
        max=float(params["thermal.max"]),
        p_low=float(params["thermal.p_low"]),
        p_high=float(params["thermal.p_high"]),
        scale=float(params["thermal.scale"]),
        offset=float(params["thermal.offset"]),
    )


def calibration_without_intrinsics(params: dict[str, Any]) -> dict | None:
    """The calibrated-mode YAML when it gives only extrinsics and plane (intrinsics come from camera_info)."""
    if params["registration.mode"] != "calibrated" or not params["registration.file"]:
        return None
    path = resolve_data_file(params["registration.file"])
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if "rgb_camera" in data and "thermal_camera" in data:
        return None
    for key in ("rotation", "translation", "plane_distance"):
        if key not in data:
            raise ValueError(f"{path}: calibrated registration needs '{key}'")
    return data


def registrar_from_camera_info(params: dict[str, Any], rgb_info, thermal_info) -> ThermalRegistrar:
    """Calibrated registration from the two camera_info messages plus the file's extrinsics and plane."""
    data = calibration_without_intrinsics(params)
    if data is None:
        raise ValueError("registration.file already holds both cameras' intrinsics; camera_info is not needed")
    return ThermalRegistrar.from_camera_info(
        rgb_info,
        thermal_info,
        data["rotation"],
        data["translation"],
        float(data["plane_distance"]),
        interpolation=params["registration.interpolation"],
    )


def registrar_from_params(params: dict[str, Any]) -> ThermalRegistrar | None:
    """The registrar the parameters describe; None when it must wait for camera_info messages."""
    mode = params["registration.mode"]
    interpolation = params["registration.interpolation"]
    if mode == "identity":
        return ThermalRegistrar.identity(interpolation=interpolation)
    path = params["registration.file"]
    if not path:
        raise ValueError(f"registration.mode '{mode}' needs registration.file (a calibration YAML)")
    if calibration_without_intrinsics(params) is not None:
        return None
    registrar = ThermalRegistrar.from_yaml(resolve_data_file(path), interpolation=interpolation)
    if registrar.mode != mode:
        raise ValueError(
            f"registration.file {path} describes mode '{registrar.mode}', but registration.mode is '{mode}'"
        )
    return registrar


def segmenter_from_params(params: dict[str, Any]):
    """Load the model the parameters name: a checkpoint directory, else a model config (+ SAM2 weights)."""
    from .segmenter import Segmenter  # torch import: only when a model is really needed

    device, precision, compile_mode = params["model.device"], params["model.precision"], params["model.compile"]
    if params["model.checkpoint"]:
        return Segmenter.from_checkpoint(
            resolve_data_file(params["model.checkpoint"]), device=device, precision=precision, compile=compile_mode
        )
    sam2 = params["model.sam2_checkpoint"] or None
    return Segmenter.from_config(
        resolve_data_file(params["model.config"]),
        dataset=params["model.dataset"],
        sam2_checkpoint=sam2,
        device=device,
        precision=precision,
        compile=compile_mode,
    )


class FramePipeline:
    """Process one RGB-thermal pair (or an RGB frame alone, when thermal is lost)."""

    def __init__(
        self,
        segmenter,
        normalizer: ThermalNormalizer,
        registrar: ThermalRegistrar | None,
        overlay_alpha: float = 0.5,
        palette=None,
    ) -> None:
        self.segmenter = segmenter
        self.normalizer = normalizer
        self.registrar = registrar
        self.overlay_alpha = float(overlay_alpha)
        self.num_classes = segmenter.dataset_info.num_classes
        self.palette = self._palette(palette)
        self.size_mismatch: str | None = None  # set once: identity registration over differently sized images

    @classmethod
    def from_params(cls, params: dict[str, Any], segmenter=None) -> FramePipeline:
        segmenter = segmenter if segmenter is not None else segmenter_from_params(params)
        return cls(
            segmenter,
            normalizer_from_params(params),
            registrar_from_params(params),
            overlay_alpha=params["output.overlay_alpha"],
            palette=params["output.palette"],
        )

    def _palette(self, palette) -> np.ndarray:
        if palette is None or list(palette) in ([], [0]):
            return self.segmenter.dataset_info.palette
        return parse_palette(list(palette), num_classes=self.num_classes)

    def set_palette(self, palette) -> None:
        self.palette = self._palette(palette)

    def register_thermal(self, thermal_raw: np.ndarray, rgb_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Normalise and warp thermal into the RGB grid: (float32 [0, 1], valid bool)."""
        if self.registrar is None:
            raise RuntimeError("thermal registration is not ready (calibrated mode waits for both camera_info topics)")
        if self.size_mismatch is None and self.registrar.mode == "identity" and thermal_raw.shape[:2] != rgb_hw:
            self.size_mismatch = (
                f"RGB is {rgb_hw[1]}x{rgb_hw[0]} but thermal is {thermal_raw.shape[1]}x{thermal_raw.shape[0]} under "
                "identity registration: thermal is only resized, which misaligns the two unless the cameras share "
                "one field of view; calibrate (rgbt-seg calibrate) and set registration.mode/registration.file"
            )
        norm, finite = self.normalizer.normalize(thermal_raw)
        warped, valid = self.registrar.warp(norm, rgb_size=rgb_hw)
        if finite is not None:
            finite_warped, _ = self.registrar.warp(finite.astype(np.uint8), rgb_size=rgb_hw)
            valid = valid & (finite_warped > 0)
        return warped.astype(np.float32, copy=False), valid

    def process(self, rgb: np.ndarray, thermal_raw: np.ndarray | None, outputs=OUTPUTS) -> FrameResult:
        """Segment one frame. ``thermal_raw`` None means RGB only (thermal blank and invalid everywhere)."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        h, w = rgb.shape[:2]
        if thermal_raw is None:
            thermal = np.zeros((h, w), np.float32)
            valid = np.zeros((h, w), bool)
        else:
            thermal, valid = self.register_thermal(thermal_raw, (h, w))
        t1 = time.perf_counter()
        timings["thermal"] = (t1 - t0) * 1e3
        result = self.segmenter(rgb, thermal, valid)
        for key, value in result.timings.items():
            timings[key] = value
        t2 = time.perf_counter()
        out = FrameResult(
            labels=result.labels,
            confidence=result.confidence,
            rgb_only=thermal_raw is None,
            thermal_registered=thermal,
            valid=valid,
        )
        if "overlay" in outputs:
            out.overlay = blend_overlay(rgb, result.labels, self.palette, self.overlay_alpha)
        if "colored_labels" in outputs:
            out.colored_labels = colorize(result.labels, self.palette)
        timings["render"] = (time.perf_counter() - t2) * 1e3
        out.timings_ms = timings
        return out


def thermal_display_u8(thermal: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """Registered thermal [0, 1] -> mono8 for ``~/thermal_registered`` (unseen pixels black)."""
    u8 = cv2.convertScaleAbs(thermal, alpha=255.0)
    if valid is not None:
        u8[~valid] = 0
    return u8


class LatestSlot:
    """A single-slot mailbox: ``put`` replaces an unconsumed item (returns True then), ``get`` takes it.

    The node's subscription side puts the newest pair; the worker takes it. When the
    model is slower than the cameras the older pair is superseded, never queued.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item = None
        self._full = False
        self._closed = False

    def put(self, item) -> bool:
        with self._cond:
            replaced = self._full
            self._item, self._full = item, True
            self._cond.notify()
            return replaced

    def get(self, timeout: float | None = None):
        with self._cond:
            if not self._full and not self._closed:
                self._cond.wait(timeout)
            if not self._full:
                return None
            item, self._item, self._full = self._item, None, False
            return item

    def clear(self) -> None:
        with self._cond:
            self._item, self._full = None, False

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class ThermalWatch:
    """Decides when thermal counts as lost (``on_thermal_loss``), on any clock in seconds.

    The node feeds it monotonic time, replay the bag's receive time, so both switch to
    RGB-only at the same moments. Thermal counts as lost only when RGB has *kept arriving*
    for ``timeout`` seconds without thermal: a pause of both cameras (a driver restart, a
    paused bag) is not a thermal loss, so the first RGB frame after it is paired normally.

    A pause is an RGB gap longer than both ``timeout`` and three typical RGB intervals (so a
    camera slower than the timeout still counts as arriving); the RGB streak restarts after it.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = float(timeout)
        self.reset()

    def thermal_seen(self, t: float) -> None:
        self.last_thermal = t

    def lost(self, t: float) -> bool:
        """Call on each RGB frame: is thermal lost at time ``t``?"""
        if self.last_rgb is None:
            self.rgb_streak_start = t
        else:
            gap = t - self.last_rgb
            typical = sorted(self._intervals)[len(self._intervals) // 2] if self._intervals else 0.0
            if gap > max(self.timeout, 3.0 * typical):
                self.rgb_streak_start = t  # RGB itself was silent: a pause (of both cameras), not a thermal loss
            self._intervals.append(gap)
        self.last_rgb = t
        since = self.rgb_streak_start if self.last_thermal is None else max(self.last_thermal, self.rgb_streak_start)
        return t - since > self.timeout

    def reset(self) -> None:
        self.last_thermal: float | None = None
        self.last_rgb: float | None = None
        self.rgb_streak_start: float | None = None
        self._intervals: deque[float] = deque(maxlen=9)

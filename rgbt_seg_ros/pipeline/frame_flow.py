"""The frame flow: what the live node, bag replay and the benchmarks share, once.

From camera arrivals to finished frames, on any clock (the node's monotonic clock, a bag's
receive time), with no ROS import (messages are read by :mod:`rgbt_seg_ros.pipeline.imaging`):

``FrameFlow``          arrivals -> frames to segment: the :class:`~rgbt_seg_ros.pipeline.sync.ApproximateTimePairer`
                       built from the node's parameters (:func:`pairer_from_params`) and two
                       :class:`PartnerWatch` es that switch to RGB-only frames when thermal is lost
                       and to thermal-only frames when RGB is lost.
``LatestSlot``         the single-slot mailbox between arrivals and the worker (newest pair wins),
                       or, with ``keep_all``, a one-place queue that makes the producer wait (replay).
``FramePipeline``      the per-frame stages: ``prepare`` (thermal warped straight into the model's
                       grid, with the registration health's drift correction and estimates,
                       RGB resized and normalised), ``infer`` (forward; labels decided at the
                       model's grid, on its device), ``finish`` (labels and overlay at the RGB size,
                       only the outputs somebody wants).
``StagedWorker``       the three stages on three threads, so that preparing frame n+1 and finishing
                       frame n-1 overlap the forward of frame n; live it keeps only the newest frame
                       between stages (no backlog), in replay every frame, in order.
``labels_encoding``    mono8 / mono16 for a label image; ``latency_summary``: p50/p95 of timings.

The node adapts this to rclpy (subscriptions, publishers, diagnostics) and replay to rosbags
(reader, writer, metrics); neither re-implements any of it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import yaml

from ..resources import resolve_data_file
from .imaging import ThermalNormalizer
from .registration import ThermalRegistrar
from .registration_health import HealthSettings, RegistrationMonitor
from .render import blend, colorize, parse_palette, upscale_nearest
from .sync import ApproximateTimePairer, Pair

OUTPUTS = ("labels", "overlay", "confidence", "colored_labels", "thermal_registered")


@dataclass
class FrameResult:
    """One segmented frame at the RGB image's size; outputs nobody asked for are None."""

    labels: np.ndarray  # (H, W) uint8 / uint16 class ids (thermal only: ignore_index where thermal does not see)
    rgb_only: bool
    thermal_only: bool = False
    labels_grid: np.ndarray | None = None  # (h, w) the model's decision at its grid
    confidence_grid: np.ndarray | None = None  # (h, w) float32 max softmax probability
    valid_grid: np.ndarray | None = None  # (h, w) bool: where the model was given thermal
    confidence: np.ndarray | None = None  # (H, W) float32 in [0, 1]
    thermal_registered: np.ndarray | None = None  # (H, W) float32 [0, 1]
    valid: np.ndarray | None = None  # (H, W) bool: thermal seen and finite
    overlay: np.ndarray | None = None  # (H, W, 3) uint8 RGB
    colored_labels: np.ndarray | None = None  # (H, W, 3) uint8 RGB
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class PreparedFrame:
    """A frame after :meth:`FramePipeline.prepare`: its inputs and the model's input on its device."""

    rgb: np.ndarray | None  # None: thermal only (RGB lost)
    thermal_raw: np.ndarray | None
    valid_grid: np.ndarray  # (h, w) bool at the model's grid
    model_input: Any  # segmenter.ModelInput
    timings_ms: dict[str, float]
    rgb_hw: tuple[int, int] = (0, 0)  # the RGB grid the outputs are made in
    registrar: ThermalRegistrar | None = None  # the warp used (the calibration, plus any drift correction)


def labels_encoding(labels: np.ndarray) -> str:
    """The sensor_msgs encoding of a label image: mono8 up to 255 classes, else mono16."""
    return "mono8" if labels.dtype == np.uint8 else "mono16"


def latency_summary(values) -> dict:
    """``{"p50", "p95", "n"}`` of a sequence of timings (None for an empty one)."""
    arr = np.fromiter(values, float)
    if arr.size == 0:
        return {"p50": None, "p95": None, "n": 0}
    p50, p95 = np.percentile(arr, (50, 95))
    return {"p50": float(p50), "p95": float(p95), "n": int(arr.size)}


def pairer_from_params(params: dict[str, Any], on_warning=None) -> ApproximateTimePairer:
    """The node's pairer (``sync.*``). ``sync.max_wait: 0`` releases a pair as soon as it is formed,
    live and in replay alike (the clock is the node's, or the bag's receive time)."""
    return ApproximateTimePairer(
        queue_size=int(params["sync.queue_size"]),
        slop=float(params["sync.slop"]),
        exact=bool(params["sync.exact"]),
        max_wait=float(params["sync.max_wait"]),
        on_warning=on_warning,
    )


def demo_model_note(segmenter) -> str | None:
    """A one-time warning when the model only knows the synthetic demo scenes (the shipped default)."""
    if segmenter.dataset_info.name != "synthetic":
        return None
    return (
        f"the model ({segmenter.backend}, {segmenter.dataset_info.num_classes} synthetic classes) was trained on "
        "the project's synthetic RGB-thermal scenes only: it is a demo and has never seen a real camera; set "
        "model.checkpoint to a checkpoint trained on your data (docs/training.md)"
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


def class_sets_from_params(params: dict[str, Any]) -> tuple[str, ...]:
    """The class sets of the model the parameters name, primary first, read from its files (no model is built):
    the checkpoint's ``config.yaml``, or ``model.config`` with ``model.dataset`` as its primary set."""
    from ..models.checkpoint import checkpoint_class_sets
    from ..models.class_sets import config_class_sets
    from ..models.classes import load_dataset_info
    from ..models.registry import load_model_config

    if params["model.checkpoint"]:
        return checkpoint_class_sets(resolve_data_file(params["model.checkpoint"]))
    cfg = load_model_config(resolve_data_file(params["model.config"]))
    primary = load_dataset_info(params["model.dataset"]) if params["model.dataset"] else None
    return tuple(config_class_sets(cfg, primary))


def checked_class_set(params: dict[str, Any], on_problem=None) -> str | None:
    """``model.class_set`` when the model has that set; None for "" (the primary).

    An unknown set is the node's bad-parameter case: with ``on_problem`` it is reported there (a sentence
    naming the sets there are) and the primary set is used, as any refused parameter falls back to its
    default; without, :class:`~rgbt_seg_ros.models.class_sets.ClassSetError` is raised.
    """
    from ..models.class_sets import ClassSetError, unknown_set_message

    wanted = params.get("model.class_set") or None
    if wanted is None:
        return None
    known = class_sets_from_params(params)
    if wanted in known:
        return wanted
    what = params["model.checkpoint"] or params["model.config"]
    text = f"model.class_set: {unknown_set_message(wanted, known, f'model {what}')}"
    if on_problem is None:
        raise ClassSetError(text)
    on_problem(f"{text}; using the default '' (the primary set '{known[0]}')")
    return None


def segmenter_from_params(params: dict[str, Any], on_problem=None):
    """Load the model the parameters name: a checkpoint directory, else a model config (+ SAM2 weights),
    segmenting with ``model.class_set`` (see :func:`checked_class_set` for ``on_problem``)."""
    from .segmenter import Segmenter  # torch import: only when a model is really needed

    device, precision, compile_mode = params["model.device"], params["model.precision"], params["model.compile"]
    class_set = checked_class_set(params, on_problem)
    runtime = runtime_from_params(params)
    if params["model.checkpoint"]:
        return Segmenter.from_checkpoint(
            resolve_data_file(params["model.checkpoint"]),
            device=device,
            precision=precision,
            compile=compile_mode,
            class_set=class_set,
            **runtime,
        )
    sam2 = params["model.sam2_checkpoint"] or None
    return Segmenter.from_config(
        resolve_data_file(params["model.config"]),
        dataset=params["model.dataset"],
        sam2_checkpoint=sam2,
        device=device,
        precision=precision,
        compile=compile_mode,
        class_set=class_set,
        **runtime,
    )


def runtime_from_params(params: dict[str, Any]) -> dict[str, Any]:
    """The Segmenter's runtime arguments from the ``model.*`` parameters."""
    providers = tuple(p.strip().lower() for p in params["model.providers"].split(",") if p.strip())
    return {
        "runtime": params["model.runtime"],
        "providers": providers,
        "provider_options": {
            "fp16": params["model.trt_fp16"],
            "engine_cache_dir": params["model.trt_engine_cache_dir"],
        },
        "onnx_cache_dir": params["model.onnx_cache_dir"] or None,
        "onnx_tolerance": params["model.onnx_tolerance"],
    }


class FramePipeline:
    """The per-frame stages for one RGB-thermal pair (or an RGB frame alone, when thermal is lost).

    ``prepare`` -> ``infer`` -> ``finish`` (``process`` runs all three). Nothing at the RGB
    image's full resolution is made in float: thermal is warped straight into the model's grid
    (:meth:`ThermalRegistrar.warp_to_grid`) and normalised there with the bounds of the full
    frame, RGB is resized as uint8, labels come back as uint8 at the grid and are resized to
    the RGB size by nearest neighbour; the overlay is a table lookup at the grid, the same
    resize and one blend. The full-resolution registered thermal is made only for the
    ``thermal_registered`` output.
    """

    def __init__(
        self,
        segmenter,
        normalizer: ThermalNormalizer,
        registrar: ThermalRegistrar | None,
        overlay_alpha: float = 0.5,
        palette=None,
        health: RegistrationMonitor | None = None,
    ) -> None:
        self.segmenter = segmenter
        self.normalizer = normalizer
        self.registrar = registrar
        self.overlay_alpha = float(overlay_alpha)
        self.num_classes = segmenter.dataset_info.num_classes
        self.palette = self._palette(palette)
        self.size_mismatch: str | None = None  # set once: identity registration over differently sized images
        self.health = health  # registration drift estimates and the optional correction
        self.rgb_hw: tuple[int, int] | None = None  # the last RGB size seen: the grid of thermal-only frames
        self._shifted: ThermalRegistrar | None = None  # the calibration plus the correction now applied
        self._shifted_base: ThermalRegistrar | None = None  # ... and the calibration it was made from
        self._black: np.ndarray | None = None  # the RGB image of thermal-only frames (what RGB dropout trains)

    @classmethod
    def from_params(
        cls, params: dict[str, Any], segmenter=None, on_problem=None, synchronous_health: bool = False
    ) -> FramePipeline:
        """The pipeline the parameters describe; ``on_problem``: where a refused ``model.class_set`` is
        reported (the primary set is used then); without it that is an error. ``synchronous_health``: drift
        estimates inside the frame path (replay: repeatable) instead of on their own thread (live)."""
        segmenter = segmenter if segmenter is not None else segmenter_from_params(params, on_problem)
        return cls(
            segmenter,
            normalizer_from_params(params),
            registrar_from_params(params),
            overlay_alpha=params["output.overlay_alpha"],
            palette=params["output.palette"],
            health=RegistrationMonitor(HealthSettings.from_params(params), synchronous=synchronous_health),
        )

    def _palette(self, palette) -> np.ndarray:
        if palette is None or list(palette) in ([], [0]):
            return self.segmenter.dataset_info.palette
        return parse_palette(list(palette), num_classes=self.num_classes)

    def set_palette(self, palette) -> None:
        self.palette = self._palette(palette)

    def _registrar(self, thermal_raw: np.ndarray, rgb_hw: tuple[int, int]) -> ThermalRegistrar:
        if self.registrar is None:
            raise RuntimeError("thermal registration is not ready (calibrated mode waits for both camera_info topics)")
        if self.size_mismatch is None and self.registrar.mode == "identity" and thermal_raw.shape[:2] != rgb_hw:
            self.size_mismatch = (
                f"RGB is {rgb_hw[1]}x{rgb_hw[0]} but thermal is {thermal_raw.shape[1]}x{thermal_raw.shape[0]} under "
                "identity registration: thermal is only resized, which misaligns the two unless the cameras share "
                "one field of view; calibrate (rgbt-seg calibrate) and set registration.mode/registration.file"
            )
        return self.registrar

    def _corrected(self, registrar: ThermalRegistrar, t: float | None) -> ThermalRegistrar:
        """The calibration plus the drift correction applied now (advanced to ``t``), in 0.25 px steps so the
        warp's maps are rebuilt only when the correction has really moved."""
        if self.health is None:
            return registrar
        dx, dy = self.health.correction(t)
        q = (round(dx * 4.0) / 4.0, round(dy * 4.0) / 4.0)
        if q == (0.0, 0.0):
            return registrar
        shifted = self._shifted
        if shifted is None or shifted.offset != q or self._shifted_base is not registrar:
            shifted = registrar.shifted(*q)
            self._shifted, self._shifted_base = shifted, registrar
        return shifted

    def register_thermal(
        self, thermal_raw: np.ndarray, rgb_hw: tuple[int, int], registrar: ThermalRegistrar | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Normalise and warp thermal into the full RGB grid: (float32 [0, 1], valid bool)."""
        registrar = registrar or self._registrar(thermal_raw, rgb_hw)
        norm, finite = self.normalizer.normalize(thermal_raw)
        warped, valid = registrar.warp(norm, rgb_size=rgb_hw)
        if finite is not None:
            finite_warped, _ = registrar.warp(finite.astype(np.uint8), rgb_size=rgb_hw)
            valid = valid & (finite_warped > 0)
        return warped.astype(np.float32, copy=False), valid

    def thermal_to_grid(
        self,
        thermal_raw: np.ndarray,
        rgb_hw: tuple[int, int],
        grid_hw: tuple[int, int],
        registrar: ThermalRegistrar | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Thermal warped into the model's grid and normalised there: (float32 [0, 1], valid bool).

        The normalisation bounds come from the whole raw frame (percentile mode), the affine map is
        applied after the warp; a grid pixel that saw a NaN/inf thermal pixel is not valid."""
        registrar = registrar or self._registrar(thermal_raw, rgb_hw)
        thermal_raw = ThermalNormalizer.single_channel(thermal_raw)
        bounds = self.normalizer.affine(thermal_raw)
        warped, valid = registrar.warp_to_grid(thermal_raw, rgb_hw, grid_hw)
        norm, finite = self.normalizer.apply(warped, bounds)
        if finite is not None:
            valid = valid & finite
        return norm, valid

    def observe_pair(self, rgb: np.ndarray | None, thermal_raw: np.ndarray | None, t: float | None) -> None:
        """A frame was formed: a pair (both images, a clock) goes to the registration health, which counts it
        and estimates the drift on every N-th (``registration.check_every``) against the calibration.
        :meth:`StagedWorker.submit` calls this before the worker may drop the pair, so estimates come every N
        paired frames whatever the model's speed; :meth:`process` calls it for callers without a worker."""
        if rgb is None or thermal_raw is None or t is None:
            return
        if self.health is not None and self.registrar is not None:
            self.health.offer(rgb, thermal_raw, self.registrar, t)

    def prepare(
        self, rgb: np.ndarray | None, thermal_raw: np.ndarray | None, side_stream: bool = False, t: float | None = None
    ) -> PreparedFrame:
        """Stage 1: thermal into the model's grid, then the model's input on its device.

        ``rgb`` None is a thermal-only frame (RGB lost): the model sees a black RGB image (what
        ``modality_dropout.p_rgb`` trains) and the outputs are made in the last RGB grid seen.
        ``t`` (the caller's clock, s): the drift correction advances to it (the drift estimate is fed by
        :meth:`observe_pair`, where the frame is formed)."""
        if rgb is None and thermal_raw is None:
            raise ValueError("a frame needs RGB, thermal or both")
        t0 = time.perf_counter()
        registrar = None
        if thermal_raw is not None:
            rgb_hw = rgb.shape[:2] if rgb is not None else self._thermal_only_hw(thermal_raw)
            base = self._registrar(thermal_raw, rgb_hw)
            registrar = self._corrected(base, t)
        else:
            rgb_hw = rgb.shape[:2]
        if rgb is not None:
            self.rgb_hw = rgb_hw
        grid = self.segmenter.grid_size(rgb_hw)
        if thermal_raw is None:  # RGB only: thermal blank and invalid everywhere
            thermal, valid = np.zeros(grid, np.float32), np.zeros(grid, bool)
        else:
            thermal, valid = self.thermal_to_grid(thermal_raw, rgb_hw, grid, registrar)
        t1 = time.perf_counter()
        model_input = self.segmenter.prepare(
            rgb if rgb is not None else self._black_rgb(rgb_hw), thermal, valid, side_stream=side_stream
        )
        timings = {"thermal": (t1 - t0) * 1e3, **model_input.timings}
        return PreparedFrame(rgb, thermal_raw, valid, model_input, timings, tuple(rgb_hw), registrar)

    def reset_state(self) -> None:
        """Forget what earlier frames left: the last RGB size, the correction, the drift estimates (a new bag)."""
        self.rgb_hw = None
        self._shifted = self._shifted_base = None
        if self.health is not None:
            self.health.reset()

    def close(self) -> None:
        """End the registration monitor's thread (the pipeline stays usable; a later estimate starts it again)."""
        if self.health is not None:
            self.health.close()

    def _thermal_only_hw(self, thermal_raw: np.ndarray) -> tuple[int, int]:
        """The RGB grid of a thermal-only frame: the last RGB size seen, else the calibration's, else thermal's."""
        if self.rgb_hw is not None:
            return self.rgb_hw
        if self.registrar is not None and self.registrar.rgb_size is not None:
            w, h = self.registrar.rgb_size
            return int(h), int(w)
        return tuple(thermal_raw.shape[:2])

    def _black_rgb(self, hw: tuple[int, int]) -> np.ndarray:
        if self._black is None or self._black.shape[:2] != tuple(hw):
            self._black = np.zeros((*hw, 3), np.uint8)
            self._black.setflags(write=False)
        return self._black

    def infer(self, prepared: PreparedFrame):
        """Stage 2: the forward and the per-pixel decision at the model's grid (labels, confidence)."""
        return self.segmenter.infer(prepared.model_input)

    def finish(self, prepared: PreparedFrame, grid, outputs=OUTPUTS) -> FrameResult:
        """Stage 3: labels (always) and the wanted outputs at the RGB image's size."""
        rgb = prepared.rgb
        hw = prepared.rgb_hw
        thermal_only = rgb is None
        labels_grid = grid.labels
        unseen_grid = None
        if thermal_only:  # no prediction where thermal does not see: the dataset's ignore index there
            unseen_grid = ~prepared.valid_grid
            mark = self.segmenter.dataset_info.no_prediction_label(labels_grid.dtype)
            if unseen_grid.any() and mark is not None:
                labels_grid = labels_grid.copy()
                labels_grid[unseen_grid] = mark
        t0 = time.perf_counter()
        out = FrameResult(
            labels=upscale_nearest(labels_grid, hw),
            rgb_only=prepared.thermal_raw is None,
            thermal_only=thermal_only,
            labels_grid=labels_grid,
            confidence_grid=grid.confidence,
            valid_grid=prepared.valid_grid,
        )
        t1 = time.perf_counter()
        if "thermal_registered" in outputs or (thermal_only and "overlay" in outputs):
            if prepared.thermal_raw is None:
                out.thermal_registered, out.valid = np.zeros(hw, np.float32), np.zeros(hw, bool)
            else:
                out.thermal_registered, out.valid = self.register_thermal(prepared.thermal_raw, hw, prepared.registrar)
        if "overlay" in outputs or "colored_labels" in outputs:
            colours = upscale_nearest(colorize(labels_grid, self.palette), hw)
            if "overlay" in outputs:
                base = rgb
                if thermal_only:  # the overlay is drawn over the registered thermal image instead
                    base = cv2.cvtColor(thermal_display_u8(out.thermal_registered, out.valid), cv2.COLOR_GRAY2RGB)
                out.overlay = blend(base, colours, self.overlay_alpha)
            if "colored_labels" in outputs:
                out.colored_labels = colours
        if "confidence" in outputs:
            confidence = grid.confidence
            if unseen_grid is not None and unseen_grid.any():
                confidence = np.where(unseen_grid, np.float32(0.0), confidence)
            out.confidence = (
                confidence
                if confidence.shape == hw
                else cv2.resize(confidence, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
            )
        t2 = time.perf_counter()
        timings = {**prepared.timings_ms, **grid.timings}
        timings["postprocess"] = timings.get("postprocess", 0.0) + (t1 - t0) * 1e3  # + labels to the RGB size
        timings["render"] = (t2 - t1) * 1e3
        out.timings_ms = timings
        return out

    def process(
        self, rgb: np.ndarray | None, thermal_raw: np.ndarray | None, outputs=OUTPUTS, t: float | None = None
    ) -> FrameResult:
        """Segment one frame. ``thermal_raw`` None means RGB only (thermal blank and invalid everywhere),
        ``rgb`` None thermal only (RGB black; outputs in the last RGB grid seen, see :meth:`prepare`)."""
        self.observe_pair(rgb, thermal_raw, t)
        prepared = self.prepare(rgb, thermal_raw, t=t)
        return self.finish(prepared, self.infer(prepared), outputs)


def thermal_display_u8(thermal: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """Registered thermal [0, 1] -> mono8 for ``~/thermal_registered`` (unseen pixels black)."""
    u8 = cv2.convertScaleAbs(thermal, alpha=255.0)
    if valid is not None:
        u8[~valid] = 0
    return u8


# --------------------------------------------------------------------------- arrivals


class PartnerWatch:
    """Decides when the *other* camera counts as lost, on any clock in seconds.

    One watch per camera: the thermal watch is fed every RGB arrival (:meth:`lost`) and every thermal
    arrival (:meth:`partner_seen`), the RGB watch the other way round. The node feeds monotonic
    time, replay the bag's receive time, so both switch modes at the same moments. The partner counts
    as lost only when this camera has *kept arriving* for ``timeout`` seconds without it: a pause of
    both cameras (a driver restart, a paused bag) is not a loss of one, so the first frame after it
    is paired normally.

    A pause is a gap of this camera longer than both ``timeout`` and three of its typical intervals (so
    a camera slower than the timeout still counts as arriving); its streak restarts after it.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = float(timeout)
        self.reset()

    def partner_seen(self, t: float) -> None:
        self.last_partner = t

    def lost(self, t: float) -> bool:
        """Call on each frame of this camera: is the partner lost at time ``t``?"""
        if self.last_own is None:
            self.streak_start = t
        else:
            gap = t - self.last_own
            typical = sorted(self._intervals)[len(self._intervals) // 2] if self._intervals else 0.0
            if gap > max(self.timeout, 3.0 * typical):
                self.streak_start = t  # this camera itself was silent: a pause (of both), not a loss of the partner
            self._intervals.append(gap)
        self.last_own = t
        since = self.streak_start if self.last_partner is None else max(self.last_partner, self.streak_start)
        return t - since > self.timeout

    def reset(self) -> None:
        self.last_partner: float | None = None
        self.last_own: float | None = None
        self.streak_start: float | None = None
        self._intervals: deque[float] = deque(maxlen=9)


MODES = ("rgb_thermal", "rgb_only", "thermal_only")


class FrameFlow:
    """Camera arrivals -> frames to segment, the same way live and in replay.

    Payloads are ``(meta, array)``: ``meta`` is whatever the caller needs back with the frame
    (the node keeps the header, replay the bag message), ``array`` the converted image.
    Each call returns the frames it completed as :class:`~rgbt_seg_ros.pipeline.sync.Pair`; an RGB-only
    frame (thermal lost, ``on_thermal_loss: rgb_only``) is a Pair whose ``thermal`` is None, a
    thermal-only frame (RGB lost, ``on_rgb_loss: thermal_only``) one whose ``rgb`` is None (its
    ``rgb_stamp_ns`` is -1). ``now_ns`` is the caller's clock: monotonic live, the bag's receive
    time in replay. ``mode`` is one of :data:`MODES`; ``on_switch(mode)`` is called when it changes.
    """

    def __init__(self, params: dict[str, Any], on_warning=None, on_switch: Callable[[str], None] | None = None):
        self._on_warning = on_warning
        self._on_switch = on_switch
        self._lock = threading.Lock()  # callbacks of the two cameras may run on different threads
        self.pairer = pairer_from_params(params, on_warning)
        self.thermal_watch = PartnerWatch(float(params["thermal_timeout"]))  # fed by RGB arrivals
        self.rgb_watch = PartnerWatch(float(params["rgb_timeout"]))  # fed by thermal arrivals
        self._read_modes(params)
        self.mode = "rgb_thermal"

    def _read_modes(self, params: dict[str, Any]) -> None:
        self.rgb_only_mode = params["on_thermal_loss"] == "rgb_only"
        self.thermal_only_mode = params["on_rgb_loss"] == "thermal_only"

    @property
    def rgb_only_active(self) -> bool:
        return self.mode == "rgb_only"

    @property
    def thermal_only_active(self) -> bool:
        return self.mode == "thermal_only"

    def update(self, params: dict[str, Any], sync_changed: bool) -> None:
        """New parameter values at run time; a change of ``sync.*`` restarts pairing with them."""
        with self._lock:
            if sync_changed:
                self.pairer = pairer_from_params(params, self._on_warning)
            self.thermal_watch.timeout = float(params["thermal_timeout"])
            self.rgb_watch.timeout = float(params["rgb_timeout"])
            self._read_modes(params)

    def _switch(self, mode: str) -> str | None:
        """Set the mode (under the lock); the new mode when it changed, for :meth:`_announce` after the lock."""
        changed, self.mode = mode != self.mode, mode
        return mode if changed else None

    def _announce(self, changed: str | None) -> None:
        if changed is not None and self._on_switch is not None:
            self._on_switch(changed)

    def rgb(self, stamp_ns: int, payload: tuple, now_ns: int) -> list[Pair]:
        with self._lock:
            t = now_ns / 1e9
            self.rgb_watch.partner_seen(t)
            if self.thermal_watch.lost(t) and self.rgb_only_mode:
                changed = self._switch("rgb_only")
                frames = [*self.pairer.poll(now_ns), Pair(stamp_ns, -1, payload, None, 0)]  # oldest first
            else:  # RGB is back (thermal-only ends), or RGB-only is over or no longer wanted
                changed = self._switch("rgb_thermal")
                frames = self.pairer.add_rgb(stamp_ns, payload, now_ns=now_ns)
        self._announce(changed)
        return frames

    def thermal(self, stamp_ns: int, payload: tuple, now_ns: int) -> list[Pair]:
        with self._lock:
            t = now_ns / 1e9
            self.thermal_watch.partner_seen(t)
            # thermal-only needs one RGB frame seen: its frame_id and size are those of the outputs
            if self.rgb_watch.lost(t) and self.thermal_only_mode and self.rgb_watch.last_partner is not None:
                changed = self._switch("thermal_only")
                frames = [*self.pairer.poll(now_ns), Pair(-1, stamp_ns, None, payload, 0)]  # oldest first
            else:  # thermal is back (RGB-only ends), or thermal-only is over or no longer wanted
                changed = self._switch("rgb_thermal")
                frames = self.pairer.add_thermal(stamp_ns, payload, now_ns=now_ns)
        self._announce(changed)
        return frames

    def poll(self, now_ns: int) -> list[Pair]:
        with self._lock:
            return self.pairer.poll(now_ns)

    def flush(self) -> list[Pair]:
        with self._lock:
            return self.pairer.flush()

    def reset(self) -> None:
        with self._lock:
            self.pairer.reset()
            self.thermal_watch.reset()
            self.rgb_watch.reset()
            self.mode = "rgb_thermal"

    @property
    def stats(self):
        return self.pairer.stats


# --------------------------------------------------------------------------- mailbox and worker


class LatestSlot:
    """A single-slot mailbox between two threads.

    Default (live): ``put`` replaces an unconsumed item (and returns True then), so a slow
    consumer always gets the newest item and nothing queues. ``keep_all=True`` (replay): ``put``
    waits until the slot is free, so every item is consumed, in order, and the producer never
    runs more than one item ahead.
    """

    def __init__(self, keep_all: bool = False) -> None:
        self.keep_all = keep_all
        self._cond = threading.Condition()
        self._item = None
        self._full = False
        self._closed = False

    def put(self, item) -> bool | None:
        """Store ``item``: True when it replaced an unconsumed one, False when not; with ``keep_all``
        None when the slot was closed while waiting (the item was not taken)."""
        with self._cond:
            if self.keep_all:
                while self._full and not self._closed:
                    self._cond.wait(0.2)
                if self._closed:
                    return None
            replaced = self._full
            self._item, self._full = item, True
            self._cond.notify_all()
            return replaced

    def get(self, timeout: float | None = None):
        with self._cond:
            if not self._full and not self._closed:
                self._cond.wait(timeout)
            if not self._full:
                return None
            item, self._item, self._full = self._item, None, False
            self._cond.notify_all()
            return item

    def wait_empty(self, stop: threading.Event, poll: float = 0.2) -> None:
        """Wait until the slot is empty (its consumer took the item), closed, or ``stop`` is set."""
        with self._cond:
            while self._full and not self._closed and not stop.is_set():
                self._cond.wait(poll)

    def clear(self) -> None:
        with self._cond:
            self._item, self._full = None, False
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass
class Job:
    """A frame on its way through the worker: the pair, when it was formed, and its stages' results."""

    pair: Pair
    formed_at: float  # time.monotonic() when it was handed to the worker
    meta: Any = None  # the caller's (replay: the bag receive time of the message that formed it)
    clock_s: float | None = None  # the flow's clock (s) for the registration health; None: formed_at
    pipeline: FramePipeline | None = None
    prepared: PreparedFrame | None = None
    grid: Any = None  # SegmentationResult at the model's grid
    outputs: set[str] = field(default_factory=set)  # the outputs finish made (chosen once per frame)


class StagedWorker:
    """Runs a :class:`FramePipeline` on three threads: prepare | infer | finish + deliver.

    While frame n is in the forward, frame n+1 is prepared and frame n-1 finished and delivered.
    On CUDA, ``prepare`` runs on the Segmenter's side stream; on CPU the stages still overlap where
    they release the GIL (OpenCV, torch). The prepare stage takes a frame from ``source`` only
    when the forward has taken the previous one, so it prepares only frames that will be
    segmented, and always the newest; live (``keep_all=False``) the source keeps only the newest
    pair, so latency stays bounded by about one forward plus the other two stages; in replay
    (``keep_all=True``) every frame goes through, in order. ``stop`` ends the threads after the
    stage calls in progress; frames still waiting between stages are reported as
    ``on_drop("stopped")``.

    ``source`` is the mailbox the caller puts ``Job``s into. ``pipeline()`` returns the pipeline
    to use now (None: ``on_drop("no_model")``); ``outputs()`` the outputs wanted now; ``lock``
    guards prepare and finish against parameter changes; ``deliver(job, result)`` publishes or
    writes; ``on_error(stage, exc)`` reports a frame that failed (the worker goes on).
    """

    def __init__(
        self,
        source: LatestSlot,
        pipeline: Callable[[], FramePipeline | None],
        deliver: Callable[[Job, FrameResult], None],
        outputs: Callable[[], set[str]] = lambda: set(OUTPUTS),
        on_error: Callable[[str, Exception], None] | None = None,
        on_drop: Callable[[str], None] | None = None,
        lock: threading.Lock | None = None,
        name: str = "rgbt_seg",
    ) -> None:
        self.source = source
        self._pipeline = pipeline
        self._deliver = deliver
        self._outputs = outputs
        self._on_error = on_error
        self._on_drop = on_drop
        self._lock = lock if lock is not None else threading.Lock()
        keep_all = source.keep_all
        self._to_infer = LatestSlot(keep_all)
        self._to_finish = LatestSlot(keep_all)
        self.stop_event = threading.Event()
        self._count = threading.Condition()
        self.taken = 0  # jobs taken from the source
        self.ended = 0  # jobs delivered, dropped or failed
        self._threads = [
            threading.Thread(target=self._run, args=(stage,), name=f"{name}_{stage}", daemon=True)
            for stage in ("prepare", "infer", "finish")
        ]

    def start(self) -> StagedWorker:
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop after the stage calls in progress; True when every thread ended within ``timeout``."""
        self.stop_event.set()
        for slot in (self.source, self._to_infer, self._to_finish):
            slot.close()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for slot in (self._to_infer, self._to_finish):  # prepared or inferred, never delivered
            if slot.get(timeout=0) is not None:
                self._drop("stopped")
        return not any(t.is_alive() for t in self._threads)

    def wait_idle(self, taken_at_least: int = 0, timeout: float | None = None) -> bool:
        """Wait until every job taken so far (and at least ``taken_at_least``) has ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._count:
            while self.ended < max(self.taken, taken_at_least):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._count.wait(0.05 if left is None else min(0.05, left))
        return True

    def _end(self, n: int = 1) -> None:
        with self._count:
            self.ended += n
            self._count.notify_all()

    def submit(self, job: Job) -> bool | None:
        """Hand a formed pair to the worker: what ``source.put`` returns (True: it replaced an older pair).

        Every pair goes to the pipeline's registration health (:meth:`FramePipeline.observe_pair`) once, so
        drift estimates follow the paired frames, not the frames the model found time for: live here, before
        the pair may be superseded; in replay (``keep_all``) in the prepare stage, where every pair arrives
        in order, so estimates and the correction interleave the same way in every run."""
        if not self.source.keep_all:
            pipeline = self._pipeline()
            if pipeline is not None:
                self._observe(pipeline, job)
        return self.source.put(job)

    @staticmethod
    def _observe(pipeline: FramePipeline, job: Job) -> None:
        rgb, thermal = job.pair.rgb, job.pair.thermal
        t = job.formed_at if job.clock_s is None else job.clock_s
        pipeline.observe_pair(None if rgb is None else rgb[1], None if thermal is None else thermal[1], t)

    def _drop(self, reason: str) -> None:
        if self._on_drop is not None:
            self._on_drop(reason)
        self._end()

    def _fail(self, stage: str, exc: Exception) -> None:
        if self._on_error is not None:
            self._on_error(stage, exc)
        self._end()

    def _pass(self, slot: LatestSlot, job: Job) -> None:
        replaced = slot.put(job)
        if replaced is None:  # closed: stopping
            self._drop("stopped")
        elif replaced:
            self._drop("superseded")

    def _run(self, stage: str) -> None:
        inbox = {"prepare": self.source, "infer": self._to_infer, "finish": self._to_finish}[stage]
        while not self.stop_event.is_set():
            if stage == "prepare":  # only when the forward is ready for it: no frame prepared in vain
                self._to_infer.wait_empty(self.stop_event)
            job = inbox.get(timeout=0.2)
            if job is None:
                continue
            if stage == "prepare":
                with self._count:
                    self.taken += 1
            if self.stop_event.is_set():
                self._end()
                return
            try:
                if stage == "prepare":
                    job.pipeline = self._pipeline()
                    if job.pipeline is None:
                        self._drop("no_model")
                        continue
                    rgb, thermal = job.pair.rgb, job.pair.thermal
                    t = job.formed_at if job.clock_s is None else job.clock_s
                    with self._lock:
                        if self.source.keep_all:  # live: observed at submit
                            self._observe(job.pipeline, job)
                        job.prepared = job.pipeline.prepare(
                            None if rgb is None else rgb[1], None if thermal is None else thermal[1], True, t=t
                        )
                    self._pass(self._to_infer, job)
                elif stage == "infer":
                    job.grid = job.pipeline.infer(job.prepared)
                    self._pass(self._to_finish, job)
                else:
                    job.outputs = self._outputs()
                    with self._lock:
                        result = job.pipeline.finish(job.prepared, job.grid, job.outputs)
                    if self.stop_event.is_set():  # stopped meanwhile: the outputs may be gone
                        self._end()
                        return
                    self._deliver(job, result)
                    self._end()
            except Exception as exc:  # a bad frame, a failed forward: report it and go on
                self._fail(stage, exc)

"""Registration health: how far the registered thermal image sits from the RGB image, and a bounded fix.

A homography or a calibration is right for one rig on one day at one depth; vibration and heat move
the two cameras, and misregistered thermal silently poisons the fusion. This module watches it
from the images themselves, with no ROS import (docs/sensor_health.md):

``estimate_offset``      the residual translation between an RGB image and a thermal image already in
                         the RGB grid: gradient-magnitude maps of both (edges both cameras see, whatever
                         their polarity), windowed, compared by phase correlation (the whitened
                         spectrum weighted by a Gaussian low-pass); the peak gives the offset with
                         sub-pixel precision and its peak-to-sidelobe ratio a confidence.
``OffsetEstimator``      the same on a camera pair: thermal warped by the calibration into a small
                         working grid over the RGB image (320 px wide), RGB resized to it.
``DriftCorrector``       the optional correction: a translation on top of the calibrated warp that
                         follows the median of recent confident estimates, never faster than a set
                         rate and never beyond a set bound.
``RegistrationMonitor``  what the node and replay run: an estimate every N frames (live on its own
                         thread, newest pair wins; in replay inline, so a replay is repeatable), the
                         corrector advanced on every frame, and the drift warning (a confident offset
                         above a threshold for a set time).

Convention: an offset ``(dx, dy)`` means the registered thermal image shows at RGB pixel ``x`` what the
RGB image shows at ``x - (dx, dy)``; the correction samples the calibrated warp at ``x + (dx, dy)``
(:meth:`~rgbt_seg_ros.pipeline.registration.ThermalRegistrar.shifted`).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

from .imaging import ThermalNormalizer

WORK_WIDTH = 320  # width of the grid the estimate works in (RGB pixels are scaled back)
#: confidence = (psr - PSR_FLOOR) / (PSR_FULL - PSR_FLOOR), clipped to [0, 1]: structureless frames stay below
#: the floor, and estimates above PSR 16 (confidence 0.3, registration.min_confidence's default) are within a
#: pixel on the synthetic rig (`rgbt-seg health drift` records PSR, error and confidence of every estimate)
PSR_FLOOR = 10.0
PSR_FULL = 30.0
LOWPASS = 0.15  # cycles per working-grid pixel: the whitened spectrum's Gaussian weight (noise is high-frequency)
HISTORY = 2000  # estimates kept for replay's metrics
EXCLUDE = 8  # half-size of the square around the peak left out of the sidelobe statistics


@dataclass(frozen=True)
class OffsetEstimate:
    """One estimate, in RGB pixels; ``confidence`` 0 means "no structure to tell"."""

    dx: float
    dy: float
    confidence: float
    psr: float  # peak-to-sidelobe ratio of the phase correlation
    ms: float = 0.0  # time it took

    @property
    def magnitude(self) -> float:
        return math.hypot(self.dx, self.dy)


def _gradient_magnitude(image: np.ndarray) -> np.ndarray:
    smooth = cv2.GaussianBlur(image, (0, 0), 1.0)
    gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3)
    return cv2.magnitude(gx, gy)


def _standardised(grad: np.ndarray, weight: np.ndarray) -> np.ndarray | None:
    """Zero-mean, unit-variance gradient map under the window; None when there is no structure at all."""
    w_sum = float(weight.sum())
    if w_sum <= 0:
        return None
    mean = float((grad * weight).sum() / w_sum)
    centred = (grad - mean) * weight
    std = float(np.sqrt((centred * centred).sum() / w_sum))
    if not std > 1e-6:
        return None
    return centred / std


@lru_cache(maxsize=8)
def _lowpass(h: int, w: int) -> np.ndarray:
    """The Gaussian weight of the whitened cross-power spectrum of an (h, w) grid (made once per size)."""
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    weight = np.exp(-(fx * fx + fy * fy) / (2.0 * LOWPASS * LOWPASS))
    weight.setflags(write=False)
    return weight


def estimate_offset(
    rgb_gray: np.ndarray,
    thermal: np.ndarray,
    valid: np.ndarray | None = None,
    max_shift: float | None = None,
    scale: float = 1.0,
) -> OffsetEstimate:
    """The translation of ``thermal`` against ``rgb_gray`` (same (h, w) grid), see the module docstring.

    ``valid``: where ``thermal`` holds data (False pixels and a few around them are left out);
    ``max_shift``: the largest offset looked for, in this grid's pixels (default: a quarter of the
    smaller side); ``scale``: RGB pixels per pixel of this grid (the result is in RGB pixels).
    """
    t0 = time.perf_counter()
    rgb_gray = np.asarray(rgb_gray, np.float32)
    thermal = np.asarray(thermal, np.float32)
    if rgb_gray.shape != thermal.shape or rgb_gray.ndim != 2:
        raise ValueError(f"RGB {rgb_gray.shape} and thermal {thermal.shape} must be one (h, w) grid")
    h, w = thermal.shape
    finite = np.isfinite(thermal)
    ok = finite if valid is None else (finite & np.asarray(valid, bool))
    if not ok.all():
        thermal = np.where(ok, thermal, float(np.median(thermal[ok])) if ok.any() else 0.0).astype(np.float32)
    # the window: the thermal camera's view shrunk past the gradient filter's reach, softened, times a Hann window
    inside = cv2.erode(ok.astype(np.uint8), np.ones((7, 7), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
    soft = cv2.GaussianBlur(inside.astype(np.float32), (0, 0), 2.0) * inside
    weight = soft * cv2.createHanningWindow((w, h), cv2.CV_32F)
    a = _standardised(_gradient_magnitude(rgb_gray), weight)
    b = _standardised(_gradient_magnitude(thermal), weight)
    if a is None or b is None:
        return OffsetEstimate(0.0, 0.0, 0.0, 0.0, (time.perf_counter() - t0) * 1e3)
    fa, fb = np.fft.rfft2(a), np.fft.rfft2(b)
    cross = fb * np.conj(fa)
    cross /= np.abs(cross) + 1e-9 * float(np.abs(cross).max() + 1e-30)
    cross *= _lowpass(h, w)  # a Gaussian peak instead of a noisy spike
    surface = np.fft.fftshift(np.fft.irfft2(cross, s=(h, w)))  # the peak sits at (centre + offset)
    cy, cx = h // 2, w // 2
    limit = int(min(h, w) / 4.0 if max_shift is None else max_shift)
    y0, x0 = max(0, cy - limit), max(0, cx - limit)
    window = surface[y0 : cy + limit + 1, x0 : cx + limit + 1]  # offsets up to the limit only
    wy, wx = np.unravel_index(int(np.argmax(window)), window.shape)
    py, px = y0 + int(wy), x0 + int(wx)
    peak = float(surface[py, px])
    sidelobe = np.ones_like(surface, bool)
    sidelobe[max(0, py - EXCLUDE) : py + EXCLUDE + 1, max(0, px - EXCLUDE) : px + EXCLUDE + 1] = False
    rest = surface[sidelobe]
    psr = (peak - float(rest.mean())) / max(float(rest.std()), 1e-12)
    sub_x = _gaussian_vertex(surface[py, (px - 1) % w], peak, surface[py, (px + 1) % w])
    sub_y = _gaussian_vertex(surface[(py - 1) % h, px], peak, surface[(py + 1) % h, px])
    confidence = min(1.0, max(0.0, (psr - PSR_FLOOR) / (PSR_FULL - PSR_FLOOR)))
    return OffsetEstimate(
        (px + sub_x - cx) * scale, (py + sub_y - cy) * scale, confidence, psr, (time.perf_counter() - t0) * 1e3
    )


def _gaussian_vertex(left: float, centre: float, right: float) -> float:
    """Sub-sample position of a peak from its two neighbours, in [-0.5, 0.5]: the vertex of a Gaussian through
    the three (a parabola through their logarithms; through the values themselves when one is not positive)."""
    if left > 0 and centre > 0 and right > 0:
        left, centre, right = math.log(left), math.log(centre), math.log(right)
    den = left - 2.0 * centre + right
    if den >= 0:
        return 0.0
    return float(np.clip(0.5 * (left - right) / den, -0.5, 0.5))


class OffsetEstimator:
    """Offset of a camera pair's registered thermal against its RGB image, in RGB pixels."""

    def __init__(self, work_width: int = WORK_WIDTH, max_shift_px: float = 40.0) -> None:
        self.work_width = int(work_width)
        self.max_shift_px = float(max_shift_px)

    def work_size(self, rgb_hw: tuple[int, int]) -> tuple[int, int]:
        h, w = rgb_hw
        if w <= self.work_width:
            return int(h), int(w)
        return max(16, round(h * self.work_width / w)), self.work_width

    def estimate(self, rgb: np.ndarray, thermal_raw: np.ndarray, registrar) -> OffsetEstimate:
        """``rgb`` (H, W, 3) uint8, ``thermal_raw`` as the camera gives it, ``registrar`` the calibration."""
        t0 = time.perf_counter()
        rgb_hw = rgb.shape[:2]
        gh, gw = self.work_size(rgb_hw)
        thermal_raw = ThermalNormalizer.single_channel(thermal_raw)  # the frame path's rule for thermal images
        thermal, valid = registrar.warp_to_grid(thermal_raw, rgb_hw, (gh, gw))
        gray = rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        if (gh, gw) != rgb_hw:
            gray = cv2.resize(gray, (gw, gh), interpolation=cv2.INTER_AREA)
        scale = rgb_hw[1] / gw
        est = estimate_offset(gray, thermal, valid, max_shift=self.max_shift_px / scale, scale=scale)
        return OffsetEstimate(est.dx, est.dy, est.confidence, est.psr, (time.perf_counter() - t0) * 1e3)


class DriftCorrector:
    """A translation on top of the calibrated warp that follows confident estimates slowly and within bounds.

    The target is the median of the last ``window`` confident estimates (one outlier never moves it);
    :meth:`advance` moves the applied offset towards it by at most ``rate`` pixels per second of the
    caller's clock, and the applied offset never leaves the disc of radius ``max_offset`` pixels.
    """

    def __init__(self, max_offset: float = 25.0, rate: float = 2.0, window: int = 5) -> None:
        self.max_offset = float(max_offset)
        self.rate = float(rate)
        self._recent: deque[tuple[float, float]] = deque(maxlen=int(window))
        self.reset()

    def reset(self) -> None:
        """Back to the calibration: nothing applied, no estimates remembered."""
        self.applied = (0.0, 0.0)
        self.target: tuple[float, float] | None = None
        self._recent.clear()
        self._last_t: float | None = None

    def observe(self, estimate: OffsetEstimate) -> None:
        """A confident estimate (offset against the calibration): the target becomes the recent median."""
        self._recent.append((estimate.dx, estimate.dy))
        tx, ty = np.median(np.asarray(self._recent), axis=0)
        self.target = self._bounded((float(tx), float(ty)))

    def _bounded(self, v: tuple[float, float]) -> tuple[float, float]:
        """``v`` within the disc of radius ``max_offset``: the direction kept, the length cut."""
        norm = math.hypot(*v)
        if norm <= self.max_offset:
            return v
        return (v[0] * self.max_offset / norm, v[1] * self.max_offset / norm)

    def limit(self, max_offset: float, rate: float) -> None:
        """New bounds at run time: a smaller bound applies at once to the target and to what is applied."""
        self.max_offset, self.rate = float(max_offset), float(rate)
        self.applied = self._bounded(self.applied)
        if self.target is not None:
            self.target = self._bounded(self.target)

    def pause(self) -> None:
        """Stop the clock (auto-correction off): the next :meth:`advance` moves nothing."""
        self._last_t = None

    def advance(self, t: float) -> tuple[float, float]:
        """Move towards the target for the time since the last call; returns the applied offset."""
        dt = 0.0 if self._last_t is None else max(0.0, t - self._last_t)
        self._last_t = t
        if self.target is None:
            return self.applied
        ax, ay = self.applied
        ex, ey = self.target[0] - ax, self.target[1] - ay
        dist = math.hypot(ex, ey)
        step = self.rate * dt
        if dist <= step:
            self.applied = self.target
        elif step > 0:
            self.applied = (ax + ex * step / dist, ay + ey * step / dist)
        return self.applied


@dataclass
class HealthSettings:
    """The ``registration.*`` health parameters (see params.py)."""

    every: int = 10  # an estimate every N paired frames; 0: off
    warn_px: float = 2.0
    warn_after: float = 5.0
    min_confidence: float = 0.3
    auto_correct: bool = False
    max_correction_px: float = 25.0
    correction_rate: float = 2.0

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> HealthSettings:
        return cls(
            every=int(params["registration.check_every"]),
            warn_px=float(params["registration.warn_offset_px"]),
            warn_after=float(params["registration.warn_after"]),
            min_confidence=float(params["registration.min_confidence"]),
            auto_correct=bool(params["registration.auto_correct"]),
            max_correction_px=float(params["registration.max_correction_px"]),
            correction_rate=float(params["registration.correction_rate"]),
        )


class RegistrationMonitor:
    """Estimates every ``settings.every`` paired frames, the correction, the drift warning.

    ``synchronous=True`` (replay, tests): the estimate runs inside :meth:`offer`, so a replay gives the
    same result every time; ``False`` (live): on its own thread, the newest pair waiting replaces an
    older one, so the frame path never waits for an estimate. ``t`` is the caller's clock in seconds
    (monotonic live, the bag's receive time in replay).
    """

    def __init__(self, settings: HealthSettings, synchronous: bool = False, estimator=None) -> None:
        self.settings = settings
        self.synchronous = synchronous
        self.estimator = estimator or OffsetEstimator()
        self.corrector = DriftCorrector(settings.max_correction_px, settings.correction_rate)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: tuple | None = None
        self._thread: threading.Thread | None = None  # the estimating thread (live); one that is not it ends
        self._generation = 0  # bumped by reset: an estimate begun before it is dropped
        self.reset()

    def reset(self) -> None:
        """Forget the estimates and go back to the calibration (the reset service; replay's start)."""
        with self._lock:
            self._generation += 1
            self._pending = None
            self.corrector.reset()
            self.errors = 0
            self.last_error = ""
            self.frames = 0
            self.estimates = 0
            self.confident = 0
            self.last: OffsetEstimate | None = None
            self.last_confident: OffsetEstimate | None = None
            self.last_t: float | None = None
            self.drift_since: float | None = None
            self.estimate_ms: deque[float] = deque(maxlen=100)
            self._history: deque[tuple] = deque(maxlen=HISTORY)

    def configure(self, settings: HealthSettings) -> None:
        """New parameter values at run time. Turning auto-correction off returns to the calibration; turning it
        on starts from the calibration and moves at the set rate; a smaller bound applies at once."""
        with self._lock:
            was = self.settings.auto_correct
            self.settings = settings
            self.corrector.limit(settings.max_correction_px, settings.correction_rate)
            if was != settings.auto_correct:
                self.corrector.applied = (0.0, 0.0)
                self.corrector.pause()

    # --------------------------------------------------------------- the frame path's side
    def offer(self, rgb: np.ndarray, thermal_raw: np.ndarray, registrar, t: float) -> None:
        """A paired frame went by: every N-th is estimated (``registrar``: the calibration, not the correction)."""
        with self._lock:
            every = self.settings.every
            if every <= 0:
                return
            self.frames += 1
            if (self.frames - 1) % every:
                return
            if not self.synchronous:
                self._pending = (rgb, thermal_raw, registrar, t, self._generation)
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="rgbt_seg_registration", daemon=True)
                    self._thread.start()
                self._wake.notify_all()
                return
            generation = self._generation
        self._estimate(rgb, thermal_raw, registrar, t, generation)

    def correction(self, t: float | None) -> tuple[float, float]:
        """The offset to apply now (0, 0 without auto-correction); call once per frame (``t`` None: the
        offset applied so far, not advanced)."""
        with self._lock:
            if not self.settings.auto_correct:
                self.corrector.pause()  # the correction moves only while it is applied
                return (0.0, 0.0)
            return self.corrector.applied if t is None else self.corrector.advance(t)

    def close(self) -> None:
        """End the estimating thread (live; it finishes an estimate in progress); a later :meth:`offer` starts a
        new one. A thread that is no longer :attr:`_thread` ends by itself, so two never estimate at once."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._pending = None
            self._wake.notify_all()
        if thread is not None:
            thread.join(timeout=5.0)

    def _run(self) -> None:
        me = threading.current_thread()
        while True:
            with self._lock:
                while self._pending is None and self._thread is me:
                    self._wake.wait(0.5)
                if self._thread is not me:  # closed, or replaced by a newer thread
                    return
                job, self._pending = self._pending, None
            self._estimate(*job)

    def _estimate(self, rgb, thermal_raw, registrar, t: float, generation: int) -> None:
        """One estimate; a frame it cannot estimate is counted and named in the status, never raised (the frame
        is segmented all the same), live and in replay alike."""
        try:
            est = self.estimator.estimate(rgb, thermal_raw, registrar)
        except Exception as exc:
            with self._lock:
                if generation == self._generation:
                    self.errors += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
            return
        with self._lock:
            if generation != self._generation:
                return  # begun before a reset: it belongs to the forgotten state
            self.estimates += 1
            self.estimate_ms.append(est.ms)
            self.last, self.last_t = est, t
            confident = est.confidence >= self.settings.min_confidence
            if confident:
                self.confident += 1
                self.last_confident = est
                self.corrector.observe(est)
            applied = self.corrector.applied if self.settings.auto_correct else (0.0, 0.0)
            self._history.append((t, est.dx, est.dy, est.confidence, est.psr, applied[0], applied[1]))
            if not confident:
                return  # no structure to tell: neither drift nor its absence is known
            if est.magnitude > self.settings.warn_px:
                if self.drift_since is None:
                    self.drift_since = t
            else:
                self.drift_since = None

    # --------------------------------------------------------------- reporting
    def history(self) -> list[dict]:
        """The recent estimates (at most HISTORY), oldest first, with the correction applied at the time."""
        keys = ("t", "dx", "dy", "confidence", "psr", "applied_x", "applied_y")
        with self._lock:
            return [dict(zip(keys, (round(float(v), 4) for v in row))) for row in self._history]

    def status(self, t: float) -> tuple[int, str, dict[str, str]]:
        """(level 0 OK / 1 WARN, message, key values) for diagnostics and replay's metrics."""
        with self._lock:
            s, last = self.settings, self.last
            applied = self.corrector.applied if s.auto_correct else (0.0, 0.0)
            values = {
                "check every (frames)": str(s.every),
                "estimates": str(self.estimates),
                "confident estimates": str(self.confident),
                "offset x (px)": "nan" if last is None else f"{last.dx:.2f}",
                "offset y (px)": "nan" if last is None else f"{last.dy:.2f}",
                "confidence": "nan" if last is None else f"{last.confidence:.2f}",
                "auto correct": str(s.auto_correct).lower(),
                "applied x (px)": f"{applied[0]:.2f}",
                "applied y (px)": f"{applied[1]:.2f}",
                "estimate time p50 (ms)": f"{np.median(self.estimate_ms):.1f}" if self.estimate_ms else "nan",
                "failed estimates": str(self.errors),
                "last error": self.last_error,
            }
            if s.every <= 0:
                return 0, "not checked (registration.check_every is 0)", values
            drifting = self.drift_since is not None and t - self.drift_since >= s.warn_after
            if not drifting:
                if last is None:
                    return (
                        0,
                        (
                            f"no estimate yet ({self.errors} failed: {self.last_error})"
                            if self.errors
                            else "no estimate yet"
                        ),
                        values,
                    )
                if last.confidence < s.min_confidence:
                    return 0, "ok (last frame had too little structure to tell)", values
                return 0, f"ok (offset {last.magnitude:.1f} px)", values
            held, seen = t - self.drift_since, self.last_confident
            text = (
                f"registration drift: thermal sits ({seen.dx:+.1f}, {seen.dy:+.1f}) px from the RGB image under the "
                f"calibration, for {held:.0f} s"
            )
            if s.auto_correct:
                text += f"; auto-correction applies ({applied[0]:+.1f}, {applied[1]:+.1f}) px; recalibrate"
            else:
                text += "; recalibrate (rgbt-seg calibrate) or set registration.auto_correct"
            return 1, text, values

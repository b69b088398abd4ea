"""sensor_msgs/Image <-> numpy, and thermal normalisation.

Works on any object with the ``sensor_msgs/Image`` fields (``height``, ``width``,
``encoding``, ``is_bigendian``, ``step``, ``data``): rclpy messages (``data`` is an
``array.array('B')``) and rosbags message dataclasses (``data`` is a uint8 ndarray)
alike. No ROS import here.

Reads are zero-copy where the memory layout allows (native byte order); row padding
(``step > width * channels * itemsize``) is handled with a strided view. Writes
produce one contiguous ``bytes`` object: assign it to ``msg.data`` (fast in rclpy;
assigning an ndarray or memoryview is ~100x slower, see DESIGN.md).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

# encoding -> (numpy dtype, channels)
ENCODINGS: dict[str, tuple[np.dtype, int]] = {
    "rgb8": (np.dtype(np.uint8), 3),
    "bgr8": (np.dtype(np.uint8), 3),
    "rgba8": (np.dtype(np.uint8), 4),
    "bgra8": (np.dtype(np.uint8), 4),
    "mono8": (np.dtype(np.uint8), 1),
    "8UC1": (np.dtype(np.uint8), 1),
    "8UC3": (np.dtype(np.uint8), 3),
    "mono16": (np.dtype(np.uint16), 1),
    "16UC1": (np.dtype(np.uint16), 1),
    "32FC1": (np.dtype(np.float32), 1),
}

COLOR_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "8UC3")
THERMAL_ENCODINGS = ("mono8", "8UC1", "mono16", "16UC1", "32FC1")

_HOST_BIG_ENDIAN = sys.byteorder == "big"


class ImageEncodingError(ValueError):
    """An image message that cannot be converted; the text says what was expected."""


@dataclass(frozen=True)
class EncodedImage:
    """The fields of a sensor_msgs/Image (without header) for one ndarray."""

    height: int
    width: int
    encoding: str
    is_bigendian: int
    step: int
    data: bytes


def _as_byte_array(data) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8)
    # array.array, bytes, bytearray, memoryview: all export the buffer protocol.
    return np.frombuffer(data, dtype=np.uint8)


def image_to_numpy(msg, expected: tuple[str, ...] | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Return the message's pixels as an ndarray (H, W) or (H, W, C), without copying when possible.

    The array is read-only when it shares the message's buffer. Big-endian 16-bit
    data is converted to native order (a copy). ``expected`` restricts the accepted
    encodings (e.g. ``COLOR_ENCODINGS`` for the RGB camera); ``max_pixels`` refuses
    absurd sizes before any allocation.
    """
    encoding = str(msg.encoding)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if encoding not in ENCODINGS:
        raise ImageEncodingError(
            f"unsupported image encoding '{encoding}' ({width}x{height}); supported: {', '.join(ENCODINGS)}"
        )
    if expected is not None and encoding not in expected:
        raise ImageEncodingError(
            f"image encoding '{encoding}' is not accepted on this input; expected one of: {', '.join(expected)}"
        )
    dtype, channels = ENCODINGS[encoding]
    if height <= 0 or width <= 0:
        raise ImageEncodingError(f"image has zero size ({width}x{height}, encoding {encoding})")
    if max_pixels is not None and height * width > max_pixels:
        raise ImageEncodingError(
            f"image {width}x{height} ({encoding}) exceeds the limit of {max_pixels / 1e6:.1f} megapixels"
        )
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise ImageEncodingError(
            f"image step {step} is smaller than width*channels*bytes = {width}*{channels}*{dtype.itemsize} "
            f"= {row_bytes} for {encoding} {width}x{height}"
        )
    raw = _as_byte_array(msg.data)
    needed = step * height
    if raw.size < needed:
        raise ImageEncodingError(
            f"image data has {raw.size} bytes, expected step*height = {step}*{height} = {needed} "
            f"for {encoding} {width}x{height}"
        )
    raw = raw[:needed]
    big = bool(msg.is_bigendian)
    swap = dtype.itemsize > 1 and big != _HOST_BIG_ENDIAN
    if step == row_bytes:
        pixels = raw.view(dtype.newbyteorder(">" if big else "<") if swap else dtype)
        shape = (height, width) if channels == 1 else (height, width, channels)
        arr = pixels.reshape(shape)
    else:
        rows = raw.reshape(height, step)[:, :row_bytes]
        if step % dtype.itemsize == 0:
            view_dtype = dtype.newbyteorder(">" if big else "<") if swap else dtype
            arr = rows.view(view_dtype)  # strided view: rows keep their padding in memory
        else:
            arr = np.ascontiguousarray(rows).view(dtype.newbyteorder(">" if big else "<") if swap else dtype)
        if channels > 1:
            arr = arr.reshape(height, width, channels)
    if swap:
        arr = arr.astype(dtype)  # native byte order (copy)
    return arr


def encode_image(arr: np.ndarray, encoding: str) -> EncodedImage:
    """Pack an ndarray into Image fields (native byte order, no row padding)."""
    if encoding not in ENCODINGS:
        raise ImageEncodingError(
            f"cannot encode to unsupported encoding '{encoding}'; supported: {', '.join(ENCODINGS)}"
        )
    dtype, channels = ENCODINGS[encoding]
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1 and channels == 1:
        arr = arr[:, :, 0]
    expected_ndim = 2 if channels == 1 else 3
    if arr.ndim != expected_ndim or (channels > 1 and arr.shape[2] != channels):
        want = "(H, W)" if channels == 1 else f"(H, W, {channels})"
        raise ImageEncodingError(f"array of shape {arr.shape} cannot be encoded as {encoding}: expected {want}")
    if arr.dtype != dtype:
        raise ImageEncodingError(f"array of dtype {arr.dtype} cannot be encoded as {encoding}: expected {dtype}")
    height, width = arr.shape[:2]
    if height == 0 or width == 0:
        raise ImageEncodingError(f"cannot encode an empty image of shape {arr.shape} as {encoding}")
    return EncodedImage(
        height=int(height),
        width=int(width),
        encoding=encoding,
        is_bigendian=int(_HOST_BIG_ENDIAN),
        step=int(width * channels * dtype.itemsize),
        data=np.ascontiguousarray(arr).tobytes(),
    )


def fill_image_msg(msg, arr: np.ndarray, encoding: str, as_numpy: bool = False):
    """Write ``arr`` into an existing Image message (rclpy or rosbags) and return it.

    rclpy messages take ``bytes`` (``as_numpy=False``); rosbags dataclasses need a
    uint8 ndarray (``as_numpy=True``).
    """
    enc = encode_image(arr, encoding)
    msg.height, msg.width, msg.encoding = enc.height, enc.width, enc.encoding
    msg.is_bigendian, msg.step = enc.is_bigendian, enc.step
    msg.data = np.frombuffer(enc.data, dtype=np.uint8) if as_numpy else enc.data
    return msg


def to_rgb(arr: np.ndarray, encoding: str) -> np.ndarray:
    """Colour image in any accepted colour encoding -> (H, W, 3) uint8 in RGB order."""
    if encoding in ("rgb8", "8UC3"):
        return arr
    if encoding == "bgr8":
        return arr[:, :, ::-1]
    if encoding == "rgba8":
        return arr[:, :, :3]
    if encoding == "bgra8":
        return arr[:, :, 2::-1]
    if encoding in ("mono8", "8UC1"):
        return np.repeat(arr[:, :, None], 3, axis=2)
    raise ImageEncodingError(f"encoding '{encoding}' is not a colour encoding; expected one of {COLOR_ENCODINGS}")


# --------------------------------------------------------------------------- thermal

THERMAL_MODES = ("fixed", "percentile", "linear", "passthrough")


@dataclass
class ThermalNormalizer:
    """Raw thermal pixels -> float32 in [0, 1].

    Modes:
      * ``fixed``: ``(x - min) / (max - min)`` with min/max in raw units (counts);
      * ``percentile``: per-frame robust AGC between the ``p_low`` and ``p_high``
        percentiles (computed on a 1/16 subsample: fast, stable);
      * ``linear``: ``y = x * scale + offset`` (e.g. FLIR TLinear counts * 0.01 -> Kelvin),
        then the fixed range ``min``..``max`` expressed in those units (e.g. 250..330 K);
      * ``passthrough``: 8-bit AGC images from the camera, ``x / 255`` (uint8 only).

    NaN and inf pixels become 0 and are reported as invalid in the mask that
    :meth:`normalize` returns; values outside the range are clipped.
    """

    mode: str = "percentile"
    min: float = 0.0
    max: float = 65535.0
    p_low: float = 1.0
    p_high: float = 99.0
    scale: float = 1.0
    offset: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in THERMAL_MODES:
            raise ValueError(f"thermal normalisation mode '{self.mode}' is unknown; expected one of {THERMAL_MODES}")
        if self.mode in ("fixed", "linear") and not self.max > self.min:
            raise ValueError(f"thermal range must have max > min, got min={self.min}, max={self.max}")
        if self.mode == "percentile" and not 0.0 <= self.p_low < self.p_high <= 100.0:
            raise ValueError(
                f"thermal percentiles must satisfy 0 <= p_low < p_high <= 100, got {self.p_low}, {self.p_high}"
            )
        if self.mode == "linear" and self.scale == 0:
            raise ValueError("thermal linear scale must be non-zero")

    def normalize(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Return ``(normalised float32 HxW, finite mask or None when every pixel is finite)``."""
        raw = np.asarray(raw)
        if raw.ndim == 3 and raw.shape[2] == 1:
            raw = raw[:, :, 0]
        if raw.ndim != 2:
            raise ValueError(f"thermal image must be single-channel (H, W), got shape {raw.shape}")
        if self.mode == "passthrough":
            if raw.dtype != np.uint8:
                raise ValueError(
                    f"thermal mode 'passthrough' needs 8-bit images, got {raw.dtype}; use fixed, percentile or linear"
                )
            return raw.astype(np.float32) * np.float32(1.0 / 255.0), None
        x = raw.astype(np.float32)
        finite: np.ndarray | None = None
        if x.dtype.kind == "f" and raw.dtype.kind == "f":
            finite_all = np.isfinite(x)
            if not finite_all.all():
                finite = finite_all
                x = np.where(finite_all, x, np.float32(0.0))
        if self.mode == "linear":
            x = x * np.float32(self.scale) + np.float32(self.offset)
            lo, hi = self.min, self.max
        elif self.mode == "fixed":
            lo, hi = self.min, self.max
        else:
            sub = x[::4, ::4] if finite is None else x[::4, ::4][finite[::4, ::4]]
            if sub.size == 0:
                return np.zeros(x.shape, np.float32), finite
            lo, hi = (float(v) for v in np.percentile(sub, (self.p_low, self.p_high)))
            if hi - lo < 1e-6:
                hi = lo + 1.0
        out = (x - np.float32(lo)) * np.float32(1.0 / (hi - lo))
        np.clip(out, 0.0, 1.0, out=out)
        if finite is not None:
            out[~finite] = 0.0
        return out, finite

    @classmethod
    def from_params(cls, params: dict) -> ThermalNormalizer:
        known = {k: params[k] for k in ("mode", "min", "max", "p_low", "p_high", "scale", "offset") if k in params}
        unknown = set(params) - set(known)
        if unknown:
            raise ValueError(f"unknown thermal normalisation keys {sorted(unknown)}")
        return cls(**known)

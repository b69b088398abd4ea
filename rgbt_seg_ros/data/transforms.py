"""Joint RGB-thermal transforms on dataset items (see :mod:`rgbt_seg_ros.data.datasets`).

An item is a dict with ``rgb`` (3, H, W) float32 [0, 1], ``thermal`` (1, H, W) float32 [0, 1],
``valid`` (1, H, W) float32 {0, 1} and ``labels`` (H, W) int64 (255 = ignore); other keys
pass through. Geometric transforms move all four together (images bilinear, ``valid`` and
``labels`` nearest); photometric ones touch one modality only.

Randomness: every transform is called as ``t(item, rng)`` with a ``numpy.random.Generator``.
:class:`Compose` called without one draws a fresh generator seed from torch's global RNG, so
``torch.manual_seed`` (and a DataLoader's per-worker seeding) makes training reproducible
without any extra plumbing; passing an explicit ``rng`` gives exact replay in tests.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

IMAGE_KEYS = ("rgb", "thermal")
PAD_VALUES = {"rgb": 0.0, "thermal": 0.0, "valid": 0.0, "labels": 255}


def _size(item: dict) -> tuple[int, int]:
    h, w = item["labels"].shape[-2:]
    return int(h), int(w)


def _resize_chw(arr: np.ndarray, size: tuple[int, int], interpolation: int) -> np.ndarray:
    """(C, H, W) -> (C, h, w) with OpenCV (which works on H, W, C)."""
    h, w = size
    hwc = np.ascontiguousarray(arr.transpose(1, 2, 0))
    out = cv2.resize(hwc, (w, h), interpolation=interpolation)
    if out.ndim == 2:
        out = out[:, :, None]
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def resize_item(item: dict, size: tuple[int, int], resize_labels: bool = True) -> dict:
    out = dict(item)
    h0, w0 = _size(item)
    shrink = size[0] < h0 and size[1] < w0
    image_interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    for key in IMAGE_KEYS:
        out[key] = _resize_chw(item[key], size, image_interp).astype(np.float32)
    if "valid" in item:
        out["valid"] = _resize_chw(item["valid"], size, cv2.INTER_NEAREST)
    if resize_labels:
        labels = item["labels"]
        # OpenCV cannot resize int64; ids fit in int32.
        resized = cv2.resize(labels.astype(np.int32), (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
        out["labels"] = resized.astype(np.int64)
    return out


def rgb_bytes(rgb: np.ndarray) -> np.ndarray:
    """An item's RGB (float in [0, 1], any layout) as the camera's 8-bit values (exact for 8-bit data)."""
    return np.clip(np.rint(np.asarray(rgb) * 255.0), 0, 255).astype(np.uint8)


def fit_item(item: dict, size: tuple[int, int]) -> dict:
    """An item at ``size`` exactly as the Segmenter resizes a camera frame
    (:func:`~rgbt_seg_ros.models.preprocessing.resize_image`: RGB as uint8, bilinear, antialiased when
    shrinking; thermal as float; ``valid`` nearest); labels nearest. Training fits its items with this,
    so the model is trained on the pixels it will be given."""
    from ..models.preprocessing import resize_image, resize_valid

    if _size(item) == tuple(size):
        return item
    out = dict(item)
    rgb = resize_image(torch.from_numpy(rgb_bytes(item["rgb"]))[None], size)[0]
    out["rgb"] = rgb.numpy().astype(np.float32) * np.float32(1.0 / 255.0)
    out["thermal"] = resize_image(torch.from_numpy(np.ascontiguousarray(item["thermal"]))[None], size)[0].numpy()
    if "valid" in item:
        out["valid"] = resize_valid(torch.from_numpy(np.ascontiguousarray(item["valid"]))[None], size)[0].numpy()
    labels = item["labels"].astype(np.int32)  # OpenCV cannot resize int64
    out["labels"] = cv2.resize(labels, (size[1], size[0]), interpolation=cv2.INTER_NEAREST).astype(np.int64)
    return out


def pad_item(item: dict, top: int, bottom: int, left: int, right: int, label_fill: int = 255) -> dict:
    """Pad every array: images and ``valid`` with 0, ``labels`` with ``label_fill`` (ignore).

    Labels of another size than the images (kept at their own resolution for evaluation) are not padded.
    """
    if top == bottom == left == right == 0:
        return item
    out = dict(item)
    same_size = item["labels"].shape[-2:] == item["rgb"].shape[-2:]
    for key in ("rgb", "thermal", "valid"):
        if key in item:
            out[key] = np.pad(item[key], ((0, 0), (top, bottom), (left, right)), constant_values=PAD_VALUES[key])
    if same_size:
        out["labels"] = np.pad(item["labels"], ((top, bottom), (left, right)), constant_values=label_fill)
    return out


def _check_multiple(size: tuple[int, int], multiple: int, what: str) -> tuple[int, int]:
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0 or h % multiple or w % multiple:
        raise ValueError(f"{what} must be positive multiples of {multiple} (height, width), got {size}")
    return h, w


class Compose:
    """Apply transforms in order with one random generator (see the module docstring)."""

    def __init__(self, transforms: list) -> None:
        self.transforms = list(transforms)

    def __call__(self, item: dict, rng: np.random.Generator | None = None) -> dict:
        if rng is None:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        for t in self.transforms:
            item = t(item, rng)
        return item

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class RandomScale:
    """Resize by a factor drawn uniformly in [min_scale, max_scale] (images bilinear, masks nearest)."""

    def __init__(self, min_scale: float = 0.5, max_scale: float = 2.0) -> None:
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"RandomScale needs 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)

    def __call__(self, item: dict, rng: np.random.Generator) -> dict:
        s = rng.uniform(self.min_scale, self.max_scale)
        h, w = _size(item)
        return resize_item(item, (max(1, round(h * s)), max(1, round(w * s))))

    def __repr__(self) -> str:
        return f"RandomScale({self.min_scale}, {self.max_scale})"


class RandomCrop:
    """Crop to ``size`` (multiples of 32) at a random place; smaller images are padded first
    (images and ``valid`` with 0, labels with 255 so the padding is ignored by the loss)."""

    def __init__(self, size: tuple[int, int], multiple: int = 32, ignore_index: int = 255) -> None:
        self.size = _check_multiple(size, multiple, "RandomCrop size")
        self.ignore_index = int(ignore_index)

    def __call__(self, item: dict, rng: np.random.Generator) -> dict:
        ch, cw = self.size
        h, w = _size(item)
        item = pad_item(item, 0, max(0, ch - h), 0, max(0, cw - w), self.ignore_index)
        h, w = _size(item)
        y = int(rng.integers(0, h - ch + 1))
        x = int(rng.integers(0, w - cw + 1))
        out = dict(item)
        for key in ("rgb", "thermal", "valid"):
            if key in item:
                out[key] = np.ascontiguousarray(item[key][:, y : y + ch, x : x + cw])
        out["labels"] = np.ascontiguousarray(item["labels"][y : y + ch, x : x + cw])
        return out

    def __repr__(self) -> str:
        return f"RandomCrop({self.size})"


class HorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = float(p)

    def __call__(self, item: dict, rng: np.random.Generator) -> dict:
        if rng.random() >= self.p:
            return item
        out = dict(item)
        for key in ("rgb", "thermal", "valid"):
            if key in item:
                out[key] = np.ascontiguousarray(item[key][:, :, ::-1])
        out["labels"] = np.ascontiguousarray(item["labels"][:, ::-1])
        return out

    def __repr__(self) -> str:
        return f"HorizontalFlip(p={self.p})"


class ColorJitter:
    """Brightness, contrast, saturation and hue jitter of the RGB image only (thermal untouched).

    Each factor is drawn uniformly in [1 - x, 1 + x] (hue: a shift in [-hue, hue] of a full turn);
    the jitter is applied with probability ``p``.
    """

    def __init__(
        self, brightness: float = 0.3, contrast: float = 0.3, saturation: float = 0.3, hue: float = 0.02, p: float = 0.8
    ) -> None:
        for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not 0 <= v < 1:
                raise ValueError(f"ColorJitter {name} must be in [0, 1), got {v}")
        if not 0 <= hue <= 0.5:
            raise ValueError(f"ColorJitter hue must be in [0, 0.5], got {hue}")
        self.brightness, self.contrast, self.saturation, self.hue, self.p = brightness, contrast, saturation, hue, p

    def __call__(self, item: dict, rng: np.random.Generator) -> dict:
        if rng.random() >= self.p:
            return item
        rgb = item["rgb"].astype(np.float32, copy=True)
        b = rng.uniform(1 - self.brightness, 1 + self.brightness)
        c = rng.uniform(1 - self.contrast, 1 + self.contrast)
        s = rng.uniform(1 - self.saturation, 1 + self.saturation)
        h = rng.uniform(-self.hue, self.hue)
        rgb *= np.float32(b)
        gray = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])[None]
        rgb = (rgb - gray.mean()) * np.float32(c) + gray.mean()
        gray = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])[None]
        rgb = (rgb - gray) * np.float32(s) + gray
        np.clip(rgb, 0.0, 1.0, out=rgb)
        if h != 0.0:
            hsv = cv2.cvtColor(np.ascontiguousarray(rgb.transpose(1, 2, 0)), cv2.COLOR_RGB2HSV)  # H in [0, 360)
            hsv[:, :, 0] = np.mod(hsv[:, :, 0] + np.float32(h * 360.0), 360.0)
            rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).transpose(2, 0, 1)
            rgb = np.clip(rgb, 0.0, 1.0)
        out = dict(item)
        out["rgb"] = np.ascontiguousarray(rgb, dtype=np.float32)
        return out

    def __repr__(self) -> str:
        return f"ColorJitter({self.brightness}, {self.contrast}, {self.saturation}, {self.hue}, p={self.p})"


class ThermalGainNoise:
    """A thermal camera's gain/offset drift and sensor noise: ``t * g + o + N(0, sigma)``, clipped to [0, 1].

    ``g`` in [1 - gain, 1 + gain], ``o`` in [-offset, offset], ``sigma`` in [0, noise_std]; applied
    with probability ``p``, to valid pixels only (invalid pixels stay 0). RGB is untouched.
    """

    def __init__(self, gain: float = 0.1, offset: float = 0.05, noise_std: float = 0.02, p: float = 0.5) -> None:
        if gain < 0 or offset < 0 or noise_std < 0:
            raise ValueError(
                f"ThermalGainNoise needs non-negative gain/offset/noise_std, got {gain}, {offset}, {noise_std}"
            )
        self.gain, self.offset, self.noise_std, self.p = gain, offset, noise_std, p

    def __call__(self, item: dict, rng: np.random.Generator) -> dict:
        if rng.random() >= self.p:
            return item
        t = item["thermal"]
        g = rng.uniform(1 - self.gain, 1 + self.gain)
        o = rng.uniform(-self.offset, self.offset)
        sigma = rng.uniform(0, self.noise_std)
        noisy = t * np.float32(g) + np.float32(o) + rng.standard_normal(t.shape, dtype=np.float32) * np.float32(sigma)
        np.clip(noisy, 0.0, 1.0, out=noisy)
        if "valid" in item:
            noisy *= item["valid"]
        out = dict(item)
        out["thermal"] = noisy.astype(np.float32)
        return out

    def __repr__(self) -> str:
        return f"ThermalGainNoise({self.gain}, {self.offset}, {self.noise_std}, p={self.p})"


class ModalityDropout:
    """Blank one modality: RGB with probability ``p_rgb``, thermal with ``p_thermal`` (never both).

    A blanked thermal image is what the node feeds the model in ``rgb_only`` mode (or when no
    thermal frame arrives): ``thermal = 0`` and ``valid = 0`` everywhere. A blanked RGB image is
    ``rgb = 0``; ``valid`` stays (it describes the thermal camera). Labels are untouched.
    """

    def __init__(self, p_rgb: float = 0.0, p_thermal: float = 0.0) -> None:
        if p_rgb < 0 or p_thermal < 0 or p_rgb + p_thermal > 1:
            raise ValueError(
                f"ModalityDropout needs p_rgb, p_thermal >= 0 and p_rgb + p_thermal <= 1, got {p_rgb}, {p_thermal}"
            )
        self.p_rgb, self.p_thermal = float(p_rgb), float(p_thermal)

    def __call__(self, item: dict, rng: np.random.Generator) -> dict:
        u = rng.random()
        if u < self.p_rgb:
            out = dict(item)
            out["rgb"] = np.zeros_like(item["rgb"])
            return out
        if u < self.p_rgb + self.p_thermal:
            out = dict(item)
            out["thermal"] = np.zeros_like(item["thermal"])
            out["valid"] = np.zeros_like(item["valid"]) if "valid" in item else np.zeros_like(item["thermal"])
            return out
        return item

    def __repr__(self) -> str:
        return f"ModalityDropout(p_rgb={self.p_rgb}, p_thermal={self.p_thermal})"


class Resize:
    """Resize to a fixed (height, width); labels too unless ``resize_labels=False`` (evaluate at label size)."""

    def __init__(self, size: tuple[int, int], resize_labels: bool = True) -> None:
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"Resize size must be (height, width) > 0, got {size}")
        self.size = (int(size[0]), int(size[1]))
        self.resize_labels = resize_labels

    def __call__(self, item: dict, rng: np.random.Generator | None = None) -> dict:
        return resize_item(item, self.size, self.resize_labels)

    def __repr__(self) -> str:
        return f"Resize({self.size}, resize_labels={self.resize_labels})"


class PadToMultiple:
    """Pad bottom and right so height and width are multiples of ``multiple`` (labels with 255, ``valid`` with 0)."""

    def __init__(self, multiple: int = 32, ignore_index: int = 255) -> None:
        if multiple < 1:
            raise ValueError(f"PadToMultiple multiple must be >= 1, got {multiple}")
        self.multiple, self.ignore_index = int(multiple), int(ignore_index)

    def __call__(self, item: dict, rng: np.random.Generator | None = None) -> dict:
        h, w = item["rgb"].shape[-2:]
        m = self.multiple
        return pad_item(item, 0, (-h) % m, 0, (-w) % m, self.ignore_index)

    def __repr__(self) -> str:
        return f"PadToMultiple({self.multiple})"


# --------------------------------------------------------------------------- from config

TRAIN_KEYS = ("crop_size", "scale", "flip", "color_jitter", "thermal_noise", "modality_dropout", "ignore_index")
EVAL_KEYS = ("size", "pad_multiple", "resize_labels", "ignore_index")


def _section(cfg: dict, key: str, default: dict | None) -> dict | None:
    """A sub-dict option: missing -> default, false/None -> disabled, true -> default, dict -> overrides."""
    value = cfg.get(key, default if default is not None else None)
    if value is False or value is None:
        return None
    if value is True:
        return dict(default or {})
    if not isinstance(value, dict):
        raise ValueError(f"transform option '{key}' must be a mapping, true or false, got {value!r}")
    return {**(default or {}), **value}


def _check_keys(cfg: dict, allowed: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {what} transform options {unknown}; expected some of {list(allowed)}")


def build_train_transform(cfg: dict | None = None) -> Compose:
    """Training pipeline from a small dict (every key optional)::

    crop_size: [480, 640]          # multiples of 32
    scale: [0.5, 2.0]              # or false
    flip: 0.5                      # probability
    color_jitter: {brightness: 0.3, contrast: 0.3, saturation: 0.3, hue: 0.02, p: 0.8}   # or false
    thermal_noise: {gain: 0.1, offset: 0.05, noise_std: 0.02, p: 0.5}                   # or false
    modality_dropout: {p_rgb: 0.0, p_thermal: 0.0}
    """
    cfg = dict(cfg or {})
    _check_keys(cfg, TRAIN_KEYS, "train")
    ignore = int(cfg.get("ignore_index", 255))
    steps: list = []
    scale = cfg.get("scale", [0.5, 2.0])
    if scale:
        steps.append(RandomScale(float(scale[0]), float(scale[1])))
    steps.append(RandomCrop(tuple(cfg.get("crop_size", (480, 640))), ignore_index=ignore))
    flip = float(cfg.get("flip", 0.5))
    if flip > 0:
        steps.append(HorizontalFlip(flip))
    jitter = _section(
        cfg, "color_jitter", {"brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.02, "p": 0.8}
    )
    if jitter:
        steps.append(ColorJitter(**jitter))
    noise = _section(cfg, "thermal_noise", {"gain": 0.1, "offset": 0.05, "noise_std": 0.02, "p": 0.5})
    if noise:
        steps.append(ThermalGainNoise(**noise))
    dropout = _section(cfg, "modality_dropout", {"p_rgb": 0.0, "p_thermal": 0.0})
    if dropout and (dropout["p_rgb"] > 0 or dropout["p_thermal"] > 0):
        steps.append(ModalityDropout(**dropout))
    return Compose(steps)


def build_eval_transform(cfg: dict | None = None) -> Compose:
    """Evaluation pipeline: optional ``size: [h, w]`` resize, then padding (bottom, right) to a multiple
    of ``pad_multiple`` (default 32; labels padded with 255, so the padding never counts).

    With ``resize_labels: false`` the labels keep their native size and are not padded: the
    evaluator crops the logits to ``size`` (the padding is at the bottom and right) and resizes
    them to the labels.
    """
    cfg = dict(cfg or {})
    _check_keys(cfg, EVAL_KEYS, "eval")
    steps: list = []
    if cfg.get("size"):
        steps.append(Resize(tuple(cfg["size"]), resize_labels=bool(cfg.get("resize_labels", True))))
    multiple = int(cfg.get("pad_multiple", 32))
    if multiple > 1:
        steps.append(PadToMultiple(multiple, ignore_index=int(cfg.get("ignore_index", 255))))
    return Compose(steps)

"""What inference and training both do to an image pair before the model: device choice, precisions,
the model-side normalisation, and the resizes to the model's grid.

The Segmenter (``pipeline/segmenter.py``) and the trainer import these from here, so training sees the
pixels deployment sees and neither depends on the other.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cuda`` without CUDA is an error."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device '{name}' was requested but CUDA is not available; use device='cpu' or 'auto'")
        try:
            dev = torch.device(name)
        except RuntimeError as exc:
            raise ValueError(f"invalid device '{name}'; expected auto, cpu, cuda or cuda:N") from exc
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"device '{name}' does not exist; {torch.cuda.device_count()} CUDA device(s) found")
        return dev
    raise ValueError(f"unknown device '{name}'; expected auto, cpu, cuda or cuda:N")


@functools.lru_cache(maxsize=16)
def _normalization_constants(rgb_mean, rgb_std, th_mean, th_std, rgb_range, device, inference):
    """Mean/std tensors built once per device (not per frame: on CUDA each would be a host-to-device copy)."""
    mean = torch.tensor(rgb_mean, device=device).view(1, 3, 1, 1) * rgb_range
    std = torch.tensor(rgb_std, device=device).view(1, 3, 1, 1) * rgb_range
    return mean, std, th_mean, th_std


def normalize_batch(
    normalization: dict, rgb: torch.Tensor, thermal: torch.Tensor, rgb_range: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Model-side normalisation of a batch, shared by the Segmenter and the trainer.

    ``normalization`` is a model config's ``normalization`` section (or a whole config that has
    one): ``rgb: {mean: [3], std: [3]}`` for RGB in [0, 1] and ``thermal: {mean: [1], std: [1]}``
    for thermal in [0, 1]. ``rgb`` (B, 3, H, W) is given in [0, ``rgb_range``] (255 for uint8
    pixels converted to float), ``thermal`` (B, 1, H, W) in [0, 1]. Returns ``(rgb, thermal)``
    normalised; masking thermal with ``valid`` is left to the caller (after any padding).
    """
    norm = normalization.get("normalization", normalization)
    rgb_mean, rgb_std, th_mean, th_std = _normalization_constants(
        tuple(norm["rgb"]["mean"]),
        tuple(norm["rgb"]["std"]),
        float(norm["thermal"]["mean"][0]),
        float(norm["thermal"]["std"][0]),
        float(rgb_range),
        rgb.device,
        torch.is_inference_mode_enabled(),
    )
    return (rgb - rgb_mean) / rgb_std, (thermal - th_mean) / th_std


def fit_size(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> tuple[int, int]:
    """Largest (h, w) with the source aspect ratio that fits into ``dst_hw``."""
    scale = min(dst_hw[0] / src_hw[0], dst_hw[1] / src_hw[1])
    return max(1, min(dst_hw[0], round(src_hw[0] * scale))), max(1, min(dst_hw[1], round(src_hw[1] * scale)))


def resize_image(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """How the Segmenter brings an RGB or thermal image (B, C, H, W) to its grid: bilinear, antialiased
    when shrinking. uint8 RGB stays uint8 on CPU (torch's uint8 kernel); anything else is resized as float.
    The trainer fits its items with this function too, so training sees the pixels deployment sees."""
    h = t.shape[-2]
    if tuple(size) == tuple(t.shape[-2:]):
        return t
    if t.dtype != torch.uint8 or t.device.type != "cpu":
        t = t.float()
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=size[0] < h)


def resize_valid(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The validity mask (B, 1, H, W) at ``size``: nearest, so it stays 0/1."""
    if tuple(size) == tuple(t.shape[-2:]):
        return t
    return F.interpolate(t.float(), size=size, mode="nearest")

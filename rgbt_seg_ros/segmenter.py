"""The inference object shared by the ROS node and bag replay.

``Segmenter`` owns a model backend, its device and precision, and the pre/post-processing
around it::

    seg = Segmenter.from_checkpoint("runs/mfnet_sartm", device="auto", precision="fp32")
    res = seg(rgb, thermal, valid)      # rgb HxWx3 uint8 (RGB order), thermal HxW float32 in [0, 1]
    res.labels, res.confidence, res.timings

Pre-processing resizes the pair to the model's input size keeping the aspect ratio (the
rest is padding, marked invalid for thermal), normalises each modality with the config's
mean/std and zeroes thermal where ``valid`` is false. Post-processing crops the padding,
resizes the logits to the RGB image's size and returns the arg-max labels and the max
softmax probability as confidence. Inference runs under ``torch.inference_mode`` and, on
CUDA, under autocast for fp16/bf16. On CPU the model runs in fp32 unless another precision
is asked for (bf16 autocast is slower than fp32 on the CPUs this was measured on).

Deployment options for CUDA (usable, but not worth it, on CPU):

* ``compile``: ``none`` (default) or a ``torch.compile`` mode (``default``, ``reduce-overhead``,
  ``max-autotune``). Shapes are static (every frame is resized and padded to ``input_size``),
  so the model compiles once, during warm-up; a failure there raises an error naming the option.
* On CUDA the images are uploaded through reused page-locked (pinned) host buffers with
  non-blocking copies (:class:`HostStaging`); on CPU the numpy arrays are used in place.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .classes import DatasetInfo

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


class HostStaging:
    """Reused host buffers for host-to-device uploads, one per (name, shape, dtype).

    ``pin=True`` (CUDA) allocates them page-locked so that ``.to(device, non_blocking=True)`` is
    a DMA copy that does not block the host; a new frame size allocates a new buffer once.
    """

    def __init__(self, pin: bool) -> None:
        self.pin = bool(pin)
        self._buffers: dict[tuple, torch.Tensor] = {}

    def __call__(self, name: str, array: np.ndarray) -> torch.Tensor:
        src = torch.from_numpy(np.ascontiguousarray(array))
        key = (name, tuple(src.shape), src.dtype)
        buf = self._buffers.get(key)
        if buf is None:
            buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=self.pin)
            self._buffers = {k: v for k, v in self._buffers.items() if k[0] != name}  # one size per name
            self._buffers[key] = buf
        # Safe to overwrite: the Segmenter reads its results back with .cpu() at the end of every
        # call, which waits for the stream, so the previous frame's copy has finished.
        buf.copy_(src)
        return buf


@dataclass
class SegmentationResult:
    """Per-pixel output at the RGB image's resolution."""

    labels: np.ndarray  # (H, W) uint8, uint16 when there are more than 255 classes
    confidence: np.ndarray  # (H, W) float32 in [0, 1]: max softmax probability
    timings: dict[str, float] = field(default_factory=dict)  # ms: preprocess, model, postprocess


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


class Segmenter:
    """Runs an RGB-T segmentation backend on numpy image pairs."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: dict,
        dataset_info: DatasetInfo,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        warmup: bool = True,
        compile: str = "none",
        compile_backend: str = "inductor",
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision '{precision}'; expected one of {', '.join(PRECISIONS)}")
        if compile not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode '{compile}'; expected one of {', '.join(COMPILE_MODES)}")
        self._device = resolve_device(device)
        self._precision = precision
        self._cfg = cfg
        self._info = dataset_info
        self._model = model.to(self._device).eval()
        self._input_size = (int(cfg["input_size"][0]), int(cfg["input_size"][1]))
        self._normalization = cfg["normalization"]
        self._label_dtype = np.uint8 if dataset_info.num_classes <= 255 else np.uint16
        self._staging = HostStaging(pin=True) if self._device.type == "cuda" else None
        self._compile = compile
        self._forward = self._model
        if compile == "none":
            if warmup:
                self.warmup()
            return
        try:  # compiles during the warm-up call (static shapes: once)
            mode = None if compile == "default" else compile
            self._forward = torch.compile(self._model, mode=mode, backend=compile_backend, dynamic=False)
            self.warmup()
        except Exception as exc:
            raise RuntimeError(
                f"torch.compile (mode '{compile}', backend '{compile_backend}') failed on {self._device}: "
                f"{type(exc).__name__}: {exc}. Set model.compile to none to run uncompiled."
            ) from exc

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(
        cls,
        ckpt_dir: str | Path,
        device: str = "auto",
        precision: str = "fp32",
        warmup: bool = True,
        sam2_checkpoint: str | Path | None = None,
        compile: str = "none",
    ) -> Segmenter:
        """Load a trained checkpoint directory (see ``checkpoint.py``)."""
        from .checkpoint import load_checkpoint

        dev = resolve_device(device)
        model, cfg, info = load_checkpoint(ckpt_dir, device=dev, sam2_checkpoint=sam2_checkpoint)
        return cls(model, cfg, info, device=dev, precision=precision, warmup=warmup, compile=compile)

    @classmethod
    def from_config(
        cls,
        config: str | Path | dict,
        dataset: str | Path | None = None,
        sam2_checkpoint: str | Path | None = None,
        device: str = "auto",
        precision: str = "fp32",
        warmup: bool = True,
        text_embeddings: torch.Tensor | None = None,
        compile: str = "none",
    ) -> Segmenter:
        """Build an untrained model from a model config (+ optional official SAM2 weights).

        ``dataset`` (class-file name or path) overrides the config's classes. The class-name
        text embeddings come from the text teacher unless ``text_embeddings`` is given.
        """
        from .models import build_model, dataset_info_for, resolve_model_config

        cfg = resolve_model_config(config)
        if sam2_checkpoint is not None:
            cfg["encoder"]["checkpoint"] = str(sam2_checkpoint)
        info = dataset_info_for(cfg, dataset)
        lang = cfg.get("language") or {}
        if text_embeddings is None and lang.get("enabled"):
            from .training.text_teacher import class_text_embeddings

            text_embeddings = class_text_embeddings(info.class_names, backend=lang.get("text_encoder", "minilm"))
        model = build_model(cfg, info, text_embeddings)
        return cls(model, cfg, info, device=device, precision=precision, warmup=warmup, compile=compile)

    # ------------------------------------------------------------------ properties
    @property
    def dataset_info(self) -> DatasetInfo:
        return self._info

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) the model runs at."""
        return self._input_size

    @property
    def backend(self) -> str:
        return self._cfg["backend"]

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def compile_mode(self) -> str:
        return self._compile

    @property
    def config(self) -> dict:
        return self._cfg

    # ------------------------------------------------------------------ inference
    def warmup(self) -> None:
        """One forward pass on a blank pair at the input size (allocations, kernel selection)."""
        h, w = self._input_size
        self(np.zeros((h, w, 3), np.uint8), np.zeros((h, w), np.float32))

    @staticmethod
    def _check(rgb, thermal, valid) -> None:
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            got = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
            raise ValueError(f"rgb must be an HxWx3 uint8 array (RGB order), got {got}")
        if not isinstance(thermal, np.ndarray) or thermal.ndim != 2 or not np.issubdtype(thermal.dtype, np.floating):
            got = f"{thermal.dtype} {thermal.shape}" if isinstance(thermal, np.ndarray) else type(thermal).__name__
            raise ValueError(
                f"thermal must be an HxW float32 array in [0, 1] registered to the RGB grid, got {got} "
                "(normalise raw counts with rgbt_seg_ros.imaging first)"
            )
        if thermal.shape != rgb.shape[:2]:
            raise ValueError(f"thermal {thermal.shape} and rgb {rgb.shape[:2]} sizes differ; register thermal first")
        if valid is not None:
            if not isinstance(valid, np.ndarray) or valid.dtype != np.bool_ or valid.shape != rgb.shape[:2]:
                got = f"{valid.dtype} {valid.shape}" if isinstance(valid, np.ndarray) else type(valid).__name__
                raise ValueError(f"valid must be None or an HxW bool array matching rgb {rgb.shape[:2]}, got {got}")

    def _preprocess(self, rgb: np.ndarray, thermal: np.ndarray, valid: np.ndarray | None):
        h, w = rgb.shape[:2]
        H, W = self._input_size
        nh, nw = fit_size((h, w), (H, W))
        dev = self._device
        if self._staging is not None:  # CUDA: pinned buffers, asynchronous copies
            rgb_t = self._staging("rgb", rgb).to(dev, non_blocking=True).permute(2, 0, 1)[None].float()
            th_host = self._staging("thermal", np.asarray(thermal, dtype=np.float32))
            th_t = th_host.to(dev, non_blocking=True)[None, None]
        else:
            if not rgb.flags.writeable:  # a zero-copy view of a message buffer: torch wants writable memory
                rgb = rgb.copy()
            rgb_t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
            th_t = torch.from_numpy(np.ascontiguousarray(thermal, dtype=np.float32))[None, None]
        if (nh, nw) != (h, w):
            anti = nh < h
            rgb_t = F.interpolate(rgb_t, size=(nh, nw), mode="bilinear", align_corners=False, antialias=anti)
            th_t = F.interpolate(th_t, size=(nh, nw), mode="bilinear", align_corners=False, antialias=anti)
        rgb_t, th_t = normalize_batch(self._normalization, rgb_t, th_t, rgb_range=255.0)
        valid_t = None
        if valid is not None:
            if self._staging is not None:
                valid_t = self._staging("valid", valid).to(dev, non_blocking=True)[None, None].float()
            else:
                valid_t = torch.from_numpy(np.ascontiguousarray(valid))[None, None].float()
            if (nh, nw) != (h, w):
                valid_t = F.interpolate(valid_t, size=(nh, nw), mode="nearest")
        if (nh, nw) != (H, W):
            pad = (0, W - nw, 0, H - nh)
            rgb_t = F.pad(rgb_t, pad)  # 0 after normalisation = the mean colour
            th_t = F.pad(th_t, pad)
            valid_t = F.pad(valid_t if valid_t is not None else torch.ones_like(th_t[:, :, :nh, :nw]), pad)
        if valid_t is not None:
            th_t = th_t * valid_t
        return rgb_t, th_t, valid_t, (nh, nw)

    def _autocast(self):
        if self._precision == "fp32":
            return torch.autocast(self._device.type, enabled=False)
        return torch.autocast(self._device.type, dtype=PRECISIONS[self._precision])

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def __call__(self, rgb: np.ndarray, thermal: np.ndarray, valid: np.ndarray | None = None) -> SegmentationResult:
        """Segment one registered pair; outputs have the RGB image's height and width."""
        self._check(rgb, thermal, valid)
        h, w = rgb.shape[:2]
        t0 = time.perf_counter()
        with torch.inference_mode():
            rgb_t, th_t, valid_t, (nh, nw) = self._preprocess(rgb, thermal, valid)
            self._sync()
            t1 = time.perf_counter()
            with self._autocast():
                logits = self._forward(rgb_t, th_t, valid_t)["logits"]
            self._sync()
            t2 = time.perf_counter()
            logits = logits[:, :, :nh, :nw].float()
            if (nh, nw) != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            conf, labels = logits.softmax(dim=1).max(dim=1)
            labels_np = labels[0].to(torch.int32).cpu().numpy().astype(self._label_dtype)
            conf_np = conf[0].clamp_(0.0, 1.0).cpu().numpy().astype(np.float32, copy=False)
        t3 = time.perf_counter()
        timings = {"preprocess": (t1 - t0) * 1e3, "model": (t2 - t1) * 1e3, "postprocess": (t3 - t2) * 1e3}
        return SegmentationResult(labels=labels_np, confidence=conf_np, timings=timings)

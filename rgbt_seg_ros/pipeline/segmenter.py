"""The inference object shared by the ROS node and bag replay.

``Segmenter`` owns a model backend, its device and precision, and the pre/post-processing
around it::

    seg = Segmenter.from_checkpoint("runs/mfnet_sartm", device="auto", precision="fp32")
    res = seg(rgb, thermal, valid)      # rgb HxWx3 uint8 (RGB order), thermal HxW float32 in [0, 1]
    res.labels, res.confidence, res.timings

Pre-processing resizes the pair to the model's input size keeping the aspect ratio (the
rest is padding, marked invalid for thermal), normalises each modality with the config's
mean/std and zeroes thermal where ``valid`` is false. RGB is resized as uint8 with torch's
antialiased bilinear kernel on CPU (float on CUDA), so no full-resolution float image is ever
made. Inference runs under ``torch.inference_mode`` and, on CUDA, under autocast for
fp16/bf16. On CPU the model runs in fp32 unless another precision is asked for (bf16 autocast
is slower than fp32 on the CPUs this was measured on).

Two ways to call it:

* ``seg(rgb, thermal, valid)`` (evaluation, tools): thermal already registered at the RGB
  size; the logits are resized to the RGB size (bilinear) before the arg-max, and labels and
  confidence come back at the RGB size.
* the frame path (node, replay, benchmarks): ``seg.prepare(rgb, thermal_grid, valid_grid)``
  with thermal already warped into the model's grid (``seg.grid_size(rgb.shape[:2])``), then
  ``seg.infer(prepared)``: labels and confidence at the model's grid, decided on the model's
  device, so only uint8 labels and a small confidence map cross to the host. Resizing the
  labels to the RGB size (nearest) gives the labels of the first way except at pixels whose
  2x2 grid neighbourhood holds two classes: where the four logit vectors agree on the
  arg-max, so does any bilinear blend of them. The two steps are separate so that a
  pipelined worker can prepare frame n+1 while frame n is in the forward.

Deployment options for CUDA (usable, but not worth it, on CPU):

* ``compile``: ``none`` (default) or a ``torch.compile`` mode (``default``, ``reduce-overhead``,
  ``max-autotune``). Shapes are static (every frame is resized and padded to ``input_size``),
  so the model compiles once, during warm-up; a failure there raises an error naming the option.
* On CUDA the images are uploaded through reused page-locked (pinned) host buffers with
  non-blocking copies (:class:`HostStaging`); on CPU the numpy arrays are used in place.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models.classes import DatasetInfo
from ..models.onnx_runtime import RUNTIMES, RuntimeReport
from ..models.preprocessing import PRECISIONS, fit_size, normalize_batch, resize_image, resize_valid, resolve_device

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
        src = as_tensor(np.ascontiguousarray(array))
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


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` without a copy, also for read-only arrays (message buffers), which the
    frame path only reads."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.from_numpy(array)


@dataclass
class SegmentationResult:
    """Per-pixel output at the RGB image's resolution (``seg(...)``) or at the model's grid (``infer``)."""

    labels: np.ndarray  # (H, W) uint8, uint16 when there are more than 255 classes
    confidence: np.ndarray  # (H, W) float32 in [0, 1]: max softmax probability
    timings: dict[str, float] = field(default_factory=dict)  # ms: preprocess, model, postprocess


@dataclass
class ModelInput:
    """A prepared pair on the model's device (:meth:`Segmenter.prepare`), ready for :meth:`Segmenter.infer`."""

    rgb: torch.Tensor  # (1, 3, H, W) normalised, padded to the input size
    thermal: torch.Tensor  # (1, 1, H, W) normalised, zero where not valid
    valid: torch.Tensor | None  # (1, 1, H, W) float, or None (all valid, no padding)
    content_size: tuple[int, int]  # (h, w) of the image inside the padding: the grid
    timings: dict[str, float] = field(default_factory=dict)


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
        class_set: str | None = None,
        runtime: str = "torch",
        providers: tuple[str, ...] | list[str] = ("cpu",),
        provider_options: dict | None = None,
        onnx_cache_dir: str | Path | None = None,
        onnx_tolerance: float | None = None,
    ):
        """``class_set``: which of the model's class sets to segment with (docs/class_sets.md); None = the set of
        ``dataset_info`` (a loaded checkpoint's primary). An unknown name raises ``ClassSetError`` naming the sets.

        ``runtime``: ``torch`` (the model as it is) or ``onnxruntime`` (the model exported once, cached in
        ``onnx_cache_dir`` by its weights, and run on ``providers``: ``tensorrt``, ``cuda``, ``cpu``, with
        ``provider_options`` ``{fp16, engine_cache_dir}`` for TensorRT; see ``models/onnx_runtime.py``). The
        ONNX runtime is checked against PyTorch on one input first; when it cannot be used (export fails, no
        provider asked for is present, parity beyond ``onnx_tolerance``) PyTorch runs and
        :attr:`runtime_report` says why."""
        from ..models.class_sets import class_set_names, select_class_set

        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime '{runtime}'; expected one of {', '.join(RUNTIMES)}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision '{precision}'; expected one of {', '.join(PRECISIONS)}")
        if compile not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode '{compile}'; expected one of {', '.join(COMPILE_MODES)}")
        self._device = resolve_device(device)
        self._precision = precision
        self._cfg = cfg
        # before the warm-up (and a compile): the model runs with this set from the first frame on
        self._info = select_class_set(model, dataset_info, class_set, what=f"the {cfg.get('backend')} model")
        self._class_sets = class_set_names(model, dataset_info)
        self._switchable = len(self._class_sets) > 1
        self._model = model.to(self._device).eval()
        self._input_size = (int(cfg["input_size"][0]), int(cfg["input_size"][1]))
        self._normalization = cfg["normalization"]
        self._label_dtype = np.uint8 if self._info.num_classes <= 255 else np.uint16
        self._staging = HostStaging(pin=True) if self._device.type == "cuda" else None
        self._prep_stream = None  # CUDA stream of prepare(side_stream=True), made on first use
        self._compile = compile
        self._forward = self._model
        self._runtime_report = RuntimeReport(runtime="torch", requested=runtime)
        if runtime == "onnxruntime":
            self._use_onnxruntime(providers, provider_options, onnx_cache_dir, onnx_tolerance)
        if compile == "none" or self._runtime_report.runtime != "torch":
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

    def _use_onnxruntime(self, providers, provider_options, cache_dir, tolerance) -> None:
        """Run the forward through ONNX Runtime, or record why PyTorch runs instead."""
        from ..models.onnx_export import checkpoint_metadata
        from ..models.onnx_runtime import DEFAULT_TOLERANCE, RuntimeRefusedError, build_onnx_forward

        metadata = checkpoint_metadata(self._cfg, self._info, self._input_size, 1)
        try:
            forward, report = build_onnx_forward(
                self._model,
                self._cfg,
                self._info.name,
                metadata,
                providers=tuple(providers),
                provider_options=provider_options,
                cache_dir=cache_dir,
                tolerance=DEFAULT_TOLERANCE if tolerance is None else float(tolerance),
            )
        except RuntimeRefusedError as exc:
            report = getattr(exc, "report", None) or RuntimeReport(runtime="torch", requested="onnxruntime")
            report.runtime, report.fallback = "torch", str(exc)
            self._runtime_report = report
            return
        if self._precision != "fp32":  # the exported graph is fp32; TensorRT's fp16 is its provider option
            report.notes.append(f"precision {self._precision} applies to PyTorch; onnxruntime runs the fp32 graph")
        if self._compile != "none":
            report.notes.append(f"model.compile {self._compile} applies to PyTorch; ignored with onnxruntime")
        self._forward, self._runtime_report = forward, report

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
        class_set: str | None = None,
        **runtime,
    ) -> Segmenter:
        """Load a trained checkpoint directory (see ``checkpoint.py``); ``class_set``: one of its class sets
        (None: its primary). An unknown set is refused before the model is loaded, naming the sets there are.
        ``runtime``: the constructor's runtime arguments (``runtime``, ``providers``, ...)."""
        from ..models.checkpoint import check_checkpoint_class_set, load_checkpoint

        if class_set:
            check_checkpoint_class_set(ckpt_dir, class_set)
        dev = resolve_device(device)
        model, cfg, info = load_checkpoint(ckpt_dir, device=dev, sam2_checkpoint=sam2_checkpoint)
        return cls(
            model,
            cfg,
            info,
            device=dev,
            precision=precision,
            warmup=warmup,
            compile=compile,
            class_set=class_set,
            **runtime,
        )

    @classmethod
    def from_config(
        cls,
        config: str | Path | dict,
        dataset: str | Path | None = None,
        sam2_checkpoint: str | Path | None = None,
        device: str = "auto",
        precision: str = "fp32",
        warmup: bool = True,
        text_embeddings: torch.Tensor | dict | None = None,
        compile: str = "none",
        class_set: str | None = None,
        **runtime,
    ) -> Segmenter:
        """Build an untrained model from a model config (+ optional official SAM2 weights).

        ``dataset`` (class-file name or path) overrides the config's classes (its primary set). The
        class-name text embeddings come from the text teacher unless ``text_embeddings`` is given (a dict
        ``{set: (K, D)}`` for a config with ``class_sets``). ``class_set``: the set to segment with.
        """
        from ..models import build_model, dataset_info_for, resolve_model_config
        from ..models.class_sets import text_embeddings_for

        cfg = resolve_model_config(config)
        if sam2_checkpoint is not None:
            cfg["encoder"]["checkpoint"] = str(sam2_checkpoint)
        info = dataset_info_for(cfg, dataset)
        lang = cfg.get("language") or {}
        if text_embeddings is None and lang.get("enabled"):
            from ..models.text_teacher import class_text_embeddings

            backend = lang.get("text_encoder", "minilm")
            text_embeddings = text_embeddings_for(cfg, info, lambda names: class_text_embeddings(names, backend))
        model = build_model(cfg, info, text_embeddings)
        return cls(
            model,
            cfg,
            info,
            device=device,
            precision=precision,
            warmup=warmup,
            compile=compile,
            class_set=class_set,
            **runtime,
        )

    # ------------------------------------------------------------------ properties
    @property
    def dataset_info(self) -> DatasetInfo:
        """The classes the labels are in: the chosen class set's names, palette and ignore index."""
        return self._info

    @property
    def class_set(self) -> str:
        """The class set this Segmenter segments with."""
        return self._info.name

    @property
    def class_sets(self) -> tuple[str, ...]:
        """Every class set of the model, primary first (one for most backends)."""
        return self._class_sets

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
    def runtime(self) -> str:
        """What runs the forward: ``torch`` or ``onnxruntime`` (see :attr:`runtime_report`)."""
        return self._runtime_report.runtime

    @property
    def runtime_report(self) -> RuntimeReport:
        """The runtime asked for and used, its providers, cache, parity check and any fallback reason."""
        return self._runtime_report

    @property
    def compile_mode(self) -> str:
        return self._compile

    @property
    def config(self) -> dict:
        return self._cfg

    # ------------------------------------------------------------------ inference
    def warmup(self) -> None:
        """A blank pair at the input size through the frame path (allocations, kernel selection, and
        with ``compile`` the one compilation: every frame then calls the model with the same shapes
        and a validity mask, as here)."""
        h, w = self._input_size
        self.infer(self.prepare(np.zeros((h, w, 3), np.uint8), np.zeros((h, w), np.float32), np.ones((h, w), bool)))

    @staticmethod
    def _check_rgb(rgb) -> None:
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            got = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
            raise ValueError(f"rgb must be an HxWx3 uint8 array (RGB order), got {got}")

    @classmethod
    def _check(cls, rgb, thermal, valid) -> None:
        cls._check_rgb(rgb)
        if not isinstance(thermal, np.ndarray) or thermal.ndim != 2 or not np.issubdtype(thermal.dtype, np.floating):
            got = f"{thermal.dtype} {thermal.shape}" if isinstance(thermal, np.ndarray) else type(thermal).__name__
            raise ValueError(
                f"thermal must be an HxW float32 array in [0, 1] registered to the RGB grid, got {got} "
                "(normalise raw counts with rgbt_seg_ros.pipeline.imaging first)"
            )
        if thermal.shape != rgb.shape[:2]:
            raise ValueError(f"thermal {thermal.shape} and rgb {rgb.shape[:2]} sizes differ; register thermal first")
        if valid is not None:
            if not isinstance(valid, np.ndarray) or valid.dtype != np.bool_ or valid.shape != rgb.shape[:2]:
                got = f"{valid.dtype} {valid.shape}" if isinstance(valid, np.ndarray) else type(valid).__name__
                raise ValueError(f"valid must be None or an HxW bool array matching rgb {rgb.shape[:2]}, got {got}")

    def grid_size(self, camera_hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) an image of ``camera_hw`` is resized to inside the model's input (the rest is padding)."""
        return fit_size((int(camera_hw[0]), int(camera_hw[1])), self._input_size)

    def _upload(self, name: str, array: np.ndarray) -> torch.Tensor:
        if self._staging is not None:  # CUDA: pinned buffer, asynchronous copy
            return self._staging(name, array).to(self._device, non_blocking=True)
        if any(st < 0 for st in array.strides):  # a reversed view (e.g. BGR sliced to RGB): torch cannot wrap it
            array = np.ascontiguousarray(array)
        return as_tensor(array)

    def _rgb_tensor(self, rgb: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        """(H, W, 3) uint8 -> (1, 3, h, w) float in [0, 255] at ``size``, antialiased when shrinking."""
        t = self._upload("rgb", rgb).permute(2, 0, 1)[None]  # a channels-last view, no copy
        return resize_image(t, size).float()  # uint8 kernel on CPU: no full-size float image

    def _model_input(self, rgb_t, th_t, valid_t, size, timings) -> ModelInput:
        """Normalise, pad to the input size and mask thermal (tensors already at ``size``)."""
        H, W = self._input_size
        nh, nw = size
        rgb_t, th_t = normalize_batch(self._normalization, rgb_t, th_t, rgb_range=255.0)
        if (nh, nw) != (H, W):
            pad = (0, W - nw, 0, H - nh)
            rgb_t = F.pad(rgb_t, pad)  # 0 after normalisation = the mean colour
            th_t = F.pad(th_t, pad)
            valid_t = F.pad(valid_t if valid_t is not None else torch.ones_like(th_t[:, :, :nh, :nw]), pad)
        if valid_t is not None:
            th_t = th_t * valid_t
        return ModelInput(rgb_t.contiguous(), th_t.contiguous(), valid_t, (nh, nw), timings)

    def _preprocess(self, rgb: np.ndarray, thermal: np.ndarray, valid: np.ndarray | None) -> ModelInput:
        """The full-resolution way in: thermal and valid at the RGB size, resized like RGB."""
        h, w = rgb.shape[:2]
        size = self.grid_size((h, w))
        rgb_t = self._rgb_tensor(rgb, size)
        th_t = self._upload("thermal", np.asarray(thermal, dtype=np.float32))[None, None]
        valid_t = None if valid is None else self._upload("valid", valid)[None, None].float()
        th_t = resize_image(th_t, size)
        valid_t = None if valid_t is None else resize_valid(valid_t, size)
        return self._model_input(rgb_t, th_t, valid_t, size, {})

    def prepare(
        self, rgb: np.ndarray, thermal_grid: np.ndarray, valid_grid: np.ndarray | None = None, side_stream=False
    ) -> ModelInput:
        """The frame path's first step: RGB at any size, thermal (and valid) already at ``grid_size``.

        ``side_stream`` (CUDA): run the uploads and kernels on the Segmenter's own stream and wait
        for them, so that a pipelined worker can prepare the next frame while the default stream
        runs the forward of this one. On CPU it changes nothing.
        """
        self._check_grid(rgb, thermal_grid, valid_grid)
        t0 = time.perf_counter()
        with torch.inference_mode(), self._prep_stream_context(side_stream):
            size = self.grid_size(rgb.shape[:2])
            rgb_t = self._rgb_tensor(rgb, size)
            th_t = self._upload("thermal", np.asarray(thermal_grid, dtype=np.float32))[None, None]
            valid_t = None if valid_grid is None else self._upload("valid", valid_grid)[None, None].float()
            inp = self._model_input(rgb_t, th_t, valid_t, size, {})
            if side_stream and self._prep_stream is not None:
                self._prep_stream.synchronize()
        inp.timings["preprocess"] = (time.perf_counter() - t0) * 1e3
        return inp

    def _prep_stream_context(self, side_stream: bool):
        if side_stream and self._device.type == "cuda":
            if self._prep_stream is None:
                self._prep_stream = torch.cuda.Stream(device=self._device)
            return torch.cuda.stream(self._prep_stream)
        return _NO_CONTEXT

    def _logits(self, inp: ModelInput) -> torch.Tensor:
        if self._device.type == "cuda":  # made on the side stream: keep the allocator from reusing them early
            stream = torch.cuda.current_stream(self._device)
            for t in (inp.rgb, inp.thermal, inp.valid):
                if t is not None:
                    t.record_stream(stream)
        if self._switchable and self._model.active_class_set != self._info.name:
            self._model.select_class_set(self._info.name)  # another user of the same model chose another set
        with self._autocast():
            logits = self._forward(inp.rgb, inp.thermal, inp.valid)["logits"]
        nh, nw = inp.content_size
        return logits[:, :, :nh, :nw].float()

    def infer(self, inp: ModelInput) -> SegmentationResult:
        """The frame path's second step: forward, then labels and confidence at the model's grid."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = self._logits(inp)
            if self._device.type == "cuda":  # this thread's stream only: not the next frame's preparation
                torch.cuda.current_stream(self._device).synchronize()
            t1 = time.perf_counter()
            labels_np, conf_np = self._decide(logits)
        t2 = time.perf_counter()
        timings = {**inp.timings, "model": (t1 - t0) * 1e3, "postprocess": (t2 - t1) * 1e3}
        return SegmentationResult(labels=labels_np, confidence=conf_np, timings=timings)

    def _decide(self, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Arg-max labels and max softmax probability of (1, C, h, w) logits, decided on the model's
        device: only the small label dtype and the confidence cross to the host."""
        conf, labels = logits.softmax(dim=1).max(dim=1)
        label_t = torch.uint8 if self._label_dtype == np.uint8 else torch.int32
        labels_np = labels[0].to(label_t).cpu().numpy().astype(self._label_dtype, copy=False)
        return labels_np, conf[0].clamp_(0.0, 1.0).cpu().numpy().astype(np.float32, copy=False)

    def _autocast(self):
        if self._precision == "fp32":
            return torch.autocast(self._device.type, enabled=False)
        return torch.autocast(self._device.type, dtype=PRECISIONS[self._precision])

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def _check_grid(self, rgb, thermal_grid, valid_grid) -> None:
        self._check_rgb(rgb)
        size = self.grid_size(rgb.shape[:2])
        if not isinstance(thermal_grid, np.ndarray) or thermal_grid.shape != size:
            got = thermal_grid.shape if isinstance(thermal_grid, np.ndarray) else type(thermal_grid).__name__
            raise ValueError(f"thermal must be warped into the model grid {size} for RGB {rgb.shape[:2]}, got {got}")
        if valid_grid is not None and (valid_grid.dtype != np.bool_ or valid_grid.shape != size):
            got = f"{valid_grid.dtype} {valid_grid.shape}"
            raise ValueError(f"valid must be a bool array of the model grid {size}, got {got}")

    def __call__(self, rgb: np.ndarray, thermal: np.ndarray, valid: np.ndarray | None = None) -> SegmentationResult:
        """Segment one registered pair; outputs have the RGB image's height and width."""
        self._check(rgb, thermal, valid)
        h, w = rgb.shape[:2]
        t0 = time.perf_counter()
        with torch.inference_mode():
            inp = self._preprocess(rgb, thermal, valid)
            self._sync()
            t1 = time.perf_counter()
            logits = self._logits(inp)
            self._sync()
            t2 = time.perf_counter()
            if inp.content_size != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            labels_np, conf_np = self._decide(logits)
        t3 = time.perf_counter()
        timings = {"preprocess": (t1 - t0) * 1e3, "model": (t2 - t1) * 1e3, "postprocess": (t3 - t2) * 1e3}
        return SegmentationResult(labels=labels_np, confidence=conf_np, timings=timings)


_NO_CONTEXT = contextlib.nullcontext()

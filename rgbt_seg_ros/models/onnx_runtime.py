"""Run a backend through ONNX Runtime behind the Segmenter (``model.runtime: onnxruntime``).

The Segmenter calls its forward as ``forward(rgb, thermal, valid) -> {"logits": tensor}``. With the
PyTorch runtime that is the model itself; here it is :class:`OnnxForward`: the model exported once
(``onnx_export.export_model``, static shapes at the model's input size) and run by an
``onnxruntime.InferenceSession`` on the execution providers asked for. Pre- and post-processing stay
the Segmenter's.

* **Cache.** The exported file is kept in a cache directory (``model.onnx_cache_dir``; default
  ``$XDG_CACHE_HOME/rgbt_seg_ros/onnx``), named by a key made of the model's weights (a SHA-256 over
  every tensor of its state dict: name, dtype, shape and bytes, so a retrained or other checkpoint
  never matches), the backend, class set, input size, batch, opset and the torch, onnx and onnxruntime
  versions. The key is written into the file's metadata (``rgbt_seg.cache_key``) and checked when the
  file is opened: a stale or foreign file under that name is exported again, never used.
* **Providers.** ``providers`` names them in order of preference: ``tensorrt``, ``cuda``, ``cpu``
  (ONNX Runtime's ``TensorrtExecutionProvider``, ``CUDAExecutionProvider``, ``CPUExecutionProvider``).
  One that this onnxruntime build does not have is reported (:attr:`RuntimeReport.notes`) with what
  runs instead; nothing is silently moved to another device: when none of those asked for is present
  the runtime is refused (the Segmenter then falls back to PyTorch and says so). TensorRT options:
  fp16 and an engine cache directory (``trt_fp16_enable``, ``trt_engine_cache_path``).
* **Parity.** :func:`check_parity` runs the same input through both runtimes; a logit difference
  beyond the tolerance (relative to the logits' scale) or an arg-max disagreement refuses the runtime.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .onnx_export import (
    DEFAULT_OPSET,
    INPUT_NAMES,
    OUTPUT_NAMES,
    LogitsOnly,
    example_inputs,
    export_model,
    logit_agreement,
    onnx_session,
)

RUNTIMES = ("torch", "onnxruntime")
#: ``model.providers`` names -> ONNX Runtime execution providers
PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
PROVIDERS_BY_EP = {v: k for k, v in PROVIDERS.items()}
CACHE_KEY = "rgbt_seg.cache_key"
#: default parity tolerance: largest logit difference / largest logit magnitude
DEFAULT_TOLERANCE = 1e-3


class RuntimeRefusedError(RuntimeError):
    """The ONNX runtime cannot be used for this model here (the message says why)."""


@dataclass
class RuntimeReport:
    """What the Segmenter runs and why: shown in the node's diagnostics and the benchmarks."""

    runtime: str  # what runs: torch | onnxruntime
    requested: str  # what was asked for
    providers_requested: list[str] = field(default_factory=list)
    providers: list[str] = field(default_factory=list)  # the session's providers, in order
    onnx_path: str | None = None
    cache_hit: bool | None = None
    export_s: float | None = None
    parity: dict | None = None
    fallback: str | None = None  # why PyTorch runs instead of what was asked for
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.runtime == "torch":
            return "torch" if not self.fallback else f"torch (onnxruntime refused: {self.fallback})"
        return f"onnxruntime [{', '.join(self.providers)}]"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rgbt_seg_ros" / "onnx"


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every tensor of ``model.state_dict()`` (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(model: nn.Module, backend: str, class_set: str, size: tuple[int, int], batch: int, opset: int) -> str:
    import onnx
    import onnxruntime as ort

    parts = {
        "weights": weights_fingerprint(model),
        "backend": backend,
        "class_set": class_set,
        "size": [int(size[0]), int(size[1])],
        "batch": int(batch),
        "opset": int(opset),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _file_key(path: Path) -> str | None:
    """The cache key stored in an ONNX file's metadata, or None (unreadable, foreign or without one)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return None
    return next((p.value for p in proto.metadata_props if p.key == CACHE_KEY), None)


def cached_export(
    model: nn.Module,
    cfg: dict,
    class_set: str,
    metadata: dict[str, str],
    cache_dir: str | Path | None = None,
    batch: int = 1,
    opset: int = DEFAULT_OPSET,
) -> tuple[Path, bool, str]:
    """The model's ONNX file in the cache, exported when missing or stale: ``(path, cache_hit, key)``."""
    size = (int(cfg["input_size"][0]), int(cfg["input_size"][1]))
    key = cache_key(model, cfg["backend"], class_set, size, batch, opset)
    directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{cfg['backend']}_{class_set}_{size[0]}x{size[1]}_b{batch}_{key[:16]}.onnx"
    if path.is_file() and _file_key(path) == key:
        return path, True, key
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=directory)
    os.close(fd)
    try:
        export_model(model, tmp, size, batch=batch, opset=opset, metadata={**metadata, CACHE_KEY: key})
        os.replace(tmp, path)  # atomic: a second process never reads a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path, False, key


def resolve_providers(requested: list[str] | tuple[str, ...], options: dict | None = None) -> tuple[list, list[str]]:
    """``requested`` names -> (ONNX Runtime provider list with options, notes on what is missing).

    Raises :class:`RuntimeRefusedError` for an unknown name or when none of those asked for is present."""
    import onnxruntime as ort

    options = options or {}
    unknown = [p for p in requested if p not in PROVIDERS]
    if unknown or not requested:
        raise RuntimeRefusedError(f"model.providers must name some of {list(PROVIDERS)}, got {list(requested)}")
    available = set(ort.get_available_providers())
    chosen, notes, missing = [], [], []
    for name in requested:
        ep = PROVIDERS[name]
        if ep not in available:
            missing.append(name)
            continue
        if name == "tensorrt":
            trt = {"trt_fp16_enable": bool(options.get("fp16", False))}
            if options.get("engine_cache_dir"):
                trt["trt_engine_cache_enable"] = True
                trt["trt_engine_cache_path"] = str(Path(options["engine_cache_dir"]).expanduser())
            chosen.append((ep, trt))
        else:
            chosen.append(ep)
    if missing:
        used = ", ".join(PROVIDERS_BY_EP.get(e if isinstance(e, str) else e[0], "?") for e in chosen) or "nothing"
        notes.append(
            f"execution provider(s) {', '.join(missing)} not in this onnxruntime build (it has "
            f"{', '.join(sorted(available))}); using {used}"
        )
    if not chosen:
        raise RuntimeRefusedError(notes[0].replace("; using nothing", ""))
    return chosen, notes


class OnnxForward(nn.Module):
    """``forward(rgb, thermal, valid) -> {"logits": tensor}`` through an onnxruntime session.

    Inputs are CPU or CUDA tensors; the logits come back on the device of ``rgb``. A missing ``valid``
    is all ones (the exported graph always takes it)."""

    def __init__(self, session, path: Path):
        super().__init__()
        self.session = session
        self.path = Path(path)
        self._shape = tuple(session.get_inputs()[0].shape)

    def forward(self, rgb: torch.Tensor, thermal: torch.Tensor, valid: torch.Tensor | None = None) -> dict:
        if valid is None:
            valid = torch.ones_like(thermal)
        if tuple(rgb.shape) != self._shape:
            raise ValueError(f"the ONNX model takes rgb {self._shape}, got {tuple(rgb.shape)}")
        feed = {n: t.detach().float().contiguous().cpu().numpy() for n, t in zip(INPUT_NAMES, (rgb, thermal, valid))}
        logits = self.session.run(list(OUTPUT_NAMES), feed)[0]
        return {"logits": torch.from_numpy(logits).to(rgb.device)}


def check_parity(model: nn.Module, forward: OnnxForward, size: tuple[int, int], tolerance: float) -> dict:
    """The same normalised input through PyTorch and ONNX Runtime: largest logit difference relative
    to the logits' scale, and the arg-max agreement. ``ok`` when the relative difference is within
    ``tolerance`` and every pixel agrees."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = [t.to(device) for t in example_inputs(size, 1, seed=3)]
    with torch.inference_mode():
        want = LogitsOnly(model).eval()(*inputs).float().cpu().numpy()
        got = forward(*inputs)["logits"].float().cpu().numpy()
    result = logit_agreement(got, want)
    relative = result["max_abs_diff"] / max(result["logit_abs_max"], 1e-6)
    ok = relative <= tolerance and result["argmax_agreement"] == 1.0
    return {**result, "relative_diff": relative, "tolerance": float(tolerance), "ok": bool(ok)}


def build_onnx_forward(
    model: nn.Module,
    cfg: dict,
    class_set: str,
    metadata: dict[str, str],
    providers: list[str] | tuple[str, ...] = ("cpu",),
    provider_options: dict | None = None,
    cache_dir: str | Path | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    threads: int | None = None,
) -> tuple[OnnxForward, RuntimeReport]:
    """Export (or reuse) the model's ONNX file, open it on ``providers`` and check parity with PyTorch.

    Raises :class:`RuntimeRefusedError` with the reason when it cannot be used (the report so far attached
    as ``exc.report``)."""
    import time

    report = RuntimeReport(runtime="onnxruntime", requested="onnxruntime", providers_requested=list(providers))
    try:
        chosen, notes = resolve_providers(list(providers), provider_options)
        report.notes += notes
        t0 = time.perf_counter()
        try:
            path, hit, _ = cached_export(model, cfg, class_set, metadata, cache_dir)
        except Exception as exc:
            raise RuntimeRefusedError(
                f"the {cfg['backend']} model could not be exported to ONNX: {type(exc).__name__}: {exc}"
            ) from exc
        report.onnx_path, report.cache_hit, report.export_s = str(path), hit, time.perf_counter() - t0
        try:
            session = onnx_session(path, threads or torch.get_num_threads(), chosen)
        except Exception as exc:
            raise RuntimeRefusedError(f"onnxruntime could not open {path}: {type(exc).__name__}: {exc}") from exc
        report.providers = [PROVIDERS_BY_EP.get(p, p) for p in session.get_providers()]
        forward = OnnxForward(session, path)
        size = (int(cfg["input_size"][0]), int(cfg["input_size"][1]))
        report.parity = check_parity(model, forward, size, tolerance)
        if not report.parity["ok"]:
            p = report.parity
            raise RuntimeRefusedError(
                f"ONNX Runtime and PyTorch disagree on {path.name}: largest logit difference {p['max_abs_diff']:.3g} "
                f"({p['relative_diff']:.3g} of the logits' scale, tolerance {tolerance:g}), arg-max agreement "
                f"{100 * p['argmax_agreement']:.2f} %"
            )
    except RuntimeRefusedError as exc:
        exc.report = report
        raise
    return forward, report

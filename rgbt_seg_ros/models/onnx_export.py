"""ONNX export of a model backend's forward: ``(rgb, thermal, valid) -> logits`` at a static size.

The exported graph is what the ``Segmenter`` runs between its pre- and post-processing:

* inputs ``rgb`` (B, 3, H, W) float32, normalised with the config's RGB mean/std;
  ``thermal`` (B, 1, H, W) float32, normalised and zeroed where invalid;
  ``valid`` (B, 1, H, W) float32 in {0, 1} (pixels the thermal camera sees; padding is 0);
* output ``logits`` (B, C, H, W) float32 at the input size.

H, W and B are fixed at export (static shapes: what TensorRT and other deployment runtimes
want); the model config's ``input_size`` by default. The class names, palette, input size
and normalisation are stored in the ONNX metadata (``metadata_props``) so a runtime can do
the same pre- and post-processing as the ``Segmenter``.

Exporter: the TorchScript tracer (``torch.onnx.export(..., dynamo=False)``, opset 17 by
default; LayerNorm is a native op from opset 17), which needs no extra package. Two details:

* SARTM downsamples the validity mask to each feature level with
  ``F.interpolate(valid, size=feature.shape[-2:], mode="area")``. Under the tracer the
  ``shape`` entries are traced tensors, so the size is not a constant, and ``area`` mode is
  exported through adaptive average pooling, whose ONNX conversion needs a constant output
  size ("Unsupported: ONNX export of operator adaptive pooling, since output_size is not
  constant"). :func:`static_interpolate_sizes` turns every ``size`` given to
  ``F.interpolate`` into Python ints during the export: exact for a static-shape graph.
* The two LoRA adapters (``rgb``, ``thermal``) share the encoder's base weights. The model
  is exported in eval mode, where SARTM runs both modalities as one batch through the trunk
  with each half's LoRA merged into a fused qkv weight (``lora.modality_batch``): the graph
  holds one (2, 3d, d) constant per block and a batched matmul, exact to float rounding. The
  unmerged q/k/v weights are not in the graph, so the file holds the qkv weights twice (once
  per modality) instead of the base plus two rank-r adapters.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_OPSET = 17
INPUT_NAMES = ("rgb", "thermal", "valid")
OUTPUT_NAMES = ("logits",)


class LogitsOnly(nn.Module):
    """A backend reduced to ``forward(rgb, thermal, valid) -> logits`` (the exported function)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, rgb: torch.Tensor, thermal: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.model(rgb, thermal, valid)["logits"]


@contextlib.contextmanager
def static_interpolate_sizes():
    """Within the block, ``F.interpolate(size=...)`` receives Python ints (constant in a traced graph)."""
    original = F.interpolate

    def interpolate(input, size=None, scale_factor=None, mode="nearest", align_corners=None, **kwargs):  # noqa: A002
        if size is not None:
            size = [int(s) for s in size] if isinstance(size, (tuple, list, torch.Size)) else int(size)
        return original(input, size=size, scale_factor=scale_factor, mode=mode, align_corners=align_corners, **kwargs)

    F.interpolate = interpolate
    try:
        yield
    finally:
        F.interpolate = original


def example_inputs(size: tuple[int, int], batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random normalised inputs with a partly invalid thermal view (the left quarter unseen)."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    rgb = torch.randn(batch, 3, h, w, generator=g)
    valid = torch.ones(batch, 1, h, w)
    valid[..., : w // 4] = 0.0
    thermal = torch.randn(batch, 1, h, w, generator=g) * valid
    return rgb, thermal, valid


def check_size(backend: str, size: tuple[int, int]) -> tuple[int, int]:
    from .registry import backend_spec

    multiple = backend_spec(backend).size_multiple
    h, w = (int(v) for v in size)
    if h <= 0 or w <= 0 or h % multiple or w % multiple:
        raise ValueError(f"export size {h}x{w}: backend '{backend}' needs positive multiples of {multiple}")
    return h, w


def export_model(
    model: nn.Module,
    out: str | Path,
    size: tuple[int, int],
    batch: int = 1,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Export ``model`` (a backend) to ``out`` as an ONNX file with static shapes; returns the path."""
    import onnx

    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapper = LogitsOnly(model).eval()
    inputs = example_inputs(size, batch)
    with warnings.catch_warnings():
        # The tracer warns about every shape it freezes into a constant: that is the point here.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        with torch.no_grad(), static_interpolate_sizes():
            torch.onnx.export(
                wrapper,
                inputs,
                str(out),
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                opset_version=int(opset),
                dynamo=False,
                do_constant_folding=True,
            )
    with torch.no_grad():
        out_shape = tuple(wrapper(*inputs).shape)
    proto = onnx.load(str(out))
    # The tracer leaves the output's dims unnamed and some intermediate shape annotations
    # inconsistent (onnxruntime then warns "Error merging shape info"): drop the intermediate
    # annotations (runtimes infer them) and state the static output shape.
    del proto.graph.value_info[:]
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    del dims[:]
    for value in out_shape:
        dims.add().dim_value = int(value)
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    return out


def checkpoint_metadata(cfg: dict, info, size: tuple[int, int], batch: int) -> dict[str, str]:
    return {
        "rgbt_seg.backend": str(cfg["backend"]),
        "rgbt_seg.input_size": json.dumps([int(size[0]), int(size[1])]),
        "rgbt_seg.batch": str(int(batch)),
        "rgbt_seg.classes": json.dumps(list(info.class_names)),
        "rgbt_seg.palette": json.dumps(np.asarray(info.palette).tolist()),
        "rgbt_seg.normalization": json.dumps(cfg["normalization"]),
        "rgbt_seg.inputs": "rgb (B,3,H,W) and thermal (B,1,H,W) normalised, thermal zeroed where invalid; "
        "valid (B,1,H,W) in {0,1}",
    }


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    size: tuple[int, int] | None = None,
    batch: int = 1,
    opset: int = DEFAULT_OPSET,
    sam2_checkpoint: str | Path | None = None,
) -> tuple[Path, nn.Module, dict]:
    """Load a checkpoint directory and export it; returns (path, the loaded model, resolved cfg)."""
    from .checkpoint import load_checkpoint

    model, cfg, info = load_checkpoint(checkpoint, device="cpu", sam2_checkpoint=sam2_checkpoint)
    size = check_size(cfg["backend"], size if size is not None else cfg["input_size"])
    if int(batch) < 1:
        raise ValueError(f"export batch must be >= 1, got {batch}")
    path = export_model(
        model, out, size, batch=batch, opset=opset, metadata=checkpoint_metadata(cfg, info, size, batch)
    )
    return path, model, cfg


def onnx_session(path: str | Path, threads: int | None = None, providers: list | None = None):
    """An onnxruntime session for an exported file (``providers``: onnxruntime's list; default CPU)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers or ["CPUExecutionProvider"])


def logit_agreement(got: np.ndarray, want: np.ndarray) -> dict:
    """How an exported model's logits ``got`` agree with PyTorch's ``want`` (same shape)."""
    if got.shape != want.shape:
        raise RuntimeError(f"ONNX logits have shape {got.shape}, PyTorch {want.shape}")
    return {
        "max_abs_diff": float(np.abs(got - want).max()),
        "logit_abs_max": float(np.abs(want).max()),
        "argmax_agreement": float((got.argmax(1) == want.argmax(1)).mean()),
        "shape": list(got.shape),
    }


def compare_with_torch(
    model: nn.Module, path: str | Path, size: tuple[int, int], batch: int = 1, seed: int = 1, repeats: int = 0
) -> dict:
    """Run the exported file with onnxruntime (CPU) and the PyTorch model on the same inputs.

    Returns the largest absolute logit difference, the arg-max agreement (fraction of pixels)
    and the logit scale, for a parity check. ``repeats`` > 0 also times both, interleaved (one
    onnxruntime run, one PyTorch run, ``repeats`` times, after one warm-up each), with the same
    number of threads: ``onnx_ms`` / ``torch_ms`` medians and their ratio.
    """
    session = onnx_session(path, threads=torch.get_num_threads())
    inputs = example_inputs(size, batch, seed=seed)
    feed = {name: t.numpy() for name, t in zip(INPUT_NAMES, inputs)}
    got = session.run(list(OUTPUT_NAMES), feed)[0]
    with torch.inference_mode():
        want = LogitsOnly(model).eval()(*inputs).numpy()
    result = logit_agreement(got, want)
    if repeats > 0:
        wrapped = LogitsOnly(model).eval()
        onnx_ms, torch_ms = [], []
        with torch.inference_mode():
            for i in range(repeats + 1):
                t0 = time.perf_counter()
                session.run(list(OUTPUT_NAMES), feed)
                t1 = time.perf_counter()
                wrapped(*inputs)
                t2 = time.perf_counter()
                if i > 0:  # the first of each is a warm-up
                    onnx_ms.append((t1 - t0) * 1e3)
                    torch_ms.append((t2 - t1) * 1e3)
        result.update(
            {
                "threads": torch.get_num_threads(),
                "repeats": repeats,
                "onnx_ms_median": float(np.median(onnx_ms)),
                "torch_ms_median": float(np.median(torch_ms)),
                "onnx_ms_all": onnx_ms,
                "torch_ms_all": torch_ms,
                "onnx_to_torch_time": float(np.median(onnx_ms) / np.median(torch_ms)),
            }
        )
    return result

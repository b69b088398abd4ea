"""The node's parameters: one schema for ``segment_node`` and for bag replay.

Each parameter has a type, a default, a description, an optional range or choice
list and whether it may change at run time. The node declares them from this
table (with descriptors and ranges); replay reads the same ``config/segment.yaml``
through :func:`load_param_file` and validates it against the same table, so the
two never disagree on a setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: Any
    description: str
    choices: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    dynamic: bool = False  # may be changed while the node runs (no reload needed)

    @property
    def kind(self) -> type:
        return type(self.default)


SPECS: tuple[ParamSpec, ...] = (
    # inputs: the topics are the relative names rgb/image, thermal/image (+ camera_info), remapped as usual
    ParamSpec(
        "input.rgb.transport",
        "raw",
        "RGB input: raw (sensor_msgs/Image on rgb/image) or compressed "
        "(sensor_msgs/CompressedImage jpeg/png on rgb/image/compressed)",
        choices=("raw", "compressed"),
    ),
    ParamSpec(
        "input.thermal.transport",
        "raw",
        "thermal input: raw (sensor_msgs/Image on thermal/image) or compressed "
        "(sensor_msgs/CompressedImage, 8- or 16-bit png, on thermal/image/compressed)",
        choices=("raw", "compressed"),
    ),
    # QoS
    ParamSpec(
        "qos.reliability",
        "best_effort",
        "subscription reliability; best_effort matches camera drivers",
        choices=("best_effort", "reliable"),
    ),
    ParamSpec("qos.depth", 5, "subscription queue depth", min=1, max=100),
    # pairing
    ParamSpec(
        "sync.queue_size", 5, "messages kept per camera while looking for a partner", min=1, max=100, dynamic=True
    ),
    ParamSpec("sync.slop", 0.05, "largest stamp difference (s) of an RGB-thermal pair", min=0.0, max=1.0, dynamic=True),
    ParamSpec("sync.exact", False, "pair only identical stamps (hardware-triggered cameras)", dynamic=True),
    ParamSpec(
        "sync.max_wait",
        0.1,
        "longest wait (s) for a better partner before a pair is emitted",
        min=0.0,
        max=2.0,
        dynamic=True,
    ),
    # registration
    ParamSpec(
        "registration.mode",
        "identity",
        "thermal -> RGB warp: identity (aligned / resize), homography, calibrated (intrinsics + extrinsics + plane)",
        choices=("identity", "homography", "calibrated"),
    ),
    ParamSpec("registration.file", "", "calibration YAML (see config/registration/); empty for identity"),
    ParamSpec("registration.interpolation", "linear", "warp interpolation", choices=("nearest", "linear", "cubic")),
    # registration health: drift estimates against the calibration, the warning, the optional correction
    ParamSpec(
        "registration.check_every",
        10,
        "estimate the thermal-RGB misalignment every N paired frames (off the frame path live); 0 = off",
        min=0,
        max=100000,
        dynamic=True,
    ),
    ParamSpec(
        "registration.min_confidence",
        0.3,
        "estimates below this confidence (0 = no structure, 1 = clear) neither warn nor correct",
        min=0.0,
        max=1.0,
        dynamic=True,
    ),
    ParamSpec(
        "registration.warn_offset_px",
        2.0,
        "diagnostics WARN when a confident offset above this (RGB px) persists",
        min=0.0,
        max=1000.0,
        dynamic=True,
    ),
    ParamSpec(
        "registration.warn_after",
        5.0,
        "seconds such an offset must persist before the WARN",
        min=0.0,
        max=3600.0,
        dynamic=True,
    ),
    ParamSpec(
        "registration.auto_correct",
        False,
        "apply a slowly filtered, bounded translation on top of the calibration; false = the calibration "
        "(turning it off, or ~/reset_registration, returns to it)",
        dynamic=True,
    ),
    ParamSpec(
        "registration.max_correction_px",
        25.0,
        "largest translation auto-correction applies (RGB px)",
        min=0.0,
        max=500.0,
        dynamic=True,
    ),
    ParamSpec(
        "registration.correction_rate",
        2.0,
        "fastest change of the applied translation (RGB px per second)",
        min=0.01,
        max=1000.0,
        dynamic=True,
    ),
    # thermal normalisation
    ParamSpec(
        "thermal.mode",
        "percentile",
        "thermal -> [0, 1]: fixed (min/max raw), percentile (per-frame AGC), "
        "linear (raw*scale+offset, then min/max), passthrough (8-bit)",
        choices=("fixed", "percentile", "linear", "passthrough"),
        dynamic=True,
    ),
    ParamSpec("thermal.min", 0.0, "lower end of the fixed / linear range", dynamic=True),
    ParamSpec("thermal.max", 65535.0, "upper end of the fixed / linear range", dynamic=True),
    ParamSpec("thermal.p_low", 1.0, "percentile mode: lower percentile", min=0.0, max=100.0, dynamic=True),
    ParamSpec("thermal.p_high", 99.0, "percentile mode: upper percentile", min=0.0, max=100.0, dynamic=True),
    ParamSpec("thermal.scale", 1.0, "linear mode: scale (e.g. 0.01 for FLIR TLinear counts -> Kelvin)", dynamic=True),
    ParamSpec("thermal.offset", 0.0, "linear mode: offset", dynamic=True),
    # model
    ParamSpec(
        "model.checkpoint",
        "models/demo",
        "checkpoint directory (model.safetensors + config.yaml); relative paths are "
        "also looked up in the package share directory",
    ),
    ParamSpec("model.config", "models/sartm_tiny.yaml", "model config used when no checkpoint is given"),
    ParamSpec(
        "model.dataset", "synthetic", "class set (config/datasets/NAME.yaml) for model.config without checkpoint"
    ),
    ParamSpec(
        "model.class_set",
        "",
        "class set to segment with, for a checkpoint trained on several datasets (segrgbx); "
        "empty = the checkpoint's primary set; an unknown name is reported and the primary set used",
    ),
    ParamSpec("model.sam2_checkpoint", "", "official SAM2 weights (sam2.1_hiera_*.pt) the model builds on"),
    ParamSpec("model.device", "auto", "inference device", choices=("auto", "cpu", "cuda")),
    ParamSpec(
        "model.precision", "fp32", "inference precision (fp16/bf16 autocast on CUDA)", choices=("fp32", "fp16", "bf16")
    ),
    ParamSpec(
        "model.compile",
        "none",
        "torch.compile mode (CUDA deployments; compiles once at start-up, static shapes)",
        choices=("none", "default", "reduce-overhead", "max-autotune"),
    ),
    ParamSpec(
        "model.runtime",
        "torch",
        "what runs the forward: torch, or onnxruntime (the model exported once, cached by its weights, checked "
        "against PyTorch at start-up; PyTorch runs instead, with the reason in diagnostics, when it cannot)",
        choices=("torch", "onnxruntime"),
    ),
    ParamSpec(
        "model.providers",
        "cpu",
        "onnxruntime execution providers in order of preference, comma-separated: tensorrt, cuda, cpu; one "
        "missing from the installed onnxruntime is reported with what runs instead",
    ),
    ParamSpec("model.onnx_cache_dir", "", "where exported ONNX files are kept; empty = ~/.cache/rgbt_seg_ros/onnx"),
    ParamSpec(
        "model.onnx_tolerance",
        1e-3,
        "onnxruntime parity check: largest logit difference allowed, relative to the logits' scale",
        min=0.0,
        max=1.0,
    ),
    ParamSpec("model.trt_fp16", False, "TensorRT provider: build fp16 engines"),
    ParamSpec("model.trt_engine_cache_dir", "", "TensorRT provider: engine cache directory; empty = no cache"),
    # outputs
    ParamSpec("output.labels", True, "publish ~/labels (mono8 class ids; mono16 beyond 255 classes)", dynamic=True),
    ParamSpec("output.overlay", True, "publish ~/overlay (rgb8, RGB blended with the palette)", dynamic=True),
    ParamSpec("output.confidence", False, "publish ~/confidence (32FC1, max softmax)", dynamic=True),
    ParamSpec("output.colored_labels", False, "publish ~/colored_labels (rgb8 palette image)", dynamic=True),
    ParamSpec(
        "output.thermal_registered",
        False,
        "publish ~/thermal_registered (mono8, thermal in the RGB grid)",
        dynamic=True,
    ),
    ParamSpec(
        "output.overlay_alpha", 0.5, "weight of the palette colour in the overlay", min=0.0, max=1.0, dynamic=True
    ),
    ParamSpec(
        "output.palette", [0], "class colours as 0xRRGGBB integers; [0] = the model's dataset palette", dynamic=True
    ),
    # behaviour
    ParamSpec(
        "on_thermal_loss",
        "rgb_only",
        "when thermal stops: wait (publish nothing) or rgb_only (segment RGB "
        "with an empty, invalid thermal input until thermal returns)",
        choices=("wait", "rgb_only"),
        dynamic=True,
    ),
    ParamSpec(
        "thermal_timeout", 1.0, "seconds without thermal before it counts as lost", min=0.05, max=60.0, dynamic=True
    ),
    ParamSpec(
        "on_rgb_loss",
        "wait",
        "when RGB stops while thermal runs: wait (publish nothing) or thermal_only (segment thermal alone "
        "in the RGB grid, with the thermal stamp and the RGB frame_id; transform.modality_dropout.p_rgb trains "
        "models on black RGB)",
        choices=("wait", "thermal_only"),
        dynamic=True,
    ),
    ParamSpec("rgb_timeout", 1.0, "seconds without RGB before it counts as lost", min=0.05, max=60.0, dynamic=True),
    ParamSpec(
        "stale_timeout",
        2.0,
        "seconds without a camera's messages before diagnostics WARN",
        min=0.1,
        max=60.0,
        dynamic=True,
    ),
    ParamSpec("max_megapixels", 16.0, "images above this size are rejected", min=0.01, max=200.0, dynamic=True),
)

SPEC_BY_NAME = {s.name: s for s in SPECS}

# A bag directory may carry the node parameters that fit its rig (make-sample-bag writes one);
# replay, demo and the launch file's bag:= use it when no other parameter file is given.
BAG_PARAMS = "rgbt_seg_params.yaml"

# Input topics are names to remap, not parameters (image_pipeline's convention).
INPUT_NAMES = {
    "rgb": "rgb/image",
    "thermal": "thermal/image",
    "rgb_info": "rgb/camera_info",
    "thermal_info": "thermal/camera_info",
}
REMOVED = {
    f"topics.{key}": (
        f"topics.{key} is no longer a parameter: the node subscribes to the relative name '{name}'; "
        f"remap it instead (--ros-args -r {name}:=/your/topic, or the launch argument "
        f"{'rgb' if key.startswith('rgb') else 'thermal'}{'_info' if key.endswith('info') else ''}_topic)"
    )
    for key, name in INPUT_NAMES.items()
}


def defaults() -> dict[str, Any]:
    return {s.name: s.default for s in SPECS}


def validate(name: str, value: Any) -> str | None:
    """Return None when ``value`` is acceptable for parameter ``name``, else the reason."""
    spec = SPEC_BY_NAME.get(name)
    if name in REMOVED:
        return REMOVED[name]
    if spec is None:
        return f"unknown parameter '{name}'"
    if spec.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if spec.kind is list:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) for v in value):
            return f"{name} must be a list of integers, got {value!r}"
    elif not isinstance(value, spec.kind) or (spec.kind is not bool and isinstance(value, bool)):
        return f"{name} must be of type {spec.kind.__name__}, got {value!r}"
    if spec.choices is not None and value not in spec.choices:
        return f"{name} must be one of {', '.join(spec.choices)}, got '{value}'"
    if spec.min is not None and value < spec.min:
        return f"{name} must be >= {spec.min}, got {value}"
    if spec.max is not None and value > spec.max:
        return f"{name} must be <= {spec.max}, got {value}"
    return None


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


# Parameters every rclpy node has (rclpy declares them): accepted in a file, not ours to check.
ROS_OWNED = ("use_sim_time", "start_type_description_service")
ROS_OWNED_PREFIXES = ("qos_overrides.",)


def is_ros_owned(name: str) -> bool:
    return name in ROS_OWNED or name.startswith(ROS_OWNED_PREFIXES)


def check_value(name: str, value: Any) -> tuple[Any, str | None]:
    """The value the node uses for ``name`` and, when ``value`` is refused, why (the default is used then).

    The one policy of the node and of replay: an invalid value is reported and replaced by the default.
    """
    problem = validate(name, value)
    spec = SPEC_BY_NAME.get(name)
    if problem:
        return (spec.default if spec else None), (
            f"{problem}; using the default {spec.default!r}" if spec else f"{problem}; ignored"
        )
    if spec.kind is float:
        return float(value), None
    return (list(value) if spec.kind is list else value), None


def load_param_file(path: str | Path, node_name: str = "rgbt_seg", problems: list[str] | None = None) -> dict[str, Any]:
    """Read a ROS 2 parameter file (``/**: ros__parameters: ...``) into validated, flat dotted names.

    Entries for ``/**``, ``NODE`` or ``/NAMESPACE/NODE`` apply; missing parameters take their
    defaults; rclpy's own parameters (``use_sim_time``, ``qos_overrides.*``) are accepted.
    Every unknown name or bad value is checked as the node checks it (:func:`check_value`): with
    a ``problems`` list they are appended there (each naming the file) and the defaults are used,
    exactly what ``segment_node`` does with the same file; without one, ``ValueError`` lists them all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parameter file {path} does not exist")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of node names to ros__parameters, got {type(data).__name__}")
    values = defaults()
    found: list[str] = []
    for key, section in data.items():
        if not isinstance(section, dict) or not isinstance(section.get("ros__parameters"), dict):
            raise ValueError(f"{path}: entry '{key}' has no ros__parameters mapping")
        if key not in ("/**", node_name) and not str(key).endswith("/" + node_name):
            continue
        for name, value in _flatten(section["ros__parameters"]).items():
            if is_ros_owned(name):
                continue
            values[name], problem = check_value(name, value)
            if problem:
                found.append(f"{path}: {problem}")
            if name not in SPEC_BY_NAME:
                values.pop(name)
    if problems is not None:
        problems.extend(found)
    elif len(found) == 1:
        raise ValueError(found[0].replace("; ignored", "").split("; using the default")[0])
    elif found:
        raise ValueError(f"{path} has {len(found)} problems: " + "; ".join(p.split(": ", 1)[1] for p in found))
    return values


def write_param_file(path: Path, overrides: dict, header: str = "", complete: bool = True) -> Path:
    """A ROS 2 parameter file for ``segment_node``: the defaults plus ``overrides`` (dotted names).

    ``complete=False`` writes only the overrides (the other parameters keep their defaults);
    ``header`` is written first as comment lines.
    """
    tree: dict = {}
    for name, value in ({**defaults(), **overrides} if complete else overrides).items():
        node = tree
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    path.write_text(comment + yaml.safe_dump({"/**": {"ros__parameters": tree}}, sort_keys=False))
    return path

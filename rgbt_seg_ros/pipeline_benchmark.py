"""``rgbt-seg bench pipeline`` and ``rgbt-seg bench memory``: where a frame's time and memory go.

Both drive the objects the live node drives, in the node's order, on ``sensor_msgs/Image``
messages (rclpy's own message class when rclpy is importable, else the rosbags dataclass):

``pipeline``
    per-stage time of one RGB-thermal pair at each camera size (default 640x480 and 1280x720):

    ============== ======================================================================
    conversion     ``rgb_from_msg`` + ``thermal_from_msg`` (the subscription callbacks)
    pairing        ``ApproximateTimePairer.add_rgb`` + ``add_thermal`` (CPU cost only; the
                   wait for a partner is not a cost of this process)
    thermal_norm   ``ThermalNormalizer.normalize``
    registration   ``ThermalRegistrar.warp`` (cached maps), validity mask
    preprocess     ``Segmenter``: to tensor, resize, normalise, pad
    model          ``Segmenter``: the backend forward
    postprocess    ``Segmenter``: crop, resize logits, softmax, arg-max, to numpy
    render         ``blend_overlay`` (the default ``~/overlay`` output)
    message_build  ``fill_image_msg`` of labels (mono8) and overlay (rgb8) + header
    ============== ======================================================================

    Each stage is timed on its own with ``time.perf_counter`` and reported as median and p95
    over ``repeats`` frames after warm-up. ``overhead`` is everything but the model forward
    (the node's diagnostics count the worker part of it: thermal_norm .. message_build).

``memory``
    the node's per-frame path (new input messages, conversion, pairing,
    ``FramePipeline.process``, new output messages) for N pairs; resident set size (RSS)
    at start, after warm-up and at the end, sampled along the way, and the growth.

The model is a checkpoint directory or random weights of a model config (the compute is the
same as with trained weights).
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .imaging import fill_image_msg
from .memory import release_free_heap, rss_mb
from .pipeline import FramePipeline, normalizer_from_params, rgb_from_msg, thermal_from_msg
from .registration import ThermalRegistrar
from .render import blend_overlay
from .sync import ApproximateTimePairer

STAGES = (
    "conversion",
    "pairing",
    "thermal_norm",
    "registration",
    "preprocess",
    "model",
    "postprocess",
    "render",
    "message_build",
)
WORKER_STAGES = ("thermal_norm", "registration", "preprocess", "postprocess", "render", "message_build")
DEFAULT_SIZES = ((480, 640), (720, 1280))


# --------------------------------------------------------------------------- model and inputs


def load_segmenter(
    checkpoint: str | Path | None = None,
    config: str | Path = "models/sartm_tiny.yaml",
    model_size: tuple[int, int] | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    seed: int = 0,
):
    """A ``Segmenter`` from a checkpoint directory, else with random weights of ``config``.

    Random weights: nothing frozen (a frozen random encoder is refused by the backends), random
    unit-norm class-name embeddings (no text encoder is loaded). Warm-up forward included.
    """
    import torch
    import torch.nn.functional as F

    from .models import build_model, dataset_info_for, resolve_model_config
    from .resources import resolve_data_file
    from .segmenter import Segmenter

    if checkpoint is not None:
        return Segmenter.from_checkpoint(resolve_data_file(str(checkpoint)), device=device, precision=precision)
    torch.manual_seed(seed)
    cfg = resolve_model_config(resolve_data_file(str(config)))
    if model_size is not None:
        cfg["input_size"] = [int(model_size[0]), int(model_size[1])]
        cfg = resolve_model_config(cfg)  # size checked against the backend's multiple
    for section, key in (("encoder", "freeze"), ("decoder", "freeze_transformer")):
        if section in cfg and key in cfg[section] and not cfg[section].get("checkpoint"):
            cfg[section][key] = False
    info = dataset_info_for(cfg, None)
    text_dim = int((cfg.get("language") or {}).get("text_dim", 384))
    text = F.normalize(torch.randn(info.num_classes, text_dim), dim=-1)
    model = build_model(cfg, info, text)
    return Segmenter(model, cfg, info, device=device, precision=precision)


def image_message_class():
    """rclpy's ``sensor_msgs.msg.Image`` when importable (what the node receives), else rosbags' dataclass."""
    try:
        from sensor_msgs.msg import Image

        return Image, "rclpy"
    except ImportError:
        from .bags import IMAGE_TYPE, TYPESTORE

        return TYPESTORE.types[IMAGE_TYPE], "rosbags"


@dataclass
class CameraFrames:
    """Encoded camera images of one synthetic rig at one size, as a driver would publish them."""

    rgb_size: tuple[int, int]
    thermal_size: tuple[int, int]
    rgb_bytes: bytes  # bgr8
    thermal_bytes: bytes  # mono16, Kelvin x 100
    calibration: dict  # homography registration of the rig

    @classmethod
    def synthetic(cls, rgb_size: tuple[int, int], seed: int = 0) -> CameraFrames:
        from .data.synthetic import SceneGenerator

        thermal_size = (max(16, rgb_size[0] * 512 // 480), rgb_size[1])
        gen = SceneGenerator(seed=seed, rgb_size=tuple(rgb_size), thermal_size=thermal_size)
        sample = gen.sample(0, "day")
        return cls(
            rgb_size=tuple(rgb_size),
            thermal_size=thermal_size,
            rgb_bytes=np.ascontiguousarray(sample.rgb[:, :, ::-1]).tobytes(),
            thermal_bytes=np.ascontiguousarray(sample.thermal, dtype=np.uint16).tobytes(),
            calibration=gen.calibration_dict(),
        )

    def messages(self, image_cls, stamp_ns: int, as_numpy: bool) -> tuple[object, object]:
        """A new (rgb, thermal) message pair with this stamp (fresh objects, like a subscription delivers)."""
        (h, w), (ht, wt) = self.rgb_size, self.thermal_size
        out = []
        for data, height, width, enc, step, frame in (
            (self.rgb_bytes, h, w, "bgr8", 3 * w, "rgb_camera_optical_frame"),
            (self.thermal_bytes, ht, wt, "mono16", 2 * wt, "thermal_camera_optical_frame"),
        ):
            msg = _new_message(image_cls, as_numpy)
            msg.height, msg.width, msg.encoding, msg.is_bigendian, msg.step = height, width, enc, 0, step
            msg.data = np.frombuffer(data, np.uint8) if as_numpy else data
            _set_header(msg, stamp_ns, frame)
            out.append(msg)
        return out[0], out[1]


def _new_message(image_cls, as_numpy: bool):
    if not as_numpy:
        return image_cls()
    from .bags import make_header

    return image_cls(
        header=make_header(0, ""), height=0, width=0, encoding="", is_bigendian=0, step=0, data=np.zeros(0, np.uint8)
    )


def _set_header(msg, stamp_ns: int, frame_id: str) -> None:
    sec, nsec = divmod(int(stamp_ns), 1_000_000_000)
    if hasattr(msg.header.stamp, "sec") and not _is_frozen(msg.header):
        msg.header.stamp.sec, msg.header.stamp.nanosec = sec, nsec
        msg.header.frame_id = frame_id
    else:  # rosbags dataclasses are plain dataclasses too, but build a new header to be safe
        from .bags import make_header

        msg.header = make_header(stamp_ns, frame_id)


def _is_frozen(obj) -> bool:
    params = getattr(type(obj), "__dataclass_params__", None)
    return bool(params is not None and params.frozen)


def pipeline_params(frames: CameraFrames, calibration_file: Path) -> dict:
    """The node's parameters for the synthetic rig (homography registration, FLIR-like linear thermal)."""
    from .params import defaults

    p = defaults()
    p.update(
        {
            "registration.mode": "homography",
            "registration.file": str(calibration_file),
            "thermal.mode": "linear",
            "thermal.scale": 0.01,
            "thermal.min": 250.0,
            "thermal.max": 330.0,
        }
    )
    return p


def make_pipeline(segmenter, frames: CameraFrames) -> FramePipeline:
    """The ``FramePipeline`` the node would build for this rig around ``segmenter``."""
    registrar = ThermalRegistrar.from_dict(frames.calibration, source="synthetic rig")
    p = pipeline_params(frames, Path("synthetic-rig.yaml"))
    return FramePipeline(
        segmenter,
        normalizer_from_params(p),
        registrar,
        overlay_alpha=p["output.overlay_alpha"],
        palette=p["output.palette"],
    )


def _stats(values: list[float]) -> dict:
    arr = np.asarray(values, float)
    return {"median": float(np.median(arr)), "p95": float(np.percentile(arr, 95)), "n": int(arr.size)}


# --------------------------------------------------------------------------- bench pipeline


def time_frame(
    pipeline: FramePipeline,
    pairer: ApproximateTimePairer,
    frames: CameraFrames,
    image_cls,
    as_numpy,
    stamp_ns: int,
    max_pixels: int,
) -> dict[str, float]:
    """One frame through every stage, each timed alone (ms). Mirrors node.py's callbacks, worker and _publish."""
    rgb_msg, th_msg = frames.messages(image_cls, stamp_ns, as_numpy)
    t = {}
    c0 = time.perf_counter()
    rgb = rgb_from_msg(rgb_msg, max_pixels=max_pixels)
    thermal_raw = thermal_from_msg(th_msg, max_pixels=max_pixels)
    if thermal_raw.dtype.kind == "f" and not np.isfinite(thermal_raw).any():
        raise ValueError("benchmark thermal frame has no finite pixel")
    c1 = time.perf_counter()
    pairs = pairer.add_rgb(stamp_ns, (rgb_msg.header, rgb), now_ns=time.monotonic_ns())
    pairs += pairer.add_thermal(stamp_ns, (th_msg.header, thermal_raw), now_ns=time.monotonic_ns())
    c2 = time.perf_counter()
    if len(pairs) != 1:
        raise RuntimeError(f"benchmark pairing formed {len(pairs)} pairs for one frame, expected 1")
    (header, rgb), (_, thermal_raw) = pairs[0].rgb, pairs[0].thermal
    h, w = rgb.shape[:2]
    c3 = time.perf_counter()
    norm, finite = pipeline.normalizer.normalize(thermal_raw)
    c4 = time.perf_counter()
    warped, valid = pipeline.registrar.warp(norm, rgb_size=(h, w))
    if finite is not None:
        finite_warped, _ = pipeline.registrar.warp(finite.astype(np.uint8), rgb_size=(h, w))
        valid = valid & (finite_warped > 0)
    warped = warped.astype(np.float32, copy=False)
    c5 = time.perf_counter()
    result = pipeline.segmenter(rgb, warped, valid)
    c6 = time.perf_counter()
    overlay = blend_overlay(rgb, result.labels, pipeline.palette, pipeline.overlay_alpha)
    c7 = time.perf_counter()
    labels_enc = "mono8" if result.labels.dtype == np.uint8 else "mono16"
    for arr, enc in ((result.labels, labels_enc), (overlay, "rgb8")):
        out = fill_image_msg(_new_message(image_cls, as_numpy), arr, enc, as_numpy=as_numpy)
        out.header = header
    c8 = time.perf_counter()
    t["conversion"] = (c1 - c0) * 1e3
    t["pairing"] = (c2 - c1) * 1e3
    t["thermal_norm"] = (c4 - c3) * 1e3
    t["registration"] = (c5 - c4) * 1e3
    t.update({k: result.timings[k] for k in ("preprocess", "model", "postprocess")})
    t["segmenter_call"] = (c6 - c5) * 1e3  # includes input checks; >= preprocess + model + postprocess
    t["render"] = (c7 - c6) * 1e3
    t["message_build"] = (c8 - c7) * 1e3
    return t


def bench_pipeline_size(segmenter, size: tuple[int, int], repeats: int = 10, warmup: int = 2, seed: int = 0) -> dict:
    """Per-stage medians / p95 of ``repeats`` frames at camera size ``size`` (H, W)."""
    from .params import defaults

    frames = CameraFrames.synthetic(size, seed=seed)
    pipeline = make_pipeline(segmenter, frames)
    image_cls, kind = image_message_class()
    as_numpy = kind == "rosbags"
    pairer = ApproximateTimePairer(queue_size=5, slop=0.05, max_wait=0.1)
    max_pixels = int(float(defaults()["max_megapixels"]) * 1e6)
    stamp = 1_700_000_000_000_000_000
    samples: dict[str, list[float]] = {}
    for i in range(warmup + max(1, repeats)):
        t = time_frame(pipeline, pairer, frames, image_cls, as_numpy, stamp + i * 33_333_333, max_pixels)
        if i >= warmup:
            for k, v in t.items():
                samples.setdefault(k, []).append(v)
    stages = {k: _stats(v) for k, v in samples.items()}
    total = [sum(samples[k][i] for k in STAGES) for i in range(len(samples["model"]))]
    worker = [sum(samples[k][i] for k in WORKER_STAGES) for i in range(len(samples["model"]))]
    model_med = stages["model"]["median"]
    overhead_all = statistics.median([tot - m for tot, m in zip(total, samples["model"])])
    overhead_worker = statistics.median(worker)
    return {
        "camera_size": [int(size[0]), int(size[1])],
        "thermal_size": list(frames.thermal_size),
        "message_class": kind,
        "stages_ms": stages,
        "total_ms_median": float(statistics.median(total)),
        "overhead_ms_median": float(overhead_all),
        "overhead_fraction": float(overhead_all / model_med) if model_med > 0 else float("nan"),
        "worker_overhead_ms_median": float(overhead_worker),
        "worker_overhead_fraction": float(overhead_worker / model_med) if model_med > 0 else float("nan"),
    }


def bench_pipeline(
    checkpoint: str | Path | None = None,
    config: str | Path = "models/sartm_tiny.yaml",
    model_size: tuple[int, int] | None = None,
    sizes=DEFAULT_SIZES,
    repeats: int = 10,
    warmup: int = 2,
    device: str = "cpu",
    precision: str = "fp32",
    segmenter=None,
) -> dict:
    """``rgbt-seg bench pipeline``: per-stage times at each camera size (see module docstring)."""
    import torch

    seg = segmenter if segmenter is not None else load_segmenter(checkpoint, config, model_size, device, precision)
    results = [bench_pipeline_size(seg, tuple(s), repeats=repeats, warmup=warmup) for s in sizes]
    return {
        "model": _model_name(seg),
        "source": str(checkpoint) if checkpoint is not None else f"random weights of {config}",
        "device": str(seg.device),
        "precision": seg.precision,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "sizes": results,
        "torch": torch.__version__,
    }


def _model_name(seg) -> str:
    info = seg.dataset_info
    return f"{seg.backend} {info.name} ({info.num_classes} classes) {seg.input_size[0]}x{seg.input_size[1]}"


def markdown_pipeline(result: dict) -> str:
    sizes = result["sizes"]
    head = [f"{s['camera_size'][1]}x{s['camera_size'][0]}" for s in sizes]
    lines = [
        f"bench pipeline: {result['model']} ({result['source']}) on {result['device']} {result['precision']}, "
        f"{result['threads']} threads, median of {result['repeats']} frames (ms; p95 in brackets)",
        "",
        "| stage | " + " | ".join(head) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for stage in STAGES:
        cells = [f"{s['stages_ms'][stage]['median']:.2f} ({s['stages_ms'][stage]['p95']:.2f})" for s in sizes]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(f"{s['total_ms_median']:.1f}" for s in sizes) + " |")
    lines.append(
        "| overhead (all but model) | "
        + " | ".join(f"{s['overhead_ms_median']:.2f} = {100 * s['overhead_fraction']:.2f} %" for s in sizes)
        + " |"
    )
    lines.append(
        "| worker overhead (node diagnostics) | "
        + " | ".join(
            f"{s['worker_overhead_ms_median']:.2f} = {100 * s['worker_overhead_fraction']:.2f} %" for s in sizes
        )
        + " |"
    )
    return "\n".join(lines)


def profile_model(segmenter, rows: int = 15) -> str:
    """The torch profiler's table of the most expensive operators of one forward (self CPU time)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    h, w = segmenter.input_size
    rgb = np.zeros((h, w, 3), np.uint8)
    thermal = np.zeros((h, w), np.float32)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if segmenter.device.type == "cuda" else [])
    with profile(activities=activities) as prof, torch.inference_mode():
        segmenter(rgb, thermal, None)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# --------------------------------------------------------------------------- bench memory


def bench_memory(
    checkpoint: str | Path | None = None,
    config: str | Path = "models/sartm_micro.yaml",
    model_size: tuple[int, int] | None = None,
    pairs: int = 2000,
    size: tuple[int, int] = (480, 640),
    warmup: int = 50,
    samples: int = 20,
    device: str = "cpu",
    segmenter=None,
    progress=None,
) -> dict:
    """``rgbt-seg bench memory``: RSS over ``pairs`` frames of the node's per-frame path."""
    import torch

    gc.collect()  # the baseline is live memory: nothing an earlier caller left for the collector or the heap
    release_free_heap()
    start = rss_mb()
    seg = segmenter if segmenter is not None else load_segmenter(checkpoint, config, model_size, device)
    frames = CameraFrames.synthetic(tuple(size))
    pipeline = make_pipeline(seg, frames)
    image_cls, kind = image_message_class()
    as_numpy = kind == "rosbags"
    pairer = ApproximateTimePairer(queue_size=5, slop=0.05, max_wait=0.1)
    stamp0 = 1_700_000_000_000_000_000
    gc.collect()
    release_free_heap()
    after_load = rss_mb()
    every = max(1, pairs // max(1, samples))
    trace: list[tuple[int, float]] = []
    after_warmup = None
    trimmed = False
    outputs = {"labels", "overlay"}
    t0 = time.perf_counter()
    n_out = 0
    for i in range(warmup + pairs):
        stamp = stamp0 + i * 33_333_333
        rgb_msg, th_msg = frames.messages(image_cls, stamp, as_numpy)
        rgb = rgb_from_msg(rgb_msg)
        thermal = thermal_from_msg(th_msg)
        formed = pairer.add_rgb(stamp, (rgb_msg.header, rgb), now_ns=time.monotonic_ns())
        formed += pairer.add_thermal(stamp, (th_msg.header, thermal), now_ns=time.monotonic_ns())
        for pair in formed:
            (header, rgb_arr), (_, th_arr) = pair.rgb, pair.thermal
            res = pipeline.process(rgb_arr, th_arr, outputs=outputs)
            enc = "mono8" if res.labels.dtype == np.uint8 else "mono16"
            for arr, e in ((res.labels, enc), (res.overlay, "rgb8")):
                msg = fill_image_msg(_new_message(image_cls, as_numpy), arr, e, as_numpy=as_numpy)
                msg.header = header
            n_out += 1
        if i == warmup - 1 or (warmup == 0 and i == 0):
            gc.collect()
            trimmed = release_free_heap()
            after_warmup = rss_mb()
            t0 = time.perf_counter()
        j = i - warmup + 1
        if j > 0 and (j % every == 0 or j == pairs):
            gc.collect()
            release_free_heap()
            trace.append((j, rss_mb()))
            if progress is not None:
                progress(j, trace[-1][1])
    wall = time.perf_counter() - t0
    end = trace[-1][1] if trace else rss_mb()
    quarter = max(1, len(trace) // 4)
    first_q = float(np.median([r for _, r in trace[:quarter]])) if trace else None
    last_q = float(np.median([r for _, r in trace[-quarter:]])) if trace else None
    half = [(n, r) for n, r in trace if n >= pairs // 2]
    slope = float(np.polyfit([n for n, _ in half], [r for _, r in half], 1)[0]) * 1000 if len(half) >= 2 else None
    return {
        "model": _model_name(seg),
        "source": str(checkpoint) if checkpoint is not None else f"random weights of {config}",
        "camera_size": [int(size[0]), int(size[1])],
        "message_class": kind,
        "pairs": pairs,
        "warmup_pairs": warmup,
        "outputs_built": n_out,
        "rss_mb_start": start,
        "rss_mb_after_model_load": after_load,
        "rss_mb_after_warmup": after_warmup,
        "rss_mb_end": end,
        "rss_growth_mb": end - after_warmup if after_warmup is not None else None,
        "rss_growth_mb_quartile_medians": last_q - first_q if trace else None,
        "heap_trimmed": trimmed,
        "rss_slope_mb_per_1000_pairs_second_half": slope,
        "rss_trace": [[n, r] for n, r in trace],
        "pairs_per_s": pairs / wall if wall > 0 else None,
        "threads": torch.get_num_threads(),
    }


def markdown_memory(r: dict) -> str:
    slope = r["rss_slope_mb_per_1000_pairs_second_half"]
    return "\n".join(
        [
            f"bench memory: {r['model']} ({r['source']}), {r['camera_size'][1]}x{r['camera_size'][0]} camera "
            f"images, {r['pairs']} pairs after {r['warmup_pairs']} warm-up ({r['message_class']} messages)",
            "",
            "| RSS start | after model load | after warm-up | end | growth | growth, last vs first quarter "
            "| slope, 2nd half | pairs/s |",
            "|---|---|---|---|---|---|---|---|",
            f"| {r['rss_mb_start']:.1f} MB | {r['rss_mb_after_model_load']:.1f} MB | {r['rss_mb_after_warmup']:.1f} MB "
            f"| {r['rss_mb_end']:.1f} MB | {r['rss_growth_mb']:+.2f} MB "
            f"| {r['rss_growth_mb_quartile_medians']:+.2f} MB | "
            f"{'n/a' if slope is None else f'{slope:+.2f} MB/1000'} | {r['pairs_per_s']:.1f} |",
            "",
            "RSS read after gc.collect()" + (" and malloc_trim(0)" if r["heap_trimmed"] else "") + ".",
        ]
    )

"""``rgbt-seg bench pipeline`` and ``rgbt-seg bench memory``: where a frame's time and memory go.

Both drive the objects the live node drives (:mod:`rgbt_seg_ros.pipeline.frame_flow`), in the node's
order, on ``sensor_msgs/Image`` messages (rclpy's own message class when rclpy is importable,
else the rosbags dataclass):

``pipeline``
    1. per-stage time of one RGB-thermal pair at each camera size (default 640x480 and 1280x720):

    ============== ======================================================================
    conversion     ``rgb_from_msg`` + ``thermal_from_msg`` (the subscription callbacks)
    pairing        ``FrameFlow.rgb`` + ``FrameFlow.thermal`` (CPU cost only; the wait for a
                   partner is not a cost of this process)
    thermal        normalisation bounds, warp straight into the model's grid, normalisation
                   (``FramePipeline.thermal_to_grid``)
    preprocess     ``Segmenter.prepare``: RGB resized (uint8) and normalised, thermal
                   normalised, padding, on the model's device
    model          ``Segmenter.infer``: the backend forward
    postprocess    ``Segmenter.infer``: arg-max and confidence at the model's grid, to the
                   host; then labels resized to the RGB size (nearest)
    render         the overlay (``~/overlay``, the default output): palette lookup at the
                   grid, nearest resize, one blend
    message_build  ``fill_image_msg`` of labels (mono8) and overlay (rgb8) + header
    ============== ======================================================================

    Each stage is timed on its own with ``time.perf_counter`` and reported as median and p95
    over ``repeats`` frames after warm-up. ``overhead`` is everything but the model forward.

    The registration-health estimate (:class:`~rgbt_seg_ros.pipeline.registration_health.OffsetEstimator`
    on the same pair and calibration) is timed the same way and reported apart, with its cost
    amortised over the node's default ``registration.check_every`` pairs: live it runs on its own
    thread every N-th pair, outside the frame path, so it is in neither the total nor the overhead.

    2. the sustained frame rate of the :class:`~rgbt_seg_ros.pipeline.frame_flow.StagedWorker` (three
    threads: prepare | forward | finish + message build) fed like the node is fed: camera
    messages converted and paired at ``feed_hz`` for ``seconds``, the newest frame kept in each
    mailbox; frames delivered per second, latency from pair to built messages, frames
    superseded. ``model_ms`` replaces the forward by a timed stand-in (it sleeps that long with
    the host idle, as while a GPU computes, and returns logits of a fixed 1x1 projection), so
    the host path's capacity can be measured on a machine without a GPU; the output says so.

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
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bench.models import StandInModel, load_segmenter
from ..memory import release_free_heap, rss_mb
from ..pipeline.frame_flow import (
    FrameFlow,
    FramePipeline,
    Job,
    LatestSlot,
    StagedWorker,
    labels_encoding,
    latency_summary,
    normalizer_from_params,
)
from ..pipeline.imaging import fill_image_msg, rgb_from_msg, thermal_from_msg
from ..pipeline.registration import ThermalRegistrar

STAGES = (
    "conversion",
    "pairing",
    "thermal",
    "preprocess",
    "model",
    "postprocess",
    "render",
    "message_build",
)
WORKER_STAGES = ("thermal", "preprocess", "postprocess", "render", "message_build")
DEFAULT_SIZES = ((480, 640), (720, 1280))


# --------------------------------------------------------------------------- model and inputs


def image_message_class():
    """rclpy's ``sensor_msgs.msg.Image`` when importable (what the node receives), else rosbags' dataclass."""
    try:
        from sensor_msgs.msg import Image

        return Image, "rclpy"
    except ImportError:
        from ..data.bags import IMAGE_TYPE, TYPESTORE

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
        from ..data.synthetic import SceneGenerator

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
    from ..data.bags import make_header

    return image_cls(
        header=make_header(0, ""), height=0, width=0, encoding="", is_bigendian=0, step=0, data=np.zeros(0, np.uint8)
    )


def _set_header(msg, stamp_ns: int, frame_id: str) -> None:
    sec, nsec = divmod(int(stamp_ns), 1_000_000_000)
    if hasattr(msg.header.stamp, "sec") and not _is_frozen(msg.header):
        msg.header.stamp.sec, msg.header.stamp.nanosec = sec, nsec
        msg.header.frame_id = frame_id
    else:  # rosbags dataclasses are plain dataclasses too, but build a new header to be safe
        from ..data.bags import make_header

        msg.header = make_header(stamp_ns, frame_id)


def _is_frozen(obj) -> bool:
    params = getattr(type(obj), "__dataclass_params__", None)
    return bool(params is not None and params.frozen)


def pipeline_params(frames: CameraFrames, calibration_file: Path) -> dict:
    """The node's parameters for the synthetic rig (homography registration, FLIR-like linear thermal)."""
    from ..pipeline.params import defaults

    p = defaults()
    p.update(
        {
            "registration.mode": "homography",
            "registration.file": str(calibration_file),
            "thermal.mode": "linear",
            "thermal.scale": 0.01,
            "thermal.min": 250.0,
            "thermal.max": 330.0,
            "on_thermal_loss": "wait",  # every frame is a pair, however slow the machine is today
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
    s = latency_summary(values)
    return {"median": s["p50"], "p95": s["p95"], "n": s["n"]}


# --------------------------------------------------------------------------- bench pipeline


def camera_arrival(frames: CameraFrames, flow: FrameFlow, image_cls, as_numpy, stamp_ns: int, max_pixels=None):
    """One RGB and one thermal message with ``stamp_ns`` through the node's callbacks: new messages,
    conversion, ``FrameFlow``. Returns the frames formed."""
    rgb_msg, th_msg = frames.messages(image_cls, stamp_ns, as_numpy)
    rgb = rgb_from_msg(rgb_msg, max_pixels=max_pixels)
    thermal = thermal_from_msg(th_msg, max_pixels=max_pixels)
    formed = flow.rgb(stamp_ns, (rgb_msg.header, rgb), time.monotonic_ns())
    return formed + flow.thermal(stamp_ns, (th_msg.header, thermal), time.monotonic_ns())


def time_frame(
    pipeline: FramePipeline,
    flow: FrameFlow,
    frames: CameraFrames,
    image_cls,
    as_numpy,
    stamp_ns: int,
    max_pixels: int,
) -> dict[str, float]:
    """One frame through every stage, each timed alone (ms). Mirrors the node's callbacks, worker and publish."""
    rgb_msg, th_msg = frames.messages(image_cls, stamp_ns, as_numpy)
    c0 = time.perf_counter()
    rgb = rgb_from_msg(rgb_msg, max_pixels=max_pixels)
    thermal_raw = thermal_from_msg(th_msg, max_pixels=max_pixels)
    c1 = time.perf_counter()
    pairs = flow.rgb(stamp_ns, (rgb_msg.header, rgb), time.monotonic_ns())
    pairs += flow.thermal(stamp_ns, (th_msg.header, thermal_raw), time.monotonic_ns())
    c2 = time.perf_counter()
    if len(pairs) != 1:
        raise RuntimeError(f"benchmark pairing formed {len(pairs)} pairs for one frame, expected 1")
    (header, rgb), (_, thermal_raw) = pairs[0].rgb, pairs[0].thermal
    prepared = pipeline.prepare(rgb, thermal_raw)
    grid = pipeline.infer(prepared)
    result = pipeline.finish(prepared, grid, {"labels", "overlay"})
    c3 = time.perf_counter()
    for arr, enc in ((result.labels, labels_encoding(result.labels)), (result.overlay, "rgb8")):
        out = fill_image_msg(_new_message(image_cls, as_numpy), arr, enc, as_numpy=as_numpy)
        out.header = header
    c4 = time.perf_counter()
    t = {"conversion": (c1 - c0) * 1e3, "pairing": (c2 - c1) * 1e3}
    t.update({k: result.timings_ms[k] for k in ("thermal", "preprocess", "model", "postprocess", "render")})
    t["message_build"] = (c4 - c3) * 1e3
    return t


def bench_registration_health(
    frames: CameraFrames, registrar: ThermalRegistrar, repeats: int = 10, warmup: int = 2, max_pixels=None
) -> dict:
    """``OffsetEstimator().estimate`` on the benchmark's pair (ms, median / p95 of ``repeats`` after ``warmup``)
    and that amortised over the node's default ``registration.check_every`` pairs (median / N)."""
    from ..pipeline.params import SPEC_BY_NAME
    from ..pipeline.registration_health import OffsetEstimator

    image_cls, kind = image_message_class()
    rgb_msg, th_msg = frames.messages(image_cls, 1_700_000_000_000_000_000, kind == "rosbags")
    rgb = rgb_from_msg(rgb_msg, max_pixels=max_pixels)
    thermal_raw = thermal_from_msg(th_msg, max_pixels=max_pixels)
    estimator = OffsetEstimator()
    times = []
    for i in range(warmup + max(1, repeats)):
        t0 = time.perf_counter()
        estimator.estimate(rgb, thermal_raw, registrar)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    every = int(SPEC_BY_NAME["registration.check_every"].default)
    stats = _stats(times)
    return {"estimate_ms": stats, "check_every": every, "amortised_ms_per_frame": stats["median"] / every}


def bench_pipeline_size(segmenter, size: tuple[int, int], repeats: int = 10, warmup: int = 2, seed: int = 0) -> dict:
    """Per-stage medians / p95 of ``repeats`` frames at camera size ``size`` (H, W)."""
    from ..pipeline.params import defaults

    frames = CameraFrames.synthetic(size, seed=seed)
    pipeline = make_pipeline(segmenter, frames)
    image_cls, kind = image_message_class()
    as_numpy = kind == "rosbags"
    flow = FrameFlow(pipeline_params(frames, Path("synthetic-rig.yaml")))
    max_pixels = int(float(defaults()["max_megapixels"]) * 1e6)
    stamp = 1_700_000_000_000_000_000
    samples: dict[str, list[float]] = {}
    for i in range(warmup + max(1, repeats)):
        t = time_frame(pipeline, flow, frames, image_cls, as_numpy, stamp + i * 33_333_333, max_pixels)
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
        # off the frame path (its own thread every check_every pairs live): in neither total nor overhead
        "registration_health": bench_registration_health(frames, pipeline.registrar, repeats, warmup, max_pixels),
    }


def bench_sustained(segmenter, size: tuple[int, int], seconds: float = 4.0, feed_hz: float = 200.0) -> dict:
    """Frames per second the staged worker sustains at camera size ``size`` when fed at ``feed_hz``.

    The feeder (this thread) builds, converts and pairs camera messages as the node's callbacks
    do; the worker's three threads prepare, infer, finish and build the output messages. The
    first 0.5 s are not counted (threads starting, caches filling)."""
    from ..pipeline.params import defaults

    frames = CameraFrames.synthetic(size)
    pipeline = make_pipeline(segmenter, frames)
    image_cls, kind = image_message_class()
    as_numpy = kind == "rosbags"
    flow = FrameFlow(pipeline_params(frames, Path("synthetic-rig.yaml")))
    max_pixels = int(float(defaults()["max_megapixels"]) * 1e6)
    lock = threading.Lock()
    done: list[tuple[float, float]] = []  # (delivered at, latency ms)
    drops: dict[str, int] = {}

    def deliver(job: Job, result) -> None:
        for arr, enc in ((result.labels, labels_encoding(result.labels)), (result.overlay, "rgb8")):
            fill_image_msg(_new_message(image_cls, as_numpy), arr, enc, as_numpy=as_numpy).header = job.pair.rgb[0]
        now = time.monotonic()
        with lock:
            done.append((now, (now - job.formed_at) * 1e3))

    def drop(reason: str) -> None:
        with lock:
            drops[reason] = drops.get(reason, 0) + 1

    slot = LatestSlot()
    worker = StagedWorker(
        slot, lambda: pipeline, deliver, outputs=lambda: {"labels", "overlay"}, on_drop=drop, name="bench"
    ).start()
    period = 1.0 / feed_hz
    stamp0 = 1_700_000_000_000_000_000
    start = time.monotonic()
    measure_from = start + 0.5
    end = measure_from + seconds
    fed = 0
    try:
        while time.monotonic() < end:
            stamp = stamp0 + fed * int(period * 1e9)
            for pair in camera_arrival(frames, flow, image_cls, as_numpy, stamp, max_pixels):
                if worker.submit(Job(pair, time.monotonic())):
                    drop("superseded")
            fed += 1
            delay = start + fed * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    finally:
        worker.stop()
    counted = [lat for t, lat in done if measure_from <= t <= end]
    lat = latency_summary(counted)
    return {
        "camera_size": [int(size[0]), int(size[1])],
        "feed_hz": feed_hz,
        "fed_pairs": fed,
        "seconds": seconds,
        "delivered": len(counted),
        "fps": len(counted) / seconds,
        "latency_ms": lat,
        "drops": drops,
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
    model_ms: float | None = None,
    seconds: float = 4.0,
    feed_hz: float = 200.0,
) -> dict:
    """``rgbt-seg bench pipeline``: per-stage times and the staged worker's sustained rate at each size."""
    import torch

    seg = segmenter
    if seg is None:
        seg = load_segmenter(checkpoint, config, model_size, device, precision, model_ms=model_ms)
    results = []
    for size in sizes:
        r = bench_pipeline_size(seg, tuple(size), repeats=repeats, warmup=warmup)
        if seconds > 0:
            r["sustained"] = bench_sustained(seg, tuple(size), seconds=seconds, feed_hz=feed_hz)
        results.append(r)
    stand_in = isinstance(seg.model, StandInModel)
    return {
        "model": _model_name(seg),
        "source": (
            f"STAND-IN forward sleeping {seg.model.model_ms:g} ms (no model computed; not a GPU measurement)"
            if stand_in
            else str(checkpoint)
            if checkpoint is not None
            else f"random weights of {config}"
        ),
        "model_stand_in_ms": seg.model.model_ms if stand_in else None,
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
    if all("sustained" in s for s in sizes):
        sus = [s["sustained"] for s in sizes]
        lines.append(
            f"| **sustained, staged worker** (fed at {sus[0]['feed_hz']:g} Hz for {sus[0]['seconds']:g} s) | "
            + " | ".join(
                f"**{x['fps']:.1f} fps**, latency p50 {_ms(x['latency_ms']['p50'])} / p95 {_ms(x['latency_ms']['p95'])}"
                for x in sus
            )
            + " |"
        )
    if all("registration_health" in s for s in sizes):
        health = [s["registration_health"] for s in sizes]
        every = health[0]["check_every"]
        lines.append(
            f"| registration-health estimate (own thread, once per {every} pairs; NOT in total) | "
            + " | ".join(
                f"{h['estimate_ms']['median']:.2f} ({h['estimate_ms']['p95']:.2f}) = "
                f"{h['amortised_ms_per_frame']:.2f} per frame amortised"
                for h in health
            )
            + " |"
        )
        lines += [
            "",
            f"The registration-health estimate runs live on its own thread every registration.check_every = {every} "
            "pairs, outside the frame path: it is not part of the per-frame budget (total, overhead) above; "
            f"amortised = estimate / {every}.",
        ]
    if result.get("model_stand_in_ms") is not None:
        lines += [
            "",
            f"NOTE: the model is a STAND-IN that sleeps {result['model_stand_in_ms']:g} ms per forward "
            "(host idle, as while a GPU computes); no model was run. This measures the host path only.",
        ]
    return "\n".join(lines)


def _ms(v) -> str:
    return "n/a" if v is None else f"{v:.1f} ms"


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
    class_set: str | None = None,
) -> dict:
    """``rgbt-seg bench memory``: RSS over ``pairs`` frames of the node's per-frame path."""
    import torch

    gc.collect()  # the baseline is live memory: nothing an earlier caller left for the collector or the heap
    release_free_heap()
    start = rss_mb()
    seg = segmenter
    if seg is None:
        seg = load_segmenter(checkpoint, config, model_size, device, class_set=class_set)
    frames = CameraFrames.synthetic(tuple(size))
    pipeline = make_pipeline(seg, frames)
    image_cls, kind = image_message_class()
    as_numpy = kind == "rosbags"
    flow = FrameFlow(pipeline_params(frames, Path("synthetic-rig.yaml")))
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
        for pair in camera_arrival(frames, flow, image_cls, as_numpy, stamp):
            (header, rgb_arr), (_, th_arr) = pair.rgb, pair.thermal
            res = pipeline.process(rgb_arr, th_arr, outputs=outputs)
            for arr, e in ((res.labels, labels_encoding(res.labels)), (res.overlay, "rgb8")):
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

"""Bag in -> the node's pipeline -> bag out + metrics + pictures.

``replay_bag`` reads a ROS 2 (sqlite3, mcap) or ROS 1 bag in bag (receive) order and runs
exactly the objects the live node runs (:mod:`rgbt_seg_ros.pipeline.frame_flow`): ``FrameFlow`` (the
node's pairer and thermal watch; the bag's receive time is their clock, as in ``rgbt-seg
pairs``) and the ``StagedWorker`` with the ``FramePipeline`` stages, configured from the node's
parameter file. Unlike the live node, replay processes *every* pair (nothing is superseded:
the worker's mailboxes make the reader wait): it measures what the model does on each pair
the robot would have formed, and the forward of one pair overlaps reading, preparing and
writing the others.

Outputs in ``out_dir``:
  segmented/     ROS 2 bag: the input topics (unless ``pass_through=False``) plus
                 /rgbt_seg/labels and /rgbt_seg/overlay, each output stamped (header and
                 receive time) like its RGB image
  metrics.json   pairs, drops by reason, per-stage latency p50/p95, throughput against the
                 model-bound maximum, model and device; with ground truth (a labels topic
                 or a folder of <rgb_stamp_ns>.png) mIoU, per-class IoU, the confusion matrix
  report.md      the figures plus latency_hist.png, per_class_iou.png, contact_sheet.png

A truncated or corrupt bag stops with a message naming the topic and position; what was
processed so far is flushed into a valid output bag and metrics file (``error`` is set).
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ..data.bags import (
    TYPESTORE,
    BagError,
    BagWriter,
    bag_topics,
    damage_of,
    make_image,
    message_counts,
    read_messages,
    stamp_to_ns,
)
from ..pipeline.frame_flow import (
    FrameFlow,
    FramePipeline,
    Job,
    LatestSlot,
    StagedWorker,
    labels_encoding,
    latency_summary,
)
from ..pipeline.imaging import ImageEncodingError, image_to_numpy, rgb_from_msg, thermal_from_msg
from ..pipeline.params import INPUT_NAMES
from ..pipeline.render import contact_sheet

DEFAULT_RGB_TOPIC = "/" + INPUT_NAMES["rgb"]
DEFAULT_THERMAL_TOPIC = "/" + INPUT_NAMES["thermal"]
LABELS_TOPIC = "/rgbt_seg/labels"
OVERLAY_TOPIC = "/rgbt_seg/overlay"
STAGES = ("thermal", "preprocess", "model", "postprocess", "render")


@dataclass
class ReplayResult:
    metrics: dict
    out_dir: Path
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (rgb stamp, thermal stamp or -1)
    error: str | None = None


class GroundTruth:
    """Ground-truth label images matched to pairs by RGB stamp (bounded memory)."""

    def __init__(self, gt_dir: Path | None = None) -> None:
        self.gt_dir = gt_dir
        self.pending_gt: dict[int, np.ndarray] = {}
        self.pending_pred: dict[int, np.ndarray] = {}

    def add_gt(self, stamp: int, labels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        if stamp in self.pending_pred:
            return [(self.pending_pred.pop(stamp), labels)]
        self.pending_gt[stamp] = labels
        self._bound(self.pending_gt)
        return []

    def add_pred(self, stamp: int, pred: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        if self.gt_dir is not None:
            path = self.gt_dir / f"{stamp}.png"
            if not path.exists():
                return []
            gt = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if gt is None or gt.ndim != 2:
                raise ValueError(f"ground-truth file {path} is not a single-channel label image")
            return [(pred, gt)]
        if stamp in self.pending_gt:
            return [(pred, self.pending_gt.pop(stamp))]
        self.pending_pred[stamp] = pred
        self._bound(self.pending_pred)
        return []

    @staticmethod
    def _bound(d: dict, keep: int = 64) -> None:
        while len(d) > keep:
            d.pop(min(d))


def compressed_topic(topic: str, transport: str) -> str:
    """The topic a camera's messages are on: ``<topic>/compressed`` for the compressed transport."""
    if transport == "compressed" and not topic.endswith("/compressed"):
        return topic.rstrip("/") + "/compressed"
    return topic


@contextmanager
def _no_empty_output_on_failure(out_dir: Path):
    """A run that fails before writing anything leaves no empty output folder it created behind."""
    created = not out_dir.exists()
    try:
        yield
    except BaseException:
        if created and out_dir.is_dir() and not any(p.is_file() for p in out_dir.rglob("*")):
            shutil.rmtree(out_dir)
        raise


def replay_bag(
    bag: str | Path,
    params: dict,
    out_dir: str | Path,
    pipeline: FramePipeline | None = None,
    gt_topic: str | None = "/rgbt_seg/auto",
    gt_dir: str | Path | None = None,
    max_pairs: int | None = None,
    storage: str = "mcap",
    progress: bool = True,
    sheet_frames: int = 12,
    rgb_topic: str = DEFAULT_RGB_TOPIC,
    thermal_topic: str = DEFAULT_THERMAL_TOPIC,
    warnings: list[str] | None = None,
    pass_through: bool = True,
    score_after_s: float = 0.0,
) -> ReplayResult:
    """Replay ``bag`` through the node's pipeline configured by ``params`` (see module docstring).

    ``rgb_topic`` / ``thermal_topic`` are the bag topics the node's ``rgb/image`` and
    ``thermal/image`` inputs would be remapped to (default: the names a node in the root
    namespace subscribes to). With ``input.<camera>.transport: compressed`` the topic read is
    ``<topic>/compressed`` (image_transport's convention) holding ``sensor_msgs/CompressedImage``.
    ``gt_topic="/rgbt_seg/auto"`` uses ``/rgbt/labels_gt`` when the bag has it; ``None`` disables it.
    ``warnings`` (e.g. refused parameter values) are recorded in metrics.json and report.md.
    ``pass_through=False`` writes only the outputs (about 4 ms less per 640x480 pair here: copying
    the inputs is disk-bound), with the ground-truth topic still read for the metrics.
    ``score_after_s``: frames in the bag's first seconds are segmented and written but not scored
    (an auto-correction of the registration settles meanwhile). Registration health estimates run
    inside the frame path here (the pipeline's monitor is made synchronous), so a replay repeats.
    """
    out_dir = Path(out_dir)
    with _no_empty_output_on_failure(out_dir):
        from .metrics import ConfusionMatrix, json_safe

        bag = Path(bag)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        rgb_topic = compressed_topic(rgb_topic, params["input.rgb.transport"])
        thermal_topic = compressed_topic(thermal_topic, params["input.thermal.transport"])
        topics = bag_topics(bag)
        bag_warning = damage_of(bag)  # read by the recovery path: cut off, or no metadata.yaml
        missing = [t for t in (rgb_topic, thermal_topic) if t not in topics]
        if missing:
            listing = ", ".join(f"{t} ({m})" for t, m in sorted(topics.items())) or "none"
            raise BagError(f"bag {bag} has no topic {', '.join(missing)}; topics in the bag: {listing}")
        if gt_topic == "/rgbt_seg/auto":
            gt_topic = "/rgbt/labels_gt" if "/rgbt/labels_gt" in topics else None
        if gt_topic is not None and gt_topic not in topics:
            raise BagError(
                f"bag {bag} has no ground-truth topic {gt_topic}; topics in the bag: {', '.join(sorted(topics))}"
            )
        load_warnings: list[str] = []  # a refused model.class_set: reported, the primary set used (as the node)
        if pipeline is None:
            pipeline = FramePipeline.from_params(params, on_problem=load_warnings.append, synchronous_health=True)
        pipeline.reset_state()  # a pipeline given again starts as new: the same bag replays the same
        info = pipeline.segmenter.dataset_info
        flow = FrameFlow(params)
        truth = GroundTruth(Path(gt_dir) if gt_dir else None)
        confusion = ConfusionMatrix(info.num_classes, info.ignore_index) if (gt_topic or gt_dir) else None
        matched_gt = 0
        timings: dict[str, list[float]] = {k: [] for k in (*STAGES, "total")}
        rejected: dict[str, int] = {}
        result = ReplayResult(metrics={}, out_dir=out_dir)
        sheet: list[tuple[int, np.ndarray]] = []
        wanted = {"labels", "overlay"}
        max_pixels = int(float(params["max_megapixels"]) * 1e6)
        wall0 = time.perf_counter()
        segmented = out_dir / "segmented"
        if segmented.exists():
            raise BagError(f"output bag {segmented} already exists; choose another --out or remove it")
        # every topic is passed through; outputs only: the cameras and the ground truth
        read_topics = list(topics) if pass_through else [t for t in (rgb_topic, thermal_topic, gt_topic) if t]
        total = sum(c for t, c in message_counts(bag).items() if t in read_topics) or None
        n_rgb_only = n_thermal_only = 0
        first_log_ns: int | None = None
        last_log_ns = 0
        rgb_frame_id = ""  # thermal-only frames are published in the RGB camera's frame
        not_copied: dict[str, int] = {}
        failures: list[Exception] = []
        write_lock = threading.Lock()  # the reader passes messages through, the worker writes outputs
        truth_lock = threading.Lock()
        with BagWriter(segmented, storage=storage) as writer:
            bar = tqdm(total=total, desc="replay", unit="msg", disable=not progress, leave=False)

            def deliver(job: Job, out) -> None:  # the worker's last stage, one frame at a time, in order
                nonlocal matched_gt, n_rgb_only, n_thermal_only
                if job.pair.rgb is not None:
                    header = job.pair.rgb[0].header
                    stamp, frame = stamp_to_ns(header.stamp), header.frame_id
                else:  # thermal only: the thermal stamp in the RGB camera's frame
                    header = job.pair.thermal[0].header
                    stamp, frame = stamp_to_ns(header.stamp), rgb_frame_id or header.frame_id
                timings["total"].append(sum(out.timings_ms.values()))
                for key in STAGES:
                    if key in out.timings_ms:
                        timings[key].append(out.timings_ms[key])
                n_rgb_only += int(out.rgb_only)
                n_thermal_only += int(out.thermal_only)
                labels_msg = make_image(out.labels, labels_encoding(out.labels), stamp, frame)
                overlay_msg = make_image(out.overlay, "rgb8", stamp, frame)
                with write_lock:
                    writer.write(LABELS_TOPIC, labels_msg, job.meta)
                    writer.write(OVERLAY_TOPIC, overlay_msg, job.meta)
                result.pairs.append((stamp, job.pair.thermal_stamp_ns))
                sheet.append((stamp, out.overlay))
                if len(sheet) > 4 * sheet_frames:  # keep memory bounded: thin out evenly
                    del sheet[1::2]
                scored = first_log_ns is None or job.meta - first_log_ns >= score_after_s * 1e9
                if confusion is not None and scored:
                    with truth_lock:
                        for pred, gt in truth.add_pred(stamp, out.labels):
                            confusion.update(pred, gt)
                            matched_gt += 1

            source = LatestSlot(keep_all=True)
            was_synchronous = pipeline.health.synchronous if pipeline.health is not None else None
            if pipeline.health is not None:  # estimates inline while this replay runs (restored below)
                pipeline.health.synchronous = True
            worker = StagedWorker(
                source,
                pipeline=lambda: pipeline,
                deliver=deliver,
                outputs=lambda: wanted,
                on_error=lambda stage, exc: failures.append(exc),
                name="replay",
            ).start()
            submitted = 0

            def submit(frames, log_ns: int) -> None:
                nonlocal submitted
                for frame in frames:
                    if max_pairs is not None and submitted >= max_pairs:
                        return
                    worker.submit(Job(frame, time.monotonic(), meta=log_ns, clock_s=log_ns / 1e9))
                    submitted += 1

            try:
                for m in read_messages(bag, read_topics):
                    bar.update(1)
                    last_log_ns = m.log_time_ns
                    if first_log_ns is None:
                        first_log_ns = m.log_time_ns
                    if pass_through:
                        with write_lock:
                            copied = _pass_through(writer, m)
                        if not copied:
                            not_copied[m.topic] = not_copied.get(m.topic, 0) + 1
                    if m.topic == gt_topic and confusion is not None:
                        labels_gt = image_to_numpy(m.msg).copy()
                        with truth_lock:  # the worker matches predictions on its own thread
                            for pred, gt in truth.add_gt(stamp_to_ns(m.msg.header.stamp), labels_gt):
                                confusion.update(pred, gt)
                                matched_gt += 1
                        continue
                    if m.topic not in (rgb_topic, thermal_topic):
                        continue
                    is_rgb = m.topic == rgb_topic
                    try:
                        arr = rgb_from_msg(m.msg, max_pixels) if is_rgb else thermal_from_msg(m.msg, max_pixels)
                    except ImageEncodingError as exc:
                        reason = f"{'rgb' if is_rgb else 'thermal'}_{exc.reason}"
                        rejected[reason] = rejected.get(reason, 0) + 1
                        continue
                    stamp = stamp_to_ns(m.msg.header.stamp)
                    if is_rgb:
                        rgb_frame_id = m.msg.header.frame_id
                    add = flow.rgb if is_rgb else flow.thermal
                    submit(add(stamp, (m.msg, arr), m.log_time_ns), m.log_time_ns)
                    if failures or (max_pairs is not None and submitted >= max_pairs):
                        break
                else:
                    submit(flow.flush(), last_log_ns)
            except BagError as exc:
                result.error = str(exc)
            finally:
                bar.close()
                worker.wait_idle(submitted)
                worker.stop()
                if was_synchronous is not None:
                    pipeline.health.synchronous = was_synchronous
        if failures:
            raise failures[0]
        wall_s = time.perf_counter() - wall0
        stats = flow.stats
        n = len(result.pairs)
        model_p50 = latency_summary(timings["model"])["p50"]
        metrics = {
            "bag": str(bag),
            "date": time.strftime("%Y-%m-%d"),
            "topics": {
                "rgb": rgb_topic,
                "thermal": thermal_topic,
                "ground_truth": gt_topic or (str(gt_dir) if gt_dir else None),
            },
            "model": f"{pipeline.segmenter.backend} {info.name} ({info.num_classes} classes) "
            f"{pipeline.segmenter.input_size[0]}x{pipeline.segmenter.input_size[1]}",
            "class_set": info.name,
            "device": str(pipeline.segmenter.device),
            "precision": pipeline.segmenter.precision,
            "registration": pipeline.registrar.mode if pipeline.registrar is not None else "none",
            "frames_processed": n,
            "pairs": stats.paired,
            "rgb_only_frames": n_rgb_only,
            "thermal_only_frames": n_thermal_only,
            "registration_health": _registration_report(pipeline, last_log_ns / 1e9),
            "scored_after_s": score_after_s,
            "received": {"rgb": stats.received_rgb, "thermal": stats.received_thermal},
            "drops": {
                "unmatched_rgb": stats.dropped_unmatched_rgb,
                "unmatched_thermal": stats.dropped_unmatched_thermal,
                "overflow_rgb": stats.dropped_overflow_rgb,
                "overflow_thermal": stats.dropped_overflow_thermal,
                "rejected_stamp": stats.rejected_rgb + stats.rejected_thermal,
                **rejected,
            },
            "pair_dt_abs_ms": {
                "mean": stats.dt_abs_mean_ms if stats.paired else None,
                "p95": stats.dt_abs_percentile_ms(95) if stats.paired else None,
            },
            "latency_ms": {k: latency_summary(v) for k, v in timings.items()},
            "wall_s": wall_s,
            "throughput_pairs_per_s": n / wall_s if wall_s > 0 else None,
            "model_bound_pairs_per_s": 1000.0 / model_p50 if model_p50 else None,
            "inputs_copied": pass_through,
            "not_copied": not_copied,
            "warnings": [*(warnings or []), *load_warnings, *(w for w in (pipeline.size_mismatch, bag_warning) if w)],
            "error": result.error,
        }
        if metrics["throughput_pairs_per_s"] and metrics["model_bound_pairs_per_s"]:
            metrics["throughput_ratio"] = metrics["throughput_pairs_per_s"] / metrics["model_bound_pairs_per_s"]
        if confusion is not None:
            metrics["ground_truth_frames"] = matched_gt
            metrics["segmentation"] = confusion.as_json(info.class_names) if matched_gt else None
        result.metrics = json_safe(metrics)
        (out_dir / "metrics.json").write_text(json.dumps(result.metrics, indent=2) + "\n")
        write_report(out_dir, result.metrics, timings["total"], [img for _, img in sheet], info, sheet_frames)
        return result


def _registration_report(pipeline: FramePipeline, t: float) -> dict | None:
    """The registration health at the end of a replay: its diagnostics entry and every estimate."""
    health = pipeline.health
    if health is None:
        return None
    level, message, values = health.status(t)
    return {"level": level, "message": message, "values": values, "estimates": health.history()}


def _pass_through(writer: BagWriter, m) -> bool:
    """Copy an input message into the output bag: ROS 2 CDR bytes as stored, ROS 1 messages converted."""
    msg = m.msg
    try:
        if m.raw is not None:
            writer.write_raw(m.topic, m.msgtype, m.raw, m.log_time_ns)
            return True
        if m.msgtype.endswith("/Image"):  # ROS 1 image: rebuild it as a ROS 2 message
            arr = image_to_numpy(msg)
            writer.write(
                m.topic,
                make_image(np.ascontiguousarray(arr), msg.encoding, stamp_to_ns(msg.header.stamp), msg.header.frame_id),
                m.log_time_ns,
            )
        else:
            writer.write(m.topic, msg, m.log_time_ns)
    except Exception:  # a type the ROS 2 typestore cannot serialise, or an undecodable image: count it
        return False
    return True


def write_report(
    out_dir: Path, metrics: dict, total_ms: list[float], overlays: list[np.ndarray], info, sheet_frames: int = 12
) -> Path:
    """report.md with a latency histogram, a per-class IoU chart and a contact sheet of overlays."""
    from .plots import latency_histogram, plot_per_class_iou

    lines = [f"# Replay of `{metrics['bag']}`", ""]
    if metrics.get("error"):
        lines += [f"**Stopped early:** {metrics['error']}", ""]
    for warning in metrics.get("warnings") or []:
        lines += [f"**Warning:** {warning}", ""]
    lat = metrics["latency_ms"]
    lines += [
        f"Model: {metrics['model']} on {metrics['device']} ({metrics['precision']}); registration: "
        f"{metrics['registration']}.",
        "",
        "| frames | pairs | RGB-only | unmatched rgb / thermal | pair \\|dt\\| p95 | throughput | model-bound max |",
        "|---|---|---|---|---|---|---|",
        f"| {metrics['frames_processed']} | {metrics['pairs']} | {metrics['rgb_only_frames']} | "
        f"{metrics['drops']['unmatched_rgb']} / {metrics['drops']['unmatched_thermal']} | "
        f"{_fmt(metrics['pair_dt_abs_ms']['p95'])} ms | {_fmt(metrics['throughput_pairs_per_s'])} pairs/s | "
        f"{_fmt(metrics['model_bound_pairs_per_s'])} pairs/s |",
        "",
        "| stage | p50 ms | p95 ms |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {_fmt(v['p50'])} | {_fmt(v['p95'])} |" for k, v in lat.items()]
    lines.append("")
    if total_ms:
        latency_histogram(total_ms, out_dir / "latency_hist.png", title="Pipeline time per frame (replay)")
        lines += ["![latency](latency_hist.png)", ""]
    seg = metrics.get("segmentation")
    if seg:
        lines += [
            f"**mIoU {100 * seg['miou']:.1f}** over {metrics['ground_truth_frames']} frames with ground truth "
            f"(mAcc {100 * seg['macc']:.1f}, pixel accuracy {100 * seg['pixel_acc']:.1f}).",
            "",
            "| class | IoU | acc |",
            "|---|---|---|",
        ]
        for name, c in seg["per_class"].items():
            lines.append(f"| {name} | {_fmt(c['iou'], 100)} | {_fmt(c['acc'], 100)} |")
        iou = np.array([np.nan if c["iou"] is None else c["iou"] for c in seg["per_class"].values()])
        plot_per_class_iou(iou, info.class_names, info.palette, out_dir / "per_class_iou.png")
        lines += ["", "![per-class IoU](per_class_iou.png)", ""]
    if overlays:
        idx = np.linspace(0, len(overlays) - 1, min(sheet_frames, len(overlays))).round().astype(int)
        sheet = contact_sheet([overlays[i] for i in idx], cols=4)
        cv2.imwrite(str(out_dir / "contact_sheet.png"), sheet[:, :, ::-1])
        lines += ["![overlays](contact_sheet.png)", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _fmt(v, scale: float = 1.0) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * scale:.1f}"


__all__ = ["replay_bag", "write_report", "ReplayResult", "GroundTruth", "TYPESTORE"]

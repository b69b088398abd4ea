"""``rgbt-seg demo``: the live node end to end on the built-in sample bag.

1. makes the sample bag (``rgbt-seg make-sample-bag``) if it is missing;
2. starts the real ``segment_node`` process with the demo checkpoint and the sample rig's
   registration;
3. plays the bag's camera topics over DDS with their original timing (the project's
   :class:`~rgbt_seg_ros.ros.player.BagPlayer`; on a robot: ``ros2 bag play`` + ``ros2 launch``);
4. records the node's outputs and writes ``overlay.gif``, ``contact_sheet.png`` (one row per
   condition first, so a night frame is on it) and ``metrics.json`` (live latency p50/p95, drops,
   mIoU against the bag's ground truth, per condition, and night person and car IoU: where thermal
   is what finds them).

Latency here is label arrival minus the moment the player published that RGB image (the bag's
header stamps are from the recording, not from now).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from ..data.bags import read_messages, stamp_to_ns
from ..data.sample_bag import (
    CONDITIONS_FILE,
    GT_TOPIC,
    RGB_INFO_TOPIC,
    RGB_TOPIC,
    THERMAL_INFO_TOPIC,
    THERMAL_TOPIC,
    write_sample_bag,
)
from ..pipeline.frame_flow import latency_summary
from ..pipeline.imaging import image_to_numpy
from ..pipeline.params import BAG_PARAMS, load_param_file, write_param_file
from ..pipeline.render import colorize, contact_sheet, thermal_to_rgb
from ..resources import share_path
from .node_session import NodeSession, NodeSessionError


class DemoError(RuntimeError):
    """The demo could not run; the text says what to do."""


def run_demo(
    out_dir: str | Path = "demo_out",
    checkpoint: str | Path | None = None,
    frames: int = 60,
    device: str = "cpu",
    domain_id: int | None = None,
    startup_timeout: float = 180.0,
    log=print,
) -> dict:
    from sensor_msgs.msg import Image

    from ..evaluation.metrics import ConfusionMatrix, json_safe
    from ..models.checkpoint import read_checkpoint_config
    from ..models.classes import DatasetInfo
    from .player import BagPlayer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(checkpoint) if checkpoint else share_path("models", "demo")
    if not (checkpoint / "model.safetensors").exists():
        raise DemoError(
            f"demo checkpoint {checkpoint} is missing model.safetensors; train it as models/demo/TRAINING.md "
            "says, or pass --checkpoint DIR"
        )
    info = DatasetInfo.from_dict(read_checkpoint_config(checkpoint)["classes"], source=str(checkpoint))
    sample = out / "sample"
    if not (sample / "bag" / BAG_PARAMS).exists() or not (sample / CONDITIONS_FILE).exists():  # or older
        shutil.rmtree(sample / "bag", ignore_errors=True)
        log(f"writing the sample bag ({frames} frames at 10 Hz) to {sample}/bag ...")
        write_sample_bag(sample, frames=frames, fps=10.0, drop_rate=0.05, seed=0)
    gt = {
        stamp_to_ns(m.msg.header.stamp): image_to_numpy(m.msg).copy() for m in read_messages(sample / "bag", [GT_TOPIC])
    }
    rgb_stamps = [stamp_to_ns(m.msg.header.stamp) for m in read_messages(sample / "bag", [RGB_TOPIC])]
    conditions = {int(k): v for k, v in json.loads((sample / CONDITIONS_FILE).read_text()).items()}

    params = load_param_file(sample / "bag" / BAG_PARAMS)  # the rig's registration and thermal scaling
    params.update(
        {
            "model.checkpoint": str(checkpoint),
            "model.device": device,
            "output.labels": True,
            "output.overlay": True,
            "output.thermal_registered": True,
        }
    )
    params_file = write_param_file(out / "params.yaml", params)

    received: dict[str, dict[int, tuple[float, np.ndarray]]] = {"labels": {}, "overlay": {}, "thermal_registered": {}}
    published_at: dict[int, float] = {}

    def recorder(name):
        def record(msg):
            received[name][stamp_to_ns(msg.header.stamp)] = (time.monotonic(), image_to_numpy(msg).copy())

        return record

    try:
        with NodeSession(params_file, out / "segment_node.log", domain_id=domain_id, client_name="rgbt_seg_demo") as s:
            for name in received:
                s.node.create_subscription(Image, f"/rgbt_seg/{name}", recorder(name), 50)
            log(f"starting segment_node (checkpoint {checkpoint}, {device}) ...")
            s.wait_until_loaded(startup_timeout)
            player = BagPlayer(s.node, sample / "bag", [RGB_TOPIC, THERMAL_TOPIC, RGB_INFO_TOPIC, THERMAL_INFO_TOPIC])
            rgb_index = iter(rgb_stamps)

            def on_publish(topic, _raw, wall):
                if topic == RGB_TOPIC:
                    published_at[next(rgb_index)] = wall

            s.spin(1.0)  # let the player's publishers be discovered
            log(f"playing {len(rgb_stamps)} RGB frames over DDS with their original timing ...")
            t0 = time.monotonic()
            player.play(s.spin, on_publish)
            play_s = time.monotonic() - t0
            s.spin(3.0)  # the last frames and one more diagnostics message
            final = s.status("pipeline") or {}
    except NodeSessionError as exc:
        raise DemoError(str(exc)) from exc

    labels = received["labels"]
    latencies = [(arr - published_at[s]) * 1e3 for s, (arr, _) in labels.items() if s in published_at]
    cm = ConfusionMatrix(info.num_classes, info.ignore_index)
    by_condition: dict[str, ConfusionMatrix] = {}
    for stamp, (_, pred) in labels.items():
        if stamp in gt:
            cm.update(pred, gt[stamp])
            cond = conditions.get(stamp, "unknown")
            by_condition.setdefault(cond, ConfusionMatrix(info.num_classes, info.ignore_index)).update(pred, gt[stamp])
    seg = cm.as_json(info.class_names)
    per_condition = {c: m.as_json(info.class_names) for c, m in sorted(by_condition.items())}
    night = per_condition.get("night")
    metrics = json_safe(
        {
            "checkpoint": str(checkpoint),
            "model": final.get("model", ""),
            "frames_published": len(published_at),
            "frames_segmented": len(labels),
            "play_seconds": play_s,
            "latency_ms": latency_summary(latencies),
            "model_time_p50_ms": float(final.get("model time p50 (ms)", "nan")),
            "overhead_over_model": float(final.get("overhead / model", "nan")),
            "drops": final.get("drops", ""),
            "miou": seg["miou"],
            "per_class_iou": {k: v["iou"] for k, v in seg["per_class"].items()},
            "ground_truth_frames": sum(1 for s in labels if s in gt),
            "conditions": {
                c: {"miou": m["miou"], "frames": sum(1 for s in labels if s in gt and conditions.get(s) == c)}
                for c, m in per_condition.items()
            },
            # at night people and cars are found by their heat: the figures that show thermal at work
            "night_iou": {k: night["per_class"].get(k, {}).get("iou") for k in ("person", "car")} if night else None,
        }
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _write_pictures(out, received, gt, info, conditions)
    return metrics


def _contact_stamps(stamps: list[int], conditions: dict[int, str], rows: int = 6) -> list[int]:
    """Up to ``rows`` stamps: the middle frame of each condition first (day, night, ...), then evenly spread."""
    chosen = []
    for cond in dict.fromkeys(conditions.get(s) for s in stamps):
        of_cond = [s for s in stamps if conditions.get(s) == cond]
        chosen.append(of_cond[len(of_cond) // 2])
    for s in stamps[:: max(1, len(stamps) // rows)]:
        if len(chosen) >= rows:
            break
        if s not in chosen:
            chosen.append(s)
    return sorted(chosen[:rows])


def _write_pictures(out: Path, received: dict, gt: dict, info, conditions: dict[int, str]) -> None:
    from PIL import Image as PilImage

    overlays = [img for _, (_, img) in sorted(received["overlay"].items())]
    if not overlays:
        return
    frames = [PilImage.fromarray(o).resize((320, round(o.shape[0] * 320 / o.shape[1]))) for o in overlays]
    frames[0].save(out / "overlay.gif", save_all=True, append_images=frames[1:], duration=200, loop=0)
    stamps = _contact_stamps(sorted(s for s in received["overlay"] if s in gt), conditions)
    tiles, captions = [], []
    for s in stamps:
        thermal = received["thermal_registered"].get(s)
        row = [
            received["overlay"][s][1],
            thermal_to_rgb(thermal[1].astype(np.float32) / 255.0)
            if thermal is not None
            else np.zeros_like(received["overlay"][s][1]),
            colorize(received["labels"][s][1], info.palette)
            if s in received["labels"]
            else np.zeros_like(received["overlay"][s][1]),
            colorize(gt[s], info.palette),
        ]
        tiles += row
        captions += [f"overlay ({conditions.get(s, '?')})", "thermal (registered)", "prediction", "ground truth"]
    if tiles:
        import cv2

        sheet = contact_sheet(tiles, cols=4, captions=captions, tile_width=240)
        cv2.imwrite(str(out / "contact_sheet.png"), sheet[:, :, ::-1])

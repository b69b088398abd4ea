"""``rgbt-seg bench node``: the real ``segment_node`` process measured over DDS.

A publisher in this process sends synthetic RGB (bgr8) and thermal (mono16, its own
640x512 viewpoint, registered by homography) pairs stamped with the current time at a
fixed rate; the node's ``~/labels`` are received here. Figures:

* end-to-end latency = label arrival time - header stamp (same host clock), p50 / p95;
* the node's own overhead (everything but the model forward: conversion, pairing wait
  excluded, normalisation, registration, pre/post-processing, rendering, message build and
  publish) as a fraction of the model time, from the node's diagnostics;
* drops by reason, and how many frames were published of those sent.

Run it at a rate above the model's throughput to see overload behaviour (no backlog:
latency stays near one model forward).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from ..pipeline.frame_flow import latency_summary
from ..pipeline.imaging import fill_image_msg
from ..pipeline.params import write_param_file
from .node_session import NodeSession, NodeSessionError


def make_random_checkpoint(config: str, out_dir: Path, input_size=None, dataset=None) -> Path:
    """A random-weight checkpoint of ``config`` with nothing frozen (same compute as trained weights)."""
    from ..models import build_model, dataset_info_for, resolve_model_config
    from ..models.checkpoint import save_checkpoint
    from ..models.class_sets import random_text_embeddings
    from ..resources import resolve_data_file

    cfg = resolve_model_config(resolve_data_file(config))
    if input_size is not None:
        cfg["input_size"] = list(input_size)
    for section, key in (("encoder", "freeze"), ("decoder", "freeze_transformer")):
        if section in cfg and key in cfg[section] and not cfg[section].get("checkpoint"):
            cfg[section][key] = False
    info = dataset_info_for(cfg, dataset)
    save_checkpoint(build_model(cfg, info, random_text_embeddings(cfg, info)), cfg, info, out_dir)
    return out_dir


def synthetic_rig(work: Path, checkpoint: Path, size=(480, 640), device: str = "cpu", **overrides):
    """A parameter file for the synthetic rig (homography, Kelvin*100 thermal) and one rclpy RGB + thermal pair."""
    from sensor_msgs.msg import Image

    from ..data.synthetic import SceneGenerator

    gen = SceneGenerator(seed=0, rgb_size=tuple(size), thermal_size=(size[0] * 512 // 480, size[1]))
    (work / "calibration.yaml").write_text(yaml.safe_dump(gen.calibration_dict()))
    params = write_param_file(
        work / "params.yaml",
        {
            "model.checkpoint": str(checkpoint),
            "model.device": device,
            "registration.mode": "homography",
            "registration.file": str(work / "calibration.yaml"),
            "thermal.mode": "linear",
            "thermal.scale": 0.01,
            "thermal.min": 250.0,
            "thermal.max": 330.0,
            "output.overlay": True,
            "sync.max_wait": 0.05,
            **overrides,
        },
    )
    sample = gen.sample(0, "day")
    rgb_msg = fill_image_msg(Image(), np.ascontiguousarray(sample.rgb[:, :, ::-1]), "bgr8")
    th_msg = fill_image_msg(Image(), sample.thermal, "mono16")
    rgb_msg.header.frame_id, th_msg.header.frame_id = "rgb_camera_optical_frame", "thermal_camera_optical_frame"
    return params, rgb_msg, th_msg


def bench_node(
    checkpoint: Path,
    rate_hz: float = 10.0,
    seconds: float = 20.0,
    size=(480, 640),
    device: str = "cpu",
    domain_id: int | None = None,
    startup_timeout: float = 120.0,
    class_set: str | None = None,
) -> dict:
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    work = Path(tempfile.mkdtemp(prefix="rgbt_bench_node_"))
    overrides = {"model.class_set": class_set} if class_set else {}
    params, rgb_msg, th_msg = synthetic_rig(work, checkpoint, size, device, **overrides)
    arrivals: list[tuple[int, int]] = []  # (stamp ns, arrival ns)
    period = 1.0 / rate_hz
    with NodeSession(params, work / "segment_node.log", domain_id=domain_id, client_name="bench_node_client") as s:
        node = s.node
        node.create_subscription(
            Image,
            "/rgbt_seg/labels",
            lambda m: arrivals.append(
                (m.header.stamp.sec * 10**9 + m.header.stamp.nanosec, node.get_clock().now().nanoseconds)
            ),
            50,
        )
        node.create_subscription(Image, "/rgbt_seg/overlay", lambda m: None, 5)
        rgb_pub = node.create_publisher(Image, "/rgb/image", qos_profile_sensor_data)
        th_pub = node.create_publisher(Image, "/thermal/image", qos_profile_sensor_data)

        def publish():
            now = node.get_clock().now().to_msg()
            rgb_msg.header.stamp = now
            th_msg.header.stamp = now
            rgb_pub.publish(rgb_msg)
            th_pub.publish(th_msg)

        s.wait_until_loaded(startup_timeout)
        deadline = time.monotonic() + startup_timeout
        while not arrivals:  # warm-up: the first frames through the whole graph
            s.check_alive()
            if time.monotonic() > deadline:
                raise NodeSessionError(f"segment_node published no labels within {startup_timeout:g} s")
            publish()
            s.spin(period)
        s.spin(2.0)
        arrivals.clear()
        s.diagnostics.clear()
        sent = 0
        t_start = time.monotonic()
        next_t = t_start
        while time.monotonic() - t_start < seconds:
            publish()
            sent += 1
            next_t += period
            s.spin(max(0.0, next_t - time.monotonic()))
        received_during = len(arrivals)
        s.spin(3.0)  # the last frame and a diagnostics message
        after_stop = len(arrivals) - received_during
        pipe = s.status("pipeline") or {}
    latencies = [(arr - st) / 1e6 for st, arr in arrivals]
    latency = latency_summary(latencies)
    return {
        "checkpoint": str(checkpoint),
        "size": list(size),
        "rate_hz": rate_hz,
        "seconds": seconds,
        "sent_pairs": sent,
        "published": len(arrivals),
        "published_after_input_stopped": after_stop,
        "latency_p50_ms": latency["p50"] if latencies else float("nan"),
        "latency_p95_ms": latency["p95"] if latencies else float("nan"),
        "model_p50_ms": float(pipe.get("model time p50 (ms)", "nan")),
        "overhead_p50_ms": float(pipe.get("overhead p50 (ms)", "nan")),
        "overhead_fraction": float(pipe.get("overhead / model", "nan")),
        "drops": pipe.get("drops", ""),
        "node_model": pipe.get("model", ""),
    }


def markdown(r: dict) -> str:
    return "\n".join(
        [
            f"segment_node over DDS: {r['size'][1]}x{r['size'][0]} pairs at {r['rate_hz']:g} Hz for {r['seconds']:g} s",
            f"model: {r['node_model']}",
            "",
            "| sent | published | after stop | latency p50 | latency p95 | model p50 | overhead p50 "
            "| overhead/model | drops |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {r['sent_pairs']} | {r['published']} | {r['published_after_input_stopped']} | "
            f"{r['latency_p50_ms']:.1f} ms | {r['latency_p95_ms']:.1f} ms | {r['model_p50_ms']:.1f} ms | "
            f"{r['overhead_p50_ms']:.2f} ms | {r['overhead_fraction']:.4f} | {r['drops']} |",
        ]
    )

"""The frame flow shared by node, replay and benchmarks (rgbt_seg_ros/pipeline/frame_flow.py).

Unit level: the fast host path against the full-resolution reference, the pairing policy of
``sync.max_wait: 0`` in every tool, the staged worker's newest-frame and keep-all policies.
Integration: a real segment_node and ``rgbt-seg replay`` on the same messages give the same
labels for the same pairs.
"""

import json
import subprocess
import threading
import time

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sensor_msgs.msg import Image

from conftest import script, write_params
from rgbt_seg_ros.data.bags import BagWriter, make_image, read_messages, stamp_to_ns
from rgbt_seg_ros.data.synthetic import SceneGenerator
from rgbt_seg_ros.evaluation.replay import LABELS_TOPIC, replay_bag
from rgbt_seg_ros.pipeline.frame_flow import (
    FrameFlow,
    FramePipeline,
    Job,
    LatestSlot,
    StagedWorker,
    labels_encoding,
    latency_summary,
    pairer_from_params,
)
from rgbt_seg_ros.pipeline.imaging import ThermalNormalizer, fill_image_msg, image_to_numpy
from rgbt_seg_ros.pipeline.params import defaults
from rgbt_seg_ros.pipeline.registration import ThermalRegistrar
from rgbt_seg_ros.pipeline.render import blend_overlay, colorize
from rgbt_seg_ros.pipeline.segmenter import Segmenter
from rgbt_seg_ros.pipeline.sync import Pair
from rgbt_seg_ros.resources import resolve_data_file
from rgbt_seg_ros.tools.pairs import pair_bag

MS = 1_000_000
BASE = 1_700_000_000_000_000_000


@pytest.fixture(scope="module")
def demo_segmenter():
    return Segmenter.from_checkpoint(resolve_data_file("models/demo"), device="cpu")


def rig(size, seed=3):
    gen = SceneGenerator(seed=seed, rgb_size=size, thermal_size=(size[0] * 512 // 480, size[1]))
    return gen, ThermalRegistrar.from_dict(gen.calibration_dict())


# ----------------------------------------------------------------------------- host path


def boundary_pixels(labels_grid: np.ndarray) -> np.ndarray:
    """Grid pixels whose 2x2 neighbourhood (towards +x, +y) holds more than one class."""
    pad = np.pad(labels_grid, ((0, 1), (0, 1)), mode="edge")
    a, b, c, d = pad[:-1, :-1], pad[:-1, 1:], pad[1:, :-1], pad[1:, 1:]
    return (a != b) | (a != c) | (a != d)


def test_labels_at_the_grid_resized_by_nearest_equal_the_arg_max_of_resized_logits_away_from_boundaries(
    demo_segmenter,
):
    # The stated tolerance of deciding at the model's grid: identical labels except at pixels whose
    # 2x2 grid neighbourhood holds two classes (there a bilinear blend of logits can pick either).
    seg = demo_segmenter
    gen, reg = rig((480, 640))
    s = gen.sample(0, "day")
    pipe = FramePipeline(seg, ThermalNormalizer("linear", scale=0.01, min=250.0, max=330.0), reg)
    out = pipe.process(s.rgb, s.thermal, outputs={"labels"})
    inp = seg.prepare(s.rgb, *pipe.thermal_to_grid(s.thermal, (480, 640), seg.grid_size((480, 640))))
    with torch.inference_mode():
        logits = seg.model(inp.rgb, inp.thermal, inp.valid)["logits"][:, :, : out.labels_grid.shape[0]]
        logits = logits[..., : out.labels_grid.shape[1]].float()
        exact = F.interpolate(logits, size=(480, 640), mode="bilinear", align_corners=False).argmax(1)[0].numpy()
    np.testing.assert_array_equal(logits.argmax(1)[0].numpy(), out.labels_grid)
    gh, gw = out.labels_grid.shape
    ys = np.clip(((np.arange(480) + 0.5) * gh / 480 - 0.5).astype(int), 0, gh - 1)  # floor of the source row
    xs = np.clip(((np.arange(640) + 0.5) * gw / 640 - 0.5).astype(int), 0, gw - 1)
    near_boundary = boundary_pixels(out.labels_grid)[np.ix_(ys, xs)]
    differ = out.labels != exact
    assert not (differ & ~near_boundary).any()
    assert differ.mean() < 0.02 and near_boundary.mean() < 0.2


@pytest.mark.parametrize("size", [(480, 640), (720, 1280)])
def test_the_fast_path_agrees_with_the_full_resolution_path_and_is_no_less_accurate(demo_segmenter, size):
    # Old path (still the evaluation path): thermal normalised and warped at full resolution, resized
    # with the RGB by torch, logits resized before the arg-max. New path: see frame_flow.FramePipeline.
    seg = demo_segmenter
    gen, reg = rig(size)
    pipe = FramePipeline(seg, ThermalNormalizer("linear", scale=0.01, min=250.0, max=330.0), reg)
    same, acc_fast, acc_ref = [], [], []
    for i, condition in enumerate(("day", "night", "fog", "glare")):
        s = gen.sample(i, condition)
        out = pipe.process(s.rgb, s.thermal, outputs={"labels", "overlay"})
        ref = seg(s.rgb, *pipe.register_thermal(s.thermal, size))
        assert out.labels.shape == size and out.labels.dtype == ref.labels.dtype
        np.testing.assert_array_equal(out.overlay, blend_overlay(s.rgb, out.labels, pipe.palette, pipe.overlay_alpha))
        same.append((out.labels == ref.labels).mean())
        acc_fast.append((out.labels == s.labels).mean())
        acc_ref.append((ref.labels == s.labels).mean())
    print(f"{size}: identical {np.round(same, 4)}, accuracy fast {np.round(acc_fast, 4)} ref {np.round(acc_ref, 4)}")
    assert min(same) > 0.93 and np.mean(same) > 0.97
    assert np.mean(acc_fast) >= np.mean(acc_ref) - 0.005


def test_outputs_are_made_only_when_wanted_and_agree_with_each_other(demo_segmenter):
    gen, reg = rig((240, 320))
    s = gen.sample(1, "night")
    pipe = FramePipeline(demo_segmenter, ThermalNormalizer("linear", scale=0.01, min=250.0, max=330.0), reg)
    few = pipe.process(s.rgb, s.thermal, outputs={"labels"})
    assert few.overlay is None and few.confidence is None and few.thermal_registered is None
    assert few.colored_labels is None and few.confidence_grid is not None
    everything = pipe.process(s.rgb, s.thermal)
    np.testing.assert_array_equal(everything.labels, few.labels)
    np.testing.assert_array_equal(everything.colored_labels, colorize(everything.labels, pipe.palette))
    assert everything.confidence.shape == (240, 320) and 0.0 <= everything.confidence.min()
    assert everything.confidence.max() <= 1.0 + 1e-6
    assert everything.thermal_registered.shape == (240, 320) and everything.valid.any()


def test_the_grid_warp_of_a_shifted_camera_matches_the_full_warp_resized():
    # Registration straight into the model grid (mip-mapped): the same picture as the full warp, smaller.
    gen, reg = rig((480, 640), seed=5)
    s = gen.sample(0, "day")
    full, valid = reg.warp(s.thermal.astype(np.float32), (480, 640))
    grid, grid_valid = reg.warp_to_grid(s.thermal, (480, 640), (96, 128))
    small = cv2.resize(full, (128, 96), interpolation=cv2.INTER_AREA)
    inner = cv2.erode(grid_valid.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    assert grid.dtype == np.float32 and inner.mean() > 0.5
    assert abs(valid.mean() - grid_valid.mean()) < 0.03
    err = np.abs(grid - small)[inner] / (s.thermal.max() - s.thermal.min())
    assert np.median(err) < 0.01 and np.percentile(err, 99) < 0.08
    assert reg.grid_maps(s.thermal.shape, (480, 640), (96, 128)).levels == 2  # 640 -> 160 -> 128: two halvings


def test_percentile_bounds_come_from_the_whole_frame_and_commute_with_the_warp():
    rng = np.random.default_rng(0)
    raw = rng.normal(29000, 300, (512, 640)).astype(np.uint16)
    norm = ThermalNormalizer("percentile", p_low=1, p_high=99)
    lo, k = norm.affine(raw)
    full, _ = norm.normalize(raw)
    applied, finite = norm.apply(raw.astype(np.float32), (lo, k))
    np.testing.assert_allclose(applied, full, atol=1e-6)
    assert finite is None and 0.4 < np.median(full) < 0.6


# ----------------------------------------------------------------------------- pairing, one policy


def schedule(n=8, period_ms=66, thermal_offset_ms=40):
    """RGB at k*66 ms, thermal 40 ms later: each thermal is closer to the *next* RGB frame."""
    events = []
    for k in range(n):
        t = k * period_ms * MS
        events.append(("rgb", BASE + t, BASE + t))
        events.append(("thermal", BASE + t + thermal_offset_ms * MS, BASE + t + thermal_offset_ms * MS))
    return events


def write_schedule_bag(path, events, hw=(48, 64)):
    rng = np.random.default_rng(0)
    with BagWriter(path, storage="mcap") as writer:
        for camera, stamp, log in events:
            if camera == "rgb":
                msg = make_image(rng.integers(0, 255, (*hw, 3), dtype=np.uint8), "bgr8", stamp, "rgb")
            else:
                msg = make_image(rng.integers(27000, 31000, hw, dtype=np.uint16), "mono16", stamp, "thermal")
            writer.write(f"/{camera}/image", msg, log)
    return path


def flow_pairs(params, events):
    flow = FrameFlow(params)
    got = []
    for camera, stamp, log in events:
        add = flow.rgb if camera == "rgb" else flow.thermal
        got += [(p.rgb_stamp_ns, p.thermal_stamp_ns) for p in add(stamp, (None, None), log)]
    return got + [(p.rgb_stamp_ns, p.thermal_stamp_ns) for p in flow.flush()]


def test_max_wait_zero_releases_each_pair_at_once_in_flow_replay_and_the_pairs_tool(tmp_path, micro_checkpoint):
    # Found in the issue: sync.max_wait 0 released pairs at once in the node but meant "no timeout" in
    # replay and `rgbt-seg pairs`. Here the thermal frame is nearer to the next RGB frame, so the two
    # meanings pair differently: at once -> (R_k, T_k); no timeout -> (R_k+1, T_k).
    events = schedule()
    params = {**defaults(), "sync.max_wait": 0.0, "sync.slop": 0.05, "model.checkpoint": str(micro_checkpoint)}
    expected = [(BASE + k * 66 * MS, BASE + (k * 66 + 40) * MS) for k in range(8)]
    assert flow_pairs(params, events) == expected
    bag = write_schedule_bag(tmp_path / "bag", events)
    pairs, _ = pair_bag(bag, "/rgb/image", "/thermal/image", pairer_from_params(params))
    assert [(p.rgb_stamp_ns, p.thermal_stamp_ns) for p in pairs] == expected
    replayed = replay_bag(bag, params, tmp_path / "out", progress=False, gt_topic=None)
    assert replayed.pairs == expected
    # with a wait long enough for the better partner, every tool agrees on the other pairing
    waiting = {**params, "sync.max_wait": 0.1}
    assert flow_pairs(waiting, events)[:3] == [(BASE + (k + 1) * 66 * MS, BASE + (k * 66 + 40) * MS) for k in range(3)]


def test_flow_switches_to_rgb_only_and_back_on_its_clock():
    switches = []
    flow = FrameFlow({**defaults(), "thermal_timeout": 0.5}, on_switch=switches.append)
    frames = []
    for k in range(30):  # thermal stops after 0.3 s, comes back at 1.5 s
        t = BASE + k * 100 * MS
        frames += flow.rgb(t, ("h", k), t)
        if k < 3 or k >= 15:
            frames += flow.thermal(t, ("h", k), t)
    rgb_only = [f.rgb[1] for f in frames if f.thermal is None]
    # lost after 0.5 s; RGB 15 came first
    assert rgb_only == list(range(8, 16)) and switches == ["rgb_only", "rgb_thermal"]
    assert all(isinstance(f, Pair) for f in frames)


# ----------------------------------------------------------------------------- staged worker


class SlowPipeline:
    """A FramePipeline stand-in for the worker tests: each stage sleeps, the frame id flows through."""

    def __init__(self, infer_s=0.02, fail_on=None):
        self.infer_s, self.fail_on = infer_s, fail_on
        self.prepared = 0

    def observe_pair(self, rgb, thermal, t):  # no registration health here
        pass

    def prepare(self, rgb, thermal, side_stream=False, t=None):
        self.prepared += 1
        if rgb == self.fail_on:
            raise ValueError(f"bad frame {rgb}")
        return rgb

    def infer(self, prepared):
        time.sleep(self.infer_s)
        return prepared

    def finish(self, prepared, grid, outputs):
        return grid


def run_worker(n, keep_all, feed_s=0.002, **kwargs):
    source = LatestSlot(keep_all=keep_all)
    delivered, drops, errors = [], [], []
    pipe = SlowPipeline(**kwargs)
    worker = StagedWorker(
        source,
        lambda: pipe,
        lambda job, result: delivered.append(result),
        on_error=lambda stage, exc: errors.append((stage, str(exc))),
        on_drop=drops.append,
    ).start()
    superseded_at_source = 0
    for i in range(n):
        superseded_at_source += int(source.put(Job(Pair(i, i, (None, i), (None, i), 0), time.monotonic())))
        time.sleep(feed_s)
    assert worker.wait_idle(n - superseded_at_source, timeout=10.0)
    assert worker.stop(timeout=5.0)
    worker.prepared = pipe.prepared
    return delivered, drops, errors, superseded_at_source, worker


def test_live_worker_keeps_the_newest_frame_and_never_queues():
    delivered, drops, errors, at_source, worker = run_worker(60, keep_all=False)
    assert not errors and delivered == sorted(delivered) and delivered[-1] == 59
    assert 5 < len(delivered) < 40  # a 20 ms forward cannot keep up with a 500 Hz feed
    assert len(delivered) + len(drops) + at_source == 60 and set(drops) <= {"superseded"}
    assert worker.taken == worker.ended
    # a frame is prepared only when the forward is ready for it: (almost) nothing prepared in vain
    assert worker.prepared <= len(delivered) + 2


def feed(source: LatestSlot, n: int) -> threading.Thread:
    """A producer thread putting n jobs into the mailbox (it blocks while a keep_all mailbox is full)."""
    feeder = threading.Thread(
        target=lambda: [source.put(Job(Pair(i, i, (None, i), (None, i), 0), 0.0)) for i in range(n)]
    )
    feeder.start()
    return feeder


def test_stopping_mid_stream_accounts_for_every_frame_taken():
    source = LatestSlot(keep_all=True)
    drops = []
    worker = StagedWorker(source, lambda: SlowPipeline(infer_s=0.1), lambda job, r: None, on_drop=drops.append)
    worker.start()
    feeder = feed(source, 20)
    time.sleep(0.35)
    assert worker.stop(timeout=5.0)
    feeder.join(timeout=2.0)
    # every frame taken ended: delivered, or reported as stopped between stages (nothing else drops here)
    assert worker.taken == worker.ended and worker.taken >= 2 and set(drops) <= {"stopped"}


def test_replay_worker_delivers_every_frame_in_order_and_reports_a_bad_one():
    delivered, drops, errors, at_source, _ = run_worker(25, keep_all=True, infer_s=0.005, fail_on=7)
    assert delivered == [i for i in range(25) if i != 7] and not drops and at_source == 0
    assert errors == [("prepare", "bad frame 7")]


def test_worker_overlaps_the_forward_with_the_other_stages():
    # prepare and finish take 10 ms each, the forward 20 ms: serial 40 ms per frame, staged ~20 ms
    class Timed(SlowPipeline):
        def prepare(self, rgb, thermal, side_stream=False, t=None):
            time.sleep(0.01)
            return rgb

        def finish(self, prepared, grid, outputs):
            time.sleep(0.01)
            return grid

    source = LatestSlot(keep_all=True)
    done = []
    worker = StagedWorker(source, lambda: Timed(infer_s=0.02), lambda job, r: done.append(time.monotonic())).start()
    for i in range(30):
        source.put(Job(Pair(i, i, (None, i), (None, i), 0), time.monotonic()))
    worker.wait_idle(30, timeout=10)
    worker.stop()
    period = np.median(np.diff(done))
    assert len(done) == 30 and period < 0.032  # serial would be >= 0.040


def test_stop_ends_every_thread_even_when_waiting_on_a_full_mailbox():
    source = LatestSlot(keep_all=True)
    worker = StagedWorker(source, lambda: SlowPipeline(infer_s=0.5), lambda job, r: None).start()
    feeder = feed(source, 10)
    time.sleep(0.2)
    assert worker.stop(timeout=5.0)
    feeder.join(timeout=2.0)
    assert not feeder.is_alive()  # the closed mailbox released the producer


def test_reversed_views_and_read_only_masks(demo_segmenter):
    gen, reg = rig((120, 160))
    s = gen.sample(0, "day")
    bgr = np.ascontiguousarray(s.rgb[:, :, ::-1])
    view = bgr[:, :, ::-1]  # RGB as a reversed view of a BGR image, as dataset readers make
    thermal = np.linspace(0.0, 1.0, 120 * 160, dtype=np.float32).reshape(120, 160)
    a = demo_segmenter(view, thermal)
    b = demo_segmenter(np.ascontiguousarray(view), thermal)
    np.testing.assert_array_equal(a.labels, b.labels)
    pipe = FramePipeline(demo_segmenter, ThermalNormalizer("linear", scale=0.01, min=250.0, max=330.0), reg)
    out = pipe.process(view, s.thermal, outputs={"labels"})
    with pytest.raises(ValueError):  # the cached grid mask is shared by every frame: read-only
        out.valid_grid[0, 0] = False


def test_latency_summary_and_labels_encoding():
    assert latency_summary([]) == {"p50": None, "p95": None, "n": 0}
    s = latency_summary(range(1, 101))
    assert s["n"] == 100 and s["p50"] == pytest.approx(50.5) and s["p95"] == pytest.approx(95.05)
    assert labels_encoding(np.zeros((2, 2), np.uint8)) == "mono8"
    assert labels_encoding(np.zeros((2, 2), np.uint16)) == "mono16"


# ----------------------------------------------------------------------------- node and replay, same pairs


@pytest.mark.integration
def test_node_and_replay_give_the_same_labels_for_the_same_pairs_with_max_wait_zero(
    tmp_path, ros_env, micro_checkpoint
):
    from dds_client import DdsClient, stop_node

    events = schedule(n=10)
    bag = write_schedule_bag(tmp_path / "bag", events, hw=(120, 160))
    overrides = {
        "model.checkpoint": str(micro_checkpoint),
        "model.device": "cpu",
        "thermal.mode": "fixed",
        "thermal.min": 25000.0,
        "thermal.max": 33000.0,
        "sync.max_wait": 0.0,
        "sync.slop": 0.05,
        "thermal_timeout": 5.0,
    }
    params_file = write_params(tmp_path / "params.yaml", **overrides)
    rp = subprocess.run(
        [script("rgbt-seg"), "replay", str(bag), "--params", str(params_file), "--out", str(tmp_path / "replay")],
        env=ros_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rp.returncode == 0, rp.stdout + rp.stderr
    metrics = json.loads((tmp_path / "replay" / "metrics.json").read_text())
    assert metrics["frames_processed"] == 10 and metrics["rgb_only_frames"] == 0
    replayed = {
        stamp_to_ns(m.msg.header.stamp): image_to_numpy(m.msg).copy()
        for m in read_messages(tmp_path / "replay" / "segmented", [LABELS_TOPIC])
    }
    assert sorted(replayed) == [BASE + k * 66 * MS for k in range(10)]  # R_k with T_k: released at once

    proc = subprocess.Popen(
        [script("segment_node"), "--ros-args", "--params-file", str(params_file)],
        env=ros_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = DdsClient(int(ros_env["ROS_DOMAIN_ID"]))

    def send(camera, arr, encoding, stamp):
        msg = fill_image_msg(Image(), np.ascontiguousarray(arr), encoding)
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
        msg.header.frame_id = camera
        (client.rgb_pub if camera == "rgb" else client.thermal_pub).publish(msg)

    try:
        # warm-up pairs (equal stamps, 10 s before the bag) until the node answers: model loaded, DDS matched
        rgb, thermal = np.zeros((120, 160, 3), np.uint8), np.full((120, 160), 29000, np.uint16)
        for i in range(600):
            send("rgb", rgb, "bgr8", BASE - 10_000 * MS + i * 10 * MS)
            send("thermal", thermal, "mono16", BASE - 10_000 * MS + i * 10 * MS)
            if client.wait_for(lambda: client.received["labels"], 0.2, proc):
                break
        assert client.received["labels"], "the node never answered"
        client.spin(0.5)
        client.received["labels"].clear()
        # the bag's messages in the bag's order, slowly enough that the node never supersedes one
        for m in read_messages(bag, ["/rgb/image", "/thermal/image"]):
            camera = "rgb" if m.topic == "/rgb/image" else "thermal"
            send(camera, image_to_numpy(m.msg), m.msg.encoding, stamp_to_ns(m.msg.header.stamp))
            client.spin(0.25)
        client.wait_for(lambda: len(client.received["labels"]) >= 10, 30.0, proc)
        live = {stamp_to_ns(msg.header.stamp): image_to_numpy(msg).copy() for _, msg in client.received["labels"]}
    finally:
        client.close()
        print(stop_node(proc)[-3000:])
    assert set(live) == set(replayed)  # the same pairs: every R_k with T_k, nothing superseded
    for stamp, labels in live.items():
        np.testing.assert_array_equal(labels, replayed[stamp], err_msg=f"labels of RGB stamp {stamp}")

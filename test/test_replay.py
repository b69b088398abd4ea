"""rgbt-seg replay: same pairs as `rgbt-seg pairs`, outputs stamped like RGB, metrics, corrupt and ROS 1 bags."""

import argparse
import json

import numpy as np
import pytest
from rosbags.highlevel import AnyReader
from rosbags.rosbag1 import Writer as Rosbag1Writer
from rosbags.typesys import Stores, get_typestore

from rgbt_seg_ros.data.bags import read_messages, stamp_to_ns
from rgbt_seg_ros.data.sample_bag import write_sample_bag
from rgbt_seg_ros.evaluation.replay import LABELS_TOPIC, OVERLAY_TOPIC, replay_bag
from rgbt_seg_ros.pipeline.frame_flow import FramePipeline
from rgbt_seg_ros.pipeline.params import defaults, write_param_file
from rgbt_seg_ros.pipeline.segmenter import Segmenter
from rgbt_seg_ros.pipeline.sync import ApproximateTimePairer
from rgbt_seg_ros.tools import replay as replay_tool
from rgbt_seg_ros.tools.pairs import pair_bag

SIZE = dict(rgb_size=(96, 128), thermal_size=(104, 128))


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    bag = write_sample_bag(
        root / "s", frames=16, fps=10, drop_rate=0.15, jitter_ms=3, seed=2, scene_seconds=0.4, **SIZE
    )
    return root, bag


@pytest.fixture(scope="module")
def params(sample, micro_checkpoint_module):
    root, _ = sample
    p = defaults()
    p.update(
        {
            "model.checkpoint": str(micro_checkpoint_module),
            "model.device": "cpu",
            "registration.mode": "homography",
            "registration.file": str(root / "s" / "calibration.yaml"),
            "thermal.mode": "linear",
            "thermal.scale": 0.01,
            "thermal.min": 250.0,
            "thermal.max": 330.0,
        }
    )
    return p


@pytest.fixture(scope="module")
def micro_checkpoint_module(tmp_path_factory):
    from conftest import make_micro_checkpoint

    return make_micro_checkpoint(tmp_path_factory.mktemp("ck") / "micro")


@pytest.fixture(scope="module")
def pipeline(params):
    import torch

    torch.set_num_threads(1)
    return FramePipeline.from_params(
        params, segmenter=Segmenter.from_checkpoint(params["model.checkpoint"], device="cpu")
    )


def test_replay_forms_the_pairs_of_rgbt_seg_pairs_and_writes_everything(sample, params, pipeline, tmp_path):
    _, bag = sample
    result = replay_bag(bag, params, tmp_path / "out", pipeline=pipeline, progress=False)
    reference, _ = pair_bag(
        bag,
        "/rgb/image",
        "/thermal/image",
        ApproximateTimePairer(
            queue_size=params["sync.queue_size"], slop=params["sync.slop"], max_wait=params["sync.max_wait"]
        ),
    )
    assert result.pairs == [(p.rgb_stamp_ns, p.thermal_stamp_ns) for p in reference]
    assert 8 <= len(result.pairs) < 16  # drops were applied, pairs were formed

    rgb_headers = {stamp_to_ns(m.msg.header.stamp): m.msg.header.frame_id for m in read_messages(bag, ["/rgb/image"])}
    with AnyReader([tmp_path / "out" / "segmented"]) as reader:
        topics = {c.topic for c in reader.connections}
        outputs = {LABELS_TOPIC: [], OVERLAY_TOPIC: []}
        for conn, _, raw in reader.messages([c for c in reader.connections if c.topic in outputs]):
            outputs[conn.topic].append(reader.deserialize(raw, conn.msgtype))
    assert {"/rgb/image", "/thermal/image", "/rgbt/labels_gt", LABELS_TOPIC, OVERLAY_TOPIC} <= topics
    for topic, encoding in ((LABELS_TOPIC, "mono8"), (OVERLAY_TOPIC, "rgb8")):
        msgs = outputs[topic]
        assert len(msgs) == len(result.pairs)
        for msg in msgs:
            stamp = stamp_to_ns(msg.header.stamp)
            assert rgb_headers[stamp] == msg.header.frame_id  # stamped like its RGB image
            assert (msg.encoding, msg.height, msg.width) == (encoding, 96, 128)

    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["frames_processed"] == len(result.pairs) and metrics["error"] is None
    assert metrics["ground_truth_frames"] == len(result.pairs)
    seg = metrics["segmentation"]
    assert 0.0 <= seg["miou"] <= 1.0 and len(seg["per_class"]) == 8 and len(seg["confusion_matrix"]) == 8
    assert sum(map(sum, seg["confusion_matrix"])) == 96 * 128 * len(result.pairs)
    assert metrics["latency_ms"]["model"]["p50"] > 0 and metrics["model_bound_pairs_per_s"] > 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "mIoU" in report and "contact_sheet.png" in report
    for name in ("latency_hist.png", "per_class_iou.png", "contact_sheet.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000


def test_replay_is_deterministic(sample, params, pipeline, tmp_path):
    _, bag = sample
    a = replay_bag(bag, params, tmp_path / "a", pipeline=pipeline, progress=False, max_pairs=4)
    b = replay_bag(bag, params, tmp_path / "b", pipeline=pipeline, progress=False, max_pairs=4)
    labels = []
    for out in (a, b):
        labels.append([m.msg.data.tobytes() for m in read_messages(out.out_dir / "segmented", [LABELS_TOPIC])])
    assert a.pairs == b.pairs and len(labels[0]) == 4 and labels[0] == labels[1]


def test_truncated_bag_keeps_a_valid_partial_output(sample, params, pipeline, tmp_path):
    root, _ = sample
    bag = write_sample_bag(tmp_path / "t", frames=16, seed=3, storage="sqlite3", **SIZE)
    db = next(bag.glob("*.db3"))
    import sqlite3

    with sqlite3.connect(db) as con:  # corrupt the payload of late messages: deserialisation fails mid-bag
        con.execute("UPDATE messages SET data = X'0001' WHERE id > 40")
    params = dict(params, **{"registration.file": str(tmp_path / "t" / "calibration.yaml")})
    out = tmp_path / "out"
    parser = argparse.ArgumentParser()
    replay_tool.add_arguments(parser)
    param_file = write_param_file(tmp_path / "p.yaml", params)
    args = parser.parse_args([str(bag), "--params", str(param_file), "--out", str(out), "--no-progress"])
    assert replay_tool.run(args) == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert "unreadable after message" in metrics["error"] and "topic" in metrics["error"]
    assert metrics["frames_processed"] >= 3
    n = sum(1 for _ in read_messages(out / "segmented", [LABELS_TOPIC]))  # the partial bag is valid
    assert n == metrics["frames_processed"]


def test_missing_topic_is_named(sample, params, pipeline, tmp_path):
    _, bag = sample
    from rgbt_seg_ros.data.bags import BagError

    with pytest.raises(BagError, match="has no topic /nope"):
        replay_bag(bag, params, tmp_path / "o", pipeline=pipeline, progress=False, thermal_topic="/nope")


def test_ros1_bag_and_rgb_only_when_thermal_stops(params, pipeline, tmp_path):
    store = get_typestore(Stores.ROS1_NOETIC)
    image_t, header_t = store.types["sensor_msgs/msg/Image"], store.types["std_msgs/msg/Header"]
    time_t = store.types["builtin_interfaces/msg/Time"]
    base = 1_700_000_000_000_000_000

    def image(stamp, arr, encoding):
        hdr = header_t(seq=0, stamp=time_t(sec=stamp // 10**9, nanosec=stamp % 10**9), frame_id="cam")
        h, w = arr.shape[:2]
        data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        return image_t(header=hdr, height=h, width=w, encoding=encoding, is_bigendian=0, step=data.size // h, data=data)

    path = tmp_path / "ros1.bag"
    rgb = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    thermal = np.full((96, 128), 29000, np.uint16)
    with Rosbag1Writer(path) as writer:
        c_rgb = writer.add_connection("/rgb/image", "sensor_msgs/msg/Image", typestore=store)
        c_th = writer.add_connection("/thermal/image", "sensor_msgs/msg/Image", typestore=store)
        for i in range(30):  # 10 Hz; thermal stops after 1 s (frames 10..)
            s = base + i * 100_000_000
            writer.write(c_rgb, s + 5_000_000, store.serialize_ros1(image(s, rgb, "rgb8"), "sensor_msgs/msg/Image"))
            if i < 10:
                writer.write(
                    c_th,
                    s + 9_000_000,
                    store.serialize_ros1(image(s + 2_000_000, thermal, "mono16"), "sensor_msgs/msg/Image"),
                )
    p = dict(params, **{"registration.mode": "identity", "registration.file": "", "thermal_timeout": 0.5})
    identity = FramePipeline.from_params(p, segmenter=pipeline.segmenter)
    result = replay_bag(path, p, tmp_path / "out", pipeline=identity, gt_topic=None, progress=False)
    m = result.metrics
    assert m["pairs"] >= 8 and m["rgb_only_frames"] >= 10 and m["error"] is None
    assert m["frames_processed"] == m["pairs"] + m["rgb_only_frames"]
    assert sum(1 for _ in read_messages(tmp_path / "out" / "segmented", [LABELS_TOPIC])) == m["frames_processed"]


def _compressed_copy(bag, out, rgb_topic="/rgb/image", thermal_topic="/thermal/image", corrupt_first_rgb=False):
    """The sample bag with its camera images as image_transport's compressed topics (png: lossless)."""
    from rgbt_seg_ros.data.bags import TYPESTORE, BagWriter, make_header
    from rgbt_seg_ros.pipeline.imaging import fill_compressed_msg, image_to_numpy

    compressed_t = TYPESTORE.types["sensor_msgs/msg/CompressedImage"]
    first = True
    with BagWriter(out, storage="mcap") as writer:
        for m in read_messages(bag, None):
            if m.topic in (rgb_topic, thermal_topic):
                msg = compressed_t(
                    header=make_header(stamp_to_ns(m.msg.header.stamp), m.msg.header.frame_id),
                    format="",
                    data=np.zeros(0, np.uint8),
                )
                fill_compressed_msg(msg, image_to_numpy(m.msg), "png", m.msg.encoding, as_numpy=True)
                if corrupt_first_rgb and first and m.topic == rgb_topic:
                    msg.data = msg.data[: msg.data.size // 2]  # a truncated payload
                    first = False
                writer.write(m.topic + "/compressed", msg, m.log_time_ns)
            else:
                writer.write(m.topic, m.msg, m.log_time_ns)
    return out


def test_compressed_input_replays_to_the_same_labels_and_counts_a_broken_payload(sample, params, pipeline, tmp_path):
    _, bag = sample
    raw = replay_bag(bag, params, tmp_path / "raw", pipeline=pipeline, progress=False)
    comp_bag = _compressed_copy(bag, tmp_path / "compressed_bag", corrupt_first_rgb=True)
    p = dict(params, **{"input.rgb.transport": "compressed", "input.thermal.transport": "compressed"})
    comp = replay_bag(comp_bag, p, tmp_path / "comp", pipeline=pipeline, progress=False)
    assert comp.metrics["topics"]["rgb"] == "/rgb/image/compressed"
    assert comp.metrics["drops"]["rgb_bad_image"] == 1
    got = {
        stamp_to_ns(m.msg.header.stamp): image_to_numpy_copy(m.msg)
        for m in read_messages(tmp_path / "comp" / "segmented", [LABELS_TOPIC])
    }
    want = {
        stamp_to_ns(m.msg.header.stamp): image_to_numpy_copy(m.msg)
        for m in read_messages(tmp_path / "raw" / "segmented", [LABELS_TOPIC])
    }
    common = set(got) & set(want)
    assert len(common) >= len(want) - 2 and len(common) >= 3  # the broken frame's pair may differ
    for stamp in common:
        np.testing.assert_array_equal(got[stamp], want[stamp])  # png is lossless: identical labels
    assert raw.metrics["frames_processed"] >= 3


def image_to_numpy_copy(msg):
    from rgbt_seg_ros.pipeline.imaging import image_to_numpy

    return image_to_numpy(msg).copy()


@pytest.mark.integration
def test_the_sample_bag_replays_with_its_own_parameters_by_default(tmp_path, capsys):
    """No options: the bag's rgbt_seg_params.yaml (registration, thermal scaling) gives the demo's accuracy."""
    from rgbt_seg_ros.resources import share_path

    bag = write_sample_bag(tmp_path / "s", frames=12, fps=10, seed=0, scene_seconds=0.4)
    parser = argparse.ArgumentParser()
    replay_tool.add_arguments(parser)
    base = ["--no-progress", "--device", "cpu"]
    assert replay_tool.run(parser.parse_args([str(bag), "--out", str(tmp_path / "own"), *base])) == 0
    out = capsys.readouterr()
    assert "(the bag's own)" in out.out
    shipped = share_path("config", "segment.yaml")
    args = [str(bag), "--out", str(tmp_path / "shipped"), "--params", str(shipped), *base]
    assert replay_tool.run(parser.parse_args(args)) == 0
    warned = capsys.readouterr().err
    own = json.loads((tmp_path / "own" / "metrics.json").read_text())
    plain = json.loads((tmp_path / "shipped" / "metrics.json").read_text())
    assert own["registration"] == "homography" and own["warnings"] == []
    assert plain["registration"] == "identity" and "under identity registration" in warned
    own_miou, plain_miou = own["segmentation"]["miou"], plain["segmentation"]["miou"]
    print(f"demo checkpoint on the sample bag: mIoU {own_miou:.3f} with the bag's parameters, {plain_miou:.3f} without")
    assert own_miou > 0.5 and own_miou > plain_miou + 0.15


def test_a_pause_of_both_cameras_replays_without_rgb_only_frames(params, pipeline, tmp_path):
    """A bag paused for 3 s (both cameras, e.g. a driver restart): every frame after it is paired, neither
    camera counts as lost (no RGB-only and no thermal-only frame)."""
    from rgbt_seg_ros.data.bags import BagWriter, make_image

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    thermal = np.full((104, 128), 29000, np.uint16)
    base = 1_700_000_000_000_000_000
    times = [i * 0.1 for i in range(15)] + [4.5 + i * 0.1 for i in range(15)]  # 3 s gap after 1.5 s
    with BagWriter(tmp_path / "paused", storage="mcap") as writer:
        for t in times:
            s = base + int(t * 1e9)
            writer.write("/rgb/image", make_image(rgb, "rgb8", s, "cam"), s + 5_000_000)
            writer.write("/thermal/image", make_image(thermal, "mono16", s + 3_000_000, "th"), s + 12_000_000)
    p = dict(params, **{"thermal_timeout": 0.5, "rgb_timeout": 0.5, "on_rgb_loss": "thermal_only"})
    m = replay_bag(tmp_path / "paused", p, tmp_path / "out", pipeline=pipeline, gt_topic=None, progress=False).metrics
    assert m["rgb_only_frames"] == 0 and m["thermal_only_frames"] == 0 and m["pairs"] == 30
    assert m["drops"]["unmatched_thermal"] == 0 and m["drops"]["unmatched_rgb"] == 0


def test_replay_reports_every_refused_parameter_and_uses_the_defaults_like_the_node(sample, params, tmp_path, capsys):
    _, bag = sample
    f = write_param_file(tmp_path / "p.yaml", dict(params, **{"sync.slop": 3.0}))
    text = f.read_text().replace("max_wait: 0.1", "max_wait: fast") + "    use_sim_time: true\n"
    f.write_text(text)
    parser = argparse.ArgumentParser()
    replay_tool.add_arguments(parser)
    args = parser.parse_args([str(bag), "--params", str(f), "--out", str(tmp_path / "o"), "--no-progress", "--no-gt"])
    assert replay_tool.run(args) == 0
    err = capsys.readouterr().err
    assert f"warning: {f}: sync.slop must be <= 1.0, got 3.0; using the default 0.05" in err
    assert f"warning: {f}: sync.max_wait must be of type float, got 'fast'; using the default 0.1" in err
    warnings = json.loads((tmp_path / "o" / "metrics.json").read_text())["warnings"]
    assert len(warnings) == 2


def test_max_pairs_below_one_is_refused(sample, tmp_path, capsys):
    _, bag = sample
    parser = argparse.ArgumentParser()
    replay_tool.add_arguments(parser)
    assert replay_tool.run(parser.parse_args([str(bag), "--max-pairs", "0", "--out", str(tmp_path / "o")])) == 2
    assert "--max-pairs must be >= 1, got 0" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_outputs_only_writes_the_same_labels_without_the_inputs(sample, params, pipeline, tmp_path):
    _, bag = sample
    full = replay_bag(bag, params, tmp_path / "full", pipeline=pipeline, progress=False)
    lean = replay_bag(bag, params, tmp_path / "lean", pipeline=pipeline, progress=False, pass_through=False)
    assert lean.pairs == full.pairs and lean.metrics["inputs_copied"] is False
    with AnyReader([tmp_path / "lean" / "segmented"]) as reader:
        assert {c.topic for c in reader.connections} == {LABELS_TOPIC, OVERLAY_TOPIC}
    labels = {}
    for name in ("full", "lean"):
        labels[name] = [
            image_to_numpy_copy(m.msg) for m in read_messages(tmp_path / name / "segmented", [LABELS_TOPIC])
        ]
    assert len(labels["lean"]) == len(full.pairs)
    for a, b in zip(labels["full"], labels["lean"]):
        np.testing.assert_array_equal(a, b)
    # the ground truth is still read for the metrics
    assert lean.metrics["segmentation"]["miou"] == full.metrics["segmentation"]["miou"]

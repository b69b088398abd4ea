"""rgbt-seg pairs: bags in (ROS 2 mcap / sqlite3, ROS 1), counts and CSV out, missing topics named."""

from __future__ import annotations

import argparse
import csv

import numpy as np
import pytest
from rosbags.rosbag1 import Writer as Rosbag1Writer
from rosbags.typesys import Stores, get_typestore

from rgbt_seg_ros.data.bags import read_messages, stamp_to_ns
from rgbt_seg_ros.data.sample_bag import write_sample_bag
from rgbt_seg_ros.tools import pairs as pairs_tool


def parse(argv):
    parser = argparse.ArgumentParser()
    pairs_tool.add_arguments(parser)
    return parser.parse_args(argv)


def read_csv(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return [(int(r["rgb_stamp_ns"]), int(r["thermal_stamp_ns"]), float(r["dt_ms"])) for r in rows]


def nearest_pairs(rgb, thermal, slop_ns):
    """Reference for well-separated frames: each RGB stamp with its nearest thermal stamp within slop."""
    out = []
    for r in rgb:
        t = min(thermal, key=lambda t: abs(t - r))
        if abs(t - r) <= slop_ns:
            out.append((r, t))
    return out


@pytest.fixture(scope="module")
def sample_bags(tmp_path_factory):
    root = tmp_path_factory.mktemp("bags")
    mcap = write_sample_bag(
        root / "a", frames=24, fps=10, drop_rate=0.2, storage="mcap", seed=4, rgb_size=(96, 128), thermal_size=(96, 128)
    )
    sqlite = write_sample_bag(
        root / "b", frames=12, fps=10, storage="sqlite3", seed=5, rgb_size=(96, 128), thermal_size=(96, 128)
    )
    return mcap, sqlite


@pytest.mark.parametrize("which", [0, 1])
def test_pairs_csv_matches_the_bag(sample_bags, tmp_path, capsys, which):
    bag = sample_bags[which]
    out = tmp_path / "pairs.csv"
    assert pairs_tool.run(parse([str(bag), "--slop", "0.04", "--csv", str(out)])) == 0
    printed = capsys.readouterr().out
    rgb = [stamp_to_ns(m.msg.header.stamp) for m in read_messages(bag, ["/rgb/image"])]
    th = [stamp_to_ns(m.msg.header.stamp) for m in read_messages(bag, ["/thermal/image"])]
    rows = read_csv(out)
    assert [(r, t) for r, t, _ in sorted(rows)] == nearest_pairs(rgb, th, 40_000_000)
    for r, t, dt in rows:
        assert dt == pytest.approx((t - r) / 1e6, abs=1e-6)
    assert f"received rgb={len(rgb)} thermal={len(th)}; paired={len(rows)}" in printed
    if which == 0:
        assert len(rows) < 24  # the drops are accounted for, not papered over
        assert "dropped unmatched" in printed


def test_exact_mode_pairs_nothing_on_offset_streams(sample_bags, capsys):
    assert pairs_tool.run(parse([str(sample_bags[1]), "--exact"])) == 0
    assert "paired=0;" in capsys.readouterr().out


def test_missing_topic_exits_nonzero_with_a_clear_message(sample_bags, capsys):
    code = pairs_tool.run(parse([str(sample_bags[1]), "--thermal-topic", "/lwir/image"]))
    err = capsys.readouterr().err
    assert code != 0
    assert "has no topic /lwir/image" in err and "/thermal/image" in err


def test_missing_bag_exits_nonzero(tmp_path, capsys):
    assert pairs_tool.run(parse([str(tmp_path / "nope")])) != 0
    assert "nope" in capsys.readouterr().err


def test_ros1_bag_with_out_of_order_arrivals(tmp_path, capsys):
    """A ROS 1 bag written by hand: 30 Hz RGB, 15 Hz thermal, one thermal recorded late."""
    store = get_typestore(Stores.ROS1_NOETIC)
    image_t = store.types["sensor_msgs/msg/Image"]
    header_t = store.types["std_msgs/msg/Header"]
    time_t = store.types["builtin_interfaces/msg/Time"]
    base = 1_700_000_000_000_000_000

    def image(stamp):
        hdr = header_t(seq=0, stamp=time_t(sec=stamp // 10**9, nanosec=stamp % 10**9), frame_id="cam")
        return image_t(
            header=hdr, height=2, width=2, encoding="mono8", is_bigendian=0, step=2, data=np.zeros(4, np.uint8)
        )

    rgb = [base + i * 33_333_333 for i in range(30)]
    th = [base + 2_000_000 + i * 66_666_667 for i in range(15)]
    events = [(s + 5_000_000, "/rgb/image", s) for s in rgb] + [(s + 9_000_000, "/thermal/image", s) for s in th]
    events = [(rx + (80_000_000 if s == th[6] else 0), topic, s) for rx, topic, s in events]  # th[6] arrives late
    events.sort()
    path = tmp_path / "ros1.bag"
    with Rosbag1Writer(path) as writer:
        conns = {
            t: writer.add_connection(t, "sensor_msgs/msg/Image", typestore=store)
            for t in ("/rgb/image", "/thermal/image")
        }
        for rx, topic, s in events:
            writer.write(conns[topic], rx, store.serialize_ros1(image(s), "sensor_msgs/msg/Image"))
    out = tmp_path / "p.csv"
    assert (
        pairs_tool.run(parse([str(path), "--slop", "0.01", "--queue-size", "8", "--max-wait", "1", "--csv", str(out)]))
        == 0
    )
    rows = read_csv(out)
    assert sorted((r, t) for r, t, _ in rows) == [(rgb[2 * i], th[i]) for i in range(15)]
    # --max-wait 0 releases at once, as the node does: the RGB frame of the late thermal is given up
    at_once = parse([str(path), "--slop", "0.01", "--queue-size", "8", "--max-wait", "0", "--csv", str(out)])
    assert pairs_tool.run(at_once) == 0
    assert len(read_csv(out)) == 14


@pytest.mark.parametrize(
    "flag, value, fragment",
    [
        ("--max-wait", "-1", "sync.max_wait must be >= 0.0"),
        ("--max-wait", "9", "sync.max_wait must be <= 2.0"),
        ("--slop", "-0.01", "sync.slop must be >= 0.0"),
        ("--queue-size", "0", "sync.queue_size must be >= 1"),
    ],
)
def test_values_outside_the_nodes_ranges_are_refused(sample_bags, capsys, flag, value, fragment):
    assert pairs_tool.run(parse([str(sample_bags[1]), flag, value])) == 2
    err = capsys.readouterr().err
    assert f"{flag} {value}" in err and fragment in err

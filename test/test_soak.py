"""A one-minute soak of the live node over DDS (`rgbt-seg bench soak --short`); the 30-minute run is a benchmark.

Thermal flaps, an RGB stall, a joint pause and bursts (pairs back to back, oversize and wrongly encoded
frames) on a fixed schedule: the node must switch to rgb_only exactly when RGB goes on alone for
thermal_timeout, count every bad or oversize frame, keep segmenting and keep its memory bounded.
"""

import pytest

from conftest import make_micro_checkpoint
from rgbt_seg_ros.ros.soak import SoakPlan, bench_soak

pytestmark = pytest.mark.integration


def test_one_minute_soak_with_flaps_stall_pause_and_bursts(tmp_path, ros_env, monkeypatch):
    monkeypatch.setenv("ROS_DOMAIN_ID", ros_env["ROS_DOMAIN_ID"])
    monkeypatch.setenv("ROS_LOG_DIR", ros_env["ROS_LOG_DIR"])
    plan = SoakPlan.short(60.0)
    assert plan.expected_switches() == 5  # four flaps in the clear, one that ends the run; none for stall/pause
    r = bench_soak(make_micro_checkpoint(tmp_path / "micro"), plan, progress=None)
    print(r)
    assert r["node_alive"] and r["errors_in_log"] == 0
    assert r["rgb_only_switches"]["observed"] == r["rgb_only_switches"]["expected"]
    assert r["thermal_back"] >= r["rgb_only_switches"]["observed"] - 1  # the last flap lasts to the end
    # every bad or oversize frame is refused (bad_image / oversize) or counted as lost before delivery
    # (a best-effort burst can lose any frame, so the two are checked together)
    refused = r["rgb_rejected"].get("bad_image", 0) + r["rgb_rejected"].get("oversize", 0)
    assert r["rgb_rejected"].get("bad_image", 0) >= 1
    assert refused + r["rgb_lost_in_transport"] >= r["sent"]["bad_encoding"] + r["sent"]["oversize"]
    assert r["labels"] > 0.3 * r["sent"]["pairs"]
    assert r["drops"]["superseded"] > 0  # the bursts overran the model: dropped, not queued
    frame_mb = plan.oversize[0] * plan.oversize[1] * 3 / 2**20
    assert r["rss_drift_mb"] < 5 * frame_mb, r["rss_mb"]  # bounded: the middleware's buffers, no per-frame leak


def test_a_burst_of_oversize_frames_leaves_no_memory_behind(tmp_path, ros_env, monkeypatch):
    """30 frames of 20 MP on reliable QoS, all delivered and refused: the node's RSS comes back.

    Before the package's Fast DDS profile (readers free each sample) the node kept ~350 MB of such a burst.
    """
    from rgbt_seg_ros.ros.soak import bench_oversize

    monkeypatch.setenv("ROS_LOG_DIR", ros_env["ROS_LOG_DIR"])
    r = bench_oversize(make_micro_checkpoint(tmp_path / "micro"), frames=30, rate=40.0, reliability="reliable")
    print(r)
    # (on reliable KEEP_LAST the publisher's own history may overwrite some frames of a 40 Hz burst before they
    # are sent: those never reach the node; the best-effort accounting is test_one_minute_soak_...). Refused +
    # lost measured on this 2-core machine: 16-18 of 30 on a quiet host, 8 and 9 in full-suite runs; the memory
    # checks below are the point, this one only says that a good part of the burst arrived
    assert r["refused_megapixels"] + r["lost_in_transport"] >= 5
    assert r["labels_after"] > 0  # still segmenting
    assert r["rss_mb"]["peak"] - r["rss_mb"]["before"] > 60  # the burst did reach the node
    assert r["rss_after_minus_before_mb"] < 60, r["rss_mb"]  # less than one 60 MB frame stays


def test_the_node_points_fast_dds_at_the_package_profile_unless_the_user_chose_one():
    from rgbt_seg_ros.resources import share_path
    from rgbt_seg_ros.ros.node import middleware_defaults

    env = {}
    assert middleware_defaults(env) == str(share_path("config", "fastdds_profiles.xml"))
    assert env["RMW_FASTRTPS_USE_QOS_FROM_XML"] == "1"
    assert (
        "<historyMemoryPolicy>DYNAMIC</historyMemoryPolicy>" in share_path("config", "fastdds_profiles.xml").read_text()
    )
    mine = {"FASTDDS_DEFAULT_PROFILES_FILE": "/etc/robot/fastdds.xml"}
    assert middleware_defaults(mine) is None and "RMW_FASTRTPS_USE_QOS_FROM_XML" not in mine
    assert middleware_defaults({"RMW_IMPLEMENTATION": "rmw_cyclonedds_cpp"}) is None

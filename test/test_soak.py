"""A one-minute soak of the live node over DDS (`rgbt-seg bench soak --short`); the 30-minute run is a benchmark.

Thermal flaps, an RGB stall, a joint pause and bursts (pairs back to back, oversize and wrongly encoded
frames) on a fixed schedule: the node must switch to rgb_only exactly when RGB goes on alone for
thermal_timeout, count every bad or oversize frame, keep segmenting and keep its memory bounded.
"""

import pytest

from conftest import make_micro_checkpoint
from rgbt_seg_ros.soak import SoakPlan, bench_soak

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
    assert r["rgb_rejected"].get("bad_image", 0) == r["sent"]["bad_encoding"]
    oversize_counted = r["rgb_rejected"].get("oversize", 0) + r["rgb_lost_in_transport"]
    assert oversize_counted >= r["sent"]["oversize"]  # refused with the megapixel message, or counted as lost
    assert r["labels"] > 0.3 * r["sent"]["pairs"]
    assert r["drops"]["superseded"] > 0  # the bursts overran the model: dropped, not queued
    frame_mb = plan.oversize[0] * plan.oversize[1] * 3 / 2**20
    assert r["rss_drift_mb"] < 5 * frame_mb, r["rss_mb"]  # bounded: the middleware's buffers, no per-frame leak

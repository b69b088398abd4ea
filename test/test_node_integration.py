"""segment_node as a real process over real DDS: converts images, reports diagnostics, survives bad input."""

import subprocess
import time

import numpy as np
import pytest
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image

from conftest import script
from rgbt_seg_ros.imaging import fill_image_msg

pytestmark = pytest.mark.integration


def _values(status):
    return {kv.key: kv.value for kv in status.values}


def test_node_counts_images_and_rejects_bad_ones(ros_env):
    proc = subprocess.Popen(
        [
            script("segment_node"),
            "--ros-args",
            "-r",
            "__ns:=/itest",
            "-r",
            "rgb/image:=/cam/rgb",
            "-r",
            "thermal/image:=/cam/thermal",
        ],
        env=ros_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=int(ros_env["ROS_DOMAIN_ID"]))
    node = rclpy.create_node("itest_publisher", context=context)
    executor = rclpy.executors.SingleThreadedExecutor(context=context)
    executor.add_node(node)
    try:
        rgb_pub = node.create_publisher(Image, "/cam/rgb", qos_profile_sensor_data)
        th_pub = node.create_publisher(Image, "/cam/thermal", qos_profile_sensor_data)
        diagnostics = []
        node.create_subscription(DiagnosticArray, "/diagnostics", diagnostics.append, 10)
        rgb = fill_image_msg(Image(), np.zeros((48, 64, 3), np.uint8), "bgr8")
        thermal = fill_image_msg(Image(), np.full((48, 64), 30000, np.uint16), "mono16")
        bad = fill_image_msg(Image(), np.zeros((48, 64), np.uint16), "mono16")
        bad.encoding = "yuv422"  # unsupported on the RGB input
        short = fill_image_msg(Image(), np.zeros((48, 64), np.uint16), "mono16")
        short.data = short.data[:100]
        deadline = time.monotonic() + 60
        last = None
        sent = 0
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            rgb_pub.publish(rgb)
            th_pub.publish(thermal)
            if sent % 5 == 0:
                rgb_pub.publish(bad)
                th_pub.publish(short)
            sent += 1
            executor.spin_once(timeout_sec=0.05)
            for arr in diagnostics:
                for st in arr.status:
                    if st.name.endswith("cameras"):
                        last = _values(st)
            if (
                last
                and int(last["rgb received"]) >= 10
                and int(last["thermal rejected"]) >= 1
                and int(last["rgb rejected"]) >= 1
            ):
                break
        assert last is not None, "no diagnostics from segment_node"
        assert int(last["rgb received"]) >= 10 and int(last["thermal received"]) >= 10
        assert "unsupported image encoding 'yuv422'" in last["rgb last error"]
        assert "expected step*height" in last["thermal last error"]
        assert proc.poll() is None  # still running after bad input
    finally:
        node.destroy_node()
        rclpy.shutdown(context=context)
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert "rejected" in out  # the throttled warning was logged

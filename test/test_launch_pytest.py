"""The launch file run for real with launch_pytest, where ROS 2's launch stack is installed (on a robot).

launch, launch_ros and launch_pytest cannot be installed from PyPI, so this module is skipped here;
test_launch_files.py checks the launch file statically instead. On a ROS 2 machine:
    colcon build --packages-select rgbt_seg_ros && colcon test --packages-select rgbt_seg_ros
"""

import time
from pathlib import Path

import numpy as np
import pytest

launch_pytest = pytest.importorskip("launch_pytest", reason="launch_pytest is not installable here (ROS 2 only)")

import rclpy  # noqa: E402
from ament_index_python.packages import get_package_share_directory  # noqa: E402
from launch import LaunchDescription  # noqa: E402
from launch.actions import IncludeLaunchDescription  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from rgbt_seg_ros.pipeline.imaging import fill_image_msg, image_to_numpy  # noqa: E402

SHARE = Path(get_package_share_directory("rgbt_seg_ros"))


@launch_pytest.fixture
def launch_description():
    include = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(str(SHARE / "launch" / "segment.launch.py")),
        launch_arguments={
            "checkpoint": str(SHARE / "models" / "demo"),
            "device": "cpu",
            "rgb_topic": "/lt/rgb",
            "thermal_topic": "/lt/thermal",
        }.items(),
    )
    return LaunchDescription([include, launch_pytest.actions.ReadyToTest()])


@pytest.mark.launch(fixture=launch_description)
def test_launch_file_brings_up_a_segmenting_node():
    rclpy.init()
    node = rclpy.create_node("launch_test_client")
    try:
        received = []
        node.create_subscription(Image, "/rgbt_seg/labels", received.append, 10)
        rgb_pub = node.create_publisher(Image, "/lt/rgb", 10)
        th_pub = node.create_publisher(Image, "/lt/thermal", 10)
        rgb = fill_image_msg(Image(), np.full((120, 160, 3), 90, np.uint8), "rgb8")
        th = fill_image_msg(Image(), np.full((120, 160), 30000, np.uint16), "mono16")
        deadline = time.monotonic() + 120
        while not received and time.monotonic() < deadline:
            now = node.get_clock().now().to_msg()
            rgb.header.stamp = th.header.stamp = now
            rgb.header.frame_id = "rgb_camera_optical_frame"
            rgb_pub.publish(rgb)
            th_pub.publish(th)
            rclpy.spin_once(node, timeout_sec=0.1)
        assert received, "no labels from the launched node"
        labels = image_to_numpy(received[0])
        assert labels.shape == (120, 160) and received[0].header.frame_id == "rgb_camera_optical_frame"
    finally:
        node.destroy_node()
        rclpy.shutdown()

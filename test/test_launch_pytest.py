"""The launch description run by launch_pytest, as a package's own launch tests do (``colcon test`` on a robot).

launch_pytest and launch come from ``make ros2-tools`` (../shared/ros2) or a sourced ROS 2. The test builds
the description with :func:`rgbt_seg_ros.ros.launch_description.segment_launch`, which hands it the node
action: it waits for the node's own "active" line, talks to the node over DDS (every launch argument at its
default: the shipped parameters and the demo checkpoint), and after the launch has shut down reads the
node's exit code.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from ros2_cli import MISSING

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
    pytest.mark.timeout(400),
]

if MISSING is None:
    import launch_pytest
    from launch import LaunchDescription, LaunchDescriptionSource
    from launch.actions import IncludeLaunchDescription, SetEnvironmentVariable
    from launch_pytest.tools import process as process_tools

    from rgbt_seg_ros.ros.launch_description import segment_launch

    @pytest.fixture
    def segment():
        return segment_launch(cached_output=True)

    @launch_pytest.fixture
    def launch_description(segment, ros_env):
        return LaunchDescription(
            [
                SetEnvironmentVariable("ROS_DOMAIN_ID", ros_env["ROS_DOMAIN_ID"]),
                SetEnvironmentVariable("ROS_LOG_DIR", ros_env["ROS_LOG_DIR"]),
                IncludeLaunchDescription(LaunchDescriptionSource(segment.description)),
                launch_pytest.actions.ReadyToTest(),
            ]
        )

    @pytest.mark.launch(fixture=launch_description)
    def test_the_default_launch_segments_and_its_node_exits_cleanly(segment, launch_context, ros_env):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import Image

        from rgbt_seg_ros.pipeline.imaging import fill_image_msg, image_to_numpy

        process_tools.assert_output_sync(
            launch_context, segment.node, lambda out: "]: active: rgb /rgb/image" in out, timeout=240
        )
        context = rclpy.Context()
        rclpy.init(context=context, domain_id=int(ros_env["ROS_DOMAIN_ID"]))
        node = rclpy.create_node("launch_pytest_client", context=context)
        executor = rclpy.executors.SingleThreadedExecutor(context=context)
        executor.add_node(node)
        try:
            labels, diagnostics = [], []
            node.create_subscription(Image, "/rgbt_seg/labels", labels.append, 10)
            node.create_subscription(DiagnosticArray, "/diagnostics", diagnostics.append, 10)
            rgb_pub = node.create_publisher(Image, "/rgb/image", qos_profile_sensor_data)
            th_pub = node.create_publisher(Image, "/thermal/image", qos_profile_sensor_data)
            rgb = fill_image_msg(Image(), np.full((120, 160, 3), 90, np.uint8), "rgb8")
            th = fill_image_msg(Image(), np.full((120, 160), 30000, np.uint16), "mono16")
            rgb.header.frame_id = "rgb_camera_optical_frame"
            deadline = time.monotonic() + 120
            while not (labels and diagnostics) and time.monotonic() < deadline:
                rgb.header.stamp = th.header.stamp = node.get_clock().now().to_msg()
                rgb_pub.publish(rgb)
                th_pub.publish(th)
                end = time.monotonic() + 0.1
                while time.monotonic() < end:
                    executor.spin_once(timeout_sec=0.02)
            assert labels, "no labels from the launched node:\n" + segment.node.get_stdout()[-3000:]
            assert image_to_numpy(labels[0]).shape == (120, 160)
            assert labels[0].header.frame_id == "rgb_camera_optical_frame"
            names = {status.name for array in diagnostics for status in array.status}
            assert "/rgbt_seg: pipeline" in names
        finally:
            executor.shutdown()
            node.destroy_node()
            rclpy.shutdown(context=context)
        yield
        # after the launch shut down (SIGINT to the node, as Ctrl-C): the node action's exit code
        assert segment.node.return_code == 0, segment.node.get_stdout()[-3000:]

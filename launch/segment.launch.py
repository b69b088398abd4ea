"""Launch segment_node with its parameter file; remap the camera topics.

ros2 launch rgbt_seg_ros segment.launch.py rgb_topic:=/camera/color/image_raw thermal_topic:=/boson/image_raw
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription


def generate_launch_description():
    share = get_package_share_directory("rgbt_seg_ros")
    args = [
        DeclareLaunchArgument(
            "params_file",
            default_value=os.path.join(share, "config", "segment.yaml"),
            description="parameter file for segment_node",
        ),
        DeclareLaunchArgument("rgb_topic", default_value="/rgb/image_raw", description="RGB image topic"),
        DeclareLaunchArgument("thermal_topic", default_value="/thermal/image_raw", description="thermal image topic"),
        DeclareLaunchArgument("namespace", default_value="rgbt_seg", description="namespace of the node"),
        DeclareLaunchArgument("log_level", default_value="info", description="ROS log level"),
    ]
    node = Node(
        package="rgbt_seg_ros",
        executable="segment_node",
        name="rgbt_seg",
        namespace=LaunchConfiguration("namespace"),
        parameters=[LaunchConfiguration("params_file")],
        remappings=[
            ("rgb/image", LaunchConfiguration("rgb_topic")),
            ("thermal/image", LaunchConfiguration("thermal_topic")),
        ],
        arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level")],
        output="screen",
        emulate_tty=True,
    )
    return LaunchDescription(args + [node])

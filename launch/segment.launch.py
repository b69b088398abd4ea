"""Launch segment_node (and optionally rviz2 and a bag) for RGB-thermal segmentation.

    ros2 launch rgbt_seg_ros segment.launch.py rgb_topic:=/camera/color/image_raw thermal_topic:=/boson/image_raw
    ros2 launch rgbt_seg_ros segment.launch.py checkpoint:=/path/to/ckpt device:=cuda use_rviz:=true
    ros2 launch rgbt_seg_ros segment.launch.py bag:=/path/to/bag use_rviz:=true
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PythonExpression
from launch_ros.actions import Node

ARGUMENTS = {
    "params_file": ("config/segment.yaml", "parameter file for segment_node"),
    "model_config": ("models/sartm_tiny.yaml", "model config used when no checkpoint is given"),
    "checkpoint": ("models/demo", "checkpoint directory (model.safetensors + config.yaml); empty: model_config"),
    "device": ("auto", "inference device: auto, cpu or cuda"),
    "rgb_topic": ("/rgb/image_raw", "RGB image topic"),
    "thermal_topic": ("/thermal/image_raw", "thermal image topic"),
    "namespace": ("", "namespace of the node (outputs: <namespace>/rgbt_seg/labels, ...)"),
    "use_rviz": ("false", "start rviz2 with config/rgbt_seg.rviz"),
    "bag": ("", "optional: play this bag with `ros2 bag play` (looped)"),
    "log_level": ("info", "ROS log level of the node"),
}


def generate_launch_description():
    share = get_package_share_directory("rgbt_seg_ros")
    args = []
    for name, (default, description) in ARGUMENTS.items():
        if name == "params_file":
            default = os.path.join(share, default)
        args.append(DeclareLaunchArgument(name, default_value=default, description=description))
    cfg = LaunchConfiguration
    node = Node(
        package="rgbt_seg_ros",
        executable="segment_node",
        name="rgbt_seg",
        namespace=cfg("namespace"),
        parameters=[
            cfg("params_file"),
            {
                "model.config": cfg("model_config"),
                "model.checkpoint": cfg("checkpoint"),
                "model.device": cfg("device"),
                "topics.rgb": cfg("rgb_topic"),
                "topics.thermal": cfg("thermal_topic"),
            },
        ],
        arguments=["--ros-args", "--log-level", cfg("log_level")],
        output="screen",
        emulate_tty=True,
    )
    rviz = Node(
        package="rviz2",
        executable="rviz2",
        arguments=["-d", os.path.join(share, "config", "rgbt_seg.rviz")],
        condition=IfCondition(cfg("use_rviz")),
        output="log",
    )
    bag = ExecuteProcess(
        cmd=["ros2", "bag", "play", "--loop", cfg("bag")],
        condition=IfCondition(PythonExpression(["'", cfg("bag"), "' != ''"])),
        output="screen",
    )
    return LaunchDescription([*args, node, rviz, bag])

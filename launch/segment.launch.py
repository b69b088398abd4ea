"""Launch segment_node (optionally managed, with rviz2 and a bag) for RGB-thermal segmentation.

    ros2 launch rgbt_seg_ros segment.launch.py rgb_topic:=/camera/color/image_raw thermal_topic:=/boson/image_raw
    ros2 launch rgbt_seg_ros segment.launch.py params_file:=my_robot.yaml namespace:=front device:=cuda
    ros2 launch rgbt_seg_ros segment.launch.py bag:=/path/to/bag use_rviz:=true        # sim time, --clock
    ros2 launch rgbt_seg_ros segment.launch.py managed:=true autostart:=false          # lifecycle node

`ros2 launch rgbt_seg_ros segment.launch.py --show-args` lists every argument. What each argument
does (and the precedence: your params_file wins over launch defaults, an argument you give wins over
the file) is decided by rgbt_seg_ros.ros.launch_plan, which the test suite checks without ROS installed.
"""

import tempfile

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import (
    DeclareLaunchArgument,
    EmitEvent,
    ExecuteProcess,
    LogInfo,
    OpaqueFunction,
    RegisterEventHandler,
)
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition

from rgbt_seg_ros.ros.launch_plan import ARGUMENTS, launch_plan


def _start(context, *args, **kwargs):
    values = {name: LaunchConfiguration(name).perform(context) for name in ARGUMENTS}
    plan = launch_plan(values, get_package_share_directory("rgbt_seg_ros"))
    spec = plan.node
    common = dict(
        package="rgbt_seg_ros",
        executable=spec.executable,
        name=spec.name,
        namespace=spec.namespace,
        parameters=spec.parameters,
        remappings=spec.remappings,
        ros_arguments=spec.ros_arguments,
        arguments=spec.arguments,
        output="screen",
        emulate_tty=True,
    )
    actions = [LogInfo(msg=note) for note in plan.notes]
    if spec.managed:
        node = LifecycleNode(**common)
        actions.append(node)
        if spec.autostart:
            change = dict(lifecycle_node_matcher=matches_action(node))
            actions.append(EmitEvent(event=ChangeState(transition_id=Transition.TRANSITION_CONFIGURE, **change)))
            actions.append(
                RegisterEventHandler(
                    OnStateTransition(
                        target_lifecycle_node=node,
                        start_state="configuring",
                        goal_state="inactive",
                        entities=[EmitEvent(event=ChangeState(transition_id=Transition.TRANSITION_ACTIVATE, **change))],
                    )
                )
            )
    else:
        actions.append(Node(**common))
    if plan.rviz_config_text is not None:
        with tempfile.NamedTemporaryFile("w", suffix=".rviz", prefix="rgbt_seg_", delete=False) as f:
            f.write(plan.rviz_config_text)
        rviz_params = [{"use_sim_time": plan.use_sim_time}] if plan.use_sim_time is not None else []
        actions.append(
            Node(package="rviz2", executable="rviz2", arguments=["-d", f.name], parameters=rviz_params, output="log")
        )
    if plan.bag_command is not None:
        actions.append(ExecuteProcess(cmd=plan.bag_command, output="screen"))
    return actions


def generate_launch_description():
    declared = [
        DeclareLaunchArgument(name, default_value=default, description=description)
        for name, (default, description) in ARGUMENTS.items()
    ]
    return LaunchDescription([*declared, OpaqueFunction(function=_start)])

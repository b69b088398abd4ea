"""Launch segment_node (optionally managed, with rviz2 and a bag) for RGB-thermal segmentation.

    ros2 launch rgbt_seg_ros segment.launch.py rgb_topic:=/camera/color/image_raw thermal_topic:=/boson/image_raw
    ros2 launch rgbt_seg_ros segment.launch.py params_file:=my_robot.yaml namespace:=front device:=cuda
    ros2 launch rgbt_seg_ros segment.launch.py bag:=/path/to/bag use_rviz:=true        # sim time, --clock
    ros2 launch rgbt_seg_ros segment.launch.py managed:=true autostart:=false          # lifecycle node

`ros2 launch rgbt_seg_ros segment.launch.py --show-args` lists every argument and its allowed values;
`-p` prints what it starts. The description is built by rgbt_seg_ros.ros.launch_description (a parent
launch file or a launch test can build it too and reach the node action); the rules (your params_file
wins over launch defaults, an argument you give wins over the file, namespace relative to a pushed one,
sim time with a bag) are in rgbt_seg_ros.ros.launch_plan.
"""

from rgbt_seg_ros.ros.launch_description import generate_launch_description

__all__ = ["generate_launch_description"]

"""The launch file's rules as plain functions, and its rviz2 config; checked without ROS 2's launch stack.

``rgbt_seg_ros.ros.launch_plan`` holds what ``launch/segment.launch.py`` decides (argument values and
choices, the parameter file, the clock, the rviz2 config for the node's name, the checks before anything
starts); these tests run everywhere. test/test_ros2_launch.py and test/test_launch_pytest.py run the launch
file itself with the real ``ros2 launch`` and launch_pytest.
"""

import pytest
import yaml

from conftest import REPO
from rgbt_seg_ros.pipeline.params import BAG_PARAMS, SPEC_BY_NAME
from rgbt_seg_ros.resources import share_dir
from rgbt_seg_ros.ros.launch_plan import (
    ARGUMENTS,
    PARAMETER_ARGUMENTS,
    REMAP_ARGUMENTS,
    LaunchArgumentError,
    argument_values,
    check_arguments,
    params_file_for,
    rviz_config_for,
    use_sim_time_for,
)

SHARE = REPO


def test_the_parameter_file_is_the_users_else_the_bags_own_else_the_shipped_defaults(tmp_path):
    assert params_file_for(argument_values({}), SHARE) == str(SHARE / "config" / "segment.yaml")
    bag = tmp_path / "bag"
    bag.mkdir()
    assert params_file_for(argument_values({"bag": str(bag)}), SHARE) == str(SHARE / "config" / "segment.yaml")
    (bag / BAG_PARAMS).write_text("/**:\n  ros__parameters:\n    thermal:\n      mode: linear\n")
    assert params_file_for(argument_values({"bag": str(bag)}), SHARE) == str(bag / BAG_PARAMS)
    assert params_file_for(argument_values({"bag": str(bag), "params_file": "/x.yaml"}), SHARE) == "/x.yaml"


def test_sim_time_follows_a_bag_unless_given():
    assert use_sim_time_for(argument_values({})) == ""  # the parameter file's value
    assert use_sim_time_for(argument_values({"bag": "/b"})) == "true"
    assert use_sim_time_for(argument_values({"bag": "/b", "use_sim_time": "False"})) == "false"
    assert use_sim_time_for(argument_values({"use_sim_time": "true"})) == "true"


def test_arguments_override_parameters_or_remap_inputs_and_enumerations_come_from_the_schema():
    assert set(PARAMETER_ARGUMENTS.values()) <= set(SPEC_BY_NAME)
    for name, param in PARAMETER_ARGUMENTS.items():
        assert ARGUMENTS[name].default == ""  # left alone, nothing is passed: a user's file is never overridden
        if SPEC_BY_NAME[param].choices:
            assert ARGUMENTS[name].choices == ("", *SPEC_BY_NAME[param].choices), name
    assert set(REMAP_ARGUMENTS.values()) == {"rgb/image", "thermal/image", "rgb/camera_info", "thermal/camera_info"}
    for spec_name in SPEC_BY_NAME:
        assert not spec_name.startswith("topics."), "topics are remapped, not parameters"
    for argument in ARGUMENTS.values():  # a default outside its choices would fail every launch
        assert argument.choices is None or argument.default in argument.choices, argument.name
    assert {"debug", "info", "warn", "error", "fatal"} <= set(ARGUMENTS["log_level"].choices)
    assert "verbose" not in ARGUMENTS["log_level"].choices


def test_checks_before_anything_starts(tmp_path):
    def has(*names):
        return lambda name: name in names

    assert check_arguments(argument_values({}), has()) == []
    with pytest.raises(LaunchArgumentError, match="params_file:=/no/file.yaml: there is no such file"):
        check_arguments(argument_values({"params_file": "/no/file.yaml"}), has())
    with pytest.raises(LaunchArgumentError, match="use_rviz:=true needs rviz2"):
        check_arguments(argument_values({"use_rviz": "true"}), has())
    assert check_arguments(argument_values({"use_rviz": "True"}), has("rviz2")) == []
    bag = tmp_path / "bag"
    with pytest.raises(LaunchArgumentError, match="no such bag"):
        check_arguments(argument_values({"bag": str(bag)}), has("ros2bag"))
    bag.mkdir()
    with pytest.raises(LaunchArgumentError, match="needs ros2bag, which is not installed.*bag_player:=rgbt_seg"):
        check_arguments(argument_values({"bag": str(bag)}), has())
    assert check_arguments(argument_values({"bag": str(bag), "bag_player": "rgbt_seg"}), has("rgbt_seg_ros")) == []
    (bag / BAG_PARAMS).write_text("")
    notes = check_arguments(argument_values({"bag": str(bag), "bag_player": "rgbt_seg"}), has("rgbt_seg_ros"))
    assert notes == [f"using the bag's own parameter file {bag / BAG_PARAMS}"]


def test_rviz_config_follows_the_nodes_final_name():
    template = (REPO / "config" / "rgbt_seg.rviz").read_text()
    topics = _rviz_topics(yaml.safe_load(rviz_config_for(template, "/robot1/front/rgbt_seg")))
    assert topics == {
        "/robot1/front/rgbt_seg/overlay",
        "/robot1/front/rgbt_seg/labels",
        "/robot1/front/rgbt_seg/thermal_registered",
    }
    assert _rviz_topics(yaml.safe_load(rviz_config_for(template, "/rgbt_seg"))) == _rviz_topics(
        yaml.safe_load(template)
    )


def _rviz_topics(rviz: dict) -> set:
    displays = rviz["Visualization Manager"]["Displays"]
    return {d["Topic"]["Value"] for d in displays if d["Class"] == "rviz_default_plugins/Image"}


def test_files_the_launch_file_references_are_installed():
    share = share_dir()
    for rel in ("config/segment.yaml", "config/rgbt_seg.rviz", "launch/segment.launch.py", "models/demo/config.yaml"):
        assert (share / rel).is_file(), rel


def test_rviz_config_parses_and_shows_the_node_outputs():
    with open(REPO / "config" / "rgbt_seg.rviz") as f:
        rviz = yaml.safe_load(f)
    topics = _rviz_topics(rviz)
    # default namespace "" and node name rgbt_seg: private topics are /rgbt_seg/<output>
    assert topics == {"/rgbt_seg/overlay", "/rgbt_seg/labels", "/rgbt_seg/thermal_registered"}
    from rgbt_seg_ros.ros.node import NODE_NAME, OUTPUT_TOPICS

    assert NODE_NAME == "rgbt_seg"
    for topic in topics:
        assert f"~/{topic.rsplit('/', 1)[1]}" in OUTPUT_TOPICS.values()
    assert rviz["Visualization Manager"]["Global Options"]["Fixed Frame"]

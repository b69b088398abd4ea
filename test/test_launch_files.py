"""Launch file and rviz2 config, checked without ROS 2's launch stack (not installable here).

Two levels: ``rgbt_seg_ros.ros.launch_plan`` (what the launch file decides: parameter precedence,
remappings, sim time, rviz, bag play) is tested directly; then ``launch/segment.launch.py`` itself
is executed against a recording stand-in of the launch API, to check that it hands those decisions
to the real actions unchanged. test/test_launch_pytest.py runs the launch file for real where
launch_pytest is installed (on a robot).
"""

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from rgbt_seg_ros.pipeline.params import BAG_PARAMS, SPEC_BY_NAME, load_param_file
from rgbt_seg_ros.resources import share_dir
from rgbt_seg_ros.ros.launch_plan import ARGUMENTS, LaunchArgumentError, launch_plan, rviz_config_for

LAUNCH = REPO / "launch" / "segment.launch.py"
SHARE = REPO
USER_FILE = "/**:\n  ros__parameters:\n    model:\n      device: cuda\n      checkpoint: /robot/ckpt\n"


def effective_parameters(plan, tmp_path: Path) -> dict:
    """What the node ends up with: files and override dicts applied in order, as launch_ros does."""
    values = {}
    for entry in plan.node.parameters:
        if isinstance(entry, dict):
            values.update(entry)
        else:
            values.update(load_param_file(entry))
    return values


def test_a_user_parameter_file_wins_over_every_launch_default(tmp_path):
    user = tmp_path / "robot.yaml"
    user.write_text(USER_FILE)
    plan = launch_plan({"params_file": str(user)}, SHARE)
    values = effective_parameters(plan, tmp_path)
    assert values["model.device"] == "cuda" and values["model.checkpoint"] == "/robot/ckpt"
    assert plan.node.parameters == [str(user)]  # no launch default is passed after the file
    assert plan.node.remappings == [] and plan.use_sim_time is None


def test_an_argument_given_on_the_command_line_wins_over_the_file(tmp_path):
    user = tmp_path / "robot.yaml"
    user.write_text(USER_FILE)
    given = {"params_file": str(user), "device": "cpu", "rgb_transport": "compressed", "class_set": "pst900"}
    plan = launch_plan(given, SHARE)
    values = effective_parameters(plan, tmp_path)
    assert values["model.device"] == "cpu" and values["model.checkpoint"] == "/robot/ckpt"
    assert values["input.rgb.transport"] == "compressed" and values["model.class_set"] == "pst900"


def test_without_a_params_file_the_shipped_defaults_apply():
    plan = launch_plan({}, SHARE)
    assert plan.node.parameters == [str(SHARE / "config" / "segment.yaml")]
    assert plan.node.arguments == [] and not plan.node.managed
    assert plan.node.ros_arguments == ["--log-level", "info"]
    assert plan.bag_command is None and plan.rviz_config_text is None


def test_topics_are_remappings_of_the_relative_inputs_and_namespace_is_normalised():
    plan = launch_plan(
        {
            "rgb_topic": "/camera/color/image_raw",
            "thermal_topic": "/boson/image_raw",
            "thermal_info_topic": "/boson/camera_info",
            "namespace": "front/",
        },
        SHARE,
    )
    assert plan.node.remappings == [
        ("rgb/image", "/camera/color/image_raw"),
        ("thermal/image", "/boson/image_raw"),
        ("thermal/camera_info", "/boson/camera_info"),
    ]
    assert plan.node.namespace == "/front"
    for spec_name in SPEC_BY_NAME:
        assert not spec_name.startswith("topics."), "topics are remapped, not parameters"


def test_a_bag_turns_on_sim_time_and_the_player_publishes_the_clock(tmp_path):
    bag = tmp_path / "bag"
    bag.mkdir()
    plan = launch_plan({"bag": str(bag)}, SHARE)
    assert plan.use_sim_time is True and plan.node.parameters[-1] == {"use_sim_time": True}
    assert plan.bag_command[:4] == ["ros2", "bag", "play", str(bag)] and "--clock" in plan.bag_command
    explicit = launch_plan({"bag": str(bag), "use_sim_time": "false"}, SHARE)
    assert explicit.use_sim_time is False
    # a bag that carries its rig's parameters (make-sample-bag writes one) is used when no params_file is given
    (bag / BAG_PARAMS).write_text("/**:\n  ros__parameters:\n    thermal:\n      mode: linear\n")
    own = launch_plan({"bag": str(bag)}, SHARE)
    assert own.node.parameters[0] == str(bag / BAG_PARAMS) and own.notes
    user = launch_plan({"bag": str(bag), "params_file": "/x.yaml"}, SHARE)
    assert user.node.parameters[0] == "/x.yaml"


def test_managed_mode_and_bad_flags():
    plan = launch_plan({"managed": "true"}, SHARE)
    assert plan.node.managed and plan.node.arguments == ["--managed"] and plan.node.autostart
    assert not launch_plan({"managed": "true", "autostart": "false"}, SHARE).node.autostart
    with pytest.raises(LaunchArgumentError, match="managed:=maybe must be true or false"):
        launch_plan({"managed": "maybe"}, SHARE)


def test_rviz_config_follows_the_namespace():
    template = (REPO / "config" / "rgbt_seg.rviz").read_text()
    text = rviz_config_for(template, "robot1")
    topics = _rviz_topics(yaml.safe_load(text))
    assert topics == {"/robot1/rgbt_seg/overlay", "/robot1/rgbt_seg/labels", "/robot1/rgbt_seg/thermal_registered"}
    plan = launch_plan({"use_rviz": "true", "namespace": "robot1"}, SHARE)
    assert _rviz_topics(yaml.safe_load(plan.rviz_config_text)) == topics


def _rviz_topics(rviz: dict) -> set:
    displays = rviz["Visualization Manager"]["Displays"]
    return {d["Topic"]["Value"] for d in displays if d["Class"] == "rviz_default_plugins/Image"}


# --------------------------------------------------------------------------- the launch file itself
class Recorded:
    """Any launch action or substitution: keeps its positional and keyword arguments."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class LaunchConfiguration(Recorded):
    def perform(self, context):
        return context.launch_configurations.get(self.args[0], "")


def _launch_api(monkeypatch):
    """A stand-in of the launch API names the launch file imports (launch itself cannot be installed here)."""
    names = {
        "launch": ["LaunchDescription"],
        "launch.actions": [
            "DeclareLaunchArgument",
            "EmitEvent",
            "ExecuteProcess",
            "LogInfo",
            "OpaqueFunction",
            "RegisterEventHandler",
        ],
        "launch.events": [],
        "launch.substitutions": [],
        "launch_ros": [],
        "launch_ros.actions": ["LifecycleNode", "Node"],
        "launch_ros.event_handlers": ["OnStateTransition"],
        "launch_ros.events": [],
        "launch_ros.events.lifecycle": ["ChangeState"],
        "ament_index_python.packages": [],
    }
    for module, classes in names.items():
        mod = types.ModuleType(module)
        for cls in classes:
            setattr(mod, cls, type(cls, (Recorded,), {}))
        monkeypatch.setitem(sys.modules, module, mod)
    sys.modules["launch.events"].matches_action = lambda action: ("matches", action)
    sys.modules["launch.substitutions"].LaunchConfiguration = LaunchConfiguration
    sys.modules["ament_index_python.packages"].get_package_share_directory = lambda pkg: str(SHARE)


def _run_launch_file(monkeypatch, **arguments):
    _launch_api(monkeypatch)
    spec = importlib.util.spec_from_file_location("segment_launch", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    (entities,) = description.args
    declared = {e.args[0]: e.kwargs["default_value"] for e in entities if type(e).__name__ == "DeclareLaunchArgument"}
    opaque = [e for e in entities if type(e).__name__ == "OpaqueFunction"]
    assert declared == {name: default for name, (default, _) in ARGUMENTS.items()}
    assert len(opaque) == 1
    configs = {**declared, **arguments}
    context = types.SimpleNamespace(launch_configurations=configs)
    return opaque[0].kwargs["function"](context)


def test_the_launch_file_starts_what_the_plan_says(monkeypatch, tmp_path):
    user = tmp_path / "robot.yaml"
    user.write_text(USER_FILE)
    actions = _run_launch_file(
        monkeypatch, params_file=str(user), rgb_topic="/cam/rgb", namespace="front", device="cpu", log_level="debug"
    )
    (node,) = [a for a in actions if type(a).__name__ == "Node"]
    kw = node.kwargs
    assert kw["package"] == "rgbt_seg_ros" and kw["executable"] == "segment_node" and kw["name"] == "rgbt_seg"
    assert kw["namespace"] == "/front"
    assert kw["parameters"] == [str(user), {"model.device": "cpu"}]
    assert kw["remappings"] == [("rgb/image", "/cam/rgb")]
    assert kw["ros_arguments"] == ["--log-level", "debug"]
    assert "segment_node = {PACKAGE}.ros.node:main" in (REPO / "setup.py").read_text()


def test_the_launch_file_with_a_bag_rviz_and_a_managed_node(monkeypatch, tmp_path):
    bag = tmp_path / "bag"
    bag.mkdir()
    actions = _run_launch_file(monkeypatch, bag=str(bag), use_rviz="true", managed="true", namespace="r1")
    kinds = [type(a).__name__ for a in actions]
    assert kinds.count("LifecycleNode") == 1 and "Node" in kinds and "ExecuteProcess" in kinds
    lifecycle = actions[kinds.index("LifecycleNode")]
    assert lifecycle.kwargs["arguments"] == ["--managed"]
    assert lifecycle.kwargs["parameters"][-1] == {"use_sim_time": True}
    assert "EmitEvent" in kinds and "RegisterEventHandler" in kinds  # autostart: configure, then activate
    player = actions[kinds.index("ExecuteProcess")]
    assert player.kwargs["cmd"] == ["ros2", "bag", "play", str(bag), "--loop", "--clock"]
    rviz = actions[kinds.index("Node")]
    assert rviz.kwargs["executable"] == "rviz2" and rviz.kwargs["parameters"] == [{"use_sim_time": True}]
    rviz_file = Path(rviz.kwargs["arguments"][1])
    assert "/r1/rgbt_seg/overlay" in rviz_file.read_text()
    rviz_file.unlink()


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

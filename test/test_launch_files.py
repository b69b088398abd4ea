"""Launch file and rviz2 config, checked statically here (launch/launch_ros/rviz2 are not installable here).

The launch_pytest test in test/test_launch_pytest.py runs the launch file for real where ROS 2 is installed.
"""

import ast

import yaml

from conftest import REPO
from rgbt_seg_ros.params import SPEC_BY_NAME
from rgbt_seg_ros.resources import share_dir

LAUNCH = REPO / "launch" / "segment.launch.py"
EXPECTED_ARGS = {
    "params_file",
    "model_config",
    "checkpoint",
    "device",
    "rgb_topic",
    "thermal_topic",
    "namespace",
    "use_rviz",
    "bag",
    "log_level",
}


def _launch_tree():
    return ast.parse(LAUNCH.read_text())


def test_launch_arguments():
    tree = _launch_tree()
    args = next(
        n for n in ast.walk(tree) if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "ARGUMENTS"
    )
    declared = {k.value for k in args.value.keys}
    assert declared == EXPECTED_ARGS


def test_launch_starts_an_executable_that_setup_py_installs_with_existing_parameters():
    text = LAUNCH.read_text()
    assert 'executable="segment_node"' in text and 'package="rgbt_seg_ros"' in text
    assert "segment_node = {PACKAGE}.node:main" in ast.unparse(ast.parse((REPO / "setup.py").read_text()))
    tree = _launch_tree()
    overrides = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Dict) and n.keys and all(isinstance(k, ast.Constant) for k in n.keys)
    ]
    names = {k.value for d in overrides for k in d.keys if "." in str(k.value)}
    assert names and names <= set(SPEC_BY_NAME), names - set(SPEC_BY_NAME)


def test_files_the_launch_file_references_are_installed():
    share = share_dir()
    for rel in ("config/segment.yaml", "config/rgbt_seg.rviz", "launch/segment.launch.py", "models/sartm_tiny.yaml"):
        assert (share / rel).is_file(), rel


def test_rviz_config_parses_and_shows_the_node_outputs():
    with open(REPO / "config" / "rgbt_seg.rviz") as f:
        rviz = yaml.safe_load(f)
    displays = rviz["Visualization Manager"]["Displays"]
    topics = {d["Topic"]["Value"] for d in displays if d["Class"] == "rviz_default_plugins/Image"}
    # default namespace "" and node name rgbt_seg: private topics are /rgbt_seg/<output>
    assert topics == {"/rgbt_seg/overlay", "/rgbt_seg/labels", "/rgbt_seg/thermal_registered"}
    node_src = (REPO / "rgbt_seg_ros" / "node.py").read_text()
    assert 'super().__init__("rgbt_seg"' in node_src
    for topic in topics:
        assert f'"~/{topic.rsplit("/", 1)[1]}"' in node_src
    assert rviz["Visualization Manager"]["Global Options"]["Fixed Frame"]

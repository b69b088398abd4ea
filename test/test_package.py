"""The package as a robot engineer gets it: package.xml, installed data files, ament index, colcon."""

import ast
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import BIN, REPO
from rgbt_seg_ros.resources import share_dir


def test_package_xml_format_3_with_required_dependencies():
    root = ET.parse(REPO / "package.xml").getroot()
    assert root.tag == "package" and root.get("format") == "3"
    assert root.findtext("name") == "rgbt_seg_ros"
    assert root.findtext("license") == "Apache-2.0"
    exec_deps = {e.text for e in root.findall("exec_depend")}
    for dep in (
        "rclpy",
        "sensor_msgs",
        "std_msgs",
        "diagnostic_msgs",
        "std_srvs",
        "rcl_interfaces",
        "lifecycle_msgs",
        "ament_index_python",
        "ros2bag",
        "launch",
        "launch_ros",
        "rviz2",
        "python3-numpy",
        "python3-opencv",
    ):
        assert dep in exec_deps, dep
    assert {"launch_pytest", "python3-pytest"} <= {e.text for e in root.findall("test_depend")}
    assert root.find("export/build_type").text == "ament_python"


def _requirements(name: str) -> dict:
    from packaging.requirements import Requirement

    lines = (line.split("#")[0].strip() for line in (REPO / name).read_text().splitlines())
    reqs = [Requirement(line) for line in lines if line]
    return {r.name.lower(): r.specifier for r in reqs}


def test_requirements_are_ranges_locked_by_constraints():
    runtime, dev = _requirements("requirements.txt"), _requirements("requirements-dev.txt")
    assert not any("==" in str(spec) for spec in runtime.values()), runtime  # ranges: a robot's ROS python decides
    assert "rosbags-image" not in runtime  # only test_imaging.py uses it
    for lock_name, names in (("constraints.txt", {**runtime, **dev}), ("constraints-compat.txt", runtime)):
        lock = _requirements(lock_name)
        for name, spec in {**runtime, **dev}.items():
            if name not in names:
                continue
            pins = [s for s in lock.get(name, []) if s.operator == "=="]
            assert len(pins) == 1, (lock_name, name)
            assert spec.contains(pins[0].version, prereleases=True), (lock_name, name, pins[0].version, str(spec))
    ros = _requirements("constraints-ros.txt")
    assert not ros["numpy"].contains("2.0.0") and ros["numpy"].contains("1.26.4")


def test_setup_py_names_console_scripts_and_license():
    tree = ast.parse((REPO / "setup.py").read_text())
    text = ast.unparse(tree)
    assert "segment_node = {PACKAGE}.ros.node:main" in text and "rgbt-seg = {PACKAGE}.cli:main" in text
    assert "Apache-2.0" in text
    assert (REPO / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_installed_data_files_and_ament_index():
    share = share_dir()
    assert share.is_dir()
    # the ament resource marker that `ros2 launch` / get_package_share_directory rely on
    from ament_index_python.packages import get_package_share_directory

    assert Path(get_package_share_directory("rgbt_seg_ros")).resolve() == share.resolve()
    for rel in (
        "package.xml",
        "launch/segment.launch.py",
        "config/segment.yaml",
        "config/datasets/mfnet.yaml",
        "config/datasets/pst900.yaml",
        "config/datasets/fmb.yaml",
        "config/datasets/synthetic.yaml",
        "docs/architecture.md",  # README's links resolve in the installed share/ too
    ):
        assert (share / rel).is_file(), rel
    for name in ("segment_node", "rgbt-seg"):
        assert (BIN / name).exists(), name


def test_dataset_class_files():
    from rgbt_seg_ros.models.classes import load_dataset_info

    counts = {name: load_dataset_info(name).num_classes for name in ("mfnet", "pst900", "fmb", "synthetic")}
    assert counts == {"mfnet": 9, "pst900": 5, "fmb": 15, "synthetic": 8}
    with pytest.raises(ValueError, match="unknown dataset 'kitti'"):
        load_dataset_info("kitti")


@pytest.mark.integration
def test_colcon_list_and_build(tmp_path):
    colcon = BIN / "colcon"
    src = tmp_path / "src" / "rgbt_seg_ros"
    ignore = shutil.ignore_patterns(".venv", ".git", "build", "install", "log", "__pycache__", "*.egg-info", "demo_out")
    shutil.copytree(REPO, src, ignore=ignore)
    listed = subprocess.run([str(colcon), "list"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "rgbt_seg_ros" in listed.stdout and "(ros.ament_python)" in listed.stdout
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path), "AMENT_PREFIX_PATH": sys.prefix}
    built = subprocess.run(
        [str(colcon), "build", "--event-handlers", "console_direct-"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    install = tmp_path / "install" / "rgbt_seg_ros"
    assert (install / "share" / "rgbt_seg_ros" / "launch" / "segment.launch.py").is_file()
    assert (install / "share" / "ament_index" / "resource_index" / "packages" / "rgbt_seg_ros").is_file()
    for name in ("segment_node", "rgbt-seg"):
        script = install / "lib" / "rgbt_seg_ros" / name  # where `ros2 run` looks
        # setup.cfg [build_scripts]: run with the python3 on PATH (a robot's venv), not colcon's interpreter
        assert script.read_text().splitlines()[0] == "#!/usr/bin/env python3", name
    # what `ros2 run rgbt_seg_ros rgbt-seg --help` runs, in a shell that sourced the workspace
    check = (
        "source install/setup.bash && install/rgbt_seg_ros/lib/rgbt_seg_ros/rgbt-seg --help >/dev/null && "
        "python3 -c 'from rgbt_seg_ros.resources import package_executable as p; print(p(\"segment_node\"))'"
    )
    ran = subprocess.run(["bash", "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    # tools that start the node find it in the workspace through the ament index, as `ros2 run` does
    assert ran.stdout.strip() == str(install / "lib" / "rgbt_seg_ros" / "segment_node")

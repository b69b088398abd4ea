"""What ``launch/segment.launch.py`` decides, as plain functions (no ``launch`` import, testable anywhere).

:mod:`rgbt_seg_ros.ros.launch_description` builds the launch description from these: the arguments with
their defaults and allowed values, which launch argument overrides which node parameter or remaps which
input, the parameter file the node starts from, the clock, the rviz2 config for the node's final name, and
the checks made before anything starts. The rules a ROS user expects:

* the package's ``config/segment.yaml`` (the node's declared defaults) unless ``params_file`` is
  given; with ``bag:=`` and no ``params_file``, the bag's own ``rgbt_seg_params.yaml`` when it has one;
* a launch argument given on the command line wins over the file; one left at its default ("")
  adds nothing, so a user's parameter file is never overridden by a launch default;
* camera topics are remappings of the node's relative inputs, never parameters;
* ``namespace`` is relative unless it starts with ``/``: under a parent launch file's
  ``PushRosNamespace('robot1')``, ``namespace:=front`` gives ``/robot1/front/rgbt_seg``;
* ``use_sim_time`` follows ``bag:=`` (true when a bag plays, and the player publishes ``/clock``)
  unless given explicitly;
* an argument with a fixed set of values refuses any other before anything starts, and so do a
  missing parameter file, bag or rviz config, and ``use_rviz:=true`` or ``bag_player:=ros2``
  without rviz2 or ros2bag installed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..pipeline.params import BAG_PARAMS, INPUT_NAMES, SPEC_BY_NAME

NODE_NAME = "rgbt_seg"
BOOLEAN = ("true", "false", "True", "False")
LOG_LEVELS = ("debug", "info", "warn", "error", "fatal", "DEBUG", "INFO", "WARN", "ERROR", "FATAL")
# bag_player -> the package that must be installed for it
BAG_PLAYERS = {"ros2": "ros2bag", "rgbt_seg": "rgbt_seg_ros"}


@dataclass(frozen=True)
class LaunchArgument:
    name: str
    default: str  # "" means "not given": nothing is passed to the node
    description: str
    choices: tuple[str, ...] | None = None  # None: any value


def _optional(param: str) -> tuple[str, ...]:
    """A parameter's allowed values, or "" for "leave the parameter file's value"."""
    return ("", *SPEC_BY_NAME[param].choices)


ARGUMENTS: dict[str, LaunchArgument] = {
    a.name: a
    for a in (
        LaunchArgument(
            "params_file", "", "parameter file for segment_node (default: the package's config/segment.yaml)"
        ),
        LaunchArgument(
            "namespace",
            "",
            "namespace of the node, relative to the launch's own: outputs are <ns>/rgbt_seg/labels, ...",
        ),
        LaunchArgument("rgb_topic", "", "remap the RGB input rgb/image to this topic (e.g. /camera/color/image_raw)"),
        LaunchArgument("thermal_topic", "", "remap the thermal input thermal/image to this topic"),
        LaunchArgument("rgb_info_topic", "", "remap rgb/camera_info (registration.mode calibrated)"),
        LaunchArgument("thermal_info_topic", "", "remap thermal/camera_info (registration.mode calibrated)"),
        LaunchArgument(
            "rgb_transport",
            "",
            "raw or compressed (reads <rgb topic>/compressed); overrides input.rgb.transport",
            _optional("input.rgb.transport"),
        ),
        LaunchArgument(
            "thermal_transport",
            "",
            "raw or compressed; overrides input.thermal.transport",
            _optional("input.thermal.transport"),
        ),
        LaunchArgument(
            "checkpoint", "", "checkpoint directory (model.safetensors + config.yaml); overrides model.checkpoint"
        ),
        LaunchArgument("model_config", "", "model config used when model.checkpoint is empty; overrides model.config"),
        LaunchArgument("device", "", "auto, cpu or cuda; overrides model.device", _optional("model.device")),
        LaunchArgument("class_set", "", "class set of a multi-dataset checkpoint (segrgbx); overrides model.class_set"),
        LaunchArgument(
            "registration_file", "", "calibration YAML; overrides registration.file (set registration.mode to match)"
        ),
        LaunchArgument(
            "on_rgb_loss",
            "",
            "wait or thermal_only (segment thermal alone while RGB is lost); overrides on_rgb_loss",
            _optional("on_rgb_loss"),
        ),
        LaunchArgument(
            "use_sim_time",
            "",
            "true/false; default: true when bag:= is given, else the parameter file's value",
            ("", *BOOLEAN),
        ),
        LaunchArgument("managed", "false", "true: start segment_node as a lifecycle (managed) node", BOOLEAN),
        LaunchArgument("autostart", "true", "managed only: configure and activate the node once it is up", BOOLEAN),
        LaunchArgument("log_level", "info", "ROS log level of the node", LOG_LEVELS),
        LaunchArgument("use_rviz", "false", "start rviz2 with the overlay and label displays of this node", BOOLEAN),
        LaunchArgument(
            "rviz_config", "", "rviz2 config (default: the package's config/rgbt_seg.rviz, for the node's namespace)"
        ),
        LaunchArgument("bag", "", "play this bag in a loop with /clock (use_sim_time follows)"),
        LaunchArgument(
            "bag_player",
            "ros2",
            "ros2: `ros2 bag play --loop --clock`; rgbt_seg: `rgbt-seg play` (no ROS 2 install)",
            tuple(BAG_PLAYERS),
        ),
    )
}

# launch argument -> the node parameter it overrides when given
PARAMETER_ARGUMENTS = {
    "checkpoint": "model.checkpoint",
    "model_config": "model.config",
    "device": "model.device",
    "class_set": "model.class_set",
    "registration_file": "registration.file",
    "on_rgb_loss": "on_rgb_loss",
    "rgb_transport": "input.rgb.transport",
    "thermal_transport": "input.thermal.transport",
}
# launch argument -> the node's relative input name it remaps
REMAP_ARGUMENTS = {
    "rgb_topic": INPUT_NAMES["rgb"],
    "thermal_topic": INPUT_NAMES["thermal"],
    "rgb_info_topic": INPUT_NAMES["rgb_info"],
    "thermal_info_topic": INPUT_NAMES["thermal_info"],
}


class LaunchArgumentError(ValueError):
    """A launch argument the launch file cannot use; the text names it and what to do."""


def argument_values(given: dict[str, str]) -> dict[str, str]:
    """Every argument's value as a string: the given one, else its default."""
    return {name: str(given.get(name, arg.default)) for name, arg in ARGUMENTS.items()}


def is_true(value: str) -> bool:
    """A boolean launch argument, read as launch's own conditions read it."""
    value = str(value).strip().lower()
    if value in ("true", "1"):
        return True
    if value in ("false", "0", ""):
        return False
    raise LaunchArgumentError(f"'{value}' is not a boolean (true or false)")


def params_file_for(values: dict[str, str], share: Path) -> str:
    """The parameter file the node starts from: params_file, else the bag's own, else the package's defaults."""
    if values["params_file"]:
        return values["params_file"]
    bag = values["bag"].strip()
    if bag and (Path(bag) / BAG_PARAMS).is_file():
        return str(Path(bag) / BAG_PARAMS)
    return str(Path(share) / "config" / "segment.yaml")


def use_sim_time_for(values: dict[str, str]) -> str:
    """'true' / 'false' for the node's use_sim_time, or '' to leave the parameter file's value."""
    if values["use_sim_time"]:
        return str(is_true(values["use_sim_time"])).lower()
    return "true" if values["bag"].strip() else ""


def rviz_config_for(template: str, node_name: str) -> str:
    """The shipped rviz2 config (topics of the node ``/rgbt_seg``) for the node's fully qualified name."""
    return template.replace(f"/{NODE_NAME}/", f"{node_name.rstrip('/')}/")


def check_arguments(values: dict[str, str], has_package: Callable[[str], bool]) -> list[str]:
    """What must hold before anything starts; raises :class:`LaunchArgumentError` naming the argument.

    ``has_package(name)`` says whether the ament index finds a package (rviz2, ros2bag).
    Returns notes to log (which parameter file is used when the bag brings one)."""
    notes = []
    if values["params_file"] and not Path(values["params_file"]).is_file():
        raise LaunchArgumentError(f"params_file:={values['params_file']}: there is no such file")
    bag = values["bag"].strip()
    if bag:
        if not Path(bag).exists():
            raise LaunchArgumentError(f"bag:={bag}: there is no such bag (a directory with metadata.yaml, or a file)")
        package = BAG_PLAYERS[values["bag_player"]]
        if not has_package(package):
            raise LaunchArgumentError(
                f"bag:= with bag_player:={values['bag_player']} needs {package}, which is not installed "
                f"(install ros-$ROS_DISTRO-{package.replace('_', '-')}, or use bag_player:=rgbt_seg)"
            )
        if not values["params_file"] and (Path(bag) / BAG_PARAMS).is_file():
            notes.append(f"using the bag's own parameter file {Path(bag) / BAG_PARAMS}")
    if is_true(values["use_rviz"]):
        if values["rviz_config"] and not Path(values["rviz_config"]).is_file():
            raise LaunchArgumentError(f"rviz_config:={values['rviz_config']}: there is no such file")
        if not has_package("rviz2"):
            raise LaunchArgumentError(
                "use_rviz:=true needs rviz2, which is not installed (install ros-$ROS_DISTRO-rviz2, "
                "or start rviz2 on another machine of the same ROS domain)"
            )
    return notes

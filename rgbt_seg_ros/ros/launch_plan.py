"""What ``launch/segment.launch.py`` starts, as plain data (no ``launch`` import, testable anywhere).

The launch file reads its arguments and hands them to :func:`launch_plan`; the result says which
node to start (plain or managed), with which parameter files and overrides, remappings and ROS
arguments, whether rviz2 and ``ros2 bag play`` run, and with which clock. The precedence rules a
ROS user expects:

* the package's ``config/segment.yaml`` (the node's declared defaults) unless ``params_file`` is
  given; with ``bag:=`` and no ``params_file``, the bag's own ``rgbt_seg_params.yaml`` when it has one;
* a launch argument given on the command line wins over the file; one left at its default ("")
  adds nothing, so a user's parameter file is never overridden by a launch default;
* camera topics are remappings of the node's relative inputs, never parameters;
* ``use_sim_time`` follows ``bag:=`` (true when a bag plays, and the player publishes ``/clock``)
  unless given explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..pipeline.params import BAG_PARAMS, INPUT_NAMES

NODE_NAME = "rgbt_seg"
TRUE = ("true", "1", "yes", "on")
FALSE = ("false", "0", "no", "off")

# name: (default, description). "" means "not given": nothing is passed to the node.
ARGUMENTS: dict[str, tuple[str, str]] = {
    "params_file": ("", "parameter file for segment_node (default: the package's config/segment.yaml)"),
    "namespace": ("", "namespace of the node: outputs are <namespace>/rgbt_seg/labels, ..."),
    "rgb_topic": ("", "remap the RGB input rgb/image to this topic (e.g. /camera/color/image_raw)"),
    "thermal_topic": ("", "remap the thermal input thermal/image to this topic"),
    "rgb_info_topic": ("", "remap rgb/camera_info (registration.mode calibrated)"),
    "thermal_info_topic": ("", "remap thermal/camera_info (registration.mode calibrated)"),
    "rgb_transport": ("", "raw or compressed (reads <rgb topic>/compressed); overrides input.rgb.transport"),
    "thermal_transport": ("", "raw or compressed; overrides input.thermal.transport"),
    "checkpoint": ("", "checkpoint directory (model.safetensors + config.yaml); overrides model.checkpoint"),
    "model_config": ("", "model config used when model.checkpoint is empty; overrides model.config"),
    "device": ("", "auto, cpu or cuda; overrides model.device"),
    "class_set": ("", "class set of a multi-dataset checkpoint (segrgbx); overrides model.class_set"),
    "registration_file": ("", "calibration YAML; overrides registration.file (set registration.mode to match)"),
    "on_rgb_loss": ("", "wait or thermal_only (segment thermal alone while RGB is lost); overrides on_rgb_loss"),
    "use_sim_time": ("", "true/false; default: true when bag:= is given, else the parameter file's value"),
    "managed": ("false", "true: start segment_node as a lifecycle (managed) node"),
    "autostart": ("true", "managed only: configure and activate the node once it is up"),
    "log_level": ("info", "ROS log level of the node (debug, info, warn, error, fatal)"),
    "use_rviz": ("false", "start rviz2 with the overlay and label displays of this node"),
    "rviz_config": ("", "rviz2 config (default: the package's config/rgbt_seg.rviz, for the node's namespace)"),
    "bag": ("", "play this bag with `ros2 bag play --clock --loop`"),
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
    """A launch argument with a value the launch file cannot use; the text names it."""


@dataclass
class NodePlan:
    executable: str
    name: str
    namespace: str
    parameters: list  # parameter file paths (str) and override dicts, in increasing precedence
    remappings: list[tuple[str, str]]
    ros_arguments: list[str]
    arguments: list[str]
    managed: bool
    autostart: bool


@dataclass
class LaunchPlan:
    node: NodePlan
    use_sim_time: bool | None  # None: whatever the parameter file says
    rviz_config_text: str | None = None  # rviz2 config for the node's namespace, None: no rviz2
    bag_command: list[str] | None = None
    notes: list[str] = field(default_factory=list)


def _flag(values: dict[str, str], name: str) -> bool | None:
    value = str(values.get(name, "")).strip().lower()
    if value == "":
        return None
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise LaunchArgumentError(f"launch argument {name}:={values[name]} must be true or false")


def normalize_namespace(namespace: str) -> str:
    """'' -> '', 'robot1' and '/robot1/' -> '/robot1'."""
    namespace = namespace.strip().strip("/")
    return f"/{namespace}" if namespace else ""


def rviz_config_for(template: str, namespace: str, node_name: str = NODE_NAME) -> str:
    """The shipped rviz2 config with the node's output topics moved into ``namespace``."""
    return template.replace(f"/{node_name}/", f"{normalize_namespace(namespace)}/{node_name}/")


def launch_plan(values: dict[str, str], share: Path, rviz_template: str | None = None) -> LaunchPlan:
    """Turn the launch arguments (as strings, missing = default) into what to start."""
    values = {name: str(values.get(name, default)) for name, (default, _) in ARGUMENTS.items()}
    share = Path(share)
    notes = []
    bag = values["bag"].strip()
    if values["params_file"]:
        param_files = [values["params_file"]]
    elif bag and (Path(bag) / BAG_PARAMS).is_file():
        param_files = [str(Path(bag) / BAG_PARAMS)]
        notes.append(f"using the bag's own parameter file {param_files[0]}")
    else:
        param_files = [str(share / "config" / "segment.yaml")]
    overrides = {param: values[arg] for arg, param in PARAMETER_ARGUMENTS.items() if values[arg] != ""}
    use_sim_time = _flag(values, "use_sim_time")
    if use_sim_time is None and bag:
        use_sim_time = True
    if use_sim_time is not None:
        overrides["use_sim_time"] = use_sim_time
    managed = bool(_flag(values, "managed"))
    autostart = _flag(values, "autostart")
    node = NodePlan(
        executable="segment_node",
        name=NODE_NAME,
        namespace=normalize_namespace(values["namespace"]),
        parameters=[*param_files, overrides] if overrides else param_files,
        remappings=[(REMAP_ARGUMENTS[arg], values[arg]) for arg in REMAP_ARGUMENTS if values[arg] != ""],
        ros_arguments=["--log-level", values["log_level"]] if values["log_level"] else [],
        arguments=["--managed"] if managed else [],
        managed=managed,
        autostart=managed and autostart is not False,
    )
    rviz_text = None
    if _flag(values, "use_rviz"):
        if values["rviz_config"]:
            rviz_text = Path(values["rviz_config"]).read_text()
        else:
            template = rviz_template if rviz_template is not None else (share / "config" / "rgbt_seg.rviz").read_text()
            rviz_text = rviz_config_for(template, node.namespace)
    bag_command = ["ros2", "bag", "play", bag, "--loop", "--clock"] if bag else None
    return LaunchPlan(node, use_sim_time, rviz_text, bag_command, notes)

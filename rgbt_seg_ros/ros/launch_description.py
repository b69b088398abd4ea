"""The launch description of ``segment_node`` (``launch/segment.launch.py`` returns it).

Declarative, so ``ros2 launch rgbt_seg_ros segment.launch.py -p`` prints the node and a parent
launch file or a launch test reaches its actions::

    from rgbt_seg_ros.ros.launch_description import segment_launch
    launch = segment_launch()
    LaunchDescription([*launch.description.entities,
                       RegisterEventHandler(OnProcessExit(target_action=launch.node, on_exit=...))])

In order: the arguments (an argument with a fixed set of values refuses any other before anything
starts); a check of the files and programs the arguments name (:func:`launch_plan.check_arguments`,
also before anything starts); in a scope of its own, the node's parameter file, the parameters and
remappings of the arguments that were given, and the node (plain, or lifecycle with
``managed:=true``, configured and activated by the launch with ``autostart``); rviz2 with a config for
the node's final name (written once the namespace is known, removed at shutdown); the bag player.
When ``segment_node`` exits, the launch shuts down (rviz2 and the player stop too).

The rules (precedence, namespace, clock) are in :mod:`rgbt_seg_ros.ros.launch_plan`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from ament_index_python.packages import PackageNotFoundError, get_package_prefix, get_package_share_directory
from launch import Condition, LaunchContext, LaunchDescription, Substitution
from launch.actions import (
    DeclareLaunchArgument,
    EmitEvent,
    ExecuteProcess,
    LogInfo,
    OpaqueFunction,
    PopLaunchConfigurations,
    PushLaunchConfigurations,
    RegisterEventHandler,
    Shutdown,
)
from launch.conditions import IfCondition, UnlessCondition
from launch.event_handlers import OnShutdown
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node, SetParameter, SetParametersFromFile, SetRemap
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from launch_ros.substitutions import ExecutableInPackage
from lifecycle_msgs.msg import Transition

from .launch_plan import (
    ARGUMENTS,
    NODE_NAME,
    PARAMETER_ARGUMENTS,
    REMAP_ARGUMENTS,
    argument_values,
    check_arguments,
    is_true,
    params_file_for,
    rviz_config_for,
    use_sim_time_for,
)

PACKAGE = "rgbt_seg_ros"


@dataclass
class SegmentLaunch:
    description: LaunchDescription
    node: Node  # segment_node as a plain node (runs unless managed:=true)
    lifecycle_node: LifecycleNode  # segment_node --managed (runs with managed:=true)


def _values(context: LaunchContext) -> dict[str, str]:
    return argument_values({name: context.launch_configurations.get(name, "") for name in ARGUMENTS})


class _PlanValue(Substitution):
    """A value of :mod:`launch_plan` computed from the launch arguments when the launch runs."""

    def __init__(self, function, text: str) -> None:
        super().__init__()
        self._function, self._text = function, text

    def describe(self) -> str:
        return self._text

    def perform(self, context: LaunchContext) -> str:
        return self._function(_values(context))


def _given(substitution) -> Condition:
    """True when ``substitution`` is not empty (an argument left at its default "" passes nothing)."""
    return Condition(predicate=lambda context: substitution.perform(context) != "")


def _all_true(*names: str) -> Condition:
    return Condition(predicate=lambda context: all(is_true(_values(context)[n]) for n in names))


def _player_is(name: str) -> Condition:
    return Condition(
        predicate=lambda context: bool(_values(context)["bag"].strip()) and _values(context)["bag_player"] == name
    )


def _has_package(name: str) -> bool:
    try:
        get_package_prefix(name)
    except (PackageNotFoundError, ValueError):
        return False
    return True


def _shutdown_unless_shutting_down(event, context: LaunchContext):
    """segment_node ended by itself (a crash, a fatal error): stop the rest (rviz2, the player) with it."""
    if context.is_shutdown:
        return None
    return [Shutdown(reason=f"segment_node exited with code {event.returncode}")]


def _check(context: LaunchContext):
    """Before anything starts: the files and programs the arguments name exist (raises, naming the argument)."""
    return [LogInfo(msg=note) for note in check_arguments(_values(context), _has_package)]


def _rviz(context: LaunchContext, nodes: tuple[Node, ...]):
    """rviz2 with the shipped config moved to the node's final name (namespace pushed by a parent included)."""
    values = _values(context)
    if values["rviz_config"]:
        config, cleanup = values["rviz_config"], []
    else:
        node_name = _executed_node_name(nodes)
        template = (Path(get_package_share_directory(PACKAGE)) / "config" / "rgbt_seg.rviz").read_text()
        with tempfile.NamedTemporaryFile("w", suffix=".rviz", prefix="rgbt_seg_", delete=False) as f:
            f.write(rviz_config_for(template, node_name))
        config = f.name
        cleanup = [
            RegisterEventHandler(OnShutdown(on_shutdown=lambda event, ctx: Path(config).unlink(missing_ok=True)))
        ]
    sim_time = use_sim_time_for(values)
    parameters = [{"use_sim_time": sim_time == "true"}] if sim_time else []
    return [
        *cleanup,
        Node(package="rviz2", executable="rviz2", arguments=["-d", config], parameters=parameters, output="log"),
    ]


def _executed_node_name(nodes: tuple[Node, ...]) -> str:
    """The fully qualified name of the node action that ran (plain or managed: only one does)."""
    for node in nodes:
        try:
            return node.node_name
        except RuntimeError:  # "cannot access 'node_name' before executing action": the one that did not run
            continue
    raise RuntimeError("segment_node has not been started")


def segment_launch(cached_output: bool = False) -> SegmentLaunch:
    """The launch description with handles on its two node actions (``cached_output``: the node actions keep
    their output for ``get_stdout()``, as launch_pytest's output checks need; it grows with the log)."""
    arg = {name: LaunchConfiguration(name) for name in ARGUMENTS}
    declared = [
        DeclareLaunchArgument(
            a.name,
            default_value=a.default,
            description=a.description,
            choices=None if a.choices is None else list(a.choices),
        )
        for a in ARGUMENTS.values()
    ]
    common = dict(
        package=PACKAGE,
        executable="segment_node",
        name=NODE_NAME,
        namespace=arg["namespace"],
        ros_arguments=["--log-level", arg["log_level"]],
        output="screen",
        emulate_tty=True,
        cached_output=cached_output,
        on_exit=_shutdown_unless_shutting_down,
    )
    node = Node(**common, condition=UnlessCondition(arg["managed"]))
    lifecycle_node = LifecycleNode(**common, arguments=["--managed"], condition=IfCondition(arg["managed"]))
    change = dict(lifecycle_node_matcher=matches_action(lifecycle_node))
    sim_time = _PlanValue(use_sim_time_for, "use_sim_time: the argument, else true with bag:=")
    # A scope of its own (not a GroupAction, so that `ros2 launch -p` shows the nodes): the parameters and
    # remappings below reach segment_node only, also when a parent launch file includes this one.
    scoped = [
        PushLaunchConfigurations(),
        # the file first, then what was given on the command line: the later one wins
        SetParametersFromFile(_PlanValue(lambda v: params_file_for(v, _share()), "params_file, else the defaults")),
        *[
            SetParameter(name=param, value=arg[name], condition=_given(arg[name]))
            for name, param in PARAMETER_ARGUMENTS.items()
        ],
        SetParameter(name="use_sim_time", value=sim_time, condition=_given(sim_time)),
        *[
            SetRemap(src=relative, dst=arg[name], condition=_given(arg[name]))
            for name, relative in REMAP_ARGUMENTS.items()
        ],
        node,
        lifecycle_node,
        EmitEvent(
            event=ChangeState(transition_id=Transition.TRANSITION_CONFIGURE, **change),
            condition=_all_true("managed", "autostart"),
        ),
        RegisterEventHandler(
            OnStateTransition(
                target_lifecycle_node=lifecycle_node,
                start_state="configuring",
                goal_state="inactive",
                entities=[EmitEvent(event=ChangeState(transition_id=Transition.TRANSITION_ACTIVATE, **change))],
            ),
            condition=_all_true("managed", "autostart"),
        ),
        PopLaunchConfigurations(),
    ]
    bag = arg["bag"]
    players = [
        ExecuteProcess(
            cmd=["ros2", "bag", "play", bag, "--loop", "--clock"], output="screen", condition=_player_is("ros2")
        ),
        ExecuteProcess(
            cmd=[ExecutableInPackage("rgbt-seg", PACKAGE), "play", bag, "--loop", "--clock"],
            output="screen",
            condition=_player_is("rgbt_seg"),
        ),
    ]
    description = LaunchDescription(
        [
            *declared,
            OpaqueFunction(function=_check),
            *scoped,
            OpaqueFunction(function=_rviz, args=[(node, lifecycle_node)], condition=IfCondition(arg["use_rviz"])),
            *players,
        ]
    )
    return SegmentLaunch(description, node, lifecycle_node)


def _share() -> str:
    return get_package_share_directory(PACKAGE)


def generate_launch_description() -> LaunchDescription:
    return segment_launch().description

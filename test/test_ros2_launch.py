"""``ros2 launch rgbt_seg_ros segment.launch.py`` and the ``ros2`` command line, run for real as a ROS user does.

The real launch, launch_ros and ros2cli (``make ros2-tools`` builds them from ../shared/ros2 into the venv, or a
sourced ROS 2's), real ``segment_node`` processes, real DDS. Two things cannot be installed here and are stood in
for: rviz2 (an executable that records what it is given, see ``ros2_cli.fake_rviz2``) and ``ros2 bag play``
(``bag_player:=rgbt_seg`` plays the bag with the project's ``rgbt-seg play``, which publishes /clock as
``ros2 bag play --clock`` does). Every launch and CLI call has a hard timeout; each test has its own ROS domain.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager

import pytest
import yaml
from dds_client import DdsClient, now_ns, random_pair
from ros2_cli import MISSING, Ros2Launch, fake_rviz2, launch_env, ros2, ros2_graph

from conftest import micro_params_file

pytestmark = [pytest.mark.integration, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]

LAUNCH = ["rgbt_seg_ros", "segment.launch.py"]
STARTED = r"\[segment_node-\d+\]: process started"
H, W = 120, 160


@contextmanager
def dds_client(env: dict, **kwargs):
    """A test participant in the launch's domain, made once the node is up (as in every DDS test here)."""
    client = DdsClient(int(env["ROS_DOMAIN_ID"]), ("labels",), **kwargs)
    try:
        yield client
    finally:
        client.close()


def publish_until(client: DdsClient, launch: Ros2Launch, done, timeout: float = 120.0) -> None:
    """Publish random pairs at 10 Hz until ``done()``; fails if the launch ends or the time is up."""
    base = now_ns(client)
    for i in range(int(timeout * 10)):
        rgb, thermal = random_pair(i, (H, W))
        client.publish_pair(rgb, thermal, base + i * 100_000_000)
        client.spin(0.1)
        assert launch.proc.poll() is None, "ros2 launch ended:\n" + launch.output()[-4000:]
        if done():
            return
    statuses = {name: client.latest_status(name) for name in ("rgb camera", "thermal camera", "pipeline")}
    # what this participant discovered, and whether a fresh process hears the node (a discovery problem here
    # or a silent node)
    statuses["publishers of /diagnostics seen"] = client.node.count_publishers("/diagnostics")
    echo = ["topic", "echo", "/diagnostics", "--once", "--no-daemon", "--spin-time", "3", "--field", "header"]
    statuses["ros2 topic echo /diagnostics"] = ros2(echo, launch.env, timeout=25).stdout[-300:]
    raise AssertionError(f"no output while publishing; diagnostics {statuses}\n" + launch.output()[-4000:])


def wait_for_file(path, timeout: float = 30.0):
    """``path`` once it exists (the rviz2 stand-in writes its config when the launch starts it)."""
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert path.exists(), f"{path} was not written in {timeout:g} s"
    return path


def parameters(node: str, env: dict) -> dict:
    """Every parameter of ``node`` as ``ros2 param dump`` shows it, by dotted name."""

    def parsed(result):
        try:
            (tree,) = yaml.safe_load(result.stdout).values()
            return tree["ros__parameters"]
        except Exception:
            return None

    dump = ros2_graph(["param", "dump", node], env, ok=lambda r: parsed(r) is not None)
    values = parsed(dump)
    assert values is not None, dump.stdout

    def flat(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    return dict(flat(values))


def set_parameter(node: str, name: str, value: str, env: dict) -> str:
    """What ``ros2 param set`` answered (retried while the node is not discovered yet)."""
    return ros2_graph(["param", "set", node, name, value], env, ok=lambda r: "Node not found" not in r.stdout).stdout


def lifecycle(node: str, env: dict, transition: str | None = None) -> str:
    """``ros2 lifecycle get`` (the state) or ``set`` (its answer)."""
    args = ["lifecycle", "get", node] if transition is None else ["lifecycle", "set", node, transition]
    out = ros2_graph(args, env, ok=lambda r: "Node not found" not in r.stdout).stdout
    return out.split()[0] if transition is None and out.strip() else out


# --------------------------------------------------------------------------- no node needed


def test_ros2_run_and_launch_find_the_executables_of_the_venv_install(ros_env, tmp_path):
    """`make` installs with pip; ros2 run and ros2 launch look in <prefix>/lib/rgbt_seg_ros (as colcon installs)."""
    env = launch_env(ros_env, tmp_path)
    listed = ros2(["pkg", "executables", "rgbt_seg_ros"], env)
    assert listed.returncode == 0, listed.stdout
    assert {"rgbt_seg_ros segment_node", "rgbt_seg_ros rgbt-seg"} <= set(listed.stdout.splitlines())
    run = ros2(["run", "rgbt_seg_ros", "rgbt-seg", "play", "--help"], env)
    assert run.returncode == 0 and "--clock" in run.stdout, run.stdout


def test_the_description_shows_the_node_and_the_arguments_their_choices(ros_env, tmp_path):
    env = launch_env(ros_env, tmp_path)
    printed = ros2(["launch", *LAUNCH, "--print"], env)
    assert printed.returncode == 0, printed.stdout
    assert "ExecInPkg(pkg='rgbt_seg_ros', exec='segment_node')" in printed.stdout  # the node, not an opaque function
    assert "'--managed'" in printed.stdout  # ... and its managed twin
    args = ros2(["launch", *LAUNCH, "--show-args"], env)
    assert args.returncode == 0
    assert re.search(r"'log_level':.*\n.*Valid choices are: \['debug'", args.stdout), args.stdout


@pytest.mark.parametrize(
    "argument, says",
    [
        ("log_level:=verbose", r"log_level.*verbose.*\bdebug\b"),
        ("device:=gpu", r"device.*gpu.*\bcuda\b"),
        ("managed:=maybe", r"managed.*maybe"),
        ("params_file:=/nonexistent/robot.yaml", r"params_file:=/nonexistent/robot.yaml: there is no such file"),
        ("use_rviz:=true", r"use_rviz:=true needs rviz2, which is not installed"),
    ],
)
def test_a_bad_argument_is_refused_before_anything_starts(argument, says, ros_env, tmp_path):
    """Nothing is started (no orphan node), ros2 launch fails, the message names the argument and what is allowed."""
    env = launch_env(ros_env, tmp_path)
    with Ros2Launch([*LAUNCH, argument], env, tmp_path / "launch.log") as launch:
        code = launch.wait_exit(60)
        out = launch.stop()
    assert code not in (None, 0), out
    assert re.search(says, out, re.IGNORECASE), out
    assert not re.search(STARTED, out), out
    assert not list((tmp_path / "tmp").glob("*.rviz")), "a temporary rviz config was left behind"


# --------------------------------------------------------------------------- a running node


def test_a_parent_pushed_namespace_params_file_explicit_arguments_rviz_and_param_set(
    micro_checkpoint, ros_env, tmp_path
):
    """A parent launch file pushes robot1 and includes segment.launch.py with namespace:=front: the node is
    /robot1/front/rgbt_seg and rviz2's config shows that namespace's topics; the user's params_file wins over the
    shipped defaults and an argument given wins over the file; remaps; `ros2 param set` accepted and refused;
    Ctrl-C ends the launch cleanly and removes the generated rviz config."""
    params = micro_params_file(
        tmp_path / "robot.yaml", micro_checkpoint, **{"model.device": "cuda", "on_rgb_loss": "wait"}
    )
    rviz = fake_rviz2(tmp_path / "rviz_prefix", tmp_path / "rviz_record")
    parent = tmp_path / "robot.launch.xml"
    parent.write_text(
        f"""<launch>
  <group>
    <push-ros-namespace namespace="robot1"/>
    <include file="$(find-pkg-share rgbt_seg_ros)/launch/segment.launch.py">
      <arg name="namespace" value="front"/>
      <arg name="params_file" value="{params}"/>
      <arg name="device" value="cpu"/>
      <arg name="on_rgb_loss" value="thermal_only"/>
      <arg name="rgb_topic" value="/cam/rgb"/>
      <arg name="thermal_topic" value="/cam/thermal"/>
      <arg name="use_rviz" value="true"/>
    </include>
  </group>
</launch>
"""
    )
    env = launch_env(ros_env, tmp_path, extra_prefixes=(rviz,))
    node = "/robot1/front/rgbt_seg"
    with Ros2Launch([str(parent)], env, tmp_path / "launch.log") as launch:
        assert launch.wait_for(r"\]: active: rgb", 180), launch.output()[-4000:]
        with dds_client(env, namespace=node, rgb_topic="/cam/rgb", thermal_topic="/cam/thermal") as client:
            publish_until(client, launch, lambda: client.received["labels"])
            labels = client.received["labels"][0][1]
            assert (labels.height, labels.width) == (H, W)
        listed = ros2_graph(["node", "list"], env, ok=lambda r: node in r.stdout.split())
        assert node in listed.stdout.split(), listed.stdout
        values = parameters(node, env)
        assert values["model.device"] == "cpu"  # the argument beats the file's cuda
        assert values["on_rgb_loss"] == "thermal_only"
        assert values["thermal.mode"] == "fixed"  # the file beats the shipped percentile
        assert values["model.checkpoint"] == str(micro_checkpoint)
        assert set_parameter(node, "output.overlay_alpha", "0.3", env).strip() == "Set parameter successful"
        assert parameters(node, env)["output.overlay_alpha"] == 0.3
        refused = set_parameter(node, "model.device", "auto", env)
        assert "Setting parameter failed" in refused and "needs a restart" in refused, refused

        config = wait_for_file(tmp_path / "rviz_record.rviz")
        displays = yaml.safe_load(config.read_text())["Visualization Manager"]["Displays"]
        topics = {d["Topic"]["Value"] for d in displays if d["Class"] == "rviz_default_plugins/Image"}
        assert topics == {f"{node}/overlay", f"{node}/labels", f"{node}/thermal_registered"}
        generated = (tmp_path / "rviz_record.args").read_text().split()[1]
        assert generated.startswith(str(tmp_path / "tmp"))
        out = launch.stop()
    assert re.search(r"\[segment_node-\d+\]: process has finished cleanly", out), out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    assert not list((tmp_path / "tmp").glob("*.rviz")), "the generated rviz config was left behind"


@pytest.mark.parametrize("autostart", [False, True])
def test_managed_node_under_ros2_lifecycle(autostart, micro_checkpoint, ros_env, tmp_path):
    """managed:=true: without autostart the node waits unconfigured until `ros2 lifecycle set` configures and
    activates it; with autostart the launch does both. After `shutdown` the diagnostics say finalized. rviz2 gets
    the lifecycle node's topics."""
    params = micro_params_file(tmp_path / "params.yaml", micro_checkpoint)
    rviz = fake_rviz2(tmp_path / "rviz_prefix", tmp_path / "rviz_record")
    env = launch_env(ros_env, tmp_path, extra_prefixes=(rviz,))
    node = "/rgbt_seg"
    args = [*LAUNCH, f"params_file:={params}", "managed:=true", f"autostart:={autostart}", "use_rviz:=true"]
    with Ros2Launch(args, env, tmp_path / "launch.log") as launch:
        if autostart:
            assert launch.wait_for(r"\]: active: rgb", 180), launch.output()[-4000:]
        else:
            assert launch.wait_for(r"waiting for 'configure'", 120), launch.output()[-4000:]
            assert lifecycle(node, env) == "unconfigured"
            for transition in ("configure", "activate"):
                answer = lifecycle(node, env, transition)
                assert "Transitioning successful" in answer, answer + launch.output()[-3000:]
        with dds_client(env) as client:
            publish_until(client, launch, lambda: client.received["labels"])
            assert client.wait_for(lambda: (client.latest_status("pipeline") or {}).get("state") == "active", 30)
            if not autostart:
                assert "Transitioning successful" in lifecycle(node, env, "shutdown")
                assert client.wait_for(
                    lambda: (client.latest_status("pipeline") or {}).get("message", "").startswith("finalized"), 30
                ), client.latest_status("pipeline")
        assert "/rgbt_seg/overlay" in wait_for_file(tmp_path / "rviz_record.rviz").read_text()
        out = launch.stop()
    assert re.search(r"\[segment_node-\d+\]: process has finished cleanly", out), out[-3000:]
    assert "Caught exception" not in out, out[-3000:]


def test_a_bag_plays_with_sim_time_and_the_node_follows_its_clock(micro_checkpoint, ros_env, tmp_path):
    """bag:= turns use_sim_time on and plays the bag looping with /clock (ros2 bag play cannot be installed here:
    bag_player:=rgbt_seg plays it with `rgbt-seg play --loop --clock`); the bag's own parameter file (its rig's
    registration and thermal scaling) is used, arguments given are added to it, and the node's clock is the bag's."""
    from rgbt_seg_ros.data.sample_bag import write_sample_bag

    sample = tmp_path / "sample"
    write_sample_bag(sample, frames=20, rgb_size=(H, W), thermal_size=(H, W))
    bag = sample / "bag"
    env = launch_env(ros_env, tmp_path)
    args = [*LAUNCH, f"bag:={bag}", "bag_player:=rgbt_seg", f"checkpoint:={micro_checkpoint}", "device:=cpu"]
    with Ros2Launch(args, env, tmp_path / "launch.log") as launch:
        assert launch.wait_for(r"using the bag's own parameter file", 60), launch.output()[-3000:]
        assert launch.wait_for(r"\]: active: rgb", 180), launch.output()[-4000:]
        with dds_client(env) as client:
            got = client.wait_for(lambda: len(client.received["labels"]) >= 3, 120)
            assert got, f"{client.latest_status('pipeline')}\n{launch.output()[-4000:]}"
            stamps = [m.header.stamp.sec + m.header.stamp.nanosec * 1e-9 for _, m in client.received["labels"]]

            def clocked() -> list[float]:  # diagnostics stamped after the node's first /clock (0 before)
                return [
                    t for t in (a.header.stamp.sec + a.header.stamp.nanosec * 1e-9 for a in client.diagnostics) if t
                ]

            assert client.wait_for(clocked, 30), "no diagnostics stamped with the bag's clock"
            node_now = clocked()[-1]
        assert abs(node_now - time.time()) > 3600, "the node's clock is the wall clock, not the bag's"
        assert min(stamps) - 60 < node_now < max(stamps) + 60, (node_now, stamps)
        values = parameters("/rgbt_seg", env)
        assert values["use_sim_time"] is True
        assert values["registration.mode"] == "homography" and values["thermal.mode"] == "linear"  # the bag's file
        assert values["model.checkpoint"] == str(micro_checkpoint)  # the argument
        launch.stop()

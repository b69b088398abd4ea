"""segment_node as a ROS user deploys it: remapped relative inputs, namespaces, sim time without
/clock, the lifecycle (managed) mode, compressed input, and the shipped defaults with no file at all.

Real node processes over real DDS, each test in its own ROS domain.
"""

import subprocess
import time

import pytest
from dds_client import DdsClient, now_ns, random_pair, stop_node

from conftest import micro_params_file, script

pytestmark = pytest.mark.integration

H, W = 120, 160


def start(args, env):
    return subprocess.Popen(
        [script("segment_node"), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


stop = stop_node


def scene(i, thermal_shape=(H, W)):
    return random_pair(i, (H, W), thermal_shape)


def publish_until(client, procs, done, timeout=90.0, thermal_shape=(H, W), start_index=0):
    """Publish pairs at 10 Hz until ``done()``; return the stamps sent."""
    base = now_ns(client)
    sent = []
    for i in range(int(timeout * 10)):
        rgb, thermal = scene(start_index + i, thermal_shape)
        stamp = base + i * 100_000_000
        client.publish_pair(rgb, thermal, stamp)
        sent.append(stamp)
        client.spin(0.1)
        for proc in procs:
            assert proc.poll() is None, "segment_node exited:\n" + stop(proc)[-3000:]
        if done():
            return sent
    raise AssertionError("condition not reached while publishing")


@pytest.fixture
def micro_params(tmp_path, micro_checkpoint):
    return micro_params_file(tmp_path / "params.yaml", micro_checkpoint)


def stamps_of(messages):
    return [m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec for _, m in messages]


def test_remapped_inputs_namespaces_and_sim_time_without_clock(micro_params, ros_env):
    """Two instances on the same remapped cameras: one namespaced with use_sim_time and no /clock."""
    from sensor_msgs.msg import Image

    remap = ["-r", "rgb/image:=/x/rgb", "-r", "thermal/image:=/x/thermal"]
    plain = start(["--ros-args", "--params-file", str(micro_params), *remap], ros_env)
    spaced = start(
        ["--ros-args", "--params-file", str(micro_params), "-r", "__ns:=/robot1", "-p", "use_sim_time:=true", *remap],
        ros_env,
    )
    client = DdsClient(
        int(ros_env["ROS_DOMAIN_ID"]), outputs=("labels",), rgb_topic="/x/rgb", thermal_topic="/x/thermal"
    )
    spaced_labels = []
    client.node.create_subscription(
        Image, "/robot1/rgbt_seg/labels", lambda m: spaced_labels.append((time.monotonic(), m)), 20
    )
    try:
        sent = publish_until(
            client, (plain, spaced), lambda: len(client.received["labels"]) >= 3 and len(spaced_labels) >= 3
        )
        assert set(stamps_of(client.received["labels"])) <= set(sent)  # stamped like the RGB images
        assert set(stamps_of(spaced_labels)) <= set(sent)
        assert spaced_labels[0][1].header.frame_id == "rgb_camera_optical_frame"

        def both_reported():
            return client.latest_status("/robot1/rgbt_seg: pipeline") and client.latest_status("/rgbt_seg: pipeline")

        assert client.wait_for(both_reported, 10)
        names = {st.name for arr in client.diagnostics for st in arr.status}
        assert {"/rgbt_seg: pipeline", "/robot1/rgbt_seg: pipeline", "/robot1/rgbt_seg: rgb camera"} <= names
        ns_status = client.latest_status("/robot1/rgbt_seg: pipeline")
        assert ns_status["inputs"] == "/x/rgb, /x/thermal"  # the names after remapping
        assert client.latest_status("/robot1/rgbt_seg: rgb camera")["topic"] == "/x/rgb"
        # diagnostics run on a steady clock: with sim time and no /clock they still arrive once a second
        n = sum(1 for arr in client.diagnostics for st in arr.status if st.name == "/robot1/rgbt_seg: pipeline")
        client.spin(2.5)
        n_after = sum(1 for arr in client.diagnostics for st in arr.status if st.name == "/robot1/rgbt_seg: pipeline")
        assert n_after >= n + 2
        hw = {st.hardware_id for arr in client.diagnostics for st in arr.status if st.name.endswith("rgb camera")}
        assert "rgb_camera_optical_frame" in hw
    finally:
        client.close()
        out_plain, out_spaced = stop(plain), stop(spaced)
        print(out_plain[-2000:], out_spaced[-2000:])
    assert "active: rgb /x/rgb + thermal /x/thermal" in out_plain
    assert "-> /robot1/rgbt_seg/labels" in out_spaced


def _lifecycle(client, service_type, name, request):
    cli = client.node.create_client(service_type, name)
    assert cli.wait_for_service(timeout_sec=20.0), f"no service {name}"
    future = cli.call_async(request)
    client.executor.spin_until_future_complete(future, timeout_sec=120.0)
    assert future.result() is not None, f"{name} did not answer"
    return future.result()


def test_managed_node_transitions_and_no_output_while_inactive(micro_params, ros_env):
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState, GetState

    proc = start(["--managed", "--ros-args", "--params-file", str(micro_params)], ros_env)
    client = DdsClient(int(ros_env["ROS_DOMAIN_ID"]), outputs=("labels",))

    def state():
        return _lifecycle(client, GetState, "/rgbt_seg/get_state", GetState.Request()).current_state.label

    def change(transition_id):
        req = ChangeState.Request()
        req.transition.id = transition_id
        return _lifecycle(client, ChangeState, "/rgbt_seg/change_state", req).success

    def publish_for(seconds, start_index):
        base = now_ns(client)
        for i in range(int(seconds * 10)):
            rgb, thermal = scene(start_index + i)
            client.publish_pair(rgb, thermal, base + i * 100_000_000)
            client.spin(0.1)
            assert proc.poll() is None

    try:
        assert state() == "unconfigured"
        assert client.wait_for(lambda: client.latest_status("/rgbt_seg: pipeline") is not None, 10, proc)
        assert client.latest_status("/rgbt_seg: pipeline")["state"] == "unconfigured"
        publish_for(1.0, 0)
        assert client.received["labels"] == []
        assert change(Transition.TRANSITION_CONFIGURE) and state() == "inactive"
        publish_for(1.5, 10)
        assert client.received["labels"] == []  # configured (model loaded) but inactive: nothing flows
        assert change(Transition.TRANSITION_ACTIVATE) and state() == "active"
        publish_until(client, (proc,), lambda: len(client.received["labels"]) >= 3, timeout=60)
        assert change(Transition.TRANSITION_DEACTIVATE) and state() == "inactive"
        client.spin(0.5)  # a frame already in flight may still land
        n = len(client.received["labels"])
        publish_for(2.0, 100)
        assert len(client.received["labels"]) == n  # deactivated: no output
        client.diagnostics.clear()
        assert client.wait_for(lambda: client.latest_status("/rgbt_seg: pipeline") is not None, 5, proc)
        inactive = client.latest_status("/rgbt_seg: pipeline")
        assert inactive["state"] == "inactive" and "sartm" in inactive["model"]  # the model stays loaded
        assert change(Transition.TRANSITION_ACTIVATE)
        publish_until(client, (proc,), lambda: len(client.received["labels"]) >= n + 2, timeout=30, start_index=200)
        assert change(Transition.TRANSITION_DEACTIVATE) and change(Transition.TRANSITION_CLEANUP)
        assert state() == "unconfigured"
        client.diagnostics.clear()
        assert client.wait_for(lambda: client.latest_status("/rgbt_seg: pipeline") is not None, 5, proc)
        assert client.latest_status("/rgbt_seg: pipeline")["model"] == "not loaded"
    finally:
        client.close()
        out = stop(proc)
        print(out[-3000:])
    assert "ready:" in out and "unconfigured: model unloaded" in out


@pytest.mark.parametrize("transport", ["compressed"])
def test_compressed_input_jpeg_rgb_and_16_bit_png_thermal(tmp_path, micro_checkpoint, ros_env, transport):
    from sensor_msgs.msg import CompressedImage

    transports = {"input.rgb.transport": transport, "input.thermal.transport": transport}
    params = micro_params_file(tmp_path / "params.yaml", micro_checkpoint, **transports)
    proc = start(["--ros-args", "--params-file", str(params), "-r", "rgb/image:=/cam/rgb"], ros_env)
    client = DdsClient(int(ros_env["ROS_DOMAIN_ID"]), outputs=("labels",), rgb_topic="/cam/rgb", compressed=True)
    try:
        sent = publish_until(client, (proc,), lambda: len(client.received["labels"]) >= 3)
        labels = client.received["labels"][0][1]
        assert (labels.height, labels.width) == (H, W)
        assert set(stamps_of(client.received["labels"])) <= set(sent)
        # broken payloads are counted and skipped like other bad images
        client.rgb_pub.publish(CompressedImage(format="jpeg", data=b"\xff\xd8not a jpeg"))
        client.thermal_pub.publish(CompressedImage(format="png", data=b""))
        client.spin(0.3)

        def counted():
            rgb_st, th_st = client.latest_status("rgb camera"), client.latest_status("thermal camera")
            return rgb_st and th_st and int(rgb_st["rejected"]) >= 1 and int(th_st["rejected"]) >= 1

        assert client.wait_for(counted, 10, proc)
        assert client.latest_status("rgb camera")["topic"] == "/cam/rgb/compressed"
        n = len(client.received["labels"])
        publish_until(client, (proc,), lambda: len(client.received["labels"]) >= n + 2, timeout=20, start_index=50)
    finally:
        client.close()
        print(stop(proc)[-2000:])


def test_a_node_started_with_nothing_segments_with_the_demo_model_and_says_so(ros_env):
    proc = start([], ros_env)  # no parameter file, no remapping: inputs /rgb/image and /thermal/image
    client = DdsClient(int(ros_env["ROS_DOMAIN_ID"]), outputs=("labels",))
    try:
        # thermal 128 rows against RGB 120 under identity registration: warned once, in log and diagnostics
        publish_until(client, (proc,), lambda: len(client.received["labels"]) >= 2, thermal_shape=(128, W))
        assert (client.received["labels"][0][1].height, client.received["labels"][0][1].width) == (H, W)

        def warned():
            status = client.latest_status("/rgbt_seg: pipeline")
            return status is not None and "identity registration" in status["warnings"]

        assert client.wait_for(warned, 10, proc)
        status = client.latest_status("/rgbt_seg: pipeline")
        assert status["level"] == 1 and "sartm synthetic" in status["model"]
    finally:
        client.close()
        out = stop(proc)
        print(out[-3000:])
    assert "loading model models/demo" in out
    assert out.index("loading model") < out.index("ready:")
    assert out.count("trained on the project's synthetic RGB-thermal scenes only") == 1
    assert out.count("under identity registration") == 1

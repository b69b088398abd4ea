"""Faults against segment_node as a real process over DDS: bad parameters (at start and at run time),
a corrupt checkpoint, a stalled RGB camera, a flapping thermal camera and burst arrivals.

The node must keep running, report each fault in /diagnostics and keep publishing what it can.
Fixtures and helpers come from test_node_integration / dds_client (micro checkpoint, own ROS domain).
"""

import time

import pytest
from dds_client import DdsClient, call_service, now_ns
from sensor_msgs.msg import Image
from test_node_integration import scene, start_node, stop, wait_until_ready

from conftest import write_params
from rgbt_seg_ros.pipeline.imaging import fill_image_msg

pytestmark = pytest.mark.integration

BASE_PARAMS = {
    "model.device": "cpu",
    "thermal.mode": "fixed",
    "thermal.min": 25000.0,
    "thermal.max": 33000.0,
    "sync.max_wait": 0.05,
}


@pytest.fixture
def launch(tmp_path, ros_env):
    """launch(**overrides) -> (proc, client); everything is stopped at the end of the test."""
    started = []

    def _launch(outputs=("labels",), **overrides):
        params = write_params(tmp_path / f"params{len(started)}.yaml", **{**BASE_PARAMS, **overrides})
        proc = start_node(params, ros_env)
        client = DdsClient(int(ros_env["ROS_DOMAIN_ID"]), outputs=outputs)
        started.append((proc, client))
        return proc, client

    yield _launch
    for proc, client in started:
        client.close()
        print(stop(proc)[-3000:])


def set_parameters(client, proc, values: dict):
    from rcl_interfaces.srv import SetParameters
    from rclpy.parameter import Parameter

    request = SetParameters.Request(parameters=[Parameter(k, value=v).to_parameter_msg() for k, v in values.items()])
    return call_service(client, proc, SetParameters, "/rgbt_seg/set_parameters", request).results


def get_parameter(client, proc, name):
    from rcl_interfaces.srv import GetParameters
    from rclpy.parameter import parameter_value_to_python

    result = call_service(client, proc, GetParameters, "/rgbt_seg/get_parameters", GetParameters.Request(names=[name]))
    return parameter_value_to_python(result.values[0])


def counter(status: dict, key: str) -> int:
    for part in status["drops"].split(", "):
        k, _, v = part.partition("=")
        if k == key:
            return int(v)
    return 0


def test_bad_parameters_at_start_and_at_run_time_are_refused_with_a_reason(launch, micro_checkpoint):
    # out of range in the parameter file: reported, the default is used, the node runs
    proc, client = launch(**{"model.checkpoint": str(micro_checkpoint), "sync.slop": 3.0, "output.labels": "yes"})
    wait_until_ready(client, proc)
    assert client.wait_for(lambda: client.latest_status("pipeline") is not None, 10, proc)
    pipe = client.latest_status("pipeline")
    assert pipe["level"] == 1 and "sync.slop" in pipe["warnings"] and "0.05" in pipe["warnings"]
    assert "output.labels must be of type bool, got 'yes'; using the default True" in pipe["warnings"]
    assert get_parameter(client, proc, "sync.slop") == pytest.approx(0.05)
    assert get_parameter(client, proc, "output.labels") is True  # what the node uses, not the refused value

    ok = set_parameters(client, proc, {"output.overlay_alpha": 0.2, "sync.slop": 0.02})
    assert all(r.successful for r in ok), [r.reason for r in ok]
    assert get_parameter(client, proc, "output.overlay_alpha") == pytest.approx(0.2)
    refused = {
        "sync.slop": 5.0,  # out of range
        "model.device": "cuda",  # restart-only
        "thermal.min": 40000.0,  # in range, but min > max for the fixed mode
        "output.palette": [0xFF0000],  # fewer colours than classes
        "output.overlay": "yes",  # wrong type
    }
    for name, value in refused.items():
        (result,) = set_parameters(client, proc, {name: value})
        assert not result.successful and result.reason, name
    reasons = {name: set_parameters(client, proc, {name: v})[0].reason for name, v in refused.items()}
    assert "restart" in reasons["model.device"]
    assert "output.overlay must be of type bool, got 'yes'" in reasons["output.overlay"]  # names, not type codes
    assert "max > min" in reasons["thermal.min"] and "palette" in reasons["output.palette"]
    assert get_parameter(client, proc, "sync.slop") == pytest.approx(0.02)  # the refused value did not land
    assert get_parameter(client, proc, "model.device") == "cpu"
    # and the node still segments
    client.received["labels"].clear()
    base = now_ns(client)
    for i in range(30):
        client.publish_pair(*scene(i), base + i * 100_000_000)
        client.spin(0.1)
        if client.received["labels"]:
            break
    assert client.received["labels"] and proc.poll() is None


def test_a_corrupt_checkpoint_leaves_the_node_running_with_an_error_diagnostic(launch, micro_checkpoint, tmp_path):
    import shutil

    from std_srvs.srv import Trigger

    bad = tmp_path / "bad_ckpt"
    shutil.copytree(micro_checkpoint, bad)
    tensors = bad / "model.safetensors"
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    proc, client = launch(**{"model.checkpoint": str(bad)})
    base = now_ns(client)

    def errored():
        st = client.latest_status("pipeline")
        return st is not None and st["level"] == 2

    deadline = time.monotonic() + 60  # node start-up (imports, failed load) included
    i = 0
    while time.monotonic() < deadline and proc.poll() is None:
        client.publish_pair(*scene(i), base + i * 100_000_000)
        i += 1
        client.spin(0.1)
        if errored() and counter(client.latest_status("pipeline"), "no_model") > 0:
            break
    pipe = client.latest_status("pipeline")
    assert pipe["level"] == 2 and "model not loaded" in pipe["message"], pipe
    assert counter(pipe, "no_model") > 0 and not client.received["labels"]
    reset = call_service(client, proc, Trigger, "/rgbt_seg/reset", Trigger.Request())
    assert reset.success and proc.poll() is None


def test_flapping_thermal_and_bursts_keep_outputs_flowing_without_backlog(launch, micro_checkpoint):
    proc, client = launch(**{"model.checkpoint": str(micro_checkpoint), "thermal_timeout": 0.3, "stale_timeout": 0.5})
    wait_until_ready(client, proc)
    base = now_ns(client) + 10_000_000_000  # stamps after the warm-up's
    i = 0
    for _ in range(2):  # thermal on 0.6 s, off 0.6 s
        for with_thermal in (True, False):
            for _ in range(6):
                rgb, thermal = scene(i)
                client.publish_pair(rgb, thermal if with_thermal else None, base + i * 100_000_000)
                i += 1
                client.spin(0.1)
    assert client.wait_for(lambda: client.latest_status("pipeline") is not None, 5, proc)
    assert int(client.latest_status("pipeline")["rgb-only frames"]) > 0
    n_before = len(client.received["labels"])
    assert n_before > 6  # outputs continued through every switch

    def superseded():
        return counter(client.latest_status("pipeline"), "superseded")

    before = superseded()
    for _ in range(40):  # a burst: 40 pairs back to back, nobody spinning
        client.publish_pair(*scene(i), base + i * 100_000_000)
        i += 1
    stop_at = time.monotonic()
    client.spin(3.0)
    arrived = [t for t, _ in client.received["labels"][n_before:]]
    assert arrived and sum(t > stop_at + 1.5 for t in arrived) == 0  # no backlog drains afterwards
    assert len(arrived) < 40
    assert client.wait_for(lambda: superseded() > before, 5, proc) and proc.poll() is None
    stamps = [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for _, m in client.received["labels"]]
    assert stamps == sorted(stamps)  # never an older frame after a newer one


def test_a_stalled_rgb_camera_is_reported_and_output_resumes(launch, micro_checkpoint):
    proc, client = launch(**{"model.checkpoint": str(micro_checkpoint), "stale_timeout": 0.5})
    wait_until_ready(client, proc)
    base = now_ns(client) + 10_000_000_000
    for i in range(25):  # RGB stalls for 2.5 s; thermal keeps coming (diagnostics arrive meanwhile)
        _, thermal = scene(i)
        th = fill_image_msg(Image(), thermal, "mono16")
        th.header.stamp.sec, th.header.stamp.nanosec = divmod(base + i * 100_000_000, 1_000_000_000)
        client.thermal_pub.publish(th)
        client.spin(0.1)
    n_stalled = len(client.received["labels"])
    rgb_cam = client.latest_status("rgb camera")
    assert rgb_cam["level"] == 1 and "stale" in rgb_cam["message"]
    assert client.latest_status("thermal camera")["level"] == 0
    assert len(client.received["labels"]) == n_stalled  # nothing to segment without RGB
    for i in range(25, 55):  # RGB is back
        client.publish_pair(*scene(i), base + i * 100_000_000)
        client.spin(0.1)
        if len(client.received["labels"]) >= n_stalled + 3:
            break
    assert len(client.received["labels"]) >= n_stalled + 3
    for j in range(i + 1, i + 60):  # keep both cameras running until a diagnostics message says RGB is fine
        client.publish_pair(*scene(j), base + j * 100_000_000)
        client.spin(0.1)
        if client.latest_status("rgb camera")["level"] == 0:
            break
    assert client.latest_status("rgb camera")["level"] == 0

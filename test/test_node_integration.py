"""segment_node as a real process over real DDS, with a randomly initialised micro checkpoint.

Each test starts the node with its own ROS domain and parameter file, publishes camera images
from this process and checks what comes back: outputs, diagnostics, thermal loss, overload.
"""

import subprocess
import time

import numpy as np
import pytest
from dds_client import DdsClient, call_service, now_ns, random_pair, stop_node

from conftest import make_micro_checkpoint, script, write_params
from rgbt_seg_ros.pipeline.imaging import image_to_numpy

pytestmark = pytest.mark.integration

H, W = 120, 160


def start_node(params_file, env):
    return subprocess.Popen(
        [script("segment_node"), "--ros-args", "--params-file", str(params_file)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


stop = stop_node


@pytest.fixture
def node_and_client(tmp_path, ros_env, micro_checkpoint, request):
    overrides = {
        "model.checkpoint": str(micro_checkpoint),
        "model.device": "cpu",
        "thermal.mode": "fixed",
        "thermal.min": 25000.0,
        "thermal.max": 33000.0,
        "sync.max_wait": 0.05,
        "output.confidence": True,
    }
    overrides.update(getattr(request, "param", {}))
    params = write_params(tmp_path / "params.yaml", **overrides)
    proc = start_node(params, ros_env)
    client = DdsClient(int(ros_env["ROS_DOMAIN_ID"]), outputs=("labels", "overlay", "confidence"))
    try:
        yield proc, client
    finally:
        client.close()
        out = stop(proc)
        print(out[-4000:])


def wait_until_ready(client, proc, timeout=90.0):
    """Publish pairs at 10 Hz until the node answers (model loading included); return the next frame index."""
    base = now_ns(client)
    for i in range(int(timeout * 10)):
        rgb, thermal = scene(i)
        client.publish_pair(rgb, thermal, base + i * 100_000_000)
        client.spin(0.1)
        assert proc.poll() is None, "segment_node exited"
        if client.received["labels"]:
            return
    raise AssertionError("segment_node never published labels")


def scene(i):
    return random_pair(i, (H, W))


def test_pairs_come_back_as_labels_and_overlays_with_the_rgb_header(node_and_client):
    proc, client = node_and_client
    sent = []
    base = now_ns(client)
    rng = np.random.default_rng(0)
    for i in range(600):  # publish at 10 Hz until 5 overlays came back (model load included), at most 60 s
        stamp = base + i * 100_000_000
        rgb, thermal = scene(i)
        client.publish_pair(rgb, thermal, stamp, thermal_offset_ns=int(rng.normal(8e6, 3e6)))
        sent.append(stamp)
        client.spin(0.1)
        assert proc.poll() is None, "segment_node exited"
        if min(len(client.received[k]) for k in ("labels", "overlay", "confidence")) >= 3:
            break
    assert len(client.received["overlay"]) >= 3 and client.received["confidence"], "no outputs from segment_node"
    for _, msg in client.received["labels"]:
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        assert stamp in sent  # the RGB image's stamp, not the thermal one
        assert msg.header.frame_id == "rgb_camera_optical_frame"
        assert (msg.height, msg.width, msg.encoding) == (H, W, "mono8")
        assert image_to_numpy(msg).max() < 8  # synthetic class ids
    overlay = client.received["overlay"][0][1]
    assert (overlay.height, overlay.width, overlay.encoding) == (H, W, "rgb8")
    conf = image_to_numpy(client.received["confidence"][0][1])
    assert conf.dtype == np.float32 and 0.0 < conf.min() and conf.max() <= 1.0

    def processed():
        status = client.latest_status("pipeline")
        return status is not None and int(status["processed"]) >= 3

    assert client.wait_for(processed, 5, proc)
    status = client.latest_status("pipeline")
    assert "sartm synthetic" in status["model"] and status["level"] == 0
    assert float(status["model time p50 (ms)"]) > 0


def test_bad_input_is_counted_and_the_node_keeps_working(node_and_client):
    from sensor_msgs.msg import Image

    from rgbt_seg_ros.pipeline.imaging import fill_image_msg

    proc, client = node_and_client
    wait_until_ready(client, proc)
    client.received["labels"].clear()
    base = now_ns(client)
    bad_encoding = fill_image_msg(Image(), np.zeros((H, W), np.uint16), "mono16")  # mono16 on the RGB input
    short = fill_image_msg(Image(), np.zeros((H, W), np.uint16), "mono16")
    short.data = short.data[:100]
    absurd = Image(height=100_000, width=100_000, encoding="mono16", step=200_000)
    zero = Image(height=0, width=0, encoding="rgb8", step=0)
    nan_thermal = fill_image_msg(Image(), np.full((H, W), np.nan, np.float32), "32FC1")
    for msg in (bad_encoding, zero):
        client.rgb_pub.publish(msg)
    for msg in (short, absurd, nan_thermal):
        client.thermal_pub.publish(msg)
    client.spin(0.3)
    for i in range(30):  # good pairs afterwards still get through
        rgb, thermal = scene(i)
        client.publish_pair(rgb, thermal, base + i * 100_000_000)
        client.spin(0.1)
        if len(client.received["labels"]) >= 3:
            break

    def counted():
        rgb_st, th_st = client.latest_status("rgb camera"), client.latest_status("thermal camera")
        return rgb_st and th_st and int(rgb_st["rejected"]) >= 2 and int(th_st["rejected"]) >= 3

    assert client.wait_for(counted, 20, proc), (client.latest_status("rgb camera"), client.latest_status("thermal"))
    rgb_st, th_st = client.latest_status("rgb camera"), client.latest_status("thermal camera")
    assert "bad_image=2" in rgb_st["rejected by reason"]
    assert "no_finite_pixel=1" in th_st["rejected by reason"] and "bad_image=1" in th_st["rejected by reason"]
    assert "oversize=1" in th_st["rejected by reason"]  # 100000x100000: refused before any allocation
    assert client.wait_for(lambda: len(client.received["labels"]) >= 3, 30, proc)
    assert proc.poll() is None


@pytest.mark.parametrize("node_and_client", [{"thermal_timeout": 0.5, "stale_timeout": 0.5}], indirect=True)
def test_thermal_loss_gives_rgb_only_outputs_and_recovers(node_and_client):
    proc, client = node_and_client
    wait_until_ready(client, proc)
    base = now_ns(client)
    i = 0

    def run(seconds, with_thermal):
        nonlocal i
        steps = int(seconds / 0.1)
        for _ in range(steps):
            rgb, thermal = scene(i)
            client.publish_pair(rgb, thermal if with_thermal else None, base + i * 100_000_000)
            i += 1
            client.spin(0.1)

    run(1.5, True)
    assert client.wait_for(lambda: len(client.received["labels"]) > 0, 30, proc)
    status = client.latest_status("pipeline")
    assert status is None or status["mode"] == "rgb_thermal"
    n_before = len(client.received["labels"])
    run(2.5, False)
    thermal_cam = client.latest_status("thermal camera")
    pipe = client.latest_status("pipeline")
    assert thermal_cam["level"] == 1 and "stale" in thermal_cam["message"]  # WARN
    assert pipe["mode"] == "rgb_only" and pipe["level"] == 1 and int(pipe["rgb-only frames"]) > 0
    assert len(client.received["labels"]) > n_before + 3  # outputs continue without thermal
    run(2.0, True)
    assert client.wait_for(lambda: client.latest_status("pipeline")["mode"] == "rgb_thermal", 5, proc)
    assert client.latest_status("thermal camera")["level"] == 0


@pytest.mark.parametrize(
    "node_and_client",
    [{"rgb_timeout": 0.5, "stale_timeout": 0.5, "on_rgb_loss": "thermal_only", "registration.check_every": 0}],
    indirect=True,
)
def test_rgb_loss_gives_thermal_only_outputs_and_a_pause_of_both_does_not(node_and_client):
    proc, client = node_and_client
    wait_until_ready(client, proc)
    base = now_ns(client)
    i = 0

    def run(seconds, rgb=True, thermal=True):
        nonlocal i
        sent = []
        for _ in range(int(seconds / 0.1)):
            frame_rgb, frame_thermal = scene(i)
            stamp = base + i * 100_000_000
            if rgb or thermal:
                client.publish_pair(frame_rgb if rgb else None, frame_thermal if thermal else None, stamp, 8_000_000)
                sent.append(stamp)
            i += 1
            client.spin(0.1)
        return sent

    run(1.0)
    run(1.5, rgb=False, thermal=False)  # both cameras paused: no loss of either
    run(1.0)
    assert client.wait_for(lambda: client.latest_status("pipeline") is not None, 5, proc)
    pipe = client.latest_status("pipeline")
    assert pipe["mode"] == "rgb_thermal" and pipe["thermal-only frames"] == "0" and pipe["rgb-only frames"] == "0"
    n_before = len(client.received["labels"])
    thermal_stamps = {s + 8_000_000 for s in run(2.5, rgb=False)}
    rgb_cam, pipe = client.latest_status("rgb camera"), client.latest_status("pipeline")
    assert rgb_cam["level"] == 1 and "stale" in rgb_cam["message"]
    assert pipe["mode"] == "thermal_only" and pipe["level"] == 1 and "RGB lost" in pipe["message"]
    assert int(pipe["thermal-only frames"]) > 0
    new = [m for _, m in client.received["labels"][n_before:]]
    only = [m for m in new if m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec in thermal_stamps]
    assert len(only) >= 3  # outputs continue, each with its thermal message's stamp ...
    assert {m.header.frame_id for m in only} == {"rgb_camera_optical_frame"}  # ... in the RGB camera's frame
    assert {(m.height, m.width) for m in only} == {(H, W)}
    run(1.5)
    assert client.wait_for(lambda: client.latest_status("pipeline")["mode"] == "rgb_thermal", 5, proc)
    assert client.latest_status("rgb camera")["level"] == 0


def test_registration_drift_warns_corrects_and_resets_over_dds(tmp_path, ros_env, micro_checkpoint):
    """A rig whose thermal camera moved 8 px right and 4 px up after calibration: diagnostics WARN with the
    offset, auto-correction applies it (bounded rate), ~/reset_registration returns to the calibration."""
    import yaml
    from std_srvs.srv import Trigger

    from rgbt_seg_ros.data.synthetic import SceneGenerator

    calibration = tmp_path / "calibration.yaml"
    calibration.write_text(yaml.safe_dump(SceneGenerator().calibration_dict()))
    params = write_params(
        tmp_path / "p.yaml",
        **{
            "model.checkpoint": str(micro_checkpoint),
            "model.device": "cpu",
            "registration.mode": "homography",
            "registration.file": str(calibration),
            "registration.check_every": 1,
            "registration.warn_after": 1.0,
            "registration.auto_correct": True,
            "registration.correction_rate": 20.0,
            "thermal.mode": "linear",
            "thermal.scale": 0.01,
            "thermal.min": 250.0,
            "thermal.max": 330.0,
        },
    )
    rig = SceneGenerator(seed=5).thermal_moved(8.0, -4.0)
    frames = [rig.sample(k, "day") for k in range(3)]
    proc = start_node(params, ros_env)
    client = DdsClient(int(ros_env["ROS_DOMAIN_ID"]), outputs=("labels",))
    try:
        stamp0 = now_ns(client)

        def drifting(status):
            return status is not None and status["level"] == 1 and "registration drift" in status["message"]

        for k in range(600):  # 10 Hz until the drift is reported and corrected (model loading included)
            sample = frames[(k // 10) % 3]
            client.publish_pair(sample.rgb[:, :, ::-1].copy(), sample.thermal, stamp0 + k * 100_000_000)
            client.spin(0.1)
            status = client.latest_status("registration")
            if drifting(status) and abs(float(status["applied x (px)"]) - 8.0) < 1.0:
                break
        status = client.latest_status("registration")
        assert drifting(status), status
        assert abs(float(status["offset x (px)"]) - 8.0) < 1.0 and abs(float(status["offset y (px)"]) + 4.0) < 1.0
        assert abs(float(status["applied x (px)"]) - 8.0) < 1.0 and abs(float(status["applied y (px)"]) + 4.0) < 1.0
        assert "auto-correction applies" in status["message"]
        assert call_service(client, proc, Trigger, "/rgbt_seg/reset_registration", Trigger.Request()).success
        client.diagnostics.clear()
        assert client.wait_for(lambda: client.latest_status("registration") is not None, 5, proc)
        after = client.latest_status("registration")
        assert after["applied x (px)"] == "0.00" and after["applied y (px)"] == "0.00" and after["estimates"] == "0"
        assert after["level"] == 0
    finally:
        client.close()
        print(stop(proc)[-4000:])


def test_overload_drops_old_pairs_instead_of_queueing(tmp_path, ros_env):
    # a deliberately slow model: the micro network at 480x640 input, fed at 30 Hz
    ckpt = make_micro_checkpoint(tmp_path / "slow", input_size=(480, 640))
    params = write_params(
        tmp_path / "p.yaml",
        **{
            "model.checkpoint": str(ckpt),
            "model.device": "cpu",
            "thermal.mode": "fixed",
            "thermal.min": 25000.0,
            "thermal.max": 33000.0,
            "output.overlay": False,
        },
    )
    proc = start_node(params, ros_env)
    client = DdsClient(int(ros_env["ROS_DOMAIN_ID"]), outputs=("labels",))
    try:
        rgb, thermal = scene(0)
        base = now_ns(client)
        # warm up until the node answers (loading the model takes 30 s on a busy 2-core machine)
        k, deadline = 0, time.monotonic() + 90.0
        while not client.received["labels"] and time.monotonic() < deadline:
            client.publish_pair(rgb, thermal, base + k * 33_333_333)
            k += 1
            client.spin(0.033)
        assert client.received["labels"], "node never answered"
        client.received["labels"].clear()
        sent = []
        for j in range(k, k + 150):  # 5 s at 30 Hz
            stamp = base + j * 33_333_333
            client.publish_pair(rgb, thermal, stamp)
            sent.append(stamp)
            client.spin(0.033)
        n_at_stop = len(client.received["labels"])
        client.spin(3.0)
        out = client.received["labels"]
        stamps = [m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec for _, m in out]
        assert len(stamps) >= 3
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
        # a queue would keep publishing the backlog after the input stops; the staged worker leaves at most
        # the frame in the forward, the one prepared for the next forward and the newest pair in the mailbox
        assert len(out) - n_at_stop <= 3, (len(out), n_at_stop)
        assert len(out) < 0.8 * len(sent)  # slower than the input: most pairs are superseded
        # the last output is one of the newest pairs, not an old one from a backlog
        assert stamps[-1] >= sent[-4]
        assert client.wait_for(lambda: client.latest_status("pipeline") is not None, 5, proc)
        drops = client.latest_status("pipeline")["drops"]
        superseded = int(drops.split("superseded=")[1].split(",")[0])
        assert superseded > 0
    finally:
        client.close()
        print(stop(proc)[-3000:])


def test_reset_service_clears_statistics(node_and_client):
    from std_srvs.srv import Trigger

    proc, client = node_and_client
    wait_until_ready(client, proc)
    assert client.wait_for(
        lambda: int((client.latest_status("pipeline") or {"processed": "0"})["processed"]) > 0, 10, proc
    )
    assert call_service(client, proc, Trigger, "/rgbt_seg/reset", Trigger.Request()).success
    client.diagnostics.clear()
    assert client.wait_for(lambda: client.latest_status("pipeline") is not None, 5, proc)
    status = client.latest_status("pipeline")
    assert status["processed"] == "0" and status["paired"] == "0"
    assert client.latest_status("rgb camera")["received"] == "0"

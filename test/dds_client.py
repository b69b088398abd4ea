"""A test-side rclpy participant: publishes camera images and records what the node under test sends back."""

from __future__ import annotations

import subprocess
import time
from collections import defaultdict

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image

from rgbt_seg_ros.pipeline.imaging import fill_compressed_msg, fill_image_msg


class DdsClient:
    def __init__(
        self,
        domain_id: int,
        outputs=("labels", "overlay"),
        namespace: str = "/rgbt_seg",
        rgb_topic: str = "/rgb/image",
        thermal_topic: str = "/thermal/image",
        compressed: bool = False,
    ) -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("test_client", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.received: dict[str, list[tuple[float, Image]]] = defaultdict(list)
        self.diagnostics: list[DiagnosticArray] = []
        for out in outputs:
            self.node.create_subscription(Image, f"{namespace}/{out}", self._recorder(out), 20)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 20)
        self.compressed = compressed
        msg_type, suffix = (CompressedImage, "/compressed") if compressed else (Image, "")
        self.rgb_pub = self.node.create_publisher(msg_type, rgb_topic + suffix, qos_profile_sensor_data)
        self.thermal_pub = self.node.create_publisher(msg_type, thermal_topic + suffix, qos_profile_sensor_data)

    def _recorder(self, name):
        def record(msg):
            self.received[name].append((time.monotonic(), msg))

        return record

    def spin(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.executor.spin_once(timeout_sec=min(0.02, max(end - time.monotonic(), 0.0)))

    def publish_pair(
        self,
        rgb: np.ndarray | None,
        thermal: np.ndarray | None,
        stamp_ns: int,
        thermal_offset_ns: int = 0,
        rgb_encoding: str = "bgr8",
        thermal_encoding: str = "mono16",
    ) -> None:
        if rgb is not None:  # None: the RGB camera is silent
            msg = self._message(rgb, rgb_encoding, "jpeg")
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
            msg.header.frame_id = "rgb_camera_optical_frame"
            self.rgb_pub.publish(msg)
        if thermal is not None:
            th = self._message(thermal, thermal_encoding, "png")
            th.header.stamp.sec, th.header.stamp.nanosec = divmod(stamp_ns + thermal_offset_ns, 1_000_000_000)
            th.header.frame_id = "thermal_camera_optical_frame"
            self.thermal_pub.publish(th)

    def _message(self, arr: np.ndarray, encoding: str, codec: str):
        if self.compressed:
            return fill_compressed_msg(CompressedImage(), arr, codec, encoding)
        return fill_image_msg(Image(), arr, encoding)

    def wait_for(self, predicate, timeout: float, proc: subprocess.Popen | None = None) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"segment_node exited with {proc.returncode}")
            if predicate():
                return True
            self.spin(0.05)
        return predicate()

    def latest_status(self, suffix: str) -> dict | None:
        for arr in reversed(self.diagnostics):
            for st in arr.status:
                if st.name.endswith(suffix):
                    return {
                        "level": st.level[0] if isinstance(st.level, bytes) else st.level,
                        "message": st.message,
                        **{kv.key: kv.value for kv in st.values},
                    }
        return None

    def close(self) -> None:
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)


def call_service(client: DdsClient, proc, srv_type, name: str, request, timeout: float = 15.0):
    """Call a service of the node under test and return its response (the test fails when there is none)."""
    cli = client.node.create_client(srv_type, name)
    try:
        assert client.wait_for(cli.service_is_ready, timeout, proc), f"service {name} not available"
        future = cli.call_async(request)
        assert client.wait_for(future.done, timeout, proc), f"no answer from {name}"
        return future.result()
    finally:
        client.node.destroy_client(cli)


def now_ns(client: DdsClient) -> int:
    return client.node.get_clock().now().nanoseconds


def stop_node(proc: subprocess.Popen) -> str:
    """SIGTERM a node process (SIGKILL after 20 s) and return everything it printed."""
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


def random_pair(i: int, rgb_hw=(120, 160), thermal_hw=None) -> tuple[np.ndarray, np.ndarray]:
    """A reproducible random bgr8 image and mono16 thermal image (counts of a ~270-310 K scene)."""
    rng = np.random.default_rng(i)
    rgb = rng.integers(0, 255, (*rgb_hw, 3), dtype=np.uint8)
    thermal = rng.integers(27000, 31000, thermal_hw or rgb_hw, dtype=np.uint16)
    return rgb, thermal

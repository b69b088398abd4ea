"""``segment_node``: the rclpy node.

Foundation stage: the node subscribes to the RGB and thermal image topics, converts
every message with :mod:`rgbt_seg_ros.imaging` (rejecting bad ones with a throttled
message) and publishes ``/diagnostics`` at 1 Hz with per-camera rates and error
counts. Pairing, registration, segmentation and the label/overlay publishers are
added by the node issue on top of this skeleton; until then the node states in its
diagnostics that no model is loaded.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import Image

from .imaging import COLOR_ENCODINGS, THERMAL_ENCODINGS, ImageEncodingError, image_to_numpy


class CameraMonitor:
    """Arrival rate and error counts of one camera topic (thread-safe)."""

    def __init__(self, window: int = 50) -> None:
        self._arrivals: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()
        self.received = 0
        self.rejected = 0
        self.last_error = ""

    def ok(self, now: float) -> None:
        with self._lock:
            self.received += 1
            self._arrivals.append(now)

    def error(self, text: str) -> None:
        with self._lock:
            self.rejected += 1
            self.last_error = text

    def rate_hz(self, now: float) -> float:
        with self._lock:
            if len(self._arrivals) < 2 or now - self._arrivals[-1] > 2.0:
                return 0.0
            span = self._arrivals[-1] - self._arrivals[0]
            return (len(self._arrivals) - 1) / span if span > 0 else 0.0


class SegmentNode(Node):
    def __init__(self) -> None:
        super().__init__("rgbt_seg")
        self.declare_parameter("qos.reliability", "best_effort")
        self.declare_parameter("qos.depth", 5)
        self.declare_parameter("max_megapixels", 16.0)
        reliability = self.get_parameter("qos.reliability").value
        depth = int(self.get_parameter("qos.depth").value)
        if reliability not in ("best_effort", "reliable"):
            self.get_logger().error(
                f"qos.reliability must be best_effort or reliable, got '{reliability}'; using best_effort"
            )
            reliability = "best_effort"
        qos = QoSProfile(
            depth=depth,
            reliability=ReliabilityPolicy.BEST_EFFORT if reliability == "best_effort" else ReliabilityPolicy.RELIABLE,
            history=qos_profile_sensor_data.history,
            durability=qos_profile_sensor_data.durability,
        )
        self.max_pixels = int(float(self.get_parameter("max_megapixels").value) * 1e6)
        self.cameras = {"rgb": CameraMonitor(), "thermal": CameraMonitor()}
        self.create_subscription(Image, "rgb/image", lambda m: self._on_image(m, "rgb", COLOR_ENCODINGS), qos)
        self.create_subscription(Image, "thermal/image", lambda m: self._on_image(m, "thermal", THERMAL_ENCODINGS), qos)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(1.0, self._publish_diagnostics)
        self.get_logger().info(
            f"listening on {self.resolve_topic_name('rgb/image')} and {self.resolve_topic_name('thermal/image')} "
            f"({reliability}, depth {depth}); segmentation model: not yet available in this version"
        )

    def _on_image(self, msg: Image, camera: str, expected: tuple[str, ...]) -> None:
        try:
            image_to_numpy(msg, expected=expected, max_pixels=self.max_pixels)
        except ImageEncodingError as exc:
            self.cameras[camera].error(str(exc))
            self.get_logger().warning(f"{camera} image rejected: {exc}", throttle_duration_sec=5.0)
            return
        self.cameras[camera].ok(time.monotonic())

    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        values = []
        level = 0  # 0 OK, 1 WARN, 2 ERROR
        for name, cam in self.cameras.items():
            rate = cam.rate_hz(now)
            if rate == 0.0:
                level = max(level, 1)
            values += [
                KeyValue(key=f"{name} rate (Hz)", value=f"{rate:.2f}"),
                KeyValue(key=f"{name} received", value=str(cam.received)),
                KeyValue(key=f"{name} rejected", value=str(cam.rejected)),
                KeyValue(key=f"{name} last error", value=cam.last_error),
            ]
        values.append(KeyValue(key="model", value="none (segmentation not yet available)"))
        status = DiagnosticStatus(
            level=bytes([level]),
            name=f"{self.get_name()}: cameras",
            hardware_id="rgbt_camera_pair",
            message="receiving both cameras" if level == 0 else "a camera is silent",
            values=values,
        )
        arr = DiagnosticArray(status=[status])
        arr.header.stamp = self.get_clock().now().to_msg()
        self.diag_pub.publish(arr)


def main(argv: list[str] | None = None) -> int:
    rclpy.init(args=argv if argv is not None else sys.argv)
    node = SegmentNode()
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

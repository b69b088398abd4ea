"""``segment_node``: synchronized RGB-thermal segmentation as a ROS 2 node.

Data flow (docs/architecture.md): subscription callbacks only convert (``imaging``) and
hand the images to the shared :class:`~rgbt_seg_ros.pipeline.frame_flow.FrameFlow` (pairing, thermal
loss), whose frames go to a single-slot mailbox; a
:class:`~rgbt_seg_ros.pipeline.frame_flow.StagedWorker` runs the shared
:class:`~rgbt_seg_ros.pipeline.frame_flow.FramePipeline` stages on three threads (prepare | forward |
finish + publish). When the model is slower than the cameras, older pairs are replaced in the
mailbox and counted as dropped, never queued, so latency stays bounded. Replay runs the same
objects on a bag.

Inputs are relative names that users remap, as image_pipeline's nodes do:
``rgb/image`` and ``thermal/image`` (``sensor_msgs/Image``, or ``<name>/compressed``
``sensor_msgs/CompressedImage`` with ``input.<camera>.transport: compressed``), and
``rgb/camera_info`` / ``thermal/camera_info`` (registration.mode calibrated).

Outputs (private namespace, RGB header and size): ``~/labels`` (mono8 / mono16),
``~/overlay`` (rgb8), optional ``~/confidence`` (32FC1), ``~/colored_labels`` (rgb8)
and ``~/thermal_registered`` (mono8); outputs nobody subscribes to are not rendered.
``/diagnostics`` at 1 Hz on a steady (wall) clock, so sim time without ``/clock`` does
not stall them; ``~/reset`` (std_srvs/Trigger) clears pairing and statistics.

Two modes, one behaviour: ``segment_node`` configures and activates itself at start;
``segment_node --managed`` is an ``rclpy.lifecycle`` node: configure loads and warms the
model, activate creates the subscriptions and publishers, deactivate stops the work
(the model stays loaded), cleanup frees the model (and GPU memory).
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
import traceback

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.clock import Clock, ClockType

try:  # Iron and newer
    from rclpy.event_handler import SubscriptionEventCallbacks, UnsupportedEventTypeError
except ImportError:  # Humble
    from rclpy.qos_event import SubscriptionEventCallbacks, UnsupportedEventTypeError
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header
from std_srvs.srv import Trigger

from ..memory import release_free_heap
from ..pipeline.frame_flow import (
    FrameFlow,
    FramePipeline,
    Job,
    LatestSlot,
    StagedWorker,
    demo_model_note,
    labels_encoding,
    normalizer_from_params,
    registrar_from_camera_info,
    thermal_display_u8,
)
from ..pipeline.imaging import ImageEncodingError, fill_image_msg, rgb_from_msg, thermal_from_msg
from ..pipeline.monitoring import CameraMonitor, PipelineStats
from ..pipeline.params import INPUT_NAMES, SPEC_BY_NAME, SPECS, check_value, is_ros_owned, validate
from ..pipeline.registration_health import HealthSettings
from ..pipeline.render import parse_palette
from ..resources import share_path
from . import diagnostics

NODE_NAME = "rgbt_seg"
OUTPUT_TOPICS = {
    "labels": "~/labels",
    "overlay": "~/overlay",
    "confidence": "~/confidence",
    "colored_labels": "~/colored_labels",
    "thermal_registered": "~/thermal_registered",
}
RESTART_REASON = "changing {name} needs a restart of the node (model, registration, inputs and QoS are fixed at start)"


def stamp_ns(header) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def _descriptor(spec) -> ParameterDescriptor:
    # dynamic_typing: the type is checked in _on_set_parameters, which names the types in its refusal
    desc = ParameterDescriptor(description=spec.description, dynamic_typing=True)
    extra = []
    if spec.choices:
        extra.append(f"one of: {', '.join(spec.choices)}")
    if not spec.dynamic:
        extra.append("fixed at start (changing it needs a restart)")
    desc.additional_constraints = "; ".join(extra)
    if spec.min is not None and spec.max is not None:
        if spec.kind is float:
            desc.floating_point_range = [
                FloatingPointRange(from_value=float(spec.min), to_value=float(spec.max), step=0.0)
            ]
        elif spec.kind is int:
            desc.integer_range = [IntegerRange(from_value=int(spec.min), to_value=int(spec.max), step=1)]
    return desc


class SegmentBehaviour:
    """What ``segment_node`` does, for a plain :class:`Node` or a :class:`LifecycleNode` (mixin).

    ``_setup`` runs once in the constructor (parameters, diagnostics, reset service);
    ``_configure`` / ``_activate`` / ``_deactivate`` / ``_cleanup`` are the lifecycle steps,
    which the plain node runs itself at start (configure + activate).
    """

    def _setup(self) -> None:
        self.param_errors: list[str] = []
        self._warned: set[str] = set()
        self._falling_back = False  # True while the node itself puts a refused start-up value back to its default
        self.p = self._declare_parameters()
        self.cameras = {"rgb": CameraMonitor(), "thermal": CameraMonitor()}
        self.frame_ids = {"rgb": "", "thermal": ""}
        self.stats = PipelineStats()
        self._lock = threading.Lock()  # guards the pipeline settings changed by parameter callbacks
        self.flow = FrameFlow(
            self.p,
            on_warning=lambda text: self.get_logger().warning(text, throttle_duration_sec=5.0),
            on_switch=self._on_mode,
        )
        self.slot = LatestSlot()
        self.pipeline: FramePipeline | None = None
        self.model_status = "not loaded"
        self.lifecycle_state = "unconfigured"
        self.registration_mode = self.p["registration.mode"]
        self.device = "?"
        self.class_set_status = "?"
        self._camera_infos: dict[str, CameraInfo] = {}
        self._subs: list = []
        self._last_trim = 0.0
        self._trim_pending = False
        self.pubs: dict = {}
        self._poll_timer = None
        self.worker: StagedWorker | None = None
        # The names after remapping and namespacing, as the node really subscribes to them.
        self.input_topics = {}
        for key, name in INPUT_NAMES.items():
            resolved = self.resolve_topic_name(name)
            camera = key.split("_")[0]
            if key in ("rgb", "thermal") and self.p[f"input.{camera}.transport"] == "compressed":
                resolved += "/compressed"  # image_transport's convention: <base topic>/compressed
            self.input_topics[key] = resolved
        steady = Clock(clock_type=ClockType.STEADY_TIME)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_service(Trigger, "~/reset", self._on_reset)
        self.create_service(Trigger, "~/reset_registration", self._on_reset_registration)
        self.create_timer(1.0, self._publish_diagnostics, clock=steady)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._steady = steady

    # ------------------------------------------------------------------ lifecycle steps
    def _configure(self) -> bool:
        """Load and warm up the model; False (with a logged reason) when it cannot be loaded."""
        self.model_status = "loading"
        what = self.p["model.checkpoint"] or self.p["model.config"]
        self.get_logger().info(f"loading model {what} on {self.p['model.device']} ...")
        t0 = time.monotonic()
        try:
            pipeline = FramePipeline.from_params(self.p, on_problem=self._refuse_class_set)
        except Exception as exc:  # bad checkpoint, config, calibration: keep running, report, segment nothing
            self.model_status = f"failed: {exc}"
            self.stats.model_failed(f"could not load the pipeline: {exc}")
            self.get_logger().error(f"could not load the segmentation pipeline: {exc}")
            return False
        self.pipeline = pipeline
        self.stats.reset()  # an earlier failed configure is no longer the state
        seg = pipeline.segmenter
        self.device = str(seg.device)
        self.class_set_status = f"{seg.class_set} (of {', '.join(seg.class_sets)})"
        if pipeline.registrar is None:
            self.registration_mode = "calibrated (waiting for both camera_info topics)"
        else:
            self.registration_mode = pipeline.registrar.mode
        self.model_status = (
            f"{seg.backend} {seg.dataset_info.name} ({seg.dataset_info.num_classes} classes) "
            f"{seg.input_size[0]}x{seg.input_size[1]} on {seg.device} {seg.precision}, "
            f"runtime {seg.runtime_report.summary()}"
        )
        for note in seg.runtime_report.notes:
            self.get_logger().warning(f"model.runtime: {note}")
        if seg.runtime_report.fallback:
            self.get_logger().warning(
                f"model.runtime onnxruntime refused, PyTorch runs instead: {seg.runtime_report.fallback}"
            )
        note = demo_model_note(seg)
        if note:
            self.get_logger().warning(note)
        self.get_logger().info(f"ready: {self.model_status} (loaded and warmed up in {time.monotonic() - t0:.1f} s)")
        return True

    def _activate(self) -> None:
        qos = self._qos()
        types = {
            cam: CompressedImage if self.p[f"input.{cam}.transport"] == "compressed" else Image
            for cam in ("rgb", "thermal")
        }
        self._subs = [
            self._image_subscription("rgb", types["rgb"], self._on_rgb, qos),
            self._image_subscription("thermal", types["thermal"], self._on_thermal, qos),
        ]
        if self.p["registration.mode"] == "calibrated":
            self._subs += [
                self.create_subscription(
                    CameraInfo, self.input_topics["rgb_info"], lambda m: self._on_info("rgb", m), qos
                ),
                self.create_subscription(
                    CameraInfo, self.input_topics["thermal_info"], lambda m: self._on_info("thermal", m), qos
                ),
            ]
        self.pubs = {key: self.create_publisher(Image, topic, 5) for key, topic in OUTPUT_TOPICS.items()}
        self._poll_timer = self.create_timer(0.02, self._on_poll, clock=self._steady)
        self.slot = LatestSlot()
        self.worker = StagedWorker(
            self.slot,
            pipeline=lambda: self.pipeline,
            deliver=self._deliver,
            outputs=self._wanted,
            on_error=self._frame_failed,
            on_drop=self.stats.drop,
            lock=self._lock,
            name="rgbt_seg",
        ).start()
        self.lifecycle_state = "active"
        self.get_logger().info(
            f"active: rgb {self.input_topics['rgb']} + thermal {self.input_topics['thermal']} "
            f"({self.p['qos.reliability']}, depth {self.p['qos.depth']}) -> "
            f"{self.resolve_topic_name('~/labels')}, {self.resolve_topic_name('~/overlay')}; model: {self.model_status}"
        )

    def _image_subscription(self, camera: str, msg_type, callback, qos):
        """A camera subscription that also counts what the middleware lost before delivery.

        Images above the transport's limits (an 8000x8000 frame on best-effort QoS) may never reach
        the callback; the message_lost event makes them visible in diagnostics instead of silent.
        """

        def lost(info) -> None:
            self.cameras[camera].transport_lost(info.total_count_change, time.monotonic())
            self._trim_heap()
            self.get_logger().warning(
                f"{camera}: {info.total_count_change} message(s) lost before delivery on {self.input_topics[camera]} "
                f"({info.total_count} in all; oversize images on best-effort QoS, or a saturated link)",
                throttle_duration_sec=5.0,
            )

        try:
            return self.create_subscription(
                msg_type,
                self.input_topics[camera],
                callback,
                qos,
                event_callbacks=SubscriptionEventCallbacks(message_lost=lost),
            )
        except UnsupportedEventTypeError:  # an rmw without message_lost events
            self._warn_once("no_lost_events", "this middleware does not report lost messages; losses are not counted")
            return self.create_subscription(msg_type, self.input_topics[camera], callback, qos)

    def _deactivate(self) -> None:
        self._stop_worker()
        for sub in self._subs:
            self.destroy_subscription(sub)
        for pub in self.pubs.values():
            self.destroy_publisher(pub)
        if self._poll_timer is not None:
            self.destroy_timer(self._poll_timer)
        self._subs, self.pubs, self._poll_timer = [], {}, None
        self.flow.reset()
        self.lifecycle_state = "inactive"

    def _cleanup(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()
        self.pipeline = None
        self.model_status = "not loaded"
        self.class_set_status = "?"
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.lifecycle_state = "unconfigured"

    def _stop_worker(self) -> None:
        """Stop this activation's worker; one still inside a long forward stops after it (it never publishes)."""
        self.slot.close()
        if self.worker is not None and not self.worker.stop(timeout=10.0):
            self.get_logger().warning("the worker is still inside a forward pass; it stops when that returns")
        self.worker = None
        if self.pipeline is not None:
            self.pipeline.close()  # the registration monitor's thread (a new activation starts it again)

    # ------------------------------------------------------------------ setup
    def _declare_parameters(self) -> dict:
        """Declare every parameter; a refused value from the file is reported and replaced by its default.

        The policy is :func:`~rgbt_seg_ros.pipeline.params.check_value`, the one ``rgbt-seg replay`` applies to the
        same file. Types are checked by the project (dynamic typing in the descriptor), so a wrong type is
        refused with the type's name, at start-up and at run time alike.
        """
        values, resets = {}, []
        for spec in SPECS:
            try:
                value = self.declare_parameter(spec.name, spec.default, _descriptor(spec)).value
            except Exception as exc:  # out of the declared range
                self._report_parameter(f"parameter {spec.name}: {exc}; using the default {spec.default!r}")
                if not self.has_parameter(spec.name):
                    self.declare_parameter(spec.name, spec.default, _descriptor(spec), ignore_override=True)
                value = spec.default
            values[spec.name], problem = check_value(spec.name, _plain(value))
            if problem:
                self._report_parameter(problem)
                resets.append(Parameter(spec.name, value=spec.default))
        if resets:  # what `ros2 param get` shows is what the node uses
            self.set_parameters(resets)
        for name in getattr(self, "_parameter_overrides", {}):  # names this node does not know
            if name not in SPEC_BY_NAME and not is_ros_owned(name):
                self._report_parameter(check_value(name, None)[1])
        return values

    def _report_parameter(self, text: str) -> None:
        self.param_errors.append(text)
        self.get_logger().error(text)

    def _refuse_class_set(self, text: str) -> None:
        """``model.class_set`` names a set the model does not have (known only once the model is found): reported,
        and the parameter goes back to its default "" (the primary set), like every refused start-up value."""
        self._report_parameter(text)
        default = SPEC_BY_NAME["model.class_set"].default
        self.p["model.class_set"] = default
        self._falling_back = True
        try:
            self.set_parameters([Parameter("model.class_set", value=default)])
        finally:
            self._falling_back = False

    def _qos(self) -> QoSProfile:
        return QoSProfile(
            depth=int(self.p["qos.depth"]),
            reliability=(
                ReliabilityPolicy.BEST_EFFORT
                if self.p["qos.reliability"] == "best_effort"
                else ReliabilityPolicy.RELIABLE
            ),
            history=qos_profile_sensor_data.history,
            durability=qos_profile_sensor_data.durability,
        )

    def _warn_once(self, key: str, text: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.get_logger().warning(text)

    # ------------------------------------------------------------------ callbacks
    def _on_rgb(self, msg) -> None:
        now = time.monotonic()
        try:
            rgb = rgb_from_msg(msg, max_pixels=self._max_pixels())
        except ImageEncodingError as exc:
            self._reject("rgb", exc.reason, str(exc))
            return
        self.cameras["rgb"].arrived(now)
        self.frame_ids["rgb"] = msg.header.frame_id
        self._hand_over(self.flow.rgb(stamp_ns(msg.header), (msg.header, rgb), time.monotonic_ns()), now)

    def _on_thermal(self, msg) -> None:
        now = time.monotonic()
        try:
            thermal = thermal_from_msg(msg, max_pixels=self._max_pixels())
        except ImageEncodingError as exc:
            self._reject("thermal", exc.reason, str(exc))
            return
        self.cameras["thermal"].arrived(now)
        self.frame_ids["thermal"] = msg.header.frame_id
        self._hand_over(self.flow.thermal(stamp_ns(msg.header), (msg.header, thermal), time.monotonic_ns()), now)

    def _on_mode(self, mode: str) -> None:
        previous, self._mode = getattr(self, "_mode", "rgb_thermal"), mode
        if mode == "rgb_only":
            self.get_logger().warning("thermal lost: segmenting RGB only until thermal returns")
        elif mode == "thermal_only":
            self.get_logger().warning(
                "RGB lost: segmenting thermal alone (published in the RGB grid, RGB frame_id) until RGB returns"
            )
        else:
            back = {"rgb_only": "thermal is back", "thermal_only": "RGB is back"}.get(previous, "both cameras run")
            self.get_logger().info(f"{back}: segmenting RGB-thermal pairs again")

    def _on_info(self, camera: str, msg: CameraInfo) -> None:
        self._camera_infos[camera] = msg
        if self.pipeline is None or self.pipeline.registrar is not None or len(self._camera_infos) < 2:
            return
        try:
            registrar = registrar_from_camera_info(self.p, self._camera_infos["rgb"], self._camera_infos["thermal"])
        except Exception as exc:
            self.stats.model_failed(f"calibrated registration from camera_info failed: {exc}")
            self.get_logger().error(
                f"calibrated registration from camera_info failed: {exc}", throttle_duration_sec=10.0
            )
            return
        with self._lock:
            self.pipeline.registrar = registrar
        self.registration_mode = "calibrated (intrinsics from camera_info)"
        self.get_logger().info("calibrated registration built from camera_info")

    def _on_poll(self) -> None:
        self._hand_over(self.flow.poll(time.monotonic_ns()), time.monotonic())

    def _hand_over(self, frames, now: float) -> None:
        """Frames formed by the flow go to the worker's mailbox; the newest wins."""
        worker = self.worker
        for frame in frames:
            if frame.thermal is not None and frame.rgb is not None:
                self.stats.count_pair(now)
            if worker is None:  # deactivating: the subscriptions go next
                self.stats.drop("stopped")
            elif worker.submit(Job(frame, now)):
                self.stats.drop("superseded")

    def _reject(self, camera: str, reason: str, text: str) -> None:
        self.cameras[camera].reject(reason, text)
        self.get_logger().warning(f"{camera} image rejected: {text}", throttle_duration_sec=5.0)
        if reason == "oversize":  # the refused buffer was large: hand its pages back, so a burst leaves no RSS
            self._trim_heap()

    def _trim_heap(self) -> None:
        """After a large sample was refused or lost, give freed heap pages back to the OS (at most 1/s).

        The diagnostics timer trims once more when such events stop, for the buffers freed after the last one.
        """
        now = time.monotonic()
        self._trim_pending = True
        if now - self._last_trim > 1.0:
            self._last_trim = now
            release_free_heap()

    def _max_pixels(self) -> int:
        return int(float(self.p["max_megapixels"]) * 1e6)

    # ------------------------------------------------------------------ worker
    def _wanted(self) -> set[str]:
        pubs = self.pubs
        return {
            k for k in OUTPUT_TOPICS if self.p[f"output.{k}"] and k in pubs and pubs[k].get_subscription_count() > 0
        }

    def _frame_failed(self, stage: str, exc: Exception) -> None:
        text = f"segmentation failed ({stage}): {exc}"
        self.stats.model_failed(text)
        self.get_logger().error(text, throttle_duration_sec=5.0)
        self.get_logger().debug("".join(traceback.format_exception(exc)))

    def _deliver(self, job: Job, result) -> None:
        """The worker's last stage: publish one finished frame and account for it."""
        pipeline = job.pipeline
        if pipeline.size_mismatch:
            self._warn_once("size_mismatch", pipeline.size_mismatch)
        header = job.pair.rgb[0] if job.pair.rgb is not None else self._thermal_only_header(job.pair.thermal[0])
        t0 = time.perf_counter()
        try:
            self._publish(header, result, job.outputs)  # what finish rendered for the subscribers it saw
        except Exception as exc:  # the context goes away on shutdown (SIGINT/SIGTERM)
            if not rclpy.ok(context=self.context) or self.worker is None:
                return
            self.stats.model_failed(f"publishing failed: {exc}")
            return
        done = time.monotonic()
        timings = result.timings_ms
        model_ms = timings.get("model", float("nan"))
        host_ms = sum(v for k, v in timings.items() if k != "model") + (time.perf_counter() - t0) * 1e3
        age_ms = (self.get_clock().now().nanoseconds - stamp_ns(header)) / 1e6
        self.stats.frame_done(
            done, (done - job.formed_at) * 1e3, age_ms, model_ms, host_ms, result.rgb_only, result.thermal_only
        )

    def _thermal_only_header(self, thermal_header) -> Header:
        """A thermal-only frame is published in the RGB grid: the thermal stamp, the RGB camera's frame_id (thermal-only
        starts only after an RGB frame was seen; the thermal frame_id is a fallback that should not occur)."""
        return Header(stamp=thermal_header.stamp, frame_id=self.frame_ids["rgb"] or thermal_header.frame_id)

    def _publish(self, header, result, wanted: set[str]) -> None:
        def send(key: str, arr: np.ndarray, encoding: str) -> None:
            msg = fill_image_msg(Image(), arr, encoding)
            msg.header = header
            self.pubs[key].publish(msg)

        if "labels" in wanted:
            send("labels", result.labels, labels_encoding(result.labels))
        if "overlay" in wanted and result.overlay is not None:
            send("overlay", result.overlay, "rgb8")
        if "confidence" in wanted and result.confidence is not None:
            send("confidence", result.confidence.astype(np.float32, copy=False), "32FC1")
        if "colored_labels" in wanted and result.colored_labels is not None:
            send("colored_labels", result.colored_labels, "rgb8")
        if "thermal_registered" in wanted and result.thermal_registered is not None:
            send("thermal_registered", thermal_display_u8(result.thermal_registered, result.valid), "mono8")

    # ------------------------------------------------------------------ parameters, reset
    def _on_set_parameters(self, params) -> SetParametersResult:
        updates = {}
        for param in params:
            spec = SPEC_BY_NAME.get(param.name)
            if spec is None:
                continue  # e.g. use_sim_time
            value = _plain(param.value)
            problem = validate(param.name, value)
            if problem:
                return SetParametersResult(successful=False, reason=problem)
            if not spec.dynamic and not self._falling_back:
                return SetParametersResult(successful=False, reason=RESTART_REASON.format(name=param.name))
            updates[param.name] = float(value) if spec.kind is float else value
        merged = {**self.p, **updates}
        try:
            normalizer = normalizer_from_params(merged) if any(k.startswith("thermal.") for k in updates) else None
            if "output.palette" in updates and self.pipeline is not None and list(merged["output.palette"]) != [0]:
                parse_palette(list(merged["output.palette"]), self.pipeline.num_classes)
        except ValueError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        with self._lock:
            self.p.update(updates)
            if self.pipeline is not None:
                if normalizer is not None:
                    self.pipeline.normalizer = normalizer
                if "output.palette" in updates:
                    self.pipeline.set_palette(merged["output.palette"])
                self.pipeline.overlay_alpha = float(self.p["output.overlay_alpha"])
            self.flow.update(self.p, sync_changed=any(k.startswith("sync.") for k in updates))
            if self.pipeline is not None and self.pipeline.health is not None:
                if any(k.startswith("registration.") for k in updates):
                    self.pipeline.health.configure(HealthSettings.from_params(self.p))
        if updates:
            self.get_logger().info(f"parameters updated: {updates}")
        return SetParametersResult(successful=True)

    def _on_reset(self, request, response):
        self.flow.reset()
        self.slot.clear()
        self.stats.reset()
        for cam in self.cameras.values():
            cam.reset()
        response.success = True
        response.message = "pairing state and statistics cleared"
        return response

    def _on_reset_registration(self, request, response):
        """Back to the calibration: the drift correction and the estimates are forgotten."""
        pipeline = self.pipeline
        if pipeline is None or pipeline.health is None:
            response.success, response.message = False, "no model loaded: nothing to reset"
            return response
        pipeline.health.reset()
        response.success = True
        response.message = "registration back to the calibration (correction and estimates cleared)"
        self.get_logger().info(response.message)
        return response

    # ------------------------------------------------------------------ diagnostics
    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        if self._trim_pending and now - self._last_trim > 1.0:
            self._trim_pending = False
            self._last_trim = now
            release_free_heap()
        self.diag_pub.publish(diagnostics.array(self, now))


def _plain(value):
    """A parameter value as plain Python: rclpy gives arrays as array.array (or numpy) sequences."""
    if value is None or isinstance(value, (str, bytes, bool, int, float)):
        return value
    return [v.item() if hasattr(v, "item") else v for v in value]


class SegmentNode(SegmentBehaviour, Node):
    """The plain node: configures (loads the model) and activates itself at start."""

    def __init__(self, **kwargs) -> None:
        Node.__init__(self, NODE_NAME, **kwargs)
        self._setup()
        self._configure()
        self._activate()

    def destroy_node(self) -> None:
        self._stop_worker()
        super().destroy_node()


class ManagedSegmentNode(SegmentBehaviour, LifecycleNode):
    """The managed node: drive it with ``ros2 lifecycle set /rgbt_seg configure|activate|...``."""

    def __init__(self, **kwargs) -> None:
        LifecycleNode.__init__(self, NODE_NAME, **kwargs)
        self._setup()
        self.get_logger().info("managed node: waiting for 'configure' (ros2 lifecycle set <node> configure)")

    def on_configure(self, state) -> TransitionCallbackReturn:
        ok = self._configure()
        if ok:
            self.lifecycle_state = "inactive"
        return TransitionCallbackReturn.SUCCESS if ok else TransitionCallbackReturn.FAILURE

    def on_activate(self, state) -> TransitionCallbackReturn:
        self._activate()
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        self._deactivate()
        self.get_logger().info("inactive: subscriptions and publishers removed, model kept")
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        self._cleanup()
        self.get_logger().info("unconfigured: model unloaded")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state) -> TransitionCallbackReturn:
        if self.lifecycle_state == "active":
            self._deactivate()
        self._cleanup()
        self.lifecycle_state = "finalized"  # no transition leads out of it: the process must be restarted
        self.get_logger().info("finalized: model unloaded; restart the node to segment again")
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state) -> TransitionCallbackReturn:
        """Back to a clean unconfigured node: no subscriptions, publishers or model left behind."""
        if self._subs or self.pubs or self.worker is not None:
            self._deactivate()
        self._cleanup()
        return TransitionCallbackReturn.SUCCESS

    def destroy_node(self) -> None:
        self._stop_worker()
        super().destroy_node()


def middleware_defaults(environ=os.environ) -> str | None:
    """Point Fast DDS at the package's profile (readers free sample buffers) unless the user configured it.

    Returns the profile used, or None when another middleware or the user's own Fast DDS XML is in place.
    Must run before ``rclpy.init``.
    """
    if not environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp").startswith("rmw_fastrtps"):
        return None
    if environ.get("FASTDDS_DEFAULT_PROFILES_FILE") or environ.get("FASTRTPS_DEFAULT_PROFILES_FILE"):
        return None
    try:
        profile = share_path("config", "fastdds_profiles.xml")
    except FileNotFoundError:
        return None
    if not profile.is_file():
        return None
    environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(profile)
    environ.setdefault("RMW_FASTRTPS_USE_QOS_FROM_XML", "1")
    return str(profile)


def main(argv: list[str] | None = None) -> int:
    """``segment_node [--managed] [--ros-args ...]``."""
    argv = list(argv if argv is not None else sys.argv)
    plain_args = rclpy.utilities.remove_ros_args(argv)[1:]
    managed = "--managed" in plain_args
    unknown = [a for a in plain_args if a != "--managed"]
    if unknown:
        print(
            f"segment_node: unknown argument(s) {' '.join(unknown)}; usage: segment_node [--managed] [--ros-args ...]",
            file=sys.stderr,
        )
        return 2
    profile = middleware_defaults()
    rclpy.init(args=argv)
    node = None
    try:
        node = ManagedSegmentNode() if managed else SegmentNode()
        if profile:
            node.get_logger().info(f"Fast DDS profile {profile} (image readers free each sample's buffer)")
        rclpy.spin(node)
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    except RuntimeError:  # rclpy RCLError
        if rclpy.ok():  # a real failure, not a shutdown (SIGTERM) during start-up
            raise
    finally:
        # Ctrl-C in a terminal reaches the node twice under `ros2 launch` (the terminal's process group and
        # launch's own SIGINT): a second one must not cut the teardown short (SIGTERM still ends it).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if node is not None:
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

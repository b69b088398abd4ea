"""``rgbt-seg bench soak`` and ``rgbt-seg bench oversize``: the live node under field faults, over DDS.

Both start the real ``segment_node`` (:class:`~rgbt_seg_ros.ros.node_session.NodeSession`) on the synthetic
rig and publish camera pairs from this process.

**soak** runs for ``seconds`` at ``rate`` Hz and injects, on a fixed schedule:

* thermal flaps: thermal silent for ``flap_off`` s every ``flap_period`` s while RGB goes on;
  each one must switch the node to rgb_only once (and back);
* one RGB stall of ``stall`` s while thermal goes on (a camera driver hanging): no rgb_only;
* one joint pause of ``pause`` s (both cameras silent, as in a driver restart): no rgb_only;
* one burst every ``burst_period`` s: ``burst_pairs`` pairs back to back (a driver flushing its
  queue), ``burst_oversize`` RGB frames above ``max_megapixels`` and one frame with a wrong encoding.

It reports the node's RSS drift (sampled every 5 s after warm-up), label latency p50/p95, counts by
reason from the node's diagnostics, and rgb_only switches expected against observed (the node's
"thermal lost" log lines).

**oversize** sends ``frames`` RGB images above the megapixel limit and reports how many the node
refused, how many the middleware reported lost, and the node's RSS before, at its peak and after.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..memory import rss_mb
from ..pipeline.frame_flow import latency_summary
from .live_benchmark import synthetic_rig
from .node_session import NodeSession, NodeSessionError

SWITCH_LINE = "thermal lost: segmenting RGB only"


@dataclass
class SoakPlan:
    seconds: float = 1800.0
    rate: float = 10.0
    flap_period: float = 30.0
    flap_off: float = 3.0
    stall_at: float = 100.0
    stall: float = 20.0
    pause_at: float = 200.0
    pause: float = 3.0
    burst_period: float = 60.0
    burst_pairs: int = 25
    burst_oversize: int = 2
    oversize: tuple[int, int] = (4000, 5000)  # rows, cols: 20 MP, above the 16 MP default limit
    thermal_timeout: float = 1.0
    events: list = field(default_factory=list)

    @classmethod
    def short(cls, seconds: float = 60.0) -> SoakPlan:
        """The same faults squeezed into about a minute (the version ``make test`` runs)."""
        return cls(
            seconds=seconds,
            flap_period=12.0,
            flap_off=2.0,
            stall_at=26.0,
            stall=6.0,
            pause_at=40.0,
            pause=3.0,
            burst_period=20.0,
            thermal_timeout=0.5,
        )

    def cameras_at(self, t: float) -> tuple[bool, bool]:
        """(rgb on, thermal on) at time ``t`` after the start."""
        in_stall = self.stall_at <= t < self.stall_at + self.stall
        in_pause = self.pause_at <= t < self.pause_at + self.pause
        phase = t % self.flap_period
        flap = self.flap_period - self.flap_off <= phase and not self._near_other_event(t)
        return (not in_stall and not in_pause), (not in_pause and not flap)

    def _near_other_event(self, t: float) -> bool:
        """Flaps are skipped where they would overlap the stall or the pause (their effects would mix)."""
        margin = self.flap_off + 2 * self.thermal_timeout
        for start, length in ((self.stall_at, self.stall), (self.pause_at, self.pause)):
            if start - margin <= t < start + length + margin:
                return True
        return False

    def expected_switches(self) -> int:
        """rgb_only switches the schedule must cause: RGB arriving for longer than thermal_timeout without thermal.

        A joint pause (both silent) and an RGB stall cause none (the node's PartnerWatch rule).
        """
        n, streak = 0, 0.0
        step = 1.0 / self.rate
        for i in range(int(round(self.seconds * self.rate))):
            rgb, thermal = self.cameras_at(i * step)
            if thermal or not rgb:  # thermal seen, or RGB silent (alone or with thermal): no RGB-only streak
                streak = 0.0
                continue
            streak += step
            if streak - step <= self.thermal_timeout < streak:
                n += 1
        return n


def _counts(text: str) -> dict[str, int]:
    out = {}
    for part in (text or "").split(","):
        if "=" in part:
            key, value = part.strip().split("=", 1)
            out[key] = int(value)
    return out


def bench_soak(checkpoint: Path, plan: SoakPlan, size=(480, 640), device: str = "cpu", progress=print) -> dict:
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from ..pipeline.imaging import fill_image_msg

    work = Path(tempfile.mkdtemp(prefix="rgbt_soak_"))
    params, rgb_msg, th_msg = synthetic_rig(
        work, checkpoint, size, device, thermal_timeout=plan.thermal_timeout, stale_timeout=2.0
    )
    big = fill_image_msg(Image(), np.zeros((*plan.oversize, 3), np.uint8), "rgb8")
    bad = fill_image_msg(Image(), np.zeros(size, np.uint16), "mono16")  # mono16 on the RGB input
    log = work / "segment_node.log"
    arrivals: list[tuple[int, float]] = []
    rss: list[tuple[float, float]] = []
    sent = {"pairs": 0, "rgb_only": 0, "thermal_only": 0, "oversize": 0, "bad_encoding": 0}
    with NodeSession(params, log, client_name="rgbt_soak_client") as s:
        node = s.node
        node.create_subscription(
            Image, "/rgbt_seg/labels", lambda m: arrivals.append((_stamp(m), time.monotonic())), 50
        )
        rgb_pub = node.create_publisher(Image, "/rgb/image", qos_profile_sensor_data)
        th_pub = node.create_publisher(Image, "/thermal/image", qos_profile_sensor_data)
        published: dict[int, float] = {}

        def publish(rgb: bool, thermal: bool) -> None:
            now = node.get_clock().now()
            stamp = now.to_msg()
            if rgb:
                rgb_msg.header.stamp = stamp
                rgb_pub.publish(rgb_msg)
                published[now.nanoseconds] = time.monotonic()
            if thermal:
                th_msg.header.stamp = stamp
                th_pub.publish(th_msg)
            key = "pairs" if rgb and thermal else "rgb_only" if rgb else "thermal_only" if thermal else None
            if key:
                sent[key] += 1

        s.wait_until_loaded()
        while not arrivals:  # warm-up through the whole graph
            s.check_alive()
            publish(True, True)
            s.spin(1.0 / plan.rate)
        s.spin(2.0)
        arrivals.clear()
        published.clear()
        log_start = log.stat().st_size
        t0 = time.monotonic()
        next_tick, next_rss, next_burst = t0, t0, t0 + plan.burst_period / 2
        last_report = t0
        while (t := time.monotonic() - t0) < plan.seconds:
            s.check_alive()
            rgb_on, thermal_on = plan.cameras_at(t)
            publish(rgb_on, thermal_on)
            if time.monotonic() >= next_burst:
                for _ in range(plan.burst_pairs):
                    publish(True, True)
                for _ in range(plan.burst_oversize):
                    big.header.stamp = node.get_clock().now().to_msg()
                    rgb_pub.publish(big)
                    sent["oversize"] += 1
                rgb_pub.publish(bad)
                sent["bad_encoding"] += 1
                next_burst += plan.burst_period
            if time.monotonic() >= next_rss:
                rss.append((t, rss_mb(s.proc.pid)))
                next_rss += 5.0
            if progress and time.monotonic() - last_report >= 60:
                last_report = time.monotonic()
                progress(f"soak: {t / 60:.0f} of {plan.seconds / 60:.0f} min, node RSS {rss[-1][1]:.0f} MB")
            next_tick += 1.0 / plan.rate
            s.spin(max(0.0, next_tick - time.monotonic()))
        s.spin(3.0)
        rss.append((time.monotonic() - t0, rss_mb(s.proc.pid)))
        pipe = s.status("pipeline") or {}
        rgb_cam, th_cam = s.status("rgb camera") or {}, s.status("thermal camera") or {}
        alive = s.proc.poll() is None
    text = log.read_bytes()[log_start:].decode("utf-8", errors="replace")
    latencies = [(arr - published[st]) * 1e3 for st, arr in arrivals if st in published]
    rss_values = [v for _, v in rss]
    return {
        "plan": {k: v for k, v in plan.__dict__.items() if k != "events"},
        "size": list(size),
        "node_alive": alive,
        "sent": sent,
        "labels": len(arrivals),
        "latency_ms": latency_summary(latencies),
        "rss_mb": {"first": rss_values[0], "last": rss_values[-1], "max": max(rss_values), "samples": rss},
        "rss_drift_mb": rss_values[-1] - rss_values[0],
        "rgb_only_switches": {"expected": plan.expected_switches(), "observed": text.count(SWITCH_LINE)},
        "thermal_back": text.count("thermal is back"),
        "drops": _counts(pipe.get("drops", "")),
        "rgb_rejected": _counts(rgb_cam.get("rejected by reason", "").replace("none", "")),
        "rgb_lost_in_transport": int(rgb_cam.get("lost in transport", 0) or 0),
        "thermal_rejected": _counts(th_cam.get("rejected by reason", "").replace("none", "")),
        "rgb_only_frames": int(pipe.get("rgb-only frames", 0) or 0),
        "processed": int(pipe.get("processed", 0) or 0),
        "errors_in_log": len(re.findall(r"\[ERROR\]", text)),
    }


def _stamp(msg) -> int:
    return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec


def bench_oversize(
    checkpoint: Path,
    frames: int = 100,
    oversize=(4000, 5000),
    rate: float = 5.0,
    reliability: str = "best_effort",
    device: str = "cpu",
) -> dict:
    """``frames`` RGB images above the limit, then normal traffic: refused + lost, and the node's RSS."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from ..pipeline.imaging import fill_image_msg

    work = Path(tempfile.mkdtemp(prefix="rgbt_oversize_"))
    params, rgb_msg, th_msg = synthetic_rig(work, checkpoint, (480, 640), device, **{"qos.reliability": reliability})
    big = fill_image_msg(Image(), np.zeros((*oversize, 3), np.uint8), "rgb8")
    qos = qos_profile_sensor_data
    if reliability == "reliable":
        qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
    labels: list[int] = []
    with NodeSession(params, work / "segment_node.log", client_name="rgbt_oversize_client") as s:
        node = s.node
        node.create_subscription(Image, "/rgbt_seg/labels", lambda m: labels.append(_stamp(m)), 20)
        rgb_pub = node.create_publisher(Image, "/rgb/image", qos)
        th_pub = node.create_publisher(Image, "/thermal/image", qos)

        def pairs(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                s.check_alive()
                rgb_msg.header.stamp = th_msg.header.stamp = node.get_clock().now().to_msg()
                rgb_pub.publish(rgb_msg)
                th_pub.publish(th_msg)
                s.spin(0.1)

        s.wait_until_loaded()
        deadline = time.monotonic() + 120
        while not labels:
            if time.monotonic() > deadline:
                raise NodeSessionError("segment_node published no labels within 120 s")
            pairs(0.5)
        pairs(5.0)
        before = rss_mb(s.proc.pid)
        peak = before
        for _ in range(frames):
            s.check_alive()
            big.header.stamp = node.get_clock().now().to_msg()
            rgb_pub.publish(big)
            s.spin(1.0 / rate)
            peak = max(peak, rss_mb(s.proc.pid))
        labels.clear()
        pairs(8.0)  # normal traffic again; the node must still segment
        after = rss_mb(s.proc.pid)
        s.diagnostics.clear()
        s.spin(1.5)
        cam = s.status("rgb camera") or {}
    refused = _counts(cam.get("rejected by reason", "").replace("none", "")).get("oversize", 0)
    lost = int(cam.get("lost in transport", 0) or 0)
    return {
        "frames": frames,
        "oversize": list(oversize),
        "megapixels": oversize[0] * oversize[1] / 1e6,
        "reliability": reliability,
        "refused_megapixels": refused,
        "lost_in_transport": lost,
        "unaccounted": frames - refused - lost,
        "rss_mb": {"before": before, "peak": peak, "after": after},
        "rss_after_minus_before_mb": after - before,
        "labels_after": len(labels),
    }


def markdown_soak(r: dict) -> str:
    p, sw = r["plan"], r["rgb_only_switches"]
    return "\n".join(
        [
            f"segment_node soak: {p['seconds'] / 60:g} min at {p['rate']:g} Hz, {r['size'][1]}x{r['size'][0]}",
            "",
            "| quantity | value |",
            "|---|---|",
            f"| node alive at the end | {r['node_alive']} |",
            f"| sent | {', '.join(f'{k}={v}' for k, v in r['sent'].items())} |",
            f"| labels received | {r['labels']} |",
            f"| latency p50 / p95 | {_ms(r['latency_ms']['p50'])} / {_ms(r['latency_ms']['p95'])} |",
            f"| node RSS first / last / max | {r['rss_mb']['first']:.0f} / {r['rss_mb']['last']:.0f} / "
            f"{r['rss_mb']['max']:.0f} MB (drift {r['rss_drift_mb']:+.1f} MB) |",
            f"| rgb_only switches expected / observed | {sw['expected']} / {sw['observed']} |",
            f"| drops | {', '.join(f'{k}={v}' for k, v in sorted(r['drops'].items()))} |",
            f"| RGB rejected / lost in transport | {r['rgb_rejected']} / {r['rgb_lost_in_transport']} |",
            f"| rgb-only frames | {r['rgb_only_frames']} |",
        ]
    )


def markdown_oversize(r: dict) -> str:
    m = r["rss_mb"]
    return "\n".join(
        [
            f"{r['frames']} RGB frames of {r['oversize'][1]}x{r['oversize'][0]} ({r['megapixels']:.0f} MP) on "
            f"{r['reliability']} QoS",
            "",
            "| refused (megapixels) | lost in transport | unaccounted | RSS before | peak | after | labels after |",
            "|---|---|---|---|---|---|---|",
            f"| {r['refused_megapixels']} | {r['lost_in_transport']} | {r['unaccounted']} | {m['before']:.0f} MB | "
            f"{m['peak']:.0f} MB | {m['after']:.0f} MB | {r['labels_after']} |",
        ]
    )


def _ms(v) -> str:
    return "n/a" if v is None else f"{v:.0f} ms"

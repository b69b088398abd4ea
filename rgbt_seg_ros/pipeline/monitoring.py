"""What the node counts about its cameras and its frames, for its diagnostics: ``CameraMonitor`` (arrivals,
rate, rejects by reason, transport losses, silence) per camera and ``PipelineStats`` (pairs, frames, drops,
latency, stamp age, model time, overhead). ROS-free; ``ros/diagnostics.py`` turns them into statuses.
"""

from __future__ import annotations

import threading
from collections import deque

from .frame_flow import latency_summary


def _summary(values) -> tuple[float, float]:
    """(p50, p95) of recent timings; NaN when there are none yet."""
    s = latency_summary(values)
    return (float("nan"), float("nan")) if s["n"] == 0 else (s["p50"], s["p95"])


class CameraMonitor:
    """Arrival rate, staleness and rejections of one camera topic (thread-safe)."""

    def __init__(self, window: int = 60) -> None:
        self._arrivals: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()
        self.received = 0
        self.rejected: dict[str, int] = {}
        self.lost = 0  # samples the middleware reports as lost before delivery (message_lost events)
        self.last_lost: float | None = None
        self.last_error = ""
        self.last_arrival: float | None = None

    def arrived(self, now: float) -> None:
        with self._lock:
            self.received += 1
            self._arrivals.append(now)
            self.last_arrival = now

    def reject(self, reason: str, text: str) -> None:
        with self._lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1
            self.last_error = text

    def transport_lost(self, n: int, now: float) -> None:
        with self._lock:
            self.lost += int(n)
            self.last_lost = now

    def rate_hz(self, now: float, stale_after: float) -> float:
        with self._lock:
            if len(self._arrivals) < 2 or now - self._arrivals[-1] > stale_after:
                return 0.0
            span = self._arrivals[-1] - self._arrivals[0]
            return (len(self._arrivals) - 1) / span if span > 0 else 0.0

    def silent_for(self, now: float) -> float | None:
        with self._lock:
            return None if self.last_arrival is None else now - self.last_arrival

    def reset(self) -> None:
        with self._lock:
            self._arrivals.clear()
            self.received = 0
            self.rejected = {}
            self.lost = 0
            self.last_lost = None
            self.last_error = ""


class PipelineStats:
    """What the worker did: counts, drops by reason, latencies (thread-safe, bounded memory)."""

    def __init__(self, window: int = 300) -> None:
        self._lock = threading.Lock()
        self.window = window
        self.reset()

    def reset(self) -> None:
        with getattr(self, "_lock", threading.Lock()):
            self.paired = 0
            self.processed = 0
            self.rgb_only_frames = 0
            self.thermal_only_frames = 0
            self.drops: dict[str, int] = {"superseded": 0, "model_error": 0}
            self.latency_ms: deque[float] = deque(maxlen=self.window)  # pair formed -> published
            self.stamp_age_ms: deque[float] = deque(maxlen=self.window)  # header stamp -> published
            self.model_ms: deque[float] = deque(maxlen=self.window)
            self.overhead_ms: deque[float] = deque(maxlen=self.window)  # everything but the model forward
            self.processed_times: deque[float] = deque(maxlen=self.window)
            self.paired_times: deque[float] = deque(maxlen=self.window)
            self.last_error = ""
            self.consecutive_model_errors = 0

    def count_pair(self, now: float) -> None:
        with self._lock:
            self.paired += 1
            self.paired_times.append(now)

    def drop(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self.drops[reason] = self.drops.get(reason, 0) + n

    def model_failed(self, text: str) -> None:
        with self._lock:
            self.drops["model_error"] += 1
            self.last_error = text
            self.consecutive_model_errors += 1

    def frame_done(
        self,
        now: float,
        latency_ms: float,
        age_ms: float,
        model_ms: float,
        overhead_ms: float,
        rgb_only: bool,
        thermal_only: bool = False,
    ) -> None:
        with self._lock:
            self.processed += 1
            self.rgb_only_frames += int(rgb_only)
            self.thermal_only_frames += int(thermal_only)
            self.processed_times.append(now)
            self.latency_ms.append(latency_ms)
            self.stamp_age_ms.append(age_ms)
            self.model_ms.append(model_ms)
            self.overhead_ms.append(overhead_ms)
            self.consecutive_model_errors = 0

    @staticmethod
    def _rate(times: deque[float], now: float) -> float:
        recent = [t for t in times if now - t <= 5.0]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-9)

    def snapshot(self, now: float) -> dict:
        with self._lock:
            model_p50 = _summary(self.model_ms)[0]
            overhead_p50 = _summary(self.overhead_ms)[0]
            latency, age = _summary(self.latency_ms), _summary(self.stamp_age_ms)
            return {
                "paired": self.paired,
                "processed": self.processed,
                "rgb_only_frames": self.rgb_only_frames,
                "thermal_only_frames": self.thermal_only_frames,
                "drops": dict(self.drops),
                "paired_hz": self._rate(self.paired_times, now),
                "processed_hz": self._rate(self.processed_times, now),
                "latency_p50_ms": latency[0],
                "latency_p95_ms": latency[1],
                "stamp_age_p50_ms": age[0],
                "stamp_age_p95_ms": age[1],
                "model_p50_ms": model_p50,
                "overhead_p50_ms": overhead_p50,
                "overhead_fraction": overhead_p50 / model_p50 if model_p50 and model_p50 == model_p50 else float("nan"),
                "last_error": self.last_error,
                "consecutive_model_errors": self.consecutive_model_errors,
            }

"""Approximate-time pairing of the RGB and thermal streams (no ROS import).

One :class:`ApproximateTimePairer` serves the live node and bag replay, so a pair the robot
forms live is the pair replay forms offline.  The knobs are the ones ROS users know from
message_filters and image_pipeline: ``queue_size``, ``slop`` (seconds) and ``exact``.

The policy, in one paragraph: two messages can pair when their header stamps differ by at most
``slop``.  Each message is used at most once, and among the candidates the pair with the smallest
stamp difference wins (ties: the earlier stamp, then the earlier arrival).  A pair is emitted as
soon as no later message can beat it, that is once the other stream has been seen at or beyond
``stamp + |dt|`` on both sides (in practice: the next message on the other stream), or once the
pair has waited ``max_wait`` seconds on the clock passed in ``now_ns``, or when a full queue forces
the decision.  This is the nearest-first matching one would compute offline on the whole recording,
reached online with at most one inter-frame period of latency.

Other defined behaviour:

* Out of order within a stream: a message whose partner has not arrived yet stays queued (even
  when the other stream has already moved past it) until its queue overflows, ``max_wait`` runs
  out, or :meth:`flush`; so the scrambled orders of message_filters' own tests pair correctly.
* Equal stamps within a stream are kept as separate messages (no dict-key overwrite); equal stamps
  across the streams pair at once (dt = 0).
* Zero (or negative) stamps mean the publisher did not fill the header: the message is rejected,
  counted in ``rejected_*`` and reported once per stream.
* A backwards jump of more than ``reset_jump`` on one stream (a bag loop, a clock reset) resets the
  state with a warning: pending pairs from before the jump are emitted, the other queued messages
  are dropped as unmatched, and pairing starts again from the new message.  A single far-future
  stamp is accepted like any forward jump; it finds no partner and the next normal stamp on its
  stream is a backwards jump, so it costs exactly one reset.
* Thread safety: every public method takes the lock and *returns* the pairs; nothing supplied by
  the user (not even ``on_warning``) runs while the lock is held.

Time is integer nanoseconds everywhere.  ``now_ns`` is optional so that replay stays deterministic:
without it no wall clock is read and ``max_wait`` never fires.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_LOG = logging.getLogger(__name__)

RGB = 0
THERMAL = 1
_STREAM_NAMES = ("rgb", "thermal")


@dataclass(frozen=True)
class Pair:
    """One RGB message and one thermal message that belong together."""

    rgb_stamp_ns: int
    thermal_stamp_ns: int
    rgb: Any
    thermal: Any
    dt_ns: int  # thermal_stamp_ns - rgb_stamp_ns (signed)


@dataclass
class PairingStats:
    """Counters for diagnostics and replay metrics (a snapshot; mutating it changes nothing)."""

    received_rgb: int = 0
    received_thermal: int = 0
    paired: int = 0
    dropped_unmatched_rgb: int = 0
    dropped_unmatched_thermal: int = 0
    dropped_overflow_rgb: int = 0
    dropped_overflow_thermal: int = 0
    rejected_rgb: int = 0  # zero / negative stamps
    rejected_thermal: int = 0
    resets: int = 0
    queued_rgb: int = 0
    queued_thermal: int = 0
    dt_ns: list[int] = field(default_factory=list)  # signed dt of the most recent pairs (bounded ring)
    dt_abs_sum_ns: int = 0  # over every pair since construction, not only the ring
    dt_abs_max_ns: int = 0

    @property
    def dropped(self) -> int:
        return (
            self.dropped_unmatched_rgb
            + self.dropped_unmatched_thermal
            + self.dropped_overflow_rgb
            + self.dropped_overflow_thermal
        )

    @property
    def dt_abs_mean_ms(self) -> float:
        return self.dt_abs_sum_ns / self.paired / 1e6 if self.paired else float("nan")

    def dt_abs_percentile_ms(self, q: float) -> float:
        """Percentile (0..100) of |dt| over the pairs kept in the ring, in milliseconds."""
        if not self.dt_ns:
            return float("nan")
        values = sorted(abs(v) for v in self.dt_ns)
        rank = min(len(values) - 1, max(0, math.ceil(q / 100.0 * len(values)) - 1))
        return values[rank] / 1e6

    def summary(self) -> str:
        return (
            f"received rgb={self.received_rgb} thermal={self.received_thermal}; paired={self.paired}; "
            f"dropped unmatched rgb={self.dropped_unmatched_rgb} thermal={self.dropped_unmatched_thermal}; "
            f"dropped overflow rgb={self.dropped_overflow_rgb} thermal={self.dropped_overflow_thermal}; "
            f"rejected rgb={self.rejected_rgb} thermal={self.rejected_thermal}; resets={self.resets}; "
            f"|dt| mean={self.dt_abs_mean_ms:.3f} ms p50={self.dt_abs_percentile_ms(50):.3f} ms "
            f"p95={self.dt_abs_percentile_ms(95):.3f} ms max={self.dt_abs_max_ns / 1e6:.3f} ms"
        )


class _Entry:
    __slots__ = ("arrival_ns", "payload", "seq", "stamp")

    def __init__(self, stamp: int, seq: int, payload: Any, arrival_ns: int | None):
        self.stamp = stamp
        self.seq = seq
        self.payload = payload
        self.arrival_ns = arrival_ns


class _Queue:
    """Unpaired messages of one stream, sorted by (stamp, arrival sequence)."""

    __slots__ = ("entries", "keys")

    def __init__(self) -> None:
        self.keys: list[tuple[int, int]] = []
        self.entries: list[_Entry] = []

    def insert(self, entry: _Entry) -> None:
        i = bisect.bisect_left(self.keys, (entry.stamp, entry.seq))
        self.keys.insert(i, (entry.stamp, entry.seq))
        self.entries.insert(i, entry)

    def remove(self, entry: _Entry) -> None:
        i = bisect.bisect_left(self.keys, (entry.stamp, entry.seq))
        del self.keys[i]
        del self.entries[i]

    def nearest(self, stamp: int) -> tuple[int, _Entry] | None:
        """The entry nearest to ``stamp``: smallest |dt|, then smaller stamp, then earlier arrival."""
        keys = self.keys
        if not keys:
            return None
        i = bisect.bisect_left(keys, (stamp, -1))
        best: tuple[int, _Entry] | None = None
        if i > 0:  # largest stamp below `stamp`; walk back to the earliest arrival with that stamp
            j = i - 1
            below = keys[j][0]
            while j > 0 and keys[j - 1][0] == below:
                j -= 1
            best = (stamp - below, self.entries[j])
        if i < len(keys):  # smallest stamp >= `stamp` (bisect_left already gives its earliest arrival)
            d = keys[i][0] - stamp
            if best is None or d < best[0]:
                best = (d, self.entries[i])
        return best

    def __len__(self) -> int:
        return len(self.entries)


def _seconds_to_ns(value: float, name: str) -> int:
    if value is None or not math.isfinite(float(value)) or float(value) < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return round(float(value) * 1e9)


class ApproximateTimePairer:
    """Pairs RGB and thermal messages by header stamp; generic over the payloads it carries.

    Parameters
    ----------
    queue_size: unpaired messages kept per stream (>= 1).
    slop: the largest stamp difference of a pair, in seconds (message_filters' ``slop``).
    exact: only identical stamps pair (message_filters' ``TimeSynchronizer``); ``slop`` is ignored.
    max_wait: longest a candidate pair, or a message with no partner, waits on the ``now_ns`` clock
        before it is decided, in seconds; ``None`` disables the clock entirely.
    reset_jump: a backwards stamp jump larger than this (seconds) on one stream resets the state.
    on_warning: called with one sentence per warning, after the lock is released
        (default: this module's logger).
    dt_history: how many recent pair differences ``stats.dt_ns`` keeps.
    """

    def __init__(
        self,
        queue_size: int = 5,
        slop: float = 0.05,
        exact: bool = False,
        max_wait: float | None = 0.1,
        reset_jump: float = 1.0,
        on_warning: Callable[[str], None] | None = None,
        dt_history: int = 100_000,
    ):
        if int(queue_size) != queue_size or queue_size < 1:
            raise ValueError(f"queue_size must be an integer >= 1, got {queue_size!r}")
        self.queue_size = int(queue_size)
        self.exact = bool(exact)
        self.slop_ns = 0 if self.exact else _seconds_to_ns(slop, "slop")
        self.max_wait_ns = None if max_wait is None else _seconds_to_ns(max_wait, "max_wait")
        self.reset_jump_ns = _seconds_to_ns(reset_jump, "reset_jump")
        if self.reset_jump_ns <= self.slop_ns:
            raise ValueError(
                f"reset_jump ({reset_jump} s) must be larger than slop ({slop} s), "
                "otherwise ordinary jitter would reset the pairer"
            )
        self._on_warning = on_warning
        self._lock = threading.Lock()
        self._stats = PairingStats()
        self._dt_ring: deque[int] = deque(maxlen=max(1, int(dt_history)))
        self._seq = 0
        self._warned_zero = [False, False]
        self._clear_state()

    # ------------------------------------------------------------------ public API
    def add_rgb(self, stamp_ns: int, payload: Any = None, now_ns: int | None = None) -> list[Pair]:
        """Add one RGB message; returns the pairs this arrival completes (often none or one)."""
        return self._add(RGB, stamp_ns, payload, now_ns)

    def add_thermal(self, stamp_ns: int, payload: Any = None, now_ns: int | None = None) -> list[Pair]:
        """Add one thermal message; returns the pairs this arrival completes."""
        return self._add(THERMAL, stamp_ns, payload, now_ns)

    def poll(self, now_ns: int) -> list[Pair]:
        """Decide what ``max_wait`` allows at time ``now_ns`` (call it from the node's timer)."""
        with self._lock:
            return self._settle(int(now_ns), force=False)

    def flush(self) -> list[Pair]:
        """Emit every pair still possible and drop the rest as unmatched (end of a replay)."""
        with self._lock:
            return self._settle(None, force=True)

    def reset(self) -> list[Pair]:
        """Forget all queued messages (emitting the pairs still possible first); counters are kept."""
        with self._lock:
            out = self._settle(None, force=True)
            self._clear_state()
            self._stats.resets += 1
        return out

    @property
    def stats(self) -> PairingStats:
        with self._lock:
            s = self._stats
            snap = PairingStats(**{k: getattr(s, k) for k in s.__dataclass_fields__ if k != "dt_ns"})
            snap.dt_ns = list(self._dt_ring)
            snap.queued_rgb = len(self._queues[RGB])
            snap.queued_thermal = len(self._queues[THERMAL])
        return snap

    @property
    def slop(self) -> float:
        return self.slop_ns / 1e9

    # ------------------------------------------------------------------ internals
    def _clear_state(self) -> None:
        self._queues = (_Queue(), _Queue())
        self._max_seen: list[int | None] = [None, None]

    def _warn(self, warnings: list[str]) -> None:
        for text in warnings:
            if self._on_warning is not None:
                self._on_warning(text)
            else:
                _LOG.warning(text)

    def _add(self, stream: int, stamp_ns: int, payload: Any, now_ns: int | None) -> list[Pair]:
        stamp = int(stamp_ns)
        warnings: list[str] = []
        with self._lock:
            out: list[Pair] = []
            s = self._stats
            if stream == RGB:
                s.received_rgb += 1
            else:
                s.received_thermal += 1
            if stamp <= 0:
                if stream == RGB:
                    s.rejected_rgb += 1
                else:
                    s.rejected_thermal += 1
                if not self._warned_zero[stream]:
                    self._warned_zero[stream] = True
                    warnings.append(
                        f"{_STREAM_NAMES[stream]} message with header stamp {stamp} ns rejected: "
                        "expected a filled-in header stamp > 0 (further ones are only counted)"
                    )
            else:
                last = self._max_seen[stream]
                if last is not None and stamp < last - self.reset_jump_ns:
                    out.extend(self._settle(None, force=True))
                    self._clear_state()
                    s.resets += 1
                    warnings.append(
                        f"{_STREAM_NAMES[stream]} stamp jumped back {(last - stamp) / 1e9:.3f} s "
                        f"(more than reset_jump {self.reset_jump_ns / 1e9:g} s; bag loop or clock reset): "
                        "pairer state reset"
                    )
                self._seq += 1
                self._queues[stream].insert(_Entry(stamp, self._seq, payload, now_ns))
                if self._max_seen[stream] is None or stamp > self._max_seen[stream]:
                    self._max_seen[stream] = stamp
                out.extend(self._settle(now_ns, force=False))
        self._warn(warnings)
        return out

    def _best(self, stream: int, entry: _Entry) -> tuple[int, _Entry] | None:
        """The best partner of `entry` within slop on the other stream, or None."""
        found = self._queues[1 - stream].nearest(entry.stamp)
        if found is None or found[0] > self.slop_ns:
            return None
        return found

    def _mutual_pairs(self) -> list[tuple[int, _Entry, _Entry]]:
        """(|dt|, rgb, thermal) for every pair whose members are each other's best candidate."""
        pairs = []
        for r in self._queues[RGB].entries:
            found = self._best(RGB, r)
            if found is None:
                continue
            d, t = found
            back = self._best(THERMAL, t)
            if back is not None and back[1] is r:
                pairs.append((d, r, t))
        return pairs

    def _is_final(self, d: int, r: _Entry, t: _Entry) -> bool:
        """No message later in stamp order can give r or t a better partner than each other."""
        max_t, max_r = self._max_seen[THERMAL], self._max_seen[RGB]
        return max_t is not None and max_r is not None and max_t >= r.stamp + d and max_r >= t.stamp + d

    def _waited(self, entries: tuple[_Entry, ...], now_ns: int | None) -> bool:
        """True when the latest known arrival among `entries` is at least max_wait before now_ns."""
        if now_ns is None or self.max_wait_ns is None:
            return False
        arrivals = [e.arrival_ns for e in entries if e.arrival_ns is not None]
        return bool(arrivals) and now_ns - max(arrivals) >= self.max_wait_ns

    def _emit(self, r: _Entry, t: _Entry, out: list[Pair]) -> None:
        self._queues[RGB].remove(r)
        self._queues[THERMAL].remove(t)
        dt = t.stamp - r.stamp
        s = self._stats
        s.paired += 1
        s.dt_abs_sum_ns += abs(dt)
        s.dt_abs_max_ns = max(s.dt_abs_max_ns, abs(dt))
        self._dt_ring.append(dt)
        out.append(Pair(r.stamp, t.stamp, r.payload, t.payload, dt))

    def _hopeless(self, stream: int, entry: _Entry) -> bool:
        """No queued partner within slop, and the other stream has moved past stamp + slop."""
        other_max = self._max_seen[1 - stream]
        return other_max is not None and other_max > entry.stamp + self.slop_ns and self._best(stream, entry) is None

    def _drop(self, stream: int, entry: _Entry, overflow: bool) -> None:
        """Remove an unpaired message; an overflow eviction of a hopeless message counts as unmatched."""
        self._queues[stream].remove(entry)
        as_overflow = overflow and not self._hopeless(stream, entry)
        s = self._stats
        if stream == RGB:
            if as_overflow:
                s.dropped_overflow_rgb += 1
            else:
                s.dropped_unmatched_rgb += 1
        elif as_overflow:
            s.dropped_overflow_thermal += 1
        else:
            s.dropped_unmatched_thermal += 1

    def _settle(self, now_ns: int | None, force: bool) -> list[Pair]:
        """Emit every decided pair, enforce the queue bound and expire what max_wait allows.

        With ``force`` every pair still possible is emitted (nearest first) and the rest dropped.
        """
        out: list[Pair] = []
        while True:
            progressed = False
            for d, r, t in self._mutual_pairs():
                if force or self._is_final(d, r, t) or self._waited((r, t), now_ns):
                    self._emit(r, t, out)
                    progressed = True
            if progressed:
                continue  # removing members can make new mutual pairs
            # overflow: the oldest message leaves, with its candidate pair if it has one, else dropped
            for stream in (RGB, THERMAL):
                q = self._queues[stream]
                if len(q) > self.queue_size:
                    oldest = q.entries[0]
                    partner = self._partner_in_pair(stream, oldest)
                    if partner is not None:
                        r, t = (oldest, partner) if stream == RGB else (partner, oldest)
                        self._emit(r, t, out)
                    else:
                        self._drop(stream, oldest, overflow=True)
                    progressed = True
                    break
            if progressed:
                continue
            # no mutual pair left means no candidate pair left (the globally nearest pair is mutual)
            for stream in (RGB, THERMAL):
                for entry in list(self._queues[stream].entries):
                    if force or (self._waited((entry,), now_ns) and self._hopeless(stream, entry)):
                        self._drop(stream, entry, overflow=False)
            return out

    def _partner_in_pair(self, stream: int, entry: _Entry) -> _Entry | None:
        found = self._best(stream, entry)
        if found is None:
            return None
        back = self._best(1 - stream, found[1])
        return found[1] if back is not None and back[1] is entry else None

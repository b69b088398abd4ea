"""The node's /diagnostics: one status per camera, one for the pipeline, one for registration health.

``array(node, now)`` reads the node's monitors (``pipeline/monitoring.py``), its frame flow and pipeline
and builds the ``DiagnosticArray`` the node publishes once a second. Names follow diagnostic_updater's
``"<fully qualified node name>: <task>"``, so two instances never collide.
"""

from __future__ import annotations

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue


def array(node, now: float) -> DiagnosticArray:
    """Every status of ``node`` (a running ``SegmentBehaviour``) at monotonic time ``now``."""
    statuses = camera_statuses(node, now) + pipeline_statuses(node, now)
    arr = DiagnosticArray(status=statuses)
    arr.header.stamp = node.get_clock().now().to_msg()
    return arr


def camera_statuses(node, now: float) -> list[DiagnosticStatus]:
    stale_after = float(node.p["stale_timeout"])
    active = node.lifecycle_state == "active"
    statuses = []
    for name, cam in node.cameras.items():
        silent = cam.silent_for(now)
        stale = silent is None or silent > stale_after
        if not active:
            level, message = 0, f"not subscribed (node {node.lifecycle_state})"
        elif cam.last_lost is not None and now - cam.last_lost < stale_after:
            level, message = 1, f"{cam.lost} message(s) lost before delivery (oversize or saturated link)"
        elif stale:
            level = 1
            message = (
                f"no message for {stale_after:g} s" if silent is None else f"stale: last message {silent:.1f} s ago"
            )
        else:
            level, message = 0, "ok"
        values = {
            "topic": node.input_topics[name],
            "frame_id": node.frame_ids[name],
            "rate (Hz)": f"{cam.rate_hz(now, stale_after):.2f}",
            "received": str(cam.received),
            "rejected": str(sum(cam.rejected.values())),
            "rejected by reason": ", ".join(f"{k}={v}" for k, v in sorted(cam.rejected.items())) or "none",
            "lost in transport": str(cam.lost),
            "last error": cam.last_error,
        }
        statuses.append(_status(node, f"{name} camera", level, message, values, node.frame_ids[name]))
    return statuses


def pipeline_statuses(node, now: float) -> list[DiagnosticStatus]:
    """The pipeline's status and, when a registration monitor runs, the registration's."""
    statuses = []
    active = node.lifecycle_state == "active"
    snap = node.stats.snapshot(now)
    pst = node.flow.stats
    drops = dict(snap["drops"])
    drops["unmatched_rgb"] = pst.dropped_unmatched_rgb
    drops["unmatched_thermal"] = pst.dropped_unmatched_thermal
    drops["overflow"] = pst.dropped_overflow_rgb + pst.dropped_overflow_thermal
    drops["rejected_stamp"] = pst.rejected_rgb + pst.rejected_thermal
    mismatch = node.pipeline.size_mismatch if node.pipeline is not None else None
    if node.lifecycle_state == "finalized":
        level, message = 0, "finalized: shut down through the lifecycle, model unloaded (restart the node)"
    elif (
        node.pipeline is None and node.lifecycle_state == "unconfigured" and not node.model_status.startswith("failed")
    ):
        level, message = 0, "unconfigured: model not loaded (configure the managed node)"
    elif node.pipeline is None:
        level, message = 2, f"model not loaded: {node.model_status}"
    elif not active:
        level, message = 0, f"{node.lifecycle_state}: model loaded, not processing"
    elif snap["consecutive_model_errors"] > 0:
        level, message = 2, snap["last_error"]
    elif node.param_errors:
        level, message = 1, node.param_errors[-1]
    elif mismatch:
        level, message = 1, mismatch
    elif node.flow.rgb_only_active:
        level, message = 1, "thermal lost: segmenting RGB only"
    elif node.flow.thermal_only_active:
        level, message = 1, "RGB lost: segmenting thermal only"
    else:
        level, message = 0, "ok"
    values = {
        "state": node.lifecycle_state,
        "model": node.model_status,
        "class set": node.class_set_status,
        "device": node.device,
        "registration": node.registration_mode,
        "inputs": f"{node.input_topics['rgb']}, {node.input_topics['thermal']}",
        "outputs": node.resolve_topic_name("~/labels").rsplit("/", 1)[0] + "/{labels,overlay,...}",
        "mode": node.flow.mode,
        "paired rate (Hz)": f"{snap['paired_hz']:.2f}",
        "processed rate (Hz)": f"{snap['processed_hz']:.2f}",
        "paired": str(snap["paired"]),
        "processed": str(snap["processed"]),
        "rgb-only frames": str(snap["rgb_only_frames"]),
        "thermal-only frames": str(snap["thermal_only_frames"]),
        "drops": ", ".join(f"{k}={v}" for k, v in sorted(drops.items())),
        "latency p50 (ms)": f"{snap['latency_p50_ms']:.1f}",
        "latency p95 (ms)": f"{snap['latency_p95_ms']:.1f}",
        "stamp age p50 (ms)": f"{snap['stamp_age_p50_ms']:.1f}",
        "stamp age p95 (ms)": f"{snap['stamp_age_p95_ms']:.1f}",
        "model time p50 (ms)": f"{snap['model_p50_ms']:.1f}",
        "overhead p50 (ms)": f"{snap['overhead_p50_ms']:.2f}",
        "overhead / model": f"{snap['overhead_fraction']:.4f}",
        "pair |dt| p95 (ms)": f"{pst.dt_abs_percentile_ms(95):.2f}" if pst.paired else "nan",
        "warnings": "; ".join(node.param_errors + ([mismatch] if mismatch else [])) or "none",
        "last error": snap["last_error"],
    }
    pair_hw = "+".join(f for f in (node.frame_ids["rgb"], node.frame_ids["thermal"]) if f)
    statuses.append(_status(node, "pipeline", level, message, values, pair_hw))
    health = node.pipeline.health if node.pipeline is not None else None
    if health is not None:
        level, message, values = health.status(now)
        statuses.append(_status(node, "registration", level, message, values, pair_hw))
    return statuses


def _status(node, what: str, level: int, message: str, values: dict, hardware_id: str) -> DiagnosticStatus:
    return DiagnosticStatus(
        level=bytes([level]),
        name=f"{node.get_fully_qualified_name()}: {what}",
        hardware_id=hardware_id or "unknown (no camera message yet)",
        message=message,
        values=[KeyValue(key=k, value=str(v)) for k, v in values.items()],
    )

"""Registration health (rgbt_seg_ros/pipeline/registration_health.py): the drift estimate on the synthetic rig whose
true warp is known, the bounded correction, the warning, and both through the shared FramePipeline."""

import math
import re
import threading
import time

import numpy as np
import pytest

from rgbt_seg_ros.data.synthetic import SceneGenerator
from rgbt_seg_ros.pipeline.frame_flow import FramePipeline, Job, LatestSlot, StagedWorker
from rgbt_seg_ros.pipeline.params import defaults
from rgbt_seg_ros.pipeline.registration import ThermalRegistrar
from rgbt_seg_ros.pipeline.registration_health import (
    DriftCorrector,
    HealthSettings,
    OffsetEstimate,
    OffsetEstimator,
    RegistrationMonitor,
    estimate_offset,
)
from rgbt_seg_ros.pipeline.sync import Pair

CALIBRATION = SceneGenerator().calibration_dict()  # the default rig: what the user calibrated


def moved_rig(dx: float, dy: float, seed: int = 3) -> SceneGenerator:
    """The rig after its thermal camera moved: its registered thermal sits (dx, dy) px off the calibration."""
    return SceneGenerator(seed=seed).thermal_moved(dx, dy)


@pytest.mark.parametrize("shift", [(0.0, 0.0), (3.0, 0.0), (-5.5, 4.0), (8.0, -8.0), (20.0, 12.0)])
def test_the_estimate_is_within_a_pixel_of_the_true_shift_on_structured_frames(shift):
    rig, calibration = moved_rig(*shift), ThermalRegistrar.from_dict(CALIBRATION)
    est = OffsetEstimator()
    for i, condition in enumerate(("day", "fog", "glare")):
        sample = rig.sample(i, condition)
        e = est.estimate(sample.rgb, sample.thermal, calibration)
        assert math.hypot(e.dx - shift[0], e.dy - shift[1]) < 1.0, (condition, e)
        assert e.confidence > 0.5, (condition, e)


def test_confidence_is_zero_without_structure():
    rng = np.random.default_rng(0)
    calibration = ThermalRegistrar.from_dict(CALIBRATION)
    est = OffsetEstimator()
    for _ in range(5):  # a lens cap, a white wall: flat images with sensor noise only
        rgb = np.clip(120 + rng.normal(0, 3, (480, 640, 3)), 0, 255).astype(np.uint8)
        thermal = (30000 + rng.normal(0, 20, (512, 640))).astype(np.uint16)
        assert est.estimate(rgb, thermal, calibration).confidence == 0.0
    flat = estimate_offset(np.full((60, 80), 9.0), np.full((60, 80), 3.0))  # no gradient at all
    assert flat.confidence == 0.0 and (flat.dx, flat.dy) == (0.0, 0.0)
    sample = moved_rig(8.0, 0.0).sample(0, "day")  # structure, but the thermal camera sees nothing valid
    nothing = estimate_offset(sample.rgb[:, :, 1], sample.labels.astype(np.float32), np.zeros((480, 640), bool))
    assert nothing.confidence == 0.0


def test_the_estimate_ignores_what_thermal_does_not_see_and_refuses_mismatched_grids():
    sample = moved_rig(6.0, -3.0).sample(1, "day")
    warped, valid = ThermalRegistrar.from_dict(CALIBRATION).warp(sample.thermal.astype(np.float32), (480, 640))
    valid = valid.copy()
    valid[:, :200] = False  # a third of the view blocked: the border of what is seen is no edge
    warped[:, :200] = 0.0
    e = estimate_offset(sample.rgb.mean(axis=2), warped, valid)
    assert abs(e.dx - 6.0) < 1.0 and abs(e.dy + 3.0) < 1.0 and e.confidence > 0.5
    with pytest.raises(ValueError, match="must be one"):
        estimate_offset(np.zeros((10, 12)), np.zeros((12, 10)))


def test_a_shifted_registrar_samples_the_calibration_at_the_offset():
    img = np.arange(60 * 80, dtype=np.float32).reshape(60, 80)
    for base in (ThermalRegistrar.identity(), ThermalRegistrar.from_dict(CALIBRATION)):
        rgb_hw = (60, 80) if base.mode == "identity" else (480, 640)
        src = img if base.mode == "identity" else np.tile(img, (9, 8))[:512, :640]
        plain, _ = base.warp(src, rgb_hw)
        moved, valid = base.shifted(2.0, 1.0).warp(src, rgb_hw)
        assert np.allclose(moved[10:40, 10:60], plain[11:41, 12:62], atol=1e-2)
        assert base.offset == (0.0, 0.0)  # the original is untouched
        pts = np.array([[100.0, 120.0]])
        assert np.allclose(
            base.shifted(2.0, 1.0).thermal_to_rgb_points(pts, (640, 512), (640, 480)),
            base.thermal_to_rgb_points(pts, (640, 512), (640, 480)) - [2.0, 1.0],
        )


def test_the_correction_is_rate_limited_bounded_and_robust_to_one_outlier():
    c = DriftCorrector(max_offset=10.0, rate=2.0, window=5)
    for _ in range(4):
        c.observe(OffsetEstimate(6.0, 0.0, 1.0, 20.0))
    c.observe(OffsetEstimate(-40.0, 30.0, 1.0, 20.0))  # one wild estimate does not move the median
    assert c.target == (6.0, 0.0)
    assert c.advance(0.0) == (0.0, 0.0)  # the first call only starts the clock
    steps = [c.advance(0.1 * k)[0] for k in range(1, 40)]
    assert max(np.diff([0.0, *steps])) <= 0.2 + 1e-9  # never more than rate * dt
    assert steps[-1] == pytest.approx(6.0)
    for _ in range(5):
        c.observe(OffsetEstimate(30.0, 40.0, 1.0, 20.0))  # 50 px away: the bound keeps the direction
    assert math.hypot(*c.target) == pytest.approx(10.0) and c.target[0] == pytest.approx(6.0)
    c.reset()
    assert c.applied == (0.0, 0.0) and c.target is None


def _monitor(**overrides) -> RegistrationMonitor:
    settings = HealthSettings(**{"every": 1, "warn_px": 2.0, "warn_after": 3.0, "min_confidence": 0.3, **overrides})
    return RegistrationMonitor(settings, synchronous=True)


def test_drift_warns_only_when_a_confident_offset_persists():
    rig, calibration = moved_rig(5.0, 0.0), ThermalRegistrar.from_dict(CALIBRATION)
    monitor = _monitor()
    frames = [rig.sample(i % 3, "day") for i in range(3)]
    flat_rgb = np.full((480, 640, 3), 100, np.uint8)
    flat_thermal = np.full((512, 640), 29000, np.uint16)
    for k in range(8):  # one frame per second, every other one without structure
        t = float(k)
        if k % 2:
            monitor.offer(flat_rgb, flat_thermal, calibration, t)
        else:
            monitor.offer(frames[k % 3].rgb, frames[k % 3].thermal, calibration, t)
        level, message, values = monitor.status(t)
        assert level == (1 if k >= 3 else 0), (k, message)
    assert "registration drift" in message and "recalibrate" in message
    shown = re.search(r"sits \(([-+.\d]+), ([-+.\d]+)\) px", message)
    assert abs(float(shown[1]) - 5.0) < 1.0 and abs(float(shown[2])) < 1.0
    assert values["estimates"] == "8" and values["confident estimates"] == "4"
    assert monitor.correction(8.0) == (0.0, 0.0)  # auto-correction off: the calibration as it is
    aligned = moved_rig(0.0, 0.0)
    monitor.offer(aligned.sample(0, "day").rgb, aligned.sample(0, "day").thermal, calibration, 9.0)
    assert monitor.status(9.0)[0] == 0  # a confident small offset ends the drift at once
    assert [round(h["dx"]) for h in monitor.history()][:3] == [5, 0, 5]


def test_estimates_run_every_n_frames_and_off_the_frame_path_live():
    rig, calibration = moved_rig(4.0, 2.0), ThermalRegistrar.from_dict(CALIBRATION)
    sample = rig.sample(0, "day")
    live = RegistrationMonitor(HealthSettings(every=3), synchronous=False)
    try:
        for k in range(7):
            live.offer(sample.rgb, sample.thermal, calibration, float(k))
        deadline = 50
        while live.estimates == 0 and deadline:
            time.sleep(0.05)
            deadline -= 1
        assert 1 <= live.estimates <= 3  # frames 1, 4, 7 are due; a newer one may replace a waiting one
        thread = live._thread
        assert thread is not None and thread.is_alive()
    finally:
        live.close()
    assert not thread.is_alive() and live._thread is None
    off = _monitor(every=0)
    off.offer(sample.rgb, sample.thermal, calibration, 0.0)
    assert off.estimates == 0 and "not checked" in off.status(0.0)[1]


def test_auto_correction_through_the_pipeline_aligns_a_moved_rig(micro_checkpoint):
    """The shared FramePipeline with auto_correct: the correction settles on the true shift, the thermal the
    model gets is then the aligned rig's, and turning auto-correction off returns to the calibration."""
    params = {
        **defaults(),
        "model.checkpoint": str(micro_checkpoint),
        "registration.mode": "identity",
        "registration.check_every": 1,
        "registration.auto_correct": True,
        "registration.correction_rate": 4.0,
    }
    pipe = FramePipeline.from_params(params, synchronous_health=True)
    pipe.registrar = ThermalRegistrar.from_dict(CALIBRATION)
    rig, aligned = moved_rig(-6.0, 3.0), moved_rig(0.0, 0.0)
    for k in range(30):  # 10 Hz for 3 s
        sample = rig.sample(k // 10, "day")
        pipe.observe_pair(sample.rgb, sample.thermal, 0.1 * k)  # where a pair is formed
        prepared = pipe.prepare(sample.rgb, sample.thermal, t=0.1 * k)
    applied = pipe.health.correction(None)
    assert math.hypot(applied[0] + 6.0, applied[1] - 3.0) < 1.0
    steps = [h["applied_x"] for h in pipe.health.history()]
    assert max(abs(np.diff(steps))) <= 4.0 * 0.1 + 1e-6  # bounded rate, frame by frame
    want = FramePipeline.from_params({**params, "registration.check_every": 0})
    want.registrar = ThermalRegistrar.from_dict(CALIBRATION)
    sample, truth = rig.sample(2, "day"), aligned.sample(2, "day")
    corrected = pipe.prepare(sample.rgb, sample.thermal, t=3.0).model_input.thermal
    reference = want.prepare(truth.rgb, truth.thermal).model_input.thermal
    before = want.prepare(sample.rgb, sample.thermal).model_input.thermal
    err_after = float((corrected - reference).abs().mean())
    err_before = float((before - reference).abs().mean())
    assert err_after < 0.35 * err_before, (err_after, err_before)
    pipe.health.configure(HealthSettings.from_params({**params, "registration.auto_correct": False}))
    assert pipe.health.correction(3.1) == (0.0, 0.0)
    assert prepared.registrar is not pipe.registrar and prepared.registrar.offset != (0.0, 0.0)


def test_estimates_follow_the_paired_frames_even_those_a_busy_model_drops(micro_checkpoint):
    """Every N-th *paired* frame is estimated, as documented: while the model is busy the live worker drops
    pairs as superseded, and those count too (they were counted only when prepared, so with a model slower than
    the cameras the drift WARN came later than `registration.check_every` says)."""
    params = {**defaults(), "model.checkpoint": str(micro_checkpoint), "registration.check_every": 5}
    pipe = FramePipeline.from_params(params, synchronous_health=True)
    pipe.registrar = ThermalRegistrar.from_dict(CALIBRATION)
    sample = moved_rig(0.0, 0.0).sample(0, "day")
    busy, superseded, delivered = threading.Lock(), 0, []
    worker = StagedWorker(LatestSlot(), lambda: pipe, deliver=lambda job, result: delivered.append(job), lock=busy)
    worker.start()
    try:
        with busy:  # the model is busy: the worker cannot prepare while the pairs come in
            for k in range(20):
                pair = Pair(k, k, (None, sample.rgb), (None, sample.thermal), 0)
                superseded += bool(worker.submit(Job(pair, time.monotonic(), clock_s=0.1 * k)))
        deadline = time.monotonic() + 60
        while not delivered and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.stop()
    assert superseded >= 18 and len(delivered) <= 2  # nearly every pair was dropped
    assert pipe.health.frames == 20 and pipe.health.estimates == 4  # pairs 1, 6, 11, 16


@pytest.mark.parametrize("name", ["homography", "calibrated"])
def test_a_shift_samples_the_calibrations_geometry_exactly_without_recomputing_it(name):
    """Shifted maps come from the calibration's cached coordinates interpolated at the shift: they equal the
    geometry evaluated at the shifted points (lens distortion included) to a thousandth of a pixel."""
    from rgbt_seg_ros.pipeline.registration import _grid_points
    from rgbt_seg_ros.resources import resolve_data_file

    base = ThermalRegistrar.from_yaml(resolve_data_file(f"config/registration/{name}.yaml"))
    thermal_wh, rgb_wh = base.thermal_size, base.rgb_size
    for grid in ((rgb_wh[1], rgb_wh[0]), (rgb_wh[1] // 2 + 3, rgb_wh[0] // 2 - 5)):
        for dx, dy in ((0.25, 0.0), (-3.5, 2.75), (14.2, -9.6)):
            mx, my, front = base.shifted(dx, dy)._coordinates(thermal_wh, rgb_wh, grid)
            xs, ys = _grid_points(rgb_wh, grid)
            ex, ey, efront = base._source_coordinates(thermal_wh, rgb_wh, xs + dx, ys + dy)
            ok = front & efront
            assert ok.mean() > 0.95
            assert np.abs(mx - ex)[ok].max() < 1e-3 and np.abs(my - ey)[ok].max() < 1e-3
    assert set(base._fields)  # the calibration's coordinate fields were made once and kept


def test_turning_auto_correction_on_later_starts_from_the_calibration_at_the_set_rate():
    monitor = _monitor(auto_correct=False, max_correction_px=25.0, correction_rate=2.0)
    for k in range(5):  # estimates while auto-correction is off: remembered, nothing applied or moved
        monitor.corrector.observe(OffsetEstimate(10.0, 0.0, 1.0, 40.0))
        assert monitor.correction(float(k)) == (0.0, 0.0)
    monitor.configure(HealthSettings(every=1, auto_correct=True, correction_rate=2.0))
    steps = [monitor.correction(5.0 + 0.1 * k)[0] for k in range(30)]
    assert steps[0] == 0.0 and max(np.diff(steps)) <= 0.2 + 1e-9 and steps[-1] == pytest.approx(5.8)
    monitor.configure(HealthSettings(every=1, auto_correct=True, max_correction_px=3.0))
    assert math.hypot(*monitor.correction(None)) == pytest.approx(3.0)  # a smaller bound applies at once
    monitor.configure(HealthSettings(every=1, auto_correct=False))
    assert monitor.correction(9.0) == (0.0, 0.0) and monitor.corrector.applied == (0.0, 0.0)


def test_a_reset_drops_an_estimate_begun_before_it_and_failed_estimates_are_counted_not_raised():
    rig, calibration = moved_rig(6.0, 0.0), ThermalRegistrar.from_dict(CALIBRATION)
    sample = rig.sample(0, "day")
    monitor = _monitor()
    begun = monitor._generation
    monitor.reset()  # ~/reset_registration while the estimating thread is inside an estimate
    monitor._estimate(sample.rgb, sample.thermal, calibration, 1.0, begun)
    assert monitor.estimates == 0 and monitor.history() == []
    monitor.offer(sample.rgb, np.zeros((1, 640), np.uint16), calibration, 2.0)  # a thermal image one pixel high
    level, message, values = monitor.status(2.0)
    assert values["failed estimates"] == "1" and "thermal image must be" in values["last error"]
    assert level == 0 and "1 failed" in message


def test_a_closed_monitor_starts_a_new_thread_on_the_next_pair():
    sample, calibration = moved_rig(4.0, 0.0).sample(0, "day"), ThermalRegistrar.from_dict(CALIBRATION)
    live = RegistrationMonitor(HealthSettings(every=1), synchronous=False)
    try:
        live.offer(sample.rgb, sample.thermal, calibration, 0.0)
        first = live._thread
        live.close()
        assert not first.is_alive()
        live.offer(sample.rgb, sample.thermal, calibration, 1.0)
        second = live._thread
        assert second is not first and second.is_alive()
        for _ in range(100):
            if live.estimates >= 1 and live.last_t == 1.0:
                break
            time.sleep(0.05)
        assert live.last_t == 1.0  # the new thread estimated the pair offered after the close
    finally:
        live.close()

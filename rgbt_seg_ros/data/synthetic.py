"""Deterministic procedural RGB-thermal street scenes with per-pixel labels.

The scene is laid out in the RGB camera's frame (labels live there), on a canvas
with a margin so that the thermal camera, which has its own resolution and
viewpoint, also sees beyond the RGB borders. The thermal image is rendered from a
temperature map by warping it with the known thermal->RGB homography
(:attr:`SceneGenerator.homography`), blurred like a microbolometer's optics, with
sensor noise, and stored as 16-bit radiometric counts (``COUNTS_PER_KELVIN`` counts
per Kelvin, like FLIR's TLinear high-resolution mode).

Why it is a useful test set:
  * warm classes (person, car) have RGB colours close to their surroundings at
    night, so RGB alone fails there, but they stand out in thermal;
  * cold classes (traffic cone, traffic sign) are at the temperature of what is
    behind them, so thermal alone cannot find them, but they are vivid in RGB by day;
  * conditions: ``day``, ``night`` (dark, noisy RGB, a few light sources),
    ``fog`` (RGB contrast washed out with distance) and ``glare`` (a saturated
    bloom over part of the RGB image); thermal keeps the warm objects in all of them.

Classes and palette: ``config/datasets/synthetic.yaml``; the ids below must match it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import cv2
import numpy as np

CLASS_NAMES = ("background", "road", "building", "vegetation", "person", "car", "traffic cone", "traffic sign")
BACKGROUND, ROAD, BUILDING, VEGETATION, PERSON, CAR, CONE, SIGN = range(len(CLASS_NAMES))
WARM_CLASSES = (PERSON, CAR)
COLD_CLASSES = (CONE, SIGN)
CONDITIONS = ("day", "night", "fog", "glare")
COUNTS_PER_KELVIN = 100.0  # raw thermal counts = Kelvin * 100
THERMAL_RANGE_K = (250.0, 330.0)  # a sensible fixed normalisation range for these scenes


def default_homography(rgb_size: tuple[int, int], thermal_size: tuple[int, int]) -> np.ndarray:
    """Thermal pixel -> RGB pixel homography of the default rig.

    A thermal camera with a slightly narrower field of view per pixel, rolled by
    1.2 degrees, offset by a few pixels and with a small perspective term (the
    cameras are not perfectly parallel). Sizes are (height, width).
    """
    (h_rgb, w_rgb), (h_t, w_t) = rgb_size, thermal_size
    scale = 0.985 * (w_rgb / 640.0) * (640.0 / w_t)
    theta = np.deg2rad(1.2)
    c, s = np.cos(theta), np.sin(theta)
    to_t_center = np.array([[1, 0, -w_t / 2.0], [0, 1, -h_t / 2.0], [0, 0, 1]])
    rot_scale = np.array([[scale * c, -scale * s, 0], [scale * s, scale * c, 0], [0, 0, 1]])
    to_rgb = np.array([[1, 0, w_rgb / 2.0 + 7.0], [0, 1, h_rgb / 2.0 - 5.0], [0, 0, 1]])
    perspective = np.array([[1, 0, 0], [0, 1, 0], [2.0e-5, -1.5e-5, 1]])
    h = to_rgb @ perspective @ rot_scale @ to_t_center
    return h / h[2, 2]


@dataclass
class SyntheticSample:
    rgb: np.ndarray  # (H, W, 3) uint8, RGB order
    thermal: np.ndarray  # (Ht, Wt) uint16 counts, thermal camera frame
    labels: np.ndarray  # (H, W) uint8 class ids, RGB frame
    condition: str
    index: int
    objects: list[dict] = field(default_factory=list)  # what was drawn (class, bbox in RGB px)


class SceneGenerator:
    """Seeded generator: ``sample(i, condition)`` always returns the same scene for the same arguments.

    Sizes are ``(height, width)``.
    """

    def __init__(
        self,
        seed: int = 0,
        rgb_size: tuple[int, int] = (480, 640),
        thermal_size: tuple[int, int] = (512, 640),
        homography: np.ndarray | None = None,
    ) -> None:
        for name, size in (("rgb_size", rgb_size), ("thermal_size", thermal_size)):
            if len(size) != 2 or min(size) < 16:
                raise ValueError(f"{name} must be (height, width) of at least 16x16, got {size}")
        self.seed = int(seed)
        self.rgb_size = (int(rgb_size[0]), int(rgb_size[1]))
        self.thermal_size = (int(thermal_size[0]), int(thermal_size[1]))
        self.homography = (
            np.asarray(homography, np.float64) if homography is not None else default_homography(rgb_size, thermal_size)
        )
        h, w = self.rgb_size
        self.margin = max(h, w) // 6
        self._canvas_from_rgb = np.array([[1, 0, self.margin], [0, 1, self.margin], [0, 0, 1]], np.float64)

    # ------------------------------------------------------------------ public

    def rng_for(self, index: int, condition: str) -> np.random.Generator:
        digest = hashlib.sha256(f"{self.seed}:{index}:{condition}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    def sample(self, index: int, condition: str | None = None, frame: int = 0) -> SyntheticSample:
        """Scene ``index`` under ``condition`` (default: cycles day, night, fog, glare by index).

        ``frame`` changes only the sensor noise (and light sources), not the layout:
        consecutive frames of one scene in a sample bag.
        """
        if condition is None:
            condition = CONDITIONS[index % len(CONDITIONS)]
        if condition not in CONDITIONS:
            raise ValueError(f"unknown condition '{condition}'; expected one of {CONDITIONS}")
        layout_rng = self.rng_for(index, "layout")  # same layout for every condition of a scene index
        labels_c, albedo_c, temp_c, depth_c, objects = self._layout(layout_rng, condition)
        rng = self.rng_for(index, f"{condition}:{frame}")
        m = self.margin
        h, w = self.rgb_size
        labels = labels_c[m : m + h, m : m + w].copy()
        rgb = self._render_rgb(albedo_c[m : m + h, m : m + w], depth_c[m : m + h, m : m + w], condition, rng)
        thermal = self._render_thermal(temp_c, rng)
        for obj in objects:
            x0, y0, x1, y1 = obj["bbox"]
            obj["bbox"] = (x0 - m, y0 - m, x1 - m, y1 - m)
        return SyntheticSample(
            rgb=rgb, thermal=thermal, labels=labels, condition=condition, index=index, objects=objects
        )

    def thermal_valid_mask(self) -> np.ndarray:
        """(H, W) bool in the RGB frame: pixels the thermal camera sees."""
        h_t, w_t = self.thermal_size
        ones = np.ones((h_t, w_t), np.uint8)
        h, w = self.rgb_size
        return cv2.warpPerspective(ones, self.homography, (w, h), flags=cv2.INTER_NEAREST) > 0

    def thermal_moved(self, dx: float, dy: float) -> SceneGenerator:
        """The same rig after its thermal camera moved: thermal registered with *this* rig's calibration sits
        (dx, dy) RGB pixels off (the convention of :mod:`rgbt_seg_ros.pipeline.registration_health`); same scenes."""
        move = np.array([[1.0, 0.0, -float(dx)], [0.0, 1.0, -float(dy)], [0.0, 0.0, 1.0]])
        return SceneGenerator(self.seed, self.rgb_size, self.thermal_size, homography=move @ self.homography)

    def calibration_dict(self) -> dict:
        """The rig's registration in the project's calibration YAML format (mode: homography)."""
        return {
            "mode": "homography",
            "homography": [[float(v) for v in row] for row in self.homography],
            "thermal_size": [self.thermal_size[1], self.thermal_size[0]],
            "rgb_size": [self.rgb_size[1], self.rgb_size[0]],
        }

    # ------------------------------------------------------------------ scene

    def _layout(self, rng: np.random.Generator, condition: str):
        h, w = self.rgb_size
        m = self.margin
        ch, cw = h + 2 * m, w + 2 * m
        labels = np.full((ch, cw), BACKGROUND, np.uint8)
        albedo = np.zeros((ch, cw, 3), np.float32)
        night = condition == "night"
        ambient = float(rng.uniform(283.0, 293.0)) if not night else float(rng.uniform(275.0, 285.0))
        temp = np.full((ch, cw), ambient - 35.0, np.float32)  # open sky is cold
        horizon = m + int(h * rng.uniform(0.38, 0.5))
        depth = np.zeros((ch, cw), np.float32)  # 0 = near, 1 = far (used by fog)
        rows = np.arange(ch, dtype=np.float32)[:, None]
        depth[:] = np.clip(1.0 - (rows - horizon) / max(ch - horizon, 1), 0.0, 1.0)

        sky_top = np.array([0.35, 0.55, 0.85], np.float32)
        sky_bottom = np.array([0.75, 0.82, 0.9], np.float32)
        t = np.clip(rows / max(horizon, 1), 0, 1)[:, :, None]
        albedo[:] = sky_top * (1 - t) + sky_bottom * t
        ground = np.array([0.33, 0.36, 0.25], np.float32) * rng.uniform(0.8, 1.2)
        albedo[horizon:] = ground
        temp[horizon:] = ambient + 1.0
        objects: list[dict] = []

        # Road: a trapezoid towards a vanishing point on the horizon.
        vx = m + int(w * rng.uniform(0.35, 0.65))
        half_bottom = int(w * rng.uniform(0.35, 0.6))
        road = np.array(
            [[vx - 6, horizon], [vx + 6, horizon], [m + w // 2 + half_bottom, ch], [m + w // 2 - half_bottom, ch]],
            np.int32,
        )
        self._fill(labels, albedo, temp, road, ROAD, (0.28, 0.28, 0.3), ambient + 3.0, rng)
        lane = np.array([[vx - 1, horizon], [vx + 1, horizon], [m + w // 2 + 4, ch], [m + w // 2 - 4, ch]], np.int32)
        cv2.fillPoly(albedo, [lane], (0.85, 0.85, 0.8))  # paint: still road

        # Buildings and vegetation on the horizon.
        for side in (-1, 1):
            x = vx + side * int(w * rng.uniform(0.12, 0.2))
            for _ in range(int(rng.integers(1, 4))):
                bw, bh = int(w * rng.uniform(0.1, 0.22)), int(h * rng.uniform(0.15, 0.35))
                x0 = x if side > 0 else x - bw
                poly = np.array(
                    [[x0, horizon - bh], [x0 + bw, horizon - bh], [x0 + bw, horizon + 4], [x0, horizon + 4]], np.int32
                )
                tone = rng.uniform(0.35, 0.7)
                self._fill(labels, albedo, temp, poly, BUILDING, (tone, tone * 0.92, tone * 0.85), ambient + 4.0, rng)
                x += side * (bw + int(rng.integers(4, 30)))
        for _ in range(int(rng.integers(2, 6))):
            cx = int(rng.integers(0, cw))
            cy = horizon - int(rng.integers(-10, int(h * 0.12)))
            ax, ay = int(rng.integers(20, 70)), int(rng.integers(18, 55))
            mask = np.zeros((ch, cw), np.uint8)
            cv2.ellipse(mask, (cx, cy), (ax, ay), 0, 0, 360, 1, -1)
            self._fill_mask(labels, albedo, temp, mask > 0, VEGETATION, (0.15, 0.38, 0.12), ambient - 1.5, rng)

        # Objects ordered far to near so that near ones occlude.
        kinds = [PERSON] * int(rng.integers(1, 4)) + [CAR] * int(rng.integers(1, 3))
        kinds += [CONE] * int(rng.integers(1, 4)) + [SIGN] * int(rng.integers(1, 3))
        placed = []
        for kind in kinds:
            y_base = horizon + int((ch - horizon) * rng.uniform(0.12, 0.85))
            placed.append((y_base, kind))
        for y_base, kind in sorted(placed):
            s = (y_base - horizon) / max(ch - horizon, 1) * 2.2 + 0.25  # perspective scale
            x_c = int(rng.integers(m // 2, cw - m // 2))
            bbox = self._draw_object(kind, x_c, y_base, s, labels, albedo, temp, ambient, night, rng)
            objects.append({"class": CLASS_NAMES[kind], "bbox": bbox})
        return labels, albedo, temp, depth, objects

    def _draw_object(self, kind, x, y, s, labels, albedo, temp, ambient, night, rng):
        ch, cw = labels.shape
        mask = np.zeros((ch, cw), np.uint8)
        if kind == PERSON:
            hgt, wid = int(55 * s), int(16 * s)
            cv2.ellipse(mask, (x, y - hgt // 2), (max(wid // 2, 2), max(hgt // 2 - hgt // 8, 3)), 0, 0, 360, 1, -1)
            cv2.circle(mask, (x, y - hgt + hgt // 10), max(hgt // 10, 2), 1, -1)
            coat = rng.uniform(0.15, 0.45, 3)  # dull clothes; near ground colour at night
            self._fill_mask(labels, albedo, temp, mask > 0, PERSON, tuple(coat), 306.0 + rng.normal(0, 0.7), rng)
        elif kind == CAR:
            wid, hgt = int(70 * s), int(30 * s)
            cv2.rectangle(mask, (x - wid // 2, y - hgt), (x + wid // 2, y - hgt // 5), 1, -1)
            cv2.rectangle(mask, (x - wid // 3, y - hgt - hgt // 2), (x + wid // 4, y - hgt), 1, -1)
            for wx in (x - wid // 3, x + wid // 3):
                cv2.circle(mask, (wx, y - hgt // 5), max(hgt // 4, 2), 1, -1)
            paint = rng.uniform(0.1, 0.6, 3)
            self._fill_mask(labels, albedo, temp, mask > 0, CAR, tuple(paint), ambient + 9.0 + rng.normal(0, 1.0), rng)
            hood = np.zeros_like(mask)  # warm engine and tyres
            cv2.rectangle(hood, (x - wid // 2, y - hgt), (x - wid // 6, y - hgt // 5), 1, -1)
            temp[(hood > 0) & (labels == CAR)] += 14.0
        elif kind == CONE:
            hgt, wid = int(26 * s), int(14 * s)
            tri = np.array([[x, y - hgt], [x + wid // 2, y], [x - wid // 2, y]], np.int32)
            cv2.fillPoly(mask, [tri], 1)
            behind = float(np.median(temp[max(y - hgt, 0) : y + 1, max(x - wid, 0) : x + wid + 1]))
            self._fill_mask(labels, albedo, temp, mask > 0, CONE, (0.98, 0.45, 0.05), behind, rng, texture=0.02)
            stripe = np.zeros_like(mask)
            cv2.line(stripe, (x - wid // 4, y - hgt // 2), (x + wid // 4, y - hgt // 2), 1, max(int(3 * s), 1))
            albedo[(stripe > 0) & (labels == CONE)] = (0.95, 0.95, 0.95)
        else:  # traffic sign: pole + plate, same temperature as the scene behind it
            hgt = int(70 * s)
            plate = max(int(12 * s), 3)
            cv2.rectangle(mask, (x - max(int(s), 1), y - hgt), (x + max(int(s), 1), y), 1, -1)
            if rng.random() < 0.5:
                cv2.circle(mask, (x, y - hgt), plate, 1, -1)
            else:
                cv2.rectangle(mask, (x - plate, y - hgt - plate), (x + plate, y - hgt + plate), 1, -1)
            region = temp[max(y - hgt - plate, 0) : y + 1, max(x - plate, 0) : x + plate + 1]
            behind = float(np.median(region)) if region.size else ambient
            self._fill_mask(labels, albedo, temp, mask > 0, SIGN, (0.95, 0.85, 0.1), behind, rng, texture=0.02)
        ys, xs = np.nonzero(mask)
        if ys.size == 0:
            return (x, y, x, y)
        return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)

    @staticmethod
    def _fill(labels, albedo, temp, poly, cls, color, kelvin, rng):
        mask = np.zeros(labels.shape, np.uint8)
        cv2.fillPoly(mask, [poly], 1)
        SceneGenerator._fill_mask(labels, albedo, temp, mask > 0, cls, color, kelvin, rng)

    @staticmethod
    def _fill_mask(labels, albedo, temp, mask, cls, color, kelvin, rng, texture: float = 0.06):
        if not mask.any():
            return
        labels[mask] = cls
        n = int(mask.sum())
        albedo[mask] = np.clip(np.asarray(color, np.float32) + rng.normal(0, texture, (n, 1)).astype(np.float32), 0, 1)
        temp[mask] = np.float32(kelvin) + rng.normal(0, 0.15, n).astype(np.float32)

    # ------------------------------------------------------------------ sensors

    def _render_rgb(self, albedo, depth, condition, rng) -> np.ndarray:
        h, w = albedo.shape[:2]
        img = albedo.copy()
        if condition == "day":
            img *= rng.uniform(0.85, 1.1)
            noise = 0.01
        elif condition == "night":
            img *= rng.uniform(0.02, 0.05)  # almost no light: warm objects vanish into the noise
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            for _ in range(int(rng.integers(1, 4))):  # street lights / headlights: bright, local
                cx, cy = rng.uniform(0, w), rng.uniform(0, h * 0.6)
                r = rng.uniform(10, 30)
                glow = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
                img += glow[:, :, None] * np.array([1.0, 0.9, 0.6], np.float32)
            noise = 0.035
        elif condition == "fog":
            fog = np.clip(0.35 + 0.65 * depth, 0, 1)[:, :, None] * rng.uniform(0.75, 0.92)
            img = img * (1 - fog) + 0.78 * fog
            noise = 0.015
        else:  # glare: a saturated bloom (low sun, oncoming headlights)
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.3, 0.7) * h
            r = rng.uniform(0.12, 0.3) * w
            bloom = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[:, :, None]
            img = img * (1 - 0.7 * bloom) + 1.4 * bloom
            noise = 0.01
        img += rng.normal(0, noise, img.shape).astype(np.float32)
        return (np.clip(img, 0, 1) * 255.0 + 0.5).astype(np.uint8)

    def _render_thermal(self, temp_canvas, rng) -> np.ndarray:
        h_t, w_t = self.thermal_size
        # canvas <- rgb <- thermal: the warp maps thermal pixels to canvas pixels.
        t2canvas = self._canvas_from_rgb @ self.homography
        kelvin = cv2.warpPerspective(
            temp_canvas,
            t2canvas,
            (w_t, h_t),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        )
        kelvin = cv2.GaussianBlur(kelvin, (0, 0), 1.2)  # thermal optics + detector footprint
        yy, xx = np.mgrid[0:h_t, 0:w_t].astype(np.float32)
        r2 = ((xx - w_t / 2) / (w_t / 2)) ** 2 + ((yy - h_t / 2) / (h_t / 2)) ** 2
        kelvin = kelvin - 0.6 * r2  # lens vignetting (cooler corners)
        kelvin = kelvin + rng.normal(0, 0.08, kelvin.shape).astype(np.float32)  # NETD ~ 80 mK
        counts = np.clip(np.round(kelvin * COUNTS_PER_KELVIN), 0, 65535)
        return counts.astype(np.uint16)

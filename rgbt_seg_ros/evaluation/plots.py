"""Report figures: confusion matrix, per-class IoU, overlay grids and latency histograms (PNG files).

matplotlib runs on its Agg backend (no display). Palette colouring, overlays and tiling come
from :mod:`rgbt_seg_ros.pipeline.render`, so report pictures look like the node's overlay topic.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..pipeline.render import blend_overlay, colorize, contact_sheet, thermal_to_rgb  # noqa: E402


def _prepare(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _save(fig, path: Path, dpi: int = 110) -> Path:
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_confusion_matrix(cm, class_names, path: str | Path, title: str = "Confusion matrix (row-normalised)") -> Path:
    """Row-normalised confusion matrix (rows: ground truth), each cell annotated in percent.

    ``cm`` is a :class:`~rgbt_seg_ros.evaluation.metrics.ConfusionMatrix` or a (C, C) count array.
    Rows of classes absent from the labels are left blank.
    """
    counts = np.asarray(getattr(cm, "matrix", cm), dtype=np.float64)
    c = counts.shape[0]
    if counts.shape != (c, c) or len(class_names) != c:
        raise ValueError(f"confusion matrix {counts.shape} and {len(class_names)} class names do not match")
    rows = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, rows, out=np.full_like(counts, np.nan), where=rows > 0)
    side = max(4.0, 0.55 * c + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(np.nan_to_num(norm, nan=0.0), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(c), labels=class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(c), labels=class_names, fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    fontsize = 8 if c <= 10 else 6
    for i in range(c):
        for j in range(c):
            v = norm[i, j]
            if math.isnan(v):
                continue
            ax.text(
                j,
                i,
                f"{100 * v:.0f}",
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if v > 0.5 else "black",
            )
    return _save(fig, _prepare(path))


def plot_per_class_iou(iou, class_names, palette, path: str | Path, title: str = "Per-class IoU") -> Path:
    """Bar chart of per-class IoU (fractions) in the classes' palette colours, with the mIoU as a line.

    Undefined classes (NaN: absent from labels and predictions) are marked ``n/a``.
    """
    iou = np.asarray(iou, dtype=np.float64)
    palette = np.asarray(palette, dtype=np.uint8)
    if iou.shape[0] != len(class_names) or palette.shape[0] < len(class_names):
        raise ValueError(
            f"{iou.shape[0]} IoU values, {len(class_names)} names and {palette.shape[0]} colours do not match"
        )
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * n + 2.0), 4.0))
    values = np.nan_to_num(iou, nan=0.0) * 100.0
    colors = palette[:n] / 255.0
    ax.bar(range(n), values, color=colors, edgecolor="black", linewidth=0.6)
    for i, v in enumerate(iou):
        ax.text(
            i,
            (0 if math.isnan(v) else 100 * v) + 1.5,
            "n/a" if math.isnan(v) else f"{100 * v:.1f}",
            ha="center",
            fontsize=8,
        )
    defined = iou[~np.isnan(iou)]
    if defined.size:
        miou = 100.0 * float(defined.mean())
        ax.axhline(miou, color="crimson", linestyle="--", linewidth=1.0, label=f"mIoU {miou:.1f}")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 108)
    ax.set_ylabel("IoU (%)")
    ax.set_title(title)
    return _save(fig, _prepare(path))


def _as_hwc_u8(rgb: np.ndarray) -> np.ndarray:
    """An RGB image as (H, W, 3) uint8, from (H, W, 3) uint8 or a dataset's (3, H, W) float [0, 1]."""
    rgb = np.asarray(rgb)
    if rgb.ndim == 3 and rgb.shape[0] == 3 and rgb.shape[2] != 3:
        rgb = rgb.transpose(1, 2, 0)
    if rgb.dtype != np.uint8:
        rgb = (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(rgb)


def _thermal_tile(thermal: np.ndarray) -> np.ndarray:
    t = np.asarray(thermal)
    if t.ndim == 3:
        t = t[0] if t.shape[0] == 1 else t[:, :, 0]
    if t.dtype == np.uint8:
        t = t.astype(np.float32) / 255.0
    return thermal_to_rgb(t.astype(np.float32))


def overlay_grid(rows, palette, path: str | Path, alpha: float = 0.5, names: list[str] | None = None) -> Path:
    """One row per sample: RGB | thermal (colour-mapped) | prediction overlay | ground-truth overlay.

    ``rows``: iterable of ``(rgb, thermal, pred, gt)``; rgb (H, W, 3) uint8 or (3, H, W) float
    [0, 1], thermal (H, W) or (1, H, W) in [0, 1] (or uint8), pred/gt (H, W) ids (255 = ignore,
    drawn white). ``names`` captions each row.
    """
    tiles, captions = [], []
    for r, (rgb, thermal, pred, gt) in enumerate(rows):
        rgb = _as_hwc_u8(rgb)
        pred, gt = np.asarray(pred), np.asarray(gt)
        h, w = rgb.shape[:2]
        if pred.shape != (h, w) or gt.shape != (h, w):
            pred = cv2.resize(pred.astype(np.int32), (w, h), interpolation=cv2.INTER_NEAREST)
            gt = cv2.resize(gt.astype(np.int32), (w, h), interpolation=cv2.INTER_NEAREST)
        th = _thermal_tile(thermal)
        if th.shape[:2] != (h, w):
            th = cv2.resize(th, (w, h), interpolation=cv2.INTER_LINEAR)
        gt_colors = blend_overlay(rgb, gt, palette, alpha)
        gt_colors[gt == 255] = colorize(gt, palette)[gt == 255]
        tiles += [rgb, th, blend_overlay(rgb, pred, palette, alpha), gt_colors]
        prefix = f"{names[r]}: " if names and r < len(names) else ""
        captions += [f"{prefix}RGB", "thermal", "prediction", "ground truth"]
    if not tiles:
        raise ValueError("overlay grid needs at least one row")
    sheet = contact_sheet(tiles, cols=4, captions=captions)
    path = _prepare(path)
    if not cv2.imwrite(str(path), sheet[:, :, ::-1]):
        raise OSError(f"{path}: could not write the overlay grid")
    return path


def latency_histogram(values_ms, path: str | Path, title: str = "Latency") -> Path:
    """Histogram of latencies in milliseconds with p50 / p95 / p99 marked (an empty list draws a note)."""
    values = np.asarray([v for v in values_ms if v is not None and math.isfinite(v)], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    if values.size == 0:
        ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
    else:
        bins = min(60, max(5, int(np.sqrt(values.size)) * 2))
        ax.hist(values, bins=bins, color="steelblue", edgecolor="white")
        for q, style in ((50, "-"), (95, "--"), (99, ":")):
            v = float(np.percentile(values, q))
            ax.axvline(v, color="crimson", linestyle=style, linewidth=1.0, label=f"p{q} {v:.1f} ms")
        ax.legend(fontsize=8)
    ax.set_xlabel("ms")
    ax.set_ylabel("count")
    ax.set_title(f"{title} (n={values.size})")
    return _save(fig, _prepare(path))

"""Evaluation of a segmenter on a dataset, the way the node segments: ``rgbt-seg evaluate``.

Each item goes through :class:`rgbt_seg_ros.pipeline.segmenter.Segmenter` as a numpy pair (RGB uint8,
thermal float in [0, 1], validity mask), which resizes to the model's input size, normalises,
runs the model and resizes the logits back, so predictions are scored at the label's own
resolution, exactly as the node's output would be. Metrics come from a
:class:`~.metrics.ConfusionMatrix` over the whole set and one per condition (``day``,
``night``, ...) when the items name one.

Two blanked inputs measure what the node does when a camera is lost: ``blank_thermal`` feeds
thermal 0 and valid false (``rgb_only``); ``blank_rgb`` feeds a black RGB image with the thermal
and its validity mask as usual, and sets the labels where valid is false to the ignore index
(``on_rgb_loss: thermal_only``), which the metrics count as misses of the true class.

Outputs of :meth:`SegmentationEvaluator.write` (``OUT/``):

* ``metrics.json``: means (mIoU, mAcc, mean F1, pixel accuracy), per-class IoU / accuracy /
  F1 / precision / support, the confusion matrix, the per-condition breakdown and the timings;
* ``metrics.md``: the same as markdown tables;
* ``confusion_matrix.png``, ``per_class_iou.png`` and ``overlays.png`` (RGB | thermal |
  prediction | ground truth for a few items spread over the set).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from ..data.transforms import rgb_bytes
from ..models.classes import DatasetInfo
from ..pipeline.frame_flow import latency_summary
from .metrics import ConfusionMatrix, json_safe

OVERLAY_MAX_WIDTH = 320


def _check_blanks(blank_thermal: bool, blank_rgb: bool) -> None:
    if blank_thermal and blank_rgb:
        raise ValueError("blank_thermal and blank_rgb exclude each other: with both blanked the model sees nothing")


def item_to_numpy_pair(
    item: dict, blank_thermal: bool = False, blank_rgb: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A dataset item -> (rgb HxWx3 uint8, thermal HxW float32, valid HxW bool), as the node has them.

    ``blank_thermal``: thermal 0 and valid false (the node's ``rgb_only``); ``blank_rgb``: RGB black,
    thermal and valid as usual (the node's ``thermal_only``). Not both."""
    _check_blanks(blank_thermal, blank_rgb)
    rgb = np.ascontiguousarray(rgb_bytes(np.asarray(item["rgb"]).transpose(1, 2, 0)))
    thermal = np.ascontiguousarray(np.asarray(item["thermal"], dtype=np.float32)[0])
    valid = np.asarray(item.get("valid", np.ones_like(item["thermal"])))[0] > 0.5
    if blank_thermal:
        thermal = np.zeros_like(thermal)
        valid = np.zeros_like(valid)
    if blank_rgb:
        rgb = np.zeros_like(rgb)
    return rgb, thermal, np.ascontiguousarray(valid)


def predict_item(
    segmenter, item: dict, blank_thermal: bool = False, timings: list | None = None, blank_rgb: bool = False
) -> np.ndarray:
    """Labels (H, W) at the item's label resolution from a Segmenter.

    With ``blank_rgb`` the labels where the thermal camera sees nothing (valid false) are the
    ignore index, as the node publishes them in ``thermal_only`` mode."""
    rgb, thermal, valid = item_to_numpy_pair(item, blank_thermal, blank_rgb)
    res = segmenter(rgb, thermal, valid)
    if timings is not None:
        timings.append(res.timings)
    labels = res.labels
    h, w = np.asarray(item["labels"]).shape[-2:]
    if labels.shape != (h, w):
        labels = cv2.resize(labels, (w, h), interpolation=cv2.INTER_NEAREST)
    if blank_rgb:
        unseen = ~valid
        if unseen.shape != (h, w):
            unseen = cv2.resize(unseen.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
        mark = segmenter.dataset_info.no_prediction_label(labels.dtype)  # the node's rule (frame_flow)
        if mark is not None:
            labels = labels.copy()
            labels[unseen] = mark
    return labels


class SegmentationEvaluator:
    """Accumulates predictions against labels: overall, per condition, and a few overlay rows."""

    def __init__(self, dataset_info: DatasetInfo, max_overlays: int = 8, overlay_indices=None) -> None:
        self.info = dataset_info
        self.cm = ConfusionMatrix(dataset_info.num_classes, dataset_info.ignore_index)
        self.by_condition: dict[str, ConfusionMatrix] = {}
        self.max_overlays = int(max_overlays)
        self.overlay_indices = set(overlay_indices) if overlay_indices is not None else None
        self.overlays: list[tuple] = []
        self.overlay_names: list[str] = []
        self.items = 0
        self.timings: list[dict] = []

    def update(self, item: dict, pred, index: int | None = None) -> None:
        labels = np.asarray(item["labels"])
        pred = np.asarray(pred)
        self.cm.update(pred.astype(np.int64), labels)
        cond = str(item.get("condition") or "")
        if cond:
            if cond not in self.by_condition:
                self.by_condition[cond] = ConfusionMatrix(self.info.num_classes, self.info.ignore_index)
            self.by_condition[cond].update(pred.astype(np.int64), labels)
        want = (
            index in self.overlay_indices
            if self.overlay_indices is not None and index is not None
            else len(self.overlays) < self.max_overlays
        )
        if want and len(self.overlays) < self.max_overlays:
            rgb, thermal, _ = item_to_numpy_pair(item)
            h, w = labels.shape
            scale = min(1.0, OVERLAY_MAX_WIDTH / w)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            small = (
                cv2.resize(rgb, size, interpolation=cv2.INTER_AREA),
                cv2.resize(thermal, size, interpolation=cv2.INTER_AREA),
                cv2.resize(pred.astype(np.int32), size, interpolation=cv2.INTER_NEAREST),
                cv2.resize(labels.astype(np.int32), size, interpolation=cv2.INTER_NEAREST),
            )
            self.overlays.append(small)
            self.overlay_names.append(str(item.get("name", f"item {self.items}")))
        self.items += 1

    def all_reduce(self) -> None:
        """Sum the confusion matrices over a torch.distributed process group (every rank gets the totals)."""
        import torch
        import torch.distributed as dist

        conds = sorted(self.by_condition)
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, conds)
        all_conds = sorted({c for g in gathered for c in g})
        for c in all_conds:
            self.by_condition.setdefault(c, ConfusionMatrix(self.info.num_classes, self.info.ignore_index))
        mats = [self.cm] + [self.by_condition[c] for c in all_conds]
        # each (C + 1, C): the confusion matrix and, as its last row, the unpredicted pixels per class
        t = torch.from_numpy(np.stack([np.vstack([m.matrix, m.unpredicted]) for m in mats]).astype(np.int64))
        dist.all_reduce(t)
        for m, v in zip(mats, t.numpy()):
            m.matrix[:] = v[:-1]
            m.unpredicted[:] = v[-1]
        n = torch.tensor([self.items], dtype=torch.int64)
        dist.all_reduce(n)
        self.items = int(n.item())

    def results(self) -> dict:
        r = self.cm.compute()
        r["conditions"] = {
            c: {k: m.compute()[k] for k in ("miou", "macc", "mf1", "pixel_acc", "pixels")}
            | {"iou": dict(zip(self.info.class_names, m.compute()["iou"].tolist()))}
            for c, m in sorted(self.by_condition.items())
        }
        r["items"] = self.items
        return r

    def summary(self, meta: dict | None = None) -> dict:
        """The JSON document of ``metrics.json``."""
        doc = {"meta": meta or {}, "items": self.items}
        doc.update(self.cm.as_json(self.info.class_names))
        doc["conditions"] = {
            c: {
                **{
                    k: v
                    for k, v in m.as_json(self.info.class_names).items()
                    if k in ("miou", "macc", "mf1", "pixel_acc", "pixels", "unpredicted_pixels")
                },
                "per_class_iou": dict(zip(self.info.class_names, m.compute()["iou"].tolist())),
            }
            for c, m in sorted(self.by_condition.items())
        }
        if self.timings:
            summaries = {k: latency_summary(t[k] for t in self.timings) for k in self.timings[0]}
            doc["timing_ms"] = {k: {"median": v["p50"], "p95": v["p95"]} for k, v in summaries.items()}
        return json_safe(doc)

    def markdown(self, title: str = "Evaluation", meta: dict | None = None) -> str:
        r = self.cm.compute()

        def pct(v) -> str:
            return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100.0 * v:.2f}"

        lines = [f"# {title}", ""]
        for k, v in (meta or {}).items():
            lines.append(f"- {k}: {v}")
        lines += [
            "",
            f"Items: {self.items}. mIoU **{pct(r['miou'])}**, mAcc {pct(r['macc'])}, mean F1 {pct(r['mf1'])}, "
            f"pixel accuracy {pct(r['pixel_acc'])} (percent).",
            "",
        ]
        lines.append(self.cm.to_markdown(self.info.class_names))
        if self.by_condition:
            lines += ["", "## By condition", "", "| condition | mIoU | mAcc | mean F1 | pixel acc | pixels |"]
            lines.append("|---|---:|---:|---:|---:|---:|")
            for c, m in sorted(self.by_condition.items()):
                cr = m.compute()
                lines.append(
                    f"| {c} | {pct(cr['miou'])} | {pct(cr['macc'])} | {pct(cr['mf1'])} | {pct(cr['pixel_acc'])} | "
                    f"{cr['pixels']} |"
                )
            lines.append("")
            header = "| condition | " + " | ".join(self.info.class_names) + " |"
            lines += ["Per-class IoU by condition:", "", header, "|---|" + "---:|" * self.info.num_classes]
            for c, m in sorted(self.by_condition.items()):
                lines.append(f"| {c} | " + " | ".join(pct(v) for v in m.compute()["iou"]) + " |")
        if self.timings:
            med = {k: float(np.median([t[k] for t in self.timings])) for k in self.timings[0]}
            lines += ["", "Segmenter time per item (median, ms): " + ", ".join(f"{k} {v:.1f}" for k, v in med.items())]
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path, title: str = "Evaluation", meta: dict | None = None) -> dict[str, Path]:
        """Write metrics.json, metrics.md, confusion_matrix.png, per_class_iou.png and overlays.png."""
        from .plots import overlay_grid, plot_confusion_matrix, plot_per_class_iou

        out = Path(out_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "metrics.json", "markdown": out / "metrics.md"}
        paths["json"].write_text(json.dumps(self.summary(meta), indent=2) + "\n")
        paths["markdown"].write_text(self.markdown(title, meta))
        names = list(self.info.class_names)
        paths["confusion"] = plot_confusion_matrix(
            self.cm, names, out / "confusion_matrix.png", title=f"{title}: confusion (row-normalised)"
        )
        paths["iou"] = plot_per_class_iou(
            self.cm.compute()["iou"],
            names,
            self.info.palette,
            out / "per_class_iou.png",
            title=f"{title}: per-class IoU",
        )
        if self.overlays:
            paths["overlays"] = overlay_grid(
                self.overlays, self.info.palette, out / "overlays.png", names=self.overlay_names
            )
        return paths


def evaluate(
    segmenter,
    dataset,
    out_dir: str | Path | None = None,
    blank_thermal: bool = False,
    max_items: int | None = None,
    max_overlays: int = 8,
    progress: bool | None = None,
    title: str = "Evaluation",
    meta: dict | None = None,
    blank_rgb: bool = False,
) -> dict:
    """Run ``segmenter`` over ``dataset`` (items as in :mod:`.datasets`, no transform needed).

    Returns ``metrics.json``'s document; with ``out_dir`` also writes all the files.
    ``blank_thermal`` feeds thermal = 0 and valid = False (what the node does without thermal).
    ``blank_rgb`` feeds a black RGB image with thermal and valid as usual, and labels unseen by the
    thermal camera (valid False) are the ignore index, counted as misses (the node's ``thermal_only``).
    """
    from tqdm import tqdm

    _check_blanks(blank_thermal, blank_rgb)

    n = len(dataset) if max_items is None else min(len(dataset), int(max_items))
    if n == 0:
        raise ValueError("evaluation dataset is empty")
    overlay_idx = np.unique(np.linspace(0, n - 1, num=min(n, max_overlays)).round().astype(int)).tolist()
    ev = SegmentationEvaluator(segmenter.dataset_info, max_overlays=max_overlays, overlay_indices=overlay_idx)
    show = sys.stderr.isatty() if progress is None else progress
    t0 = time.perf_counter()
    for i in tqdm(range(n), desc="evaluate", disable=not show, leave=False):
        item = dataset[i]
        ev.update(item, predict_item(segmenter, item, blank_thermal, ev.timings, blank_rgb), index=i)
    meta = dict(meta or {})
    meta.setdefault("blank_thermal", bool(blank_thermal))
    meta.setdefault("blank_rgb", bool(blank_rgb))
    meta["wall_s"] = round(time.perf_counter() - t0, 2)
    if out_dir is not None:
        ev.write(out_dir, title=title, meta=meta)
    return ev.summary(meta)

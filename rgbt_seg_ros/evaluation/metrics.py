"""Segmentation metrics from a confusion matrix.

Rows are ground truth, columns prediction; pixels whose label is ``ignore_index`` are not counted.

A *prediction* equal to ``ignore_index`` means "no prediction": a pixel the model could not see
(e.g. one outside the thermal camera's view in the node's ``thermal_only`` mode, which publishes
``ignore_index`` there). Such a pixel is a miss of its true class: it counts in that class's
``gt`` (lowering its IoU and accuracy) and in no class's ``pred`` (no false positive), and is kept
per true class in ``unpredicted``. Any other prediction outside 0..C-1 is an error.

Per class k with ``tp`` = M[k, k], ``gt`` = row sum + unpredicted[k], ``pred`` = column sum:

* IoU = tp / (gt + pred - tp); accuracy (recall) = tp / gt; precision = tp / pred;
  F1 = 2 tp / (gt + pred);
* a ratio whose denominator is 0 is **undefined (NaN)** and left out of the means. So a class
  absent from both prediction and label has NaN everywhere and does not pull mIoU down;
  a class predicted but never labelled has IoU 0, precision 0, F1 0 and accuracy NaN; a class
  labelled but never predicted has IoU 0, accuracy 0, F1 0 and precision NaN;
* mIoU, mAcc, mean F1 and mean precision are means over the defined classes; pixel accuracy is
  trace / total, where total includes the unpredicted pixels.

Values are fractions in [0, 1]; :meth:`ConfusionMatrix.as_json` turns NaN into ``null``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.mean(x[~np.isnan(x)])) if np.any(~np.isnan(x)) else math.nan


def json_safe(value):
    """NaN/inf -> None, numpy scalars/arrays -> Python, recursively."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


class ConfusionMatrix:
    """Accumulates a (C, C) int64 confusion matrix over any number of updates, and per true class
    the pixels left without a prediction (``unpredicted``, predictions equal to ``ignore_index``)."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.unpredicted = np.zeros(self.num_classes, dtype=np.int64)

    def reset(self) -> None:
        self.matrix[:] = 0
        self.unpredicted[:] = 0

    def update(self, pred, target) -> None:
        """Add predicted and true class ids of the same shape (numpy or torch, any shape).

        A prediction equal to ``ignore_index`` is "no prediction": a miss of the pixel's true class."""
        pred, target = _to_numpy(pred), _to_numpy(target)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from label shape {target.shape}")
        if pred.dtype.kind not in "iub" or target.dtype.kind not in "iub":
            raise ValueError(
                f"predictions and labels must be integer class ids, got {pred.dtype} and {target.dtype} "
                "(take the argmax of the logits first)"
            )
        target = target.reshape(-1).astype(np.int64)
        pred = pred.reshape(-1).astype(np.int64)
        keep = target != self.ignore_index
        target, pred = target[keep], pred[keep]
        # "no prediction" only where the ignore index is no class id (else it is a prediction of that class)
        missed = pred == self.ignore_index if self.ignore_index >= self.num_classes else np.zeros(pred.shape, bool)
        c = self.num_classes
        for what, ids in (("label", target), ("prediction", pred[~missed])):
            if ids.size and (ids.min() < 0 or ids.max() >= c):
                bad = np.unique(ids[(ids < 0) | (ids >= c)])[:8].tolist()
                raise ValueError(f"{what} ids {bad} are outside 0..{c - 1} (ignore index {self.ignore_index})")
        if missed.any():
            self.unpredicted += np.bincount(target[missed], minlength=c)
            target, pred = target[~missed], pred[~missed]
        self.matrix += np.bincount(target * c + pred, minlength=c * c).reshape(c, c)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts into this one (e.g. from another worker); returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge confusion matrices of {other.num_classes} and {self.num_classes} classes")
        self.matrix += other.matrix
        self.unpredicted += other.unpredicted
        return self

    def compute(self) -> dict:
        """Per-class arrays (``iou``, ``acc``, ``precision``, ``f1``, ``support``, ``unpredicted``), means
        (``miou``, ``macc``, ``mprecision``, ``mf1``, ``pixel_acc``) and counts (``pixels``,
        ``unpredicted_pixels``); NaN where undefined. Support and pixels include the unpredicted pixels."""
        m = self.matrix.astype(np.float64)
        tp = np.diag(m)
        gt = m.sum(axis=1) + self.unpredicted
        pred = m.sum(axis=0)
        iou = _safe_div(tp, gt + pred - tp)
        acc = _safe_div(tp, gt)
        precision = _safe_div(tp, pred)
        f1 = _safe_div(2 * tp, gt + pred)
        total = m.sum() + self.unpredicted.sum()
        return {
            "iou": iou,
            "acc": acc,
            "precision": precision,
            "f1": f1,
            "support": self.matrix.sum(axis=1) + self.unpredicted,
            "unpredicted": self.unpredicted.copy(),
            "miou": _nanmean(iou),
            "macc": _nanmean(acc),
            "mprecision": _nanmean(precision),
            "mf1": _nanmean(f1),
            "pixel_acc": float(tp.sum() / total) if total > 0 else math.nan,
            "pixels": int(total),
            "unpredicted_pixels": int(self.unpredicted.sum()),
        }

    def as_json(self, class_names: list[str] | tuple[str, ...] | None = None) -> dict:
        """A JSON-ready dict: means, per-class entries by name, the raw matrix; NaN -> None."""
        names = self._names(class_names)
        r = self.compute()
        per_class = {
            name: {
                "iou": r["iou"][i],
                "acc": r["acc"][i],
                "precision": r["precision"][i],
                "f1": r["f1"][i],
                "support": int(r["support"][i]),
                "unpredicted": int(r["unpredicted"][i]),
            }
            for i, name in enumerate(names)
        }
        return json_safe(
            {
                "miou": r["miou"],
                "macc": r["macc"],
                "mf1": r["mf1"],
                "mprecision": r["mprecision"],
                "pixel_acc": r["pixel_acc"],
                "pixels": r["pixels"],
                "unpredicted_pixels": r["unpredicted_pixels"],
                "ignore_index": self.ignore_index,
                "per_class": per_class,
                "confusion_matrix": self.matrix,
                "class_names": list(names),
            }
        )

    def save_json(self, path: str | Path, class_names=None) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_json(class_names), indent=2) + "\n")
        return path

    def to_markdown(self, class_names: list[str] | tuple[str, ...] | None = None) -> str:
        """A table (percentages, two decimals; ``n/a`` where undefined) with a mean row and pixel accuracy."""
        names = self._names(class_names)
        r = self.compute()

        def pct(v: float) -> str:
            return "n/a" if math.isnan(v) else f"{100.0 * v:.2f}"

        lines = ["| class | IoU | Acc | F1 | Precision | pixels |", "|---|---:|---:|---:|---:|---:|"]
        for i, name in enumerate(names):
            lines.append(
                f"| {name} | {pct(r['iou'][i])} | {pct(r['acc'][i])} | {pct(r['f1'][i])} | "
                f"{pct(r['precision'][i])} | {int(r['support'][i])} |"
            )
        lines.append(
            f"| **mean** | **{pct(r['miou'])}** | **{pct(r['macc'])}** | **{pct(r['mf1'])}** | "
            f"**{pct(r['mprecision'])}** | {r['pixels']} |"
        )
        lines.append("")
        lines.append(
            f"Pixel accuracy: {pct(r['pixel_acc'])} %. Means leave out classes absent from labels and predictions."
        )
        if r["unpredicted_pixels"]:
            lines.append(
                f"{r['unpredicted_pixels']} labelled pixels had no prediction (ignore index {self.ignore_index}); "
                "they count as misses of their class."
            )
        return "\n".join(lines) + "\n"

    def _names(self, class_names) -> list[str]:
        if class_names is None:
            return [str(i) for i in range(self.num_classes)]
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names given for a {self.num_classes}-class confusion matrix")
        return [str(n) for n in class_names]

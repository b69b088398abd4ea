"""Small synthetic datasets in the exact folder layouts and file formats of the benchmarks.

So that dataset readers can be tested without the real sets:

* ``pst900``: ``{train,test}/{rgb,thermal,labels}/NAME.png``; rgb 3-channel, thermal
  8-bit single-channel registered to RGB, labels uint8 ids; 1280x720.
* ``mfnet``: ``images/NAME.png`` 4-channel R,G,B,T uint8 (the original release), ``labels/NAME.png``,
  ``train.txt``, ``val.txt``, ``test.txt`` (names without extension, D = day, N = night); 640x480.
* ``fmb``: ``{train,test}/{Visible,Infrared,Label}/NAME.png``; Infrared 8-bit single-channel; 800x600.
* ``folder``: the project's generic layout, ``rgb/``, ``thermal/`` (16-bit radiometric counts,
  registered), ``labels/`` and ``train.txt`` / ``test.txt``; 640x480.

Class ids are the synthetic set's (config/datasets/synthetic.yaml), whatever the layout.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .synthetic import CONDITIONS, COUNTS_PER_KELVIN, THERMAL_RANGE_K, SceneGenerator

LAYOUT_SIZES = {"pst900": (720, 1280), "mfnet": (480, 640), "fmb": (600, 800), "folder": (480, 640)}
LAYOUTS = tuple(LAYOUT_SIZES)


def thermal_counts_to_u8(counts: np.ndarray) -> np.ndarray:
    lo, hi = THERMAL_RANGE_K
    kelvin = counts.astype(np.float32) / COUNTS_PER_KELVIN
    return np.clip((kelvin - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _write_png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"could not write {path}")


def write_sample_dataset(
    out_dir: str | Path, layout: str, count: int = 8, seed: int = 0, size: tuple[int, int] | None = None
) -> Path:
    """Write ``count`` samples (split about 3:1 train:test) in ``layout``; return ``out_dir``."""
    if layout not in LAYOUT_SIZES:
        raise ValueError(f"unknown dataset layout '{layout}'; expected one of {', '.join(LAYOUTS)}")
    if count < 2:
        raise ValueError(f"count must be >= 2 (one train and one test sample at least), got {count}")
    out = Path(out_dir)
    h, w = size or LAYOUT_SIZES[layout]
    gen = SceneGenerator(seed=seed, rgb_size=(h, w), thermal_size=(h, w))
    n_test = max(1, count // 4)
    splits = {"train": [], "test": []}
    for i in range(count):
        split = "test" if i >= count - n_test else "train"
        cond = CONDITIONS[i % len(CONDITIONS)]
        s = gen.sample(i, cond)
        # Registered thermal: warp the thermal camera's image into the RGB grid (benchmarks ship aligned pairs).
        counts = cv2.warpPerspective(
            s.thermal, gen.homography, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        bgr = s.rgb[:, :, ::-1]
        name = f"{i:05d}{'N' if cond == 'night' else 'D'}"
        splits[split].append(name)
        if layout == "pst900":
            _write_png(out / split / "rgb" / f"{name}.png", bgr)
            _write_png(out / split / "thermal" / f"{name}.png", thermal_counts_to_u8(counts))
            _write_png(out / split / "labels" / f"{name}.png", s.labels)
        elif layout == "fmb":
            _write_png(out / split / "Visible" / f"{name}.png", bgr)
            _write_png(out / split / "Infrared" / f"{name}.png", thermal_counts_to_u8(counts))
            _write_png(out / split / "Label" / f"{name}.png", s.labels)
        elif layout == "mfnet":
            # cv2 writes a 4-channel array as B,G,R,A; the file must hold R,G,B,T.
            bgrt = np.dstack([bgr, thermal_counts_to_u8(counts)])
            _write_png(out / "images" / f"{name}.png", bgrt)
            _write_png(out / "labels" / f"{name}.png", s.labels)
        else:  # folder
            _write_png(out / "rgb" / f"{name}.png", bgr)
            _write_png(out / "thermal" / f"{name}.png", counts)
            _write_png(out / "labels" / f"{name}.png", s.labels)
    if layout == "mfnet":
        (out / "train.txt").write_text("\n".join(splits["train"]) + "\n")
        (out / "val.txt").write_text("\n".join(splits["test"]) + "\n")
        (out / "test.txt").write_text("\n".join(splits["test"]) + "\n")
    elif layout == "folder":
        (out / "train.txt").write_text("\n".join(splits["train"]) + "\n")
        (out / "test.txt").write_text("\n".join(splits["test"]) + "\n")
    return out


def read_mfnet_png(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """An MFNet original-release 4-channel PNG -> (RGB (H, W, 3) uint8, thermal (H, W) uint8)."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"{path}: not a readable image")
    if img.ndim != 3 or img.shape[2] != 4:
        raise ValueError(f"{path}: expected a 4-channel RGBT PNG (MFNet layout), got shape {img.shape}")
    # OpenCV returns B,G,R,A for RGBA files; MFNet's alpha channel is the thermal image.
    return np.ascontiguousarray(img[:, :, 2::-1]), np.ascontiguousarray(img[:, :, 3])

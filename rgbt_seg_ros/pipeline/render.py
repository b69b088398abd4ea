"""Palettes, overlays, legends and contact sheets (numpy + OpenCV, no ROS).

Used by the node (``~/overlay``, ``~/colored_labels``), replay and the offline
reports, so a frame looks the same wherever it is drawn.
"""

from __future__ import annotations

import cv2
import numpy as np


def parse_palette(values, num_classes: int | None = None) -> np.ndarray:
    """A palette from ``[[r, g, b], ...]`` or ``[0xRRGGBB, ...]`` (the isaac_ros parameter form) -> (N, 3) uint8."""
    arr = np.asarray(values)
    if arr.ndim == 1:
        if arr.size == 0 or arr.dtype.kind not in "iu":
            raise ValueError(f"palette must be a list of 0xRRGGBB integers or of [r, g, b] triples, got {values!r}")
        if (arr < 0).any() or (arr > 0xFFFFFF).any():
            raise ValueError("palette integers must be in 0x000000..0xFFFFFF")
        arr = np.stack([(arr >> 16) & 0xFF, (arr >> 8) & 0xFF, arr & 0xFF], axis=1)
    if arr.ndim != 2 or arr.shape[1] != 3 or (arr < 0).any() or (arr > 255).any():
        raise ValueError(f"palette must be (N, 3) values in 0..255, got shape {arr.shape}")
    if num_classes is not None and arr.shape[0] < num_classes:
        raise ValueError(f"palette has {arr.shape[0]} colours but the model has {num_classes} classes")
    return arr.astype(np.uint8)


def colorize(labels: np.ndarray, palette: np.ndarray, unknown_color=(255, 255, 255)) -> np.ndarray:
    """Class ids (H, W) -> RGB (H, W, 3) uint8. Ids outside the palette (e.g. 255 = ignore) get ``unknown_color``."""
    palette = np.asarray(palette, np.uint8)
    if labels.dtype == np.uint8 and labels.ndim == 2:  # the common case: one OpenCV table lookup (20x faster)
        lut8 = np.empty((256, 1, 3), np.uint8)
        lut8[:] = unknown_color
        n = min(len(palette), 256)
        lut8[:n, 0] = palette[:n]
        return cv2.LUT(cv2.merge([labels, labels, labels]), lut8)
    lut_size = 65536 if labels.dtype == np.uint16 or labels.max(initial=0) > 255 else 256
    lut = np.empty((lut_size, 3), np.uint8)
    lut[:] = unknown_color
    n = min(len(palette), lut_size)
    lut[:n] = palette[:n]
    idx = labels.astype(np.intp, copy=False) if labels.dtype.kind != "u" else labels
    return lut[idx]


def blend_overlay(rgb: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(1 - alpha) * rgb + alpha * colour(labels)`` as uint8 (H, W, 3); ``alpha`` in [0, 1]."""
    if rgb.shape[:2] != labels.shape[:2]:
        raise ValueError(
            f"overlay needs labels of the RGB image's size: rgb {rgb.shape[:2]}, labels {labels.shape[:2]}"
        )
    return blend(rgb, colorize(labels, palette), alpha)


def blend(rgb: np.ndarray, colors: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(1 - alpha) * rgb + alpha * colors`` (both (H, W, 3) uint8) in one OpenCV pass."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay alpha must be in [0, 1], got {alpha}")
    return cv2.addWeighted(np.ascontiguousarray(rgb), 1.0 - alpha, colors, alpha, 0.0)


def upscale_nearest(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize a label or colour image to ``size_hw`` by nearest neighbour, pixel centres aligned.

    Every output pixel takes the grid pixel its centre falls in (OpenCV's INTER_NEAREST_EXACT,
    PyTorch's nearest-exact), so the colours of upscaled labels equal the upscaled colours."""
    h, w = int(size_hw[0]), int(size_hw[1])
    if image.shape[:2] == (h, w):
        return image
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)


def thermal_to_rgb(thermal: np.ndarray, colormap: int = cv2.COLORMAP_INFERNO) -> np.ndarray:
    """A [0, 1] float thermal image -> a colour-mapped RGB uint8 image for display."""
    u8 = (np.clip(np.nan_to_num(thermal), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return cv2.applyColorMap(u8, colormap)[:, :, ::-1].copy()


def legend(class_names, palette: np.ndarray, width: int = 220, row: int = 22) -> np.ndarray:
    """A vertical legend image (RGB): a colour swatch and the name of every class."""
    img = np.full((row * len(class_names) + 8, width, 3), 255, np.uint8)
    for i, name in enumerate(class_names):
        y = 4 + i * row
        cv2.rectangle(img, (6, y + 3), (26, y + row - 3), tuple(int(c) for c in palette[i]), -1)
        cv2.rectangle(img, (6, y + 3), (26, y + row - 3), (0, 0, 0), 1)
        cv2.putText(img, f"{i} {name}", (34, y + row - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return img


def contact_sheet(
    images: list[np.ndarray], cols: int = 4, captions: list[str] | None = None, tile_width: int = 320, pad: int = 4
) -> np.ndarray:
    """Tile RGB images (resized to ``tile_width``, aspect kept) into one sheet with optional captions."""
    if not images:
        raise ValueError("contact sheet needs at least one image")
    tiles = []
    for i, im in enumerate(images):
        if im.ndim == 2:
            im = np.repeat(im[:, :, None], 3, axis=2)
        h, w = im.shape[:2]
        tile = cv2.resize(im, (tile_width, max(1, round(h * tile_width / w))), interpolation=cv2.INTER_AREA)
        if captions is not None and i < len(captions) and captions[i]:
            bar = np.full((20, tile_width, 3), 255, np.uint8)
            cv2.putText(bar, captions[i][:48], (4, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
            tile = np.concatenate([bar, tile], axis=0)
        tiles.append(tile)
    tile_h = max(t.shape[0] for t in tiles)
    cols = max(1, min(cols, len(tiles)))
    rows = (len(tiles) + cols - 1) // cols
    sheet = np.full((rows * (tile_h + pad) + pad, cols * (tile_width + pad) + pad, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = pad + r * (tile_h + pad), pad + c * (tile_width + pad)
        sheet[y : y + tile.shape[0], x : x + tile_width] = tile
    return sheet

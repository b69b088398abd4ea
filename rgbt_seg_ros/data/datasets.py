"""Dataset readers for the RGB-thermal benchmarks' real layouts, and an on-the-fly synthetic set.

Every dataset returns items of one form (numpy; the DataLoader's default collate makes tensors):

* ``rgb`` (3, H, W) float32 in [0, 1], RGB channel order;
* ``thermal`` (1, H, W) float32 in [0, 1], registered to the RGB grid: 8-bit benchmark thermal
  is divided by 255, 16-bit radiometric counts go through a :class:`ThermalNormalizer`;
* ``valid`` (1, H, W) float32 in {0, 1}: where the thermal camera saw the scene;
* ``labels`` (H, W) int64 class ids, ``ignore_index`` (255) where unlabeled;
* ``name`` (the file stem or scene id) and ``condition`` (``day``/``night``/... where the
  dataset says so: MFNet's D/N suffix, the synthetic scene's condition; else ``''``).

Model-side normalisation (mean/std) is not done here; the model config does it.

Layouts (``kind``):

* ``pst900``: ``ROOT/{train,test}/{rgb,thermal,labels}/NAME.png`` (thermal 8-bit AGC,
  projected into the RGB frame; its zero pixels are projection holes and are marked invalid
  unless ``zero_thermal_is_invalid=False``; ``thermal_dir="thermal_raw"`` reads the 16-bit set);
* ``mfnet``: ``ROOT/images/NAME.png`` 4-channel R,G,B,T + ``ROOT/labels/NAME.png`` and
  ``ROOT/{train,val,test}.txt`` (names without extension);
* ``fmb``: ``ROOT/{train,test}/{Visible,Infrared,Label}/NAME.png``;
* ``folder``: ``ROOT/{rgb,thermal,labels}/NAME.*`` and ``ROOT/{train,test}.txt`` (``val.txt``
  optional); thermal may be 8-bit or 16-bit counts;
* ``synthetic``: scenes from :class:`rgbt_seg_ros.data.synthetic.SceneGenerator`, no files.

Split ``val`` on a layout without a validation set (PST900, FMB, a folder without ``val.txt``)
reads the test set, as the benchmarks' published code does.

Errors a user can cause (a missing file, a label outside the class range, modalities of
different sizes) raise with one sentence naming the file and what was expected.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ..models.classes import DatasetInfo
from ..pipeline.imaging import ThermalNormalizer
from .synthetic import CLASS_NAMES as SYNTHETIC_CLASS_NAMES
from .synthetic import CONDITIONS, COUNTS_PER_KELVIN, THERMAL_RANGE_K, SceneGenerator

DATASET_KINDS = ("pst900", "mfnet", "fmb", "folder", "synthetic")
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset file or folder that cannot be used; the text names it and says what was expected."""


def default_counts_normalizer() -> ThermalNormalizer:
    """16-bit radiometric counts (Kelvin * 100) -> [0, 1] over the fixed range 250..330 K."""
    lo, hi = THERMAL_RANGE_K
    return ThermalNormalizer(mode="fixed", min=lo * COUNTS_PER_KELVIN, max=hi * COUNTS_PER_KELVIN)


def _condition_from_name(name: str) -> str:
    """MFNet-style names (digits then D = day or N = night, e.g. ``01234N``) -> condition; else ``''``."""
    match = re.fullmatch(r"\d+([DN])", name)
    if match is None:
        return ""
    return "day" if match.group(1) == "D" else "night"


@dataclass(frozen=True)
class SampleFiles:
    name: str
    rgb: Path
    thermal: Path | None  # None: thermal is the 4th channel of ``rgb`` (MFNet)
    labels: Path
    condition: str = ""


# --------------------------------------------------------------------------- reading


def _imread(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(f"{path}: file does not exist")
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DatasetError(f"{path}: not a readable image")
    return img


def _read_rgb(path: Path) -> np.ndarray:
    img = _imread(path)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    if img.ndim != 3 or img.shape[2] != 3:
        raise DatasetError(f"{path}: expected a 3-channel colour image, got shape {img.shape}")
    if img.dtype != np.uint8:
        raise DatasetError(f"{path}: expected an 8-bit colour image, got {img.dtype}")
    return img[:, :, ::-1]  # OpenCV reads BGR


def _read_thermal(path: Path) -> np.ndarray:
    img = _imread(path)
    if img.ndim == 3:
        if img.shape[2] == 4:
            img = img[:, :, :3]
        # Some releases store grey thermal as 3 equal channels; anything else is converted to grey.
        if (img[:, :, 0] == img[:, :, 1]).all() and (img[:, :, 0] == img[:, :, 2]).all():
            img = img[:, :, 0]
        else:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    return img


def _read_labels(path: Path, info: DatasetInfo) -> np.ndarray:
    img = _imread(path)
    if img.ndim == 3:
        channels = img.shape[2]
        if channels >= 3 and (img[:, :, 0] == img[:, :, 1]).all() and (img[:, :, 0] == img[:, :, 2]).all():
            img = img[:, :, 0]
        else:
            raise DatasetError(
                f"{path}: expected a single-channel image of class ids, got {channels} channels "
                "(a colour visualisation is not a label image)"
            )
    if img.dtype.kind not in "iu":
        raise DatasetError(f"{path}: expected integer class ids, got {img.dtype}")
    labels = img.astype(np.int64)
    bad = ((labels >= info.num_classes) & (labels != info.ignore_index)) | (labels < 0)
    if bad.any():
        values = np.unique(labels[bad])
        shown = ", ".join(str(v) for v in values[:8]) + (" ..." if values.size > 8 else "")
        raise DatasetError(
            f"{path}: label values {shown} are outside the {info.num_classes} classes of '{info.name}' "
            f"(expected 0..{info.num_classes - 1} or {info.ignore_index} = ignore)"
        )
    return labels


def _find_image(folder: Path, stem: str) -> Path:
    for ext in IMAGE_EXTENSIONS:
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    raise DatasetError(f"{folder / stem}.*: file does not exist (looked for {', '.join(IMAGE_EXTENSIONS)})")


def _list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DatasetError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    return files


def _read_split_file(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{path}: split file does not exist")
    names = [line.strip() for line in path.read_text().splitlines()]
    names = [
        Path(n).stem if Path(n).suffix.lower() in IMAGE_EXTENSIONS else n for n in names if n and not n.startswith("#")
    ]
    if not names:
        raise DatasetError(f"{path}: split file lists no samples")
    return names


# --------------------------------------------------------------------------- file-based datasets


class RgbtFileDataset(Dataset):
    """Samples read from image files (any benchmark layout); see the module docstring for the item format."""

    def __init__(
        self,
        samples: list[SampleFiles],
        dataset_info: DatasetInfo,
        transform: Callable[[dict], dict] | None = None,
        thermal_normalizer: ThermalNormalizer | None = None,
        zero_thermal_is_invalid: bool = False,
    ) -> None:
        if not samples:
            raise DatasetError("dataset has no samples")
        self.samples = list(samples)
        self.info = dataset_info
        self.transform = transform
        self.normalizer = thermal_normalizer or default_counts_normalizer()
        self.zero_thermal_is_invalid = bool(zero_thermal_is_invalid)

    def __len__(self) -> int:
        return len(self.samples)

    def _thermal_to_float(self, raw: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
        if raw.ndim != 2:
            raise DatasetError(f"{path}: expected a single-channel thermal image, got shape {raw.shape}")
        if raw.dtype == np.uint8:
            thermal = raw.astype(np.float32) * np.float32(1.0 / 255.0)
            valid = np.ones(raw.shape, np.float32)
        else:
            thermal, finite = self.normalizer.normalize(raw)
            valid = np.ones(raw.shape, np.float32) if finite is None else finite.astype(np.float32)
        if self.zero_thermal_is_invalid or raw.dtype == np.uint16:
            # 0 counts is 0 K: no radiometric camera reports it; it is a registration fill or hole.
            zero = raw == 0
            valid[zero] = 0.0
            thermal[zero] = 0.0
        return thermal, valid

    def load(self, index: int) -> dict:
        """The item without the transform."""
        s = self.samples[index]
        if s.thermal is None:
            img = _imread(s.rgb)
            if img.ndim != 3 or img.shape[2] != 4 or img.dtype != np.uint8:
                raise DatasetError(
                    f"{s.rgb}: expected a 4-channel 8-bit RGBT PNG (MFNet layout: R, G, B, thermal), "
                    f"got shape {img.shape} {img.dtype}"
                )
            rgb = img[:, :, 2::-1]  # OpenCV returns B, G, R, A; MFNet's 4th channel is thermal
            raw_thermal, thermal_path = img[:, :, 3], s.rgb
        else:
            rgb = _read_rgb(s.rgb)
            raw_thermal, thermal_path = _read_thermal(s.thermal), s.thermal
        labels = _read_labels(s.labels, self.info)
        sizes = {s.rgb: rgb.shape[:2], thermal_path: raw_thermal.shape[:2], s.labels: labels.shape}
        if len(set(sizes.values())) > 1:
            described = ", ".join(f"{p} is {w}x{h}" for p, (h, w) in sizes.items())
            raise DatasetError(f"modalities of sample '{s.name}' differ in size ({described}); expected one size")
        thermal, valid = self._thermal_to_float(raw_thermal, thermal_path)
        return {
            "rgb": np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) * np.float32(1.0 / 255.0),
            "thermal": thermal[None],
            "valid": valid[None],
            "labels": labels,
            "name": s.name,
            "condition": s.condition,
        }

    def __getitem__(self, index: int) -> dict:
        item = self.load(index)
        return self.transform(item) if self.transform is not None else item


def _dir_split(split: str) -> str:
    return "test" if split == "val" else split


def pst900_samples(root: Path, split: str, thermal_dir: str = "thermal") -> list[SampleFiles]:
    base = root / _dir_split(split)
    out = []
    for rgb in _list_images(base / "rgb"):
        out.append(
            SampleFiles(
                name=rgb.stem,
                rgb=rgb,
                thermal=_find_image(base / thermal_dir, rgb.stem),
                labels=_find_image(base / "labels", rgb.stem),
            )
        )
    return out


def fmb_samples(root: Path, split: str) -> list[SampleFiles]:
    base = root / _dir_split(split)
    out = []
    for rgb in _list_images(base / "Visible"):
        out.append(
            SampleFiles(
                name=rgb.stem,
                rgb=rgb,
                thermal=_find_image(base / "Infrared", rgb.stem),
                labels=_find_image(base / "Label", rgb.stem),
            )
        )
    return out


def mfnet_samples(root: Path, split: str) -> list[SampleFiles]:
    return [
        SampleFiles(
            name=n,
            rgb=_find_image(root / "images", n),
            thermal=None,
            labels=_find_image(root / "labels", n),
            condition=_condition_from_name(n),
        )
        for n in _read_split_file(root / f"{split}.txt")
    ]


def folder_samples(root: Path, split: str) -> list[SampleFiles]:
    split_file = root / f"{split}.txt"
    if split == "val" and not split_file.exists():
        split_file = root / "test.txt"
    return [
        SampleFiles(
            name=n,
            rgb=_find_image(root / "rgb", n),
            thermal=_find_image(root / "thermal", n),
            labels=_find_image(root / "labels", n),
            condition=_condition_from_name(n),
        )
        for n in _read_split_file(split_file)
    ]


# --------------------------------------------------------------------------- synthetic


#: The synthetic camera's image size (H, W): scenes are rendered at it and fitted to a model's input
#: size by the same resize as a camera frame, in training, validation and evaluation alike.
SYNTHETIC_CAMERA_SIZE = (480, 640)


def split_seed(seed: int, split: str) -> int:
    """A generator seed per (seed, split): train, val and test never draw the same scene."""
    digest = hashlib.sha256(f"rgbt-synthetic:{int(seed)}:{split}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class SyntheticDataset(Dataset):
    """Procedural RGB-thermal scenes generated on the fly (nothing on disk).

    Item ``i`` is scene ``i`` of a :class:`SceneGenerator` seeded by ``split_seed(seed, split)``,
    under condition ``conditions[i % len(conditions)]`` (all four by default; ``("night",)``
    makes a night-only test split). The thermal image (16-bit counts in the thermal camera's
    own frame) is warped into the RGB grid with the generator's homography, normalised by
    ``thermal_normalizer`` (default: fixed 250..330 K) and comes with the rig's validity mask.
    """

    def __init__(
        self,
        dataset_info: DatasetInfo,
        split: str = "train",
        count: int = 64,
        seed: int = 0,
        size: tuple[int, int] = SYNTHETIC_CAMERA_SIZE,
        thermal_size: tuple[int, int] | None = None,
        conditions: tuple[str, ...] | list[str] | None = None,
        transform: Callable[[dict], dict] | None = None,
        thermal_normalizer: ThermalNormalizer | None = None,
        cache: bool = False,
    ) -> None:
        if count < 1:
            raise ValueError(f"synthetic dataset count must be >= 1, got {count}")
        conditions = tuple(conditions) if conditions else CONDITIONS
        unknown = [c for c in conditions if c not in CONDITIONS]
        if unknown:
            raise ValueError(f"unknown synthetic conditions {unknown}; expected some of {CONDITIONS}")
        if tuple(dataset_info.class_names) != SYNTHETIC_CLASS_NAMES:
            raise ValueError(
                f"the synthetic scenes use the classes of config/datasets/synthetic.yaml {SYNTHETIC_CLASS_NAMES}; "
                f"dataset info '{dataset_info.name}' has {tuple(dataset_info.class_names)}"
            )
        self.info = dataset_info
        self.split = split
        self.count = int(count)
        self.conditions = conditions
        self.size = (int(size[0]), int(size[1]))
        self.generator = SceneGenerator(
            seed=split_seed(seed, split), rgb_size=self.size, thermal_size=tuple(thermal_size or self.size)
        )
        self.transform = transform
        self.normalizer = thermal_normalizer or default_counts_normalizer()
        self._valid = self.generator.thermal_valid_mask().astype(np.float32)
        self._cache: dict[int, dict] | None = {} if cache else None  # rendered items (~2.4 MB each at 640x480)
        #: what decides item i: equal keys give equal items (the trainer's cache of fitted items uses it)
        self.cache_key = ("synthetic", self.generator.seed, self.size, self.generator.thermal_size, conditions)
        if thermal_normalizer is not None:
            self.cache_key += (repr(thermal_normalizer),)

    def __len__(self) -> int:
        return self.count

    def load(self, index: int) -> dict:
        if not 0 <= index < self.count:
            raise IndexError(f"synthetic index {index} out of range 0..{self.count - 1}")
        if self._cache is not None:
            if index not in self._cache:
                self._cache[index] = self._render(index)
            return dict(self._cache[index])
        return self._render(index)

    def _render(self, index: int) -> dict:
        condition = self.conditions[index % len(self.conditions)]
        s = self.generator.sample(index, condition)
        h, w = self.size
        counts = cv2.warpPerspective(
            s.thermal, self.generator.homography, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
        )
        thermal, _ = self.normalizer.normalize(counts)
        thermal = thermal * self._valid
        return {
            "rgb": np.ascontiguousarray(s.rgb.transpose(2, 0, 1), dtype=np.float32) * np.float32(1.0 / 255.0),
            "thermal": thermal[None].astype(np.float32),
            "valid": self._valid[None].copy(),
            "labels": s.labels.astype(np.int64),
            "name": f"synthetic_{self.split}_{index:05d}_{condition}",
            "condition": condition,
        }

    def __getitem__(self, index: int) -> dict:
        item = self.load(index)
        return self.transform(item) if self.transform is not None else item


# --------------------------------------------------------------------------- factory


def build_dataset(
    kind: str,
    root: str | Path | None,
    split: str,
    dataset_info: DatasetInfo,
    transform: Callable[[dict], dict] | None = None,
    **kw,
) -> Dataset:
    """Create a dataset by layout name.

    Keyword options: ``thermal_normalizer`` (a :class:`ThermalNormalizer` or its parameter dict,
    used for 16-bit thermal), for ``pst900`` ``thermal_dir`` and ``zero_thermal_is_invalid``
    (default True: PST900's projected thermal has zero-valued holes), for ``synthetic``
    ``count``, ``seed``, ``size``, ``thermal_size``, ``conditions``.
    """
    if kind not in DATASET_KINDS:
        raise ValueError(f"unknown dataset kind '{kind}'; expected one of {', '.join(DATASET_KINDS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; expected one of {', '.join(SPLITS)}")
    normalizer = kw.pop("thermal_normalizer", None)
    if isinstance(normalizer, dict):
        normalizer = ThermalNormalizer.from_params(normalizer)
    if kind == "synthetic":
        allowed = {"count", "seed", "size", "thermal_size", "conditions", "cache"}
        _check_kw(kind, kw, allowed)
        return SyntheticDataset(dataset_info, split=split, transform=transform, thermal_normalizer=normalizer, **kw)
    if root is None:
        raise ValueError(f"dataset kind '{kind}' needs a root folder")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root folder does not exist")
    zero_invalid = False
    if kind == "pst900":
        _check_kw(kind, kw, {"thermal_dir", "zero_thermal_is_invalid"})
        zero_invalid = bool(kw.pop("zero_thermal_is_invalid", True))
        samples = pst900_samples(root, split, **kw)
    else:
        _check_kw(kind, kw, {"zero_thermal_is_invalid"})
        zero_invalid = bool(kw.pop("zero_thermal_is_invalid", False))
        samples = {"mfnet": mfnet_samples, "fmb": fmb_samples, "folder": folder_samples}[kind](root, split)
    return RgbtFileDataset(
        samples, dataset_info, transform=transform, thermal_normalizer=normalizer, zero_thermal_is_invalid=zero_invalid
    )


def _check_kw(kind: str, kw: dict, allowed: set[str]) -> None:
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise ValueError(f"dataset kind '{kind}' does not take options {unknown}; it takes {sorted(allowed)}")


def as_tensors(item: dict) -> dict:
    """Numpy arrays of an item -> torch tensors (for use without a DataLoader)."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v for k, v in item.items()}

"""Class names and palettes per dataset: the one place they are defined.

Each dataset has ``config/datasets/<name>.yaml`` with ``name``, ``ignore_index`` and
``classes: [{name, color: [r, g, b]}, ...]``; label id = position in the list.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ..resources import share_path


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    class_names: tuple[str, ...]
    palette: np.ndarray  # (num_classes, 3) uint8, RGB
    ignore_index: int = 255

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def no_prediction_label(self, dtype) -> int | None:
        """The label that marks "no prediction" in a label image of ``dtype`` (a pixel the model could not see,
        e.g. out of the thermal camera's view in thermal-only mode): ``ignore_index`` when it is no class id and
        fits the dtype, else None (no such label: the prediction is kept)."""
        ignore = int(self.ignore_index)
        return ignore if self.num_classes <= ignore <= np.iinfo(dtype).max else None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "ignore_index": int(self.ignore_index),
            "classes": [
                {"name": n, "color": [int(c) for c in self.palette[i]]} for i, n in enumerate(self.class_names)
            ],
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> DatasetInfo:
        if not isinstance(data, dict) or not isinstance(data.get("classes"), list) or not data["classes"]:
            raise ValueError(f"{source}: expected a mapping with a non-empty 'classes' list")
        names, colors = [], []
        for i, entry in enumerate(data["classes"]):
            if not isinstance(entry, dict) or "name" not in entry or "color" not in entry:
                raise ValueError(f"{source}: class {i} needs 'name' and 'color', got {entry!r}")
            color = entry["color"]
            if len(color) != 3 or not all(0 <= int(c) <= 255 for c in color):
                raise ValueError(
                    f"{source}: class {i} ({entry['name']}) color must be 3 values in 0..255, got {color!r}"
                )
            names.append(str(entry["name"]))
            colors.append([int(c) for c in color])
        if len(set(names)) != len(names):
            raise ValueError(f"{source}: duplicate class names in {names}")
        ignore = int(data.get("ignore_index", 255))
        return cls(
            name=str(data.get("name", Path(source).stem)),
            class_names=tuple(names),
            palette=np.asarray(colors, dtype=np.uint8),
            ignore_index=ignore,
        )


def available_datasets() -> list[str]:
    return sorted(p.stem for p in share_path("config", "datasets").glob("*.yaml"))


def load_dataset_info(name_or_path: str | Path) -> DatasetInfo:
    """Load by dataset name (``mfnet``, ``pst900``, ``fmb``, ``synthetic``) or YAML path."""
    p = Path(name_or_path)
    if p.suffix not in (".yaml", ".yml"):
        p = share_path("config", "datasets", f"{name_or_path}.yaml")
        if not p.exists():
            raise ValueError(
                f"unknown dataset '{name_or_path}'; known: {', '.join(available_datasets())} "
                "(or give a path to a YAML file with a 'classes' list)"
            )
    if not p.exists():
        raise FileNotFoundError(f"dataset class file {p} does not exist")
    with open(p) as f:
        data = yaml.safe_load(f)
    return DatasetInfo.from_dict(data, source=str(p))

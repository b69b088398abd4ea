"""Locate the package's installed data files (config/, launch/, models/).

Lookup order:
1. the ament index (``AMENT_PREFIX_PATH``), as on a robot after ``colcon build``;
2. ``<sys.prefix>/share/rgbt_seg_ros``, where ``pip install .`` puts the data files;
3. the source checkout this module lives in (running from a git clone).
"""

from __future__ import annotations

import os
import shutil
import sys
from functools import lru_cache
from pathlib import Path

PACKAGE_NAME = "rgbt_seg_ros"


def _candidates() -> list[Path]:
    roots: list[Path] = []
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if prefix:
            roots.append(Path(prefix) / "share" / PACKAGE_NAME)
    roots.append(Path(sys.prefix) / "share" / PACKAGE_NAME)
    roots.append(Path(__file__).resolve().parent.parent)
    return roots


@lru_cache(maxsize=1)
def share_dir() -> Path:
    """The directory that holds ``config/``, ``launch/`` and ``models/``."""
    for root in _candidates():
        if (root / "config" / "datasets").is_dir():
            return root
    tried = ", ".join(str(p) for p in _candidates())
    raise FileNotFoundError(
        f"cannot find the {PACKAGE_NAME} data files (config/datasets); looked in: {tried}. "
        "Install the package with 'pip install .' or 'colcon build', or set AMENT_PREFIX_PATH."
    )


def share_path(*parts: str) -> Path:
    """Path of an installed data file, e.g. ``share_path('config', 'segment.yaml')``."""
    return share_dir().joinpath(*parts)


def resolve_data_file(path: str | os.PathLike, subdir: str = "") -> Path:
    """Resolve a user-given path: as given if it exists, else relative to the share dir.

    ``resolve_data_file('models/sartm_tiny.yaml')`` works both from a checkout and
    from an installed package.
    """
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    for candidate in (share_dir() / subdir / p, share_dir() / p):
        if candidate.exists():
            return candidate
    return p


def package_executable(name: str) -> Path:
    """An executable this package installs (``segment_node``), found as ``ros2 run`` would.

    Looks in ``<prefix>/lib/rgbt_seg_ros/`` (colcon) and ``<prefix>/bin/`` (``pip install``) of every
    ``AMENT_PREFIX_PATH`` prefix that registers the package in the ament index, then on ``PATH``.
    """
    tried = []
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if (
            not prefix
            or not (Path(prefix) / "share" / "ament_index" / "resource_index" / "packages" / PACKAGE_NAME).exists()
        ):
            continue
        for candidate in (Path(prefix) / "lib" / PACKAGE_NAME / name, Path(prefix) / "bin" / name):
            tried.append(str(candidate))
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    found = shutil.which(name)
    if found:
        return Path(found)
    where = ", ".join(tried) or f"no AMENT_PREFIX_PATH prefix that has {PACKAGE_NAME}"
    raise FileNotFoundError(
        f"cannot find the executable {name}: looked in {where} and on PATH. Source the workspace "
        "(source install/setup.bash) after colcon build, or install the package with 'pip install .' / 'make install'."
    )

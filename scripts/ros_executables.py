"""Give `ros2 run` and `ros2 launch` the package's executables after a `pip install .` (run by `make`).

colcon installs console scripts into ``<prefix>/lib/rgbt_seg_ros/`` (setup.cfg ``[install]``), where ROS 2
looks for a package's executables; a wheel installed by pip puts them into ``<prefix>/bin/`` only. This
links each console script of the installed distribution from ``<prefix>/lib/rgbt_seg_ros/<name>`` to
``<prefix>/bin/<name>`` (whose interpreter line is the venv's Python) and removes links to scripts the
package no longer has.

    python scripts/ros_executables.py            # the running interpreter's prefix (the venv)
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

PACKAGE = "rgbt_seg_ros"


def console_scripts(package: str = PACKAGE) -> list[str]:
    return sorted(ep.name for ep in distribution(package).entry_points if ep.group == "console_scripts")


def link_executables(prefix: Path, names: list[str], package: str = PACKAGE) -> Path:
    libexec = prefix / "lib" / package
    libexec.mkdir(parents=True, exist_ok=True)
    for old in libexec.iterdir():
        if old.is_symlink() and old.name not in names:
            old.unlink()
    for name in names:
        target = prefix / "bin" / name
        if not target.is_file():
            raise FileNotFoundError(f"{target} is missing: the package's console script {name} was not installed")
        link = libexec / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(target, libexec))
    return libexec


def main() -> int:
    try:
        names = console_scripts()
    except PackageNotFoundError:
        print(f"ros_executables.py: {PACKAGE} is not installed in {sys.prefix}", file=sys.stderr)
        return 1
    try:
        libexec = link_executables(Path(sys.prefix), names)
    except FileNotFoundError as exc:
        print(f"ros_executables.py: {exc}", file=sys.stderr)
        return 1
    print(f"ros2 run / ros2 launch executables: {', '.join(names)} in {libexec}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

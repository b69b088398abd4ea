"""Shared test fixtures: paths of the installed console scripts and a ROS environment for subprocesses."""

import os
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]

# What `make test` exports, so that a plain `.venv/bin/python -m pytest` behaves the same.
os.environ.setdefault("AMENT_PREFIX_PATH", sys.prefix)
os.environ.setdefault("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def script(name: str) -> str:
    """Absolute path of a console script installed next to this interpreter (the project venv)."""
    path = BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: install the package first (make install)")
    return str(path)


@pytest.fixture
def ros_env(tmp_path):
    """Environment for node processes: an isolated ROS domain per test, large-data DDS transport."""
    env = dict(os.environ)
    env["ROS_DOMAIN_ID"] = str(50 + (os.getpid() + hash(tmp_path.name)) % 100)
    env["FASTDDS_BUILTIN_TRANSPORTS"] = "LARGE_DATA"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("AMENT_PREFIX_PATH", sys.prefix)
    env["ROS_LOG_DIR"] = str(tmp_path / "ros_log")
    return env

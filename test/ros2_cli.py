"""The real ROS 2 command line in tests: ``ros2 launch`` as a user runs it, and ``ros2 <verb>`` calls.

Every call has a hard timeout: a launch runs in a process group of its own and is stopped with SIGINT to
the whole group (what Ctrl-C in a terminal does), then SIGTERM, then SIGKILL; a CLI call is killed when
its time is up (``ros2 param get`` has been seen hanging in rclpy's teardown, ignoring SIGTERM).

The tools are the venv's (``make ros2-tools`` builds them from ``../shared/ros2``) or, on a robot, the
sourced ROS 2's. :data:`MISSING` says why they cannot be used here, or is None.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import BIN


def _missing() -> str | None:
    ros2 = BIN / "ros2" if (BIN / "ros2").exists() else shutil.which("ros2")
    try:
        import launch_pytest  # noqa: F401
        import launch_ros  # noqa: F401
    except ImportError as exc:
        missing = f"the launch packages do not import ({exc})"
    else:
        missing = None if ros2 else "there is no `ros2` command"
    if missing is None:
        return None
    return (
        f"the real ROS 2 launch tools are not installed: {missing}. `make test` builds them from ../shared/ros2 "
        "(make ros2-tools); that folder is absent and no ROS 2 is sourced"
    )


MISSING = _missing()
ROS2 = str(BIN / "ros2") if (BIN / "ros2").exists() else (shutil.which("ros2") or "ros2")


def ros2(args: list[str], env: dict, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """``ros2 <args>`` with a hard timeout. A call still running then is killed: returncode -9, ``stdout`` what it
    printed (unbuffered: ``ros_env`` sets PYTHONUNBUFFERED), ``stderr`` says so."""
    env = {**env, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [ROS2, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return subprocess.CompletedProcess(proc.args, -9, out, f"killed after {timeout:g} s")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


def ros2_graph(args: list[str], env: dict, ok=lambda r: r.returncode == 0, timeout: float = 120.0):
    """A ``ros2 node|param|lifecycle ...`` call that looks for a node, repeated until ``ok(result)`` or ``timeout``
    (a call that was killed is repeated too).

    No daemon (none is left behind, and a daemon spawned by a test's first call was seen to stall it): ``param``
    waits up to 15 s for the node, ``node`` and ``lifecycle`` listen 3 s for the graph (1 s missed lifecycle
    services here). A call usually takes 2-5 s; one in a few dozen hangs in rclpy's teardown after it has
    printed its answer: it is killed after 25 s and its answer used when it has one (a transition is not
    requested twice)."""
    extra = ["--no-daemon", *(["--timeout", "15"] if args[0] == "param" else ["--spin-time", "3"])]
    deadline = time.monotonic() + timeout
    while True:
        result = ros2([*args, *extra], env, timeout=25.0)
        answered = result.returncode != -9 or result.stdout.strip()
        if (answered and ok(result)) or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


class Ros2Launch:
    """``ros2 launch ARGS`` in its own process group, its output in ``log`` (read with :meth:`output`); ``env`` is
    the environment it runs in (its ROS domain)."""

    def __init__(self, args: list[str], env: dict, log: Path) -> None:
        self.log = Path(log)
        self.env = env
        self._file = open(self.log, "w")
        self.proc = subprocess.Popen(
            [ROS2, "launch", *args], env=env, stdout=self._file, stderr=subprocess.STDOUT, start_new_session=True
        )

    def output(self) -> str:
        self._file.flush()
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match | None:
        """The first match of ``pattern`` in the output, waiting up to ``timeout`` s (None: not there, or the
        launch ended without it)."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.output())
            if match or time.monotonic() > deadline or self.proc.poll() is not None:
                return match or re.search(pattern, self.output())
            time.sleep(0.2)

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 30.0) -> str:
        """Ctrl-C as a terminal sends it (SIGINT to the group), then SIGTERM, then SIGKILL; the whole output."""
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            self.wait_exit(wait)
        try:  # whatever the group left behind
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._file.close()
        return self.log.read_text(errors="replace")

    def __enter__(self) -> Ros2Launch:
        return self

    def __exit__(self, *exc) -> None:
        if not self._file.closed:
            self.stop()


def launch_env(ros_env: dict, tmp_path: Path, extra_prefixes: tuple[Path, ...] = ()) -> dict:
    """A launch's environment: the test's ROS domain, the venv's tools on PATH, temp files under ``tmp_path``."""
    env = dict(ros_env)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["AMENT_PREFIX_PATH"] = os.pathsep.join(
        [*(str(p) for p in extra_prefixes), env.get("AMENT_PREFIX_PATH", sys.prefix)]
    )
    env["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env["RCUTILS_COLORIZED_OUTPUT"] = "0"
    return env


def fake_rviz2(prefix: Path, record: Path) -> Path:
    """An ament prefix with a package ``rviz2`` whose executable records its command line and config, then waits.

    rviz2 (C++, Qt) cannot be installed here; this stands in for it so that the launch file's rviz2 action runs
    for real and what it hands rviz2 can be checked."""
    (prefix / "share" / "ament_index" / "resource_index" / "packages").mkdir(parents=True, exist_ok=True)
    (prefix / "share" / "ament_index" / "resource_index" / "packages" / "rviz2").write_text("")
    (prefix / "share" / "rviz2").mkdir(parents=True, exist_ok=True)
    exe = prefix / "lib" / "rviz2" / "rviz2"
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text(
        "#!/bin/sh\n"
        f'echo "$@" > "{record}.args"\n'
        f'while [ $# -gt 0 ]; do [ "$1" = "-d" ] && cp "$2" "{record}.rviz"; shift; done\n'
        "trap 'exit 0' INT TERM\n"
        "while :; do sleep 0.2; done\n"
    )
    exe.chmod(0o755)
    return prefix

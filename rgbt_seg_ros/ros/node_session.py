"""A ``segment_node`` process plus an rclpy participant that talks to it (demo and live benchmarks).

DDS tooling for the CLI, not part of the frame pipeline: rclpy is imported when a session
starts. Both participants use the same ROS domain and the Fast DDS large-data transport
(participants with different built-in transports do not discover each other).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from ..resources import package_executable


class NodeSessionError(RuntimeError):
    """The node could not be started or did not load its model; the text says why and where the log is."""


def latest_status(diagnostics: list, suffix: str) -> dict | None:
    """The newest diagnostic status whose name ends with ``suffix`` as a flat dict (level, message, values)."""
    for arr in reversed(diagnostics):
        for st in arr.status:
            if st.name.endswith(suffix):
                return {"level": st.level[0], "message": st.message, **{kv.key: kv.value for kv in st.values}}
    return None


class NodeSession:
    """``with NodeSession(params_file, log_path) as s:`` starts the node and a client node ``s.node``."""

    def __init__(
        self,
        params_file: Path,
        log_path: Path,
        domain_id: int | None = None,
        client_name: str = "rgbt_seg_client",
        remaps: dict[str, str] | None = None,
    ) -> None:
        os.environ.setdefault("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")
        self.params_file = Path(params_file)
        self.log_path = Path(log_path)
        self.domain_id = domain_id if domain_id is not None else 20 + os.getpid() % 180
        self.client_name = client_name
        self.remaps = dict(remaps or {})
        self.diagnostics: list = []
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> NodeSession:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor

        env = dict(
            os.environ,
            ROS_DOMAIN_ID=str(self.domain_id),
            AMENT_PREFIX_PATH=os.environ.get("AMENT_PREFIX_PATH", sys.prefix),
        )
        self._log = open(self.log_path, "w")
        try:
            exe = str(package_executable("segment_node"))
        except FileNotFoundError as exc:
            raise NodeSessionError(str(exc)) from exc
        remap_args = [arg for name, to in self.remaps.items() for arg in ("-r", f"{name}:={to}")]
        self.proc = subprocess.Popen(
            [exe, "--ros-args", "--params-file", str(self.params_file), *remap_args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=self.domain_id)
        self.node = rclpy.create_node(self.client_name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 20)
        return self

    def __exit__(self, *exc) -> None:
        import rclpy

        self.node.destroy_node()
        rclpy.shutdown(context=self.context)
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()

    def spin(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.executor.spin_once(timeout_sec=max(0.0, min(0.005, end - time.monotonic())))

    def status(self, suffix: str) -> dict | None:
        return latest_status(self.diagnostics, suffix)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise NodeSessionError(f"segment_node exited with {self.proc.returncode}; see {self.log_path}")

    def wait_until_loaded(self, timeout: float = 180.0) -> dict:
        """Wait for the node's first pipeline diagnostics (sent once the model is loaded)."""
        deadline = time.monotonic() + timeout
        while self.status("pipeline") is None:
            self.check_alive()
            if time.monotonic() > deadline:
                raise NodeSessionError(f"segment_node sent no diagnostics within {timeout:g} s; see {self.log_path}")
            self.spin(0.1)
        status = self.status("pipeline")
        if status["model"].startswith("failed"):
            raise NodeSessionError(f"segment_node could not load the model: {status['model']}")
        return status

"""The ``rgbt-seg`` command: one subcommand per offline tool.

Each subcommand lives in ``rgbt_seg_ros/tools/<name>.py`` and exposes
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when
their subcommand runs, so ``rgbt-seg --help`` stays fast (no torch import).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module under rgbt_seg_ros.tools, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "make-sample-bag": ("make_sample_bag", "write a synthetic RGB-thermal ROS 2 bag with ground truth"),
    "make-sample-dataset": ("make_sample_dataset", "write a small synthetic dataset in a benchmark's layout"),
    "pairs": ("pairs", "pair a bag's RGB and thermal stamps with the node's synchronizer; counts and CSV"),
    "calibrate": ("calibrate", "fit the thermal->RGB homography from checkerboard images; write calibration YAML"),
    "train": ("train", "train a model config on a dataset (DDP under torchrun)"),
    "experiments": ("experiments", "the training experiments behind the evidence tables; the tables themselves"),
    "evaluate": ("evaluate", "score a checkpoint on a dataset split; JSON, markdown, plots"),
    "replay": ("replay", "run the node's pipeline over a bag: output bag, metrics.json, report.md"),
    "play": ("play", "play a ROS 2 bag over DDS with its timing (--loop, --clock): ros2 bag play's stand-in"),
    "demo": ("demo", "the live demo: segment_node + demo checkpoint over the sample bag; GIF, contact sheet"),
    "export-onnx": ("export_onnx", "export a checkpoint's model forward to ONNX (opset 17); onnxruntime parity check"),
    "reindex": ("reindex", "rebuild a ROS 2 bag's metadata.yaml from its storage files (as ros2 bag reindex)"),
    "recover": ("recover", "copy every complete message of a cut-off MCAP/sqlite3 bag into a new bag"),
    "health": (
        "health",
        "sensor-health studies: registration drift on moved synthetic rigs; its table in docs/sensor_health.md",
    ),
    "docs": ("docs", "generated documentation pages: docs/parameters.md from the parameter schema"),
    "bench": ("bench", "benchmarks that print figures: model (forward time, GFLOP, matmul ratio)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rgbt-seg", description="rgbt_seg_ros offline tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(f"rgbt_seg_ros.tools.{module}").add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    module = importlib.import_module(f"rgbt_seg_ros.tools.{args._module}")
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``rgbt-seg replay BAG``: the node's pipeline over a bag; output bag, metrics.json and report.md."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bag", type=Path, help="ROS 2 bag directory (sqlite3 or mcap) or ROS 1 .bag file")
    p.add_argument(
        "--params",
        type=Path,
        default=None,
        help="the node's parameter file (default: the bag's own rgbt_seg_params.yaml when it has one, "
        "as bags from make-sample-bag do, else the installed config/segment.yaml)",
    )
    p.add_argument(
        "--rgb-topic",
        default=None,
        help="bag topic the node's rgb/image input is remapped to (default /rgb/image; with "
        "input.rgb.transport compressed, /compressed is appended)",
    )
    p.add_argument(
        "--thermal-topic",
        default=None,
        help="bag topic the node's thermal/image input is remapped to (default /thermal/image)",
    )
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint directory (overrides model.checkpoint)")
    p.add_argument("--device", default=None, help="overrides model.device (auto, cpu, cuda)")
    p.add_argument(
        "--class-set",
        default=None,
        help="class set of a checkpoint trained on several datasets (overrides model.class_set; default: its primary)",
    )
    gt = p.add_mutually_exclusive_group()
    gt.add_argument(
        "--gt-topic",
        default="/rgbt_seg/auto",
        help="ground-truth label topic matched by RGB stamp (default: /rgbt/labels_gt when present)",
    )
    gt.add_argument("--gt-dir", type=Path, default=None, help="folder of <rgb_stamp_ns>.png ground-truth label images")
    gt.add_argument("--no-gt", action="store_true", help="do not compute segmentation metrics")
    p.add_argument("--out", type=Path, default=Path("replay_out"), help="output directory (default replay_out)")
    p.add_argument("--max-pairs", type=int, default=None, help="stop after this many processed frames")
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap", help="output bag storage (default mcap)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; on 2 cores 1 leaves a core to reading and writing)",
    )
    p.add_argument(
        "--score-after",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="segment and write the bag's first SECONDS, but score only the frames after them "
        "(lets registration.auto_correct settle; default 0)",
    )
    p.add_argument(
        "--outputs-only",
        action="store_true",
        help="write only labels and overlay to the output bag, not the input topics (smaller, faster)",
    )


def run(args: argparse.Namespace) -> int:
    from ..data.bags import BagError
    from ..evaluation.replay import DEFAULT_RGB_TOPIC, DEFAULT_THERMAL_TOPIC, replay_bag
    from ..pipeline.params import BAG_PARAMS, load_param_file
    from ..resources import share_path

    if args.max_pairs is not None and args.max_pairs < 1:
        print(f"rgbt-seg replay: --max-pairs must be >= 1, got {args.max_pairs}", file=sys.stderr)
        return 2
    params_file = args.params
    if params_file is None:
        own = args.bag / BAG_PARAMS
        params_file = own if own.is_file() else share_path("config", "segment.yaml")
        print(f"parameters: {params_file}" + (" (the bag's own)" if own.is_file() else " (installed defaults)"))
    problems: list[str] = []
    try:  # the node's policy: every refused value is reported and replaced by its default
        params = load_param_file(params_file, problems=problems)
    except (ValueError, FileNotFoundError) as exc:
        print(f"rgbt-seg replay: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    if args.checkpoint is not None:
        params["model.checkpoint"] = str(args.checkpoint)
    if args.device is not None:
        params["model.device"] = args.device
    if args.class_set is not None:  # given on the command line: an unknown set is an error, not a fallback
        from ..pipeline.frame_flow import checked_class_set

        params["model.class_set"] = args.class_set
        try:
            checked_class_set(params)
        except (ValueError, FileNotFoundError) as exc:
            print(f"rgbt-seg replay: {exc}", file=sys.stderr)
            return 2
    gt_topic = None if args.no_gt or args.gt_dir else args.gt_topic
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        result = replay_bag(
            args.bag,
            params,
            args.out,
            gt_topic=gt_topic,
            gt_dir=args.gt_dir,
            max_pairs=args.max_pairs,
            storage=args.storage,
            progress=not args.no_progress,
            rgb_topic=args.rgb_topic or DEFAULT_RGB_TOPIC,
            thermal_topic=args.thermal_topic or DEFAULT_THERMAL_TOPIC,
            warnings=problems,
            pass_through=not args.outputs_only,
            score_after_s=args.score_after,
        )
    except BagError as exc:
        print(f"rgbt-seg replay: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"rgbt-seg replay: {exc}", file=sys.stderr)
        return 2
    m = result.metrics
    print(
        f"{m['frames_processed']} frames ({m['pairs']} pairs, {m['rgb_only_frames']} RGB-only, "
        f"{m['thermal_only_frames']} thermal-only) from {args.bag}"
    )
    lat = m["latency_ms"]
    print(
        f"model p50 {lat['model']['p50']:.1f} ms, pipeline p50 {lat['total']['p50']:.1f} ms; throughput "
        f"{m['throughput_pairs_per_s']:.2f} pairs/s vs model-bound {m['model_bound_pairs_per_s']:.2f} pairs/s"
        if m["frames_processed"]
        else "no frame processed"
    )
    for warning in m.get("warnings") or []:
        print(f"warning: {warning}", file=sys.stderr)
    health = m.get("registration_health")
    if health and health["values"].get("estimates", "0") != "0":
        print(f"registration: {health['message']}")
    if m.get("segmentation"):
        print(f"mIoU {100 * m['segmentation']['miou']:.1f} over {m['ground_truth_frames']} frames with ground truth")
    print(f"wrote {args.out}/segmented (bag), metrics.json, report.md")
    if result.error:
        print(f"rgbt-seg replay: stopped early: {result.error} (everything before it was written)", file=sys.stderr)
        return 3
    return 0

"""``rgbt-seg evaluate``: score a checkpoint on a dataset split through the node's Segmenter.

    rgbt-seg evaluate --checkpoint runs/mfnet/best --dataset mfnet --data ~/data/MFNet --split test --out eval/

Writes ``OUT/metrics.json``, ``OUT/metrics.md``, ``OUT/confusion_matrix.png``,
``OUT/per_class_iou.png`` and ``OUT/overlays.png`` (see ``evaluation/evaluator.py``) and prints the
markdown summary. Labels are read with the checkpoint's classes; a dataset whose class file
differs from them is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint directory (with config.yaml)")
    p.add_argument("--dataset", required=True, help="dataset kind: pst900 | mfnet | fmb | folder | synthetic")
    p.add_argument("--data", help="dataset root folder (not needed for synthetic)")
    p.add_argument("--split", default="test", help="train | val | test (default test)")
    p.add_argument("--out", type=Path, help="output folder for the report (default: print only)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--sam2-checkpoint", help="the SAM2 weights the checkpoint was trained on, if not where recorded")
    p.add_argument(
        "--class-set",
        help="class set to segment with, for a checkpoint trained on several datasets (default: its primary); "
        "the dataset's classes must be that set's",
    )
    p.add_argument("--max-items", type=int, help="evaluate only the first N items")
    p.add_argument("--overlays", type=int, default=8, help="rows in overlays.png (default 8)")
    p.add_argument("--blank-thermal", action="store_true", help="feed no thermal (thermal 0, valid false): RGB-only")
    p.add_argument(
        "--blank-rgb",
        action="store_true",
        help="thermal only: RGB black, labels unseen by thermal count as misses; what segment_node publishes with "
        "on_rgb_loss: thermal_only",
    )
    p.add_argument("--synthetic-count", type=int, default=128, help="synthetic: scenes (default 128)")
    p.add_argument("--synthetic-seed", type=int, default=0, help="synthetic: scene seed (default 0)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="synthetic: scene size (default 480 640)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data.datasets import DATASET_KINDS, DatasetError, build_dataset
    from ..evaluation.evaluator import evaluate
    from ..models.classes import load_dataset_info
    from ..pipeline.segmenter import Segmenter

    if args.blank_thermal and args.blank_rgb:
        print(
            "error: --blank-thermal and --blank-rgb exclude each other: with both cameras blanked the model sees "
            "nothing; give one of them",
            file=sys.stderr,
        )
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dataset not in DATASET_KINDS:
        print(f"error: unknown dataset '{args.dataset}'; expected one of {', '.join(DATASET_KINDS)}", file=sys.stderr)
        return 2
    if args.dataset != "synthetic" and not args.data:
        print(f"error: dataset '{args.dataset}' needs --data DIR", file=sys.stderr)
        return 2
    try:
        seg = Segmenter.from_checkpoint(
            args.checkpoint,
            device=args.device,
            precision=args.precision,
            sam2_checkpoint=args.sam2_checkpoint,
            class_set=args.class_set,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    info = seg.dataset_info
    if args.dataset != "folder":
        expected = load_dataset_info(args.dataset).class_names
        if tuple(expected) != tuple(info.class_names):
            sets = seg.class_sets
            others = f"; its class sets are {', '.join(sets)} (--class-set)" if len(sets) > 1 else ""
            print(
                f"error: checkpoint {args.checkpoint} (class set '{info.name}') predicts {list(info.class_names)} but "
                f"dataset '{args.dataset}' has classes {list(expected)}{others}",
                file=sys.stderr,
            )
            return 2
    opts = {}
    if args.dataset == "synthetic":
        opts = {"count": args.synthetic_count, "seed": args.synthetic_seed}
        if args.size:
            opts["size"] = tuple(args.size)
    try:
        ds = build_dataset(args.dataset, args.data, args.split, info, **opts)
        meta = {
            "checkpoint": str(args.checkpoint),
            "dataset": args.dataset,
            "data": str(args.data) if args.data else None,
            "split": args.split,
            "class_set": info.name,
            "device": str(seg.device),
            "precision": seg.precision,
            "input_size": list(seg.input_size),
        }
        doc = evaluate(
            seg,
            ds,
            out_dir=args.out,
            blank_thermal=args.blank_thermal,
            blank_rgb=args.blank_rgb,
            max_items=args.max_items,
            max_overlays=args.overlays,
            progress=False if args.no_progress else None,
            title=f"{Path(args.checkpoint).name} on {args.dataset} {args.split}",
            meta=meta,
        )
    except (DatasetError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    miou = doc["miou"]
    line = f"{doc['items']} items: mIoU {100 * miou:.2f} %" if miou is not None else f"{doc['items']} items"
    for cond, c in doc.get("conditions", {}).items():
        if c.get("miou") is not None:
            line += f", {cond} {100 * c['miou']:.2f} %"
    print(line + (f"; report in {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":  # python -m rgbt_seg_ros.tools.evaluate ... (same as rgbt-seg evaluate ...)
    parser = argparse.ArgumentParser(prog="rgbt-seg evaluate", description="evaluate a checkpoint on a dataset")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))

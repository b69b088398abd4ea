"""``rgbt-seg demo``: segment_node + the demo checkpoint over the sample bag, live over DDS."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default demo_out)")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint (default: the installed models/demo)")
    p.add_argument("--frames", type=int, default=60, help="frames in the sample bag when it is made (default 60)")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda (default cpu)")


def run(args: argparse.Namespace) -> int:
    from ..data.bags import BagError
    from ..ros.demo import DemoError, run_demo

    try:
        m = run_demo(args.out, checkpoint=args.checkpoint, frames=args.frames, device=args.device)
    except (DemoError, BagError, ValueError) as exc:
        print(f"rgbt-seg demo: {exc}", file=sys.stderr)
        return 1
    lat = m["latency_ms"]
    print()
    print(f"demo: {m['frames_segmented']} of {m['frames_published']} frames segmented live by {m['model']}")
    if lat["p50"] is not None:
        print(
            f"  latency (publish -> labels): p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f} ms; "
            f"model p50 {m['model_time_p50_ms']:.0f} ms; drops: {m['drops']}"
        )
    if m["miou"] is not None:
        print(f"  mIoU against the bag's ground truth: {100 * m['miou']:.1f} over {m['ground_truth_frames']} frames")
        conds = ", ".join(f"{c} {100 * v['miou']:.1f}" for c, v in m["conditions"].items() if v["miou"] is not None)
        print(f"  by condition: {conds}")
    if m.get("night_iou"):
        n = m["night_iou"]
        pct = {k: "n/a" if v is None else f"{100 * v:.1f}" for k, v in n.items()}
        print(f"  at night (found by their heat): person IoU {pct['person']}, car IoU {pct['car']}")
    print(f"  wrote {args.out}/overlay.gif, contact_sheet.png, metrics.json")
    return 0

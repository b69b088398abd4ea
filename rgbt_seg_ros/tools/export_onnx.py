"""``rgbt-seg export-onnx``: a checkpoint's model forward as an ONNX file with static shapes.

```
rgbt-seg export-onnx --checkpoint DIR --out model.onnx [--opset 17] [--size H W] [--batch 1] [--no-verify]
```

The file maps normalised ``rgb`` (B,3,H,W), ``thermal`` (B,1,H,W) and ``valid`` (B,1,H,W) to
``logits`` (B,C,H,W); see ``rgbt_seg_ros/models/onnx_export.py``. Unless ``--no-verify``, the file is
run once with onnxruntime (CPU) against PyTorch on random inputs and the largest logit
difference and the arg-max agreement are printed; a disagreement above the tolerances exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MAX_ABS_DIFF = 1e-3  # relative to logits of order 1-10 from fp32 reorderings
MIN_ARGMAX_AGREEMENT = 0.999


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", type=Path, required=True, help="checkpoint directory (model.safetensors + config.yaml)"
    )
    p.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument(
        "--size", type=int, nargs=2, metavar=("H", "W"), default=None, help="input size (default: the checkpoint's)"
    )
    p.add_argument("--batch", type=int, default=1, help="static batch size (default 1)")
    p.add_argument("--sam2-checkpoint", type=Path, default=None, help="base SAM2 weights, if the checkpoint needs them")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime parity check")
    p.add_argument(
        "--time", type=int, default=0, metavar="N", help="also time N interleaved runs of onnxruntime and PyTorch"
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads of both runtimes (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write the parity (and timing) figures as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        from ..models.onnx_export import compare_with_torch, export_checkpoint
    except ImportError as exc:  # onnx is an optional dependency of deployment
        print(f"error: ONNX export needs the 'onnx' package (and 'onnxruntime' to verify): {exc}", file=sys.stderr)
        return 1
    try:
        path, model, cfg = export_checkpoint(
            args.checkpoint,
            args.out,
            size=tuple(args.size) if args.size else None,
            batch=args.batch,
            opset=args.opset,
            sam2_checkpoint=args.sam2_checkpoint,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    size = tuple(args.size) if args.size else tuple(cfg["input_size"])
    print(
        f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB): {cfg['backend']} {size[0]}x{size[1]}, "
        f"batch {args.batch}, opset {args.opset}"
    )
    if args.no_verify:
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        parity = compare_with_torch(model, path, size, batch=args.batch, repeats=args.time)
    except ImportError as exc:
        print(f"not verified: onnxruntime is not installed ({exc})", file=sys.stderr)
        return 0
    ok = parity["max_abs_diff"] <= MAX_ABS_DIFF and parity["argmax_agreement"] >= MIN_ARGMAX_AGREEMENT
    print(
        f"onnxruntime CPU vs PyTorch: max |logit diff| {parity['max_abs_diff']:.3g} "
        f"(logits up to {parity['logit_abs_max']:.3g}), arg-max agreement {100 * parity['argmax_agreement']:.3f} % "
        f"-> {'ok' if ok else 'MISMATCH'}"
    )
    if args.time:
        print(
            f"time ({parity['threads']} threads, median of {args.time} interleaved runs): onnxruntime "
            f"{parity['onnx_ms_median']:.1f} ms, PyTorch {parity['torch_ms_median']:.1f} ms, "
            f"ratio {parity['onnx_to_torch_time']:.2f}"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"checkpoint": str(args.checkpoint), "backend": cfg["backend"], "input_size": list(size), **parity}
        record["date"] = time.strftime("%Y-%m-%d")
        args.json.write_text(json.dumps({**record, "ok": ok}, indent=2) + "\n")
    return 0 if ok else 2


if __name__ == "__main__":  # python -m rgbt_seg_ros.tools.export_onnx ...
    parser = argparse.ArgumentParser(prog="rgbt-seg export-onnx")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))

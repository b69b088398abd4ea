"""The Segmenter's model time at each precision and ``torch.compile`` mode (``model.precision``, ``model.compile``).

::

    python -m rgbt_seg_ros.bench.segmenter_benchmark --config models/sartm_tiny.yaml --device cuda \\
        --variants fp32 bf16 fp16 fp32+compile --json segmenter.json

The model has random weights of the config (``bench.models.load_segmenter``; the compute
is that of trained weights). The fp32 eager ``Segmenter`` is built first and is the reference
(variant ``fp32``); every other variant is a new ``Segmenter`` around the same model with
``precision=`` and ``compile=`` (mode ``--compile-mode``, backend ``--compile-backend``), as the
node builds it from its parameters. Its construction, which includes the warm-up and for a
compiled variant the compilation, is timed as ``setup_s``. Then ``warmup`` untimed and ``repeats``
timed calls on one synthetic RGB-thermal pair at the model's input size (so no resize or padding):
median and p95 of the Segmenter's own ``model`` timing (the forward, synchronised on CUDA) and of
the whole call, the arg-max agreement of the labels with the fp32 reference, and whether the
confidence map is finite.

The JSON file is rewritten after each variant (``complete`` is false until the last), so a
variant that is stopped from outside, e.g. a long compilation killed by ``gpu_check``'s timeout,
leaves the figures of those before it. ``torch._dynamo.reset()`` runs before each compiled
variant: the LoRA layers' merged-weight cache is guarded on by dynamo, and a second compilation
of the same model without a reset hits dynamo's recompile limit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from ..pipeline.frame_flow import latency_summary

PRECISIONS = ("fp32", "fp16", "bf16")


def parse_variant(text: str) -> tuple[str, bool]:
    """``bf16`` -> ("bf16", False); ``fp32+compile`` -> ("fp32", True)."""
    precision, _, rest = str(text).partition("+")
    if precision not in PRECISIONS or rest not in ("", "compile"):
        raise ValueError(
            f"unknown variant '{text}': expected PRECISION or PRECISION+compile, PRECISION in {PRECISIONS}"
        )
    return precision, rest == "compile"


def synthetic_pair(size: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic street scene at ``size`` (H, W): RGB uint8 and thermal float32 in [0, 1]."""
    from ..data.synthetic import SceneGenerator

    sample = SceneGenerator(seed=seed, rgb_size=tuple(size), thermal_size=tuple(size)).sample(0, "day")
    t = sample.thermal.astype(np.float32)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return np.ascontiguousarray(sample.rgb), t


def _time_calls(seg, rgb, thermal, repeats: int, warmup: int) -> tuple[dict, object]:
    model_ms, call_ms = [], []
    res = None
    for i in range(warmup + max(1, repeats)):
        t0 = time.perf_counter()
        res = seg(rgb, thermal)
        t1 = time.perf_counter()
        if i >= warmup:
            model_ms.append(res.timings["model"])
            call_ms.append((t1 - t0) * 1e3)
    model = latency_summary(model_ms)
    stats = {
        "model_ms_median": model["p50"],
        "model_ms_p95": model["p95"],
        "model_ms_all": [float(v) for v in model_ms],
        "call_ms_median": float(statistics.median(call_ms)),
    }
    return stats, res


def bench_segmenter(
    config: str | Path = "models/sartm_tiny.yaml",
    device: str = "cpu",
    variants=("fp32", "bf16", "fp16"),
    repeats: int = 10,
    warmup: int = 2,
    model_size: tuple[int, int] | None = None,
    compile_mode: str = "default",
    compile_backend: str = "inductor",
    seed: int = 0,
    on_update=None,
) -> dict:
    """Time each variant (see module docstring); ``on_update(result)`` is called after each one."""
    import torch

    from ..pipeline.segmenter import Segmenter
    from .models import load_segmenter

    parsed = [parse_variant(v) for v in variants]
    t0 = time.perf_counter()
    ref = load_segmenter(config=config, model_size=model_size, device=device, precision="fp32", seed=seed)
    ref_setup = time.perf_counter() - t0
    rgb, thermal = synthetic_pair(ref.input_size, seed=seed)
    dev = ref.device
    result = {
        "config": str(config),
        "backend": ref.backend,
        "input_size": list(ref.input_size),
        "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "repeats": int(repeats),
        "warmup": int(warmup),
        "compile_mode": compile_mode,
        "compile_backend": compile_backend,
        "random_weights": True,
        "torch": torch.__version__,
        "variants": [],
        "complete": False,
    }
    ref_stats, ref_res = _time_calls(ref, rgb, thermal, repeats, warmup)
    ref_model = ref_stats["model_ms_median"]

    def record(name, precision, compiled, setup_s, stats, res, error=None):
        row = {"name": name, "precision": precision, "compile": compile_mode if compiled else "none"}
        if error is not None:
            row["error"] = error
        else:
            row.update(
                {
                    "setup_s": setup_s,
                    **stats,
                    "speedup_vs_fp32": ref_model / stats["model_ms_median"] if stats["model_ms_median"] > 0 else None,
                    "labels_agreement_vs_fp32": float(np.mean(res.labels == ref_res.labels)),
                    "confidence_finite": bool(np.isfinite(res.confidence).all()),
                }
            )
        result["variants"].append(row)
        if on_update is not None:
            on_update(result)

    for name, (precision, compiled) in zip(variants, parsed):
        if (precision, compiled) == ("fp32", False):
            record(name, precision, False, ref_setup, ref_stats, ref_res)
            continue
        if compiled:
            torch._dynamo.reset()
        try:
            t0 = time.perf_counter()
            seg = Segmenter(
                ref.model,
                ref.config,
                ref.dataset_info,
                device=dev,
                precision=precision,
                compile=compile_mode if compiled else "none",
                compile_backend=compile_backend,
            )
            setup_s = time.perf_counter() - t0
            stats, res = _time_calls(seg, rgb, thermal, repeats, warmup)
        except (RuntimeError, ValueError) as exc:  # one variant failing (e.g. fp16 unsupported) does not stop the rest
            record(name, precision, compiled, None, None, None, error=f"{type(exc).__name__}: {exc}"[:2000])
            continue
        record(name, precision, compiled, setup_s, stats, res)
        del seg
    result["complete"] = True
    if on_update is not None:
        on_update(result)
    return result


def markdown(result: dict) -> str:
    lines = [
        f"Segmenter variants: {result['config']} ({result['backend']}) {result['input_size'][0]}x"
        f"{result['input_size'][1]} on {result['device']}"
        + (f" ({result['gpu']})" if result["gpu"] else f", {result['threads']} threads")
        + f", median of {result['repeats']} calls; compile: mode {result['compile_mode']}, "
        f"backend {result['compile_backend']}",
        "",
        "| variant | model ms (p95) | call ms | vs fp32 | labels = fp32 | setup s |",
        "|---|---|---|---|---|---|",
    ]
    for v in result["variants"]:
        if "error" in v:
            lines.append(f"| {v['name']} | failed: {v['error'][:80]} | | | | |")
            continue
        lines.append(
            f"| {v['name']} | {v['model_ms_median']:.2f} ({v['model_ms_p95']:.2f}) | {v['call_ms_median']:.2f} "
            f"| {v['speedup_vs_fp32']:.2f}x | {100 * v['labels_agreement_vs_fp32']:.2f} % | {v['setup_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m rgbt_seg_ros.bench.segmenter_benchmark", description=__doc__.split("\n")[0]
    )
    p.add_argument("--config", default="models/sartm_tiny.yaml", help="model config (default models/sartm_tiny.yaml)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu)")
    p.add_argument(
        "--variants",
        nargs="+",
        default=["fp32", "bf16", "fp16"],
        help="PRECISION or PRECISION+compile, PRECISION in fp32 bf16 fp16 (default fp32 bf16 fp16)",
    )
    p.add_argument("--repeats", type=int, default=10, help="timed calls per variant (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per variant first (default 2)")
    p.add_argument("--model-size", type=int, nargs=2, metavar=("H", "W"), default=None, help="model input size")
    p.add_argument("--compile-mode", default="default", choices=("default", "reduce-overhead", "max-autotune"))
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    def write(result: dict) -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.json.with_name(args.json.name + ".tmp")
            tmp.write_text(json.dumps(result, indent=2))
            tmp.replace(args.json)

    try:
        for v in args.variants:
            parse_variant(v)
        result = bench_segmenter(
            args.config,
            device=args.device,
            variants=args.variants,
            repeats=args.repeats,
            warmup=args.warmup,
            model_size=tuple(args.model_size) if args.model_size else None,
            compile_mode=args.compile_mode,
            compile_backend=args.compile_backend,
            on_update=write,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(markdown(result))
    if args.json:
        print(f"wrote {args.json}")
    return 1 if any("error" in v for v in result["variants"]) else 0


if __name__ == "__main__":
    sys.exit(main())

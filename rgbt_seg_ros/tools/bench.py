"""``rgbt-seg bench``: benchmarks that print figures (markdown) and write them as JSON (``--json``).

``model`` (this module): parameters, GFLOP per RGB-T pair, forward time and achieved GFLOP/s;
``node`` (``ros/live_benchmark.py``): the live node over DDS; ``pipeline`` and ``memory``
(``ros/pipeline_benchmark.py``): per-stage time of a frame and RSS over N pairs; ``soak`` and
``oversize`` (``ros/soak.py``): the live node under field faults; ``train`` (``training/benchmark.py``):
one training step; ``table`` (``evaluation/reports.py``): the benchmark table (docs/benchmarks.md) from the JSON
files.

``bench model``: parameters, GFLOP per RGB-T pair, forward time and achieved GFLOP/s.

The model is built from its config with random weights when no SAM2 checkpoint is given
(the compute is the same); the trainable count is then reported for the configured freezing.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOP per multiply-add) during
one counting pass in which ``F.scaled_dot_product_attention`` is replaced by its explicit
math (``softmax(q k^T * scale) v``): the counter has no formula for the CPU SDPA kernel, so
attention would otherwise count as zero. The counted matmuls give 4*B*heads*Lq*Lk*d per
attention call. Softmax, norms and activations are not counted (as is usual).

Timing: median of ``--repeats`` forward passes under ``torch.inference_mode`` after one
warm-up, and, in the same run, the GFLOP/s of a large fp32 matmul on the same device, so the
ratio is comparable across runs on shared machines whose absolute speed varies 2-3x.
For SARTM the same model is timed again with one encoder pass per modality
(``batched_inference`` off), reported as ``forward_ms_two_pass`` and the time ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..evaluation.reports import add_table_arguments, write_result_json

CLASS_SET_HELP = "class set to run with, of a model with several (segrgbx; default: its primary)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    m = sub.add_parser("model", help="one backend forward pass: params, GFLOP, time, matmul ratio")
    m.add_argument("--config", default="models/sartm_tiny.yaml", help="model config (default models/sartm_tiny.yaml)")
    m.add_argument("--dataset", default=None, help="class file name or path (default: the config's dataset)")
    m.add_argument("--class-set", default=None, help=CLASS_SET_HELP)
    m.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None, help="input size (default: config)")
    m.add_argument("--batch", type=int, default=1, help="pairs per forward pass (default 1)")
    m.add_argument("--repeats", type=int, default=5, help="timed forward passes (default 5)")
    m.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    m.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    m.add_argument("--sam2-checkpoint", default=None, help="official SAM2 weights (optional; FLOPs do not change)")
    m.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    n = sub.add_parser("node", help="the live segment_node over DDS: latency, overhead, drops under load")
    n.add_argument(
        "--checkpoint", type=Path, default=None, help="checkpoint directory (default: random weights of --config)"
    )
    n.add_argument("--config", default="models/sartm_tiny.yaml", help="model config for random weights")
    n.add_argument(
        "--model-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="model input size for random weights (default: the config's)",
    )
    n.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(480, 640), help="camera image size")
    n.add_argument("--rate", type=float, default=10.0, help="publish rate in Hz (default 10)")
    n.add_argument("--class-set", default=None, help=CLASS_SET_HELP)
    n.add_argument("--seconds", type=float, default=20.0, help="measured duration (default 20)")
    n.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    n.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    pl = sub.add_parser("pipeline", help="per-stage ms of one frame at 640x480 and 1280x720 (node's objects)")
    _model_source_arguments(pl, default_config="models/sartm_tiny.yaml")
    pl.add_argument(
        "--sizes",
        nargs="+",
        default=["480x640", "720x1280"],
        metavar="HxW",
        help="camera image sizes, height x width (default 480x640 720x1280)",
    )
    pl.add_argument("--repeats", type=int, default=10, help="timed frames per size (default 10)")
    pl.add_argument("--warmup", type=int, default=2, help="untimed frames per size first (default 2)")
    pl.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"), help="inference precision")
    pl.add_argument(
        "--profile", type=int, default=0, metavar="ROWS", help="also print the torch profiler's top ROWS operators"
    )
    pl.add_argument(
        "--model-ms",
        type=float,
        default=None,
        metavar="MS",
        help="replace the forward by a STAND-IN that sleeps MS (for machines without a GPU: the host path only)",
    )
    pl.add_argument(
        "--seconds", type=float, default=4.0, help="sustained-rate run per size, seconds (0: skip; default 4)"
    )
    pl.add_argument("--feed-hz", type=float, default=200.0, help="camera rate of the sustained run (default 200)")
    mem = sub.add_parser("memory", help="RSS over N pairs of the node's per-frame path (leak check)")
    _model_source_arguments(mem, default_config="models/sartm_micro.yaml")
    mem.add_argument("--pairs", type=int, default=2000, help="measured pairs (default 2000)")
    mem.add_argument("--warmup", type=int, default=50, help="pairs before the reference RSS is taken (default 50)")
    mem.add_argument("--size", default="480x640", metavar="HxW", help="camera image size (default 480x640)")
    mem.add_argument("--samples", type=int, default=20, help="RSS samples along the run (default 20)")

    soak = sub.add_parser("soak", help="the live node under field faults for a long run: RSS drift, switches, drops")
    soak.add_argument("--checkpoint", type=Path, default=None, help="checkpoint (default: random sartm_micro)")
    soak.add_argument("--minutes", type=float, default=30.0, help="duration (default 30)")
    soak.add_argument("--rate", type=float, default=10.0, help="camera rate in Hz (default 10)")
    soak.add_argument("--short", action="store_true", help="the one-minute schedule of the test suite")
    soak.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    soak.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    over = sub.add_parser("oversize", help="RGB frames above max_megapixels: refused, lost, node RSS after")
    over.add_argument("--checkpoint", type=Path, default=None, help="checkpoint (default: random sartm_micro)")
    over.add_argument("--frames", type=int, default=100, help="oversize frames (default 100)")
    over.add_argument("--size", default="4000x5000", metavar="HxW", help="oversize frame (default 4000x5000, 20 MP)")
    over.add_argument("--rate", type=float, default=5.0, help="oversize frames per second (default 5)")
    over.add_argument("--reliability", choices=("best_effort", "reliable"), default="best_effort")
    over.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    over.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    from ..training.benchmark import add_arguments as add_train_arguments  # bench train: training/benchmark.py

    add_train_arguments(sub.add_parser("train", help="one training step (the trainer's own): median time, peak memory"))
    table = sub.add_parser(
        "table", help="the benchmark table (docs/benchmarks.md) from docs/results/bench/*.json (evaluation/reports.py)"
    )
    add_table_arguments(table, Path("docs/results/bench"), "table")


def _model_source_arguments(p: argparse.ArgumentParser, default_config: str) -> None:
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint directory (default: random weights)")
    p.add_argument(
        "--config", default=default_config, help=f"model config for random weights (default {default_config})"
    )
    p.add_argument(
        "--model-size", type=int, nargs=2, metavar=("H", "W"), default=None, help="model input size (random weights)"
    )
    p.add_argument("--class-set", default=None, help=CLASS_SET_HELP)
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")


def parse_size(text: str) -> tuple[int, int]:
    """'480x640' -> (480, 640): height x width."""
    try:
        h, w = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"image size '{text}' must be HEIGHTxWIDTH, e.g. 480x640") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"image size '{text}' must be positive")
    return h, w


def _explicit_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """Attention as matmul-softmax-matmul, so that FlopCounterMode sees its two matmuls."""
    if is_causal or kwargs.get("enable_gqa"):
        raise NotImplementedError("explicit SDPA for FLOP counting does not support is_causal / enable_gqa")
    scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    scores = (query * scale) @ key.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores.softmax(dim=-1) @ value


@contextlib.contextmanager
def explicit_attention():
    """Within the block, ``F.scaled_dot_product_attention`` runs as explicit matmuls."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _explicit_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def count_flops(model: torch.nn.Module, *inputs: torch.Tensor) -> dict:
    """FLOPs of one forward pass: total and per top-level submodule (attention included)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, depth=2)
    with torch.inference_mode(), explicit_attention(), counter:
        model(*inputs)
    counts = {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    root = type(model).__name__
    per_module: dict[str, int] = {}
    for child, _ in model.named_children():
        direct = counts.get(f"{root}.{child}")
        if direct is None:  # a ModuleList/Dict is not called itself: add up its called members
            direct = sum(v for k, v in counts.items() if k.startswith(f"{root}.{child}.") and k.count(".") == 2)
        if direct:
            per_module[child] = direct
    rest = int(counter.get_total_flops()) - sum(per_module.values())
    if rest > 0:  # modules called outside their parent's forward (e.g. a head's helper method)
        per_module["other"] = rest
    return {"total": int(counter.get_total_flops()), "per_module": per_module}


def time_forward(model: torch.nn.Module, inputs: tuple, repeats: int, device: torch.device) -> list[float]:
    """Seconds per forward pass (after one warm-up), each synchronised on CUDA."""

    def once() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(*inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    once()
    return [once() for _ in range(max(1, repeats))]


def compare_with_reference(model: torch.nn.Module, inputs: tuple, repeats: int, device: torch.device) -> dict:
    """``model.forward`` and ``model.reference_forward`` timed alternately (so both see the same machine
    noise), with the reference's FLOPs: medians and their ratio."""

    class Reference(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner.reference_forward(*args)

    ref = Reference(model)
    full_t, ref_t = [], []
    time_forward(model, inputs, 1, device)
    time_forward(ref, inputs, 1, device)
    for _ in range(max(1, repeats)):
        full_t += time_forward(model, inputs, 1, device)[-1:]
        ref_t += time_forward(ref, inputs, 1, device)[-1:]
    full, bare = statistics.median(full_t), statistics.median(ref_t)
    batch = inputs[0].shape[0]
    return {
        "what": "the bare dual Hiera encoder (same trunk, both modalities as one batch)",
        "gflop_per_pair": count_flops(ref, *inputs)["total"] / batch / 1e9,
        "forward_ms_median": bare * 1e3,
        "model_forward_ms_median": full * 1e3,
        "ratio": full / bare,
    }


def matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` fp32 GFLOP/s of an n x n matmul (the machine's practical peak)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def bench_model(
    config: str | Path | dict,
    dataset: str | None = None,
    size: tuple[int, int] | None = None,
    batch: int = 1,
    repeats: int = 5,
    device: str = "cpu",
    sam2_checkpoint: str | None = None,
    class_set: str | None = None,
) -> dict:
    """Build a backend and measure it; returns a dict of results (see module docstring).
    ``class_set``: the set of a model with several to run with (its class count sizes the logits)."""
    from ..models import build_model, dataset_info_for, resolve_model_config
    from ..models.class_sets import random_text_embeddings, select_class_set
    from ..models.preprocessing import resolve_device

    dev = resolve_device(device)
    cfg = resolve_model_config(config)
    info = dataset_info_for(cfg, dataset)
    enc = cfg.get("encoder", {})
    dec = cfg.get("decoder", {})
    freeze = (bool(enc.get("freeze")), bool(dec.get("freeze_transformer")))
    if sam2_checkpoint:
        enc["checkpoint"] = str(sam2_checkpoint)
    random_base = not enc.get("checkpoint")
    if random_base and "encoder" in cfg:  # random weights: same compute; freezing re-applied below
        enc["freeze"], dec["freeze_transformer"] = False, False
    model = build_model(cfg, info, random_text_embeddings(cfg, info))
    info = select_class_set(model, info, class_set, what=f"model config {config}")
    if random_base and hasattr(model, "set_trainable"):
        model.set_trainable(*freeze)
    model = model.to(dev).eval()
    counts = model.parameter_counts() if hasattr(model, "parameter_counts") else {}
    params = list(model.parameters())
    h, w = size or cfg["input_size"]
    rgb = torch.randn(batch, 3, h, w, device=dev)
    thermal = torch.randn(batch, 1, h, w, device=dev)

    flops = count_flops(model, rgb, thermal)
    times = time_forward(model, (rgb, thermal), repeats, dev)
    median = statistics.median(times)
    two_pass = None
    if getattr(model, "batched_inference", False):  # SARTM: the same model with one encoder pass per modality
        model.batched_inference = False
        two_pass = statistics.median(time_forward(model, (rgb, thermal), repeats, dev))
        model.batched_inference = True
    reference = None
    if hasattr(model, "reference_forward"):  # SegRGB-X: the bare dual Hiera encoder, timed in turn with forward
        reference = compare_with_reference(model, (rgb, thermal), repeats, dev)
    gflop_pair = flops["total"] / batch / 1e9
    achieved = flops["total"] / median / 1e9
    peak = matmul_gflops(dev)
    return {
        "config": str(config) if not isinstance(config, dict) else cfg.get("description", "<dict>"),
        "backend": cfg["backend"],
        "classes": info.num_classes,
        "class_set": info.name,
        "input_size": [h, w],
        "batch": batch,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "params_total": counts.get("total", sum(p.numel() for p in params)),
        "params_trainable": counts.get("trainable", sum(p.numel() for p in params if p.requires_grad)),
        "params_lora": counts.get("lora"),
        "random_weights": random_base,
        "gflop_per_pair": gflop_pair,
        "gflop_per_module": {k: v / batch / 1e9 for k, v in flops["per_module"].items()},
        "forward_ms_median": median * 1e3,
        "forward_ms_all": [t * 1e3 for t in times],
        "forward_ms_two_pass": None if two_pass is None else two_pass * 1e3,
        "batched_vs_two_pass": None if two_pass is None else median / two_pass,
        "reference": reference,
        "achieved_gflops": achieved,
        "matmul_gflops": peak,
        "ratio_to_matmul": achieved / peak,
        "torch": torch.__version__,
    }


def markdown(result: dict) -> str:
    """The results as a two-column markdown table."""
    rows = [
        ("config", result["config"]),
        ("backend / classes", f"{result['backend']} / {result['classes']}"),
        ("input (H x W) / batch", f"{result['input_size'][0]} x {result['input_size'][1]} / {result['batch']}"),
        ("device / threads", f"{result['device']} / {result['threads']}"),
        ("parameters total", f"{result['params_total'] / 1e6:.2f} M"),
        ("parameters trainable", f"{result['params_trainable'] / 1e6:.3f} M"),
        ("of which LoRA (2 adapters)", f"{(result['params_lora'] or 0) / 1e6:.3f} M"),
        ("GFLOP per RGB-T pair", f"{result['gflop_per_pair']:.2f}"),
    ]
    rows += [(f"  GFLOP {k}", f"{v:.2f}") for k, v in sorted(result["gflop_per_module"].items(), key=lambda kv: -kv[1])]
    rows += [
        ("forward median", f"{result['forward_ms_median']:.1f} ms"),
    ]
    if result.get("forward_ms_two_pass") is not None:
        rows += [
            ("forward median, one encoder pass per modality", f"{result['forward_ms_two_pass']:.1f} ms"),
            ("batched / two-pass time", f"{result['batched_vs_two_pass']:.2f}"),
        ]
    ref = result.get("reference")
    if ref:
        rows += [
            ("reference", ref["what"]),
            ("reference GFLOP per pair", f"{ref['gflop_per_pair']:.2f}"),
            (
                "forward / reference, medians of alternate runs",
                f"{ref['model_forward_ms_median']:.1f} ms / {ref['forward_ms_median']:.1f} ms = {ref['ratio']:.2f}x",
            ),
        ]
    rows += [
        ("achieved", f"{result['achieved_gflops']:.1f} GFLOP/s"),
        ("fp32 matmul, same run", f"{result['matmul_gflops']:.1f} GFLOP/s"),
        ("ratio to matmul", f"{result['ratio_to_matmul']:.2f}"),
    ]
    lines = ["| quantity | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.target == "node":
        return run_node(args)
    if args.target in ("pipeline", "memory"):
        return run_pipeline_or_memory(args)
    if args.target in ("soak", "oversize"):
        return run_soak_or_oversize(args)
    if args.target == "table":
        return run_table(args)
    if args.target == "train":
        from ..training.benchmark import run as run_train

        return run_train(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = bench_model(
            args.config,
            dataset=args.dataset,
            size=tuple(args.size) if args.size else None,
            batch=args.batch,
            repeats=args.repeats,
            device=args.device,
            sam2_checkpoint=args.sam2_checkpoint,
            class_set=args.class_set,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(markdown(result))
    write_result_json(args.json, result)
    return 0


def run_table(args: argparse.Namespace) -> int:
    from ..evaluation.reports import BEGIN, END, run_table_command, table

    try:
        body = table(args.results)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.check:
        print(body)  # the table itself, as before the files held it
    return run_table_command(args, [(BEGIN, END, body)], "benchmark table", "rgbt-seg bench table")


def run_node(args: argparse.Namespace) -> int:
    from ..ros import live_benchmark

    try:
        ckpt = _checkpoint_or_random(args.checkpoint, args.config, args.model_size)
        if args.class_set:  # refused here, before the node starts (the node itself would fall back)
            from ..models.checkpoint import check_checkpoint_class_set

            try:
                check_checkpoint_class_set(ckpt, args.class_set)
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
        result = live_benchmark.bench_node(
            ckpt,
            rate_hz=args.rate,
            seconds=args.seconds,
            size=tuple(args.size),
            device=args.device,
            class_set=args.class_set,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(live_benchmark.markdown(result))
    write_result_json(args.json, result)
    return 0


def _checkpoint_or_random(checkpoint: Path | None, config: str, model_size=None) -> Path:
    """The given checkpoint, or a random-weight one of ``config`` (same compute) in a temporary folder."""
    if checkpoint is not None:
        return checkpoint
    import tempfile

    from ..ros import live_benchmark

    ckpt = Path(tempfile.mkdtemp(prefix="rgbt_bench_ckpt_")) / "random"
    live_benchmark.make_random_checkpoint(config, ckpt, input_size=model_size)
    return ckpt


def run_soak_or_oversize(args: argparse.Namespace) -> int:
    from ..ros import soak

    try:
        ckpt = _checkpoint_or_random(args.checkpoint, "models/sartm_micro.yaml")
        if args.target == "soak":
            plan = soak.SoakPlan.short(args.minutes * 60) if args.short else soak.SoakPlan(seconds=args.minutes * 60)
            plan.rate = args.rate
            result = soak.bench_soak(ckpt, plan, device=args.device)
            print(soak.markdown_soak(result))
        else:
            result = soak.bench_oversize(
                ckpt,
                frames=args.frames,
                oversize=parse_size(args.size),
                rate=args.rate,
                reliability=args.reliability,
                device=args.device,
            )
            print(soak.markdown_oversize(result))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_result_json(args.json, result)
    return 0


def run_pipeline_or_memory(args: argparse.Namespace) -> int:
    from ..bench.models import load_segmenter
    from ..ros import pipeline_benchmark as pb

    if args.threads:
        torch.set_num_threads(args.threads)
    model_size = tuple(args.model_size) if args.model_size else None
    try:
        if args.target == "pipeline":
            sizes = [parse_size(s) for s in args.sizes]
            seg = load_segmenter(
                args.checkpoint,
                args.config,
                model_size,
                args.device,
                args.precision,
                model_ms=args.model_ms,
                class_set=args.class_set,
            )
            result = pb.bench_pipeline(
                checkpoint=args.checkpoint,
                config=args.config,
                sizes=sizes,
                repeats=args.repeats,
                warmup=args.warmup,
                segmenter=seg,
                seconds=args.seconds,
                feed_hz=args.feed_hz,
            )
            print(pb.markdown_pipeline(result))
            if args.profile:
                print(pb.profile_model(seg, rows=args.profile))
        else:
            result = pb.bench_memory(
                checkpoint=args.checkpoint,
                config=args.config,
                model_size=model_size,
                pairs=args.pairs,
                size=parse_size(args.size),
                warmup=args.warmup,
                samples=args.samples,
                device=args.device,
                progress=lambda n, rss: print(f"  {n} pairs: RSS {rss:.1f} MB", file=sys.stderr, flush=True),
                class_set=args.class_set,
            )
            print(pb.markdown_memory(result))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_result_json(args.json, result)
    return 0


if __name__ == "__main__":  # python -m rgbt_seg_ros.tools.bench model ...
    parser = argparse.ArgumentParser(prog="rgbt-seg bench")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))

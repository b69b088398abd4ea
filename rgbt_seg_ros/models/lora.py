"""Per-modality LoRA (peft) on the query and value projections of a Hiera trunk.

One adapter per modality (``rgb``, ``thermal``) is injected into the same q and v Linears
(produced by :func:`~rgbt_seg_ros.models.sam2_encoder.split_fused_qkv`). The two modalities
run as two forward passes, each with its own adapter active: peft's mixed-adapter batch
(``adapter_names=``) fails on Hiera's windowed attention, whose window partitioning reshapes
the batch dimension.

peft's ``set_adapter`` also flips ``requires_grad`` of the inactive adapters. Doing that
between the two forward passes of one training step would drop the gradient of the adapter
used first, so :func:`activate_adapter` restores every LoRA parameter's ``requires_grad``
right after switching, before anything is computed.

Inference runs both modalities in one trunk pass instead (:func:`modality_batch`): the batch
is ``[rgb; thermal]`` and every attention projects each half with one fused qkv weight that
has that modality's LoRA merged in (W + scale * B @ A, peft's own ``get_delta_weight``). The
merged weights are cached per attention and recomputed when any source tensor changes (its
``_version`` counter or identity), so loading new weights never leaves a stale cache. The
batched pass computes the same function as the two passes (tested to float rounding).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

MODALITY_ADAPTERS = ("rgb", "thermal")


def add_modality_lora(
    trunk: nn.Module,
    rank: int = 16,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: tuple[str, ...] | list[str] = ("q", "v"),
    adapters: tuple[str, ...] = MODALITY_ADAPTERS,
    blocks: list[int] | tuple[int, ...] | None = None,
) -> nn.Module:
    """Inject one LoRA adapter per name in ``adapters`` into ``trunk``'s attention ``targets``.

    ``targets`` name the Linears inside each block's ``attn`` (``q``, ``k``, ``v``, ``proj``).
    ``blocks`` restricts LoRA to those block indices (CPAL: the last stage only); None = all.
    LoRA B starts at zero, so the trunk's output is unchanged until training moves it.
    Returns the trunk (modified in place).
    """
    from peft import LoraConfig, inject_adapter_in_model

    allowed = {"q", "k", "v", "proj"}
    if not targets or not set(targets) <= allowed:
        raise ValueError(f"lora.targets must be a non-empty subset of {sorted(allowed)}, got {list(targets)}")
    if int(rank) < 1:
        raise ValueError(f"lora.rank must be >= 1, got {rank}")
    if blocks is not None:
        blocks = sorted({int(b) for b in blocks})
        n_blocks = len(getattr(trunk, "blocks", ()))
        if not blocks or blocks[0] < 0 or blocks[-1] >= n_blocks:
            raise ValueError(f"LoRA blocks must be a non-empty subset of 0..{n_blocks - 1}, got {blocks}")
    index = r"\d+" if blocks is None else "(?:" + "|".join(str(b) for b in blocks) + ")"
    pattern = r"blocks\." + index + r"\.attn\.(" + "|".join(sorted(set(targets))) + ")"
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=pattern)
    with warnings.catch_warnings():
        # peft warns that a second adapter joins the first: that is the point here.
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        for name in adapters:
            inject_adapter_in_model(config, trunk, adapter_name=name)
    activate_adapter(trunk, adapters[0])
    return trunk


def lora_layers(module: nn.Module) -> list[nn.Module]:
    """The peft LoRA layers inside ``module``."""
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def activate_adapter(module: nn.Module, name: str) -> None:
    """Make adapter ``name`` the active one in every LoRA layer of ``module``.

    ``requires_grad`` of all LoRA parameters is left exactly as it was.
    """
    layers = lora_layers(module)
    if not layers:
        raise RuntimeError("activate_adapter: the module has no LoRA layers")
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        if name not in layer.lora_A:
            raise ValueError(f"unknown LoRA adapter '{name}'; known: {sorted(layer.lora_A)}")
        if list(layer.active_adapters) != [name]:
            layer.set_adapter(name)
    for p, flag in flags:
        p.requires_grad_(flag)


def adapter_parameter_names(module: nn.Module, name: str) -> list[str]:
    """Names (relative to ``module``) of the parameters of LoRA adapter ``name``."""
    return [n for n, _ in module.named_parameters() if f".lora_A.{name}." in n or f".lora_B.{name}." in n]


def _linear_weight(layer: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a q/k/v projection with LoRA ``adapter`` merged in (plain Linears as they are)."""
    base = getattr(layer, "base_layer", None)
    if base is None:
        return layer.weight, layer.bias
    if adapter not in layer.lora_A:
        raise ValueError(f"unknown LoRA adapter '{adapter}'; known: {sorted(layer.lora_A)}")
    if layer.use_dora.get(adapter) or getattr(layer, "lora_bias", {}).get(adapter):
        raise ValueError("modality_batch supports plain LoRA only (no DoRA, no LoRA bias)")
    return base.weight + layer.get_delta_weight(adapter).to(base.weight.dtype), base.bias


def _sources(attn: nn.Module) -> list[torch.Tensor]:
    return [p for lin in (attn.q, attn.k, attn.v) for p in lin.parameters()]


def _merge(attn: nn.Module, adapters: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    weights, biases = [], []
    for adapter in adapters:
        parts = [_linear_weight(lin, adapter) for lin in (attn.q, attn.k, attn.v)]
        weights.append(torch.cat([w for w, _ in parts], dim=0))
        biases.append(torch.cat([b if b is not None else torch.zeros_like(w[:, 0]) for w, b in parts], dim=0))
    return torch.stack(weights).contiguous(), torch.stack(biases).contiguous()


def _group_weights(attn: nn.Module, adapters: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.is_grad_enabled() and any(t.requires_grad for t in _sources(attn)):
        return _merge(attn, adapters)  # differentiable: gradients reach W, A and B as in the two passes
    # merged weights made under inference_mode cannot enter autograd later: the mode is part of the key
    key = (
        adapters,
        torch.is_inference_mode_enabled(),
        tuple((id(t), t._version, t.device, t.dtype) for t in _sources(attn)),
    )
    cached = getattr(attn, "_merged_lora_cache", None)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    with torch.no_grad():
        weight, bias = _merge(attn, adapters)
    attn._merged_lora_cache = (key, weight, bias)
    return weight, bias


@contextlib.contextmanager
def modality_batch(trunk: nn.Module, adapters: tuple[str, ...] = MODALITY_ADAPTERS):
    """Within the block, the trunk takes a batch of ``len(adapters)`` equal contiguous groups
    (``[rgb; thermal]``) and projects each group's q, k, v with its own adapter merged in.

    With gradients enabled the merge is part of the graph (so LoRA still learns); without, the
    merged weights are cached. LoRA dropout cannot be merged: SARTM uses this in eval mode only.
    """
    attns = [block.attn for block in trunk.blocks]
    if not all(hasattr(a, "set_group_weights") for a in attns):
        raise RuntimeError("modality_batch needs split q/k/v attention (sam2_encoder.split_fused_qkv)")
    try:
        for attn in attns:
            attn.set_group_weights(*_group_weights(attn, tuple(adapters)))
        yield trunk
    finally:
        for attn in attns:
            attn.set_group_weights(None)

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
"""

from __future__ import annotations

import warnings

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

"""Official SAM2 checkpoints: read, remap to this package's module layout, and write back.

An official file (``sam2.1_hiera_*.pt``) is a torch pickle with the state dict under
``"model"``; it is read with ``torch.load(weights_only=True)`` (tensors only, no code). A
``.safetensors`` file in the same key layout (what ``export --standalone`` writes) is read
with safetensors.

Of the official keys this package uses:

=====================================================  ==========================================
official key                                           here
=====================================================  ==========================================
``image_encoder.*`` (trunk + neck)                      ``image_encoder`` part, with every
                                                       ``trunk.blocks.N.attn.qkv.{weight,bias}``
                                                       split into ``attn.{q,k,v}.{weight,bias}``
``sam_mask_decoder.{transformer,iou_token,``            ``mask_decoder`` part (same names)
``output_upscaling,conv_s0,conv_s1}.*``
``sam_prompt_encoder.pe_layer.positional_encoding_``    ``pe_gaussian`` (image PE frequencies)
``gaussian_matrix``
``sam_prompt_encoder.no_mask_embed.weight``             ``no_mask_embed`` (dense prompt embedding)
``no_mem_embed``                                        ``no_mem_embed`` (added to the stride-16
                                                       image embedding before the decoder)
=====================================================  ==========================================

``no_mem_embed`` is optional on read (None when absent): every official SAM2 file has it, but
the ``base_sam2.safetensors`` of a standalone export of checkpoint format 1 does not, and those
models ran with it at zero.

The decoder's mask tokens, hypernetwork MLPs and IoU head are per-class here (one mask token
per class) and are not taken from the official file; memory modules are ignored.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

ENCODER_PREFIX = "image_encoder."
DECODER_PREFIX = "sam_mask_decoder."
PE_KEY = "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
NO_MASK_KEY = "sam_prompt_encoder.no_mask_embed.weight"
NO_MEM_KEY = "no_mem_embed"
#: Decoder sub-modules taken from the official file (prompt-agnostic, class-agnostic parts).
DECODER_SHARED_PARTS = ("transformer.", "iou_token.", "output_upscaling.", "conv_s0.", "conv_s1.")

_QKV = re.compile(r"^(trunk\.blocks\.\d+\.attn\.)qkv\.(weight|bias)$")
_SPLIT = re.compile(r"^(trunk\.blocks\.\d+\.attn\.)([qkv])\.(weight|bias)$")


@dataclass
class Sam2Parts:
    """The parts of a SAM2 checkpoint this package loads, in local (split-qkv) key layout."""

    image_encoder: dict[str, torch.Tensor] = field(default_factory=dict)
    mask_decoder: dict[str, torch.Tensor] = field(default_factory=dict)
    pe_gaussian: torch.Tensor | None = None
    no_mask_embed: torch.Tensor | None = None
    no_mem_embed: torch.Tensor | None = None  # (1, 1, d); None: not in the file (loads as zeros)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (identifies the base weights a checkpoint was trained on).

    Cached per (path, size, mtime): a trainer saving every epoch hashes the base file once.
    """
    p = Path(path).expanduser().resolve()
    st = p.stat()
    return _sha256_of(str(p), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def read_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a SAM2 checkpoint in the official key layout (.pt with "model", or .safetensors)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"SAM2 checkpoint {p} does not exist (give the path to e.g. sam2.1_hiera_tiny.pt)")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or a pickle that needs code to load
        raise ValueError(f"SAM2 checkpoint {p} cannot be read as a weights-only torch file: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        keys = list(data)[:5] if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"SAM2 checkpoint {p}: expected a dict with the state dict under 'model', found {keys}")
    return data["model"]


def official_to_parts(state: dict[str, torch.Tensor], source: str = "<state dict>") -> Sam2Parts:
    """Remap an official SAM2 state dict to :class:`Sam2Parts` (splitting fused qkv)."""
    parts = Sam2Parts()
    for key, value in state.items():
        if key.startswith(ENCODER_PREFIX):
            local = key[len(ENCODER_PREFIX) :]
            m = _QKV.match(local)
            if m:
                for name, chunk in zip("qkv", value.chunk(3, dim=0)):
                    parts.image_encoder[f"{m.group(1)}{name}.{m.group(2)}"] = chunk.clone()
            else:
                parts.image_encoder[local] = value
        elif key.startswith(DECODER_PREFIX):
            local = key[len(DECODER_PREFIX) :]
            if local.startswith(DECODER_SHARED_PARTS):
                parts.mask_decoder[local] = value
    parts.pe_gaussian = state.get(PE_KEY)
    parts.no_mask_embed = state.get(NO_MASK_KEY)
    parts.no_mem_embed = state.get(NO_MEM_KEY)
    missing = [k for k, v in ((PE_KEY, parts.pe_gaussian), (NO_MASK_KEY, parts.no_mask_embed)) if v is None]
    if not parts.image_encoder:
        missing.append(ENCODER_PREFIX + "*")
    if not parts.mask_decoder:
        missing.append(DECODER_PREFIX + "transformer.*")
    if missing:
        raise ValueError(f"SAM2 checkpoint {source} lacks the key(s) {', '.join(missing)}; is it a SAM2 model file?")
    return parts


def parts_to_official(
    image_encoder: dict[str, torch.Tensor],
    mask_decoder: dict[str, torch.Tensor],
    pe_gaussian: torch.Tensor,
    no_mask_embed: torch.Tensor,
    no_mem_embed: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`official_to_parts`: local tensors -> official key layout.

    ``image_encoder`` may come from a LoRA-injected encoder: ``.base_layer`` is stripped and
    LoRA tensors are dropped, so the result is the frozen base weights only.
    """
    out: dict[str, torch.Tensor] = {}
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in image_encoder.items():
        if "lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        m = _SPLIT.match(key)
        if m:
            pending.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        else:
            out[ENCODER_PREFIX + key] = value.detach().clone()
    for (prefix, kind), qkv in pending.items():
        if set(qkv) != {"q", "k", "v"}:
            raise ValueError(f"image encoder state has {sorted(qkv)} but not all of q, k, v for {prefix}{kind}")
        out[f"{ENCODER_PREFIX}{prefix}qkv.{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0).detach().clone()
    for key, value in mask_decoder.items():
        if key.startswith(DECODER_SHARED_PARTS):
            out[DECODER_PREFIX + key] = value.detach().clone()
    out[PE_KEY] = pe_gaussian.detach().clone()
    out[NO_MASK_KEY] = no_mask_embed.detach().clone()
    if no_mem_embed is not None:
        out[NO_MEM_KEY] = no_mem_embed.detach().clone()
    return out

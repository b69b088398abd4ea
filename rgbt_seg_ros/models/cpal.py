"""CPAL backend: a frozen SAM2 Hiera run as two streams with cross-prompts, gated fusion, LoRA, UPerHead.

Paper: "Cross-prompting Adapter with LoRAs" (CPAL, TCSVT 2025), adapted from InternImage-H to
the SAM2 Hiera trunk this project already uses (see ``cpal_blocks.py`` for eq. 7-18).

Data flow for an RGB-T pair:

1. RGB and thermal (repeated to 3 channels) share Hiera's patch embedding and position
   embedding (the paper's shared stem), then run **block by block** through the same frozen
   Hiera blocks as two streams.
2. In every block of the stages listed in ``mcp.stages``, an MCP (two sub-blocks of grouped
   down/mid/up projections, one per direction) turns each stream's normalised tokens into a
   prompt that is added to the *other* stream's residual output: to the attention sub-layer's
   ``x + attn(norm(x))`` (prompt from the block's normalised input) and to the MLP sub-layer's
   ``t + mlp(norm(t))`` (prompt from the normalised mid-block tokens); the prompt does not enter
   the attention or the MLP itself. The up
   projections start at zero: a fresh CPAL's streams equal the plain frozen trunk.
3. After each of the four stages, a GPM merges the stage's thermal tokens into its RGB tokens
   (projection, cross-attention perception matrix, forget gate, ``+ V_RGB``, projection back).
4. A UPerHead (PPM + FPN, the mmsegmentation layout; the paper's CPAL-L, while CPAL-T uses a
   lighter Hamburger head) decodes
   the four merged maps to (B, C, H/4, W/4); ``logits`` are that, upsampled to the input size.
5. Modality-specific LoRA (one adapter per stream) sits only in the blocks of ``lora.stages``
   (the last stage by default), on the attention projections ``lora.targets``. The paper put
   LoRA on DCNv3's offset and mask layers, which decide *where* and *how much* each location
   samples; in attention that role is played by the query-key product, so the default targets
   are ``q`` and ``k``.

Weights: with ``encoder.checkpoint`` (an official ``sam2.1_hiera_*.pt``) the trunk is loaded
from it and frozen (``encoder.freeze``); MCP, GPM, LoRA and the head train. Only the trunk is
used (SAM2's neck and decoder are not part of CPAL). ``valid`` zeroes thermal input where the
thermal camera sees nothing and masks the thermal tokens inside each GPM.

The output dict holds only ``logits``: CPAL's objective is the segmentation loss alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .classes import DatasetInfo
from .cpal_blocks import GatedPerceptionModule, MultiModalCrossPrompter, UPerHead, attention_sublayer, dual_stream_block
from .lora import MODALITY_ADAPTERS, activate_adapter, add_modality_lora
from .registry import check_rgbt_inputs, recipe, refuse_frozen_random, register_backend
from .sam2_checkpoint import NO_MASK_KEY, PE_KEY, parts_to_official, read_official_state_dict
from .sam2_encoder import image_encoder_config, split_fused_qkv
from .sartm import SARTM

CPAL_DEFAULTS = {
    "encoder": {
        "sam2_config": "hiera_tiny",  # alias or path under sam2/configs; only the Hiera trunk is used
        "trunk": {},  # Hiera overrides (small test models)
        "checkpoint": None,  # official SAM2 weights; image_encoder.trunk.* is read
        "freeze": True,
    },
    "lora": {"rank": 8, "alpha": 8.0, "dropout": 0.0, "targets": ["q", "k"], "stages": [4]},
    "mcp": {"hidden": 32, "groups": 4, "stages": [1, 2, 3, 4]},
    "gpm": {"reduction": 4, "heads": 1, "kv_pool": [8, 4, 2, 1]},
    "head": {"channels": 96, "pool_scales": [1, 2, 3, 6], "dropout": 0.1},
    # The paper's training: AdamW lr 2e-5, weight decay 0.05, poly(1.0) decay, the base model's cross-entropy.
    "recipe": recipe("CPAL paper", "adamw", 2.0e-5, 0.05, 1.0, "ce"),
}

TRUNK_PREFIX = "image_encoder.trunk."


def build_hiera_trunk(name: str, overrides: dict | None = None) -> nn.Module:
    """sam2's Hiera (fused qkv, as in the official files) from a SAM2 config's ``image_encoder.trunk`` node."""
    from hydra.utils import instantiate

    node = image_encoder_config(name, overrides)["trunk"]
    n_blocks = sum(node.get("stages", (2, 3, 16, 3)))
    bad = [b for b in node.get("global_att_blocks", ()) if b >= n_blocks]
    if bad:
        raise ValueError(f"SAM2 trunk '{name}': global_att_blocks {bad} exceed the {n_blocks} trunk blocks")
    return instantiate(node, _convert_="all")


def trunk_to_official(trunk_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A split-qkv Hiera trunk's state dict in the official SAM2 key layout (``image_encoder.trunk.*``)."""
    empty = torch.empty(0)
    out = parts_to_official({"trunk." + k: v for k, v in trunk_state.items()}, {}, empty, empty)
    out.pop(PE_KEY)  # a bare trunk holds no prompt-encoder tensors
    out.pop(NO_MASK_KEY)
    return out


@register_backend("cpal", defaults=CPAL_DEFAULTS, size_multiple=32)
class CPAL(nn.Module):
    """The CPAL RGB-T segmentation network. Build it with ``build_model(cfg, dataset_info)``.

    ``text_embeddings`` is accepted for the common factory signature and not used.
    """

    #: one segmentation output (``logits``, the UPerHead's): CE only; no aux head, no prototype features
    loss_terms = ("ce_s0",)

    def __init__(self, cfg: dict, dataset_info: DatasetInfo, text_embeddings: torch.Tensor | None = None):
        super().__init__()
        enc_cfg = cfg["encoder"]
        base_path = enc_cfg.get("checkpoint")
        refuse_frozen_random(cfg, "models/cpal_micro.yaml", (("encoder", "freeze"),))
        self.num_classes = dataset_info.num_classes
        self.class_names = tuple(dataset_info.class_names)

        trunk = build_hiera_trunk(enc_cfg["sam2_config"], enc_cfg.get("trunk"))
        if base_path:
            self._load_trunk(trunk, base_path)
        split_fused_qkv(trunk)
        self.trunk = trunk
        self._base_tensor_ids = {id(t) for t in trunk.state_dict(keep_vars=True).values()} if base_path else set()

        ends = list(trunk.stage_ends)
        self.stage_of_block = [sum(1 for e in ends if e < i) for i in range(len(trunk.blocks))]
        dims = [trunk.blocks[e].dim_out for e in ends]

        lora_cfg = cfg["lora"]
        lora_stages = self._stage_list(lora_cfg["stages"], "lora.stages")
        self.lora_blocks = frozenset(i for i, s in enumerate(self.stage_of_block) if s + 1 in lora_stages)
        if self.lora_blocks:
            add_modality_lora(
                trunk,
                lora_cfg["rank"],
                lora_cfg["alpha"],
                lora_cfg["dropout"],
                lora_cfg["targets"],
                blocks=sorted(self.lora_blocks),
            )

        mcp_cfg = cfg["mcp"]
        mcp_stages = self._stage_list(mcp_cfg["stages"], "mcp.stages")
        self.mcp = nn.ModuleDict(
            {
                str(i): MultiModalCrossPrompter(
                    block.dim,
                    block.dim_out,
                    int(mcp_cfg["hidden"]),
                    int(mcp_cfg["groups"]),
                    stride=block.q_stride[0] if block.q_stride else 1,
                )
                for i, block in enumerate(trunk.blocks)
                if self.stage_of_block[i] + 1 in mcp_stages
            }
        )

        gpm_cfg = cfg["gpm"]
        kv_pool = list(gpm_cfg["kv_pool"])
        if len(kv_pool) != len(dims):
            raise ValueError(f"gpm.kv_pool must give one pooling factor per stage ({len(dims)}), got {kv_pool}")
        self.gpm = nn.ModuleList(
            GatedPerceptionModule(d, max(1, d // int(gpm_cfg["reduction"])), int(gpm_cfg["heads"]), p)
            for d, p in zip(dims, kv_pool)
        )
        head_cfg = cfg["head"]
        self.head = UPerHead(
            dims, int(head_cfg["channels"]), self.num_classes, tuple(head_cfg["pool_scales"]), head_cfg["dropout"]
        )
        self.set_trainable(enc_cfg["freeze"])

    @staticmethod
    def _stage_list(stages, key: str) -> set[int]:
        stages = {int(s) for s in (stages or [])}
        if not stages <= {1, 2, 3, 4}:
            raise ValueError(f"{key} lists Hiera stages 1-4 (1-based, as in the paper), got {sorted(stages)}")
        return stages

    # ------------------------------------------------------------------ weights
    @staticmethod
    def _load_trunk(trunk: nn.Module, path) -> None:
        """Load ``image_encoder.trunk.*`` of an official SAM2 file into the (still fused-qkv) trunk."""
        state = read_official_state_dict(path)
        trunk_state = {k[len(TRUNK_PREFIX) :]: v for k, v in state.items() if k.startswith(TRUNK_PREFIX)}
        if not trunk_state:
            raise ValueError(f"SAM2 checkpoint {path} has no {TRUNK_PREFIX}* keys; is it a SAM2 model file?")
        try:
            result = trunk.load_state_dict(trunk_state, strict=False)
        except RuntimeError as exc:  # shape mismatch: a checkpoint of another Hiera size
            raise ValueError(f"SAM2 checkpoint {path} does not fit the Hiera trunk: {exc}") from exc
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"SAM2 checkpoint {path} does not fit the Hiera trunk: missing {result.missing_keys[:8]}, "
                f"unexpected {result.unexpected_keys[:8]} (wrong encoder.sam2_config?)"
            )

    def set_trainable(self, freeze_encoder: bool, freeze_transformer: bool | None = None) -> None:
        """Freeze the trunk (its LoRA stays trainable); MCP, GPM and head train.

        ``freeze_transformer`` is accepted for the common signature (CPAL has no SAM2 decoder).
        """
        for name, p in self.trunk.named_parameters():
            p.requires_grad_(".lora_" in name or not freeze_encoder)
        for module in (self.mcp, self.gpm, self.head):
            for p in module.parameters():
                p.requires_grad_(True)

    # Same bookkeeping as SARTM: base tensors are tracked by identity.
    frozen_base_state_keys = SARTM.frozen_base_state_keys
    parameter_counts = SARTM.parameter_counts

    def sam2_state_dict(self) -> dict[str, torch.Tensor]:
        """The trunk's base weights in the official SAM2 key layout (``image_encoder.trunk.*``, fused qkv)."""
        return trunk_to_official(self.trunk.state_dict())

    # ------------------------------------------------------------------ forward
    def _lora_attention(self, block: nn.Module, x_rgb: torch.Tensor, x_th: torch.Tensor):
        """The attention half of a LoRA block: one pass per stream with that modality's adapter."""
        activate_adapter(block, MODALITY_ADAPTERS[0])
        a = attention_sublayer(block, x_rgb)
        activate_adapter(block, MODALITY_ADAPTERS[1])
        b = attention_sublayer(block, x_th)
        return a, b

    def streams(self, rgb: torch.Tensor, thermal3: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The two streams' stage outputs ``[(T_RGB, T_A)]`` as (B, C, h, w), stages 1-4."""
        trunk = self.trunk
        x = trunk.patch_embed(torch.cat([rgb, thermal3]))
        x = x + trunk._get_pos_embed(x.shape[1:3])
        x_rgb, x_th = x.chunk(2)
        stages = []
        for i, block in enumerate(trunk.blocks):
            attention = self._lora_attention if i in self.lora_blocks else None
            mcp = self.mcp[str(i)] if str(i) in self.mcp else None
            x_rgb, x_th = dual_stream_block(block, mcp, x_rgb, x_th, attention)
            if i in trunk.stage_ends:
                stages.append((x_rgb.permute(0, 3, 1, 2), x_th.permute(0, 3, 1, 2)))
        return stages

    def forward(self, rgb: torch.Tensor, thermal: torch.Tensor, valid: torch.Tensor | None = None) -> dict:
        """Segment a batch of registered RGB-T pairs -> ``{"logits": (B, C, H, W)}``."""
        check_rgbt_inputs(rgb, thermal, valid, "CPAL")
        h, w = rgb.shape[-2:]
        if valid is not None:
            valid = valid.to(thermal.dtype)
            thermal = thermal * valid
        merged = []
        for gpm, (t_rgb, t_th) in zip(self.gpm, self.streams(rgb, thermal.expand(-1, 3, -1, -1))):
            m = None if valid is None else F.interpolate(valid, size=t_rgb.shape[-2:], mode="area").to(t_rgb.dtype)
            merged.append(gpm(t_rgb, t_th, m))
        logits = F.interpolate(self.head(merged), size=(h, w), mode="bilinear", align_corners=False)
        return {"logits": logits}

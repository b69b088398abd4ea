"""SARTM backend: SAM2 Hiera with per-modality LoRA, FRM/FFM fusion, language guidance, two heads.

Data flow for an RGB-T pair (paper section III, "SARTM"):

1. Each modality runs through the same SAM2 image encoder (Hiera trunk + FpnNeck) with its own
   LoRA adapter on every block's query and value projections (two forward passes). Thermal
   (B, 1, H, W) is repeated to 3 channels.
2. Per modality, three maps: SFM (stride 16, d channels), IFP (stride 8, d/4) and FFP
   (stride 4, d/8); IFP and FFP come from SAM2's own 1x1 ``conv_s1``/``conv_s0``.
3. At each level, FRM rectifies and FFM fuses the two modalities (CMX), and a language-guided
   channel attention weights the fused map with the class-name text embeddings (a buffer). With
   ``fusion.identity_init`` (every config in models/) the three start as the identity on the RGB
   stream: a fresh model on official weights hands the decoder SAM2's own image embedding.
4. Path 1 (S0): SAM2's mask decoder on the fused SFM, refined with the fused IFP and FFP
   (eq. 9), one mask token per class. Path 2 (S1): the auxiliary FPN head (eq. 10).
5. ``logits`` = the configured combination of S0 and S1, upsampled to the input size.

Thermal validity: ``valid`` (B, 1, H, W) in {0, 1} marks RGB pixels the thermal camera sees.
Thermal input is zeroed where ``valid`` is 0, and the mask, area-downsampled to each level,
multiplies the thermal features inside FRM and FFM, so unseen thermal pixels contribute
nothing.

Weights: with ``encoder.checkpoint`` (an official ``sam2.1_hiera_*.pt``) the encoder, the
decoder's transformer and the prompt-side tensors are loaded from it and frozen
(``encoder.freeze``, ``decoder.freeze_transformer``); LoRA, conv_s0/s1, the decoder's
upscaling, mask tokens and hypernetworks, fusion, language and auxiliary head train. Without
base weights (tests, the synthetic demo) the config must let the encoder and the
transformer train: a frozen random network is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .classes import DatasetInfo
from .fusion import FeatureFusionModule, FeatureRectifyModule, LanguageGuidedChannelAttention
from .heads import AuxiliaryFPNHead, SAM2MaskDecoderHead
from .lora import MODALITY_ADAPTERS, activate_adapter, add_modality_lora, modality_batch
from .registry import DEFAULT_RECIPE, check_rgbt_inputs, refuse_frozen_random, register_backend
from .sam2_checkpoint import (
    DECODER_SHARED_PARTS,
    Sam2Parts,
    official_to_parts,
    parts_to_official,
    read_official_state_dict,
)
from .sam2_encoder import build_image_encoder

SARTM_DEFAULTS = {
    "encoder": {
        "sam2_config": "hiera_tiny",  # alias or path under sam2/configs
        "trunk": {},  # Hiera overrides (small test models)
        "neck": {},  # FpnNeck overrides (d_model, backbone_channel_list)
        "checkpoint": None,  # official SAM2 weights (.pt, state dict under "model") or .safetensors
        "freeze": True,
    },
    # batched_inference: in eval mode both modalities go through the trunk as one batch, each half
    # with its own LoRA merged into a fused qkv weight (lora.modality_batch); false: two passes.
    "lora": {"rank": 16, "alpha": 16.0, "dropout": 0.0, "targets": ["q", "v"], "batched_inference": True},
    "decoder": {"depth": 2, "mlp_dim": 2048, "num_heads": 8, "freeze_transformer": True},
    # identity_init: FRM, FFM and the language weighting start as the identity on the RGB stream (zero-init
    # gates), so a fresh model hands SAM2's decoder SAM2's own embedding. Every config in models/ sets it;
    # false (CMX's mixing from step 0) is what checkpoints written before the key existed were trained with.
    "fusion": {"heads": [1, 2, 8], "reduction": 1, "lambda_c": 0.5, "lambda_s": 0.5, "identity_init": False},
    "language": {"enabled": True, "text_dim": 384, "hidden": 64, "text_encoder": "minilm"},
    "aux_head": {"channels": 64},
    "output": {"combine": "mean", "s1_weight": 0.5},
    # The paper's training (section IV-A): AdamW lr 1e-4, weight decay 0.01, poly decay, OHEM cross-entropy.
    "recipe": dict(DEFAULT_RECIPE),
}

LEVELS = ("ffp", "ifp", "sfm")  # strides 4, 8, 16
COMBINE_MODES = ("s0", "s1", "mean")


@register_backend("sartm", defaults=SARTM_DEFAULTS, size_multiple=32)
class SARTM(nn.Module):
    """The SARTM RGB-T segmentation network. Build it with ``build_model(cfg, dataset_info, text)``.

    ``text_embeddings`` (num_classes, language.text_dim) become the ``text_embeddings`` buffer;
    None gives a zero buffer, which ``load_checkpoint`` overwrites with the saved one (the
    trainer and ``Segmenter.from_config`` compute real ones with ``models/text_teacher.py``).
    """

    def __init__(self, cfg: dict, dataset_info: DatasetInfo, text_embeddings: torch.Tensor | None = None):
        super().__init__()
        enc_cfg, dec_cfg, out_cfg = cfg["encoder"], cfg["decoder"], cfg["output"]
        if out_cfg["combine"] not in COMBINE_MODES:
            raise ValueError(f"output.combine must be one of {', '.join(COMBINE_MODES)}, got {out_cfg['combine']!r}")
        base_path = enc_cfg.get("checkpoint")
        refuse_frozen_random(cfg, "models/sartm_micro.yaml", (("encoder", "freeze"), ("decoder", "freeze_transformer")))
        self.num_classes = dataset_info.num_classes
        self.class_names = tuple(dataset_info.class_names)
        self.combine = out_cfg["combine"]
        self.s1_weight = float(out_cfg["s1_weight"])

        self.image_encoder = build_image_encoder(enc_cfg["sam2_config"], enc_cfg.get("trunk"), enc_cfg.get("neck"))
        d = self.image_encoder.neck.d_model
        self.dims = (d // 8, d // 4, d)
        self.sam_head = SAM2MaskDecoderHead(
            d, self.num_classes, depth=dec_cfg["depth"], mlp_dim=dec_cfg["mlp_dim"], num_heads=dec_cfg["num_heads"]
        )
        self._base_tensor_ids: set[int] = set()
        if base_path:
            self._load_base(official_to_parts(read_official_state_dict(base_path), source=str(base_path)), base_path)

        lora_cfg = cfg["lora"]
        self.batched_inference = bool(lora_cfg["batched_inference"])
        add_modality_lora(
            self.image_encoder.trunk, lora_cfg["rank"], lora_cfg["alpha"], lora_cfg["dropout"], lora_cfg["targets"]
        )

        fus = cfg["fusion"]
        heads = list(fus["heads"])
        if len(heads) != 3:
            raise ValueError(f"fusion.heads must give 3 head counts (FFP, IFP, SFM), got {heads}")
        identity = bool(fus["identity_init"])
        self.rectify = nn.ModuleList(
            FeatureRectifyModule(c, fus["reduction"], fus["lambda_c"], fus["lambda_s"], identity) for c in self.dims
        )
        self.fuse = nn.ModuleList(
            FeatureFusionModule(c, h, fus["reduction"], identity) for c, h in zip(self.dims, heads)
        )

        lang = cfg["language"]
        self.use_language = bool(lang["enabled"])
        text_dim = int(lang["text_dim"])
        if text_embeddings is None:
            text_embeddings = torch.zeros(self.num_classes, text_dim)
        text_embeddings = torch.as_tensor(text_embeddings, dtype=torch.float32)
        if tuple(text_embeddings.shape) != (self.num_classes, text_dim):
            raise ValueError(
                f"text_embeddings must be (num_classes={self.num_classes}, language.text_dim={text_dim}), "
                f"got {tuple(text_embeddings.shape)}"
            )
        self.register_buffer("text_embeddings", text_embeddings.clone())
        self.language = (
            nn.ModuleList(LanguageGuidedChannelAttention(c, text_dim, lang["hidden"], identity) for c in self.dims)
            if self.use_language
            else None
        )
        self.aux_head = AuxiliaryFPNHead(self.dims, cfg["aux_head"]["channels"], self.num_classes)
        self.set_trainable(enc_cfg["freeze"], dec_cfg["freeze_transformer"])

    # ------------------------------------------------------------------ weights
    def _load_base(self, parts: Sam2Parts, source) -> None:
        """Copy the SAM2 parts into the encoder, decoder transformer and prompt-side tensors."""
        try:
            result = self.image_encoder.load_state_dict(parts.image_encoder, strict=False)
        except RuntimeError as exc:  # shape mismatch: usually a checkpoint of another Hiera size
            raise ValueError(f"SAM2 checkpoint {source} does not fit encoder '{self._encoder_name()}': {exc}") from exc
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"SAM2 checkpoint {source} does not fit the image encoder: missing {result.missing_keys[:8]}, "
                f"unexpected {result.unexpected_keys[:8]} (wrong encoder.sam2_config?)"
            )
        dec = self.sam_head.mask_decoder
        wanted = {k for k in dec.state_dict() if k.startswith(DECODER_SHARED_PARTS)}
        missing = sorted(wanted - set(parts.mask_decoder))
        unexpected = sorted(set(parts.mask_decoder) - wanted)
        if missing or unexpected:
            raise ValueError(
                f"SAM2 checkpoint {source} does not fit the mask decoder: "
                f"missing {missing[:8]}, unexpected {unexpected[:8]}"
            )
        try:
            dec.load_state_dict(parts.mask_decoder, strict=False)
            self.sam_head.pe_layer.positional_encoding_gaussian_matrix.copy_(parts.pe_gaussian)
            with torch.no_grad():
                self.sam_head.no_mask_embed.weight.copy_(parts.no_mask_embed)
                if parts.no_mem_embed is not None:  # absent: stays zero (see sam2_checkpoint.py)
                    self.sam_head.no_mem_embed.copy_(parts.no_mem_embed)
        except RuntimeError as exc:
            raise ValueError(f"SAM2 checkpoint {source} does not fit the mask decoder: {exc}") from exc
        loaded = dict(self.image_encoder.named_parameters()) | dict(self.image_encoder.named_buffers())
        tensors = [loaded[k] for k in parts.image_encoder]
        dec_all = dict(dec.named_parameters()) | dict(dec.named_buffers())
        tensors += [dec_all[k] for k in parts.mask_decoder]
        tensors += [self.sam_head.pe_layer.positional_encoding_gaussian_matrix, self.sam_head.no_mask_embed.weight]
        tensors.append(self.sam_head.no_mem_embed)
        self._base_tensor_ids = {id(t) for t in tensors}

    def _encoder_name(self) -> str:
        return type(self.image_encoder.trunk).__name__

    def set_trainable(self, freeze_encoder: bool, freeze_transformer: bool) -> None:
        """Freeze the encoder (LoRA stays trainable) and/or the decoder transformer; the rest trains."""
        for p in self.image_encoder.parameters():
            p.requires_grad_(not freeze_encoder)
        for name, p in self.image_encoder.named_parameters():
            if ".lora_" in name:
                p.requires_grad_(True)
        dec = self.sam_head.mask_decoder
        for module in (dec.transformer, dec.iou_token, self.sam_head.no_mask_embed):
            for p in module.parameters():
                p.requires_grad_(not freeze_transformer)
        self.sam_head.no_mem_embed.requires_grad_(not freeze_transformer)  # what the decoder was trained with
        # The IoU head's output is not used for semantic segmentation: it gets no gradient.
        for p in dec.iou_prediction_head.parameters():
            p.requires_grad_(False)

    def frozen_base_state_keys(self) -> list[str]:
        """State-dict keys whose tensors come from the SAM2 base checkpoint and stay frozen.

        A trained checkpoint stores everything else; these come from the base weights file.
        """
        keys = []
        for name, tensor in self.state_dict(keep_vars=True).items():
            if id(tensor) in self._base_tensor_ids and not tensor.requires_grad:
                keys.append(name)
        return keys

    def sam2_state_dict(self) -> dict[str, torch.Tensor]:
        """The SAM2 parts of this model (encoder, decoder transformer, prompt tensors) in the
        official SAM2 key layout, as ``read_official_state_dict`` reads them back."""
        dec_state = self.sam_head.mask_decoder.state_dict()
        return parts_to_official(
            self.image_encoder.state_dict(),
            {k: v for k, v in dec_state.items() if k.startswith(DECODER_SHARED_PARTS)},
            self.sam_head.pe_layer.positional_encoding_gaussian_matrix,
            self.sam_head.no_mask_embed.weight,
            self.sam_head.no_mem_embed,
        )

    def set_text_embeddings(self, text_embeddings: torch.Tensor) -> None:
        """Replace the class-name embedding buffer (num_classes, text_dim)."""
        t = torch.as_tensor(text_embeddings, dtype=self.text_embeddings.dtype, device=self.text_embeddings.device)
        if t.shape != self.text_embeddings.shape:
            raise ValueError(f"text_embeddings must be {tuple(self.text_embeddings.shape)}, got {tuple(t.shape)}")
        self.text_embeddings.copy_(t)

    def parameter_counts(self) -> dict[str, int]:
        """Total and trainable parameter counts (both LoRA adapters included)."""
        params = list(self.parameters())
        return {
            "total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "lora": sum(p.numel() for n, p in self.named_parameters() if ".lora_" in n),
        }

    # ------------------------------------------------------------------ forward
    def _encode(self, image: torch.Tensor, adapter: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        activate_adapter(self.image_encoder.trunk, adapter)
        fpn = self.image_encoder(image)["backbone_fpn"]
        return self.sam_head.pyramid(fpn)

    def forward(self, rgb: torch.Tensor, thermal: torch.Tensor, valid: torch.Tensor | None = None) -> dict:
        """Segment a batch of registered RGB-T pairs.

        Returns ``logits`` (B, C, H, W) at input size, ``s0`` and ``s1`` (B, C, H/4, W/4) for the
        two losses, ``features`` {ffp, ifp, sfm} (fused maps, for L_cr / L_se),
        ``features_rgb`` / ``features_thermal`` {ffp, ifp, sfm} (each modality's map after FRM
        rectification, before fusion: the cross-modal L_cr compares their class prototypes) and
        ``text_embeddings`` (C, D).
        """
        check_rgbt_inputs(rgb, thermal, valid, "SARTM")
        h, w = rgb.shape[-2:]
        if valid is not None:
            valid = valid.to(thermal.dtype)
            thermal = thermal * valid
        thermal3 = thermal.expand(-1, 3, -1, -1)
        if self.batched_inference and not self.training:
            # one trunk pass over [rgb; thermal], each half with its own LoRA (same maths as two passes)
            with modality_batch(self.image_encoder.trunk, MODALITY_ADAPTERS):
                fpn = self.image_encoder(torch.cat([rgb, thermal3.to(rgb.dtype)], dim=0))["backbone_fpn"]
            both = self.sam_head.pyramid(fpn)
            b = rgb.shape[0]
            feats_rgb = tuple(f[:b] for f in both)
            feats_th = tuple(f[b:] for f in both)
        else:
            feats_rgb = self._encode(rgb, MODALITY_ADAPTERS[0])
            feats_th = self._encode(thermal3, MODALITY_ADAPTERS[1])

        fused, rect_rgb, rect_th = [], [], []
        for level, (f_rgb, f_th) in enumerate(zip(feats_rgb, feats_th)):
            m = None if valid is None else F.interpolate(valid, size=f_rgb.shape[-2:], mode="area").to(f_rgb.dtype)
            f_rgb, f_th = self.rectify[level](f_rgb, f_th, m)
            rect_rgb.append(f_rgb)
            rect_th.append(f_th)
            f = self.fuse[level](f_rgb, f_th, m)
            if self.language is not None:
                f = self.language[level](f, self.text_embeddings)
            fused.append(f)
        ffp, ifp, sfm = fused

        s0 = self.sam_head(sfm, ifp, ffp)
        s1 = self.aux_head(ffp, ifp, sfm)
        if self.combine == "s0":
            combined = s0
        elif self.combine == "s1":
            combined = s1
        else:
            combined = (1.0 - self.s1_weight) * s0 + self.s1_weight * s1
        logits = F.interpolate(combined, size=(h, w), mode="bilinear", align_corners=False)
        return {
            "logits": logits,
            "s0": s0,
            "s1": s1,
            "features": dict(zip(LEVELS, fused)),
            "features_rgb": dict(zip(LEVELS, rect_rgb)),
            "features_thermal": dict(zip(LEVELS, rect_th)),
            # No language module, no text teacher: the loss then skips L_se instead of training
            # against the all-zero placeholder buffer.
            "text_embeddings": self.text_embeddings if self.use_language else None,
        }

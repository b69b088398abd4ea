"""FusionSAM backend: VQ latent tokens per modality (LSTG), their fusion (FMP) as SAM2's dense prompt.

Paper: "FusionSAM: Visual Multi-Modal Learning with Segment Anything Model" (KDD 2025), on SAM2
(the paper used SAM ViT-H) with the blocks of ``vq.py`` and ``fusionsam_blocks.py``.

Data flow for an RGB-T pair:

1. **Image features.** RGB goes through the frozen SAM2 image encoder (Hiera + FpnNeck), once.
   The paper feeds "the fused image" to the encoder and also uses the fusion as the prompt;
   here the encoder sees the RGB image (one encoder pass, and the frozen encoder sees the
   kind of image it was trained on) and thermal reaches the model through LSTG/FMP and the
   dense prompt only.
2. **LSTG** (eq. 2-6): one VQ autoencoder per modality compresses its image by
   ``lstg.downsample`` (4 in the paper) to a latent grid and quantises it with its own codebook
   (straight-through gradient). Its decoder reconstructs the image for the reconstruction loss.
3. **FMP** (Algorithm 1, eq. 9-12): windowed self-attention per modality, bidirectional
   cross-attention with LayerNorm residuals, the fusion conv, the complementary cross conv:
   the fusion mask I_f on the latent grid.
4. **Prompt.** :class:`FusionMaskEncoder` downscales I_f to the stride-16 grid like SAM's mask
   prompt path; the result is the **dense prompt** of SAM2's mask decoder (in place of the
   ``no_mask_embed`` a prompt-free decoder uses). There are no sparse prompts: the paper's point
   prompts sampled from the fusion map are not used.
5. **Decoder and classification head.** SAM2's mask decoder (two-way transformer, upscaling with
   the encoder's stride-8/4 features) with one mask token per class; each class's output token
   goes through its own hypernetwork MLP whose output weights the upscaled embedding: these
   per-class MLPs are the "MLP classification head", giving (B, C, H/4, W/4) logits, upsampled
   to the input size as ``logits``.

Trained: LSTG, FMP, the prompt encoder and the mask decoder (the paper trains "all parts except
the image encoder"; ``decoder.freeze_transformer: true`` freezes the two-way transformer as
SARTM does). The IoU head and ``no_mask_embed`` are unused and frozen.

Losses: in training mode the output carries ``aux_losses`` (already weighted scalars):
``lstg_rec`` (eq. 5, both modalities; thermal over valid pixels), ``lstg_commit`` (eq. 6),
and, when their weights are > 0, ``lstg_perceptual`` (eq. 7, features of the frozen SAM2
trunk's first stage) and ``lstg_adv_d`` / ``lstg_adv_g`` (eq. 8, PatchGAN, see ``vq.py``).
The trainer adds them to the segmentation loss on ``logits``. In eval mode the LSTG decoders
do not run and ``aux_losses`` is absent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..classes import DatasetInfo
from .fusionsam_blocks import FusionMaskEncoder, FusionMaskPrompting
from .heads import SAM2MaskDecoderHead
from .registry import check_rgbt_inputs, refuse_frozen_random, register_backend
from .sam2_checkpoint import official_to_parts, read_official_state_dict
from .sam2_encoder import build_image_encoder
from .sartm import SARTM
from .vq import PatchDiscriminator, VQAutoencoder, masked_mse

FUSIONSAM_DEFAULTS = {
    "encoder": {
        "sam2_config": "hiera_tiny",
        "trunk": {},
        "neck": {},
        "checkpoint": None,
        "freeze": True,
    },
    "decoder": {"depth": 2, "mlp_dim": 2048, "num_heads": 8, "freeze_transformer": False},
    "lstg": {
        "downsample": 4,  # s: latent grid = input / s
        "hidden": 64,  # encoder/decoder width at the latent grid
        "latent_dim": 64,  # d_c
        "codebook_size": 1024,
        "beta": 0.25,  # commitment weight inside eq. 6
        "rec_weight": 1.0,
        "commit_weight": 1.0,
        "perceptual_weight": 0.0,  # eq. 7, off by default
        "adversarial_weight": 0.0,  # eq. 8, off by default
        "disc_channels": 32,
    },
    "fmp": {"heads": 4, "window": 8, "mlp_ratio": 2.0},
}

MODALITIES = ("rgb", "thermal")


@register_backend("fusionsam", defaults=FUSIONSAM_DEFAULTS, size_multiple=32)
class FusionSAM(nn.Module):
    """The FusionSAM RGB-T segmentation network. Build it with ``build_model(cfg, dataset_info)``.

    ``text_embeddings`` is accepted for the common factory signature and not used.
    """

    #: one segmentation output (``logits``): CE only; the LSTG losses come in ``aux_losses``
    loss_terms = ("ce_s0",)

    def __init__(self, cfg: dict, dataset_info: DatasetInfo, text_embeddings: torch.Tensor | None = None):
        super().__init__()
        enc_cfg, dec_cfg, lstg = cfg["encoder"], cfg["decoder"], cfg["lstg"]
        base_path = enc_cfg.get("checkpoint")
        refuse_frozen_random(
            cfg, "models/fusionsam_micro.yaml", (("encoder", "freeze"), ("decoder", "freeze_transformer"))
        )
        self.num_classes = dataset_info.num_classes
        self.class_names = tuple(dataset_info.class_names)

        self.image_encoder = build_image_encoder(enc_cfg["sam2_config"], enc_cfg.get("trunk"), enc_cfg.get("neck"))
        d = self.image_encoder.neck.d_model
        self.sam_head = SAM2MaskDecoderHead(
            d, self.num_classes, depth=dec_cfg["depth"], mlp_dim=dec_cfg["mlp_dim"], num_heads=dec_cfg["num_heads"]
        )
        self._base_tensor_ids: set[int] = set()
        if base_path:
            self._load_base(official_to_parts(read_official_state_dict(base_path), source=str(base_path)), base_path)

        s, latent = int(lstg["downsample"]), int(lstg["latent_dim"])
        if s > 16:
            raise ValueError(f"lstg.downsample must be <= 16 (the SAM2 feature stride), got {s}")
        self.lstg = nn.ModuleDict(
            {
                m: VQAutoencoder(c, int(lstg["hidden"]), latent, int(lstg["codebook_size"]), s, float(lstg["beta"]))
                for m, c in zip(MODALITIES, (3, 1))
            }
        )
        fmp = cfg["fmp"]
        self.fmp = FusionMaskPrompting(latent, int(fmp["heads"]), int(fmp["window"]), float(fmp["mlp_ratio"]))
        self.prompt_encoder = FusionMaskEncoder(latent, d, s)
        self.loss_weights = {k: float(lstg[f"{k}_weight"]) for k in ("rec", "commit", "perceptual", "adversarial")}
        if any(w < 0 for w in self.loss_weights.values()):
            raise ValueError(f"lstg loss weights must be >= 0, got {self.loss_weights}")
        self.discriminators = (
            nn.ModuleDict({m: PatchDiscriminator(c, int(lstg["disc_channels"])) for m, c in zip(MODALITIES, (3, 1))})
            if self.loss_weights["adversarial"] > 0
            else None
        )
        self.set_trainable(enc_cfg["freeze"], dec_cfg["freeze_transformer"])

    # ------------------------------------------------------------------ weights (shared with SARTM)
    _load_base = SARTM._load_base
    _encoder_name = SARTM._encoder_name
    frozen_base_state_keys = SARTM.frozen_base_state_keys
    sam2_state_dict = SARTM.sam2_state_dict
    parameter_counts = SARTM.parameter_counts

    def set_trainable(self, freeze_encoder: bool, freeze_transformer: bool) -> None:
        """Freeze the SAM2 encoder and/or the decoder's transformer; LSTG, FMP, prompt and the rest train."""
        for p in self.parameters():
            p.requires_grad_(True)
        for p in self.image_encoder.parameters():
            p.requires_grad_(not freeze_encoder)
        dec = self.sam_head.mask_decoder
        for module in (dec.transformer, dec.iou_token):
            for p in module.parameters():
                p.requires_grad_(not freeze_transformer)
        # Unused here: the IoU head's output and the no-mask embedding (the fusion mask is the dense prompt).
        for p in list(dec.iou_prediction_head.parameters()) + list(self.sam_head.no_mask_embed.parameters()):
            p.requires_grad_(False)

    # ------------------------------------------------------------------ forward
    def _perceptual_features(self, image: torch.Tensor) -> torch.Tensor:
        """Phi of eq. 7: the SAM2 trunk's patch embedding and first stage (frozen in production)."""
        trunk = self.image_encoder.trunk
        x = trunk.patch_embed(image.expand(-1, 3, -1, -1))
        x = x + trunk._get_pos_embed(x.shape[1:3])
        for block in trunk.blocks[: trunk.stage_ends[0] + 1]:
            x = block(x)
        return x

    def _lstg_losses(self, images: dict, latents: dict, commits: dict, valid: torch.Tensor | None) -> dict:
        w = self.loss_weights
        rec, perc, adv_d, adv_g = [], [], [], []
        for m in MODALITIES:
            recon = self.lstg[m].decode(latents[m])
            mask = valid if m == "thermal" else None
            rec.append(masked_mse(recon, images[m], mask))
            if w["perceptual"] > 0:
                with torch.no_grad():
                    target = self._perceptual_features(images[m])
                perc.append(F.mse_loss(self._perceptual_features(recon), target))
            if self.discriminators is not None:
                d_loss, g_loss = self.discriminators[m].losses(images[m], recon)
                adv_d.append(d_loss)
                adv_g.append(g_loss)
        losses = {
            "lstg_rec": w["rec"] * sum(rec),
            "lstg_commit": w["commit"] * sum(commits.values()),
        }
        if perc:
            losses["lstg_perceptual"] = w["perceptual"] * sum(perc)
        if adv_d:
            losses["lstg_adv_d"] = w["adversarial"] * sum(adv_d)
            losses["lstg_adv_g"] = w["adversarial"] * sum(adv_g)
        return losses

    def forward(self, rgb: torch.Tensor, thermal: torch.Tensor, valid: torch.Tensor | None = None) -> dict:
        """Segment a batch of registered RGB-T pairs.

        Returns ``logits`` (B, C, H, W), ``fusion_mask`` (B, d_c, H/s, W/s), ``codes`` {rgb, thermal}
        (codebook indices, for usage statistics) and, in training mode, ``aux_losses``.
        """
        check_rgbt_inputs(rgb, thermal, valid, "FusionSAM")
        h, w = rgb.shape[-2:]
        if valid is not None:
            valid = valid.to(thermal.dtype)
            thermal = thermal * valid
        ffp, ifp, sfm = self.sam_head.pyramid(self.image_encoder(rgb)["backbone_fpn"])

        images = {"rgb": rgb, "thermal": thermal}
        latents, codes, commits = {}, {}, {}
        for m in MODALITIES:
            latents[m], codes[m], commits[m] = self.lstg[m].encode(images[m])
        z_th = latents["thermal"]
        if valid is not None:
            z_th = z_th * F.interpolate(valid, size=z_th.shape[-2:], mode="area")
        fusion_mask = self.fmp(latents["rgb"], z_th)
        dense = self.prompt_encoder(fusion_mask, sfm.shape[-2:])
        masks = self.sam_head(sfm, ifp, ffp, dense=dense)
        out = {
            "logits": F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False),
            "fusion_mask": fusion_mask,
            "codes": codes,
        }
        if self.training:
            out["aux_losses"] = self._lstg_losses(images, latents, commits, valid)
        return out

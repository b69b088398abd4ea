"""FusionSAM backend: VQ latent tokens in one shared codebook (LSTG), their fusion (FMP) prompting SAM2.

Paper: "FusionSAM: Visual Multi-Modal Learning with Segment Anything Model" (KDD 2025), on SAM2
(the paper used SAM ViT-H) with the blocks of ``vq.py`` and ``fusionsam_blocks.py``.

Data flow for an RGB-T pair:

1. **LSTG** (eq. 2-6): one conv encoder per modality compresses its image by ``lstg.downsample``
   (s = 4 in the paper) to a latent grid; both grids are quantised against ONE shared codebook C
   (eq. 3, straight-through gradient). Each modality's latents are first put on a common scale
   (per-modality running standardisation, ``lstg.standardize``), so neither modality's tokens
   crowd onto a few codes because its encoder's outputs are smaller or offset. The codebook
   follows the standardised tokens by EMA, starts from k-means on the first training batch and
   restarts codes that fall out of use at tokens of the modality with the lower code perplexity
   (``lstg.restart_from``; see ``vq.py``). Each modality's decoder reconstructs its image for
   the reconstruction loss.
2. **FMP** (Algorithm 1, eq. 9-12): windowed self-attention per modality, bidirectional
   cross-attention in windows shifted by half a window (``fmp.shift``, Swin/SwinFusion), with
   LayerNorm residuals, the fusion conv, the complementary cross conv: the fusion mask I_f on
   the latent grid (``fusion_mask``).
3. **Image encoder** (section 3.2.3: I_f "is fed into the original SAM framework's image
   encoder"): the SAM2 encoder (Hiera + FpnNeck, frozen with official weights) runs once on the
   RGB image with a learned projection of I_f added to its patch tokens (stride 4, the latent
   grid of s = 4; resized otherwise). The projection starts at zero, so an untrained model's
   encoder sees exactly the RGB image that official SAM2 weights were trained on, and training
   decides how much of the fused representation enters. Interpretation: the paper gives no
   operator that turns a d_c-channel latent map into an image for the encoder; injecting it as
   patch tokens keeps the frozen encoder's input statistics and costs no second encoder pass.
   The gradient reaches the projection through the (frozen) encoder blocks.
4. **Prompts.** I_f, downscaled to the stride-16 grid like SAM's mask-prompt path, is the
   **dense prompt** of SAM2's mask decoder (in place of ``no_mask_embed``). The **fusion point
   prompts** (Figure 2's Fusion Point Prompt Encoder) are the ``prompt.points`` best local
   maxima of a learned 1x1 score of I_f, encoded like SAM's positive points (the decoder's
   random-Fourier positional encoding of the point + a point embedding, initialised from the
   official positive-point embedding when base weights are given) plus the I_f vector at the
   point; they enter the decoder as sparse prompt tokens.
5. **Decoder and classification head.** SAM2's mask decoder (two-way transformer, upscaling with
   the encoder's stride-8/4 features) with one mask token per class; each class's output token
   goes through its own hypernetwork MLP whose output weights the upscaled embedding: these
   per-class MLPs are the "MLP classification head", giving (B, C, H/4, W/4) logits, upsampled
   to the input size as ``logits``. The paper's "full-fledged output tokens" are read as these
   mask tokens (no further tokens are added).

Trained: LSTG, FMP, the prompt encoder (encoder-input projection, dense path, point prompts) and
the mask decoder (the paper trains "all parts except the image encoder";
``decoder.freeze_transformer: true`` freezes the two-way transformer as SARTM does). The IoU
head and ``no_mask_embed`` are unused and frozen; other embeddings the head adds to the image
embedding (SAM2's ``no_mem_embed``) train only when the encoder does.

Losses: in training mode the output carries ``aux_losses`` (already weighted scalars):
``lstg_rec`` (eq. 5, both modalities; thermal over valid pixels), ``lstg_commit`` (eq. 6 summed
over the modalities; with the EMA codebook its gradient is the commitment term), and, when their
weights are > 0, ``lstg_perceptual`` (eq. 7, features of the frozen SAM2 trunk's first stage) and
``lstg_adv_d`` / ``lstg_adv_g`` (eq. 8, PatchGAN, see ``vq.py``). The trainer adds them to the
segmentation loss on ``logits``. In eval mode the LSTG decoders do not run and ``aux_losses`` is
absent. ``codebook`` reports the batch's code ``perplexity`` and ``usage`` (fraction of codes
used), the same per modality (``perplexity_rgb``, ``usage_thermal``, ...) and, in training, the
number of ``restarted`` codes; the trainer logs them all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .classes import DatasetInfo
from .fusionsam_blocks import FusionMaskPrompting, FusionPromptEncoder
from .heads import SAM2MaskDecoderHead
from .registry import check_rgbt_inputs, recipe, refuse_frozen_random, register_backend
from .sam2_checkpoint import official_to_parts, read_official_state_dict
from .sam2_encoder import build_image_encoder
from .sartm import SARTM
from .vq import LatentSpaceTokenGenerator, PatchDiscriminator, masked_mse

#: SAM2's positive-point embedding, the initial value of the fusion point prompts' point embedding.
POSITIVE_POINT_KEY = "sam_prompt_encoder.point_embeddings.1.weight"

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
        "codebook_size": 1024,  # ONE codebook shared by both modalities (eq. 3's C)
        "beta": 0.25,  # commitment weight inside eq. 6
        "ema_decay": 0.99,  # codebook EMA decay
        "dead_code_threshold": 1.0,  # restart a code whose EMA assignment count per batch is below this
        "kmeans_iters": 10,  # k-means initialisation on the first training batch (0 = off)
        "standardize": True,  # per-modality running standardisation before the shared codebook
        "restart_from": "underserved",  # dead codes restart at the under-served modality's tokens ("batch": any)
        "rec_weight": 1.0,
        "commit_weight": 1.0,
        "perceptual_weight": 0.0,  # eq. 7, off by default
        "adversarial_weight": 0.0,  # eq. 8, off by default
        "disc_channels": 32,
    },
    "fmp": {"heads": 4, "window": 8, "mlp_ratio": 2.0, "shift": True},  # shift: the cross-attention's windows by half
    "prompt": {
        "encoder_input": True,  # section 3.2.3: I_f reaches the image encoder (added to its patch tokens)
        "points": 8,  # fusion point prompts per image (0 = none)
    },
    # The paper's training (section 4.1): Adam lr 1e-4, weight decay 1e-3, constant lr, cross-entropy.
    "recipe": recipe("FusionSAM paper", "adam", 1.0e-4, 1.0e-3, 0.0, "ce"),
}

MODALITIES = ("rgb", "thermal")
CHANNELS = {"rgb": 3, "thermal": 1}


@register_backend("fusionsam", defaults=FUSIONSAM_DEFAULTS, size_multiple=32)
class FusionSAM(nn.Module):
    """The FusionSAM RGB-T segmentation network. Build it with ``build_model(cfg, dataset_info)``.

    ``text_embeddings`` is accepted for the common factory signature and not used.
    """

    #: one segmentation output (``logits``): CE only; the LSTG losses come in ``aux_losses``
    loss_terms = ("ce_s0",)

    def __init__(self, cfg: dict, dataset_info: DatasetInfo, text_embeddings: torch.Tensor | None = None):
        super().__init__()
        enc_cfg, dec_cfg, lstg, prompt = cfg["encoder"], cfg["decoder"], cfg["lstg"], cfg["prompt"]
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
        official = read_official_state_dict(base_path) if base_path else None
        if official is not None:
            self._load_base(official_to_parts(official, source=str(base_path)), base_path)

        s, latent = int(lstg["downsample"]), int(lstg["latent_dim"])
        if s > 16:
            raise ValueError(f"lstg.downsample must be <= 16 (the SAM2 feature stride), got {s}")
        self.lstg = LatentSpaceTokenGenerator(
            CHANNELS,
            int(lstg["hidden"]),
            latent,
            int(lstg["codebook_size"]),
            s,
            float(lstg["beta"]),
            float(lstg["ema_decay"]),
            float(lstg["dead_code_threshold"]),
            int(lstg["kmeans_iters"]),
            bool(lstg["standardize"]),
            str(lstg["restart_from"]),
        )
        fmp = cfg["fmp"]
        self.fmp = FusionMaskPrompting(
            latent, int(fmp["heads"]), int(fmp["window"]), float(fmp["mlp_ratio"]), shift=bool(fmp["shift"])
        )
        points = int(prompt["points"])
        if points < 0:
            raise ValueError(f"prompt.points must be >= 0, got {points}")
        patch_dim = self.image_encoder.trunk.patch_embed.proj.out_channels if prompt["encoder_input"] else None
        self.prompt_encoder = FusionPromptEncoder(latent, d, s, patch_dim, points)
        positive = official.get(POSITIVE_POINT_KEY) if official is not None else None
        if self.prompt_encoder.points is not None and positive is not None:
            with torch.no_grad():  # start as SAM2's own positive point prompt (trainable from there)
                self.prompt_encoder.points.point_embed.weight.copy_(positive.reshape(1, d))
        self.loss_weights = {k: float(lstg[f"{k}_weight"]) for k in ("rec", "commit", "perceptual", "adversarial")}
        if any(w < 0 for w in self.loss_weights.values()):
            raise ValueError(f"lstg loss weights must be >= 0, got {self.loss_weights}")
        self.discriminators = (
            nn.ModuleDict({m: PatchDiscriminator(c, int(lstg["disc_channels"])) for m, c in CHANNELS.items()})
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
        """Freeze the SAM2 encoder and/or the decoder's transformer; LSTG, FMP, prompts and the rest train."""
        for p in self.parameters():
            p.requires_grad_(True)
        for p in self.image_encoder.parameters():
            p.requires_grad_(not freeze_encoder)
        dec = self.sam_head.mask_decoder
        for module in (dec.transformer, dec.iou_token):
            for p in module.parameters():
                p.requires_grad_(not freeze_transformer)
        # Unused here: the IoU head's output and the no-mask embedding (the fusion mask is the dense prompt).
        for p in dec.iou_prediction_head.parameters():
            p.requires_grad_(False)
        # The head's own embeddings outside the decoder: no_mask_embed is unused; any other (SAM2's
        # no_mem_embed, added to the image embedding) belongs to the image side and trains with the encoder.
        for name, p in self.sam_head.named_parameters():
            if not name.startswith("mask_decoder."):
                p.requires_grad_(not freeze_encoder and not name.startswith("no_mask_embed."))

    # ------------------------------------------------------------------ forward
    def image_features(self, rgb: torch.Tensor, fusion_mask: torch.Tensor | None) -> list[torch.Tensor]:
        """The SAM2 encoder's stride 4/8/16 maps of ``rgb`` with the fusion mask's projection added to
        the trunk's patch tokens (``ImageEncoder.forward`` with that one addition)."""
        encoder, trunk = self.image_encoder, self.image_encoder.trunk
        x = trunk.patch_embed(rgb)
        x = x + trunk._get_pos_embed(x.shape[1:3])
        if fusion_mask is not None and self.prompt_encoder.image is not None:
            x = x + self.prompt_encoder.image(fusion_mask, tuple(x.shape[1:3])).to(x.dtype)
        stages = []
        for i, block in enumerate(trunk.blocks):
            x = block(x)
            if i == trunk.stage_ends[-1] or (i in trunk.stage_ends and trunk.return_interm_layers):
                stages.append(x.permute(0, 3, 1, 2))
        features, _pos = encoder.neck(stages)
        if encoder.scalp > 0:
            features = features[: -encoder.scalp]
        return features

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
        (indices into the shared codebook), ``codebook`` (usage statistics, see the module docstring),
        ``points`` {coords (B, N, 2) as (x, y) input pixels, scores (B, N)} when point prompts are on
        and, in training mode, ``aux_losses``.
        """
        check_rgbt_inputs(rgb, thermal, valid, "FusionSAM")
        h, w = rgb.shape[-2:]
        if valid is not None:
            valid = valid.to(thermal.dtype)
            thermal = thermal * valid
        images = {"rgb": rgb, "thermal": thermal}
        latents, codes, commits, codebook = self.lstg(images)
        z_th = latents["thermal"]
        if valid is not None:
            z_th = z_th * F.interpolate(valid, size=z_th.shape[-2:], mode="area")
        fusion_mask = self.fmp(latents["rgb"], z_th)
        ffp, ifp, sfm = self.sam_head.pyramid(self.image_features(rgb, fusion_mask))
        dense = self.prompt_encoder.dense(fusion_mask, sfm.shape[-2:])
        sparse = points = None
        if self.prompt_encoder.points is not None:
            sparse, points = self.prompt_encoder.points(fusion_mask, (h, w), self.sam_head.pe_layer)
        masks = self.sam_head(sfm, ifp, ffp, dense=dense, sparse=sparse)
        out = {
            "logits": F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False),
            "fusion_mask": fusion_mask,
            "codes": codes,
            "codebook": codebook,
        }
        if points is not None:
            out["points"] = points
        if self.training:
            out["aux_losses"] = self._lstg_losses(images, latents, commits, valid)
        return out

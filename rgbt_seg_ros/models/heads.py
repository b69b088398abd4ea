"""Segmentation heads of SARTM: the SAM2 mask-decoder path (S0) and the auxiliary FPN head (S1).

Both read the three fused maps of the paper: FFP (stride 4, d/8 channels), IFP (stride 8,
d/4 channels) and SFM (stride 16, d channels), where d is the SAM2 neck width (256).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SAM2MaskDecoderHead(nn.Module):
    """Path 1: sam2's ``MaskDecoder`` with one mask token per class, on the fused SFM.

    Eq. 9 of the paper (``S_inter = Up(S_low) + Conv(F1)``, ``S0 = Up(S_inter) + Conv(F0)``)
    is what SAM2's high-resolution decoder path computes, in embedding space: the two-way
    transformer decodes the stride-16 SFM, a transposed conv upsamples it to stride 8 where
    the fused IFP (d/4 channels, produced by the decoder's 1x1 ``conv_s1``) is added, a
    second transposed conv upsamples to stride 4 where the fused FFP (d/8, ``conv_s0``) is
    added, and the per-class hypernetwork MLPs turn the mask tokens into weights over that
    stride-4 embedding: S0 is (B, C, H/4, W/4) logits.

    No prompts by default: the sparse prompt is empty (``forward(sparse=)`` gives tokens), the
    dense prompt is the learned ``no_mask_embed`` broadcast over the map, and the image
    positional encoding is built by ``pe_layer((h, w))`` for the actual feature size, so any
    input that is a multiple of 32 works (not only SAM2's 1024x1024).

    ``conv_s0``/``conv_s1`` live in the decoder (as in SAM2) but are applied per modality by
    :meth:`pyramid` before fusion, so that fusion runs at d/8, d/4 and d channels.

    ``no_mem_embed`` (1, 1, d) is SAM2's "no memory" embedding: SAM2's image predictor adds it
    to the stride-16 map before the mask decoder (``directly_add_no_mem_embed`` in the
    ``sam2.1_hiera_*`` configs), and the official decoder was trained on features that carry
    it. :meth:`image_embedding` adds it the same way, so the decoder sees the fused SFM as it
    would see SAM2's own image embedding. Zeros until loaded from a SAM2 checkpoint.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        depth: int = 2,
        mlp_dim: int = 2048,
        num_heads: int = 8,
    ):
        super().__init__()
        from sam2.modeling.position_encoding import PositionEmbeddingRandom
        from sam2.modeling.sam.mask_decoder import MaskDecoder
        from sam2.modeling.sam.transformer import TwoWayTransformer

        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if dim % 8:
            raise ValueError(f"the SAM2 decoder width must be a multiple of 8, got {dim}")
        self.dim = dim
        self.num_classes = num_classes
        self.mask_decoder = MaskDecoder(
            transformer_dim=dim,
            transformer=TwoWayTransformer(depth=depth, embedding_dim=dim, mlp_dim=mlp_dim, num_heads=num_heads),
            # MaskDecoder makes num_multimask_outputs + 1 mask tokens: exactly one per class here.
            num_multimask_outputs=num_classes - 1,
            iou_head_depth=3,
            iou_head_hidden_dim=dim,
            use_high_res_features=True,
            pred_obj_scores=False,
        )
        self.pe_layer = PositionEmbeddingRandom(dim // 2)
        self.no_mask_embed = nn.Embedding(1, dim)
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, dim))

    def pyramid(self, backbone_fpn: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(FFP, IFP, SFM) of one modality from the neck's stride 4/8/16 maps."""
        ffp = self.mask_decoder.conv_s0(backbone_fpn[0])
        ifp = self.mask_decoder.conv_s1(backbone_fpn[1])
        return ffp, ifp, backbone_fpn[2]

    def image_embedding(self, sfm: torch.Tensor) -> torch.Tensor:
        """The decoder's image embedding: the stride-16 map (B, d, h, w) + ``no_mem_embed``.

        SAM2 adds the (1, 1, d) embedding to the flattened (h*w, B, d) map; per channel here.
        """
        return sfm + self.no_mem_embed.to(sfm.dtype).reshape(1, -1, 1, 1)

    def forward(
        self,
        sfm: torch.Tensor,
        ifp: torch.Tensor,
        ffp: torch.Tensor,
        dense: torch.Tensor | None = None,
        sparse: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``dense`` (B, d, h, w) replaces the ``no_mask_embed`` dense prompt (FusionSAM's fusion mask);
        ``sparse`` (B, N, d) are sparse prompt tokens (FusionSAM's fusion point prompts), none by default."""
        b, c, h, w = sfm.shape
        image_pe = self.pe_layer((h, w)).unsqueeze(0).to(sfm.dtype)
        if dense is None:
            dense = self.no_mask_embed.weight.to(sfm.dtype).reshape(1, c, 1, 1).expand(b, c, h, w)
        elif tuple(dense.shape) != (b, c, h, w):
            raise ValueError(f"dense prompt must be (B, d, h, w) = {(b, c, h, w)}, got {tuple(dense.shape)}")
        if sparse is None:
            sparse = sfm.new_zeros(b, 0, c)
        elif sparse.ndim != 3 or tuple(sparse.shape[::2]) != (b, c):
            raise ValueError(f"sparse prompt must be (B, N, d) with B={b}, d={c}, got {tuple(sparse.shape)}")
        masks, _iou, _tokens, _obj = self.mask_decoder.predict_masks(
            image_embeddings=self.image_embedding(sfm),
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            repeat_image=False,
            high_res_features=[ffp, ifp],
        )
        return masks


class AuxiliaryFPNHead(nn.Module):
    """Path 2, eq. 10: ``S1 = Conv(Up(F1 + Up(Fn)) + F0)``, every layer registered here.

    The three maps have d/8, d/4 and d channels; 1x1 lateral convs bring them to ``channels``
    so they can be summed (the paper leaves this alignment implicit). The merged stride-4 map
    goes through a 3x3 conv + BatchNorm + ReLU for context and a 1x1 classifier: S1 is
    (B, C, H/4, W/4) logits. (The public SARTM code built these convs inside ``forward``,
    so they were never trained; here they are created in ``__init__``.)
    """

    def __init__(self, in_channels: tuple[int, int, int], channels: int, num_classes: int):
        super().__init__()
        c_ffp, c_ifp, c_sfm = in_channels
        self.lateral_sfm = nn.Conv2d(c_sfm, channels, 1)
        self.lateral_ifp = nn.Conv2d(c_ifp, channels, 1)
        self.lateral_ffp = nn.Conv2d(c_ffp, channels, 1)
        self.context = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, ffp: torch.Tensor, ifp: torch.Tensor, sfm: torch.Tensor) -> torch.Tensor:
        x = self.lateral_ifp(ifp) + F.interpolate(
            self.lateral_sfm(sfm), size=ifp.shape[-2:], mode="bilinear", align_corners=False
        )
        x = self.lateral_ffp(ffp) + F.interpolate(x, size=ffp.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.context(x))

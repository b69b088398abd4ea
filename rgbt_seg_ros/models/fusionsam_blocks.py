"""FusionSAM's Fusion Mask Prompting (FMP): Algorithm 1 and eq. 9-12 on the two LSTG latent grids.

All attention here is windowed (non-overlapping ``window`` x ``window`` token windows, as in
SwinFusion, on which the paper builds FMP): the latent grid of a 480x640 pair at stride 4 has
19200 tokens, too many for global attention. ``window: 0`` means global attention.

Shifted windows (Swin, SwinFusion): the attention layers alternate between the regular window grid
and one shifted by half a window, so attention itself carries information across window borders
(with one grid only, nothing crosses a border but what the 3x3 convolutions carry). The three
attention layers run regular (self-attention), shifted (cross-attention), regular (complementary
unit). The shift uses padding, not Swin's cyclic roll: the map gets ``shift`` rows and columns of
padding at the top and left before it is cut into windows, and padded tokens are masked out as keys,
so no window joins tokens from opposite edges of the image (the roll needs a mask for exactly that)
at the price of one more row and column of windows. ``fmp.shift: false`` keeps one grid.

Steps, for latent grids z1 (RGB) and z2 (thermal), (B, d, h, w):

1. Self-attention per modality (Algorithm 1, step 1): ``z = LN(z + MSA(z))``, ``z = LN(z + FFN(z))``
   (post-norm: "LN always performed after feed forward network").
2. Bidirectional cross-attention (eq. 9-10), one ``{W_Q, W_K, W_V}`` per modality:
   ``z1' = LN(softmax(Q1 K2^T / sqrt(d_k)) V2) + Q1`` and ``z2' = LN(softmax(Q2 K1^T / sqrt(d_k)) V1) + Q2``.
3. Fusion conv: ``z_c = Conv3x3([z1', z2'])``, the initial fusion mask.
4. Complementary cross conv (eq. 11-12): ``z_f = Conv3x3([z1, z2])`` with the *same* fusion conv on
   the raw latent grids, then ``I_f = LN(softmax(Q_f K_0^T / sqrt(d_k)) V_0) + z_c`` with queries
   from ``z_f`` and keys/values from ``z_0 = z_c``, and a final 3x3 conv: the fusion mask.

Interpretations (the paper leaves them open): eq. 11 reuses the names W_Q1/W_Q2, read here as
fresh projections of the complementary unit, not the eq. 9 weights; "z_0" is read as z_c (the
cross-attention fusion), as eq. 12's residual ``+ z_c`` suggests.

What SAM2 receives from the fusion mask I_f (:class:`FusionPromptEncoder`, three parts):

* :class:`FusionEncoderInput` (section 3.2.3, "I_f is fed into the image encoder"): a LayerNorm2d
  and a zero-initialised 1x1 conv project I_f to the width of the SAM2 trunk's patch embedding;
  the result is added to the patch tokens (stride 4, the LSTG grid at the paper's s = 4), so the
  encoder's blocks process RGB patches plus the fused representation. Zero init: an untrained
  model's encoder features are exactly those of the RGB image, which is what frozen official
  SAM2 weights were trained on; the projection learns what to inject.
* :class:`FusionMaskEncoder`: the dense prompt, the way SAM's prompt encoder downscales a mask
  prompt (2x2 stride-2 convs with LayerNorm2d and GELU, then a 1x1 conv to the decoder width).
* :class:`FusionPointPrompts` (Figure 2's "Fusion Point Prompt Encoder", points "extracted
  directly from the fusion features"): a 1x1 conv scores every cell of I_f, the ``num_points``
  highest local maxima (3x3 non-maximum suppression) become points at their cell centres, and
  each point is encoded as SAM's prompt encoder encodes a positive point: the random-Fourier
  positional encoding of its coordinates (the decoder head's own ``pe_layer``, so points and image
  share one positional frame) plus a learned point embedding, plus the I_f vector at the point
  (zero-initialised linear projection) scaled by the sigmoid of its score, which is how the
  score head receives a gradient (the peak selection itself is not differentiable).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * windows, window * window, C), zero-padded to multiples of ``window``."""
    b, h, w, c = x.shape
    ph, pw = (-h) % window, (-w) % window
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.reshape(b, hp // window, window, wp // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c), (hp, wp)


def _unpartition(t: torch.Tensor, window: int, b: int, padded: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    hp, wp = padded
    c = t.shape[-1]
    x = t.reshape(b, hp // window, wp // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, c)[:, : size[0], : size[1]]


def windowed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, window: int, shift: int = 0
) -> torch.Tensor:
    """Multi-head attention within windows; q, k, v (B, H, W, C) already projected -> (B, H, W, C).

    ``window`` <= 0, or a window covering the whole map, is global attention. ``shift`` (0 <= shift <
    window) moves the window grid by that many tokens down and right: windows start at rows and
    columns ``-shift + i * window`` (top-left padding, masked as keys, see the module docstring).
    """
    b, h, w, c = q.shape

    def split_heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], heads, c // heads).transpose(1, 2)

    if window <= 0 or (window >= h and window >= w):
        out = F.scaled_dot_product_attention(*(split_heads(t.reshape(b, h * w, c)) for t in (q, k, v)))
        return out.transpose(1, 2).reshape(b, h, w, c)
    if not 0 <= shift < window:
        raise ValueError(f"window shift must be in [0, {window}), got {shift}")
    if shift:
        q, k, v = (F.pad(t, (0, 0, shift, 0, shift, 0)) for t in (q, k, v))
    hs, ws = h + shift, w + shift
    mask = None
    if shift or hs % window or ws % window:  # padded tokens must not be attended to
        valid = F.pad(q.new_ones(1, h, w, 1), (0, 0, shift, 0, shift, 0))
        mask = _partition(valid, window)[0][..., 0].bool()[:, None, None, :].repeat(b, 1, 1, 1)
    parts = []
    for t in (q, k, v):
        tw, padded = _partition(t, window)
        parts.append(split_heads(tw))
    out = F.scaled_dot_product_attention(*parts, attn_mask=mask)
    out = out.transpose(1, 2).reshape(-1, window * window, c)
    return _unpartition(out, window, b, padded, (hs, ws))[:, shift:, shift:]


class SelfAttentionBlock(nn.Module):
    """Algorithm 1, step 1: windowed MSA and FFN, each with a residual and a LayerNorm after it."""

    def __init__(self, dim: int, heads: int, window: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = self.norm1(x + self.proj(windowed_attention(q, k, v, self.heads, self.window)))
        return self.norm2(x + self.mlp(x))


class BidirectionalCrossAttention(nn.Module):
    """Eq. 9-10: ``z1' = LN(Attn(Q1, K2, V2)) + Q1`` and ``z2' = LN(Attn(Q2, K1, V1)) + Q2``, in windows
    shifted by ``shift`` tokens."""

    def __init__(self, dim: int, heads: int, window: int, shift: int = 0):
        super().__init__()
        self.heads, self.window, self.shift = heads, window, shift
        self.qkv1 = nn.Linear(dim, 3 * dim)  # W_Q1, W_K1, W_V1
        self.qkv2 = nn.Linear(dim, 3 * dim)  # W_Q2, W_K2, W_V2
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q1, k1, v1 = self.qkv1(z1).chunk(3, dim=-1)
        q2, k2, v2 = self.qkv2(z2).chunk(3, dim=-1)
        z1p = self.norm1(windowed_attention(q1, k2, v2, self.heads, self.window, self.shift)) + q1
        z2p = self.norm2(windowed_attention(q2, k1, v1, self.heads, self.window, self.shift)) + q2
        return z1p, z2p


class FusionMaskPrompting(nn.Module):
    """FMP: latent grids of both modalities (B, d, h, w) -> fusion mask I_f (B, d, h, w).

    ``shift``: the cross-attention (the middle of the three attention layers) uses the window grid
    shifted by ``window // 2``; the self-attention and the complementary unit use the regular grid.
    """

    def __init__(self, dim: int, heads: int = 4, window: int = 8, mlp_ratio: float = 2.0, shift: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"fmp: latent width {dim} is not divisible by {heads} heads")
        self.heads, self.window = heads, int(window)
        self.shift = self.window // 2 if shift and self.window > 1 else 0
        self.self_rgb = SelfAttentionBlock(dim, heads, self.window, mlp_ratio)
        self.self_thermal = SelfAttentionBlock(dim, heads, self.window, mlp_ratio)
        self.cross = BidirectionalCrossAttention(dim, heads, self.window, self.shift)
        self.fusion_conv = nn.Conv2d(2 * dim, dim, 3, padding=1)
        self.q_f = nn.Linear(dim, dim)  # complementary unit: queries from z_f ...
        self.kv_0 = nn.Linear(dim, 2 * dim)  # ... keys / values from z_0 = z_c
        self.norm_f = nn.LayerNorm(dim)
        self.out_conv = nn.Conv2d(dim, dim, 3, padding=1)

    def _fuse(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The fusion conv on two channel-last maps -> channel-last."""
        x = torch.cat([a, b], dim=-1).permute(0, 3, 1, 2)
        return self.fusion_conv(x).permute(0, 2, 3, 1)

    def forward(self, z_rgb: torch.Tensor, z_th: torch.Tensor) -> torch.Tensor:
        z1, z2 = z_rgb.permute(0, 2, 3, 1), z_th.permute(0, 2, 3, 1)  # (B, h, w, d)
        s1, s2 = self.self_rgb(z1), self.self_thermal(z2)  # step 1
        z1p, z2p = self.cross(s1, s2)  # step 2, eq. 9-10
        z_c = self._fuse(z1p, z2p)  # fusion conv: initial fusion mask
        z_f = self._fuse(z1, z2)  # the same conv on the raw latent grids
        k0, v0 = self.kv_0(z_c).chunk(2, dim=-1)
        i_f = self.norm_f(windowed_attention(self.q_f(z_f), k0, v0, self.heads, self.window)) + z_c  # eq. 12
        return self.out_conv(i_f.permute(0, 3, 1, 2))


class FusionMaskEncoder(nn.Module):
    """Fusion mask (B, d_c, H/s, W/s) -> SAM2 dense prompt (B, d, H/16, W/16), like SAM's mask downscaling."""

    def __init__(self, in_channels: int, embed_dim: int, latent_stride: int, encoder_stride: int = 16):
        super().__init__()
        from sam2.modeling.sam2_utils import LayerNorm2d

        layers: list[nn.Module] = []
        stride = int(latent_stride)
        while stride * 2 <= encoder_stride:
            layers += [nn.Conv2d(in_channels, in_channels, 2, stride=2), LayerNorm2d(in_channels), nn.GELU()]
            stride *= 2
        layers.append(nn.Conv2d(in_channels, embed_dim, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, fusion_mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = self.net(fusion_mask)
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x


class FusionEncoderInput(nn.Module):
    """Fusion mask (B, d_c, h, w) -> a term (B, H/4, W/4, C) added to the SAM2 trunk's patch tokens."""

    def __init__(self, in_channels: int, embed_dim: int):
        super().__init__()
        from sam2.modeling.sam2_utils import LayerNorm2d

        self.norm = LayerNorm2d(in_channels)
        self.proj = nn.Conv2d(in_channels, embed_dim, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, fusion_mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = self.proj(self.norm(fusion_mask))
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x.permute(0, 2, 3, 1)


class FusionPointPrompts(nn.Module):
    """Fusion mask -> ``num_points`` point prompts (B, N, d) for the SAM2 mask decoder (see the module docstring)."""

    def __init__(self, in_channels: int, embed_dim: int, num_points: int):
        super().__init__()
        if num_points < 1:
            raise ValueError(f"prompt.points must be >= 1 to build point prompts, got {num_points}")
        self.num_points = int(num_points)
        self.score = nn.Conv2d(in_channels, 1, 1)
        self.point_embed = nn.Embedding(1, embed_dim)  # SAM's "positive point" embedding
        self.content = nn.Linear(in_channels, embed_dim)
        nn.init.zeros_(self.content.weight)
        nn.init.zeros_(self.content.bias)

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Flat cell indices (B, N) of the N best local maxima of ``scores`` (B, 1, h, w); when a map
        has fewer than N maxima, the best remaining cells fill up."""
        s = scores.detach()
        peak = s == F.max_pool2d(s, 3, stride=1, padding=1)
        span = (s.amax(dim=(1, 2, 3), keepdim=True) - s.amin(dim=(1, 2, 3), keepdim=True)) + 1.0
        key = torch.where(peak, s, s - span).flatten(1)  # every peak ranks above every non-peak
        return key.topk(min(self.num_points, key.shape[1]), dim=1).indices

    def forward(
        self, fusion_mask: torch.Tensor, image_size: tuple[int, int], pe_layer: nn.Module
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (sparse prompt embeddings (B, N, d), {``coords`` (B, N, 2) as (x, y) input pixels, ``scores`` (B, N)})."""
        b, c, h, w = fusion_mask.shape
        scores = self.score(fusion_mask)
        idx = self.select(scores)  # (B, N)
        rows, cols = idx // w, idx % w
        height, width = image_size
        coords = torch.stack([(cols + 0.5) * (width / w), (rows + 0.5) * (height / h)], dim=-1).float()
        feats = fusion_mask.flatten(2).transpose(1, 2)  # (B, h*w, d_c)
        picked = torch.gather(feats, 1, idx[..., None].expand(-1, -1, c))
        picked_scores = torch.gather(scores.flatten(1), 1, idx)
        pe = pe_layer.forward_with_coords(coords, (height, width)).to(fusion_mask.dtype)
        tokens = pe + self.point_embed.weight[None] + torch.sigmoid(picked_scores)[..., None] * self.content(picked)
        return tokens, {"coords": coords, "scores": picked_scores}


class FusionPromptEncoder(nn.Module):
    """The three ways the fusion mask reaches SAM2: ``image`` (encoder input term, optional),
    ``dense`` (dense prompt) and ``points`` (point prompts, optional)."""

    def __init__(
        self,
        in_channels: int,
        embed_dim: int,
        latent_stride: int,
        patch_dim: int | None,
        num_points: int,
    ):
        super().__init__()
        self.image = FusionEncoderInput(in_channels, patch_dim) if patch_dim else None
        self.dense = FusionMaskEncoder(in_channels, embed_dim, latent_stride)
        self.points = FusionPointPrompts(in_channels, embed_dim, num_points) if num_points > 0 else None

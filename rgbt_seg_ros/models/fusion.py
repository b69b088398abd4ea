"""Cross-modal fusion blocks: CMX's FRM and FFM, and SARTM's language-guided weighting.

FRM and FFM follow the definitions of CMX (Zhang et al., "CMX: Cross-Modal Fusion for RGB-X
Semantic Segmentation with Transformers"), which SARTM applies at each pyramid level:

* :class:`FeatureRectifyModule` (FRM) rectifies each modality with the other through
  channel weights (avg+max pooled MLP) and spatial weights (1x1 convs), blended by
  ``lambda_c`` and ``lambda_s``.
* :class:`FeatureFusionModule` (FFM) exchanges global context between the modalities with
  an efficient cross-attention (context ``softmax_N(K^T V)`` of one modality read by the
  queries of the other), then merges the two streams with a channel embedding
  (1x1 -> depthwise 3x3 -> 1x1 with a 1x1 residual, BatchNorm).

Starting from pretrained SAM2 weights: with ``identity_init`` the blocks start as the identity on the
RGB stream, so a fresh model hands SAM2's decoder exactly SAM2's own image embedding and thermal
changes nothing until training moves them. FRM passes its cross terms through a 1x1 convolution that
starts at zero (a "zero convolution", as ControlNet attaches a trainable copy to a frozen network); FFM
returns ``x_rgb + gate(FFM(x_rgb, x_th))`` with the same kind of zero 1x1 convolution; the language
weighting's output layer starts at zero. Each zero layer gets a gradient at step 0 (its input is not
zero), and the layers behind it train once it has moved. A full zero matrix, not a per-channel scale,
because a scalar gate per channel let a random-init micro model start using thermal far too slowly
(night person/car IoU 0.16 instead of 0.32 after the contract's 150 steps). This
departs from CMX, whose FRM/FFM start mixing at once; without it the frozen SAM2 decoder would see a
randomly mixed map at step 0 (models/README.md, "Identity at init").

Thermal validity: both blocks take an optional mask ``valid`` (B, 1, H, W) in [0, 1] at the
level's resolution; thermal features are multiplied by it so that thermal pixels outside the
thermal camera's view add nothing to the rectification, the attention context or the merge.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def zero_conv(dim: int) -> nn.Conv2d:
    """A 1x1 convolution whose weight and bias start at zero (``identity_init``'s gates)."""
    conv = nn.Conv2d(dim, dim, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class FeatureRectifyModule(nn.Module):
    """CMX FRM: ``x_rgb' = x_rgb + lc*cw_t*x_t + ls*sw_t*x_t`` and symmetrically for thermal."""

    def __init__(
        self, dim: int, reduction: int = 1, lambda_c: float = 0.5, lambda_s: float = 0.5, identity_init: bool = False
    ):
        super().__init__()
        self.dim = dim
        self.lambda_c = lambda_c
        self.lambda_s = lambda_s
        hidden_c = max(1, 4 * dim // reduction)
        self.channel_mlp = nn.Sequential(
            nn.Linear(4 * dim, hidden_c), nn.ReLU(inplace=True), nn.Linear(hidden_c, 2 * dim), nn.Sigmoid()
        )
        hidden_s = max(1, dim // reduction)
        self.spatial = nn.Sequential(
            nn.Conv2d(2 * dim, hidden_s, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden_s, 2, 1), nn.Sigmoid()
        )
        # identity_init: zero 1x1 convolutions on the cross terms, [0] into the RGB output, [1] into thermal
        self.gate = nn.ModuleList(zero_conv(dim) for _ in range(2)) if identity_init else None

    def forward(
        self, x_rgb: torch.Tensor, x_th: torch.Tensor, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if valid is not None:
            x_th = x_th * valid
        b, c = x_rgb.shape[:2]
        both = torch.cat([x_rgb, x_th], dim=1)
        pooled = torch.cat([both.mean(dim=(2, 3)), both.amax(dim=(2, 3))], dim=1)
        cw = self.channel_mlp(pooled).view(b, 2, c, 1, 1)  # [:,0] weighs rgb, [:,1] weighs thermal
        sw = self.spatial(both)  # (B, 2, H, W)
        to_rgb = self.lambda_c * cw[:, 1] * x_th + self.lambda_s * sw[:, 1:2] * x_th
        to_th = self.lambda_c * cw[:, 0] * x_rgb + self.lambda_s * sw[:, 0:1] * x_rgb
        if self.gate is not None:
            to_rgb, to_th = self.gate[0](to_rgb), self.gate[1](to_th)
        rgb_out, th_out = x_rgb + to_rgb, x_th + to_th
        if valid is not None:
            th_out = th_out * valid
        return rgb_out, th_out


class _EfficientCrossAttention(nn.Module):
    """CMX cross-attention: each modality's queries read the other's ``softmax_N(K^T V)`` context."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"FFM: {dim} channels cannot be split into {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.kv_rgb = nn.Linear(dim, 2 * dim, bias=False)
        self.kv_th = nn.Linear(dim, 2 * dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # B, h, N, d

    def _context(self, x: torch.Tensor, kv: nn.Linear) -> torch.Tensor:
        k, v = kv(x).chunk(2, dim=-1)
        ctx = (self._heads(k).transpose(-2, -1) @ self._heads(v)) * self.scale  # B, h, d, d
        return ctx.softmax(dim=-2)

    def forward(self, u_rgb: torch.Tensor, u_th: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, c = u_rgb.shape
        ctx_rgb = self._context(u_rgb, self.kv_rgb)
        ctx_th = self._context(u_th, self.kv_th)
        out_rgb = (self._heads(u_rgb) @ ctx_th).transpose(1, 2).reshape(b, n, c)
        out_th = (self._heads(u_th) @ ctx_rgb).transpose(1, 2).reshape(b, n, c)
        return out_rgb, out_th


class FeatureFusionModule(nn.Module):
    """CMX FFM: cross-path (projection, cross-attention, residual LayerNorm) + channel embedding."""

    def __init__(self, dim: int, num_heads: int = 1, reduction: int = 1, identity_init: bool = False):
        super().__init__()
        hidden = max(num_heads, dim // reduction)
        self.proj_rgb = nn.Linear(dim, 2 * hidden)
        self.proj_th = nn.Linear(dim, 2 * hidden)
        self.cross = _EfficientCrossAttention(hidden, num_heads)
        self.end_rgb = nn.Linear(2 * hidden, dim)
        self.end_th = nn.Linear(2 * hidden, dim)
        self.norm_rgb = nn.LayerNorm(dim)
        self.norm_th = nn.LayerNorm(dim)
        embed = max(1, dim // reduction)
        self.merge_residual = nn.Conv2d(2 * dim, dim, 1, bias=False)
        self.merge_embed = nn.Sequential(
            nn.Conv2d(2 * dim, embed, 1),
            nn.Conv2d(embed, embed, 3, padding=1, groups=embed),
            nn.ReLU(inplace=True),
            nn.Conv2d(embed, dim, 1),
            nn.BatchNorm2d(dim),
        )
        self.merge_norm = nn.BatchNorm2d(dim)
        # identity_init: the output is x_rgb + gate(merge), the gate a zero 1x1 convolution
        self.gate = zero_conv(dim) if identity_init else None

    def forward(self, x_rgb: torch.Tensor, x_th: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x_rgb.shape
        # tokens (B, N, C) through a channels-last view: no copy when the maps are channels-last in memory
        # (Hiera's stage outputs are), one when they are not
        t_rgb = x_rgb.permute(0, 2, 3, 1).reshape(b, h * w, c)
        t_th = x_th.permute(0, 2, 3, 1).reshape(b, h * w, c)
        y_rgb, u_rgb = F.relu(self.proj_rgb(t_rgb)).chunk(2, dim=-1)
        y_th, u_th = F.relu(self.proj_th(t_th)).chunk(2, dim=-1)
        if valid is not None:
            m = valid.permute(0, 2, 3, 1).reshape(b, h * w, 1)
            y_th, u_th = y_th * m, u_th * m
        v_rgb, v_th = self.cross(u_rgb, u_th)
        t_rgb = self.norm_rgb(t_rgb + self.end_rgb(torch.cat([y_rgb, v_rgb], dim=-1)))
        t_th = self.norm_th(t_th + self.end_th(torch.cat([y_th, v_th], dim=-1)))
        if valid is not None:
            t_th = t_th * m
        # (B, 2C, H, W) as a channels-last view of the tokens; the convolutions take that layout as it is
        merged = torch.cat([t_rgb, t_th], dim=-1).view(b, h, w, 2 * c).permute(0, 3, 1, 2)
        out = self.merge_norm(self.merge_residual(merged) + self.merge_embed(merged))
        return out if self.gate is None else x_rgb + self.gate(out)


class LanguageGuidedChannelAttention(nn.Module):
    """Language-guided weighting of a fused map: text-conditioned channel attention.

    The paper says only that class-name text embeddings "guide the feature fusion process and
    generate the weighted feature maps". This module is one explicit reading of that:

    1. ``g = GAP(F)`` summarises the fused map (B, C).
    2. ``g`` attends over the K class-name embeddings ``T`` (K, D):
       ``a = softmax(W_q g . (W_k T)^T / sqrt(h))`` says which classes the image resembles,
       and ``ctx = a @ W_v T`` is the matching text context projected to C channels.
    3. A gate turns ``[g, ctx]`` into per-channel weights ``w = tanh(W_g [g, ctx])`` in (-1, 1)
       and the output is ``F * (1 + w)``.

    ``W_g`` starts near zero (``identity_init``: at zero, so the block starts as the identity), and the
    block learns how much language to inject. The class affinity ``a`` of the last call is kept in
    ``last_class_affinity`` (B, K) for inspection.
    """

    def __init__(self, dim: int, text_dim: int, hidden: int = 64, identity_init: bool = False):
        super().__init__()
        self.hidden = hidden
        self.query = nn.Linear(dim, hidden)
        self.key = nn.Linear(text_dim, hidden)
        self.value = nn.Linear(text_dim, dim)
        self.gate = nn.Linear(2 * dim, dim)
        if identity_init:
            nn.init.zeros_(self.gate.weight)
        else:
            nn.init.normal_(self.gate.weight, std=1e-2)
        nn.init.zeros_(self.gate.bias)
        self.last_class_affinity: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        g = x.mean(dim=(2, 3))
        text = text.to(x.dtype)
        logits = self.query(g) @ self.key(text).transpose(0, 1) / math.sqrt(self.hidden)
        affinity = logits.softmax(dim=-1)
        ctx = affinity @ self.value(text)
        w = torch.tanh(self.gate(torch.cat([g, ctx], dim=1)))
        self.last_class_affinity = affinity.detach()
        return x * (1.0 + w)[:, :, None, None]

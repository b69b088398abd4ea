"""Building blocks of the CPAL backend: the dual-stream Hiera block, MCP, GPM and a UPerHead.

CPAL (paper: "Cross-prompting Adapter with LoRAs", TCSVT 2025) runs RGB and thermal through
one frozen encoder, block by block, and exchanges prompts between the two streams inside every
block. The paper's encoder is InternImage (a DCNv3 sub-layer and an FFN per block); here it is
SAM2's Hiera, whose block has the same two residual sub-layers (windowed attention, then an
MLP), so eq. 7-12 map one to one:

    T~_A   = Attn(T_A)   + T_A   + P~_RGB        P~ = MCP_1(norm1(T_RGB), norm1(T_A))    (7-9)
    T~_RGB = Attn(T_RGB) + T_RGB + P~_A
    T_A    = MLP(T~_A)   + T~_A   + P_RGB         P  = MCP_2(norm2(T~_RGB), norm2(T~_A))  (10-12)
    T_RGB  = MLP(T~_RGB) + T~_RGB + P_A

:func:`attention_sublayer` and :func:`mlp_sublayer` are the two halves of sam2's
``MultiScaleBlock.forward`` (the prompts must enter between them, so the block cannot be called
as a whole); with zero prompts they reproduce ``block(x)`` exactly, which a test checks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------- Hiera block halves
def attention_sublayer(
    block: nn.Module, x: torch.Tensor, prompts: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """First half of a sam2 ``MultiScaleBlock``: ``(shortcut + attn(norm1(x)), norm1(x))``.

    ``x`` is (B, H, W, C); the result has the block's output width and, at a stage change
    (q pooling), half the resolution. Same operations, in the same order, as sam2's forward.
    ``prompts`` (B, K, C): tokens normalised by the same ``norm1`` that join every window's
    attention as extra keys and values (SegRGB-X; needs split q/k/v attention).
    """
    from sam2.modeling.backbones.hieradet import do_pool
    from sam2.modeling.backbones.utils import window_partition, window_unpartition

    shortcut = x
    xn = block.norm1(x)
    if block.dim != block.dim_out:
        shortcut = do_pool(block.proj(xn), block.pool)
    y = xn
    window_size = block.window_size
    if window_size > 0:
        h, w = y.shape[1], y.shape[2]
        y, pad_hw = window_partition(y, window_size)
    y = block.attn(y) if prompts is None else block.attn(y, block.norm1(prompts))
    if block.q_stride:
        window_size = block.window_size // block.q_stride[0]
        h, w = shortcut.shape[1:3]
        pad_h = (window_size - h % window_size) % window_size
        pad_w = (window_size - w % window_size) % window_size
        pad_hw = (h + pad_h, w + pad_w)
    if block.window_size > 0:
        y = window_unpartition(y, window_size, pad_hw, (h, w))
    return shortcut + block.drop_path(y), xn


def mlp_sublayer(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Second half: ``(x + mlp(norm2(x)), norm2(x))``."""
    xn = block.norm2(x)
    return x + block.drop_path(block.mlp(xn)), xn


# --------------------------------------------------------------------------- MCP
def _groups(groups: int, *channels: int) -> int:
    """Largest divisor of ``groups`` that divides every channel count (a grouped conv needs it)."""
    g = int(groups)
    while g > 1 and any(c % g for c in channels):
        g -= 1
    return max(g, 1)


class PromptBranch(nn.Module):
    """One direction of an MCP sub-block: grouped down, mid and up projections (Fig. 3).

    down: grouped 1x1 (C_in -> hidden), mid: grouped 3x3 (hidden -> hidden, stride 2 where the
    Hiera block pools), up: grouped 1x1 (hidden -> C_out), GELU in between. The up projection
    starts at zero (as in the authors' adapter), so a fresh CPAL computes the frozen encoder's
    features exactly and training moves away from them.
    """

    def __init__(self, c_in: int, c_out: int, hidden: int, groups: int, stride: int = 1):
        super().__init__()
        self.down = nn.Conv2d(c_in, hidden, 1, groups=_groups(groups, c_in, hidden))
        self.mid = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=_groups(groups, hidden))
        self.up = nn.Conv2d(hidden, c_out, 1, groups=_groups(groups, hidden, c_out))
        self.act = nn.GELU()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C_in) normalised tokens -> (B, H', W', C_out) prompt."""
        x = tokens.permute(0, 3, 1, 2)
        x = self.up(self.act(self.mid(self.act(self.down(x)))))
        return x.permute(0, 2, 3, 1)


class CrossPromptSubBlock(nn.Module):
    """An MCP sub-block: prompts from each modality, to be added to the other stream (eq. 9/12).

    Each direction has its own projections (the paper does not say whether they are shared).
    """

    def __init__(self, c_in: int, c_out: int, hidden: int, groups: int, stride: int = 1):
        super().__init__()
        self.from_rgb = PromptBranch(c_in, c_out, hidden, groups, stride)
        self.from_thermal = PromptBranch(c_in, c_out, hidden, groups, stride)

    def forward(self, t_rgb: torch.Tensor, t_th: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(P_RGB, P_A)``: P_RGB (from RGB) goes into the thermal stream and vice versa."""
        return self.from_rgb(t_rgb), self.from_thermal(t_th)


class MultiModalCrossPrompter(nn.Module):
    """MCP for one Hiera block: sub-block 1 before the attention residual sum, sub-block 2 before the MLP's."""

    def __init__(self, dim: int, dim_out: int, hidden: int, groups: int, stride: int = 1):
        super().__init__()
        self.attn_prompt = CrossPromptSubBlock(dim, dim_out, hidden, groups, stride)
        self.mlp_prompt = CrossPromptSubBlock(dim_out, dim_out, hidden, groups, 1)


def dual_stream_block(
    block: nn.Module,
    mcp: MultiModalCrossPrompter | None,
    x_rgb: torch.Tensor,
    x_th: torch.Tensor,
    attention=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one frozen Hiera block on both streams with MCP prompts exchanged (eq. 7-12).

    ``attention(block, x_rgb, x_th)`` -> ((t_rgb, n_rgb), (t_th, n_th)) overrides how the
    attention half runs (the backend switches LoRA adapters there); by default both streams
    go through it as one batch, which is exact because Hiera normalises per token.
    """
    if attention is None:
        t, n = attention_sublayer(block, torch.cat([x_rgb, x_th]))
        (t_rgb, t_th), (n_rgb, n_th) = t.chunk(2), n.chunk(2)
    else:
        (t_rgb, n_rgb), (t_th, n_th) = attention(block, x_rgb, x_th)
    if mcp is not None:
        p_rgb, p_th = mcp.attn_prompt(n_rgb, n_th)
        t_rgb, t_th = t_rgb + p_th, t_th + p_rgb
    y, n = mlp_sublayer(block, torch.cat([t_rgb, t_th]))
    (y_rgb, y_th), (n_rgb, n_th) = y.chunk(2), n.chunk(2)
    if mcp is not None:
        p_rgb, p_th = mcp.mlp_prompt(n_rgb, n_th)
        y_rgb, y_th = y_rgb + p_th, y_th + p_rgb
    return y_rgb, y_th


# --------------------------------------------------------------------------- GPM
class GatedPerceptionModule(nn.Module):
    """GPM (eq. 13-18): merge a stage's thermal tokens into its RGB tokens through a forget gate.

    (i) ``V = Linear(conv1x1(T))`` per modality to ``latent`` channels; (ii) the perception
    matrix is the cross-attention of RGB queries over thermal keys/values, ``V_r = F(V_RGB, V_A)``;
    (iii) ``V_f = sigmoid(Linear(V_r))``; (iv) ``V_m = V_r * V_f + V_RGB``; (v) ``conv1x1(V_m)``
    back to the stage width. Keys and values are average-pooled by ``kv_pool`` (spatial-reduction
    attention, as in PVT/SegFormer): full attention over the stride-4 stage of a 480x640 image
    would need a 19200 x 19200 matrix. ``mask`` (B, 1, h, w) zeroes thermal tokens the thermal
    camera does not see.
    """

    def __init__(self, dim: int, latent: int, heads: int = 1, kv_pool: int = 1):
        super().__init__()
        if latent % heads:
            raise ValueError(f"GPM width {latent} is not divisible by {heads} heads")
        self.heads = heads
        self.kv_pool = int(kv_pool)
        self.conv_rgb = nn.Conv2d(dim, latent, 1)
        self.conv_th = nn.Conv2d(dim, latent, 1)
        self.lin_rgb = nn.Linear(latent, latent)
        self.lin_th = nn.Linear(latent, latent)
        self.q = nn.Linear(latent, latent)
        self.k = nn.Linear(latent, latent)
        self.v = nn.Linear(latent, latent)
        self.attn_out = nn.Linear(latent, latent)
        self.forget = nn.Linear(latent, latent)
        self.out = nn.Conv2d(latent, dim, 1)

    def forward(self, t_rgb: torch.Tensor, t_th: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = t_rgb.shape
        v_rgb = self.lin_rgb(self.conv_rgb(t_rgb).permute(0, 2, 3, 1))  # (B, h, w, L)   eq. 13
        v_th = self.lin_th(self.conv_th(t_th).permute(0, 2, 3, 1))  # eq. 14
        if mask is not None:
            v_th = v_th * mask.permute(0, 2, 3, 1)
        kv = v_th.permute(0, 3, 1, 2)
        if self.kv_pool > 1:
            kv = F.avg_pool2d(kv, self.kv_pool, self.kv_pool, ceil_mode=True)
        kv = kv.flatten(2).transpose(1, 2)  # (B, n, L)
        heads = self.heads
        q = self.q(v_rgb.reshape(b, h * w, -1)).reshape(b, h * w, heads, -1).transpose(1, 2)
        k = self.k(kv).reshape(b, kv.shape[1], heads, -1).transpose(1, 2)
        v = self.v(kv).reshape(b, kv.shape[1], heads, -1).transpose(1, 2)
        v_r = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h, w, -1)
        v_r = self.attn_out(v_r)  # eq. 15
        v_f = torch.sigmoid(self.forget(v_r))  # eq. 16
        v_m = v_r * v_f + v_rgb  # eq. 17
        return self.out(v_m.permute(0, 3, 1, 2))  # eq. 18


# --------------------------------------------------------------------------- decode head
class ConvNormAct(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, k: int = 1, norm: bool = True):
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=not norm)]
        if norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class UPerHead(nn.Module):
    """UPerNet decode head over four stages (strides 4, 8, 16, 32) -> (B, C, H/4, W/4) logits.

    Pyramid pooling on the deepest stage, FPN top-down merge with 1x1 laterals and 3x3 output
    convs, concatenation of the four levels at stride 4, a 3x3 fusion conv and a 1x1
    classifier (mmsegmentation's UPerHead layout). The pooling branches carry no BatchNorm
    (their 1x1 maps would break batch-1 training).
    """

    def __init__(
        self,
        in_channels: list[int] | tuple[int, ...],
        channels: int,
        num_classes: int,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__()
        *lower, deepest = list(in_channels)
        self.pool_scales = tuple(int(s) for s in pool_scales)
        self.ppm = nn.ModuleList(ConvNormAct(deepest, channels, 1, norm=False) for _ in self.pool_scales)
        self.bottleneck = ConvNormAct(deepest + len(self.pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(ConvNormAct(c, channels, 1) for c in lower)
        self.fpn = nn.ModuleList(ConvNormAct(channels, channels, 3) for _ in lower)
        self.fuse = ConvNormAct(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    @staticmethod
    def _up(x: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        *lower, deepest = feats
        size = deepest.shape[-2:]
        pooled = [deepest] + [
            self._up(branch(F.adaptive_avg_pool2d(deepest, s)), size) for s, branch in zip(self.pool_scales, self.ppm)
        ]
        laterals = [conv(f) for conv, f in zip(self.lateral, lower)] + [self.bottleneck(torch.cat(pooled, 1))]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + self._up(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        merged = torch.cat([outs[0]] + [self._up(o, size) for o in outs[1:]], 1)
        return self.classifier(self.dropout(self.fuse(merged)))


def log2_int(value: int, what: str) -> int:
    n = int(round(math.log2(value))) if value > 0 else -1
    if n < 0 or 2**n != value:
        raise ValueError(f"{what} must be a power of two, got {value}")
    return n

"""Building blocks of the SegRGB-X backend (``segrgbx.py``): MA-CLIP, prompts, DSRM, the MLP head.

Paper: "SegRGB-X: General RGB-X Semantic Segmentation Model" (arXiv 2603.28023), sections III-B..III-D.
The interpretations (no CLIP and no MiT backbone offline) are listed in models/README.md.

* :class:`MAClip` (III-B): an image encoder (a Hiera trunk, initialised like the backbone from the
  SAM2 checkpoint) with a **LoRA pool** (one adapter per X modality, selected for an RGB-X pair and
  used for both of its images, as in Fig. 3) and a projection of its last-stage tokens into the text
  space. It returns per image a token map ``S_map`` (B, h, w, D_t) and the embedding ``S`` (B, D_t),
  the L2-normalised mean of the map, which the contrastive pretraining (``training/ma_clip.py``)
  aligns with caption embeddings. It sees the pair at a small fixed size (``image_size``, like CLIP's
  224x224), which keeps it cheap next to the backbone.
* :class:`ControlPrompts` (III-C): an MLP from ``S`` to K control tokens of a stage's width.
* :class:`DSRM` (III-D, structure (h) of Table IV): soft indicator ``softmax(MLP(GAP(F)))`` over K
  learnable universal prompts U, a prompt-derived query for channel attention over F, then spatial
  cross-attention whose queries come from the MA-CLIP map of the same modality; the result is added
  to F through a zero-initialised projection.
* :class:`MLPHead`: SegFormer's all-MLP head over the four fused stages, ending in a per-pixel
  embedding in the text space; classes are scored by cosine similarity with their name embeddings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cpal_blocks import attention_sublayer, mlp_sublayer


def prompted_block(block: nn.Module, x: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
    """One Hiera block with prompt tokens (B, K, C) joining the attention of every window (III-C).

    The prompts are normalised by the block's ``norm1`` with the patch tokens (the sequence
    ``[E; M]`` of the paper), projected by the block's own k and v, and appended to each window's
    keys and values; no output is computed for them (``O_M`` is discarded). Hiera's windowed
    attention has no single sequence to append to: each window gets the same K prompts, so every
    patch token can attend to them whatever window it is in (global-attention blocks alike).
    """
    if prompts is None:
        return block(x)
    t, _ = attention_sublayer(block, x, prompts)
    y, _ = mlp_sublayer(block, t)
    return y


# --------------------------------------------------------------------------- MA-CLIP


class MAClip(nn.Module):
    """Modality-aware image encoder: frozen trunk + LoRA pool + projection into the text space.

    ``trunk``: a Hiera trunk with split q/k/v and a LoRA adapter per pool entry (``lora.py``);
    ``text_dim``: the caption encoder's width (MiniLM: 384).
    """

    def __init__(self, trunk: nn.Module, pool: tuple[str, ...], image_size: tuple[int, int], text_dim: int):
        super().__init__()
        self.trunk = trunk
        self.pool = tuple(pool)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        width = trunk.blocks[trunk.stage_ends[-1]].dim_out
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, text_dim)
        self.text_dim = int(text_dim)

    def forward(self, rgb: torch.Tensor, x3: torch.Tensor, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``rgb``, ``x3`` (B, 3, H, W) normalised images -> ``(S_map, S)`` for the batch ``[rgb; x]``:
        ``S_map`` (2B, h, w, text_dim) and ``S`` (2B, text_dim), unit length."""
        from .lora import activate_adapter

        if modality not in self.pool:
            raise ValueError(f"MA-CLIP has no LoRA for modality '{modality}'; its pool: {list(self.pool)}")
        activate_adapter(self.trunk, modality)
        both = torch.cat([rgb, x3])
        if tuple(both.shape[-2:]) != self.image_size:
            both = F.interpolate(both, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
        tokens = self.trunk(both)[-1].permute(0, 2, 3, 1)  # last stage, (2B, h, w, C)
        s_map = self.proj(self.norm(tokens))
        return s_map, F.normalize(s_map.mean(dim=(1, 2)), dim=-1)


# --------------------------------------------------------------------------- III-C prompts


class ControlPrompts(nn.Module):
    """Stage-specific control prompts: ``MLP(S)`` -> (B, K, width)."""

    def __init__(self, text_dim: int, hidden: int, tokens: int, width: int):
        super().__init__()
        self.tokens, self.width = int(tokens), int(width)
        self.mlp = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(), nn.Linear(hidden, self.tokens * self.width))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.mlp(s).reshape(s.shape[0], self.tokens, self.width)


# --------------------------------------------------------------------------- III-D DSRM


class DSRM(nn.Module):
    """Domain-specific refinement of a modality's last-stage tokens with its MA-CLIP map (eq. 2-7).

    Channel attention (eq. 2-4): ``chi = softmax(MLP(GAP(F)))`` weighs K learnable universal prompts
    U (K, C, s, s) into one prompt map, resized to F's grid; ``Q_c = W_c^Q (chi . U)``, ``K_c = W_c^K F``,
    ``V_c = W_c^V F``, all (B, C, N); per head, ``A = softmax(norm(Q_c) norm(K_c)^T * tau)`` (C/h x C/h,
    queries and keys L2-normalised over N, a learned temperature per head, as transposed attention is
    usually made scale-free in N) and ``F_c = A V_c``.
    Spatial attention (eq. 5-7): ``Q_s = W_s^Q MLP(S)`` on the MA-CLIP token map, resized to F's grid,
    ``K_s = W_s^K F_c``, ``V_s = W_s^V F_c``, multi-head cross-attention over the N positions -> F_s.
    The output is ``F + W_o F_s`` with ``W_o`` zero-initialised, so a fresh DSRM leaves F as it is.
    ``s_map=None`` (the ablation without MA-CLIP) takes the spatial queries from F_c itself.
    """

    def __init__(self, dim: int, text_dim: int, num_prompts: int = 8, prompt_size: int = 4, heads: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dsrm.heads ({heads}) must divide the last stage's width {dim}")
        self.heads = int(heads)
        self.indicator = nn.Sequential(nn.Linear(dim, dim // 4 or 1), nn.GELU(), nn.Linear(dim // 4 or 1, num_prompts))
        self.universal = nn.Parameter(torch.randn(num_prompts, dim, prompt_size, prompt_size) * 0.02)
        self.q_c = nn.Conv2d(dim, dim, 1)
        self.kv_c = nn.Conv2d(dim, 2 * dim, 1)
        self.temperature = nn.Parameter(torch.ones(self.heads, 1, 1))
        self.s_mlp = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.q_s = nn.Linear(dim, dim)
        self.kv_s = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.last_indicator: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, s_map: torch.Tensor | None) -> torch.Tensor:
        """``x`` (B, H, W, C) tokens, ``s_map`` (B, h, w, text_dim) or None -> refined (B, H, W, C)."""
        b, h, w, c = x.shape
        f = x.permute(0, 3, 1, 2)  # B, C, H, W
        chi = self.indicator(f.mean(dim=(2, 3))).softmax(dim=-1)  # B, K
        self.last_indicator = chi.detach()
        prompt = torch.einsum("bk,kchw->bchw", chi, self.universal.to(chi.dtype))
        # W_c^Q (a 1x1 conv) commutes with the bilinear resize: applied on the s x s prompt map, it is cheap
        q = F.interpolate(self.q_c(prompt), size=(h, w), mode="bilinear", align_corners=False)
        q = q.reshape(b, self.heads, c // self.heads, h * w)
        k, v = self.kv_c(f).reshape(b, 2, self.heads, c // self.heads, h * w).unbind(1)
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.temperature
        f_c = (attn.softmax(dim=-1) @ v).reshape(b, c, h * w).transpose(1, 2)  # B, N, C

        if s_map is None:
            q_s = self.q_s(f_c)
        else:  # eq. 5: W_s^Q Reshape(MLP(S)), on MA-CLIP's own grid, then resized to F's N positions
            q_s = self.q_s(self.s_mlp(s_map.to(x.dtype))).permute(0, 3, 1, 2)
            q_s = F.interpolate(q_s, size=(h, w), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
        q_s = q_s.reshape(b, h * w, self.heads, -1).transpose(1, 2)
        k_s, v_s = self.kv_s(f_c).reshape(b, h * w, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        f_s = F.scaled_dot_product_attention(q_s, k_s, v_s).transpose(1, 2).reshape(b, h, w, c)
        return x + self.out(f_s)


# --------------------------------------------------------------------------- head


class MLPHead(nn.Module):
    """SegFormer's all-MLP decoder over four fused stages -> per-pixel text-space embeddings.

    Each stage is linearly projected to ``channels``, upsampled to the first stage's grid (stride 4),
    concatenated, fused by a 1x1 conv + BatchNorm + ReLU, then a 1x1 conv to ``text_dim``. Class logits
    are ``exp(logit_scale) * cos(embedding, class-name embedding)`` (:meth:`classify`), so any class set
    whose names were embedded can be scored by the same weights.
    """

    def __init__(self, dims: list[int], channels: int, text_dim: int, dropout: float = 0.1):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(d, channels, 1) for d in dims)
        self.fuse = nn.Sequential(
            nn.Conv2d(len(dims) * channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)
        )
        self.dropout = nn.Dropout2d(dropout)
        self.embed = nn.Conv2d(channels, text_dim, 1)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / 0.07)))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        ups = [
            F.interpolate(lat(f), size=size, mode="bilinear", align_corners=False) if i else lat(f)
            for i, (lat, f) in enumerate(zip(self.lateral, feats))
        ]
        return self.embed(self.dropout(self.fuse(torch.cat(ups, dim=1))))

    def classify(self, embedding: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) embeddings x (K, D) class-name embeddings -> (B, K, h, w) logits."""
        e = F.normalize(embedding, dim=1)
        t = F.normalize(text.to(e.dtype), dim=-1)
        return self.logit_scale.exp().clamp(max=100.0) * torch.einsum("bdhw,kd->bkhw", e, t)

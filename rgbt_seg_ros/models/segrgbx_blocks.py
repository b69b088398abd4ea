"""Building blocks of the SegRGB-X backend (``segrgbx.py``): MA-CLIP, prompts, gated FRM, DSRM, the MLP head.

Paper: "SegRGB-X: General RGB-X Semantic Segmentation Model" (arXiv 2603.28023), sections III-B..III-D.
What departs from it, and why, is listed in models/README.md.

* MA-CLIP (III-B), two encoders with one interface (``embed_dim``, ``forward(rgb, x3, modality) ->
  (S_map, S)``, ``embed_captions``, ``pretrain_parameters``):

  - :class:`MAClipCLIP`: a real CLIP read with ``transformers`` from a local directory (``ma_clip.clip_dir``),
    image and text encoders frozen, a **LoRA pool** (one adapter per X modality on the vision encoder's
    attention projections, selected for an RGB-X pair and used for both of its images, Fig. 3). ``S`` is
    CLIP's image embedding, ``S_map`` its patch tokens through the same final norm and projection; the
    captions are embedded by CLIP's own text encoder.
  - :class:`MAClipHiera`: the **offline stand-in** when no CLIP is given: a second SAM2 Hiera trunk (same
    file as the backbone, frozen) with the LoRA pool, and a LayerNorm + linear projection of its last-stage
    tokens into the space of the offline caption encoder (MiniLM, 384-d). Not a CLIP: it learns the text
    alignment only in the pretraining stage.

* :func:`prompted_block` and :class:`ControlPrompts` (III-C): prompt tokens enter a Hiera block's
  attention through a **zero-initialised gate** per head (LLaMA-Adapter's zero-init attention, see
  ``sam2_encoder.SplitQKVAttention``), so a fresh model computes the trunk's own features.
* :class:`GatedRectify`: CMX's FRM with its cross terms scaled by a **zero-initialised per-channel gate**
  (LayerScale at 0): the identity at init, so the next stage sees the trunk's own features.
* :class:`DSRM` (III-D, structure (h) of Table IV): soft indicator ``softmax(MLP(GAP(F)))`` over K
  learnable universal prompts U, a prompt-derived query for channel attention over F, then spatial
  cross-attention whose queries come from the MA-CLIP map of the same modality; the result is added
  to F through a zero-initialised projection.
* :class:`MLPHead`: SegFormer's all-MLP head over the four fused stages, ending in a linear classifier
  (``head.classifier: linear``) or in a per-pixel embedding scored by cosine similarity against the
  class names' text embeddings (``cosine``, for several label spaces).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .fusion import FeatureRectifyModule

#: OpenAI CLIP's image normalisation, used when the CLIP directory has no preprocessor_config.json
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: ``lora.targets`` names -> the attention Linears of a transformers CLIP layer
CLIP_LORA_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "proj": "out_proj"}


def prompted_block(
    block: nn.Module, x: torch.Tensor, prompts: torch.Tensor | None, gate: torch.Tensor | None = None
) -> torch.Tensor:
    """One Hiera block with prompt tokens (B, K, C) entering its attention (III-C).

    The prompts are normalised by the block's ``norm1`` (the paper's sequence ``[E; M]`` shares the
    block's layers), projected by the block's own k and v, and every patch token of sample b attends to
    sample b's prompts wherever its window is (Hiera attends within windows; global blocks alike). That
    attention has a softmax of its own and is added to the window attention, weighted per head by
    ``tanh(gate)`` (``gate`` (heads,), zero-initialised; ``SplitQKVAttention.forward``; None: weight 1,
    ungated). No output is
    computed for the prompts (the paper discards ``O_M``). At ``gate = 0`` this is ``block(x)`` exactly:
    same operations in the same order as sam2's ``MultiScaleBlock.forward``.
    """
    if prompts is None:
        return block(x)
    from sam2.modeling.backbones.hieradet import do_pool
    from sam2.modeling.backbones.utils import window_partition, window_unpartition

    shortcut = x
    xn = block.norm1(x)
    if block.dim != block.dim_out:
        shortcut = do_pool(block.proj(xn), block.pool)
    y, window_size = xn, block.window_size
    if window_size > 0:
        h, w = y.shape[1], y.shape[2]
        y, pad_hw = window_partition(y, window_size)
    y = block.attn(y, block.norm1(prompts), None if gate is None else torch.tanh(gate))
    if block.q_stride and block.window_size > 0:  # q pooling shrank the windows
        window_size = block.window_size // block.q_stride[0]
        h, w = shortcut.shape[1:3]
        pad_hw = (h + (window_size - h % window_size) % window_size, w + (window_size - w % window_size) % window_size)
    if block.window_size > 0:
        y = window_unpartition(y, window_size, pad_hw, (h, w))
    t = shortcut + block.drop_path(y)
    return t + block.drop_path(block.mlp(block.norm2(t)))


# --------------------------------------------------------------------------- MA-CLIP


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


class MAClipHiera(nn.Module):
    """The offline MA-CLIP stand-in (no CLIP available): frozen Hiera trunk + LoRA pool + projection.

    ``trunk``: a Hiera trunk with split q/k/v and a LoRA adapter per pool entry (``lora.py``);
    ``text_dim``: the caption encoder's width (MiniLM: 384). It sees the pair at ``image_size``.
    """

    kind = "hiera"

    def __init__(self, trunk: nn.Module, pool: tuple[str, ...], image_size: tuple[int, int], text_dim: int):
        super().__init__()
        self.trunk = trunk
        self.pool = tuple(pool)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        width = trunk.blocks[trunk.stage_ends[-1]].dim_out
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, text_dim)
        self.embed_dim = int(text_dim)

    def _check(self, modality: str) -> None:
        if modality not in self.pool:
            raise ValueError(f"MA-CLIP has no LoRA for modality '{modality}'; its pool: {list(self.pool)}")

    def forward(self, rgb: torch.Tensor, x3: torch.Tensor, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``rgb``, ``x3`` (B, 3, H, W) normalised images -> ``(S_map, S)`` for the batch ``[rgb; x]``:
        ``S_map`` (2B, h, w, text_dim) and ``S`` (2B, text_dim), unit length. The pair's LoRA is merged
        into one fused q/k/v weight per block (differentiable while it trains)."""
        from .lora import modality_batch

        self._check(modality)
        both = torch.cat([rgb, x3])
        if tuple(both.shape[-2:]) != self.image_size:
            both = F.interpolate(both, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
        with modality_batch(self.trunk, (modality,)):
            tokens = self.trunk(both)[-1].permute(0, 2, 3, 1)  # last stage, (2B, h, w, C)
        s_map = self.proj(self.norm(tokens))
        return s_map, _unit_rows(s_map.mean(dim=(1, 2)))

    def embed_captions(self, captions: list[str]) -> torch.Tensor:
        """Caption embeddings (N, text_dim), unit rows, from the offline MiniLM encoder."""
        from .text_teacher import sentence_embeddings

        return sentence_embeddings(captions, "minilm")

    def pretrain_parameters(self, has_base_weights: bool) -> list[nn.Parameter]:
        """The LoRA pool, the norm and the projection; the trunk too when it has no base weights (a random
        frozen trunk gives random features)."""
        return [
            p for n, p in self.named_parameters() if not n.startswith("trunk.") or ".lora_" in n or not has_base_weights
        ]


class MAClipCLIP(nn.Module):
    """MA-CLIP on a real CLIP read with ``transformers`` from ``clip_dir`` (no download).

    The vision tower and its projection (``vision_model``, ``visual_projection`` of ``CLIPModel``) are
    frozen and get the LoRA pool on their attention projections (``lora``: ``{rank, alpha, targets}``); the
    text tower and tokenizer are read from the same directory when captions are first embedded and are not
    part of the module's state. ``normalization``: the model config's, undone before CLIP's own (thermal in
    [0, 1] is repeated to three channels and normalised like an image). The pair is resized to CLIP's
    image size.
    """

    kind = "clip"

    def __init__(self, clip_dir: str, pool: tuple[str, ...], lora: dict, normalization: dict):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        self.clip_dir = str(Path(clip_dir).expanduser())
        clip = self._load()
        self.vision_model, self.visual_projection = clip.vision_model, clip.visual_projection
        del clip  # the text tower is read again only to embed captions
        self.pool = tuple(pool)
        size = int(self.vision_model.config.image_size)
        self.image_size = (size, size)
        self.embed_dim = int(self.visual_projection.out_features)
        for p in self.parameters():
            p.requires_grad_(False)
        targets = [CLIP_LORA_TARGETS.get(t) for t in lora["targets"]]
        if not targets or None in targets:
            raise ValueError(f"ma_clip.lora.targets must be a non-empty subset of {sorted(CLIP_LORA_TARGETS)}")
        pattern = r"vision_model\.encoder\.layers\.\d+\.self_attn\.(" + "|".join(sorted(set(targets))) + ")"
        config = LoraConfig(r=int(lora["rank"]), lora_alpha=float(lora["alpha"]), target_modules=pattern)
        for name in self.pool:
            inject_adapter_in_model(config, self, adapter_name=name)
        mean, std = self._clip_normalisation()
        rgb_n, th_n = normalization["rgb"], normalization["thermal"]
        # x_clip = x * scale + shift, per channel: undo the config's normalisation, apply CLIP's
        for name, m_in, s_in in (
            ("rgb", list(rgb_n["mean"]), list(rgb_n["std"])),
            ("x", list(th_n["mean"]) * 3, list(th_n["std"]) * 3),
        ):
            m_in, s_in = torch.tensor(m_in[:3], dtype=torch.float32), torch.tensor(s_in[:3], dtype=torch.float32)
            self.register_buffer(f"_scale_{name}", (s_in / std).view(1, 3, 1, 1), persistent=False)
            self.register_buffer(f"_shift_{name}", ((m_in - mean) / std).view(1, 3, 1, 1), persistent=False)
        self._text: dict = {}  # text tower, tokenizer: loaded on first use, not module state

    def _load(self):
        from transformers import CLIPModel

        if not (Path(self.clip_dir) / "config.json").is_file():
            raise FileNotFoundError(
                f"ma_clip.clip_dir {self.clip_dir} is not a CLIP model directory (no config.json); give a directory "
                "written by transformers' CLIPModel.save_pretrained (nothing is downloaded)"
            )
        return CLIPModel.from_pretrained(self.clip_dir)

    def _clip_normalisation(self) -> tuple[torch.Tensor, torch.Tensor]:
        path = Path(self.clip_dir) / "preprocessor_config.json"
        mean, std = CLIP_MEAN, CLIP_STD
        if path.is_file():
            pre = json.loads(path.read_text())
            mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
        return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)

    def forward(self, rgb: torch.Tensor, x3: torch.Tensor, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``rgb``, ``x3`` (B, 3, H, W) normalised as the model config says -> ``(S_map, S)`` for ``[rgb; x]``:
        ``S_map`` (2B, g, g, projection_dim) (the patch tokens through CLIP's final norm and projection) and
        ``S`` (2B, projection_dim), CLIP's image embedding, unit length."""
        from .lora import activate_adapter

        if modality not in self.pool:
            raise ValueError(f"MA-CLIP has no LoRA for modality '{modality}'; its pool: {list(self.pool)}")
        activate_adapter(self, modality)
        both = torch.cat([rgb * self._scale_rgb + self._shift_rgb, x3 * self._scale_x + self._shift_x])
        if tuple(both.shape[-2:]) != self.image_size:
            both = F.interpolate(both, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        hidden = self.vision_model(pixel_values=both.to(self.visual_projection.weight.dtype)).last_hidden_state
        tokens = self.visual_projection(self.vision_model.post_layernorm(hidden))  # (2B, 1 + g * g, P)
        g = int(round(math.sqrt(tokens.shape[1] - 1)))
        s_map = tokens[:, 1:].reshape(tokens.shape[0], g, g, -1)
        return s_map, _unit_rows(tokens[:, 0])

    def embed_captions(self, captions: list[str]) -> torch.Tensor:
        """Caption embeddings (N, projection_dim), unit rows, from CLIP's frozen text tower."""
        from transformers import AutoTokenizer

        if not self._text:
            try:
                tokenizer = AutoTokenizer.from_pretrained(self.clip_dir)
            except (OSError, ValueError) as exc:
                raise ValueError(f"ma_clip.clip_dir {self.clip_dir} has no usable CLIP tokenizer: {exc}") from exc
            clip = self._load()
            text = nn.ModuleDict({"model": clip.text_model, "projection": clip.text_projection}).eval()
            for p in text.parameters():
                p.requires_grad_(False)
            self._text.update(tokenizer=tokenizer, tower=text)
        tower, tokenizer = self._text["tower"], self._text["tokenizer"]
        device = self.visual_projection.weight.device
        tower.to(device)
        limit = int(tower["model"].config.max_position_embeddings)
        batch = tokenizer(list(captions), padding=True, truncation=True, max_length=limit, return_tensors="pt")
        with torch.no_grad():
            out = tower["model"](
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            )
            return _unit_rows(tower["projection"](out.pooler_output).float())

    def pretrain_parameters(self, has_base_weights: bool) -> list[nn.Parameter]:
        """The LoRA pool only: CLIP's own weights stay frozen (III-B)."""
        return [p for n, p in self.named_parameters() if ".lora_" in n]


# --------------------------------------------------------------------------- III-C prompts


class ControlPrompts(nn.Module):
    """Stage-specific control prompts: ``MLP(S)`` -> (B, K, width)."""

    def __init__(self, s_dim: int, hidden: int, tokens: int, width: int):
        super().__init__()
        self.tokens, self.width = int(tokens), int(width)
        self.mlp = nn.Sequential(nn.Linear(s_dim, hidden), nn.GELU(), nn.Linear(hidden, self.tokens * self.width))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.mlp(s).reshape(s.shape[0], self.tokens, self.width)


# --------------------------------------------------------------------------- FRM with a zero gate


class GatedRectify(FeatureRectifyModule):
    """CMX's FRM (``fusion.FeatureRectifyModule``: channel weights from an avg+max pooled MLP, spatial weights
    from 1x1 convs) with its cross terms scaled by a per-channel gate that starts at zero:

        x_rgb' = x_rgb + g_rgb * (lc * cw_x * x_x + ls * sw_x * x_x)      and symmetrically for X.

    At init the stage's streams leave it unchanged (the next Hiera stage sees the trunk's own features);
    the gate's gradient is the cross term, non-zero from the first step. ``valid`` (B, 1, H, W) masks the
    X stream in everything that reaches RGB, and what X receives."""

    def __init__(self, dim: int, reduction: int = 1, lambda_c: float = 0.5, lambda_s: float = 0.5):
        super().__init__(dim, reduction, float(lambda_c), float(lambda_s))
        self.gate = nn.Parameter(torch.zeros(2, dim, 1, 1))  # [0]: into RGB, [1]: into X

    def forward(
        self, x_rgb: torch.Tensor, x_x: torch.Tensor, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) streams -> rectified (B, C, H, W). Computed channels-last (the 1x1 convs as linear
        maps, the gated cross terms by ``addcmul``): the streams come from Hiera's (B, H, W, C) tokens."""
        r, x = x_rgb.permute(0, 2, 3, 1), x_x.permute(0, 2, 3, 1)
        x_m = x if valid is None else x * valid.permute(0, 2, 3, 1)
        b, c = r.shape[0], r.shape[-1]
        both = torch.cat([r, x_m], dim=-1)
        pooled = torch.cat([both.mean(dim=(1, 2)), both.amax(dim=(1, 2))], dim=1)
        cw = self.channel_mlp(pooled).view(b, 1, 1, 2, c)  # [..., 0, :] weighs RGB, [..., 1, :] weighs X
        conv1, conv2 = self.spatial[0], self.spatial[2]
        sw = F.linear(F.relu(F.linear(both, conv1.weight.flatten(1), conv1.bias)), conv2.weight.flatten(1), conv2.bias)
        sw = torch.sigmoid(sw)  # (B, H, W, 2)
        gate = self.gate.view(2, c)
        to_rgb = (self.lambda_c * cw[..., 1, :] + self.lambda_s * sw[..., 1:2]) * gate[0]
        to_x = (self.lambda_c * cw[..., 0, :] + self.lambda_s * sw[..., 0:1]) * gate[1]
        if valid is not None:
            to_x = to_x * valid.permute(0, 2, 3, 1)
        return torch.addcmul(r, to_rgb, x_m).permute(0, 3, 1, 2), torch.addcmul(x, to_x, r).permute(0, 3, 1, 2)


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
    A batch ``[F^r; F^m]`` with ``[S^r; S^m]`` is Fig. 4's two DSRM blocks with shared weights.
    """

    def __init__(self, dim: int, s_dim: int, num_prompts: int = 8, prompt_size: int = 4, heads: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dsrm.heads ({heads}) must divide the last stage's width {dim}")
        self.heads = int(heads)
        self.indicator = nn.Sequential(nn.Linear(dim, dim // 4 or 1), nn.GELU(), nn.Linear(dim // 4 or 1, num_prompts))
        self.universal = nn.Parameter(torch.randn(num_prompts, dim, prompt_size, prompt_size) * 0.02)
        self.q_c = nn.Conv2d(dim, dim, 1)
        self.kv_c = nn.Conv2d(dim, 2 * dim, 1)
        self.temperature = nn.Parameter(torch.ones(self.heads, 1, 1))
        self.s_mlp = nn.Sequential(nn.Linear(s_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.q_s = nn.Linear(dim, dim)
        self.kv_s = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.last_indicator: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, s_map: torch.Tensor | None) -> torch.Tensor:
        """``x`` (B, H, W, C) tokens, ``s_map`` (B, h, w, s_dim) or None -> refined (B, H, W, C)."""
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

CLASSIFIERS = ("auto", "linear", "cosine")


class MLPHead(nn.Module):
    """SegFormer's all-MLP decoder over four fused stages.

    Each stage is linearly projected to ``channels``, upsampled to the first stage's grid (stride 4),
    concatenated, fused by a 1x1 conv + BatchNorm + ReLU, then a 1x1 conv to ``out_dim``:

    * ``cosine=False`` (``head.classifier: linear``): ``out_dim`` = the number of classes, the output is
      the logits (SegFormer's own classifier);
    * ``cosine=True``: ``out_dim`` = the text width, a per-pixel embedding; :meth:`classify` scores it
      against class-name embeddings, ``exp(logit_scale) * cos(embedding, name)``, so any class set whose
      names were embedded is scored by the same weights.
    """

    def __init__(self, dims: list[int], channels: int, out_dim: int, dropout: float = 0.1, cosine: bool = False):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(d, channels, 1) for d in dims)
        self.fuse = nn.Sequential(
            nn.Conv2d(len(dims) * channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)
        )
        self.dropout = nn.Dropout2d(dropout)
        self.embed = nn.Conv2d(channels, out_dim, 1)
        self.cosine = bool(cosine)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / 0.07))) if cosine else None

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """SegFormer's ``fuse(cat_i(up(lateral_i(F_i))))``, computed with the fuse conv's 1x1 weight split per
        stage and folded into that stage's lateral weight: 1x1 convs and bilinear upsampling commute (both
        linear, the interpolation weights sum to 1), so each stage is projected once, at its own resolution,
        and the upsampled maps are summed. Same function and parameters, without the concatenated map."""
        size = feats[0].shape[-2:]
        conv, norm, act = self.fuse
        blocks = conv.weight.flatten(1).split(self.lateral[0].out_channels, dim=1)
        out = None
        for i, (lat, f, w_i) in enumerate(zip(self.lateral, feats, blocks)):
            weight, bias = w_i @ lat.weight.flatten(1), w_i @ lat.bias
            y = F.linear(f.permute(0, 2, 3, 1), weight, bias).permute(0, 3, 1, 2)  # a 1x1 conv, channels last
            if i:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            out = y if out is None else out + y
        return self.embed(self.dropout(act(norm(out))))

    def classify(self, embedding: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) embeddings x (K, D) class-name embeddings -> (B, K, h, w) logits (cosine head)."""
        if not self.cosine:
            raise RuntimeError("classify() scores against class names: the head was built with classifier 'linear'")
        e = F.normalize(embedding, dim=1)
        t = F.normalize(text.to(e.dtype), dim=-1)
        return self.logit_scale.exp().clamp(max=100.0) * torch.einsum("bdhw,kd->bkhw", e, t)

"""SAM2 image encoder (Hiera trunk + FpnNeck) built from the sam2 package's own configs.

The encoder is instantiated from the ``model.image_encoder`` node of the YAML files that ship
inside the installed ``sam2`` package (``sam2/configs/sam2.1/*.yaml``), so the architecture of
``hiera_tiny`` here is the architecture the official ``sam2.1_hiera_tiny.pt`` was trained with.
Small models for tests and demos are the same classes with trunk/neck overrides.

Only modelling modules of sam2 are imported (``sam2.modeling...``); the transforms and
predictors need torchvision, which this project does not install.

Hiera's attention computes q, k and v with one fused ``qkv`` Linear. LoRA on the query and
value projections only (the SARTM paper) needs them as separate layers, so
:func:`split_fused_qkv` replaces every block's attention by :class:`SplitQKVAttention`, which
holds three Linears with the rows of the fused weight and computes the same attention.
Official checkpoints are remapped accordingly on load (see ``sam2_checkpoint.py``).

For inference the three projections can also run as one fused matmul per *group* of the batch
(:meth:`SplitQKVAttention.set_group_weights`): the batch is split into M equal, contiguous
groups and group m is projected with its own (3 * dim_out, dim) weight. Hiera's window
partitioning keeps the batch order (windows of sample 0, then of sample 1, ...), so a batch
``[rgb; thermal]`` stays two contiguous halves in every block. ``lora.modality_batch`` uses
this to run both modalities, each with its own LoRA merged in, through the trunk in one pass.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: Short names accepted in model configs -> config files inside the sam2 package.
SAM2_CONFIG_ALIASES = {
    "hiera_tiny": "sam2.1/sam2.1_hiera_t.yaml",
    "hiera_small": "sam2.1/sam2.1_hiera_s.yaml",
    "hiera_base_plus": "sam2.1/sam2.1_hiera_b+.yaml",
    "hiera_large": "sam2.1/sam2.1_hiera_l.yaml",
}


def sam2_config_dir() -> Path:
    """Directory of the YAML configs inside the installed sam2 package."""
    import sam2

    return Path(sam2.__path__[0]) / "configs"


def resolve_sam2_config(name: str) -> Path:
    """Path of a SAM2 config given an alias (``hiera_tiny``) or a path relative to sam2/configs."""
    rel = SAM2_CONFIG_ALIASES.get(name, name)
    if not rel.endswith(".yaml"):
        rel = rel + ".yaml"
    for candidate in (sam2_config_dir() / rel, sam2_config_dir() / "sam2.1" / rel):
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"unknown SAM2 config '{name}'; use one of {', '.join(SAM2_CONFIG_ALIASES)} "
        f"or a file under {sam2_config_dir()} such as 'sam2.1/sam2.1_hiera_t.yaml'"
    )


def image_encoder_config(name: str, trunk: dict | None = None, neck: dict | None = None) -> dict:
    """The ``model.image_encoder`` node of a SAM2 config as a plain dict, with overrides merged.

    ``trunk`` overrides Hiera arguments (embed_dim, num_heads, stages, ...); ``neck`` overrides
    FpnNeck arguments (d_model, backbone_channel_list, ...). When ``neck.d_model`` changes, the
    sine position encoding follows it (FpnNeck requires ``num_pos_feats == d_model``).
    """
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(OmegaConf.load(resolve_sam2_config(name)).model.image_encoder, resolve=True)
    node = copy.deepcopy(node)
    node["trunk"].update(copy.deepcopy(trunk or {}))
    neck = copy.deepcopy(neck or {})
    node["neck"].update(neck)
    node["neck"]["position_encoding"]["num_pos_feats"] = node["neck"]["d_model"]
    # sam2 warms a CUDA cache at construction when CUDA exists; the device is ours to choose.
    node["neck"]["position_encoding"]["warmup_cache"] = False
    return node


def build_image_encoder(name: str, trunk: dict | None = None, neck: dict | None = None) -> nn.Module:
    """Instantiate sam2's ``ImageEncoder`` (Hiera + FpnNeck) and split its fused qkv layers.

    The result returns ``backbone_fpn`` at strides 4, 8 and 16 with ``d_model`` channels
    (the stride-32 level is dropped by the config's ``scalp: 1``).
    """
    from hydra.utils import instantiate

    node = image_encoder_config(name, trunk, neck)
    trunk_cfg = node["trunk"]
    n_blocks = sum(trunk_cfg.get("stages", (2, 3, 16, 3)))
    dims = [trunk_cfg["embed_dim"] * int(trunk_cfg.get("dim_mul", 2.0)) ** i for i in range(4)]
    if list(reversed(dims)) != list(node["neck"]["backbone_channel_list"]):
        raise ValueError(
            f"SAM2 encoder '{name}': neck.backbone_channel_list {node['neck']['backbone_channel_list']} does not "
            f"match the trunk's stage widths {list(reversed(dims))}; set it in the encoder.neck overrides"
        )
    bad = [b for b in trunk_cfg.get("global_att_blocks", ()) if b >= n_blocks]
    if bad:
        raise ValueError(f"SAM2 encoder '{name}': global_att_blocks {bad} exceed the {n_blocks} trunk blocks")
    encoder = instantiate(node, _convert_="all")
    split_fused_qkv(encoder.trunk)
    return encoder


class SplitQKVAttention(nn.Module):
    """Hiera ``MultiScaleAttention`` with separate q, k and v Linears (same maths).

    The fused layer's output is reshaped to (B, N, 3, heads, C), so rows ``[0, d)`` of its
    weight are q, ``[d, 2d)`` k and ``[2d, 3d)`` v. Splitting lets LoRA target q and v alone.
    """

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_pool: nn.Module | None = None):
        super().__init__()
        self.dim = dim
        self.dim_out = dim_out
        self.num_heads = num_heads
        self.q_pool = q_pool
        self.q = nn.Linear(dim, dim_out)
        self.k = nn.Linear(dim, dim_out)
        self.v = nn.Linear(dim, dim_out)
        self.proj = nn.Linear(dim_out, dim_out)
        self._group_w: torch.Tensor | None = None  # (M, 3 * dim_out, dim): per-group fused qkv weight
        self._group_b: torch.Tensor | None = None  # (M, 1, 3 * dim_out)

    def set_group_weights(self, weight: torch.Tensor | None, bias: torch.Tensor | None = None) -> None:
        """Use one fused qkv projection per batch group (``weight`` (M, 3 * dim_out, dim), ``bias``
        (M, 3 * dim_out)) instead of the q, k, v Linears; None restores the Linears."""
        if weight is None:
            self._group_w = self._group_b = None
            return
        if weight.ndim != 3 or tuple(weight.shape[1:]) != (3 * self.dim_out, self.dim):
            raise ValueError(f"group qkv weight must be (M, {3 * self.dim_out}, {self.dim}), got {tuple(weight.shape)}")
        self._group_w = weight
        self._group_b = None if bias is None else bias.reshape(weight.shape[0], 1, -1)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._group_w is None:
            return self.q(x), self.k(x), self.v(x)
        groups = self._group_w.shape[0]
        if groups == 1:  # one group: a plain fused projection, as sam2's own qkv Linear computes it
            b = None if self._group_b is None else self._group_b[0, 0]
            return F.linear(x, self._group_w[0], b).chunk(3, dim=-1)
        if x.shape[0] % groups:
            raise ValueError(f"batch of {x.shape[0]} windows does not split into {groups} equal modality groups")
        xg = x.reshape(groups, -1, self.dim)
        w_t = self._group_w.transpose(1, 2)
        qkv = torch.bmm(xg, w_t) if self._group_b is None else torch.baddbmm(self._group_b, xg, w_t)
        return qkv.reshape(*x.shape[:-1], 3 * self.dim_out).chunk(3, dim=-1)

    @classmethod
    def from_fused(cls, attn: nn.Module) -> SplitQKVAttention:
        """Copy a sam2 ``MultiScaleAttention`` (fused ``qkv``) into the split form."""
        new = cls(attn.dim, attn.dim_out, attn.num_heads, attn.q_pool)
        with torch.no_grad():
            for i, lin in enumerate((new.q, new.k, new.v)):
                rows = slice(i * attn.dim_out, (i + 1) * attn.dim_out)
                lin.weight.copy_(attn.qkv.weight[rows])
                lin.bias.copy_(attn.qkv.bias[rows])
            new.proj.load_state_dict(attn.proj.state_dict())
        return new.to(attn.qkv.weight.device)

    def forward(
        self, x: torch.Tensor, extra: torch.Tensor | None = None, extra_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x`` (B, H, W, dim) tokens (B = windows). Without ``extra``: Hiera's attention, unchanged.

        ``extra`` (B_s, K, dim): prompt tokens per sample (B a multiple of B_s: the windows of sample s
        are contiguous), projected by this layer's own k and v (SegRGB-X's modality prompts). Every
        query of sample s attends to them in a softmax of their own, and that output is added to the
        window attention's, per head weighted by ``extra_scale`` (heads,) (1 when None). SegRGB-X passes
        ``tanh(gate)`` of a zero-initialised gate (LLaMA-Adapter's zero-init attention): at 0 the result
        equals the attention without prompts exactly, and the gate's gradient is the prompt attention's
        output, non-zero from the first step. No output is computed for the prompts themselves
        (SegRGB-X's discarded O_M)."""
        b, h, w, _ = x.shape
        q, k, v = self._qkv(x)
        q = q.reshape(b, h * w, self.num_heads, -1)
        k = k.reshape(b, h * w, self.num_heads, -1)
        v = v.reshape(b, h * w, self.num_heads, -1)
        if self.q_pool is not None:
            # Q pooling at stage changes: (B, H, W, C) -> (B, C, H, W) -> pool -> back.
            q = self.q_pool(q.reshape(b, h, w, -1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, self.num_heads, -1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2)
        if extra is not None:
            out = self._add_prompt_attention(out, q, extra, extra_scale)
        out = out.reshape(b, h, w, -1)
        return self.proj(out)

    def _add_prompt_attention(
        self, out: torch.Tensor, q: torch.Tensor, extra: torch.Tensor, scale: torch.Tensor | None
    ) -> torch.Tensor:
        """``out + scale * softmax(q k_m^T / sqrt(d)) v_m`` per head, for ``out`` and ``q`` (B, N, heads, d).

        A sample's windows are contiguous, so its queries are one (W * N, heads * d) matrix (a view of the
        fused projection's output); with the heads' prompt keys and values laid out block-diagonally (heads
        * d x heads * K, K a handful of tokens), the scores are one matmul, the softmax runs per head over
        its K prompts, and the weighted values are added to ``out`` by one ``baddbmm``: no per-window copies
        of the prompts or the queries."""
        b, n, heads, d = q.shape
        if extra.ndim != 3 or b % extra.shape[0] or extra.shape[-1] != self.dim:
            raise ValueError(f"prompt tokens must be (B, K, {self.dim}) for {b} windows, got {tuple(extra.shape)}")
        samples, tokens = extra.shape[:2]
        _, k_m, v_m = self._qkv(extra)
        k_m = k_m.reshape(samples, tokens, heads, d) * d**-0.5
        v_m = v_m.reshape(samples, tokens, heads, d)
        if scale is not None:
            if scale.shape != (heads,):
                raise ValueError(f"prompt scale must be ({heads},), one per head, got {tuple(scale.shape)}")
            v_m = v_m * scale.to(v_m.dtype).view(1, 1, heads, 1)
        eye = torch.eye(heads, dtype=q.dtype, device=q.device)
        k_bd = torch.einsum("skhi,hg->shigk", k_m, eye).reshape(samples, heads * d, heads * tokens)
        v_bd = torch.einsum("skhi,hg->shkgi", v_m, eye).reshape(samples, heads * tokens, heads * d)
        rows = (b // samples) * n
        # scores transposed, (samples, heads * K, rows): the softmax over a head's K runs along contiguous rows
        scores = torch.bmm(k_bd.transpose(1, 2), q.reshape(samples, rows, heads * d).transpose(1, 2))
        attn = scores.view(samples, heads, tokens, rows).softmax(dim=2).view(samples, heads * tokens, rows)
        return torch.baddbmm(out.reshape(samples, rows, heads * d), attn.transpose(1, 2), v_bd).view(b, n, heads, d)


def split_fused_qkv(trunk: nn.Module) -> int:
    """Replace every Hiera block's fused-qkv attention by :class:`SplitQKVAttention`; returns the count."""
    count = 0
    for block in trunk.blocks:
        if hasattr(block.attn, "qkv"):
            block.attn = SplitQKVAttention.from_fused(block.attn)
            count += 1
    return count

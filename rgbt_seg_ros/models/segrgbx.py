"""SegRGB-X backend: a generalist RGB-X network guided by a modality-aware image-text encoder.

Paper: "SegRGB-X: General RGB-X Semantic Segmentation Model" (arXiv 2603.28023). The blocks are in
``segrgbx_blocks.py``; what had to be interpreted (CLIP and the MiT backbone are not available
offline, Hiera's windowed attention) is listed in models/README.md.

Data flow for an RGB-X pair (X = ``modality``, thermal here):

1. **MA-CLIP** (III-B) encodes both images at a small size with the LoRA of modality X and gives
   token maps and embeddings ``S^r``, ``S^m`` in the caption encoder's text space (MiniLM, 384-d).
   It is pretrained contrastively against captions made from the labels (``training/ma_clip.py``,
   the trainer's first stage) and frozen for segmentation.
2. **Backbone**: the Hiera trunk (the SAM2 image encoder's, loaded from the SAM2 checkpoint) runs the
   two modalities as one batch through shared-weight blocks. In every block, K prompt tokens join the
   attention of every window as extra keys and values (III-C): stage-specific **control prompts**
   (an MLP over MA-CLIP's embedding; ``prompts.pairing`` rgb_dominant, the paper's best, gives both
   branches ``S^r``) and learnable **modality-aligned prompts** P (one set per modality and stage).
   A block reading stage-i tokens (width D_i) gets stage i's prompts.
3. After each stage, **FRM** rectifies the two streams (its output continues into the next stage,
   as in CMX/CMNeXt) and **FFM** merges them into the stage's fused map.
4. After every block of the last stage, the **DSRM** (III-D, one module with shared weights over the
   pairs ``(F^r, S^r)`` and ``(F^m, S^m)``, the "Aligned" pairing of Table VIII) refines each stream.
5. An all-MLP head over the four fused maps gives per-pixel embeddings in the text space; the logits
   of a class set are their cosine similarities with the class names' embeddings. One model holds
   several **class sets** (``class_sets``; the primary is the config's ``classes``) and segments with
   the one chosen by :meth:`select_class_set`: one checkpoint across label spaces (joint training:
   the trainer's ``datasets`` list).

Weights: with ``encoder.checkpoint`` both Hiera trunks (backbone and MA-CLIP) are loaded from it and
frozen (``encoder.freeze``); prompts, control MLPs, FRM/FFM, DSRM and head train; MA-CLIP's LoRA pool
and projection train only in its pretraining stage. ``valid`` zeroes thermal input where the thermal
camera sees nothing and masks the thermal stream inside FRM and FFM.

The output dict holds ``logits`` (the active class set's). The trainer's loss is the ``ce_s0`` term: the
cross-entropy in each dataset's own label space, eq. 8's second term (its first, a CE over the union of the
label spaces, is left out; models/README.md says why).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from .classes import DatasetInfo
from .cpal import CPAL, build_hiera_trunk, trunk_to_official
from .fusion import FeatureFusionModule, FeatureRectifyModule
from .lora import add_modality_lora
from .registry import check_rgbt_inputs, recipe, refuse_frozen_random, register_backend
from .sam2_encoder import split_fused_qkv
from .sartm import SARTM
from .segrgbx_blocks import DSRM, ControlPrompts, MAClip, MLPHead, prompted_block

#: The X modalities the data pipeline delivers today; each names an MA-CLIP LoRA and a prompt set.
X_MODALITIES = ("thermal",)
PAIRINGS = ("rgb_dominant", "aligned", "cross_modal")

SEGRGBX_DEFAULTS = {
    "modality": "thermal",
    "encoder": {
        "sam2_config": "hiera_tiny",  # alias or path under sam2/configs; only the Hiera trunk is used
        "trunk": {},  # Hiera overrides (small test models)
        "checkpoint": None,  # official SAM2 weights: both trunks read image_encoder.trunk.*
        "freeze": True,
    },
    "ma_clip": {
        "enabled": True,
        "image_size": [224, 224],  # MA-CLIP sees the pair at this size (CLIP's)
        "lora": {"rank": 8, "alpha": 8.0, "targets": ["q", "v"]},
        # contrastive pretraining, the trainer's first stage (training/ma_clip.py)
        "pretrain": {"steps": 300, "batch_size": 16, "lr": 1.0e-3, "temperature": 0.07},
    },
    "prompts": {"control_tokens": 4, "aligned_tokens": 4, "hidden": 256, "pairing": "rgb_dominant"},
    "fusion": {"heads": [1, 2, 4, 8], "reduction": 1, "lambda_c": 0.5, "lambda_s": 0.5},
    "dsrm": {"enabled": True, "universal_prompts": 8, "prompt_size": 4, "heads": 4, "pairing": "aligned"},
    "head": {"channels": 128, "dropout": 0.1},
    "language": {"enabled": True, "text_dim": 384, "text_encoder": "minilm"},
    "class_sets": {},  # extra label spaces {name: {name, ignore_index, classes: [...]}}
    # The paper: lr 1e-4, poly 0.9, cross-entropy (eq. 8); optimiser and weight decay unstated (CMNeXt's AdamW 0.01).
    "recipe": recipe("SegRGB-X paper (AdamW and weight decay 0.01 from CMNeXt)", "adamw", 1.0e-4, 0.01, 0.9, "ce"),
}

_SET_NAME = re.compile(r"[A-Za-z0-9_]+")


@register_backend("segrgbx", defaults=SEGRGBX_DEFAULTS, size_multiple=32)
class SegRGBX(nn.Module):
    """The SegRGB-X network. Build it with ``build_model(cfg, dataset_info, text_embeddings)``.

    ``text_embeddings``: the class-name embeddings, a (K, text_dim) tensor for the primary set or a
    dict ``{set name: (K_set, text_dim)}`` for every set; None gives zero buffers that
    ``load_checkpoint`` fills (the trainer and ``Segmenter.from_config`` compute real ones).
    """

    loss_terms = ("ce_s0",)
    #: the trainer runs this stage before segmentation training (training/ma_clip.py)
    pretrain_stage = "ma_clip"

    def __init__(self, cfg: dict, dataset_info: DatasetInfo, text_embeddings=None):
        super().__init__()
        enc_cfg, p_cfg, d_cfg, m_cfg = cfg["encoder"], cfg["prompts"], cfg["dsrm"], cfg["ma_clip"]
        base_path = enc_cfg.get("checkpoint")
        refuse_frozen_random(cfg, "models/segrgbx_micro.yaml", (("encoder", "freeze"),))
        self.modality = str(cfg["modality"])
        if self.modality not in X_MODALITIES:
            raise ValueError(f"segrgbx modality must be one of {list(X_MODALITIES)}, got {self.modality!r}")
        for key, section in (("prompts.pairing", p_cfg), ("dsrm.pairing", d_cfg)):
            if section["pairing"] not in PAIRINGS:
                raise ValueError(f"segrgbx {key} must be one of {list(PAIRINGS)}, got {section['pairing']!r}")
        self.prompt_pairing, self.dsrm_pairing = p_cfg["pairing"], d_cfg["pairing"]
        lang = cfg["language"]
        if not lang["enabled"]:
            raise ValueError(
                "segrgbx needs language.enabled: true: its classes are scored against their names' text embeddings"
            )
        if m_cfg["enabled"] and lang["text_encoder"] != "minilm":
            raise ValueError(
                f"segrgbx: language.text_encoder '{lang['text_encoder']}' cannot embed MA-CLIP's captions; "
                "use 'minilm' (the offline encoder)"
            )
        text_dim = int(lang["text_dim"])
        self._init_class_sets(dataset_info, cfg.get("class_sets") or {}, text_embeddings, text_dim)

        trunk = build_hiera_trunk(enc_cfg["sam2_config"], enc_cfg.get("trunk"))
        if base_path:
            CPAL._load_trunk(trunk, base_path)
        split_fused_qkv(trunk)
        self.trunk = trunk
        base_ids = {id(t) for t in trunk.state_dict(keep_vars=True).values()} if base_path else set()
        ends = list(trunk.stage_ends)
        self.dims = [trunk.blocks[e].dim_out for e in ends]

        self.ma_clip: MAClip | None = None
        if m_cfg["enabled"]:
            clip_trunk = build_hiera_trunk(enc_cfg["sam2_config"], enc_cfg.get("trunk"))
            if base_path:
                CPAL._load_trunk(clip_trunk, base_path)
            split_fused_qkv(clip_trunk)
            if base_path:
                base_ids |= {id(t) for t in clip_trunk.state_dict(keep_vars=True).values()}
            lora = m_cfg["lora"]
            add_modality_lora(clip_trunk, lora["rank"], lora["alpha"], 0.0, lora["targets"], adapters=X_MODALITIES)
            size = m_cfg["image_size"]
            if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(int(s) % 32 == 0 for s in size)):
                raise ValueError(f"ma_clip.image_size must be [H, W], multiples of 32, got {size!r}")
            self.ma_clip = MAClip(clip_trunk, X_MODALITIES, tuple(size), text_dim)
        self._base_tensor_ids = base_ids
        self.has_base_weights = bool(base_path)

        # III-C: a block reading stage-g tokens (width dims[g]) gets stage g's prompts
        self.group_of_block = [self.dims.index(block.dim) for block in trunk.blocks]
        n_ctrl = int(p_cfg["control_tokens"]) if self.ma_clip is not None else 0
        n_aligned = int(p_cfg["aligned_tokens"])
        if n_ctrl < 0 or n_aligned < 0:
            raise ValueError("prompts.control_tokens and prompts.aligned_tokens must be >= 0")
        self.control = nn.ModuleList(
            ControlPrompts(text_dim, int(p_cfg["hidden"]), n_ctrl, d) for d in self.dims if n_ctrl
        )
        self.aligned_prompts = nn.ModuleDict(
            {
                m: nn.ParameterList(nn.Parameter(torch.randn(n_aligned, d) * 0.02) for d in self.dims)
                for m in ("rgb", self.modality)
                if n_aligned
            }
        )

        f_cfg = cfg["fusion"]
        heads = list(f_cfg["heads"])
        if len(heads) != len(self.dims):
            raise ValueError(f"fusion.heads must give one head count per stage ({len(self.dims)}), got {heads}")
        self.frm = nn.ModuleList(
            FeatureRectifyModule(d, int(f_cfg["reduction"]), float(f_cfg["lambda_c"]), float(f_cfg["lambda_s"]))
            for d in self.dims
        )
        self.ffm = nn.ModuleList(
            FeatureFusionModule(d, int(h), int(f_cfg["reduction"])) for d, h in zip(self.dims, heads)
        )
        self.dsrm: DSRM | None = None
        self.dsrm_blocks: frozenset[int] = frozenset()
        if d_cfg["enabled"]:
            self.dsrm = DSRM(
                self.dims[-1], text_dim, int(d_cfg["universal_prompts"]), int(d_cfg["prompt_size"]), int(d_cfg["heads"])
            )
            self.dsrm_blocks = frozenset(i for i in range(ends[-2] + 1, ends[-1] + 1))
        h_cfg = cfg["head"]
        self.head = MLPHead(self.dims, int(h_cfg["channels"]), text_dim, float(h_cfg["dropout"]))
        self.set_trainable(enc_cfg["freeze"])

    # ------------------------------------------------------------------ class sets
    def _init_class_sets(self, primary: DatasetInfo, extra: dict, text_embeddings, text_dim: int) -> None:
        from .class_sets import config_class_sets

        sets = config_class_sets({"class_sets": extra}, primary)  # names checked against their class lists
        for name, info in sets.items():
            if not _SET_NAME.fullmatch(name):
                where = "the model's classes" if info is primary else f"class_sets.{name}"
                raise ValueError(
                    f"class set name '{name}' ({where}: the 'name' of its class file) must be letters, digits "
                    "and '_' only: it names a tensor in the checkpoint"
                )
        if not isinstance(text_embeddings, dict):
            text_embeddings = {} if text_embeddings is None else {primary.name: text_embeddings}
        unknown = sorted(set(text_embeddings) - set(sets))
        if unknown:
            raise ValueError(f"text_embeddings for unknown class set(s) {unknown}; the model's sets: {list(sets)}")
        self.class_sets = sets
        for name, info in sets.items():
            emb = text_embeddings.get(name)
            emb = torch.zeros(info.num_classes, text_dim) if emb is None else torch.as_tensor(emb, dtype=torch.float32)
            if tuple(emb.shape) != (info.num_classes, text_dim):
                raise ValueError(
                    f"text_embeddings of class set '{name}' must be ({info.num_classes}, {text_dim}), "
                    f"got {tuple(emb.shape)}"
                )
            self.register_buffer(f"class_text_{name}", emb.clone())
        self.active_class_set = primary.name

    @property
    def class_set_names(self) -> tuple[str, ...]:
        return tuple(self.class_sets)

    @property
    def num_classes(self) -> int:
        return self.class_sets[self.active_class_set].num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.class_sets[self.active_class_set].class_names

    def class_set_info(self, name: str) -> DatasetInfo:
        if name not in self.class_sets:
            raise ValueError(f"unknown class set '{name}'; this model has {', '.join(self.class_sets)}")
        return self.class_sets[name]

    def select_class_set(self, name: str) -> None:
        """Make ``name`` the set whose logits ``forward`` returns."""
        self.class_set_info(name)
        self.active_class_set = name

    def class_text(self, name: str | None = None) -> torch.Tensor:
        return getattr(self, f"class_text_{name or self.active_class_set}")

    def set_text_embeddings(self, text_embeddings, name: str | None = None) -> None:
        """Replace the class-name embeddings of set ``name`` (default: the primary set)."""
        name = name or next(iter(self.class_sets))
        buf = self.class_text(self.class_set_info(name).name)
        t = torch.as_tensor(text_embeddings, dtype=buf.dtype, device=buf.device)
        if t.shape != buf.shape:
            raise ValueError(f"text_embeddings of class set '{name}' must be {tuple(buf.shape)}, got {tuple(t.shape)}")
        buf.copy_(t)

    # ------------------------------------------------------------------ weights
    def set_trainable(self, freeze_encoder: bool, freeze_transformer: bool | None = None) -> None:
        """Backbone trunk frozen or not; MA-CLIP frozen (its pretraining opens it); the rest trains."""
        for p in self.trunk.parameters():
            p.requires_grad_(not freeze_encoder)
        if self.ma_clip is not None:
            for p in self.ma_clip.parameters():
                p.requires_grad_(False)
        for module in (self.control, self.aligned_prompts, self.frm, self.ffm, self.dsrm, self.head):
            if module is not None:
                for p in module.parameters():
                    p.requires_grad_(True)

    def ma_clip_parameters(self) -> list[nn.Parameter]:
        """What MA-CLIP's pretraining trains: the LoRA pool and the projection, and the trunk only when
        there are no base weights (a random frozen trunk gives random features)."""
        if self.ma_clip is None:
            return []
        return [
            p
            for n, p in self.ma_clip.named_parameters()
            if not n.startswith("trunk.") or ".lora_" in n or not self.has_base_weights
        ]

    frozen_base_state_keys = SARTM.frozen_base_state_keys
    parameter_counts = SARTM.parameter_counts

    def sam2_state_dict(self) -> dict[str, torch.Tensor]:
        """The base Hiera weights in the official SAM2 key layout (``image_encoder.trunk.*``, fused qkv).

        Taken from MA-CLIP's trunk when there is one: its base tensors stay frozen (only its LoRA pool trains),
        so they are the SAM2 file's even when the backbone trunk was fine-tuned (``encoder.freeze: false``).
        """
        if self.ma_clip is None:
            return CPAL.sam2_state_dict(self)
        state = {
            k.replace(".base_layer.", "."): v for k, v in self.ma_clip.trunk.state_dict().items() if ".lora_" not in k
        }
        return trunk_to_official(state)

    # ------------------------------------------------------------------ forward
    def guidance(self, rgb: torch.Tensor, x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """MA-CLIP's ``(S_map, S)`` for the batch ``[rgb; x]``, or None without MA-CLIP."""
        if self.ma_clip is None:
            return None
        return self.ma_clip(rgb, x3, self.modality)

    @staticmethod
    def _pair(values: torch.Tensor, pairing: str) -> torch.Tensor:
        """``[v_r; v_m]`` -> what each branch receives: rgb_dominant [v_r; v_r], aligned as is, cross_modal swapped."""
        v_r, v_m = values.chunk(2)
        if pairing == "rgb_dominant":
            return torch.cat([v_r, v_r])
        if pairing == "cross_modal":
            return torch.cat([v_m, v_r])
        return values

    def _prompts(self, s: torch.Tensor | None, batch: int, dtype) -> list[torch.Tensor] | None:
        """Per stage, the (2B, K, D) prompt tokens of ``[rgb; x]``: control tokens then aligned tokens."""
        groups = []
        for g in range(len(self.dims)):
            parts = []
            if len(self.control) and s is not None:
                parts.append(self.control[g](self._pair(s, self.prompt_pairing).to(dtype)))
            if len(self.aligned_prompts):
                aligned = [self.aligned_prompts[m][g].to(dtype).expand(batch, -1, -1) for m in ("rgb", self.modality)]
                parts.append(torch.cat(aligned))
            if not parts:
                return None
            groups.append(torch.cat(parts, dim=1))
        return groups

    def reference_forward(self, rgb: torch.Tensor, thermal: torch.Tensor) -> torch.Tensor:
        """The bare dual Hiera encoder this backend is built on: both modalities as one batch through the
        same trunk, no MA-CLIP, prompts, fusion, DSRM or head (``rgbt-seg bench model`` times it against
        :meth:`forward`). Returns the last stage's tokens."""
        trunk = self.trunk
        x = trunk.patch_embed(torch.cat([rgb, thermal.expand(-1, 3, -1, -1)]))
        x = x + trunk._get_pos_embed(x.shape[1:3])
        for block in trunk.blocks:
            x = block(x)
        return x

    def forward(self, rgb: torch.Tensor, thermal: torch.Tensor, valid: torch.Tensor | None = None) -> dict:
        """Segment a batch of registered RGB-X pairs -> ``{"logits": (B, K, H, W)}`` (the active class set)."""
        check_rgbt_inputs(rgb, thermal, valid, "SegRGB-X")
        b = rgb.shape[0]
        h, w = rgb.shape[-2:]
        if valid is not None:
            valid = valid.to(thermal.dtype)
            thermal = thermal * valid
        x3 = thermal.expand(-1, 3, -1, -1)
        guide = self.guidance(rgb, x3)
        s_map, s = guide if guide is not None else (None, None)

        trunk = self.trunk
        x = trunk.patch_embed(torch.cat([rgb, x3]))
        x = x + trunk._get_pos_embed(x.shape[1:3])
        prompts = self._prompts(s, b, x.dtype)
        dsrm_map = None if s_map is None else self._pair(s_map, self.dsrm_pairing)
        fused, stage = [], 0
        for i, block in enumerate(trunk.blocks):
            x = prompted_block(block, x, None if prompts is None else prompts[self.group_of_block[i]])
            if i in self.dsrm_blocks:
                x = self.dsrm(x, dsrm_map)
            if i in trunk.stage_ends:
                x_r, x_m = x.permute(0, 3, 1, 2).chunk(2)
                m = None
                if valid is not None:
                    m = F.interpolate(valid, size=x_r.shape[-2:], mode="area").to(x_r.dtype)
                x_r, x_m = self.frm[stage](x_r, x_m, m)
                fused.append(self.ffm[stage](x_r, x_m, m))
                x = torch.cat([x_r, x_m]).permute(0, 2, 3, 1)
                stage += 1
        logits = self.head.classify(self.head(fused), self.class_text())
        return {"logits": F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)}

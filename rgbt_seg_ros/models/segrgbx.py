"""SegRGB-X backend: a generalist RGB-X network guided by a modality-aware image-text encoder.

Paper: "SegRGB-X: General RGB-X Semantic Segmentation Model" (arXiv 2603.28023). The blocks are in
``segrgbx_blocks.py``; what departs from the paper and why (the Hiera trunk for its MiT backbone, the
MA-CLIP stand-in, the zero-initialised gates, LoRA on the trunk, the linear head) is listed in
models/README.md.

Data flow for an RGB-X pair (X = ``modality``, thermal here):

1. **MA-CLIP** (III-B) encodes both images with the LoRA of modality X and gives token maps and
   embeddings ``S^r``, ``S^m``: a real CLIP read from ``ma_clip.clip_dir`` with ``transformers``, or,
   offline, a stand-in (a second Hiera trunk from the SAM2 file projected into MiniLM's caption space).
   It is pretrained contrastively against captions made from the labels (``training/ma_clip.py``, the
   trainer's first stage) and frozen for segmentation.
2. **Backbone**: the Hiera trunk (the SAM2 image encoder's, loaded from the SAM2 checkpoint and frozen,
   with one LoRA on q and v of every block, shared by both modalities as the paper's blocks are) runs the
   two modalities as one batch. In every block, K prompt tokens (III-C) enter the attention: stage-specific
   **control prompts** (an MLP over MA-CLIP's embedding; ``prompts.pairing`` rgb_dominant, the paper's
   best, gives both branches ``S^r``) and learnable **modality-aligned prompts** P (one set per modality
   and stage). Every patch attends to its sample's prompts in a softmax of their own, added to the window
   attention through a zero-initialised gate per head (LLaMA-Adapter's zero-init attention).
3. After each stage, **FRM** (CMX's, its cross terms behind a zero-initialised per-channel gate)
   rectifies the two streams, and its output continues into the next stage, as in CMX/CMNeXt.
4. At the end of stage 4 the **DSRM** (III-D, Fig. 4: one module with shared weights over the pairs
   ``(F_4^r, S^r)`` and ``(F_4^m, S^m)``, the "Aligned" pairing of Table VIII) refines each stream once.
5. **FFM** merges each stage's two streams into a fused map; an all-MLP head over the four fused maps
   gives the logits: a linear classifier (``head.classifier: linear``, a single label space) or cosine
   similarities with the class names' embeddings (``cosine``, which lets one model hold several **class
   sets**, ``class_sets``, chosen by :meth:`select_class_set`: one checkpoint across label spaces).

At init, with official SAM2 weights, every gate, LoRA B and the DSRM's output are zero: the RGB stream's
stage maps (:meth:`stream_features`) are sam2's own ``image_encoder.trunk(rgb)``, and thermal reaches
the output through FFM only until training opens the gates.

Weights: with ``encoder.checkpoint`` the backbone trunk is frozen (``encoder.freeze``) except its LoRA;
LoRA, prompts and their gates, control MLPs, FRM/FFM, DSRM and head train; MA-CLIP's LoRA pool (and the
stand-in's projection) train only in its pretraining stage. ``valid`` zeroes thermal input where the
thermal camera sees nothing and masks the thermal stream inside FRM and FFM.

The output dict holds ``logits`` (the active class set's). The trainer's loss is the ``ce_s0`` term: the
cross-entropy in each dataset's own label space, eq. 8's second term (its first, a CE over the union of the
label spaces, is left out; models/README.md says why).
"""

from __future__ import annotations

import contextlib
import re

import torch
import torch.nn.functional as F
from torch import nn

from .classes import DatasetInfo
from .cpal import CPAL, build_hiera_trunk, trunk_to_official
from .fusion import FeatureFusionModule
from .lora import add_modality_lora, modality_batch
from .registry import check_rgbt_inputs, recipe, refuse_frozen_random, register_backend
from .sam2_encoder import split_fused_qkv
from .sartm import SARTM
from .segrgbx_blocks import (
    CLASSIFIERS,
    DSRM,
    ControlPrompts,
    GatedRectify,
    MAClipCLIP,
    MAClipHiera,
    MLPHead,
    prompted_block,
)

#: The X modalities the data pipeline delivers today; each names an MA-CLIP LoRA and a prompt set.
X_MODALITIES = ("thermal",)
PAIRINGS = ("rgb_dominant", "aligned", "cross_modal")
#: the backbone trunk's one LoRA adapter, shared by both streams (the paper's shared-weight blocks)
BACKBONE_ADAPTER = "backbone"

SEGRGBX_DEFAULTS = {
    "modality": "thermal",
    "encoder": {
        "sam2_config": "hiera_tiny",  # alias or path under sam2/configs; only the Hiera trunk is used
        "trunk": {},  # Hiera overrides (small test models)
        "checkpoint": None,  # official SAM2 weights: the trunks read image_encoder.trunk.*
        "freeze": True,  # the trunk's base weights; its LoRA trains either way
    },
    # LoRA on q and v of every backbone block, one adapter shared by both streams; rank 0 = none
    "lora": {"rank": 16, "alpha": 16.0, "targets": ["q", "v"]},
    "ma_clip": {
        "enabled": True,
        "clip_dir": None,  # a local CLIP (transformers' save_pretrained layout); None = the offline Hiera stand-in
        "image_size": [224, 224],  # the stand-in's input size (CLIP uses its own config's)
        "lora": {"rank": 8, "alpha": 8.0, "targets": ["q", "v"]},
        # contrastive pretraining, the trainer's first stage (training/ma_clip.py)
        "pretrain": {"steps": 300, "batch_size": 16, "lr": 1.0e-3, "temperature": 0.07},
    },
    "prompts": {"control_tokens": 4, "aligned_tokens": 4, "hidden": 256, "pairing": "rgb_dominant"},
    "fusion": {"heads": [1, 2, 4, 8], "reduction": 1, "lambda_c": 0.5, "lambda_s": 0.5},
    "dsrm": {"enabled": True, "universal_prompts": 8, "prompt_size": 4, "heads": 4, "pairing": "aligned"},
    # classifier: linear (one label space), cosine (class-name embeddings; needed by class_sets), auto = linear
    # without class_sets, cosine with them
    "head": {"channels": 128, "dropout": 0.1, "classifier": "auto"},
    "language": {"enabled": True, "text_dim": 384, "text_encoder": "minilm"},
    "class_sets": {},  # extra label spaces {name: {name, ignore_index, classes: [...]}}
    # The paper: lr 1e-4, poly 0.9, cross-entropy (eq. 8); optimiser and weight decay unstated (CMNeXt's AdamW 0.01).
    "recipe": recipe("SegRGB-X paper (AdamW and weight decay 0.01 from CMNeXt)", "adamw", 1.0e-4, 0.01, 0.9, "ce"),
}

_SET_NAME = re.compile(r"[A-Za-z0-9_]+")


def _official_trunk_state(trunk: nn.Module) -> dict[str, torch.Tensor]:
    """A LoRA-carrying trunk's base tensors in the official SAM2 key layout."""
    state = {k.replace(".base_layer.", "."): v for k, v in trunk.state_dict().items() if ".lora_" not in k}
    return trunk_to_official(state)


@contextlib.contextmanager
def base_qkv(trunk: nn.Module):
    """Within the block, every attention of ``trunk`` projects q, k and v with one fused Linear of the base
    weights, LoRA left out: sam2's own Hiera (its ``qkv``). The fused weights are built per call (a copy of
    the attention weights, a few ms next to a forward)."""
    attns = [block.attn for block in trunk.blocks]
    try:
        with torch.no_grad():
            for attn in attns:
                lins = [getattr(lin, "base_layer", lin) for lin in (attn.q, attn.k, attn.v)]
                weight = torch.cat([lin.weight for lin in lins])[None]
                attn.set_group_weights(weight, torch.cat([lin.bias for lin in lins])[None])
        yield trunk
    finally:
        for attn in attns:
            attn.set_group_weights(None)


@register_backend("segrgbx", defaults=SEGRGBX_DEFAULTS, size_multiple=32)
class SegRGBX(nn.Module):
    """The SegRGB-X network. Build it with ``build_model(cfg, dataset_info, text_embeddings)``.

    ``text_embeddings``: the class-name embeddings, a (K, text_dim) tensor for the primary set or a
    dict ``{set name: (K_set, text_dim)}`` for every set; None gives zero buffers that
    ``load_checkpoint`` fills (the trainer and ``Segmenter.from_config`` compute real ones). The linear
    head does not use them; they are kept so every SegRGB-X model answers the same class-set calls.
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
        clip_dir = m_cfg.get("clip_dir")
        classifier = self._classifier(cfg)
        if classifier == "cosine" and not lang["enabled"]:
            raise ValueError(
                "segrgbx head.classifier 'cosine' needs language.enabled: true: its classes are scored against "
                "their names' text embeddings"
            )
        if m_cfg["enabled"] and not clip_dir and lang["text_encoder"] != "minilm":
            raise ValueError(
                f"segrgbx: language.text_encoder '{lang['text_encoder']}' cannot embed the MA-CLIP stand-in's "
                "captions; use 'minilm' (the offline encoder) or give ma_clip.clip_dir"
            )
        text_dim = int(lang["text_dim"])
        self._init_class_sets(dataset_info, cfg.get("class_sets") or {}, text_embeddings, text_dim)

        trunk = build_hiera_trunk(enc_cfg["sam2_config"], enc_cfg.get("trunk"))
        if base_path:
            CPAL._load_trunk(trunk, base_path)
        split_fused_qkv(trunk)
        self.trunk = trunk
        base_ids = {id(t) for t in trunk.state_dict(keep_vars=True).values()} if base_path else set()
        lora = cfg["lora"]
        self.lora_rank = int(lora["rank"])
        if self.lora_rank < 0:
            raise ValueError(f"lora.rank must be >= 0 (0: no LoRA on the backbone), got {self.lora_rank}")
        if self.lora_rank:
            add_modality_lora(trunk, self.lora_rank, lora["alpha"], 0.0, lora["targets"], adapters=(BACKBONE_ADAPTER,))
        ends = list(trunk.stage_ends)
        self.dims = [trunk.blocks[e].dim_out for e in ends]

        self.ma_clip: MAClipHiera | MAClipCLIP | None = None
        if m_cfg["enabled"] and clip_dir:
            self.ma_clip = MAClipCLIP(clip_dir, X_MODALITIES, m_cfg["lora"], cfg["normalization"])
        elif m_cfg["enabled"]:
            clip_trunk = build_hiera_trunk(enc_cfg["sam2_config"], enc_cfg.get("trunk"))
            if base_path:
                CPAL._load_trunk(clip_trunk, base_path)
            split_fused_qkv(clip_trunk)
            if base_path:
                base_ids |= {id(t) for t in clip_trunk.state_dict(keep_vars=True).values()}
            lora_c = m_cfg["lora"]
            add_modality_lora(
                clip_trunk, lora_c["rank"], lora_c["alpha"], 0.0, lora_c["targets"], adapters=X_MODALITIES
            )
            size = m_cfg["image_size"]
            if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(int(s) % 32 == 0 for s in size)):
                raise ValueError(f"ma_clip.image_size must be [H, W], multiples of 32, got {size!r}")
            self.ma_clip = MAClipHiera(clip_trunk, X_MODALITIES, tuple(size), text_dim)
        self._base_tensor_ids = base_ids
        self.has_base_weights = bool(base_path)
        s_dim = self.ma_clip.embed_dim if self.ma_clip is not None else text_dim

        # III-C: a block reading stage-g tokens (width dims[g]) gets stage g's prompts, behind its own gate
        self.group_of_block = [self.dims.index(block.dim) for block in trunk.blocks]
        n_ctrl = int(p_cfg["control_tokens"]) if self.ma_clip is not None else 0
        n_aligned = int(p_cfg["aligned_tokens"])
        if n_ctrl < 0 or n_aligned < 0:
            raise ValueError("prompts.control_tokens and prompts.aligned_tokens must be >= 0")
        self.control = nn.ModuleList(
            ControlPrompts(s_dim, int(p_cfg["hidden"]), n_ctrl, d) for d in self.dims if n_ctrl
        )
        self.aligned_prompts = nn.ModuleDict(
            {
                m: nn.ParameterList(nn.Parameter(torch.randn(n_aligned, d) * 0.02) for d in self.dims)
                for m in ("rgb", self.modality)
                if n_aligned
            }
        )
        self.prompt_gates = nn.ParameterList(
            nn.Parameter(torch.zeros(block.attn.num_heads)) for block in trunk.blocks if n_ctrl or n_aligned
        )

        f_cfg = cfg["fusion"]
        heads = list(f_cfg["heads"])
        if len(heads) != len(self.dims):
            raise ValueError(f"fusion.heads must give one head count per stage ({len(self.dims)}), got {heads}")
        self.frm = nn.ModuleList(
            GatedRectify(d, int(f_cfg["reduction"]), float(f_cfg["lambda_c"]), float(f_cfg["lambda_s"]))
            for d in self.dims
        )
        self.ffm = nn.ModuleList(
            FeatureFusionModule(d, int(h), int(f_cfg["reduction"])) for d, h in zip(self.dims, heads)
        )
        self.dsrm: DSRM | None = None
        if d_cfg["enabled"]:
            self.dsrm = DSRM(
                self.dims[-1], s_dim, int(d_cfg["universal_prompts"]), int(d_cfg["prompt_size"]), int(d_cfg["heads"])
            )
        h_cfg = cfg["head"]
        self.classifier = classifier
        out_dim = text_dim if classifier == "cosine" else self.class_sets[dataset_info.name].num_classes
        self.head = MLPHead(self.dims, int(h_cfg["channels"]), out_dim, float(h_cfg["dropout"]), classifier == "cosine")
        self.set_trainable(enc_cfg["freeze"])

    @staticmethod
    def _classifier(cfg: dict) -> str:
        """``head.classifier`` resolved: ``auto`` is linear for one label space, cosine with ``class_sets``."""
        kind = cfg["head"].get("classifier", "auto")
        if kind not in CLASSIFIERS:
            raise ValueError(f"segrgbx head.classifier must be one of {list(CLASSIFIERS)}, got {kind!r}")
        several = bool(cfg.get("class_sets"))
        if kind == "linear" and several:
            raise ValueError(
                "segrgbx head.classifier 'linear' scores one label space, but class_sets lists more; use 'cosine' "
                "(or 'auto'), which scores every set against its class names' embeddings"
            )
        if kind == "auto":
            return "cosine" if several else "linear"
        return kind

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
        """Backbone trunk frozen or not (its LoRA trains either way); MA-CLIP frozen (its pretraining opens
        it); the rest trains."""
        for name, p in self.trunk.named_parameters():
            p.requires_grad_(".lora_" in name or not freeze_encoder)
        if self.ma_clip is not None:
            for p in self.ma_clip.parameters():
                p.requires_grad_(False)
        for module in (
            self.control,
            self.aligned_prompts,
            self.prompt_gates,
            self.frm,
            self.ffm,
            self.dsrm,
            self.head,
        ):
            if module is not None:
                for p in module.parameters():
                    p.requires_grad_(True)

    def ma_clip_parameters(self) -> list[nn.Parameter]:
        """What MA-CLIP's pretraining trains: the LoRA pool (CLIP); the stand-in also its norm and
        projection, and its trunk when there are no base weights (a random frozen trunk gives random
        features)."""
        if self.ma_clip is None:
            return []
        return self.ma_clip.pretrain_parameters(self.has_base_weights)

    frozen_base_state_keys = SARTM.frozen_base_state_keys
    parameter_counts = SARTM.parameter_counts

    def sam2_state_dict(self) -> dict[str, torch.Tensor]:
        """The base Hiera weights in the official SAM2 key layout (``image_encoder.trunk.*``, fused qkv).

        Taken from the MA-CLIP stand-in's trunk when there is one: its base tensors stay frozen (only its
        LoRA pool trains), so they are the SAM2 file's even when the backbone trunk was fine-tuned
        (``encoder.freeze: false``); else from the backbone trunk, LoRA left out.
        """
        if isinstance(self.ma_clip, MAClipHiera):
            return _official_trunk_state(self.ma_clip.trunk)
        return _official_trunk_state(self.trunk)

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

    @staticmethod
    def _mask(valid: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        """The thermal validity at a stage's grid (area-averaged), or None."""
        if valid is None:
            return None
        return F.interpolate(valid, size=like.shape[-2:], mode="area").to(like.dtype)

    def reference_forward(self, rgb: torch.Tensor, thermal: torch.Tensor) -> torch.Tensor:
        """The bare dual Hiera encoder this backend is built on: both modalities as one batch through the
        same trunk with its base weights only (one fused q/k/v projection per block, as sam2's Hiera), no
        LoRA, MA-CLIP, prompts, fusion, DSRM or head (``rgbt-seg bench model`` times it against
        :meth:`forward`). Returns the last stage's tokens."""
        trunk = self.trunk
        with base_qkv(trunk):
            x = trunk.patch_embed(torch.cat([rgb, thermal.expand(-1, 3, -1, -1)]))
            x = x + trunk._get_pos_embed(x.shape[1:3])
            for block in trunk.blocks:
                x = block(x)
        return x

    def stream_features(
        self, rgb: torch.Tensor, thermal: torch.Tensor, valid: torch.Tensor | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The two streams' stage maps that FFM fuses, ``[(F_i^r, F_i^m)]`` for stages 1-4, each (B, C_i, h, w):
        a stage's output after the gated FRM (which is also what the next stage reads), stage 4's after
        the DSRM too. :meth:`forward` fuses exactly these. At init (zero gates, LoRA B and DSRM output)
        the RGB maps are the Hiera trunk's own stage outputs for ``rgb``, whatever the thermal image."""
        check_rgbt_inputs(rgb, thermal, valid, "SegRGB-X")
        b = rgb.shape[0]
        if valid is not None:
            valid = valid.to(thermal.dtype)
            thermal = thermal * valid
        x3 = thermal.expand(-1, 3, -1, -1)
        guide = self.guidance(rgb, x3)
        s_map, s = guide if guide is not None else (None, None)

        trunk = self.trunk
        last = trunk.stage_ends[-1]
        stages: list[tuple[torch.Tensor, torch.Tensor]] = []
        # the shared LoRA merged into one fused q/k/v weight per block (differentiable while it trains)
        with modality_batch(trunk, (BACKBONE_ADAPTER,)):
            x = trunk.patch_embed(torch.cat([rgb, x3]))
            x = x + trunk._get_pos_embed(x.shape[1:3])
            prompts = self._prompts(s, b, x.dtype)
            for i, block in enumerate(trunk.blocks):
                if prompts is None:
                    x = block(x)
                else:
                    x = prompted_block(block, x, prompts[self.group_of_block[i]], self.prompt_gates[i])
                if i not in trunk.stage_ends:
                    continue
                if i == last and self.dsrm is not None:  # Fig. 2/4: once per modality, at the end of stage 4
                    x = self.dsrm(x, None if s_map is None else self._pair(s_map, self.dsrm_pairing))
                x_r, x_m = x.permute(0, 3, 1, 2).chunk(2)
                x_r, x_m = self.frm[len(stages)](x_r, x_m, self._mask(valid, x_r))
                stages.append((x_r, x_m))
                if i != last:
                    x = torch.cat([x_r, x_m]).permute(0, 2, 3, 1)
        return stages

    def forward(self, rgb: torch.Tensor, thermal: torch.Tensor, valid: torch.Tensor | None = None) -> dict:
        """Segment a batch of registered RGB-X pairs -> ``{"logits": (B, K, H, W)}`` (the active class set)."""
        stages = self.stream_features(rgb, thermal, valid)
        if valid is not None:
            valid = valid.to(thermal.dtype)
        fused = [ffm(x_r, x_m, self._mask(valid, x_r)) for ffm, (x_r, x_m) in zip(self.ffm, stages)]
        logits = self.head(fused)
        if self.classifier == "cosine":
            logits = self.head.classify(logits, self.class_text())
        return {"logits": F.interpolate(logits, size=rgb.shape[-2:], mode="bilinear", align_corners=False)}

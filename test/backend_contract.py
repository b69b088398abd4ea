"""The contract every model backend keeps, as a test base class.

A backend's test module subclasses :class:`BackendContract` with a :class:`BackendCase`
(its micro config, the parameter groups that may train on frozen base weights, how to reach a
thermal-only parameter) and inherits these checks:

* output shapes at two input sizes (non-square both ways), finite logits;
* bad input shapes raise ``ValueError`` naming the problem;
* on base SAM2 weights with the production freezing, only the declared groups train, and a
  training step leaves the frozen tensors bit-identical;
* thermal influence: the logits change when only thermal changes, and the segmentation
  gradient reaches a thermal-specific parameter;
* a black RGB image (the node's ``thermal_only`` input: RGB zeros, thermal and valid as usual) gives
  finite logits of the right shape, through the model and through the Segmenter; RGB influences the
  logits and gets a gradient;
* ``aux_losses`` (where a backend returns them, in training mode) are finite scalars with a
  gradient;
* the project's Trainer trains it without warnings: the logged loss components are the
  backend's ``loss_terms`` plus its ``aux_losses``, the total is their weighted sum, and the
  optimiser moves a thermal-only parameter (and a parameter only the aux losses reach);
* thermal reliance: after a short deterministic training on night scenes (dark RGB, people and cars
  warm), blanking thermal costs a clear margin of person and car IoU on held-out night scenes, so a
  backend that computes from thermal but learns to ignore it fails; and blanking RGB instead (the
  node's ``thermal_only``) keeps person and car IoU within a margin of the paired one;
* identity at init on official SAM2 weights: built from the backend's production config with an
  official-format checkpoint (sam2's own builder, random non-zero weights, saved as the official file),
  the features the backend hands SAM2's mask decoder (``identity_kind = "decoder"``: image embedding with
  ``no_mem_embed``, the stride-8 and stride-4 high-resolution features) or, for a backend without that
  decoder, the trunk features it fuses (``"trunk"``: the four Hiera stage maps of the RGB stream) equal
  sam2's own for the RGB image within 1e-5, thermal changes nothing, and once the zero-initialised
  modules move (the case's ``randomize``) thermal does change them;
* checkpoint round trip through ``save_checkpoint`` / ``load_checkpoint`` is bit-exact, with
  and without base weights (and through ``export_standalone``);
* CPU inference through ``Segmenter(model, cfg, info, device="cpu")`` on numpy images.

Tiny inputs, one thread (see test_models_sartm.py), micro configs: the whole contract runs in a
few seconds per backend.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rgbt_seg_ros.models import available_backends, build_model, resolve_model_config
from rgbt_seg_ros.models.checkpoint import export_standalone, load_checkpoint, save_checkpoint
from rgbt_seg_ros.models.classes import load_dataset_info
from rgbt_seg_ros.pipeline.segmenter import Segmenter


def _no_change(model: torch.nn.Module) -> None:
    return None


@dataclass(frozen=True)
class BackendCase:
    """What the contract needs to know about one backend."""

    name: str  # registry name
    config: str  # micro config (random init, everything trainable)
    #: with frozen base weights, trainable parameter names must start with one of these (or be LoRA)
    trainable_prefixes: tuple[str, ...]
    #: frozen-base parameter names that must NOT train (at least one of each prefix must exist and be frozen)
    frozen_prefixes: tuple[str, ...]
    #: a parameter that only the thermal input reaches
    thermal_param: str
    #: config edits that give the production freezing on a base checkpoint ``path``
    freeze_with_base: Callable[[dict, str], None]
    #: move zero-initialised parts (LoRA B, zero-init prompts) so every path carries signal
    randomize: Callable[[torch.nn.Module], None] = field(default=_no_change)
    #: the backend returns aux_losses in training mode
    has_aux_losses: bool = False
    #: a parameter that only the aux losses reach (None: no aux losses)
    aux_only_param: str | None = None
    #: production config the official SAM2 checkpoint is loaded into (``encoder.checkpoint``)
    tiny_config: str = ""
    #: "decoder": compared with SAM2's image-predictor features; "trunk": with its Hiera trunk's stage maps
    identity_kind: str = "decoder"
    #: (model, rgb, thermal) -> the features compared (keys of :func:`sam2_reference`), through the model's own path
    identity: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] | None = None


def pair(b=1, h=64, w=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g), torch.randn(b, 1, h, w, generator=g)


def text_for(info):
    return F.normalize(torch.randn(info.num_classes, 384, generator=torch.Generator().manual_seed(0)), dim=1)


def randomize_named(model: torch.nn.Module, patterns: tuple[str, ...], scale: float = 0.1, seed: int = 1) -> None:
    """Overwrite parameters whose name contains any of ``patterns`` with small random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in patterns):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


#: what SAM2's image predictor hands its mask decoder; what its Hiera trunk returns
REFERENCE_KEYS = {
    "decoder": ("image_embed", "high_res_1", "high_res_0"),
    "trunk": tuple(f"stage{i}" for i in range(1, 5)),
}


def sam2_reference(sam, image: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """sam2's own features for ``image`` (already normalised): for ``"decoder"`` the lines of
    ``SAM2ImagePredictor.set_image`` (which needs torchvision, so they are repeated here on the model
    from ``build_sam2``): ``forward_image``, ``no_mem_embed`` added to the stride-16 map; for ``"trunk"``
    the Hiera trunk's four stage maps."""
    with torch.no_grad():
        if kind == "trunk":
            return dict(zip(REFERENCE_KEYS["trunk"], sam.image_encoder.trunk(image)))
        backbone_out = sam.forward_image(image)
        _, vision_feats, _, feat_sizes = sam._prepare_backbone_features(backbone_out)
        if sam.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + sam.no_mem_embed
        feats = [feat.permute(1, 2, 0).view(image.shape[0], -1, *size) for feat, size in zip(vision_feats, feat_sizes)]
    return {"image_embed": feats[2], "high_res_1": feats[1], "high_res_0": feats[0]}


def decoder_inputs(model: torch.nn.Module, rgb: torch.Tensor, thermal: torch.Tensor) -> dict[str, torch.Tensor]:
    """What ``model.forward`` hands SAM2's mask decoder (``sam_head.mask_decoder.predict_masks``), recorded
    on the way through the real forward."""
    decoder = model.sam_head.mask_decoder
    seen = {}
    original = decoder.predict_masks

    def record(**kwargs):
        seen["image_embed"] = kwargs["image_embeddings"]
        seen["high_res_0"], seen["high_res_1"] = kwargs["high_res_features"]
        return original(**kwargs)

    decoder.predict_masks = record
    try:
        with torch.no_grad():
            model(rgb, thermal)
    finally:
        del decoder.predict_masks
    return seen


class BackendContract:
    """Base class: subclass as ``class TestX(BackendContract): case = BackendCase(...)``."""

    case: BackendCase

    # ------------------------------------------------------------------ fixtures and helpers
    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def one_thread(cls):
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(before)

    @pytest.fixture(scope="class")
    @classmethod
    def info(cls):
        return load_dataset_info("synthetic")

    def cfg(self) -> dict:
        return resolve_model_config(self.case.config)

    def build(self, info, seed=0, cfg=None):
        torch.manual_seed(seed)
        model = build_model(cfg or self.cfg(), info, text_for(info))
        return model

    def trained(self, info, seed=0, cfg=None, steps=2):
        """A model after a couple of optimiser steps (BatchNorm statistics, moved zero-inits)."""
        cfg = cfg or self.cfg()
        model = self.build(info, seed, cfg)
        self.case.randomize(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        for step in range(steps):
            rgb, th = pair(2, seed=10 + step)
            out = model(rgb, th)
            target = torch.randint(0, info.num_classes, (2, 64, 96), generator=torch.Generator().manual_seed(step))
            loss = F.cross_entropy(out["logits"], target) + sum((out.get("aux_losses") or {}).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.eval(), cfg

    def write_base(self, info, path, seed=3):
        """An official-layout SAM2 file made from a micro model's base tensors."""
        source = self.build(info, seed)
        torch.save({"model": source.sam2_state_dict()}, path)
        return path

    def base_cfg(self, path) -> dict:
        cfg = self.cfg()
        self.case.freeze_with_base(cfg, str(path))
        return cfg

    # ------------------------------------------------------------------ the contract
    def test_is_registered(self):
        assert self.case.name in available_backends()
        assert self.cfg()["backend"] == self.case.name

    @pytest.mark.parametrize("size", [(64, 96), (96, 64)])
    def test_output_shapes(self, info, size):
        model = self.build(info).eval()
        h, w = size
        with torch.no_grad():
            out = model(*pair(2, h, w))
        assert out["logits"].shape == (2, info.num_classes, h, w)
        assert out["logits"].dtype == torch.float32
        assert torch.isfinite(out["logits"]).all()
        assert "aux_losses" not in out or not out["aux_losses"]  # eval mode: no training-only work

    def test_bad_inputs_raise(self, info):
        model = self.build(info).eval()
        with pytest.raises(ValueError, match="multiples of 32"):
            model(*pair(1, 60, 96))
        rgb, _ = pair()
        with pytest.raises(ValueError, match="thermal must be"):
            model(rgb, torch.zeros(1, 3, 64, 96))
        with pytest.raises(ValueError, match="valid must be"):
            model(*pair(), valid=torch.ones(1, 1, 32, 32))

    def test_invalid_thermal_pixels_do_not_contribute(self, info):
        model = self.build(info).eval()
        self.case.randomize(model)
        rgb, th = pair()
        valid = torch.ones(1, 1, 64, 96)
        valid[..., 48:] = 0
        th2 = th.clone()
        th2[..., 48:] = torch.randn(1, 1, 64, 48) * 5
        with torch.no_grad():
            assert torch.equal(model(rgb, th, valid)["logits"], model(rgb, th2, valid)["logits"])

    def test_only_intended_parameters_train_on_base_weights(self, info, tmp_path):
        path = self.write_base(info, tmp_path / "base.pt")
        model = self.build(info, seed=7, cfg=self.base_cfg(path))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert trainable
        for name in trainable:
            assert ".lora_" in name or name.startswith(self.case.trainable_prefixes), name
        for prefix in self.case.frozen_prefixes:
            assert any(n.startswith(prefix) for n in frozen), prefix
            assert not any(n.startswith(prefix) and ".lora_" not in n for n in trainable), prefix
        counts = model.parameter_counts()
        assert counts["total"] == sum(p.numel() for p in model.parameters())
        assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert 0 < counts["trainable"] < counts["total"]
        # the frozen base tensors are what the checkpoint does not store
        assert set(model.frozen_base_state_keys()) <= {k for k in model.state_dict()}
        assert model.frozen_base_state_keys()

        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        model.train()
        out = model(*pair(2))
        (out["logits"].logsumexp(1).mean() + sum((out.get("aux_losses") or {}).values())).backward()
        opt.step()
        for n, p in model.named_parameters():
            if n in before:
                assert torch.equal(before[n], p.detach()), n

    def test_thermal_influences_output_and_gets_gradient(self, info):
        model = self.build(info).eval()
        self.case.randomize(model)
        rgb, th = pair()
        with torch.no_grad():
            base = model(rgb, th)["logits"]
            other = model(rgb, th.flip(-1) * 2.0)["logits"]
        assert (base - other).abs().max() > 1e-4
        params = dict(model.named_parameters())
        assert self.case.thermal_param in params, sorted(params)[:20]
        model.zero_grad()
        model(rgb, th)["logits"].logsumexp(1).mean().backward()
        grad = params[self.case.thermal_param].grad
        assert grad is not None and grad.abs().sum() > 0

    def test_black_rgb_gives_finite_outputs_and_rgb_influences_them(self, info):
        """The node's thermal_only input: RGB zeros (normalised as every frame is), thermal and valid as usual."""
        from rgbt_seg_ros.models.preprocessing import normalize_batch

        model = self.build(info).eval()
        self.case.randomize(model)
        cfg = self.cfg()
        rgb, th = pair(2)
        valid = torch.ones(2, 1, 64, 96)
        valid[..., :, 80:] = 0  # a strip the thermal camera does not see
        black, _ = normalize_batch(cfg, torch.zeros(2, 3, 64, 96), torch.zeros(2, 1, 64, 96))
        with torch.no_grad():
            out = model(black, th, valid)["logits"]
            paired = model(rgb, th, valid)["logits"]
            other = model(rgb.flip(-1) * 2.0, th, valid)["logits"]
        assert out.shape == (2, info.num_classes, 64, 96) and torch.isfinite(out).all()
        assert (paired - out).abs().max() > 1e-4 and (paired - other).abs().max() > 1e-4
        rgb = rgb.clone().requires_grad_(True)
        model(rgb, th, valid)["logits"].logsumexp(1).mean().backward()
        assert rgb.grad is not None and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0

        seg = Segmenter(model, cfg, info, device="cpu", warmup=False)
        thermal = np.random.default_rng(0).random((70, 150), dtype=np.float32)
        mask = np.ones((70, 150), bool)
        mask[:, 120:] = False
        res = seg(np.zeros((70, 150, 3), np.uint8), thermal, mask)
        assert res.labels.shape == (70, 150) and int(res.labels.max()) < info.num_classes
        assert np.isfinite(res.confidence).all()

    def test_aux_losses_are_finite_scalars_with_gradient(self, info):
        model = self.build(info).train()
        self.case.randomize(model)
        out = model(*pair(2))
        aux = out.get("aux_losses")
        if not self.case.has_aux_losses:
            assert not aux
            return
        assert isinstance(aux, dict) and aux
        for name, value in aux.items():
            assert isinstance(value, torch.Tensor) and value.ndim == 0, name
            assert torch.isfinite(value), name
            assert value.requires_grad, name
        model.zero_grad()
        sum(aux.values()).backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    def test_trains_in_the_trainer_on_its_loss_terms(self, info, tmp_path):
        import json
        import warnings

        from rgbt_seg_ros.models import LOSS_TERMS
        from rgbt_seg_ros.training.trainer import CODEBOOK_STATS, Trainer

        cfg = {
            "dataset": "synthetic",
            "dataset_options": {"count": 4, "size": [64, 96]},
            "val_split": None,
            "max_steps": 2,
            "batch_size": 2,
            "pretrain_steps": 2,  # a backend's pretraining stage (SegRGB-X: MA-CLIP), kept short
            "lr": 1e-2,
            "warmup_steps": 0,
            "log_every": 1,
            "progress": False,
            "tensorboard": False,
            "model": {"input_size": [64, 96]},
        }
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no "term skipped" warnings
            tr = Trainer(self.case.config, cfg, tmp_path / "run", text_embeddings=text_for(info))
            before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
            tr.fit()
        rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        pretrain_rows = [r for r in rows if r["type"] == "pretrain"]
        assert bool(pretrain_rows) == (getattr(tr.model, "pretrain_stage", None) is not None)
        row = next(r for r in rows if r["type"] == "train")
        # the terms the backend supports and the train config weights (the default preset leaves L_cr out)
        terms = {t for t, w in zip(LOSS_TERMS, tr.loss.weights) if w > 0} & set(tr.loss_terms)
        bookkeeping = {"type", "step", "epoch", "total", "lr", "step_time_s", "peak_rss_mb", "grad_norm"}
        bookkeeping |= {f"codebook_{k}" for k in CODEBOOK_STATS}  # logged, not part of the loss
        bookkeeping |= {"language_factor"} | {k for k in row if k.startswith("gradnorm_")}
        aux = set(row) - set(LOSS_TERMS) - bookkeeping
        # every term of the total, a segmentation term or an aux loss, has its gradient norm in the row
        assert {f"gradnorm_{t}" for t in (terms & set(row)) | aux} <= set(row)
        assert all(row[k] >= 0 for k in row if k.startswith("gradnorm_"))
        assert terms and terms <= set(row)
        assert not (set(LOSS_TERMS) - terms) & set(row), (
            "a term the backend does not support (or weight 0) was computed"
        )
        assert bool(aux) == self.case.has_aux_losses
        factor = row.get("language_factor", 1.0)  # the language warm-up scales w2 and w3
        weight = {t: w * (factor if t in ("l_cr", "l_se") else 1.0) for t, w in zip(LOSS_TERMS, tr.loss.weights)}
        assert row["total"] == pytest.approx(
            sum(weight[t] * row[t] for t in terms) + sum(row[k] for k in aux), rel=1e-5
        )
        with torch.no_grad():  # a VQ backend's codebook statistics are logged with the losses
            has_codebook = "codebook" in tr.model.train()(*pair(1))
        assert ("codebook_perplexity" in row) == has_codebook
        if has_codebook:
            assert row["codebook_perplexity"] >= 1.0 and 0.0 < row["codebook_usage"] <= 1.0
        params = dict(tr.model.named_parameters())
        moved = [self.case.thermal_param] + ([self.case.aux_only_param] if self.case.aux_only_param else [])
        for name in moved:
            assert not torch.equal(params[name].detach(), before[name]), f"{name} did not train"

    #: thermal reliance: night person/car IoU must drop by this much (fraction) when thermal is blanked. A
    #: thermal-blind model drops 0.000; the trained drop varies with the CPU's float kernels: FusionSAM's was
    #: 0.28 on the machine that chose 0.10 and 0.099 on an AVX-512 EPYC with the same code and pinned packages.
    RELIANCE_MARGIN = 0.05
    #: thermal only (RGB black, the node's ``on_rgb_loss: thermal_only``): night person/car IoU may fall at most
    #: this much below the paired one. Measured falls are at most 0.021; a path that loses the thermal signal
    #: when RGB is black scores what the model makes of nothing (black RGB, no thermal), 0.10-0.60 below paired.
    THERMAL_ONLY_MARGIN = 0.10

    def test_learns_to_rely_on_thermal_at_night(self, info, tmp_path):
        """Train a micro model (its config's recipe: the backend's optimiser, schedule and loss at lr 1e-3)
        for 150 steps on night scenes, then segment held-out night scenes with and without thermal: people
        and cars at night are found by their heat, so their IoU must fall clearly when thermal is blanked.
        Measured drops (2026-12-02, AVX-512 EPYC): SARTM 0.19, CPAL 0.24, FusionSAM 0.099, SegRGB-X 0.60; the
        thermal-blind FusionSAM before the shared codebook and the encoder input: 0.000.

        The same model with RGB blanked instead (black RGB, thermal and valid as usual, labels unseen by
        thermal counted as misses: what the node publishes with ``on_rgb_loss: thermal_only``) keeps its
        night person/car IoU within THERMAL_ONLY_MARGIN of the paired one (RGB is dark at night anyway), and
        its thermal must be what carries it: it beats the same model seeing nothing (black RGB, thermal
        blanked; what a path that drops thermal when RGB is black would score) by RELIANCE_MARGIN. Measured
        (2026-12-02, 2-core CPU; paired / thermal only / RGB only / nothing): SARTM 0.323 / 0.318 / 0.132 /
        0.182, CPAL 0.393 / 0.372 / 0.155 / 0.021, FusionSAM 0.250 / 0.260 / 0.151 / 0.151, SegRGB-X 0.670 /
        0.703 / 0.069 / 0.065."""
        from rgbt_seg_ros.data.datasets import build_dataset
        from rgbt_seg_ros.evaluation.evaluator import SegmentationEvaluator, evaluate, item_to_numpy_pair
        from rgbt_seg_ros.training.trainer import Trainer

        night = {"size": [96, 128], "conditions": ["night"]}
        cfg = {
            "dataset": "synthetic",
            "dataset_options": {"count": 32, **night},
            "val_split": None,
            "max_steps": 150,
            "batch_size": 4,
            "warmup_steps": 5,
            "log_every": 150,
            "progress": False,
            "tensorboard": False,
            "transform": {"color_jitter": False, "thermal_noise": False},
            "model": {"input_size": [96, 128]},
        }
        tr = Trainer(self.case.config, cfg, tmp_path / "run", text_embeddings=text_for(info))
        tr.fit()
        tr.close()
        seg = Segmenter(tr.model, tr.model_cfg, tr.info, device="cpu", warmup=False)
        test = build_dataset("synthetic", None, "test", info, count=12, seed=0, **night)
        iou = {}
        for mode, blanks in (
            ("paired", {}),
            ("rgb_only", {"blank_thermal": True}),
            ("thermal_only", {"blank_rgb": True}),
        ):
            doc = evaluate(seg, test, progress=False, **blanks)
            per_class = doc["conditions"]["night"]["per_class_iou"]
            iou[mode] = np.mean([per_class["person"], per_class["car"]])
        nothing = SegmentationEvaluator(info, max_overlays=0)
        for i in range(len(test)):
            item = test[i]
            rgb, thermal, valid = item_to_numpy_pair(item, blank_thermal=True)
            nothing.update(item, seg(np.zeros_like(rgb), thermal, valid).labels)
        per_class = nothing.summary()["conditions"]["night"]["per_class_iou"]
        iou["nothing"] = np.mean([per_class["person"], per_class["car"]])
        seen = f"{self.case.name}: night person/car IoU " + ", ".join(f"{k} {v:.3f}" for k, v in iou.items())
        assert iou["paired"] - iou["rgb_only"] >= self.RELIANCE_MARGIN, seen
        assert iou["paired"] - iou["thermal_only"] <= self.THERMAL_ONLY_MARGIN, seen
        assert iou["thermal_only"] - iou["nothing"] >= self.RELIANCE_MARGIN, seen

    @pytest.fixture(scope="class")
    @classmethod
    def official_sam2(cls, tmp_path_factory):
        """sam2's own SAM2.1 Hiera-tiny (random init, non-zero no_mem_embed), saved as an official file."""
        from sam2.build_sam import build_sam2

        torch.manual_seed(0)
        sam = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu").eval()
        with torch.no_grad():
            sam.no_mem_embed.copy_(torch.randn_like(sam.no_mem_embed))
        path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
        torch.save({"model": sam.state_dict()}, path)
        return sam, path

    def test_identity_at_init_on_official_sam2_weights(self, official_sam2):
        from rgbt_seg_ros.models import dataset_info_for

        case = self.case
        assert case.identity is not None and case.tiny_config, f"{case.name}: no identity case"
        sam, path = official_sam2
        cfg = resolve_model_config(case.tiny_config)
        cfg["encoder"]["checkpoint"] = str(path)
        info = dataset_info_for(cfg, None)
        model = self.build(info, seed=5, cfg=cfg).eval()
        g = torch.Generator().manual_seed(3)
        rgb = torch.randn(1, 3, 96, 128, generator=g)
        thermal, other = torch.rand(1, 1, 96, 128, generator=g), torch.rand(1, 1, 96, 128, generator=g)

        reference = sam2_reference(sam, rgb, case.identity_kind)
        ours = case.identity(model, rgb, thermal)
        assert set(ours) == set(REFERENCE_KEYS[case.identity_kind])
        for key, expected in reference.items():
            assert ours[key].shape == expected.shape, key
            torch.testing.assert_close(ours[key], expected, atol=1e-5, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
        for key, value in case.identity(model, rgb, other).items():
            torch.testing.assert_close(value, ours[key], atol=1e-6, rtol=0, msg=lambda m, k=key: f"thermal: {k}: {m}")

        case.randomize(model)  # what training does to the zero-initialised modules
        moved = case.identity(model, rgb, thermal)
        moved_other = case.identity(model, rgb, other)
        assert max((moved[k] - moved_other[k]).abs().max().item() for k in moved) > 1e-4

    def test_checkpoint_round_trip_is_bit_exact(self, info, tmp_path):
        model, cfg = self.trained(info)
        ckpt = save_checkpoint(model, cfg, info, tmp_path / "ckpt")
        loaded, loaded_cfg, loaded_info = load_checkpoint(ckpt)
        assert loaded_cfg["backend"] == self.case.name
        assert loaded_info.class_names == info.class_names
        a, b = model.state_dict(), loaded.state_dict()
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), k
        rgb, th = pair(seed=5)
        with torch.no_grad():
            assert torch.equal(model(rgb, th)["logits"], loaded(rgb, th)["logits"])

    def test_checkpoint_on_base_weights_and_standalone_export(self, info, tmp_path):
        base = self.write_base(info, tmp_path / "base.pt")
        cfg = self.base_cfg(base)
        model, _ = self.trained(info, seed=4, cfg=cfg, steps=1)
        ckpt = save_checkpoint(model, cfg, info, tmp_path / "ckpt")
        frozen = set(model.frozen_base_state_keys())
        from safetensors import safe_open

        with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
            stored = set(f.keys())
        assert frozen and not (stored & frozen)  # the base tensors come from the base file
        rgb, th = pair(seed=6)
        with torch.no_grad():
            expected = model(rgb, th)["logits"]
        loaded, _, _ = load_checkpoint(ckpt)
        alone = export_standalone(ckpt, tmp_path / "standalone")
        base.unlink()  # the standalone copy must not need it
        standalone, _, _ = load_checkpoint(alone)
        with torch.no_grad():
            assert torch.equal(loaded(rgb, th)["logits"], expected)
            assert torch.equal(standalone(rgb, th)["logits"], expected)

    def test_the_input_size_is_the_configs(self, info):
        """``input_size`` is a config value every backend honours: the Segmenter fits camera frames to it and
        the model runs at it; here 768x1024 (closer to SAM2's 1024 than the tiny configs' 480x640)."""
        size = (768, 1024)
        cfg = self.cfg()
        cfg["input_size"] = list(size)
        model = self.build(info, cfg=cfg).eval()
        seen = []
        hook = model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
        try:
            seg = Segmenter(model, cfg, info, device="cpu", warmup=False)
            rng = np.random.default_rng(0)
            res = seg(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), rng.random((480, 640), dtype=np.float32))
        finally:
            hook.remove()
        assert seg.input_size == size and seen == [size]
        assert res.labels.shape == (480, 640)

    def test_cpu_inference_through_segmenter(self, info):
        model, cfg = self.trained(info, steps=1)
        seg = Segmenter(copy.deepcopy(model), cfg, info, device="cpu")
        assert seg.backend == self.case.name
        rng = np.random.default_rng(0)
        for h, w in ((96, 128), (70, 150)):
            rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            thermal = rng.random((h, w), dtype=np.float32)
            res = seg(rgb, thermal, np.ones((h, w), bool))
            assert res.labels.shape == (h, w) and res.labels.dtype == np.uint8
            assert int(res.labels.max()) < info.num_classes
            assert res.confidence.shape == (h, w)
            assert 0.0 <= float(res.confidence.min()) and float(res.confidence.max()) <= 1.0
            assert set(res.timings) == {"preprocess", "model", "postprocess"}

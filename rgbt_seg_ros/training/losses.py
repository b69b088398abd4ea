"""SARTM's training objective (paper section III.D-F, eq. 11-15), independent of the model's internals.

    L = w0 * L_CE(S0, L) + w1 * L_CE(S1, L) + w2 * L_cr + w3 * L_se            (15)

with the weights (w0, w1, w2, w3) of a named preset (:data:`LOSS_PRESETS`): ``paper`` = (1, 0.008,
10000, 100), the best values of the paper's Table VII (MFNet); ``authors_code`` = all 1, what the
authors' public training script trains with; ``calibrated``, the train config's default, chosen by the
sweep in docs/training.md ("Loss weights"). Any preset can add a linear warm-up of the language terms
(``loss.language_warmup``: w2, w3 ramp from 0 over that fraction of the run). Explicit ``loss.weights``
override a preset. :func:`term_gradient_norms` measures each weighted term's gradient on the trainable
parameters; the trainer logs it (``gradnorm_<term>``) so a dominating term shows in the first minutes.

**OHEM cross-entropy (eq. 11).** A pixel is *hard* when the softmax probability of its true
class is below ``thresh`` (0.7), i.e. its cross-entropy exceeds ``-log(thresh)``. With
``n_valid`` the non-ignored pixels of the batch and ``n_min = max(1, floor(n_valid *
min_kept_fraction))`` (``n_valid / 16`` in the paper), all hard pixels are kept when there are at
least ``n_min`` of them; otherwise the ``n_min`` pixels with the largest cross-entropy are kept.
The loss is the mean cross-entropy of the kept pixels, which is eq. 11's
``1 / max(|H|, n_threshold) * sum_{i in H}`` with H grown to ``n_threshold`` pixels when too few
are hard. Selection is done over the whole batch (the paper says "in the image"; a batch-wide
pool is what common OHEM cross-entropy implementations do, and it is the same for batch 1).

**Prototypes (eq. 12).** ``MAP(f, y)``: the label map is pooled to the feature grid as per-cell
class fractions (no nearest-neighbour subsampling, which would drop small objects), and class
``k``'s prototype is the fraction-weighted mean of the feature vectors, over the whole batch.
Only classes with at least one labelled pixel in the batch take part.

**L_se (eq. 14), the semantic relation.** The paper's one explicit formula: the self-similarity
matrix of the visual prototypes ``Cos(P, P^T)`` should match that of the class-name text
embeddings ``Cos(T_e, T_e^T)``, both restricted to the classes present in the batch. Each row
becomes a distribution by a softmax at temperature ``temperature`` (1 in the authors' code);
the loss is ``KL(text row || visual row)``, averaged over all K x K entries (= the mean per-row KL
divided by K). That averaging is the authors' reduction, the one under which Table VII's
``w3 = 100`` was tuned. Dimensions of features and text never need to match: only K x K
matrices are compared. The text side is a fixed teacher (no gradient).

**L_cr (eq. 13), the cross-modal relation: our interpretation.** The paper writes only
``L_cr = KL(f, y)`` and says it "minimises modality gaps among visual modalities" before L_se
transfers semantic knowledge. We read it as a KL divergence between class representations:
each class prototype is L2-normalised and turned into a distribution over its feature channels
by a softmax at ``cr_temperature`` (the channel softmax is the authors' code's; the normalisation
is ours, see :func:`channel_kl`), and

* when the model exposes per-modality features (``features_rgb`` and ``features_thermal``), the
  RGB and thermal prototypes of the same class are pulled together with a symmetric KL: the
  modality gap of each class, measured where the labels say that class is;
* otherwise (a model exposing only fused features, like ours) the batch prototypes are pulled
  towards an exponential moving average of past batches' prototypes (a :class:`PrototypeMemory`,
  detached; momentum 0.9), which is what the authors' code computes: class representations
  that stay consistent across images, days and nights.

The KL is averaged over all K x D entries, the authors' reduction, under which ``w2 = 10000``
was tuned with SAM2's 256-channel neck; for another width D the mean is taken as if D were 256
(:func:`channel_kl`), so that w2 means the same for the micro models' 32 channels. Per-entry
values are tiny: for 256-channel unit prototypes at temperature 1, about 1e-8 between similar
prototypes and up to ~1e-5 between unrelated ones, so ``w2 * L_cr`` stays below ~0.1 next to
cross-entropies of ~1. (In the authors' code the prototypes were divided by
their pixel count twice, which drove the term to ~0.) Lower ``cr_temperature`` to strengthen it.
**Balance at initialisation** (the paper states no reductions; these are the authors' code's, with
L_cr referenced to 256 channels). Gradient norm of each term weighted as in the paper on the SAM2
encoder of a random micro SARTM (``fusion.identity_init``), relative to CE(S0)'s, on one synthetic
batch (``test_losses.py`` asserts the bands): w1 CE(S1) 0.045 (32-channel neck) / 0.048 (256); w2 L_cr
3.5 / 2.0 (the plain mean gave 14x at 32 channels before the 256 reference); w3 L_se 8.1 / 3.4. At
the paper's weights the language terms dominate the encoder's gradient at the start: CE reaches the
encoder only through a random decoder and the RGB path, while L_cr and L_se act on both modalities'
features. The ``calibrated`` preset and its warm-up come from the sweep in docs/training.md; the
trainer logs these norms on every logged row (``gradnorm_<term>``, over all trainable parameters).

Unlike the authors' code, the memory is updated after the loss is computed (their update came
first, so a batch was partly compared with itself), absent classes are left out instead of
entering as zero vectors, and prototypes are divided by their mass once.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PAPER_WEIGHTS = (1.0, 0.008, 10000.0, 100.0)

#: Named loss presets: the weights (w0, w1, w2, w3) and the language warm-up (fraction of the run over which
#: w2 and w3 ramp linearly from 0; 0 = none). ``calibrated`` is the one the committed sweep supports
#: (docs/results/learning/loss_sweep, `rgbt-seg experiments loss-sweep`).
LOSS_PRESETS: dict[str, dict] = {
    "paper": {"weights": PAPER_WEIGHTS, "language_warmup": 0.0},
    "authors_code": {"weights": (1.0, 1.0, 1.0, 1.0), "language_warmup": 0.0},
    # the sweep's best arm on the micro config (docs/training.md): w1 = 1 (w1 = 0.008 with `combine: mean`
    # leaves half of the output to a barely trained head), no L_cr, L_se at 10; the warm-up changed nothing
    # measurable there (it only kept w3 = 100 from costing accuracy), so it is off
    "calibrated": {"weights": (1.0, 1.0, 0.0, 10.0), "language_warmup": 0.0},
}
DEFAULT_LOSS_PRESET = "calibrated"


def language_ramp(step: int, total_steps: int, warmup_fraction: float) -> float:
    """The factor on w2 and w3 at ``step`` (0-based): linear from 0 to 1 over ``warmup_fraction`` of the run."""
    span = warmup_fraction * total_steps
    return 1.0 if span <= 0 else min(1.0, step / span)


def term_gradient_norms(terms: dict[str, torch.Tensor], params: list[torch.Tensor]) -> dict[str, float]:
    """L2 norm of each (weighted) loss term's gradient on ``params``; the graph is kept for the backward."""
    norms = {}
    for name, term in terms.items():
        if not term.requires_grad:
            norms[name] = 0.0
            continue
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        norms[name] = math.sqrt(float(sum((g.float() ** 2).sum() for g in grads if g is not None)))
    return norms


def _resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class OhemCrossEntropy(nn.Module):
    """Online hard example mining cross-entropy (eq. 11); see the module docstring for the rule."""

    def __init__(
        self,
        ignore_index: int = 255,
        thresh: float = 0.7,
        min_kept_fraction: float = 1.0 / 16.0,
        class_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < thresh <= 1.0:
            raise ValueError(f"OHEM thresh must be in (0, 1], got {thresh}")
        if not 0.0 <= min_kept_fraction <= 1.0:
            raise ValueError(f"OHEM min_kept_fraction must be in [0, 1], got {min_kept_fraction}")
        self.ignore_index = int(ignore_index)
        self.thresh = float(thresh)
        self.min_kept_fraction = float(min_kept_fraction)
        if class_weights is not None:
            class_weights = torch.as_tensor(class_weights, dtype=torch.float32)
            if class_weights.ndim != 1 or not bool((class_weights > 0).all() & torch.isfinite(class_weights).all()):
                raise ValueError(f"class weights must be a list of finite values > 0, got {class_weights.tolist()}")
        self.class_weights = class_weights

    def select(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel cross-entropy (B, H, W) at label size and the boolean mask of kept pixels."""
        if logits.ndim != 4 or labels.ndim != 3 or logits.shape[0] != labels.shape[0]:
            raise ValueError(
                f"OHEM needs logits (B, C, h, w) and labels (B, H, W), "
                f"got {tuple(logits.shape)} and {tuple(labels.shape)}"
            )
        labels = labels.long()
        logits = _resize_logits(logits, tuple(labels.shape[-2:]))
        valid = labels != self.ignore_index
        bad = valid & ((labels < 0) | (labels >= logits.shape[1]))
        if bad.any():
            raise ValueError(
                f"labels hold ids {sorted(set(labels[bad].unique().tolist()))[:8]} outside the model's "
                f"{logits.shape[1]} classes (and not ignore_index {self.ignore_index})"
            )
        ce = F.cross_entropy(logits.float(), labels, ignore_index=self.ignore_index, reduction="none")
        n_valid = int(valid.sum())
        if n_valid == 0:
            return ce, valid
        n_min = max(1, int(n_valid * self.min_kept_fraction))
        if n_min >= n_valid:  # plain cross-entropy (min_kept_fraction 1): every labelled pixel, no sort
            return ce, valid
        hard = valid & (ce.detach() > -math.log(self.thresh))
        if int(hard.sum()) >= n_min:
            return ce, hard
        # Too few hard pixels: keep the n_min with the largest loss among the valid ones.
        masked = torch.where(valid, ce.detach(), torch.full_like(ce, -1.0)).flatten()
        idx = torch.topk(masked, n_min, sorted=False).indices
        kept = torch.zeros_like(masked, dtype=torch.bool)
        kept[idx] = True
        return ce, kept.view_as(ce)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce, kept = self.select(logits, labels)
        if not bool(kept.any()):
            return logits.sum() * 0.0  # nothing labelled: zero, but still part of the graph
        if self.class_weights is None:
            return ce[kept].mean()
        # Class-weighted mean over the kept pixels (the hard-pixel choice itself is unweighted).
        w = self.class_weights.to(ce.device)
        if w.numel() != logits.shape[1]:
            raise ValueError(f"{w.numel()} class weights for a model with {logits.shape[1]} classes")
        pw = w[labels.long()[kept]]
        return (ce[kept] * pw).sum() / pw.sum()


def enet_class_weights(pixel_counts, c: float = 1.02) -> list[float]:
    """ENet class weighting (Paszke et al. 2016): ``w_k = 1 / ln(c + p_k)`` with ``p_k`` the class's
    share of the labelled training pixels; bounded by ``1 / ln(c)`` (about 50 for c = 1.02) for the
    rarest classes, and about 1.5 for a class covering 90 % of the pixels. Gentler than median-frequency
    balancing, which would give a 90 %-background set a background weight of about 0.01."""
    counts = np.asarray(pixel_counts, dtype=np.float64)
    if counts.sum() <= 0:
        raise ValueError("no labelled pixels in the training set: cannot compute class weights")
    if not c > 1.0:
        raise ValueError(f"ENet weighting needs c > 1, got {c}")
    share = counts / counts.sum()
    return [round(float(x), 6) for x in 1.0 / np.log(c + share)]


# --------------------------------------------------------------------------- prototypes


def class_prototypes(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked average pooling (eq. 12): ``(prototypes (C, D), present (C,) bool)``.

    ``features`` (B, D, h, w), ``labels`` (B, H, W) at any resolution: each label pixel counts
    towards the feature cell it falls in, so a cell's weight for class k is the fraction of its
    pixels labelled k. Rows of absent classes are zero and ``present`` is False there.
    """
    if features.ndim != 4 or labels.ndim != 3 or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"prototypes need features (B, D, h, w) and labels (B, H, W), got {tuple(features.shape)} "
            f"and {tuple(labels.shape)}"
        )
    b, d, h, w = features.shape
    big_h, big_w = labels.shape[-2:]
    labels = labels.to(features.device).long()
    rows = (torch.arange(big_h, device=labels.device) * h) // big_h
    cols = (torch.arange(big_w, device=labels.device) * w) // big_w
    cell = (rows[:, None] * w + cols[None, :]).expand(b, big_h, big_w)
    batch = torch.arange(b, device=labels.device)[:, None, None].expand(b, big_h, big_w)
    cell_pixels = torch.bincount((batch * h * w + cell).flatten(), minlength=b * h * w).view(b, h * w)
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise ValueError(
            f"labels hold ids {sorted(set(labels[bad].unique().tolist()))[:8]} outside the "
            f"{num_classes} classes (and not ignore_index {ignore_index})"
        )
    index = ((batch * num_classes + labels) * (h * w) + cell)[valid]
    counts = torch.bincount(index, minlength=b * num_classes * h * w).view(b, num_classes, h * w)
    weights = counts.to(features.dtype) / cell_pixels.clamp(min=1).to(features.dtype)[:, None, :]
    mass = weights.sum(dim=(0, 2))  # (C,)
    summed = torch.einsum("bcn,bdn->cd", weights, features.reshape(b, d, h * w))
    present = counts.sum(dim=(0, 2)) > 0
    prototypes = summed / mass.clamp(min=torch.finfo(features.dtype).tiny)[:, None]
    return prototypes * present[:, None].to(prototypes.dtype), present


def cosine_self_similarity(x: torch.Tensor) -> torch.Tensor:
    """(K, D) -> (K, K) cosine similarities."""
    x = F.normalize(x, dim=-1, eps=1e-8)
    return x @ x.t()


def relation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """L_se's core: KL(softmax(Cos(T)/t) || softmax(Cos(P)/t)) row-wise, averaged over all K x K entries.

    ``student`` (K, D) prototypes, ``teacher`` (K, E) text embeddings (no gradient).
    """
    k = student.shape[0]
    log_p = F.log_softmax(cosine_self_similarity(student) / temperature, dim=-1)
    log_q = F.log_softmax(cosine_self_similarity(teacher.detach().to(student.dtype)) / temperature, dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum() / (k * k)


#: The feature width the paper's w2 was tuned at: SAM2's neck (d_model 256) gives the fused features.
CR_REFERENCE_DIM = 256


def channel_kl(target: torch.Tensor, student: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(t_hat/T) || softmax(s_hat/T)) over the channels of L2-normalised (K, D) prototypes.

    Normalising first makes the term independent of the features' scale: on raw prototypes a
    network could lower it by shrinking its features towards 0 (every softmax turns uniform).

    Reduction: the authors' mean over K x D entries, taken as if D were :data:`CR_REFERENCE_DIM`
    (``mean over K of the row KL * D / 256**2``; equal to the plain mean at D = 256). The row KL of
    unit vectors shrinks like 1 / D (each softmax entry is ~1/D), so the plain mean shrinks like
    1 / D**2: with the 32-channel micro neck it was 64x the 256-channel value and w2 = 10000 made L_cr's
    gradient 14x CE(S0)'s at initialisation. Referenced to 256 the paper's w2 means the same at any width.
    """
    log_q = F.log_softmax(F.normalize(target, dim=-1, eps=1e-8) / temperature, dim=-1)
    log_p = F.log_softmax(F.normalize(student, dim=-1, eps=1e-8) / temperature, dim=-1)
    d = target.shape[-1]
    return (log_q.exp() * (log_q - log_p)).sum(dim=-1).mean() * (d / CR_REFERENCE_DIM**2)


class PrototypeMemory:
    """Exponential moving average of class prototypes across batches (detached): L_cr's reference
    when the model has no per-modality features. Not saved in checkpoints (it rebuilds in a few batches)."""

    def __init__(self, momentum: float = 0.9) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"prototype memory momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.prototypes: torch.Tensor | None = None  # (C, D)
        self.seen: torch.Tensor | None = None  # (C,) bool

    def reference(self, num_classes: int, dim: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prototypes is None or self.prototypes.shape != (num_classes, dim):
            self.prototypes = torch.zeros(num_classes, dim, device=device, dtype=dtype)
            self.seen = torch.zeros(num_classes, dtype=torch.bool, device=device)
        return self.prototypes.to(device=device, dtype=dtype), self.seen.to(device)

    @torch.no_grad()
    def update(self, prototypes: torch.Tensor, present: torch.Tensor) -> None:
        ref, seen = self.reference(prototypes.shape[0], prototypes.shape[1], prototypes.device, prototypes.dtype)
        new = prototypes.detach()
        blended = torch.where(seen[:, None], self.momentum * ref + (1.0 - self.momentum) * new, new)
        self.prototypes = torch.where(present[:, None], blended, ref)
        self.seen = seen | present


def prototype_distillation_losses(
    features: torch.Tensor,
    labels: torch.Tensor,
    text_embeddings: torch.Tensor | None,
    ignore_index: int = 255,
    temperature: float = 1.0,
    cr_temperature: float = 1.0,
    features_rgb: torch.Tensor | None = None,
    features_thermal: torch.Tensor | None = None,
    memory: PrototypeMemory | None = None,
    num_classes: int | None = None,
) -> dict:
    """L_cr and L_se (eq. 12-14) from fused features; see the module docstring for the interpretation.

    Returns a dict with ``l_se`` (None without text embeddings), ``l_cr`` (None when there are
    neither per-modality features nor a memory), ``cr_mode`` (``cross_modal``, ``memory`` or
    None), ``present`` (indices of the classes in the batch) and ``prototypes`` (C, D).
    With fewer than two classes in the batch L_se is 0 (a 1 x 1 relation carries nothing).
    """
    if num_classes is None:
        if text_embeddings is None:
            raise ValueError("prototype losses need num_classes when no text embeddings are given")
        num_classes = int(text_embeddings.shape[0])
    if text_embeddings is not None and text_embeddings.shape[0] != num_classes:
        raise ValueError(
            f"text embeddings have {text_embeddings.shape[0]} rows, expected one per class ({num_classes})"
        )
    protos, present = class_prototypes(features, labels, num_classes, ignore_index)
    idx = present.nonzero().flatten()
    zero = features.sum() * 0.0 + 0.0  # (+ 0.0: no "-0.0" in logs)
    result: dict = {"present": idx, "prototypes": protos, "l_se": None, "l_cr": None, "cr_mode": None}
    if text_embeddings is not None:
        if idx.numel() >= 2:
            text = text_embeddings.to(device=features.device)[idx]
            result["l_se"] = relation_kl(protos[idx], text, temperature)
        else:
            result["l_se"] = zero
    if features_rgb is not None and features_thermal is not None:
        p_rgb, _ = class_prototypes(features_rgb, labels, num_classes, ignore_index)
        p_th, _ = class_prototypes(features_thermal, labels, num_classes, ignore_index)
        if idx.numel() == 0:
            result["l_cr"] = zero
        else:
            a, b = p_rgb[idx], p_th[idx]
            result["l_cr"] = 0.5 * (channel_kl(a, b, cr_temperature) + channel_kl(b, a, cr_temperature))
        result["cr_mode"] = "cross_modal"
    elif memory is not None:
        ref, seen = memory.reference(num_classes, protos.shape[1], protos.device, protos.dtype)
        both = (present & seen).nonzero().flatten()
        if both.numel() == 0:
            result["l_cr"] = zero
        else:
            result["l_cr"] = channel_kl(ref[both], protos[both], cr_temperature)
        memory.update(protos, present)
        result["cr_mode"] = "memory"
    return result


# --------------------------------------------------------------------------- the full objective


def _pick_level(value, level: str, key: str):
    if value is None or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        if level not in value:
            raise ValueError(f"model output '{key}' has levels {sorted(value)}; the loss is set to use '{level}'")
        return value[level]
    raise ValueError(f"model output '{key}' must be a tensor or a dict of tensors, got {type(value).__name__}")


class SartmLoss(nn.Module):
    """Eq. 15 on a model output dict; returns ``(total, components)`` with float components.

    Reads ``out["s0"]`` (``out["logits"]`` for backends with one segmentation output), ``out["s1"]``,
    ``out["features"]`` (a tensor or a dict of levels, ``feature_level`` picks one; the paper's f is the fused
    semantic feature map, ``sfm``), optionally ``out["features_rgb"]`` / ``out["features_thermal"]``
    for the cross-modal L_cr, and the text embeddings from the ``text_embeddings`` argument,
    ``out["text_embeddings"]`` or the constructor. A term whose inputs are missing is skipped
    with a one-time warning naming the key; a zero weight skips the term silently.
    A backend's own losses in ``out["aux_losses"]`` (a dict of already weighted scalars, e.g.
    FusionSAM's LSTG reconstruction and commitment) are added to the total as they are.
    Components: ``ce_s0``, ``ce_s1``, ``l_cr``, ``l_se`` (unweighted, those computed), each
    ``aux_losses`` entry under its own name, and ``total``. ``language_factor`` (set by the trainer's
    warm-up, 1 otherwise) scales w2 and w3; ``last_weighted`` holds the last call's weighted terms as
    tensors (for :func:`term_gradient_norms`).
    """

    def __init__(
        self,
        weights: tuple[float, float, float, float] = PAPER_WEIGHTS,
        ignore_index: int = 255,
        ohem_thresh: float = 0.7,
        min_kept_fraction: float = 1.0 / 16.0,
        feature_level: str = "sfm",
        temperature: float = 1.0,
        cr_temperature: float = 1.0,
        memory_momentum: float = 0.9,
        text_embeddings: torch.Tensor | None = None,
        class_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        weights = tuple(float(w) for w in weights)
        if len(weights) != 4 or any(w < 0 or not math.isfinite(w) for w in weights):
            raise ValueError(f"SartmLoss weights must be 4 finite values >= 0 (w0..w3), got {weights}")
        if temperature <= 0 or cr_temperature <= 0:
            raise ValueError(f"temperatures must be > 0, got {temperature}, {cr_temperature}")
        self.weights = weights
        self.ignore_index = int(ignore_index)
        self.ohem = OhemCrossEntropy(ignore_index, ohem_thresh, min_kept_fraction, class_weights)
        self.feature_level = feature_level
        self.temperature = float(temperature)
        self.cr_temperature = float(cr_temperature)
        self.memory = PrototypeMemory(memory_momentum)
        self.text_embeddings = text_embeddings
        self.language_factor = 1.0
        self.last_weighted: dict[str, torch.Tensor] = {}
        self._warned: set[str] = set()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            # stacklevel 5: _warn_once <- forward <- Module._call_impl <- Module.__call__ <- the trainer's line.
            warnings.warn(message, RuntimeWarning, stacklevel=5)

    def forward(
        self, out: dict, labels: torch.Tensor, text_embeddings: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        w0, w1, w2, w3 = self.weights
        w2, w3 = w2 * self.language_factor, w3 * self.language_factor
        labels = labels.long()
        terms: dict[str, torch.Tensor] = {}
        s0 = out.get("s0")
        if s0 is None:  # single-output backends (CPAL, FusionSAM): the first CE term is on their logits
            s0 = out.get("logits")
            if s0 is None:
                raise ValueError("model output has neither 's0' nor 'logits': nothing to train the segmentation on")
        if w0 > 0:
            terms["ce_s0"] = self.ohem(s0, labels)
        if w1 > 0:
            if out.get("s1") is not None:
                terms["ce_s1"] = self.ohem(out["s1"], labels)
            else:
                self._warn_once("s1", "model output has no 's1' (auxiliary head): the w1 * L_CE(S1) term is skipped")
        if self.weights[2] > 0 or self.weights[3] > 0:  # computed (and logged) during the warm-up too
            w2_on, w3_on = self.weights[2] > 0, self.weights[3] > 0
            feats = _pick_level(out.get("features"), self.feature_level, "features")
            text = text_embeddings if text_embeddings is not None else out.get("text_embeddings")
            text = text if text is not None else self.text_embeddings
            if feats is None:
                self._warn_once("features", "model output has no 'features': L_cr and L_se are skipped")
            else:
                if text is None and w3_on:
                    self._warn_once("text", "no text embeddings (argument, model output or loss): L_se is skipped")
                f_rgb = _pick_level(out.get("features_rgb"), self.feature_level, "features_rgb")
                f_th = _pick_level(out.get("features_thermal"), self.feature_level, "features_thermal")
                if w2_on and (f_rgb is None or f_th is None):
                    self._warn_once(
                        "per_modality",
                        "model output has no 'features_rgb'/'features_thermal': L_cr compares the fused class "
                        "prototypes with their running average (prototype memory) instead of across modalities",
                    )
                res = prototype_distillation_losses(
                    feats,
                    labels,
                    text if w3_on else None,
                    ignore_index=self.ignore_index,
                    temperature=self.temperature,
                    cr_temperature=self.cr_temperature,
                    features_rgb=f_rgb if w2_on else None,
                    features_thermal=f_th if w2_on else None,
                    memory=self.memory if w2_on else None,
                    num_classes=int(s0.shape[1]),
                )
                if w2_on and res["l_cr"] is not None:
                    terms["l_cr"] = res["l_cr"]
                if w3_on and res["l_se"] is not None:
                    terms["l_se"] = res["l_se"]
        weight_of = {"ce_s0": w0, "ce_s1": w1, "l_cr": w2, "l_se": w3}
        weighted = {k: weight_of[k] * v for k, v in terms.items()}
        total = sum(weighted.values(), start=s0.sum() * 0.0)
        aux = out.get("aux_losses") or {}
        for name, v in aux.items():
            if name in weight_of or name == "total":
                raise ValueError(f"model aux_losses entry '{name}' clashes with a loss term of the same name")
            if not isinstance(v, torch.Tensor) or v.numel() != 1:
                raise ValueError(f"model aux_losses entry '{name}' must be a scalar tensor, got {type(v).__name__}")
            total = total + v.float().reshape(())
            weighted[name] = v.float().reshape(())
        self.last_weighted = weighted
        components = {k: float(v.detach()) for k, v in terms.items()}
        components.update({k: float(v.detach()) for k, v in aux.items()})
        components["total"] = float(total.detach())
        return total, components

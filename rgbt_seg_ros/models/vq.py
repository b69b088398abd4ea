"""Vector quantisation: FusionSAM's Latent Space Token Generation (LSTG), eq. 2-8.

:class:`LatentSpaceTokenGenerator` holds one :class:`LatentAutoencoder` per modality and ONE
:class:`VectorQuantizer`, the paper's single learned codebook C (eq. 3) that both modalities index:
a conv encoder ``E`` compresses an image (B, C, H, W) by ``downsample`` (s) to a latent grid z
(B, d_c, H/s, W/s) (eq. 2), the shared quantiser maps every latent vector to its nearest codebook
entry (eq. 3) with a straight-through gradient, and a conv decoder ``G`` per modality
reconstructs its image from the quantised grid (eq. 4). One codebook puts both modalities' tokens
in one vocabulary, so the fusion that follows compares like with like.

The codebook is not learned by gradient but by exponential moving averages (the VQ-VAE paper's
EMA variant, as in VQ-VAE-2 and Jukebox): in training mode every forward moves each code to the
running mean of the encoder outputs assigned to it. Before the first update the codebook is
initialised by k-means (k-means++ seeds) on the first training batch (both modalities), and after every update a
code whose running assignment count fell below ``dead_threshold`` is restarted at a random
encoder output of the batch. Without these a VQ codebook collapses to a few codes (the plain
loss-trained codebook used ~12 of 64 codes, perplexity ~6); with them most codes stay in use.
The codebook, its running counts and sums are buffers: no optimiser touches them, and a frozen-
parameter check sees only parameters. Under ``torch.distributed`` the counts and sums are summed
over ranks and rank 0's restarts are broadcast, so every rank keeps the same codebook.

Balance between the modalities. Two encoders feed one codebook, and nothing ties their output
scales: when thermal latents are, say, 20x smaller than RGB's (or sit far from them), k-means, the
EMA and random restarts place the codes where RGB's tokens are, and all thermal tokens fall onto a
handful of codes (a micro model with the thermal encoder's output scaled by 0.02: thermal perplexity
1.0 after k-means, 2.6 after 30 training steps, RGB 9-40). So, by default:

* each modality's latents pass a :class:`RunningStandardizer` before the shared codebook: minus the
  modality's running per-channel mean, divided by its running scale (one number, the RMS over channels
  of the per-channel standard deviation), so both clouds are centred and equally spread without being
  reshaped; k-means, the EMA, restarts, the commitment loss and everything after the quantiser work on
  these standardised tokens (the statistics are set by the first training batch, then follow an EMA
  with the codebook's decay; eval uses the running values);
* dead codes restart at tokens of the **under-served** modality, the one whose tokens in the batch
  have the lower code perplexity (``restart_from="underserved"``; ``"batch"``: any token of the batch).

``code_statistics`` per modality (``perplexity_<m>``, ``usage_<m>``) show whether it works.

Losses (all means over elements, so their size does not depend on the image size):

* reconstruction ``L_rec = mean (I - G(q))^2`` (eq. 5), optionally over valid pixels only;
* codebook + commitment ``L_commit = mean (sg[z] - q)^2 + beta * mean (sg[q] - z)^2`` (eq. 6),
  per modality. Its value is eq. 6; its gradient is the commitment term only, since the EMA
  update takes the place of the codebook term's gradient;
* perceptual ``L_perc = mean (Phi(I) - Phi(I_hat))^2`` (eq. 7) with a caller-supplied feature
  network Phi (FusionSAM passes its frozen SAM2 trunk's first stage), off by default;
* adversarial (eq. 8), off by default: :class:`PatchDiscriminator` with the non-saturating
  GAN loss. Both players' terms come out of one backward pass: the discriminator's loss sees
  the reconstruction detached, the generator's loss sees the discriminator's parameters
  detached (``torch.func.functional_call``), so one optimiser step updates each side with its
  own objective only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _nearest(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code (squared Euclidean distance) for every row of x (N, d), in fp32 even
    under autocast (fp16/bf16 distances would pick other codes in training and in inference)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, codes = x.float(), codes.float()
        dist_sq = x.pow(2).sum(1, keepdim=True) - 2 * x @ codes.t() + codes.pow(2).sum(1)[None]
    return dist_sq.argmin(1)


def code_statistics(idx: torch.Tensor, num_codes: int) -> dict[str, torch.Tensor]:
    """``usage`` (fraction of the codes that ``idx`` uses) and ``perplexity`` (exp of the entropy of
    the code histogram: 1 = one code, ``num_codes`` = all codes equally often), as 0-d tensors."""
    counts = torch.bincount(idx.flatten(), minlength=num_codes).float()
    p = counts / counts.sum().clamp_min(1)
    perplexity = torch.exp(-(p * p.clamp_min(1e-12).log()).sum())
    return {"perplexity": perplexity, "usage": (counts > 0).float().mean()}


#: where dead codes restart (see :class:`VectorQuantizer`)
RESTART_SOURCES = ("underserved", "batch")


class RunningStandardizer(nn.Module):
    """One modality's latents on the common scale of the shared codebook: ``(z - mean) / scale`` with
    the running per-channel ``mean`` and one running ``scale`` = sqrt(mean over channels of the
    per-channel variance). Isotropic, so the modality's token cloud keeps its shape and only its centre
    and spread are aligned with the other modality's.

    Training mode: the batch's statistics (all-reduced under ``torch.distributed``) set the running
    values on the first batch and move them by EMA (``decay``) after; the batch is then standardised
    with the updated running values, which are buffers (no gradient through the statistics). Eval mode:
    the running values, so an image's tokens do not depend on its batch. Before any training batch it
    is the identity.
    """

    def __init__(self, dim: int, decay: float = 0.99, eps: float = 1e-8):
        super().__init__()
        self.decay, self.eps = float(decay), float(eps)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, z: torch.Tensor) -> None:
        """Running statistics += the batch's: z (B, d, h, w), two passes (mean first) in fp32."""
        x = z.detach().float().transpose(0, 1).reshape(z.shape[1], -1)  # (d, N)
        total = x.new_tensor([x.shape[1]], dtype=torch.float32)
        sums = x.sum(1)
        if _distributed():
            dist.all_reduce(total)
            dist.all_reduce(sums)
        mean = sums / total.clamp_min(1)
        sq = (x - mean[:, None]).pow(2).sum(1)
        if _distributed():
            dist.all_reduce(sq)
        var = sq / total.clamp_min(1)
        if bool(self.initialized):
            self.mean.mul_(self.decay).add_(mean, alpha=1.0 - self.decay)
            self.var.mul_(self.decay).add_(var, alpha=1.0 - self.decay)
        else:
            self.mean.copy_(mean)
            self.var.copy_(var)
            self.initialized.fill_(True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.update(z)
        # untrained: exactly z; eps only floors a degenerate spread (std 1e-4), it does not bias a small one
        scale = torch.where(self.initialized, torch.rsqrt(self.var.mean().clamp_min(self.eps)), 1.0)
        return (z - self.mean.to(z.dtype).reshape(1, -1, 1, 1)) * scale.to(z.dtype)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with a straight-through estimator; EMA codebook with
    k-means initialisation and dead-code restarts (see the module docstring).

    ``decay``: EMA decay of the per-code counts and sums; ``dead_threshold``: a code whose running
    count (assignments per batch, averaged by the EMA) is below it is restarted (0 = never);
    ``kmeans_iters``: Lloyd iterations of the initialisation (0 = keep the random init);
    ``restart_from``: where dead codes restart when :meth:`quantize` is given the batch's ``groups``
    (one per modality): ``"underserved"`` at tokens of the group with the lowest code perplexity,
    ``"batch"`` at any token.
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        beta: float = 0.25,
        decay: float = 0.99,
        dead_threshold: float = 1.0,
        kmeans_iters: int = 10,
        eps: float = 1e-5,
        restart_from: str = "underserved",
    ):
        super().__init__()
        if restart_from not in RESTART_SOURCES:
            raise ValueError(f"lstg.restart_from must be one of {RESTART_SOURCES}, got {restart_from!r}")
        if num_codes < 2 or dim < 1:
            raise ValueError(f"a codebook needs >= 2 codes of dim >= 1, got {num_codes} x {dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"lstg.ema_decay must be in [0, 1), got {decay}")
        if dead_threshold < 0 or kmeans_iters < 0:
            raise ValueError(
                f"lstg.dead_code_threshold and lstg.kmeans_iters must be >= 0, got {dead_threshold}, {kmeans_iters}"
            )
        self.num_codes = int(num_codes)
        self.dim = int(dim)
        self.beta = float(beta)
        self.decay = float(decay)
        self.dead_threshold = float(dead_threshold)
        self.kmeans_iters = int(kmeans_iters)
        self.eps = float(eps)
        self.restart_from = restart_from
        codebook = torch.empty(num_codes, dim).uniform_(-1.0 / num_codes, 1.0 / num_codes)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.zeros(num_codes))  # EMA of assignments per batch
        self.register_buffer("embed_sum", codebook.clone())  # EMA of the sum of assigned latents
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    # ------------------------------------------------------------------ codebook updates (training only)
    def _sample(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """n rows of x drawn at random (with a little noise when x has fewer rows than n)."""
        if x.shape[0] >= n:
            return x[torch.randperm(x.shape[0], device=x.device)[:n]]
        rows = x[torch.randint(x.shape[0], (n,), device=x.device)]
        return rows + 0.01 * x.std(0, correction=0, keepdim=True).clamp_min(1e-6) * torch.randn_like(rows)

    def _broadcast(self) -> None:
        if _distributed():
            for t in (self.codebook, self.cluster_size, self.embed_sum):
                dist.broadcast(t, src=0)

    def _kmeans_plus_plus(self, x: torch.Tensor) -> torch.Tensor:
        """k-means++ seeding: each next seed drawn with probability proportional to its squared
        distance from the seeds so far (falls back to random rows when x has fewer than k rows)."""
        k = self.num_codes
        if x.shape[0] <= k:
            return self._sample(x, k)
        seeds = [x[torch.randint(x.shape[0], (1,), device=x.device)]]
        d2 = (x - seeds[0]).pow(2).sum(1)
        for _ in range(1, k):
            total = d2.sum()
            probs = d2 / total if total > 0 else torch.ones_like(d2)
            seed = x[torch.multinomial(probs, 1)]
            seeds.append(seed)
            d2 = torch.minimum(d2, (x - seed).pow(2).sum(1))
        return torch.cat(seeds)

    @torch.no_grad()
    def kmeans_init(self, x: torch.Tensor) -> None:
        """Codebook := k-means of the latents x (N, d): k-means++ seeds, ``kmeans_iters`` Lloyd steps."""
        k, total = self.num_codes, x.shape[0]
        x = self._sample(x, min(total, 64 * k))
        codes = self._kmeans_plus_plus(x)
        counts = torch.zeros(k, device=x.device)
        for _ in range(self.kmeans_iters):
            idx = _nearest(x, codes)
            counts = torch.bincount(idx, minlength=k).float()
            sums = torch.zeros_like(codes).index_add_(0, idx, x)
            filled = counts > 0
            codes = torch.where(filled[:, None], sums / counts.clamp_min(1)[:, None], codes)
        counts = counts * (total / x.shape[0])  # per batch, like the EMA counts ...
        if _distributed():
            counts = counts * dist.get_world_size()  # ... which count the batches of all ranks
        self.codebook.copy_(codes)
        self.cluster_size.copy_(counts)  # empty clusters count 0: restarted by the dead-code rule
        self.embed_sum.copy_(codes * counts[:, None])
        self.initialized.fill_(True)
        self._broadcast()

    def _restart_source(self, x: torch.Tensor, idx: torch.Tensor, groups: list[int] | None) -> torch.Tensor:
        """The rows of x dead codes restart at: with ``groups`` (row counts per modality, in order) and
        ``restart_from="underserved"``, the group whose tokens have the lowest code perplexity."""
        if not groups or len(groups) < 2 or self.restart_from == "batch":
            return x
        parts, codes = x.split(groups), idx.split(groups)
        perplexities = [float(code_statistics(c, self.num_codes)["perplexity"]) for c in codes]
        return parts[min(range(len(parts)), key=perplexities.__getitem__)]

    @torch.no_grad()
    def ema_update(self, x: torch.Tensor, idx: torch.Tensor, groups: list[int] | None = None) -> int:
        """Move the codes toward the mean of the latents x (N, d) assigned to them (idx), then
        restart dead codes at random latents (of the under-served group, see :meth:`_restart_source`);
        returns how many codes were restarted."""
        counts = torch.bincount(idx, minlength=self.num_codes).to(x.dtype)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, idx, x)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n  # Laplace smoothing
        self.codebook.copy_(self.embed_sum / smoothed[:, None])
        dead = self.cluster_size < self.dead_threshold
        restarted = int(dead.sum())
        if restarted:
            fresh = self._sample(self._restart_source(x, idx, groups), restarted)
            self.codebook[dead] = fresh
            self.cluster_size[dead] = self.dead_threshold
            self.embed_sum[dead] = fresh * self.dead_threshold
            self._broadcast()
        return restarted

    # ------------------------------------------------------------------ quantisation
    def commitment_loss(self, z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Eq. 6 for one latent grid: ``mean (sg[z] - q)^2 + beta * mean (sg[q] - z)^2``."""
        return F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())

    def quantize(self, z: torch.Tensor, groups: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """z (B, d, h, w) -> (q, the nearest codes without gradient, indices (B, h, w), restarts).

        In training mode this also initialises (first call) and updates the codebook, after the
        lookup: q holds the codes the batch was assigned to. ``groups``: how many of the B images
        belong to each modality (in order), for the restarts.
        """
        b, d, h, w = z.shape
        if d != self.dim:
            raise ValueError(f"latent has {d} channels, the codebook {self.dim}")
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, d).float()
        if self.training and not bool(self.initialized) and self.kmeans_iters > 0:
            self.kmeans_init(flat)
        idx = _nearest(flat, self.codebook)
        q = self.codebook[idx].reshape(b, h, w, d).permute(0, 3, 1, 2).to(z.dtype)
        rows = [g * h * w for g in groups] if groups else None
        restarted = self.ema_update(flat, idx, rows) if self.training else 0
        return q, idx.reshape(b, h, w), restarted

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, d, h, w) -> (z_q with straight-through gradient, code indices (B, h, w), L_commit)."""
        q, idx, _ = self.quantize(z)
        z_q = z + (q - z).detach()  # straight-through: forward value q, gradient of identity to z
        return z_q, idx, self.commitment_loss(z, q)


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        groups = 8 if ch % 8 == 0 else 1
        self.body = nn.Sequential(
            nn.GroupNorm(groups, ch),
            nn.SiLU(),
            nn.Conv2d(ch, ch, 3, padding=1),
            nn.GroupNorm(groups, ch),
            nn.SiLU(),
            nn.Conv2d(ch, ch, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _num_halvings(downsample: int) -> int:
    n = int(downsample).bit_length() - 1
    if downsample < 1 or 2**n != downsample:
        raise ValueError(f"lstg.downsample must be a power of two >= 1, got {downsample}")
    return n


class LatentAutoencoder(nn.Module):
    """Encoder E and decoder G of one modality (a small VQGAN generator); the codebook is shared
    and lives in :class:`LatentSpaceTokenGenerator`.

    Widths double at every halving and reach ``hidden`` at the latent grid (e.g. 16, 32, 64 for
    ``downsample`` 4), so the full-resolution layers stay cheap at 480x640; one residual block
    works at the latent resolution on each side.
    """

    def __init__(self, in_channels: int, hidden: int, latent_dim: int, downsample: int = 4):
        super().__init__()
        n = _num_halvings(downsample)
        self.downsample = int(downsample)
        widths = [max(8, hidden // 2 ** (n - level)) for level in range(n)] + [hidden]
        gn = 8 if hidden % 8 == 0 else 1
        enc: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1), nn.SiLU()]
        for level in range(n):
            enc += [nn.Conv2d(widths[level], widths[level + 1], 4, stride=2, padding=1), nn.SiLU()]
        enc += [ResBlock(hidden), nn.GroupNorm(gn, hidden), nn.SiLU(), nn.Conv2d(hidden, latent_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(latent_dim, hidden, 3, padding=1), ResBlock(hidden)]
        for level in reversed(range(n)):
            dec += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(widths[level + 1], widths[level], 3, padding=1),
                nn.SiLU(),
            ]
        dec += [nn.Conv2d(widths[0], in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(z_q)


class LatentSpaceTokenGenerator(nn.Module):
    """LSTG: one :class:`LatentAutoencoder` per modality (submodules named after the modalities,
    e.g. ``rgb`` and ``thermal``) around ONE shared :class:`VectorQuantizer` (``quantizer``), with a
    :class:`RunningStandardizer` per modality (``standardizers[m]``) between the encoders and the
    codebook when ``standardize`` is true.

    ``lstg[m]`` is modality m's autoencoder.
    """

    def __init__(
        self,
        channels: dict[str, int],
        hidden: int,
        latent_dim: int,
        num_codes: int,
        downsample: int = 4,
        beta: float = 0.25,
        decay: float = 0.99,
        dead_threshold: float = 1.0,
        kmeans_iters: int = 10,
        standardize: bool = True,
        restart_from: str = "underserved",
    ):
        super().__init__()
        self.modalities = tuple(channels)
        for m, c in channels.items():
            self.add_module(m, LatentAutoencoder(c, hidden, latent_dim, downsample))
        self.quantizer = VectorQuantizer(
            num_codes, latent_dim, beta, decay, dead_threshold, kmeans_iters, restart_from=restart_from
        )
        self.standardizers = (
            nn.ModuleDict({m: RunningStandardizer(latent_dim, decay) for m in self.modalities}) if standardize else None
        )

    def __getitem__(self, modality: str) -> LatentAutoencoder:
        return getattr(self, modality)

    def latents(self, images: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The encoder outputs the codebook sees: E(I) per modality, standardised when enabled (in
        training mode this updates the running statistics)."""
        z = {m: self[m].encoder(images[m]) for m in self.modalities}
        if self.standardizers is not None:
            z = {m: self.standardizers[m](z[m]) for m in self.modalities}
        return z

    def forward(self, images: dict[str, torch.Tensor]) -> tuple[dict, dict, dict, dict]:
        """Images per modality (same B, H, W) -> (I^q with straight-through gradient, code indices
        (B, h, w), L_commit (eq. 6) per modality, and ``codebook`` statistics).

        Both modalities are quantised in one lookup against the shared codebook, so the EMA update,
        the k-means initialisation and the dead-code restarts see the (standardised) tokens of both.
        Statistics: ``perplexity`` and ``usage`` over both modalities, ``perplexity_<m>`` and
        ``usage_<m>`` per modality and, in training mode, ``restarted`` (codes restarted by this
        forward), all 0-d tensors.
        """
        z = self.latents(images)
        sizes = [z[m].shape[0] for m in self.modalities]
        q, idx, restarted = self.quantizer.quantize(torch.cat([z[m] for m in self.modalities]), sizes)
        q_m = dict(zip(self.modalities, q.split(sizes)))
        idx_m = dict(zip(self.modalities, idx.split(sizes)))
        latents = {m: z[m] + (q_m[m] - z[m]).detach() for m in self.modalities}  # straight-through
        commits = {m: self.quantizer.commitment_loss(z[m], q_m[m]) for m in self.modalities}
        k = self.quantizer.num_codes
        stats = code_statistics(idx, k)
        for m in self.modalities:
            own = code_statistics(idx_m[m], k)
            stats[f"perplexity_{m}"], stats[f"usage_{m}"] = own["perplexity"], own["usage"]
        if self.training:
            stats["restarted"] = torch.tensor(float(restarted), device=idx.device)
        return latents, idx_m, commits, stats


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error, over the pixels where ``mask`` (B, 1, H, W) is 1 when given."""
    if mask is None:
        return F.mse_loss(a, b)
    err = (a - b).pow(2) * mask
    return err.sum() / (mask.sum() * a.shape[1]).clamp_min(1.0)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (VQGAN's), for the optional adversarial term of eq. 8."""

    def __init__(self, in_channels: int, channels: int = 32, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for _ in range(1, layers):
            mods += [nn.Conv2d(ch, ch * 2, 4, 2, 1), nn.GroupNorm(1, ch * 2), nn.LeakyReLU(0.2)]
            ch *= 2
        mods += [nn.Conv2d(ch, 1, 3, 1, 1)]
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def losses(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(discriminator loss, generator loss) of eq. 8 in the non-saturating form, one backward for both."""
        d_real = self(real.detach())
        d_fake = self(fake.detach())
        loss_d = 0.5 * (
            F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
            + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
        )
        frozen = {k: v.detach() for k, v in self.named_parameters()}
        g_fake = torch.func.functional_call(self, frozen, (fake,))
        loss_g = F.binary_cross_entropy_with_logits(g_fake, torch.ones_like(g_fake))
        return loss_d, loss_g

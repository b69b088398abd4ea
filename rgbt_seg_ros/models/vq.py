"""Vector-quantised autoencoder: FusionSAM's Latent Space Token Generation (LSTG), eq. 2-8.

One :class:`VQAutoencoder` per modality: a conv encoder ``E`` compresses an image (B, C, H, W) by
``downsample`` (s) to a latent grid z (B, d_c, H/s, W/s) (eq. 2), :class:`VectorQuantizer` maps
every latent vector to its nearest codebook entry (eq. 3) with a straight-through gradient, and
a conv decoder ``G`` reconstructs the image from the quantised grid (eq. 4).

Losses (all means over elements, so their size does not depend on the image size):

* reconstruction ``L_rec = mean (I - G(q))^2`` (eq. 5), optionally over valid pixels only;
* codebook + commitment ``L_commit = mean (sg[z] - q)^2 + beta * mean (sg[q] - z)^2`` (eq. 6);
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
import torch.nn.functional as F
from torch import nn


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with a straight-through estimator (VQ-VAE / VQGAN)."""

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25):
        super().__init__()
        if num_codes < 2 or dim < 1:
            raise ValueError(f"a codebook needs >= 2 codes of dim >= 1, got {num_codes} x {dim}")
        self.num_codes = int(num_codes)
        self.dim = int(dim)
        self.beta = float(beta)
        self.codebook = nn.Embedding(num_codes, dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / num_codes, 1.0 / num_codes)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, d, h, w) -> (z_q with straight-through gradient, code indices (B, h, w), L_commit)."""
        b, d, h, w = z.shape
        if d != self.dim:
            raise ValueError(f"latent has {d} channels, the codebook {self.dim}")
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        codes = self.codebook.weight
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)[None]
        idx = dist.argmin(1)
        q = codes[idx].reshape(b, h, w, d).permute(0, 3, 1, 2)
        loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
        z_q = z + (q - z).detach()  # straight-through: forward value q, gradient of identity to z
        return z_q, idx.reshape(b, h, w), loss

    def usage(self, idx: torch.Tensor) -> tuple[float, float]:
        """(fraction of codes used, perplexity) of a batch of indices."""
        counts = torch.bincount(idx.flatten(), minlength=self.num_codes).float()
        p = counts / counts.sum().clamp_min(1)
        perplexity = torch.exp(-(p * p.clamp_min(1e-12).log()).sum())
        return float((counts > 0).float().mean()), float(perplexity)


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


class VQAutoencoder(nn.Module):
    """Encoder -> codebook -> decoder for one modality (a small VQGAN generator).

    Widths double at every halving and reach ``hidden`` at the latent grid (e.g. 16, 32, 64 for
    ``downsample`` 4), so the full-resolution layers stay cheap at 480x640; one residual block
    works at the latent resolution on each side.
    """

    def __init__(
        self, in_channels: int, hidden: int, latent_dim: int, num_codes: int, downsample: int = 4, beta: float = 0.25
    ):
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
        self.quantizer = VectorQuantizer(num_codes, latent_dim, beta)
        dec: list[nn.Module] = [nn.Conv2d(latent_dim, hidden, 3, padding=1), ResBlock(hidden)]
        for level in reversed(range(n)):
            dec += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(widths[level + 1], widths[level], 3, padding=1),
                nn.SiLU(),
            ]
        dec += [nn.Conv2d(widths[0], in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """image -> (quantised latent I^q, code indices, L_commit)."""
        return self.quantizer(self.encoder(image))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(z_q)


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

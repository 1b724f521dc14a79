"""DMAE pre-training model: a masked autoencoder that reconstructs the clean image from a noisy one.

Follows facebookresearch/mae ``models_mae.py`` with two changes from the DMAE paper: the encoder
sees a noisy image (the job's :class:`~dmae_lightning.noise.Noise`, added in [0,1] pixel space at native
resolution, before any resize), and the loss covers all patches, kept and masked, against the clean image.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from dmae_lightning.models.layers import ViTEncoderBase, sincos_pos_embed_2d, transformer_blocks
from dmae_lightning.noise import DEFAULT_NOISE, Noise, noise_from_config


class DMAEViT(ViTEncoderBase):
    """``loss, pred, mask = model(imgs, mask_ratio=0.75)`` with imgs in [0,1], any native size."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        noise: Noise | Mapping = DEFAULT_NOISE,
        norm_pix_loss: bool = True,
        drop_path_rate: float = 0.0,
    ):
        # checked before the (for ViT-L, seconds-long) construction
        noise = noise_from_config(noise)
        super().__init__(
            img_size,
            patch_size,
            in_chans,
            embed_dim,
            depth,
            num_heads,
            mlp_ratio,
            drop_path_rate,
            learnable_pos_embed=False,
        )
        self.noise = noise
        self.norm_pix_loss = bool(norm_pix_loss)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_pos_embed_2d(decoder_embed_dim, self.grid_size), requires_grad=False
        )  # [1, 1+L, Dd]
        self.decoder_blocks = transformer_blocks(
            decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)

        self.init_encoder_weights()
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self.init_linear_and_norm)

    # --- patch bookkeeping ------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, L, p*p*3] (pixel order: row, column, channel, as in MAE)."""
        p, g = self.patch_size, self.grid_size
        x = imgs.reshape(imgs.shape[0], 3, g, p, g, p)  # [B, 3, g, p, g, p]
        x = torch.einsum("nchpwq->nhwpqc", x)  # [B, g, g, p, p, 3]
        return x.reshape(imgs.shape[0], g * g, p * p * 3)  # [B, L, p*p*3]

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, p*p*3] -> [B, 3, S, S]."""
        p, g = self.patch_size, self.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, 3)  # [B, g, g, p, p, 3]
        x = torch.einsum("nhwpqc->nchpwq", x)  # [B, 3, g, p, g, p]
        return x.reshape(x.shape[0], 3, g * p, g * p)  # [B, 3, S, S]

    # --- the three stages -------------------------------------------------------------------
    def add_noise(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The noise in [0,1] pixel space at native resolution (no clamping)."""
        return self.noise.perturb(imgs, generator)  # [B, 3, H, W]

    def masking_scores(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The uniform scores [B, L] whose order shuffles each image's patches (:meth:`random_masking`)."""
        return torch.rand(batch, self.grid_size**2, generator=generator, device=device)  # [B, L]

    def draw_noise(
        self, imgs: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every random draw of one forward pass, in the order :meth:`forward` makes them: the noisy images
        [B, 3, H, W], then the masking scores [B, L]. Drawn here, outside the compiled forward (a
        ``torch.Generator`` inside a compiled function breaks its graph), and passed in as ``noisy=, scores=``:
        the same numbers as ``forward(imgs, mask_ratio, generator)``."""
        noisy = self.add_noise(imgs, generator)  # [B, 3, H, W]
        return noisy, self.masking_scores(imgs.shape[0], imgs.device, generator)

    def random_masking(
        self,
        x: torch.Tensor,
        mask_ratio: float,
        generator: torch.Generator | None = None,
        scores: torch.Tensor | None = None,
    ):
        """Per-sample shuffle by ``scores`` [B, L] (drawn from ``generator`` when not given); keep the first
        (1 - mask_ratio) of the patch tokens.

        Returns kept tokens [B, K, D], mask [B, L] (1 = removed) and the order that undoes the shuffle.
        """
        b, length, dim = x.shape
        keep = int(length * (1 - mask_ratio))
        if scores is None:
            scores = self.masking_scores(b, x.device, generator)  # [B, L]
        ids_shuffle = torch.argsort(scores, dim=1)  # [B, L]
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # [B, L]
        ids_keep = ids_shuffle[:, :keep]  # [B, K]
        kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))  # [B, K, D]
        mask = torch.ones(b, length, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # [B, L]
        return kept, mask, ids_restore

    def forward_encoder(
        self,
        pixels: torch.Tensor,
        mask_ratio: float,
        generator: torch.Generator | None = None,
        scores: torch.Tensor | None = None,
    ):
        x = self.embed_patches(pixels)  # [B, L, D]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, generator, scores)  # [B, K, D]
        x = self.run_blocks(self.prepend_cls(x))  # [B, 1+K, D]
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)  # [B, 1+K, Dd]
        b, length = ids_restore.shape
        fill = self.mask_token.expand(b, length + 1 - x.shape[1], -1)  # [B, L-K, Dd]
        patches = torch.cat([x[:, 1:, :], fill], dim=1)  # [B, L, Dd] in shuffled order
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # [B, L, Dd]
        x = torch.cat([x[:, :1, :], patches], dim=1) + self.decoder_pos_embed  # [B, 1+L, Dd]
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_pred(self.decoder_norm(x))  # [B, 1+L, p*p*3]
        return x[:, 1:, :]  # [B, L, p*p*3]

    def target_patches(self, clean_pixels: torch.Tensor) -> torch.Tensor:
        target = self.patchify(clean_pixels)  # [B, L, p*p*3]
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, clean_pixels: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """MSE over all patches (kept and masked): the encoder must also denoise what it sees."""
        return ((pred - self.target_patches(clean_pixels)) ** 2).mean()

    def reconstruct(
        self,
        imgs: torch.Tensor,
        noisy: torch.Tensor,
        mask_ratio: float = 0.75,
        generator: torch.Generator | None = None,
        scores: torch.Tensor | None = None,
    ):
        """Loss, prediction and mask for a given clean/noisy pair (both [0,1] pixels, native size); the masking
        scores [B, L] are drawn from ``generator`` unless given."""
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        clean_pixels = self.pixel_input(imgs)  # [B, 3, S, S], resized after the noise was added
        latent, mask, ids_restore = self.forward_encoder(
            self.pixel_input(noisy), mask_ratio, generator, scores
        )
        pred = self.forward_decoder(latent, ids_restore)  # [B, L, p*p*3]
        return self.forward_loss(clean_pixels, pred), pred, mask

    def denoise_patches(self, noisy: torch.Tensor) -> torch.Tensor:
        """The decoder's prediction [B, L, p*p*3] for every patch of ``noisy`` ([0,1] pixels, native size, not
        clamped) with nothing masked (mask ratio 0), for the DMAE as a denoiser (:mod:`.denoiser`).

        No random draw: at mask ratio 0 every token is kept, so the patches stay in their own order (no shuffle,
        no masking scores), and the result is a deterministic function of each image alone. The same numbers as
        ``reconstruct(imgs, noisy, 0.0, scores=identity order)``; per-patch normalised units when
        ``norm_pix_loss`` (the denoiser puts the statistics back)."""
        x = self.prepend_cls(self.embed_patches(self.pixel_input(noisy)))  # [B, 1+L, D]
        latent = self.norm(self.run_blocks(x))  # [B, 1+L, D]
        b, length = latent.shape[0], latent.shape[1] - 1
        in_order = torch.arange(length, device=latent.device).expand(
            b, length
        )  # [B, L]: unshuffle = identity
        return self.forward_decoder(latent, in_order)  # [B, L, p*p*3]

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float = 0.75,
        generator: torch.Generator | None = None,
        *,
        noisy: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
    ):
        """``noisy`` and ``scores`` (both or neither): the draws of :meth:`draw_noise`, made outside a compiled
        forward; without them the forward draws them itself from ``generator``."""
        if (noisy is None) != (scores is None):
            raise ValueError("pass both noisy= and scores= (from draw_noise) or neither")
        if noisy is None:
            noisy = self.add_noise(imgs, generator)
        return self.reconstruct(imgs, noisy, mask_ratio, generator, scores)

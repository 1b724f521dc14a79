"""ViT classifier: the DMAE encoder without masking, used as the base classifier f of the smoothed g.

Fine-tuning pools the patch tokens (``global_pool="avg"``: mean -> ``fc_norm`` -> ``head``), as the
DMAE fine-tuned releases do; linear probing uses the cls token after ``norm`` and a BatchNorm
without affine parameters before the head (``global_pool="token", head_batchnorm=True``).
"""

from __future__ import annotations

import torch
from torch import nn

from dmae_lightning.models.layers import ViTEncoderBase


class VisionTransformerClassifier(ViTEncoderBase):
    """``logits = model(imgs)`` with imgs in [0,1] at any native size."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        head_batchnorm: bool = False,
        head_init_std: float = 2e-5,
    ):
        if global_pool not in ("avg", "token"):  # checked before the (for ViT-L, seconds-long) construction
            raise ValueError(f"global_pool must be 'avg' or 'token', got {global_pool!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        super().__init__(
            img_size,
            patch_size,
            in_chans,
            embed_dim,
            depth,
            num_heads,
            mlp_ratio,
            drop_path_rate,
            learnable_pos_embed=True,
        )
        self.global_pool = global_pool
        self.num_classes = num_classes
        if global_pool == "avg":
            self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        else:
            self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_norm = (
            nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6) if head_batchnorm else nn.Identity()
        )
        self.head = nn.Linear(embed_dim, num_classes)
        self.head_init_std = head_init_std

        self.init_encoder_weights()
        self.apply(self.init_linear_and_norm)
        self.reset_head()

    def reset_head(self) -> None:
        """Fresh head: std 2e-5 for fine-tuning, 0.01 for linear probing, as in MAE/DMAE."""
        nn.init.trunc_normal_(self.head.weight, std=self.head_init_std)
        nn.init.zeros_(self.head.bias)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        x = self.embed_patches(self.pixel_input(imgs))  # [B, L, D]
        x = self.run_blocks(self.prepend_cls(x))  # [B, 1+L, D]
        if self.global_pool == "avg":
            return self.fc_norm(x[:, 1:, :].mean(dim=1))  # [B, D]
        return self.norm(x)[:, 0]  # [B, D]

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_norm(self.forward_features(imgs)))  # [B, num_classes]

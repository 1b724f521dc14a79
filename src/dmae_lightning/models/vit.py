"""ViT classifier: the DMAE encoder without masking, used as the base classifier f of the smoothed g.

timm's ``VisionTransformer`` with the MAE/DMAE fine-tuning options: fine-tuning pools the patch tokens
(``global_pool="avg"``: mean -> ``fc_norm`` -> ``head``), as the DMAE fine-tuned releases do; linear probing uses
the cls token after ``norm`` and a BatchNorm without affine parameters before the head (``global_pool="token",
head_batchnorm=True``). Its parameter names are timm's, which are those of the MAE/DMAE releases.
"""

from __future__ import annotations

from typing import Literal

import torch
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dmae_lightning.models.layers import (
    NO_WEIGHT_DECAY,
    PixelInput,
    init_linear_and_norm,
    init_stem,
    layer_decay_groups,
    layer_norm,
    sincos_pos_embed_2d,
)


class VisionTransformerClassifier(VisionTransformer):
    """``logits = model(imgs)`` with imgs in [0,1] at any native size.

    What timm's ViT lacks, and is added here: the [0,1]-pixel front (``pixel_input``: resize + ImageNet
    normalisation inside the model, so radii are in pixel space), the optional BatchNorm before the head
    (``head_norm``, MAE's linear probing), MAE's init (sin-cos position embedding, xavier weights, a head of
    std ``head_init_std``) and MAE's layer-decay groups.
    """

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
        # Checked before the (for ViT-L, seconds-long) construction, with one-line messages (timm asserts).
        if global_pool not in ("avg", "token"):
            raise ValueError(f"global_pool must be 'avg' or 'token', got {global_pool!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        if in_chans != 3:
            raise ValueError(f"only RGB inputs are supported (in_chans=3), got in_chans={in_chans}")
        pool: Literal["avg", "token"] = "avg" if global_pool == "avg" else "token"
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            global_pool=pool,  # "avg": final norm as fc_norm after pooling, `norm` an Identity; "token": `norm`
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            drop_path_rate=drop_path_rate,
            norm_layer=layer_norm,
            weight_init="skip",  # MAE's init below (timm's would also draw from the RNG first)
        )
        self.img_size, self.patch_size, self.grid_size = img_size, patch_size, img_size // patch_size
        self.pixel_input = PixelInput(img_size)
        self.head_norm = (
            nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6) if head_batchnorm else nn.Identity()
        )
        self.head_init_std = head_init_std
        # timm spreads drop path with linspace(0, rate, depth), which gives a single block none; ours
        # (layers.drop_path_rates, as in the DMAE encoder) gives it the full rate.
        if depth == 1 and drop_path_rate > 0:
            block = self.blocks[0]
            block.drop_path1, block.drop_path2 = DropPath(drop_path_rate), DropPath(drop_path_rate)

        # MAE's init, not timm's: sin-cos position embedding (learnable here), xavier everywhere, small head.
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(embed_dim, self.grid_size))  # [1, 1+L, D]
        assert self.cls_token is not None  # class_token=True
        init_stem(self.patch_embed, self.cls_token)
        self.apply(init_linear_and_norm)
        self.reset_head()

    def reset_head(self) -> None:
        """Fresh head: std 2e-5 for fine-tuning, 0.01 for linear probing, as in MAE/DMAE."""
        assert isinstance(self.head, nn.Linear)  # num_classes >= 1
        nn.init.trunc_normal_(self.head.weight, std=self.head_init_std)
        nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        return set(NO_WEIGHT_DECAY)

    def group_matcher(self, coarse: bool = False) -> dict:
        # timm's puts the final norm and head in the last block's group; MAE gives them one of their own.
        return layer_decay_groups(len(self.blocks))

    def forward_features(
        self, imgs: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """[0,1] pixels -> pooled, normalised features [B, D] (timm's returns the tokens: ours includes
        ``pixel_input`` and the pooling, so that ``head(head_norm(features))`` are the logits)."""
        tokens = super().forward_features(self.pixel_input(imgs), attn_mask=attn_mask, is_causal=is_causal)
        return super().forward_head(tokens, pre_logits=True)  # pool -> fc_norm -> head_drop (p=0): [B, D]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's head on the tokens [B, 1+L, D], with ``head_norm`` before the linear layer."""
        x = super().forward_head(x, pre_logits=True)  # [B, D]
        return x if pre_logits else self.head(self.head_norm(x))

    def forward(
        self, imgs: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        features = self.forward_features(imgs, attn_mask, is_causal)  # [B, D]
        return self.head(self.head_norm(features))  # [B, num_classes]

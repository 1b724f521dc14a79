"""Building blocks shared by the DMAE pre-training model and the classifier.

Both models take [0,1] pixel images at the data's native resolution; everything that turns
pixels into what the ViT expects (bicubic resize, ImageNet normalisation) happens here, so a
certified radius is always measured in pixel space.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

IMAGENET_MEAN, IMAGENET_STD = (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
)  # (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding with the channel layout of the MAE/DMAE releases.

    Written by hand because timm's sin-cos helpers order the channels differently
    (and use another frequency ladder), so they would not reproduce the fixed
    embeddings stored in the official checkpoints.
    First half of the channels encodes the column index, second half the row index; each
    half is [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (D/4)).
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [D/4]
    rows, cols = torch.meshgrid(
        torch.arange(grid_size, dtype=torch.float64),
        torch.arange(grid_size, dtype=torch.float64),
        indexing="ij",
    )

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega[None]  # [L, D/4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # [L, D/2]

    emb = torch.cat([encode(cols), encode(rows)], dim=1)  # [L, D]
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)  # [1+L, D]
    return emb.float().unsqueeze(0)  # [1, (1+)L, D]


class PixelInput(nn.Module):
    """[0,1] pixels at native resolution -> bicubic resize to the model size -> ImageNet normalisation."""

    mean: torch.Tensor  # [1, 3, 1, 1] buffers (register_buffer)
    std: torch.Tensor

    def __init__(self, img_size: int):
        super().__init__()
        self.img_size = img_size
        # Non-persistent: official checkpoints carry no normalisation buffers.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(x.shape)}")
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bicubic", align_corners=False)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)  # [B, 3, S, S]


# The norm of every block and of the final norms, as in MAE/DMAE: torch's LayerNorm with eps 1e-6 (a partial,
# which timm's get_norm_layer and Block accept, and call with device/dtype keywords).
layer_norm = partial(nn.LayerNorm, eps=1e-6)


def drop_path_rates(drop_path_rate: float, depth: int) -> list[float]:
    """Stochastic depth rising linearly from 0 to ``drop_path_rate``; a single block gets the full rate
    (a plain ``linspace`` would give it 0)."""
    return torch.linspace(0, drop_path_rate, depth).tolist() if depth > 1 else [drop_path_rate]


def transformer_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float, drop_path_rate: float = 0.0):
    """Pre-norm timm blocks (qkv bias, LayerNorm eps 1e-6, fused attention), drop path rising linearly."""
    return nn.ModuleList(
        Block(
            dim,
            num_heads,
            mlp_ratio,
            qkv_bias=True,
            drop_path=rate,
            # timm annotates Type[nn.Module] but calls any factory (its own models pass partial(LayerNorm, eps=1e-6))
            norm_layer=layer_norm,  # type: ignore[arg-type]
        )
        for rate in drop_path_rates(drop_path_rate, depth)
    )


# Tokens and position embeddings (timm's convention); biases and norms are excluded as 1-d.
NO_WEIGHT_DECAY = frozenset({"cls_token", "pos_embed", "mask_token", "decoder_pos_embed"})


def layer_decay_groups(depth: int) -> dict:
    """``group_matcher`` of both models, for timm's layer-wise lr decay: stem 0, block i -> i + 1, final
    norms and head ``depth + 1``."""
    return dict(
        stem=r"^cls_token|^pos_embed|^patch_embed",
        # Not timm's (99999,), which merges the final norm and head into the last block's group: MAE
        # and BEiT give them a layer of their own (scale decay^0, the last block decay^1).
        blocks=[
            (r"^blocks\.(\d+)", None),
            (r"^(?:norm|fc_norm|head_norm|head)\b", (depth + 1,)),
        ],
    )


def init_stem(patch_embed: PatchEmbed, cls_token: torch.Tensor) -> None:
    """MAE's init of the patch projection (xavier, like a linear layer) and the cls token (normal, std 0.02)."""
    w = patch_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.normal_(cls_token, std=0.02)


def init_linear_and_norm(module: nn.Module) -> None:
    """MAE's init of the rest (``model.apply``): xavier-uniform linear weights, zero biases, unit norms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ViTEncoderBase(nn.Module):
    """Patch embedding, cls token, fixed position embedding and transformer blocks of the DMAE encoder
    (the classifier is timm's VisionTransformer with the same names and maths, see :mod:`.vit`).

    Attribute names follow the MAE/DMAE releases (``patch_embed.proj``, ``cls_token``,
    ``pos_embed``, ``blocks.N``) so official state dicts load without renaming.
    """

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        drop_path_rate: float,
        learnable_pos_embed: bool,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        if in_chans != 3:
            raise ValueError(f"only RGB inputs are supported (in_chans=3), got in_chans={in_chans}")
        self.img_size, self.patch_size, self.embed_dim = img_size, patch_size, embed_dim
        self.pixel_input = PixelInput(img_size)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid_size = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        pos = sincos_pos_embed_2d(embed_dim, self.grid_size)
        self.pos_embed = nn.Parameter(pos, requires_grad=learnable_pos_embed)  # [1, 1+L, D]
        self.blocks = transformer_blocks(embed_dim, depth, num_heads, mlp_ratio, drop_path_rate)

    def no_weight_decay(self) -> set[str]:
        return set(NO_WEIGHT_DECAY)

    def group_matcher(self, coarse: bool = False) -> dict:
        return layer_decay_groups(len(self.blocks))

    def init_encoder_weights(self) -> None:
        init_stem(self.patch_embed, self.cls_token)

    init_linear_and_norm = staticmethod(init_linear_and_norm)

    def embed_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised [B, 3, S, S] -> patch tokens with position embedding [B, L, D] (no cls token)."""
        return self.patch_embed(pixels) + self.pos_embed[:, 1:, :]  # [B, L, D]

    def prepend_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(tokens.shape[0], -1, -1)  # [B, 1, D]
        return torch.cat([cls, tokens], dim=1)  # [B, 1+L, D]

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

"""Models: shapes, the DMAE loss against a hand computation, noise before resize, fixed position
embeddings against MAE's numpy formula, bad arguments, drop path, pooling and head init."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from dmae_lightning.models import DMAEViT, VisionTransformerClassifier, create_model, list_models
from dmae_lightning.models.layers import sincos_pos_embed_2d
from dmae_lightning.noise import GaussianNoise

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))  # [B, 3, S, S]


def clone(gen: torch.Generator) -> torch.Generator:
    return torch.Generator().set_state(gen.get_state())


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)


def patchify_by_hand(x: torch.Tensor, p: int) -> torch.Tensor:
    """Patch (row i, column j) -> index i * g + j, pixels in (row, column, channel) order, by slicing."""
    g = x.shape[-1] // p
    patches = [
        x[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p].permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        for i in range(g)
        for j in range(g)
    ]
    return torch.stack(patches, dim=1)  # [B, L, p*p*3]


def per_patch_norm(t: torch.Tensor) -> torch.Tensor:
    return (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=True, keepdim=True) + 1e-6)


@pytest.fixture(scope="module")
def micro() -> DMAEViT:
    torch.manual_seed(0)
    return create_model("dmae_vit_micro_patch4").eval()


# --- shapes and sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, L, p", [("dmae_vit_micro_patch4", 64, 4), ("dmae_vit_micro_patch8", 16, 8)])
def test_pretrain_shapes_and_mask(name, L, p):
    model = create_model(name).eval()
    with torch.no_grad():
        loss, pred, mask = model(images(3), mask_ratio=0.75, generator=torch.Generator().manual_seed(1))
    assert loss.shape == () and torch.isfinite(loss)
    assert pred.shape == (3, L, p * p * 3)
    assert mask.shape == (3, L)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert ((mask == 0).sum(dim=1) == int(L * 0.25)).all()
    assert not torch.equal(mask[0], mask[1])  # per-sample shuffle


def test_mask_ratio_zero_keeps_all_tokens(micro):
    with torch.no_grad():
        _, _, mask = micro(images(2), mask_ratio=0.0)
    assert mask.sum() == 0


def test_classifier_logits_shape():
    model = create_model("vit_micro_patch4", num_classes=7).eval()
    with torch.no_grad():
        assert model(images(5)).shape == (5, 7)
        assert model(images(2, size=20)).shape == (2, 7)  # any native size, resized inside


def test_paper_sizes_param_counts_and_base_forward():
    """DMAE ViT-B: 85.8M encoder; ViT-L classifier: 304M (304.3M with a 1000-class head)."""
    torch.manual_seed(0)
    base = create_model("dmae_vit_base_patch16")
    encoder = sum(
        p.numel() for n, p in base.named_parameters() if not n.startswith(("decoder_", "mask_token"))
    )
    assert encoder == 85_798_656
    assert abs(encoder / 1e6 - 85.8) < 0.05
    decoder = sum(p.numel() for n, p in base.named_parameters() if n.startswith(("decoder_", "mask_token")))
    assert abs(decoder / 1e6 - 26.1) < 0.1  # 512-d x 8 blocks, as in MAE
    assert len(base.decoder_blocks) == 8 and base.decoder_embed.out_features == 512
    with torch.no_grad():
        _, pred, mask = base(images(1, size=32), mask_ratio=0.75)  # CIFAR size, resized to 224 inside
    assert pred.shape == (1, 196, 768) and int((mask == 0).sum()) == 49
    del base

    large = create_model("vit_large_patch16")
    total = sum(p.numel() for p in large.parameters())
    assert abs(total / 1e6 - 304.3) < 0.05
    assert len(large.blocks) == 24 and large.embed_dim == 1024 and large.blocks[0].attn.num_heads == 16


def test_list_models_and_factory_names():
    names = list_models()
    for n in (
        "dmae_vit_base_patch16",
        "dmae_vit_large_patch16",
        "vit_base_patch16",
        "vit_large_patch16",
        "vit_tiny_patch4",
        "vit_micro_patch8",
        "dmae_vit_tiny_patch8",
    ):
        assert n in names
    assert isinstance(create_model("dmae_vit_micro_patch8"), DMAEViT)
    assert isinstance(create_model("vit_micro_patch8"), VisionTransformerClassifier)


# --- the loss ----------------------------------------------------------------------------------------


def test_loss_equals_hand_computation_over_all_patches(micro):
    imgs = images(4)
    gen = torch.Generator().manual_seed(123)
    twin = clone(gen)
    with torch.no_grad():
        loss, pred, mask = micro(imgs, mask_ratio=0.75, generator=gen)

    # Same noise, drawn independently; the image is already at the model's size (32).
    noise = torch.randn(imgs.shape, generator=twin)
    noisy = imgs + micro.noise.sigma * noise
    assert micro.noise == GaussianNoise(0.25)

    target = per_patch_norm(patchify_by_hand(normalise(imgs), 4))  # [B, 64, 48], from the CLEAN image
    expected = ((pred - target) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)

    # A regression to MAE's loss (masked patches only) would give a clearly different number.
    per_patch = ((pred - target) ** 2).mean(-1)  # [B, L]
    mae_loss = (per_patch * mask).sum() / mask.sum()
    assert abs(float(mae_loss) - float(loss)) > 1e-3
    # ...and so would a target built from the noisy image (far outside the 1e-6 tolerance above).
    noisy_target = per_patch_norm(patchify_by_hand(normalise(noisy), 4))
    assert abs(float(((pred - noisy_target) ** 2).mean()) - float(loss)) > 1e-5


def test_forward_is_reconstruct_of_noisy_image(micro):
    """forward = add_noise then reconstruct with the rest of the same generator stream."""
    imgs = images(2)
    gen = torch.Generator().manual_seed(5)
    twin = clone(gen)
    with torch.no_grad():
        loss, pred, mask = micro(imgs, generator=gen)
        noisy = imgs + 0.25 * torch.randn(imgs.shape, generator=twin)
        loss2, pred2, mask2 = micro.reconstruct(imgs, noisy, generator=twin)
    assert torch.equal(loss, loss2) and torch.equal(pred, pred2) and torch.equal(mask, mask2)


def test_patchify_matches_slicing_and_unpatchify_inverts(micro):
    x = images(2)
    torch.testing.assert_close(micro.patchify(x), patchify_by_hand(x, 4), rtol=0, atol=0)
    assert torch.equal(micro.unpatchify(micro.patchify(x)), x)


# --- noise ---------------------------------------------------------------------------------------------


def test_noise_is_added_before_the_resize():
    torch.manual_seed(0)
    model = create_model("dmae_vit_micro_patch8", img_size=64).eval()  # 32x32 data into a 64x64 model
    imgs = images(2, size=32)
    seen: list[torch.Tensor] = []
    hook = model.pixel_input.register_forward_hook(lambda mod, inp, out: seen.append(out.detach().clone()))
    gen = torch.Generator().manual_seed(7)
    twin = clone(gen)
    try:
        with torch.no_grad():
            loss, _, _ = model(imgs, generator=gen)
    finally:
        hook.remove()
    noise = torch.randn(imgs.shape, generator=twin)  # [B, 3, 32, 32]: native resolution
    clean_in, encoder_in = seen  # target first, then the encoder's input
    assert encoder_in.shape == (2, 3, 64, 64)
    torch.testing.assert_close(clean_in, normalise(resize(imgs, 64)), rtol=0, atol=1e-5)
    torch.testing.assert_close(encoder_in, normalise(resize(imgs + 0.25 * noise, 64)), rtol=0, atol=1e-5)
    # Noise added after the resize would be a different input (and a different noise distribution).
    wrong = normalise(
        resize(imgs, 64) + 0.25 * torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    )
    assert (encoder_in - wrong).abs().max() > 0.5
    upsampled_noise = resize(0.25 * noise, 64)
    assert abs(float(upsampled_noise.std()) - 0.25) > 0.02  # resizing changes the noise std

    # The same loss from reconstruct() given the pre-resize noisy image.
    with torch.no_grad():
        loss2, _, _ = model.reconstruct(imgs, imgs + 0.25 * noise, generator=twin)
    assert torch.equal(loss, loss2)


def test_noise_std_is_sigma_at_native_resolution(micro):
    imgs = torch.full((64, 3, 32, 32), 0.5)
    noisy = micro.add_noise(imgs, torch.Generator().manual_seed(0))
    assert noisy.shape == imgs.shape
    diff = noisy - imgs
    assert abs(float(diff.std()) / 0.25 - 1) < 0.02
    assert abs(float(diff.mean())) < 0.005
    assert float(noisy.max()) > 1.0 and float(noisy.min()) < 0.0  # no clamping to [0, 1]


def test_noise_and_norm_pix_loss_are_plain_attributes():
    torch.manual_seed(0)
    model = create_model("dmae_vit_micro_patch4", noise=GaussianNoise(0.5), norm_pix_loss=False).eval()
    assert model.noise == GaussianNoise(0.5) and model.norm_pix_loss is False
    imgs = images(2)
    d = model.add_noise(imgs, torch.Generator().manual_seed(0)) - imgs
    twin_noise = torch.randn(imgs.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(d, 0.5 * twin_noise)

    gen = torch.Generator().manual_seed(3)
    twin = clone(gen)
    with torch.no_grad():
        loss, pred, _ = model(imgs, generator=gen)
        noisy = imgs + 0.5 * torch.randn(imgs.shape, generator=twin)
        loss_twin, _, _ = model.reconstruct(imgs, noisy, generator=twin)
    assert torch.equal(loss, loss_twin)

    # norm_pix_loss False: the target is the normalised pixels themselves.
    target = patchify_by_hand(normalise(imgs), 4)
    torch.testing.assert_close(model.target_patches(model.pixel_input(imgs)), target, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean(), rtol=0, atol=1e-6)
    model.norm_pix_loss = True
    torch.testing.assert_close(
        model.target_patches(model.pixel_input(imgs)), per_patch_norm(target), rtol=0, atol=1e-5
    )


# --- position embedding ----------------------------------------------------------------------------------


def mae_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # [D/4] for D/2 = embed_dim
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def mae_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = mae_1d(embed_dim // 2, grid[0])
    emb_w = mae_1d(embed_dim // 2, grid[1])
    emb = np.concatenate([emb_h, emb_w], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)  # cls row zeros


@pytest.mark.parametrize("dim, grid", [(64, 8), (128, 4), (768, 14), (512, 14)])
def test_sincos_matches_mae_numpy(dim, grid):
    ours = sincos_pos_embed_2d(dim, grid)
    assert ours.shape == (1, 1 + grid * grid, dim)
    np.testing.assert_allclose(ours[0].numpy(), mae_2d(dim, grid), rtol=0, atol=1e-6)


def test_model_position_embeddings_are_fixed_sincos(micro):
    np.testing.assert_allclose(micro.pos_embed[0].detach().numpy(), mae_2d(64, 8), atol=1e-6)
    np.testing.assert_allclose(micro.decoder_pos_embed[0].detach().numpy(), mae_2d(64, 8), atol=1e-6)
    assert not micro.pos_embed.requires_grad and not micro.decoder_pos_embed.requires_grad
    clf = create_model("vit_micro_patch8")
    np.testing.assert_allclose(clf.pos_embed[0].detach().numpy(), mae_2d(64, 4), atol=1e-6)
    assert clf.pos_embed.requires_grad  # fine-tuning learns it, as in MAE
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(66, 4)


# --- blocks ---------------------------------------------------------------------------------------------


def test_fused_attention_is_used(micro, monkeypatch):
    blocks = [*micro.blocks, *micro.decoder_blocks]
    assert all(b.attn.fused_attn for b in blocks)
    assert all(b.attn.qkv.bias is not None for b in blocks)
    assert all(b.norm1.eps == 1e-6 and b.norm2.eps == 1e-6 for b in blocks)
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        micro(images(1))
    assert len(calls) == len(blocks)


def test_drop_path_rises_linearly():
    model = create_model("vit_tiny_patch4", drop_path_rate=0.1)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.blocks]
    np.testing.assert_allclose(rates, np.linspace(0, 0.1, 6), atol=1e-7)
    assert [getattr(b.drop_path2, "drop_prob", 0.0) for b in model.blocks] == rates
    pre = create_model("dmae_vit_tiny_patch4", drop_path_rate=0.2)
    np.testing.assert_allclose(
        [getattr(b.drop_path1, "drop_prob", 0.0) for b in pre.blocks], np.linspace(0, 0.2, 6), atol=1e-7
    )
    assert all(getattr(b.drop_path1, "drop_prob", 0.0) == 0.0 for b in pre.decoder_blocks)  # decoder: none
    for one in (
        create_model("vit_micro_patch4", depth=1, drop_path_rate=0.1),
        create_model("dmae_vit_micro_patch4", depth=1, drop_path_rate=0.1),
    ):
        block = one.blocks[0]  # a single block keeps the full rate (timm's linspace would give it 0)
        assert block.drop_path1.drop_prob == block.drop_path2.drop_prob == 0.1


# --- classifier -----------------------------------------------------------------------------------------


def test_avg_pool_uses_fc_norm_of_mean_patch_token():
    torch.manual_seed(0)
    model = create_model("vit_micro_patch4", num_classes=5).eval()
    with torch.no_grad():
        for p in (model.fc_norm.weight, model.fc_norm.bias, model.head.weight, model.head.bias):
            p.normal_()  # make fc_norm and head non-trivial
    assert isinstance(model.norm, torch.nn.Identity)  # timm's: the final norm moves after the pooling
    imgs = images(3, size=24)
    captured = []
    hook = model.blocks[-1].register_forward_hook(lambda mod, inp, out: captured.append(out))
    with torch.no_grad():
        logits = model(imgs)
    hook.remove()
    tokens = captured[0]  # [B, 1+L, D]
    assert tokens.shape == (3, 65, 64)
    feats = F.layer_norm(tokens[:, 1:].mean(1), (64,), model.fc_norm.weight, model.fc_norm.bias, eps=1e-6)
    torch.testing.assert_close(model.forward_features(imgs), feats, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, feats @ model.head.weight.T + model.head.bias, rtol=0, atol=1e-4)
    # Not the cls token.
    wrong = F.layer_norm(tokens[:, 0], (64,), model.fc_norm.weight, model.fc_norm.bias, eps=1e-6)
    assert (wrong - feats).abs().max() > 1e-2


def test_token_pool_with_head_batchnorm():
    torch.manual_seed(0)
    model = create_model("vit_micro_patch4", num_classes=4, global_pool="token", head_batchnorm=True).eval()
    assert isinstance(model.fc_norm, torch.nn.Identity)
    imgs = images(2)
    captured = []
    hook = model.blocks[-1].register_forward_hook(lambda mod, inp, out: captured.append(out))
    with torch.no_grad():
        feats = model.forward_features(imgs)
    hook.remove()
    expected = F.layer_norm(captured[0][:, 0], (64,), model.norm.weight, model.norm.bias, eps=1e-6)
    torch.testing.assert_close(feats, expected, rtol=0, atol=1e-5)
    assert isinstance(model.head_norm, torch.nn.BatchNorm1d) and not model.head_norm.affine
    with torch.no_grad():
        model.head_norm.running_mean.normal_()  # so that a skipped head_norm would show
        logits = model(imgs)
        torch.testing.assert_close(logits, model.head(model.head_norm(feats)), rtol=0, atol=0)
        # timm's own entry points, on the normalised model-size input, include head_norm too.
        tokens = VisionTransformer.forward_features(model, model.pixel_input(imgs))  # [B, 1+L, D]
        torch.testing.assert_close(model.forward_head(tokens), logits, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), feats, rtol=0, atol=0)


@pytest.mark.parametrize("pool, head_batchnorm", [("avg", False), ("token", True)])
def test_classifier_is_timm_vit_with_the_release_names(pool, head_batchnorm):
    """timm's VisionTransformer, with exactly the parameter names of the MAE/DMAE releases (and our checkpoints)."""
    model = create_model("vit_micro_patch8", num_classes=3, global_pool=pool, head_batchnorm=head_batchnorm)
    assert isinstance(model, VisionTransformer)
    block = [
        f"{m}.{t}"
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
        for t in ("weight", "bias")
    ]
    expected = {
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "head.weight",
        "head.bias",
    }
    expected |= {f"blocks.{i}.{k}" for i in range(2) for k in block}
    expected |= {f"{'fc_norm' if pool == 'avg' else 'norm'}.{t}" for t in ("weight", "bias")}
    if head_batchnorm:
        expected |= {f"head_norm.{b}" for b in ("running_mean", "running_var", "num_batches_tracked")}
    assert set(model.state_dict()) == expected
    assert model.pos_embed.shape == (1, 17, 64) and model.pos_embed.requires_grad


def test_head_init_std():
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch4", num_classes=1000)
    w = model.head.weight.detach()
    assert abs(float(w.std()) / 2e-5 - 1) < 0.02
    assert float(w.abs().max()) < 2e-4
    assert torch.equal(model.head.bias, torch.zeros(1000))
    # The encoder is not initialised that small.
    assert float(model.blocks[0].attn.qkv.weight.detach().std()) > 1e-2


# --- bad values -----------------------------------------------------------------------------------------


def test_bad_values_raise_clear_errors(micro):
    with pytest.raises(ValueError, match=r"unknown model 'vit_huge_patch14'.*choose one of"):
        create_model("vit_huge_patch14")
    with pytest.raises(ValueError, match=r"unknown model 'dmae_nope'"):
        create_model("dmae_nope")
    with pytest.raises(ValueError, match=r"'vit_micro_patch4' takes no argument\(s\) noise, norm_pix_loss"):
        create_model("vit_micro_patch4", noise=GaussianNoise(0.5), norm_pix_loss=True)
    with pytest.raises(ValueError, match="takes no argument"):
        create_model("dmae_vit_micro_patch4", num_classes=10)
    with pytest.raises(ValueError, match="img_size 30 is not divisible by patch_size 4"):
        create_model("vit_micro_patch4", img_size=30)
    with pytest.raises(ValueError, match="img_size 36 is not divisible by patch_size 8"):
        create_model("dmae_vit_micro_patch8", img_size=36)
    for ratio in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
            micro(images(1), mask_ratio=ratio)
    with pytest.raises(ValueError, match="noise.sigma must be a finite number > 0, got -0.1"):
        create_model(
            "dmae_vit_micro_patch4", noise={"_target_": "dmae_lightning.noise.GaussianNoise", "sigma": -0.1}
        )
    with pytest.raises(ValueError, match="global_pool must be 'avg' or 'token'"):
        create_model("vit_micro_patch4", global_pool="max")
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        create_model("vit_micro_patch4", num_classes=0)
    with pytest.raises(ValueError, match="only RGB"):
        create_model("vit_micro_patch4", in_chans=1)
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 3, H, W\]"):
        micro(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError) as info:
        create_model("vit_huge_patch14")
    assert "\n" not in str(info.value)

"""The noise as one object: the config group instantiates it, checkpoints store it as data, and every consumer
(model, fine-tuning, certification) gets that one object."""

from __future__ import annotations

import pytest
import torch
from helpers import CONF
from hydra.utils import instantiate
from omegaconf import OmegaConf
from scipy.stats import norm

from dmae_lightning.jobs.compose import compose
from dmae_lightning.jobs.train import build
from dmae_lightning.noise import GaussianNoise, Noise, noise_from_config

NOISES = sorted(p.stem for p in (CONF / "noise").glob("*.yaml"))


@pytest.mark.parametrize("choice", NOISES)
def test_every_noise_option_instantiates_and_round_trips(choice, tmp_path):
    cfg = compose(CONF, "certify", [f"noise={choice}", "weights=x"], output_dir=tmp_path)
    noise = instantiate(cfg.noise)
    assert isinstance(noise, Noise) and noise.sigma == float(choice.rsplit("_", 1)[1])
    assert noise_from_config(noise.config()) == noise == noise_from_config(OmegaConf.to_container(cfg.noise))
    assert cfg.run_name.endswith(noise.tag)
    # radius and probability_for_radius are inverse; 1/2 certifies radius 0
    for p in (0.5, 0.9, 0.999):
        assert noise.probability_for_radius(noise.radius(p)) == pytest.approx(p, abs=1e-9)
    assert noise.radius(0.5) == pytest.approx(0.0, abs=1e-6)


def test_gaussian_formulas_against_scipy():
    noise = GaussianNoise(0.5)
    assert noise.radius(0.99) == pytest.approx(0.5 * norm.ppf(0.99), rel=1e-12)
    assert noise.probability_for_radius(1.0) == pytest.approx(norm.cdf(2.0), rel=1e-12)
    assert noise.tag == "sigma0.5" and noise.config() == {
        "_target_": "dmae_lightning.noise.GaussianNoise",
        "sigma": 0.5,
    }


def test_noisy_copies_are_the_block_of_perturb():
    """The certification path (noisy_copies into a buffer) and the training path (perturb) draw the same noise."""
    image = torch.rand(3, 4, 4)
    noise = GaussianNoise(0.25)
    out = torch.empty(5, 3, 4, 4)
    noise.noisy_copies(image, torch.Generator().manual_seed(3), out)
    expected = noise.perturb(image.expand(5, 3, 4, 4), torch.Generator().manual_seed(3))
    assert torch.equal(out, expected)
    eps = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, image + 0.25 * eps, rtol=0, atol=0)


@pytest.mark.parametrize(
    "config,message",
    [
        ({"sigma": 0.25}, "needs a _target_"),
        ({"_target_": "os.system", "sigma": 0.25}, "unknown noise 'os.system'"),  # never imported or called
        (
            {"_target_": "dmae_lightning.noise.GaussianNoise", "sigma": 0.25, "eta": 1},
            "takes sigma, got eta, sigma",
        ),
        (
            {"_target_": "dmae_lightning.noise.GaussianNoise", "sigma": -1},
            "noise.sigma must be a finite number > 0",
        ),
    ],
)
def test_noise_from_config_refuses_with_one_line(config, message):
    with pytest.raises(ValueError, match=message) as err:
        noise_from_config(config)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("experiment", ["pretrain_digits", "finetune_digits"])
def test_the_job_builds_one_noise_for_module_and_model(experiment, tmp_path):
    cfg = compose(
        CONF,
        "train",
        [f"experiment={experiment}", "noise=sigma_0.5", "logger=none", "pretrained=null"],
        output_dir=tmp_path,
    )
    _, module, _ = build(cfg)
    assert module.hparams["noise"] == {"_target_": "dmae_lightning.noise.GaussianNoise", "sigma": 0.5}
    assert module.noise == GaussianNoise(0.5)
    assert getattr(module.model, "noise", module.noise) is module.noise  # the DMAE model corrupts with it
    if experiment == "finetune_digits":
        assert (
            module.hparams["objective"]["eta"] == 0.5
        )  # the paper's weight at sigma 0.5 (objective.eta null)
    assert cfg.run_name.endswith("sigma0.5")

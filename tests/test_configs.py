"""Every config composes; bad values stop with one clear line before any work; tiny runs start."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import CONF, REPO

from dmae_lightning.jobs.compose import compose
from dmae_lightning.jobs.rundir import run_dir
from dmae_lightning.jobs.train import ConfigError, build, train

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose_train(overrides, tmp_path):
    return compose(CONF, "train", overrides, output_dir=tmp_path)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(experiment, tmp_path):
    cfg = compose_train([f"experiment={experiment}", "pretrained=/some/file.pth"], tmp_path)
    assert cfg.task.name in ("pretrain", "finetune", "linprobe", "quickstart")
    assert cfg.noise.sigma in (0.25, 0.5, 1.0)
    # Every interpolation resolves (a typo in a key would fail here).
    from omegaconf import OmegaConf

    OmegaConf.to_container(cfg, resolve=True)


def test_paper_recipes(tmp_path):
    cfg = compose_train(["experiment=pretrain_imagenet_vit_base"], tmp_path)
    eff = (
        cfg.data.batch_size
        * cfg.trainer.devices
        * cfg.trainer.num_nodes
        * cfg.trainer.accumulate_grad_batches
    )
    assert eff == 4096 and cfg.trainer.max_epochs == 1100 and cfg.task.module.mask_ratio == 0.75
    assert cfg.task.module.optimizer.betas == [0.9, 0.95] and cfg.task.module.optimizer.warmup_epochs == 40
    cfg = compose_train(["experiment=pretrain_imagenet_vit_large"], tmp_path)
    assert cfg.trainer.max_epochs == 1600 and cfg.task.module.model_name == "dmae_vit_large_patch16"
    cfg = compose_train(
        ["experiment=finetune_imagenet_vit_base", "pretrained=x", "noise=sigma_1.0"], tmp_path
    )
    module = cfg.task.module
    assert cfg.data.batch_size * cfg.trainer.devices == 1024
    assert (module.optimizer.layer_decay, module.model_kwargs.drop_path_rate) == (0.65, 0.1)
    assert module.objective == {"name": "consistency", "copies": 2, "lbd": 2.0, "eta": None}
    assert (module.mixup.mixup_alpha, module.mixup.cutmix_alpha, module.label_smoothing) == (0.8, 1.0, 0.1)
    cfg = compose_train(
        ["experiment=finetune_imagenet_vit_large", "pretrained=x", "noise=sigma_0.5"], tmp_path
    )
    assert (cfg.task.module.optimizer.layer_decay, cfg.task.module.model_kwargs.drop_path_rate) == (0.75, 0.2)
    assert cfg.objective.name == "consistency" and cfg.trainer.max_epochs == 50
    cfg = compose_train(["experiment=linprobe_imagenet_vit_base", "pretrained=x"], tmp_path)
    eff = cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.accumulate_grad_batches
    assert eff == 16384 and cfg.task.module.optimizer.name == "lars"


def test_sweep_points_get_distinct_run_directories(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    assert (
        run_dir("logs/x", "noise-sigma_0.5__consistency.lbd-1") == "logs/x/noise-sigma_0.5__consistency.lbd-1"
    )
    assert run_dir("logs/x", "") == "logs/x"
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    assert run_dir("logs/x", "") == "logs/x/slurm-1234"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert run_dir("logs/x", "a-1") == "logs/x/slurm-77_3/a-1"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["noise.sigma=0"], "noise.sigma must be a finite number > 0, got 0"),
        (["noise.sigma=-0.5", "task=finetune"], "noise.sigma must be a finite number > 0"),
        (["task.module.mask_ratio=1.0"], r"mask_ratio must be in \[0, 1\), got 1.0"),
        (["task.module.mask_ratio=-0.1"], r"mask_ratio must be in \[0, 1\)"),
        (["model.img_size=30"], "img_size 30 is not divisible by patch_size 4"),
        (["model.pretrain_name=dmae_vit_huge"], "unknown model 'dmae_vit_huge'"),
        (["task=finetune", "data.num_classes=7"], "num_classes"),
        (["task=finetune", "pretrained=/no/such/file.pth"], "does not exist"),
        # issue 22: refused at build (before: tracebacks at the first step, or a run that trained nothing)
        (["trainer.max_epochs=abc"], r"trainer.max_epochs must be an integer >= 1 .*got 'abc'"),
        (["trainer.max_epochs=0"], r"trainer.max_epochs must be an integer >= 1"),
        (
            ["trainer.max_epochs=-1"],
            r"trainer.max_epochs must be an integer >= 1 \(or -1 with trainer.max_steps\)",
        ),
        (
            ["trainer.accumulate_grad_batches=0"],
            "trainer.accumulate_grad_batches must be an integer >= 1, got 0",
        ),
        (["seed=-1"], r"seed must be an integer in \[0, 2\^32\), got -1"),
        (["task.module.optimizer.name=adamww"], "unknown optimizer 'adamww': use 'adamw' or 'lars'"),
        (
            ["+task.module.optimizer.lr=0.1"],
            "task.module.optimizer has no key 'lr': the keys are name, base_lr",
        ),
        (["precision=16-mixed"], "precision=16-mixed needs a GPU: on the CPU use bf16-mixed"),
        (
            ["precision=fp32"],
            r"precision must be one of 32-true\|bf16-mixed\|16-mixed, got 'fp32' \(precision=fp32 is now 32-true\)",
        ),
        # issue 21.3: refused at build, not by a traceback at the first certification epoch
        (
            ["experiment=finetune_digits", "noise=discrete_gaussian_sigma_0.25"],
            r"^CertificationCallback on the val split: discrete noise needs 8-bit images",
        ),
        (
            [
                "experiment=pretrain_cifar10_continue",
                "data=digits",
                "data.augment=none",
                "model=vit_micro_patch4",
            ],
            "pretrained",
        ),
    ],
)
def test_bad_values_stop_with_one_clear_line(overrides, message, tmp_path):
    cfg = compose_train(overrides, tmp_path)
    with pytest.raises(ConfigError, match=message) as info:
        build(cfg)
    assert "\n" not in str(info.value)


def test_missing_data_folder_stops_before_the_model_is_built(tmp_path):
    overrides = ["data=imagenet", f"paths.data_dir={tmp_path}/nothing", "model=vit_micro_patch4"]
    with pytest.raises(ConfigError, match="expected .*<wnid>"):
        build(compose_train(overrides, tmp_path))


@pytest.mark.slow  # ~9 s: a fresh python train.py (torch + Lightning imports)
def test_cli_prints_one_line_and_exits_nonzero(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "noise.sigma=-1", f"paths.log_dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "error: noise.sigma must be a finite number > 0, got -1"


@pytest.mark.parametrize("data", sorted(p.stem for p in (CONF / "data").glob("*.yaml")))
def test_every_data_set_takes_the_run_seed(data, tmp_path):
    """The DataModule saves ``seed`` as a hyper-parameter, like the LightningModule: both must be the run's."""
    assert compose_train([f"data={data}", "seed=1"], tmp_path).data.seed == 1


@pytest.mark.parametrize("experiment", ["pretrain_digits", "finetune_digits"])
def test_digits_experiments_run_with_another_seed(experiment, tmp_path):
    """README quickstart override ``seed=1``: the logger merges module and data hparams (issue 17.4.1)."""
    cfg = compose_train(
        [f"experiment={experiment}", "seed=1", "+trainer.fast_dev_run=1", "data.batch_size=16"], tmp_path
    )
    assert cfg.logger and cfg.task.module.seed == 1
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


@pytest.mark.parametrize("task", ["pretrain", "finetune", "linprobe"])
def test_fast_dev_run_every_task(task, tmp_path):
    cfg = compose_train(
        [f"task={task}", "model=vit_micro_patch8", "+trainer.fast_dev_run=2", "data.batch_size=16"], tmp_path
    )
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


@pytest.mark.parametrize(
    ("config", "override", "new"),
    [
        ("certify", "mode=predict", "procedure"),
        ("certify", "ckpt_path=x.ckpt", "weights"),
        ("certify", "batch=10", "batch_size"),
        ("certify", "images=500", "num_images"),
        ("certify", "trainer.precision=bf16-mixed", "precision"),
        ("train", "consistency.enabled=false", "the objective group"),
        ("train", "consistency.eta=0.1", "the objective group: .*objective.eta"),
        ("train", "task.callbacks.certification.n=10", "callbacks"),
        ("train", "callbacks.certification.batch=10", "callbacks.certification.batch_size"),
        ("train", "batch=1100", "batch_size"),  # the quickstart's certification settings
    ],
)
def test_old_spellings_are_refused_naming_the_new_key(config, override, new, tmp_path):
    """Issue 23.2: one vocabulary; an old key is one line naming its new spelling, from compose and from the
    entry scripts' check of the command line (before Hydra, which would only say the key does not exist)."""
    from dmae_lightning.jobs.vocabulary import exit_on_old_spellings

    with pytest.raises(ConfigError, match=rf"^{override}: \S+ is now {new}"):
        compose(CONF, config, ["experiment=finetune_digits", override] if config == "train" else [override])
    with pytest.raises(SystemExit, match=rf"^error: {override}: "):
        exit_on_old_spellings(config, ["-m", override])
    exit_on_old_spellings(
        "train", ["ckpt_path=last", "objective=gaussian", "--cfg", "job"]
    )  # today's keys pass


def test_precision_is_one_vocabulary_set_by_the_hardware_group(tmp_path):
    """Training and certification share Lightning's precision names; the hardware group sets both."""
    train_cfg = compose_train(["hardware=gpu"], tmp_path)
    assert train_cfg.precision == "bf16-mixed" and train_cfg.trainer.precision == "bf16-mixed"
    certify_cfg = compose(
        CONF, "certify", ["hardware=gpu", "weights=x", "noise=sigma_0.25"], output_dir=tmp_path
    )
    assert certify_cfg.precision == "bf16-mixed" and certify_cfg.trainer.precision == "32-true"
    assert compose_train([], tmp_path).precision == "32-true"

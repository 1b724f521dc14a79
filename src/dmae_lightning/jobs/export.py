"""Export a training run's model as files others can load (docs/export.md).

    python -m dmae_lightning.jobs.export RUN_DIR OUT_DIR [--certification CERT_DIR ...] [--checkpoint FILE]

RUN_DIR is a training run directory (its ``checkpoints/last.ckpt``, or ``--checkpoint``), fine-tuning or
pre-training; each CERT_DIR a finished ``python certify.py`` run (certify or certify_radii) of that same
checkpoint (its summary.json's checkpoint_sha256 must be the file's), whose numbers go into the model card.
OUT_DIR gets Hugging Face Hub's layout (``huggingface_hub.PyTorchModelHubMixin``'s file names):

- ``model.safetensors``: the network's state dict, plain tensors (no pickle), timm's parameter names;
- ``config.json``: architecture and its constructor arguments, class count, the training noise, the input
  normalisation, the training objective and the other training settings, the code version;
- ``README.md``: a model card (``huggingface_hub.ModelCard``: YAML metadata with a model-index of the certified
  accuracies, then what the model is, the certified-accuracy table with n, alpha, noise, images and the
  data-set-level lower bound, the one command that certifies it, how to load it, the code version).

``load_weights(model, OUT_DIR)``, ``create_model(name, pretrained=OUT_DIR)`` and ``python certify.py
weights=OUT_DIR model=NAME`` read it (models/weights.py gives it a Lightning checkpoint's shape); ``huggingface_hub
.upload_folder(repo_id=..., folder_path=OUT_DIR)`` publishes it. A pre-training run exports too (a DMAE, encoder
and decoder, to fine-tune from), without certification. OUT_DIR must be new, empty or an earlier export (whose
files are replaced). Exit status 0, or 2 with one line on bad input.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors.torch import save_file

from dmae_lightning.certification.metrics import radius_key
from dmae_lightning.certification.report import BEYOND, bound_note, format_table, sample_budget
from dmae_lightning.certification.runs import RunSummary, read_summary
from dmae_lightning.certification.summary import CertifiedSummary
from dmae_lightning.errors import ConfigError
from dmae_lightning.files import atomic_write_text, fsync_dir
from dmae_lightning.jobs.rundir import LATEST, file_digest
from dmae_lightning.models import PRETRAIN_PREFIX, create_model, model_config
from dmae_lightning.models.layers import IMAGENET_MEAN, IMAGENET_STD
from dmae_lightning.models.weights import (
    EXPORT_CARD,
    EXPORT_CONFIG,
    EXPORT_FORMAT,
    EXPORT_FORMAT_VERSION,
    EXPORT_WEIGHTS,
    load_weights,
    read_checkpoint,
    read_export_config,
)
from dmae_lightning.noise import Noise, noise_from_config

PACKAGE = "dmae-lightning"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
# hyper_parameters that config.json names itself; the others go to its "training" entry
_CORE_KEYS = ("model_name", "model_kwargs", "num_classes", "noise", "objective")


def code_version() -> str:
    """This package's installed version (importlib.metadata); ``unknown`` when it is not installed."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Certification:
    """A finished certification run of the exported checkpoint: where it is and its summary."""

    path: Path
    summary: RunSummary

    @property
    def result(self) -> CertifiedSummary:
        assert isinstance(self.summary.result, CertifiedSummary)
        return self.summary.result

    @property
    def noise(self) -> Noise:
        return noise_from_config(self.summary.settings["noise"])


# --- inputs ------------------------------------------------------------------------------------------------------


def find_checkpoint(run_dir: Path, checkpoint: Path | None = None) -> Path:
    """The checkpoint to export: ``--checkpoint`` (relative to RUN_DIR's checkpoints/ when not found as given),
    else RUN_DIR/checkpoints/last.ckpt; RUN_DIR may itself be the checkpoint file."""
    if not run_dir.exists():
        raise ConfigError(f"{run_dir} does not exist: give a training run directory (logs/<run_name>/latest)")
    if run_dir.is_file():
        if checkpoint is not None:
            raise ConfigError(f"{run_dir} is a file: give --checkpoint with a run directory only")
        return run_dir
    if checkpoint is not None:
        for candidate in (checkpoint, run_dir / checkpoint, run_dir / "checkpoints" / checkpoint):
            if candidate.is_file():
                return candidate
        raise ConfigError(
            f"--checkpoint {checkpoint}: no such file (as given, in {run_dir} or its checkpoints/)"
        )
    path = run_dir / LAST_CHECKPOINT
    if not path.is_file():
        raise ConfigError(
            f"{run_dir} has no {LAST_CHECKPOINT.as_posix()}: not a training run directory, or it saved no "
            "checkpoint yet (--checkpoint FILE names another)"
        )
    return path


def read_training_checkpoint(path: Path) -> tuple[dict, dict[str, Any]]:
    """The checkpoint and its hyper-parameters; ConfigError (one line) unless it is a training checkpoint of
    this project (an official or plain file records no architecture: load those with load_weights)."""
    try:
        ckpt = read_checkpoint(path)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    hparams = ckpt.get("hyper_parameters")
    if not isinstance(hparams, dict) or not isinstance(hparams.get("model_name"), str):
        raise ConfigError(
            f"{path} records no architecture (hyper_parameters.model_name): only this project's training "
            "checkpoints export; official and plain files load with models.weights.load_weights"
        )
    return ckpt, hparams


def read_certification(path: Path, checkpoint: Path) -> Certification:
    """The certification run at ``path`` (a run directory, its ``latest`` link or its summary.json), which must
    be a certified one (certify, certify_radii) of ``checkpoint``'s content."""
    real = path.resolve()
    if real.is_file():
        real = real.parent
    summary_path = real / "summary.json"
    if not summary_path.is_file():
        raise ConfigError(f"--certification {path}: not a finished certification run (no summary.json)")
    try:
        summary = read_summary(summary_path)
    except ValueError as err:
        raise ConfigError(f"--certification {path}: {err}") from None
    if not isinstance(summary.result, CertifiedSummary):
        raise ConfigError(
            f"--certification {path}: procedure {summary.procedure.name} certifies no radius: give a certify or "
            "certify_radii run"
        )
    theirs = summary.settings.get("checkpoint_sha256")
    ours = file_digest(str(checkpoint)).removeprefix("sha256:")
    if isinstance(theirs, str) and theirs:
        if theirs != ours:
            raise ConfigError(
                f"--certification {path} certified another checkpoint (sha256 {theirs[:12]}...), not {checkpoint} "
                f"(sha256 {ours[:12]}...)"
            )
    elif Path(str(summary.settings.get("checkpoint", ""))).resolve() != checkpoint.resolve():
        raise ConfigError(
            f"--certification {path}: its summary.json does not say that it certified {checkpoint}"
        )
    return Certification(path, summary)


def prepare_out_dir(out_dir: Path) -> None:
    """Create OUT_DIR; ConfigError (one line) when it is not writable or holds something else than an export."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file: OUT_DIR is the directory to write the export to")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        try:
            earlier = read_export_config(out_dir)
        except ValueError:
            earlier = None
        if earlier is None:
            raise ConfigError(
                f"{out_dir} is not empty and holds no earlier export: choose a new or empty OUT_DIR"
            )
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"cannot create {out_dir} ({err.strerror or err}): choose another OUT_DIR"
        ) from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        if created:
            out_dir.rmdir()
        raise ConfigError(f"{out_dir} is not writable: choose another OUT_DIR")


# --- the export's files ------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON-ready data (tuples as lists, anything else unknown as its string)."""
    return json.loads(json.dumps(value, default=str))


def build_config(hparams: dict[str, Any], ckpt: dict, checkpoint: Path, run_dir: Path) -> dict[str, Any]:
    """config.json: what a loader needs to rebuild the network, and what the numbers it gives depend on."""
    name = str(hparams["model_name"])
    model_kwargs = dict(hparams.get("model_kwargs") or {})
    _, defaults = model_config(name)
    img_size = int({**defaults, **model_kwargs}["img_size"])
    pretraining = name.startswith(PRETRAIN_PREFIX)
    objective: Any
    if pretraining:
        objective = {
            "name": "dmae",
            "mask_ratio": hparams.get("mask_ratio"),
            "norm_pix_loss": hparams.get("norm_pix_loss"),
        }
    else:
        objective = hparams.get("objective")
    return _plain(
        {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_FORMAT_VERSION,
            "architecture": name,
            "model_kwargs": model_kwargs,
            "num_classes": None if pretraining else hparams.get("num_classes"),
            "noise": hparams.get("noise"),
            "normalization": {
                "input": "RGB pixels in [0, 1], shape [B, 3, H, W]; not normalised: the model normalises",
                "input_size": [3, img_size, img_size],
                "resize": "bicubic to input_size inside the model when H, W differ (native size: none)",
                "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
                "applied_by_model": True,
            },
            "objective": objective,
            "training": {k: v for k, v in hparams.items() if k not in _CORE_KEYS},
            "source": {
                "run": "/".join((run_dir if run_dir.is_dir() else checkpoint.parent).resolve().parts[-2:]),
                "checkpoint": checkpoint.name,
                "checkpoint_sha256": file_digest(str(checkpoint)).removeprefix("sha256:"),
                "epoch": ckpt.get("epoch"),
                "global_step": ckpt.get("global_step"),
                "pytorch_lightning_version": ckpt.get("pytorch-lightning_version"),
            },
            "code_version": {"package": PACKAGE, "version": code_version()},
        }
    )


def certify_command(config: dict[str, Any], cert: Certification, weights: str) -> str:
    """The one ``python certify.py`` command that repeats ``cert`` on the exported directory ``weights``."""
    settings, procedure = cert.summary.settings, cert.summary.procedure
    args = [f"weights={weights}", f"model={config['architecture']}", f"data={settings['dataset']}"]
    if procedure.name != "certify":
        args.append(f"procedure={procedure.name}")
    args.append(f"split={settings['split']}")
    for key in ("n0", "n", "alpha"):
        if key in settings:
            args.append(f"{key}={settings[key]}")
    if settings.get("skip_wrong_guess"):
        args.append("skip_wrong_guess=true")
    if procedure.grid_only:  # the radii are the procedure's grid: they change the certificates
        args.append("radii=[" + ",".join(f"{r:g}" for r in cert.result.radii) + "]")
    subset = settings.get("subset") or {}
    if subset.get("num_images") is not None:
        args.append(f"num_images={subset['num_images']}")
    else:
        args.append(f"skip={subset.get('skip', 1)}")
        if subset.get("max") is not None:
            args.append(f"max={subset['max']}")
    data_subset = settings.get("data_subset") or {}
    if data_subset.get("subset_every") not in (None, 1):
        args.append(f"data.subset_every={data_subset['subset_every']}")
    if data_subset.get("subset_first") is not None:
        args.append(f"data.subset_first={data_subset['subset_first']}")
    if settings.get("trained_noise") is not None:  # certified with another noise than the training's
        prefix = "discrete_gaussian_" if cert.noise.tag_prefix else ""
        args += [f"noise={prefix}sigma_{float(cert.noise.sigma)}", "noise_override=true"]
    args += [f"seed={settings.get('seed', 0)}", f"precision={settings.get('precision', '32-true')}"]
    return "python certify.py " + " ".join(shlex.quote(arg) for arg in args)


def _row_labels(certs: Sequence[Certification]) -> list[str]:
    labels: list[str] = []
    for cert in certs:
        result = cert.result
        label = (
            f"{cert.noise.tag}, {cert.summary.procedure.name}, "
            f"{sample_budget(cert.summary.n, result.grid_only)}, alpha={cert.summary.alpha:g}"
        )
        labels.append(label if label not in labels else f"{label} ({labels.count(label) + 1})")
    return labels


def certified_table(certs: Sequence[Certification]) -> str:
    """The certified-accuracy table (%) of the runs, each with its data-set-level lower bound row, then each
    run's protocol: noise, procedure, n, alpha, data set, split, images, and the bound's level."""
    radii = sorted({r for cert in certs for r in cert.result.radii})
    rows: dict[str, dict[str, float | None]] = {}
    acr: dict[str, float] = {}
    notes = []
    for label, cert in zip(_row_labels(certs), certs):
        result, settings = cert.result, cert.summary.settings
        rows[label] = dict(result.certified_accuracy)
        if result.average_certified_radius is not None:
            acr[label] = result.average_certified_radius
        if result.certified_accuracy_lower_bound is not None:
            rows[f"{label}, lower bound"] = dict(result.certified_accuracy_lower_bound)
        subset = settings.get("subset") or {}
        data_subset = {k: v for k, v in (settings.get("data_subset") or {}).items() if v not in (None, 1)}
        protocol = [
            f"noise {cert.noise.tag} ({cert.noise.config()['_target_'].rsplit('.', 1)[-1]})",
            f"procedure {cert.summary.procedure.name}",
            *(f"{key}={settings[key]}" for key in ("n0", "n") if key in settings),
            f"alpha={cert.summary.alpha:g}",
            f"{settings.get('dataset')} {settings.get('split')} split",
            f"{result.num_images} images {subset.get('indices', '')}".rstrip(),
            *(f"data {k}={v}" for k, v in data_subset.items()),
            f"seed {settings.get('seed')}",
            f"precision {settings.get('precision')}",
            f"max certifiable radius {result.max_certifiable_radius:.3f}",
        ]
        if settings.get("trained_noise") is not None:
            protocol.append("certified with another noise than the training's (noise_override)")
        line = f"- **{label}**: " + ", ".join(protocol)
        if (
            result.certified_accuracy_lower_bound is not None
            and result.false_certificates_allowed is not None
        ):
            line += f"; data-set-level {bound_note(result.rho, result.false_certificates_allowed, result.num_images)}"
        notes.append(line)
    table = format_table(rows, radii, label_header="run", acr=acr or None)
    return table + "\n\n" + "\n".join(notes)


def _eval_results(config: dict[str, Any], certs: Sequence[Certification]) -> list[EvalResult]:
    """The card metadata's model-index: certified accuracy (%) per run and radius, and the ACR."""
    results = []
    for label, cert in zip(_row_labels(certs), certs):
        settings, result = cert.summary.settings, cert.result
        common: dict[str, Any] = dict(
            task_type="image-classification",
            task_name="certified robustness (randomized smoothing, L2)",
            dataset_type=str(settings.get("dataset")),
            dataset_name=str(settings.get("dataset")),
            dataset_split=str(settings.get("split")),
        )
        args = {
            "noise": cert.noise.config(),
            "procedure": cert.summary.procedure.name,
            "n": cert.summary.n,
            "alpha": cert.summary.alpha,
            "num_images": result.num_images,
        }
        for radius in result.radii:
            value = result.certified_accuracy.get(radius_key(radius))
            if value is None:
                continue
            results.append(
                EvalResult(
                    **common,
                    metric_type="certified_accuracy",
                    metric_name=f"certified accuracy (%) at r={radius_key(radius)}, {label}",
                    metric_value=round(100 * value, 2),
                    metric_args={**args, "radius": radius},
                )
            )
        if result.average_certified_radius is not None:
            results.append(
                EvalResult(
                    **common,
                    metric_type="average_certified_radius",
                    metric_name=f"ACR, {label}",
                    metric_value=round(result.average_certified_radius, 4),
                    metric_args=args,
                )
            )
    return results


def model_card(config: dict[str, Any], certs: Sequence[Certification], name: str) -> ModelCard:
    """README.md: metadata (huggingface_hub.ModelCardData) and text; nothing is fetched."""
    arch, noise_config = config["architecture"], config["noise"]
    noise = noise_from_config(noise_config) if noise_config is not None else None
    pretraining = arch.startswith(PRETRAIN_PREFIX)
    version = config["code_version"]["version"]
    size = config["normalization"]["input_size"]
    eval_results = _eval_results(config, certs)
    data = ModelCardData(
        model_name=name,
        library_name=PACKAGE,
        pipeline_tag=None if pretraining else "image-classification",
        tags=[PACKAGE, "randomized-smoothing", "certified-robustness", "vision-transformer", "safetensors"]
        + (["dmae", "masked-autoencoder"] if pretraining else []),
        eval_results=eval_results or None,
    )
    trained = (
        "" if noise is None else f" under {noise.tag} noise ({noise_config['_target_'].rsplit('.', 1)[-1]})"
    )
    if pretraining:
        what = (
            f"A denoising masked autoencoder (DMAE, Wu et al. 2023): the `{arch}` encoder and its decoder, "
            f"pre-trained to reconstruct images{trained} with {config['objective']}. It is not a classifier: "
            f"fine-tune it (`python train.py task=finetune pretrained={name}` ...), then certify the fine-tuned "
            "run's export."
        )
    else:
        what = (
            f"The base classifier f of a smoothed classifier g(x) = argmax_c P(f(x + noise) = c) (randomized "
            f"smoothing, Cohen et al. 2019): a `{arch}` vision transformer with {config['num_classes']} classes, "
            f"fine-tuned{trained} with the objective `{json.dumps(config['objective'])}`. Its certificates are "
            "L2 radii in [0, 1] pixel space."
        )
    if certs:
        results = (
            "Certified accuracy (%) of the smoothed classifier at L2 radius r: images whose certified class is "
            f"their label with a radius of at least r ({BEYOND}: beyond the largest radius the run could certify "
            "at its n). Each run's lower bound row holds at the data-set level: the true certified accuracy is "
            "at least that, with the stated probability, whichever certificates are false.\n\n"
            + certified_table(certs)
        )
        commands = "\n".join(certify_command(config, cert, name) for cert in certs)
    elif pretraining:
        results, commands = "A pre-trained DMAE certifies nothing before fine-tuning.", ""
    else:
        results = "No certification run was given at export; certify it with the command below."
        commands = " ".join(
            [f"python certify.py weights={name} model={arch} data=DATA split=test n0=100 n=10000 alpha=0.001"]
        )
    certify = (
        ""
        if not commands
        else (
            "\n## Certify it\n\nIn a clone of dmae-lightning (at the version below), with this directory at "
            f"`./{name}` (e.g. `huggingface_hub.snapshot_download(REPO, local_dir='{name}')`) and the data set "
            "where the data config expects it, one command per run above repeats it (same images, n, alpha, "
            "seed: the same per-image results):\n\n```bash\n" + commands + "\n```\n"
        )
    )
    build = {**config["model_kwargs"], **({} if pretraining else {"num_classes": config["num_classes"]})}
    build_kwargs = "{" + ", ".join(f"{k!r}: {v!r}" for k, v in build.items()) + "}"
    load_kwargs = (
        ""
        if pretraining
        else f"  # [B, 3, {size[1]}, {size[2]}] pixels in [0, 1] -> [B, {config['num_classes']}]"
    )
    content = f"""---
{data.to_yaml()}
---

# {name}

{what}

## Certified accuracy

{results}
{certify}
## Load it

```python
from dmae_lightning.models import create_model
from dmae_lightning.models.weights import load_weights

model = create_model("{arch}", pretrained="{name}").eval(){load_kwargs}
# or, the same: model = create_model("{arch}", **{build_kwargs}); load_weights(model, "{name}")
```

`{EXPORT_WEIGHTS}` holds the network's state dict only (plain tensors, timm's parameter names, no pickle);
`{EXPORT_CONFIG}` the architecture (`architecture`, `model_kwargs`{"" if pretraining else ", `num_classes`"}), the
training noise (`noise`), the objective and the other training settings. Input: RGB pixels in [0, 1] at
{size[1]}x{size[2]}, **not normalised**: the model normalises with ImageNet's mean {list(IMAGENET_MEAN)} and std
{list(IMAGENET_STD)} itself (and resizes bicubically other sizes).

## Code version

{PACKAGE} {version} (exported from run `{config["source"]["run"]}`, checkpoint `{config["source"]["checkpoint"]}`,
sha256 `{config["source"]["checkpoint_sha256"]}`, epoch {config["source"]["epoch"]}, step
{config["source"]["global_step"]}).
"""
    return ModelCard(content, ignore_metadata_errors=False)


def _write_safetensors(path: Path, state: dict, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(state, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def export(
    run_dir: str | Path,
    out_dir: str | Path,
    certifications: Sequence[str | Path] = (),
    checkpoint: str | Path | None = None,
) -> dict[str, Any]:
    """Write OUT_DIR's model.safetensors, config.json and README.md; returns the config. ConfigError (one line)
    on bad input, before anything is written."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    path = find_checkpoint(run_dir, None if checkpoint is None else Path(checkpoint))
    ckpt, hparams = read_training_checkpoint(path)
    name = str(hparams["model_name"])
    if name.startswith(PRETRAIN_PREFIX) and certifications:
        raise ConfigError(
            f"{path} holds the pre-training model {name}: it certifies nothing, export it alone"
        )
    try:
        kwargs = dict(hparams.get("model_kwargs") or {})
        if name.startswith(PRETRAIN_PREFIX):
            kwargs.update(noise=hparams.get("noise") or {}, norm_pix_loss=hparams.get("norm_pix_loss", True))
            if not kwargs["noise"]:
                del kwargs["noise"]
        else:
            kwargs["num_classes"] = int(hparams["num_classes"])
        model = create_model(name, **kwargs)
        report = load_weights(model, path, ckpt)  # NaN/Inf weights and misfits refused here, in one line
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"{path}: {err}" if str(path) not in str(err) else str(err)) from None
    if report.reinitialised or report.dropped or report.interpolated:
        raise ConfigError(
            f"{path} does not hold the whole {name} ({report}): not a finished training checkpoint"
        )
    certs = [read_certification(Path(c), path) for c in certifications]
    config = build_config(hparams, ckpt, path, run_dir)
    del ckpt
    card = model_card(config, certs, out_dir.resolve().name)
    prepare_out_dir(out_dir)
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    _write_safetensors(
        out_dir / EXPORT_WEIGHTS,
        state,
        {"format": "pt", "architecture": name, "producer": f"{PACKAGE} {code_version()}"},
    )
    atomic_write_text(out_dir / EXPORT_CARD, str(card))
    atomic_write_text(
        out_dir / EXPORT_CONFIG, json.dumps(config, indent=2) + "\n"
    )  # last: the export is whole
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dmae_lightning.jobs.export", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", type=Path, help=f"a training run directory (logs/<run_name>/{LATEST})"
    )
    parser.add_argument(
        "out_dir",
        metavar="OUT_DIR",
        type=Path,
        help="where to write the export (new, empty or an earlier export)",
    )
    parser.add_argument(
        "--certification",
        action="append",
        default=[],
        type=Path,
        metavar="CERT_DIR",
        help="a finished certify / certify_radii run of the checkpoint, for the model card (repeatable)",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help=f"the checkpoint to export (default: RUN_DIR/{LAST_CHECKPOINT.as_posix()})",
    )
    args = parser.parse_args(argv)
    try:
        config = export(args.run_dir, args.out_dir, args.certification, args.checkpoint)
    except ConfigError as err:
        print(f"export: error: {err}", file=sys.stderr)
        return 2
    for file in (EXPORT_WEIGHTS, EXPORT_CONFIG, EXPORT_CARD):
        print(f"wrote {args.out_dir / file}")
    print(
        f"exported {config['architecture']} ({PACKAGE} {config['code_version']['version']})", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

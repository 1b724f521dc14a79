"""The newcomer's path: DMAE pre-training, noisy fine-tuning and certification on the bundled digits.

``python train.py experiment=quickstart`` runs three stages in order, each the same job as running
it alone (``train.py`` / ``certify.py`` with the stage's overrides), each reading the previous
stage's checkpoint from its own sub-directory of the run directory. A stage that already finished
is not run again (the same stage identity as when it finished: settings that change no result, a moved
project folder or another logger never make it "other"); an interrupted one resumes. The certification stage
runs in ``<procedure>/<key>``, ``<key>`` its own identity, so other certification settings (``n=300``,
``protocol=images500``, by their certify.py names) get their own directory beside the earlier ones, and
``<procedure>/latest`` points at the newest.

Every override typed after ``experiment=quickstart`` reaches each stage whose config has that key or
config group (``hardware=gpu``, ``logger=wandb``, ``noise=sigma_0.5``, ``trainer.max_epochs=1``,
``data.batch_size=32``, ``seed=1``, ...), or stops the job with one line naming it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from dmae_lightning.certification.metrics import attacked_certificates
from dmae_lightning.certification.procedures import PROCEDURES, AttackPredict, CertifyRadii
from dmae_lightning.certification.records import AttackRecord, of_type, read_json, read_records
from dmae_lightning.certification.report import cross_check_line, format_table
from dmae_lightning.certification.runs import RunSummary, read_summary
from dmae_lightning.certification.summary import CertifiedSummary, EmpiricalSummary
from dmae_lightning.data import DigitsDataModule
from dmae_lightning.data.base import dataset_size
from dmae_lightning.errors import ConfigError, one_line
from dmae_lightning.jobs.certify.job import certify, sample_saving
from dmae_lightning.jobs.certify.params import subset_indices, validate
from dmae_lightning.jobs.compose import compose, keep_hydra_config
from dmae_lightning.jobs.rundir import (
    identity_key,
    job_identity,
    point_latest,
    refuse_other_settings,
    run_in_dir,
)
from dmae_lightning.jobs.train import train
from dmae_lightning.noise import noise_from_config

log = logging.getLogger(__name__)
DONE = "stage_done.json"
# The certification stage's settings, top-level keys of the quickstart by their certify.py names (and the protocol
# group): passed to that stage by run_quickstart, whether typed or not.
CERTIFY_SETTINGS = ("split", "n0", "n", "alpha", "skip", "max", "batch_size")
# Keys of the quickstart job itself (not passed on), and keys each stage sets itself (refused).
OWN = (
    "experiment",
    "pretrain",
    "procedure",
    "quickstart",
    "run_name",
    "hydra",
    "hydra/launcher",
    "protocol",
    "num_images",
    *CERTIFY_SETTINGS,
)
SET_BY_QUICKSTART = {
    "task": "each stage has its own task",
    "pretrained": "fine-tuning starts from the pre-training stage (pretrain=false: from scratch)",
    "ckpt_path": "re-running the same command resumes an interrupted stage",
}
STAGES = ("pretrain", "finetune", "certify")
CONFIG_NAME = {"pretrain": "train", "finetune": "train", "certify": "certify", "attack": "certify"}
STAGE_NAMES = {
    "pretrain": "pre-training",
    "finetune": "fine-tuning",
    "certify": "certification",
    "attack": "attack",
}


def _stage_has(conf_dir: str, config_name: str, overrides: list[str], key: str, add: bool) -> bool:
    """Whether the stage's config (composed with ``overrides``) has ``key`` as a config group or a value
    (for ``+key``: has its parent)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=overrides, return_hydra_config=True)
    if key in cfg.hydra.runtime.choices:
        return True
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and (add or leaf in node)


def stage_overrides(conf_dir: str, stages: DictConfig, typed: list[str]) -> dict[str, list[str]]:
    """Each stage's overrides: its list in ``quickstart.<stage>``, then every ``typed`` override of the
    quickstart job that the stage's config has (in the order typed, so later ones win as on a command line).
    An override that no stage has, or that the quickstart sets itself, is refused with one line."""
    out = {name: list(stages[name]) for name in STAGES}
    for override in OverridesParser.create().parse_overrides(list(typed)):
        key = override.key_or_group
        if key.split(".")[0] in OWN or key in OWN:
            continue
        if key.split(".")[0] in SET_BY_QUICKSTART:
            reason = SET_BY_QUICKSTART[key.split(".")[0]]
            raise ConfigError(f"quickstart: {override.input_line} is not accepted ({reason})")
        takers = [
            name
            for name in STAGES
            if _stage_has(conf_dir, CONFIG_NAME[name], out[name], key, override.is_add())
        ]
        if not takers:
            raise ConfigError(
                f"quickstart: {override.input_line} applies to none of its stages ({', '.join(STAGES)})"
            )
        for name in takers:
            out[name].append(override.input_line)
    return out


def _main_config_dir() -> str:
    """The ``conf/`` directory the running job was composed from."""
    sources = HydraConfig.get().runtime.config_sources
    return next(s.path for s in sources if s.provider == "main")


def _stage_identity(conf_dir: str, config_name: str, overrides: list[str], stage_dir: Path) -> dict:
    """The identity of a stage's job (what its results depend on: files by content, not by path)."""
    with keep_hydra_config():
        return job_identity(compose(conf_dir, config_name, overrides, output_dir=stage_dir))


def _finished_record(stage_dir: Path, config_name: str) -> dict | None:
    """What a finished stage recorded (its metrics and identity), or None: not finished, or a damaged record
    (the stage then runs again, and resumes or rebuilds what it had written)."""
    try:
        record = json.loads((stage_dir / DONE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    if config_name == "certify":
        try:  # the stage's summary, which the table is read from: a damaged one is rebuilt by running again
            read_json(stage_dir / "summary.json")
        except (OSError, ValueError):
            return None
    return record


def _run_stage(
    name: str, config_name: str, overrides: list[str], stage_dir: Path, conf_dir: str, logger: str | None
) -> None:
    """Run one stage in ``stage_dir`` unless it finished there before with the same identity; ``logger``: the
    job's logger choice (None: logger=none), named when a finished stage logs nothing new."""
    identity = _stage_identity(conf_dir, config_name, overrides, stage_dir)
    done = _finished_record(stage_dir, config_name)
    if done is not None:
        key = identity_key(identity)
        if done.get("key", "") not in ("", key):  # a trained stage whose identity changed under the same run
            before, now = (
                (done["identity"], identity) if "identity" in done else ({"key": done["key"]}, {"key": key})
            )
            refuse_other_settings(
                stage_dir,
                before,
                now,
                "give these settings their own run, e.g. run_name=quickstart_2 (the finished stage is kept)",
            )
        note = f"; nothing new logged to logger={logger} (it logged when the stage ran)" if logger else ""
        log.info("quickstart: %s already complete in %s, not redone%s", name, stage_dir, note)
        return
    log.info("quickstart: %s -> %s", name, stage_dir)
    cfg = compose(
        conf_dir, config_name, overrides, output_dir=stage_dir
    )  # an interrupted stage resumes by itself
    result = (train if config_name == "train" else certify)(cfg)
    record = {k: v for k, v in result.items() if isinstance(v, (int, float, str))}
    (stage_dir / DONE).write_text(json.dumps({**record, "key": identity_key(identity), "identity": identity}))


def certification_dir(out: Path, procedure: str, conf_dir: str, overrides: list[str]) -> Path:
    """``<out>/<procedure>/<key>``: one directory per procedure and certification settings (``<key>`` the
    certify job's identity), beside the earlier ones, so that the trained stages are shared."""
    return out / procedure / identity_key(_stage_identity(conf_dir, "certify", overrides, out / procedure))


def _override(key: str, value) -> str:
    return f"{key}={'null' if value is None else value}"


def certification_settings(cfg: DictConfig) -> list[str]:
    """The certification stage's own settings: procedure, the certify.py keys and the protocol choice."""
    settings = [f"procedure={cfg.procedure}", *(_override(k, cfg[k]) for k in CERTIFY_SETTINGS if k in cfg)]
    protocol = HydraConfig.get().runtime.choices.get("protocol")
    return settings + ([f"protocol={protocol}"] if protocol and protocol != "null" else [])


def quickstart_stages(cfg: DictConfig) -> tuple[str, dict[str, list[str]]]:
    """The conf/ directory and each stage's overrides for this job: every typed override is placed or
    refused here, and the certification stage's settings are checked, before anything is trained."""
    certifying = [name for name, p in PROCEDURES.items() if p.certifies]
    if cfg.procedure not in certifying:  # the quickstart ends with a certified-accuracy table
        raise ConfigError(f"procedure must be one of {' | '.join(certifying)}, got {cfg.procedure!r}")
    conf_dir = _main_config_dir()
    overrides = stage_overrides(conf_dir, cfg.quickstart, list(HydraConfig.get().overrides.task))
    overrides["certify"] += certification_settings(cfg)
    if cfg.quickstart.get("attack") is not None:
        overrides["attack"] = attack_settings(cfg, overrides["certify"])
    # the fine-tuned checkpoint does not exist yet: its noise will be the fine-tuning stage's, the quickstart's
    noise = [f"noise={HydraConfig.get().runtime.choices['noise']}"]
    for stage in ("certify", "attack") if "attack" in overrides else ("certify",):
        typed_noise = any(o.startswith("noise=") for o in overrides[stage])
        with keep_hydra_config():
            stage_cfg = compose(
                conf_dir,
                "certify",
                [*overrides[stage], "weights=fine-tuned.ckpt", *([] if typed_noise else noise)],
            )
        try:  # the certify job's own checks (n, alpha, max, protocol, noise, attack) on the quickstart's data
            params = validate(stage_cfg)
            images = DigitsDataModule().dataset(str(stage_cfg.split))
            subset_indices(dataset_size(images), params)
            noise_from_config(stage_cfg.noise).check_input(images[0][0])
        except (ValueError, TypeError) as err:
            raise ConfigError(
                f"quickstart: the {STAGE_NAMES[stage]} stage would refuse its settings: {one_line(err)}"
            ) from None
    return conf_dir, overrides


def attack_settings(cfg: DictConfig, certify: list[str]) -> list[str]:
    """The attack stage's overrides: the certification stage's (same model, images, noise, seed), then
    ``quickstart.attack`` (its lighter attack settings), at the table's radii."""
    radii = ",".join(f"{float(r):g}" for r in cfg.quickstart.report_radii)
    return [*certify, *cfg.quickstart.attack, f"procedure={AttackPredict.name}", f"radii=[{radii}]"]


def quickstart(cfg: DictConfig) -> dict:
    """The whole pipeline in its run directory's lifecycle (as :func:`~dmae_lightning.jobs.train.train`)."""
    return run_in_dir(
        cfg,
        lambda: quickstart_stages(cfg),
        lambda stages: run_quickstart(cfg, *stages),
        resume_hint="rerun the same command to resume (finished stages are kept)",
    )


def run_quickstart(cfg: DictConfig, conf_dir: str, overrides: dict[str, list[str]]) -> dict:
    """Run the stages and print the certified-accuracy table and where the outputs are."""
    out = Path(cfg.paths.output_dir)
    stages = cfg.quickstart
    logger = HydraConfig.get().runtime.choices.get("logger") if cfg.get("logger") else None
    if cfg.pretrain:
        _run_stage("pre-training", "train", overrides["pretrain"], out / "pretrain", conf_dir, logger)
        overrides["finetune"].append(f"pretrained={out / 'pretrain' / 'checkpoints' / 'last.ckpt'}")
    else:
        overrides["finetune"].append("pretrained=null")
    _run_stage("fine-tuning", "train", overrides["finetune"], out / "finetune", conf_dir, logger)
    weights = f"weights={out / 'finetune' / 'checkpoints' / 'last.ckpt'}"
    overrides["certify"].append(weights)
    certified = certification_dir(out, cfg.procedure, conf_dir, overrides["certify"])
    _run_stage("certification", "certify", overrides["certify"], certified, conf_dir, logger)
    point_latest(certified.parent, certified)
    attacked = None
    if "attack" in overrides:
        attack = [*overrides["attack"], weights]
        attacked = certification_dir(out, AttackPredict.name, conf_dir, attack)
        _run_stage("attack", "certify", attack, attacked, conf_dir, logger)
        point_latest(attacked.parent, attacked)
    return print_certification(cfg, out, certified, [float(r) for r in stages.report_radii], attacked)


def print_certification(
    cfg: DictConfig, out: Path, certified: Path, radii: list[float], attacked: Path | None = None
) -> dict:
    """Print the certification stage's table (its summary.json, at ``radii``; with the attack stage's empirical
    robust accuracy and the cross-check of the two when it ran) and where the outputs are; return the
    summary's contents."""
    summary = read_summary(certified / "summary.json")
    result = summary.result
    if not isinstance(result, CertifiedSummary):  # the quickstart's procedures all certify radii
        raise ConfigError(f"{certified}: a {summary.procedure.name} run certifies no radii")
    label = "DMAE pre-training + fine-tuning" if cfg.pretrain else "fine-tuning from scratch"
    name = summary.procedure.name
    outputs = {
        "reconstruction picture": out / "pretrain" / "pictures" / "reconstruction_final.png",
        "certified-accuracy plot": certified / "certified_accuracy.png",
        "per-image results": certified / f"{name}.tsv",
        "summary": certified / "summary.json",
    }
    draws = (
        f"sequential, cap n={summary.n}"
        if result.grid_only
        else f"n0={summary.settings['n0']}, n={summary.n}"
    )
    samples = "" if result.samples is None else f", {result.samples:,} noisy samples"
    acr = result.average_certified_radius
    rows: dict[str, dict] = {label: dict(result.certified_accuracy)}
    checks: list[str] = []
    if attacked is not None:
        rows["same model, under attack (empirical)"], checks = attack_rows(
            certified, attacked, summary, result.rho
        )
        outputs["attack results"] = attacked / f"{AttackPredict.name}.tsv"
    lines = [
        f"Certified accuracy ({name}) on the held-out digits test split ({result.num_images} "
        f"images, {draws}, alpha={summary.settings['alpha']}{samples}):",
        format_table(
            rows,
            radii,
            fmt="markdown",
            label_header=f"model (sigma={summary.sigma:g})",
            acr=None if acr is None else {label: acr},
        ),
        *checks,
        *filter(None, [sample_saving(name, result)]),
        *(f"{label}: {path}" for label, path in outputs.items() if path.exists()),
    ]
    if not result.grid_only:  # the cheaper way to the same table
        lines.append(
            f"Certified accuracy at fixed radii only: add procedure={CertifyRadii.name} "
            "(sequential, far fewer samples)"
        )
    print("\n".join(lines), flush=True)
    return summary.to_json()


def attack_rows(certified: Path, attacked: Path, summary: RunSummary, rho: float) -> tuple[dict, list[str]]:
    """The attack stage's empirical robust accuracy (a table row) and its cross-check against the certificates
    (:func:`~dmae_lightning.certification.metrics.attacked_certificates`) as one line."""
    attack = read_summary(attacked / "summary.json")
    if not isinstance(attack.result, EmpiricalSummary):
        raise ConfigError(f"{attacked}: not an attack run")
    records = read_records(certified / f"{summary.procedure.name}.tsv", summary.procedure.record_type)
    attack_records = of_type(read_records(attacked / f"{AttackPredict.name}.tsv", AttackRecord), AttackRecord)
    counts = attacked_certificates(records, attack_records, summary.alpha, rho)
    return dict(attack.result.empirical_robust_accuracy), [cross_check_line(counts, rho)]

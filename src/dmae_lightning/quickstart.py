"""The newcomer's path: DMAE pre-training, noisy fine-tuning and certification on the bundled digits.

``python train.py experiment=quickstart`` runs three stages in order, each the same job as running
it alone (``train.py`` / ``certify.py`` with the stage's overrides), each reading the previous
stage's checkpoint from its own sub-directory of the run directory. A stage that already finished
is not run again; an interrupted one resumes.

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

from .certification.job import certify, sample_saving
from .certification.metrics import format_table
from .certification.records import read_json
from .config import compose
from .errors import ConfigError
from .train import train

log = logging.getLogger(__name__)
DONE = "stage_done.json"
# Keys of the quickstart job itself (not passed on), and keys each stage sets itself (refused).
OWN = ("experiment", "pretrain", "procedure", "quickstart", "run_name", "hydra", "hydra/launcher")
SET_BY_QUICKSTART = {
    "task": "each stage has its own task",
    "pretrained": "fine-tuning starts from the pre-training stage (pretrain=false: from scratch)",
    "ckpt_path": "re-running the same command resumes an interrupted stage",
}
STAGES = ("pretrain", "finetune", "certify")
CONFIG_NAME = {"pretrain": "train", "finetune": "train", "certify": "certify"}


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
            name for name in STAGES
            if _stage_has(conf_dir, CONFIG_NAME[name], out[name], key, override.is_add())
        ]
        if not takers:
            raise ConfigError(f"quickstart: {override.input_line} applies to none of its stages ({', '.join(STAGES)})")
        for name in takers:
            out[name].append(override.input_line)
    return out


def _main_config_dir() -> str:
    """The ``conf/`` directory the running job was composed from."""
    sources = HydraConfig.get().runtime.config_sources
    return next(s.path for s in sources if s.provider == "main")


def _run_stage(name: str, config_name: str, overrides: list[str], stage_dir: Path, conf_dir: str,
               logger: str | None) -> None:
    """Run one stage in ``stage_dir`` unless it finished there before; ``logger``: the job's logger choice (None:
    logger=none), named when a finished stage logs nothing new."""
    if (stage_dir / DONE).exists():
        done_with = json.loads((stage_dir / DONE).read_text()).get("overrides", overrides)
        if done_with != overrides:  # e.g. quickstart.certify=[...] changed: not in the run identity
            changed = sorted(set(overrides) ^ set(done_with))
            raise ConfigError(f"quickstart: {stage_dir} was finished with other settings ({', '.join(changed)}): "
                              "remove that directory to redo the stage with the new ones")
        note = f"; nothing new logged to logger={logger} (it logged when the stage ran)" if logger else ""
        log.info("quickstart: %s already complete in %s, not redone%s", name, stage_dir, note)
        return
    log.info("quickstart: %s -> %s", name, stage_dir)
    cfg = compose(conf_dir, config_name, overrides, output_dir=stage_dir)  # an interrupted stage resumes by itself
    result = (train if config_name == "train" else certify)(cfg)
    record = {k: v for k, v in result.items() if isinstance(v, (int, float, str))}
    (stage_dir / DONE).write_text(json.dumps({**record, "overrides": overrides}))


def quickstart_stages(cfg: DictConfig) -> tuple[str, dict[str, list[str]]]:
    """The conf/ directory and each stage's overrides for this job: every typed override is placed or
    refused here, before the run directory is recorded."""
    conf_dir = _main_config_dir()
    return conf_dir, stage_overrides(conf_dir, cfg.quickstart, list(HydraConfig.get().overrides.task))


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
    overrides["certify"].append(f"ckpt_path={out / 'finetune' / 'checkpoints' / 'last.ckpt'}")
    certified = out / cfg.procedure  # one directory per procedure: the trained stages are shared
    _run_stage("certification", "certify", overrides["certify"], certified, conf_dir, logger)

    summary = read_json(certified / "summary.json")
    radii = [float(r) for r in stages.report_radii]
    label = "DMAE pre-training + fine-tuning" if cfg.pretrain else "fine-tuning from scratch"
    row = {label: summary["certified_accuracy"]}
    outputs = {
        "reconstruction picture": out / "pretrain" / "pictures" / "reconstruction_final.png",
        "certified-accuracy plot": certified / "certified_accuracy.png",
        "per-image results": certified / f"{summary['mode']}.tsv",
        "summary": certified / "summary.json",
    }
    draws = f"n0={summary['n0']}, n={summary['n']}" if "n0" in summary else f"sequential, cap n={summary['n']}"
    lines = [
        f"Certified accuracy ({summary['mode']}) on the held-out digits test split ({summary['num_images']} "
        f"images, {draws}, alpha={summary['alpha']}, {summary['samples']:,} noisy samples):",
        format_table(row, radii, fmt="markdown", label_header=f"model (sigma={summary['sigma']:g})",
                     acr={label: summary["average_certified_radius"]}),
        *filter(None, [sample_saving(summary)]),
        *(f"{label}: {path}" for label, path in outputs.items() if path.exists()),
    ]
    if summary["mode"] == "certify":  # the cheaper way to the same table
        lines.append("Certified accuracy at fixed radii only: add procedure=certify_radii (sequential, far fewer samples)")
    print("\n".join(lines), flush=True)
    return summary

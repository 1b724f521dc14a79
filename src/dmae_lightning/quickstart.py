"""The newcomer's path: DMAE pre-training, noisy fine-tuning and certification on the bundled digits.

``python train.py experiment=quickstart`` runs three stages in order, each the same job as running
it alone (``train.py`` / ``certify.py`` with the stage's overrides), each reading the previous
stage's checkpoint from its own sub-directory of the run directory. A stage that already finished
is not run again; an interrupted one resumes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .certification.job import certify
from .certification.metrics import format_table
from .certification.records import read_json
from .config import compose
from .train import train

log = logging.getLogger(__name__)
DONE = "stage_done.json"


def _main_config_dir() -> str:
    """The ``conf/`` directory the running job was composed from."""
    sources = HydraConfig.get().runtime.config_sources
    return next(s.path for s in sources if s.provider == "main")


def _run_stage(name: str, config_name: str, overrides: list[str], stage_dir: Path, conf_dir: str) -> None:
    if (stage_dir / DONE).exists():
        log.info("quickstart: %s already complete in %s, not redone", name, stage_dir)
        return
    resume = ["ckpt_path=last"] if config_name == "train" and (stage_dir / "checkpoints" / "last.ckpt").exists() else []
    log.info("quickstart: %s -> %s", name, stage_dir)
    cfg = compose(conf_dir, config_name, [*overrides, *resume], output_dir=stage_dir)
    result = (train if config_name == "train" else certify)(cfg)
    (stage_dir / DONE).write_text(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, str))}))


def run_quickstart(cfg: DictConfig) -> dict:
    """Run the stages and print the certified-accuracy table and where the outputs are."""
    conf_dir = _main_config_dir()
    out = Path(cfg.paths.output_dir)
    stages = cfg.quickstart
    finetune = [*stages.finetune, f"seed={cfg.seed}"]
    if cfg.pretrain:
        _run_stage("pre-training", "train", [*stages.pretrain, f"seed={cfg.seed}"], out / "pretrain", conf_dir)
        finetune.append(f"pretrained={out / 'pretrain' / 'checkpoints' / 'last.ckpt'}")
    else:
        finetune.append("pretrained=null")
    _run_stage("fine-tuning", "train", finetune, out / "finetune", conf_dir)
    certify = [*stages.certify, f"ckpt_path={out / 'finetune' / 'checkpoints' / 'last.ckpt'}", f"seed={cfg.seed}"]
    _run_stage("certification", "certify", certify, out / "certify", conf_dir)

    summary = read_json(out / "certify" / "summary.json")
    radii = [float(r) for r in stages.report_radii]
    label = "DMAE pre-training + fine-tuning" if cfg.pretrain else "fine-tuning from scratch"
    row = {label: summary["certified_accuracy"]}
    outputs = {
        "reconstruction picture": out / "pretrain" / "pictures" / "reconstruction_final.png",
        "certified-accuracy plot": out / "certify" / "certified_accuracy.png",
        "per-image results": out / "certify" / "certify.tsv",
        "summary": out / "certify" / "summary.json",
    }
    lines = [
        f"Certified accuracy on the held-out digits test split ({summary['num_images']} images, "
        f"n0={summary['n0']}, n={summary['n']}, alpha={summary['alpha']}):",
        format_table(row, radii, fmt="markdown", label_header=f"model (sigma={summary['sigma']:g})"),
        *(f"{label}: {path}" for label, path in outputs.items() if path.exists()),
    ]
    print("\n".join(lines), flush=True)
    return summary

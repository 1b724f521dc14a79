"""The field's training methods on the bundled digits, one protocol: fine-tune, certify, attack, tabulate.

    python benchmarks/methods_digits.py                        # every objective, seed 0 (CPU, minutes)
    python benchmarks/methods_digits.py --seeds 0 1 2 --objectives gaussian consistency
    python benchmarks/methods_digits.py --pretrained logs/pretrain_digits_sigma0.25/latest/checkpoints/last.ckpt

Each (objective, seed) is the same three jobs a user runs by hand, composed from the configs:

    python train.py experiment=finetune_digits objective=<name> seed=<s> trainer.max_epochs=<E> [<digits settings>]
    python certify.py weights=<its last.ckpt> data=digits model=vit_micro_patch8 split=test n0=100 n=<n>
    python certify.py weights=<the same> ... procedure=attack 'radii=[0.25,0.5]' attack.steps=5 attack.samples=8

(the noise: the checkpoint's, sigma 0.25). The adversarial objectives' digits settings (DIGITS) shorten their
attack so that each method stays within minutes per seed on a 2-core CPU; they are in the table's JSON. The
table: certified accuracy at r = 0, 0.25, 0.5 and ACR (mean and spread over seeds), empirical robust accuracy
under the attack at 0.25 and 0.5, and the fine-tuning wall time per seed; the cross-check of certificates
against the attack (certification.metrics.attacked_certificates) must pass for every run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import environment, write_results

from dmae_lightning.certification.metrics import attacked_certificates
from dmae_lightning.certification.records import AttackRecord, CertifyRecord, of_type, read_records
from dmae_lightning.certification.report import BEYOND
from dmae_lightning.jobs.certify.job import certify
from dmae_lightning.jobs.compose import compose
from dmae_lightning.jobs.train import train
from dmae_lightning.training.objectives import OBJECTIVES

CONF = Path(__file__).resolve().parents[1] / "conf"
RADII = ("0", "0.25", "0.5")
ATTACK_RADII = ("0.25", "0.5")
# The digits settings of the objectives whose loss runs an attack per step (their paper settings: T = 10 PGD steps
# with a 10-epoch warm-up for smoothadv, T = 4 for smoothmix), shortened to stay within minutes on a CPU.
DIGITS = {
    "smoothadv": ["objective.steps=2", "objective.samples=1", "objective.warmup=3"],
    "smoothmix": ["objective.steps=2", "objective.warmup=3"],
    "macer": ["objective.copies=4"],
}


def run_one(objective: str, seed: int, args: argparse.Namespace, work: Path) -> dict:
    """Fine-tune, certify and attack one (objective, seed); the numbers of one table row."""
    run = work / f"{objective}_seed{seed}"
    overrides = [
        "experiment=finetune_digits",
        f"objective={objective}",
        f"seed={seed}",
        f"trainer.max_epochs={args.epochs}",
        "logger=none",
        "callbacks.certification=null",
        "trainer.enable_progress_bar=false",
        f"pretrained={args.pretrained}" if args.pretrained else "pretrained=null",
        *([] if args.paper_settings else DIGITS.get(objective, [])),
    ]
    started = time.perf_counter()
    train(compose(CONF, "train", overrides, output_dir=run / "finetune"))
    train_s = time.perf_counter() - started
    weights = run / "finetune" / "checkpoints" / "last.ckpt"
    common = [
        f"weights={weights}",
        "data=digits",
        "model=vit_micro_patch8",
        "split=test",
        f"n={args.n}",
        "logger=none",
        "trainer.enable_progress_bar=false",
        *([f"max={args.max}"] if args.max else []),
    ]
    cert = certify(compose(CONF, "certify", [*common, "n0=100"], output_dir=run / "certify"))
    attack = certify(
        compose(
            CONF,
            "certify",
            [
                *common,
                "procedure=attack",
                f"radii=[{','.join(ATTACK_RADII)}]",
                "attack.steps=5",
                "attack.samples=8",
            ],
            output_dir=run / "attack",
        )
    )
    certified = of_type(read_records(run / "certify" / "certify.tsv", CertifyRecord), CertifyRecord)
    attacked = of_type(read_records(run / "attack" / "attack.tsv", AttackRecord), AttackRecord)
    checks = attacked_certificates(certified, attacked, cert["alpha"], cert["rho"])
    return {
        "objective": objective,
        "seed": seed,
        "certified_accuracy": {r: cert["certified_accuracy"][r] for r in RADII},
        "acr": cert["average_certified_radius"],
        "empirical_robust_accuracy": {r: attack["empirical_robust_accuracy"][r] for r in ATTACK_RADII},
        "cross_check": {r: list(c) for r, c in checks.items()},
        "sound": all(flipped <= allowed for _, flipped, allowed in checks.values()),
        "train_s": train_s,
        "overrides": overrides,
    }


def spread(values: list[float | None], scale: float = 100.0, digits: int = 1) -> str:
    """Mean (and standard deviation over seeds) in %; BEYOND where a run could not certify that far (its n)."""
    if any(v is None for v in values):
        return BEYOND
    mean = statistics.fmean(values) * scale  # type: ignore[arg-type]
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"  # type: ignore[arg-type]


def table(rows: list[dict]) -> str:
    header = [
        "objective",
        "seeds",
        *(f"cert r={r}" for r in RADII),
        "ACR",
        *(f"attack r={r}" for r in ATTACK_RADII),
        "fine-tune s/seed",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for objective in dict.fromkeys(row["objective"] for row in rows):
        mine = [row for row in rows if row["objective"] == objective]
        cells = [
            objective,
            str(len(mine)),
            *(spread([row["certified_accuracy"][r] for row in mine]) for r in RADII),
            spread([row["acr"] for row in mine], 1.0, 3),
            *(spread([row["empirical_robust_accuracy"][r] for row in mine]) for r in ATTACK_RADII),
            f"{statistics.fmean(row['train_s'] for row in mine):.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs (finetune_digits: 80)")
    parser.add_argument("--n", type=int, default=1000, help="certification draws (and the attack's PREDICT)")
    parser.add_argument(
        "--max", type=int, default=None, help="at most this many test images (default: all 360)"
    )
    parser.add_argument("--pretrained", help="initial weights for every method (e.g. a DMAE pre-training)")
    parser.add_argument(
        "--paper-settings", action="store_true", help="the objectives' yaml settings unshortened"
    )
    parser.add_argument("--work", type=Path, help="run directories (default: a temporary folder)")
    parser.add_argument("--out", help="JSON file (default: benchmarks/results/local/methods_digits.json)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="methods_digits_"))
    rows = [run_one(o, s, args, work) for o in args.objectives for s in args.seeds]
    print(table(rows))
    unsound = [f"{row['objective']} seed {row['seed']}" for row in rows if not row["sound"]]
    if unsound:
        print(f"ALARM: the attack turned certified images beyond the sampling error in {', '.join(unsound)}")
    meta = {**environment("cpu"), "epochs": args.epochs, "n": args.n, "max": args.max, "digits": DIGITS}
    path = write_results(args.out, "methods_digits.json", meta, rows)
    print(f"wrote {path}", file=sys.stderr)
    return 1 if unsound else 0


if __name__ == "__main__":
    sys.exit(main())

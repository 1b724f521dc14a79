"""Audit per-image certification results: is every radius one that the declared protocol can give?

    python -m dmae_lightning.jobs.audit FILE... [--protocol PROTOCOL.yaml]

FILE is a run directory of ours (or its certify.tsv / certify_radii.tsv; summary.json next to it declares the
protocol) or a result file of another code in Cohen et al.'s layout (``idx label predict radius correct
time``), whose protocol is ``--protocol`` or else the sidecar ``FILE.yaml`` (docs/audit.md). Checks: every
certified radius on the ladder of radii CERTIFY can give (sigma * Phi^-1(p_lower(k)), k <= n, p_lower the
one-sided Clopper-Pearson bound at alpha; at the file's printed precision), none above its top; our rows'
radius against their own counts; certify_radii rows against their grid, looks and levels; duplicate, missing
and unexpected image indices against the declared images; ``correct`` against predict == label; abstentions
with radius 0. Without a protocol (or with radii that do not fit it), the (n, alpha) pairs of a candidate grid
that the radii fit are printed. Exit status 0 when every file is clean, 1 with one line per kind of finding
otherwise, 2 when no file could be read.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from dmae_lightning.certification.audit import (
    PUBLISHED,
    Finding,
    Ladder,
    Protocol,
    RadiusFormula,
    ResultFile,
    Subset,
    certified_values,
    check_counts,
    check_indices,
    check_ladder,
    check_rows,
    check_sequential,
    consistent_protocols,
    load_protocol,
    read_result_file,
    sidecar,
)
from dmae_lightning.certification.confidence import (
    SequentialTest,
    clopper_pearson_lower,
    look_schedule,
    spend_alpha,
)
from dmae_lightning.certification.records import CertifyRecord, RadiiRecord, of_type
from dmae_lightning.certification.runs import RunSummary, read_summary
from dmae_lightning.certification.sampler import NOISE_BLOCK
from dmae_lightning.noise import DiscreteGaussianNoise, GaussianNoise, Noise, noise_from_config

NOISE_CLASSES: dict[str, type[GaussianNoise] | type[DiscreteGaussianNoise]] = {
    "gaussian": GaussianNoise,
    "discrete": DiscreteGaussianNoise,
}


def radius_formula(noise: Noise) -> RadiusFormula:
    """The vectorised radius formula of one of our noises (its ``radius``, elementwise)."""
    if isinstance(noise, DiscreteGaussianNoise):
        return RadiusFormula(noise.sigma, noise.deduction)
    if isinstance(noise, GaussianNoise):
        return RadiusFormula(noise.sigma)
    raise ValueError(f"no radius formula for the noise {noise!r} in the audit")


def noise_name(noise: Noise) -> str:
    """gaussian | discrete, as a protocol file names the noise (the class name for any other)."""
    return next((name for name, kind in NOISE_CLASSES.items() if type(noise) is kind), type(noise).__name__)


def protocol_noise(protocol: Protocol) -> Noise:
    return NOISE_CLASSES[protocol.noise](protocol.sigma)


@dataclass(frozen=True)
class Declared:
    """What a file's numbers were declared to come from: where it is said, the procedure and its settings."""

    source: str  # summary.json's path, or the protocol file's
    procedure: str
    noise: Noise
    n: int
    alpha: float
    subset: Subset | None  # the images; None when not known
    description: str
    skip_wrong_guess: bool = False
    grid: tuple[float, ...] = ()  # certify_radii
    looks: tuple[int, ...] = ()
    levels: tuple[float, ...] = ()

    @classmethod
    def of_summary(cls, path: Path, summary: RunSummary) -> Declared:
        settings = summary.settings
        noise = (
            noise_from_config(settings["noise"]) if settings.get("noise") else GaussianNoise(summary.sigma)
        )
        subset = settings.get("subset")
        name = summary.procedure.name
        grid: tuple[float, ...] = ()
        looks: tuple[int, ...] = ()
        levels: tuple[float, ...] = ()
        if name == "certify_radii":
            grid = tuple(getattr(summary.result, "radii", ()))
            looks = tuple(
                settings.get("looks") or look_schedule(summary.n, NOISE_BLOCK, SequentialTest.growth)
            )
            levels = tuple(
                settings.get("lower_levels")
                or spend_alpha(summary.alpha, len(looks), SequentialTest.final_share)
            )
        return cls(
            source=str(path),
            procedure=name,
            noise=noise,
            n=summary.n,
            alpha=summary.alpha,
            subset=Subset.parse(subset.get("indices")) if isinstance(subset, dict) else None,
            description=(
                f"{name}, {noise_name(noise)} sigma={noise.sigma:g}, n={summary.n}, alpha={summary.alpha:g}, "
                f"{settings.get('dataset')} {settings.get('split')}"
            ),
            skip_wrong_guess=bool(settings.get("skip_wrong_guess", False)),
            grid=grid,
            looks=looks,
            levels=levels,
        )

    @classmethod
    def of_protocol(cls, path: Path, protocol: Protocol) -> Declared:
        return cls(
            source=str(path),
            procedure="certify",
            noise=protocol_noise(protocol),
            n=protocol.n,
            alpha=protocol.alpha,
            subset=protocol.subset(),
            description=protocol.describe(),
        )


def resolve(path: Path, protocol: Path | None) -> tuple[ResultFile, Declared | None, list[str]]:
    """The result file behind a command-line path, its declared protocol (None: not declared) and notes.

    A directory (or a ``<procedure>.tsv`` next to a summary.json) is one of our runs; any other file is read
    by its header and declared by ``protocol`` or its sidecar. ValueError / OSError (one line) when unusable.
    """
    notes: list[str] = []
    run_dir = path if path.is_dir() else path.parent
    summary_path = run_dir / "summary.json"
    if summary_path.is_file() and (path.is_dir() or path.name.endswith(".tsv")):
        summary = read_summary(summary_path)
        tsv = run_dir / f"{summary.procedure.name}.tsv"
        if path.is_file() and path != tsv:
            raise ValueError(
                f"{path}: summary.json next to it is a {summary.procedure.name} run's ({tsv.name})"
            )
        return read_result_file(tsv), Declared.of_summary(summary_path, summary), notes
    if path.is_dir():
        raise FileNotFoundError(f"{path}: not a finished certification run (no summary.json)")
    result = read_result_file(path)
    if protocol is None and sidecar(path).is_file():
        protocol = sidecar(path)
    elif protocol is not None and sidecar(path).is_file():
        notes.append(f"{sidecar(path).name} ignored: --protocol {protocol} given")
    if protocol is None:
        return result, None, notes
    return result, Declared.of_protocol(protocol, load_protocol(protocol)), notes


def sigma_from_name(path: Path) -> float | None:
    """sigma in a published log's name (locuslab/smoothing's ``.../noise_0.25/test/sigma_0.25``), if any."""
    for part in (path.name, *(p.name for p in path.parents)):
        match = re.fullmatch(r"sigma[_=-]?(\d+(?:\.\d+)?)", part)
        if match:
            return float(match.group(1))
    return None


def candidates_note(result: ResultFile, formula: RadiusFormula) -> str:
    values, tolerances = certified_values(result)
    if not len(values):
        return "no certified radius to compare with the candidate (n, alpha) grid"
    reaching, below = consistent_protocols(values, tolerances, formula, clopper_pearson_lower)

    def pairs(found: list[tuple[int, float]]) -> str:
        return ", ".join(f"(n={n}, alpha={alpha:g})" for n, alpha in found)

    text = f"sigma={formula.sigma:g}: the radii fit "
    if reaching:
        text += f"{pairs(reaching)}, the largest radius at its maximum"
        return text + (f"; also attainable, below the maximum: {pairs(below)}" if below else "")
    if below:
        return text + f"{pairs(below)}, none reaching its maximum"
    return f"sigma={formula.sigma:g}: the radii fit no (n, alpha) of the candidate grid (docs/audit.md)"


def audit(result: ResultFile, declared: Declared | None, path: Path) -> tuple[list[Finding], list[str]]:
    """The findings and notes of one file."""
    records = list(result.records)
    notes: list[str] = []
    subset = None if declared is None else declared.subset
    findings = check_indices(records, None if subset is None else subset.indices())
    if declared is not None and subset is None:
        notes.append(
            "the declared images are not known (dataset, split, skip/max or num_images): indices not checked against them"
        )
    findings += check_rows(records)
    if declared is None:
        findings.append(
            Finding(
                "protocol",
                1,
                f"file without a declared protocol: write {sidecar(path).name} next to it or pass --protocol "
                "(docs/audit.md)",
            )
        )
        sigma = sigma_from_name(path)
        if result.layout in (PUBLISHED, "certify") and sigma is not None:
            notes.append(f"sigma {sigma:g} read from the path; Gaussian noise assumed")
            notes.append(candidates_note(result, RadiusFormula(sigma)))
        return findings, notes
    formula = radius_formula(declared.noise)
    expected_layout = {"certify": ("certify", PUBLISHED)}.get(declared.procedure, (declared.procedure,))
    if result.layout not in expected_layout:
        findings.append(Finding("layout", 1, f"{result.layout} file declared as a {declared.procedure} run"))
        return findings, notes
    if declared.procedure == "certify":
        ladder = Ladder(formula, declared.n, declared.alpha, clopper_pearson_lower)
        ladder_findings = check_ladder(result, ladder)
        findings += ladder_findings
        if result.layout == "certify":
            findings += check_counts(of_type(records, CertifyRecord), ladder, declared.skip_wrong_guess)
        if ladder_findings:
            notes.append(candidates_note(result, formula))
    elif declared.procedure == "certify_radii":
        findings += check_sequential(
            of_type(records, RadiiRecord),
            declared.grid,
            formula,
            declared.looks,
            declared.levels,
            clopper_pearson_lower,
        )
    return findings, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dmae_lightning.jobs.audit", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "files", nargs="+", metavar="FILE", help="run directories, their .tsv, or published logs"
    )
    parser.add_argument(
        "--protocol", type=Path, help="YAML protocol of the files that are not our runs (default: FILE.yaml)"
    )
    args = parser.parse_args(argv)
    read, dirty = 0, 0
    for name in args.files:
        path = Path(name)
        try:
            result, declared, notes = resolve(path, args.protocol)
        except (OSError, ValueError) as err:
            print(f"audit: skipping {err}", file=sys.stderr)
            continue
        read += 1
        findings, more = audit(result, declared, path)
        source = "not declared" if declared is None else f"{declared.description} ({declared.source})"
        print(f"{path}: {result.layout}, {len(result.records)} rows; protocol: {source}")
        for finding in findings:
            print(f"  {finding.line()}")
        for note in notes + more:
            print(f"  note: {note}")
        print("  clean" if not findings else f"  {len(findings)} kind(s) of finding")
        dirty += bool(findings)
    if not read:
        print("audit: error: none of the paths holds a result file", file=sys.stderr)
        return 2
    return 1 if dirty else 0


if __name__ == "__main__":
    sys.exit(main())

"""Certified-accuracy tables and plots from certification run directories and published per-image logs.

    python -m dmae_lightning.jobs.analyze RUN_DIR|FILE... [--radii 0 0.25 0.5] [--out DIR] [--protocol FILE]

Runs are grouped by everything but sigma that their numbers depend on (procedure, model, data set,
split, image subset, n, alpha, precision, and for a grid-only procedure, certify_radii, its radius grid); each group gets its own
table (a row per sigma plus, with several, the best-over-sigma envelope that papers report) and plot.
A FILE is a CERTIFY log of other code (locuslab/smoothing's ``idx label predict radius correct time``, or a
certify.tsv of ours without its summary.json) with its protocol in ``FILE.yaml`` or ``--protocol``
(docs/audit.md): a row "<label>, sigma=<s> (published)" in every table of ours whose protocol (procedure, noise,
data set, split, images, n0, n, alpha) it shares, else in a table of published results; its certified accuracy,
data-set-level lower bound and ACR are computed as ours, and it never enters the best-over-sigma envelope (nor
the plot's: a plot with a published curve draws none).
Paths that hold no finished certification run (Hydra's multirun.yaml, a run stopped by a config error) are
skipped with a note. analysis.md, analysis.tex and analysis.png (analysis_<k>.png per group with several
groups) go to --out (default: the deepest directory holding every run); a run's own files, such as its
certified_accuracy.png, are never overwritten.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dmae_lightning.certification.audit import (
    PUBLISHED,
    Protocol,
    Subset,
    layout_of,
    load_protocol,
    read_result_file,
    sidecar,
)
from dmae_lightning.certification.metrics import (
    attacked_certificates,
    best_over_sigma,
    default_radii,
    false_certificates_allowed,
    max_certifiable_radius,
)
from dmae_lightning.certification.procedures import Certify
from dmae_lightning.certification.records import AttackRecord, Record, of_type, read_records
from dmae_lightning.certification.report import (
    bound_note,
    cross_check_line,
    format_table,
    plot_certified_accuracy,
    sample_budget,
)
from dmae_lightning.certification.runs import RunSummary, read_summary
from dmae_lightning.certification.summary import CertifiedSummary, EmpiricalSummary
from dmae_lightning.noise import DiscreteGaussianNoise, GaussianNoise, Noise

# Keys of GROUP_KEYS that a published result never shares with our runs (its model is another; its precision
# is not known): a published log joins the tables of ours that agree on every other key (PROTOCOL_KEYS).
NOT_PROTOCOL = ("model_name", "precision")
PUBLISHED_NOISES: dict[str, type[GaussianNoise] | type[DiscreteGaussianNoise]] = {
    "gaussian": GaussianNoise,
    "discrete": DiscreteGaussianNoise,
}

# What a run's numbers depend on besides sigma: runs differing in any of these never share a table
# ("noise" is the distribution's class: Gaussian and discrete-Gaussian runs are not rows of one table).
GROUP_KEYS = (
    "procedure",
    "noise",
    "model_name",
    "dataset",
    "split",
    "subset",
    "data_subset",
    "n0",
    "n",
    "alpha",
    "precision",
    "grid",
)


@dataclass(frozen=True)
class Run:
    """A finished certification run: where it is, its summary.json, its certified result and records."""

    path: Path
    summary: RunSummary
    result: CertifiedSummary  # summary.result: a run of certified radii
    records: list[Record]
    published: str | None = None  # the label of a published result (a log of other code), None for ours


@dataclass(frozen=True)
class AttackRun:
    """A finished attack run (procedure=attack): its summary and records, shown beside the certification run of
    the same checkpoint, noise, data and images."""

    path: Path
    summary: RunSummary
    result: EmpiricalSummary
    records: list[AttackRecord]

    def attacks(self, run: Run) -> bool:
        """Whether this attack ran on ``run``'s classifier (checkpoint digest), noise, data, split and images."""
        keys = ("checkpoint_sha256", "noise", "dataset", "split", "data_subset")
        ours, theirs = run.summary.settings, self.summary.settings
        return (
            run.published is None
            and all(ours.get(k) == theirs.get(k) for k in keys)
            and [r.idx for r in run.records] == [r.idx for r in self.records]
        )


def load_attack(run_dir: Path, summary: RunSummary) -> AttackRun:
    tsv = run_dir / f"{summary.procedure.name}.tsv"
    if not tsv.is_file():
        raise FileNotFoundError(f"{run_dir}: {tsv.name} is missing")
    records = of_type(read_records(tsv, AttackRecord), AttackRecord)
    assert isinstance(summary.result, EmpiricalSummary)
    return AttackRun(run_dir, summary, summary.result, records)


def cross_check(label: str, run: Run, attack: AttackRun) -> str:
    """One line: how many of ``run``'s images certified at each attack radius the attack turned to another class,
    against what a sound certifier allows (:func:`~dmae_lightning.certification.metrics.attacked_certificates`)."""
    rho = run.result.rho
    counts = attacked_certificates(run.records, attack.records, run.summary.alpha, rho)
    return f"\n- sigma={label} under attack: {cross_check_line(counts, rho)}"


def _subset_key(subset: object) -> object:
    """The images a run took, named canonically: ``range(0, 10000, 20)[:None]`` and ``[:500]`` are one subset."""
    if isinstance(subset, dict):
        parsed = Subset.parse(subset.get("indices"))
        return parsed.key() if parsed is not None else subset.get("indices", subset)
    return subset


def _key_values(run: Run) -> dict[str, object]:
    """The settings a run's numbers depend on, named alike whatever wrote them: a run that names no noise
    smoothed with Gaussian noise (before there were others), and a data_subset of nothing but nulls is none."""
    settings = run.summary.settings
    grid = run.result.grid
    data_subset = settings.get("data_subset")
    if isinstance(data_subset, dict) and all(value is None for value in data_subset.values()):
        data_subset = None
    return {
        **settings,
        "procedure": run.summary.procedure.name,
        "subset": _subset_key(settings.get("subset")),
        "grid": None if grid is None else list(grid),
        "noise": (settings.get("noise") or {}).get("_target_") or GaussianNoise.target(),
        "data_subset": data_subset,
    }


def group_key(run: Run) -> tuple[str, ...]:
    """The run's values of GROUP_KEYS; "grid" is the radius grid of a grid-only procedure (certify_radii: its
    records answer only there), None for procedures whose radii are only the table's columns; "noise" the
    noise's class; "subset" the images taken (protocol=images500 and skip=20 max=500 take the same ones), the
    settings where a run does not say. A published result's model is "published" (their tables, when they
    join none of ours, gather every published result of one protocol)."""
    values = _key_values(run)
    if run.published is not None:
        values.update(model_name="published", precision=None)
    return tuple(str(values.get(k)) for k in GROUP_KEYS)


def protocol_key(run: Run) -> tuple[str, ...]:
    """The run's values of GROUP_KEYS but model_name and precision: the keys a published result must share with a
    table of ours to join it."""
    values = _key_values(run)
    return tuple(str(values.get(k)) for k in GROUP_KEYS if k not in NOT_PROTOCOL)


def published_settings(protocol: Protocol, noise: Noise) -> dict:
    """The settings a run of ours would record for this protocol (the keys of GROUP_KEYS, sigma, the label)."""
    subset = protocol.subset()
    return {
        "noise": noise.config(),
        "sigma": protocol.sigma,
        "n0": protocol.n0,
        "n": protocol.n,
        "alpha": protocol.alpha,
        "dataset": protocol.dataset,
        "split": protocol.split,
        "subset": {"indices": subset.key()}
        if subset is not None
        else {"skip": protocol.skip, "max": protocol.max, "num_images": protocol.num_images},
        "data_subset": None,
        "model_name": protocol.label or "published",
        "precision": None,
    }


def load_published(path: Path, protocol_path: Path | None) -> Run:
    """A CERTIFY log of other code (or a certify.tsv of ours without summary.json) with its protocol, as a
    published Run; FileNotFoundError / ValueError in one line if unusable."""
    result = read_result_file(path)
    if result.layout not in (PUBLISHED, "certify"):
        raise ValueError(f"{path}: a {result.layout} file has no CERTIFY radii to tabulate")
    protocol_path = protocol_path or sidecar(path)
    if not protocol_path.is_file():
        raise FileNotFoundError(
            f"{path}: a result file without a protocol (write {sidecar(path).name} next to it or pass --protocol;"
            " docs/audit.md)"
        )
    protocol = load_protocol(protocol_path)
    if not result.records:
        raise ValueError(f"{path}: no records")
    noise = PUBLISHED_NOISES[protocol.noise](protocol.sigma)
    records = list(result.records)
    summary_result = CertifiedSummary.from_records(
        records,
        default_radii(protocol.dataset or ""),
        alpha=protocol.alpha,
        max_certifiable_radius=max_certifiable_radius(noise, protocol.n, protocol.alpha),
        grid_only=False,
    )
    summary = RunSummary(Certify, published_settings(protocol, noise), summary_result)
    return Run(path, summary, summary_result, records, published=protocol.label or path.name)


def published_label(run: Run) -> str:
    return f"{run.published}, sigma={run.summary.sigma:g} (published)"


def load_run(run_dir: str | Path) -> Run:
    """One finished run; FileNotFoundError / ValueError in one line if there is none."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a finished certification run (no summary.json)")
    summary = read_summary(summary_path)
    if not isinstance(summary.result, CertifiedSummary):
        raise ValueError(f"{run_dir}: no certified radii in this run (procedure {summary.procedure.name!r})")
    tsv = run_dir / f"{summary.procedure.name}.tsv"
    if not tsv.is_file():
        raise FileNotFoundError(f"{run_dir}: {tsv.name} is missing")
    records = read_records(tsv, summary.procedure.record_type)
    if not records:
        raise ValueError(f"{tsv}: no records")
    return Run(run_dir, summary, summary.result, records)


def group_label(key: tuple, varying: list[int]) -> str:
    """What distinguishes a group from the others, e.g. 'model_name=vit_tiny_patch4, n=1000'."""
    return ", ".join(f"{GROUP_KEYS[i]}={key[i]}" for i in varying) or "all runs"


def row_labels(members: list[Run]) -> dict[Path, str]:
    """Each run's row label: its sigma, followed, where several runs of a group share a sigma (two
    checkpoints, two seeds), by its path below the directory those runs share, so no row replaces another."""
    by_sigma: dict[str, list[Path]] = {}
    for run in members:
        by_sigma.setdefault(f"{run.summary.sigma:g}", []).append(run.path)
    labels = {}
    for sigma, dirs in by_sigma.items():
        common = Path(os.path.commonpath(dirs)) if len(dirs) > 1 else None
        for run_dir in dirs:
            labels[run_dir] = (
                sigma if common is None else f"{sigma} ({run_dir.relative_to(common).as_posix()})"
            )
    return labels


def sample_cost(label: str, result: CertifiedSummary) -> str:
    """'sigma=0.25: 123,400 noisy samples (343 per image, 29.4x fewer than fixed n)', when the run says."""
    if result.samples is None:
        return ""
    text = f"\n- sigma={label}: {result.samples:,} noisy samples ({result.samples / result.num_images:,.0f} per image"
    saving = None if result.sequential is None else result.sequential.saving_vs_fixed_n
    return text + (f", {saving:.1f}x fewer than fixed n)" if saving else ")")


def _ours(members: list[Run]) -> list[Run]:
    return [run for run in members if run.published is None]


def _first_line(path: Path) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            return file.readline()
    except (OSError, UnicodeDecodeError):
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dmae_lightning.jobs.analyze", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="certification run directories, or CERTIFY logs of other code with a protocol (docs/audit.md)",
    )
    parser.add_argument("--radii", nargs="+", type=float, help="table columns (default: the runs' own radii)")
    parser.add_argument(
        "--out", type=Path, help="where to write tables and plots (default: the runs' common parent)"
    )
    parser.add_argument(
        "--protocol",
        type=Path,
        help="YAML protocol of the published logs given (default: each FILE's FILE.yaml; docs/audit.md)",
    )
    args = parser.parse_args(argv)

    runs: list[Run] = []
    published: list[Run] = []
    attacks: list[AttackRun] = []
    given: dict[Path, str] = {}  # resolved run directory -> the path it was given as
    for path in args.run_dirs:
        real = Path(path).resolve()  # a `latest` link and the run directory it points at are one run
        if real.is_file() and (real.parent / "summary.json").is_file():
            real = real.parent  # a file of a run directory (its certify.tsv): the run
        if real in given:
            print(f"analyze: {path} is the run {given[real]} already given, counted once", file=sys.stderr)
            continue
        given[real] = path
        try:
            if real.is_file() and layout_of(_first_line(real)) is not None:
                published.append(load_published(real, args.protocol))
            elif (real / "summary.json").is_file() and isinstance(
                (summary := read_summary(real / "summary.json")).result, EmpiricalSummary
            ):
                attacks.append(load_attack(real, summary))
            else:
                runs.append(load_run(real))
        except (FileNotFoundError, ValueError) as err:
            print(f"analyze: skipping {err}", file=sys.stderr)
    if not runs and not published:
        alone = " (an attack run is shown beside a certification run of the same checkpoint: give both)"
        print(
            f"analyze: error: none of the paths holds a finished certification run{alone if attacks else ''}",
            file=sys.stderr,
        )
        return 2
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(group_key(run), []).append(run)
    for (
        run
    ) in published:  # a row of every table of ours with its protocol, else of a published results' table
        homes = [
            key
            for key, members in groups.items()
            if _ours(members) and protocol_key(run) == protocol_key(_ours(members)[0])
        ]
        for key in homes or [group_key(run)]:
            groups.setdefault(key, []).append(run)
    runs += published
    varying = [i for i in range(len(GROUP_KEYS)) if len({key[i] for key in groups}) > 1]
    out = args.out or Path(os.path.commonpath([run.path for run in runs]))
    if out.is_file():
        out = out.parent
    if args.out is None and out == Path(out.anchor):
        print(f"analyze: error: the runs share no directory but {out}: name one with --out", file=sys.stderr)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(f"{out} is not writable")
    except OSError as err:
        print(
            f"analyze: error: cannot write the tables to {out} ({err.strerror or err}): choose another --out",
            file=sys.stderr,
        )
        return 2

    markdown, latex = [], []
    shown: set[Path] = set()  # attack runs placed beside a certification run
    for number, (key, members) in enumerate(sorted(groups.items()), start=1):
        ours, theirs = _ours(members), [run for run in members if run.published is not None]
        first = (ours or theirs)[0]
        radii = args.radii or first.result.radii or default_radii(first.summary.settings.get("dataset", ""))
        rows: dict[str, Mapping[str, float | None]] = {}
        bounds: dict[str, Mapping[str, float | None]] = {}
        acr: dict[str, float] = {}
        curves, limits, costs = {}, {}, []
        empirical: dict[str, Mapping[str, float | None]] = {}
        rho = first.result.rho
        labels = row_labels(ours)
        for run in sorted(ours, key=lambda run: run.summary.sigma):
            label = labels[run.path]
            table = run.result.at(run.records, radii, run.summary.alpha, rho)
            rows[label] = table.certified_accuracy
            if table.average_certified_radius is not None:  # none of grid-only runs (not comparable)
                acr[label] = table.average_certified_radius
            if table.certified_accuracy_lower_bound is not None:  # always: computed from the records
                bounds[f"{label} lower bound"] = table.certified_accuracy_lower_bound
            curves[f"sigma={label}"] = run.records
            limits[f"sigma={label}"] = table.max_certifiable_radius
            costs.append(sample_cost(label, run.result))
            for attack in (
                a for a in attacks if a.attacks(run)
            ):  # empirical beside certified, and the cross-check
                empirical[f"{label} under attack (empirical)"] = attack.result.empirical_robust_accuracy
                costs.append(cross_check(label, run, attack))
                shown.add(attack.path)
        if len(rows) > 1:
            rows["best"] = best_over_sigma(rows)
        rows.update(empirical)  # after the envelope: an upper bound, never a certified row
        for run in sorted(theirs, key=lambda run: (run.published or "", run.summary.sigma)):
            label = published_label(run)  # after the envelope: a published row never enters it
            table = run.result.at(run.records, radii, run.summary.alpha, rho)
            rows[label] = table.certified_accuracy
            if table.average_certified_radius is not None:
                acr[label] = table.average_certified_radius
            if table.certified_accuracy_lower_bound is not None:
                bounds[f"{label} lower bound"] = table.certified_accuracy_lower_bound
            curves[label] = run.records
            limits[label] = table.max_certifiable_radius
        # no envelope of the lower bounds: the best of several level-(1 - rho) bounds holds only at 1 - S rho
        rows.update(bounds)
        num_images = len(first.records)
        note = bound_note(rho, false_certificates_allowed(num_images, first.summary.alpha, rho), num_images)
        for run in theirs:  # a published log's bound is over its own images
            if run is not first and (len(run.records), run.summary.alpha) != (
                num_images,
                first.summary.alpha,
            ):
                allowed = false_certificates_allowed(len(run.records), run.summary.alpha, rho)
                note += f"; {published_label(run)}: at most {allowed} of its {len(run.records):,} certificates false"
        settings = first.summary.settings
        title = (
            f"{group_label(key, varying)}: {settings['model_name']} on {settings['dataset']} {settings['split']}, "
            f"{num_images} images, {sample_budget(first.summary.n, first.result.grid_only)}, "
            f"alpha={settings['alpha']}"
        )
        markdown.append(
            f"### {title}\n\n{format_table(rows, radii, acr=acr or None)}\n\n{note}"
            + "".join(c for c in costs if c)
        )
        latex.append(f"% {title}\n{format_table(rows, radii, fmt='latex', acr=acr or None)}")
        png = out / ("analysis.png" if len(groups) == 1 else f"analysis_{number}.png")
        plot_certified_accuracy(
            curves, png, title=title, envelope=not theirs, limits=limits, grid=first.result.grid
        )
    for attack in attacks:
        if attack.path not in shown:
            print(
                f"analyze: skipping {attack.path}: an attack run is shown beside a certification run of the same "
                "checkpoint, noise and images, and none was given",
                file=sys.stderr,
            )
    print("Certified accuracy (%)\n\n" + "\n\n".join(markdown) + "\n\n" + "\n\n".join(latex))
    (out / "analysis.md").write_text("\n\n".join(markdown) + "\n", encoding="utf-8")
    (out / "analysis.tex").write_text("\n\n".join(latex) + "\n", encoding="utf-8")
    print(f"\nwrote analysis.md, .tex and the plot(s) to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

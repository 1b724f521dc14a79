"""Certificate audit: could every radius of a per-image result file have come from its declared protocol?

Result files are read in four layouts (:func:`read_result_file`, chosen by the header line): the published
CERTIFY logs of Cohen et al.'s locuslab/smoothing and Salman et al.'s Hadisalman/smoothing-adversarial
(``idx label predict radius correct time``, radius printed to 3 significant digits, ``time`` in seconds or
as ``H:MM:SS.ffffff``), and ours (``certify.tsv``, ``certify_radii.tsv``, ``predict.tsv``, :mod:`.records`).
A file of another code names its protocol in a small YAML file (:class:`Protocol`); ours in summary.json.

Under CERTIFY a radius can only be ``radius(p_lower(k))`` for an integer count k <= n, p_lower the one-sided
Clopper-Pearson bound at level alpha (:func:`.confidence.clopper_pearson_lower`, handed in as ``lower_bound``
so that this module imports no torch) and ``radius`` the noise's formula (:class:`RadiusFormula`:
``GaussianNoise.radius`` and ``DiscreteGaussianNoise.radius``, vectorised). That set is :class:`Ladder`; its
top, k = n, is the largest radius n draws can certify. A printed radius is on the ladder when a rung lies
within half a unit of its last printed digit (:func:`printed_tolerance`); our files print floats with
``repr``, which reads back bit for bit, so theirs must match a rung exactly. CERTIFY_RADII's records are checked
against its grid, its looks and their levels (:func:`check_sequential`).

Imports: numpy, scipy, PyYAML (in :func:`load_protocol` only) and :mod:`.records`, :mod:`.checks`; no torch.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import norm

from dmae_lightning.certification.checks import evenly_spaced
from dmae_lightning.certification.records import (
    ABSTAIN,
    CertifyRecord,
    PredictRecord,
    RadiiRecord,
    Record,
)

# p_lower(successes, trials, level), elementwise over successes: confidence.clopper_pearson_lower
LowerBound = Callable[[Any, int, float], Any]

PUBLISHED = "published"  # the layout of Cohen et al.'s and Salman et al.'s logs
PUBLISHED_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
OUR_LAYOUTS: dict[str, type[Record]] = {
    "certify": CertifyRecord,
    "certify_radii": RadiiRecord,
    "predict": PredictRecord,
}
NOISES = ("gaussian", "discrete")
# The (n, alpha) grid tried when a file's protocol is not declared (or its radii do not fit the declared one):
# the sample counts and levels of the published evaluations (Cohen et al.: n = 100,000 on CIFAR-10, 10,000 on
# ImageNet, alpha = 0.001; Salman et al.; Carlini et al.) and their usual variations.
CANDIDATE_N = (100, 1_000, 10_000, 100_000, 200_000)
CANDIDATE_ALPHA = (0.001, 0.01, 0.05)
# Images per (data set, split), for a declared subset of a file of another code that does not state the size.
SPLIT_SIZES = {
    ("cifar10", "train"): 50_000,
    ("cifar10", "test"): 10_000,
    ("imagenet", "train"): 1_281_167,
    ("imagenet", "val"): 50_000,
    ("imagenet", "test"): 50_000,  # our imagenet test split reads the val folder
}
EXAMPLES = 3  # examples printed per finding


# ------------------------------------------------------------------------------------------------ files
@dataclass(frozen=True)
class PublishedRecord(Record):
    """A line of a published CERTIFY log (Cohen et al.'s layout): no Monte Carlo counts, radius as printed."""

    idx: int
    label: int
    predict: int  # certified class, or ABSTAIN (-1)
    radius: float  # printed to 3 significant digits by the reference code
    correct: int  # 1 when predict == label (as the file says)
    time: float  # seconds

    @property
    def certified_correct_radius(self) -> float | None:
        return self.radius if self.correct == 1 else None


@dataclass(frozen=True)
class ResultFile:
    """The records of one per-image result file and how its radius column was printed."""

    path: Path
    layout: str  # PUBLISHED or a key of OUR_LAYOUTS
    records: tuple[Record, ...]
    radius_text: tuple[str, ...]  # the radius column as printed, per record ("" for layouts without one)

    @property
    def exact(self) -> bool:
        """Floats written with repr (ours): they read back bit for bit, so no rounding is tolerated."""
        return self.layout != PUBLISHED

    def tolerances(self) -> np.ndarray:
        """[N] half a unit of each radius' last printed digit (0 for our exact files)."""
        if self.exact:
            return np.zeros(len(self.records))
        return np.array([printed_tolerance(text) for text in self.radius_text])


def parse_seconds(text: str) -> float:
    """Seconds from ``15.4`` or datetime.timedelta's ``0:00:15.400000`` / ``1 day, 0:00:01``; NaN otherwise."""
    text = text.strip()
    days = 0.0
    if "day" in text:
        head, _, text = text.partition(",")
        days = float(head.split()[0])
    try:
        seconds = 0.0
        for part in text.split(":"):
            seconds = seconds * 60 + float(part)
    except ValueError:
        return math.nan
    return days * 86_400 + seconds


def printed_tolerance(text: str) -> float:
    """Half a unit of the last printed digit: 0.0005 for ``0.953``, 5e-8 for ``1.5e-06``, 0.05 for ``0.0``."""
    mantissa, _, exponent = text.strip().lower().partition("e")
    if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)", mantissa):
        return 0.0  # nan, inf, none: nothing to round
    decimals = len(mantissa.partition(".")[2])
    return 0.5 * 10.0 ** (int(exponent or 0) - decimals)


def _header(line: str) -> tuple[str, ...]:
    return tuple(cell.strip() for cell in line.rstrip("\r\n").split("\t"))


def layout_of(first_line: str) -> str | None:
    """The layout a header line names, None for any other line."""
    header = _header(first_line)
    if header == PUBLISHED_COLUMNS:
        return PUBLISHED
    return next((name for name, kind in OUR_LAYOUTS.items() if header == kind.columns()), None)


def read_result_file(path: str | Path) -> ResultFile:
    """The records of a per-image result file in one of the known layouts; ValueError (one line, naming the
    file and line) for another file or a malformed line. Our files' partial last line (a crashed job) is
    ignored, as :func:`.records.read_records` does; a published log's last line may lack its newline."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    layout = layout_of(lines[0])
    if layout is None:
        raise ValueError(
            f"{path}: not a result file (first line {lines[0][:80]!r}; expected the columns "
            f"{' '.join(PUBLISHED_COLUMNS)} or one of our record types)"
        )
    body = lines[1:] if layout == PUBLISHED else lines[1:-1]
    records: list[Record] = []
    texts: list[str] = []
    for number, line in enumerate(body, start=2):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if layout == PUBLISHED:
            cells = _header(line)
            if len(cells) != len(PUBLISHED_COLUMNS):
                raise ValueError(f"{where}: expected {len(PUBLISHED_COLUMNS)} tab-separated fields: {line!r}")
            try:
                idx, label, predict, correct = (int(cells[i]) for i in (0, 1, 2, 4))
                record: Record = PublishedRecord(
                    idx, label, predict, float(cells[3]), correct, parse_seconds(cells[5])
                )
            except ValueError as err:
                raise ValueError(f"{where}: malformed record {line!r} ({err})") from None
            texts.append(cells[3])
        else:
            record = OUR_LAYOUTS[layout].from_line(line.rstrip("\r"), where)
            texts.append(line.split("\t")[3] if layout == "certify" else "")
        records.append(record)
    return ResultFile(path, layout, tuple(records), tuple(texts))


# ------------------------------------------------------------------------------------------------ protocol
def _integer(value: Any, key: str, minimum: int) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or value != int(value)
        or value < minimum
    ):
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _probability(value: Any, key: str) -> float:
    try:
        number = float(value)  # YAML reads 1e-3 (no dot) as a string
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not 0 < number < 1:
        raise ValueError(f"{key} must lie strictly between 0 and 1, got {value!r}")
    return number


@dataclass(frozen=True)
class Protocol:
    """How a CERTIFY result file of another code was made, as far as its numbers depend on it.

    ``noise`` gaussian | discrete and ``sigma``; CERTIFY's ``n`` (estimation draws; certify_radii: the cap),
    ``n0`` and ``alpha``; the images: ``dataset``, ``split`` and either ``skip``/``max`` (``range(0, size,
    skip)[:max]``: every skip-th image, at most max of them, as our certify job takes them; Cohen et al.'s
    ``--max`` is an index bound instead: --skip 20 --max 1000 is skip 20, max 50) or ``num_images`` (N evenly
    spaced images); ``dataset_size`` where :data:`SPLIT_SIZES` does not know the split; ``label`` names a
    published result in tables (e.g. "Cohen et al. 2019, ResNet-110").
    """

    noise: str
    sigma: float
    n: int
    alpha: float
    n0: int | None = None
    dataset: str | None = None
    split: str | None = None
    skip: int = 1
    max: int | None = None
    num_images: int | None = None
    dataset_size: int | None = None
    label: str | None = None

    @classmethod
    def from_mapping(cls, data: Any, where: str = "protocol") -> Protocol:
        """The protocol of a mapping (a sidecar YAML's contents); ValueError (one line, starting with
        ``where``) for unknown or missing keys and values out of range."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: a protocol is a mapping of keys to values, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(map(str, data)) - known)
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        missing = [key for key in ("noise", "sigma", "n", "alpha") if data.get(key) is None]
        if missing:
            raise ValueError(
                f"{where}: {', '.join(missing)} missing (needed to audit and tabulate the radii)"
            )
        try:
            noise = str(data["noise"]).lower()
            if noise not in NOISES:
                raise ValueError(f"noise must be one of {' | '.join(NOISES)}, got {data['noise']!r}")
            sigma = float(data["sigma"])
            if isinstance(data["sigma"], bool) or not 0 < sigma < math.inf:
                raise ValueError(f"sigma must be a number > 0, got {data['sigma']!r}")

            def optional(key: str, minimum: int) -> int | None:
                return None if data.get(key) is None else _integer(data[key], key, minimum)

            return cls(
                noise=noise,
                sigma=sigma,
                n=_integer(data["n"], "n", 1),
                alpha=_probability(data["alpha"], "alpha"),
                n0=optional("n0", 1),
                dataset=None if data.get("dataset") is None else str(data["dataset"]),
                split=None if data.get("split") is None else str(data["split"]),
                skip=optional("skip", 1) or 1,
                max=optional("max", 1),
                num_images=optional("num_images", 1),
                dataset_size=optional("dataset_size", 1),
                label=None if data.get("label") is None else str(data["label"]),
            )
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    @property
    def size(self) -> int | None:
        """Images in the split: ``dataset_size``, else :data:`SPLIT_SIZES`' entry, else None."""
        if self.dataset_size is not None:
            return self.dataset_size
        return SPLIT_SIZES.get((str(self.dataset).lower(), str(self.split).lower()))

    def subset(self) -> Subset | None:
        """The declared images, None when the split's size is not known."""
        size = self.size
        if size is None:
            return None
        if self.num_images is not None:  # checks.evenly_spaced's rule: every (size // N)-th, the first N
            evenly_spaced(size, self.num_images)  # ValueError when the split has fewer images
            return Subset(size, size // self.num_images, self.num_images)
        return Subset(size, self.skip, self.max)

    def describe(self) -> str:
        images = f", {self.num_images} images" if self.num_images else ""
        images += f", skip {self.skip}" if self.skip != 1 and not self.num_images else ""
        images += f", max {self.max}" if self.max and not self.num_images else ""
        data = f", {self.dataset} {self.split or ''}".rstrip() if self.dataset else ""
        n0 = f", n0={self.n0}" if self.n0 is not None else ""
        return (
            f"certify, {self.noise} sigma={self.sigma:g}, n={self.n}{n0}, alpha={self.alpha:g}{data}{images}"
        )


def load_protocol(path: str | Path) -> Protocol:
    """The :class:`Protocol` of a YAML file; ValueError (one line, naming the file) for a bad one."""
    import yaml  # only here: the rest of the module needs no YAML

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not YAML ({str(err).splitlines()[0]})") from None
    return Protocol.from_mapping(data, str(path))


def sidecar(path: str | Path) -> Path:
    """Where a result file's protocol lives when the command line names none: ``<file>.yaml``."""
    path = Path(path)
    return path.with_name(path.name + ".yaml")


@dataclass(frozen=True)
class Subset:
    """The images ``range(0, size, skip)[:count]`` (count None: all of them), as our certify job takes them."""

    size: int
    skip: int
    count: int | None = None

    _PATTERN = re.compile(r"range\(0, (\d+), (\d+)\)\[:(None|\d+)\]")

    @classmethod
    def parse(cls, text: Any) -> Subset | None:
        """The subset of a summary.json's ``subset.indices`` (``range(0, 10000, 20)[:500]``), None if none."""
        match = cls._PATTERN.fullmatch(str(text))
        if match is None:
            return None
        size, skip, count = match.groups()
        return cls(int(size), int(skip), None if count == "None" else int(count))

    def indices(self) -> list[int]:
        return list(range(0, self.size, self.skip))[: self.count]

    def key(self) -> str:
        """A canonical name: two subsets that take the same images have the same key."""
        count = len(range(0, self.size, self.skip)[: self.count])
        return f"range(0, {self.size}, {self.skip})[:{count}]"


# ------------------------------------------------------------------------------------------------ ladders
@dataclass(frozen=True)
class RadiusFormula:
    """The certified radius of a lower bound p on P(f(x + eps) = c_A): sigma * Phi^-1(p - deduction).

    ``deduction`` 0 is ``GaussianNoise.radius``; ``DiscreteGaussianNoise.deduction`` makes it
    ``DiscreteGaussianNoise.radius`` (the same operations, elementwise: test_audit checks bit for bit).
    """

    sigma: float
    deduction: float = 0.0

    def radius(self, p: Any) -> np.ndarray:
        return self.sigma * norm.ppf(np.maximum(np.asarray(p, dtype=float) - self.deduction, 0.0))

    def probability_for_radius(self, radius: Any) -> np.ndarray:
        """Phi(radius / sigma) + deduction: the bound a radius needs (the noise's ``probability_for_radius``)."""
        return norm.cdf(np.asarray(radius, dtype=float) / self.sigma) + self.deduction

    @property
    def threshold(self) -> float:
        """The bound below which CERTIFY abstains: ``probability_for_radius(0)``."""
        return float(self.probability_for_radius(0.0))


def _slack(values: np.ndarray) -> np.ndarray:
    """Two units in the last place: what an equal formula evaluated elsewhere may differ by."""
    return 2 * np.spacing(np.abs(np.nan_to_num(np.asarray(values, dtype=float))))


def _smallest_reaching(
    increasing: Callable[[np.ndarray], np.ndarray], targets: np.ndarray, low: int, high: int
) -> np.ndarray:
    """[M] per target the smallest integer k in [low, high] with increasing(k) >= target (high + 1 if none):
    a bisection over all targets at once (about log2(high - low) vectorised calls)."""
    lo = np.full(targets.shape, low, dtype=np.int64)
    hi = np.full(targets.shape, high + 1, dtype=np.int64)
    while np.any(lo < hi):
        active = lo < hi
        middle = (lo + hi) // 2
        reached = np.zeros(targets.shape, dtype=bool)
        reached[active] = increasing(middle[active]) >= targets[active]
        hi = np.where(active & reached, middle, hi)
        lo = np.where(active & ~reached, middle + 1, lo)
    return lo


@dataclass(frozen=True)
class Ladder:
    """The radii CERTIFY can print with ``n`` estimation draws at level ``alpha``: radius(p_lower(k)) for the
    counts k = :attr:`first` .. n (fewer successes abstain), increasing in k."""

    formula: RadiusFormula
    n: int
    alpha: float
    lower_bound: LowerBound

    def radius(self, counts: Any) -> np.ndarray:
        """[...] the radius of each count (below :attr:`first` the formula's value, not an abstention)."""
        k = np.asarray(counts)
        return self.formula.radius(np.asarray(self.lower_bound(k, self.n, self.alpha), dtype=float))

    @cached_property
    def first(self) -> int:
        """The fewest successes that certify (p_lower >= the abstention threshold); n + 1 if none does."""
        threshold = self.formula.threshold
        low, high = 0, self.n + 1
        while low < high:
            middle = (low + high) // 2
            if float(self.lower_bound(middle, self.n, self.alpha)) >= threshold:
                high = middle
            else:
                low = middle + 1
        return low

    @cached_property
    def top(self) -> float:
        """The largest radius: n successes out of n, sigma * Phi^-1(alpha^(1/n)) for Gaussian noise (-inf when
        no count certifies)."""
        return float(self.radius(self.n)) if self.first <= self.n else -math.inf

    def locate(self, values: Any, tolerances: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For printed radii and their tolerances ([M] each): (beyond, on, counts). ``beyond``: above the top
        by more than the tolerance; ``on``: some rung lies within the tolerance; ``counts``: the smallest
        count whose rung reaches value - tolerance (n + 1 if none)."""
        values = np.atleast_1d(np.asarray(values, dtype=float))
        tol = np.atleast_1d(np.asarray(tolerances, dtype=float)) + _slack(values)
        low = _smallest_reaching(self.radius, values - tol, self.first, self.n)
        on = np.zeros(values.shape, dtype=bool)
        inside = low <= self.n
        on[inside] = self.radius(low[inside]) <= values[inside] + tol[inside]
        beyond = values - tol > self.top
        return beyond, on, low


def consistent_protocols(
    values: Any,
    tolerances: Any,
    formula: RadiusFormula,
    lower_bound: LowerBound,
    n_grid: Iterable[int] = CANDIDATE_N,
    alpha_grid: Iterable[float] = CANDIDATE_ALPHA,
) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """The (n, alpha) pairs of the grid under which every given (certified, printed) radius is attainable:
    (reaching, below). ``reaching``: the largest radius is the ladder's top (n successes out of n) within its
    tolerance, what a file with any image at the cap shows; ``below``: all attainable, the top not reached."""
    values = np.asarray(values, dtype=float)
    tolerances = np.asarray(tolerances, dtype=float)
    reaching: list[tuple[int, float]] = []
    below: list[tuple[int, float]] = []
    if not len(values):
        return reaching, below
    # one check per distinct printed value (3 significant digits: a few hundred of them)
    distinct = np.unique(np.stack([values, tolerances]), axis=1)  # [2, D]
    largest = int(np.argmax(values))
    for n in n_grid:
        for alpha in alpha_grid:
            ladder = Ladder(formula, n, alpha, lower_bound)
            beyond, on, _ = ladder.locate(distinct[0], distinct[1])
            if beyond.any() or not on.all():
                continue
            top_tol = tolerances[largest] + _slack(values[largest : largest + 1])[0]
            (reaching if abs(values[largest] - ladder.top) <= top_tol else below).append((n, alpha))
    return reaching, below


# ------------------------------------------------------------------------------------------------ findings
@dataclass(frozen=True)
class Finding:
    """One kind of problem in a file: how many rows, what is wrong with them, the first few."""

    kind: str
    count: int
    what: str
    examples: tuple[str, ...] = field(default=())

    def line(self) -> str:
        first = f"; first: {', '.join(self.examples)}" if self.examples else ""
        return f"{self.kind}: {self.count} {self.what}{first}"


def _finding(kind: str, what: str, examples: Sequence[str]) -> list[Finding]:
    return [Finding(kind, len(examples), what, tuple(examples[:EXAMPLES]))] if examples else []


def _radius_of(record: Record) -> float | None:
    value = getattr(record, "radius", None)
    return None if value is None else float(value)


def check_indices(records: Sequence[Record], expected: Sequence[int] | None) -> list[Finding]:
    """Duplicate image indices; with the declared images ``expected``, the missing and the unexpected ones."""
    counts = Counter(record.idx for record in records)
    findings = _finding(
        "duplicate-idx",
        "image indices appear more than once",
        [f"idx {idx} ({times}x)" for idx, times in sorted(counts.items()) if times > 1],
    )
    if expected is not None:
        declared = set(expected)
        findings += _finding(
            "missing-idx",
            f"declared images have no row (of {len(declared)})",
            [f"idx {idx}" for idx in expected if idx not in counts],
        )
        findings += _finding(
            "unexpected-idx",
            "rows are not among the declared images",
            [f"idx {idx}" for idx in sorted(counts) if idx not in declared],
        )
    return findings


def check_rows(records: Sequence[Record]) -> list[Finding]:
    """``correct`` equal to predict == label, and abstentions (predict -1) with radius 0, where the layout has
    those columns."""
    wrong, abstaining = [], []
    for record in records:
        correct = getattr(record, "correct", None)
        if correct is not None and correct != int(record.predict == record.label):
            wrong.append(
                f"idx {record.idx} (label {record.label}, predict {record.predict}, correct {correct})"
            )
        radius = _radius_of(record)
        if isinstance(record, PublishedRecord | CertifyRecord) and record.predict == ABSTAIN and radius != 0:
            abstaining.append(f"idx {record.idx} (radius {radius:g})")
    return _finding("correct-mismatch", "rows whose correct is not predict == label", wrong) + _finding(
        "abstain-radius", "abstentions (predict -1) with a radius other than 0", abstaining
    )


def check_ladder(result: ResultFile, ladder: Ladder) -> list[Finding]:
    """Every certified row's radius (predict != -1; ours: estimation draws made) on the ladder, none above
    its top. Abstentions are :func:`check_rows`' (radius 0)."""
    chosen = [
        i
        for i, record in enumerate(result.records)
        if record.predict != ABSTAIN and not (isinstance(record, CertifyRecord) and record.n == 0)
    ]
    if not chosen:
        return []
    values = np.array([_radius_of(result.records[i]) for i in chosen], dtype=float)
    beyond, on, _ = ladder.locate(values, result.tolerances()[chosen])
    shown = [result.radius_text[i] or repr(float(v)) for i, v in zip(chosen, values)]
    where = f"n={ladder.n}, alpha={ladder.alpha:g}"
    precision = "exactly" if result.exact else "at the printed precision"
    return _finding(
        "beyond-max",
        f"rows with a radius above {ladder.top:.4g}, the largest {where} can give",
        [f"idx {result.records[i].idx} ({text})" for i, text, b in zip(chosen, shown, beyond) if b],
    ) + _finding(
        "off-ladder",
        f"rows with a radius no count k <= n gives at {where} ({precision})",
        [
            f"idx {result.records[i].idx} ({text})"
            for i, text, b, o in zip(chosen, shown, beyond, on)
            if not (b or o)
        ],
    )


def check_counts(
    records: Sequence[CertifyRecord], ladder: Ladder, skip_wrong_guess: bool = False
) -> list[Finding]:
    """Our CERTIFY rows carry their counts: n the declared n (0 for a skipped wrong guess, radius 0), and the
    prediction and radius exactly what (n_a, n) give (abstain below the threshold)."""
    draws, mismatch = [], []
    for record in records:
        if record.n == 0 and skip_wrong_guess and record.predict != record.label and record.radius == 0:
            continue
        if record.n != ladder.n or not 0 <= record.n_a <= record.n:
            draws.append(f"idx {record.idx} (n_a {record.n_a}, n {record.n})")
            continue
        p = float(ladder.lower_bound(record.n_a, ladder.n, ladder.alpha))
        abstain = p < ladder.formula.threshold
        expected = 0.0 if abstain else float(ladder.radius(record.n_a))
        if (record.predict == ABSTAIN) != abstain or abs(record.radius - expected) > _slack(
            np.array(expected)
        ):
            state = "abstain" if abstain else repr(expected)
            mismatch.append(f"idx {record.idx} (n_a {record.n_a}: {state}, row {record.radius!r})")
    what = f"rows whose draws are not the declared n={ladder.n}"
    what += " (or 0 for a skipped wrong guess)" if skip_wrong_guess else ""
    return _finding("draws", what, draws) + _finding(
        "radius-vs-counts", "rows whose radius or abstention is not what their own n_a gives", mismatch
    )


def check_sequential(
    records: Sequence[RadiiRecord],
    grid: Sequence[float],
    formula: RadiusFormula,
    looks: Sequence[int],
    levels: Sequence[float],
    lower_bound: LowerBound,
) -> list[Finding]:
    """Our CERTIFY_RADII rows: ``radius`` a grid radius, and exactly the largest one whose threshold the row's
    ``lower`` clears (>=; > at r = 0), ``n`` one of the looks, ``lower`` a Clopper-Pearson bound p_lower(k, n_j,
    alpha_j) of a look n_j <= n (the running maximum over looks), never above the largest of them."""
    grid = tuple(float(r) for r in grid)
    thresholds = formula.probability_for_radius(np.asarray(grid))  # [R]
    off_grid, samples, above, off, mismatch = [], [], [], [], []
    lowers = np.array([record.lower for record in records], dtype=float)
    # per record: is lower some look's Clopper-Pearson bound, at a look it reached?
    matched = lowers == 0.0  # a count of 0 gives the bound 0 at every look
    tops = np.full(len(records), -np.inf)
    for look, level in zip(looks, levels):
        reached = np.array([record.n >= look for record in records], dtype=bool)
        if not reached.any():
            continue
        tops[reached] = np.maximum(tops[reached], float(lower_bound(look, look, level)))

        def bound(k: np.ndarray, look: int = look, level: float = level) -> np.ndarray:
            return np.asarray(lower_bound(k, look, level), dtype=float)

        target = lowers[reached]
        counts = _smallest_reaching(bound, target - _slack(target), 0, look)
        hit = np.zeros(target.shape, dtype=bool)
        inside = counts <= look
        hit[inside] = np.abs(bound(counts[inside]) - target[inside]) <= _slack(target[inside])
        matched[reached] |= hit
    for i, record in enumerate(records):
        name = f"idx {record.idx}"
        if record.radius is not None and record.radius not in grid:
            off_grid.append(f"{name} ({record.radius!r})")
        if record.n not in looks:
            samples.append(f"{name} (n {record.n})")
            continue
        if record.lower > tops[i] + _slack(np.array(tops[i])):
            above.append(f"{name} (lower {record.lower!r} > {float(tops[i])!r})")
        elif not matched[i]:
            off.append(f"{name} (lower {record.lower!r})")
        clears = [(record.lower > t) if r == 0 else (record.lower >= t) for r, t in zip(grid, thresholds)]
        expected = max((r for r, c in zip(grid, clears) if c), default=None)
        if expected != record.radius:
            mismatch.append(f"{name} (radius {record.radius!r}, lower clears {expected!r})")
    return (
        _finding("off-grid", f"rows with a radius not in the grid {list(grid)}", off_grid)
        + _finding("draws", f"rows whose samples are not a look {list(looks)}", samples)
        + _finding(
            "beyond-max", "rows with a lower bound above the largest any look they reached gives", above
        )
        + _finding("off-ladder", "rows with a lower bound no count gives at a look they reached", off)
        + _finding(
            "radius-vs-lower",
            "rows whose radius is not the largest grid radius their lower bound certifies",
            mismatch,
        )
    )


def certified_values(result: ResultFile) -> tuple[np.ndarray, np.ndarray]:
    """([M] radii, [M] tolerances) of the certified rows of a CERTIFY file (predict != -1, draws made)."""
    chosen = [
        i
        for i, record in enumerate(result.records)
        if record.predict != ABSTAIN
        and _radius_of(record) is not None
        and not (isinstance(record, CertifyRecord) and record.n == 0)
    ]
    values = np.array([_radius_of(result.records[i]) for i in chosen], dtype=float)
    return values, result.tolerances()[chosen]

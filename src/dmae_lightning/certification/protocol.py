"""The contract between a certification procedure and the sampler that serves it.

A procedure (:mod:`.procedures`) is a small object of plain settings whose ``run(idx, label, noise)`` is a
generator: it yields :class:`Draw` requests, receives the class counts of each, and returns the image's
record. A procedure that attacks the smoothed classifier also yields :class:`Attack` requests (it receives
the adversarial image) and samples around that image with :class:`DrawAround`. Only the sampler
(:mod:`.sampler`) starts a run, with the noise it draws the samples from, so the noise a radius is computed
with is always the noise the counts came from: no public call accepts a run started elsewhere. Its ``summarise`` turns a run's records into its kind of result (:mod:`.summary`). Imports:
torch (types only), the noise, the records and the metrics.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from dmae_lightning.certification.metrics import DEFAULT_RHO
from dmae_lightning.certification.records import Record
from dmae_lightning.noise import Noise

if TYPE_CHECKING:
    from dmae_lightning.certification.summary import Result


@dataclass(frozen=True)
class Draw:
    """A procedure's request: ``num`` more noisy samples of its image from noise stage ``stage``.

    Requests on the same stage continue its stream (the second request gets the samples after the first's).
    """

    stage: int
    num: int


@dataclass(frozen=True)
class DrawAround(Draw):
    """A :class:`Draw` around another image than the run's own: ``image`` [C,H,W] (an :class:`Attack`'s answer).

    The samples are ``image`` plus the noise of stage ``stage`` of the run's image (seeded by its idx, as every
    Draw's): one stage serves one image."""

    image: torch.Tensor = field(compare=False, repr=False)


@dataclass(frozen=True)
class Attack:
    """A procedure's request: the adversarial image [C,H,W] of an L2 PGD attack on the soft smoothed classifier.

    The sampler (:meth:`.sampler.Sampler.attack`) runs ``steps`` steps of size ``step_size * eps / steps`` that
    maximise -log G(x')_label, G(x') = mean_i softmax(f(x' + delta_i)) over ``samples`` noise draws delta_i of
    stage ``stage`` (drawn once, the same at every step), each step projected onto ``||x' - x||_2 <= eps`` and
    [0,1]; ``random_start``: from a uniform point of the ball instead of x. It runs in float32 with autograd,
    whatever the precision of the Draws.
    """

    stage: int
    label: int
    eps: float
    steps: int
    step_size: float
    samples: int
    random_start: bool


Request = Draw | Attack  # what a procedure run yields
# A procedure run: yields requests, receives the [K] counts of a Draw or the [C,H,W] image of an Attack,
# returns a record.
Run = Generator[Request, torch.Tensor, Record]


class Procedure(ABC):
    """Interface of a certification procedure (see :mod:`.procedures`)."""

    name: ClassVar[str]  # the procedure= value; results go to <name>.tsv
    record_type: ClassVar[type[Record]]
    # Its records answer only at its grid of radii (sequential: its n is a cap per image): the certified-accuracy
    # plot draws points there, and their mean radius is no ACR comparable with CERTIFY's.
    grid_only: ClassVar[bool] = False
    certifies: ClassVar[bool] = True  # its records carry certified radii (PREDICT's and the attack's do not)

    @abstractmethod
    def run(self, idx: int, label: int, noise: Noise) -> Run:
        """Yield Draws (and Attacks), receive the counts of samples drawn with ``noise`` (and the adversarial
        images), return the image's record.

        Called by the sampler only, with its own noise (:meth:`.sampler.Sampler.submit`)."""

    @abstractmethod
    def settings(self) -> dict:
        """Everything the per-image results depend on besides the noise, seed, model and data."""

    @abstractmethod
    def summarise(
        self, records: Sequence[Record], radii: tuple[float, ...], noise: Noise, rho: float = DEFAULT_RHO
    ) -> Result:
        """The run's result (:mod:`.summary`) from its records: at the tables' ``radii``, for samples drawn with
        ``noise``, with the data-set-level lower bound at level 1 - ``rho`` where it certifies radii."""

    @classmethod
    @abstractmethod
    def result_from_json(cls, data: Mapping[str, Any]) -> Result:
        """The result :meth:`summarise` gives, read back from the fields of a summary.json
        (:func:`.summary.read_summary`)."""

    @classmethod
    @abstractmethod
    def from_params(cls, params: Any, radii: tuple[float, ...]) -> Procedure:
        """The procedure of a validated job (``params``: :class:`~.params.JobParams`; ``radii``: the
        radii of the job's tables, the data set's paper radii unless the job names others)."""

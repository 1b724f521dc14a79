"""The contract between a certification procedure and the sampler that serves it.

A procedure (:mod:`.procedures`) is a small object of plain settings whose ``run(idx, label, noise)`` is a
generator: it yields :class:`Draw` requests, receives the class counts of each, and returns the image's
record. Only the sampler (:mod:`.sampler`) starts a run, with the noise it draws the samples from, so the
noise a radius is computed with is always the noise the counts came from: no public call accepts a run
started elsewhere. Its ``summarise`` turns a run's records into its kind of result (:mod:`.summary`). Imports:
torch (types only), the noise, the records and the metrics.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
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


Run = Generator[
    Draw, torch.Tensor, Record
]  # a procedure run: yields Draws, receives [K] counts, returns a record


class Procedure(ABC):
    """Interface of a certification procedure (see :mod:`.procedures`)."""

    name: ClassVar[str]  # the procedure= value; results go to <name>.tsv
    record_type: ClassVar[type[Record]]
    # Its records answer only at its grid of radii (sequential: its n is a cap per image): the certified-accuracy
    # plot draws points there, and their mean radius is no ACR comparable with CERTIFY's.
    grid_only: ClassVar[bool] = False
    certifies: ClassVar[bool] = True  # its records carry certified radii (PREDICT's do not)

    @abstractmethod
    def run(self, idx: int, label: int, noise: Noise) -> Run:
        """Yield Draws, receive counts (of samples drawn with ``noise``), return the image's record.

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

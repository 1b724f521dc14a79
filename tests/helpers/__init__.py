"""Test-only helpers shared by several test modules: plain functions and classes, no fixtures (those are in
``tests/conftest.py``). ``tests/`` is on ``sys.path`` (``pythonpath`` in pyproject.toml's pytest options), so
tests import them as ``from helpers import REPO`` or ``from helpers.cifar import write_cifar``; a test module
never imports another test module.

- ``helpers`` (this file): ``REPO`` (the repository root), ``CONF`` (its ``conf/``), ``TESTS`` (``tests/``)
- ``helpers.cifar``: CIFAR-10 python batches (``write_cifar``, ``write_hostile``)
- ``helpers.imagenet``: an ImageNet-layout folder of JPEGs (``WNIDS``, ``write_imagenet``)
- ``helpers.certify``: a small classifier checkpoint and the certification job run in-process or as a script
- ``helpers.noise``: the documented certification noise scheme written out (``reference_noise``)
- ``helpers.rundirs``: a fake certification run directory (``make_run``), the one run directory of a logs tree
- ``helpers.scripts``: ``python train.py ...`` in a fresh interpreter (``run_script``, ``clean_env``)
- ``helpers.probes``: the ``NoiseProbe`` callback that training subprocesses load
  (``+callbacks.probe._target_=helpers.probes.NoiseProbe``, ``tests/`` on ``PYTHONPATH``) and its checks

Keep this file import-light: the training subprocesses import it (through ``helpers.probes``).
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
TESTS = REPO / "tests"

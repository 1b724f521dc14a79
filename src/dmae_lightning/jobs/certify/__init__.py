"""The certification job (``python certify.py``): :mod:`.params` validates the settings, :mod:`.job` loads the
checkpoint and data and runs :mod:`.predictor` (one Lightning predict loop per rank over a
:class:`~dmae_lightning.certification.Sampler`), :mod:`.shards` keeps each rank's records crash-safe and merges
them. The certification library itself is :mod:`dmae_lightning.certification`."""

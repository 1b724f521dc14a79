"""The jobs behind the entry points, and the Hydra glue they share: the top layer, which may import every
other package (never the other way round).

- :mod:`.train`       ``train(cfg)``: pre-training, fine-tuning, linear probing (``python train.py``)
- :mod:`.quickstart`  the digits pipeline (pre-train, fine-tune, certify, attack) (``python train.py experiment=quickstart``)
- :mod:`.certify`     ``certify(cfg)`` with its validated params, Lightning predictor and result shards
                      (``python certify.py``)
- :mod:`.analyze`     tables and plots over certification runs and published logs (``python -m ...jobs.analyze``)
- :mod:`.audit`       is every radius of a result file attainable under its protocol? (``python -m ...jobs.audit``)
- :mod:`.export`      a run's classifier as model.safetensors + config.json + model card (``python -m ...jobs.export``)
- :mod:`.rundir`      run directories: identity digest, lock, records, ``latest``, the lifecycle ``run_in_dir``
- :mod:`.resolvers`   the configs' OmegaConf resolvers (registered on import of this package)
- :mod:`.compose`     one Hydra compose for tests, notebooks and the quickstart's stages
- :mod:`.cluster`     rank and SLURM job from the environment
- :mod:`.tracking`    loggers (CSV that survives requeue, W&B) and Lightning's chatter filter
"""

import dmae_lightning.jobs.resolvers  # noqa: F401 (Hydra resolves ${run_dir:} etc. before any job code runs)

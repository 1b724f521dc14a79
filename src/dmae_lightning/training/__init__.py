"""Training: the LightningModules of DMAE pre-training (:mod:`.pretrain`) and of the base classifier's
fine-tuning and linear probing (:mod:`.finetune`) on their shared skeleton (:mod:`.base`), the fine-tuning
objectives (:mod:`.objectives`), their optimiser and schedule (:mod:`.optim`), callbacks
(:mod:`.callbacks`, :mod:`.progress`) and the checkpoint a run resumes from (:mod:`.resume`).

Imports: torch, Lightning, timm, and from this package :mod:`dmae_lightning.models`, :mod:`dmae_lightning.noise`,
:mod:`dmae_lightning.rng`, :mod:`dmae_lightning.errors`, :mod:`dmae_lightning.files`; never the jobs or Hydra.
"""

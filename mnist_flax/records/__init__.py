"""A run's record on disk: the workdir's files (atomic writes, the lock), provenance, and a run read back.

Imports `config` and `tracking` below it; `mnist_flax.layout` names every file.
"""

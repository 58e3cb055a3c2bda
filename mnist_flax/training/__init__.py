"""The training core: models, data, the compiled steps, metrics, devices, the loop and its periodic actions,
checkpoints and the resume checks.

Imports `config`, `records` and (lazily, when a run starts) `tracking` below it. Importable without TensorFlow.
"""

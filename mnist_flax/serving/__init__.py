"""Using a trained model: a run's best model exported for runtimes outside this code base, and predictions.

trained (a model read back from a run, a checkpoint folder or a W&B model artifact), model_card, export
(`python -m mnist_flax export`: ONNX through jax2onnx, or a `jax.export` program), images (the inputs a
user gives) and predictor (`python -m mnist_flax predict`: an export run by onnxruntime, or a checkpoint by
JAX). Imports errors, layout, config, tracking, records and training below it; jax only where a checkpoint is
read, so an export runs without it.
"""

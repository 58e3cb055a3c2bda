"""mnist_flax: JAX/Flax training and experiment management on the MNIST family.

The subpackages are layers; each imports only those below it (tests/test_layout.py checks it):

    errors, layout   error types and exit statuses; the names of a run's files, statuses, W&B keys
    config           config files: schema and validation, overrides
    tracking         the W&B run, the metric writers, the `.wandb` reader, the token
    records          a run's files on disk, its provenance, a run read back
    training         models, data, compiled steps, the loop, checkpoints (imports without TensorFlow)
    serving          a trained model as a product: export (ONNX, jax.export), model card, predict
    sweeps           search spaces, the Optuna study, the worker
    commands         `python -m mnist_flax COMMAND`
"""

__version__ = "0.1.0"

"""Configs as code: loading a config file, its fields' schema and validation, overrides, differences.

Imports only `mnist_flax.errors`; nothing here needs JAX or TensorFlow.
"""

"""mnist_flax: JAX/Flax training and experiment management on the MNIST family.

The training core (`models`, `input_pipeline`, `train`, `metrics`) imports
without TensorFlow; the metric writers (`writers`) need it through clu.
"""

__version__ = "0.1.0"
